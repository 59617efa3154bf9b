"""Running a grid's cells: one decision rule, papermill, locks, manifests and ``results.parquet``.

Every run path (in order in this process, ``--jobs N`` subprocesses, one ``--cell`` as a Slurm
array task runs it) asks :func:`decide` what to do with a cell: run it, skip it (done and
current), leave it blocked (an input failed or will not run), refuse it (conflict: its
directory's ``params.yaml`` differs from the grid's) or wait (``--jobs``: an input still runs).
A cell another runner holds is found under its lock by :func:`run_cell` (status ``locked``).

Each cell runs its notebook with papermill into its directory (:mod:`cdlib.cells`: the lock, the
manifest with the stage ``kind`` and ``inputs``, ``log.txt``). Done cells are skipped, failed or
interrupted ones rerun in place (their stores resume), a failure never stops the other cells (nor
does a full disk or a read-only directory: the cell fails naming the path and errno). ``results.parquet`` collects a row
per finished cell. A finished ``after: all`` cell (a report) runs again when a cell of a stage above
it finished after it.

``--jobs N`` runs up to N cells at once, each in its own subprocess pinned to its share of the CPUs
(and of the GPUs, if any), as soon as its inputs are done: on a 2-core laptop two tiny-model cells
at once, one core each, do 1.36x the training work of one cell on both cores, and one cell's vLLM
start-up overlaps another's work.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cdlib.cells import LOCK_FILE, LOCKED_EXIT, _device, cell_status, os_error, read_json, run_cell
from cdlib.grid import Cell, Grid
from cdlib.params import ParamsError


# --------------------------------------------------------------------------- the decision


BAD = {"failed", "conflict", "blocked", "locked"}  # an input in one of these states will not be done in this run


def _end(grid: Grid, c: Cell) -> str:
    return (read_json(grid.root / c.directory / "manifest.json") or {}).get("end", "")


def _above(grid: Grid, c: Cell, ids: Any) -> list[str]:
    """The cell ids among ``ids`` of stages listed above ``c``'s stage."""
    order = list(grid.spec.stages)
    return [u for u in ids if order.index(u.split("/", 1)[0]) < order.index(c.stage)]


def stale(grid: Grid, c: Cell) -> bool:
    """An ``after: all`` cell (a report) that a cell of a stage above finished after: it read older results."""
    if not c.after_all:
        return False
    end = _end(grid, c)
    return any(_end(grid, grid.cell(u)) > end for u in _above(grid, c, (t.id for t in grid.cells)))


def decide(grid: Grid, c: Cell, status: dict[str, str], waiting: Any = frozenset()) -> tuple[str, list[str]]:
    """What to do with cell ``c`` now; the one rule of every run path. Returns (action, cell ids):

    ``conflict``: its directory's params.yaml differs from the grid's, refused;
    ``blocked`` (the inputs that will not be done): an input failed, was refused or blocked, or is
    neither done nor in ``waiting`` (the cells of this run not finished yet; empty when run in order);
    ``wait`` (``--jobs``): an input, or for ``after: all`` a cell above, is still in ``waiting``;
    ``skip``: done and current; ``run``: pending, failed, interrupted (its runner died: it resumes)
    or an ``after: all`` cell that is stale. ``status`` maps cell ids to :func:`cell_status`.
    """
    if status[c.id] == "conflict":
        return "conflict", []
    lost = [u for u in c.depends_on if status.get(u) in BAD or (status.get(u) != "done" and u not in waiting)]
    if lost:
        return "blocked", lost
    busy = [u for u in c.depends_on if status.get(u) != "done"]
    busy += _above(grid, c, waiting) if c.after_all else []
    if busy:
        return "wait", busy
    if status[c.id] == "done" and not stale(grid, c):
        return "skip", []
    return "run", []


def _refused_message(head: str, c: Cell) -> str:
    return (f"{head}: REFUSED: {c.directory}/params.yaml differs from the grid's params; "
            f"delete that directory or rename the axis value to rerun")


