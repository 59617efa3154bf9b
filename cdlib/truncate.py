"""Stage 3: truncated traces: the paper's length-matched ablation and ratio truncation.

* ``length_matched`` (paper 3.3): tokenize each raw trace with the compressor's
  tokenizer, cut it to the token length of the matching compressed trace, decode,
  and accept a difference of at most ``tolerance`` (1) tokens after re-encoding.
  The final answer is kept unchanged. Raw traces whose compression is dropped
  (``drop_flagged`` in the compress stage, or a compression that never came back:
  :func:`cdlib.outputs.failed`) have no target and are skipped; with the paper's
  protocol only the failed ones are, so no trace is cut to 0 tokens.
* ``ratio`` (Distilling the Essence): keep the first ``ratio`` of each trace's tokens.

Output ``truncated.jsonl`` has the same fields as compressed records
(``reasoning`` is the truncated trace, ``answer`` the untouched final answer).
A cut that misses its target by more than ``tolerance`` is flagged
``length_mismatch`` and, with ``drop_flagged``, left out of training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cdlib.progress import tqdm  # text inside grid cells (log.txt), widgets in JupyterLab

from cdlib import tokenizer as toklib
from cdlib.outputs import dropped
from cdlib.params import TruncateParams
from cdlib.store import Store, UpstreamError, read_upstream


def cut(text: str, n_tokens: int, tok: Any, tolerance: int = 1) -> tuple[str, int]:
    """The prefix of ``text`` holding about ``n_tokens`` tokens, and its re-encoded length.

    Decoding a cut can merge or split tokens at the boundary, so if the re-encoded
    length misses the target by more than ``tolerance``, neighbouring cut points
    are tried and the closest is returned.
    """
    ids = tok.encode(text)
    if n_tokens >= len(ids):
        return text, len(ids)
    best: tuple[int, str, int] | None = None
    for k in (n_tokens, n_tokens - 1, n_tokens + 1, n_tokens - 2, n_tokens + 2):
        if k < 0 or k > len(ids):
            continue
        piece = toklib.decode_prefix(tok, ids[:k])
        got = len(tok.encode(piece))
        err = abs(got - n_tokens)
        if best is None or err < best[0]:
            best = (err, piece, got)
        if err <= tolerance:
            break
    assert best is not None
    return best[1], best[2]


def ratio_cut(text: str, ratio: float, tok: Any, tolerance: int = 1) -> tuple[str, int]:
    """The first ``ratio`` of ``text``'s tokens (rounded up), with its re-encoded length."""
    n = len(tok.encode(text))
    return cut(text, math.ceil(ratio * n), tok, tolerance)


def run(P: TruncateParams) -> dict[str, Any]:
    """Truncate the raw traces of ``P.traces`` into ``P.out_dir/truncated.jsonl``; return the metrics."""
    raw = read_upstream(Path(P.traces) / "traces.jsonl", "truncate")
    targets: dict[str, int] = {}
    if P.mode == "length_matched":
        if not P.compressed:
            raise ValueError("truncate: mode 'length_matched' needs `compressed` (a compress cell directory)")
        comp = [r for r in read_upstream(Path(P.compressed) / "compressed.jsonl", "truncate") if not dropped(r)]
        targets = dict(zip((r["id"] for r in comp), toklib.count([r["reasoning"] for r in comp], P.tokenizer)))
        raw = [r for r in raw if r["id"] in targets]
        if not raw:
            raise UpstreamError(f"truncate: no raw trace of {P.traces} has a kept compression in {P.compressed} "
                                f"({len(comp)} kept): nothing to cut to a matched length")
    out = Store(Path(P.out_dir) / "truncated.jsonl", writable=True)
    tok = toklib.load(P.tokenizer)
    batch = []
    for r in tqdm([r for r in raw if r["id"] not in out], desc=f"truncate ({P.mode})", unit="trace"):
        text = r.get("reasoning", "")
        n_orig = len(tok.encode(text))
        target = targets[r["id"]] if P.mode == "length_matched" else math.ceil(P.ratio * n_orig)
        piece, got = cut(text, target, tok, P.tolerance)
        batch.append({**{k: r.get(k) for k in ("id", "dataset", "domain", "group", "split", "question", "choices",
                                               "gold", "answer_type", "answer", "extracted")},
                      "reasoning": piece, "original_tokens": n_orig, "target_tokens": target,
                      "truncated_tokens": got, "original_chars": len(text), "truncated_chars": len(piece),
                      "flag": None if abs(got - target) <= P.tolerance else "length_mismatch",
                      "drop": abs(got - target) > P.tolerance and P.drop_flagged})
        if len(batch) >= 1000:
            out.append(batch)
            batch = []
    out.append(batch)
    return metrics(P.out_dir)


def metrics(out_dir: str | Path) -> dict[str, Any]:
    """metrics.json content: counts, mean token lengths, kept fraction and mismatches."""
    import polars as pl

    df = Store(Path(out_dir) / "truncated.jsonl").to_polars()
    if df.is_empty():
        return {"n": 0}
    return {"n": df.height, "mismatches": int(df["flag"].is_not_null().sum()),
            "mean_original_tokens": df["original_tokens"].mean(),
            "mean_truncated_tokens": df["truncated_tokens"].mean(),
            "kept_fraction": df.select(pl.col("truncated_tokens").sum() / pl.col("original_tokens").sum()).item(),
            "max_abs_error": int((df["truncated_tokens"] - df["target_tokens"]).abs().max())}
