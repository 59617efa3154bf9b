"""Training data for :mod:`cdlib.train`: the input cell's records, the toy student, the examples and the plan.

:func:`load_records` reads a data cell (``traces.jsonl``, ``compressed.jsonl`` or ``truncated.jsonl``,
detected) and skips dropped records and the questions a compressor never answered; :func:`prepare`
builds the SFT examples (:mod:`cdlib.training.sft`), runs the mask audit and makes the seeded validation split
(building a ``toy*`` student with a tokenizer trained on the records first); :func:`plan` packs the examples and
lays out every micro-batch of the run (epochs, ``max_steps`` or a ``token_budget``), and :func:`step_tokens`
gives each optimizer step's global
supervised-token count ahead of time, so no rank reads it back from the device. The collate helpers at
the end turn a micro-batch into tensors on the right device.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdlib.training import checkpoint, losses, sft
from cdlib.training import packing as packlib
from cdlib.params import TrainParams
from cdlib.outputs import dropped, failed, has_checkpoint, read_checkpoint, resolve_model
from cdlib.store import Store, read_upstream

DATA_FILES = ("traces.jsonl", "compressed.jsonl", "truncated.jsonl")
DEFAULT_LR = {"full": 2e-5, "lora": 1e-4}  # paper section 4 / H.3
TOY_LR = 1e-3  # toy students start from random weights: the paper's fine-tuning rates barely move them


class TrainError(ValueError):
    """The training inputs are inconsistent; the message names the file, model or key."""


def is_toy(student: str) -> bool:
    """Whether ``student`` names a tiny model trained from scratch (any name starting with ``toy``)."""
    return student.startswith("toy")


def trained_from_toy(model: str) -> bool:
    """Whether ``model`` is a train cell whose student was a toy student (it keeps the toy learning rate)."""
    if not has_checkpoint(model):
        return False
    return is_toy(str(read_checkpoint(model).get("student") or ""))


def resolve_pretrained(name: str, merge_into: str | Path, what: str = "student") -> str:
    """What ``from_pretrained`` loads for a student or KL teacher named ``name``.

    A train cell directory gives its checkpoint (:func:`cdlib.outputs.resolve_model`);
    a LoRA checkpoint without a merged model is merged into ``merge_into`` once (kept
    there, reused when it exists). Hub ids and model directories are returned as given.
    ``what`` names the parameter in errors.
    """
    from cdlib.tiny import resolve

    name = resolve(name)  # a tiny family name ("tiny-llama", ...) is built once and cached
    if Path(name).is_dir() and not has_checkpoint(name) and (Path(name) / "loss.jsonl").exists():
        raise TrainError(f"{what} {name!r} is a train cell without checkpoint.json: did its training finish?")
    target = resolve_model(name)
    if not target["adapter"]:
        return str(target["model"])
    out = Path(merge_into)
    if not (out / "config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(target["adapter"])
        checkpoint.merge_adapter(target["model"], target["adapter"], out, tokenizer)
    return str(out)


def detect_data_file(data_dir: str | Path) -> Path:
    """The one record file of an input cell: ``traces.jsonl``, ``compressed.jsonl`` or ``truncated.jsonl``."""
    d = Path(data_dir)
    found = [d / f for f in DATA_FILES if (d / f).exists()]
    if not found:
        raise TrainError(f"data dir {d}: none of {', '.join(DATA_FILES)} found")
    if len(found) > 1:
        raise TrainError(f"data dir {d}: several record files ({', '.join(p.name for p in found)}); "
                         "point 'data' at one stage's cell")
    return found[0]


def _check_source(source: str, path: Path) -> None:
    kind = path.name
    if source == "answer_only":
        return  # uses no trace: any cell's questions and answers will do
    # pretrain: a base model's corpus (a generate cell), trained as raw traces are (trace, if any, then answer)
    expected = {"raw": "traces.jsonl", "pretrain": "traces.jsonl", "truncated": "truncated.jsonl"}.get(
        source, "compressed.jsonl")
    if kind != expected:
        raise TrainError(f"source {source!r} expects {expected} but data holds {path}")


def failed_ids(compress_dirs: list[str] | tuple[str, ...]) -> set[str]:
    """Question ids whose compression never came back (:func:`cdlib.outputs.failed`) in any of ``compress_dirs``."""
    out: set[str] = set()
    for d in compress_dirs:
        path = Path(d) / "compressed.jsonl"
        if not path.exists():
            raise TrainError(f"same_questions_as: {d} is not a compress cell (no compressed.jsonl)")
        out |= {r["id"] for r in read_upstream(path, "train") if failed(r)}
    return out


def load_records(data_dir: str | Path, source: str = "raw", limit: int | None = None, seed: int = 0,
                 same_questions_as: list[str] | tuple[str, ...] = ()) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Records of an input cell, failed and dropped ones skipped, optionally a seeded subsample of ``limit``.

    A question is *failed* when its compression never came back (a permanent engine error), in this
    cell or in one of the compress cells ``same_questions_as``: it is left out whatever the source, so
    every run naming the same compress cells trains on the same question ids. A record is dropped
    when its stage said so (:func:`cdlib.outputs.dropped`: flagged with ``drop_flagged``); with the
    paper's protocol flagged records are kept. Returns ``(records, info)``; ``info`` has ``file``,
    ``n_read``, ``n_failed`` (left out as failed), ``n_flagged`` (skipped), ``flags`` (count per flag
    of the skipped), ``n_flagged_kept`` and ``n_used``.
    """
    path = detect_data_file(data_dir)
    _check_source(source, path)
    rows = read_upstream(path, "train")  # refuses an empty store, or one cut since its cell finished
    gone = failed_ids(same_questions_as) | {r["id"] for r in rows if failed(r)}
    n_read = len(rows)
    rows = [r for r in rows if r["id"] not in gone]
    kept = [r for r in rows if not dropped(r)]
    flags: dict[str, int] = {}
    for r in rows:
        if dropped(r):
            flags[str(r["flag"])] = flags.get(str(r["flag"]), 0) + 1
    if limit is not None and len(kept) > limit:
        kept = random.Random(seed).sample(kept, limit)
    if not kept:
        raise TrainError(f"{path}: no unflagged records to train on ({n_read} read, {n_read - len(rows)} failed)")
    return kept, {"file": str(path), "n_read": n_read, "n_failed": n_read - len(rows),
                  "n_flagged": sum(flags.values()), "flags": flags,
                  "n_flagged_kept": sum(r.get("flag") is not None for r in kept), "n_used": len(kept)}


