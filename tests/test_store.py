"""The resumable JSONL store: crash safety, its writer's repair of a cut last line, clear errors.

Readers beside a writer, and stages refusing a cut input, are tests/test_store_readers.py."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from cdlib.store import Store, StoreCorruptError, merge

WRITER = r"""
import sys, time
from cdlib.store import Store
path, n, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = Store(path, writable=True)
todo = s.pending(f"q{i:05d}" for i in range(n))
for k in range(0, len(todo), batch):
    time.sleep(0.03)  # stands in for generating the batch
    s.append({"id": i, "text": "x" * 20000, "n": int(i[1:])} for i in todo[k:k + batch])
"""


def test_sigkill_at_random_points_then_resume(tmp_path):
    path, n = tmp_path / "s.jsonl", 6000
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(0)
    kills = repairs = 0
    sizes = []
    while kills < 25:
        p = subprocess.Popen([sys.executable, str(script), str(path), str(n), "20"])
        time.sleep(rng.uniform(0.1, 0.5))
        if p.poll() is not None:
            break  # finished before we could kill it
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        kills += 1
        raw = path.read_bytes() if path.exists() else b""
        repairs += bool(raw) and not raw.endswith(b"\n")
        sizes.append(len(raw))
    assert kills >= 20, "the writer finished too early to be killed 20 times; make the job bigger"
    subprocess.run([sys.executable, str(script), str(path), str(n), "20"], check=True)
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == n
    assert set(ids) == {f"q{i:05d}" for i in range(n)}
    assert sizes == sorted(sizes), "the store only ever grows between kills"


def test_cut_last_line_is_repaired(tmp_path):
    path = tmp_path / "s.jsonl"
    s = Store(path, writable=True)
    s.append([{"id": "a", "v": 1}, {"id": "b", "v": 2}])
    with path.open("ab") as f:
        f.write(b'{"id": "c", "v"')  # the process died mid-write
    s2 = Store(path, writable=True)
    assert s2.repaired
    assert s2.ids == {"a", "b"}
    assert s2.append([{"id": "c", "v": 3}]) == 1
    assert [r["id"] for r in Store(path)] == ["a", "b", "c"]


def test_complete_last_record_without_newline_is_kept(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}')
    s = Store(path, writable=True)
    assert not s.repaired and s.ids == {"a", "b"}
    s.append([{"id": "c"}])
    assert [r["id"] for r in s] == ["a", "b", "c"]


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"\n{"id": "c"}\n')
    with pytest.raises(StoreCorruptError, match=r"s\.jsonl:2: not valid JSON"):
        Store(path)
    path.write_text('{"id": "a"}\n[1, 2]\n{"id": "c"}\n')
    with pytest.raises(StoreCorruptError, match=r"s\.jsonl:2: .*string 'id'"):
        Store(path)


def test_append_skips_known_ids_and_rejects_bad_records(tmp_path):
    s = Store(tmp_path / "s.jsonl")
    assert s.append([{"id": "a"}, {"id": "a"}, {"id": "b"}]) == 2
    assert s.append([{"id": "a"}]) == 0
    assert s.pending(["a", "c", "b", "d"]) == ["c", "d"]
    with pytest.raises(ValueError, match="without a string 'id'"):
        s.append([{"id": "e"}, {"name": "no id"}])
    assert "e" not in s, "a bad batch writes nothing"
    assert len(Store(tmp_path / "s.jsonl")) == 2


def test_merge_shards(tmp_path):
    a, b = Store(tmp_path / "a.jsonl"), Store(tmp_path / "b.jsonl")
    a.append([{"id": "1", "src": "a"}, {"id": "2", "src": "a"}])
    b.append([{"id": "2", "src": "b"}, {"id": "3", "src": "b"}])
    out = merge([a.path, b.path], tmp_path / "all.jsonl")
    assert {r["id"]: r["src"] for r in out} == {"1": "a", "2": "a", "3": "b"}
    assert out.to_polars().height == 3


def test_invalid_utf8_names_file_line_and_byte(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_bytes(b'{"id": "a"}\n{"id": "b", "text": "caf\xe9"}\n{"id": "c"}\n')
    with pytest.raises(StoreCorruptError, match=r"s\.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        Store(p)


def test_duplicate_id_names_both_lines(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "a"}\n')
    with pytest.raises(StoreCorruptError, match=r"s\.jsonl:3: duplicate id 'a' \(first at line 1\)"):
        Store(p)


def test_a_write_error_names_the_store(tmp_path):
    """A full disk (here: a file-size limit, EFBIG) raises an OSError that names the store's path."""
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "cut" / "traces.jsonl"
    code = textwrap.dedent(f"""
        import resource, signal
        from cdlib.store import Store
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        s = Store({str(path)!r}, writable=True)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            s.append([{{"id": str(i), "text": "x" * 100}} for i in range(100)])
        except OSError as e:
            print("ERR", e.errno, e.filename)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("ERR 27 ") and out.strip().endswith(str(path)), out