def _not_run(head: str, c: Cell, action: str, ids: list[str]) -> str:
    """The line said for a cell that does not run now (any action but run and wait)."""
    if action == "conflict":
        return _refused_message(head, c)
    if action == "blocked":
        return f"{head}: blocked, waiting for {', '.join(ids)}"
    return f"{head}: done, current"


def _finished_message(head: str, c: Cell, m: dict[str, Any]) -> str:
    if m["status"] == "locked":
        return f"{head}: skipped, another runner holds its lock ({c.directory}/{LOCK_FILE}) and runs it"
    msg = f"{head}: {m['status']} in {m.get('wall_clock_s') or 0:.1f} s"
    if m["status"] == "failed":
        e = m.get("error") or {"type": "Error", "message": "no error recorded"}
        msg += f"\n    {e['type']}: {e['message'][:300]}"
        if e.get("notebook_cell") is not None:
            msg += f" (notebook cell [{e['notebook_cell']}])"
        if m.get("manifest_error"):
            msg += f"\n    {m['manifest_error']}"
        msg += f"\n    see {c.directory}/log.txt and {c.directory}/{c.notebook.stem}.ipynb"
    return msg


# --------------------------------------------------------------------------- run paths


def run(grid: Grid, stage: str | None = None, only: dict[str, str] | None = None,
        progress: bool = True, jobs: int = 1) -> dict[str, str]:
    """Run the selected cells; returns cell id -> final status.

    ``jobs=1`` runs them one after another, in stage order, in this process.
    ``jobs>1`` runs up to that many at once, each in its own ``--cell`` subprocess
    (see :func:`run_parallel`).
    """
    grid.validate_cells()
    selected = grid.select(stage, only)
    status = {c.id: cell_status(c, grid.root) for c in grid.cells}
    todo = [c for c in selected if status[c.id] != "done" or stale(grid, c)]
    order = list(grid.spec.stages)
    first = min((order.index(c.stage) for c in todo), default=len(order))
    # an `after: all` cell reruns after the cells above it that run now
    todo = [c for c in selected if c in todo or (c.after_all and order.index(c.stage) > first)]
    print(f"{grid.path}: {len(selected)} cells selected, {len(selected) - len(todo)} already done, "
          f"{len(todo)} to run" + (f", {jobs} at a time" if jobs > 1 and todo else ""), flush=True)
    from cdlib.progress import RunProgress

    view = RunProgress(len(todo), jobs).start()
    try:
        results = run_parallel(grid, todo, status, jobs, view=view) if jobs > 1 else \
            _run_in_order(grid, todo, status, progress, view)
    finally:
        view.stop()
    _write_results_or_say(grid, lambda m: print(m, flush=True))
    return results


def _run_in_order(grid: Grid, todo: list[Cell], status: dict[str, str], progress: bool,
                  view: Any = None) -> dict[str, str]:
    say = view.say if view is not None else (lambda m: print(m, flush=True))
    results: dict[str, str] = {}
    for i, c in enumerate(todo, 1):
        head = f"[{i}/{len(todo)}] {c.id}"
        action, ids = decide(grid, c, status)
        if action != "run":
            say(_not_run(head, c, action, ids))
            results[c.id] = "done" if action == "skip" else action
            status[c.id] = results[c.id]
            continue
        say(f"{head}: running {c.notebook} (log: {c.directory}/log.txt) ...")
        if view is not None:
            view.started(c.id, grid.root / c.directory / "log.txt")
        m = run_cell(c, grid.root, progress=progress, rerun_done=status[c.id] == "done")
        if view is not None:
            view.finished(c.id)
        status[c.id] = results[c.id] = m["status"]
        if m["status"] == "done":
            _write_results_or_say(grid, say)  # kept current, so a later report cell in this run reads it
        say(_finished_message(head, c, m))
    return results


