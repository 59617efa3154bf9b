"""The paper's tables (2 to 11), computed once from tidy frames, and the grid's numbers beside the published ones.

Every function takes polars frames in one of the layouts below, whether they come
from the published numbers (:mod:`cdlib.paper`) or from a grid's own outputs, so
regenerated and published results go through the same code and can be put side
by side (:func:`side_by_side`). Columns a function needs are checked up front and a
missing one is named; optional columns that are absent come out as nulls.

Run layout (``runs``): one row per (teacher, student, method, source, group)
    teacher, student, method ("lora"/"full"), source ("raw", "answer_only",
    "truncated", or a compressor name such as "llama70b"), group ("math", "science",
    "medicine", "commonsense", "ood_reasoning", "ood_knowledge", "overall";
    a frame without ``group`` is read as overall rows), accuracy, se.
    Run-level columns, read from the ``overall`` row: mean_completion_tokens,
    mean_completion_tokens_excl_trunc, truncation_rate, median_reasoning_chars,
    median_reasoning_tokens, reasoning_tokens_q1, reasoning_tokens_q3,
    acc_per_1k_tokens (computed from accuracy and mean_completion_tokens when
    absent), train_tokens, train_hours, speedup (optional: raw hours / hours when
    absent), gpus, gpu_hours.
Compression layout (``compression``): teacher, compressor, domain, dataset,
    original_chars, compressed_chars, compressed_tokens, optional n. A row is either
    one trace (no ``n``) or a dataset summary holding means over ``n`` traces.
    Aggregate ratios are ratios of means, rho = sum(n*compressed) / sum(n*original),
    which is how the paper's Tables 2 and 5 are computed.
Generation layout (``generation``): teacher, domain, dataset, reasoning_chars (or
    the ``reasoning`` text), completion_tokens, optional n (per trace, or per-dataset
    means as above). Stage 1's trace records fit once a ``teacher`` column is added.
Judge layout (``judge``): teacher, compressor, domain, dataset, faithfulness (1-5),
    faithful and answer_aligned (booleans per trace or fractions), optional n.
Trace-length layout (``traces``, Figure 2): teacher, source, reasoning_tokens, one
    row per trace.
Loss layout (``losses``, Figure 3): teacher, student, method, source, step, loss.

Outputs: ``tableN(...)`` return polars frames in the paper's arrangement (the stage modules'
own per-cell tables use the same aggregations and column names); :func:`compare` and
:func:`grid_side_by_side` put a grid's numbers beside the published ones. The charts drawn
from the same layouts are in :mod:`cdlib.figures`; a grid's outputs are read into these
layouts by :mod:`cdlib.results` and :mod:`cdlib.student_runs`; :mod:`cdlib.report` writes the tables and the page.
"""

from __future__ import annotations

import functools
import re

import polars as pl

from cdlib.outputs import failed_expr

RUN_KEYS = ["teacher", "student", "method", "source"]


GROUPS = ["math", "science", "medicine", "commonsense", "ood_reasoning", "ood_knowledge", "overall_only", "overall"]


NON_COMPRESSED = {"raw", "answer_only", "truncated"}


INFERENCE_COLUMNS = ["mean_completion_tokens", "mean_completion_tokens_excl_trunc", "truncation_rate",
                     "median_reasoning_chars", "acc_per_1k_tokens"]


SOURCE_LABELS = {"raw": "Raw", "answer_only": "Answer-only", "truncated": "Truncated",
                 "llama70b": "Llama-70B comp.", "ministral14b": "Ministral-14B comp."}


ORDER = {
    "teacher": ["Qwen3.5-397B-A17B", "gpt-oss-120B"],
    "student": ["Qwen3.5-0.8B", "Llama-3.1-8B", "Qwen3.5-9B", "gpt-oss-20B"],
    "source": ["raw", "answer_only", "truncated", "llama70b", "ministral14b"],
    "compressor": ["llama70b", "ministral14b"],
    "method": ["lora", "full"],
    "group": GROUPS,
    "domain": ["math", "science", "logic", "medical", "mmlu"],
}


