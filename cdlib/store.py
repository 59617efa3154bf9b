"""Append-only JSONL store keyed by record id, safe to kill at any moment.

Every stage writes its records through :class:`Store`. The contract:

* each record is a JSON object with a string ``id`` field, written as one line;
* :meth:`Store.append` writes a whole batch, flushes and fsyncs it, so after it
  returns the batch survives a crash of the process or the machine;
* reopening a store reads the ids already present, so a resumed stage can skip
  them (:meth:`Store.pending`) and :meth:`Store.append` never writes an id twice;
* a half-written last line (the process died mid-write) is cut off on open and
  reported through :attr:`Store.repaired`; it is never fatal;
* any other line that is not a JSON object with an ``id`` (invalid UTF-8,
  invalid JSON, no string id) or that repeats an id raises
  :class:`StoreCorruptError`, naming the file and the 1-based line number.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class StoreCorruptError(ValueError):
    """A line in the middle of a store is not a valid record."""


def _parse_line(line: bytes, path: Path, lineno: int) -> dict[str, Any]:
    try:
        rec = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise StoreCorruptError(f"{path}:{lineno}: not valid UTF-8 (byte {e.object[e.start]:#04x} at column "
                                f"{e.start + 1})") from None
    except json.JSONDecodeError as e:
        raise StoreCorruptError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
        raise StoreCorruptError(f"{path}:{lineno}: record is not an object with a string 'id'")
    return rec


class Store:
    """An append-only JSONL file of records keyed by their ``id``.

    >>> s = Store(tmp / "traces.jsonl")           # doctest: +SKIP
    >>> todo = s.pending(all_ids)                  # doctest: +SKIP
    >>> s.append([{"id": "q1", "text": "..."}])    # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired = False
        self._ids: set[str] = set()
        self._load()

    def _load(self) -> None:
        """Read the ids line by line (memory holds the ids, not the file), repairing a cut last line."""
        if not self.path.exists():
            self.path.touch()
            return
        first_line: dict[str, int] = {}
        good_len = 0  # bytes up to the last newline
        tail, tail_lineno = b"", 0  # bytes after the last newline: empty unless the last write was cut
        with self.path.open("rb") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.endswith(b"\n"):
                    tail, tail_lineno = line, lineno
                    break
                good_len += len(line)
                if line.strip():
                    rid = _parse_line(line, self.path, lineno)["id"]
                    if rid in first_line:
                        raise StoreCorruptError(f"{self.path}:{lineno}: duplicate id {rid!r} (first at line "
                                                f"{first_line[rid]}); a store holds each id once")
                    first_line[rid] = lineno
        self._ids = set(first_line)
        if tail.strip():
            # A last line without its newline was cut mid-write, unless it happens
            # to be a complete record (a writer that died between the bytes and "\n").
            try:
                rec = _parse_line(tail, self.path, tail_lineno)
            except StoreCorruptError:
                rec = None
            if rec is not None and rec["id"] not in self._ids:
                self._ids.add(rec["id"])
                with self.path.open("ab") as f:
                    f.write(b"\n")
                    f.flush()
                    os.fsync(f.fileno())
                return
        if tail:
            with self.path.open("r+b") as f:
                f.truncate(good_len)
                f.flush()
                os.fsync(f.fileno())
            self.repaired = True

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, record_id: object) -> bool:
        return record_id in self._ids

    @property
    def ids(self) -> frozenset[str]:
        """Ids already stored."""
        return frozenset(self._ids)

    def pending(self, ids: Iterable[str]) -> list[str]:
        """The ids of ``ids`` not yet stored, in their order."""
        return [i for i in ids if i not in self._ids]

    def append(self, records: Iterable[dict[str, Any]]) -> int:
        """Write a batch of records, skipping ids already stored; flush and fsync.

        Returns the number of records written. A record without a string ``id`` or
        one that cannot be serialised raises before anything of the batch is written.
        """
        lines: list[bytes] = []
        batch_ids: list[str] = []
        for rec in records:
            rid = rec.get("id") if isinstance(rec, dict) else None
            if not isinstance(rid, str):
                raise ValueError(f"{self.path}: record without a string 'id': {str(rec)[:200]}")
            if rid in self._ids or rid in batch_ids:
                continue
            lines.append(json.dumps(rec, ensure_ascii=False).encode() + b"\n")
            batch_ids.append(rid)
        if not lines:
            return 0
        with self.path.open("ab") as f:
            f.write(b"".join(lines))
            f.flush()
            os.fsync(f.fileno())
        self._ids.update(batch_ids)
        return len(lines)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield every stored record in write order."""
        with self.path.open("rb") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    yield _parse_line(line, self.path, lineno)

    def read(self) -> list[dict[str, Any]]:
        """All stored records as a list."""
        return list(self)

    def to_polars(self):
        """All stored records as a polars DataFrame (empty frame if none)."""
        import polars as pl

        recs = self.read()
        return pl.DataFrame(recs, infer_schema_length=None) if recs else pl.DataFrame()


def merge(shards: Iterable[str | os.PathLike[str]], dest: str | os.PathLike[str]) -> Store:
    """Merge shard stores (e.g. one per Slurm array task) into ``dest``; first id wins."""
    out = Store(dest)
    for shard in shards:
        batch: list[dict[str, Any]] = []
        for rec in Store(shard):
            batch.append(rec)
            if len(batch) >= 1000:
                out.append(batch)
                batch = []
        out.append(batch)
    return out
