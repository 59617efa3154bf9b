"""Reading a grid's outputs into the layouts of :mod:`cdlib.tables`.

A grid's outputs live in ``outputs/<grid>/``: ``results.parquet`` (one row per finished
cell, written by the runner) and one directory per cell, ``<stage>/<cell>/`` with
params.yaml, metrics.json, manifest.json and the stage's record files. :func:`read_grid`
collects the finished cells; ``grid_*`` turn them into the generation, compression,
judge, trace-length, run and loss layouts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import polars as pl

from cdlib.outputs import flatten_metrics, read_manifest, read_metrics
from cdlib.store import read_fields
from cdlib.tables import judged, paper_sort

KINDS = ("generate", "compress", "truncate", "train", "evaluate", "judge", "report")


KIND_FILES = {"generate": "traces.jsonl", "compress": "compressed.jsonl", "truncate": "truncated.jsonl",
              "train": "loss.jsonl", "evaluate": "outputs.jsonl", "judge": "judgements.jsonl"}


KIND_METRICS = {"acc_per_1k_tokens": "evaluate", "train_tokens": "train", "trainable_tokens": "train",
                "faithfulness": "judge",
                "rho": "compress", "total_correct": "generate", "kept_fraction": "truncate", "figures": "report"}


# cdlib.datasets' report groups and Table 1 domains -> the names used here (and in the paper's tables)
GROUP_NAMES = {"Math": "math", "Science": "science", "Medicine": "medicine", "Common-sense": "commonsense",
               "OOD-Reasoning": "ood_reasoning", "OOD-Knowledge": "ood_knowledge", "Overall-only": "overall_only",
               "Overall": "overall"}


DOMAIN_NAMES = {"Mathematics": "math", "Science": "science", "Logic/Commonsense": "logic", "Medical": "medical",
                "MMLU-STEM": "mmlu", "MMLU-Medical": "mmlu"}


COST_COLUMNS = ("wall_clock_s", "gpus", "gpu_hours", "device")


NO_VALUE = "—"


@dataclass
class GridCell:
    """One finished cell of a grid, from its directory and/or its row of ``results.parquet``."""

    id: str  # "<stage>/<slug>"
    stage: str  # the stage's name in the grid file
    kind: str | None  # which stage notebook made it: one of KINDS
    axes: dict[str, str]
    params: dict[str, Any]  # params.yaml (empty when only results.parquet is there)
    cost: dict[str, Any]  # wall_clock_s, gpus, gpu_hours, device (the runner's manifest)
    metrics: dict[str, Any]  # metrics.json flattened with dots
    dir: Path | None  # None when only results.parquet knows the cell
    upstream: list[str] = dc_field(default_factory=list)  # ids of its input cells
    inputs_recorded: bool = False  # upstream as the runner recorded it (else guessed from params, older grids)


@dataclass
class GridOutputs:
    """Every finished cell of a grid, plus notes about what was missing or skipped."""

    dir: Path
    cells: dict[str, GridCell]
    notes: list[str]

    def of(self, kind: str) -> list[GridCell]:
        return [c for c in self.cells.values() if c.kind == kind]

    def lineage_axes(self, cell: GridCell) -> dict[str, str]:
        """The axis values of a cell and of every cell upstream of it (its own win)."""
        out: dict[str, str] = {}
        seen: set[str] = set()

        def walk(c: GridCell) -> None:
            if c.id in seen:
                return
            seen.add(c.id)
            for u in c.upstream:
                walk(self.cells[u])
            out.update(c.axes)

        walk(cell)
        return out

    def records(self, cell: GridCell, filename: str, fields: list[str],
                lengths: tuple[str, ...] = ()) -> pl.DataFrame | None:
        """Some fields of a cell's record file (:func:`cdlib.store.read_fields`); None when it has no such file
        or no rows."""
        path = cell.dir / filename if cell.dir else None
        if path is None or not path.exists():
            return None
        df = read_fields(path, fields, lengths)
        return None if df.is_empty() else df

    def teacher_of(self, cell: GridCell) -> str:
        """The teacher whose traces a cell's data come from: the ``teacher`` axis of its lineage, else the
        key of the teacher-trace generate cell it is or descends from (a grid with a ``seed`` axis and one
        teacher names it ``s0``, ``s1``, ...), else "—". Student samples (:meth:`student_samples`) are skipped."""
        teacher = self.lineage_axes(cell).get("teacher")
        if teacher:
            return teacher
        traces = self.upstream_of(cell, "generate", include_self=True, where=lambda c: not self.student_samples(c))
        return traces.id.split("/", 1)[1] if traces else NO_VALUE

    def student_samples(self, cell: GridCell) -> bool:
        """True for a generate cell that holds a student's own samples (Mixed-Policy Distillation's sample
        stage), not teacher traces: it keeps every attempt (``keep: all``, which is what that stage is for) or
        its model descends from a train cell. The one test the report and the accounting use (Table 4, the
        compression tables, H.4's upstream hours)."""
        return cell.kind == "generate" and (cell.params.get("keep") == "all"
                                            or self.upstream_of(cell, "train") is not None)

    def rewrites_student(self, cell: GridCell) -> bool:
        """True for a compress cell whose traces are a student's samples (:meth:`student_samples`; Mixed-Policy
        Distillation's rewrite stage: train -> sample -> rewrite), i.e. not a compression of teacher traces."""
        traces = self.upstream_of(cell, "generate")
        return traces is not None and self.student_samples(traces)

    def upstream_of(self, cell: GridCell, kind: str, include_self: bool = False,
                    where: Any = None) -> GridCell | None:
        """The nearest cell of ``kind`` upstream of ``cell`` (breadth first; ``cell`` itself first with
        ``include_self``) for which ``where(c)`` holds, when given."""
        todo, seen = [cell.id] if include_self else list(cell.upstream), set()
        while todo:
            c = self.cells[todo.pop(0)]
            if c.id in seen:
                continue
            seen.add(c.id)
            if c.kind == kind and (where is None or where(c)):
                return c
            todo += c.upstream
        return None


def _kind(stage: str, notebook: str, d: Path | None, metrics: dict[str, Any]) -> str | None:
    """The stage kind of a cell recorded before the runner wrote ``kind`` (published or older grids):
    its stage name, else its notebook's name, else its files, else its metrics."""
    if stage in KINDS:
        return stage
    tail = Path(notebook).stem.split("_", 1)[-1] if notebook else ""
    if tail in KINDS or tail == "paper":
        return "report" if tail == "paper" else tail
    for kind, name in KIND_FILES.items():
        if d is not None and (d / name).exists():
            return kind
    return next((kind for key, kind in KIND_METRICS.items() if key in metrics), None)


def _inputs(recorded: Any) -> list[str] | None:
    """The input cell ids the runner recorded (a dict, or its JSON in results.parquet); None when not recorded."""
    if recorded is None:
        return None
    if isinstance(recorded, str):
        recorded = json.loads(recorded) if recorded else {}
    ids = [v for value in recorded.values() for v in (value if isinstance(value, list) else [value])]
    return [str(v) for v in ids if v]


def _axes_from_slug(slug: str, row: dict[str, Any], skip: set[str]) -> dict[str, str]:
    """Recover a results.parquet row's axes: the string columns holding the slug's parts (``a__b``)."""
    if slug == "all":
        return {}
    axes: dict[str, str] = {}
    for part in slug.split("__"):
        col = next((k for k, v in row.items() if v == part and k not in axes and k not in skip and "." not in k), None)
        if col is not None:
            axes[col] = part
    return axes


RECORD_COLUMNS = ("stage", "cell", "kind", "inputs", *COST_COLUMNS)  # the runner's columns of results.parquet


def _cells_from_results(path: Path) -> dict[str, GridCell]:
    """The cells of results.parquet: kind and inputs as the runner recorded them (guessed for older rows)."""
    cells: dict[str, GridCell] = {}
    for row in pl.read_parquet(path).to_dicts():
        stage, cid = row.get("stage"), row.get("cell")
        if not stage or not cid:
            continue
        axes = _axes_from_slug(cid.split("/", 1)[-1], row, set(RECORD_COLUMNS))
        metrics = {k.removeprefix("metric."): v for k, v in row.items() if v is not None
                   and k not in RECORD_COLUMNS and k not in axes}
        cells[cid] = GridCell(cid, stage, row.get("kind") or _kind(stage, "", None, metrics), axes, {},
                              {k: row.get(k) for k in COST_COLUMNS}, metrics, None, _inputs(row.get("inputs")) or [],
                              row.get("inputs") is not None)
    return cells


def _cell_from_dir(d: Path, known: GridCell | None) -> tuple[GridCell | None, str | None]:
    """A cell directory as (cell, None) when done, (None, its status) when not; raises ValueError when unreadable."""
    import yaml

    manifest = read_manifest(d, strict=True) or {}
    metrics = read_metrics(d, strict=True)
    params_path = d / "params.yaml"
    try:
        params = (yaml.safe_load(params_path.read_text()) or {}) if params_path.exists() else {}
    except yaml.YAMLError as e:
        raise ValueError(f"{params_path}: {e}") from None
    flat = flatten_metrics(metrics or {})
    kind = manifest.get("kind") or _kind(d.parent.name, manifest.get("notebook", ""), d, flat)
    if kind != "report" and (manifest.get("status") != "done" or metrics is None):
        return None, manifest.get("status", "no status")
    axes = dict(manifest.get("axes") or (known.axes if known else {}))
    cell = GridCell(f"{d.parent.name}/{d.name}", d.parent.name, kind, axes, params,
                    {k: manifest.get(k) for k in COST_COLUMNS}, flat, d, _inputs(manifest.get("inputs")) or [],
                    "inputs" in manifest)
    if not cell.inputs_recorded and known is not None and known.inputs_recorded:
        cell.upstream, cell.inputs_recorded = list(known.upstream), True
    return cell, None


def _guess_upstream(cells: dict[str, GridCell]) -> None:
    """Cells recorded before the runner wrote ``inputs`` (published or older grids): a cell's upstream
    cells are those its params point to (``.../<stage>/<cell>`` paths)."""
    for c in cells.values():
        if c.inputs_recorded:
            continue
        for v in c.params.values():
            if isinstance(v, str) and v:
                ref = "/".join(Path(v).parts[-2:])
                if ref in cells and ref != c.id:
                    c.upstream.append(ref)


def read_grid(grid_dir: str | Path) -> GridOutputs:
    """Collect a grid's finished cells from ``results.parquet`` and the cell directories.

    Each cell's stage kind and input cells are read as the runner recorded them (``kind``
    and ``inputs`` in manifest.json and results.parquet); only cells recorded before it
    did have them guessed from names, files and paths. A cell directory with a ``done``
    manifest wins over its results.parquet row (it is never older); cells that are not
    done are left out and counted in the notes, as is a missing results.parquet (the cell
    directories are read instead). The report stage's own cells are ignored.
    """
    root = Path(grid_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"grid directory {root} does not exist")
    notes: list[str] = []
    results = root / "results.parquet"
    cells = _cells_from_results(results) if results.exists() else {}
    if not results.exists():
        notes.append(f"{results} not found: read every cell directory's metrics.json instead.")
    not_done: list[str] = []
    for manifest_path in sorted(root.glob("*/*/manifest.json")):
        d = manifest_path.parent
        cid = f"{d.parent.name}/{d.name}"
        try:
            cell, status = _cell_from_dir(d, cells.get(cid))
        except ValueError as e:
            notes.append(f"cell {cid} skipped: {e}")
            continue
        if cell is None:
            not_done.append(f"{cid} ({status})")
            cells.pop(cid, None)
        else:
            cells[cid] = cell
    cells = {k: c for k, c in cells.items() if c.kind != "report"}
    for c in cells.values():  # inputs outside the finished cells (a report's, a cell not done) are not followed
        c.upstream = [u for u in c.upstream if u in cells and u != c.id]
    if not_done:
        notes.append(f"{len(not_done)} cell(s) not done and left out: {', '.join(not_done[:12])}"
                     + (" ..." if len(not_done) > 12 else ""))
    _guess_upstream(cells)
    return GridOutputs(root, cells, notes)


def _domains(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(pl.col("domain").replace(DOMAIN_NAMES)) if "domain" in df.columns else df


def compressor_name(cell: GridCell) -> str:
    """A compress cell's compressor as the grid names it: its ``compressor`` or ``source`` axis, else the param."""
    return cell.axes.get("compressor") or cell.axes.get("source") or str(cell.params.get("compressor") or cell.id)


def grid_generation(g: GridOutputs) -> pl.DataFrame | None:
    """Generation layout (Table 4) from every generate cell's ``traces.jsonl``; None if there is none.

    A student's own samples (:meth:`GridOutputs.student_samples`, MPD) are left out, with a note."""
    parts = []
    for c in g.of("generate"):
        if g.student_samples(c):
            g.notes.append(f"{c.id}: student samples (keep: all or a trained student's), left out of Table 4.")
            continue
        df = g.records(c, "traces.jsonl", ["id", "dataset", "domain", "completion_tokens"], lengths=("reasoning",))
        if df is not None:
            teacher = g.teacher_of(c)
            parts.append(df.with_columns(teacher=pl.lit(teacher)))
    return _domains(pl.concat(parts, how="diagonal_relaxed")) if parts else None


def grid_compression(g: GridOutputs, include_flagged: bool = False) -> pl.DataFrame | None:
    """Compression layout (Tables 2, 5, Figure 1): one row per compressed trace of every compress cell.

    Compressions dropped downstream (flagged with ``drop_flagged``, or failed: a permanent engine
    error; see :func:`cdlib.outputs.dropped`) are left out unless ``include_flagged``: they are never
    trained on; Tables 2 and 5 count the failed ones from every row. With the paper's protocol
    (``drop_flagged: false``) every compression is kept, as in its Tables 2 and 5; flags stay in ``flag`` for
    :func:`flag_rates`. Token counts come from ``tokens.jsonl`` (``compressed_tokens`` and ``original_tokens``,
    the compressor's tokenizer). Rewrites of student
    trajectories (:meth:`GridOutputs.rewrites_student`, MPD) are not compressions of teacher traces and are
    left out.
    """
    parts = []
    for c in g.of("compress"):
        if g.rewrites_student(c):
            continue
        df = g.records(c, "compressed.jsonl",
                       ["id", "dataset", "domain", "flag", "drop", "original_chars", "compressed_chars"])
        if df is None:
            continue
        tok = g.records(c, "tokens.jsonl", ["id", "original_tokens", "compressed_tokens"])
        if tok is not None:
            df = df.join(tok, on="id", how="left")
        teacher = g.teacher_of(c)
        flag = pl.col("flag").cast(pl.String)
        parts.append(df.with_columns(teacher=pl.lit(teacher), compressor=pl.lit(compressor_name(c)), flag=flag,
                                     drop=(flag == "error").fill_null(False)
                                     | pl.col("drop").cast(pl.Boolean).fill_null(flag.is_not_null())))
    if not parts:
        return None
    df = _domains(pl.concat(parts, how="diagonal_relaxed"))
    return df if include_flagged else df.filter(~pl.col("drop"))


def grid_trace_lengths(g: GridOutputs, compression: pl.DataFrame | None = None) -> pl.DataFrame | None:
    """Trace-length layout (Figure 2): reasoning tokens per trace for raw, each compressor and truncated.

    Raw lengths are the compress cells' ``original_tokens`` (one count per trace and
    teacher), so raw and compressed traces are counted with the same tokenizer.
    ``compression`` is :func:`grid_compression` with flagged rows, when already read.
    """
    parts = []
    every = compression if compression is not None else grid_compression(g, include_flagged=True)
    if every is not None and "compressed_tokens" in every.columns:
        kept = ~pl.col("drop") if "drop" in every.columns else pl.col("flag").is_null()
        parts.append(every.filter(kept).select(
            "teacher", pl.col("compressor").alias("source"), pl.col("compressed_tokens").alias("reasoning_tokens")))
        if "original_tokens" in every.columns:
            raw = every.unique(["teacher", "id"], keep="first", maintain_order=True)
            parts.insert(0, raw.select("teacher", source=pl.lit("raw"), reasoning_tokens=pl.col("original_tokens")))
    for c in g.of("truncate"):
        df = g.records(c, "truncated.jsonl", ["truncated_tokens"])
        if df is not None:
            parts.append(df.select(teacher=pl.lit(g.teacher_of(c)), source=pl.lit("truncated"),
                                   reasoning_tokens=pl.col("truncated_tokens")))
    if not parts:
        return None
    return pl.concat([p.with_columns(pl.col("reasoning_tokens").cast(pl.Float64)) for p in parts]).drop_nulls()


def _judged_compressor(g: GridOutputs, judge: GridCell) -> str:
    """The compressor whose output a judge cell judged: its upstream compress cell's, else its own axes'."""
    comp = g.upstream_of(judge, "compress")
    return compressor_name(comp) if comp else (judge.axes.get("compressor") or judge.axes.get("source") or NO_VALUE)


def grid_judge(g: GridOutputs) -> pl.DataFrame | None:
    """Judge layout (Table 10) from every judge cell's parsed verdicts (parse failures left out)."""
    parts = []
    for c in g.of("judge"):
        df = g.records(c, "judgements.jsonl",
                       ["id", "dataset", "domain", "faithfulness", "verdict", "answer_alignment", "parse_error"])
        if df is not None:
            parts.append(judged(df).with_columns(teacher=pl.lit(g.teacher_of(c)),
                                                 compressor=pl.lit(_judged_compressor(g, c))))
    return _domains(pl.concat(parts, how="diagonal_relaxed")) if parts else None


def failure_modes(g: GridOutputs) -> pl.DataFrame | None:
    """Judge failure-mode counts per (teacher, compressor), from the judge cells' metrics."""
    rows = []
    for c in g.of("judge"):
        compressor = _judged_compressor(g, c)
        n = c.metrics.get("n") or 0
        teacher = g.teacher_of(c)
        for k, v in c.metrics.items():
            if k.startswith("failure_modes.") and v:
                rows.append({"teacher": teacher, "compressor": compressor, "failure_mode": k.split(".", 1)[1],
                             "count": int(v), "pct_of_judged": 100 * v / n if n else None})
        if c.metrics.get("parse_failures"):
            rows.append({"teacher": teacher, "compressor": compressor,
                         "failure_mode": "(judge parse failure)", "count": int(c.metrics["parse_failures"]),
                         "pct_of_judged": 100 * c.metrics["parse_failures"] / n if n else None})
    if not rows:
        return None
    return paper_sort(pl.DataFrame(rows), ["teacher", "compressor"]).sort(
        ["teacher", "compressor", "count"], descending=[False, False, True], maintain_order=True)
