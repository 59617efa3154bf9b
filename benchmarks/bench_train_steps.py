"""Training steps/s of the demo's training cell: cdlib.train, its code before a change, and transformers' Trainer.

The demo's train cell (params/demo.yaml: toy student of 2 layers, hidden 128; seq_len 1,024, one packed
row per micro-batch, grad_accum 1, AdamW at 1e-3, cosine with 10% warm-up, clipping at 1.0, no gradient
checkpointing, log_every 10) on the demo's toy traces (1,500 questions, the demo's toy world), ``--steps``
optimizer steps. Variants, each in a fresh subprocess on ``--threads`` threads, alternating within every
repeat (the order rotates):

* ``cdlib``: ``cdlib.train.run`` as this checkout has it;
* ``before``: the same with ``cdlib`` imported from ``--before DIR`` (e.g. ``git archive <commit> cdlib |
  tar -x -C DIR``): the code before a change, same data, same initial weights;
* ``trl`` (when TRL is installed: ``make bench`` installs the ``bench`` extra): TRL's ``SFTTrainer`` on the same
  tokenized examples with its own best-fit-decreasing packing into padding-free 1,024-token rows (see
  :func:`work_trl`); its rows differ from cdlib's, so its losses compare as a trajectory;
* ``hf``: ``transformers.Trainer`` on cdlib's packed rows in the same order from the same initial weights, with
  the model's own causal-LM loss, torch AdamW, the same schedule and clipping, fed cdlib's rows and block masks
  (the Trainer loop SFTTrainer runs, without TRL's data preparation and metrics): losses equal to cdlib's.

Time is the training loop only (cdlib: its ``train_s``; Trainers: ``on_train_begin`` to ``on_train_end``),
so model loading, validation and saving are left out of both. Tokens are all tokens of the packed rows
(prompts included, padding not). Equal loss: the mean loss of every 10-step window, compared between variants.

Run: ``.venv/bin/python benchmarks/bench_train_steps.py --before /tmp/cdlib_before`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _params(work: Path, steps: int, out: Path):
    from cdlib.params import TrainParams

    return TrainParams(out_dir=str(out), data=str(work / "generate"), student=str(work / "prep" / "base"),
                       method="full", learning_rate=1e-3, seq_len=1024, micro_batch_size=1, grad_accum=1,
                       max_steps=steps, warmup_ratio=0.1, optimizer="adamw", gradient_checkpointing=False,
                       val_fraction=0.05, log_every=10, save_every=0)


def setup(work: Path) -> None:
    """The demo's toy traces and its toy student's from-scratch weights (``prep/base``), made once."""
    from cdlib import generate
    from cdlib import train as T
    from cdlib.params import GenerateParams, SamplingParams, ToyParams, TrainParams

    if not (work / "generate" / "traces.jsonl").exists():
        generate.run(GenerateParams(out_dir=str(work / "generate"), datasets=["toy"], rounds=4,
                                    toy=ToyParams(n_train=1500, n_test=200, min_steps=2, max_steps=3, max_start=9,
                                                  max_operand=9, slip_rate=0.15),
                                    sampling=SamplingParams(temperature=0.7, max_tokens=2000, seed=0)))
    if not (work / "prep" / "base" / "config.json").exists():
        T.prepare(TrainParams(out_dir=str(work / "prep"), data=str(work / "generate"), student="toy-student",
                              tiny_layers=2, tiny_hidden=128, seq_len=1024))


def _windows(losses: list[float], size: int = 10) -> list[float]:
    return [sum(losses[k:k + size]) / len(losses[k:k + size]) for k in range(0, len(losses), size)]


def work_cdlib(work: Path, steps: int) -> dict:
    from cdlib import train as T

    out = Path(tempfile.mkdtemp(dir=work))
    m = T.run(_params(work, steps, out), progress=False, log=lambda *a: None)
    losses = [r["loss"] for r in sorted(T.Store(out / "loss.jsonl").read(), key=lambda r: r["step"])]
    return {"steps": m["steps"], "seconds": m["train_s"], "tokens": m["total_tokens_seen"],
            "windows": _windows(losses), "code": str(Path(T.__file__).parent)}


def _train_clock():
    """A Trainer callback timing the training loop alone (on_train_begin to on_train_end) into a dict."""
    from transformers import TrainerCallback

    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            clock["t0"] = time.perf_counter()

        def on_train_end(self, *args, **kwargs):
            clock["t1"] = time.perf_counter()

    return clock, Clock()


def work_trainer(work: Path, steps: int) -> dict:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from cdlib.training import packing as packlib
    from cdlib import train as T

    out = Path(tempfile.mkdtemp(dir=work))
    P = _params(work, steps, out)
    data = T.prepare(P, audit_show=0)
    model = AutoModelForCausalLM.from_pretrained(data.model_source, dtype=torch.float32, attn_implementation="sdpa")
    rows = packlib.packed_layout(model.config, "sdpa", True)
    schedule = T.plan(data.train, P, 1, packing=rows.packing)[:steps]
    pad = data.tokenizer.pad_token_id if data.tokenizer.pad_token_id is not None else 0

    def collate(items: list[int]) -> dict:
        return packlib.collate(data.train, [b for i in items for b in schedule[i]], rows, pad)

    class InOrder(Trainer):  # the planned order, as cdlib trains it
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    clock, timer = _train_clock()

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=1, gradient_accumulation_steps=1,
                             max_steps=steps, learning_rate=P.learning_rate, lr_scheduler_type="cosine",
                             warmup_steps=math.ceil(P.warmup_ratio * steps), weight_decay=0.0, max_grad_norm=1.0,
                             optim="adamw_torch", logging_steps=10, save_strategy="no", report_to="none",
                             use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
                             seed=P.seed)
    trainer = InOrder(model=model, args=args, train_dataset=list(range(len(schedule))), data_collator=collate,
                      callbacks=[timer])
    trainer.train()
    windows = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = sum(len(data.train[i]["input_ids"]) for mb in schedule for b in mb for i in b)
    return {"steps": trainer.state.global_step, "seconds": clock["t1"] - clock["t0"], "tokens": tokens,
            "windows": windows, "code": "transformers.Trainer"}


def work_trl(work: Path, steps: int) -> dict:
    """TRL's SFTTrainer as a new user runs it: the same tokenized examples (input_ids and labels, so the same
    supervised tokens), its own best-fit-decreasing packing into 1,024-token padding-free rows (position_ids;
    transformers' sdpa turns them into a block-diagonal mask), one row per step, the same optimizer, schedule,
    clipping and initial weights. Its rows differ from cdlib's, so losses compare as trajectories, not bit for bit."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from cdlib import train as T

    out = Path(tempfile.mkdtemp(dir=work))
    P = _params(work, steps, out)
    data = T.prepare(P, audit_show=0)
    model = AutoModelForCausalLM.from_pretrained(data.model_source, dtype=torch.float32, attn_implementation="sdpa")
    ds = datasets.Dataset.from_list([{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in data.train])
    clock, timer = _train_clock()

    args = SFTConfig(output_dir=str(out), max_length=P.seq_len, packing=True, packing_strategy="bfd",
                     per_device_train_batch_size=1, gradient_accumulation_steps=1, max_steps=steps,
                     learning_rate=P.learning_rate, lr_scheduler_type="cosine",
                     warmup_steps=math.ceil(P.warmup_ratio * steps), weight_decay=0.0, max_grad_norm=1.0,
                     optim="adamw_torch", logging_steps=10, save_strategy="no", report_to="none", use_cpu=True,
                     dataloader_num_workers=0, disable_tqdm=True, seed=P.seed, bf16=False,
                     include_num_input_tokens_seen="non_padding")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=data.tokenizer,
                         callbacks=[timer])
    trainer.train()
    windows = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    import trl

    return {"steps": trainer.state.global_step, "seconds": clock["t1"] - clock["t0"],
            "tokens": int(trainer.state.num_input_tokens_seen), "windows": windows,
            "code": f"trl {trl.__version__} SFTTrainer, bfd packing"}


def worker(variant: str, work: Path, steps: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, os.environ.get("BENCH_CDLIB") or str(REPO))
    work_fn = {"cdlib": work_cdlib, "before": work_cdlib, "hf": work_trainer, "trl": work_trl}[variant]
    result = work_fn(work, steps)
    print("RESULT " + json.dumps({"variant": variant, **result}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--before", help="directory holding the cdlib package to compare with (the code before)")
    ap.add_argument("--work", help="working directory (default: a fresh temporary one)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_train_"))
    if a.worker:
        worker(a.worker, work, a.steps, a.threads)
        return 0
    sys.path.insert(0, str(REPO))
    setup(work)
    try:
        import trl  # noqa: F401

        sides = ["trl", "hf"]
    except ImportError:
        sides = ["hf"]
        print("note: TRL is not installed in .venv (make bench installs it): the side-by-side is transformers.Trainer")
    variants = ["cdlib", *(["before"] if a.before else []), *sides]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(a.repeats):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false"}
            if v == "before":
                env["BENCH_CDLIB"] = str(Path(a.before).resolve())
            proc = subprocess.run([sys.executable, __file__, "--worker", v, "--work", str(work), "--steps",
                                   str(a.steps), "--threads", str(a.threads)], env=env, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                return 1
            res = json.loads(line[7:])
            results[v].append(res)
            print(f"repeat {r + 1} {v:6s}: {res['steps'] / res['seconds']:6.2f} steps/s, "
                  f"{res['tokens'] / res['seconds']:8,.0f} tokens/s, last-window loss {res['windows'][-1]:.4f} "
                  f"({res['code']})", flush=True)
    print(f"\n{a.steps} steps of the demo's training cell, {a.threads} threads, {a.repeats} alternating repeats")
    med = {v: statistics.median(x["steps"] / x["seconds"] for x in results[v]) for v in variants}
    tok = {v: statistics.median(x["tokens"] / x["seconds"] for x in results[v]) for v in variants}
    for v in variants:
        print(f"{v:6s} median {med[v]:6.2f} steps/s, {tok[v]:8,.0f} tokens/s")
    for v in variants[1:]:
        ratios = [c["steps"] / c["seconds"] / (o["steps"] / o["seconds"]) for c, o in zip(results["cdlib"], results[v])]
        mine, theirs = results["cdlib"][0]["windows"], results[v][0]["windows"]
        diff = max(abs(x - y) for x, y in zip(mine, theirs))
        tail = min(5, len(mine), len(theirs))  # the last 50 steps
        print(f"cdlib / {v}: {med['cdlib'] / med[v]:.2f}x steps/s, {tok['cdlib'] / tok[v]:.2f}x tokens/s "
              f"(per repeat {min(ratios):.2f}-{max(ratios):.2f}); largest difference of 10-step mean losses "
              f"{diff:.2e}; mean loss of the last {10 * tail} steps {sum(mine[-tail:]) / tail:.4f} vs "
              f"{sum(theirs[-tail:]) / tail:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
