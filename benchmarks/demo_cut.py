"""Where Distilling the Essence's 50% cut falls in a toy grid's teacher traces: before or after the first answer.

    python benchmarks/demo_cut.py outputs/demo-seeds      (after `make demo-seeds`)
    python benchmarks/demo_cut.py outputs/demo

For every teacher-trace generate cell of a toy grid, the position of the first ``So the final number of ... is N.``
line (the answer written before the re-checks) as a fraction of the question and response tokens, counted with the
grid's base tokenizer (the first pretrain cell's): median, 90th percentile, and the share of traces whose first
answer lies past half of the sequence, where the DtE cut drops it (benchmarks/README.md, "One base for every seed":
at 42% / 48% the cut students end their answers; at 49% / 52% they never do).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cdlib.toy import CONCLUSION_RE


def positions(traces: Path, tokenizer) -> list[float]:
    """First-conclusion position / sequence length, in tokens, of every trace with a conclusion."""
    out = []
    with traces.open() as f:
        for line in f:
            row = json.loads(line)
            response = row.get("response") or ""
            m = CONCLUSION_RE.search(response)
            if m is None:
                continue
            at = m.start()
            whole = len(tokenizer(row["question"] + "\n" + response)["input_ids"])
            out.append(len(tokenizer(row["question"] + "\n" + response[:at])["input_ids"]) / whole)
    return sorted(out)


def main(grid_dir: str) -> int:
    from transformers import AutoTokenizer

    grid = Path(grid_dir)
    models = sorted(grid.glob("pretrain/*/model"))
    if not models:
        print(f"{grid}: no pretrain cell with a model (run the grid first)", file=sys.stderr)
        return 1
    tokenizer = AutoTokenizer.from_pretrained(models[0])
    print(f"{'cell':<24}{'traces':>8}{'median':>9}{'p90':>8}{'past 50%':>10}")
    for traces in sorted(grid.glob("generate/*/traces.jsonl")):
        pos = positions(traces, tokenizer)
        if not pos:
            continue
        n = len(pos)
        print(f"{traces.parent.relative_to(grid)!s:<24}{n:>8}{pos[n // 2]:>9.3f}{pos[9 * n // 10]:>8.3f}"
              f"{sum(p > 0.5 for p in pos) / n:>10.3f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
