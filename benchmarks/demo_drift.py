"""Where toy students lose answers they had: the first conclusion of each answer against its final answer.

    python benchmarks/demo_drift.py outputs/demo-seeds      (after `make demo-seeds`)
    python benchmarks/demo_drift.py outputs/demo

For every evaluation cell of a toy grid (stages evaluate and base), prints its accuracy, how often the first
``So the final number of ... is N.`` line of an answer (the answer written before the re-checks) is right, and how
often that first conclusion is right while the final answer is wrong: the student talked itself out of a right
answer in its own re-checks (benchmarks/README.md, "The demo over three seeds").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cdlib.toy import CONCLUSION_RE


def drift(outputs: Path) -> tuple[int, float, float, float]:
    """(answers, accuracy, first conclusion right, first right but final wrong) of one outputs.jsonl."""
    n = correct = first = lost = 0
    with outputs.open() as f:
        for line in f:
            row = json.loads(line)
            m = CONCLUSION_RE.search(row.get("reasoning") or "")
            right_first = bool(m) and m.group(1) == str(row["gold"])
            n += 1
            correct += bool(row["correct"])
            first += right_first
            lost += right_first and not row["correct"]
    return n, correct / max(n, 1), first / max(n, 1), lost / max(n, 1)


def main(grid_dir: str) -> int:
    cells = [p for stage in ("base", "evaluate") for p in sorted(Path(grid_dir, stage).glob("*/outputs.jsonl"))]
    if not cells:
        print(f"{grid_dir}: no evaluation outputs")
        return 1
    print(f"{'cell':<45} {'answers':>7} {'accuracy':>8} {'first right':>11} {'right first, wrong final':>24}")
    for p in cells:
        n, acc, first, lost = drift(p)
        print(f"{p.parts[-3] + '/' + p.parts[-2]:<45} {n:>7} {acc:>8.3f} {first:>11.3f} {lost:>24.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "outputs/demo-seeds"))
