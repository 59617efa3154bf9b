"""Supervised tokens/s of the demo's training cell: cdlib.train against TRL's SFTTrainer in the configurations a
user would choose on this hardware, transformers' Trainer, and (optionally) cdlib's own code before a change.

The demo's train cell (params/demo.yaml: toy student of 2 layers, hidden 128; seq_len 1,024, one packed
row per micro-batch, grad_accum 1, AdamW at 1e-3, cosine with 10% warm-up, clipping at 1.0, no gradient
checkpointing) on the demo's toy traces (1,500 questions), from the same initial weights, ``--steps`` optimizer
steps. Variants, each in a fresh subprocess on ``--threads`` threads (default 1, as ``make demo`` runs its cells):

* ``cdlib``: ``cdlib.train.run`` as this checkout has it (padding-free packed rows, sdpa per example);
* ``before``: the same with ``cdlib`` imported from ``--before DIR`` (``git archive <commit> cdlib | tar -x -C
  DIR``): the code before a change;
* TRL's ``SFTTrainer`` (when TRL is installed: ``make bench`` installs the ``bench`` extra), fed the same
  tokenized examples (``input_ids`` and ``labels``, so the same supervised tokens), the same optimizer, schedule,
  clipping and initial weights:

  - ``trl-glb``: padded batches of ``--batch`` examples, ``train_sampling_strategy="group_by_length"`` (the
    ``group_by_length=True`` of transformers before 5.x): TRL's fastest setting on a CPU, and the headline peer;
  - ``trl-pad``: padded batches in TRL's default (random) order;
  - ``trl-bfd``: ``packing=True`` with TRL's default best-fit-decreasing strategy, one padding-free 1,024-token
    row per step. TRL documents padding-free rows as supported with FlashAttention only; on a CPU transformers'
    sdpa turns their ``position_ids`` into a block-diagonal mask over the whole row;
* ``hf``: ``transformers.Trainer`` on cdlib's packed rows in cdlib's order, with block masks (the Trainer loop
  SFTTrainer runs, without TRL's data preparation and metrics); its losses equal cdlib's.

``--batch`` defaults to the mean number of examples in one of cdlib's packed rows (rounded), so a padded step
carries about as many real tokens as a packed one and the learning-rate schedule means the same.

The figure is supervised tokens per second of the training loop (cdlib: its ``train_s``; Trainers:
``on_train_begin`` to ``on_train_end``; model loading, data preparation, validation and saving left out), counting
the positions that carry loss (prompts and padding not). The machine is shared: every repeat times each other
variant in a pair with a cdlib run of its own, back to back, who goes first alternating and the pairs' order
rotating, so load falls on both sides of a pair alike; each pair gives a ratio, and the headline is the median of
those per-pair ratios (every pair is printed).

Same objective: each variant's first-step loss is compared with a reference computed independently (the initial
model, plain transformers forward, each example of that step alone, no padding or packing, the mean over its
supervised tokens); ``hf`` also matches cdlib on every logged window. Other rows and orders make the later losses
trajectories over the same data, not equal numbers.

Run: ``.venv/bin/python benchmarks/bench_train_steps.py`` (5 repeats of 4 pairs, about 15 minutes on 2 quiet cores);
``--cdlib DIR`` times a snapshot (``git archive HEAD cdlib | tar -x -C DIR``) while the checkout is being edited.
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
SEQ_LEN = 1024  # cdlib's row length (--seq-len): the demo's 1,024
TRL_VARIANTS = ("trl-glb", "trl-pad", "trl-bfd")
DESCRIBE = {
    "cdlib": "cdlib.train (packed rows, sdpa per example)",
    "before": "cdlib before the change (--before)",
    "trl-glb": "TRL SFTTrainer, padded batches, group_by_length",
    "trl-pad": "TRL SFTTrainer, padded batches, default order",
    "trl-bfd": "TRL SFTTrainer, bfd packing (padding-free rows)",
    "hf": "transformers.Trainer on cdlib's rows (block masks)",
}


def _params(work: Path, steps: int, out: Path):
    from cdlib.params import TrainParams

    return TrainParams(out_dir=str(out), data=str(work / "generate"), student=str(work / "prep" / "base"),
                       method="full", learning_rate=1e-3, seq_len=SEQ_LEN, micro_batch_size=1, grad_accum=1,
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


def _load_model(source: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="sdpa")


def reference_loss(source: str, examples: list[dict]) -> float:
    """The initial model's mean loss over the supervised tokens of ``examples``, each example alone (no padding,
    no packing): what every trainer's first step should report on those examples."""
    import torch

    model = _load_model(source).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor([ex["labels"]])[:, 1:]
            logits = model(input_ids=ids).logits[:, :-1].double()
            keep = labels != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def _packing():
    """cdlib's packing module in the layout of whichever cdlib is imported: ``cdlib.pack`` in code before the
    ``cdlib.training`` package (a ``--before`` snapshot), ``cdlib.training.packing`` since. The old name is tried
    first: a snapshot without ``cdlib.training`` would otherwise get the checkout's through the editable install."""
    try:
        from cdlib import pack as packlib
    except ImportError:
        from cdlib.training import packing as packlib
    return packlib


