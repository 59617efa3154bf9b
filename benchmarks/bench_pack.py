"""Packing benchmarks: bin efficiency on paper-sized datasets, and packed vs padded training throughput.

1. Efficiency (non-pad tokens / capacity) of best-fit-decreasing bins at the
   paper's 16,384-token sequence length, for the full ~283k-example datasets.
   Per-example lengths are drawn from a lognormal around each dataset's mean
   (sigma ``--sigma``) and clipped to [1, max_len]:
   raw traces use the mean total completion tokens per correct trace and the
   counts of Appendix A, Table 4; compressed traces use the compressed-token
   means of Appendix B, Table 5 (MMLU rows, absent from Table 5, use the raw
   mean times the compressor's overall ratio rho).
2. Tokens per second of a tiny Qwen2 model (one training step: forward +
   backward) on the same examples, packed (block-diagonal mask, sdpa on CPU)
   versus padded micro-batches in shuffled order, measured in one run.

Run: ``.venv/bin/python benchmarks/bench_pack.py``
"""

from __future__ import annotations

import argparse
import math
import random
import time

# (dataset, count, mean total completion tokens): paper Appendix A, Table 4
TABLE4 = {
    "qwen3.5-397b": [
        ("AQUA-RAT", 87441, 3427), ("GSM8k", 7186, 1689), ("MultiArith", 416, 604), ("SVAMP", 960, 974),
        ("ARC-Challenge", 1079, 1196), ("GPQA Diamond", 135, 6923), ("CommonsenseQA", 8593, 1778),
        ("MedExpQA", 395, 3569), ("MedMCQA", 167277, 2015), ("MedQA", 9778, 3490),
        ("Mmlu-Medical", 33, 2810), ("Mmlu-Stem", 42, 3412),
    ],
    "gpt-oss-120b": [
        ("AQUA-RAT", 89796, 1166), ("GSM8k", 7268, 633), ("MultiArith", 413, 316), ("SVAMP", 967, 466),
        ("ARC-Challenge", 1079, 477), ("GPQA Diamond", 152, 4191), ("CommonsenseQA", 8434, 1138),
        ("MedExpQA", 395, 1432), ("MedMCQA", 163480, 1072), ("MedQA", 9850, 1304),
        ("Mmlu-Medical", 33, 888), ("Mmlu-Stem", 44, 1253),
    ],
}
# mean compressed tokens per dataset (Llama-3.3-70B, Ministral-3-14B) and overall rho: Appendix B, Table 5
TABLE5 = {
    "qwen3.5-397b": {
        "AQUA-RAT": (340, 185), "GSM8k": (172, 117), "MultiArith": (109, 80), "SVAMP": (127, 93),
        "ARC-Challenge": (185, 113), "GPQA Diamond": (479, 315), "CommonsenseQA": (181, 124),
        "MedExpQA": (286, 266), "MedMCQA": (222, 158), "MedQA": (300, 247), "rho": (0.142, 0.086),
    },
    "gpt-oss-120b": {
        "AQUA-RAT": (216, 170), "GSM8k": (138, 98), "MultiArith": (85, 55), "SVAMP": (101, 72),
        "ARC-Challenge": (124, 95), "GPQA Diamond": (403, 317), "CommonsenseQA": (148, 121),
        "MedExpQA": (253, 249), "MedMCQA": (181, 141), "MedQA": (233, 225), "rho": (0.210, 0.147),
    },
}
COMPRESSORS = ("llama-70b", "ministral-14b")


def draw_lengths(spec: list[tuple[str, int, float]], sigma: float, max_len: int, rng: random.Random) -> list[int]:
    """Lognormal lengths with the given per-dataset means (mu = ln(mean) - sigma^2 / 2), clipped."""
    lengths = []
    for _, count, mean in spec:
        mu = math.log(mean) - sigma**2 / 2
        lengths += [min(max_len, max(1, round(rng.lognormvariate(mu, sigma)))) for _ in range(count)]
    return lengths


def scenarios() -> dict[str, list[tuple[str, int, float]]]:
    out = {}
    for teacher, rows in TABLE4.items():
        out[f"{teacher} raw"] = rows
        comp = TABLE5[teacher]
        for k, name in enumerate(COMPRESSORS):
            out[f"{teacher} {name}"] = [
                (d, n, comp[d][k] if d in comp else mean * comp["rho"][k]) for d, n, mean in rows
            ]
    return out


