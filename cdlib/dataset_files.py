"""Raw rows of one original split, from the Hugging Face hub or from local files.

Local files may be JSONL, JSON (one object per line, or an array), Parquet or CSV
(header-less for MMLU's release, with ``DatasetSpec.csv_columns``). A local path
is a file, a directory searched for files named after the split (``test.jsonl``,
``main/test-00000-of-00001.parquet``; for "validation" also ``dev``, ``val``,
``valid``: :data:`SPLIT_ALIASES`), or a pattern with ``{split}`` (and for MMLU
groups ``{subject}``) placeholders. :func:`raw_rows` yields each row with its
location (``file:line``, ``file row i``, ``hub id[config]/split row i``) for
error messages; :func:`cdlib.datasets.load` maps them with the spec's mapping.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

from cdlib.dataset_layouts import DatasetError, DatasetSpec

READABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# Original split names that local files use for the hub's "validation" split
# (CommonsenseQA dev_rand_split.jsonl, BoolQ/WinoGrande dev.jsonl, MedMCQA dev.json,
# HellaSwag hellaswag_val.jsonl, PIQA valid.jsonl).
SPLIT_ALIASES = {"validation": ("validation", "dev", "val", "valid")}


def _read_file(name: str, path: Path, csv_columns: tuple[str, ...] | None = None) -> Iterator[tuple[dict, str]]:
    """Raw rows of one local file with their location ("file:line" or "file row i").

    CSV files have a header line unless ``csv_columns`` names their columns (MMLU's).
    """
    if path.suffix == ".parquet":
        import polars as pl

        try:
            records = pl.read_parquet(path).to_dicts()
        except Exception as e:  # polars raises several kinds for unreadable files
            raise DatasetError(f"{name}: cannot read Parquet file {path}: {e}") from None
        for i, record in enumerate(records):
            yield record, f"{path} row {i}"
        return
    if path.suffix == ".csv":  # e.g. GPQA's gpqa_diamond.csv on the hub, MMLU's original files
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, fieldnames=csv_columns)
            for record in reader:
                if None in record or (csv_columns and None in record.values()):
                    raise DatasetError(
                        f"{name}: {path}:{reader.line_num}: expected {len(reader.fieldnames or ())} CSV fields "
                        f"({', '.join(reader.fieldnames or ())})"
                    )
                yield record, f"{path}:{reader.line_num}"
        return
    if path.suffix not in (".jsonl", ".json"):
        raise DatasetError(f"{name}: {path}: unsupported file type; use one of {', '.join(READABLE_SUFFIXES)}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):  # a JSON array, e.g. MultiArith's train.json
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{name}: {path}:{e.lineno}: invalid JSON: {e.msg}") from None
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise DatasetError(f"{name}: {path} item {i}: expected a JSON object, got {type(record).__name__}")
            yield record, f"{path} item {i}"
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{name}: {path}:{lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(record, dict):
            raise DatasetError(f"{name}: {path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield record, f"{path}:{lineno}"


def _file_rows(spec: DatasetSpec, path: Path) -> Iterator[tuple[dict, str]]:
    """Raw rows of one local file, through the spec's per-file fix-up where it has one."""
    rows = _read_file(spec.name, path, spec.csv_columns)
    return iter(spec.file_fixup(list(rows), path)) if spec.file_fixup else rows


def _split_files(spec: DatasetSpec, path: str | Path, source_split: str) -> list[Path]:
    """Local files holding ``source_split``: the file itself, or files named after the split under a directory."""
    path = Path(str(path).replace("{split}", source_split))
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DatasetError(f"{spec.name}: data path {path} does not exist")
    # A hub repository keeps one folder per config: <config>/<split>-*.parquet (openai/gsm8k main/),
    # or data/<config>/ (HiTZ/MedExpQA data/en/test.en.casimedicos.rag.jsonl beside data/es/, ...).
    for config_dir in (path / spec.config, path / "data" / spec.config) if spec.config else ():
        if config_dir.is_dir():
            path = config_dir
            break
    names = SPLIT_ALIASES.get(source_split, (source_split,))
    readable = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in READABLE_SUFFIXES)
    for name in names:  # the hub's name first, then the original releases' names
        # Any case: AI2's ARC release names its files ARC-Challenge-Test.jsonl, ARC-Easy-Dev.jsonl.
        token = re.compile(rf"(^|[._-]){re.escape(name)}([._-]|$)", re.IGNORECASE)
        files = [p for p in readable if token.search(p.name)]
        if files:
            return files
    # A config held in one file is the hub's "train" split (Idavidrein/gpqa: gpqa_diamond.csv).
    files = [p for p in readable if p.stem == spec.config] if source_split == "train" else []
    if files:
        return files
    raise DatasetError(
        f"{spec.name}: no file for split {source_split!r} under {path} "
        f"(looked for {', '.join(READABLE_SUFFIXES)} files whose name contains {' or '.join(map(repr, names))})"
    )