def _cdlib_schedule(data, P):
    """cdlib's planned micro-batches (lists of bins of example indices), as ``cdlib.train.run`` plans them."""
    from transformers import AutoConfig

    from cdlib import train as T

    packlib = _packing()
    rows = packlib.packed_layout(AutoConfig.from_pretrained(data.model_source), "sdpa", True)
    return rows, T.plan(data.train, P, 1, packing=rows.packing)


def work_cdlib(work: Path, steps: int, batch: int) -> dict:
    from cdlib import train as T

    out = Path(tempfile.mkdtemp(dir=work))
    P = _params(work, steps, out)
    m = T.run(P, progress=False, log=lambda *a: None)
    losses = [r["loss"] for r in sorted(T.Store(out / "loss.jsonl").read(), key=lambda r: r["step"])]
    data = T.prepare(P, audit_show=0)
    _, schedule = _cdlib_schedule(data, P)
    first = [data.train[i] for b in schedule[0] for i in b]
    return {"steps": m["steps"], "seconds": m["train_s"], "supervised": m["trainable_tokens"],
            "tokens": m["total_tokens_seen"], "step_losses": losses, "logs": [[i + 1, x] for i, x in enumerate(losses)],
            "first_loss": losses[0], "first_reference": reference_loss(data.model_source, first),
            "first_examples": len(first), "code": str(Path(T.__file__).parent)}


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


def _recording(collate):
    """Wrap a collator: remember each batch's supervised-token and real-token counts and the first batch's
    examples (the data loader may collate one batch ahead; only the first ``steps`` count)."""
    seen: dict = {"supervised": [], "tokens": [], "first": None}

    def wrapped(features):
        batch = collate(features)
        labels = batch["labels"]
        seen["supervised"].append(int((labels[..., 1:] != -100).sum()))
        seen["tokens"].append(sum(len(f["input_ids"]) for f in features))
        if seen["first"] is None:
            seen["first"] = features
        return batch

    return seen, wrapped


def _common_args(P, steps: int) -> dict:
    return dict(gradient_accumulation_steps=1, max_steps=steps, learning_rate=P.learning_rate,
                lr_scheduler_type="cosine", warmup_steps=math.ceil(P.warmup_ratio * steps), weight_decay=0.0,
                max_grad_norm=1.0, optim="adamw_torch", logging_steps=10, logging_first_step=True,
                save_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                seed=P.seed)


def _logs(trainer) -> list[list]:
    return [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h]


def work_trainer(work: Path, steps: int, batch: int) -> dict:
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    from cdlib import train as T

    packlib = _packing()
    out = Path(tempfile.mkdtemp(dir=work))
    P = _params(work, steps, out)
    data = T.prepare(P, audit_show=0)
    model = _load_model(data.model_source)
    rows, schedule = _cdlib_schedule(data, P)
    schedule = schedule[:steps]
    pad = data.tokenizer.pad_token_id if data.tokenizer.pad_token_id is not None else 0

    def collate(items: list[int]) -> dict:
        return packlib.collate(data.train, [b for i in items for b in schedule[i]], rows, pad)

    class InOrder(Trainer):  # the planned order, as cdlib trains it
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    clock, timer = _train_clock()
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=1, remove_unused_columns=False,
                             **_common_args(P, steps))
    trainer = InOrder(model=model, args=args, train_dataset=list(range(len(schedule))), data_collator=collate,
                      callbacks=[timer])
    trainer.train()
    n = trainer.state.global_step
    mbs = [[i for b in schedule[k] for i in b] for k in range(n)]
    first = [data.train[i] for i in mbs[0]]
    logs = _logs(trainer)
    return {"steps": n, "seconds": clock["t1"] - clock["t0"],
            "supervised": sum(sum(1 for x in data.train[i]["labels"][1:] if x != -100) for mb in mbs for i in mb),
            "tokens": sum(len(data.train[i]["input_ids"]) for mb in mbs for i in mb), "logs": logs,
            "first_loss": logs[0][1], "first_reference": reference_loss(data.model_source, first),
            "first_examples": len(first), "code": "transformers.Trainer"}


