"""Where a grid run's wall clock went, from its cells' manifests: one line per cell (start and end relative to
the first cell, wall clock), the sum per stage kind, and how busy the run's slots were.

Run after ``make demo``: ``.venv/bin/python benchmarks/demo_timeline.py outputs/demo [--slots 2]``.
Cells finished in an earlier run are listed too; remove the grid's outputs first for one run's picture.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections import defaultdict
from pathlib import Path


def timeline(grid_dir: Path) -> list[tuple[float, float, str, str]]:
    """(start, end, kind, cell) per finished cell, in seconds from the earliest start, sorted by start."""
    rows = []
    for path in sorted(grid_dir.glob("*/manifest.json")) + sorted(grid_dir.glob("*/*/manifest.json")):
        m = json.loads(path.read_text())
        if m.get("status") != "done" or not m.get("start") or not m.get("end"):
            continue
        rows.append((dt.datetime.fromisoformat(m["start"]), dt.datetime.fromisoformat(m["end"]),
                     m.get("kind") or m.get("stage", "?"), m["cell"]))
    if not rows:
        return []
    t0 = min(r[0] for r in rows)
    return sorted(((s - t0).total_seconds(), (e - t0).total_seconds(), kind, cell) for s, e, kind, cell in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid_dir", type=Path, help="a grid's output folder, e.g. outputs/demo")
    ap.add_argument("--slots", type=int, default=2, help="cells run at once (the run's --jobs)")
    a = ap.parse_args()
    cells = timeline(a.grid_dir)
    if not cells:
        print(f"{a.grid_dir}: no finished cell with a manifest", file=sys.stderr)
        return 1
    print(f"{'start':>7} {'end':>7} {'wall':>6}  cell")
    for start, end, _, cell in cells:
        print(f"{start:7.0f} {end:7.0f} {end - start:6.0f}  {cell}")
    per_kind: dict[str, list[float]] = defaultdict(list)
    for start, end, kind, _ in cells:
        per_kind[kind].append(end - start)
    busy = sum(end - start for start, end, _, _ in cells)
    span = max(end for _, end, _, _ in cells)
    print(f"\n{'kind':10s} {'cells':>5} {'seconds':>8} {'share':>6}")
    for kind, walls in sorted(per_kind.items(), key=lambda kv: -sum(kv[1])):
        print(f"{kind:10s} {len(walls):5d} {sum(walls):8.0f} {sum(walls) / busy:6.1%}")
    # seconds in which fewer cells ran than there were slots (one-second resolution)
    idle = sum(max(0, a.slots - sum(start <= t < end for start, end, _, _ in cells)) for t in range(int(span)))
    print(f"\nfirst start to last end {span:.0f} s; cell wall clocks sum to {busy:.0f} s over {a.slots} slots "
          f"({busy / (a.slots * span):.0%} of slot time inside cells); slot-seconds with no cell: {idle}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
