"""Stage 4: student fine-tuning (paper section 3.3, 4, Appendix C and H.3) and MPD's KL objective.

:func:`run` trains one student on one data cell, in this process (one device, or
one rank of an ``accelerate launch``):

1. :func:`cdlib.training.data.load_records` reads the input cell (``traces.jsonl``, ``compressed.jsonl``
   or ``truncated.jsonl``, detected) and skips flagged records;
2. the student is prepared: ``toy*`` names build a tiny Qwen2 model from scratch
   with a tokenizer trained on the records (``<out_dir>/base/``), anything else is
   a hub id, a local directory or a train cell directory (its checkpoint, a LoRA
   adapter merged into ``<out_dir>/base/`` first), so a student can start from a
   trained one; ``kl_teacher`` is resolved the same way (:func:`cdlib.training.data.resolve_pretrained`);
3. :func:`cdlib.training.data.prepare` builds the SFT examples (``cdlib.training.sft``), runs the mask audit and
   makes the seeded validation split;
4. :func:`cdlib.training.data.plan` packs the examples (best-fit-decreasing at ``seq_len``) and lays
   out the micro-batches of the whole run: by epochs, ``max_steps`` or a
   ``token_budget`` of supervised tokens (compute-matched runs, cycling the data);
5. the loop: transformers + peft + accelerate; the loss of an optimizer step is
   the mean over every supervised token of its micro-batches on every rank (the
   sum of token losses divided by the step's global token count), not a mean of
   per-micro-batch means, so packed rows with few supervised tokens do not weigh
   as much as full ones; every ``save_every`` steps the training state goes to
   ``<out_dir>/resume/`` and a rerun of a killed cell resumes from it (:func:`run`,
   :func:`cdlib.training.checkpoint.save_resume`); the KL objective is computed over chunks of
   ``kl_chunk_tokens`` positions (:func:`cdlib.training.losses.kl_sum`);
6. the checkpoint is saved in HF layout (``model/``, ``adapter/``, ``base/``) with
   ``checkpoint.json`` naming what vLLM should load (:func:`cdlib.outputs.resolve_model`,
   :func:`cdlib.training.checkpoint.save`), the loss curve in ``loss.jsonl``, and the metrics
   (budget label, tokens, wall-clock, GPU-hours, peak memory, FLOPs estimate) returned.

The data side lives in ``cdlib.training.data``, loading models, LoRA and the optimizer in
``cdlib.training.models``, the losses in ``cdlib.training.losses`` and the resumable state, saving and
LoRA merges in ``cdlib.training.checkpoint``; :func:`run` reads top to bottom through :func:`set_up`,
:func:`start_progress`, :func:`train_loop` (:func:`train_step` per optimizer step),
:func:`validate`, :func:`cdlib.training.checkpoint.save` and :func:`collect_metrics`.

:func:`train` is what the notebook calls: it runs in-process, or launches
``accelerate launch`` across the visible GPUs when ``accelerate_config`` is set
and more than one GPU is visible (:func:`cdlib.training.launch.launch`). ``python -m cdlib.train
params.json`` is the worker entry point of such a launch.

Packed batches come from ``cdlib.training.packing`` and carry ``use_cache=False``; they are
passed to the model unchanged (without it transformers 5.19 builds a cache and
ignores the packed ``position_ids``, attending across examples). By default rows are
padding-free with ``cu_seq_lens`` (layout ``varlen``): flash-attention 2 on a GPU, else
sdpa one example at a time (:func:`cdlib.training.packing.sdpa_varlen_attention`), so no ``L x L``
mask is built and attention costs the examples' lengths squared, not the row's. Whether a
model is packed at all is :func:`cdlib.training.packing.packed_layout`'s answer for its config and
attention path: linear-attention models (Qwen3.5) are packed on varlen with those layers
run example by example, and train one example per row on sdpa/eager block masks, with the
reason in the log and in the metrics (``layout``, ``packing``, ``packing_note``);
sliding-window models with sinks (gpt-oss, eager) get a block mask per layer type. The paper's
families also come as tiny random models (``student: tiny-llama``, ...; ``cdlib.tiny``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdlib.params import TrainParams
from cdlib.params import validate as validate_params
from cdlib.store import Store
from cdlib.training import checkpoint, losses, sft
from cdlib.training import packing as packlib
from cdlib.training.data import (DEFAULT_LR, TOY_LR, MicroBatches, Prepared, TrainError, budget_mode,
                                 check_same_tokenizer, collate_fn, is_toy, plan, prepare, step_tokens, to_device,
                                 trained_from_toy, with_mask)
from cdlib.training.launch import METRICS_FILE, die_with_parent, launch, visible_gpus
from cdlib.training.models import flops_estimate, load_student, load_teacher, make_optimizer, peak_memory
from cdlib.training.trackers import start_tracking, track_steps

EMA_ALPHA = 0.08  # paper Figure 3


# --------------------------------------------------------------------------- data


# --------------------------------------------------------------------------- plan


# --------------------------------------------------------------------------- models


# --------------------------------------------------------------------------- loop


def _evaluate(model: Any, teacher: Any, batches: list[dict[str, Any]], accelerator: Any, P: TrainParams,
              vocab: int, head: str = "full", counted: int | None = None) -> dict[str, float | None]:
    """Token-weighted validation cross-entropy (and KL for objective 'kl') over this rank's batches, reduced.
    Only the first ``counted`` batches (default all) count; the rest are fillers run for their collectives."""
    import torch

    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    discarded = torch.zeros_like(totals)  # where the fillers' sums go
    counted = len(batches) if counted is None else counted
    with torch.no_grad():
        for i, batch in enumerate(batches):
            sums = totals if i < counted else discarded
            batch = to_device(batch, accelerator.device)
            if teacher is None:
                ce, n = losses.sft_loss(model, accelerator.unwrap_model(model), batch, head, P.loss_chunk_tokens)
            else:
                logits = model(**losses.model_inputs(batch)).logits
                ce, n = losses.cross_entropy_sum(logits, batch["labels"], batch.get("supervised_rows"))
            sums[0] += ce.detach()  # summed on the device, read once at the end
            sums[2] += n
            if teacher is not None:
                t_logits = teacher(**losses.model_inputs(batch)).logits
                kl, _ = losses.kl_sum(logits, t_logits, batch["labels"], P.kl_direction, vocab, P.kl_chunk_tokens,
                               batch.get("supervised_rows"))
                sums[1] += kl.detach()
    model.train()
    totals = accelerator.reduce(totals, "sum")
    n = float(totals[2])
    if n == 0:
        return {"val_loss": None, "val_kl": None, "val_tokens": 0}
    return {"val_loss": float(totals[0]) / n, "val_kl": (float(totals[1]) / n) if teacher is not None else None,
            "val_tokens": int(n)}


@dataclass
class Setup:
    """What :func:`set_up` builds before the loop: the accelerator, the prepared student (and KL teacher), the
    optimizer and scheduler, and the planned loader of the whole run."""

    P: TrainParams
    accelerator: Any
    data: Prepared
    on_gpu: bool
    say: Any
    tracker: dict[str, float] | None
    model: Any
    head_model: Any  # the unwrapped model, whose output embedding the fused loss head takes over
    head: str  # the SFT loss head (cdlib.training.losses.resolve)
    rows: packlib.Layout
    attn: str
    student: dict[str, Any]  # load_student's record: lora, params, tf32, liger, fsdp_ac, n_layers, d_attn
    teacher: Any
    teacher_source: str | None
    teacher_params: int
    lr: float
    optimizer: Any
    optimizer_name: str
    optimizer_note: str | None
    scheduler: Any
    loader: Any
    schedule: list[list[list[int]]]
    total_steps: int


@dataclass
class Progress:
    """The loop's running totals; a resumable state saves them and a resumed run starts from them."""

    start_step: int = 0
    ema: float | None = None
    step_losses: list[float] = field(default_factory=list)
    totals: list[Any] = field(default_factory=lambda: [0, 0, 0])  # supervised, all tokens, sum L^2 (this rank)
    seen: int = 0  # global supervised tokens so far
    prior: dict[str, float] = field(default_factory=lambda: {"wall_clock_s": 0.0, "train_s": 0.0,
                                                             "peak_memory_gb": 0.0})
    train_s: float = 0.0