def work_trl(work: Path, steps: int, batch: int, mode: str) -> dict:
    """TRL's SFTTrainer as a user configures it (``mode``: ``glb``, ``pad`` or ``bfd``) on the same tokenized
    examples, initial weights, optimizer and schedule."""
    import datasets
    import trl
    from trl import SFTConfig, SFTTrainer

    from cdlib import train as T

    out = Path(tempfile.mkdtemp(dir=work))
    P = _params(work, steps, out)
    data = T.prepare(P, audit_show=0)
    model = _load_model(data.model_source)
    ds = datasets.Dataset.from_list([{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in data.train])
    clock, timer = _train_clock()
    shape = {"glb": dict(packing=False, per_device_train_batch_size=batch, train_sampling_strategy="group_by_length"),
             "pad": dict(packing=False, per_device_train_batch_size=batch),
             "bfd": dict(packing=True, packing_strategy="bfd", per_device_train_batch_size=1)}[mode]
    args = SFTConfig(output_dir=str(out), max_length=P.seq_len, bf16=False, **shape, **_common_args(P, steps))
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=data.tokenizer,
                         callbacks=[timer])
    seen, trainer.data_collator = _recording(trainer.data_collator)
    trainer.train()
    n = trainer.state.global_step
    first = [{"input_ids": list(f["input_ids"]), "labels": list(f["labels"])} for f in seen["first"]]
    if mode == "bfd":  # the reference sees the packed row's examples one by one
        first = _unpack(seen["first"])
    logs = _logs(trainer)
    return {"steps": n, "seconds": clock["t1"] - clock["t0"], "supervised": sum(seen["supervised"][:n]),
            "tokens": sum(seen["tokens"][:n]), "logs": logs, "first_loss": logs[0][1],
            "first_reference": reference_loss(data.model_source, first), "first_examples": len(first),
            "code": f"trl {trl.__version__} SFTTrainer, {shape}"}


def _unpack(features: list[dict]) -> list[dict]:
    """The examples inside TRL's packed rows (``seq_lengths`` gives each example's length)."""
    out = []
    for f in features:
        start = 0
        for n in f["seq_lengths"]:
            out.append({"input_ids": list(f["input_ids"][start:start + n]),
                        "labels": list(f["labels"][start:start + n])})
            start += n
    return out


def worker(variant: str, work: Path, steps: int, threads: int, batch: int) -> None:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, os.environ.get("BENCH_CDLIB") or str(REPO))
    if variant in TRL_VARIANTS:
        result = work_trl(work, steps, batch, variant.split("-")[1])
    else:
        result = {"cdlib": work_cdlib, "before": work_cdlib, "hf": work_trainer}[variant](work, steps, batch)
    print("RESULT " + json.dumps({"variant": variant, **result}))


def default_batch(work: Path, steps: int) -> int:
    """Examples per padded batch: the mean number in one of cdlib's packed rows, rounded."""
    from cdlib import train as T

    P = _params(work, steps, work / "plan")
    _, schedule = _cdlib_schedule(T.prepare(P, audit_show=0), P)
    per_row = [len(b) for mb in schedule[:steps] for b in mb]
    return max(1, round(sum(per_row) / len(per_row)))


def _window_means(step_losses: list[float], logs: list[list]) -> list[float]:
    """cdlib's per-step losses averaged over the windows another trainer logged ((previous step, step])."""
    out, prev = [], 0
    for step, _ in logs:
        part = step_losses[prev:step]
        out.append(sum(part) / len(part))
        prev = step
    return out


