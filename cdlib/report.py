"""The report: every table and figure a grid's outputs allow, on one self-contained page.

:func:`build_report` reads a grid (:mod:`cdlib.results`, :func:`read_frames`), computes its
tables (:mod:`cdlib.tables`, :mod:`cdlib.accounting`) and charts (:mod:`cdlib.figures`) and
writes them with :class:`cdlib.page.ReportPage`, one function per section (:data:`SECTIONS`).
:func:`paper_tables` regenerates Tables 2 to 11 from the published numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import polars as pl

from cdlib import figures, results, student_runs, tables
from cdlib.accounting import grid_compute
from cdlib.page import ReportPage, write_table
from cdlib.tables import RUN_KEYS, TABLE_DIGITS, overall_rows, paper_sort


def paper_tables(out_dir: str | Path) -> dict[int, list[Path]]:
    """Regenerate Tables 2 to 11 from the published numbers; write ``tableN.md``/``.tex`` into ``out_dir``."""
    from cdlib import paper

    made = tables.tables(paper.runs(), paper.compression(), paper.generation(), paper.judge())
    return {n: write_table(df, Path(out_dir) / f"table{n}", TABLE_DIGITS.get(n, 3),
                           caption=f"Table {n} ({paper.TITLE})")
            for n, df in made.items()}


# The protocol options a grid may deviate on: (stage kind, param, the paper's value, what it governs).
PROTOCOL = [
    ("compress", "prompt", "reconstructed", "compression prompt (the paper's is unprinted: ours is a reconstruction)"),
    ("compress", "recompress_attempts", 0, "retries of flagged compressions (paper: one pass)"),
    ("compress", "drop_flagged", False, "flagged compressions left out of training and Tables 2/5"),
    ("truncate", "drop_flagged", False, "length-mismatched truncations left out of training"),
    ("train", "answer_only_think", "none", "answer-only target: whole think block removed (paper) or kept empty"),
    ("train", "chat_template_kwargs", {}, "the student's template as it is (paper, H.3); {enable_thinking: false} on "
     "Qwen answer-only runs is the non-thinking option"),
    ("train", "overlong", "drop", "samples longer than seq_len: dropped as Axolotl does (paper), cut, or an error"),
    ("evaluate", "grouping", "paper", "Table 7 groups: the n the paper's ± imply, or cdlib.datasets' groups"),
    ("judge", "exclude_datasets", ["mmlu_stem", "mmlu_medical"], "datasets left out of Table 10"),
]


def protocol(g: results.GridOutputs) -> pl.DataFrame:
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
    ov = overall_rows(runs)
    if "budget" not in ov.columns or ov["budget"].null_count() == ov.height:
        return "How training length was set is not recorded (no params.yaml in the train cells)."
    counts = ov.group_by(pl.col("budget").fill_null("not recorded")).len().sort("budget")
    return "Training length per run: " + "; ".join(f"{r['len']} run(s) {r['budget']}" for r in counts.to_dicts()) + "."


def _scored(runs: pl.DataFrame | None) -> pl.DataFrame | None:
    """Runs that have an evaluation (accuracy on the overall row)."""
    if runs is None:
        return None
    keys = overall_rows(runs).filter(pl.col("accuracy").is_not_null()).select(RUN_KEYS)
    df = runs.join(keys, on=RUN_KEYS, how="semi")
    return df if not df.is_empty() else None


@dataclass
class Frames:
    """Everything the report draws from one grid, each None when the grid has nothing for it."""

    g: results.GridOutputs
    generation: pl.DataFrame | None = None
    every_compression: pl.DataFrame | None = None  # flagged compressions included
    compression: pl.DataFrame | None = None  # what training used (Tables 2, 5, Figure 1)
    lengths: pl.DataFrame | None = None
    runs: pl.DataFrame | None = None
    scored: pl.DataFrame | None = None  # runs with an evaluation
    losses: pl.DataFrame | None = None
    judged: pl.DataFrame | None = None
    modes: pl.DataFrame | None = None
    compute: tuple[pl.DataFrame, pl.DataFrame] | None = None
    energy: dict[str, float] = dc_field(default_factory=dict)  # gpu_watts, pue, kg_co2_per_kwh


def read_frames(g: results.GridOutputs, gpu_watts: float = 700.0, pue: float = 1.15,
                kg_co2_per_kwh: float = 0.079) -> Frames:
    """Read every layout of :mod:`cdlib.results` and :mod:`cdlib.student_runs` from ``g``; one that cannot be
    read is None, with a note."""
    def load(what: str, fn):
        try:
            return fn(g)
        except Exception as e:
            g.notes.append(f"{what} not read: {type(e).__name__}: {e}")
            return None

    f = Frames(g, energy={"gpu_watts": gpu_watts, "pue": pue, "kg_co2_per_kwh": kg_co2_per_kwh})
    f.generation = load("generation traces", results.grid_generation)
    f.every_compression = load("compressions", lambda grid: results.grid_compression(grid, include_flagged=True))
    f.compression = f.every_compression.filter(~pl.col("drop")) if f.every_compression is not None else None
    f.lengths = load("trace lengths", lambda grid: results.grid_trace_lengths(grid, f.every_compression))
    f.runs = load("runs", student_runs.grid_runs)
    f.losses = load("loss curves", student_runs.grid_losses)
    f.judged = load("judgements", results.grid_judge)
    f.modes = load("failure modes", results.failure_modes)
    f.compute = load("compute", lambda grid: grid_compute(grid, gpu_watts, pue, kg_co2_per_kwh))
    f.scored = load("evaluated runs", lambda grid: _scored(f.runs))
    return f


def _findings(page: ReportPage, f: Frames) -> None:
    from cdlib import findings, paper

    page.section("findings", "Findings: the papers' claims on this grid",
                 "Each headline claim of Compress-Distill, Distilling the Essence and Mixed-Policy Distillation, the "
                 "paper's figure beside this grid's, and whether it holds (cdlib.findings).")
    if not page.needs(f.scored, "No evaluated runs: no claim can be checked."):
        return
    page.table("findings", lambda: findings.findings(f.scored, paper.runs()), "The papers' findings, held or not",
               "One row per claim: held or not on this grid; grid: this grid's figure per configuration (teacher, "
               "student, method, with the seed on a seed grid); papers_figure: the paper's words; published: the same "
               "measure on the paper's own runs (Tables 6, 7, 9), where its tables allow. A claim holds when it holds "
               f"in every configuration; a win is a gap of more than {findings.Z} standard errors of the difference; a "
               "ratio is judged against the weakest end of the paper's range, within 5%. 'why' says in one sentence "
               "what failed.", 3)
    page.table("students", lambda: findings.students(f.scored), "Every student beside the base it starts from",
               "Overall accuracy ± SE, mean output tokens, share of answers that hit the token cap, training tokens "
               "and hours per run; source 'pretrain' is the base model before distillation (the demo's pretrained "
               "toy base), evaluated as it is.",
               {"accuracy": 3, "se": 3, "mean_completion_tokens": 1, "truncation_rate": 3, "train_tokens": 0,
                "train_hours": 4})


def _overview(page: ReportPage, f: Frames) -> None:
    page.section("overview", "Overview", "What this grid holds: finished cells per stage, and what the report had to "
                                         "skip.")
    kinds = pl.DataFrame([{"stage": c.stage, "kind": c.kind or "?"} for c in f.g.cells.values()],
                         schema={"stage": pl.String, "kind": pl.String})
    page.table("cells", lambda: kinds.group_by("stage", "kind").len("cells").sort("stage"), "Finished cells per stage",
               "One row per stage of the grid file; 'kind' is the stage notebook that made its cells.", 0)
    for n in f.g.notes:
        page.note(n)
    page.table("protocol", lambda: protocol(f.g), "Protocol: the paper's options and this grid's",
               "Each option the paper's protocol fixes, the value(s) this grid's cells used, the paper's value and "
               "whether the tables below follow a deviation. Definitions: Table 5's ρ = mean compressed / mean "
               "original characters; Table 7's ± = 1.96 × SE (a 95% interval, column _ci95) beside the SE; Table 7's "
               "groups per the evaluate stage's grouping; Overall over every record; Table 10 over the judged "
               "datasets; Tables 6 and 11's tokens = supervised tokens of every source row, validation split "
               "included, one pass (App. H.4); upstream GPU-hours = the Qwen teacher's pass and its two compressions "
               "(App. H.4).", 0)


def _generation(page: ReportPage, f: Frames) -> None:
    page.section("generation", "Stage 1: teacher traces", "Rejection sampling kept only verified-correct traces "
                                                          "(paper 3.1, App. A).")
    if page.needs(f.generation, "No generate cells with traces.jsonl: Table 4 skipped."):
        page.table("table4", lambda: tables.table4(f.generation), "Table 4: kept traces per dataset",
                   "Correct traces kept per teacher and dataset, their mean reasoning length (characters) and mean "
                   "completion tokens.",
                   TABLE_DIGITS[4])
    if page.needs(f.lengths, "No token counts of compressed or truncated traces: Figure 2 skipped."):
        page.figure("fig2_reasoning_lengths", lambda: figures.fig2_reasoning_lengths(f.lengths),
                    "Figure 2: reasoning-token distributions",
                    "Reasoning tokens per trace, raw vs each compressor (and truncated), counted with the "
                    "compressor's tokenizer.")


def _compression(page: ReportPage, f: Frames) -> None:
    page.section("compression", "Stage 2: compression", "How much each compressor shortens the traces (paper 3.2, "
                                                        "App. B).")
    if not page.needs(f.compression, "No compress cells with compressed.jsonl: Tables 2, 5 and Figure 1 skipped."):
        return
    every, kept = f.every_compression, f.compression
    rewrites = [c.id for c in f.g.of("compress") if f.g.rewrites_student(c)]
    if rewrites:
        page.note(f"Left out of Tables 2, 5 and Figures 1, 2: {', '.join(rewrites)} rewrote student trajectories "
                  f"(Mixed-Policy Distillation), not teacher traces.")
    n_flagged = every["flag"].is_not_null().sum()
    n_failed = (every["flag"].cast(pl.String) == "error").sum()
    if n_failed:
        page.note(f"{n_failed} compression request(s) ended in a permanent engine error: those questions are left "
                  f"out of these numbers and of every source that names the cell in same_questions_as "
                  f"(column failed of Tables 2 and 5).")
    if every.height - n_failed > kept.height:
        page.note(f"{every.height - n_failed - kept.height} flagged compression(s) (empty, answer-dropping, longer "
                  "than the original, ...) are left out of these numbers, as they are out of training (drop_flagged: "
                  "a deviation from the paper, which keeps every compression).")
    elif n_flagged - n_failed:
        page.note(f"{n_flagged - n_failed} flagged compression(s) are kept in these numbers and in training, as the "
                  "paper keeps every compression; the flag rates are reported beside Table 5.")
    page.table("table2", lambda: tables.table2(every), "Table 2: compression per teacher and compressor",
               "Mean compressed length (characters) and ρ = mean compressed / mean original characters; lower is more "
               "aggressive.",
               {"mean_compressed_chars": 0, "rho": 3})
    page.table("table5", lambda: tables.table5(every), "Table 5: compression per dataset",
               "Per dataset: mean compressed characters, compressed tokens and ρ for each compressor, with Overall "
               "rows.",
               lambda df: {c: 0 for c in df.columns if c.endswith(("_chars", "_tokens"))})
    page.table("flag_rates", lambda: tables.flag_rates(every), "Answer-preservation flags beside Table 5",
               "Per dataset and compressor: compressions checked, flagged (empty, degenerate, longer than the "
               "original, dropping or contradicting the verified answer), the flag rate, how many were dropped "
               "from training, and the count per flag. The paper runs no such check (its future work, section 7).",
               {"n": 0, "flagged": 0, "dropped": 0, "flag_rate": 3})
    page.figure("fig1_compression_by_domain", lambda: figures.fig1_compression_by_domain(kept),
                "Figure 1: compression ratio by domain", "Ratio of mean lengths per domain, one panel per teacher "
                                                         "(lower = shorter traces).")


def _runs_table(runs: pl.DataFrame) -> pl.DataFrame:
    """One row per run: budget, tokens, losses, accuracy and cells; neighbouring methods add their columns."""
    neighbours = [] if "neighbour" not in runs.columns or runs["neighbour"].null_count() == runs.height else [
        "objective", "kept_fraction", "kept_token_fraction", "loss_on", "train_flops", "peak_memory_gb"]
    columns = RUN_KEYS + ["budget", "train_tokens", "train_hours", "final_train_loss", "final_val_loss",
                          *neighbours, "accuracy", "n", "train_cell", "eval_cell"]
    return paper_sort(overall_rows(runs).select([c for c in columns if c in runs.columns]), RUN_KEYS)


def _training(page: ReportPage, f: Frames) -> None:
    page.section("training", "Stage 4: student training", "What each student was trained on, for how long, and how "
                                                          "the loss fell (paper 4, App. C).")
    runs = f.runs
    if page.needs(runs, "No train or evaluate cells: Tables 3, 6-9, 11 and Figures 3, 4 skipped."):
        try:
            page.note(_training_modes(runs))
        except ValueError as e:
            page.note(f"Training modes not read: {e}")
        page.table("runs", lambda: _runs_table(runs),
                   "Runs", "One row per student run: training budget (epoch-based or compute-matched), trainable "
                           "tokens, final losses and overall accuracy, with the cells that produced them; runs of "
                           "neighbouring methods (Distilling the Essence, Mixed-Policy Distillation) add their "
                           "objective, kept fraction, supervised sections, training FLOPs and peak memory "
                           "(GB).", {"train_tokens": 0, "n": 0, "train_flops": 0, "peak_memory_gb": 2})
        timed = "train_hours" in runs.columns and runs["train_hours"].null_count() < runs.height
        if page.needs(runs if timed else None, "No train cells: Table 6 skipped."):
            page.table("table6", lambda: tables.table6(runs), "Table 6: training time, speedup and tokens",
                       "Wall-clock hours per run, speedup over the raw-trace run of the same student and method, "
                       "trainable tokens (millions).",
                       TABLE_DIGITS[6])
    if page.needs(f.losses, "No loss.jsonl in the train cells: Figure 3 skipped."):
        page.figure("fig3_loss_curves", lambda: figures.fig3_loss_curves(f.losses), "Figure 3: training loss",
                    "Per-step training loss (faint) and its EMA (bold) per run; colour = source, dash = method.")


def _accuracy(page: ReportPage, f: Frames) -> None:
    page.section("accuracy", "Stage 5: accuracy", "Greedy evaluation of every student on the held-out sets (paper 5, "
                                                  "App. D, E).")
    scored = f.scored
    if page.needs(scored, "No evaluated runs (evaluate cells with an accuracy): Tables 3, 7, 8 and Figure 4 skipped."):
        page.table("table3", lambda: tables.table3(scored), "Table 3: overall accuracy",
                   "Overall accuracy per run of the raw and compressed-trace sources.", TABLE_DIGITS[3])
        page.table("table7", lambda: tables.table7(scored), "Table 7: accuracy per group",
                   "Accuracy per report group with its standard error (_se) and the paper's ± (_ci95 = 1.96 × SE, "
                   "a 95% interval half-width), one row per run.",
                   TABLE_DIGITS[7])
        truncated = scored.filter(pl.col("source") == "truncated")
        if page.needs(None if truncated.is_empty() else truncated,
                      "No runs on truncated traces: Table 8 (truncation ablation) skipped."):
            page.table("table8", lambda: tables.table8(scored), "Table 8: truncated vs compressed",
                       "Overall accuracy of length-matched truncated traces beside the compressed ones, same student "
                       "and method.",
                       TABLE_DIGITS[8])
        has_tokens = ("median_reasoning_tokens" in scored.columns
                      and scored["median_reasoning_tokens"].null_count() < scored.height)
        x = "median_reasoning_tokens" if has_tokens else "median_reasoning_chars"
        page.figure("fig4_accuracy_vs_length", lambda: figures.fig4_accuracy_vs_length(scored, x=x),
                    "Figure 4: accuracy vs reasoning length",
                    f"Overall accuracy against the {x.replace('_', ' ')} of each run's outputs (log scale; bars: "
                    "inter-quartile range).")
    if f.runs is not None and "dte" in f.runs.columns and f.runs["dte"].any():
        dte = scored.filter(pl.col("dte")) if scored is not None else None
        if page.needs(dte if dte is not None and dte.height else None,
                      "Distilling-the-Essence runs are trained but not evaluated: the kept-fraction figure is "
                      "skipped."):
            page.figure("fig_dte_kept_fraction", lambda: figures.fig_dte_kept_fraction(scored),
                        "Distilling the Essence: accuracy vs kept fraction",
                        "Overall accuracy of runs trained on the first X% of each example's tokens (whole sequence or "
                        "reasoning span only) and of section-mask runs, beside the uncut run on the same data; right: "
                        "the same runs against training FLOPs (compute-quality trade-off).")


def _qwen_answer_only(runs: pl.DataFrame) -> bool:
    """Whether ``runs`` holds an answer-only run of a Qwen student (the template whose prompt opens a think block)."""
    return not runs.filter((pl.col("source") == "answer_only")
                           & pl.col("student").str.to_lowercase().str.contains("qwen")).is_empty()


def _efficiency(page: ReportPage, f: Frames) -> None:
    page.section("efficiency", "Inference efficiency", "How long the students' answers are and what accuracy each "
                                                       "token buys (paper 5.4, App. F).")
    if page.needs(f.scored, "No evaluated runs: Table 9 and the Pareto plot skipped."):
        page.table("table9", lambda: tables.table9(f.scored), "Table 9: inference efficiency",
                   "Mean completion tokens (all, and excluding outputs cut at the cap), truncation rate, median "
                   "reasoning characters, accuracy per 1k tokens.",
                   TABLE_DIGITS[9])
        if _qwen_answer_only(f.scored):
            page.note("Qwen answer-only runs trained and evaluated with the template as it is (the paper's protocol, "
                      "H.3 and section 4) hitting the token cap is expected: the generation prompt opens a think "
                      "block, and the paper's own Qwen answer-only Full runs hit the 8,192-token cap on 99.9% of "
                      "records (Table 9). The non-thinking template is an option (x-non-thinking-answer-only in "
                      "params/paper.yaml), off in paper mode.")
        page.figure("pareto", lambda: figures.pareto(f.scored), "Accuracy vs completion length (Pareto)",
                    "Every run's overall accuracy against its mean completion tokens; the dashed line joins the runs "
                    "no other run beats on both.")


def _faithfulness(page: ReportPage, f: Frames) -> None:
    page.section("faithfulness", "Stage 6: faithfulness", "An LLM judge (or the toy world's rule) checks each "
                                                          "compression against its raw trace (App. G).")
    if page.needs(f.judged, "No judge cells with judgements.jsonl: Table 10 skipped."):
        page.table("table10", lambda: tables.table10(f.judged), "Table 10: judged faithfulness",
                   "Per dataset and compressor: judged traces, mean faithfulness (1-5), % judged faithful, % reaching "
                   "the canonical answer.",
                   TABLE_DIGITS[10])
    if f.modes is not None:
        page.table("failure_modes", lambda: f.modes, "Judge failure modes",
                   "How often the judge named each failure mode, per teacher and compressor (a trace can have "
                   "several).",
                   {"count": 0, "pct_of_judged": 1})


def _table11(runs: pl.DataFrame) -> pl.DataFrame:
    """Table 11 with each run's training budget."""
    if "budget" not in runs.columns:
        return tables.table11(runs)
    budgets = overall_rows(runs).select(RUN_KEYS + ["budget"])
    return paper_sort(tables.table11(runs).join(budgets, on=RUN_KEYS, how="left"), RUN_KEYS)