def toy_corpus(records: list[dict[str, Any]]) -> list[str]:
    """ChatML texts of the records (prompt, think block, answer) to train a toy student's tokenizer on."""
    from cdlib.prompts import build_prompt
    from cdlib.tiny import IM_END, IM_START, THINK_END, THINK_START

    texts = []
    for r in records:
        prompt = r["prompt"] if isinstance(r.get("prompt"), str) else build_prompt(r)
        texts.append(f"{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n{THINK_START}\n"
                     f"{r.get('reasoning') or ''}\n{THINK_END}\n\n{r.get('answer') or ''}{IM_END}\n")
    return texts


def tokenizer_records(data_dir: str | Path) -> list[dict[str, Any]]:
    """Unflagged records of any input cell (traces, compressed or truncated) to train a toy tokenizer on.

    Pointing every toy student of a grid at the same cell (the generate cell) gives
    them one vocabulary, as pretrained students share theirs: output token counts
    then compare across sources, and any of them can be another's KL teacher.
    """
    path = detect_data_file(data_dir)
    rows = [r for r in Store(path).read() if r.get("flag") is None]
    if not rows:
        raise TrainError(f"tiny_tokenizer_data {path}: no unflagged records to train a tokenizer on")
    return rows


def make_toy_student(out_dir: str | Path, records: list[dict[str, Any]], P: TrainParams,
                     tokenizer_from: str | None = None) -> Path:
    """A tiny Qwen2 model from scratch in ``out_dir`` (HF layout); idempotent when it exists.

    The tokenizer is trained on the records (:func:`toy_corpus`) with
    ``P.tiny_vocab`` entries, or copied from ``tokenizer_from`` (the KL teacher,
    which must share the student's vocabulary). Heads have dimension 64 (vLLM on CPU).
    """
    from cdlib.tiny import make_tiny_model

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        return out
    heads = max(1, P.tiny_hidden // 64)
    make_tiny_model(out, corpus=toy_corpus(records), vocab_size=P.tiny_vocab, hidden_size=P.tiny_hidden,
                    num_layers=P.tiny_layers, num_heads=heads, seed=P.seed)
    if tokenizer_from is not None:
        # same architecture, re-made around the teacher's tokenizer so their logits line up
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_from)
        config = AutoConfig.from_pretrained(out)
        eos = tok.convert_tokens_to_ids(tok.eos_token) if tok.eos_token else config.eos_token_id
        pad = tok.convert_tokens_to_ids(tok.pad_token) if tok.pad_token else eos
        config.vocab_size, config.eos_token_id, config.pad_token_id, config.bos_token_id = len(tok), eos, pad, pad
        torch.manual_seed(P.seed)
        model = AutoModelForCausalLM.from_config(config)
        for f in out.iterdir():
            if f.is_file() and f.name != "config.json":
                f.unlink()
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, pad
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out


