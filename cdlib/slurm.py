"""Slurm array scripts for a grid: one sbatch array per (stage, resource shape) and a ``submit.sh``
that chains the stages, each after every task of the previous one ended.

The chain is ``afterany``, not ``afterok``: Slurm counts an array as ok only when every task succeeded, so one
failed training cell would leave all of the next stage's tasks pending for ever (DependencyNeverSatisfied).
Each task checks its own inputs instead (:func:`cdlib.runner.run_one`): a cell whose input failed exits 1 at
once saying "blocked, waiting for <input>", and the others run.

Each array task runs one cell with ``python -m cdlib.grid run GRID --cell ID`` (:func:`cdlib.runner.run_one`):
the same checks, lock and manifest as a local run. A cell's resources are the stage's ``slurm:``, its axis
values' and its matching overrides' (:class:`cdlib.grid.SlurmSpec`).

Only the cells that still have work are written (:func:`cells_to_submit`): regenerating after some failed
submits those and what depends on them, not a GPU allocation per finished cell just to say "done". A stale
cell (an input's outputs changed since it ran, :func:`cdlib.runner.stale`) is left out, saying so, unless
``grid slurm --rerun-stale``, whose tasks then redo it from an emptied directory.

Each task activates the Python environment that wrote the scripts (:func:`default_setup`), or runs the grid's
``slurm: {setup: ...}`` lines instead (e.g. ``module load cuda/12.4 && source /path/env/bin/activate``).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from cdlib.grid import Cell, Grid, SlurmSpec
from cdlib.params import ParamsError


SBATCH = """#!/bin/bash
#SBATCH --job-name={job}
#SBATCH --array=0-{last}
#SBATCH --nodes={nodes}
#SBATCH --cpus-per-task={cpus}
#SBATCH --mem={mem}
#SBATCH --time={time}
#SBATCH --output={output}
{extra}
# {count} cells of stage '{stage}' ({gpus} GPUs each); written by `python -m cdlib.grid slurm {grid}`.
set -euo pipefail
cd {root}
set +u  # activation scripts (venv's, conda's and its packages' activate.d) are not written for nounset
{setup}
set -u
# the cells, in the script itself: Slurm keeps a copy of the script from submission, so a queued task
# runs the cell it was submitted for even if `grid slurm` rewrites {cells_file} meanwhile
CELLS=(
{cell_lines}
)
python -m cdlib.grid run {grid_arg} --cell "${{CELLS[$SLURM_ARRAY_TASK_ID]}}"{flags}
"""


def default_setup() -> str:
    """Shell lines that activate the Python environment running this function, for a batch job.

    A batch job's shell is neither interactive nor a login shell, so ``source ~/.bashrc`` returns before the
    block ``conda init`` appends and ``conda activate`` alone is not defined there. So: a conda environment
    is activated through its installation's ``etc/profile.d/conda.sh`` (found from ``CONDA_EXE``, which
    conda's shell function sets), a virtualenv through its own ``bin/activate``, and anything else by putting
    its ``bin`` first on ``PATH``, all by absolute path: a job uses the environment ``grid slurm`` ran in,
    not whichever ``.venv`` the checkout holds (``make demo``'s CPU one, say, on a GPU node).
    """
    prefix = Path(sys.prefix)
    conda_exe = os.environ.get("CONDA_EXE")
    if (prefix / "conda-meta").is_dir() and conda_exe:
        hook = Path(conda_exe).resolve().parents[1] / "etc" / "profile.d" / "conda.sh"
        return f"source {shlex.quote(str(hook))} && conda activate {shlex.quote(str(prefix))}"
    if sys.prefix != sys.base_prefix and (prefix / "bin" / "activate").is_file():
        return f"source {shlex.quote(str(prefix / 'bin' / 'activate'))}"
    return f'export PATH={shlex.quote(str(prefix / "bin"))}:"$PATH"'


def _directive_path(path: Path) -> str:
    """A path for an ``#SBATCH`` line: double-quoted when it holds whitespace (sbatch reads its directives'
    arguments as a shell would, quotes included)."""
    text = str(path)
    return f'"{text}"' if any(ch.isspace() for ch in text) else text


def cells_to_submit(grid: Grid) -> set[str]:
    """Ids of the cells a submission should run: every cell a run would not skip now (:func:`cdlib.runner.decide`:
    pending, failed, interrupted, refused, blocked, stale), and every cell downstream of one of those (its
    inputs, or for ``after: all`` any stage above, will change): :func:`cdlib.runner.with_work`."""
    from cdlib.cells import cell_status
    from cdlib.runner import with_work

    status = {c.id: cell_status(c, grid.root) for c in grid.cells}
    return {c.id for c in with_work(grid, grid.cells, status)}


def write_slurm(grid: Grid, stage: str | None = None, only: dict[str, str] | None = None,
                say: Any = print, rerun_stale: bool = False) -> list[Path]:
    """Write one sbatch array script per (stage, resource shape) and a submit.sh chaining stages (``afterany``),
    for the cells of :func:`cells_to_submit` (``say`` tells how many of each stage are left out as done, and
    each stale cell left out; with ``rerun_stale`` stale cells are submitted, their tasks run ``--rerun-stale``).

    Validates the grid first, as ``run`` does: no script is written for a grid that could not run. Scripts
    of an earlier generation are removed, so the directory holds only what ``submit.sh`` submits."""
    from cdlib.runner import stale

    grid.validate_cells()
    out = grid.root / grid.out_dir / "slurm"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.sbatch"), *out.glob("*.cells"), out / "submit.sh"]:
        old.unlink(missing_ok=True)
    todo = cells_to_submit(grid)
    setup = grid.spec.slurm.setup or default_setup()
    scripts: list[Path] = []
    submit = ["#!/bin/bash", "# Submits every stage as a Slurm array, each after every task of the previous stage",
              "# ended (a cell whose inputs failed exits at once, blocked; the others run). To retry, run",
              f"# `python -m cdlib.grid slurm {grid.path}` again: it writes only the cells with work left.",
              "set -euo pipefail", f"cd {shlex.quote(str(grid.root.resolve()))}", "DEP=\"\""]
    for name in grid.spec.stages:
        if stage is not None and name != stage:
            continue
        selected = grid.select(name, only)
        cells = [c for c in selected if c.id in todo]
        if len(cells) < len(selected):
            say(f"{name}: {len(selected) - len(cells)} of {len(selected)} cells done and current, left out")
        for c in [] if rerun_stale else [c for c in cells if not c.after_all]:
            changed = stale(grid, c)
            if changed:
                say(f"{c.id}: stale ({', '.join(changed)} changed since it ran), left out; "
                    f"`grid slurm --rerun-stale` submits it to be redone from an emptied directory")
                cells.remove(c)
        groups: dict[str, list[Cell]] = {}
        for c in cells:
            groups.setdefault(c.slurm.model_dump_json(), []).append(c)
        job_vars = []
        for shape, group in groups.items():
            s = SlurmSpec.model_validate_json(shape)
            if s.nodes > 1 and not grid.spec.slurm.setup:
                raise ParamsError(
                    f"{grid.path}: stage {name!r}: slurm nodes: {s.nodes} for {group[0].id}"
                    f"{f' and {len(group) - 1} more cells' if len(group) > 1 else ''}: a generated task runs its "
                    "cell on the job's first node only, so the other nodes would sit idle. vLLM across nodes needs "
                    "a Ray cluster over the job's nodes (distributed_executor_backend: ray) and training a "
                    "multi-node launch: start them in the grid's 'slurm: {setup: ...}' lines (e.g. ray start "
                    "through srun), or use nodes: 1")
            tag = f"{name}.{s.gpus}gpu" if len(groups) > 1 else name
            cells_file = out / f"{tag}.cells"
            cells_file.write_text("".join(c.id + "\n" for c in group))
            extra = [f"#SBATCH --gres=gpu:{s.gpus}"] if s.gpus else []
            extra += [f"#SBATCH --partition={s.partition}"] if s.partition else []
            extra += [f"#SBATCH --account={s.account}"] if s.account else []
            extra += [f"#SBATCH {x}" for x in s.extra]
            script = out / f"{tag}.sbatch"
            script.write_text(SBATCH.format(
                job=f"{grid.spec.name}-{tag}", last=len(group) - 1, nodes=s.nodes, gpus=s.gpus, cpus=s.cpus,
                mem=s.mem, time=s.time, output=_directive_path(out / "logs" / "%x-%a.out"), extra="\n".join(extra),
                count=len(group), stage=name, grid=grid.path, grid_arg=shlex.quote(str(grid.path)),
                root=shlex.quote(str(grid.root.resolve())), setup=setup, cells_file=cells_file.name,
                flags=" --rerun-stale" if rerun_stale else "",
                cell_lines="\n".join(f"  {shlex.quote(c.id)}" for c in group)))
            scripts.append(script)
            var = re.sub(r"\W", "_", tag).upper()
            submit.append(f"{var}=$(sbatch --parsable ${{DEP:+--dependency=afterany:$DEP}} "
                          f"{shlex.quote(str(script))})")
            submit.append(f"{var}=${{{var}%%;*}}  # --parsable prints 'jobid;cluster' on a multi-cluster setup")
            job_vars.append(f"${var}")
        if job_vars:
            submit.append(f"DEP={':'.join(job_vars)}")
    if not scripts:
        say("every selected cell is done and current: submit.sh submits nothing")
    (out / "submit.sh").write_text("\n".join(submit) + "\necho submitted: last stage job ${DEP:-none}\n")
    scripts.append(out / "submit.sh")
    return scripts