def _compute(page: ReportPage, f: Frames) -> None:
    page.section("compute", "Compute and energy", "GPU-hours per run and stage, and the energy and emissions they "
                                                  "imply (App. H.4, H.5).")
    if f.runs is not None and "train_hours" in f.runs.columns:
        page.table("table11", lambda: _table11(f.runs),
                   "Table 11: compute per run", "GPUs, wall-clock hours, GPU-hours and trainable tokens (millions) "
                                                "per student run, with its training budget.", TABLE_DIGITS[11])
    if not page.needs(f.compute, "No cell manifests: compute accounting skipped."):
        return
    stages, quantities = f.compute
    e = f.energy
    page.table("compute_stages", lambda: stages, "GPU-hours per stage",
               "Every finished cell's GPU-hours (from its manifest) per stage; energy = GPU-hours × "
               f"{e['gpu_watts']:g} W × PUE {e['pue']:g}, emissions = energy × {e['kg_co2_per_kwh'] * 1000:g} "
               "gCO2eq/kWh.", {"cells": 0})
    page.table("compute", lambda: quantities, "Appendix H.4/H.5 totals",
               "The paper's accounting (App. H.4, H.5): total = student training + upstream, where upstream is "
               "the teacher pass and the two compressions of the Qwen teacher only (every teacher when the grid "
               "has no Qwen teacher); other_upstream_gpu_hours holds the other teachers' passes, outside the total; "
               "all_cells_* adds them and the evaluation and judge cells.", 3)


