"""The report and 00_explore's Figure 2 at the paper grid's size: every figure drawn, the page a sane size.

A synthetic grid in the layout :func:`cdlib.results.read_grid` reads, written directly
(no stage runs, short texts): the 55 train and evaluate cells that ``params/paper.yaml``
expands to, its 2 generate, 4 compress, 1 truncate and 4 judge cells, traces split over
the paper's datasets in Table 4's proportions (283,335 per teacher at full size) and one
loss record per optimizer step. The default tier builds it with fewer traces but still
more rows than altair embeds (5,000) in every layout, and 55 runs of thousands of steps;
the full-size grid is ``slow``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import altair as alt
import polars as pl
import pytest
import yaml

from cdlib import datasets, explore, figures, grid, outputs, paper, report, results, student_runs, tables

REPO = Path(__file__).resolve().parents[1]
PAPER_TRACES = 283_335  # Qwen3.5-397B-A17B's verified-correct traces (paper 4.1, Table 4)
ALTAIR_MAX_ROWS = 5000  # altair's default data transformer refuses bigger inline data sets
FAILED = ("not drawn", "not made", "not read")  # what build_report writes when a figure or table fails
GROUP_OF = {name: spec.group for name, spec in datasets.REGISTRY.items()}
DOMAIN_OF = {name: spec.domain for name, spec in datasets.REGISTRY.items()}


def _write_ndjson(path: Path, df: pl.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_ndjson(path)


def _done(d: Path, axes: dict, params: dict, metrics: dict, gpus: int = 0, hours: float = 0.1) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=True))
    outputs.write_metrics(d, metrics)
    (d / "manifest.json").write_text(json.dumps({
        "status": "done", "axes": axes, "device": "NVIDIA H100 (synthetic)", "gpus": gpus,
        "wall_clock_s": hours * 3600, "gpu_hours": hours * gpus}))


def _dataset_counts(total: int) -> dict[str, int]:
    """Traces per training dataset in Table 4's proportions (Qwen teacher), summing to ``total``."""
    t4 = paper.generation().filter(pl.col("teacher") == paper.TEACHERS[0])
    slug = {tables._canon(n): n for n in datasets.REGISTRY}
    shares = {slug[tables._canon(d)]: n for d, n in zip(t4["dataset"], t4["n"]) if tables._canon(d) in slug}
    scale = total / sum(shares.values())
    counts = {d: max(1, round(n * scale)) for d, n in shares.items()}
    biggest = max(counts, key=counts.get)
    counts[biggest] += total - sum(counts.values())
    return counts


def _traces(counts: dict[str, int], seed: int) -> pl.DataFrame:
    """Per-trace lengths drawn log-normally around a per-dataset median (tokens), ids unique per dataset."""
    parts = [pl.DataFrame({"id": pl.int_range(0, n, eager=True).cast(pl.String).str.pad_start(7, "0"),
                           "dataset": [name] * n, "u": [seed * 100 + i] * n}).with_columns(
        id=pl.lit(f"{name}-") + pl.col("id")) for i, (name, n) in enumerate(counts.items())]
    df = pl.concat(parts).with_row_index("row")
    rng = pl.col("row").cast(pl.Float64)
    # cheap deterministic noise: fractional parts of multiples of irrational numbers
    z = ((rng * 0.6180339887 + pl.col("u") * 0.414).mod(1.0) - 0.5) * 3.0
    z2 = ((rng * 0.7548776662 + pl.col("u") * 0.302).mod(1.0))
    return df.with_columns(
        domain=pl.col("dataset").replace_strict(DOMAIN_OF), group=pl.col("dataset").replace_strict(GROUP_OF),
        original_tokens=(1200 * z.exp()).round().cast(pl.Int64) + 40,
        keep=0.08 + 0.2 * z2,
    ).drop("row", "u")


