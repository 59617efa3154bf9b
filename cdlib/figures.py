"""Every chart of the workbench, from the tidy layouts of :mod:`cdlib.tables`, in altair.

The paper's Figures 1 to 4, the Pareto plot, the Distilling-the-Essence figure, the explore
stage's interactive Figure 2 and a single run's loss curve. One palette and one order of
sources, so every figure agrees; :func:`save_chart` writes PNG, SVG and interactive HTML;
:func:`paper_figures` draws what the published numbers allow.
"""

from __future__ import annotations

from pathlib import Path

import altair as alt
import polars as pl

from cdlib.student_runs import DEFAULT_LOSS_ON
from cdlib.tables import (ORDER, RUN_KEYS, SOURCE_LABELS, need_columns, overall_rows, paper_name, paper_order,
                          to_paper_names, with_optional, with_weights)


def render_offline() -> None:
    """Show charts in notebooks as SVG drawn by vl-convert, which bundles Vega.

    altair's default renderer emits HTML that loads Vega from a public CDN, so a chart is blank
    on an offline node, in an executed notebook opened later (JupyterLab runs no scripts of an
    untrusted output) and in nbconvert HTML. An SVG output needs neither network nor scripts;
    the interactive version of a figure is the ``.html`` :func:`save_chart` writes, Vega inlined.
    Called when this module is imported, which every notebook that draws a chart does.
    """
    alt.renderers.enable("svg")


render_offline()

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


PALETTE = {"raw": "#4c78a8", "answer_only": "#f58518", "truncated": "#e45756",
           "llama70b": "#54a24b", "ministral14b": "#b279a2",
           "extractive": "#72b7b2", "mpd": "#9d755d"}  # the toy world's compressor and MPD keep theirs too


# eight more, so neighbouring sources do not share one
EXTRA_COLORS = ["#eeca3b", "#ff9da6", "#bab0ac", "#17becf", "#bcbd22", "#e377c2", "#393b79", "#8c6d31"]


def _color(df: pl.DataFrame, col: str = "source", title: str = "Source") -> alt.Color:
    """Colour by ``<col>_label`` with a fixed colour per known source, so every figure agrees."""
    values = paper_order(df[col].drop_nulls().unique().to_list(), col)
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
    return [SOURCE_LABELS.get(v, v) for v in paper_order(values, col)]


def _in_paper_order(values: list[str], col: str) -> list[str]:
    """Distinct ``values`` in the paper's order (teachers as in Table 1, students by size), also when
    the grid spells them its own way (``qwen3.5-0.8b``, see :func:`paper_name`); others after, by name."""
    order = ORDER.get(col, [])

    def rank(v: str) -> tuple[int, str]:
        name = v if v in order else paper_name(v.split(" · ")[0], col)  # " · paper": beside_published
        return (order.index(name) if name in order else len(order), v)

    return sorted({v for v in values if v is not None}, key=rank)


def fig1_compression_by_domain(compression: pl.DataFrame) -> alt.FacetChart:
    """Figure 1: mean compression ratio (ratio of means) by domain, per teacher and compressor."""
    need_columns(compression, ["teacher", "compressor", "domain", "original_chars", "compressed_chars"], "fig1")
    df = with_weights(compression).group_by("teacher", "compressor", "domain").agg(
        rho=(pl.col("n") * pl.col("compressed_chars")).sum() / (pl.col("n") * pl.col("original_chars")).sum(),
        n=pl.col("n").sum(),
    )
    df = _labelled(df, "compressor")
    domains = paper_order(df["domain"].unique().to_list(), "domain")
    comps = _label_order(df["compressor"].unique().to_list(), "compressor")
    bars = alt.Chart(df).mark_bar().encode(
        x=alt.X("domain:N", sort=domains, title="Domain", axis=alt.Axis(labelAngle=0)),  # short names read level
        xOffset=alt.XOffset("compressor_label:N", sort=comps),
        y=alt.Y("rho:Q", title="Mean compression ratio ρ (lower = more aggressive)"),
        color=_color(df, "compressor", "Compressor"),
        tooltip=["teacher:N", "compressor_label:N", "domain:N", alt.Tooltip("rho:Q", format=".3f"),
                 alt.Tooltip("n:Q", format=",")],
    ).properties(width=260, height=220)
    return bars.facet(column=alt.Column("teacher:N", sort=_in_paper_order(df["teacher"].to_list(), "teacher"),
                                        title="Teacher"))