def need_columns(df: pl.DataFrame, columns: list[str], what: str) -> None:
    """Raise a ValueError naming ``what`` and the columns of ``columns`` that ``df`` lacks."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; have {df.columns}")


def with_optional(df: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """``df`` with each optional column of ``columns`` it lacks added as nulls."""
    return df.with_columns(pl.lit(None, dtype=pl.Float64).alias(c) for c in columns if c not in df.columns)


def paper_sort(df: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Sort by the paper's order for known names (teachers, students, sources...), others after by name."""
    keys = []
    for col in by:
        if col not in df.columns:
            continue
        order = ORDER.get(col)
        if order:
            keys.append(pl.col(col).replace_strict(order, list(range(len(order))), default=len(order),
                                                   return_dtype=pl.Int64))
        keys.append(pl.col(col))
    return df.sort(keys, nulls_last=True) if keys else df


def paper_order(values: list[str], col: str) -> list[str]:
    """``values`` of column ``col`` in the paper's order (:data:`ORDER`), unknown ones after by name."""
    order = ORDER.get(col, [])
    return [v for v in order if v in values] + sorted(v for v in values if v not in order)


def with_weights(df: pl.DataFrame) -> pl.DataFrame:
    """``df`` with ``n`` = 1 per row when it has no ``n`` (a row per trace rather than a dataset summary)."""
    return df if "n" in df.columns else df.with_columns(n=pl.lit(1, dtype=pl.Int64))


def overall_rows(runs: pl.DataFrame) -> pl.DataFrame:
    """One row per run: the ``overall`` group row (or every row if there is no ``group``)."""
    need_columns(runs, RUN_KEYS, "run frame")
    df = runs.filter(pl.col("group") == "overall") if "group" in runs.columns else runs
    dup = df.group_by(RUN_KEYS).len().filter(pl.col("len") > 1)
    if not dup.is_empty():
        raise ValueError(f"run frame: more than one overall row for run(s) {dup.select(RUN_KEYS).to_dicts()[:3]}")
    return df


def _wide_by(df: pl.DataFrame, index: list[str], on: str, values: list[str],
             name: str = "{value}_{on}") -> pl.DataFrame:
    """Pivot ``values`` to one column per value of ``on``, named like ``hours_raw``, in the paper's order."""
    levels = paper_order(df[on].unique().drop_nulls().to_list(), on)
    out = df.select(index).unique()
    for level in levels:
        columns = [pl.col(v).alias(name.format(value=v, on=level)) for v in values]
        part = df.filter(pl.col(on) == level).select(index + columns)
        out = out.join(part, on=index, how="left", nulls_equal=True)
    return out


def _compressors(sources: list[str]) -> list[str]:
    return paper_order([s for s in sources if s not in NON_COMPRESSED], "source")