def build_paper_grid(root: Path, traces_per_teacher: int = PAPER_TRACES, steps: int = 2000) -> Path:
    """Write every finished cell of params/paper.yaml under ``root`` (see the module docstring); return the grid dir."""
    spec = yaml.safe_load((REPO / "params/paper.yaml").read_text())
    spec["output_root"] = str(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "paper.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    g = grid.Grid(path, root=REPO)
    counts = _dataset_counts(traces_per_teacher)
    published = paper.runs()
    teachers: dict[str, pl.DataFrame] = {}
    for n, cell in enumerate(g.cells):
        d, axes, stage = Path(cell.params["out_dir"]), cell.axes, cell.stage
        params = {k: v for k, v in cell.params.items() if k in ("out_dir", "traces", "compressed", "data", "model",
                                                                 "method", "source", "student", "epochs")}
        if stage == "generate":
            t = _traces(counts, seed=n)
            teachers[axes["teacher"]] = t
            _write_ndjson(d / "traces.jsonl", t.select(
                "id", "dataset", "domain", "group", question=pl.lit("Q?"), gold=pl.lit("A"),
                reasoning=pl.lit("step ").repeat_by(1 + pl.col("original_tokens") % 7).list.join(""),
                answer=pl.lit("A"), completion_tokens=pl.col("original_tokens") + 30))
            _done(d, axes, params, {"total_correct": t.height}, gpus=8, hours=43.5)
        elif stage == "compress":
            t = teachers[axes["teacher"]]
            shrink = 1.0 if axes["compressor"] == "llama70b" else 0.8
            c = t.with_columns(compressed_tokens=(pl.col("original_tokens") * pl.col("keep") * shrink).round()
                               .cast(pl.Int64) + 5, flag=pl.when(pl.col("keep") < 0.0805).then(pl.lit("empty")))
            _write_ndjson(d / "compressed.jsonl", c.select(
                "id", "dataset", "domain", "flag", original_chars=pl.col("original_tokens") * 4,
                compressed_chars=pl.col("compressed_tokens") * 4, reasoning=pl.lit("short.")))
            _write_ndjson(d / "tokens.jsonl", c.select("id", "original_tokens", "compressed_tokens"))
            _done(d, axes, params, {"rho": float(c["keep"].mean() * shrink)}, gpus=8, hours=5.0)
        elif stage == "truncate":
            t = teachers[axes["teacher"]]
            _write_ndjson(d / "truncated.jsonl", t.select(
                "id", truncated_tokens=(pl.col("original_tokens") * pl.col("keep") * 0.8).round().cast(pl.Int64) + 5))
            _done(d, axes, params, {"kept_fraction": 0.15})
        elif stage == "judge":
            t = teachers[axes["teacher"]].with_row_index("i")
            _write_ndjson(d / "judgements.jsonl", t.select(
                "id", "dataset", "domain", faithfulness=5 - (pl.col("i") % 50 == 0).cast(pl.Int64),
                verdict=pl.when(pl.col("i") % 50 == 0).then(pl.lit("unfaithful")).otherwise(pl.lit("faithful")),
                answer_alignment=pl.col("i") % 40 != 0, parse_error=pl.lit(None, dtype=pl.String)))
            _done(d, axes, params, {"n": t.height, "parse_failures": 0, "faithfulness": 4.98,
                                    "failure_modes.omission": t.height // 50}, gpus=8, hours=3.0)
        elif stage in ("train", "evaluate"):
            names = {k: tables.paper_name(v, k) or v for k, v in axes.items()}
            row = published.filter(pl.col("teacher") == names["teacher"], pl.col("student") == names["student"],
                                   pl.col("method") == names["method"], pl.col("source") == names["source"])
            overall = row.filter(pl.col("group") == "overall").row(0, named=True)
            if stage == "train":
                rng = random.Random(cell.id)
                floor = 0.4 + 0.2 * rng.random()
                step = pl.int_range(1, steps + 1, eager=True)
                loss = floor + 1.5 * (-step / (steps / 8)).exp() + 0.05 * (step * 12.9898).sin()
                _write_ndjson(d / "loss.jsonl", pl.DataFrame({"id": step.cast(pl.String), "step": step, "loss": loss,
                                                               "ema": loss}))
                _done(d, axes, params, {"train_tokens": overall["train_tokens"], "final_train_loss": floor,
                                        "trainable_tokens": overall["train_tokens"], "epochs": 1.0},
                      gpus=overall["gpus"], hours=overall["train_hours"])
            else:
                groups = {g: {"accuracy": r["accuracy"], "se": r["se"], "n": 500}
                          for g, r in ((dict(zip(results.GROUP_NAMES.values(), results.GROUP_NAMES))[r["group"]], r)
                                       for r in row.iter_rows(named=True)) if g != "Overall"}
                median = overall["median_reasoning_chars"] or 0
                _write_ndjson(d / "outputs.jsonl", pl.DataFrame({"id": ["1"], "text": ["A"], "correct": [True]}))
                _done(d, axes, params, {
                    "n": 3000, "accuracy": overall["accuracy"], "accuracy_se": overall["se"], "groups": groups,
                    "mean_completion_tokens": overall["mean_completion_tokens"],
                    "mean_completion_tokens_excl_trunc": overall["mean_completion_tokens_excl_trunc"],
                    "truncation_rate": overall["truncation_rate"], "median_reasoning_chars": median,
                    "median_reasoning_tokens": median / 4, "reasoning_tokens_q1": median / 6,
                    "reasoning_tokens_q3": median / 3, "acc_per_1k_tokens": overall["acc_per_1k_tokens"]}, gpus=1)
    return root / "paper"


# the last two: the grid uses the paper's names, so its numbers are drawn beside the paper's
FIGURES = {"fig1_compression_by_domain", "fig2_reasoning_lengths", "fig3_loss_curves", "fig4_accuracy_vs_length",
           "pareto", "fig1_beside_paper", "fig4_beside_paper"}
RUNS = 55  # params/paper.yaml: 48 main-grid runs + 7 truncation runs
MAX_PAGE_MB = 4.0  # index.html embeds every figure's SVG; the interactive HTMLs inline Vega (~0.9 MB)


def _embedded_rows(chart) -> int:
    """Rows the chart's spec carries inline (every data set), after altair's own row check."""
    spec = chart.to_dict()
    sets = list(spec.get("datasets", {}).values()) + [spec.get("data", {}).get("values", [])]
    return sum(len(s) for s in sets if isinstance(s, list))


def _check_report(out: dict, grid_dir: Path, steps: int) -> None:
    failed = [n for n in out["notes"] if any(word in n for word in FAILED)]
    assert not failed, failed
    assert set(out["figures"]) == FIGURES
    for name, (png, svg, html) in out["figures"].items():
        assert png.stat().st_size > 5000 and "<svg" in svg.read_text()[:500], name
        assert html.stat().st_size < MAX_PAGE_MB * 2**20, (name, html.stat().st_size)
    assert out["index"].stat().st_size < MAX_PAGE_MB * 2**20, out["index"].stat().st_size
    losses = student_runs.grid_losses(results.read_grid(grid_dir))
    chart = figures.fig3_loss_curves(losses)
    data = chart.data
    assert data.select(tables.RUN_KEYS).drop_nulls().n_unique() == RUNS
    assert data.filter(pl.col("step") == steps).height == RUNS, "every run keeps its last step"
    assert _embedded_rows(chart) <= ALTAIR_MAX_ROWS
    with pytest.raises(alt.MaxRowsError):  # the former budget, 400 steps per run, is past altair's limit here
        figures.fig3_loss_curves(losses, max_points=400, max_rows=10**9).to_dict()
    facet = chart.to_dict()["facet"]  # the grid's slugs in the paper's order: teachers as in Table 1, students by size
    assert facet["row"]["sort"] == ["qwen3.5-397b", "gpt-oss-120b"]
    assert facet["column"]["sort"] == ["qwen3.5-0.8b", "llama-3.1-8b", "qwen3.5-9b", "gpt-oss-20b"]
    assert out["tables"]["runs"][0].read_text().count("\n") == RUNS + 2  # header, rule, one line per run


@pytest.fixture(scope="module")
def small_paper_grid(tmp_path_factory):
    """The paper's 55 runs with 2,000 logged steps each (110,000 loss rows) and 6,000 traces per teacher."""
    return build_paper_grid(tmp_path_factory.mktemp("paper"), traces_per_teacher=6000, steps=2000)


def test_report_draws_every_figure_for_55_runs_of_thousands_of_steps(small_paper_grid, tmp_path):
    out = report.build_report(small_paper_grid, tmp_path / "report")
    _check_report(out, small_paper_grid, steps=2000)


def test_loss_curves_keep_to_a_budget_for_the_whole_chart():
    """Figure 3's rows are bounded over all runs, not per run: 150 runs of 2,000 steps still fit."""
    step = pl.int_range(1, 2001, eager=True)
    sources = ["raw", "answer_only", "truncated", "llama70b", "ministral14b"]
    losses = pl.concat([pl.DataFrame({"teacher": f"t{r % 2}", "student": f"s{r % 4}", "method": f"full (seed={r})",
                                      "source": sources[r % 5], "step": step, "loss": 1 + 1 / step})
                        for r in range(150)])
    chart = figures.fig3_loss_curves(losses)
    assert _embedded_rows(chart) <= ALTAIR_MAX_ROWS
    assert chart.data.group_by("method").len()["len"].min() >= 3, "each run keeps its first, some middle and last steps"
    two = losses.filter(pl.col("method").is_in(["full (seed=0)", "full (seed=1)"]))
    few = figures.fig3_loss_curves(two, max_points=400)
    assert few.data.height > 2 * 300, "a few runs keep up to max_points each"


def _paper_frame(traces_per_teacher: int) -> pl.DataFrame:
    """explore.load's layout for two teachers: raw, two compressors and (Qwen teacher only) truncated."""
    counts = _dataset_counts(traces_per_teacher)
    parts = []
    for k, teacher in enumerate(("qwen3.5-397b", "gpt-oss-120b")):
        t = _traces(counts, seed=k)
        kept = pl.col("original_tokens") * pl.col("keep")
        for source, tokens in (("raw", pl.col("original_tokens")), ("llama70b", kept), ("ministral14b", kept * 0.8),
                               ("truncated", kept * 0.8)):
            if source == "truncated" and k:
                continue
            flag = pl.when((pl.col("keep") < 0.082) & pl.lit(source != "raw")).then(pl.lit("empty"))
            parts.append(t.select("id", "dataset", "original_tokens", tokens=tokens.round().cast(pl.Int64),
                                  teacher=pl.lit(teacher), source=pl.lit(source), flag=flag))
    return pl.concat(parts).with_columns(chars=pl.col("tokens") * 4, original_chars=pl.col("original_tokens") * 4,
                                         rho_tokens=pl.col("tokens") / pl.col("original_tokens"),
                                         rho_chars=pl.col("tokens") / pl.col("original_tokens"))


def test_explore_figure2_on_283k_traces_per_teacher(tmp_path):
    """00_explore's Figure 2 (with its dataset menu, token sliders and flagged switch) on the paper's trace count."""
    df = _paper_frame(PAPER_TRACES)
    assert df.height > 1_900_000
    chart = figures.lengths_chart(df)
    assert _embedded_rows(chart) <= ALTAIR_MAX_ROWS
    assert len(chart.to_json()) < 2**20
    stats = explore.length_stats(explore.filter_traces(df, flagged="exclude"))
    assert stats.filter(pl.col("source") == "raw")["traces"].to_list() == [PAPER_TRACES] * 2


def test_fig_dte_at_55_runs():
    """The Distilling-the-Essence figure with as many runs as the paper grid (kept fractions x spans x students)."""
    rows = [{"teacher": "qwen3.5-397b", "student": s, "method": "full", "source": f"dte-{f}-{span}", "group": "overall",
             "accuracy": 0.4 + 0.3 * f, "kept_fraction": f, "truncate_span": span, "dte": True, "budget": "epoch-based",
             "train_flops": 1e18 * f, "data_source": "raw"}
            for s in ("qwen3.5-0.8b", "llama-3.1-8b", "qwen3.5-9b") for span in ("sequence", "reasoning")
            for f in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]
    rows += [{**rows[0], "student": s, "source": "raw", "kept_fraction": 1.0, "truncate_span": None, "dte": False,
              "accuracy": 0.75} for s in ("qwen3.5-0.8b", "llama-3.1-8b", "qwen3.5-9b")]
    runs = pl.DataFrame(rows[:52] + rows[-3:])
    assert runs.height == RUNS
    chart = figures.fig_dte_kept_fraction(runs)
    assert 0 < _embedded_rows(chart) <= ALTAIR_MAX_ROWS


@pytest.mark.slow
def test_report_and_explore_at_the_full_paper_size(tmp_path):
    """283,335 traces per teacher through every reader (JSONL line by line), 55 runs of 3,000 steps."""
    grid_dir = build_paper_grid(tmp_path / "grid", traces_per_teacher=PAPER_TRACES, steps=3000)
    out = report.build_report(grid_dir, tmp_path / "report")
    _check_report(out, grid_dir, steps=3000)
    cells = {name: str(grid_dir / f"compress/qwen3.5-397b__{name}") for name in ("llama70b", "ministral14b")}
    traces = explore.load({"qwen3.5-397b": str(grid_dir / "generate/qwen3.5-397b")}, cells,
                          {"truncated": str(grid_dir / "truncate/qwen3.5-397b")})
    assert traces.filter(pl.col("source") == "raw").height == PAPER_TRACES
    figures.save_chart(figures.lengths_chart(traces), tmp_path / "fig2_lengths")
