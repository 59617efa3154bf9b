"""Disk and permission faults in the grid runner.

A full disk is emulated with RLIMIT_FSIZE on the runner (``resource.setrlimit``, inherited by the
kernels it starts, with SIGXFSZ ignored): a write past the limit fails with EFBIG, as a write to a full disk fails with
ENOSPC, at the same point (papermill writing the executed notebook) and leaving the same debris (a
cut notebook). It needs no privileges; a read-only directory would not do, as these tests may run
as root, where permissions do not stop writes. The permission-style fault is a regular file where
a cell's directory belongs (EEXIST), which stops root too.
"""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cdlib.grid.__main__ import main

REPO = Path(__file__).resolve().parents[1]
NB = "tests/notebooks/square.py"
LIMIT = 16_000  # bytes per file: sq/ok's executed notebook is ~9 kB, sq/big's (100 progress steps) ~26 kB


def _grid(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "out"
    spec = {"name": "f", "output_root": str(root),
            "axes": {"x": {"big": {"all": {"x": 3, "steps": 100}}, "blocked": {"all": {"x": 4}},
                           "ok": {"all": {"x": 2}}}},
            "stages": {"sq": {"notebook": NB, "axes": ["x"]}}}
    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    cells = root / "f/sq"
    cells.mkdir(parents=True)
    (cells / "blocked").write_text("a file where the cell's directory belongs\n")
    return path, cells


@contextlib.contextmanager
def _full_disk(limit: int):
    """No file of this process or of the kernels it starts grows past ``limit`` bytes while in the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def _faulted_run(tmp_path: Path, capsys) -> tuple[Path, Path]:
    """``grid run`` (in this process, as the CLI) with a full disk and a blocked cell directory."""
    grid, cells = _grid(tmp_path)
    with _full_disk(LIMIT):
        rc = main(["run", str(grid)])  # a raw traceback would fail the test here
    text = "".join(capsys.readouterr())
    assert rc == 1, text
    assert "Traceback" not in text, text
    # each faulted cell says which file and which errno; the runner went on to the next cell
    assert "sq/big: failed" in text and f"{cells}/big/square.ipynb: [Errno 27] File too large (EFBIG)" in text, text
    assert "sq/blocked: failed" in text and f"{cells}/blocked: [Errno 17] File exists (EEXIST)" in text, text
    assert "sq/ok: done" in text, text
    assert "2 cell(s) not done: sq/big (failed), sq/blocked (failed)" in text, text
    m = json.loads((cells / "big/manifest.json").read_text())
    assert m["status"] == "failed", m
    assert (m["error"]["errno"], m["error"]["errno_name"], m["error"]["path"]) == (
        27, "EFBIG", str(cells / "big/square.ipynb"))
    assert not (cells / "big/square.ipynb").exists(), "the cut executed notebook is removed"
    assert not list(tmp_path.rglob("*.tmp")), list(tmp_path.rglob("*.tmp"))
    json.loads((cells / "ok/square.ipynb").read_text())
    return grid, cells


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # grid files name notebooks relative to the repository root


def test_disk_faults_fail_their_cell_only_with_path_and_errno(tmp_path, capsys, in_repo):
    _faulted_run(tmp_path, capsys)


@pytest.mark.slow
def test_a_rerun_after_the_fault_is_mended_resumes(tmp_path, capsys, in_repo):
    grid, cells = _faulted_run(tmp_path, capsys)
    (cells / "blocked").unlink()  # space freed, path mended
    rc = main(["run", str(grid)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "1 already done, 2 to run" in out, out
    attempts = {x: json.loads((cells / x / "manifest.json").read_text())["attempts"] for x in ("big", "blocked", "ok")}
    assert attempts == {"big": 2, "blocked": 1, "ok": 1}
    assert json.loads((cells / "big/metrics.json").read_text())["y"] == 9
    json.loads((cells / "big/square.ipynb").read_text())


def _tmpfs_namespace() -> bool:
    """Whether this process may mount a tmpfs in a private mount namespace (root with CAP_SYS_ADMIN)."""
    import shutil

    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _tmpfs_namespace(), reason="mounting a tmpfs needs root (CAP_SYS_ADMIN)")
def test_a_full_tmpfs_under_toy_generate_and_compress(tmp_path):
    """The issue's scenario on a real full disk: a small tmpfs, mounted in a private mount namespace
    (invisible outside, gone when the script ends), under toy generate and compress cells."""
    mnt, copy = tmp_path / "mnt", tmp_path / "copy"
    mnt.mkdir()
    spec = {"name": "g", "output_root": str(mnt / "out"),
            "axes": {"teacher": {"a": {"generate": {"seed": 0}}, "b": {"generate": {"seed": 1}}}},
            "stages": {"generate": {"notebook": "notebooks/01_generate.py", "axes": ["teacher"],
                                    "params": {"datasets": ["toy"], "toy": {"n_train": 300, "n_test": 10},
                                               "rounds": 2}},
                       "compress": {"notebook": "notebooks/02_compress.py", "axes": ["teacher"],
                                    "inputs": {"traces": "generate/{teacher}"},
                                    "params": {"compressor": "extractive"}}}}
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump(spec, sort_keys=False))
    run = f"{sys.executable} -m cdlib.grid run {grid}"
    script = f"""
    mount -t tmpfs -o size=4m tmpfs {mnt}
    head -c $((4096 * 1024 - 560 * 1024)) /dev/zero > {mnt}/filler  # about 0.5 MB left
    {run} > {tmp_path}/first.txt 2>&1; echo $? > {tmp_path}/first.rc
    cp -r {mnt}/out {copy}
    rm {mnt}/filler
    {run} > {tmp_path}/second.txt 2>&1; echo $? > {tmp_path}/second.rc
    cp -r {mnt}/out/g {copy}/second
    """
    subprocess.run(["unshare", "-m", "bash", "-c", script], cwd=REPO, check=True, timeout=1200)
    first = (tmp_path / "first.txt").read_text()
    assert (tmp_path / "first.rc").read_text().strip() == "1", first
    assert "Traceback" not in first and "[Errno 28] No space left on device (ENOSPC)" in first, first
    failed = [json.loads(m.read_text()) for m in (copy / "g/generate").glob("*/manifest.json")]
    assert failed and all(m["status"] == "failed" and m["error"]["errno"] == 28 for m in failed), failed
    assert not list(copy.rglob("*.tmp")), list(copy.rglob("*.tmp"))
    for nb in copy.rglob("*.ipynb"):
        json.loads(nb.read_text())  # no cut notebook remains
    second = (tmp_path / "second.txt").read_text()
    assert (tmp_path / "second.rc").read_text().strip() == "0", second
    for store in ("generate/a/traces.jsonl", "generate/a/attempts.jsonl", "compress/b/compressed.jsonl"):
        ids = [json.loads(line)["id"] for line in (copy / "second" / store).read_text().splitlines()]
        assert ids and len(ids) == len(set(ids)), (store, len(ids), len(set(ids)))


def test_an_os_error_raised_inside_a_notebook_keeps_its_errno_and_path():
    """A store append that hits a full disk inside the kernel reaches the runner as papermill's
    execution error; the manifest's error still names the file and the errno."""
    from papermill.exceptions import PapermillExecutionError

    from cdlib.grid.cells import _cell_error

    exc = PapermillExecutionError(cell_index=3, exec_count=4, source="store.append(row)", ename="OSError",
                                  evalue="[Errno 28] No space left on device: '/o/generate/a/traces.jsonl'",
                                  traceback=[])
    err = _cell_error(exc)
    assert (err["errno"], err["errno_name"], err["path"], err["notebook_cell"]) == (
        28, "ENOSPC", "/o/generate/a/traces.jsonl", 4)


def test_a_full_disk_names_the_store_the_kernel_was_writing_not_the_notebook(tmp_path, capsys, in_repo):
    """The store is cut first (the kernel's OSError), then papermill cannot write the executed notebook holding
    that error either: the manifest names the store, and the notebook write beside it."""
    spec = {"name": "s", "output_root": str(tmp_path / "out"),
            "stages": {"fill": {"notebook": "tests/notebooks/store_filler.py",
                                "params": {"chatter": 2 * LIMIT, "records": 40}}}}
    grid = tmp_path / "s.yaml"
    grid.write_text(yaml.safe_dump(spec))
    with _full_disk(LIMIT):
        rc = main(["run", str(grid)])
    text = "".join(capsys.readouterr())
    cell = tmp_path / "out/s/fill"
    assert rc == 1 and "Traceback" not in text, text
    m = json.loads((cell / "manifest.json").read_text())
    assert (m["error"]["errno"], m["error"]["path"]) == (27, str(cell / "records.jsonl")), m["error"]
    assert m["error"]["notebook_write"] == f"{cell}/store_filler.ipynb: [Errno 27] File too large (EFBIG)", m["error"]
    assert f"[Errno 27] File too large: '{cell}/records.jsonl'" in text, text


def test_a_corrupt_params_yaml_refuses_its_cell_in_one_line_naming_file_and_line(tmp_path, capsys, in_repo):
    grid, cells = _grid(tmp_path)
    (cells / "blocked").unlink()
    (cells / "big").mkdir()
    (cells / "big/params.yaml").write_text("x: 3\nsteps: [100\n")  # cut by a crash of whatever wrote it
    rc = main(["run", str(grid)])
    text = "".join(capsys.readouterr())
    assert rc == 1 and "Traceback" not in text, text
    assert f"sq/big: REFUSED: {cells}/big/params.yaml:3: not valid YAML" in text, text
    assert "sq/ok: done" in text and "sq/blocked: done" in text, text
    assert main(["status", str(grid)]) == 0
    text = "".join(capsys.readouterr())
    assert f"REFUSED sq/big: {cells}/big/params.yaml:3: not valid YAML" in text and "Traceback" not in text, text


@pytest.mark.parametrize("name,text", [("stage.yaml", "a: 1\n"), ("stage.ipynb", "{not json")])
def test_a_notebook_that_is_no_notebook_is_one_line_naming_the_key(tmp_path, capsys, in_repo, name, text):
    (tmp_path / name).write_bytes(text.encode())
    spec = {"name": "n", "output_root": str(tmp_path / "out"), "stages": {"sq": {"notebook": str(tmp_path / name)}}}
    grid = tmp_path / "n.yaml"
    grid.write_text(yaml.safe_dump(spec))
    for command in ("run", "status", "slurm"):
        assert main([command, str(grid)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {grid}:5: key 'stages.sq.notebook': {tmp_path / name}: not a notebook"), err
        assert len(err.strip().splitlines()) == 1, err