def bin_lengths(df: pl.DataFrame, column: str, by: list[str], bins: int = 50,
                clip_quantile: float = 0.99) -> tuple[pl.DataFrame, float, float]:
    """Figure 2's histogram counts: rows per ``by`` and bin of ``column`` (``count``, ``bin``, ``start``, ``end``),
    the bin width and the upper edge. Lengths above the ``clip_quantile`` of all rows fall into the last bin, so rare
    outliers do not flatten the plot; binning is done here, not in the browser."""
    upper = float(df[column].quantile(clip_quantile) or 0) or 1.0
    width = upper / bins
    out = df.with_columns(bin=(pl.col(column) / width).floor().clip(0, bins - 1).cast(pl.Int64))
    out = out.group_by(*by, "bin").agg(count=pl.len())
    return out.with_columns(start=pl.col("bin") * width, end=(pl.col("bin") + 1) * width), width, upper


def binned(df: pl.DataFrame, bins: int = 50, clip_quantile: float = 0.99) -> tuple[pl.DataFrame, float]:
    """:func:`bin_lengths` of explore's ``tokens`` per (teacher, source, dataset, flagged), with source labels."""
    out, width, _ = bin_lengths(df.with_columns(flagged=pl.col("flag").is_not_null()), "tokens",
                             ["teacher", "source", "dataset", "flagged"], bins, clip_quantile)
    out = out.with_columns(source_label=pl.col("source").replace(SOURCE_LABELS))
    return out.sort("teacher", "source", "dataset", "flagged", "bin"), width


def fig2_reasoning_lengths(traces: pl.DataFrame, bins: int = 50, clip_quantile: float = 0.99) -> alt.VConcatChart:
    """Figure 2: reasoning-token histograms, one panel per (teacher, source), from per-trace rows.

    Lengths above the ``clip_quantile`` of all traces fall into the last bin, so rare
    outliers do not flatten the plot. Binning is done here, not in the browser.
    """
    need_columns(traces, ["teacher", "source", "reasoning_tokens"], "fig2")
    if traces.is_empty():
        raise ValueError("fig2: no traces")
    df, width, upper = bin_lengths(traces, "reasoning_tokens", ["teacher", "source"], bins, clip_quantile)
    df = _labelled(df)
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
    need_columns(losses, RUN_KEYS + ["step", "loss"], "loss curves")
    return losses.sort(RUN_KEYS + ["step"]).with_columns(
        ema=pl.col("loss").ewm_mean(alpha=alpha, adjust=False).over(RUN_KEYS))


def thin_steps(df: pl.DataFrame, points: int, by: list[str] | None = None) -> pl.DataFrame:
    """Every ``ceil(n / points)``-th row of each run (``by``: the run's key columns; None: one run), always
    keeping its last: evenly spaced steps, at most about ``points`` per run."""
    over = (lambda e: e.over(by)) if by else (lambda e: e)  # noqa: E731
    i, n = over(pl.int_range(pl.len())), over(pl.len())
    every = (n / points).ceil().cast(pl.Int64).clip(1)
    return df.filter((i % every == 0) | (i == n - 1))


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
    df = _labelled(thin_steps(df, points, RUN_KEYS).select(RUN_KEYS + ["step", "loss", "ema"]))
    students = _in_paper_order(df["student"].to_list(), "student")
    methods = paper_order(df["method"].unique().to_list(), "method")
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
    df = overall_rows(runs)
    need_columns(df, ["accuracy", x], "fig4")
    df = with_optional(df, ["reasoning_tokens_q1", "reasoning_tokens_q3", "se"])
    df = _labelled(df.filter(pl.col(x) > 0))
    students = _in_paper_order(df["student"].to_list(), "student")
    methods = paper_order(df["method"].unique().to_list(), "method")
    color = _color(df)
    df = _complete_grid(df, "teacher", "student")
    title = x.replace("_", " ").capitalize() + " (log)"
    base = alt.Chart(df).encode(
        x=alt.X(f"{x}:Q", scale=alt.Scale(type="log"), title=title,
                axis=alt.Axis(labelOverlap="greedy", labelSeparation=6)),
        y=alt.Y("accuracy:Q", title="Overall accuracy", scale=alt.Scale(zero=False)),
        color=color,
    )
    tooltip = RUN_KEYS + [alt.Tooltip("accuracy:Q", format=".3f"), alt.Tooltip("se:Q", format=".3f"),
                          alt.Tooltip(f"{x}:Q", format=",")]
    points = base.mark_point(filled=True, size=70).encode(
        shape=alt.Shape("method:N", scale=alt.Scale(domain=methods), title="Method"),
        tooltip=tooltip,
    )
    layers = [points]
    if x == "median_reasoning_tokens" and df["reasoning_tokens_q1"].null_count() < df.height:
        iqr = base.mark_rule().encode(x="reasoning_tokens_q1:Q", x2="reasoning_tokens_q3:Q", tooltip=tooltip)
        layers.insert(0, iqr)
    return alt.layer(*layers).properties(width=180, height=170).facet(
        row=alt.Row("teacher:N", sort=_in_paper_order(df["teacher"].to_list(), "teacher"), title=None),
        column=alt.Column("student:N", sort=students, title=None))


