"""``grid status``: what each selected cell's directory says now (done, failed, stale, waiting, blocked,
queued in Slurm, held by another runner), one line per cell, with a legend and why each bad cell is so.
"""

from __future__ import annotations

from cdlib.grid.cells import cell_status, params_conflict
from cdlib.grid.runner import BAD, stale
from cdlib.grid.slurm import queued_in_slurm
from cdlib.grid.spec import Grid
from cdlib.outputs import read_manifest
from cdlib.progress import duration
from cdlib.secrets import scrub_text


def status_table(grid: Grid, stage: str | None = None, only: dict[str, str] | None = None):
    """A polars frame with one row per selected cell: stage, cell, status, wall clock, error.

    Besides :func:`cell_status`'s: ``blocked`` (pending, an input failed, was refused or is blocked: ``error``
    names it), ``waiting`` (pending, an input not done yet: ``error`` names it), ``queued`` (Slurm has its
    task pending, :func:`cdlib.grid.slurm.queued_in_slurm`), ``locked`` (another runner holds its lock but has
    not started it) and ``stale`` (an input changed since the cell ran, :func:`stale`; ``error`` names them).
    ``error`` also holds a failed cell's error and why a ``conflict`` cell is refused; ``slurm`` the Slurm
    array job and task that ran it last (or holds it queued)."""
    import polars as pl

    queued = queued_in_slurm(grid)
    known: dict[str, str] = {}

    def state(u: str) -> str:  # an input's status, pending ones whose own inputs will not be done as blocked
        if u not in known:
            st = cell_status(grid.cell(u), grid.root)
            known[u] = "blocked" if st == "pending" and any(state(v) in BAD for v in grid.cell(u).depends_on) else st
        return known[u]

    rows = []
    for c in grid.select(stage, only):
        st = cell_status(c, grid.root)
        m = read_manifest(grid.root / c.directory) or {}
        job = m.get("slurm_job")
        err = m.get("error") or {}
        why = (f"{err.get('type')}: {err.get('message', '')[:200]}"
               + (f" (notebook cell [{err['notebook_cell']}])" if err.get("notebook_cell") is not None else "")
               if err and st == "failed" else None)
        changed = stale(grid, c) if st in ("done", "failed", "interrupted") else []
        if changed:
            st, why = "stale", f"{', '.join(changed)} changed since it ran; `grid run --rerun-stale` redoes it"
        elif c.id in queued and st != "running":
            st, job = "queued", queued[c.id]
        elif st == "pending" and any(state(u) != "done" for u in c.depends_on):
            bad = [u for u in c.depends_on if state(u) in BAD]
            st = "blocked" if bad else "waiting"
            why = ", ".join(f"{u} ({state(u)})" for u in (bad or [u for u in c.depends_on if state(u) != "done"]))
            why = f"{st} by {why}" if bad else f"waiting for {why}"
        elif st == "running" and m.get("status") != "running":
            st = "locked"
        elif st == "conflict":
            why = params_conflict(c, grid.root)
        rows.append({"stage": c.stage, "cell": c.id, "status": st, "wall_clock_s": m.get("wall_clock_s"),
                     "slurm": job, "error": scrub_text(why) if why else None})
    return pl.DataFrame(rows, schema={"stage": pl.String, "cell": pl.String, "status": pl.String,
                                      "wall_clock_s": pl.Float64, "slurm": pl.String, "error": pl.String})


#: what each status of ``grid status`` means, printed under its table
LEGEND = {
    "pending": "not run yet, its inputs are done",
    "waiting": "its inputs are not done yet",
    "blocked": "an input failed, was refused or is blocked",
    "stale": "an input changed since it ran (--rerun-stale redoes it)",
    "running": "running now",
    "done": "finished",
    "failed": "ended with an error (run retries it)",
    "interrupted": "its runner died (run resumes it)",
    "queued": "queued in Slurm",
    "locked": "another runner holds it, not started",
    "conflict": "its params.yaml differs from the grid's",
}


def _table(rows: list[list[str]]) -> list[str]:
    """Rows of strings as left-aligned columns two spaces apart (the first row is the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


def print_status(grid: Grid, stage: str | None = None, only: dict[str, str] | None = None) -> None:
    """``grid status``: one line per cell (status, wall clock, Slurm job), the counts per stage, a legend
    of the statuses, and why each failed, stale, refused or blocked cell is so."""
    table = status_table(grid, stage, only)
    with_slurm = table["slurm"].drop_nulls().len() > 0
    rows = [["cell", "status", "time", *(["slurm"] if with_slurm else [])]]
    for r in table.iter_rows(named=True):
        took = duration(r["wall_clock_s"]) if r["wall_clock_s"] is not None and r["status"] != "running" else ""
        rows.append([r["cell"], r["status"], took, *([r["slurm"] or ""] if with_slurm else [])])
    print("\n".join(_table(rows)))
    counts: dict[str, dict[str, int]] = {}
    for r in table.iter_rows(named=True):
        per = counts.setdefault(r["stage"], {})
        per[r["status"]] = per.get(r["status"], 0) + 1
    print("\n" + " · ".join(f"{s}: " + ", ".join(f"{n} {st}" for st, n in per.items()) for s, per in counts.items()))
    print("legend: " + " · ".join(f"{st} = {what}" for st, what in LEGEND.items()))
    said = {"failed": "FAILED", "stale": "STALE", "conflict": "REFUSED", "blocked": "BLOCKED"}
    for r in table.iter_rows(named=True):
        if r["status"] in said:
            print(f"{said[r['status']]} {r['cell']}: {r['error']}")
