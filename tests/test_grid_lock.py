"""One writer per cell: two runners on one grid, interrupted cells, unique cell ids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cdlib.grid.cells import cell_lock, cell_status, run_cell
from cdlib.grid import Grid
from cdlib.params import ParamsError

REPO = Path(__file__).resolve().parents[1]
NB = "tests/notebooks/square.py"


def _toy_grid(tmp_path: Path) -> Path:
    spec = {"name": "two", "output_root": str(tmp_path / "out"),
            "axes": {"teacher": {"toy": {"generate": {"engine": {"kind": "toy"}}}}},
            "stages": {"generate": {"notebook": "notebooks/01_generate.py", "axes": ["teacher"],
                                    "params": {"datasets": ["toy"], "toy": {"n_train": 300, "n_test": 10},
                                               "rounds": 3}},
                       "compress": {"notebook": "notebooks/02_compress.py", "axes": ["teacher"],
                                    "inputs": {"traces": "generate/{teacher}"},
                                    "params": {"compressor": "extractive"}}}}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_two_runners_on_one_grid_write_each_record_once(tmp_path):
    grid = _toy_grid(tmp_path)
    cmd = [sys.executable, "-m", "cdlib.grid", "run", str(grid)]
    runners = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    outputs = [r.communicate(timeout=600)[0] for r in runners]
    root = tmp_path / "out/two"
    for store in ("generate/toy/traces.jsonl", "generate/toy/attempts.jsonl", "compress/toy/compressed.jsonl"):
        ids = [json.loads(line)["id"] for line in (root / store).read_text().splitlines()]
        assert ids and len(ids) == len(set(ids)), (store, len(ids), len(set(ids)))
    metrics = json.loads((root / "generate/toy/metrics.json").read_text())
    assert metrics["accuracy"] <= 1.0
    # whoever came second said so, or found the cells done
    assert any("another runner holds its lock" in o or "already done" in o for o in outputs), outputs


def test_a_held_lock_skips_the_cell_and_a_dead_runner_reads_as_interrupted(tmp_path):
    spec = {"name": "t", "output_root": str(tmp_path / "out"), "axes": {"x": {"two": {"all": {"x": 2}}}},
            "stages": {"sq": {"notebook": NB, "axes": ["x"]}}}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(spec))
    g = Grid(path, root=REPO)
    c = g.cells[0]
    d = REPO / c.directory
    with cell_lock(d) as mine:
        assert mine
        assert run_cell(c, REPO)["status"] == "locked"  # another holder: nothing touched
        assert not (d / "manifest.json").exists()
    (d / "manifest.json").write_text(json.dumps({"status": "running", "pid": 999999}))
    assert cell_status(c, REPO) == "interrupted"  # running, but nobody holds the lock
    with cell_lock(d):
        pass
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from pathlib import Path; from cdlib.grid.cells import cell_lock\n"
                               f"with cell_lock(Path({str(d)!r})):\n    print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cell_status(c, REPO) == "running"
    finally:
        holder.kill()  # SIGKILL: the OS frees the lock
        holder.wait()
    assert cell_status(c, REPO) == "interrupted"
    assert run_cell(c, REPO)["status"] == "done"


def test_cell_ids_cannot_collide(tmp_path):
    spec = {"name": "t", "output_root": str(tmp_path / "out"),
            "axes": {"a": {"p__q": {}, "p": {}}, "b": {"r": {}, "q__r": {}}},
            "stages": {"sq": {"notebook": NB, "axes": ["a", "b"]}}}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ParamsError, match=r"axes\.a\.p__q.*may not contain '__'"):
        Grid(path, root=REPO)


def _square_grid(tmp_path: Path, name: str, **params) -> Path:
    spec = {"name": "v", "output_root": str(tmp_path / "out"), "axes": {"x": {"a": {"parent": {"x": 2}}}},
            "stages": {"parent": {"notebook": NB, "axes": ["x"], "params": params},
                       "child": {"notebook": NB, "axes": ["x"], "inputs": {"upstream": "parent/{x}"}}}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_a_runner_rereads_params_under_the_lock_and_refuses_another_versions_cell(tmp_path):
    """Runner v1 judged the grid at its start; meanwhile runner v2 (other params) ran the cell and failed
    half-way. When v1 reaches the cell, it finds v2's params.yaml under the lock and refuses it."""
    from cdlib.grid.runner import run_parallel

    v1 = Grid(_square_grid(tmp_path, "v1.yaml"), root=REPO)
    v2 = Grid(_square_grid(tmp_path, "v2.yaml", fail=True), root=REPO)
    snapshot = {c.id: cell_status(c, REPO) for c in v1.cells}  # what v1 saw at its start: all pending
    assert snapshot == {"parent/a": "pending", "child/a": "pending"}
    assert run_cell(v2.cell("parent/a"), REPO)["status"] == "failed"
    d = tmp_path / "out/v/parent/a"
    before = (d / "params.yaml").read_text(), (d / "manifest.json").read_text()
    results = run_parallel(v1, v1.cells, snapshot, jobs=1)
    assert results == {"parent/a": "conflict", "child/a": "blocked"}, results
    assert ((d / "params.yaml").read_text(), (d / "manifest.json").read_text()) == before, "v1 wrote nothing"
    assert yaml.safe_load(before[0])["fail"] is True


def _wait_for(condition, timeout: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_runner_waits_for_an_input_another_runner_holds(tmp_path):
    grid = _square_grid(tmp_path, "g.yaml", sleep_s=8.0)
    manifest = tmp_path / "out/v/parent/a/manifest.json"
    first = subprocess.Popen([sys.executable, "-m", "cdlib.grid", "run", str(grid), "--stage", "parent"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: manifest.exists() and json.loads(manifest.read_text())["status"] == "running", 120,
                  "the first runner to start parent/a")
        second = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", str(grid), "--stage", "child"], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
    finally:
        out_first = first.communicate(timeout=300)[0]
    assert first.returncode == 0, out_first
    assert second.returncode == 0, second.stdout + second.stderr
    assert "waiting for parent/a: another runner holds it" in second.stdout, second.stdout
    assert "parent/a: done, as another runner left it" in second.stdout, second.stdout
    assert json.loads((tmp_path / "out/v/child/a/metrics.json").read_text())["y"] == 8


def test_the_wait_for_a_held_input_is_bounded(tmp_path):
    grid = _square_grid(tmp_path, "g.yaml")
    d = tmp_path / "out/v/parent/a"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from pathlib import Path; from cdlib.grid.cells import cell_lock\n"
                               f"with cell_lock(Path({str(d)!r})):\n    print('held', flush=True); time.sleep(600)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        whole = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", str(grid), "--held-timeout", "1"],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
        one = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", str(grid), "--cell", "child/a",
                              "--held-timeout", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert whole.returncode == 1, whole.stdout + whole.stderr
    assert "parent/a: skipped, another runner holds its lock" in whole.stdout, whole.stdout
    assert "child/a: blocked: parent/a still held by another runner after 1 s (--held-timeout)" in whole.stdout
    assert one.returncode == 1 and "waiting for parent/a: another runner holds it" in one.stderr, one.stderr
    assert "child/a: blocked: parent/a still held by another runner after 1 s" in one.stderr, one.stderr
