"""Predicted vs actual remaining time over a finished grid run, replayed from its cells' manifests.

At each cell's end (in the order the cells ended) it asks the run's ETA (:class:`cdlib.progress.Estimator`,
timing each cell left by the finished cells of its stage, else its kind, scaled by planned training
size) what is left, knowing only the cells finished by then, and prints it beside the time the run
actually still took, and beside the former estimate (the mean of all finished cells times the cells left).
Cells running at that moment count by their elapsed time; the slots are the most cells that ran at once.

    .venv/bin/python benchmarks/bench_eta.py [outputs/demo]

Needs a grid directory whose cells ran in one run (``make demo`` leaves outputs/demo); with fewer than two
finished cells it writes nothing and says so.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import yaml

from cdlib.progress import Estimator, duration, planned_size


def cells(root: Path) -> list[dict]:
    out = []
    for m_path in sorted(root.rglob("manifest.json")):
        m = json.loads(m_path.read_text())
        if m.get("status") != "done" or not m.get("start") or not m.get("end"):
            continue
        params_yaml = m_path.parent / "params.yaml"
        params = yaml.safe_load(params_yaml.read_text()) if params_yaml.exists() else {}
        key = (m.get("stage") or m_path.parent.parent.name, m.get("kind"), planned_size(m.get("kind"), params or {}))
        out.append({"id": m.get("cell") or str(m_path.parent.relative_to(root)), "key": key,
                    "start": dt.datetime.fromisoformat(m["start"]).timestamp(),
                    "end": dt.datetime.fromisoformat(m["end"]).timestamp()})
    return sorted(out, key=lambda c: c["end"])


def main(root: str = "outputs/demo") -> int:
    found = cells(Path(root))
    if len(found) < 2:
        print(f"{root}: {len(found)} finished cell(s) with start and end times; run `make demo` first "
              f"(it leaves outputs/demo) or name a finished grid's directory. Nothing to replay.")
        return 1
    jobs = max(sum(c["start"] <= t["start"] < c["end"] for c in found) for t in found)
    last = found[-1]["end"]
    print(f"{root}: {len(found)} cells, up to {jobs} at once, {duration(last - min(c['start'] for c in found))} in all")
    print(f"{'after cell':<44} {'left':>5} {'actual':>8} {'ETA':>8} {'ratio':>6} {'mean-ETA':>9}")
    for i, c in enumerate(found[:-1]):
        t = c["end"]
        est = Estimator()
        for f in found[: i + 1]:
            est.add(f["key"], f["end"] - f["start"])
        later = found[i + 1:]
        pending = [f["key"] for f in later if f["start"] >= t]
        running = [(f["key"], t - f["start"], None) for f in later if f["start"] < t]
        eta = est.remaining(pending, running, jobs) or 0.0
        mean = sum(f["end"] - f["start"] for f in found[: i + 1]) / (i + 1) * len(later) / jobs
        actual = last - t
        print(f"{c['id']:<44} {len(later):>5} {duration(actual):>8} {duration(eta):>8} "
              f"{eta / actual if actual else 0:>6.2f} {duration(mean):>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
