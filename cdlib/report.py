"""The paper's tables (2 to 11) and figures (1 to 4, plus a Pareto plot), from tidy frames.

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

Outputs: ``tableN(...)`` return polars frames in the paper's arrangement;
:func:`write_table` writes one as Markdown and LaTeX; ``figN_*`` and :func:`pareto`
return altair charts with tooltips; :func:`save_chart` writes PNG, SVG and HTML.
:func:`paper_tables` and :func:`paper_figures` draw everything the published numbers
allow, for users without GPUs.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import altair as alt
import polars as pl

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


# --------------------------------------------------------------------------- helpers


def _need(df: pl.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; have {df.columns}")


def _with_optional(df: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    return df.with_columns(pl.lit(None, dtype=pl.Float64).alias(c) for c in columns if c not in df.columns)


def _sort(df: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """Sort by the paper's order for known names (teachers, students, sources...), others after by name."""
    keys = []
    for col in by:
        if col not in df.columns:
            continue
        order = ORDER.get(col)
        if order:
            keys.append(pl.col(col).replace_strict(order, list(range(len(order))), default=len(order), return_dtype=pl.Int64))
        keys.append(pl.col(col))
    return df.sort(keys, nulls_last=True) if keys else df


def _ordered(values: list[str], col: str) -> list[str]:
    order = ORDER.get(col, [])
    return [v for v in order if v in values] + sorted(v for v in values if v not in order)


def _weights(df: pl.DataFrame) -> pl.DataFrame:
    return df if "n" in df.columns else df.with_columns(n=pl.lit(1, dtype=pl.Int64))


def _overall(runs: pl.DataFrame) -> pl.DataFrame:
    """One row per run: the ``overall`` group row (or every row if there is no ``group``)."""
    _need(runs, RUN_KEYS, "run frame")
    df = runs.filter(pl.col("group") == "overall") if "group" in runs.columns else runs
    dup = df.group_by(RUN_KEYS).len().filter(pl.col("len") > 1)
    if not dup.is_empty():
        raise ValueError(f"run frame: more than one overall row for run(s) {dup.select(RUN_KEYS).to_dicts()[:3]}")
    return df


def _wide_by(df: pl.DataFrame, index: list[str], on: str, values: list[str], name: str = "{value}_{on}") -> pl.DataFrame:
    """Pivot ``values`` to one column per value of ``on``, named like ``hours_raw``, in the paper's order."""
    levels = _ordered(df[on].unique().drop_nulls().to_list(), on)
    out = df.select(index).unique()
    for level in levels:
        part = df.filter(pl.col(on) == level).select(index + [pl.col(v).alias(name.format(value=v, on=level)) for v in values])
        out = out.join(part, on=index, how="left", nulls_equal=True)
    return out


def _compressors(sources: list[str]) -> list[str]:
    return _ordered([s for s in sources if s not in NON_COMPRESSED], "source")


# --------------------------------------------------------------------------- tables


def table2(compression: pl.DataFrame) -> pl.DataFrame:
    """Table 2: mean compressed length (chars) and rho per (teacher, compressor)."""
    _need(compression, ["teacher", "compressor", "original_chars", "compressed_chars"], "table2")
    df = _weights(compression).group_by("teacher", "compressor").agg(
        mean_compressed_chars=(pl.col("n") * pl.col("compressed_chars")).sum() / pl.col("n").sum(),
        rho=(pl.col("n") * pl.col("compressed_chars")).sum() / (pl.col("n") * pl.col("original_chars")).sum(),
    )
    return _sort(df, ["teacher", "compressor"])


def table3(runs: pl.DataFrame) -> pl.DataFrame:
    """Table 3: overall accuracy of raw and compressed-trace runs, one column per source."""
    df = _overall(runs)
    _need(df, ["accuracy"], "table3")
    df = df.filter(~pl.col("source").is_in(["answer_only", "truncated"]))
    sources = ["raw"] + _compressors(df["source"].unique().to_list())
    wide = df.pivot("source", index=["teacher", "student", "method"], values="accuracy")
    return _sort(wide.select("teacher", "student", "method", *[s for s in sources if s in wide.columns]),
                 ["teacher", "student", "method"])


def table4(generation: pl.DataFrame) -> pl.DataFrame:
    """Table 4: correct traces, mean reasoning chars and mean completion tokens per dataset, with totals."""
    if "reasoning_chars" not in generation.columns and "reasoning" in generation.columns:
        generation = generation.with_columns(reasoning_chars=pl.col("reasoning").str.len_chars())
    _need(generation, ["teacher", "domain", "dataset", "reasoning_chars", "completion_tokens"], "table4")
    g = _weights(generation)
    per = g.group_by("teacher", "domain", "dataset").agg(
        n_correct=pl.col("n").sum(),
        mean_reasoning_chars=(pl.col("n") * pl.col("reasoning_chars")).sum() / pl.col("n").sum(),
        mean_completion_tokens=(pl.col("n") * pl.col("completion_tokens")).sum() / pl.col("n").sum(),
    )
    per = _sort(per, ["teacher", "domain", "dataset"])
    totals = per.group_by("teacher").agg(pl.col("n_correct").sum()).with_columns(
        domain=pl.lit(None, pl.String), dataset=pl.lit("Total"),
        mean_reasoning_chars=pl.lit(None, pl.Float64), mean_completion_tokens=pl.lit(None, pl.Float64))
    out = pl.concat([per, totals.select(per.columns)])
    return _sort(out.with_columns(_total=pl.col("dataset") == "Total"), ["teacher", "_total"]).drop("_total")


def table5(compression: pl.DataFrame) -> pl.DataFrame:
    """Table 5: per-dataset compressed chars, tokens and rho, one column group per compressor, with Overall rows."""
    _need(compression, ["teacher", "compressor", "domain", "dataset", "original_chars", "compressed_chars"], "table5")
    c = _with_optional(_weights(compression), ["compressed_tokens"])

    def agg(by: list[str]) -> pl.DataFrame:
        return c.group_by(by).agg(
            chars=(pl.col("n") * pl.col("compressed_chars")).sum() / pl.col("n").sum(),
            tokens=(pl.col("n") * pl.col("compressed_tokens")).sum() / pl.col("n").sum(),
            rho=(pl.col("n") * pl.col("compressed_chars")).sum() / (pl.col("n") * pl.col("original_chars")).sum(),
        )

    per = agg(["teacher", "compressor", "domain", "dataset"])
    overall = agg(["teacher", "compressor"]).with_columns(
        domain=pl.lit(None, pl.String), dataset=pl.lit("Overall"), tokens=pl.lit(None, pl.Float64))
    df = pl.concat([per, overall.select(per.columns)])
    wide = _wide_by(df, ["teacher", "domain", "dataset"], "compressor", ["chars", "tokens", "rho"], "{on}_{value}")
    wide = wide.with_columns(_overall=pl.col("dataset") == "Overall")
    return _sort(wide, ["teacher", "_overall", "domain", "dataset"]).drop("_overall")


def table6(runs: pl.DataFrame) -> pl.DataFrame:
    """Table 6: training hours, speedup vs raw and trainable tokens (M) per source.

    The tokens are the paper's "source-dataset trainable-token totals ... before the epoch multiplier"
    (App. H.4): the supervised tokens of every row of the run's training data, the validation split
    included (``source_tokens``, recorded by :func:`cdlib.train.run`); a run without it (published
    numbers, older cells) shows ``train_tokens``.
    """
    df = _with_optional(_overall(runs), ["speedup", "source_tokens"])
    _need(df, ["train_hours", "train_tokens"], "table6")
    raw = df.filter(pl.col("source") == "raw").select("teacher", "student", "method", pl.col("train_hours").alias("_raw_h"))
    df = df.join(raw, on=["teacher", "student", "method"], how="left").with_columns(
        speedup=pl.when(pl.col("source") == "raw").then(None)
        .otherwise(pl.coalesce(pl.col("speedup"), pl.col("_raw_h") / pl.col("train_hours"))),
        tokens_m=pl.coalesce(pl.col("source_tokens"), pl.col("train_tokens")) / 1e6,
        hours=pl.col("train_hours"),
    )
    wide = _wide_by(df, ["teacher", "student", "method"], "source", ["hours", "speedup", "tokens_m"])
    wide = wide.drop([c for c in wide.columns if c.startswith("speedup_") and wide[c].null_count() == wide.height])
    cols = [c for prefix in ("hours_", "speedup_", "tokens_m_") for c in wide.columns if c.startswith(prefix)]
    return _sort(wide.select("teacher", "student", "method", *cols), ["teacher", "student", "method"])


CI95_Z = 1.96  # Table 7's ± is 1.96 * sqrt(p(1-p)/n), a normal 95% interval half-width (not the SE)


def with_ci95(runs: pl.DataFrame) -> pl.DataFrame:
    """``runs`` with ``ci95`` = 1.96 × ``se`` where it is missing (the quantity Table 7 prints after ±)."""
    r = _with_optional(runs, ["se"]).with_columns(pl.col("se").cast(pl.Float64))
    ci = (CI95_Z * pl.col("se"))
    return r.with_columns(ci95=pl.col("ci95").cast(pl.Float64).fill_null(ci) if "ci95" in r.columns else ci)


def table7(runs: pl.DataFrame) -> pl.DataFrame:
    """Table 7: accuracy per group with its standard error and the paper's ± (``math``, ``math_se``,
    ``math_ci95`` = 1.96 × SE, ...), one row per run.

    The paper's ± equals 1.96·sqrt(p(1-p)/n) (Common-sense 0.599 at n = 1,221 prints 0.027),
    so ``_ci95`` is the column to read against it; ``_se`` is the plain standard error.
    """
    _need(runs, RUN_KEYS + ["group", "accuracy"], "table7")
    r = with_ci95(runs)
    groups = _ordered(r["group"].unique().to_list(), "group")
    wide = _wide_by(r, RUN_KEYS, "group", ["accuracy", "se", "ci95"], "{on}_{value}")
    wide = wide.rename({f"{g}_accuracy": g for g in groups})
    cols = RUN_KEYS + [c for g in groups for c in (g, f"{g}_se", f"{g}_ci95")]
    return _sort(wide.select(cols), ["teacher", "student", "source", "method"])


def table8(runs: pl.DataFrame) -> pl.DataFrame:
    """Table 8: overall accuracy of truncated vs compressed traces, for runs that have a truncated source."""
    df = _overall(runs)
    _need(df, ["accuracy"], "table8")
    configs = df.filter(pl.col("source") == "truncated").select("teacher", "student", "method")
    df = df.join(configs, on=["teacher", "student", "method"], how="semi")
    sources = ["truncated"] + _compressors(df["source"].unique().to_list())
    wide = df.filter(pl.col("source").is_in(sources)).pivot("source", index=["teacher", "student", "method"], values="accuracy")
    return _sort(wide.select("teacher", "student", "method", *[s for s in sources if s in wide.columns]),
                 ["teacher", "student", "method"])


def table9(runs: pl.DataFrame) -> pl.DataFrame:
    """Table 9: inference-time efficiency per run (acc/1k tokens computed when absent)."""
    df = _with_optional(_overall(runs), INFERENCE_COLUMNS)
    df = df.with_columns(acc_per_1k_tokens=pl.coalesce(
        pl.col("acc_per_1k_tokens"), pl.col("accuracy") / (pl.col("mean_completion_tokens") / 1000)))
    return _sort(df.select(RUN_KEYS + INFERENCE_COLUMNS), ["teacher", "student", "source", "method"])


def table10(judge: pl.DataFrame) -> pl.DataFrame:
    """Table 10: judge N, mean faithfulness, % faithful and % answer-aligned per dataset and compressor."""
    _need(judge, ["teacher", "compressor", "domain", "dataset", "faithfulness", "faithful", "answer_aligned"], "table10")
    j = _weights(judge).with_columns(pl.col("faithful", "answer_aligned").cast(pl.Float64))

    def agg(by: list[str]) -> pl.DataFrame:
        w = pl.col("n") / pl.col("n").sum()
        return j.group_by(by).agg(
            n=pl.col("n").sum(),
            faith=(w * pl.col("faithfulness")).sum(),
            pct_faithful=(w * pl.col("faithful")).sum() * 100,
            pct_align=(w * pl.col("answer_aligned")).sum() * 100,
        )

    per = agg(["teacher", "compressor", "domain", "dataset"])
    overall = agg(["teacher", "compressor"]).with_columns(domain=pl.lit(None, pl.String), dataset=pl.lit("Overall"))
    df = pl.concat([per, overall.select(per.columns)])
    wide = _wide_by(df, ["teacher", "domain", "dataset"], "compressor", ["n", "faith", "pct_faithful", "pct_align"], "{on}_{value}")
    wide = wide.with_columns(_overall=pl.col("dataset") == "Overall")
    return _sort(wide, ["teacher", "_overall", "domain", "dataset"]).drop("_overall")


def table11(runs: pl.DataFrame) -> pl.DataFrame:
    """Table 11: GPUs, wall-clock hours, GPU-hours and trainable tokens (M) per run."""
    df = _with_optional(_overall(runs), ["gpus", "train_hours", "gpu_hours", "train_tokens", "source_tokens"])
    df = df.with_columns(gpu_hours=pl.coalesce(pl.col("gpu_hours"), pl.col("gpus") * pl.col("train_hours")),
                         train_tokens_m=pl.coalesce(pl.col("source_tokens"), pl.col("train_tokens")) / 1e6)  # as Table 6
    return _sort(df.select(RUN_KEYS + ["gpus", "train_hours", "gpu_hours", "train_tokens_m"]), RUN_KEYS)


