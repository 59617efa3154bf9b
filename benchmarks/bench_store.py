"""Memory and time of opening a stage's record store at a realistic size.

The paper's teacher pass keeps 283,335 verified traces (mean ~5-19k characters by dataset), so a
``traces.jsonl`` is gigabytes. Every resumed stage opens its :class:`cdlib.store.Store` (to learn which
ids are done) and training reads its input through ``cdlib.training.data.load_records``. This writes a
store of ``--mb`` megabytes of trace-sized records, then, each in a fresh process (peak RSS is per
process), measures:

* ``open``: ``Store(path)`` alone (what a resumed generation or compression does);
* ``load_records``: training's read of the whole file (the records themselves must be in memory).

It prints seconds, peak RSS above the interpreter's baseline, and that peak as a multiple of the file's
size.

    .venv/bin/python benchmarks/bench_store.py --mb 1000
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_store(path: Path, megabytes: float, seed: int = 0) -> int:
    """A traces.jsonl of about ``megabytes`` MB: records with the generate stage's fields and long traces."""
    rng = random.Random(seed)
    words = "so the first step gives us then we add subtract check again wait let me verify that".split()
    target, n = megabytes * 1e6, 0
    with path.open("w") as f:
        while f.tell() < target:
            reasoning = " ".join(rng.choice(words) for _ in range(rng.randint(300, 3000)))
            rec = {"id": f"bench/train/{n}", "dataset": "bench", "split": "train", "question": "What is 2 + 3?",
                   "gold": "5", "answer_type": "numeric", "reasoning": reasoning,
                   "answer": "The answer is \\boxed{5}.", "extracted": "5", "correct": True}
            f.write(json.dumps(rec) + "\n")
            n += 1
    return n


def measure(what: str, path: str) -> None:
    """Run in a child: print seconds and peak RSS (bytes) above the baseline after imports."""
    sys.path.insert(0, str(REPO))
    from cdlib.store import Store
    from cdlib.training.data import load_records

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    if what == "open":
        n = len(Store(path))
    else:
        n = len(load_records(Path(path).parent)[0])
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"what": what, "records": n, "seconds": seconds, "peak_bytes": peak - base}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=500, help="store size in MB (default 500)")
    ap.add_argument("--child", nargs=2, metavar=("WHAT", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        measure(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "traces.jsonl"
        n = write_store(path, args.mb)
        size = path.stat().st_size
        print(f"store: {n:,} records, {size / 1e6:,.0f} MB ({path.name})")
        print(f"{'read':14s} {'seconds':>8s} {'peak MB':>9s} {'x file':>7s}")
        for what in ("open", "load_records"):
            out = subprocess.run([sys.executable, __file__, "--child", what, str(path)], check=True,
                                 capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{what:14s} {r['seconds']:8.2f} {r['peak_bytes'] / 1e6:9,.0f} {r['peak_bytes'] / size:7.2f}")


if __name__ == "__main__":
    main()
