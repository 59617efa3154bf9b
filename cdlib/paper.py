"""The published numbers of the Compress-Distill paper, as polars frames.

The CSVs under ``cdlib/data/paper/`` are transcriptions of Tables 1 to 11 and of the
compute/energy figures of Appendix H.4/H.5 (``compute.csv``); their README says how the
garbled text extraction was mapped back onto the paper's grid. Each table CSV is long
and tidy: the key columns of that table (``teacher``, ``student``, ``method``,
``source``, ``group``, ``compressor``, ``domain``, ``dataset``), then ``metric``,
``value``, ``se`` (only Table 7 has standard errors) and ``notes`` (non-empty where a
value needed judgement). A cell the paper does not give is an empty ``value``.

:func:`table` returns a CSV as it is. :func:`runs`, :func:`compression`,
:func:`generation` and :func:`judge` reshape them into the layouts that
:mod:`cdlib.tables` and :mod:`cdlib.figures` draw from, the same layouts a grid's own results take, so
published and regenerated numbers go through the same table and figure code.

Names used throughout: teachers ``Qwen3.5-397B-A17B`` and ``gpt-oss-120B``; students
``Qwen3.5-0.8B``, ``Llama-3.1-8B``, ``Qwen3.5-9B``, ``gpt-oss-20B``; methods ``lora``
and ``full`` (as in :class:`cdlib.params.TrainParams`); sources ``raw``,
``answer_only``, ``truncated``, ``llama70b``, ``ministral14b`` (compressors carry the
same names); groups ``math``, ``science``, ``medicine``, ``commonsense``,
``ood_reasoning``, ``ood_knowledge``, ``overall``; domains ``math``, ``science``,
``logic``, ``medical``, ``mmlu``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import polars as pl

TABLES = tuple(range(1, 12))
TEACHERS = ("Qwen3.5-397B-A17B", "gpt-oss-120B")
STUDENTS = ("Qwen3.5-0.8B", "Llama-3.1-8B", "Qwen3.5-9B", "gpt-oss-20B")
METHODS = ("lora", "full")
SOURCES = ("raw", "answer_only", "truncated", "llama70b", "ministral14b")
COMPRESSORS = ("llama70b", "ministral14b")
GROUPS = ("math", "science", "medicine", "commonsense", "ood_reasoning", "ood_knowledge", "overall")
TITLE = "Compress-Distill: Reasoning Trace Compression for Efficient Knowledge Distillation"

RUN_KEYS = ["teacher", "student", "method", "source"]


def data_dir() -> Path:
    """The folder holding the transcribed CSVs."""
    return Path(str(resources.files("cdlib") / "data" / "paper"))


def _read(path: Path) -> pl.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"published-numbers file missing: {path}")
    return pl.read_csv(path, comment_prefix="#", infer_schema_length=None,
                       schema_overrides={"value": pl.Float64, "se": pl.Float64, "notes": pl.String})


def table(n: int) -> pl.DataFrame:
    """Table ``n`` (1 to 11) of the paper in long form: keys, metric, value, se, notes."""
    if n not in TABLES:
        raise KeyError(f"table {n!r}: the paper's numeric tables are 1 to 11")
    df = _read(data_dir() / f"table{n}.csv")
    keys = [c for c in df.columns if c not in ("metric", "value", "se", "notes")]
    return df.with_columns(pl.col(keys).cast(pl.String), pl.col("notes").fill_null(""))


def compute() -> pl.DataFrame:
    """Appendix H.4/H.5 prose figures: quantity, value, unit, section, notes."""
    path = data_dir() / "compute.csv"
    if not path.exists():
        raise FileNotFoundError(f"published-numbers file missing: {path}")
    return pl.read_csv(path, comment_prefix="#", schema_overrides={"value": pl.Float64})


def compute_value(quantity: str) -> float:
    """One Appendix H figure by name, e.g. ``compute_value("energy_kwh")``."""
    df = compute().filter(pl.col("quantity") == quantity)
    if df.is_empty():
        raise KeyError(f"compute quantity {quantity!r} not in compute.csv; known: {', '.join(compute()['quantity'])}")
    return float(df["value"][0])


def _wide(n: int, index: list[str]) -> pl.DataFrame:
    """Table ``n`` pivoted to one column per metric."""
    return table(n).pivot("metric", index=index, values="value")


def runs() -> pl.DataFrame:
    """The 55 published student runs in :mod:`cdlib.tables`' run layout.

    One row per (teacher, student, method, source, group) from Table 7: ``accuracy``,
    ``ci95`` (the printed ±, which is 1.96·sqrt(p(1-p)/n), a 95% interval; the CSV keeps
    it in its ``se`` column as transcribed) and ``se`` = ``ci95`` / 1.96;
    run-level columns from Table 9 (inference), Table 6 (speedup) and Table 11 (compute)
    repeat on each group row of a run. ``train_tokens`` is in tokens (the paper gives
    millions). Columns the paper does not publish per run (median reasoning tokens and
    their quartiles) are absent; the Qwen-teacher gpt-oss-20B inference statistics are
    null except where Table 9's notes say they could be deduced.
    """
    acc = table(7).select(*RUN_KEYS, "group", pl.col("value").alias("accuracy"), pl.col("se").alias("ci95"),
                          (pl.col("se") / 1.96).alias("se"))
    inference = _wide(9, RUN_KEYS)
    speedup = _wide(6, RUN_KEYS).select(*RUN_KEYS, "speedup")
    cost = _wide(11, RUN_KEYS).select(
        *RUN_KEYS,
        pl.col("gpus").cast(pl.Int64),
        "train_hours",
        "gpu_hours",
        (pl.col("train_tokens_m") * 1e6).cast(pl.Int64).alias("train_tokens"),
    )
    out = acc.join(inference, on=RUN_KEYS, how="left").join(speedup, on=RUN_KEYS, how="left")
    return out.join(cost, on=RUN_KEYS, how="left")


def generation() -> pl.DataFrame:
    """Table 4 per dataset: teacher, domain, dataset, n, reasoning_chars, completion_tokens (means)."""
    df = _wide(4, ["teacher", "domain", "dataset"]).filter(pl.col("dataset") != "Total")
    return df.select(
        "teacher", "domain", "dataset",
        pl.col("n_correct").cast(pl.Int64).alias("n"),
        pl.col("mean_reasoning_chars").alias("reasoning_chars"),
        pl.col("mean_total_tokens").alias("completion_tokens"),
    )


def compression() -> pl.DataFrame:
    """Tables 4 and 5 joined per dataset, in the compression layout of :mod:`cdlib.tables`.

    teacher, compressor, domain, dataset, n (traces, Table 4), original_chars (Table 4),
    compressed_chars, compressed_tokens, rho (Table 5). Values are per-dataset means.
    """
    comp = _wide(5, ["teacher", "compressor", "domain", "dataset"]).filter(pl.col("dataset") != "Overall")
    gen = generation().select("teacher", "dataset", "n", pl.col("reasoning_chars").alias("original_chars"))
    df = comp.join(gen, on=["teacher", "dataset"], how="left")
    missing = df.filter(pl.col("n").is_null())
    if not missing.is_empty():
        raise ValueError(f"table5 datasets without a table4 row: {missing['dataset'].to_list()}")
    return df.select(
        "teacher", "compressor", "domain", "dataset", "n", "original_chars",
        pl.col("mean_compressed_chars").alias("compressed_chars"),
        pl.col("compressed_tokens"), "rho",
    )


def judge() -> pl.DataFrame:
    """Table 10 per dataset: teacher, compressor, domain, dataset, n, faithfulness,
    faithful and answer_aligned (fractions, the paper prints percentages)."""
    df = _wide(10, ["teacher", "compressor", "domain", "dataset"]).filter(pl.col("dataset") != "Overall")
    return df.select(
        "teacher", "compressor", "domain", "dataset",
        pl.col("n").cast(pl.Int64),
        pl.col("mean_faithfulness").alias("faithfulness"),
        (pl.col("pct_faithful") / 100).alias("faithful"),
        (pl.col("pct_answer_aligned") / 100).alias("answer_aligned"),
    )


def teacher_rounds() -> dict[str, int]:
    """The rejection-sampling rounds the paper's own counts allow (its K is not printed; section 3.1 says only
    "up to K times"), as ``params/paper.yaml``'s ``generate.rounds`` (attempts per question, the first included).

    H.4 counts the Qwen teacher pass "over 345,383 questions", more than Table 1's 310,932 training questions:
    read as requests, 345,383 - 310,932 = 34,451 were resamples. Table 4 keeps 283,335 traces, so 27,597
    questions were never answered correctly, and each of them was sent every round: K rounds need at least
    (K - 1) x 27,597 resamples. 34,451 allows K - 1 = 1 (2 x 27,597 = 55,194 would not fit): K = 2, and the
    other 34,451 - 27,597 = 6,854 resamples are the questions answered at their second attempt.
    Returns the numbers and ``rounds``.
    """
    t1 = table(1)
    questions = int(t1.filter(pl.col("metric") == "train")["value"].sum())
    requests = int(compute_value("teacher_questions"))
    kept = int(table(4).filter((pl.col("teacher") == TEACHERS[0]) & (pl.col("dataset") == "Total"))["value"][0])
    never, resamples = questions - kept, requests - questions
    return {"questions": questions, "requests": requests, "kept": kept, "never_answered": never,
            "resamples": resamples, "rounds": 1 + resamples // never}