def _published(page: ReportPage, f: Frames, side: bool) -> dict[str, list[Path]]:
    page.section("published", "Side by side with the paper", "This grid's numbers beside the published ones, wherever "
                                                             "the grid uses the paper's names.")
    if not side:
        page.note("Side-by-side comparisons turned off (side_by_side: false).")
        return {}
    try:
        pairs = tables.grid_side_by_side(f.scored, f.compression, f.generation, f.judged,
                                         f.compute[1] if f.compute else None)
    except Exception as e:
        pairs = {}
        page.note(f"Side-by-side not made: {type(e).__name__}: {e}")
    if not pairs:
        page.note("No table of this grid uses the paper's names for teachers, students, sources, compressors or "
                  "datasets (e.g. the toy world), so there is nothing to compare.")
    compared: dict[str, list[Path]] = {}
    for name, df in pairs.items():
        label = {"compute": "Appendix H.4/H.5"}.get(name, name.replace("table", "Table "))
        page.table(name, lambda df=df: df, f"{label}: ours vs published",
                   f"{df.height} value(s) of this grid beside the paper's; diff = ours − paper.", 3,
                   folder="side_by_side", details=True)
        compared[name] = page.tables[f"side_by_side/{name}"]
    if pairs.get("table2") is not None:
        page.figure("fig1_beside_paper", lambda: figures.fig1_beside_paper(f.compression),
                    "Figure 1: this grid beside the paper", "Compression ratio by domain, this grid's panels beside "
                    "the paper's for the same teacher and compressor (Tables 4 and 5).")
    if pairs.get("table9") is not None:
        page.figure("fig4_beside_paper", lambda: figures.fig4_beside_paper(f.scored),
                    "Figure 4: this grid beside the paper", "Overall accuracy against median reasoning characters "
                    "(log), this grid's runs beside the paper's same runs (Tables 7 and 9; the paper gives no "
                    "per-run token medians, so characters).")
    return compared


