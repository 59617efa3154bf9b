"""Running a grid's cells: one decision rule, papermill, locks, manifests and ``results.parquet``.

Every run path (in order in this process, ``--jobs N`` subprocesses, one ``--cell`` as a Slurm
array task runs it) asks :func:`decide` what to do with a cell: run it, skip it (done and
current), leave it blocked (an input failed, is stale or will not run), refuse it (conflict: its
directory's ``params.yaml`` differs from the grid's or is unreadable; stale: see below) or wait
(an input still runs, in this run or under another runner's lock).

Staleness is by content, not by clock. Each cell records in its manifest the identity of every
input it read (``consumed``: input cell id -> a hash of that cell's params, metrics and records,
:func:`cdlib.grid.cells.output_identity`); a cell whose inputs' identities now differ is stale
(:func:`stale`). A stale ``after: all`` cell (a report, which reads every cell above it) simply
runs again. Any other stale cell is refused, naming the inputs that changed, and its downstream
cells are blocked: its directory holds records made from the old inputs, which a resumed store
would mix with new ones. ``--rerun-stale`` redoes it from an emptied directory instead. ``grid
status`` shows such cells as ``stale``; ``grid slurm`` leaves them out unless given ``--rerun-stale``.

Each cell runs its notebook with papermill into its directory (:mod:`cdlib.grid.cells`: the lock, the
manifest with the stage ``kind``, ``inputs`` and ``consumed``, ``log.txt``). Under the cell's lock
the directory is judged again (:func:`cdlib.grid.cells.run_cell`), so two runners on two versions of a
grid never write into one cell. Done cells are skipped, failed or interrupted ones rerun in place
(their stores resume), a failure never stops the other cells (nor does a full disk or a read-only
directory: the cell fails naming the path and errno). A cell, or an input, that another runner
holds is waited for (at most ``held_timeout`` seconds, saying so) and then taken as that runner
left it. ``results.parquet`` collects a row per finished cell.

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

from cdlib.grid.cells import (LOCK_FILE, LOCKED_EXIT, cell_status, changed_inputs, device, os_error,
                              params_conflict, recorded_identity, run_cell)
from cdlib.grid.spec import Cell, Grid
from cdlib.outputs import flatten_metrics, read_manifest, read_metrics
from cdlib.params import ParamsError
from cdlib.progress import RunProgress, duration, planned_size
from cdlib.secrets import scrub_text


# --------------------------------------------------------------------------- the decision


BAD = {"failed", "conflict", "blocked", "stale"}  # an input in one of these states will not be done in this run
HELD = {"running", "locked"}  # another runner holds the cell's lock: it is waited for
HELD_TIMEOUT_S = 24 * 3600.0  # how long a runner waits for cells another runner holds, by default
CONFLICT_EXIT, STALE_EXIT = 4, 5  # exit codes of `grid run --cell` refusing its cell (besides LOCKED_EXIT)


def consumed_now(grid: Grid, c: Cell) -> dict[str, str | None]:
    """What ``c`` would read now: input cell id -> its identity (:func:`cdlib.grid.cells.recorded_identity`,
    None when not done); for an ``after: all`` cell, every done cell of the stages above it."""
    if not c.after_all:
        return {u: recorded_identity(grid.root / grid.cell(u).directory) for u in c.depends_on}
    now = {u: recorded_identity(grid.root / grid.cell(u).directory) for u in grid.above(c, (t.id for t in grid.cells))}
    return {u: ident for u, ident in now.items() if ident is not None}


def stale(grid: Grid, c: Cell) -> list[str]:
    """The cells whose outputs differ from those ``c`` read when it last started (its inputs, or for an
    ``after: all`` cell the cells above it: also one finished or gone since); [] if current or never run."""
    manifest = read_manifest(grid.root / c.directory)
    return changed_inputs(manifest, consumed_now(grid, c)) if manifest else []


def decide(grid: Grid, c: Cell, status: dict[str, str], waiting: Any = frozenset(),
           rerun_stale: bool = False) -> tuple[str, list[str]]:
    """What to do with cell ``c`` now; the one rule of every run path. Returns (action, cell ids):

    ``conflict``: its directory's params.yaml differs from the grid's (or is unreadable), refused;
    ``blocked`` (the inputs that will not be done): an input failed, was refused, is stale or
    blocked, or is neither done, nor held by another runner, nor in ``waiting`` (the cells of this
    run not finished yet);
    ``wait``: an input, or for ``after: all`` a cell above, is in ``waiting`` or held by another
    runner (status ``running`` or ``locked``);
    ``stale`` (the inputs that changed): refused unless ``rerun_stale``, then ``run``; an ``after:
    all`` cell whose cells above changed is ``run``;
    ``skip``: done and current; ``run``: pending, failed, interrupted (its runner died: it resumes).
    ``status`` maps cell ids to :func:`cell_status` or to what this run made of them.
    """
    if status[c.id] == "conflict":
        return "conflict", []

    def lost(u: str) -> bool:
        st = status.get(u)
        if u in waiting:
            return False
        return st in BAD or st not in ("done", *HELD) or (st == "done" and bool(stale(grid, grid.cell(u))))

    gone = [u for u in c.depends_on if lost(u)]
    if gone:
        return "blocked", gone
    busy = [u for u in c.depends_on if status.get(u) != "done"]
    busy += grid.above(c, set(waiting) | {u for u, s in status.items() if s in HELD}) if c.after_all else []
    if busy:
        return "wait", busy
    changed = stale(grid, c)
    if changed:
        return ("run" if c.after_all or rerun_stale else "stale"), changed
    if status[c.id] == "done":
        return "skip", []
    return "run", []


def with_work(grid: Grid, cells: list[Cell], status: dict[str, str]) -> list[Cell]:
    """The cells of ``cells`` (in grid order) a run would not skip now (:func:`decide`), and every cell
    downstream of one of those (its inputs, or for ``after: all`` a stage above, may change)."""
    todo: list[Cell] = []
    ids: set[str] = set()
    for c in cells:
        upstream = [*c.depends_on, *(grid.above(c, ids) if c.after_all else [])]
        if decide(grid, c, status)[0] != "skip" or any(u in ids for u in upstream):
            todo.append(c)
            ids.add(c.id)
    return todo


def _not_run(grid: Grid, head: str, c: Cell, action: str, ids: list[str]) -> str:
    """The line said for a cell that does not run now (any action but run and wait)."""
    if action == "conflict":
        return f"{head}: REFUSED: {params_conflict(c, grid.root) or 'its params.yaml differs from the grid'}"
    if action == "stale":
        return (f"{head}: REFUSED, stale: {', '.join(ids)} changed since it ran (their outputs differ from those "
                f"it read); rerun with --rerun-stale to redo it from an emptied {c.directory}")
    if action == "blocked":
        return f"{head}: blocked, waiting for {', '.join(ids)}"
    return f"{head}: done, current"


def _finished_message(grid: Grid, head: str, c: Cell, m: dict[str, Any]) -> str:
    if m["status"] == "locked":
        return f"{head}: skipped, another runner holds its lock ({c.directory}/{LOCK_FILE}) and runs it"
    if m["status"] in ("conflict", "stale"):
        return _not_run(grid, head, c, m["status"], m.get("changed") or [])
    msg = f"{head}: {m['status']} in {m.get('wall_clock_s') or 0:.1f} s"
    if m["status"] == "failed":
        e = m.get("error") or {"type": "Error", "message": "no error recorded"}
        msg += f"\n    {e['type']}: {e['message'][:300]}"
        if e.get("notebook_cell") is not None:
            msg += f" (notebook cell [{e['notebook_cell']}])"
        if m.get("manifest_error"):
            msg += f"\n    {m['manifest_error']}"
        msg += f"\n    see {c.directory}/log.txt and {c.directory}/{c.notebook.stem}.ipynb"
    return scrub_text(msg)


# --------------------------------------------------------------------------- run paths


def run(grid: Grid, stage: str | None = None, only: dict[str, str] | None = None, progress: bool = True,
        jobs: int = 1, rerun_stale: bool = False, held_timeout: float = HELD_TIMEOUT_S) -> dict[str, str]:
    """Run the selected cells with work left (:func:`with_work`); returns cell id -> final status.

    ``jobs=1`` runs them one after another, in stage order, in this process; ``jobs>1`` runs up to
    that many at once, each in its own ``--cell`` subprocess (see :func:`run_parallel`).
    ``rerun_stale`` redoes stale cells instead of refusing them; ``held_timeout`` bounds the wait
    for cells another runner holds.
    """
    grid.validate_cells()
    selected = grid.select(stage, only)
    status = {c.id: cell_status(c, grid.root) for c in grid.cells}
    todo = with_work(grid, selected, status)
    print(f"{grid.path}: {len(selected)} cells selected, {len(selected) - len(todo)} already done, "
          f"{len(todo)} to run" + (f", {jobs} at a time" if jobs > 1 and todo else ""), flush=True)
    t0 = time.monotonic()
    keys, prior = eta_inputs(grid, todo)
    view = RunProgress(len(todo), jobs, cells=keys, prior=prior).start()
    try:
        results = run_parallel(grid, todo, status, jobs, view=view, progress=progress, rerun_stale=rerun_stale,
                               held_timeout=held_timeout)
    finally:
        view.stop()
    _write_results_or_say(grid, lambda m: print(m, flush=True))
    print(run_summary(grid, results, time.monotonic() - t0), flush=True)
    return results


def eta_inputs(grid: Grid, todo: list[Cell]) -> tuple[dict[str, Any], list[tuple[Any, float]]]:
    """What the run's ETA times cells by (:class:`cdlib.progress.Estimator`): each cell to run as (stage,
    kind, planned size), and every cell whose manifest records a finished run (wall clock) from earlier."""
    keys = {c.id: (c.stage, c.kind, planned_size(c.kind, c.params)) for c in todo}
    prior = []
    for c in grid.cells:
        m = read_manifest(grid.root / c.directory) or {}
        if m.get("status") == "done" and isinstance(m.get("wall_clock_s"), (int, float)):
            prior.append(((c.stage, c.kind, planned_size(c.kind, c.params)), float(m["wall_clock_s"])))
    return keys, prior


def run_summary(grid: Grid, results: dict[str, str], seconds: float) -> str:
    """The run's last line: cells done / failed / blocked (and any other end), its wall clock, and where the
    report is when the grid has a report stage that is done."""
    counts: dict[str, int] = {"done": 0, "failed": 0, "blocked": 0}
    for st in results.values():
        counts[st] = counts.get(st, 0) + 1
    line = f"run finished in {duration(seconds)}: " + ", ".join(f"{n} {st}" for st, n in counts.items())
    for c in grid.cells:
        if c.kind == "report" and cell_status(c, grid.root) == "done":
            page = grid.root / c.directory / "index.html"
            line += f" · report: {c.directory / 'index.html' if page.exists() else c.directory}"
    return line


def _refresh_held(grid: Grid, status: dict[str, str], ids: list[str], timeout: float, since: float,
                  say: Any) -> list[str]:
    """One poll of cells another runner holds: their status re-read into ``status``; returns those no
    longer held (said, with the status that runner left). Raises TimeoutError past ``timeout`` s since ``since``."""
    released = []
    for u in ids:
        st = cell_status(grid.cell(u), grid.root)
        if st not in HELD:
            status[u] = st
            released.append(u)
            say(f"{u}: {st}, as another runner left it")
    if not released and time.monotonic() - since > timeout:
        raise TimeoutError(f"{', '.join(ids)} still held by another runner after {timeout:.0f} s (--held-timeout)")
    return released


def _held_message(ids: list[str], timeout: float) -> str:
    return (f"waiting for {', '.join(ids)}: another runner holds {'it' if len(ids) == 1 else 'them'} "
            f"(for at most {timeout:.0f} s, --held-timeout)")


def run_one(grid: Grid, c: Cell, rerun_stale: bool = False, held_timeout: float = HELD_TIMEOUT_S,
            poll_s: float = 2.0) -> int:
    """``grid run --cell ID`` (a ``--jobs`` subprocess, a Slurm array task): the exit code is 0 when
    the cell is done, :data:`LOCKED_EXIT` when another runner holds it, :data:`CONFLICT_EXIT` or
    :data:`STALE_EXIT` when it is refused, else 1. Inputs another runner holds are waited for."""
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    ids = [c.id, *c.depends_on, *(grid.above(c, (t.id for t in grid.cells)) if c.after_all else [])]
    status = {u: cell_status(grid.cell(u), grid.root) for u in ids}
    since = time.monotonic()
    action, ids = decide(grid, c, status, rerun_stale=rerun_stale)
    if action == "wait":
        say(_held_message(ids, held_timeout))
    while action == "wait":
        time.sleep(poll_s)
        try:
            _refresh_held(grid, status, [u for u in ids if status.get(u) in HELD], held_timeout, since, say)
        except TimeoutError as e:
            say(f"{c.id}: blocked: {e}")
            return 1
        action, ids = decide(grid, c, status, rerun_stale=rerun_stale)
    if action in ("conflict", "blocked", "stale"):
        say(_not_run(grid, c.id, c, action, ids))
        return {"conflict": CONFLICT_EXIT, "stale": STALE_EXIT}.get(action, 1)
    m = {"status": "done"} if action == "skip" else run_cell(c, grid.root, consumed=consumed_now(grid, c),
                                                                rerun_stale=rerun_stale)
    if m["status"] == "done":
        _write_results_or_say(grid, say)
    print(_finished_message(grid, c.id, c, m) if m["status"] != "done" else f"{c.id}: done")
    return {"done": 0, "locked": LOCKED_EXIT, "conflict": CONFLICT_EXIT, "stale": STALE_EXIT}.get(m["status"], 1)


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
        _, n = device()
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


def wide_slot(slots: list[dict[str, str]]) -> dict[str, str]:
    """One slot holding every CPU and GPU of ``slots``: what a ``wide: true`` stage's cell runs on."""
    cpus = sorted({int(x) for s in slots for x in s["CDLIB_CPUS"].split(",")})
    gpus = [g for s in slots for g in s.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
    return slot_resources(1, cpus=cpus, gpus=gpus)[0]


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


def _launch(grid: Grid, c: Cell, slot: dict[str, str], rerun_stale: bool) -> tuple[subprocess.Popen, Any]:
    """Start ``python -m cdlib.grid run GRID --cell ID`` on ``slot``'s CPUs/GPUs; its output goes to a temporary
    file."""
    out = tempfile.TemporaryFile()
    cpus = [int(x) for x in slot["CDLIB_CPUS"].split(",")]
    cmd = [sys.executable, "-m", "cdlib.grid", "run", str(Path(grid.path).resolve()), "--cell", c.id]
    p = subprocess.Popen(cmd + (["--rerun-stale"] if rerun_stale else []), cwd=grid.root, env={**os.environ, **slot},
                         stdout=out, stderr=subprocess.STDOUT, preexec_fn=lambda: _child_setup(cpus))
    return p, out


def _reaped(grid: Grid, c: Cell, p: subprocess.Popen, out: Any) -> dict[str, Any]:
    """The manifest of a finished ``--cell`` subprocess (or why it has none)."""
    m = read_manifest(grid.root / c.directory) or {}
    if p.returncode == LOCKED_EXIT:  # another runner holds the cell
        m = {"status": "locked"}
    elif p.returncode in (CONFLICT_EXIT, STALE_EXIT):  # refused under its lock
        m = {"status": "conflict" if p.returncode == CONFLICT_EXIT else "stale", "changed": stale(grid, c)}
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


def run_parallel(grid: Grid, todo: list[Cell], status: dict[str, str], jobs: int, poll_s: float = 0.5,
                 view: Any = None, progress: bool = False, rerun_stale: bool = False,
                 held_timeout: float = HELD_TIMEOUT_S) -> dict[str, str]:
    """Run ``todo``: with ``jobs=1`` one cell after another in this process, in stage order; else up to
    ``jobs`` at once, each as ``python -m cdlib.grid run GRID --cell ID``.

    A cell starts as soon as :func:`decide` says run (its inputs are done; an ``after: all``
    cell also waits for every cell of this run above it, since it reads their results), with
    ``jobs>1`` the ready cell with the longest chain of cells waiting on it first
    (:func:`critical_first`); a cell whose input failed is reported blocked. Each subprocess gets its
    own slice of CPUs or GPUs (:func:`slot_resources`) and writes its notebook's output to the
    cell's ``log.txt``, as in a sequential run. A cell of a ``wide: true`` stage, once it is the next
    ready cell, waits for the running cells to end (nothing else starts meanwhile) and then runs on
    every slot at once (:func:`wide_slot`). Interrupting the runner stops them all.

    When nothing else can start, the cells another runner holds (inputs of cells left, and cells
    of this run found locked) are polled until that runner lets them go, for at most
    ``held_timeout`` seconds without any of them let go: each then counts as that runner left it (a
    cell it left pending or interrupted is run here), and cells still waiting on one are blocked.
    """
    say = view.say if view is not None else (lambda m: print(m, flush=True))
    slots = slot_resources(jobs) if jobs > 1 else [{}]
    free = list(range(jobs))
    pending = critical_first(todo) if jobs > 1 else list(todo)
    running: dict[str, tuple[subprocess.Popen, list[int], Any, Cell]] = {}
    results: dict[str, str] = {}
    locked: list[str] = []  # cells of this run another runner held when their turn came
    retaken: set[str] = set()
    held_since: float | None = None
    started = 0

    def finished(c: Cell, m: dict[str, Any], head: str) -> None:
        status[c.id] = results[c.id] = m["status"]
        if view is not None:
            view.finished(c.id)
        if m["status"] == "locked":
            locked.append(c.id)
        if m["status"] == "done" and jobs == 1:
            _write_results_or_say(grid, say)  # kept current, so a later report cell in this run reads it
        say(_finished_message(grid, head, c, m))

    try:
        while pending or running or locked:
            progressed = False
            for c in list(pending):
                waiting = {t.id for t in pending} | set(running)  # not finished yet
                action, ids = decide(grid, c, status, waiting, rerun_stale)
                if action == "run" and c.wide and jobs > 1 and len(free) < jobs:
                    break  # it waits for every slot: nothing else starts before it
                if action == "wait" or (action == "run" and not free):
                    continue
                pending.remove(c)
                progressed = True
                if action != "run":
                    if view is not None:
                        view.skipped(c.id)
                    say(_not_run(grid, c.id, c, action, ids))
                    status[c.id] = results[c.id] = "done" if action == "skip" else action
                    continue
                started += 1
                head = f"[{started}/{len(todo)}] {c.id}"
                if view is not None:
                    view.started(c.id, grid.root / c.directory / "log.txt")
                if jobs == 1:
                    say(f"{head}: running {c.notebook} (log: {c.directory}/log.txt) ...")
                    finished(c, run_cell(c, grid.root, progress=progress, consumed=consumed_now(grid, c),
                                         rerun_stale=rerun_stale), head)
                    continue
                if c.wide:
                    mine, free[:] = sorted(free), []
                    env = wide_slot([slots[i] for i in mine])
                    where = f"every slot: CPUs {env['CDLIB_CPUS']}"
                else:
                    mine = [free.pop(0)]
                    env, where = slots[mine[0]], f"slot {mine[0]}"
                say(f"{head}: running {c.notebook} (log: {c.directory}/log.txt, {where}) ...")
                p, out = _launch(grid, c, env, rerun_stale)
                running[c.id] = (p, mine, out, c)
                status[c.id] = "running"
            if running:
                time.sleep(poll_s)
                for cid, (p, mine, out, c) in list(running.items()):
                    if p.poll() is None:
                        continue
                    del running[cid]
                    free.extend(mine)
                    finished(c, _reaped(grid, c, p, out), c.id)
                held_since = None
                continue
            if progressed:
                held_since = None
                continue
            # nothing can start: what is left waits for cells another runner holds, or can never start
            left = {t.id for t in pending}
            held = sorted({*locked, *(u for c in pending for u in decide(grid, c, status, left)[1]
                                      if status.get(u) in HELD)})
            if not held:
                for c in pending:  # inputs from a later stage
                    say(f"{c.id}: blocked, its inputs never became ready")
                    status[c.id] = results[c.id] = "blocked"
                pending = []
                continue
            if held_since is None:
                held_since = time.monotonic()
                say(_held_message(held, held_timeout))
            time.sleep(poll_s)
            try:
                released = _refresh_held(grid, status, held, held_timeout, held_since, say)
            except TimeoutError as e:
                for c in pending:
                    say(f"{c.id}: blocked: {e}")
                    status[c.id] = results[c.id] = "blocked"
                pending, locked = [], []
                continue
            for u in released:
                if u in locked:
                    locked.remove(u)
                    results[u] = status[u]
                    if status[u] in ("pending", "interrupted") and u not in retaken:  # that runner gave it up
                        retaken.add(u)
                        pending.insert(0, grid.cell(u))
    finally:
        for p, *_ in running.values():  # Ctrl-C: interrupt the cells still running; papermill stops their kernels
            p.send_signal(signal.SIGINT)
        for p, *_ in running.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    return results


# --------------------------------------------------------------------------- results.parquet


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
        m = read_manifest(d)
        if not m or m.get("status") != "done":
            continue
        row: dict[str, Any] = {"stage": c.stage, "cell": c.id, "kind": c.kind, "inputs": json.dumps(c.inputs),
                               **c.axes, "wall_clock_s": m.get("wall_clock_s"), "gpus": m.get("gpus"),
                               "gpu_hours": m.get("gpu_hours"), "device": m.get("device")}
        for k, v in flatten_metrics(read_metrics(d) or {}).items():
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
