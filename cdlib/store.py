"""Append-only JSONL store keyed by record id, safe to kill at any moment, safe to read while written.

Every stage writes its records through :class:`Store`. The contract:

* each record is a JSON object with a string ``id`` field, written as one line;
* a store has one writer, the stage that owns the cell (it holds the cell lock), which
  opens it with ``Store(path, writable=True)``; everyone else (explore, export, the
  tables, a downstream stage) opens it to read, ``Store(path)``, which changes nothing
  on disk and creates no path, so a reader beside a running stage never cuts its batch;
* :meth:`Store.append` writes a whole batch, flushes and fsyncs it, so after it
  returns the batch survives a crash of the process or the machine;
* reopening a store reads the ids already present, so a resumed stage can skip
  them (:meth:`Store.pending`) and :meth:`Store.append` never writes an id twice;
* a last line without its newline is a write in flight (or cut by a crash): a reader
  skips it; the writer cuts it off on open and reports it through :attr:`Store.repaired`
  (or, when it holds a whole record, ends it with its newline); it is never fatal;
* any other line that is not a JSON object with an ``id`` (invalid UTF-8,
  invalid JSON, no string id) or that repeats an id raises
  :class:`StoreCorruptError`, naming the file and the 1-based line number.

A downstream stage reads its input with :func:`read_upstream`, which also refuses a
store that holds no records or another number of records than its cell's ``metrics.json`` says.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cdlib.outputs import METRICS, read_metrics


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

    ``Store(path)`` opens it to read: nothing on disk changes and no path is created (a
    missing file is an empty store). ``Store(path, writable=True)`` opens it as its single
    writer: the folder and the file are created and a cut last line is repaired. A reader
    that calls :meth:`append` becomes the writer at that moment (the same repair first).

    >>> s = Store(tmp / "traces.jsonl", writable=True)  # doctest: +SKIP
    >>> todo = s.pending(all_ids)                      # doctest: +SKIP
    >>> s.append([{"id": "q1", "text": "..."}])        # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str], writable: bool = False):
        self.path = Path(path)
        self.writable = False
        self.repaired = False
        self._ids: set[str] = set()
        if writable:
            self._open_for_append()
        else:
            self._load()

    def _open_for_append(self) -> None:
        """Become the store's writer: create the file, repair a cut last line, reread the ids."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self.writable = True
        self._load()

    def _load(self) -> None:
        """Read the ids line by line (memory holds the ids, not the file).

        A last line without its newline is left alone by a reader (it may be a batch being
        written); the writer cuts it off, or ends it with a newline when it is a whole new record.
        """
        if not self.path.exists():
            return
        first_line: dict[str, int] = {}
        good_len = 0  # bytes up to the last newline
        tail, tail_lineno = b"", 0  # bytes after the last newline: empty unless a write is in flight or was cut
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
        if not tail or not self.writable:
            return
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
        if not self.writable:
            self._open_for_append()
            lines = [ln for ln, rid in zip(lines, batch_ids) if rid not in self._ids]
            batch_ids = [rid for rid in batch_ids if rid not in self._ids]
            if not lines:
                return 0
        try:
            with self.path.open("ab") as f:
                f.write(b"".join(lines))
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a full or read-only disk: name the store that was cut, not only the errno
            raise OSError(e.errno, e.strerror, str(self.path)) from e
        self._ids.update(batch_ids)
        return len(lines)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield every stored record in write order; a last line without its newline (in flight) is skipped."""
        try:
            f = self.path.open("rb")
        except FileNotFoundError:
            return
        with f:
            for lineno, line in enumerate(f, start=1):
                if not line.endswith(b"\n"):
                    return
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
    out = Store(dest, writable=True)
    for shard in shards:
        batch: list[dict[str, Any]] = []
        for rec in Store(shard):
            batch.append(rec)
            if len(batch) >= 1000:
                out.append(batch)
                batch = []
        out.append(batch)
    return out


#: The ``metrics.json`` key that holds the number of records of each stage's store (each stage's ``metrics()``).
RECORD_COUNT_KEYS = {"traces.jsonl": "kept", "compressed.jsonl": "n", "truncated.jsonl": "n"}


class UpstreamError(ValueError):
    """An input store that a stage must not start from: empty, or not what its cell finished with."""


def check_upstream(path: str | os.PathLike[str], stage: str) -> int:
    """The number of whole records of another cell's store that ``stage`` takes as its input.

    Read without writing (memory holds the ids only). Refused with :class:`UpstreamError`,
    before the stage does any work: a store that holds no record (the stage would have
    nothing to do), and one whose count of whole records differs from the one its cell's
    ``metrics.json`` recorded (:data:`RECORD_COUNT_KEYS`): a last line cut after the cell
    finished, or a store changed since. A cell without ``metrics.json`` is not compared.
    """
    path = Path(path)
    n = len(Store(path))
    if not n:
        what = "an empty file" if path.exists() else "no such file"
        raise UpstreamError(f"{stage}: its input {path} holds no records ({what}): nothing to {stage}; rerun "
                            f"the upstream cell or point {stage} at one that produced records")
    key = RECORD_COUNT_KEYS.get(path.name)
    metrics_path = path.parent / METRICS
    metrics = read_metrics(path.parent)
    recorded = metrics.get(key) if key and isinstance(metrics, dict) else None
    if isinstance(recorded, int) and recorded != n:
        raise UpstreamError(f"{stage}: its input {path} holds {n} whole records but its cell's {metrics_path} "
                            f"records {key} = {recorded}: the store was cut or changed after the cell finished; "
                            f"rerun the upstream cell")
    return n


def read_upstream(path: str | os.PathLike[str], stage: str) -> list[dict[str, Any]]:
    """The records of another cell's store that ``stage`` takes as its input, once :func:`check_upstream` passes."""
    check_upstream(path, stage)
    return Store(path).read()


def read_fields(path: str | os.PathLike[str], fields: list[str], lengths: tuple[str, ...] = ()):
    """Some fields of a JSONL store as a polars frame (``<f>_chars`` = len(text) for each field in
    ``lengths``), reading line by line and holding only those fields: a paper-scale ``traces.jsonl``
    holds gigabytes of text, which :meth:`Store.to_polars` would hold whole.

    A last line cut mid-write (a killed stage) is ignored, as the store does; any other
    bad line raises naming the file and line.
    """
    import polars as pl

    path = Path(path)
    rows = []
    with path.open("rb") as f:  # line by line: a paper-scale traces.jsonl holds gigabytes of text
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                if not line.endswith(b"\n"):  # the last line, cut mid-write
                    break
                raise ValueError(f"{path}:{lineno}: not a JSON record ({e.msg})") from None
            row = {k: rec.get(k) for k in fields}
            for k in lengths:
                row[f"{k}_chars"] = len(rec.get(k) or "")
            rows.append(row)
    return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()