def run_one(grid: Grid, c: Cell) -> int:
    """``grid run --cell ID`` (a ``--jobs`` subprocess, a Slurm array task): the exit code is 0 when
    the cell is done, :data:`LOCKED_EXIT` when another runner holds it, else 1."""
    status = {u: cell_status(grid.cell(u), grid.root) for u in [c.id, *c.depends_on]}
    action, ids = decide(grid, c, status)
    if action in ("conflict", "blocked"):
        print(_not_run(c.id, c, action, ids), file=sys.stderr)
        return 1
    m = {"status": "done"} if action == "skip" else run_cell(c, grid.root, rerun_done=status[c.id] == "done")
    if m["status"] == "done":
        _write_results_or_say(grid, lambda msg: print(msg, file=sys.stderr))
    print(_finished_message(c.id, c, m) if m["status"] == "failed" else f"{c.id}: {m['status']}")
    return 0 if m["status"] == "done" else LOCKED_EXIT if m["status"] == "locked" else 1


def _write_results_or_say(grid: Grid, say: Any) -> None:
    """:func:`write_results`, where a disk fault is said (path, errno) instead of stopping the run."""
    try:
        write_results(grid)
    except OSError as exc:
        say(f"results.parquet not written: {os_error(exc, grid.root / grid.out_dir)['message']}")


# --------------------------------------------------------------------------- --jobs N


def slot_resources(jobs: int, cpus: list[int] | None = None, gpus: list[str] | None = None) -> list[dict[str, str]]:
    """Environment variables that give each of ``jobs`` parallel cells its own share of the machine.

    CPUs (this process's affinity set unless given) are split into equal, disjoint
    slices: each cell is pinned to its slice, torch/OpenMP use that many threads,
    and vLLM's CPU backend binds its OpenMP threads to it (``VLLM_CPU_OMP_THREADS_BIND``;
    by default every vLLM process would bind to the same core). With more jobs than
    CPUs, slices wrap around. Visible GPUs (``CUDA_VISIBLE_DEVICES`` or all that
    nvidia-smi lists) are split the same way; fewer GPUs than jobs is an error, as
    two cells on one GPU would fight over its memory.
    """
    if cpus is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cpus = sorted(cpus)
    per = max(1, len(cpus) // jobs)
    if gpus is None:
        _, n = _device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = [g.strip() for g in visible.split(",") if g.strip()] if visible else [str(i) for i in range(n)]
    if gpus and len(gpus) < jobs:
        raise ParamsError(f"--jobs {jobs}: only {len(gpus)} GPU(s) visible; cells running at once would share "
                          f"a GPU. Use --jobs {len(gpus)} or fewer")
    slots = []
    for i in range(jobs):
        start = (i * per) % len(cpus)
        mine = cpus[start:start + per]
        env = {"OMP_NUM_THREADS": str(len(mine)), "MKL_NUM_THREADS": str(len(mine)),
               "CDLIB_CPUS": ",".join(map(str, mine))}
        if gpus:
            g = len(gpus) // jobs
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * g:(i + 1) * g])
        else:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, mine))
        slots.append(env)
    return slots


def _child_setup(cpus: list[int]) -> None:
    """In a ``--jobs`` cell process before it starts: pin it to its CPUs and, on Linux, have it
    interrupted (SIGINT, so papermill stops its kernel) if the runner dies, even by SIGKILL:
    an orphaned cell would otherwise race the next run's copy of itself."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGINT)


def _launch(grid: Grid, c: Cell, slot: dict[str, str]) -> tuple[subprocess.Popen, Any]:
    """Start ``python -m cdlib.grid run GRID --cell ID`` on ``slot``'s CPUs/GPUs; its output goes to a temporary file."""
    out = tempfile.TemporaryFile()
    cpus = [int(x) for x in slot["CDLIB_CPUS"].split(",")]
    p = subprocess.Popen([sys.executable, "-m", "cdlib.grid", "run", str(Path(grid.path).resolve()), "--cell", c.id],
                         cwd=grid.root, env={**os.environ, **slot}, stdout=out, stderr=subprocess.STDOUT,
                         preexec_fn=lambda: _child_setup(cpus))
    return p, out


