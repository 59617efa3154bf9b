"""Explore at scale: figures and tables of 00_explore over N long imported traces.

Builds an import-like cell (``traces.jsonl`` in the generate stage's record layout) of N traces
of realistic length (2,000 to 40,000 characters, median about 12,000) mixing English reasoning,
LaTeX (``\\frac``, ``\\boxed``, display math) and CJK text, plus a compress cell (every second
trace shortened) and a truncate cell, then times each step 00_explore takes: loading (every
source counted with the whitespace tokenizer), the filters, the length tables, Figure 2 (pre-binned
altair chart, saved as HTML), the side-by-side HTML of one question and the metrics.

    .venv/bin/python benchmarks/bench_explore.py --traces 100000   # target: under 30 s in all
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

PIECES = [
    "Okay, so I need to find the value of \\( x \\) such that \\( \\frac{3x+1}{x-2} = 4 \\). ",
    "Wait, let me double-check: \\[ 3x + 1 = 4(x - 2) \\implies x = 9. \\] ",
    "Hmm, maybe there's another way. Consider $\\sum_{k=1}^{n} k^2 = \\frac{n(n+1)(2n+1)}{6}$. ",
    "嗯，用户问的是这个方程的解。首先，我需要确认这是一个基本的代数问题。",
    "所以答案是 \\(\\boxed{9}\\)，我们再验证一遍：代入后两边相等。",
    "Let me verify these results by plugging them back into the original equations. ",
    "\\begin{aligned} a^2 + b^2 &= c^2 \\\\ 9 + 16 &= 25 \\end{aligned} ",
]


def trace_text(rng: random.Random, chars: int) -> str:
    parts, n = [], 0
    while n < chars:
        p = rng.choice(PIECES)
        parts.append(p + ("\n\n" if rng.random() < 0.2 else ""))
        n += len(p)
    return "".join(parts)[:chars]


def build(root: Path, n: int, seed: int = 0) -> dict[str, Path]:
    rng = random.Random(seed)
    cells = {k: root / k for k in ("import", "compress", "truncate")}
    for d in cells.values():
        d.mkdir(parents=True)
    with (cells["import"] / "traces.jsonl").open("w") as fi, (cells["compress"] / "compressed.jsonl").open("w") as fc, \
            (cells["truncate"] / "truncated.jsonl").open("w") as ft:
        for i in range(n):
            chars = min(40_000, max(2_000, int(rng.lognormvariate(9.4, 0.6))))
            text = trace_text(rng, chars)
            base = {"id": f"set/{i}", "dataset": ("openr1_math", "openthoughts", "chat_log")[i % 3],
                    "domain": "Imported", "group": "Imported",
                    "question": f"Problem {i}: solve \\( \\frac{{3x+1}}{{x-2}} = 4 \\).",
                    "gold": "9", "answer": "\\(\\boxed{9}\\)"}
            rec = {**base, "reasoning": text, "flag": None if i % 7 else "no_gold"}
            fi.write(json.dumps(rec, ensure_ascii=False) + "\n")
            if i % 2 == 0:
                fc.write(json.dumps({**base, "reasoning": text[: chars // 5], "flag": None}, ensure_ascii=False) + "\n")
                ft.write(json.dumps({**base, "reasoning": text[: chars // 5], "flag": None}, ensure_ascii=False) + "\n")
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", type=int, default=100_000)
    args = ap.parse_args()
    from cdlib import explore, figures

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        cells = build(Path(tmp), args.traces)
        size = sum(f.stat().st_size for d in cells.values() for f in d.iterdir()) / 1e9
        print(f"built {args.traces:,} traces ({size:.2f} GB of JSONL) in {time.perf_counter() - t:.1f} s")
        timings: dict[str, float] = {}

        def step(name, fn):
            start = time.perf_counter()
            out = fn()
            timings[name] = time.perf_counter() - start
            return out

        df = step("load (whitespace tokens)", lambda: explore.load({"set": str(cells["import"])},
                                                                    {"extractive": str(cells["compress"])},
                                                                    {"truncated": str(cells["truncate"])}))
        view = step("filter_traces",
                    lambda: explore.filter_traces(df, ["openr1_math", "chat_log"], 100, None, "exclude"))
        step("length_stats x2", lambda: (explore.length_stats(df), explore.length_stats(view, by=["teacher", "source",
                                                                                                    "dataset"])))
        chart = step("lengths_chart (Figure 2)", lambda: figures.lengths_chart(view, bins=50))
        step("save chart html", lambda: chart.save(str(Path(tmp) / "fig2.html")))
        shown = step("pick_example", lambda: explore.pick_example(view, None, 0))
        step("side_by_side_html", lambda: explore.side_by_side_html(df, shown))
        step("metrics", lambda: explore.metrics(view))
        for name, s in timings.items():
            print(f"{name:28s} {s:7.2f} s")
        print(f"{'total (figures and tables)':28s} {sum(timings.values()):7.2f} s for {df.height:,} rows")


if __name__ == "__main__":
    main()
