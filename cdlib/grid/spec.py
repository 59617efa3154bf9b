"""The grid language: a grid file loaded, checked and expanded into stage cells (:class:`Grid`, :class:`Cell`).

A grid file names axes and stages::

    name: demo                      # outputs/demo/
    x-toy: &toy {n_train: 1500}     # top-level x-* keys hold YAML anchors (*toy) for reuse
    axes:
      teacher:
        toy: {generate: {engine: {kind: toy}}}        # value -> params, scoped by stage
      method:
        full: {train: {method: full}}
        lora: {train: {method: lora}, all: {}}          # 'all': every stage on this axis
    slurm: {cpus: 2, mem: 16G, time: "02:00:00"}    # every cell's Slurm resources unless a stage's slurm: differs
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
        inputs: {data: "generate/{teacher}"}             # param -> upstream cell id template (or a list of them)
        overrides:                                        # params for matching cells only
          - {when: {student: [llama-8b, qwen-9b], method: full}, params: {accelerate_config: ...}, slurm: {gpus: 8}}
      report:
        notebook: notebooks/07_paper.py
        after: all                                        # reads every cell of the stages above it

A stage that says ``wide: true`` runs, under ``--jobs N``, on every slot at once (all the runner's CPUs
and GPUs): when its cell is next to start the runner lets the running cells end, starts nothing else,
and gives it the whole machine. It is for a long cell that most of the grid waits on and that nothing
can run beside (the demo's base pretraining: one core would otherwise idle for minutes). Slurm jobs
ask for their own resources (``slurm:``) and ignore it.

A stage has one cell per combination of *its own* axes, so stages that depend on
fewer axes are shared: the paper's 55 training runs sit on 2 generation cells.
Cell ids are readable slugs of the axis values (``compress/qwen3.5-397b__ministral-14b``).
A cell's parameters are, merged in this order (nested dicts merge key by key):
the stage's ``params``; then for each of the stage's axes the value's ``all``
params and its params for this stage; then the stage's matching ``overrides``; then ``inputs`` (from the stage
or an axis value), each resolved to the upstream cell's directory (a list of templates to a list of
directories); then ``out_dir``.

A cell starts when its input cells are done. A stage that reads the whole grid instead (a
report) says ``after: all``: its cells wait for every cell of the stages listed before it and
run again when the outputs of those differ from the ones they read. A cell whose inputs' outputs
changed since it ran (an upstream cell redone) is stale: refused, naming them, until rerun with
``--rerun-stale`` (:mod:`cdlib.grid.runner`). A stage without inputs listed after another
stage must say which it is, ``after: all`` or ``after: inputs`` (it needs no other cell); the
implicit form of earlier grid files (no inputs meant "after everything") is refused with that
advice, since a stage that silently waited for, and reran after, the whole grid was a surprise.

A stage's ``kind`` (which ``cdlib.params`` model checks its params, one of :data:`KINDS`) is
its ``kind:``, else its name when that is a kind, else the kind its notebook declares
(``cdlib.params.from_notebook("train", ...)``). Grids are checked before anything runs, by
``status`` and ``slurm`` as by ``run``: params against strict stage models, cells whose inputs
form a cycle, a selection that matches no cell. Running the cells (papermill, locks, manifests,
``results.parquet``) is :mod:`cdlib.grid.runner`; Slurm array scripts are :mod:`cdlib.grid.slurm`.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cdlib import notebook as nbtools
from cdlib.params import (STAGE_MODELS, ParamsError, did_you_mean, error_items, format_errors, load_yaml,
                          yaml_loader)

SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
RESERVED = {"inputs", "slurm"}  # keys of stage-scoped axis params that are not notebook parameters
KINDS = tuple(STAGE_MODELS)  # stage kinds: generate, compress, truncate, train, evaluate, judge, report, ...


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
    inputs: dict[str, str | list[str]] = {}  # a list: the param gets a list of cell directories
    after: Literal["all", "inputs"] | None = None  # all: every cell of the stages above (a report)
    wide: bool = False  # under --jobs N a cell takes every slot's CPUs/GPUs (nothing else starts before it ends)
    exclude: list[dict[str, str]] = []
    overrides: list[Override] = []  # applied in order, after the axis values' params
    slurm: SlurmSpec = SlurmSpec()


class GridSlurm(SlurmSpec):
    """A grid's ``slurm:`` block: what every array task runs before its cell, and the resources every cell
    asks for unless its stage, axis values or overrides say otherwise (so a small partition is not asked for
    :class:`SlurmSpec`'s defaults, sized for the paper's GPU nodes)."""

    setup: str | None = None  # shell lines instead of cdlib.grid.slurm.default_setup's activation


class GridSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    output_root: str = "outputs"
    axes: dict[str, dict[str, dict[str, Any]]] = {}
    exclude: list[dict[str, str]] = []
    stages: dict[str, StageSpec]
    slurm: GridSlurm = GridSlurm()

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
    depends_on: list[str] = field(default_factory=list)  # input cell ids
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    kind: str | None = None  # the stage kind (one of KINDS), None for a notebook of no known kind
    inputs: dict[str, str | list[str]] = field(default_factory=dict)  # input parameter -> upstream cell id(s)
    after_all: bool = False  # the stage says `after: all`: it waits for every cell of the stages above
    wide: bool = False  # the stage says `wide: true`: under --jobs it runs on every slot at once

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


@functools.cache
def notebook_kind(path: Path) -> str | None:
    """The stage kind a notebook declares by validating its parameters (``from_notebook("train", ...)``)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):  # no text: not a notebook, which checking the grid's cells says
        return None
    found = re.search(r"from_notebook\(\s*[\"'](\w+)[\"']", text)
    return found.group(1) if found else None


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
            raise ParamsError("\n".join(f"{self.where([loc])}: key '{key}': {msg}"
                                         for loc, key, msg in error_items(e, GridSpec))) from None
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
                    raise ParamsError(f"{where}: key 'axes.{axis}.{value}': value names may hold only letters, "
                                      "digits and . _ + -")
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
                raise ParamsError(f"{where}: key 'stages.{name}': stage names may hold only letters, digits "
                                  "and . _ + -")
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
        self._check_after()

    def _check_after(self) -> None:
        """A stage without inputs below another stage must say what it waits for (``after``)."""
        names = list(self.spec.stages)
        for name in names[1:]:
            stage = self.spec.stages[name]
            if stage.after is None and not self.has_inputs(name):
                raise ParamsError(
                    f"{self.path}: key 'stages.{name}': a stage without inputs below other stages must say "
                    f"'after: all' if it reads their results (a report: it waits for every cell above it and "
                    f"runs again when one finished after it), or 'after: inputs' if it needs none of them. "
                    f"Earlier grid files left this implicit (meaning 'after: all')")

    def has_inputs(self, name: str) -> bool:
        """Whether stage ``name`` declares inputs, itself or through one of its axis values."""
        stage = self.spec.stages[name]
        return bool(stage.inputs) or any("inputs" in (v.get(name) or {}) or "inputs" in (v.get("all") or {})
                                         for a in stage.axes for v in self.spec.axes[a].values())

    def stage_kind(self, name: str) -> str | None:
        """The stage's ``kind:``, else its name when that is a kind, else its notebook's kind."""
        stage = self.spec.stages[name]
        return stage.kind or (name if name in KINDS else notebook_kind(self.root / stage.notebook))

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
        slurm = {**self.spec.slurm.model_dump(exclude_unset=True, exclude={"setup"}),
                 **stage.slurm.model_dump(exclude_unset=True)}  # grid-wide defaults, then the stage's own
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
        depends: dict[str, str | list[str]] = {}
        for param, given in inputs.items():
            ups = []
            for template in (given if isinstance(given, list) else [given]):
                try:
                    upstream = template.format(**values)
                except KeyError as e:
                    raise ParamsError(f"{self.path}: cell '{name}/{slug}': input '{param}' template "
                                      f"{template!r} names axis {e} which this stage does not have") from None
                up_stage = upstream.split("/", 1)[0]
                if up_stage not in self.spec.stages:
                    raise ParamsError(f"{self.path}: stage '{name}' input '{param}': {upstream!r} is not a cell of a "
                                      "stage in this grid")
                ups.append(upstream)
            depends[param] = ups if isinstance(given, list) else ups[0]
            dirs = [str(self.out_dir / u) for u in ups]
            params[param] = dirs if isinstance(given, list) else dirs[0]
        params["out_dir"] = str(cell_dir)
        try:
            resources = SlurmSpec(**slurm)
        except ValidationError as e:
            raise ParamsError(format_errors(e, f"{self.path}: cell '{name}/{slug}': slurm", SlurmSpec)) from None
        return Cell(stage=name, slug=slug, axes=values, params=params, notebook=Path(stage.notebook),
                    directory=cell_dir, slurm=resources,
                    depends_on=list(dict.fromkeys(u for v in depends.values()
                                                  for u in ([v] if isinstance(v, str) else v))),
                    kind=self.stage_kind(name), inputs=depends, after_all=stage.after == "all",
                    wide=stage.wide)

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

    def above(self, c: Cell, ids: Iterable[str]) -> list[str]:
        """The cell ids among ``ids`` of stages listed above ``c``'s stage (what an ``after: all`` cell reads)."""
        order = list(self.spec.stages)
        return [u for u in ids if order.index(u.split("/", 1)[0]) < order.index(c.stage)]

    def cell(self, cell_id: str) -> Cell:
        for c in self.cells:
            if c.id == cell_id:
                return c
        raise KeyError(f"{self.path}: no cell {cell_id!r}")

    @functools.cached_property
    def key_lines(self) -> dict[tuple, int]:
        """Every mapping key of the grid file, by its path from the top (``x-*`` anchors included), -> its line.
        A key written once under an anchor has that one line, however many aliases bring it in."""
        import yaml

        lines: dict[tuple, int] = {}

        def walk(node: Any, path: tuple, depth: int) -> None:
            if depth > 50:  # an alias that contains itself
                return
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    lines.setdefault((*path, k.value), k.start_mark.line + 1)
                    walk(v, (*path, k.value), depth + 1)
            elif isinstance(node, yaml.SequenceNode):
                for i, v in enumerate(node.value):
                    walk(v, (*path, i), depth + 1)

        try:
            walk(yaml.compose(self.path.read_text(), Loader=yaml_loader()), (), 0)
        except (OSError, yaml.YAMLError):
            pass
        return lines

    def where(self, paths: list[tuple]) -> str:
        """``file:line`` of the first key path of ``paths`` written in the grid file (lines joined by commas
        when a cell parameter is written in several places), else the file alone."""
        found = sorted({self.key_lines[p] for p in paths if p in self.key_lines})
        return f"{self.path}:{','.join(map(str, found[:4]))}" if found else str(self.path)

    def param_paths(self, stage: str, key: str) -> list[tuple]:
        """The places in the grid file that can set cell parameter ``key`` (dotted) of ``stage``: the stage's
        params and overrides and the axis values' params for it or for ``all`` (and anchors they use)."""
        parts = tuple(key.split("."))
        ends = [p for p in self.key_lines if p[-len(parts):] == parts]
        scoped = [p for p in ends if stage in p or "all" in p or str(p[0]).startswith("x-")]
        return scoped or ends

    def validate_cells(self, cells: list[Cell] | None = None) -> None:
        """Check every cell's params (or only ``cells``') against the stage model and the notebook's
        declared parameters.

        Each distinct error is said once, with the grid file's line that sets the key and the cells it
        hits (one typo in an axis value otherwise repeats in every cell it reaches); an unknown key names
        the closest known one.

        ``run``, ``status`` and ``slurm`` all call it first, so each refuses an invalid grid alike;
        ``run --cell ID`` (a ``--jobs`` subprocess or a Slurm task, whose launcher checked the whole
        grid) checks its own cell only, which saves each cell ~2 s of reading every notebook."""
        if self._valid:
            return
        declared_cache: dict[Path, dict[str, Any] | None] = {}
        errors: dict[tuple[str, str, str, str], list[str]] = {}  # (where, key, message, checked as) -> cell ids

        def add(c: Cell, key: str, msg: str, checked: str = "") -> None:
            errors.setdefault((self.where(self.param_paths(c.stage, key)), key, msg, checked), []).append(c.id)

        for c in self.cells if cells is None else cells:
            said: set[str] = set()  # top-level keys the stage model found wrong: not said again below
            if c.kind in STAGE_MODELS:
                try:
                    STAGE_MODELS[c.kind].model_validate(c.params)
                except ValidationError as e:
                    for loc, key, msg in error_items(e, STAGE_MODELS[c.kind]):
                        add(c, key, msg, f"{c.kind} params of ")
                        said.add(str(loc[0]) if loc else key)
            if c.notebook not in declared_cache:
                try:
                    declared_cache[c.notebook] = nbtools.declared_parameters(self.root / c.notebook)
                except nbtools.NotebookError as e:
                    declared_cache[c.notebook] = None
                    errors.setdefault((self.where([("stages", c.stage, "notebook")]), f"stages.{c.stage}.notebook",
                                       str(e), ""), []).append(c.id)
            declared = declared_cache[c.notebook]
            if declared is None:
                continue
            for key in c.params:
                if key not in declared and key not in said:
                    hint = did_you_mean(key, declared) or f" (it declares {', '.join(sorted(declared))})"
                    add(c, key, f"not a parameter of {c.notebook}{hint}")
        if errors:
            raise ParamsError("\n".join(f"{where}: key '{key}': {msg} ({checked}{_cells_said(ids)})"
                                         for (where, key, msg, checked), ids in errors.items()))
        self._valid = cells is None


def _cells_said(ids: list[str], shown: int = 3) -> str:
    """``cell 'a'``, or ``4 cells: a, b, c and 1 more``."""
    if len(ids) == 1:
        return f"cell '{ids[0]}'"
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return f"{len(ids)} cells: {', '.join(ids[:shown])}{more}"