def _reaped(grid: Grid, c: Cell, p: subprocess.Popen, out: Any) -> dict[str, Any]:
    """The manifest of a finished ``--cell`` subprocess (or why it has none)."""
    m = read_json(grid.root / c.directory / "manifest.json") or {}
    if p.returncode == LOCKED_EXIT:  # another runner holds the cell
        m = {"status": "locked"}
    elif m.get("status") not in ("done", "failed"):  # the subprocess died outside the notebook
        out.seek(0)
        tail = out.read().decode(errors="replace")[-1500:]
        m = {"status": "failed", "wall_clock_s": 0.0, "error": {"type": f"exit code {p.returncode}", "message": tail}}
    out.close()
    return m


def critical_first(todo: list[Cell]) -> list[Cell]:
    """``todo`` ordered by the longest chain of this run's cells waiting on each (most first), stage order
    kept among equals, so a free slot goes to the cell that holds up the most work: in the demo the
    raw-trace student and the MPD sampling that waits on it start before students only an evaluation
    waits on, and the run does not end on a chain of single cells with the other slot idle."""
    ids = {c.id for c in todo}
    dependents: dict[str, list[str]] = {c.id: [] for c in todo}
    for c in todo:
        for u in c.depends_on:
            if u in ids:
                dependents[u].append(c.id)
    height: dict[str, int] = {}

    def chain(cid: str) -> int:
        if cid not in height:
            height[cid] = 1 + max((chain(d) for d in dependents[cid]), default=0)
        return height[cid]

    return sorted(todo, key=lambda c: -chain(c.id))


def run_parallel(grid: Grid, todo: list[Cell], status: dict[str, str], jobs: int,
                 poll_s: float = 0.5, view: Any = None) -> dict[str, str]:
    """Run ``todo`` with up to ``jobs`` cells at once, each as ``python -m cdlib.grid run GRID --cell ID``.

    A cell starts as soon as :func:`decide` says run (its inputs are done; an ``after: all``
    cell also waits for every cell of this run above it, since it reads their results), the
    ready cell with the longest chain of cells waiting on it first (:func:`critical_first`); a cell
    whose input failed is reported blocked. Each subprocess gets its own slice of
    CPUs or GPUs (:func:`slot_resources`) and writes its notebook's output to the
    cell's ``log.txt``, as in a sequential run. Interrupting the runner stops them all.
    """
    say = view.say if view is not None else (lambda m: print(m, flush=True))
    slots = slot_resources(jobs)
    free = list(range(jobs))
    pending = critical_first(todo)
    running: dict[str, tuple[subprocess.Popen, int, Any, Cell]] = {}
    results: dict[str, str] = {}
    started = 0
    try:
        while pending or running:
            launched = False
            waiting = {t.id for t in pending} | set(running)  # not finished yet
            for c in list(pending):
                action, ids = decide(grid, c, status, waiting)
                if action == "wait" or (action == "run" and not free):
                    continue
                pending.remove(c)
                if action != "run":
                    say(_not_run(c.id, c, action, ids))
                    status[c.id] = results[c.id] = "done" if action == "skip" else action
                    continue
                slot = free.pop(0)
                started += 1
                say(f"[{started}/{len(todo)}] {c.id}: running {c.notebook} (log: {c.directory}/log.txt, "
                    f"slot {slot}) ...")
                p, out = _launch(grid, c, slots[slot])
                running[c.id] = (p, slot, out, c)
                if view is not None:
                    view.started(c.id, grid.root / c.directory / "log.txt")
                status[c.id] = "running"
                launched = True
            if not running:
                if pending and not launched:  # nothing can ever start (inputs from a later stage)
                    for c in pending:
                        say(f"{c.id}: blocked, its inputs never became ready")
                        status[c.id] = results[c.id] = "blocked"
                    pending = []
                continue
            time.sleep(poll_s)
            for cid, (p, slot, out, c) in list(running.items()):
                if p.poll() is None:
                    continue
                del running[cid]
                free.append(slot)
                m = _reaped(grid, c, p, out)
                status[cid] = results[cid] = m["status"]
                if view is not None:
                    view.finished(cid)
                say(_finished_message(c.id, c, m))
    finally:
        for p, *_ in running.values():  # Ctrl-C: interrupt the cells still running; papermill stops their kernels
            p.send_signal(signal.SIGINT)
        for p, *_ in running.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    return results