def pareto_front(runs: pl.DataFrame, by: list[str] | None = None,
                 x: str = "mean_completion_tokens", y: str = "accuracy") -> pl.DataFrame:
    """Runs not dominated by another run of the same ``by`` group (fewer-or-equal ``x`` and higher ``y``)."""
    df = overall_rows(runs).drop_nulls([x, y]).sort([x, pl.col(y)], descending=[False, True])
    by = by or []
    best = pl.col(y).cum_max().shift(1).over(by) if by else pl.col(y).cum_max().shift(1)
    return df.with_columns(_best=best).filter(pl.col("_best").is_null() | (pl.col(y) > pl.col("_best"))).drop("_best")


def pareto(runs: pl.DataFrame, x: str = "mean_completion_tokens") -> alt.FacetChart:
    """Accuracy vs mean completion tokens (log x) for every run, with the Pareto front per teacher."""
    df = overall_rows(runs)
    need_columns(df, ["accuracy", x], "pareto")
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
                  for m in paper_order(df["method"].unique().to_list(), "method") if (s, m) in pairs]
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
    ``loss_on``) and, as the uncut reference at kept fraction 1.0, the uncut runs with the
    same data (``data_source``), teacher, student, ``loss_on`` and objective as a cut run
    (plain SFT runs for the usual mask). The reference is repeated once per cut span so
    each span's curve ends at the full run. ``variant``: ``cut: sequence``, ``cut:
    reasoning``, ``no cut`` (an uncut DtE run that no cut run extends), plus ``, loss on
    <sections>`` for a non-default ``loss_on`` and ``, KD`` for a run that also distils a
    teacher's logits (``objective: kl``, as that paper's own code trains).
    """
    df = overall_rows(runs)
    need_columns(df, ["accuracy", "kept_fraction"], "dte_runs")
    default = "+".join(DEFAULT_LOSS_ON)
    df = df.with_columns(
        pl.lit(None, dtype=pl.String).alias(c) for c in ("truncate_span", "data_source") if c not in df.columns
    ).with_columns(
        loss_on=pl.col("loss_on").fill_null(default) if "loss_on" in df.columns else pl.lit(default),
        objective=pl.col("objective").fill_null("sft") if "objective" in df.columns else pl.lit("sft"))
    if "dte" not in df.columns:
        df = df.with_columns(dte=(pl.col("kept_fraction") < 1) | (pl.col("loss_on") != default))
    df = df.filter(pl.col("accuracy").is_not_null())
    df = df.with_columns(suffix=pl.when(pl.col("loss_on") != default).then(pl.lit(", loss on ") + pl.col("loss_on"))
                         .otherwise(pl.lit(""))
                         + pl.when(pl.col("objective") == "kl").then(pl.lit(", KD")).otherwise(pl.lit("")))
    cut = df.filter(pl.col("kept_fraction") < 1)
    uncut = df.filter(pl.col("kept_fraction") >= 1)
    group = ["teacher", "student", "data_source", "loss_on", "objective"]
    spans = cut.select(*group, "truncate_span").unique()
    # each uncut run closes the curve of every span cut from its own setup; one that closes none stays a point
    closing = uncut.drop("truncate_span").join(spans, on=group, how="inner", nulls_equal=True)
    alone = uncut.filter(pl.col("dte")).join(spans, on=group, how="anti", nulls_equal=True)
    curve = pl.lit("cut: ") + pl.col("truncate_span").fill_null("sequence") + pl.col("suffix")
    parts = [cut.with_columns(variant=curve), closing.with_columns(variant=curve),
             alone.with_columns(variant=pl.lit("no cut") + pl.col("suffix"))]
    return pl.concat(parts, how="diagonal_relaxed").drop("suffix").sort("variant", "kept_fraction")


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


def beside_published(ours: pl.DataFrame, published: pl.DataFrame, keys: list[str]) -> pl.DataFrame | None:
    """``ours`` (in the paper's names, :func:`cdlib.tables.to_paper_names`) and the ``published`` rows that share
    its ``keys``, one frame whose ``teacher`` says where each row comes from (``<teacher> · paper`` or ``·
    this grid``), so a figure faceted by teacher sets the two side by side. None when no key matches (a grid
    that does not use the paper's names)."""
    mine = to_paper_names(ours)
    pub = published.join(mine.select(keys).unique(), on=keys, how="semi", nulls_equal=True)
    if pub.is_empty():
        return None
    both = pl.concat([mine.with_columns(_origin=pl.lit("this grid")), pub.with_columns(_origin=pl.lit("paper"))],
                     how="diagonal_relaxed")
    return both.with_columns(teacher=pl.col("teacher") + " · " + pl.col("_origin")).drop("_origin")


def fig1_beside_paper(compression: pl.DataFrame) -> alt.FacetChart:
    """Figure 1 of this grid beside the paper's (Tables 4 and 5, :func:`cdlib.paper.compression`), for the
    (teacher, compressor) pairs both have."""
    from cdlib import paper

    df = beside_published(with_weights(compression), paper.compression(), ["teacher", "compressor"])
    if df is None:
        raise ValueError("fig1_beside_paper: no (teacher, compressor) of this grid is in the paper")
    return fig1_compression_by_domain(df)


def fig4_beside_paper(runs: pl.DataFrame) -> alt.FacetChart:
    """Figure 4 of this grid beside the paper's runs with the same keys, on median reasoning *characters*
    (Table 9: the paper publishes no per-run token medians), rows = teacher and origin."""
    from cdlib import paper

    df = beside_published(overall_rows(runs), overall_rows(paper.runs()), RUN_KEYS)
    if df is None:
        raise ValueError("fig4_beside_paper: no run of this grid is in the paper")
    return fig4_accuracy_vs_length(df, x="median_reasoning_chars")


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
        "fig1_compression_by_domain": save_chart(fig1_compression_by_domain(paper.compression()),
                                                 out / "fig1_compression_by_domain"),
        "fig4_accuracy_vs_length": save_chart(fig4_accuracy_vs_length(runs, x="median_reasoning_chars"),
                                              out / "fig4_accuracy_vs_length"),
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
        "grid's outputs with cdlib.figures.fig2_reasoning_lengths and fig3_loss_curves.\n")
    return made


def loss_chart(losses: pl.DataFrame, title: str | None = None, max_points: int = 1000) -> alt.Chart:
    """One run's loss per step (thin) and its EMA (``ema``, as training logs it; bold), as in the paper's Figure 3.

    ``losses`` is a run's ``loss.jsonl`` as a frame (:func:`cdlib.train.loss_frame`); Figure 3 itself, every run
    of a grid at once, is :func:`fig3_loss_curves`. A long run is thinned to ``max_points`` evenly spaced steps
    (the last kept): altair embeds at most 5,000 rows, two per step here."""
    df = thin_steps(losses, max_points).select("step", "loss", "ema").unpivot(index="step", variable_name="curve",
                                                                               value_name="value")
    return alt.Chart(df).mark_line().encode(
        x=alt.X("step:Q", title="optimizer step"),
        y=alt.Y("value:Q", title="training loss"),
        color=alt.Color("curve:N", title=None),
        strokeWidth=alt.condition(alt.datum.curve == "ema", alt.value(2.5), alt.value(1)),
    ).properties(title=title or "training loss", width=480, height=260)


def source_order(df: pl.DataFrame) -> list[str]:
    """Sources in reading order: raw first, then as they appear (the order of the params)."""
    seen = list(dict.fromkeys(df["source"].to_list()))
    return (["raw"] if "raw" in seen else []) + [s for s in seen if s != "raw"]


def lengths_chart(df: pl.DataFrame, bins: int = 50, clip_quantile: float = 0.99,
                  controls: bool = True, include_flagged: bool = False) -> alt.VConcatChart:
    """The paper's Figure 2 for these traces: reasoning-token histograms, one row per teacher and
    one panel per source (raw first), with tooltips.

    With ``controls`` the chart carries a dataset menu, minimum and maximum token
    sliders and an "include flagged" switch that work in JupyterLab and in the
    exported HTML without a kernel (static PNGs show the start values: all
    datasets, the full range, flagged rows as ``include_flagged`` says). Counts are pre-binned by :func:`binned`, so the
    token range has the bins' resolution and the chart stays small. Panels are
    concatenated, not faceted: Vega-Lite misplaces facet cells that a filter
    empties (their sort keys become undefined).
    """
    if df.is_empty():
        raise ValueError("lengths_chart: no traces left to plot (check the filters)")
    data, width = binned(df, bins, clip_quantile)
    top = float(data["end"].max())
    sources = source_order(df)
    extra = iter(EXTRA_COLORS * 4)
    colors = {s: PALETTE.get(s) or next(extra) for s in sources}
    teachers = df["teacher"].unique(maintain_order=True).to_list()
    present = set(df.select("teacher", "source").unique().iter_rows())
    params: list[alt.Parameter] = []
    if controls:
        datasets = sorted(data["dataset"].drop_nulls().unique().to_list())
        params = [
            alt.param(name="dataset", value="all",
                      bind=alt.binding_select(options=["all", *datasets], name="Dataset ")),
            alt.param(name="min_tokens", value=0,
                      bind=alt.binding_range(min=0, max=top, step=width, name="Min tokens ")),
            alt.param(name="max_tokens", value=top, bind=alt.binding_range(min=0, max=top, step=width,
                                                                            name="Max tokens ")),
            alt.param(name="include_flagged", value=include_flagged,
                      bind=alt.binding_checkbox(name="Include flagged ")),
        ]
    x_title = f"Reasoning tokens (last bin holds all ≥ {top - width:,.0f})"
    rows = []
    for teacher in teachers:
        panels = []
        for source in sources:
            label = SOURCE_LABELS.get(source, source)
            title = (f"{teacher} · {label}" if len(teachers) > 1 else label) + (
                "" if (teacher, source) in present else " (none)")  # an empty panel keeps the columns aligned
            panel = alt.Chart(title=title).transform_filter(
                (alt.datum.teacher == teacher) & (alt.datum.source == source))
            if controls:
                panel = panel.transform_filter(
                    "(dataset == 'all' || datum.dataset == dataset) && datum.end > min_tokens"
                    " && datum.start < max_tokens && (include_flagged || !datum.flagged)")
            panels.append(panel.mark_bar(color=colors[source]).encode(
                x=alt.X("start:Q", bin="binned", title=x_title, scale=alt.Scale(domain=[0, top])),
                x2="end:Q",
                y=alt.Y("sum(count):Q", title="Traces"),
                tooltip=[alt.Tooltip("teacher:N"), alt.Tooltip("source_label:N", title="source"),
                         alt.Tooltip("start:Q", format=",.0f", title="from"),
                         alt.Tooltip("end:Q", format=",.0f", title="to"),
                         alt.Tooltip("sum(count):Q", format=",", title="traces")],
            ).properties(width=200, height=140))
        rows.append(alt.hconcat(*panels))
    chart = alt.vconcat(*rows, data=alt.Data(values=data.to_dicts()))
    return chart.add_params(*params) if params else chart