def compression_means(compression: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Per ``by`` (every row when empty): ``mean_compressed_chars``, ``mean_compressed_tokens`` and ``rho`` = mean
    compressed / mean original characters (a ratio of means, as the paper's Tables 2 and 5), weighted by ``n``.
    The one computation behind Tables 2 and 5, the compress stage's own table (:func:`cdlib.compress.table5`)
    and the side-by-side."""
    c = with_optional(with_weights(compression), ["compressed_tokens"])
    mean = lambda col: (pl.col("n") * pl.col(col)).sum() / pl.col("n").sum()  # noqa: E731
    aggs = dict(mean_compressed_chars=mean("compressed_chars"), mean_compressed_tokens=mean("compressed_tokens"),
                rho=(pl.col("n") * pl.col("compressed_chars")).sum() / (pl.col("n") * pl.col("original_chars")).sum())
    return c.group_by(by).agg(**aggs) if by else c.select(**aggs)


def flag_counts(drop: pl.Expr) -> dict[str, pl.Expr]:
    """The answer-preservation checker's counts as aggregations: ``n``, ``flagged``, ``flag_rate``, ``failed``
    (flag ``error``: compressions that never came back, left out of every source) and ``dropped`` (rows where
    ``drop``: left out of training)."""
    flagged = pl.col("flag").is_not_null()
    return dict(n=pl.len(), flagged=flagged.sum(), flag_rate=flagged.mean(), failed=failed_expr().sum(),
                dropped=drop.sum())


def count_table(counts: dict[str, int], name: str) -> pl.DataFrame:
    """``{label: count}`` as a polars frame of ``name`` and ``count``, most frequent first."""
    return pl.DataFrame({name: list(counts), "count": list(counts.values())},
                        schema={name: pl.String, "count": pl.Int64}).sort("count", descending=True)


def _kept_with_failed(compression: pl.DataFrame, by: list[str]) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """The rows kept for training (those not ``drop``) and, when the frame has ``flag``, the ``failed`` count per
    ``by``. Given every row (``grid_compression(include_flagged=True)``), the count is the questions left out of
    every source because a compressor never answered; given the kept rows only, it is 0."""
    kept = compression.filter(~pl.col("drop")) if "drop" in compression.columns else compression
    if "flag" not in compression.columns:
        return kept, None
    return kept, compression.group_by(by).agg(failed=failed_expr().sum())


def table2(compression: pl.DataFrame) -> pl.DataFrame:
    """Table 2: mean compressed length (chars) and rho per (teacher, compressor), over the rows kept for training;
    with ``flag``, also ``failed``: the compressions that never came back (:func:`_kept_with_failed`)."""
    need_columns(compression, ["teacher", "compressor", "original_chars", "compressed_chars"], "table2")
    keys = ["teacher", "compressor"]
    kept, failed = _kept_with_failed(compression, keys)
    df = compression_means(kept, keys).select(*keys, "mean_compressed_chars", "rho")
    if failed is not None:
        df = failed.join(df, on=keys, how="left").select(*keys, "mean_compressed_chars", "rho", "failed")
    return paper_sort(df, keys)


def table3(runs: pl.DataFrame) -> pl.DataFrame:
    """Table 3: overall accuracy of raw and compressed-trace runs, one column per source."""
    df = overall_rows(runs)
    need_columns(df, ["accuracy"], "table3")
    df = df.filter(~pl.col("source").is_in(["answer_only", "truncated"]))
    sources = ["raw"] + _compressors(df["source"].unique().to_list())
    wide = df.pivot("source", index=["teacher", "student", "method"], values="accuracy")
    return paper_sort(wide.select("teacher", "student", "method", *[s for s in sources if s in wide.columns]),
                 ["teacher", "student", "method"])


def trace_means(generation: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Per ``by``: traces ``n_correct`` (the generation layout holds correct traces), ``mean_reasoning_chars``
    and ``mean_completion_tokens``, weighted by ``n``. The one computation behind Table 4 and the generate
    stage's own table (:func:`cdlib.generate.table4`)."""
    if "reasoning_chars" not in generation.columns and "reasoning" in generation.columns:
        generation = generation.with_columns(reasoning_chars=pl.col("reasoning").str.len_chars())
    need_columns(generation, by + ["reasoning_chars", "completion_tokens"], "trace_means")
    mean = lambda col: (pl.col("n") * pl.col(col)).sum() / pl.col("n").sum()  # noqa: E731
    return with_weights(generation).group_by(by).agg(n_correct=pl.col("n").sum(),
                                                     mean_reasoning_chars=mean("reasoning_chars"),
                                                     mean_completion_tokens=mean("completion_tokens"))


def table4(generation: pl.DataFrame) -> pl.DataFrame:
    """Table 4: correct traces, mean reasoning chars and mean completion tokens per dataset, with totals."""
    need_columns(generation, ["teacher", "domain", "dataset"], "table4")
    per = paper_sort(trace_means(generation, ["teacher", "domain", "dataset"]), ["teacher", "domain", "dataset"])
    totals = per.group_by("teacher").agg(pl.col("n_correct").sum()).with_columns(
        domain=pl.lit(None, pl.String), dataset=pl.lit("Total"),
        mean_reasoning_chars=pl.lit(None, pl.Float64), mean_completion_tokens=pl.lit(None, pl.Float64))
    out = pl.concat([per, totals.select(per.columns)])
    return paper_sort(out.with_columns(_total=pl.col("dataset") == "Total"), ["teacher", "_total"]).drop("_total")


def table5(compression: pl.DataFrame) -> pl.DataFrame:
    """Table 5: per-dataset compressed chars, tokens and rho, one column group per compressor, with Overall rows
    (whose tokens the paper prints as a dash)."""
    need_columns(compression, ["teacher", "compressor", "domain", "dataset", "original_chars", "compressed_chars"],
                 "table5")
    values = ["mean_compressed_chars", "mean_compressed_tokens", "rho"]
    per_keys = ["teacher", "compressor", "domain", "dataset"]
    kept, failed = _kept_with_failed(compression, per_keys)
    per = compression_means(kept, per_keys)
    overall = compression_means(kept, ["teacher", "compressor"]).with_columns(
        domain=pl.lit(None, pl.String), dataset=pl.lit("Overall"), mean_compressed_tokens=pl.lit(None, pl.Float64))
    if failed is not None:  # with the count of compressions that never came back, per dataset and overall
        values.append("failed")
        per = failed.join(per, on=per_keys, how="left", nulls_equal=True)
        overall = failed.group_by("teacher", "compressor").agg(pl.col("failed").sum()).join(
            overall, on=["teacher", "compressor"], how="left").with_columns(
            domain=pl.lit(None, pl.String), dataset=pl.lit("Overall"))
    df = pl.concat([per, overall.select(per.columns)])
    wide = _wide_by(df, ["teacher", "domain", "dataset"], "compressor", values, "{on}_{value}")
    wide = wide.with_columns(_overall=pl.col("dataset") == "Overall")
    return paper_sort(wide, ["teacher", "_overall", "domain", "dataset"]).drop("_overall")


def table6(runs: pl.DataFrame) -> pl.DataFrame:
    """Table 6: training hours, speedup vs raw and trainable tokens (M) per source.

    The tokens are the paper's "source-dataset trainable-token totals ... before the epoch multiplier"
    (App. H.4): the supervised tokens of every row of the run's training data, the validation split
    included (``source_tokens``, recorded by :func:`cdlib.train.run`); a run without it (published
    numbers, older cells) shows ``train_tokens``. Runs that recorded ``overlong_dropped`` (samples longer
    than the sequence length, dropped as the paper's Axolotl does) add one such column per source.
    """
    df = with_optional(overall_rows(runs), ["speedup", "source_tokens"])
    need_columns(df, ["train_hours", "train_tokens"], "table6")
    raw = df.filter(pl.col("source") == "raw").select("teacher", "student", "method",
                                                      pl.col("train_hours").alias("_raw_h"))
    df = df.join(raw, on=["teacher", "student", "method"], how="left").with_columns(
        speedup=pl.when(pl.col("source") == "raw").then(None)
        .otherwise(pl.coalesce(pl.col("speedup"), pl.col("_raw_h") / pl.col("train_hours"))),
        tokens_m=pl.coalesce(pl.col("source_tokens"), pl.col("train_tokens")) / 1e6,
        hours=pl.col("train_hours"),
    )
    values = ["hours", "speedup", "tokens_m"]
    if "overlong_dropped" in df.columns and df["overlong_dropped"].null_count() < df.height:
        values.append("overlong_dropped")  # samples over seq_len the run left out (overlong: drop, as Axolotl)
        df = df.with_columns(pl.col("overlong_dropped").cast(pl.Int64))
    wide = _wide_by(df, ["teacher", "student", "method"], "source", values)
    wide = wide.drop([c for c in wide.columns if c.startswith("speedup_") and wide[c].null_count() == wide.height])
    cols = [c for prefix in [f"{v}_" for v in values] for c in wide.columns if c.startswith(prefix)]
    return paper_sort(wide.select("teacher", "student", "method", *cols), ["teacher", "student", "method"])


CI95_Z = 1.96  # Table 7's ± is 1.96 * sqrt(p(1-p)/n), a normal 95% interval half-width (not the SE)


def with_ci95(runs: pl.DataFrame) -> pl.DataFrame:
    """``runs`` with ``ci95`` = 1.96 × ``se`` where it is missing (the quantity Table 7 prints after ±)."""
    r = with_optional(runs, ["se"]).with_columns(pl.col("se").cast(pl.Float64))
    ci = (CI95_Z * pl.col("se"))
    return r.with_columns(ci95=pl.col("ci95").cast(pl.Float64).fill_null(ci) if "ci95" in r.columns else ci)


def table7(runs: pl.DataFrame) -> pl.DataFrame:
    """Table 7: accuracy per group with its standard error and the paper's ± (``math``, ``math_se``,
    ``math_ci95`` = 1.96 × SE, ...), one row per run.

    The paper's ± equals 1.96·sqrt(p(1-p)/n) (Common-sense 0.599 at n = 1,221 prints 0.027),
    so ``_ci95`` is the column to read against it; ``_se`` is the plain standard error.
    """
    need_columns(runs, RUN_KEYS + ["group", "accuracy"], "table7")
    r = with_ci95(runs)
    groups = paper_order(r["group"].unique().to_list(), "group")
    wide = _wide_by(r, RUN_KEYS, "group", ["accuracy", "se", "ci95"], "{on}_{value}")
    wide = wide.rename({f"{g}_accuracy": g for g in groups})
    cols = RUN_KEYS + [c for g in groups for c in (g, f"{g}_se", f"{g}_ci95")]
    return paper_sort(wide.select(cols), ["teacher", "student", "source", "method"])


def table8(runs: pl.DataFrame) -> pl.DataFrame:
    """Table 8: overall accuracy of truncated vs compressed traces, for runs that have a truncated source."""
    df = overall_rows(runs)
    need_columns(df, ["accuracy"], "table8")
    configs = df.filter(pl.col("source") == "truncated").select("teacher", "student", "method")
    df = df.join(configs, on=["teacher", "student", "method"], how="semi")
    sources = ["truncated"] + _compressors(df["source"].unique().to_list())
    wide = df.filter(pl.col("source").is_in(sources)).pivot("source", index=["teacher", "student", "method"],
                                                            values="accuracy")
    return paper_sort(wide.select("teacher", "student", "method", *[s for s in sources if s in wide.columns]),
                 ["teacher", "student", "method"])


def table9(runs: pl.DataFrame) -> pl.DataFrame:
    """Table 9: inference-time efficiency per run (acc/1k tokens computed when absent)."""
    df = with_optional(overall_rows(runs), INFERENCE_COLUMNS)
    df = df.with_columns(acc_per_1k_tokens=pl.coalesce(
        pl.col("acc_per_1k_tokens"), pl.col("accuracy") / (pl.col("mean_completion_tokens") / 1000)))
    return paper_sort(df.select(RUN_KEYS + INFERENCE_COLUMNS), ["teacher", "student", "source", "method"])


def judged(records: pl.DataFrame) -> pl.DataFrame:
    """A judge cell's ``judgements.jsonl`` records in the judge layout: its parsed verdicts (parse failures left
    out) as dataset, domain, faithfulness, faithful and answer_aligned."""
    return records.filter(pl.col("parse_error").is_null()).select(
        "dataset", "domain", "faithfulness", faithful=pl.col("verdict") == "faithful",
        answer_aligned=pl.col("answer_alignment").cast(pl.Boolean))


def judge_means(judge: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Per ``by`` (every row when empty): judged traces ``n``, mean ``faithfulness`` (1-5), ``pct_faithful``
    and ``pct_aligned`` (% reaching the canonical answer), weighted by ``n``. The one computation behind
    Table 10, the judge stage's own table (:func:`cdlib.judge.table10`) and the side-by-side."""
    j = with_weights(judge).with_columns(pl.col("faithful", "answer_aligned").cast(pl.Float64))
    w = pl.col("n") / pl.col("n").sum()
    aggs = dict(n=pl.col("n").sum(), faithfulness=(w * pl.col("faithfulness")).sum(),
                pct_faithful=(w * pl.col("faithful")).sum() * 100,
                pct_aligned=(w * pl.col("answer_aligned")).sum() * 100)
    return j.group_by(by).agg(**aggs) if by else j.select(**aggs)


def table10(judge: pl.DataFrame) -> pl.DataFrame:
    """Table 10: judge N, mean faithfulness, % faithful and % answer-aligned per dataset and compressor."""
    need_columns(judge, ["teacher", "compressor", "domain", "dataset", "faithfulness", "faithful", "answer_aligned"],
                 "table10")
    per = judge_means(judge, ["teacher", "compressor", "domain", "dataset"])
    overall = judge_means(judge, ["teacher", "compressor"]).with_columns(domain=pl.lit(None, pl.String),
                                                                        dataset=pl.lit("Overall"))
    df = pl.concat([per, overall.select(per.columns)])
    wide = _wide_by(df, ["teacher", "domain", "dataset"], "compressor",
                    ["n", "faithfulness", "pct_faithful", "pct_aligned"], "{on}_{value}")
    wide = wide.with_columns(_overall=pl.col("dataset") == "Overall")
    return paper_sort(wide, ["teacher", "_overall", "domain", "dataset"]).drop("_overall")


def table11(runs: pl.DataFrame) -> pl.DataFrame:
    """Table 11: GPUs, wall-clock hours, GPU-hours and trainable tokens (M) per run."""
    df = with_optional(overall_rows(runs), ["gpus", "train_hours", "gpu_hours", "train_tokens", "source_tokens"])
    df = df.with_columns(gpu_hours=pl.coalesce(pl.col("gpu_hours"), pl.col("gpus") * pl.col("train_hours")),
                         # trainable tokens as Table 6 counts them
                         train_tokens_m=pl.coalesce(pl.col("source_tokens"), pl.col("train_tokens")) / 1e6)
    return paper_sort(df.select(RUN_KEYS + ["gpus", "train_hours", "gpu_hours", "train_tokens_m"]), RUN_KEYS)


def flag_rates(compression: pl.DataFrame) -> pl.DataFrame:
    """The answer-preservation checker's flags per (teacher, compressor, dataset), beside Table 5.

    ``compression`` is :func:`grid_compression` with every row (``include_flagged=True``).
    Columns: n, flagged, flag_rate, dropped (left out of training and of Tables 2/5; 0 with
    the paper's protocol), then one count column per flag kind. The paper checks nothing
    (answer-preservation checks are its future work), so these rates have no published match.
    """
    need_columns(compression, ["teacher", "compressor", "dataset", "flag"], "flag_rates")
    c = compression.with_columns(pl.col("flag").cast(pl.String))
    if "drop" not in c.columns:
        c = c.with_columns(drop=pl.col("flag").is_not_null())
    aggs = flag_counts(pl.col("drop"))
    per = c.group_by("teacher", "compressor", "dataset").agg(**aggs)
    overall = c.group_by("teacher", "compressor").agg(**aggs).with_columns(dataset=pl.lit("Overall"))
    df = pl.concat([per, overall.select(per.columns)])
    kinds = c.filter(pl.col("flag").is_not_null())
    if not kinds.is_empty():
        in_all = kinds.group_by("teacher", "compressor", "flag").len().with_columns(dataset=pl.lit("Overall"))
        counts = pl.concat([kinds.group_by("teacher", "compressor", "dataset", "flag").len(),
                            in_all.select("teacher", "compressor", "dataset", "flag", "len")])
        wide = counts.pivot("flag", index=["teacher", "compressor", "dataset"], values="len")
        df = df.join(wide, on=["teacher", "compressor", "dataset"], how="left")
    df = df.with_columns(_overall=pl.col("dataset") == "Overall")
    return paper_sort(df, ["teacher", "compressor", "_overall", "dataset"]).drop("_overall")


def tables(runs: pl.DataFrame | None = None, compression: pl.DataFrame | None = None,
           generation: pl.DataFrame | None = None, judge: pl.DataFrame | None = None) -> dict[int, pl.DataFrame]:
    """Every table the given frames allow, keyed by the paper's table number."""
    out: dict[int, pl.DataFrame] = {}
    if compression is not None:
        out[2], out[5] = table2(compression), table5(compression)
    if generation is not None:
        out[4] = table4(generation)
    if runs is not None:
        out.update({3: table3(runs), 6: table6(runs), 7: table7(runs), 8: table8(runs), 9: table9(runs),
                    11: table11(runs)})
    if judge is not None:
        out[10] = table10(judge)
    return dict(sorted(out.items()))


TABLE_DIGITS: dict[int, int | dict[str, int]] = {
    2: 3, 3: 3, 4: 0,
    5: {f"{c}_mean_compressed_{v}": 0 for c in ("llama70b", "ministral14b") for v in ("chars", "tokens")},
    6: 1, 7: 3, 8: 3,
    9: {"mean_completion_tokens": 0, "mean_completion_tokens_excl_trunc": 0, "median_reasoning_chars": 0,
        "acc_per_1k_tokens": 4},
    10: 2, 11: 1,
}


def side_by_side(ours: pl.DataFrame, paper: pl.DataFrame, keys: list[str], value: str) -> pl.DataFrame:
    """Join two frames on ``keys``: columns keys, ours, paper, diff (= ours - paper).

    A key present in only one frame keeps its row with nulls on the other side.
    """
    for name, df in (("ours", ours), ("paper", paper)):
        need_columns(df, keys + [value], f"side_by_side ({name})")
        dup = df.group_by(keys).len().filter(pl.col("len") > 1)
        if not dup.is_empty():
            raise ValueError(f"side_by_side ({name}): keys {keys} not unique, e.g. "
                             f"{dup.select(keys).row(0, named=True)}")
    a = ours.select(keys + [pl.col(value).cast(pl.Float64).alias("ours")])
    b = paper.select(keys + [pl.col(value).cast(pl.Float64).alias("paper")])
    out = a.join(b, on=keys, how="full", coalesce=True, nulls_equal=True)
    return paper_sort(out.with_columns(diff=pl.col("ours") - pl.col("paper")), keys)


def _canon(name: object) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


@functools.lru_cache(maxsize=1)
def _paper_vocabulary() -> dict[str, list[str]]:
    from cdlib import paper

    datasets = (set(paper.table(4)["dataset"]) | set(paper.table(10)["dataset"])) - {"Total", "Overall"}
    return {"teacher": list(paper.TEACHERS), "student": list(paper.STUDENTS), "source": list(paper.SOURCES),
            "compressor": list(paper.COMPRESSORS), "dataset": sorted(datasets)}


def paper_name(value: str, column: str) -> str | None:
    """The paper's spelling of a grid's name in ``column`` (teacher, student, source, compressor, dataset).

    Names match up to case and punctuation (``qwen3.5-0.8b`` is ``Qwen3.5-0.8B``, ``gsm8k`` is
    ``GSM8k``), or as an unambiguous prefix of at least 6 letters and digits (``qwen3.5-397b``
    is ``Qwen3.5-397B-A17B``). None when nothing matches (the toy world's names).
    """
    names = _paper_vocabulary().get(column, [])
    c = _canon(value)
    exact = [n for n in names if _canon(n) == c]
    if exact:
        return exact[0]
    prefix = [n for n in names if len(c) >= 6 and _canon(n).startswith(c)]
    return prefix[0] if len(prefix) == 1 else None


def to_paper_names(df: pl.DataFrame) -> pl.DataFrame:
    """Rename the grid's values to the paper's spelling where :func:`paper_name` finds one."""
    for col in ("teacher", "student", "source", "compressor", "dataset"):
        if col in df.columns:
            values = df[col].drop_nulls().unique().to_list()
            mapping = {v: paper_name(v, col) for v in values}
            mapping = {k: v for k, v in mapping.items() if v and v != k}
            if mapping:
                df = df.with_columns(pl.col(col).replace(mapping))
    return df


def compare(ours: pl.DataFrame, published: pl.DataFrame, keys: list[str], metrics: list[str]) -> pl.DataFrame:
    """Long side-by-side frame: keys, metric, ours, paper, diff, for every row of ``ours`` with a value.

    Empty when no row of ours has a published counterpart (the names do not match).
    """
    parts = []
    for m in metrics:
        if m not in ours.columns or m not in published.columns:
            continue
        o = ours.filter(pl.col(m).is_not_null()).select(keys + [m])
        if o.is_empty():
            continue
        s = side_by_side(o, published.select(keys + [m]), keys, m).filter(pl.col("ours").is_not_null())
        parts.append(s.select(*keys, metric=pl.lit(m), ours=pl.col("ours"), paper=pl.col("paper"), diff=pl.col("diff")))
    df = pl.concat(parts) if parts else pl.DataFrame()
    return df if not df.is_empty() and df["paper"].null_count() < df.height else pl.DataFrame()


def grid_side_by_side(runs: pl.DataFrame | None = None, compression: pl.DataFrame | None = None,
                      generation: pl.DataFrame | None = None, judge: pl.DataFrame | None = None,
                      compute_quantities: pl.DataFrame | None = None) -> dict[str, pl.DataFrame]:
    """The grid's numbers beside the published ones, per paper table, where the grid uses the paper's names.

    Keys: ``table2``, ``table4``, ``table5``, ``table6``, ``table7`` (accuracy and the ±
    = 1.96 × SE per group, which covers Tables 3 and 8), ``table9``, ``table10``, ``table11`` and
    ``compute`` (H.4/H.5, only when some other table matched). A table none of whose
    rows match is left out.
    """
    from cdlib import paper

    out: dict[str, pl.DataFrame] = {}
    if compression is not None:
        ours, pub = to_paper_names(compression), paper.compression()
        out["table2"] = compare(table2(ours), table2(pub), ["teacher", "compressor"], ["mean_compressed_chars", "rho"])
        keys = ["teacher", "compressor", "dataset"]
        out["table5"] = compare(compression_means(ours, keys), compression_means(pub, keys), keys,
                                ["mean_compressed_chars", "mean_compressed_tokens", "rho"])
    if generation is not None:
        not_total = pl.col("dataset") != "Total"
        out["table4"] = compare(table4(to_paper_names(generation)).filter(not_total),
                                table4(paper.generation()).filter(not_total), ["teacher", "dataset"],
                                ["n_correct", "mean_reasoning_chars", "mean_completion_tokens"])
    if runs is not None:
        ours, pub = to_paper_names(runs), paper.runs()
        # like with like: the paper prints 1.96 x SE after its ±, so ours is scaled the same way
        out["table7"] = compare(with_ci95(ours), with_ci95(pub), RUN_KEYS + ["group"], ["accuracy", "ci95"])
        ov, pov = overall_rows(ours), overall_rows(pub)
        # like with like: the paper's tokens (Tables 6, 11) count the training and validation split (App. H.4),
        # as our source_tokens do; our train_tokens count the training split only (5% fewer)
        pov = pov.with_columns(source_tokens=pl.col("train_tokens"))
        out["table6"] = compare(with_optional(ov, ["source_tokens"]), pov, RUN_KEYS,
                                ["train_hours", "source_tokens"])
        out["table9"] = compare(ov, pov, RUN_KEYS, INFERENCE_COLUMNS)
        out["table11"] = compare(ov, pov, RUN_KEYS, ["gpus", "gpu_hours"])
    if judge is not None:
        keys = ["teacher", "compressor", "dataset"]
        out["table10"] = compare(judge_means(to_paper_names(judge), keys), judge_means(paper.judge(), keys), keys,
                                 ["faithfulness", "pct_faithful", "pct_aligned"])
    out = {k: v for k, v in out.items() if not v.is_empty()}
    if out and compute_quantities is not None:
        c = compare(compute_quantities, paper.compute(), ["quantity"], ["value"])
        if not c.is_empty():
            out["compute"] = c
    return dict(sorted(out.items(), key=lambda kv: (len(kv[0]), kv[0])))

