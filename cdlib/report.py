"""The report page: every table and figure a grid's outputs allow, written to one self-contained page.

:func:`build_report` reads a grid (:mod:`cdlib.results`), computes its tables
(:mod:`cdlib.tables`, :mod:`cdlib.accounting`) and charts (:mod:`cdlib.figures`) and writes
them with :class:`ReportPage`, one function per section. :func:`write_table` writes a
table as Markdown and LaTeX; :func:`paper_tables` regenerates Tables 2 to 11 from the
published numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import polars as pl

from cdlib import figures, results, tables
from cdlib.accounting import grid_compute
from cdlib.tables import RUN_KEYS, TABLE_DIGITS, _overall, _sort

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


def paper_tables(out_dir: str | Path) -> dict[int, list[Path]]:
    """Regenerate Tables 2 to 11 from the published numbers; write ``tableN.md``/``.tex`` into ``out_dir``."""
    from cdlib import paper

    made = tables.tables(paper.runs(), paper.compression(), paper.generation(), paper.judge())
    return {n: write_table(df, Path(out_dir) / f"table{n}", TABLE_DIGITS.get(n, 3), caption=f"Table {n} ({paper.TITLE})")
            for n, df in made.items()}


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
            paths = figures.save_chart(make(), self.out / "figures" / name)
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
    g = results.read_grid(grid_dir)
    page = ReportPage(out_dir)

    def load(what: str, fn):
        try:
            return fn(g)
        except Exception as e:
            g.notes.append(f"{what} not read: {type(e).__name__}: {e}")
            return None

    generation = load("generation traces", results.grid_generation)
    every_compression = load("compressions", lambda grid: results.grid_compression(grid, include_flagged=True))
    compression = every_compression.filter(~pl.col("drop")) if every_compression is not None else None
    lengths = load("trace lengths", lambda grid: results.grid_trace_lengths(grid, every_compression))
    runs = load("runs", results.grid_runs)
    losses = load("loss curves", results.grid_losses)
    judged = load("judgements", results.grid_judge)
    modes = load("failure modes", results.failure_modes)
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
        page.table("table4", lambda: tables.table4(generation), "Table 4: kept traces per dataset",
                   "Correct traces kept per teacher and dataset, their mean reasoning length (characters) and mean completion tokens.",
                   TABLE_DIGITS[4])
    if lengths is None:
        page.note("No token counts of compressed or truncated traces: Figure 2 skipped.")
    else:
        page.figure("fig2_reasoning_lengths", lambda: figures.fig2_reasoning_lengths(lengths), "Figure 2: reasoning-token distributions",
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
        page.table("table2", lambda: tables.table2(compression), "Table 2: compression per teacher and compressor",
                   "Mean compressed length (characters) and ρ = mean compressed / mean original characters; lower is more aggressive.",
                   {"mean_compressed_chars": 0, "rho": 3})
        page.table("table5", lambda: tables.table5(compression), "Table 5: compression per dataset",
                   "Per dataset: mean compressed characters, compressed tokens and ρ for each compressor, with Overall rows.",
                   lambda df: {c: 0 for c in df.columns if c.endswith(("_chars", "_tokens"))})
        page.table("flag_rates", lambda: tables.flag_rates(every_compression), "Answer-preservation flags beside Table 5",
                   "Per dataset and compressor: compressions checked, flagged (empty, degenerate, longer than the "
                   "original, dropping or contradicting the verified answer), the flag rate, how many were dropped "
                   "from training, and the count per flag. The paper runs no such check (its future work, section 7).",
                   {"n": 0, "flagged": 0, "dropped": 0, "flag_rate": 3})
        page.figure("fig1_compression_by_domain", lambda: figures.fig1_compression_by_domain(compression),
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
            page.table("table6", lambda: tables.table6(runs), "Table 6: training time, speedup and tokens",
                       "Wall-clock hours per run, speedup over the raw-trace run of the same student and method, trainable tokens (millions).",
                       TABLE_DIGITS[6])
        else:
            page.note("No train cells: Table 6 skipped.")
    if losses is None:
        page.note("No loss.jsonl in the train cells: Figure 3 skipped.")
    else:
        page.figure("fig3_loss_curves", lambda: figures.fig3_loss_curves(losses), "Figure 3: training loss",
                    "Per-step training loss (faint) and its EMA (bold) per run; colour = source, dash = method.")

    page.section("accuracy", "Stage 5: accuracy", "Greedy evaluation of every student on the held-out sets (paper 5, App. D, E).")
    if scored is None:
        page.note("No evaluated runs (evaluate cells with an accuracy): Tables 3, 7, 8 and Figure 4 skipped.")
    else:
        page.table("table3", lambda: tables.table3(scored), "Table 3: overall accuracy", "Overall accuracy per run of the raw and compressed-trace sources.",
                   TABLE_DIGITS[3])
        page.table("table7", lambda: tables.table7(scored), "Table 7: accuracy per group",
                   "Accuracy per report group with its standard error (_se) and the paper's ± (_ci95 = 1.96 × SE, "
                   "a 95% interval half-width), one row per run.",
                   TABLE_DIGITS[7])
        if scored.filter(pl.col("source") == "truncated").is_empty():
            page.note("No runs on truncated traces: Table 8 (truncation ablation) skipped.")
        else:
            page.table("table8", lambda: tables.table8(scored), "Table 8: truncated vs compressed",
                       "Overall accuracy of length-matched truncated traces beside the compressed ones, same student and method.",
                       TABLE_DIGITS[8])
        has_tokens = "median_reasoning_tokens" in scored.columns and scored["median_reasoning_tokens"].null_count() < scored.height
        x = "median_reasoning_tokens" if has_tokens else "median_reasoning_chars"
        page.figure("fig4_accuracy_vs_length", lambda: figures.fig4_accuracy_vs_length(scored, x=x), "Figure 4: accuracy vs reasoning length",
                    f"Overall accuracy against the {x.replace('_', ' ')} of each run's outputs (log scale; bars: inter-quartile range).")
    if runs is not None and "dte" in runs.columns and runs["dte"].any():
        if scored is None or not scored.filter(pl.col("dte")).height:
            page.note("Distilling-the-Essence runs are trained but not evaluated: the kept-fraction figure is skipped.")
        else:
            page.figure("fig_dte_kept_fraction", lambda: figures.fig_dte_kept_fraction(scored),
                        "Distilling the Essence: accuracy vs kept fraction",
                        "Overall accuracy of runs trained on the first X% of each example's tokens (whole sequence or "
                        "reasoning span only) and of section-mask runs, beside the uncut run on the same data; right: "
                        "the same runs against training FLOPs (compute-quality trade-off).")

    page.section("efficiency", "Inference efficiency", "How long the students' answers are and what accuracy each token buys (paper 5.4, App. F).")
    if scored is None:
        page.note("No evaluated runs: Table 9 and the Pareto plot skipped.")
    else:
        page.table("table9", lambda: tables.table9(scored), "Table 9: inference efficiency",
                   "Mean completion tokens (all, and excluding outputs cut at the cap), truncation rate, median reasoning characters, accuracy per 1k tokens.",
                   TABLE_DIGITS[9])
        page.figure("pareto", lambda: figures.pareto(scored), "Accuracy vs completion length (Pareto)",
                    "Every run's overall accuracy against its mean completion tokens; the dashed line joins the runs no other run beats on both.")

    page.section("faithfulness", "Stage 6: faithfulness", "An LLM judge (or the toy world's rule) checks each compression against its raw trace (App. G).")
    if judged is None:
        page.note("No judge cells with judgements.jsonl: Table 10 skipped.")
    else:
        page.table("table10", lambda: tables.table10(judged), "Table 10: judged faithfulness",
                   "Per dataset and compressor: judged traces, mean faithfulness (1-5), % judged faithful, % reaching the canonical answer.",
                   TABLE_DIGITS[10])
    if modes is not None:
        page.table("failure_modes", lambda: modes, "Judge failure modes",
                   "How often the judge named each failure mode, per teacher and compressor (a trace can have several).",
                   {"count": 0, "pct_of_judged": 1})

    page.section("compute", "Compute and energy", "GPU-hours per run and stage, and the energy and emissions they imply (App. H.4, H.5).")
    if runs is not None and "train_hours" in runs.columns:
        page.table("table11", lambda: _sort(tables.table11(runs).join(_overall(runs).select(RUN_KEYS + ["budget"]), on=RUN_KEYS, how="left"),
                                            RUN_KEYS) if "budget" in runs.columns else tables.table11(runs),
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
            pairs = tables.grid_side_by_side(scored, compression, generation, judged, compute[1] if compute else None)
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

