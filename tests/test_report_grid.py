"""cdlib.report.build_report on a small grid built by hand with the real stage functions on the toy world.

The fixture grid uses the paper's names for teachers, students, methods, sources and
compressors (so side-by-side comparisons apply) with toy data underneath: two teachers
(the gpt-oss one without truncation, as in the paper), extractive compression under the
names llama70b/ministral14b, length-matched truncation, the rule judge, hand-written
training logs (full runs compute-matched, LoRA runs epoch-based) and hand-written
evaluation records scored by cdlib.evaluate.summarize.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import polars as pl
import pytest
import yaml

from cdlib import compress, evaluate, figures, generate, grid, judge, outputs, paper, report, tables, toy, truncate
from cdlib.grid import runner
from cdlib.params import ReportParams, ToyParams, validate
from cdlib.store import Store

REPO = Path(__file__).resolve().parents[1]
QWEN, GPTOSS, STUDENT = "Qwen3.5-397B-A17B", "gpt-oss-120B", "Qwen3.5-0.8B"
TOY = {"n_train": 24, "n_test": 16, "slip_rate": 0.3}
# accuracy a hand-written evaluation gets per source (LoRA runs 2 answers fewer)
ACCURACY = {"raw": 0.5, "truncated": 0.25, "llama70b": 0.75, "ministral14b": 0.6875}
TOKENS = {"raw": 900, "truncated": 120, "llama70b": 200, "ministral14b": 150}
TRAIN_HOURS = {"raw": 2.0, "truncated": 0.5, "llama70b": 0.8, "ministral14b": 0.6}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TABLES = {"findings", "students", "cells", "table2", "table3", "table4", "table5", "table6", "table7", "table8",
          "table9", "table10", "table11", "runs", "failure_modes", "compute_stages", "compute", "protocol",
          "flag_rates"}
FIGURES = {"fig1_compression_by_domain", "fig2_reasoning_lengths", "fig3_loss_curves", "fig4_accuracy_vs_length",
           "pareto", "fig1_beside_paper", "fig4_beside_paper"}  # the last two: the fixture grid uses the paper's names


def grid_spec(root: Path) -> dict:
    return {
        "name": "fx",
        "output_root": str(root),
        "axes": {
            "teacher": {QWEN: {"generate": {"sampling": {"temperature": 1.0, "seed": 0}}},
                        GPTOSS: {"generate": {"sampling": {"temperature": 1.0, "seed": 1}}}},
            "compressor": ["llama70b", "ministral14b"],
            "student": [STUDENT],
            "method": {"lora": {"train": {"method": "lora"}},
                       "full": {"train": {"method": "full", "token_budget": 5000}}},
            "source": ["raw", "truncated", "llama70b", "ministral14b"],
        },
        "exclude": [{"teacher": GPTOSS, "source": "truncated"}],
        "stages": {
            "generate": {"notebook": "notebooks/01_generate.py", "axes": ["teacher"],
                         "params": {"rounds": 2, "engine": {"kind": "toy"}, "toy": TOY}},
            "compress": {"notebook": "notebooks/02_compress.py", "axes": ["teacher", "compressor"],
                         "params": {"compressor": "extractive"}, "inputs": {"traces": "generate/{teacher}"}},
            "truncate": {"notebook": "notebooks/03_truncate.py", "axes": ["teacher"],
                         "inputs": {"traces": "generate/{teacher}", "compressed": "compress/{teacher}__ministral14b"}},
            "train": {"notebook": "tests/notebooks/square.py", "axes": ["teacher", "student", "method", "source"],
                      "inputs": {"data": "generate/{teacher}"}},
            "evaluate": {"notebook": "notebooks/05_evaluate.py", "axes": ["teacher", "student", "method", "source"],
                         "params": {"engine": {"kind": "toy"}, "toy": TOY},
                         "inputs": {"model": "train/{teacher}__{student}__{method}__{source}"}},
            "judge": {"notebook": "notebooks/06_judge.py", "axes": ["teacher", "compressor"],
                      "params": {"judge": "rule"}, "inputs": {"compressed": "compress/{teacher}__{compressor}"}},
        },
    }


def write_training(d: Path, axes: dict, params: dict) -> dict:
    """A train cell's loss.jsonl and metrics in the layout of stage 4."""
    rng = random.Random(f"{axes}")
    floor = {"raw": 1.0, "truncated": 1.6, "llama70b": 0.7, "ministral14b": 0.8}[axes["source"]]
    steps, ema, recs = 40, None, []
    for step in range(1, steps + 1):
        loss = floor + 2.0 * math.exp(-step / 8) + rng.uniform(-0.1, 0.1)
        ema = loss if ema is None else 0.08 * loss + 0.92 * ema
        recs.append({"id": str(step), "step": step, "loss": loss, "ema": ema, "tokens": 125 * step})
    Store(d / "loss.jsonl").append(recs)
    hours = TRAIN_HOURS[axes["source"]] * (0.5 if axes["method"] == "lora" else 1.0)
    tokens = params.get("token_budget") or 4000 + 1000 * len(axes["source"])
    cost = {"wall_clock_s": hours * 3600, "gpus": 1, "gpu_hours": hours}
    if axes["method"] == "lora":  # metric names as cdlib.train writes them
        return {"trainable_tokens": tokens, **cost, "train_loss_ema": recs[-1]["ema"],
                "val_loss": recs[-1]["ema"] + 0.05,
                "budget_mode": "epochs", "token_budget": None, "max_steps": None, "epochs": 1.0,
                "student": "Qwen/Qwen3.5-0.8B-Base", "source": axes["source"], "method": "lora", "device": "cpu"}
    return {"train_tokens": tokens, **cost, "final_train_loss": recs[-1]["ema"],
            "final_val_loss": recs[-1]["ema"] + 0.05}