@dataclass
class Prepared:
    """Everything built before training: tokenizer, examples, the audit and where the base model is."""

    model_source: str  # what from_pretrained loads: hub id or directory
    tokenizer: Any
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    audit: str
    data_info: dict[str, Any]
    build_info: dict[str, Any]
    chat_format: str
    extra: dict[str, Any] = field(default_factory=dict)


def split_validation(examples: list[dict[str, Any]], fraction: float,
                     seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Seeded train/validation split by example: ``round(fraction * n)`` (at least 1 when fraction > 0) held out."""
    if fraction <= 0 or len(examples) < 2:
        return list(examples), []
    n_val = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return ([ex for i, ex in enumerate(examples) if i not in held],
            [ex for i, ex in enumerate(examples) if i in held])


def prepare(P: TrainParams, *, is_main: bool = True, audit_show: int = 2) -> Prepared:
    """Read the records, make or find the student, build and audit the SFT examples, split off validation.

    A toy student is created under ``<out_dir>/base/`` (by the main process; call
    this inside ``accelerator.main_process_first()`` when distributed). Raises
    :class:`cdlib.training.sft.AuditError` when the mask audit fails.
    """
    from transformers import AutoTokenizer

    records, data_info = load_records(P.data, P.source, P.limit, P.seed, P.same_questions_as)
    out = Path(P.out_dir)
    teacher = resolve_pretrained(P.kl_teacher, out / "kl_teacher", "kl_teacher") if P.objective == "kl" else None
    if is_toy(P.student):
        corpus = tokenizer_records(P.tiny_tokenizer_data) if P.tiny_tokenizer_data else records
        source = str(make_toy_student(out / "base", corpus, P, tokenizer_from=teacher))
    else:
        source = resolve_pretrained(P.student, out / "base", "student")
    tokenizer = AutoTokenizer.from_pretrained(source)
    examples, build_info = sft.build_dataset(records, tokenizer, P, chat_template_kwargs=P.chat_template_kwargs)
    report = sft.audit(examples, tokenizer, n_show=audit_show, max_len=P.seq_len,
                       allow_cut=P.overlong == "truncate")
    train_ex, val_ex = split_validation(examples, P.val_fraction, P.seed)
    extra = {"kl_teacher": teacher, "dte": dte_accounting(records, examples, tokenizer, P)}
    return Prepared(model_source=source, tokenizer=tokenizer, train=train_ex, val=val_ex, audit=report,
                    data_info=data_info, build_info=build_info, chat_format=examples[0]["format"], extra=extra)


def dte_accounting(records: list[dict[str, Any]], examples: list[dict[str, Any]], tokenizer: Any,
                   P: TrainParams) -> dict[str, Any]:
    """Distilling the Essence's bookkeeping: the nominal kept fraction and what the cut really kept.

    ``kept_fraction`` is ``truncate_ratio`` (1.0 untruncated); with a ratio set, the
    records are built once more uncut to measure ``kept_token_fraction`` (tokens of
    the cut examples / uncut, whole sequences) and ``kept_cot_fraction`` (the same
    for the reasoning span); ``loss_on`` is the supervised sections joined by ``+``.
    """
    info: dict[str, Any] = {"truncate_ratio": P.truncate_ratio,
                            "truncate_span": P.truncate_span if P.truncate_ratio is not None else None,
                            "kept_fraction": P.truncate_ratio if P.truncate_ratio is not None else 1.0,
                            "loss_on": "+".join(P.loss_on), "kept_token_fraction": 1.0, "kept_cot_fraction": 1.0}
    if P.truncate_ratio is None:
        return info
    full, _ = sft.build_examples(records, tokenizer, source=P.source, chat_format=P.chat_format, loss_on=P.loss_on,
                                 chat_template_kwargs=P.chat_template_kwargs, answer_only_think=P.answer_only_think)
    by_id = {ex["id"]: ex for ex in full}
    cut_all = cut_cot = full_all = full_cot = 0
    for ex in examples:
        ref = by_id[ex["id"]]
        cut_all += len(ex["input_ids"])
        full_all += len(ref["input_ids"])
        cut_cot += ex["spans"]["cot"][1] - ex["spans"]["cot"][0]
        full_cot += ref["spans"]["cot"][1] - ref["spans"]["cot"][0]
    info["kept_token_fraction"] = cut_all / full_all if full_all else None
    info["kept_cot_fraction"] = cut_cot / full_cot if full_cot else None
    return info


def budget_mode(P: TrainParams) -> str:
    """``"tokens"`` (token_budget), ``"steps"`` (max_steps) or ``"epochs"``; both budgets at once is an error."""
    if P.token_budget is not None and P.max_steps is not None:
        raise TrainError("set either token_budget or max_steps, not both")
    return "tokens" if P.token_budget is not None else "steps" if P.max_steps is not None else "epochs"


def plan(examples: list[dict[str, Any]], P: TrainParams, world_size: int = 1,
         packing: bool | None = None) -> list[list[list[int]]]:
    """The micro-batches of the whole run, each a list of bins (lists of example indices).

    Bins come from :func:`cdlib.training.packing.pack` at ``seq_len`` (one example per bin
    when ``packing`` is off, or ``packing=False`` is passed because the model refuses
    it: :func:`cdlib.training.packing.packed_layout`) and are grouped ``micro_batch_size`` at a time. Each
    pass over the data reshuffles the bins with ``seed + pass``. The run is

    * ``epochs``: ``ceil(epochs * micro-batches per pass)`` micro-batches;
    * ``steps``: ``max_steps * grad_accum * world_size`` micro-batches;
    * ``tokens``: micro-batches until ``token_budget`` supervised tokens are reached.
    """
    lengths = [len(ex["input_ids"]) for ex in examples]
    packing = P.packing if packing is None else packing  # False where the model refuses packing
    bins = packlib.pack(lengths, P.seq_len) if packing else [[i] for i in range(len(examples))]
    sup = [sft.supervised_count(ex) for ex in examples]
    per_pass = math.ceil(len(bins) / P.micro_batch_size)
    mode = budget_mode(P)
    if mode == "tokens" and sum(sup) == 0:
        raise TrainError("token_budget set but the examples have no supervised tokens")
    out: list[list[list[int]]] = []
    seen = 0
    for cycle in range(10**9):
        order = list(bins)
        random.Random(P.seed + cycle).shuffle(order)
        for k in range(0, len(order), P.micro_batch_size):
            mb = order[k:k + P.micro_batch_size]
            if mode == "epochs" and len(out) >= math.ceil(P.epochs * per_pass):
                return out
            if mode == "steps" and len(out) >= P.max_steps * P.grad_accum * world_size:
                return out
            if mode == "tokens" and seen >= P.token_budget:
                return out
            out.append(mb)
            seen += sum(sup[i] for b in mb for i in b)
    return out  # pragma: no cover


def step_tokens(examples: list[dict[str, Any]], schedule: list[list[list[int]]], world: int, grad_accum: int,
                even_batches: bool = True) -> tuple[list[list[int]], list[int]]:
    """Supervised tokens planned before training: per rank, its micro-batches' counts in the order it
    trains them; per optimizer step, the count over every rank (the loss's denominator).

    Rank ``r`` trains the micro-batches accelerate's ``BatchSamplerShard`` gives it (``r``,
    ``r + world``, ..., wrapping round to the first ones with ``even_batches``); every rank computes
    the same plan, so no step all-reduces its token count (with one process nothing is reduced at all).
    """
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    counts = [sum(sft.supervised_count(examples[i]) for b in mb for i in b) for mb in schedule]
    base = BatchSampler(SequentialSampler(range(len(schedule))), batch_size=1, drop_last=False)
    order = [list(range(len(schedule)))] if world == 1 else [
        [b[0] for b in BatchSamplerShard(base, num_processes=world, process_index=r, even_batches=even_batches)]
        for r in range(world)]
    per_rank = [[counts[j] for j in seq] for seq in order]
    steps = max(1, math.ceil(max(len(seq) for seq in order) / grad_accum))
    per_step = [sum(sum(c[s * grad_accum:(s + 1) * grad_accum]) for c in per_rank) for s in range(steps)]
    return per_rank, per_step


def check_same_tokenizer(student_tok: Any, teacher_tok: Any, student: str, teacher: str) -> None:
    """Raise :class:`TrainError` naming both models unless their vocabularies are identical."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv == tv:
        return
    only_s = sorted(set(sv) - set(tv))[:5]
    only_t = sorted(set(tv) - set(sv))[:5]
    moved = sum(1 for k in set(sv) & set(tv) if sv[k] != tv[k])
    raise TrainError(
        f"objective 'kl' needs the student and the teacher to share a tokenizer: student {student!r} has "
        f"{len(sv)} tokens, teacher {teacher!r} has {len(tv)}; only in student: {only_s}, only in teacher: "
        f"{only_t}, {moved} shared tokens with different ids")


class MicroBatches:
    """Map-style dataset over planned micro-batches; the DataLoader collates them with ``cdlib.training.packing``."""

    def __init__(self, schedule: list[list[list[int]]]):
        self.schedule = schedule

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, i: int) -> list[list[int]]:
        return self.schedule[i]