def make_accelerator(P: TrainParams, on_gpu: bool, out: Path) -> Any:
    """The run's ``Accelerator``: bf16 autocast on a GPU with ``P.bf16``, gloo on CPU, ``P.report_to``'s tracker.
    On a GPU batches come from pinned memory and are copied without waiting for the GPU (non_blocking)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(mixed_precision="bf16" if on_gpu and P.bf16 else "no",
                              cpu=not on_gpu,  # torchrun ranks on CPU talk over gloo
                              dataloader_config=DataLoaderConfiguration(non_blocking=on_gpu),
                              log_with=None if P.report_to == "none" else P.report_to,
                              project_dir=str(out / "trackers"))
    if not on_gpu:
        fsdp_on_cpu(accelerator)
    return accelerator


def fsdp_on_cpu(accelerator: Any) -> bool:
    """CPU ranks launched with an FSDP config (``slurm/accelerate/fsdp2-cpu.yaml``): promote the process state
    from ``MULTI_CPU`` to FSDP over gloo, with the plugin the launcher's environment describes; True if done.

    Why: accelerate 1.15 makes FSDP only of GPU-like process groups, so CPU ranks came out ``MULTI_CPU`` and
    ``prepare`` wrapped the model in DDP, silently ignoring the config. torch's ``fully_shard`` runs on CPU
    over gloo, and nothing else in ``Accelerator()`` depends on the type without mixed precision, so after the
    promotion the FSDP2 path the GPU nodes run (wrapping, activation checkpointing, sharded resumable states,
    the gathered HF save) runs here."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true"
            or accelerator.state.distributed_type != DistributedType.MULTI_CPU):
        return False
    PartialState().distributed_type = DistributedType.FSDP  # each AcceleratorState() copies the process state anew
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # version, wrapping, state dict type: the env's
    return True