def _run(v: str, a: argparse.Namespace, work: Path, batch: int) -> dict:
    """One variant in a fresh subprocess; its RESULT line."""
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    code = a.before if v == "before" else a.cdlib
    if code:
        env["BENCH_CDLIB"] = str(Path(code).resolve())
    proc = subprocess.run([sys.executable, __file__, "--worker", v, "--work", str(work), "--steps", str(a.steps),
                           "--threads", str(a.threads), "--batch", str(batch), "--seq-len", str(a.seq_len)],
                          env=env, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"variant {v} failed (exit {proc.returncode})")
    return json.loads(line[7:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (1: as make demo's cells run, "
                    "one core each; 2-thread runs stall whenever another job takes a core of a shared 2-core machine)")
    ap.add_argument("--batch", type=int, help="examples per padded TRL batch (default: cdlib's examples per row)")
    ap.add_argument("--seq-len", type=int, default=1024, help="cdlib's packed row length, so its tokens per step "
                    "(TRL's bfd rows too; padded batches follow through the default --batch)")
    ap.add_argument("--variants", help="comma-separated variants to time against cdlib (default: every one "
                                       "installed): " + ",".join(v for v in DESCRIBE if v != "cdlib"))
    ap.add_argument("--before", help="directory holding the cdlib package to compare with (the code before)")
    ap.add_argument("--cdlib", help="directory holding the cdlib package timed as 'cdlib' (default: this checkout; "
                                    "e.g. a `git archive HEAD cdlib` snapshot while the tree is being edited)")
    ap.add_argument("--work", help="working directory (default: a fresh temporary one)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    global SEQ_LEN
    SEQ_LEN = a.seq_len
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_train_"))
    if a.worker:
        worker(a.worker, work, a.steps, a.threads, a.batch or 1)
        return 0
    sys.path.insert(0, str(Path(a.cdlib).resolve()) if a.cdlib else str(REPO))
    setup(work)
    batch = a.batch or default_batch(work, a.steps)
    try:
        import trl  # noqa: F401

        others = [*TRL_VARIANTS, "hf"]
    except ImportError:
        others = ["hf"]
        print("note: TRL is not installed in .venv (make bench installs it): the side-by-side is transformers.Trainer")
    others = [*(["before"] if a.before else []), *others]
    if a.variants:
        others = [v for v in a.variants.split(",") if v in DESCRIBE and v != "cdlib"]
    print(f"{a.steps} steps of the demo's training cell, {a.threads} threads, {a.repeats} repeats, cdlib rows of "
          f"{a.seq_len:,} tokens, padded TRL batches of {batch} examples; work directory {work}; cdlib from "
          f"{a.cdlib or REPO}", flush=True)
    # Every repeat times each other variant in a pair with its own cdlib run, back to back, who goes first
    # alternating, and the pairs' order rotating: load on the shared machine falls on both runs of a pair alike.
    pairs: dict[str, list[tuple[dict, dict]]] = {v: [] for v in others}
    for r in range(a.repeats):
        for k, v in enumerate(others[r % len(others):] + others[:r % len(others)]):
            order = ["cdlib", v] if (r + k) % 2 == 0 else [v, "cdlib"]
            got = {name: _run(name, a, work, batch) for name in order}
            pairs[v].append((got["cdlib"], got[v]))
            for name in order:
                res = got[name]
                print(f"repeat {r + 1} {name:7s}: {res['supervised'] / res['seconds']:8,.0f} supervised tokens/s, "
                      f"{res['steps'] / res['seconds']:6.2f} steps/s, first-step loss {res['first_loss']:.6f} "
                      f"(reference {res['first_reference']:.6f}), last logged loss {res['logs'][-1][1]:.4f}",
                      flush=True)
            c, o = got["cdlib"], got[v]
            print(f"repeat {r + 1} pair cdlib / {v}: {_rate(c) / _rate(o):.2f}x", flush=True)

    cdlib_runs = [c for v in others for c, _ in pairs[v]]
    print(f"\n{a.steps} steps, {a.threads} threads, {a.repeats} repeats of alternating pairs; supervised tokens/s "
          f"(median over runs), real tokens per step, first-step loss against its reference:")
    for v, runs in [("cdlib", cdlib_runs), *[(v, [o for _, o in pairs[v]]) for v in others]]:
        diff = max(abs(x["first_loss"] - x["first_reference"]) for x in runs)
        print(f"  {v:7s} {statistics.median(_rate(x) for x in runs):8,.0f}  "
              f"{statistics.mean(x['tokens'] / x['steps'] for x in runs):6,.0f} tokens/step  "
              f"first-step |loss - reference| <= {diff:.1e}  {DESCRIBE[v]}")
    print("\ncdlib / variant, supervised tokens/s: the median of the per-pair ratios (each pair run back to back), "
          "and every pair:")
    for v in others:
        ratios = [_rate(c) / _rate(o) for c, o in pairs[v]]
        print(f"  cdlib / {v:7s} {statistics.median(ratios):.2f}x  (pairs: {', '.join(f'{x:.2f}' for x in ratios)})")
    if "hf" in pairs:
        mine, theirs = pairs["hf"][0]
        same = _window_means(mine["step_losses"], theirs["logs"])
        diff = max(abs(x - y[1]) for x, y in zip(same, theirs["logs"]))
        print(f"cdlib and hf, same rows in the same order: largest difference of logged window losses {diff:.1e}")
    return 0


def _rate(x: dict) -> float:
    return x["supervised"] / x["seconds"]


if __name__ == "__main__":
    sys.exit(main())