def _hub_rows(spec: DatasetSpec, config: str | None, source_split: str) -> Iterator[tuple[dict, str]]:
    """Raw rows of one hub split (``datasets.load_dataset``)."""
    import datasets

    try:
        data = datasets.load_dataset(spec.hub_id, config, split=source_split)
    except Exception as e:  # network, gated repo, unknown config: all end the same way
        raise DatasetError(
            f"{spec.name}: cannot load {spec.hub_id} (config {config!r}, split {source_split!r}) from the hub: "
            f"{type(e).__name__}: {e}. Offline? Point data_paths[{spec.name!r}] at a local copy."
        ) from e
    for i, record in enumerate(data):
        yield record, f"{spec.hub_id}[{config}]/{source_split} row {i}"


def raw_rows(spec: DatasetSpec, source_split: str, path: str | Path | None) -> Iterator[tuple[dict, str, str, int]]:
    """(raw row, location, id prefix, index) of one original split, from the hub or local files."""
    if not spec.subjects:
        rows = _hub_rows(spec, spec.config, source_split) if path is None else (
            record for file in _split_files(spec, path, source_split) for record in _file_rows(spec, file)
        )
        for i, (record, where) in enumerate(rows):
            yield record, where, "", i
        return
    # MMLU groups: one subject after the other; ids are "<subject>-<index within subject>".
    # Locally, subjects without data are skipped with one warning naming them (a
    # partial copy, a fixture); a group with no data at all is an error.
    shared: list[tuple[dict, str]] | None = None
    per_subject = path is not None and (
        "{subject}" in str(path) or (Path(path).is_dir() and any((Path(path) / s).is_dir() for s in spec.subjects))
    )
    empty = []
    for subject in spec.subjects:
        if path is None:
            rows = list(_hub_rows(spec, subject, source_split))
        elif per_subject:
            if "{subject}" in str(path):
                subject_path = Path(str(path).replace("{subject}", subject))
            else:
                subject_path = Path(path) / subject
            if not (subject_path.exists() or Path(str(subject_path).replace("{split}", source_split)).exists()):
                empty.append(subject)
                continue
            rows = [r for f in _split_files(spec, subject_path, source_split) for r in _file_rows(spec, f)]
        else:  # one file (or folder) with every subject, told apart by its "subject" column
            if shared is None:
                shared = [r for f in _split_files(spec, path, source_split) for r in _file_rows(spec, f)]
                for record, where in shared:
                    if "subject" not in record:
                        raise DatasetError(
                            f"{spec.name}: {where}: missing column 'subject', needed to pick this group's subjects "
                            "from a file with several (or give a path with {subject}, or one folder per subject)"
                        )
            rows = [(record, where) for record, where in shared if record["subject"] == subject]
        if not rows:
            empty.append(subject)
        for i, (record, where) in enumerate(rows):
            yield record, where, f"{subject}-", i
    if len(empty) == len(spec.subjects):
        raise DatasetError(f"{spec.name}: no {source_split} rows for any of its subjects under {path}")
    if empty and path is not None:
        warnings.warn(f"{spec.name}: no {source_split} rows for subjects {', '.join(empty)} under {path}", stacklevel=3)