def bench_efficiency(args: argparse.Namespace) -> None:
    from cdlib.training.packing import check_bins, pack, packing_efficiency

    rng = random.Random(args.seed)
    print(f"== packing efficiency at max_len={args.max_len} (lognormal sigma={args.sigma}, seed={args.seed})")
    print(f"{'scenario':34s} {'examples':>9s} {'mean len':>9s} {'bins':>7s} {'efficiency':>10s} {'pack time':>10s}")
    for name, spec in scenarios().items():
        lengths = draw_lengths(spec, args.sigma, args.max_len, rng)
        start = time.perf_counter()
        bins = pack(lengths, args.max_len)
        elapsed = time.perf_counter() - start
        check_bins(bins, lengths, args.max_len)
        eff = packing_efficiency(lengths, bins, args.max_len)
        print(f"{name:34s} {len(lengths):9d} {sum(lengths) / len(lengths):9.0f} {len(bins):7d} "
              f"{100 * eff:9.3f}% {elapsed:9.2f}s")


def bench_throughput(args: argparse.Namespace) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from cdlib.training.packing import collate_packed, collate_padded, pack

    rng = random.Random(args.seed + 1)
    seq_len = args.tp_seq_len
    # raw-trace length distribution (Qwen teacher), scaled down so a CPU step takes well under a second
    spec = [(d, n, mean / args.tp_scale) for d, n, mean in TABLE4["qwen3.5-397b"]]
    pool = draw_lengths(spec, args.sigma, seq_len, rng)
    lengths = rng.sample(pool, args.tp_examples)
    vocab = 4096
    examples = []
    for n in lengths:
        ids = [rng.randrange(1, vocab) for _ in range(max(n, 2))]
        examples.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    real_tokens = sum(len(ex["input_ids"]) for ex in examples)

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len)
    model = Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).train()

    # Interleave packed and padded steps group by group, so load from other processes on a shared
    # machine hits both about equally; each group holds the same examples in both layouts.
    step = lambda b: model(**b).loss.backward()  # noqa: E731
    step(collate_packed(examples, [[0]], attention="sdpa"))  # warm-up
    t_packed = t_padded = 0.0
    cap_packed = cap_padded = n_packed = n_padded = 0
    group = math.ceil(len(examples) / args.tp_groups)
    for g in range(0, len(examples), group):
        members = examples[g:g + group]
        bins = pack([len(ex["input_ids"]) for ex in members], seq_len)
        packed = [collate_packed(members, bins[i:i + args.tp_rows], attention="sdpa", pad_to=seq_len)
                  for i in range(0, len(bins), args.tp_rows)]
        order = list(range(len(members)))
        rng.shuffle(order)
        padded = [collate_padded([members[j] for j in order[i:i + args.tp_batch]])
                  for i in range(0, len(order), args.tp_batch)]
        for batches, layout in ((packed, "packed"), (padded, "padded")):
            start = time.perf_counter()
            for b in batches:
                step(b)
                model.zero_grad()
            elapsed = time.perf_counter() - start
            cap = sum(int(b["input_ids"].numel()) for b in batches)
            if layout == "packed":
                t_packed, cap_packed, n_packed = t_packed + elapsed, cap_packed + cap, n_packed + len(batches)
            else:
                t_padded, cap_padded, n_padded = t_padded + elapsed, cap_padded + cap, n_padded + len(batches)

    print(f"\n== training throughput, tiny Qwen2 (2 layers, hidden 128, sdpa, {torch.get_num_threads()} threads), "
          f"{len(examples)} examples, {real_tokens} real tokens, mean length {real_tokens / len(examples):.0f} "
          f"(Table 4 Qwen-teacher means / {args.tp_scale})")
    print(f"packed: {n_packed} batches of {args.tp_rows} x {seq_len}, fill {100 * real_tokens / cap_packed:.1f}%, "
          f"{t_packed:.2f}s, {real_tokens / t_packed:,.0f} real tokens/s")
    print(f"padded: {n_padded} batches of {args.tp_batch} (shuffled, padded to longest), "
          f"fill {100 * real_tokens / cap_padded:.1f}%, {t_padded:.2f}s, {real_tokens / t_padded:,.0f} real tokens/s")
    print(f"packed / padded tokens per second: {t_padded / t_packed:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-len", type=int, default=16384)
    ap.add_argument("--sigma", type=float, default=0.6, help="lognormal sigma of per-example lengths")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--tp-examples", type=int, default=256, help="examples in the throughput run")
    ap.add_argument("--tp-groups", type=int, default=4, help="alternate packed/padded over this many groups")
    ap.add_argument("--tp-scale", type=float, default=16, help="divide Table 4 means by this for the CPU run")
    ap.add_argument("--tp-seq-len", type=int, default=1024)
    ap.add_argument("--tp-rows", type=int, default=1, help="packed rows per micro-batch")
    ap.add_argument("--tp-batch", type=int, default=8, help="examples per padded micro-batch")
    args = ap.parse_args()
    bench_efficiency(args)
    if not args.skip_throughput:
        bench_throughput(args)


if __name__ == "__main__":
    main()
