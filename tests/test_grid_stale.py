"""Staleness by content: a cell whose inputs' outputs changed since it ran is stale, through `grid run`,
`grid status` and `grid slurm` alike, whatever the clocks of the hosts that ran them said."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from cdlib.grid import Grid
from cdlib.grid.slurm import write_slurm

REPO = Path(__file__).resolve().parents[1]
NB = "tests/notebooks/square.py"


def _grid(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _run(grid: Path, command: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cdlib.grid", command, str(grid), *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def _lines(store: Path) -> int:
    return len(store.read_text().splitlines())


def test_a_downstream_cell_of_an_upstream_cell_redone_with_other_params_is_stale(tmp_path):
    """The toy world: generate -> compress -> truncate. generate is deleted and rerun with more questions:
    compress and truncate hold records made from the old traces and must not stay done."""
    spec = {"name": "st", "output_root": str(tmp_path / "out"),
            "axes": {"teacher": {"toy": {}}},
            "stages": {
                "generate": {"notebook": "notebooks/01_generate.py", "axes": ["teacher"],
                             "params": {"datasets": ["toy"], "toy": {"n_train": 40, "n_test": 5}, "rounds": 1}},
                "compress": {"notebook": "notebooks/02_compress.py", "axes": ["teacher"],
                             "inputs": {"traces": "generate/{teacher}"}, "params": {"compressor": "extractive"}},
                "truncate": {"notebook": "notebooks/03_truncate.py", "axes": ["teacher"],
                             "inputs": {"traces": "generate/{teacher}", "compressed": "compress/{teacher}"},
                             "params": {"mode": "length_matched", "tokenizer": "whitespace"}}}}
    grid = _grid(tmp_path / "g.yaml", spec)
    first = _run(grid, "run")
    assert first.returncode == 0, first.stdout + first.stderr
    root = tmp_path / "out/st"
    old = _lines(root / "generate/toy/traces.jsonl")
    assert _lines(root / "truncate/toy/truncated.jsonl") == _lines(root / "compress/toy/compressed.jsonl") <= old

    # someone deletes the upstream cell and reruns it with other parameters
    shutil.rmtree(root / "generate/toy")
    spec["stages"]["generate"]["params"]["toy"]["n_train"] = 80
    _grid(grid, spec)
    second = _run(grid, "run")
    out = second.stdout + second.stderr
    assert second.returncode == 1, out
    assert "compress/toy: REFUSED, stale: generate/toy changed since it ran" in out, out
    assert "truncate/toy: blocked" in out or "truncate/toy: REFUSED, stale" in out, out
    new = _lines(root / "generate/toy/traces.jsonl")
    assert new > old
    assert _lines(root / "compress/toy/compressed.jsonl") <= old, "the refused cell was not touched"

    status = _run(grid, "status")
    assert "STALE compress/toy: generate/toy changed since it ran" in status.stdout, status.stdout
    assert "STALE truncate/toy: generate/toy changed since it ran" in status.stdout, status.stdout
    said: list[str] = []
    write_slurm(Grid(grid, root=REPO), say=said.append)
    assert any(s.startswith("compress/toy: stale (generate/toy changed since it ran), left out") for s in said), said
    assert not (root / "slurm/compress.sbatch").exists()
    write_slurm(Grid(grid, root=REPO), say=said.append, rerun_stale=True)
    assert '--cell "$CELL" --rerun-stale' in (root / "slurm/compress.sbatch").read_text()

    third = _run(grid, "run", "--rerun-stale")
    assert third.returncode == 0, third.stdout + third.stderr
    compressed = _lines(root / "compress/toy/compressed.jsonl")
    assert old < compressed <= new and _lines(root / "truncate/toy/truncated.jsonl") == compressed
    manifest = json.loads((root / "truncate/toy/manifest.json").read_text())
    assert manifest["attempts"] == 1, "redone from an emptied directory, not resumed"
    assert set(manifest["consumed"]) == {"generate/toy", "compress/toy"}
    again = _run(grid, "run")
    assert again.returncode == 0 and "3 already done, 0 to run" in again.stdout, again.stdout


def test_a_report_reruns_when_a_cell_above_changed_whatever_the_clocks_say(tmp_path):
    spec = {"name": "r", "output_root": str(tmp_path / "out"),
            "axes": {"x": {"a": {"parent": {"x": 2}}}},
            "stages": {"parent": {"notebook": NB, "axes": ["x"]},
                       "child": {"notebook": NB, "axes": ["x"], "inputs": {"upstream": "parent/{x}"}},
                       "summary": {"notebook": NB, "after": "all"}}}
    grid = _grid(tmp_path / "g.yaml", spec)
    assert _run(grid, "run").returncode == 0
    root = tmp_path / "out/r"
    # the report's host clock runs a century ahead: its end time says nothing about what it read
    summary = json.loads((root / "summary/manifest.json").read_text())
    summary["end"] = "2100-01-01T00:00:00+00:00"
    (root / "summary/manifest.json").write_text(json.dumps(summary))
    # deleted and rerun with the same params: the same outputs, nothing downstream is stale
    shutil.rmtree(root / "parent/a")
    same = _run(grid, "run")
    assert same.returncode == 0 and "child/a: done, current" in same.stdout, same.stdout
    assert "summary: done, current" in same.stdout, same.stdout
    # rerun with other params: the child is refused as stale, the report reruns
    shutil.rmtree(root / "parent/a")
    spec["axes"]["x"]["a"]["parent"]["x"] = 3
    _grid(grid, spec)
    other = _run(grid, "run")
    assert other.returncode == 1, other.stdout
    assert "child/a: REFUSED, stale: parent/a changed since it ran" in other.stdout, other.stdout
    assert "summary: done in" in other.stdout, other.stdout
    fixed = _run(grid, "run", "--rerun-stale")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert json.loads((root / "child/a/metrics.json").read_text())["y"] == 4 + 9  # its own x=2, squared, plus 3*3
