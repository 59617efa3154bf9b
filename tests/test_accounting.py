"""Accounting as the paper's Appendix H.4 does it.

* Table 6's (and Table 11's) trainable tokens are "source-dataset trainable-token totals ... before the epoch
  multiplier": every row of a run's training data, the 5% validation split included, one pass; not the tokens
  the optimiser happened to see.
* Upstream GPU-hours count the Qwen teacher's generation and its two compressions only; the other teacher's
  passes are reported beside them, outside the H.4 total.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cdlib import accounting, results, student_runs, tables
from cdlib.training import sft
from cdlib import train as T
from cdlib.training import data as train_data
from cdlib.params import GenerateParams, ToyParams, TrainParams


def _cell(root: Path, stage: str, slug: str, axes: dict, metrics: dict, cost: dict | None = None) -> Path:
    d = root / stage / slug
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"status": "done", "axes": axes, **(cost or {})}))
    if not (d / "metrics.json").exists():
        (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def test_table6_counts_every_source_row_once(tmp_path):
    """A short run with a 20% validation split: Table 6 shows the supervised tokens of all its source rows."""
    import cdlib.generate
    from transformers import AutoTokenizer

    gen = tmp_path / "gen"
    cdlib.generate.run(GenerateParams(out_dir=str(gen), toy=ToyParams(n_train=40)))
    grid = tmp_path / "grid"
    out = grid / "train" / "toy__toy-student__full__raw"
    P = TrainParams(out_dir=str(out), data=str(gen), val_fraction=0.2, max_steps=2, seq_len=1024,
                    gradient_checkpointing=False, tiny_layers=1, log_every=1)
    m = T.run(P, progress=False, log=lambda *a: None)
    (out / "params.yaml").write_text(yaml.safe_dump(P.model_dump(mode="json")))
    _cell(grid, "train", out.name, {"teacher": "toy", "student": "toy-student", "method": "full", "source": "raw"}, m)

    # the definition, computed here from the cell's training data: every source row, supervised tokens
    records, _ = train_data.load_records(P.data, P.source, P.limit, P.seed)
    examples, _ = sft.build_dataset(records, AutoTokenizer.from_pretrained(out / "base"), P)
    expected = sum(sum(1 for x in ex["labels"] if x != sft.IGNORE_INDEX) for ex in examples)
    assert m["n_val"] > 0 and len(examples) == m["n_train"] + m["n_val"]
    assert expected > m["dataset_tokens"]["supervised"], "the validation split holds supervised tokens too"
    assert expected != m["trainable_tokens"], "two steps see a different number of tokens than one pass"

    runs = student_runs.grid_runs(results.read_grid(grid))
    t6 = tables.table6(runs)
    assert t6["tokens_m_raw"][0] * 1e6 == pytest.approx(expected, abs=0.5)
    t11 = tables.table11(runs)
    assert t11["train_tokens_m"][0] * 1e6 == pytest.approx(expected, abs=0.5), "Table 11 matches Table 6 (H.4)"


def _upstream_grid(root: Path, teachers: list[str], hours: dict[str, float]) -> None:
    """generate and compress cells (two compressors) per teacher, each with its GPU-hours in the manifest."""
    for t in teachers:
        _cell(root, "generate", t, {"teacher": t}, {"total_correct": 1}, {"gpu_hours": hours[t], "gpus": 8})
        for comp, share in (("llama70b", 0.2), ("ministral14b", 0.03)):
            _cell(root, "compress", f"{t}__{comp}", {"teacher": t, "compressor": comp}, {"n": 1},
                  {"gpu_hours": hours[t] * share, "gpus": 8})
    _cell(root, "train", "run", {"teacher": teachers[0], "student": "s", "method": "full", "source": "raw"},
          {"trainable_tokens": 10, "gpu_hours": 100.0, "gpus": 4})


def test_upstream_counts_the_qwen_teacher_and_its_two_compressions(tmp_path):
    """H.4's 424 H100-h are the Qwen teacher's pass and its two compressions; the gpt-oss teacher's are beside."""
    _upstream_grid(tmp_path, ["qwen3.5-397b", "gpt-oss-120b"], {"qwen3.5-397b": 348.0, "gpt-oss-120b": 70.0})
    g = results.read_grid(tmp_path)
    assert accounting.upstream_teachers(g) == ["qwen3.5-397b"]
    _, q = accounting.grid_compute(g)
    q = dict(zip(q["quantity"], q["value"]))
    assert q["teacher_gpu_hours"] == pytest.approx(348.0)
    assert q["compress_llama70b_gpu_hours"] == pytest.approx(348 * 0.2)
    assert q["compression_gpu_hours"] == pytest.approx(348 * 0.23)
    assert q["upstream_gpu_hours"] == pytest.approx(348 * 1.23)
    assert q["other_upstream_gpu_hours"] == pytest.approx(70 * 1.23)
    assert q["total_gpu_hours"] == pytest.approx(100 + 348 * 1.23)
    assert q["all_cells_gpu_hours"] == pytest.approx(100 + 418 * 1.23)


def test_upstream_without_the_papers_teacher_counts_every_teacher(tmp_path):
    _upstream_grid(tmp_path, ["toy-a", "toy-b"], {"toy-a": 1.0, "toy-b": 2.0})
    g = results.read_grid(tmp_path)
    assert accounting.upstream_teachers(g) == ["toy-a", "toy-b"]
    _, q = accounting.grid_compute(g)
    q = dict(zip(q["quantity"], q["value"]))
    assert q["upstream_gpu_hours"] == pytest.approx(3 * 1.23) and q["other_upstream_gpu_hours"] == 0