def set_up(P: TrainParams, data: Prepared, accelerator: Any, on_gpu: bool, say: Any,
           tracker: dict[str, float] | None) -> Setup:
    """Load the student (and the KL teacher), plan the run's micro-batches, build the optimizer, LR scheduler
    and loader, and hand them to accelerate (:class:`Setup`)."""
    import torch
    from transformers import AutoTokenizer, get_scheduler

    teacher_source = data.extra.get("kl_teacher") or P.kl_teacher
    if P.objective == "kl":  # before any model is loaded
        check_same_tokenizer(data.tokenizer, AutoTokenizer.from_pretrained(teacher_source), data.model_source,
                             teacher_source)
    head = losses.resolve(P.loss_head)  # auto: Cut Cross-Entropy / Liger on a GPU where installed, else chunked
    model, student = load_student(P, data, accelerator, on_gpu, say)
    teacher, teacher_params, rows = (load_teacher(teacher_source, student, accelerator, on_gpu and P.bf16, say)
                                     if P.objective == "kl" else (None, 0, student["rows"]))
    world = accelerator.num_processes
    lr = P.learning_rate or (TOY_LR if is_toy(P.student) or trained_from_toy(P.student) else DEFAULT_LR[P.method])
    schedule = plan(data.train, P, world, packing=rows.packing)
    total_steps = max(1, math.ceil(math.ceil(len(schedule) / world) / P.grad_accum))
    optimizer, optimizer_name, optimizer_note = make_optimizer(model.parameters(), P, lr, on_gpu,
                                                               sharded=accelerator.distributed_type.value == "FSDP")
    if optimizer_note:
        say(optimizer_note)
    scheduler = get_scheduler(P.lr_scheduler, optimizer, num_warmup_steps=math.ceil(P.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    tok = data.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    # its own generator: starting an iteration then draws no number from the global RNG, whose state a
    # resumed run restores (dropout's random numbers continue exactly where the interrupted run left them)
    loader = torch.utils.data.DataLoader(MicroBatches(schedule), batch_size=1, shuffle=False,
                                         collate_fn=collate_fn(data.train, rows, pad_id), pin_memory=on_gpu,
                                         generator=torch.Generator().manual_seed(P.seed))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)  # saved with the state, stepped as before (not wrapped)
    # LoRA: the frozen base is the one loaded above, so a resumable state holds only the trainable weights
    if P.method == "lora":
        accelerator.register_save_state_pre_hook(checkpoint.trainable_weights_only)
    params = student["params"]
    say(f"training {data.model_source} ({P.method}, {P.objective}, {params['trainable']:,}/{params['total']:,} "
        f"trainable params) on {world} process(es), {accelerator.device}, {student['attn']}/{student['layout']}, "
        f"{optimizer_name}, lr {lr:g}, {len(schedule)} micro-batches -> {total_steps} steps ({budget_mode(P)})")
    return Setup(P, accelerator, data, on_gpu, say, tracker, model, accelerator.unwrap_model(model), head, rows,
                 student["attn"], student, teacher, teacher_source, teacher_params, lr, optimizer, optimizer_name,
                 optimizer_note, scheduler, loader, schedule, total_steps)


def start_progress(s: Setup, out: Path) -> tuple[Progress, dict[str, Any]]:
    """The loop's starting point: a matching resumable state's (:func:`cdlib.training.checkpoint.resume_or_start`)
    or step 0; and the run's :func:`cdlib.training.checkpoint.resume_fingerprint`."""
    acc = s.accelerator
    fingerprint = checkpoint.resume_fingerprint(s.P, s.data.train, s.schedule, acc.num_processes,
                                                str(acc.distributed_type.value))
    state = checkpoint.resume_or_start(acc, out, fingerprint, strict=s.P.method != "lora", say=s.say,
                                       total_steps=s.total_steps)
    if state is None:
        return Progress(), fingerprint
    prog = Progress(start_step=int(state["step"]), ema=state["ema"], step_losses=list(state["step_losses"]),
                    seen=int(state["totals"][0]), prior={k: float(state[k]) for k in Progress().prior})
    if acc.is_main_process:  # the global totals so far live on the main rank; the end of the run sums the ranks
        prog.totals = [int(x) for x in state["totals"]]
    return prog, fingerprint


def train_step(s: Setup, window: list[dict[str, Any]], first: int, n_global: float, planned: list[int],
               prog: Progress) -> Any:
    """Forward and backward over one optimizer step's micro-batches (``first``: the index of the first), the
    gradient step, and the step's (loss sum, CE sum) left on the device: nothing is read back from it."""
    import torch

    acc, world, model = s.accelerator, s.accelerator.num_processes, s.model
    step_sum = torch.zeros(2, dtype=torch.float64, device=acc.device)  # loss sum, ce sum
    for k, batch in enumerate(window):
        if batch["n_supervised"] != planned[first + k]:
            raise TrainError(f"micro-batch {first + k} of rank {acc.process_index} holds {batch['n_supervised']} "
                             f"supervised tokens, the plan says {planned[first + k]}: the loader does not shard as "
                             "planned")
        batch = with_mask(batch, s.rows)
        with contextlib.nullcontext() if k == len(window) - 1 else acc.no_sync(model):
            if s.teacher is None:  # SFT: the loss head never builds full logits unless loss_head is "full"
                loss, n = losses.sft_loss(model, s.head_model, batch, s.head, s.P.loss_chunk_tokens)
                ce = loss
            else:
                logits = model(**losses.model_inputs(batch)).logits
                ce, n = losses.cross_entropy_sum(logits, batch["labels"], batch["supervised_rows"])
                with torch.no_grad():
                    t_logits = s.teacher(**losses.model_inputs(batch)).logits
                loss, _ = losses.kl_sum(logits, t_logits, batch["labels"], s.P.kl_direction, len(s.data.tokenizer),
                                        s.P.kl_chunk_tokens, batch["supervised_rows"])
                if s.P.kl_weight < 1:  # Distilling the Essence's mix of the divergence and the cross-entropy
                    loss = s.P.kl_weight * loss + (1 - s.P.kl_weight) * ce
            # mean over the step's supervised tokens on all ranks; DDP/FSDP average gradients over ranks
            acc.backward(loss * world / max(n_global, 1.0))
        step_sum[0] += loss.detach()  # kept on the device: read every log_every steps (LossReader)
        step_sum[1] += ce.detach()
        lengths = batch["example_lengths"]
        prog.totals[0] += n
        prog.totals[1] += sum(lengths)
        prog.totals[2] += sum(x * x for x in lengths)
    if s.P.max_grad_norm > 0:
        acc.clip_grad_norm_(model.parameters(), s.P.max_grad_norm)
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return step_sum


class LossReader:
    """Steps whose loss sums are still on the device, read together: one all-reduce and one host read for
    them all (every ``log_every`` steps, before a resumable state, at the end), then the EMA; the main
    rank appends the read steps to ``loss.jsonl`` and the tracker (:meth:`flush`)."""

    def __init__(self, s: Setup, prog: Progress, curve: Store | None, bar: Any):
        self.s, self.prog, self.curve, self.bar = s, prog, curve, bar
        self.unread: list[tuple[dict[str, Any], Any]] = []
        self.pending: list[dict[str, Any]] = []  # read steps not yet on disk

    def read(self) -> None:
        if not self.unread:
            return
        import torch

        prog = self.prog
        sums = self.s.accelerator.reduce(torch.stack([u[1] for u in self.unread]), "sum").tolist()
        for (rec, _), (loss_sum, ce_sum) in zip(self.unread, sums):
            n = max(rec.pop("n_global"), 1.0)
            rec["loss"] = loss_sum / n
            prog.ema = rec["loss"] if prog.ema is None else EMA_ALPHA * rec["loss"] + (1 - EMA_ALPHA) * prog.ema
            rec["ema"] = prog.ema
            if self.s.teacher is not None:
                rec["ce"] = ce_sum / n
            prog.step_losses.append(rec["loss"])
            self.pending.append(rec)
        self.bar.set_postfix(loss=f"{self.pending[-1]['loss']:.3f}", ema=f"{prog.ema:.3f}")
        self.unread = []

    def flush(self, track: bool = True) -> None:
        """Read what is unread and append it to the curve (and the tracker)."""
        self.read()
        if self.curve is not None and self.pending:
            self.curve.append(self.pending)
            if track:
                track_steps(self.s.accelerator, self.s.tracker, self.pending)
        self.pending = []


def train_loop(s: Setup, prog: Progress, out: Path, fingerprint: dict[str, Any], t_start: float,
               progress: bool) -> None:
    """The optimizer steps from ``prog.start_step``: :func:`train_step`, the loss curve every ``log_every``
    steps and a resumable state every ``save_every`` (:func:`cdlib.training.checkpoint.save_resume`)."""
    import torch

    from cdlib.progress import tqdm  # text inside grid cells (log.txt), widgets in JupyterLab

    P, acc = s.P, s.accelerator
    # the loss denominators of every step, planned (no all-reduce per step)
    planned, global_tokens = step_tokens(s.data.train, s.schedule, acc.num_processes, P.grad_accum,
                                         getattr(acc, "even_batches", True))
    planned = planned[acc.process_index]
    # the data order is fixed by the plan: a resumed run skips the micro-batches of the steps done
    start = prog.start_step
    it = iter(acc.skip_first_batches(s.loader, start * P.grad_accum) if start else s.loader)
    s.model.train()
    bar = tqdm(total=s.total_steps, initial=start, desc="train", unit="step",
               disable=not (progress and acc.is_main_process))
    reader = LossReader(s, prog, Store(out / "loss.jsonl") if acc.is_main_process else None, bar)
    t_loop = time.time()
    for step in range(start, s.total_steps):
        window = list(itertools.islice(it, P.grad_accum))
        if not window:
            break
        n_global = float(global_tokens[step])
        step_sum = train_step(s, window, step * P.grad_accum, n_global, planned, prog)
        prog.seen += int(n_global)
        record = {"id": str(step + 1), "step": step + 1, "loss": None, "ema": None,
                  "lr": s.scheduler.get_last_lr()[0], "tokens": prog.seen, "n_global": n_global}
        reader.unread.append((record, step_sum))
        bar.update(1)
        if (step + 1) % P.log_every == 0 or step + 1 == s.total_steps:
            reader.flush()
        if P.save_every and (step + 1) % P.save_every == 0 and step + 1 < s.total_steps:
            reader.flush(track=False)  # the curve up to this step is on disk before the state that follows it
            now = time.time()
            checkpoint.save_resume(acc, out, {
                "step": step + 1, "fingerprint": fingerprint, "ema": prog.ema, "step_losses": prog.step_losses,
                "totals": acc.reduce(torch.tensor(prog.totals, dtype=torch.float64, device=acc.device), "sum").tolist(),
                "wall_clock_s": prog.prior["wall_clock_s"] + now - t_start,
                "train_s": prog.prior["train_s"] + now - t_loop,
                "peak_memory_gb": max(prog.prior["peak_memory_gb"], peak_memory(s.on_gpu)[0]), "saved_at": now})
    reader.read()
    bar.close()
    reader.flush(track=False)
    prog.train_s = prog.prior["train_s"] + time.time() - t_loop
    prog.totals = acc.reduce(torch.tensor(prog.totals, dtype=torch.float64, device=acc.device), "sum")


def validate(s: Setup) -> dict[str, Any]:
    """Validation loss (and KL) over the validation split, packed as the training rows are (:func:`_evaluate`)."""
    P, acc, val = s.P, s.accelerator, s.data.val
    bins = packlib.pack([len(ex["input_ids"]) for ex in val], P.seq_len) if (val and s.rows.packing) \
        else [[i] for i in range(len(val))]
    tok = s.data.tokenizer
    collate = collate_fn(val, s.rows, tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))
    mine = bins[acc.process_index::acc.num_processes]
    batches = [collate([mine[k:k + P.micro_batch_size]]) for k in range(0, len(mine), P.micro_batch_size)]
    counted = len(batches)
    if acc.distributed_type.value == "FSDP" and bins:
        # under FSDP every forward all-gathers the parameters, a collective: a rank with fewer validation rows
        # than rank 0 (4 rows packed into 1 bin leave rank 1 none) waited forever in it. Each rank runs as many
        # forwards as rank 0, the missing ones on rank 0's first batch, whose sums are discarded.
        busiest = math.ceil(math.ceil(len(bins) / acc.num_processes) / P.micro_batch_size)
        batches += [collate([bins[:P.micro_batch_size]])] * (busiest - counted)
    return _evaluate(s.model, s.teacher, batches, acc, P, len(tok), s.head, counted)


