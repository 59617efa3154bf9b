"""KL objective (Mixed-Policy Distillation): peak memory and time of ``cdlib.training.losses.kl_sum``, unchunked
vs chunked.

One forward + backward of the token-level divergence between a student's and a
teacher's logits of ``--tokens`` supervised positions over ``--vocab`` entries
(fp32 on CPU, as in a CPU run; ``--dtype bf16`` for the GPU's autocast logits),
for each direction and each ``--chunks`` value (0: all positions at once, the
reference implementation). Each variant runs in a fresh subprocess, so its peak is
its own:

* CPU: peak resident memory (``resource.ru_maxrss``) after the step minus the peak
  after the inputs were built (in place, so building them leaves no larger peak);
* GPU: ``torch.cuda.max_memory_allocated`` minus the memory allocated by the inputs.

The extra memory includes the student logits' gradient (one logits-sized tensor,
which any implementation produces), and is also given in "copies" of a
``tokens x vocab`` fp32 tensor, which is what extrapolates to other shapes: at MPD's
16,384 tokens x 151,936 vocab one copy is 9.96 GB. Times are the median of
``--repeats`` forward + backward passes after the measured one. The losses of all
variants of a direction are checked to agree (relative 1e-5).

Run: ``.venv/bin/python benchmarks/bench_kl.py`` (defaults: 4,096 tokens x 32,768 vocab,
forward and jsd, chunks 0, 2048 and 512).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(tokens: int, vocab: int, direction: str, chunk: int, repeats: int, dtype: str) -> dict:
    """One variant in this process: build the inputs, measure one step's peak, then time ``repeats`` steps."""
    import resource

    import torch

    sys.path.insert(0, str(REPO))
    from cdlib.training.losses import kl_sum

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    gen = torch.Generator(device=device).manual_seed(0)
    # built in place: no temporary larger than the inputs themselves
    student = torch.empty(1, tokens + 1, vocab, dtype=dt, device=device).normal_(generator=gen).mul_(2)
    teacher = torch.empty(1, tokens + 1, vocab, dtype=dt, device=device).normal_(generator=gen).mul_(2)
    student.requires_grad_()
    labels = torch.zeros(1, tokens + 1, dtype=torch.long, device=device)  # every next token supervised

    def step() -> float:
        student.grad = None
        loss, n = kl_sum(student, teacher, labels, direction, vocab, chunk or None)
        loss.backward()
        assert n == tokens
        return float(loss.detach())

    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    value = step()
    if gpu:
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        kind = "torch.cuda.max_memory_allocated"
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        kind = "ru_maxrss"
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"direction": direction, "chunk": chunk, "loss": value, "extra_bytes": extra, "kind": kind,
            "seconds": statistics.median(times) if times else None,
            "device": torch.cuda.get_device_name(0) if gpu else "cpu"}


def main(argv: list[str] | None = None) -> int:
    """Run every variant in its own subprocess and print a table with the ratios to the unchunked step."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--directions", default="forward,jsd")
    ap.add_argument("--chunks", default="0,2048,512", help="0: unchunked (the reference)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # JSON of one variant: run it here
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(**json.loads(args.worker))))
        return 0

    copy = args.tokens * args.vocab * 4  # one tokens x vocab fp32 tensor
    print(f"kl_sum forward + backward, {args.tokens:,} tokens x {args.vocab:,} vocab, {args.dtype} logits; "
          f"one fp32 copy = {copy / 2**30:.2f} GiB")
    print(f"{'direction':<9} {'chunk':>6} {'peak extra':>11} {'copies':>7} {'vs all':>7} {'time':>8} {'vs all':>7}")
    ok = True
    for direction in args.directions.split(","):
        rows = []
        for chunk in (int(c) for c in args.chunks.split(",")):
            spec = dict(tokens=args.tokens, vocab=args.vocab, direction=direction, chunk=chunk,
                        repeats=args.repeats, dtype=args.dtype)
            out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=True,
                                 capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
        ref = rows[0]
        for r in rows:
            agree = abs(r["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"])
            ok &= agree
            print(f"{direction:<9} {r['chunk'] or 'all':>6} {r['extra_bytes'] / 2**30:>9.2f} G "
                  f"{r['extra_bytes'] / copy:>7.2f} {r['extra_bytes'] / ref['extra_bytes']:>6.2f}x "
                  f"{r['seconds']:>7.3f}s {r['seconds'] / ref['seconds']:>6.2f}x" + ("" if agree else "  LOSS DIFFERS"))
    print(f"memory: {rows[0]['kind']} on {rows[0]['device']}; 'copies' = peak extra / one fp32 tokens x vocab tensor "
          f"(x 9.96 GB at 16,384 x 151,936)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
