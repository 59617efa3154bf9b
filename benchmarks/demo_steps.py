"""Where toy students go wrong, step by step: every step line of every answer, by whether the step crosses a ten,
whether the student worked it in words first, and whether its result is right.

    python benchmarks/demo_steps.py outputs/demo-seeds      (after `make demo-seeds`)
    python benchmarks/demo_steps.py outputs/demo

For every evaluation cell of a toy grid (stages evaluate and base), prints its accuracy and, over the step lines
before each answer's first conclusion (the work, not the re-checks): how many steps cross a ten, the share of
those the student worked in words, the share right when worked in words and when not, and the share right of
the steps that cross no ten. A second table sorts each cell's wrong answers by their first fault: no step
line at all, the start value misread (restated, or else the first step line's), the steps misread (an
operation, an operand or the number of steps differs from the question's), a value not carried from the line
before, a step's arithmetic, or none of these (the work is right and the answer is not: the re-checks). In the first
table a step line is judged on its own operands (``24 - 9 = 15`` is right even after an earlier slip).

It found that the demo's raw students leave about half of the crossings unworked and get every one of those
wrong, while they are as right as their base on the steps they work (benchmarks/README.md, "The demo's students,
step by step").
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import yaml

from cdlib import toy
from cdlib.params import ToyParams
from cdlib.toy import apply, crosses_ten

STEP = re.compile(r"(?:^|: )(-?\d+) ([+*-]) (\d+) = (-?\d+)$")  # the end of a step line (cdlib.toy.EQUATION_RE)
START = re.compile(r"starts with (\d+)")
FAULTS = ("no work", "start", "steps", "carry", "arithmetic", "re-checks")


def steps(outputs: Path) -> dict[str, float]:
    """The step anatomy of one outputs.jsonl (see the module docstring)."""
    n = correct = 0
    count = {(cross, words, ok): 0 for cross in (0, 1) for words in (0, 1) for ok in (0, 1)}
    with outputs.open() as f:
        for line in f:
            row = json.loads(line)
            n += 1
            correct += bool(row["correct"])
            words = False
            for text in (row.get("reasoning") or "").splitlines():
                if text.startswith("Let me think:"):
                    words = True
                    continue
                if text.startswith("So the final number"):
                    break
                m = STEP.search(text)
                if m:
                    a, op, k, r = int(m[1]), m[2], int(m[3]), int(m[4])
                    count[(int(crosses_ten(a, op, k)), int(words), int(apply(op, a, k) == r))] += 1
                    words = False

    def share(num: int, den: int) -> float:
        return num / den if den else float("nan")

    crossings = sum(v for (c, _, _), v in count.items() if c)
    worked = count[(1, 1, 0)] + count[(1, 1, 1)]
    plain = sum(v for (c, _, _), v in count.items() if not c)
    return {"answers": n, "accuracy": share(correct, n), "crossings": crossings,
            "worked_in_words": share(worked, crossings),
            "right_in_words": share(count[(1, 1, 1)], worked),
            "right_unworked": share(count[(1, 0, 1)], crossings - worked),
            "right_no_crossing": share(count[(0, 0, 1)] + count[(0, 1, 1)], plain)}


def faults(outputs: Path) -> Counter:
    """The first fault of each wrong answer of one evaluation cell (see the module docstring)."""
    params = yaml.safe_load((outputs.parent / "params.yaml").read_text())
    questions = {r["id"]: r["question"] for r in toy.generate(ToyParams(**params["toy"]), "test")}
    out: Counter = Counter()
    with outputs.open() as f:
        for line in f:
            row = json.loads(line)
            if row["correct"]:
                continue
            problem = toy.parse_question(questions[row["id"]])
            text = row.get("reasoning") or ""
            start = START.search(text)
            work = []
            for t in text.splitlines():
                if t.startswith("So the final number"):
                    break
                m = STEP.search(t)
                if m:
                    work.append((int(m[1]), m[2], int(m[3]), int(m[4])))
            read = int(start[1]) if start else work[0][0] if work else None  # compressed students never restate it
            value, fault = problem.start, "re-checks"
            if not work:
                fault = "no work"
            elif read != problem.start:
                fault = "start"
            elif [(op, k) for _, op, k, _ in work] != list(problem.steps):
                fault = "steps"
            else:
                for a, op, k, r in work:
                    if a != value or apply(op, a, k) != r:
                        fault = "carry" if a != value else "arithmetic"
                        break
                    value = r
            out[fault] += 1
    return out


def main(grid_dir: str) -> int:
    cells = [p for stage in ("base", "evaluate") for p in sorted(Path(grid_dir, stage).glob("*/outputs.jsonl"))]
    if not cells:
        print(f"{grid_dir}: no evaluation outputs")
        return 1
    cols = ["accuracy", "crossings", "worked_in_words", "right_in_words", "right_unworked", "right_no_crossing"]
    print(f"{'cell':<45} " + " ".join(f"{c:>17}" for c in cols))
    for p in cells:
        s = steps(p)
        print(f"{p.parts[-3] + '/' + p.parts[-2]:<45} " + " ".join(
            f"{s[c]:>17d}" if isinstance(s[c], int) else f"{s[c]:>17.3f}" for c in cols))
    print(f"\nwrong answers by first fault\n{'cell':<45} " + " ".join(f"{c:>10}" for c in FAULTS))
    for p in cells:
        f = faults(p)
        print(f"{p.parts[-3] + '/' + p.parts[-2]:<45} " + " ".join(f"{f[c]:>10d}" for c in FAULTS))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "outputs/demo-seeds"))