SECTIONS = (_findings, _overview, _generation, _compression, _training, _accuracy, _efficiency, _faithfulness, _compute)


def build_report(grid_dir: str | Path, out_dir: str | Path, params: Any = None) -> dict[str, Any]:
    """Regenerate every table and figure a grid's outputs allow, and write ``out_dir/index.html``.

    Reads ``grid_dir`` (``outputs/<grid>``): results.parquet and the cell directories
    (:func:`cdlib.results.read_grid`). Writes ``tables/`` (Markdown + LaTeX: Tables 2-11, ``runs``,
    ``failure_modes``, ``compute_stages``, ``compute``), ``figures/`` (PNG, SVG, interactive
    HTML: Figures 1-4 and ``pareto``), ``side_by_side/`` (the grid's numbers beside the
    published ones, when ``params.side_by_side`` and the grid uses the paper's names) and
    ``index.html``, one self-contained page with every table and figure. A grid with
    Distilling-the-Essence runs also gets ``fig_dte_kept_fraction``; neighbouring
    methods' runs are labelled by :func:`cdlib.student_runs.neighbour_label` (``dte-0.5``, ``mpd``) unless
    the grid names their source, and so appear beside the other sources on the Pareto plot. ``params`` is a
    :class:`cdlib.params.ReportParams` (or None for the paper's defaults); its ``pue``,
    ``grid_kg_co2_per_kwh`` and ``gpu_watts`` drive the energy accounting. A missing input
    skips what needs it, with a note on the page; nothing here raises for a partial grid.

    Returns ``{"index", "tables", "figures", "side_by_side", "notes"}`` (paths and notes).
    """
    g = results.read_grid(grid_dir)
    f = read_frames(g, getattr(params, "gpu_watts", 700.0), getattr(params, "pue", 1.15),
                    getattr(params, "grid_kg_co2_per_kwh", 0.079))
    page = ReportPage(out_dir)
    for section in SECTIONS:
        section(page, f)
    compared = _published(page, f, getattr(params, "side_by_side", True))
    index = _write_page(page, Path(grid_dir), len(g.cells), len(compared))
    return {"index": index,
            "tables": {k.split("/", 1)[1]: v for k, v in page.tables.items() if k.startswith("tables/")},
            "figures": page.figures, "side_by_side": compared, "notes": page.notes}


def _write_page(page: ReportPage, grid_dir: Path, n_cells: int, n_compared: int) -> Path:
    import datetime as dt
    import html

    grid_name = grid_dir.resolve().name
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    subtitle = [f"Grid <b>{html.escape(grid_name)}</b> · {n_cells} finished cells · built {html.escape(now)}",
                f"Source: <code>{html.escape(str(grid_dir))}</code> · "
                f"{len([k for k in page.tables if k.startswith('tables/')])} tables, {len(page.figures)} figures"
                + (f", {n_compared} side-by-side comparisons" if n_compared else "")]
    return page.write(f"Compress-Distill report: {grid_name}", subtitle)