# --------------------------------------------------------------------------- what was recorded


def status_table(grid: Grid, stage: str | None = None, only: dict[str, str] | None = None):
    """A polars frame with one row per selected cell: stage, cell, status, wall clock, error."""
    import polars as pl

    rows = []
    for c in grid.select(stage, only):
        st = cell_status(c, grid.root)
        m = read_json(grid.root / c.directory / "manifest.json") or {}
        if st == "pending" and any(cell_status(grid.cell(u), grid.root) != "done" for u in c.depends_on):
            st = "waiting"
        err = m.get("error") or {}
        rows.append({"stage": c.stage, "cell": c.id, "status": st, "wall_clock_s": m.get("wall_clock_s"),
                     "error": (f"{err.get('type')}: {err.get('message', '')[:200]}"
                               + (f" (notebook cell [{err['notebook_cell']}])" if err.get("notebook_cell") is not None else ""))
                     if err and st == "failed" else None})
    return pl.DataFrame(rows, schema={"stage": pl.String, "cell": pl.String, "status": pl.String,
                                      "wall_clock_s": pl.Float64, "error": pl.String})


def print_status(grid: Grid, stage: str | None = None, only: dict[str, str] | None = None) -> None:
    """``grid status``: the cells, the counts per stage and status, and each failure's error."""
    import polars as pl

    table = status_table(grid, stage, only)
    with pl.Config(tbl_rows=-1, tbl_width_chars=200, fmt_str_lengths=120, tbl_hide_dataframe_shape=True):
        print(table.select("stage", "cell", "status", "wall_clock_s"))
        print(table.group_by("stage", "status", maintain_order=True).len())
        for r in table.filter(pl.col("status") == "failed").iter_rows(named=True):
            print(f"FAILED {r['cell']}: {r['error']}")


def flatten_metrics(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """metrics.json as dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``), as results.parquet stores them."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_metrics(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def write_results(grid: Grid) -> Path | None:
    """Write ``outputs/<grid>/results.parquet``: one row per finished cell (axes, metrics, cost).

    Columns: ``stage``, ``cell``, ``kind`` (the stage kind), ``inputs`` (JSON of input name ->
    input cell id), one per axis (the value name), run cost, then the cell's ``metrics.json``
    flattened (``a.b`` for nested keys); a metric whose name is taken by an axis (or one of
    those columns) is stored as ``metric.<name>``.
    """
    import json

    import polars as pl

    rows = []
    taken = {"stage", "cell", "kind", "inputs", "wall_clock_s", "gpus", "gpu_hours", "device", *grid.spec.axes}
    for c in grid.cells:
        d = grid.root / c.directory
        m = read_json(d / "manifest.json")
        if not m or m.get("status") != "done":
            continue
        row: dict[str, Any] = {"stage": c.stage, "cell": c.id, "kind": c.kind, "inputs": json.dumps(c.inputs),
                               **c.axes, "wall_clock_s": m.get("wall_clock_s"), "gpus": m.get("gpus"),
                               "gpu_hours": m.get("gpu_hours"), "device": m.get("device")}
        for k, v in flatten_metrics(read_json(d / "metrics.json") or {}).items():
            row[f"metric.{k}" if k in taken else k] = v
        rows.append(row)
    if not rows:
        return None
    path = grid.root / grid.out_dir / "results.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pl.DataFrame(rows, infer_schema_length=None).with_columns(pl.col("kind").cast(pl.String))
    tmp = path.with_suffix(f".parquet.{os.getpid()}.tmp")  # Slurm array tasks may write at once
    try:
        df.write_parquet(tmp)
        os.replace(tmp, path)
    except (OSError, pl.exceptions.PolarsError) as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        found = re.search(r"os error (\d+)", str(e))  # polars reports a full disk as a ComputeError
        if isinstance(e, OSError) or not found:
            raise
        raise OSError(int(found.group(1)), os.strerror(int(found.group(1))), str(path)) from e
    return path
