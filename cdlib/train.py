"""Stage 4: student fine-tuning (paper section 3.3, 4, Appendix C and H.3) and MPD's KL objective.

:func:`run` trains one student on one data cell, in this process (one device, or
one rank of an ``accelerate launch``):

1. :func:`load_records` reads the input cell (``traces.jsonl``, ``compressed.jsonl``
   or ``truncated.jsonl``, detected) and skips flagged records;
2. the student is prepared: ``toy*`` names build a tiny Qwen2 model from scratch
   with a tokenizer trained on the records (``<out_dir>/base/``), anything else is
   a hub id, a local directory or a train cell directory (its checkpoint, a LoRA
   adapter merged into ``<out_dir>/base/`` first), so a student can start from a
   trained one; ``kl_teacher`` is resolved the same way (:func:`resolve_pretrained`);
3. :func:`prepare` builds the SFT examples (``cdlib.sft``), runs the mask audit and
   makes the seeded validation split;
4. :func:`plan` packs the examples (best-fit-decreasing at ``seq_len``) and lays
   out the micro-batches of the whole run: by epochs, ``max_steps`` or a
   ``token_budget`` of supervised tokens (compute-matched runs, cycling the data);
5. the loop: transformers + peft + accelerate; the loss of an optimizer step is
   the mean over every supervised token of its micro-batches on every rank (the
   sum of token losses divided by the step's global token count), not a mean of
   per-micro-batch means, so packed rows with few supervised tokens do not weigh
   as much as full ones; every ``save_every`` steps the training state goes to
   ``<out_dir>/resume/`` and a rerun of a killed cell resumes from it (:func:`run`,
   :func:`cdlib.checkpoint.save_resume`); the KL objective is computed over chunks of
   ``kl_chunk_tokens`` positions (:func:`cdlib.losses.kl_sum`);
6. the checkpoint is saved in HF layout (``model/``, ``adapter/``, ``base/``) with
   ``checkpoint.json`` naming what vLLM should load (``cdlib.evaluate.resolve_model``,
   :func:`cdlib.checkpoint.save`), the loss curve in ``loss.jsonl``, and the metrics
   (budget label, tokens, wall-clock, GPU-hours, peak memory, FLOPs estimate) returned.

The losses live in ``cdlib.losses`` and the resumable state, saving and LoRA merges in
``cdlib.checkpoint``; :func:`run` reads top to bottom through :func:`set_up`,
:func:`start_progress`, :func:`train_loop` (:func:`train_step` per optimizer step),
:func:`validate`, :func:`cdlib.checkpoint.save` and :func:`collect_metrics`.

:func:`train` is what the notebook calls: it runs in-process, or launches
``accelerate launch`` across the visible GPUs when ``accelerate_config`` is set
and more than one GPU is visible (:func:`launch`). ``python -m cdlib.train
params.json`` is the worker entry point of such a launch.

Packed batches come from ``cdlib.pack`` and carry ``use_cache=False``; they are
passed to the model unchanged (without it transformers 5.19 builds a cache and
ignores the packed ``position_ids``, attending across examples). Whether a model
is packed at all is :func:`cdlib.pack.packed_layout`'s answer for its config and
attention path: linear-attention models (Qwen3.5) train one example per row on
sdpa/eager, with the reason in the log and in the metrics (``layout``, ``packing``,
``packing_note``), and packed on flash with those layers run example by example;
sliding-window models (gpt-oss, eager) get a block mask per layer type. The paper's
families also come as tiny random models (``student: tiny-llama``, ...; ``cdlib.tiny``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdlib import checkpoint, losses, sft
from cdlib import pack as packlib
from cdlib.params import TrainParams
from cdlib.store import Store

DATA_FILES = ("traces.jsonl", "compressed.jsonl", "truncated.jsonl")
EMA_ALPHA = 0.08  # paper Figure 3
DEFAULT_LR = {"full": 2e-5, "lora": 1e-4}  # paper section 4 / H.3
TOY_LR = 1e-3  # toy students start from random weights: the paper's fine-tuning rates barely move them
METRICS_FILE = "train_metrics.json"  # written by the worker entry point, read back by launch()


class TrainError(ValueError):
    """The training inputs are inconsistent; the message names the file, model or key."""


def is_toy(student: str) -> bool:
    """Whether ``student`` names a tiny model trained from scratch (any name starting with ``toy``)."""
    return student.startswith("toy")


def _trained_from_toy(model: str) -> bool:
    """Whether ``model`` is a train cell whose student was a toy student (it keeps the toy learning rate)."""
    ckpt = Path(model) / "checkpoint.json"
    if not ckpt.exists():
        return False
    return is_toy(str(json.loads(ckpt.read_text()).get("student") or ""))


def resolve_pretrained(name: str, merge_into: str | Path, what: str = "student") -> str:
    """What ``from_pretrained`` loads for a student or KL teacher named ``name``.

    A train cell directory gives its checkpoint (:func:`cdlib.evaluate.resolve_model`);
    a LoRA checkpoint without a merged model is merged into ``merge_into`` once (kept
    there, reused when it exists). Hub ids and model directories are returned as given.
    ``what`` names the parameter in errors.
    """
    from cdlib.evaluate import resolve_model
    from cdlib.tiny import resolve

    name = resolve(name)  # a tiny family name ("tiny-llama", ...) is built once and cached
    if Path(name).is_dir() and not (Path(name) / "checkpoint.json").exists() and (Path(name) / "loss.jsonl").exists():
        raise TrainError(f"{what} {name!r} is a train cell without checkpoint.json: did its training finish?")
    target = resolve_model(name)
    if not target["adapter"]:
        return str(target["model"])
    out = Path(merge_into)
    if not (out / "config.json").exists():
        from transformers import AutoTokenizer

        checkpoint.merge_adapter(target["model"], target["adapter"], out, AutoTokenizer.from_pretrained(target["adapter"]))
    return str(out)


# --------------------------------------------------------------------------- data


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
    expected = {"raw": "traces.jsonl", "truncated": "truncated.jsonl"}.get(source, "compressed.jsonl")
    if kind != expected:
        raise TrainError(f"source {source!r} expects {expected} but data holds {path}")


def load_records(data_dir: str | Path, source: str = "raw", limit: int | None = None,
                 seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Records of an input cell, dropped ones skipped, optionally a seeded subsample of ``limit``.

    A record is dropped when its stage said so (``cdlib.compress.dropped``: flagged
    with ``drop_flagged``); with the paper's protocol flagged records are kept.
    Returns ``(records, info)``; ``info`` has ``file``, ``n_read``, ``n_flagged``
    (skipped), ``flags`` (count per flag of the skipped), ``n_flagged_kept`` and ``n_used``.
    """
    from cdlib.compress import dropped

    path = detect_data_file(data_dir)
    _check_source(source, path)
    rows = Store(path).read()
    kept = [r for r in rows if not dropped(r)]
    flags: dict[str, int] = {}
    for r in rows:
        if dropped(r):
            flags[str(r["flag"])] = flags.get(str(r["flag"]), 0) + 1
    if limit is not None and len(kept) > limit:
        kept = random.Random(seed).sample(kept, limit)
    if not kept:
        raise TrainError(f"{path}: no unflagged records to train on ({len(rows)} read)")
    return kept, {"file": str(path), "n_read": len(rows), "n_flagged": sum(flags.values()), "flags": flags,
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
    :class:`cdlib.sft.AuditError` when the mask audit fails.
    """
    from transformers import AutoTokenizer

    records, data_info = load_records(P.data, P.source, P.limit, P.seed)
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


# --------------------------------------------------------------------------- plan


def budget_mode(P: TrainParams) -> str:
    """``"tokens"`` (token_budget), ``"steps"`` (max_steps) or ``"epochs"``; both budgets at once is an error."""
    if P.token_budget is not None and P.max_steps is not None:
        raise TrainError("set either token_budget or max_steps, not both")
    return "tokens" if P.token_budget is not None else "steps" if P.max_steps is not None else "epochs"




def plan(examples: list[dict[str, Any]], P: TrainParams, world_size: int = 1,
         packing: bool | None = None) -> list[list[list[int]]]:
    """The micro-batches of the whole run, each a list of bins (lists of example indices).

    Bins come from :func:`cdlib.pack.pack` at ``seq_len`` (one example per bin
    when ``packing`` is off, or ``packing=False`` is passed because the model refuses
    it: :func:`cdlib.pack.packed_layout`) and are grouped ``micro_batch_size`` at a time. Each
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


# --------------------------------------------------------------------------- models


def attention_layout(P: TrainParams, on_gpu: bool, source: str | None = None) -> tuple[str, str]:
    """``(attn_implementation, collate layout)``: flash varlen when available on GPU, sdpa 4D masks otherwise.

    With ``source`` (the model to load), ``auto`` falls back to ``eager`` where the model's class
    supports neither (transformers refuses sdpa and flash-attention 2 for gpt-oss, whose sinks need
    eager or a sink-aware kernel). Whether the rows may be packed is :func:`cdlib.pack.packed_layout`'s.
    """
    import importlib.util

    impl = P.attn_implementation
    if impl == "auto":
        impl = "flash_attention_2" if on_gpu and importlib.util.find_spec("flash_attn") else "sdpa"
        if source is not None and not _supports_attention(source, impl):
            impl = "eager"
    return impl, {"flash_attention_2": "flash", "sdpa": "sdpa", "eager": "eager"}[impl]


def _supports_attention(source: str, impl: str) -> bool:
    """Whether the causal-LM class of the model at ``source`` accepts ``impl`` (sdpa / flash_attention_2)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cls = AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(source))]
    except (KeyError, OSError, ValueError):
        return True  # unknown here: let from_pretrained decide
    if impl == "sdpa":
        return bool(getattr(cls, "_supports_sdpa", True))
    compatible = getattr(cls, "_compatible_flash_implementations", None)
    return bool(getattr(cls, "_supports_flash_attn", True)) and (not compatible or impl in compatible)


def lora_targets(model: Any, targets: str | list[str], family: str | None = None) -> dict[str, Any]:
    """Which of the LoRA ``targets`` (module names, as peft matches them) a model has, before peft runs.

    ``targets`` may also be peft's ``"all-linear"`` (every ``nn.Linear`` but the output head) or a
    regular expression over full module names (reported by the leaf names it selects).

    Returns ``targets``, ``adapted`` (target -> number of modules it matches), ``unmatched`` (targets
    matching no module: e.g. gpt-oss's fused experts have no gate/up/down_proj modules) and
    ``not_adapted``: the weight matrices no target reaches, as ``module.parameter`` patterns (Qwen3.5's
    linear-attention projections ``in_proj_qkv.weight``, ..., gpt-oss's ``experts.gate_up_proj``),
    embeddings and the output head left out. ``family`` only names the model in messages.
    """
    import torch

    skip = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    if isinstance(targets, str):  # "all-linear", or a regex peft matches against full module names
        import re

        pattern = targets

        def chosen(name: str, module: Any) -> bool:
            if pattern == "all-linear":
                return isinstance(module, torch.nn.Linear) and id(module) not in skip
            return re.fullmatch(pattern, name) is not None

        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if chosen(n, m)})
    leaves: dict[str, int] = {}
    for name, _ in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        leaves[leaf] = leaves.get(leaf, 0) + 1
    adapted = {t: leaves[t] for t in targets if t in leaves}
    unmatched = [t for t in targets if t not in leaves]
    not_adapted: set[str] = set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if id(module) in skip or leaf in adapted or isinstance(module, torch.nn.Embedding):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.ndim >= 2:
                not_adapted.add(f"{leaf}.{pname}")
    return {"family": family, "targets": list(targets), "adapted": adapted, "unmatched": unmatched,
            "not_adapted": sorted(not_adapted)}


def layout_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """What a run's metrics say about its rows and adapters, for the notebook: the row layout, whether
    rows were packed and why not, and for LoRA the modules with adapters (count per target), the
    adapter parameters, the targets that matched nothing and the weights left without adapters."""
    lora = metrics.get("lora") or {}
    return {"attn_implementation": metrics.get("attn_implementation"), "layout": metrics.get("layout"),
            "packing": metrics.get("packing"), "packing_note": metrics.get("packing_note"),
            "lora_adapted": lora.get("adapted"), "lora_adapter_modules": lora.get("adapter_modules"),
            "lora_adapter_params": lora.get("adapter_params"), "lora_unmatched": lora.get("unmatched"),
            "lora_not_adapted": lora.get("not_adapted")}


def warn_lora_targets(info: dict[str, Any], model_name: str) -> list[str]:
    """Warnings (also issued with :mod:`warnings`) for LoRA targets that match nothing in the model."""
    import warnings

    messages = [f"LoRA target module {t!r} matches no module of {model_name} ({info.get('family') or 'model'}); "
                f"it gets no adapter (weights without adapters: {', '.join(info['not_adapted']) or 'none'})"
                for t in info["unmatched"]]
    for m in messages:
        warnings.warn(m, stacklevel=2)
    return messages


def _load_causal_lm(source: str, dtype: Any, attn: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn)


def count_params(model: Any) -> dict[str, int]:
    """``total`` (unique), ``trainable`` and ``flops`` parameters (total minus an untied input embedding)."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    tied = out is not None and emb is not None and out.weight is emb.weight
    untied_emb = 0 if tied or emb is None else emb.weight.numel()
    return {"total": total, "trainable": trainable, "flops": total - untied_emb}


def make_optimizer(params: Any, P: TrainParams, lr: float, on_gpu: bool,
                   sharded: bool = False) -> tuple[Any, str, str | None]:
    """``P.optimizer`` as transformers names it (paper H.3); returns (optimizer, class used, why not the one asked).

    ``adamw_bnb_8bit`` (alias ``adamw_8bit``): bitsandbytes' 8-bit AdamW (the paper's LoRA runs);
    ``adamw_torch_8bit``: torchao's 8-bit AdamW (the paper's 0.8B full runs; block size 256 as
    transformers uses it); ``adamw``: torch AdamW. Both 8-bit ones need a CUDA GPU and their package:
    without them torch AdamW runs and the third value says why (the run prints it and records it in
    its metrics). ``sharded`` (FSDP): bitsandbytes' 8-bit states are not written for FSDP2's DTensor
    parameters, so torch AdamW (sharding already divides the states by the GPUs); torchao's are.
    """
    import importlib.util

    import torch

    params = [p for p in params if p.requires_grad]
    asked, note = P.optimizer, None
    package = {"adamw_8bit": "bitsandbytes", "adamw_bnb_8bit": "bitsandbytes", "adamw_torch_8bit": "torchao"}.get(asked)
    if package is not None:
        if not on_gpu:
            note = f"optimizer {asked!r} ({package} 8-bit AdamW) needs a CUDA GPU: torch AdamW instead"
        elif importlib.util.find_spec(package) is None:
            note = f"optimizer {asked!r}: {package} is not installed (the 'gpu' extra): torch AdamW instead"
        elif package == "bitsandbytes" and sharded:
            note = (f"optimizer {asked!r}: bitsandbytes' 8-bit states do not take FSDP2's sharded parameters: "
                    "torch AdamW instead")
        elif package == "bitsandbytes":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=P.weight_decay), "bitsandbytes.AdamW8bit", None
        else:
            from torchao.optim import AdamW8bit

            return AdamW8bit(params, lr=lr, weight_decay=P.weight_decay, block_size=256), "torchao.AdamW8bit", None
    return torch.optim.AdamW(params, lr=lr, weight_decay=P.weight_decay), "torch.AdamW", note


def set_tf32(on: bool) -> bool | None:
    """TF32 for float32 matmuls and cuDNN convolutions on a CUDA GPU (paper H.3: "BF16 mixed precision with
    TF32 enabled"); returns the setting, None without CUDA (nothing is changed). Process-wide, as in torch."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.set_float32_matmul_precision("high" if on else "highest")
    torch.backends.cudnn.allow_tf32 = on
    return on


def apply_liger(model: Any, on: bool, on_gpu: bool) -> str | None:
    """Paper H.3's Liger plugin on the loaded model (fused RMSNorm, RoPE, SwiGLU/GLU kernels, patched in place by
    liger-kernel for the model's type); returns what was done or why not (recorded in the metrics), None when off.
    The loss head is ``loss_head``'s business (Cut Cross-Entropy or Liger's fused linear cross-entropy)."""
    import importlib.util

    if not on:
        return None
    if not on_gpu:
        return "off: needs a CUDA GPU"
    if importlib.util.find_spec("liger_kernel") is None:
        return "off: liger-kernel is not installed (the 'gpu' extra)"
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"off: liger-kernel has no kernels for model type {model_type!r}"
    _apply_liger_kernel_to_instance(model=model, rms_norm=True, rope=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return f"on ({model_type}: rms_norm, rope, swiglu)"


def flops_estimate(n_params: int, tokens: int, n_layers: int, d_attn: int, sq_lengths: int, method: str,
                   teacher_params: int = 0) -> tuple[float, str]:
    """Training FLOPs: dense ``k*N*D`` plus causal attention ``k*n_layers*d_attn*sum(L^2)``, teacher forwards.

    ``k`` = 6 for full fine-tuning (forward 2, backward 4) and 4 for LoRA (no
    gradients of the frozen weights). Attention per example of length ``L``:
    QK^T and AV over the causal half, ``2*L^2*d_attn`` FLOPs per layer forward.
    A KL teacher adds its forward, ``2*N_teacher*D``. Recomputation by gradient
    checkpointing is not counted (model FLOPs, not hardware FLOPs).
    """
    k = 4 if method == "lora" else 6
    value = k * n_params * tokens + k * n_layers * d_attn * sq_lengths + 2 * teacher_params * tokens
    formula = f"{k}*N*D + {k}*n_layers*d_attn*sum(L_example^2)" + (" + 2*N_teacher*D" if teacher_params else "")
    return float(value), formula


# --------------------------------------------------------------------------- loop


class _MicroBatches:
    """Map-style dataset over planned micro-batches; the DataLoader collates them with ``cdlib.pack``."""

    def __init__(self, schedule: list[list[list[int]]]):
        self.schedule = schedule

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, i: int) -> list[list[int]]:
        return self.schedule[i]


def _collate_fn(examples: list[dict[str, Any]], rows: packlib.Layout, pad_id: int):
    """Collate planned micro-batches in ``rows`` (:func:`cdlib.pack.packed_layout`), on the host, before
    anything reaches the device: besides the model inputs, ``example_lengths`` (for accounting),
    ``supervised_rows`` (:func:`cdlib.losses.supervised_rows`, the positions the loss selects) and ``n_supervised``
    (their count, a python int) ride along and never reach the model. Packed sdpa/eager rows come
    without their ``L x L`` block mask: the loop derives it on the device (:func:`_with_mask`)."""
    def collate(items: list[list[list[int]]]) -> dict[str, Any]:
        bins = [b for item in items for b in item]
        batch = packlib.collate(examples, bins, rows, pad_id, build_mask=False)
        batch["example_lengths"] = [len(examples[i]["input_ids"]) for b in bins for i in b]
        batch["supervised_rows"] = losses.supervised_rows(batch["labels"])
        batch["n_supervised"] = int(batch["supervised_rows"].numel())
        return batch

    return collate


def _with_mask(batch: dict[str, Any], rows: packlib.Layout) -> dict[str, Any]:
    """The batch with its packed block mask, derived from ``position_ids`` on their device
    (:func:`cdlib.pack.block_mask_from_positions`) when the collate left it out."""
    if rows.packing and rows.attention != "flash" and "attention_mask" not in batch:
        return {**batch, "attention_mask": packlib.block_mask_from_positions(batch["position_ids"], rows)}
    return batch






def _peak_memory(on_gpu: bool) -> tuple[float, str]:
    if on_gpu:
        import torch

        return torch.cuda.max_memory_allocated() / 2**30, "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak RSS (resource.ru_maxrss)"


def _evaluate(model: Any, teacher: Any, batches: list[dict[str, Any]], accelerator: Any, P: TrainParams,
              vocab: int, head: str = "full") -> dict[str, float | None]:
    """Token-weighted validation cross-entropy (and KL for objective 'kl') over this rank's batches, reduced."""
    import torch

    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for batch in batches:
            batch = _to_device(batch, accelerator.device)
            if teacher is None:
                ce, n = losses.sft_loss(model, accelerator.unwrap_model(model), batch, head, P.loss_chunk_tokens)
            else:
                logits = model(**losses.model_inputs(batch)).logits
                ce, n = losses.cross_entropy_sum(logits, batch["labels"], batch.get("supervised_rows"))
            totals[0] += ce.detach()  # summed on the device, read once at the end
            totals[2] += n
            if teacher is not None:
                t_logits = teacher(**losses.model_inputs(batch)).logits
                kl, _ = losses.kl_sum(logits, t_logits, batch["labels"], P.kl_direction, vocab, P.kl_chunk_tokens,
                               batch.get("supervised_rows"))
                totals[1] += kl.detach()
    model.train()
    totals = accelerator.reduce(totals, "sum")
    n = float(totals[2])
    if n == 0:
        return {"val_loss": None, "val_kl": None, "val_tokens": 0}
    return {"val_loss": float(totals[0]) / n, "val_kl": (float(totals[1]) / n) if teacher is not None else None,
            "val_tokens": int(n)}


def _to_device(batch: dict[str, Any], device: Any, rows: packlib.Layout | None = None) -> dict[str, Any]:
    from accelerate.utils import send_to_device

    batch = send_to_device(batch, device)
    return _with_mask(batch, rows) if rows is not None else batch




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
    head: str  # the SFT loss head (cdlib.losses.resolve)
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
    prior: dict[str, float] = field(default_factory=lambda: {"wall_clock_s": 0.0, "train_s": 0.0, "peak_memory_gb": 0.0})
    train_s: float = 0.0


def make_accelerator(P: TrainParams, on_gpu: bool, out: Path) -> Any:
    """The run's ``Accelerator``: bf16 autocast on a GPU with ``P.bf16``, gloo on CPU, ``P.report_to``'s tracker.
    On a GPU batches come from pinned memory and are copied without waiting for the GPU (non_blocking)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(mixed_precision="bf16" if on_gpu and P.bf16 else "no", cpu=not on_gpu,  # cpu: torchrun ranks use gloo
                       dataloader_config=DataLoaderConfiguration(non_blocking=on_gpu),
                       log_with=None if P.report_to == "none" else P.report_to, project_dir=str(out / "trackers"))


def load_student(P: TrainParams, data: Prepared, accelerator: Any, on_gpu: bool, say: Any) -> tuple[Any, dict[str, Any]]:
    """The student model ready for its wrapper (kernels, gradient checkpointing, packed layout, LoRA adapters)
    and a record of how (``attn``, ``layout``, ``rows``, ``lora``, ``params``, ``tf32``, ``liger``, ``fsdp_ac``, sizes)."""
    import torch

    attn, layout = attention_layout(P, on_gpu, data.model_source)
    lora = P.method == "lora"
    # full: fp32 master weights, bf16 autocast; LoRA: frozen base in bf16, adapters in fp32 (peft's default)
    load_dtype = torch.bfloat16 if (on_gpu and P.bf16 and lora) else torch.float32
    tf32 = set_tf32(P.tf32)
    model = _load_causal_lm(data.model_source, load_dtype, attn)
    liger = apply_liger(model, P.liger_kernels, on_gpu)
    if liger and liger.startswith("off"):
        say(f"liger_kernels: {liger}")
    fsdp_ac = bool(getattr(accelerator.state, "fsdp_plugin", None)
                   and getattr(accelerator.state.fsdp_plugin, "activation_checkpointing", False))
    if P.gradient_checkpointing and not fsdp_ac:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tok = data.tokenizer
    if len(tok) > model.get_input_embeddings().num_embeddings:
        raise TrainError(f"student {data.model_source!r}: its tokenizer has {len(tok)} tokens but the model embeds "
                         f"{model.get_input_embeddings().num_embeddings}: tokenizer and model do not belong together")
    # packing exact or refused (linear attention), and the masks sliding-window layers need
    rows = packlib.packed_layout(model.config, layout, P.packing)
    if rows.reason:
        say(rows.reason)
    if rows.split_linear:  # Qwen3.5 on flash: linear-attention layers run each packed example on its own
        packlib.split_linear_attention(model)
    model, lora_info = add_lora(model, P, data.model_source, accelerator.is_main_process, say) if lora else (model, None)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return model, {"attn": attn, "layout": layout, "rows": rows, "lora": lora_info, "params": count_params(model), "tf32": tf32,
                   "liger": liger, "fsdp_ac": fsdp_ac, "n_layers": config.num_hidden_layers,
                   "d_attn": config.num_attention_heads * head_dim}


def add_lora(model: Any, P: TrainParams, model_source: str, is_main: bool, say: Any) -> tuple[Any, dict[str, Any]]:
    """``model`` wrapped with peft's LoRA adapters on ``P.lora_target_modules``, and what was adapted."""
    from peft import LoraConfig, get_peft_model

    from cdlib.tiny import UnknownFamilyError, family_of

    try:
        family = family_of(model.config.to_dict())
    except UnknownFamilyError:
        family = getattr(model.config, "model_type", None)
    info = lora_targets(model, P.lora_target_modules, family)
    info["warnings"] = warn_lora_targets(info, model_source) if is_main else []
    model = get_peft_model(model, LoraConfig(r=P.lora_rank, lora_alpha=P.lora_alpha, lora_dropout=P.lora_dropout,
                                             target_modules=P.lora_target_modules, task_type="CAUSAL_LM"))
    info["adapter_params"] = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    info["adapter_modules"] = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    say(f"LoRA adapters on {info['adapted']} ({info['adapter_modules']} modules, "
        f"{info['adapter_params']:,} params); no adapter on {info['not_adapted']}")
    return model, info


def load_teacher(source: str, attn: str, accelerator: Any, bf16: bool) -> tuple[Any, int]:
    """MPD's frozen KL teacher on the run's device (bf16 on a GPU with ``bf16``) and its FLOP-counted params."""
    import torch

    teacher = _load_causal_lm(source, torch.bfloat16 if bf16 else torch.float32, attn)
    teacher.eval().requires_grad_(False).to(accelerator.device)
    return teacher, count_params(teacher)["flops"]


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
    teacher, teacher_params = (load_teacher(teacher_source, student["attn"], accelerator, on_gpu and P.bf16)
                               if P.objective == "kl" else (None, 0))
    world = accelerator.num_processes
    lr = P.learning_rate or (TOY_LR if is_toy(P.student) or _trained_from_toy(P.student) else DEFAULT_LR[P.method])
    rows = student["rows"]
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
    loader = torch.utils.data.DataLoader(_MicroBatches(schedule), batch_size=1, shuffle=False,
                                         collate_fn=_collate_fn(data.train, rows, pad_id), pin_memory=on_gpu,
                                         generator=torch.Generator().manual_seed(P.seed))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    accelerator.register_for_checkpointing(scheduler)  # saved with the state, stepped as before (not wrapped)
    if P.method == "lora":  # the frozen base is the one loaded above: a resumable state holds only the trainable weights
        accelerator.register_save_state_pre_hook(checkpoint.trainable_weights_only)
    params = student["params"]
    say(f"training {data.model_source} ({P.method}, {P.objective}, {params['trainable']:,}/{params['total']:,} "
        f"trainable params) on {world} process(es), {accelerator.device}, {student['attn']}/{student['layout']}, "
        f"{optimizer_name}, lr {lr:g}, {len(schedule)} micro-batches -> {total_steps} steps ({budget_mode(P)})")
    return Setup(P, accelerator, data, on_gpu, say, tracker, model, accelerator.unwrap_model(model), head, rows,
                 student["attn"], student, teacher, teacher_source, teacher_params, lr, optimizer, optimizer_name,
                 optimizer_note, scheduler, loader, schedule, total_steps)


def start_progress(s: Setup, out: Path) -> tuple[Progress, dict[str, Any]]:
    """The loop's starting point: a matching resumable state's (:func:`cdlib.checkpoint.resume_or_start`)
    or step 0; and the run's :func:`cdlib.checkpoint.resume_fingerprint`."""
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
                             f"supervised tokens, the plan says {planned[first + k]}: the loader does not shard as planned")
        batch = _with_mask(batch, s.rows)
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
    steps and a resumable state every ``save_every`` (:func:`cdlib.checkpoint.save_resume`)."""
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
        reader.unread.append(({"id": str(step + 1), "step": step + 1, "loss": None, "ema": None,
                               "lr": s.scheduler.get_last_lr()[0], "tokens": prog.seen, "n_global": n_global}, step_sum))
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
                "peak_memory_gb": max(prog.prior["peak_memory_gb"], _peak_memory(s.on_gpu)[0]), "saved_at": now})
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
    collate = _collate_fn(val, s.rows, tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))
    mine = bins[acc.process_index::acc.num_processes]
    batches = [collate([mine[k:k + P.micro_batch_size]]) for k in range(0, len(mine), P.micro_batch_size)]
    return _evaluate(s.model, s.teacher, batches, acc, P, len(tok), s.head)


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
    peak, peak_kind = _peak_memory(s.on_gpu)
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
        "kl_teacher_model": s.teacher_source if teacher else None,
        **data.extra.get("dte", {}),  # Distilling the Essence: truncate_ratio, kept fractions, loss_on
        "max_row_tokens": max((sum(len(data.train[i]["input_ids"]) for i in b) for mb in s.schedule for b in mb),
                              default=0),  # longest packed row: what activation memory scales with
        "chat_format": data.chat_format, "data": data.data_info, "examples": data.build_info["n_examples"],
        "overlong_ids": data.build_info["overlong_ids"][:20], "n_train": len(data.train), "n_val": len(data.val),
        "budget_mode": budget_mode(P), "budget_label": budget_label(P), "token_budget": P.token_budget,
        "max_steps": P.max_steps, "epochs": P.epochs, "steps": len(step_losses), "micro_batches": len(s.schedule),
        "epochs_seen": sup_seen / max(1, dataset_tokens["supervised"]),
        "learning_rate": s.lr, "optimizer": s.optimizer_name, "optimizer_requested": P.optimizer,
        "optimizer_note": s.optimizer_note, "tf32": st["tf32"], "liger_kernels": st["liger"],
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
    (:func:`validate`), save (:func:`cdlib.checkpoint.save`) and metrics (:func:`collect_metrics`).
    Writes ``<out_dir>/loss.jsonl`` (one record per optimizer step: ``step``,
    ``loss``, ``ema``, ``lr``, ``tokens``), the checkpoint (``model/``, ``adapter/``,
    ``base/``) and ``checkpoint.json``. ``log`` receives the audit report and
    progress lines (main process only).

    Every ``P.save_every`` optimizer steps the training state goes to
    ``<out_dir>/resume/`` (:func:`cdlib.checkpoint.save_resume`: weights, optimizer, LR scheduler,
    RNG states, step, token totals, EMA and per-step losses). A run that finds a
    complete state there whose :func:`cdlib.checkpoint.resume_fingerprint` matches its own resumes
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


# --------------------------------------------------------------------------- trackers


def start_tracking(accelerator: Any, P: TrainParams, out: Path) -> dict[str, float] | None:
    """Start ``P.report_to``'s tracker through accelerate; None for "none", else the throughput clock.

    The run is named after the cell directory and its config holds every training
    parameter (scalars as they are, the rest as text, which every tracker accepts).
    Credentials (``WANDB_API_KEY``, ``MLFLOW_TRACKING_URI``, ...) come from the
    environment, as each tracker documents. TensorBoard writes under
    ``<out_dir>/trackers/<tracker_project>``.
    """
    if P.report_to == "none":
        return None
    config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in P.model_dump().items()}
    names = {"wandb": {"name": out.name}, "mlflow": {"run_name": out.name}, "trackio": {"name": out.name}}
    accelerator.init_trackers(P.tracker_project, config=config,
                              init_kwargs={P.report_to: names[P.report_to]} if P.report_to in names else {})
    return {"time": time.time(), "tokens": 0}  # the last logged step, for throughput


def track_steps(accelerator: Any, clock: dict[str, float] | None, records: list[dict[str, Any]]) -> None:
    """Send logged steps to the tracker: loss, EMA, learning rate, KL run's CE, and tokens/s since the last log."""
    if clock is None or not records:
        return
    now = time.time()
    throughput = (records[-1]["tokens"] - clock["tokens"]) / max(now - clock["time"], 1e-9)
    clock.update(time=now, tokens=records[-1]["tokens"])
    for rec in records:
        values = {"train/loss": rec["loss"], "train/ema": rec["ema"], "train/lr": rec["lr"],
                  "train/tokens": rec["tokens"]}
        if "ce" in rec:
            values["train/ce"] = rec["ce"]
        if rec is records[-1]:
            values["train/tokens_per_s"] = throughput
        accelerator.log(values, step=rec["step"])




