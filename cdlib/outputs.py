"""A cell's output files, read in one place: ``manifest.json``, ``metrics.json``, a train cell's
``checkpoint.json``, and which records of a compress or truncate cell are left out downstream.

Every stage, the runner and the report read another cell's files through here, so a format has one
reader: the runner writes a cell's manifest, the notebook its metrics (:func:`write_metrics`), the
train stage its checkpoint (:mod:`cdlib.training.checkpoint`, with :func:`portable` paths). Writes are
atomic (a temporary file, then a rename) and pass through :mod:`cdlib.secrets`, so no credential
reaches a file.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from cdlib.params import EngineParams
from cdlib.secrets import scrub_text

MANIFEST = "manifest.json"  # written by the runner (cdlib.grid.cells): kind, inputs, status, cost, identity
METRICS = "metrics.json"  # written by the stage's notebook; the runner marks a cell done only when it exists
CHECKPOINT = "checkpoint.json"  # written by a train cell: what to load for the trained student
PATH_KEYS = ("model", "adapter", "base", "unmerged_adapter")  # checkpoint.json's keys that name a path


# --------------------------------------------------------------------------- json files


def read_json(path: str | Path, strict: bool = False) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when there is no such file. An unreadable or invalid file is
    None too (a cell being written, a garbled one: the runner judges it as not done), or with ``strict``
    a ValueError naming the file and line (the report names what it cannot read)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except json.JSONDecodeError as e:
        if strict:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        return None
    except UnicodeDecodeError:
        if strict:
            raise
        return None


def read_manifest(cell: str | Path, strict: bool = False) -> dict[str, Any] | None:
    """A cell directory's ``manifest.json`` (:func:`read_json`)."""
    return read_json(Path(cell) / MANIFEST, strict)


def read_metrics(cell: str | Path, strict: bool = False) -> dict[str, Any] | None:
    """A cell directory's ``metrics.json`` (:func:`read_json`)."""
    return read_json(Path(cell) / METRICS, strict)


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


def write_text(path: Path, text: str) -> None:
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


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON to ``path`` (:func:`write_text`), scrubbed of credentials."""
    write_text(path, scrub_text(json.dumps(data, indent=2, default=str)))


def write_metrics(out_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write a cell's ``metrics.json`` (atomically); the runner marks a cell done only when it exists."""
    path = Path(out_dir) / METRICS
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, metrics)
    return path


# --------------------------------------------------------------------------- a train cell's checkpoint


def portable(info: dict[str, Any], cell: Path) -> dict[str, Any]:
    """``info`` with each path inside the grid's output tree (the cell directory's grandparent,
    ``outputs/<grid>/``) written relative to the cell, so a moved or copied tree (rsync'd from a
    cluster) loads its own models; paths elsewhere (a hub id, a shared model directory) stay as they are."""
    tree = cell.resolve().parent.parent
    out = dict(info)
    for key in PATH_KEYS:
        value = info.get(key)
        if value and Path(value).is_absolute() and Path(value).resolve().is_relative_to(tree):
            out[key] = os.path.relpath(Path(value).resolve(), cell.resolve())
    return out


def has_checkpoint(cell: str | Path) -> bool:
    """Whether ``cell`` is a train cell that saved its student (it holds ``checkpoint.json``)."""
    return (Path(cell) / CHECKPOINT).exists()


def read_checkpoint(cell: str | Path) -> dict[str, Any]:
    """A train cell's ``checkpoint.json`` with its relative paths (:func:`portable`) resolved from the
    cell directory where it now lies."""
    cell = Path(cell)
    info = json.loads((cell / CHECKPOINT).read_text())
    for key in PATH_KEYS:
        value = info.get(key)
        if value and not Path(value).is_absolute() and (cell / value).exists():
            info[key] = str((cell / value).resolve())
    return info


def resolve_model(model: str) -> dict[str, Any]:
    """What to load for ``model``: a train cell directory (its ``checkpoint.json``), a model directory or a hub id.

    Returns ``{"model": path or id, "adapter": path or None}``.
    """
    if has_checkpoint(model):
        info = read_checkpoint(model)
        return {"model": info["model"], "adapter": info.get("adapter")}
    return {"model": model, "adapter": None}


def engine_for(engine: EngineParams, model: str) -> EngineParams:
    """``engine`` loading ``model`` (:func:`resolve_model`): a LoRA student's adapter is served beside its
    base (``enable_lora``, ``lora_path``)."""
    target = resolve_model(model)
    ep = engine.model_copy(update={"model": target["model"]})
    if target["adapter"]:
        ep = ep.model_copy(update={"enable_lora": True, "lora_path": target["adapter"]})
    return ep


# --------------------------------------------------------------------------- compress and truncate records


def failed(rec: dict[str, Any]) -> bool:
    """Whether a compress record is a compression that never came back (a permanent engine error)."""
    return rec.get("flag") == "error"


def dropped(rec: dict[str, Any]) -> bool:
    """Whether a compress or truncate record is left out downstream (training, truncation, tables).

    A failed compression (:func:`failed`) always is; records written with ``drop_flagged`` carry
    ``drop``; older ones are dropped when flagged.
    """
    if failed(rec):
        return True
    return bool(rec["drop"]) if rec.get("drop") is not None else rec.get("flag") is not None


def failed_expr():
    """:func:`failed` as a polars expression over ``flag``."""
    import polars as pl

    return (pl.col("flag").cast(pl.String) == "error").fill_null(False)


def dropped_expr():
    """:func:`dropped` as a polars expression over ``flag`` and ``drop``."""
    import polars as pl

    return failed_expr() | pl.col("drop").cast(pl.Boolean).fill_null(pl.col("flag").cast(pl.String).is_not_null())