def write_evaluation(d: Path, axes: dict) -> dict:
    """Scored evaluation records written by hand, half Math and half Science, then summarize()."""
    rows = toy.generate(ToyParams(**TOY), split="test")
    n_right = round(ACCURACY[axes["source"]] * len(rows)) - (2 if axes["method"] == "lora" else 0)
    tokens = TOKENS[axes["source"]]
    recs = []
    for i, r in enumerate(rows):
        cut = axes["source"] == "raw" and i % 8 == 7
        reasoning = "step. " * (tokens // 4 + 3 * i)
        recs.append({**r, "group": "Math" if i % 2 == 0 else "Science", "text": reasoning, "reasoning": reasoning,
                     "extracted": r["gold"] if i < n_right else "-1", "rule": "boxed" if not cut else "truncated",
                     "correct": i < n_right, "completion_tokens": 8192 if cut else tokens + 10 * i,
                     "finish_reason": "length" if cut else "stop", "error": None, "reasoning_chars": len(reasoning),
                     "reasoning_tokens": len(reasoning.split())})
    store = Store(d / "outputs.jsonl")
    store.append(recs)
    return evaluate.summarize(store.read())


def build_grid(root: Path) -> tuple[Path, dict]:
    """Write the grid file, run or fake every cell, write manifests and results.parquet."""
    path = root / "fx.yaml"
    path.write_text(yaml.safe_dump(grid_spec(root / "outputs"), sort_keys=False))
    g = grid.Grid(path, root=REPO)
    written: dict[str, dict] = {}
    for cell in g.cells:
        d = Path(cell.params["out_dir"])
        d.mkdir(parents=True, exist_ok=True)
        (d / "params.yaml").write_text(yaml.safe_dump(cell.params, sort_keys=True))
        if cell.stage == "generate":
            m = generate.run(validate("generate", cell.params))
        elif cell.stage == "compress":
            m = compress.run(validate("compress", cell.params))
        elif cell.stage == "truncate":
            m = truncate.run(validate("truncate", cell.params))
        elif cell.stage == "train":
            m = write_training(d, cell.axes, cell.params)
        elif cell.stage == "evaluate":
            m = write_evaluation(d, cell.axes)
        else:
            m = judge.run(validate("judge", cell.params))
        outputs.write_metrics(d, m)
        written[cell.id] = m
        wall = m.get("wall_clock_s", 60.0)
        gpus = 1 if cell.stage in ("generate", "compress", "train") else 0
        manifest = {"cell": cell.id, "stage": cell.stage, "axes": cell.axes, "notebook": str(cell.notebook),
                    "status": "done", "device": "NVIDIA H100 (fixture)", "gpus": gpus, "wall_clock_s": wall,
                    "gpu_hours": wall / 3600 * gpus}
        (d / "manifest.json").write_text(json.dumps(manifest))
    runner.write_results(g)
    # a failed cell the runner left behind: reported in a note, never read
    broken = root / "outputs/fx/evaluate/broken"
    broken.mkdir(parents=True)
    (broken / "manifest.json").write_text(json.dumps({"cell": "evaluate/broken", "status": "failed", "axes": {}}))
    return root / "outputs/fx", written


@pytest.fixture(scope="module")
def fixture_grid(tmp_path_factory):
    return build_grid(tmp_path_factory.mktemp("grid"))


@pytest.fixture(scope="module")
def built(fixture_grid, tmp_path_factory):
    grid_dir, _ = fixture_grid
    out = tmp_path_factory.mktemp("report")
    params = ReportParams(out_dir=str(out), grid_dir=str(grid_dir), pue=1.2, gpu_watts=500, grid_kg_co2_per_kwh=0.1)
    return report.build_report(grid_dir, out, params)


def md_rows(path: Path) -> list[dict[str, str]]:
    lines = path.read_text().strip().splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_fixture_grid_results_parquet_has_the_layout_the_report_reads(fixture_grid):
    grid_dir, _ = fixture_grid
    df = pl.read_parquet(grid_dir / "results.parquet")
    assert {"stage", "cell", "teacher", "student", "method", "source", "compressor", "wall_clock_s", "gpus",
            "gpu_hours", "device", "groups.Math.accuracy", "metric.gpu_hours", "train_tokens"} <= set(df.columns)
    assert df.group_by("stage").len().sort("stage").to_dicts() == [
        {"stage": s, "len": n} for s, n in sorted({"compress": 4, "evaluate": 14, "generate": 2, "judge": 4,
                                                   "train": 14, "truncate": 2}.items())]


def test_every_table_and_figure_is_written_and_on_the_page(built):
    assert set(built["tables"]) == TABLES, built["notes"]
    assert set(built["figures"]) == FIGURES, built["notes"]
    for name, (md, tex) in built["tables"].items():
        assert md.read_text().startswith("| ") and r"\begin{tabular}" in tex.read_text(), name
    for name, (png, svg, html) in built["figures"].items():
        assert png.read_bytes()[:8] == PNG_MAGIC and len(png.read_bytes()) > 5000, name
        assert ET.fromstring(svg.read_text()).tag.endswith("svg"), name
        assert "vega" in html.read_text(), name
    page = built["index"].read_text()
    assert page.count("data:image/svg+xml;base64,") == len(FIGURES)
    for name in TABLES:
        assert f'id="tables-{name}"' in page and f'href="tables/{name}.md"' in page, name
    for name in FIGURES:
        assert f'id="figures-{name}"' in page and f'href="figures/{name}.html"' in page, name
    assert "<title>Compress-Distill report: fx</title>" in page and "Grid <b>fx</b>" in page
    assert len(re.findall(r'<p class="what">', page)) >= len(TABLES) + len(FIGURES)


def test_failed_cells_are_named_not_read(built):
    assert any("evaluate/broken (failed)" in n for n in built["notes"])
    assert "broken" not in built["tables"]["runs"][0].read_text()


def test_tables_hold_the_grid_numbers(built, fixture_grid):
    _, written = fixture_grid
    cell = f"evaluate/{QWEN}__{STUDENT}__lora__llama70b"
    t3 = {(r["teacher"], r["method"]): r for r in md_rows(built["tables"]["table3"][0])}
    assert float(t3[(QWEN, "lora")]["llama70b"]) == pytest.approx(written[cell]["accuracy"], abs=5e-4)
    assert float(t3[(QWEN, "full")]["raw"]) == pytest.approx(ACCURACY["raw"], abs=5e-4)
    t7 = {(r["teacher"], r["method"], r["source"]): r for r in md_rows(built["tables"]["table7"][0])}
    row = t7[(GPTOSS, "full", "ministral14b")]
    m = written[f"evaluate/{GPTOSS}__{STUDENT}__full__ministral14b"]
    assert float(row["science"]) == pytest.approx(m["groups"]["Science"]["accuracy"], abs=5e-4)
    assert float(row["math_se"]) == pytest.approx(m["groups"]["Math"]["se"], abs=5e-4)
    t8 = md_rows(built["tables"]["table8"][0])
    assert {r["teacher"] for r in t8} == {QWEN}, "only the Qwen teacher has truncated runs"
    t6 = {(r["teacher"], r["method"]): r for r in md_rows(built["tables"]["table6"][0])}
    speedup = TRAIN_HOURS["raw"] / TRAIN_HOURS["llama70b"]
    assert float(t6[(QWEN, "full")]["speedup_llama70b"]) == pytest.approx(speedup, abs=0.01)
    runs = {(r["teacher"], r["method"], r["source"]): r for r in md_rows(built["tables"]["runs"][0])}
    assert runs[(QWEN, "full", "raw")]["budget"] == "compute-matched (5,000 tokens)"
    assert runs[(GPTOSS, "lora", "llama70b")]["budget"] == "epoch-based (1 epoch)"
    lora = written[f"train/{GPTOSS}__{STUDENT}__lora__llama70b"]  # cdlib.train's metric names
    final_loss = float(runs[(GPTOSS, "lora", "llama70b")]["final_train_loss"])
    assert final_loss == pytest.approx(lora["train_loss_ema"], abs=5e-4)
    assert int(runs[(GPTOSS, "lora", "llama70b")]["train_tokens"]) == lora["trainable_tokens"]
    t11 = {(r["teacher"], r["method"], r["source"]): r for r in md_rows(built["tables"]["table11"][0])}
    assert float(t11[(QWEN, "full", "truncated")]["gpu_hours"]) == pytest.approx(TRAIN_HOURS["truncated"])
    assert t11[(QWEN, "full", "truncated")]["budget"].startswith("compute-matched")
    t9 = {(r["teacher"], r["method"], r["source"]): r for r in md_rows(built["tables"]["table9"][0])}
    raw = written[f"evaluate/{QWEN}__{STUDENT}__lora__raw"]
    assert float(t9[(QWEN, "lora", "raw")]["truncation_rate"]) == pytest.approx(raw["truncation_rate"]) == 2 / 16


def test_compression_and_judge_tables_come_from_the_records(built, fixture_grid):
    grid_dir, written = fixture_grid
    t2 = {(r["teacher"], r["compressor"]): r for r in md_rows(built["tables"]["table2"][0])}
    assert set(t2) == {(t, c) for t in (QWEN, GPTOSS) for c in ("llama70b", "ministral14b")}
    kept = compress.load(grid_dir / f"compress/{QWEN}__llama70b")
    rho = kept["compressed_chars"].mean() / kept["original_chars"].mean()
    assert float(t2[(QWEN, "llama70b")]["rho"]) == pytest.approx(rho, abs=5e-4)
    own = compress.table5(grid_dir / f"compress/{QWEN}__llama70b")
    own = own.filter(pl.col("dataset") == "overall").row(0, named=True)
    assert own["rho"] == pytest.approx(rho) and float(t2[(QWEN, "llama70b")]["mean_compressed_chars"]) == pytest.approx(
        own["mean_compressed_chars"], abs=0.5), "the stage's own table and Table 2: one computation, one set of names"
    t4 = {(r["teacher"], r["dataset"]): r for r in md_rows(built["tables"]["table4"][0])}
    assert int(t4[(GPTOSS, "toy")]["n_correct"]) == written[f"generate/{GPTOSS}"]["total_correct"]
    t10 = {(r["teacher"], r["dataset"]): r for r in md_rows(built["tables"]["table10"][0])}
    j = written[f"judge/{QWEN}__ministral14b"]
    assert float(t10[(QWEN, "Overall")]["ministral14b_faithfulness"]) == pytest.approx(j["faithfulness"], abs=5e-3)
    assert int(t10[(QWEN, "Overall")]["ministral14b_n"]) == j["n"] - j["parse_failures"]


def test_energy_uses_the_report_params(built, fixture_grid):
    _, written = fixture_grid
    q = {r["quantity"]: float(r["value"]) for r in md_rows(built["tables"]["compute"][0])}
    training = sum(m["gpu_hours"] for cid, m in written.items() if cid.startswith("train/"))
    # generate and compress cells: 60 s on 1 GPU each; upstream as App. H.4 counts it is the Qwen
    # teacher's pass and its two compressions, the gpt-oss teacher's three cells are beside it
    upstream = 60 / 3600 * (1 + 2)
    assert q["student_training_gpu_hours"] == pytest.approx(training, rel=1e-3)
    assert q["upstream_gpu_hours"] == pytest.approx(upstream, rel=1e-3)
    assert q["other_upstream_gpu_hours"] == pytest.approx(upstream, rel=1e-3)
    assert q["energy_kwh"] == pytest.approx((training + upstream) * 500 * 1.2 / 1000, rel=1e-3)
    assert q["emissions_kg_co2"] == pytest.approx(q["energy_kwh"] * 0.1, rel=1e-3)


def test_side_by_side_with_published_numbers_where_names_match(built):
    sbs = built["side_by_side"]
    assert {"table2", "table7", "table9", "table11", "compute"} <= set(sbs)
    assert "table4" not in sbs and "table10" not in sbs, "the toy dataset has no published counterpart"
    rows = md_rows(sbs["table7"][0])
    hit = next(r for r in rows if (r["teacher"], r["method"], r["source"], r["group"], r["metric"])
               == (QWEN, "lora", "raw", "overall", "accuracy"))
    published = paper.runs().filter((pl.col("teacher") == QWEN) & (pl.col("student") == STUDENT)
                                    & (pl.col("method") == "lora") & (pl.col("source") == "raw")
                                    & (pl.col("group") == "overall"))["accuracy"][0]
    assert float(hit["paper"]) == pytest.approx(published)
    assert float(hit["diff"]) == pytest.approx(float(hit["ours"]) - published, abs=2e-3)
    assert 'id="side_by_side-table7"' in built["index"].read_text()


def test_paper_name_matching():
    assert tables.paper_name("qwen3.5-397b", "teacher") == QWEN
    assert tables.paper_name("Qwen3.5-0.8B", "student") == STUDENT
    assert tables.paper_name("ministral-14b", "compressor") == "ministral14b"
    assert tables.paper_name("gsm8k", "dataset") == "GSM8k"
    assert tables.paper_name("toy", "teacher") is None
    assert tables.paper_name("qwen3.5", "student") is None  # 0.8B or 9B: ambiguous
    # the slugs a paper grid file uses for its axis values
    slugs = {"teacher": ["qwen3.5-397b", "gpt-oss-120b"],
             "student": ["qwen3.5-0.8b", "llama-3.1-8b", "qwen3.5-9b", "gpt-oss-20b"],
             "dataset": ["aqua_rat", "arc_challenge", "gpqa_diamond", "commonsense_qa", "mmlu_stem", "mmlu_medical",
                         "medexpqa"]}
    assert [tables.paper_name(v, "teacher") for v in slugs["teacher"]] == list(paper.TEACHERS)
    assert [tables.paper_name(v, "student") for v in slugs["student"]] == list(paper.STUDENTS)
    assert [tables.paper_name(v, "dataset") for v in slugs["dataset"]] == [
        "AQUA-RAT", "ARC-Challenge", "GPQA Diamond", "CommonsenseQA", "Mmlu-Stem", "Mmlu-Medical", "MedExpQA"]


def test_results_only_toy_grid_skips_with_notes(fixture_grid, tmp_path):
    """results.parquet alone, toy names: run tables from metrics, record-based ones skipped, no side-by-side."""
    grid_dir, _ = fixture_grid
    rename = {QWEN: "toy-a", GPTOSS: "toy-b", STUDENT: "tiny"}
    df = pl.read_parquet(grid_dir / "results.parquet")
    df = df.with_columns(pl.col(c).replace(rename) for c in ("teacher", "student")).with_columns(
        cell=pl.col("cell").str.replace(QWEN, "toy-a", literal=True).str.replace(GPTOSS, "toy-b", literal=True)
        .str.replace(STUDENT, "tiny", literal=True))
    only = tmp_path / "outputs/toygrid"
    only.mkdir(parents=True)
    df.write_parquet(only / "results.parquet")
    out = report.build_report(only, tmp_path / "report", None)
    assert {"table3", "table6", "table7", "table8", "table9", "table11", "runs", "failure_modes",
            "compute"} <= set(out["tables"])
    assert not {"table2", "table4", "table5", "table10"} & set(out["tables"])
    assert set(out["figures"]) == {"fig4_accuracy_vs_length", "pareto"}
    assert out["side_by_side"] == {}
    page = out["index"].read_text()
    for needle in ("Table 4 skipped", "Tables 2, 5 and Figure 1 skipped", "Figure 3 skipped", "Table 10 skipped",
                   "nothing to compare", "not recorded"):
        assert needle in page, needle
    t3 = {(r["teacher"], r["method"]): r for r in md_rows(out["tables"]["table3"][0])}
    assert float(t3[("toy-a", "full")]["raw"]) == pytest.approx(ACCURACY["raw"], abs=5e-4)
    t6 = {(r["teacher"], r["method"]): r for r in md_rows(out["tables"]["table6"][0])}
    assert float(t6[("toy-a", "full")]["hours_raw"]) == pytest.approx(TRAIN_HOURS["raw"])
    runs = {(r["teacher"], r["method"], r["source"]): r for r in md_rows(out["tables"]["runs"][0])}
    assert runs[("toy-a", "lora", "raw")]["budget"] == "epoch-based (1 epoch)", "from cdlib.train's budget_mode"
    assert runs[("toy-a", "full", "raw")]["budget"] == "—", "no params.yaml, no budget_mode: not recorded"


def test_missing_stage_and_corrupt_records_are_notes(fixture_grid, tmp_path):
    grid_dir, _ = fixture_grid
    copy = tmp_path / "fx"
    shutil.copytree(grid_dir, copy, ignore=shutil.ignore_patterns("judge"))
    (copy / "results.parquet").unlink()
    bad = copy / f"train/{QWEN}__{STUDENT}__full__raw/loss.jsonl"
    bad.write_text('{"id": "1", "step": 1, "loss": 2.0}\nnot json\n{"id": "2", "step": 2, "loss": 1.0}\n')
    out = report.build_report(copy, tmp_path / "report",
                              ReportParams(out_dir="x", grid_dir=str(copy), side_by_side=False))
    assert "table10" not in out["tables"] and "fig3_loss_curves" not in out["figures"]
    notes = "\n".join(out["notes"])
    assert "results.parquet not found" in notes and "Table 10 skipped" in notes
    assert f"{bad}:2: not a JSON record" in notes
    assert "Side-by-side comparisons turned off" in notes
    assert {"table2", "table3", "table4"} <= set(out["tables"])


def test_07_paper_notebook_runs_headless(fixture_grid, tmp_path):
    import papermill

    from cdlib import notebook as nbtools

    grid_dir, _ = fixture_grid
    out = tmp_path / "report"
    papermill.execute_notebook(nbtools.read(REPO / "notebooks/07_paper.py"), str(tmp_path / "07_paper.ipynb"),
                               parameters={"grid_dir": str(grid_dir), "out_dir": str(out), "pue": 1.3},
                               kernel_name="python3", cwd=str(REPO), progress_bar=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tables"] == len(TABLES) and metrics["figures"] == len(FIGURES) and metrics["side_by_side"] >= 5
    assert "PUE 1.3" in (out / "index.html").read_text()


def test_report_notebook_declares_exactly_the_report_params():
    from cdlib import notebook as nbtools

    declared = nbtools.declared_parameters(REPO / "notebooks/07_paper.py")
    assert set(declared) == set(ReportParams.model_fields)
    assert all(p["help"] for p in declared.values())


def test_long_loss_curves_are_thinned_after_the_ema():
    n = 5000
    losses = pl.DataFrame({"teacher": "t", "student": "s", "method": "full", "source": "raw",
                           "step": list(range(1, n + 1)), "loss": [2 + math.sin(i) for i in range(n)]})
    data = figures.fig3_loss_curves(losses, max_points=400).data  # one row per kept step: its loss and EMA
    assert 300 < data.height <= 401 and data["loss"].null_count() == data["ema"].null_count() == 0
    last = data.filter(pl.col("step") == n)["ema"][0]
    assert last == pytest.approx(figures.ema(losses)["ema"][-1]), "EMA over every step, not the thinned ones"


def test_evaluate_and_judge_notebooks_run_headless(fixture_grid, tmp_path):
    """05 with the toy engine standing in for a student, 06 with the rule judge, on the fixture's cells."""
    import papermill

    from cdlib import notebook as nbtools

    grid_dir, written = fixture_grid
    judged, evaluated = tmp_path / "judge", tmp_path / "evaluate"
    papermill.execute_notebook(nbtools.read(REPO / "notebooks/06_judge.py"), str(tmp_path / "06.ipynb"),
                               parameters={"out_dir": str(judged),
                                           "compressed": str(grid_dir / f"compress/{QWEN}__llama70b"),
                                           "judge": "rule"}, kernel_name="python3", cwd=str(REPO), progress_bar=False)
    m = json.loads((judged / "metrics.json").read_text())
    keys = ("n", "parse_failures", "faithfulness", "pct_faithful", "pct_aligned", "failure_modes")
    assert {k: m[k] for k in keys} == {k: written[f"judge/{QWEN}__llama70b"][k] for k in keys}
    papermill.execute_notebook(nbtools.read(REPO / "notebooks/05_evaluate.py"), str(tmp_path / "05.ipynb"),
                               parameters={"out_dir": str(evaluated),
                                           "model": str(grid_dir / f"train/{QWEN}__{STUDENT}__full__raw"),
                                           "engine": {"kind": "toy"}, "toy": TOY}, kernel_name="python3", cwd=str(REPO),
                               progress_bar=False)
    m = json.loads((evaluated / "metrics.json").read_text())
    summary = evaluate.summarize(Store(evaluated / "outputs.jsonl").read())
    assert m["n"] == TOY["n_test"] and {k: m[k] for k in summary} == summary
    assert set(m) - set(summary) <= {"train_tokens", "train_budget_mode", "train_wall_clock_s"}


def test_empty_and_odd_grids_give_a_page_not_a_crash(tmp_path):
    empty = tmp_path / "outputs/empty"
    empty.mkdir(parents=True)
    out = report.build_report(empty, tmp_path / "r1")
    assert out["tables"] == {} and out["figures"] == {} and "results.parquet not found" in out["index"].read_text()
    odd = tmp_path / "outputs/odd/evaluate/a__b"
    odd.mkdir(parents=True)
    outputs.write_metrics(odd, evaluate.summarize([]))  # an evaluation of nothing: {"n": 0}
    (odd / "manifest.json").write_text(json.dumps({"status": "done", "axes": {"student": "a", "source": "b"}}))
    out = report.build_report(odd.parents[1], tmp_path / "r2")
    assert "runs" in out["tables"] and "No evaluated runs (evaluate cells with an accuracy)" in "\n".join(out["notes"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report.build_report(tmp_path / "nowhere", tmp_path / "r3")


def test_report_names_the_protocol_options_and_deviations(built):
    """Each protocol option the paper fixes, with the grid's value and whether it deviates."""
    rows = {(r["stage"], r["option"]): r for r in md_rows(built["tables"]["protocol"][0])}
    assert rows[("compress", "drop_flagged")]["paper"] == "false"
    assert rows[("compress", "drop_flagged")]["deviation"] in ("True", "true")  # the fixture keeps the default (drop)


def _recorded_grid(root: Path) -> Path:
    """Three cells whose stage names, params and files say nothing of their kind or inputs: only what the
    runner recorded (``kind``, ``inputs`` in manifest.json; ``budget_label`` in metrics.json) links them."""
    cells = {
        "squeeze/c1": ("compress", {}, {"teacher": "toy-a"}, {"n": 3}),
        "distill/t1": ("train", {"data": "squeeze/c1"}, {"student": "s"},
                       {"n_examples": 3, "budget_label": "1500 steps", "train_wall_clock_s": 36.0}),
        "score/e1": ("evaluate", {"model": "distill/t1"}, {}, {"n": 4, "accuracy": 0.5, "accuracy_se": 0.25}),
    }
    for cid, (kind, inputs, axes, metrics) in cells.items():
        d = root / cid
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"status": "done", "kind": kind, "inputs": inputs, "axes": axes}))
        (d / "metrics.json").write_text(json.dumps(metrics))
        (d / "params.yaml").write_text(yaml.safe_dump({"epochs": 3} if kind == "train" else {}))
    return root


def test_kind_inputs_and_budget_are_read_as_recorded_not_guessed(tmp_path):
    """A renamed stage or metric cannot mislead the report; only older cells are guessed."""
    from cdlib import results, student_runs

    g = results.read_grid(_recorded_grid(tmp_path / "grid"))
    assert {c.id: (c.kind, c.upstream) for c in g.cells.values()} == {
        "squeeze/c1": ("compress", []), "distill/t1": ("train", ["squeeze/c1"]),
        "score/e1": ("evaluate", ["distill/t1"])}
    run = student_runs.grid_runs(g).filter(pl.col("group") == "overall").row(0, named=True)
    assert (run["teacher"], run["student"], run["train_cell"]) == ("toy-a", "s", "distill/t1")
    assert run["budget"] == "1500 steps", "the label training recorded, not one derived from params.yaml's epochs"
    # results.parquet alone (no cell directories): kind and inputs as its columns, inputs as JSON
    rows = [{"stage": cid.split("/")[0], "cell": cid, "kind": c.kind, "inputs": json.dumps(
        {f"in{i}": u for i, u in enumerate(c.upstream)}), **{k: v for k, v in c.metrics.items()}}
        for cid, c in g.cells.items()]
    only = tmp_path / "only"
    only.mkdir()
    pl.DataFrame(rows, infer_schema_length=None).write_parquet(only / "results.parquet")
    g2 = results.read_grid(only)
    assert {c.id: (c.kind, c.upstream) for c in g2.cells.values()} == {
        c.id: (c.kind, c.upstream) for c in g.cells.values()}
    # an older cell (no kind or inputs recorded) still gets them guessed from its stage name and param paths
    old = tmp_path / "old/evaluate/e2"
    old.mkdir(parents=True)
    (old / "manifest.json").write_text(json.dumps({"status": "done", "axes": {}}))
    (old / "metrics.json").write_text(json.dumps({"n": 1, "accuracy": 1.0}))
    (old / "params.yaml").write_text(yaml.safe_dump({"model": str(tmp_path / "old/distill/t1")}))
    shutil.copytree(tmp_path / "grid/distill/t1", tmp_path / "old/distill/t1")
    (tmp_path / "old/distill/t1/manifest.json").write_text(json.dumps({"status": "done", "axes": {}}))
    g3 = results.read_grid(tmp_path / "old")
    assert (g3.cells["evaluate/e2"].kind, g3.cells["evaluate/e2"].upstream) == ("evaluate", ["distill/t1"])
    assert g3.cells["distill/t1"].kind is None, "no telltale name, file or metric: why the runner records kind"


def test_a_grid_with_a_seed_axis_names_each_runs_teacher_by_its_generate_cell(tmp_path):
    """make demo-seeds' layout: no ``teacher`` axis, one teacher per seed: runs, Table 4 and the
    compression rows are labelled by the generate cell (s0, s1), not "—"; student samples are skipped."""
    from cdlib import results, student_runs

    cells = {
        "generate/s0": ("generate", {}, {"seed": "s0"}, {"n": 2}, {}),
        "generate/s1": ("generate", {}, {"seed": "s1"}, {"n": 2}, {}),
        "train/s1__raw": ("train", {"data": "generate/s1"}, {"seed": "s1", "source": "raw"}, {"n_examples": 2}, {}),
        "sample/s1": ("generate", {"model": "train/s1__raw"}, {"seed": "s1"}, {"n": 2}, {"keep": "all"}),
        "train/s1__mpd": ("train", {"data": "sample/s1"}, {"seed": "s1", "source": "mpd"}, {"n_examples": 2}, {}),
        "evaluate/s1__raw": ("evaluate", {"model": "train/s1__raw"}, {"seed": "s1", "source": "raw"},
                             {"n": 4, "accuracy": 0.5}, {}),
    }
    for cid, (kind, inputs, axes, metrics, params) in cells.items():
        d = tmp_path / cid
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"status": "done", "kind": kind, "inputs": inputs, "axes": axes}))
        (d / "metrics.json").write_text(json.dumps(metrics))
        (d / "params.yaml").write_text(yaml.safe_dump(params))
    g = results.read_grid(tmp_path)
    assert {cid: g.teacher_of(c) for cid, c in g.cells.items()} == {
        "generate/s0": "s0", "generate/s1": "s1", "train/s1__raw": "s1", "sample/s1": "s1", "train/s1__mpd": "s1",
        "evaluate/s1__raw": "s1"}
    run = student_runs.grid_runs(g).filter(pl.col("group") == "overall").row(0, named=True)
    assert run["teacher"] == "s1" and run["source"] == "raw"


