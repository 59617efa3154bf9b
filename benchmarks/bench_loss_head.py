"""Loss head: peak memory and time of one forward + backward, full logits vs the chunked head vs TRL's.

A causal LM with a tiny body (one Llama layer, hidden ``--hidden``) and Qwen's output
vocabulary (``--vocab`` 151,936) on one row of ``--tokens`` tokens (8,192), every next
token supervised, fp32 on CPU (bf16 weights on a GPU). Variants, each in a fresh
subprocess so its peak is its own:

* ``trl`` (when TRL is installed: ``make bench``): the loss head TRL's SFTTrainer puts on every model it trains
  (TRL 1.16: ``trl.trainer.utils.add_fused_lm_head`` with the per-token log-probabilities, entropy and top-1 hits
  its metrics read; the LM head runs in tiles over the supervised positions, no full logits), the loss as
  SFTTrainer takes it (``-log_probs`` summed over the supervised tokens): the peer as a user runs it;
* ``hf``: ``model(input_ids, labels=labels).loss``, transformers' own causal-LM loss (full logits, upcast to
  fp32, cross-entropy), what ``transformers.Trainer`` computes;
* ``full``: cdlib's previous head, ``cdlib.training.losses.cross_entropy_sum`` on the model's logits
  (supervised positions picked out of the full logits);
* ``chunked``: ``cdlib.training.losses.fused_head`` with ``--chunk`` positions per chunk (no logits);
* ``liger`` / ``cce``: the fused GPU kernels, where installed.

Memory: CPU, peak resident memory (``ru_maxrss``) after the step minus the resident
memory before it; GPU, ``max_memory_allocated`` minus the allocation before it. Time:
median of ``--repeats`` steps after the measured one. The losses of all variants are
checked to agree (relative 1e-5 in fp32) and the ratios to ``full`` are printed.

Run: ``.venv/bin/python benchmarks/bench_loss_head.py`` (``--tokens 4096`` halves the
memory it needs: full logits at 8,192 x 151,936 are ~5 GB per fp32 copy).
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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(variant: str, tokens: int, vocab: int, hidden: int, chunk: int, repeats: int) -> dict:
    import resource

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from cdlib.training import losses
    from cdlib.training.losses import cross_entropy_sum

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      tie_word_embeddings=False, max_position_embeddings=tokens + 1)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16 if gpu else torch.float32)
    ids = torch.randint(0, vocab, (1, tokens + 1), device=device)
    labels = ids.clone()
    n = tokens

    if variant == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer.__init__ does

    def step() -> float:
        model.zero_grad(set_to_none=True)
        if variant == "trl":
            loss = -model(input_ids=ids, labels=labels, use_cache=False, fused_lm_head=True).log_probs.sum()
        elif variant == "hf":
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss * n
        elif variant == "full":
            loss, _ = cross_entropy_sum(model(input_ids=ids, use_cache=False).logits, labels)
        else:
            with losses.fused_head(model, labels, chunk, impl=variant):
                loss = model(input_ids=ids, use_cache=False).logits
        (loss / n).backward()
        return float(loss.detach()) / n

    if gpu:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = _rss_bytes()
    loss = step()
    if gpu:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"variant": variant, "loss": loss, "peak_gb": peak / 1e9, "step_s": statistics.median(times),
            "device": device}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default="full,hf,trl,chunked")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens, args.vocab, args.hidden, args.chunk, args.repeats)))
        return
    rows = []
    variants = args.variants.split(",")
    try:
        import trl  # noqa: F401
    except ImportError:
        if "trl" in variants:
            print("note: TRL is not installed in .venv (make bench installs it): no 'trl' variant")
            variants.remove("trl")
    for v in variants:
        cmd = [sys.executable, __file__, "--worker", v, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
               "--hidden", str(args.hidden), "--chunk", str(args.chunk), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{v}: failed\n{out.stderr[-2000:]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = next((r for r in rows if r["variant"] == "full"), rows[0])
    print(f"{args.tokens:,} tokens x {args.vocab:,} vocab, hidden {args.hidden}, chunk {args.chunk}, "
          f"device {ref['device']}")
    print(f"{'variant':<10}{'loss':>12}{'peak GB':>10}{'x full':>8}{'step s':>9}{'x full':>8}")
    for r in rows:
        print(f"{r['variant']:<10}{r['loss']:>12.6f}{r['peak_gb']:>10.2f}{r['peak_gb'] / ref['peak_gb']:>8.2f}"
              f"{r['step_s']:>9.2f}{r['step_s'] / ref['step_s']:>8.2f}")
    bad = [r["variant"] for r in rows if abs(r["loss"] - ref["loss"]) > 1e-5 * abs(ref["loss"])]
    if bad:
        raise SystemExit(f"losses differ from 'full': {bad}")


if __name__ == "__main__":
    main()
