"""Readers never write: a store opened to read changes nothing on disk, beside a running writer too.

Only the stage that owns a cell (``Store(path, writable=True)``) repairs a cut last line; a
reader (explore, export, the tables, a downstream stage) skips a last line without its
newline, and a downstream stage refuses an input that is empty or holds another number of
records than its cell's ``metrics.json`` says, naming both numbers and the file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdlib import compress, explore, export, generate, judge, outputs, truncate
from cdlib.training import data as train_data
from cdlib.params import CompressParams, GenerateParams, JudgeParams, SamplingParams, ToyParams, TruncateParams
from cdlib.store import Store, UpstreamError

REPO = Path(__file__).resolve().parents[1]


def _wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    """Wait until ``condition()`` holds; fail naming ``what`` if ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process ended first (rc {proc.returncode}): "
                                 f"{proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.01)


def _python(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", *args], cwd=REPO, stderr=subprocess.PIPE, **kw)


# --------------------------------------------------------------------------- a reader alone


def test_opening_a_missing_store_to_read_creates_nothing(tmp_path):
    path = tmp_path / "no" / "such" / "traces.jsonl"
    s = Store(path)
    assert len(s) == 0 and s.read() == [] and s.pending(["a", "b"]) == ["a", "b"] and s.to_polars().is_empty()
    assert not (tmp_path / "no").exists(), "a reader created a folder"
    w = Store(path, writable=True)
    assert path.exists() and len(w) == 0, "the writer creates its file"


@pytest.mark.parametrize("tail", [b'{"id": "c", "v"', b'{"id": "c"}'], ids=["cut", "whole-record-no-newline"])
def test_a_reader_skips_a_last_line_without_newline_and_leaves_it(tmp_path, tail):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n' + tail)
    before = path.read_bytes()
    s = Store(path)
    assert s.ids == {"a", "b"} and [r["id"] for r in s] == ["a", "b"] and s.pending(["a", "c"]) == ["c"]
    assert not s.repaired and path.read_bytes() == before, "a reader wrote to the store"
    w = Store(path, writable=True)  # the single writer repairs: cuts a cut line, ends a whole record
    assert [r["id"] for r in w] == (["a", "b"] if w.repaired else ["a", "b", "c"])
    assert w.repaired == (tail == b'{"id": "c", "v"')


def test_a_reader_that_appends_becomes_the_writer_and_repairs_first(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b", "v"')
    s = Store(path)
    assert s.append([{"id": "b"}, {"id": "c"}]) == 2
    assert s.repaired and [r["id"] for r in Store(path)] == ["a", "b", "c"]


# --------------------------------------------------------------------------- a reader beside a writer process

WRITER_IN_FLIGHT = r"""
import json, os, sys, time
from pathlib import Path
from cdlib.store import Store
path, ready, go = map(Path, sys.argv[1:4])
Store(path, writable=True).append({"id": f"q{i:03d}", "text": "x" * 1000} for i in range(50))
batch = b"".join(json.dumps({"id": f"q{i:03d}", "text": "y" * 1000}).encode() + b"\n" for i in range(50, 60))
with path.open("ab") as f:  # what Store.append's write looks like on disk while it is under way
    half = len(batch) // 2 + 100  # five whole records and the start of the sixth
    f.write(batch[:half]); f.flush(); os.fsync(f.fileno())
    ready.touch()
    deadline = time.monotonic() + 120
    while not go.exists():
        assert time.monotonic() < deadline, "never told to finish its batch"
        time.sleep(0.01)
    f.write(batch[half:]); f.flush(); os.fsync(f.fileno())
"""

READER = r"""
import json, sys
from pathlib import Path
from cdlib.store import Store
path = Path(sys.argv[1])
before = path.read_bytes()
s = Store(path)
print(json.dumps({"len": len(s), "seen": [r["id"] for r in s], "pending": s.pending(f"q{i:03d}" for i in range(60)),
                  "unchanged": path.read_bytes() == before}))
"""


def test_a_reader_opening_a_store_mid_batch_cuts_nothing(tmp_path):
    """A writer process stops half way through a batch; a reader process opens, iterates and asks for
    pending ids; then the writer finishes its batch. Every record is whole and there, and the reader saw
    exactly the whole lines that were on disk."""
    path, ready, go = tmp_path / "traces.jsonl", tmp_path / "ready", tmp_path / "go"
    writer = _python(WRITER_IN_FLIGHT, str(path), str(ready), str(go))
    try:
        _wait_for(ready.exists, "the writer's half-written batch", writer)
        reader = subprocess.run([sys.executable, "-c", READER, str(path)], cwd=REPO, capture_output=True,
                                text=True, timeout=120)
        assert reader.returncode == 0, reader.stderr[-2000:]
        seen = json.loads(reader.stdout)
    finally:
        go.touch()
        writer.wait(timeout=120)
    assert writer.returncode == 0, writer.stderr.read().decode()[-2000:]
    assert seen["unchanged"], "opening the store to read changed the file under its writer"
    assert seen["len"] == 55 and seen["seen"] == [f"q{i:03d}" for i in range(55)], "the whole lines on disk"
    assert seen["pending"] == [f"q{i:03d}" for i in range(55, 60)]
    assert [r["id"] for r in Store(path, writable=True)] == [f"q{i:03d}" for i in range(60)]


APPENDER = r"""
import sys, time
from pathlib import Path
from cdlib.store import Store
path, started, done, batches = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
s = Store(path, writable=True)
deadline = time.monotonic() + 120
while not started.exists():  # the reader runs before the first batch
    assert time.monotonic() < deadline, "the reader never started"
    time.sleep(0.01)
for b in range(batches):
    s.append({"id": f"b{b:04d}-{i:02d}", "text": "z" * 3000} for i in range(20))
done.touch()
"""

LOOKER = r"""
import json, sys
from pathlib import Path
from cdlib.store import Store
path, started, done = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
counts = []
started.touch()
for _ in range(100_000):
    finished = done.exists()
    s = Store(path)
    counts.append((len(s), sum(1 for _ in s)))
    if finished:
        break
print(json.dumps(counts))
"""


def test_readers_beside_a_running_writer_lose_none_of_its_records(tmp_path):
    path, started, done, batches = tmp_path / "traces.jsonl", tmp_path / "started", tmp_path / "done", 300
    writer = _python(APPENDER, str(path), str(started), str(done), str(batches))
    reader = _python(LOOKER, str(path), str(started), str(done), stdout=subprocess.PIPE)
    out, err = reader.communicate(timeout=600)
    assert reader.returncode == 0, err.decode()[-2000:]
    writer.wait(timeout=600)
    assert writer.returncode == 0, writer.stderr.read().decode()[-2000:]
    counts = json.loads(out)
    assert len(counts) > 2 and counts[-1] == [batches * 20, batches * 20], "the reader saw the finished store"
    opened = [n for n, _ in counts]
    assert opened == sorted(opened), "a reader saw the store shrink"
    assert all(n <= iterated for n, iterated in counts), "iteration reads at least the records counted at open"
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) - 1 == batches * 20, "records were cut under the writer"


# --------------------------------------------------------------------------- stages reading their input


def _generate(tmp_path: Path, max_tokens: int = 2000) -> tuple[GenerateParams, int]:
    """A finished toy generate cell (metrics.json written as the notebook does); its number of traces."""
    P = GenerateParams(out_dir=str(tmp_path / "gen"), toy=ToyParams(n_train=30, n_test=5, slip_rate=0.0), rounds=1,
                       sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens, seed=0))
    m = generate.run(P)
    outputs.write_metrics(P.out_dir, m)
    return P, m["kept"]