# --------------------------------------------------------------------------- compute


def compute_energy(gpu_hours: float, gpu_watts: float = 700.0, pue: float = 1.15,
                   kg_co2_per_kwh: float = 0.079) -> dict[str, float]:
    """Appendix H.5 accounting: energy = GPU-hours x board power x PUE; emissions = energy x grid intensity.

    Defaults are the paper's: H100 SXM TDP 700 W, PUE 1.15, 79 gCO2eq/kWh (Finland 2023).
    """
    if gpu_hours < 0 or gpu_watts <= 0 or pue < 1 or kg_co2_per_kwh < 0:
        raise ValueError(f"compute_energy: bad inputs gpu_hours={gpu_hours}, gpu_watts={gpu_watts}, "
                         f"pue={pue}, kg_co2_per_kwh={kg_co2_per_kwh}")
    effective_watts = gpu_watts * pue
    energy_kwh = gpu_hours * effective_watts / 1000
    return {"gpu_hours": gpu_hours, "effective_watts": effective_watts, "energy_kwh": energy_kwh,
            "emissions_kg_co2": energy_kwh * kg_co2_per_kwh}


def compute_table(runs: pl.DataFrame, upstream_gpu_hours: float = 0.0, gpu_watts: float = 700.0,
                  pue: float = 1.15, kg_co2_per_kwh: float = 0.079) -> pl.DataFrame:
    """Appendix H.4/H.5 totals for a set of runs: quantity, value (names as in ``cdlib.paper.compute()``)."""
    t = table11(runs)
    student = t["gpu_hours"].sum()
    trunc = t.filter(pl.col("source") == "truncated")["gpu_hours"].sum()
    energy = compute_energy(student + upstream_gpu_hours, gpu_watts, pue, kg_co2_per_kwh)
    rows = {
        "student_training_gpu_hours": student,
        "main_grid_gpu_hours": student - trunc,
        "truncation_ablation_gpu_hours": trunc,
        "upstream_gpu_hours": upstream_gpu_hours,
        "total_gpu_hours": energy["gpu_hours"],
        "effective_watts": energy["effective_watts"],
        "energy_kwh": energy["energy_kwh"],
        "emissions_kg_co2": energy["emissions_kg_co2"],
    }
    return pl.DataFrame({"quantity": list(rows), "value": [float(v) for v in rows.values()]})


# --------------------------------------------------------------------------- side by side and writers


def side_by_side(ours: pl.DataFrame, paper: pl.DataFrame, keys: list[str], value: str) -> pl.DataFrame:
    """Join two frames on ``keys``: columns keys, ours, paper, diff (= ours - paper).

    A key present in only one frame keeps its row with nulls on the other side.
    """
    for name, df in (("ours", ours), ("paper", paper)):
        _need(df, keys + [value], f"side_by_side ({name})")
        dup = df.group_by(keys).len().filter(pl.col("len") > 1)
        if not dup.is_empty():
            raise ValueError(f"side_by_side ({name}): keys {keys} not unique, e.g. {dup.select(keys).row(0, named=True)}")
    a = ours.select(keys + [pl.col(value).cast(pl.Float64).alias("ours")])
    b = paper.select(keys + [pl.col(value).cast(pl.Float64).alias("paper")])
    out = a.join(b, on=keys, how="full", coalesce=True, nulls_equal=True)
    return _sort(out.with_columns(diff=pl.col("ours") - pl.col("paper")), keys)


def _cell(v: object, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _cells(df: pl.DataFrame, digits: int | dict[str, int]) -> list[list[str]]:
    d = (lambda c: digits.get(c, 3)) if isinstance(digits, dict) else (lambda c: digits)
    return [[_cell(v, d(c)) for c, v in zip(df.columns, row)] for row in df.iter_rows()]


def to_markdown(df: pl.DataFrame, digits: int | dict[str, int] = 3) -> str:
    """A GitHub-flavoured Markdown table; floats to ``digits`` places (per column with a dict), nulls as a dash."""
    esc = [[c.replace("|", "\\|") for c in row] for row in _cells(df, digits)]
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in esc]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(s: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in s).replace("—", "---")