def collate_fn(examples: list[dict[str, Any]], rows: packlib.Layout, pad_id: int):
    """Collate planned micro-batches in ``rows`` (:func:`cdlib.training.packing.packed_layout`), on the host,
    before anything reaches the device: besides the model inputs, ``example_lengths`` (for accounting),
    ``supervised_rows`` (:func:`cdlib.training.losses.supervised_rows`, the positions the loss selects) and
    ``n_supervised`` (their count, a python int) ride along and never reach the model. Packed sdpa/eager rows come
    without their ``L x L`` block mask: the loop derives it on the device (:func:`with_mask`)."""
    def collate(items: list[list[list[int]]]) -> dict[str, Any]:
        bins = [b for item in items for b in item]
        batch = packlib.collate(examples, bins, rows, pad_id, build_mask=False)
        batch["example_lengths"] = [len(examples[i]["input_ids"]) for b in bins for i in b]
        batch["supervised_rows"] = losses.supervised_rows(batch["labels"])
        batch["n_supervised"] = int(batch["supervised_rows"].numel())
        return batch

    return collate


def with_mask(batch: dict[str, Any], rows: packlib.Layout) -> dict[str, Any]:
    """The batch with its packed block mask, derived from ``position_ids`` on their device
    (:func:`cdlib.training.packing.block_mask_from_positions`) when the collate left it out."""
    if rows.packing and rows.attention != "varlen" and "attention_mask" not in batch:
        return {**batch, "attention_mask": packlib.block_mask_from_positions(batch["position_ids"], rows)}
    return batch


def to_device(batch: dict[str, Any], device: Any, rows: packlib.Layout | None = None) -> dict[str, Any]:
    from accelerate.utils import send_to_device

    batch = send_to_device(batch, device)
    return with_mask(batch, rows) if rows is not None else batch