def _cut_last_line(path: Path) -> bytes:
    """Cut the store's last record short (no newline), as a crash or a stray writer leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[:-25])
    return path.read_bytes()


def test_downstream_stages_refuse_a_cut_upstream_naming_both_counts(tmp_path):
    P, n = _generate(tmp_path)
    C = CompressParams(out_dir=str(tmp_path / "comp"), traces=P.out_dir)
    outputs.write_metrics(C.out_dir, compress.run(C))
    traces, compressed = Path(P.out_dir) / "traces.jsonl", Path(C.out_dir) / "compressed.jsonl"
    cut_traces = _cut_last_line(traces)
    expected = rf"holds {n - 1} whole records but its cell's .*metrics\.json records kept = {n}"
    with pytest.raises(UpstreamError, match=rf"compress: its input {traces}.*{expected}"):
        compress.run(C.model_copy(update={"out_dir": str(tmp_path / "comp2")}))
    with pytest.raises(UpstreamError, match=rf"truncate: its input {traces}.*{expected}"):
        truncate.run(TruncateParams(out_dir=str(tmp_path / "trunc"), traces=P.out_dir, mode="ratio"))
    with pytest.raises(UpstreamError, match=rf"train: its input {traces}.*{expected}"):
        train_data.load_records(P.out_dir, "raw")
    assert traces.read_bytes() == cut_traces, "a downstream stage wrote to its input"
    assert not (tmp_path / "comp2").exists() and not (tmp_path / "trunc").exists(), "work began before the refusal"

    cut_compressed = _cut_last_line(compressed)
    with pytest.raises(UpstreamError, match=rf"judge: its input {compressed} holds {n - 1} whole records .* n = {n}"):
        judge.run(JudgeParams(out_dir=str(tmp_path / "judge"), compressed=C.out_dir, judge="rule"))
    assert compressed.read_bytes() == cut_compressed


def test_explore_and_export_read_a_cut_store_without_writing(tmp_path):
    P, n = _generate(tmp_path)
    (Path(P.out_dir) / "manifest.json").write_text(json.dumps({"cell": "generate/toy", "status": "done"}))
    traces = Path(P.out_dir) / "traces.jsonl"
    cut = _cut_last_line(traces)
    assert explore.load({"toy": P.out_dir}).height == n - 1
    with pytest.raises(export.ExportError, match=rf"export: its input {traces} holds {n - 1} .* kept = {n}"):
        export.export_cell(P.out_dir, tmp_path / "export")
    assert traces.read_bytes() == cut


def test_an_empty_upstream_is_refused_before_any_work(tmp_path):
    P, n = _generate(tmp_path, max_tokens=30)  # every trace cut at the token cap: answered, none kept
    traces = Path(P.out_dir) / "traces.jsonl"
    assert n == 0 and traces.read_bytes() == b""
    C = CompressParams(out_dir=str(tmp_path / "comp"), traces=P.out_dir)
    with pytest.raises(UpstreamError, match=rf"compress: its input {traces} holds no records \(an empty file\)"):
        compress.run(C)
    assert not (tmp_path / "comp").exists(), "compress began before saying its input is empty"
    with pytest.raises(UpstreamError, match="train: its input .* holds no records"):
        train_data.load_records(P.out_dir, "raw")
    comp = tmp_path / "comp-dropped"
    Store(comp / "compressed.jsonl", writable=True).append(
        [{"id": "toy/train/0", "reasoning": "", "flag": "empty", "drop": True}])
    with pytest.raises(UpstreamError, match="truncate: no raw trace of .* has a kept compression"):
        truncate.run(TruncateParams(out_dir=str(tmp_path / "trunc"), traces=_generate(tmp_path / "full")[0].out_dir,
                                    compressed=str(comp)))
    assert not (tmp_path / "trunc").exists()