def to_latex(df: pl.DataFrame, digits: int | dict[str, int] = 3, caption: str | None = None) -> str:
    """A booktabs ``tabular`` (in a ``table`` float when a caption is given); numbers right-aligned."""
    align = "".join("r" if df[c].dtype.is_numeric() else "l" for c in df.columns)
    body = [" & ".join(_latex_escape(c) for c in row) + r" \\" for row in _cells(df, digits)]
    lines = [rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(_latex_escape(c) for c in df.columns) + r" \\", r"\midrule", *body, r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines = [r"\begin{table}[t]", r"\centering", *lines, rf"\caption{{{_latex_escape(caption)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(df: pl.DataFrame, path_stem: str | Path, digits: int | dict[str, int] = 3,
                caption: str | None = None) -> list[Path]:
    """Write ``<stem>.md`` and ``<stem>.tex``; return both paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    md, tex = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".tex")
    md.write_text(to_markdown(df, digits))
    tex.write_text(to_latex(df, digits, caption))
    return [md, tex]


def save_chart(chart: alt.TopLevelMixin, path_stem: str | Path, scale: float = 2.0, inline: bool = True) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.svg`` (through vl-convert) and an interactive ``<stem>.html``.

    ``inline`` embeds the Vega JavaScript in the HTML so it opens without internet.
    """
    import vl_convert as vlc

    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    spec = chart.to_json()
    png, svg, html = (stem.with_name(stem.name + ext) for ext in (".png", ".svg", ".html"))
    png.write_bytes(vlc.vegalite_to_png(spec, scale=scale))
    svg.write_text(vlc.vegalite_to_svg(spec))
    chart.save(str(html), inline=inline)
    return [png, svg, html]


# --------------------------------------------------------------------------- figures


PALETTE = {"raw": "#4c78a8", "answer_only": "#f58518", "truncated": "#e45756",
           "llama70b": "#54a24b", "ministral14b": "#b279a2",
           "extractive": "#72b7b2", "mpd": "#9d755d"}  # the toy world's compressor and MPD keep theirs too
EXTRA_COLORS = ["#eeca3b", "#ff9da6", "#bab0ac",
                "#17becf", "#bcbd22", "#e377c2", "#393b79", "#8c6d31"]  # eight more, so neighbouring sources do not share one


def _color(df: pl.DataFrame, col: str = "source", title: str = "Source") -> alt.Color:
    """Colour by ``<col>_label`` with a fixed colour per known source, so every figure agrees."""
    values = _ordered(df[col].drop_nulls().unique().to_list(), col)
    extra = iter(EXTRA_COLORS * 4)
    colors = [PALETTE.get(v) or next(extra) for v in values]
    labels = [SOURCE_LABELS.get(v, v) for v in values]
    return alt.Color(f"{col}_label:N", sort=labels, scale=alt.Scale(domain=labels, range=colors), title=title)


def _complete_grid(df: pl.DataFrame, row: str, column: str) -> pl.DataFrame:
    """Add an all-null row for each missing (row, column) pair: Vega-Lite misplaces facet cells
    when some pairs have no data (a teacher without gpt-oss-20B results shifts its row)."""
    pairs = df.select(row).unique().join(df.select(column).unique(), how="cross")
    missing = pairs.join(df.select(row, column).unique(), on=[row, column], how="anti", nulls_equal=True)
    return pl.concat([df, missing], how="diagonal_relaxed") if missing.height else df


def _labelled(df: pl.DataFrame, col: str = "source") -> pl.DataFrame:
    return df.with_columns(pl.col(col).replace(SOURCE_LABELS).alias(f"{col}_label"))


def _label_order(values: list[str], col: str = "source") -> list[str]:
    return [SOURCE_LABELS.get(v, v) for v in _ordered(values, col)]


def _in_paper_order(values: list[str], col: str) -> list[str]:
    """Distinct ``values`` in the paper's order (teachers as in Table 1, students by size), also when
    the grid spells them its own way (``qwen3.5-0.8b``, see :func:`paper_name`); others after, by name."""
    order = ORDER.get(col, [])

    def rank(v: str) -> tuple[int, str]:
        name = v if v in order else paper_name(v, col)
        return (order.index(name) if name in order else len(order), v)

    return sorted({v for v in values if v is not None}, key=rank)


def fig1_compression_by_domain(compression: pl.DataFrame) -> alt.FacetChart:
    """Figure 1: mean compression ratio (ratio of means) by domain, per teacher and compressor."""
    _need(compression, ["teacher", "compressor", "domain", "original_chars", "compressed_chars"], "fig1")
    df = _weights(compression).group_by("teacher", "compressor", "domain").agg(
        rho=(pl.col("n") * pl.col("compressed_chars")).sum() / (pl.col("n") * pl.col("original_chars")).sum(),
        n=pl.col("n").sum(),
    )
    df = _labelled(df, "compressor")
    domains = _ordered(df["domain"].unique().to_list(), "domain")
    comps = _label_order(df["compressor"].unique().to_list(), "compressor")
    bars = alt.Chart(df).mark_bar().encode(
        x=alt.X("domain:N", sort=domains, title="Domain", axis=alt.Axis(labelAngle=0)),  # short names read level
        xOffset=alt.XOffset("compressor_label:N", sort=comps),
        y=alt.Y("rho:Q", title="Mean compression ratio ρ (lower = more aggressive)"),
        color=_color(df, "compressor", "Compressor"),
        tooltip=["teacher:N", "compressor_label:N", "domain:N", alt.Tooltip("rho:Q", format=".3f"), alt.Tooltip("n:Q", format=",")],
    ).properties(width=260, height=220)
    return bars.facet(column=alt.Column("teacher:N", sort=_in_paper_order(df["teacher"].to_list(), "teacher"),
                                        title="Teacher"))


def fig2_reasoning_lengths(traces: pl.DataFrame, bins: int = 50, clip_quantile: float = 0.99) -> alt.VConcatChart:
    """Figure 2: reasoning-token histograms, one panel per (teacher, source), from per-trace rows.

    Lengths above the ``clip_quantile`` of all traces fall into the last bin, so rare
    outliers do not flatten the plot. Binning is done here, not in the browser.
    """
    _need(traces, ["teacher", "source", "reasoning_tokens"], "fig2")
    if traces.is_empty():
        raise ValueError("fig2: no traces")
    upper = float(traces["reasoning_tokens"].quantile(clip_quantile)) or 1.0
    width = upper / bins
    df = traces.with_columns(
        bin=(pl.col("reasoning_tokens") / width).floor().clip(0, bins - 1).cast(pl.Int64)
    ).group_by("teacher", "source", "bin").agg(count=pl.len())
    df = _labelled(df.with_columns(start=pl.col("bin") * width, end=(pl.col("bin") + 1) * width))
    sources = _label_order(df["source"].unique().to_list())
    color = _color(df)
    teachers = _in_paper_order(df["teacher"].to_list(), "teacher")
    # One chart per (teacher, source), concatenated: Vega-Lite's facet misplaces panels when
    # some (teacher, source) pairs have no data, putting histograms under the wrong headings.
    rows = []
    for teacher in teachers:
        panels = []
        for label in sources:
            cell = df.filter((pl.col("teacher") == teacher) & (pl.col("source_label") == label))
            base = alt.Chart(cell if cell.height else df.head(0),  # an empty panel keeps the columns aligned
                             title=f"{teacher} · {label}" + ("" if cell.height else " (none)"))
            panels.append(base.mark_bar().encode(
                x=alt.X("start:Q", bin="binned", scale=alt.Scale(domain=[0, upper]),
                        title=f"Reasoning tokens (last bin: ≥ {upper - width:,.0f})"),
                x2="end:Q",
                y=alt.Y("count:Q", title="Traces"),
                color=color,
                tooltip=["teacher:N", "source_label:N", alt.Tooltip("start:Q", format=",.0f"),
                         alt.Tooltip("end:Q", format=",.0f"), alt.Tooltip("count:Q", format=",")],
            ).properties(width=200, height=140))
        rows.append(alt.hconcat(*panels))
    return alt.vconcat(*rows)


def ema(losses: pl.DataFrame, alpha: float = 0.08) -> pl.DataFrame:
    """Add ``ema``: per-run exponential moving average of ``loss`` over ``step`` (ema_t = a*x_t + (1-a)*ema_{t-1})."""
    _need(losses, RUN_KEYS + ["step", "loss"], "loss curves")
    return losses.sort(RUN_KEYS + ["step"]).with_columns(
        ema=pl.col("loss").ewm_mean(alpha=alpha, adjust=False).over(RUN_KEYS))


def fig3_loss_curves(losses: pl.DataFrame, alpha: float = 0.08, max_points: int = 400,
                     max_rows: int = 4000) -> alt.FacetChart:
    """Figure 3: training loss per run (faint) and its EMA (bold), rows = teacher, columns = student,
    colour = source, dash = method (solid LoRA, dashed full).

    The EMA is computed over every logged step; then each run is thinned to evenly spaced
    steps (always keeping the last): at most ``max_points`` per run and about ``max_rows``
    in the whole chart (a row holds one step's loss and EMA), so the paper's 55 runs stay
    under altair's 5,000 embedded rows and the page stays small (72 steps per run there).
    """
    df = ema(losses, alpha)
    runs = max(df.select(RUN_KEYS).n_unique(), 1)
    points = max(2, min(max_points, max_rows // runs - 1))  # -1: the kept last step
    df = df.with_columns(_i=pl.int_range(pl.len()).over(RUN_KEYS), _n=pl.len().over(RUN_KEYS))
    every = (pl.col("_n") / points).ceil().cast(pl.Int64).clip(1)
    df = df.filter((pl.col("_i") % every == 0) | (pl.col("_i") == pl.col("_n") - 1))
    df = _labelled(df.select(RUN_KEYS + ["step", "loss", "ema"]))
    students = _in_paper_order(df["student"].to_list(), "student")
    methods = _ordered(df["method"].unique().to_list(), "method")
    legend = {"symbolOpacity": 1, "symbolStrokeWidth": 2.2}  # the bold curve's look, not the faint one's
    color = _color(df).legend(**legend)
    df = _complete_grid(df, "teacher", "student")
    base = alt.Chart().encode(
        x=alt.X("step:Q", title="Step"),
        color=color,
        strokeDash=alt.StrokeDash("method:N", title="Method", legend=alt.Legend(**legend), scale=alt.Scale(
            domain=methods, range=[{"lora": [1, 0], "full": [6, 3]}.get(m, [2, 2]) for m in methods])),
        tooltip=["teacher:N", "student:N", "method:N", "source_label:N", "step:Q",
                 alt.Tooltip("loss:Q", format=".4f"), alt.Tooltip("ema:Q", format=".4f", title=f"EMA (α={alpha})")],
    )
    title = "Training loss"  # short enough for one panel's height: the row labels stay clear
    faint = base.mark_line(strokeWidth=0.6, opacity=0.3).encode(y=alt.Y("loss:Q", title=title))
    bold = base.mark_line(strokeWidth=2.2).encode(y=alt.Y("ema:Q", title=title))
    return alt.layer(bold, faint).properties(width=200, height=150).facet(
        row=alt.Row("teacher:N", sort=_in_paper_order(df["teacher"].to_list(), "teacher"), title=None),
        column=alt.Column("student:N", sort=students, title=None), data=df).properties(
        title=alt.Title(f"Faint: loss per step (thinned for long runs) · bold: its EMA (α={alpha})", fontSize=12,
                        fontWeight="normal", anchor="start"))


def fig4_accuracy_vs_length(runs: pl.DataFrame, x: str = "median_reasoning_tokens") -> alt.FacetChart:
    """Figure 4: overall accuracy vs median reasoning length per student (log x), IQR bars where the
    quartiles ``reasoning_tokens_q1``/``_q3`` are given. Runs with no reasoning (x = 0) are left out."""
    df = _overall(runs)
    _need(df, ["accuracy", x], "fig4")
    df = _with_optional(df, ["reasoning_tokens_q1", "reasoning_tokens_q3", "se"])
    df = _labelled(df.filter(pl.col(x) > 0))
    students = _in_paper_order(df["student"].to_list(), "student")
    methods = _ordered(df["method"].unique().to_list(), "method")
    color = _color(df)
    df = _complete_grid(df, "teacher", "student")
    title = x.replace("_", " ").capitalize() + " (log)"
    base = alt.Chart(df).encode(
        x=alt.X(f"{x}:Q", scale=alt.Scale(type="log"), title=title, axis=alt.Axis(labelOverlap="greedy", labelSeparation=6)),
        y=alt.Y("accuracy:Q", title="Overall accuracy", scale=alt.Scale(zero=False)),
        color=color,
    )
    tooltip = RUN_KEYS + [alt.Tooltip("accuracy:Q", format=".3f"), alt.Tooltip("se:Q", format=".3f"), alt.Tooltip(f"{x}:Q", format=",")]
    points = base.mark_point(filled=True, size=70).encode(
        shape=alt.Shape("method:N", scale=alt.Scale(domain=methods), title="Method"),
        tooltip=tooltip,
    )
    layers = [points]
    if x == "median_reasoning_tokens" and df["reasoning_tokens_q1"].null_count() < df.height:
        layers.insert(0, base.mark_rule().encode(x="reasoning_tokens_q1:Q", x2="reasoning_tokens_q3:Q", tooltip=tooltip))
    return alt.layer(*layers).properties(width=180, height=170).facet(
        row=alt.Row("teacher:N", sort=_in_paper_order(df["teacher"].to_list(), "teacher"), title=None),
        column=alt.Column("student:N", sort=students, title=None))


def pareto_front(runs: pl.DataFrame, by: list[str] | None = None,
                 x: str = "mean_completion_tokens", y: str = "accuracy") -> pl.DataFrame:
    """Runs not dominated by another run of the same ``by`` group (fewer-or-equal ``x`` and higher ``y``)."""
    df = _overall(runs).drop_nulls([x, y]).sort([x, pl.col(y)], descending=[False, True])
    by = by or []
    best = pl.col(y).cum_max().shift(1).over(by) if by else pl.col(y).cum_max().shift(1)
    return df.with_columns(_best=best).filter(pl.col("_best").is_null() | (pl.col(y) > pl.col("_best"))).drop("_best")


def pareto(runs: pl.DataFrame, x: str = "mean_completion_tokens") -> alt.FacetChart:
    """Accuracy vs mean completion tokens (log x) for every run, with the Pareto front per teacher."""
    df = _overall(runs)
    _need(df, ["accuracy", x], "pareto")
    df = _labelled(df.drop_nulls([x, "accuracy"]))
    front = pareto_front(df, ["teacher"], x=x).select(RUN_KEYS).with_columns(on_front=pl.lit(True))
    df = df.join(front, on=RUN_KEYS, how="left").with_columns(pl.col("on_front").fill_null(False))
    xenc = alt.X(f"{x}:Q", scale=alt.Scale(type="log"), title=x.replace("_", " ").capitalize() + " (log)",
                 axis=alt.Axis(labelOverlap="greedy", labelSeparation=6))
    yenc = alt.Y("accuracy:Q", title="Overall accuracy")
    tooltip = RUN_KEYS + [alt.Tooltip("accuracy:Q", format=".3f"), alt.Tooltip(f"{x}:Q", format=",.0f"), "on_front:N"]
    tooltip += [c for c in ("budget", "train_cell") if c in df.columns]  # epoch-based or compute-matched
    if df["method"].n_unique() > 1:  # LoRA and full runs of one student get their own marks
        df = df.with_columns(student_method=pl.col("student") + pl.lit(", ") + pl.col("method"))
        pairs = set(df.select("student", "method").unique().iter_rows())
        legend = [f"{s}, {m}" for s in _in_paper_order(df["student"].to_list(), "student")
                  for m in _ordered(df["method"].unique().to_list(), "method") if (s, m) in pairs]
        shape = alt.Shape("student_method:N", sort=legend, title="Student, method")
    else:
        shape = alt.Shape("student:N", sort=_in_paper_order(df["student"].to_list(), "student"), title="Student")
    base = alt.Chart(df)
    points = base.mark_point(filled=True, size=60).encode(x=xenc, y=yenc, color=_color(df), shape=shape,
                                                          tooltip=tooltip)
    line = base.transform_filter("datum.on_front").mark_line(color="gray", strokeDash=[4, 3]).encode(
        x=xenc, y=yenc, order=f"{x}:Q", tooltip=tooltip)
    return alt.layer(line, points, data=df).properties(width=320, height=260).facet(
        column=alt.Column("teacher:N", sort=_in_paper_order(df["teacher"].to_list(), "teacher"), title=None))


def dte_runs(runs: pl.DataFrame) -> pl.DataFrame:
    """The overall rows of a Distilling-the-Essence comparison, with a ``variant`` column.

    Needs ``accuracy`` and ``kept_fraction`` (= ``truncate_ratio``, 1.0 uncut); reads
    ``truncate_span``, ``loss_on``, ``dte``, ``objective`` and ``data_source`` when given
    (as :func:`grid_runs` writes them). Kept: every DtE run (a ratio cut or a non-default
    ``loss_on``) and, as the uncut reference at kept fraction 1.0, the plain SFT runs on
    the same data (``data_source``) as a DtE run of the same teacher and student. The
    reference is repeated once per cut span so each span's curve ends at the full run.
    ``variant``: ``cut: sequence``, ``cut: reasoning``, ``no cut`` (reference), plus
    ``, loss on <sections>`` for a non-default ``loss_on``.
    """
    df = _overall(runs)
    _need(df, ["accuracy", "kept_fraction"], "dte_runs")
    default = "+".join(DEFAULT_LOSS_ON)
    df = df.with_columns(
        pl.lit(None, dtype=pl.String).alias(c) for c in ("truncate_span", "data_source") if c not in df.columns
    ).with_columns(
        loss_on=pl.col("loss_on").fill_null(default) if "loss_on" in df.columns else pl.lit(default),
        objective=pl.col("objective").fill_null("sft") if "objective" in df.columns else pl.lit("sft"))
    if "dte" not in df.columns:
        df = df.with_columns(dte=(pl.col("kept_fraction") < 1) | (pl.col("loss_on") != default))
    df = df.filter(pl.col("accuracy").is_not_null())
    dte = df.filter(pl.col("dte"))
    keys = ["teacher", "student", "data_source"]
    ref = df.filter(~pl.col("dte") & (pl.col("objective") == "sft")).join(
        dte.select(keys).unique(), on=keys, how="semi", nulls_equal=True)
    spans = dte["truncate_span"].drop_nulls().unique().sort().to_list() or [None]
    mask = pl.when(pl.col("loss_on") != default).then(pl.lit(", loss on ") + pl.col("loss_on")).otherwise(pl.lit(""))
    cut = pl.when(pl.col("truncate_span").is_not_null()).then(pl.lit("cut: ") + pl.col("truncate_span"))
    parts = [dte.with_columns(variant=cut.otherwise(pl.lit("no cut")) + mask)]
    for span in spans:  # the uncut reference closes each span's curve at kept fraction 1.0
        name = f"cut: {span}" if span else "no cut"
        parts.append(ref.with_columns(variant=pl.lit(name) + mask, truncate_span=pl.lit(span, dtype=pl.String)))
    return pl.concat(parts, how="diagonal_relaxed").sort("variant", "kept_fraction")


def fig_dte_kept_fraction(runs: pl.DataFrame) -> alt.VConcatChart:
    """Distilling the Essence: overall accuracy against the kept fraction of each training sequence.

    Top row: accuracy vs kept fraction (``truncate_ratio``; 1.0 = uncut), one line per
    cut span (``sequence``: the first X% of the whole sequence, ``reasoning``: of the
    trace only) and training setup, ending at the uncut run; section-mask runs are
    points at 1.0. Bottom row, when ``train_flops`` is known: the same accuracies
    against training FLOPs (log), the compute-quality trade-off. One column per
    student; colour = variant, shape = training budget (epoch-based or compute-matched).
    """
    df = dte_runs(runs)
    if df.is_empty():
        raise ValueError("fig_dte_kept_fraction: no evaluated Distilling-the-Essence runs")
    if "budget" not in df.columns:
        df = df.with_columns(budget=pl.lit(None, dtype=pl.String))
    df = df.with_columns(pl.col("budget").fill_null("not recorded"))
    # one curve per variant and training setup (other axes of the grid, such as the ratio, are not part of it)
    setup = ["teacher", "student", "train_method" if "train_method" in df.columns else "method", "budget"]
    df = df.with_columns(series=pl.concat_str([pl.col("variant"), *[pl.col(c).cast(pl.String) for c in setup]],
                                              separator=" | ", ignore_nulls=True))
    variants = df["variant"].unique().sort().to_list()
    color = alt.Color("variant:N", sort=variants, title="Variant",
                      scale=alt.Scale(domain=variants, range=(EXTRA_COLORS + list(PALETTE.values()))[:len(variants)]))
    shape = alt.Shape("budget:N", title="Training length")
    tooltip = RUN_KEYS + ["variant:N", "budget:N", alt.Tooltip("kept_fraction:Q", format=".2f"),
                          alt.Tooltip("accuracy:Q", format=".3f")]
    tooltip += [alt.Tooltip(f"{c}:Q", format=",.3g") for c in ("train_flops", "peak_memory_gb", "train_tokens",
                                                                "kept_token_fraction") if c in df.columns]
    yenc = alt.Y("accuracy:Q", title="Overall accuracy", scale=alt.Scale(zero=False))
    students = _in_paper_order(df["student"].to_list(), "student")
    column = alt.Column("student:N", sort=students, title=None)

    def panel(data: pl.DataFrame, x: alt.X, field: str) -> alt.FacetChart:
        base = alt.Chart(data)
        return alt.layer(
            base.mark_line(opacity=0.6).encode(x=x, y=yenc, color=color, detail="series:N", order=f"{field}:Q"),
            base.mark_point(filled=True, size=70).encode(x=x, y=yenc, color=color, shape=shape, tooltip=tooltip),
        ).properties(width=260, height=200).facet(column=column)

    xkept = alt.X("kept_fraction:Q", title="Kept fraction of each training sequence", scale=alt.Scale(domain=[0, 1.05]))
    rows = [panel(df, xkept, "kept_fraction").properties(title="Accuracy vs kept fraction")]
    with_flops = df.filter(pl.col("train_flops").is_not_null()) if "train_flops" in df.columns else df.clear()
    if with_flops.height:
        xflops = alt.X("train_flops:Q", scale=alt.Scale(type="log"), title="Training FLOPs (log)",
                       axis=alt.Axis(format=".0e", labelOverlap="greedy", tickCount=4))
        rows.append(panel(with_flops, xflops, "train_flops").properties(title="Accuracy vs training compute"))
    return alt.vconcat(*rows).resolve_scale(color="shared", shape="shared")


# --------------------------------------------------------------------------- from the published numbers


def tables(runs: pl.DataFrame | None = None, compression: pl.DataFrame | None = None,
           generation: pl.DataFrame | None = None, judge: pl.DataFrame | None = None) -> dict[int, pl.DataFrame]:
    """Every table the given frames allow, keyed by the paper's table number."""
    out: dict[int, pl.DataFrame] = {}
    if compression is not None:
        out[2], out[5] = table2(compression), table5(compression)
    if generation is not None:
        out[4] = table4(generation)
    if runs is not None:
        out.update({3: table3(runs), 6: table6(runs), 7: table7(runs), 8: table8(runs), 9: table9(runs), 11: table11(runs)})
    if judge is not None:
        out[10] = table10(judge)
    return dict(sorted(out.items()))


TABLE_DIGITS: dict[int, int | dict[str, int]] = {
    2: 3, 3: 3, 4: 0, 5: {"llama70b_chars": 0, "llama70b_tokens": 0, "ministral14b_chars": 0, "ministral14b_tokens": 0},
    6: 1, 7: 3, 8: 3, 9: {"mean_completion_tokens": 0, "mean_completion_tokens_excl_trunc": 0, "median_reasoning_chars": 0,
                          "acc_per_1k_tokens": 4}, 10: 2, 11: 1,
}


def paper_tables(out_dir: str | Path) -> dict[int, list[Path]]:
    """Regenerate Tables 2 to 11 from the published numbers; write ``tableN.md``/``.tex`` into ``out_dir``."""
    from cdlib import paper

    made = tables(paper.runs(), paper.compression(), paper.generation(), paper.judge())
    return {n: write_table(df, Path(out_dir) / f"table{n}", TABLE_DIGITS.get(n, 3), caption=f"Table {n} ({paper.TITLE})")
            for n, df in made.items()}


def paper_figures(out_dir: str | Path) -> dict[str, list[Path]]:
    """Draw what the published numbers allow: Figure 1, Figure 4 and the Pareto plot.

    Figure 4 uses median reasoning *characters* (Table 9), since the paper publishes
    no per-run token medians or quartiles, so it has no IQR bars. Figures 2 and 3
    need per-trace lengths and loss logs, which the paper does not publish; draw them
    with :func:`fig2_reasoning_lengths` and :func:`fig3_loss_curves` from a grid's own
    outputs. A README in ``out_dir`` says the same.
    """
    from cdlib import paper

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = paper.runs()
    made = {
        "fig1_compression_by_domain": save_chart(fig1_compression_by_domain(paper.compression()), out / "fig1_compression_by_domain"),
        "fig4_accuracy_vs_length": save_chart(fig4_accuracy_vs_length(runs, x="median_reasoning_chars"), out / "fig4_accuracy_vs_length"),
        "pareto": save_chart(pareto(runs), out / "pareto"),
    }
    (out / "README.md").write_text(
        "# Figures from the published numbers\n\n"
        f"Source: {paper.TITLE} (Tables 4, 5, 7, 9).\n\n"
        "- fig1_compression_by_domain: Figure 1, from Tables 4 and 5 (ratio of mean lengths per domain).\n"
        "- fig4_accuracy_vs_length: Figure 4 with median reasoning *characters* (Table 9) on x; the paper\n"
        "  publishes no per-run token medians or quartiles, so there are no IQR bars.\n"
        "- pareto: overall accuracy (Table 7) vs mean completion tokens (Table 9).\n\n"
        "Figures 2 (reasoning-token distributions) and 3 (training-loss curves) need per-trace\n"
        "lengths and per-step loss logs, which the paper does not publish: draw them from a\n"
        "grid's outputs with cdlib.report.fig2_reasoning_lengths and fig3_loss_curves.\n")
    return made


# --------------------------------------------------------------------------- from a grid's outputs
#
# A grid's outputs live in ``outputs/<grid>/``: ``results.parquet`` (one row per finished
# cell, see cdlib.grid.write_results) and one directory per cell,
# ``<stage>/<cell>/`` with params.yaml, metrics.json, manifest.json and the stage's
# record files. The functions below turn them into the layouts above.

KINDS = ("generate", "compress", "truncate", "train", "evaluate", "judge", "report")
KIND_FILES = {"generate": "traces.jsonl", "compress": "compressed.jsonl", "truncate": "truncated.jsonl",
              "train": "loss.jsonl", "evaluate": "outputs.jsonl", "judge": "judgements.jsonl"}
KIND_METRICS = {"acc_per_1k_tokens": "evaluate", "train_tokens": "train", "trainable_tokens": "train",
                "faithfulness": "judge",
                "rho": "compress", "total_correct": "generate", "kept_fraction": "truncate", "figures": "report"}
# cdlib.datasets' report groups and Table 1 domains -> the names used here (and in the paper's tables)
GROUP_NAMES = {"Math": "math", "Science": "science", "Medicine": "medicine", "Common-sense": "commonsense",
               "OOD-Reasoning": "ood_reasoning", "OOD-Knowledge": "ood_knowledge", "Overall-only": "overall_only",
               "Overall": "overall"}
DOMAIN_NAMES = {"Mathematics": "math", "Science": "science", "Logic/Commonsense": "logic", "Medical": "medical",
                "MMLU-STEM": "mmlu", "MMLU-Medical": "mmlu"}
COST_COLUMNS = ("wall_clock_s", "gpus", "gpu_hours", "device")
NO_VALUE = "—"


@dataclass
class GridCell:
    """One finished cell of a grid, from its directory and/or its row of ``results.parquet``."""

    id: str  # "<stage>/<slug>"
    stage: str  # the stage's name in the grid file
    kind: str | None  # which stage notebook made it: one of KINDS
    axes: dict[str, str]
    params: dict[str, Any]  # params.yaml (empty when only results.parquet is there)
    cost: dict[str, Any]  # wall_clock_s, gpus, gpu_hours, device (the runner's manifest)
    metrics: dict[str, Any]  # metrics.json flattened with dots
    dir: Path | None  # None when only results.parquet knows the cell
    upstream: list[str] = dc_field(default_factory=list)  # ids of cells its params point to


@dataclass
class GridOutputs:
    """Every finished cell of a grid, plus notes about what was missing or skipped."""

    dir: Path
    cells: dict[str, GridCell]
    notes: list[str]

    def of(self, kind: str) -> list[GridCell]:
        return [c for c in self.cells.values() if c.kind == kind]

    def lineage_axes(self, cell: GridCell) -> dict[str, str]:
        """The axis values of a cell and of every cell upstream of it (its own win)."""
        out: dict[str, str] = {}
        seen: set[str] = set()

        def walk(c: GridCell) -> None:
            if c.id in seen:
                return
            seen.add(c.id)
            for u in c.upstream:
                walk(self.cells[u])
            out.update(c.axes)

        walk(cell)
        return out

    def upstream_of(self, cell: GridCell, kind: str) -> GridCell | None:
        """The nearest cell of ``kind`` upstream of ``cell`` (breadth first)."""
        todo, seen = list(cell.upstream), set()
        while todo:
            c = self.cells[todo.pop(0)]
            if c.id in seen:
                continue
            seen.add(c.id)
            if c.kind == kind:
                return c
            todo += c.upstream
        return None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys, scalars only (as cdlib.grid.write_results stores metrics)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[f"{prefix}{k}"] = v
    return out


def _json_file(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def _kind(stage: str, notebook: str, d: Path | None, metrics: dict[str, Any]) -> str | None:
    """A cell's stage kind: its stage name, else its notebook's name, else its files, else its metrics."""
    if stage in KINDS:
        return stage
    tail = Path(notebook).stem.split("_", 1)[-1] if notebook else ""
    if tail in KINDS or tail == "paper":
        return "report" if tail == "paper" else tail
    for kind, name in KIND_FILES.items():
        if d is not None and (d / name).exists():
            return kind
    return next((kind for key, kind in KIND_METRICS.items() if key in metrics), None)


def _axes_from_slug(slug: str, row: dict[str, Any], skip: set[str]) -> dict[str, str]:
    """Recover a results.parquet row's axes: the string columns holding the slug's parts (``a__b``)."""
    if slug == "all":
        return {}
    axes: dict[str, str] = {}
    for part in slug.split("__"):
        col = next((k for k, v in row.items() if v == part and k not in axes and k not in skip and "." not in k), None)
        if col is not None:
            axes[col] = part
    return axes


def read_grid(grid_dir: str | Path) -> GridOutputs:
    """Collect a grid's finished cells from ``results.parquet`` and the cell directories.

    A cell directory with a ``done`` manifest wins over its results.parquet row (it is
    never older); cells that are not done are left out and counted in the notes, as is
    a missing results.parquet (the cell directories are read instead). The report
    stage's own cells are ignored.
    """
    import yaml

    root = Path(grid_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"grid directory {root} does not exist")
    notes: list[str] = []
    cells: dict[str, GridCell] = {}
    results = root / "results.parquet"
    if results.exists():
        for row in pl.read_parquet(results).to_dicts():
            stage, cid = row.get("stage"), row.get("cell")
            if not stage or not cid:
                continue
            slug = cid.split("/", 1)[-1]
            axes = _axes_from_slug(slug, row, {"stage", "cell", *COST_COLUMNS})
            metrics = {k.removeprefix("metric."): v for k, v in row.items() if v is not None
                       and k not in ("stage", "cell", *COST_COLUMNS) and k not in axes}
            cells[cid] = GridCell(cid, stage, _kind(stage, "", None, metrics), axes, {},
                                  {k: row.get(k) for k in COST_COLUMNS}, metrics, None)
    else:
        notes.append(f"{results} not found: read every cell directory's metrics.json instead.")
    not_done: list[str] = []
    for manifest_path in sorted(root.glob("*/*/manifest.json")):
        d = manifest_path.parent
        cid = f"{d.parent.name}/{d.name}"
        try:
            manifest = _json_file(manifest_path) or {}
            metrics = _json_file(d / "metrics.json")
            params_path = d / "params.yaml"
            params = (yaml.safe_load(params_path.read_text()) or {}) if params_path.exists() else {}
        except (ValueError, yaml.YAMLError) as e:
            notes.append(f"cell {cid} skipped: {e}")
            continue
        kind = _kind(d.parent.name, manifest.get("notebook", ""), d, _flatten(metrics or {}))
        if kind == "report":
            continue
        if manifest.get("status") != "done" or metrics is None:
            not_done.append(f"{cid} ({manifest.get('status', 'no status')})")
            cells.pop(cid, None)
            continue
        axes = dict(manifest.get("axes") or (cells[cid].axes if cid in cells else {}))
        cells[cid] = GridCell(cid, d.parent.name, kind, axes, params, {k: manifest.get(k) for k in COST_COLUMNS},
                              _flatten(metrics), d)
    cells = {k: c for k, c in cells.items() if c.kind != "report"}
    if not_done:
        notes.append(f"{len(not_done)} cell(s) not done and left out: {', '.join(not_done[:12])}"
                     + (" ..." if len(not_done) > 12 else ""))
    for c in cells.values():
        for v in c.params.values():
            if isinstance(v, str) and v:
                ref = "/".join(Path(v).parts[-2:])
                if ref in cells and ref != c.id:
                    c.upstream.append(ref)
    return GridOutputs(root, cells, notes)


def _read_jsonl(path: Path, fields: list[str], lengths: tuple[str, ...] = ()) -> pl.DataFrame:
    """Some fields of a JSONL store (``<f>_chars`` = len(text) for each field in ``lengths``).

    A last line cut mid-write (a killed stage) is ignored, as the store does; any other
    bad line raises naming the file and line.
    """
    rows = []
    with path.open("rb") as f:  # line by line: a paper-scale traces.jsonl holds gigabytes of text
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if not line.endswith(b"\n"):  # the last line, cut mid-write
                    break
                raise ValueError(f"{path}:{lineno}: not a JSON record ({e.msg})") from None
            row = {k: rec.get(k) for k in fields}
            for k in lengths:
                row[f"{k}_chars"] = len(rec.get(k) or "")
            rows.append(row)
    return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()


def _domains(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(pl.col("domain").replace(DOMAIN_NAMES)) if "domain" in df.columns else df


def compressor_name(cell: GridCell) -> str:
    """A compress cell's compressor as the grid names it: its ``compressor`` or ``source`` axis, else the param."""
    return cell.axes.get("compressor") or cell.axes.get("source") or str(cell.params.get("compressor") or cell.id)


def grid_generation(g: GridOutputs) -> pl.DataFrame | None:
    """Generation layout (Table 4) from every generate cell's ``traces.jsonl``; None if there is none.

    Cells that kept every attempt (``keep: all``, a student sampling for MPD) are left out, with a note."""
    parts = []
    for c in g.of("generate"):
        if c.params.get("keep") == "all":  # a student's samples (Mixed-Policy Distillation), not teacher traces
            g.notes.append(f"{c.id}: student samples (keep: all), left out of Table 4.")
            continue
        path = (c.dir / "traces.jsonl") if c.dir else None
        if path is None or not path.exists():
            continue
        df = _read_jsonl(path, ["id", "dataset", "domain", "completion_tokens"], lengths=("reasoning",))
        if not df.is_empty():
            teacher = g.lineage_axes(c).get("teacher", c.id.split("/", 1)[1])
            parts.append(df.with_columns(teacher=pl.lit(teacher)))
    return _domains(pl.concat(parts, how="diagonal_relaxed")) if parts else None


def grid_compression(g: GridOutputs, include_flagged: bool = False) -> pl.DataFrame | None:
    """Compression layout (Tables 2, 5, Figure 1): one row per compressed trace of every compress cell.

    Compressions dropped downstream (flagged with ``drop_flagged``, see
    :func:`cdlib.compress.dropped`) are left out unless ``include_flagged``: they are never
    trained on. With the paper's protocol (``drop_flagged: false``) every compression is kept,
    as in its Tables 2 and 5; flags stay in ``flag`` for :func:`flag_rates`. Token counts come from ``tokens.jsonl``
    (``compressed_tokens`` and ``original_tokens``, the compressor's tokenizer).
    """
    parts = []
    for c in g.of("compress"):
        path = (c.dir / "compressed.jsonl") if c.dir else None
        if path is None or not path.exists():
            continue
        df = _read_jsonl(path, ["id", "dataset", "domain", "flag", "drop", "original_chars", "compressed_chars"])
        if df.is_empty():
            continue
        tokens = c.dir / "tokens.jsonl"
        tok = _read_jsonl(tokens, ["id", "original_tokens", "compressed_tokens"]) if tokens.exists() else pl.DataFrame()
        if not tok.is_empty():
            df = df.join(tok, on="id", how="left")
        teacher = g.lineage_axes(c).get("teacher", NO_VALUE)
        flag = pl.col("flag").cast(pl.String)
        parts.append(df.with_columns(teacher=pl.lit(teacher), compressor=pl.lit(compressor_name(c)), flag=flag,
                                     drop=pl.col("drop").cast(pl.Boolean).fill_null(flag.is_not_null())))
    if not parts:
        return None
    df = _domains(pl.concat(parts, how="diagonal_relaxed"))
    return df if include_flagged else df.filter(~pl.col("drop"))


def flag_rates(compression: pl.DataFrame) -> pl.DataFrame:
    """The answer-preservation checker's flags per (teacher, compressor, dataset), beside Table 5.

    ``compression`` is :func:`grid_compression` with every row (``include_flagged=True``).
    Columns: n, flagged, flag_rate, dropped (left out of training and of Tables 2/5; 0 with
    the paper's protocol), then one count column per flag kind. The paper checks nothing
    (answer-preservation checks are its future work), so these rates have no published match.
    """
    _need(compression, ["teacher", "compressor", "dataset", "flag"], "flag_rates")
    c = compression.with_columns(pl.col("flag").cast(pl.String))
    if "drop" not in c.columns:
        c = c.with_columns(drop=pl.col("flag").is_not_null())
    aggs = dict(n=pl.len(), flagged=pl.col("flag").is_not_null().sum(), flag_rate=pl.col("flag").is_not_null().mean(),
                dropped=pl.col("drop").sum())
    per = c.group_by("teacher", "compressor", "dataset").agg(**aggs)
    overall = c.group_by("teacher", "compressor").agg(**aggs).with_columns(dataset=pl.lit("Overall"))
    df = pl.concat([per, overall.select(per.columns)])
    kinds = c.filter(pl.col("flag").is_not_null())
    if not kinds.is_empty():
        counts = pl.concat([kinds.group_by("teacher", "compressor", "dataset", "flag").len(),
                            kinds.group_by("teacher", "compressor", "flag").len().with_columns(dataset=pl.lit("Overall"))
                            .select("teacher", "compressor", "dataset", "flag", "len")])
        wide = counts.pivot("flag", index=["teacher", "compressor", "dataset"], values="len")
        df = df.join(wide, on=["teacher", "compressor", "dataset"], how="left")
    df = df.with_columns(_overall=pl.col("dataset") == "Overall")
    return _sort(df, ["teacher", "compressor", "_overall", "dataset"]).drop("_overall")


def grid_trace_lengths(g: GridOutputs, compression: pl.DataFrame | None = None) -> pl.DataFrame | None:
    """Trace-length layout (Figure 2): reasoning tokens per trace for raw, each compressor and truncated.

    Raw lengths are the compress cells' ``original_tokens`` (one count per trace and
    teacher), so raw and compressed traces are counted with the same tokenizer.
    ``compression`` is :func:`grid_compression` with flagged rows, when already read.
    """
    parts = []
    every = compression if compression is not None else grid_compression(g, include_flagged=True)
    if every is not None and "compressed_tokens" in every.columns:
        kept = ~pl.col("drop") if "drop" in every.columns else pl.col("flag").is_null()
        parts.append(every.filter(kept).select(
            "teacher", pl.col("compressor").alias("source"), pl.col("compressed_tokens").alias("reasoning_tokens")))
        if "original_tokens" in every.columns:
            raw = every.unique(["teacher", "id"], keep="first", maintain_order=True)
            parts.insert(0, raw.select("teacher", source=pl.lit("raw"), reasoning_tokens=pl.col("original_tokens")))
    for c in g.of("truncate"):
        path = (c.dir / "truncated.jsonl") if c.dir else None
        if path is None or not path.exists():
            continue
        df = _read_jsonl(path, ["truncated_tokens"])
        if not df.is_empty():
            parts.append(df.select(teacher=pl.lit(g.lineage_axes(c).get("teacher", NO_VALUE)), source=pl.lit("truncated"),
                                   reasoning_tokens=pl.col("truncated_tokens")))
    if not parts:
        return None
    return pl.concat([p.with_columns(pl.col("reasoning_tokens").cast(pl.Float64)) for p in parts]).drop_nulls()


def grid_judge(g: GridOutputs) -> pl.DataFrame | None:
    """Judge layout (Table 10) from every judge cell's parsed verdicts (parse failures left out)."""
    parts = []
    for c in g.of("judge"):
        path = (c.dir / "judgements.jsonl") if c.dir else None
        if path is None or not path.exists():
            continue
        df = _read_jsonl(path, ["id", "dataset", "domain", "faithfulness", "verdict", "answer_alignment", "parse_error"])
        if df.is_empty():
            continue
        comp = g.upstream_of(c, "compress")
        compressor = compressor_name(comp) if comp else (c.axes.get("compressor") or c.axes.get("source") or NO_VALUE)
        df = df.filter(pl.col("parse_error").is_null()).select(
            "dataset", "domain", "faithfulness", faithful=pl.col("verdict") == "faithful",
            answer_aligned=pl.col("answer_alignment").cast(pl.Boolean))
        parts.append(df.with_columns(teacher=pl.lit(g.lineage_axes(c).get("teacher", NO_VALUE)),
                                     compressor=pl.lit(compressor)))
    return _domains(pl.concat(parts, how="diagonal_relaxed")) if parts else None


def failure_modes(g: GridOutputs) -> pl.DataFrame | None:
    """Judge failure-mode counts per (teacher, compressor), from the judge cells' metrics."""
    rows = []
    for c in g.of("judge"):
        comp = g.upstream_of(c, "compress")
        compressor = compressor_name(comp) if comp else (c.axes.get("compressor") or c.axes.get("source") or NO_VALUE)
        n = c.metrics.get("n") or 0
        for k, v in c.metrics.items():
            if k.startswith("failure_modes.") and v:
                rows.append({"teacher": g.lineage_axes(c).get("teacher", NO_VALUE), "compressor": compressor,
                             "failure_mode": k.split(".", 1)[1], "count": int(v), "pct_of_judged": 100 * v / n if n else None})
        if c.metrics.get("parse_failures"):
            rows.append({"teacher": g.lineage_axes(c).get("teacher", NO_VALUE), "compressor": compressor,
                         "failure_mode": "(judge parse failure)", "count": int(c.metrics["parse_failures"]),
                         "pct_of_judged": 100 * c.metrics["parse_failures"] / n if n else None})
    if not rows:
        return None
    return _sort(pl.DataFrame(rows), ["teacher", "compressor"]).sort(["teacher", "compressor", "count"],
                                                                     descending=[False, False, True], maintain_order=True)


def _budget(params: dict[str, Any], metrics: dict[str, Any] | None = None) -> str | None:
    """How a train cell's length was set: compute-matched (``token_budget``), ``max_steps`` or epochs.

    Read from the cell's params.yaml; without one, from its metrics (``budget_mode``,
    ``token_budget``, ``max_steps``, ``epochs`` as cdlib.train records them); else None.
    """
    src = params or {}
    if not src and metrics and metrics.get("budget_mode"):
        mode = metrics["budget_mode"]
        src = {"token_budget": metrics.get("token_budget") if mode == "tokens" else None,
               "max_steps": metrics.get("max_steps") if mode == "steps" else None, "epochs": metrics.get("epochs")}
    if not src:
        return None
    if src.get("token_budget"):
        return f"compute-matched ({int(src['token_budget']):,} tokens)"
    if src.get("max_steps"):
        return f"max_steps {src['max_steps']}"
    epochs = float(src.get("epochs") or 1.0)
    return f"epoch-based ({epochs:g} epoch{'s' if epochs != 1 else ''})"


def _run_keys(g: GridOutputs, cells: list[GridCell | None]) -> dict[str, str]:
    """teacher/student/method/source of a run from its cells' axes (and the train params when
    an axis is absent); extra axes of these cells are appended to ``method`` so runs stay distinct."""
    present = [c for c in cells if c is not None]
    lineage: dict[str, str] = {}
    for c in reversed(present):
        lineage.update(g.lineage_axes(c))
    train = next((c for c in present if c.kind == "train"), None)
    tp = train.params if train else {}
    keys = {"teacher": lineage.get("teacher"), "student": lineage.get("student") or tp.get("student"),
            "method": lineage.get("method") or tp.get("method"), "source": lineage.get("source") or tp.get("source")}
    extra = {k: v for c in present for k, v in c.axes.items() if k not in RUN_KEYS and k != "compressor"}
    if extra and keys["method"]:
        keys["method"] += " (" + ", ".join(f"{k}={v}" for k, v in extra.items()) + ")"
    return {k: (str(v) if v is not None else NO_VALUE) for k, v in keys.items()}


def _train_info(t: GridCell | None) -> dict[str, Any]:
    """Run-level training columns of a train cell: train_tokens, train_hours, gpus, gpu_hours, losses, budget."""
    if t is None:
        return {}
    m, cost = t.metrics, t.cost
    first = lambda *vals: next((v for v in vals if v is not None), None)  # noqa: E731
    wall = first(m.get("train_wall_clock_s"), m.get("wall_clock_s"), cost.get("wall_clock_s"))
    hours = first(m.get("train_hours"), wall / 3600 if wall is not None else None)
    gpus = first(m.get("gpus"), cost.get("gpus"))
    # names as the issue gives them, then as cdlib.train writes them
    return {"train_tokens": first(m.get("train_tokens"), m.get("trainable_tokens")), "train_hours": hours, "gpus": gpus,
            "source_tokens": m.get("source_tokens.supervised"),  # whole source data, one pass (Tables 6, 11)
            "gpu_hours": first(m.get("gpu_hours"), cost.get("gpu_hours"),
                               gpus * hours if gpus is not None and hours is not None else None),
            "final_train_loss": first(m.get("final_train_loss"), m.get("train_loss_ema"), m.get("train_loss")),
            "final_val_loss": first(m.get("final_val_loss"), m.get("val_loss")),
            "budget": _budget(t.params, m), "train_cell": t.id, **_neighbour_info(t)}


DEFAULT_LOSS_ON = ("cot", "answer")  # cdlib.params.TrainParams.loss_on


def _train_setting(t: GridCell, key: str) -> Any:
    """A train cell's parameter from its params.yaml, else as cdlib.train recorded it in its metrics."""
    if key in t.params:
        return t.params[key]
    return t.metrics.get(key)


def neighbour_label(params: dict[str, Any]) -> str | None:
    """The source label of a neighbouring-method run from its train params, or None for a plain SFT run.

    Mixed-Policy Distillation (``source: mpd``): ``mpd`` (``mpd-sft`` without the KL
    objective); any other KL run: ``kl-<source>``. Distilling the Essence: ``dte-<ratio>``
    (``-reasoning`` when only the reasoning span is cut) and ``-<sections>`` for a
    non-default ``loss_on`` (``dte-cot``, ``dte-0.5-cot``); on data other than raw traces
    the source comes first (``extractive+dte-0.5``).
    """
    source = str(params.get("source") or "raw")
    objective = params.get("objective") or "sft"
    if source == "mpd":
        return "mpd" if objective == "kl" else "mpd-sft"
    ratio = params.get("truncate_ratio")
    loss_on = params.get("loss_on") or list(DEFAULT_LOSS_ON)
    loss_on = loss_on.split("+") if isinstance(loss_on, str) else list(loss_on)
    parts = []
    if ratio is not None:
        parts.append(f"{float(ratio):g}" + ("-reasoning" if params.get("truncate_span") == "reasoning" else ""))
    if set(loss_on) != set(DEFAULT_LOSS_ON):
        parts.append("+".join(loss_on))
    label = None
    if parts:
        label = "dte-" + "-".join(parts)
        label = label if source == "raw" else f"{source}+{label}"
    if objective == "kl":
        return f"kl-{label or source}"
    return label


def _neighbour_info(t: GridCell) -> dict[str, Any]:
    """Distilling the Essence / MPD columns of a train cell: kept fraction, span, sections, objective, cost."""
    ratio = _train_setting(t, "truncate_ratio")
    loss_on = _train_setting(t, "loss_on") or list(DEFAULT_LOSS_ON)
    loss_on = "+".join(loss_on) if isinstance(loss_on, list) else str(loss_on)
    settings = {k: _train_setting(t, k) for k in ("source", "objective", "truncate_span", "kl_direction")}
    settings.update(truncate_ratio=ratio, loss_on=loss_on)
    return {"kept_fraction": float(ratio) if ratio is not None else 1.0,
            "truncate_span": settings["truncate_span"] if ratio is not None else None,
            "loss_on": loss_on, "objective": settings["objective"] or "sft",
            "dte": ratio is not None or set(loss_on.split("+")) != set(DEFAULT_LOSS_ON),
            "data_source": settings["source"], "neighbour": neighbour_label(settings),
            "train_method": _train_setting(t, "method"),
            "kept_token_fraction": t.metrics.get("kept_token_fraction"),
            "train_flops": t.metrics.get("flops"), "peak_memory_gb": t.metrics.get("peak_memory_gb")}


EVAL_RUN_COLUMNS = ("n", "mean_completion_tokens", "mean_completion_tokens_excl_trunc", "truncation_rate",
                    "median_reasoning_chars", "median_reasoning_tokens", "reasoning_tokens_q1", "reasoning_tokens_q3",
                    "acc_per_1k_tokens")


def grid_runs(g: GridOutputs) -> pl.DataFrame | None:
    """Run layout (Tables 3, 6-9, 11, Figure 4, Pareto): a row per (run, group) from the evaluate cells,
    with the training columns of the train cell each was evaluated from; trained runs without an
    evaluation give an overall row with null accuracy. None if there are no runs."""
    rows: list[dict[str, Any]] = []
    used_train: set[str] = set()
    trains = g.of("train")
    for e in g.of("evaluate"):
        t = g.upstream_of(e, "train")
        if t is None:  # no path link (results.parquet only): the train cell with the same run axes
            mine = {k: v for k, v in g.lineage_axes(e).items() if k in RUN_KEYS}
            t = next((c for c in trains if mine and {k: v for k, v in c.axes.items() if k in RUN_KEYS} == mine), None)
        if t is not None:
            used_train.add(t.id)
        keys = _run_keys(g, [e, t])
        if t is None and keys["source"] == NO_VALUE:
            keys["source"] = "untrained"  # a model evaluated as it is (e.g. the student before distillation)
        base = {**keys, **_train_info(t), "eval_cell": e.id,
                **{k: e.metrics.get(k) for k in EVAL_RUN_COLUMNS}}
        groups = sorted({k.split(".")[1] for k in e.metrics if k.startswith("groups.") and k.endswith(".accuracy")})
        for grp in groups:
            rows.append({**base, "group": GROUP_NAMES.get(grp, grp), "accuracy": e.metrics.get(f"groups.{grp}.accuracy"),
                         "se": e.metrics.get(f"groups.{grp}.se"), "group_n": e.metrics.get(f"groups.{grp}.n")})
        rows.append({**base, "group": "overall", "accuracy": e.metrics.get("accuracy"),
                     "se": e.metrics.get("accuracy_se"), "group_n": e.metrics.get("n")})
    for t in trains:
        if t.id not in used_train:
            rows.append({**_run_keys(g, [t]), **_train_info(t), "group": "overall", "accuracy": None})
    if not rows:
        return None
    for row in rows:
        # a neighbouring method's run is named after it (dte-0.5, mpd) unless the grid named its source itself
        named = any("source" in g.cells[c].axes for c in (row.get("eval_cell"), row.get("train_cell")) if c in g.cells)
        if row.get("neighbour") and not named:
            row["source"] = row["neighbour"]
    df = pl.DataFrame(rows, infer_schema_length=None)
    # two cells with the same keys (e.g. re-evaluations): keep them apart by cell id
    dup = pl.struct(RUN_KEYS + ["group"]).is_duplicated()
    if df.select(dup.any()).item():
        cell = pl.coalesce(pl.col("eval_cell"), pl.col("train_cell")) if "eval_cell" in df.columns else pl.col("train_cell")
        df = df.with_columns(method=pl.when(dup).then(pl.col("method") + " [" + cell + "]").otherwise(pl.col("method")))
    return df


def grid_losses(g: GridOutputs) -> pl.DataFrame | None:
    """Loss layout (Figure 3) from every train cell's ``loss.jsonl``."""
    parts = []
    for t in g.of("train"):
        path = (t.dir / "loss.jsonl") if t.dir else None
        if path is None or not path.exists():
            continue
        df = _read_jsonl(path, ["step", "loss"])
        if not df.is_empty():
            parts.append(df.drop_nulls().with_columns(**{k: pl.lit(v) for k, v in _run_keys(g, [t]).items()}))
    return pl.concat(parts, how="diagonal_relaxed") if parts else None


H4_TEACHER = "Qwen3.5-397B-A17B"  # the one teacher whose passes Appendix H.4 times and counts


def upstream_teachers(g: GridOutputs) -> list[str]:
    """The teachers whose generation and compressions count as upstream, as Appendix H.4 counts them.

    H.4: "the teacher pass over 345,383 questions took ≈ 43.5 h (≈ 348 H100-h); compressing the 283,335
    correct traces took 1 h 09 m with Ministral-3-14B (≈ 9.2 H100-h) and 8 h 19 m with Llama-3.3-70B
    (≈ 66.5 H100-h) ... the upstream stages thus contribute ≈ 424 H100-hours" (283,335 is the Qwen
    teacher's Table 4 total): the Qwen teacher's pass and its two compressions; the gpt-oss teacher's
    pass and compressions are not counted (nor evaluation or judging). A grid with the Qwen teacher
    counts it alone; a grid without it (toy teachers) has nothing to follow and counts every teacher.
    """
    teachers = sorted({t for c in g.cells.values() if c.kind in ("generate", "compress")
                       and (t := g.lineage_axes(c).get("teacher"))})
    h4 = [t for t in teachers if paper_name(t, "teacher") == H4_TEACHER]
    return h4 or teachers


def grid_compute(g: GridOutputs, gpu_watts: float = 700.0, pue: float = 1.15,
                 kg_co2_per_kwh: float = 0.079) -> tuple[pl.DataFrame, pl.DataFrame] | None:
    """Appendix H.4/H.5 for a grid: GPU-hours, energy and emissions per stage, and the paper's totals.

    Returns (per-stage frame, quantities frame). Quantities follow ``cdlib.paper.compute()``'s
    names: total = student training + upstream, as in H.5, where upstream is what H.4 counts: the
    teacher pass and the compressions of :func:`upstream_teachers` (the Qwen teacher in the paper's
    grid). The other teachers' passes and a student's own sampling (``keep: all``) are
    ``other_upstream_gpu_hours``, outside that total; evaluation, judge and truncation cells are
    reported beside it (``all_cells_*``).
    """
    if not g.cells:
        return None
    rows = []
    counted = set(upstream_teachers(g))
    for c in g.cells.values():
        wall, gpus, gh = c.cost.get("wall_clock_s"), c.cost.get("gpus"), c.cost.get("gpu_hours")
        if c.kind == "train":
            info = _train_info(c)
            gh, gpus = info["gpu_hours"], info["gpus"]
        rows.append({"stage": c.kind or c.stage, "cell": c.id, "wall_clock_h": (wall or 0) / 3600, "gpus": gpus,
                     "gpu_hours": float(gh or 0.0), "source": g.lineage_axes(c).get("source"),
                     "compressor": compressor_name(c) if c.kind == "compress" else None,
                     "h4_upstream": c.kind in ("generate", "compress") and c.params.get("keep") != "all"
                     and g.lineage_axes(c).get("teacher") in counted})
    df = pl.DataFrame(rows, infer_schema_length=None)
    energy = lambda h: compute_energy(h, gpu_watts, pue, kg_co2_per_kwh)  # noqa: E731
    order = {k: i for i, k in enumerate(KINDS)}
    per_stage = df.group_by("stage").agg(cells=pl.len(), wall_clock_hours=pl.col("wall_clock_h").sum(),
                                         gpu_hours=pl.col("gpu_hours").sum())
    per_stage = per_stage.with_columns(
        energy_kwh=pl.col("gpu_hours").map_elements(lambda h: energy(h)["energy_kwh"], return_dtype=pl.Float64),
        emissions_kg_co2=pl.col("gpu_hours").map_elements(lambda h: energy(h)["emissions_kg_co2"], return_dtype=pl.Float64),
    ).sort(pl.col("stage").replace_strict(order, default=len(order), return_dtype=pl.Int64))

    def hours(kind: str, upstream: bool = False) -> float:
        part = df.filter(pl.col("stage") == kind)
        return float((part.filter("h4_upstream") if upstream else part)["gpu_hours"].sum())

    train = df.filter(pl.col("stage") == "train")
    trunc = float(train.filter(pl.col("source") == "truncated")["gpu_hours"].sum())
    q: dict[str, float] = {"student_training_gpu_hours": hours("train"),
                           "main_grid_gpu_hours": hours("train") - trunc, "truncation_ablation_gpu_hours": trunc,
                           "teacher_gpu_hours": hours("generate", upstream=True)}
    for name, part in df.filter((pl.col("stage") == "compress") & pl.col("h4_upstream")).group_by(
            "compressor", maintain_order=True):
        q[f"compress_{name[0]}_gpu_hours"] = float(part["gpu_hours"].sum())
    q["compression_gpu_hours"] = hours("compress", upstream=True)
    q["upstream_gpu_hours"] = q["teacher_gpu_hours"] + q["compression_gpu_hours"]
    q["other_upstream_gpu_hours"] = hours("generate") + hours("compress") - q["upstream_gpu_hours"]
    if q["student_training_gpu_hours"]:
        q["upstream_over_training"] = q["upstream_gpu_hours"] / q["student_training_gpu_hours"]
    total = energy(q["student_training_gpu_hours"] + q["upstream_gpu_hours"])
    q.update(gpu_watts=gpu_watts, pue=pue, effective_watts=total["effective_watts"], total_gpu_hours=total["gpu_hours"],
             energy_kwh=total["energy_kwh"], grid_g_co2_per_kwh=kg_co2_per_kwh * 1000,
             emissions_kg_co2=total["emissions_kg_co2"])
    every = energy(float(df["gpu_hours"].sum()))
    q.update(all_cells_gpu_hours=every["gpu_hours"], all_cells_energy_kwh=every["energy_kwh"],
             all_cells_emissions_kg_co2=every["emissions_kg_co2"],
             all_cells_wall_clock_hours=float(df["wall_clock_h"].sum()))
    return per_stage, pl.DataFrame({"quantity": list(q), "value": [float(v) for v in q.values()]})


# --------------------------------------------------------------------------- side by side with the paper


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


def _per_dataset_compression(c: pl.DataFrame) -> pl.DataFrame:
    c = _with_optional(_weights(c), ["compressed_tokens"])
    return c.group_by("teacher", "compressor", "dataset").agg(
        compressed_chars=(pl.col("n") * pl.col("compressed_chars")).sum() / pl.col("n").sum(),
        compressed_tokens=(pl.col("n") * pl.col("compressed_tokens")).sum() / pl.col("n").sum(),
        rho=(pl.col("n") * pl.col("compressed_chars")).sum() / (pl.col("n") * pl.col("original_chars")).sum())


def _per_dataset_judge(j: pl.DataFrame) -> pl.DataFrame:
    j = _weights(j).with_columns(pl.col("faithful", "answer_aligned").cast(pl.Float64))
    w = pl.col("n") / pl.col("n").sum()
    return j.group_by("teacher", "compressor", "dataset").agg(
        faithfulness=(w * pl.col("faithfulness")).sum(), faithful=(w * pl.col("faithful")).sum(),
        answer_aligned=(w * pl.col("answer_aligned")).sum())


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
        out["table5"] = compare(_per_dataset_compression(ours), _per_dataset_compression(pub),
                                ["teacher", "compressor", "dataset"], ["compressed_chars", "compressed_tokens", "rho"])
    if generation is not None:
        not_total = pl.col("dataset") != "Total"
        out["table4"] = compare(table4(to_paper_names(generation)).filter(not_total),
                                table4(paper.generation()).filter(not_total), ["teacher", "dataset"],
                                ["n_correct", "mean_reasoning_chars", "mean_completion_tokens"])
    if runs is not None:
        ours, pub = to_paper_names(runs), paper.runs()
        # like with like: the paper prints 1.96 x SE after its ±, so ours is scaled the same way
        out["table7"] = compare(with_ci95(ours), with_ci95(pub), RUN_KEYS + ["group"], ["accuracy", "ci95"])
        ov, pov = _overall(ours), _overall(pub)
        out["table6"] = compare(ov, pov, RUN_KEYS, ["train_hours", "train_tokens"])
        out["table9"] = compare(ov, pov, RUN_KEYS, INFERENCE_COLUMNS)
        out["table11"] = compare(ov, pov, RUN_KEYS, ["gpus", "gpu_hours"])
    if judge is not None:
        out["table10"] = compare(_per_dataset_judge(to_paper_names(judge)), _per_dataset_judge(paper.judge()),
                                 ["teacher", "compressor", "dataset"], ["faithfulness", "faithful", "answer_aligned"])
    out = {k: v for k, v in out.items() if not v.is_empty()}
    if out and compute_quantities is not None:
        c = compare(compute_quantities, paper.compute(), ["quantity"], ["value"])
        if not c.is_empty():
            out["compute"] = c
    return dict(sorted(out.items(), key=lambda kv: (len(kv[0]), kv[0])))


# --------------------------------------------------------------------------- the report page


def _auto_digits(df: pl.DataFrame, digits: int | dict[str, int]) -> dict[str, int]:
    """Per-column decimals: the table's own, raised so small values (toy runs: 0.002 h) keep two
    significant digits."""
    out = {}
    for col in df.columns:
        d = digits.get(col, 3) if isinstance(digits, dict) else digits
        if df[col].dtype.is_float():
            vals = df[col].drop_nulls().drop_nans().abs()
            vals = vals.filter(vals > 0)
            if vals.len() and vals.max() < 1:
                d = max(d, min(6, math.ceil(-math.log10(vals.max())) + 1))
        out[col] = d
    return out


def to_html(df: pl.DataFrame, digits: int | dict[str, int] = 3) -> str:
    """An HTML table (numbers right-aligned, nulls as a dash)."""
    import html

    numeric = [df[c].dtype.is_numeric() for c in df.columns]
    head = "".join(f'<th class="{"num" if n else ""}">{html.escape(c)}</th>' for c, n in zip(df.columns, numeric))
    body = "\n".join("<tr>" + "".join(f'<td class="{"num" if n else ""}">{html.escape(v)}</td>'
                                      for v, n in zip(row, numeric)) + "</tr>" for row in _cells(df, digits))
    return f'<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>'


PAGE_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0; background: #fafafa; }
header { background: #1f3b57; color: #fff; padding: 1.4em 2em 1em; }
header h1 { margin: 0 0 .2em; font-size: 1.6em; }
header p { margin: .2em 0; opacity: .9; }
nav { background: #fff; border-bottom: 1px solid #ddd; padding: .5em 2em; position: sticky; top: 0; z-index: 2; }
nav a { margin-right: 1.2em; color: #1f3b57; text-decoration: none; font-weight: 500; }
main { max-width: 1400px; margin: 0 auto; padding: 1em 2em 4em; }
section { background: #fff; border: 1px solid #e3e3e3; border-radius: 6px; padding: .6em 1.4em 1.2em; margin: 1.2em 0; }
h2 { color: #1f3b57; border-bottom: 2px solid #e8eef4; padding-bottom: .2em; }
h3 { margin: 1.4em 0 .2em; font-size: 1.05em; }
p.what { color: #555; margin: .2em 0 .6em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .4em .8em; margin: .6em 0; color: #5a4a00; }
.scroll { overflow-x: auto; max-height: 34em; overflow-y: auto; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th { position: sticky; top: 0; background: #f0f4f8; text-align: left; }
th, td { padding: .25em .7em; border-bottom: 1px solid #eee; white-space: nowrap; }
td.num, th.num { text-align: right; }
tbody tr:hover { background: #f6f9fc; }
.files { font-size: 12.5px; color: #666; margin: .3em 0 0; }
.files a { color: #1f6fb2; }
figure { margin: .6em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; background: #fff; }
details summary { cursor: pointer; font-weight: 500; margin: .4em 0; }
"""


@dataclass
class _Section:
    id: str
    title: str
    what: str
    parts: list[str] = dc_field(default_factory=list)


class ReportPage:
    """Collects tables, figures and notes into sections and writes them, then ``index.html``.

    Every table and figure is made by a callable, so a missing input or an error turns into
    a note on the page instead of stopping the report.
    """

    def __init__(self, out_dir: str | Path):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.sections: list[_Section] = []
        self.tables: dict[str, list[Path]] = {}
        self.figures: dict[str, list[Path]] = {}
        self.notes: list[str] = []

    def section(self, id: str, title: str, what: str) -> None:
        self.sections.append(_Section(id, title, what))

    def note(self, text: str) -> None:
        import html

        self.notes.append(f"{self.sections[-1].title if self.sections else 'report'}: {text}")
        self.sections[-1].parts.append(f'<p class="note">{html.escape(text)}</p>')

    def _link(self, paths: list[Path], labels: list[str]) -> str:
        return " · ".join(f'<a href="{p.relative_to(self.out).as_posix()}">{lab}</a>' for p, lab in zip(paths, labels))

    def table(self, name: str, make, caption: str, what: str, digits=3,
              folder: str = "tables", details: bool = False) -> pl.DataFrame | None:
        """Write ``<folder>/<name>.md/.tex`` from ``make()`` and add it to the current section.

        ``digits``: decimals for every column, a dict per column, or a function of the frame giving one.
        """
        import html

        try:
            df = make()
            if df is not None and not df.is_empty():
                d = _auto_digits(df, digits(df) if callable(digits) else digits)
        except Exception as e:  # a report never stops on one table
            self.note(f"{caption} not made: {type(e).__name__}: {e}")
            return None
        if df is None or df.is_empty():
            self.note(f"{caption}: no rows.")
            return None
        paths = write_table(df, self.out / folder / name, d, caption=caption)
        self.tables[f"{folder}/{name}"] = paths
        block = (f'<p class="what">{html.escape(what)}</p><div class="scroll">{to_html(df, d)}</div>'
                 f'<p class="files">{df.height} rows · {self._link(paths, ["Markdown", "LaTeX"])}</p>')
        title = html.escape(caption)
        self.sections[-1].parts.append(
            f'<details id="{folder}-{name}"><summary>{title}</summary>{block}</details>' if details
            else f'<h3 id="{folder}-{name}">{title}</h3>{block}')
        return df

    def figure(self, name: str, make, caption: str, what: str) -> list[Path] | None:
        """Write ``figures/<name>.png/.svg/.html`` from the chart ``make()`` returns; embed the SVG."""
        import base64
        import html

        try:
            paths = save_chart(make(), self.out / "figures" / name)
        except Exception as e:
            self.note(f"{caption} not drawn: {type(e).__name__}: {e}")
            return None
        self.figures[name] = paths
        png, svg, interactive = paths
        data = base64.b64encode(svg.read_bytes()).decode()
        self.sections[-1].parts.append(
            f'<h3 id="figures-{name}">{html.escape(caption)}</h3><p class="what">{html.escape(what)}</p>'
            f'<figure><img alt="{html.escape(caption)}" src="data:image/svg+xml;base64,{data}"></figure>'
            f'<p class="files">{self._link([interactive, png, svg], ["interactive (tooltips)", "PNG", "SVG"])}</p>')
        return paths

    def write(self, title: str, subtitle_lines: list[str]) -> Path:
        import html

        nav = "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in self.sections)
        body = "\n".join(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2><p class="what">{html.escape(s.what)}</p>'
                         + "\n".join(s.parts) + "</section>" for s in self.sections)
        sub = "".join(f"<p>{line}</p>" for line in subtitle_lines)
        page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head>\n<body>"
                f"<header><h1>{html.escape(title)}</h1>{sub}</header><nav>{nav}</nav><main>\n{body}\n</main></body></html>\n")
        path = self.out / "index.html"
        path.write_text(page)
        return path


# The protocol options a grid may deviate on (issue 14): (stage kind, param, the paper's value, what it governs).
PROTOCOL = [
    ("compress", "prompt", "reconstructed", "compression prompt (the paper's is unprinted: ours is a reconstruction)"),
    ("compress", "recompress_attempts", 0, "retries of flagged compressions (paper: one pass)"),
    ("compress", "drop_flagged", False, "flagged compressions left out of training and Tables 2/5"),
    ("truncate", "drop_flagged", False, "length-mismatched truncations left out of training"),
    ("train", "answer_only_think", "none", "answer-only target: whole think block removed (paper) or kept empty"),
    ("evaluate", "grouping", "paper", "Table 7 groups: the n the paper's ± imply, or cdlib.datasets' groups"),
    ("judge", "exclude_datasets", ["mmlu_stem", "mmlu_medical"], "datasets left out of Table 10"),
]


def protocol(g: "GridOutputs") -> pl.DataFrame:
    """Which of the paper's protocol options this grid's cells used: one row per option with the values
    seen (params.yaml, the stage default where absent), the paper's value and whether it deviates."""
    from cdlib.params import STAGE_MODELS

    rows = []
    for kind, key, paper_value, what in PROTOCOL:
        cells = [c for c in g.cells.values() if c.kind == kind and c.params]
        if not cells:
            continue
        field = STAGE_MODELS[kind].model_fields.get(key)
        default = field.default if field is not None else None
        seen = sorted({json.dumps(c.params.get(key, default), default=str) for c in cells})
        rows.append({"stage": kind, "option": key, "grid": ", ".join(seen), "paper": json.dumps(paper_value),
                     "deviation": seen != [json.dumps(paper_value)], "governs": what})
    return pl.DataFrame(rows, schema={"stage": pl.String, "option": pl.String, "grid": pl.String, "paper": pl.String,
                                      "deviation": pl.Boolean, "governs": pl.String})


def _training_modes(runs: pl.DataFrame) -> str:
    ov = _overall(runs)
    if "budget" not in ov.columns or ov["budget"].null_count() == ov.height:
        return "How training length was set is not recorded (no params.yaml in the train cells)."
    counts = ov.group_by(pl.col("budget").fill_null("not recorded")).len().sort("budget")
    return "Training length per run: " + "; ".join(f"{r['len']} run(s) {r['budget']}" for r in counts.to_dicts()) + "."


def _scored(runs: pl.DataFrame | None) -> pl.DataFrame | None:
    """Runs that have an evaluation (accuracy on the overall row)."""
    if runs is None:
        return None
    keys = _overall(runs).filter(pl.col("accuracy").is_not_null()).select(RUN_KEYS)
    df = runs.join(keys, on=RUN_KEYS, how="semi")
    return df if not df.is_empty() else None


def build_report(grid_dir: str | Path, out_dir: str | Path, params: Any = None) -> dict[str, Any]:
    """Regenerate every table and figure a grid's outputs allow, and write ``out_dir/index.html``.

    Reads ``grid_dir`` (``outputs/<grid>``): results.parquet and the cell directories
    (:func:`read_grid`). Writes ``tables/`` (Markdown + LaTeX: Tables 2-11, ``runs``,
    ``failure_modes``, ``compute_stages``, ``compute``), ``figures/`` (PNG, SVG, interactive
    HTML: Figures 1-4 and ``pareto``), ``side_by_side/`` (the grid's numbers beside the
    published ones, when ``params.side_by_side`` and the grid uses the paper's names) and
    ``index.html``, one self-contained page with every table and figure. A grid with
    Distilling-the-Essence runs also gets ``fig_dte_kept_fraction``; neighbouring
    methods' runs are labelled by :func:`neighbour_label` (``dte-0.5``, ``mpd``) unless
    the grid names their source, and so appear beside the other sources on the Pareto plot. ``params`` is a
    :class:`cdlib.params.ReportParams` (or None for the paper's defaults); its ``pue``,
    ``grid_kg_co2_per_kwh`` and ``gpu_watts`` drive the energy accounting. A missing input
    skips what needs it, with a note on the page; nothing here raises for a partial grid.

    Returns ``{"index", "tables", "figures", "side_by_side", "notes"}`` (paths and notes).
    """
    import datetime as dt
    import html

    side = getattr(params, "side_by_side", True)
    pue = getattr(params, "pue", 1.15)
    intensity = getattr(params, "grid_kg_co2_per_kwh", 0.079)
    watts = getattr(params, "gpu_watts", 700.0)
    g = read_grid(grid_dir)
    page = ReportPage(out_dir)

    def load(what: str, fn):
        try:
            return fn(g)
        except Exception as e:
            g.notes.append(f"{what} not read: {type(e).__name__}: {e}")
            return None

    generation = load("generation traces", grid_generation)
    every_compression = load("compressions", lambda grid: grid_compression(grid, include_flagged=True))
    compression = every_compression.filter(~pl.col("drop")) if every_compression is not None else None
    lengths = load("trace lengths", lambda grid: grid_trace_lengths(grid, every_compression))
    runs = load("runs", grid_runs)
    losses = load("loss curves", grid_losses)
    judged = load("judgements", grid_judge)
    modes = load("failure modes", failure_modes)
    compute = load("compute", lambda grid: grid_compute(grid, watts, pue, intensity))
    scored = load("evaluated runs", lambda grid: _scored(runs))

    page.section("overview", "Overview", "What this grid holds: finished cells per stage, and what the report had to skip.")
    kinds = pl.DataFrame([{"stage": c.stage, "kind": c.kind or "?"} for c in g.cells.values()],
                         schema={"stage": pl.String, "kind": pl.String})
    page.table("cells", lambda: kinds.group_by("stage", "kind").len("cells").sort("stage"), "Finished cells per stage",
               "One row per stage of the grid file; 'kind' is the stage notebook that made its cells.", 0)
    for n in g.notes:
        page.note(n)
    page.table("protocol", lambda: protocol(g), "Protocol: the paper's options and this grid's",
               "Each option the paper's protocol fixes, the value(s) this grid's cells used, the paper's value and "
               "whether the tables below follow a deviation. Definitions: Table 5's ρ = mean compressed / mean "
               "original characters; Table 7's ± = 1.96 × SE (a 95% interval, column _ci95) beside the SE; Table 7's "
               "groups per the evaluate stage's grouping; Overall over every record; Table 10 over the judged datasets; "
               "Tables 6 and 11's tokens = supervised tokens of every source row, validation split included, one pass "
               "(App. H.4); upstream GPU-hours = the Qwen teacher's pass and its two compressions (App. H.4).", 0)

    page.section("generation", "Stage 1: teacher traces", "Rejection sampling kept only verified-correct traces (paper 3.1, App. A).")
    if generation is None:
        page.note("No generate cells with traces.jsonl: Table 4 skipped.")
    else:
        page.table("table4", lambda: table4(generation), "Table 4: kept traces per dataset",
                   "Correct traces kept per teacher and dataset, their mean reasoning length (characters) and mean completion tokens.",
                   TABLE_DIGITS[4])
    if lengths is None:
        page.note("No token counts of compressed or truncated traces: Figure 2 skipped.")
    else:
        page.figure("fig2_reasoning_lengths", lambda: fig2_reasoning_lengths(lengths), "Figure 2: reasoning-token distributions",
                    "Reasoning tokens per trace, raw vs each compressor (and truncated), counted with the compressor's tokenizer.")

    page.section("compression", "Stage 2: compression", "How much each compressor shortens the traces (paper 3.2, App. B).")
    if compression is None:
        page.note("No compress cells with compressed.jsonl: Tables 2, 5 and Figure 1 skipped.")
    else:
        n_flagged = every_compression["flag"].is_not_null().sum()
        if every_compression.height > compression.height:
            page.note(f"{every_compression.height - compression.height} flagged compression(s) (empty, answer-dropping, longer than "
                      f"the original, ...) are left out of these numbers, as they are out of training (drop_flagged: "
                      f"a deviation from the paper, which keeps every compression).")
        elif n_flagged:
            page.note(f"{n_flagged} flagged compression(s) are kept in these numbers and in training, as the paper "
                      f"keeps every compression; the flag rates are reported beside Table 5.")
        page.table("table2", lambda: table2(compression), "Table 2: compression per teacher and compressor",
                   "Mean compressed length (characters) and ρ = mean compressed / mean original characters; lower is more aggressive.",
                   {"mean_compressed_chars": 0, "rho": 3})
        page.table("table5", lambda: table5(compression), "Table 5: compression per dataset",
                   "Per dataset: mean compressed characters, compressed tokens and ρ for each compressor, with Overall rows.",
                   lambda df: {c: 0 for c in df.columns if c.endswith(("_chars", "_tokens"))})
        page.table("flag_rates", lambda: flag_rates(every_compression), "Answer-preservation flags beside Table 5",
                   "Per dataset and compressor: compressions checked, flagged (empty, degenerate, longer than the "
                   "original, dropping or contradicting the verified answer), the flag rate, how many were dropped "
                   "from training, and the count per flag. The paper runs no such check (its future work, section 7).",
                   {"n": 0, "flagged": 0, "dropped": 0, "flag_rate": 3})
        page.figure("fig1_compression_by_domain", lambda: fig1_compression_by_domain(compression),
                    "Figure 1: compression ratio by domain", "Ratio of mean lengths per domain, one panel per teacher (lower = shorter traces).")

    page.section("training", "Stage 4: student training", "What each student was trained on, for how long, and how the loss fell (paper 4, App. C).")
    if runs is None:
        page.note("No train or evaluate cells: Tables 3, 6-9, 11 and Figures 3, 4 skipped.")
    else:
        try:
            page.note(_training_modes(runs))
        except ValueError as e:
            page.note(f"Training modes not read: {e}")
        neighbours = [] if "neighbour" not in runs.columns or runs["neighbour"].null_count() == runs.height else [
            "objective", "kept_fraction", "kept_token_fraction", "loss_on", "train_flops", "peak_memory_gb"]
        page.table("runs", lambda: _sort(_overall(runs).select(
            [c for c in RUN_KEYS + ["budget", "train_tokens", "train_hours", "final_train_loss", "final_val_loss",
                                    *neighbours, "accuracy", "n", "train_cell", "eval_cell"] if c in runs.columns]),
            RUN_KEYS),
                   "Runs", "One row per student run: training budget (epoch-based or compute-matched), trainable tokens, final losses "
                   "and overall accuracy, with the cells that produced them; runs of neighbouring methods (Distilling the "
                   "Essence, Mixed-Policy Distillation) add their objective, kept fraction, supervised sections, training "
                   "FLOPs and peak memory (GB).", {"train_tokens": 0, "n": 0, "train_flops": 0, "peak_memory_gb": 2})
        if "train_hours" in runs.columns and runs["train_hours"].null_count() < runs.height:
            page.table("table6", lambda: table6(runs), "Table 6: training time, speedup and tokens",
                       "Wall-clock hours per run, speedup over the raw-trace run of the same student and method, trainable tokens (millions).",
                       TABLE_DIGITS[6])
        else:
            page.note("No train cells: Table 6 skipped.")
    if losses is None:
        page.note("No loss.jsonl in the train cells: Figure 3 skipped.")
    else:
        page.figure("fig3_loss_curves", lambda: fig3_loss_curves(losses), "Figure 3: training loss",
                    "Per-step training loss (faint) and its EMA (bold) per run; colour = source, dash = method.")

    page.section("accuracy", "Stage 5: accuracy", "Greedy evaluation of every student on the held-out sets (paper 5, App. D, E).")
    if scored is None:
        page.note("No evaluated runs (evaluate cells with an accuracy): Tables 3, 7, 8 and Figure 4 skipped.")
    else:
        page.table("table3", lambda: table3(scored), "Table 3: overall accuracy", "Overall accuracy per run of the raw and compressed-trace sources.",
                   TABLE_DIGITS[3])
        page.table("table7", lambda: table7(scored), "Table 7: accuracy per group",
                   "Accuracy per report group with its standard error (_se) and the paper's ± (_ci95 = 1.96 × SE, "
                   "a 95% interval half-width), one row per run.",
                   TABLE_DIGITS[7])
        if scored.filter(pl.col("source") == "truncated").is_empty():
            page.note("No runs on truncated traces: Table 8 (truncation ablation) skipped.")
        else:
            page.table("table8", lambda: table8(scored), "Table 8: truncated vs compressed",
                       "Overall accuracy of length-matched truncated traces beside the compressed ones, same student and method.",
                       TABLE_DIGITS[8])
        has_tokens = "median_reasoning_tokens" in scored.columns and scored["median_reasoning_tokens"].null_count() < scored.height
        x = "median_reasoning_tokens" if has_tokens else "median_reasoning_chars"
        page.figure("fig4_accuracy_vs_length", lambda: fig4_accuracy_vs_length(scored, x=x), "Figure 4: accuracy vs reasoning length",
                    f"Overall accuracy against the {x.replace('_', ' ')} of each run's outputs (log scale; bars: inter-quartile range).")
    if runs is not None and "dte" in runs.columns and runs["dte"].any():
        if scored is None or not scored.filter(pl.col("dte")).height:
            page.note("Distilling-the-Essence runs are trained but not evaluated: the kept-fraction figure is skipped.")
        else:
            page.figure("fig_dte_kept_fraction", lambda: fig_dte_kept_fraction(scored),
                        "Distilling the Essence: accuracy vs kept fraction",
                        "Overall accuracy of runs trained on the first X% of each example's tokens (whole sequence or "
                        "reasoning span only) and of section-mask runs, beside the uncut run on the same data; right: "
                        "the same runs against training FLOPs (compute-quality trade-off).")

    page.section("efficiency", "Inference efficiency", "How long the students' answers are and what accuracy each token buys (paper 5.4, App. F).")
    if scored is None:
        page.note("No evaluated runs: Table 9 and the Pareto plot skipped.")
    else:
        page.table("table9", lambda: table9(scored), "Table 9: inference efficiency",
                   "Mean completion tokens (all, and excluding outputs cut at the cap), truncation rate, median reasoning characters, accuracy per 1k tokens.",
                   TABLE_DIGITS[9])
        page.figure("pareto", lambda: pareto(scored), "Accuracy vs completion length (Pareto)",
                    "Every run's overall accuracy against its mean completion tokens; the dashed line joins the runs no other run beats on both.")

    page.section("faithfulness", "Stage 6: faithfulness", "An LLM judge (or the toy world's rule) checks each compression against its raw trace (App. G).")
    if judged is None:
        page.note("No judge cells with judgements.jsonl: Table 10 skipped.")
    else:
        page.table("table10", lambda: table10(judged), "Table 10: judged faithfulness",
                   "Per dataset and compressor: judged traces, mean faithfulness (1-5), % judged faithful, % reaching the canonical answer.",
                   TABLE_DIGITS[10])
    if modes is not None:
        page.table("failure_modes", lambda: modes, "Judge failure modes",
                   "How often the judge named each failure mode, per teacher and compressor (a trace can have several).",
                   {"count": 0, "pct_of_judged": 1})

    page.section("compute", "Compute and energy", "GPU-hours per run and stage, and the energy and emissions they imply (App. H.4, H.5).")
    if runs is not None and "train_hours" in runs.columns:
        page.table("table11", lambda: _sort(table11(runs).join(_overall(runs).select(RUN_KEYS + ["budget"]), on=RUN_KEYS, how="left"),
                                            RUN_KEYS) if "budget" in runs.columns else table11(runs),
                   "Table 11: compute per run", "GPUs, wall-clock hours, GPU-hours and trainable tokens (millions) per student run, "
                   "with its training budget.", TABLE_DIGITS[11])
    if compute is None:
        page.note("No cell manifests: compute accounting skipped.")
    else:
        stages, quantities = compute
        page.table("compute_stages", lambda: stages, "GPU-hours per stage",
                   f"Every finished cell's GPU-hours (from its manifest) per stage; energy = GPU-hours × {watts:g} W × PUE {pue:g}, "
                   f"emissions = energy × {intensity * 1000:g} gCO2eq/kWh.", {"cells": 0})
        page.table("compute", lambda: quantities, "Appendix H.4/H.5 totals",
                   "The paper's accounting (App. H.4, H.5): total = student training + upstream, where upstream is "
                   "the teacher pass and the two compressions of the Qwen teacher only (every teacher when the grid "
                   "has no Qwen teacher); other_upstream_gpu_hours holds the other teachers' passes, outside the total; "
                   "all_cells_* adds them and the evaluation and judge cells.", 3)

    page.section("published", "Side by side with the paper", "This grid's numbers beside the published ones, wherever the grid uses the paper's names.")
    compared: dict[str, list[Path]] = {}
    if not side:
        page.note("Side-by-side comparisons turned off (side_by_side: false).")
    else:
        try:
            pairs = grid_side_by_side(scored, compression, generation, judged, compute[1] if compute else None)
        except Exception as e:
            pairs = {}
            page.note(f"Side-by-side not made: {type(e).__name__}: {e}")
        if not pairs:
            page.note("No table of this grid uses the paper's names for teachers, students, sources, compressors or "
                      "datasets (e.g. the toy world), so there is nothing to compare.")
        for name, df in pairs.items():
            label = {"compute": "Appendix H.4/H.5"}.get(name, name.replace("table", "Table "))
            page.table(name, lambda df=df: df, f"{label}: ours vs published",
                       f"{df.height} value(s) of this grid beside the paper's; diff = ours − paper.", 3,
                       folder="side_by_side", details=True)
            compared[name] = page.tables[f"side_by_side/{name}"]

    grid_name = Path(grid_dir).resolve().name
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    subtitle = [f"Grid <b>{html.escape(grid_name)}</b> · {len(g.cells)} finished cells · built {html.escape(now)}",
                f"Source: <code>{html.escape(str(Path(grid_dir)))}</code> · "
                f"{len([k for k in page.tables if k.startswith('tables/')])} tables, {len(page.figures)} figures"
                + (f", {len(compared)} side-by-side comparisons" if compared else "")]
    index = page.write(f"Compress-Distill report: {grid_name}", subtitle)
    return {"index": index, "tables": {k.split("/", 1)[1]: v for k, v in page.tables.items() if k.startswith("tables/")},
            "figures": page.figures, "side_by_side": compared, "notes": page.notes}
