"""The whole pipeline through the grid runner and papermill on the toy world.

Default tier: a reduced demo (a few dozen questions, a handful of training steps),
with the model-based compressor and the students' evaluation going through the real
vLLM engine on CPU, a LoRA student through vLLM's LoRA support, the rule judge and
the report. The slow tier runs params/demo.yaml itself.
"""

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from cdlib.grid import Grid

REPO = Path(__file__).resolve().parents[1]


def reduced_demo(tmp_path, name="mini"):
    """params/demo.yaml shrunk: fewer questions, fewer steps; a base pretrained for a few steps, students on raw
    and extractive traces from it, a LoRA student, one Distilling-the-Essence student and the Mixed-Policy
    Distillation chain."""
    spec = yaml.safe_load((REPO / "params/demo.yaml").read_text())
    spec = {k: v for k, v in spec.items() if not k.startswith("x-")}
    spec["name"] = name
    spec["output_root"] = str(tmp_path / "out")
    toy = {"n_train": 60, "n_test": 12, "slip_rate": 0.3, "n_pretrain": 80}
    for stage in ("generate", "corpus", "evaluate", "base"):
        spec["stages"][stage]["params"]["toy"] = toy
    for stage in ("evaluate", "base"):
        spec["stages"][stage]["params"]["sampling"]["max_tokens"] = 48
    spec["stages"]["pretrain"]["params"].update(max_steps=8, log_every=2)
    spec["stages"]["train"]["params"].update(max_steps=6, epochs=1, log_every=2)
    spec["axes"]["compressor"]["tiny-lm"]["compress"].update(limit=4)
    spec["axes"]["compressor"]["tiny-lm"]["compress"]["sampling"]["max_tokens"] = 16
    spec["axes"]["student"]["tiny"]["pretrain"].update(tiny_layers=1)
    spec["stages"]["report"]["params"]["grid_dir"] = str(tmp_path / "out" / name)
    spec["exclude"] += [{"source": "answer_only"}, {"source": "truncated"}]
    # the DtE student trains (and is checked below) but is not evaluated: one vLLM start fewer keeps the
    # default tier within its budget; the slow tier's demo evaluates it
    spec["stages"]["evaluate"].setdefault("exclude", []).append({"source": "dte-0.5"})
    spec["stages"]["sample"]["params"].update(limit=8)
    spec["stages"]["sample"]["params"]["sampling"]["max_tokens"] = 48
    spec["stages"]["mpd"]["params"].update(max_steps=4, log_every=2)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_reduced_demo_end_to_end(tmp_path):
    grid = reduced_demo(tmp_path)
    out = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", str(grid), "--jobs", "2"], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    g = Grid(grid, root=REPO)
    root = tmp_path / "out/mini"
    assert {c.id for c in g.cells} == {
        "generate/toy", "corpus/toy", "compress/toy__extractive", "compress/toy__tiny-lm", "truncate/toy",
        "pretrain/toy__tiny", "base/toy__tiny",
        "train/toy__tiny__full__raw", "train/toy__tiny__full__extractive", "train/toy__tiny__lora__extractive",
        "train/toy__tiny__full__dte-0.5",
        "sample/toy__tiny__full", "rewrite/toy__tiny__full", "mpd/toy__tiny__full",
        "evaluate/toy__tiny__full__raw", "evaluate/toy__tiny__full__extractive",
        "evaluate/toy__tiny__lora__extractive", "evaluate/toy__tiny__full__mpd",
        "judge/toy__extractive", "judge/toy__tiny-lm", "report"}
    for c in g.cells:
        m = json.loads((root / c.stage / c.slug / "manifest.json").read_text())
        assert m["status"] == "done" and m["versions"]["transformers"], c.id
        assert (root / c.stage / c.slug / "log.txt").exists()
    # the model-based compressor ran through vLLM; a random model's outputs are flagged, never kept silently
    tiny = [json.loads(x) for x in (root / "compress/toy__tiny-lm/compressed.jsonl").read_text().splitlines()]
    assert len(tiny) == 4 and all(r["flag"] for r in tiny)
    # the LoRA student was evaluated through vLLM's LoRA support
    from cdlib.outputs import read_checkpoint

    ckpt = read_checkpoint(root / "train/toy__tiny__lora__extractive")
    assert ckpt["adapter"] and Path(ckpt["adapter"]).exists()
    res = pl.read_parquet(root / "results.parquet")
    ev = res.filter(pl.col("stage") == "evaluate")
    assert ev.height == 4 and set(ev["method"]) == {"full", "lora"} and ev["accuracy"].is_not_null().all()
    assert (ev["n"] == 12).all() and (ev["mean_completion_tokens"] > 0).all()
    # every student fine-tunes from the pretrained base, which is evaluated as it is
    base = str(root / "pretrain/toy__tiny")
    for c in ("train/toy__tiny__full__raw", "train/toy__tiny__lora__extractive", "train/toy__tiny__full__dte-0.5"):
        assert json.loads((root / c / "metrics.json").read_text())["student"].endswith("pretrain/toy__tiny"), c
    assert json.loads((root / "pretrain/toy__tiny/metrics.json").read_text())["source"] == "pretrain"
    assert res.filter(pl.col("stage") == "base")["accuracy"].is_not_null().all() and Path(base).is_dir()
    # the neighbouring methods: a DtE student on the first half of each sequence, MPD on rewrites
    tr = res.filter(pl.col("stage").is_in(["train", "mpd"]))
    dte = tr.filter(pl.col("cell") == "train/toy__tiny__full__dte-0.5").row(0, named=True)
    assert (dte["truncate_ratio"], dte["truncate_span"]) == (0.5, "sequence") and 0 < dte["kept_token_fraction"] < 1
    mpd = tr.filter(pl.col("stage") == "mpd").row(0, named=True)
    # metric.source: "source" is also an axis name. The toy teacher is a script, so MPD trains on its rewrites by
    # cross-entropy (the KL to a point mass), from the raw-trace student
    assert (mpd["objective"], mpd["metric.source"]) == ("sft", "mpd")
    mpd_metrics = json.loads((root / "mpd/toy__tiny__full/metrics.json").read_text())
    assert "train/toy__tiny__full__raw" in mpd_metrics["student"] and not mpd_metrics.get("kl_teacher")
    assert json.loads((root / "sample/toy__tiny__full/metrics.json").read_text())["kept"] == 8  # keep: all
    # every student keeps the base's toy tokenizer, so token counts compare
    vocabs = {(root / "train" / c / "model/tokenizer.json").read_text()
              for c in ("toy__tiny__full__raw", "toy__tiny__full__extractive", "toy__tiny__full__dte-0.5")}
    assert vocabs == {(root / "pretrain/toy__tiny/model/tokenizer.json").read_text()}
    report = root / "report/index.html"
    html = report.read_text()
    assert "Table" in html and "kept fraction" in html.lower() and "mpd" in html
    # MPD's rewrite of student trajectories is not a compressor of teacher traces (Tables 2, 5, Figures 1, 2)
    from cdlib import results

    outputs = results.read_grid(root)
    assert set(results.grid_compression(outputs, include_flagged=True)["compressor"]) == {"extractive", "tiny-lm"}
    assert "toy-rewriter" not in set(results.grid_trace_lengths(outputs)["source"])
    assert "Left out of Tables 2, 5 and Figures 1, 2: rewrite/toy__tiny__full rewrote student" in html
    from cdlib import accounting

    quantities = accounting.grid_compute(outputs)[1]["quantity"].to_list()
    assert "compress_extractive_gpu_hours" in quantities and "compress_toy-rewriter_gpu_hours" not in quantities
    # a rerun skips every finished cell
    again = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", str(grid)], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "21 already done, 0 to run" in again.stdout