def test_student_samples_are_one_test_for_every_table(tmp_path):
    """A student's own samples are told apart from teacher traces the same way by Table 4, the teacher
    labels, the compression tables and H.4's upstream hours: by ``keep: all`` or by descending from a
    train cell (a student sampled with rejection, ``keep: correct``, is still a student)."""
    from cdlib import accounting, results

    def grid(root: Path, axis: str) -> results.GridOutputs:
        cells = {
            "generate/t": ("generate", {}, {"n": 2}, {}),
            "train/t__raw": ("train", {"data": "generate/t"}, {"n_examples": 2}, {}),
            "sample/t": ("generate", {"model": "train/t__raw"}, {"n": 2}, {"keep": "correct"}),
            "rewrite/t": ("compress", {"traces": "sample/t"}, {"n": 2}, {}),
            "squeeze/t": ("compress", {"traces": "generate/t"}, {"n": 2}, {}),
            "sample/old": ("generate", {}, {"n": 2}, {"keep": "all"}),  # inputs not recorded (an older grid)
        }
        for cid, (kind, inputs, metrics, params) in cells.items():
            d = root / cid
            d.mkdir(parents=True)
            (d / "manifest.json").write_text(json.dumps({
                "status": "done", "kind": kind, "inputs": inputs, "axes": {axis: "t"},
                "wall_clock_s": 3600.0, "gpus": 1, "gpu_hours": 1.0}))
            (d / "metrics.json").write_text(json.dumps(metrics))
            (d / "params.yaml").write_text(yaml.safe_dump(params))
            if kind == "generate":
                (d / "traces.jsonl").write_text(json.dumps({"id": "q1", "dataset": "toy", "domain": "math",
                                                            "completion_tokens": 5, "reasoning": "a b"}) + "\n")
        return results.read_grid(root)

    g = grid(tmp_path / "seeds", "seed")  # make demo-seeds' layout: the teacher is named by its generate cell
    assert {cid for cid, c in g.cells.items() if g.student_samples(c)} == {"sample/t", "sample/old"}
    assert {cid for cid, c in g.cells.items() if g.rewrites_student(c)} == {"rewrite/t"}
    assert g.teacher_of(g.cells["rewrite/t"]) == "t"  # through the student, to the teacher's generate cell
    assert results.grid_generation(g)["teacher"].to_list() == ["t"], "only the teacher's traces are Table 4's"
    assert any(n.startswith("sample/t: student samples") for n in g.notes)
    q = dict(accounting.grid_compute(grid(tmp_path / "teachers", "teacher"))[1].iter_rows())
    assert (q["teacher_gpu_hours"], q["compression_gpu_hours"], q["other_upstream_gpu_hours"]) == (1.0, 1.0, 3.0)


def test_the_report_opens_with_the_papers_findings_measured_on_the_grid(built):
    page = built["index"].read_text()
    assert page.index('id="tables-findings"') < page.index('id="tables-cells"')  # the first section
    rows = md_rows(built["tables"]["findings"][0])
    assert [r["claim"] for r in rows][0] == "Raw traces keep the highest accuracy"
    assert {r["verdict"] for r in rows} <= {"held", "not held", "not run"}
    # the fixture grid uses the paper's names: the published column is measured on the paper's own runs
    assert rows[0]["published"].startswith("holds in 14 of 14")