def overlong_counts(build_info: dict[str, Any]) -> dict[str, Any]:
    """The overlong policy and how many examples longer than ``seq_len`` it dropped or cut (metrics, Table 6).
    ``drop`` is what the paper's Axolotl does with a sample over its 16,384 tokens (paper mode); the
    default ``error`` stops at the first, naming it (:func:`cdlib.training.sft.apply_overlong`)."""
    n = len(build_info["overlong_ids"])
    policy = build_info["overlong"]
    return {"overlong": policy, "overlong_dropped": n if policy == "drop" else 0,
            "overlong_cut": n if policy == "truncate" else 0}


def budget_label(P: TrainParams) -> str:
    """How long the run trains, as the report prints it (metrics.json ``budget_label``): compute-matched
    (``token_budget``), ``max_steps`` or epoch-based."""
    if P.token_budget:
        return f"compute-matched ({int(P.token_budget):,} tokens)"
    if P.max_steps:
        return f"max_steps {P.max_steps}"
    epochs = float(P.epochs or 1.0)
    return f"epoch-based ({epochs:g} epoch{'s' if epochs != 1 else ''})"


def collect_metrics(s: Setup, prog: Progress, val: dict[str, Any], ckpt: dict[str, Any], t_start: float,
                    save_seconds: float) -> dict[str, Any]:
    """The run's metrics (metrics.json of a train cell): what was trained on what, how long (``budget_label``),
    tokens seen, losses, time, memory, FLOPs and the checkpoint; peaks and counts are reduced over the ranks."""
    import torch

    P, acc, data, st = s.P, s.accelerator, s.data, s.student
    peak, peak_kind = peak_memory(s.on_gpu)
    peak_all = max(float(acc.gather(torch.tensor([peak], device=acc.device)).max()), prog.prior["peak_memory_gb"])
    ranks_finished = int(acc.reduce(torch.ones(1, device=acc.device), "sum"))
    wall = prog.prior["wall_clock_s"] + time.time() - t_start  # a resumed run adds the time up to its state
    world = acc.num_processes
    gpus = world if s.on_gpu else 0
    sup_seen, all_seen, sq = int(prog.totals[0]), int(prog.totals[1]), int(prog.totals[2])
    flops, formula = flops_estimate(st["params"]["flops"], all_seen, st["n_layers"], st["d_attn"], sq, P.method,
                                    s.teacher_params)
    dataset_tokens = sft.section_tokens(data.train)
    step_losses = prog.step_losses
    n_tail = max(1, len(step_losses) // 10)
    teacher = s.teacher is not None
    return {
        "student": P.student, "model_source": data.model_source, "source": P.source, "method": P.method,
        "objective": P.objective, "kl_teacher": P.kl_teacher, "kl_direction": P.kl_direction if teacher else None,
        "kl_weight": P.kl_weight if teacher else None,
        "kl_teacher_model": s.teacher_source if teacher else None,
        **data.extra.get("dte", {}),  # Distilling the Essence: truncate_ratio, kept fractions, loss_on
        "max_row_tokens": max((sum(len(data.train[i]["input_ids"]) for i in b) for mb in s.schedule for b in mb),
                              default=0),  # longest packed row: what activation memory scales with
        "chat_format": data.chat_format, "data": data.data_info, "examples": data.build_info["n_examples"],
        **overlong_counts(data.build_info), "overlong_ids": data.build_info["overlong_ids"][:20],
        "n_train": len(data.train), "n_val": len(data.val),
        "budget_mode": budget_mode(P), "budget_label": budget_label(P), "token_budget": P.token_budget,
        "max_steps": P.max_steps, "epochs": P.epochs, "steps": len(step_losses), "micro_batches": len(s.schedule),
        "epochs_seen": sup_seen / max(1, dataset_tokens["supervised"]),
        "learning_rate": s.lr, "optimizer": s.optimizer_name, "optimizer_requested": P.optimizer,
        "optimizer_note": s.optimizer_note, "tf32": st["tf32"], "liger_kernels": st["liger"],
        "liger_not_covered": st["liger_not_covered"],  # H.3's kernels not applied, with the reason
        "attn_implementation": s.attn, "layout": s.rows.attention,
        "packing": s.rows.packing, "packing_note": s.rows.reason or None, "lora": st["lora"],
        "loss_head": s.head if not teacher else "full (kl)",
        "precision": "bf16" if s.on_gpu and P.bf16 else "fp32",
        "distributed_type": str(acc.distributed_type.value),
        "fsdp_version": getattr(getattr(acc.state, "fsdp_plugin", None), "fsdp_version", None),
        "activation_checkpointing": "fsdp" if st["fsdp_ac"] else "transformers" if P.gradient_checkpointing else None,
        "params_total": st["params"]["total"], "params_trainable": st["params"]["trainable"],
        "trainable_tokens": sup_seen, "total_tokens_seen": all_seen,
        "dataset_tokens": dataset_tokens,  # one pass over the training split, per section
        # one pass over the whole source data (training + validation split): Tables 6 and 11 count these
        # ("source-dataset trainable-token totals ... before the epoch multiplier", paper App. H.4)
        "source_tokens": sft.section_tokens([*data.train, *data.val]),
        "tokens_per_section": _sections_seen(data.train, s.schedule),
        "train_loss": step_losses[-1] if step_losses else None,
        "train_loss_first": step_losses[0] if step_losses else None,
        "train_loss_ema": prog.ema,
        "train_loss_tail_mean": sum(step_losses[-n_tail:]) / n_tail if step_losses else None,
        **val,
        "wall_clock_s": wall, "train_s": prog.train_s, "save_s": save_seconds,
        "tokens_per_s": all_seen / prog.train_s if prog.train_s > 0 else None,
        "device": torch.cuda.get_device_name(0) if s.on_gpu else "cpu", "processes": world,
        "ranks_finished": ranks_finished, "gpus": gpus,
        "gpu_hours": wall / 3600 * gpus, "peak_memory_gb": peak_all, "peak_memory_kind": peak_kind,
        "flops": flops, "flops_formula": formula, "checkpoint": ckpt,
        "resumed_from_step": prog.start_step or None, "save_every": P.save_every,
    }


def run(P: TrainParams, data: Prepared | None = None, progress: bool = True,
        log: Any = print) -> dict[str, Any]:
    """Train the student of ``P`` in this process (one device or one rank of a launch); return the metrics.

    ``data`` reuses a :func:`prepare` result (the notebook shows its audit first). It reads top to bottom:
    set-up (:func:`set_up`), resume (:func:`start_progress`), loop (:func:`train_loop`), validation
    (:func:`validate`), save (:func:`cdlib.training.checkpoint.save`) and metrics (:func:`collect_metrics`).
    Writes ``<out_dir>/loss.jsonl`` (one record per optimizer step: ``step``,
    ``loss``, ``ema``, ``lr``, ``tokens``), the checkpoint (``model/``, ``adapter/``,
    ``base/``) and ``checkpoint.json``. ``log`` receives the audit report and
    progress lines (main process only).

    Every ``P.save_every`` optimizer steps the training state goes to
    ``<out_dir>/resume/`` (:func:`cdlib.training.checkpoint.save_resume`: weights, optimizer, LR scheduler,
    RNG states, step, token totals, EMA and per-step losses). A run that finds a
    complete state there whose :func:`cdlib.training.checkpoint.resume_fingerprint` matches its own resumes
    from it: it skips the micro-batches already trained on, continues the step
    count, the LR schedule and ``loss.jsonl`` (cut back to the state's step, so
    every step has one row), and reports ``resumed_from_step``; its wall-clock and
    train seconds include the time up to the state (not the work lost after it).
    A state written for other params, data or process count is discarded with a
    message naming its directory and what differs, and the run starts from step 0
    (a fresh ``loss.jsonl``). ``resume/`` is deleted once the final model is saved.
    """
    import torch
    from accelerate.utils import set_seed

    t_start = time.time()
    budget_mode(P)  # both budgets at once: an error before anything is loaded
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()  # the peak of this run, not of earlier work in the process
    out = Path(P.out_dir)
    accelerator = make_accelerator(P, on_gpu, out)
    is_main = accelerator.is_main_process
    set_seed(P.seed)
    out.mkdir(parents=True, exist_ok=True)
    tracker = start_tracking(accelerator, P, out)  # None unless P.report_to names one
    say = log if is_main else (lambda *a, **k: None)
    if data is None:
        with accelerator.main_process_first():
            data = prepare(P, is_main=is_main)
    say(data.audit)
    if data.build_info["overlong_ids"]:
        o = overlong_counts(data.build_info)
        say(f"overlong ({o['overlong']}): {len(data.build_info['overlong_ids'])} example(s) longer than seq_len "
            f"{P.seq_len} {'dropped' if o['overlong_dropped'] else 'cut'}, e.g. ids "
            f"{data.build_info['overlong_ids'][:5]}")

    # ---- set-up, resume or start afresh, loop
    s = set_up(P, data, accelerator, on_gpu, say, tracker)
    prog, fingerprint = start_progress(s, out)
    train_loop(s, prog, out, fingerprint, t_start, progress)

    # ---- validation
    val = validate(s)
    if tracker is not None:
        accelerator.log({f"val/{k[4:]}": v for k, v in val.items() if v is not None}, step=len(prog.step_losses))

    # ---- save
    t_save = time.time()
    ckpt = checkpoint.save(s.model, accelerator, data, P, on_gpu)
    if is_main:
        checkpoint.clear_resume(out)  # the final model is saved: nothing left to resume
    save_seconds = time.time() - t_save

    # ---- metrics
    metrics = collect_metrics(s, prog, val, ckpt, t_start, save_seconds)
    say(f"done: {metrics['steps']} steps, loss {metrics['train_loss_first']:.3f} -> {metrics['train_loss']:.3f}, "
        f"val {metrics['val_loss']}, {metrics['trainable_tokens']:,} trainable tokens, {metrics['wall_clock_s']:.0f} s")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def _sections_seen(examples: list[dict[str, Any]], schedule: list[list[list[int]]]) -> dict[str, int]:
    """Tokens per section (total and supervised) over every example occurrence in the run's schedule."""
    per = [sft.section_tokens([ex]) for ex in examples]
    out: dict[str, int] = {}
    for mb in schedule:
        for b in mb:
            for i in b:
                for k, v in per[i].items():
                    out[k] = out.get(k, 0) + v
    return out


def train(P: TrainParams, data: Prepared | None = None, progress: bool = True) -> dict[str, Any]:
    """What the notebook calls: :func:`launch` across the visible GPUs when ``accelerate_config`` is set and
    more than one GPU is visible (and this is not already a launched rank), else :func:`run` in-process."""
    if P.accelerate_config and visible_gpus() > 1 and "LOCAL_RANK" not in os.environ:
        return launch(P)
    return run(P, data=data, progress=progress)


def loss_frame(out_dir: str | Path):
    """The loss curve of a run (``loss.jsonl``) as a polars frame sorted by step."""
    return Store(Path(out_dir) / "loss.jsonl").to_polars().sort("step")


def main(argv: list[str] | None = None) -> int:
    """Worker entry point of a launch: ``python -m cdlib.train params.json``, run on every rank by
    :func:`cdlib.training.launch.launch`. The rank first asks to die with its launcher, so no orphaned
    rank keeps training into the cell directory beside a rerun."""
    die_with_parent()
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m cdlib.train PARAMS.json|yaml", file=sys.stderr)
        return 2
    path = Path(argv[0])
    values = json.loads(path.read_text()) if path.suffix == ".json" else __import__("yaml").safe_load(path.read_text())
    P = validate_params(TrainParams, values, source=str(path))
    metrics = run(P, progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(P.out_dir) / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