@pytest.mark.slow
def test_demo_grid(tmp_path):
    """params/demo.yaml as `make demo` runs it, into a temporary output root."""
    spec = yaml.safe_load((REPO / "params/demo.yaml").read_text())
    spec["output_root"] = str(tmp_path / "out")
    spec["stages"]["report"]["params"]["grid_dir"] = str(tmp_path / "out/demo")
    grid = tmp_path / "demo.yaml"
    grid.write_text(yaml.safe_dump({k: v for k, v in spec.items() if not k.startswith("x-")}, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", str(grid), "--jobs", "2"], cwd=REPO,
                         capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stdout[-3000:]
    root = tmp_path / "out/demo"
    for c in Grid(grid, root=REPO).cells:
        m = json.loads((root / c.stage / c.slug / "manifest.json").read_text())
        assert m["status"] == "done" and m["wall_clock_s"] > 0, c.id
    res = pl.read_parquet(root / "results.parquet").filter(pl.col("stage") == "evaluate")
    assert set(res["source"]) == {"raw", "extractive", "truncated", "answer_only", "dte-0.5", "mpd"}
    assert {"accuracy", "mean_completion_tokens", "train_tokens", "method"} <= set(res.columns)
    index = (root / "report/index.html").read_text()
    assert "Table 4" in index and "Pareto" in index
    assert (root / "report/figures/pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