# --------------------------------------------------------------------------- launching


def visible_gpus() -> int:
    """Number of CUDA devices this process can see (0 without CUDA)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover
        return 0


def launch(P: TrainParams, num_processes: int | None = None, cpu: bool = False,
           env: dict[str, str] | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Run :func:`run` across processes and return the main rank's metrics.

    The params go to ``<out_dir>/train_params.json`` and every rank runs
    ``python -m cdlib.train <json>``. GPUs: ``accelerate launch [--config_file
    P.accelerate_config] --num_processes N -m cdlib.train <json>`` (N:
    ``num_processes`` or the visible GPUs). ``cpu=True``: ``torchrun
    --nproc_per_node N`` (accelerate's own launcher runs a single process with
    ``--cpu``); the ranks talk over gloo. Output streams to this process's
    stdout/stderr; a failing launch raises ``subprocess.CalledProcessError``.
    """
    out = Path(P.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params_path = out / "train_params.json"
    params_path.write_text(P.model_dump_json(indent=2))
    (out / METRICS_FILE).unlink(missing_ok=True)
    n = num_processes or max(1, visible_gpus())
    bindir = Path(sys.executable).parent
    if cpu:
        cmd = [str(bindir / "torchrun") if (bindir / "torchrun").exists() else "torchrun",
               "--nproc_per_node", str(n), "-m", "cdlib.train", str(params_path)]
    else:
        cmd = [str(bindir / "accelerate") if (bindir / "accelerate").exists() else "accelerate", "launch"]
        if P.accelerate_config:
            cmd += ["--config_file", P.accelerate_config]
        cmd += ["--num_processes", str(n), "-m", "cdlib.train", str(params_path)]
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})}, timeout=timeout)
    return json.loads((out / METRICS_FILE).read_text())


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
    """Worker entry point of a launch: ``python -m cdlib.train params.json`` (run on every rank)."""
    from cdlib.params import validate

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m cdlib.train PARAMS.json|yaml", file=sys.stderr)
        return 2
    path = Path(argv[0])
    values = json.loads(path.read_text()) if path.suffix == ".json" else __import__("yaml").safe_load(path.read_text())
    P = validate(TrainParams, values, source=str(path))
    metrics = run(P, progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(P.out_dir) / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
