"""The report of a paper-mode grid: overlong samples per run in Table 6, the note on Qwen answer-only runs."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from cdlib import report
from cdlib.params import ReportParams

TEACHER = "Qwen3.5-397B-A17B"


def _cell(root: Path, cid: str, kind: str, inputs: dict, axes: dict, metrics: dict, params: dict) -> None:
    d = root / cid
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"status": "done", "kind": kind, "inputs": inputs, "axes": axes}))
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "params.yaml").write_text(yaml.safe_dump(params))


def _grid(root: Path, students: list[str]) -> Path:
    """Recorded train and evaluate cells of raw and answer-only runs (what the runner writes), no notebooks."""
    for student in students:
        for source, dropped, capped in (("raw", 3, 0.08), ("answer_only", 0, 0.999)):
            run = f"{TEACHER}__{student}__full__{source}"
            axes = {"teacher": TEACHER, "student": student, "method": "full", "source": source}
            _cell(root, f"train/{run}", "train", {"data": "generate/x"}, axes,
                  {"train_hours": 1.0, "gpus": 4, "trainable_tokens": 1000, "overlong": "drop",
                   "overlong_dropped": dropped, "source_tokens": {"supervised": 1050}},
                  {"overlong": "drop", "epochs": 1})
            _cell(root, f"evaluate/{run}", "evaluate", {"model": f"train/{run}"}, axes,
                  {"n": 100, "accuracy": 0.5, "accuracy_se": 0.05, "truncation_rate": capped,
                   "mean_completion_tokens": 8000 if capped > 0.5 else 900, "median_reasoning_chars": 100},
                  {"model": f"train/{run}"})
    return root


def test_table6_counts_the_overlong_samples_each_run_dropped(tmp_path):
    built = report.build_report(_grid(tmp_path / "grid", ["Qwen3.5-0.8B"]), tmp_path / "out",
                                ReportParams(out_dir="x", grid_dir="x", side_by_side=False))
    md = built["tables"]["table6"][0].read_text()
    header = md.splitlines()[0]
    assert "overlong_dropped_raw" in header and "overlong_dropped_answer_only" in header
    row = dict(zip([c.strip() for c in header.strip("|").split("|")],
                   [c.strip() for c in md.splitlines()[2].strip("|").split("|")]))
    assert (row["overlong_dropped_raw"], row["overlong_dropped_answer_only"]) == ("3", "0")


def test_report_says_qwen_answer_only_cap_hitting_is_the_papers_protocol(tmp_path):
    note = "hitting the token cap is expected"
    qwen = report.build_report(_grid(tmp_path / "q", ["Qwen3.5-0.8B"]), tmp_path / "qo",
                               ReportParams(out_dir="x", grid_dir="x", side_by_side=False))
    assert any(note in n for n in qwen["notes"]), qwen["notes"]
    assert "99.9%" in qwen["index"].read_text()
    llama = report.build_report(_grid(tmp_path / "l", ["Llama-3.1-8B"]), tmp_path / "lo",
                                ReportParams(out_dir="x", grid_dir="x", side_by_side=False))
    assert not any(note in n for n in llama["notes"])
