"""Checkpoints of a training run: the resumable state, the saved student and LoRA merges.

What :func:`cdlib.train.run` keeps of a run, besides its curve and metrics:

* the resumable state: every ``save_every`` optimizer steps :func:`save_resume` writes
  ``<out_dir>/resume/`` (weights or FSDP shards, optimizer, LR scheduler, RNG states, and
  ``trainer_state.json`` last, with the step, token totals, EMA and per-step losses);
  :func:`find_resume` finds the newest complete one, :func:`resume_fingerprint` says what it
  was written for (params, data, plan, process count) and :func:`restore` resumes from it
  or starts afresh;
* the final model: :func:`save` (HF layout: ``model/``, ``adapter/``, ``base/`` and
  ``checkpoint.json`` naming what vLLM loads, read back by :func:`cdlib.outputs.read_checkpoint`)
  and :func:`merge_adapter`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from cdlib.training import sft
from cdlib.outputs import CHECKPOINT, portable
from cdlib.params import TrainParams
from cdlib.store import Store

RESUME_DIR = "resume"  # <out_dir>/resume/: the latest resumable training state


RESUME_STATE = "trainer_state.json"  # written last: a state directory without it is incomplete


# keys that change how a run computes, not what it trains: a resumed run may change them
# (e.g. a smaller kl_chunk_tokens after running out of memory)
RESUME_FREE_KEYS = ("out_dir", "log_every", "save_every", "report_to", "tracker_project", "loss_head",
                    "loss_chunk_tokens", "kl_chunk_tokens", "gradient_checkpointing", "tf32", "liger_kernels",
                    "accelerate_config")


def resume_fingerprint(P: TrainParams, examples: list[dict[str, Any]], schedule: list[list[list[int]]],
                       world: int, distributed_type: str) -> dict[str, Any]:
    """What a resumable state must have been written for: the training params (all but
    :data:`RESUME_FREE_KEYS`), the process count and distributed type (the plan and the
    state's layout depend on them), and hashes of the training examples (ids, lengths,
    supervised counts) and of the planned micro-batches. ``hash`` is the sha256 of the rest."""
    import hashlib

    def digest(obj: Any) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()

    items: dict[str, Any] = {
        "params": {k: v for k, v in P.model_dump(mode="json").items() if k not in RESUME_FREE_KEYS},
        "world_size": world, "distributed_type": distributed_type,
        "examples": digest([[ex["id"], len(ex["input_ids"]), sft.supervised_count(ex)] for ex in examples]),
        "plan": digest(schedule)}
    return {**items, "hash": digest(items)}


def _fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The differing entries of two fingerprints, as ``key: old -> new`` (params key by key)."""
    diffs = [f"{k}: {old.get('params', {}).get(k)!r} -> {new['params'].get(k)!r}"
             for k in sorted(set(old.get("params", {})) | set(new["params"]))
             if old.get("params", {}).get(k) != new["params"].get(k)]
    diffs += [f"{k}: {old.get(k)!r} -> {new[k]!r}" if k in ("world_size", "distributed_type") else f"{k} differ"
              for k in ("world_size", "distributed_type", "examples", "plan") if old.get(k) != new[k]]
    return ", ".join(diffs) or "hash differs"


def find_resume(out_dir: str | Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest complete resumable state under ``out_dir`` and its ``trainer_state.json``.

    Candidates are ``resume/`` and ``resume.tmp/`` (a run killed between writing a new
    state and renaming it into place); a directory is complete once its
    :data:`RESUME_STATE` exists, which is written after everything else.
    Returns ``(None, None)`` when there is none.
    """
    out = Path(out_dir)
    best: tuple[Path | None, dict[str, Any] | None] = (None, None)
    for d in (out / RESUME_DIR, out / f"{RESUME_DIR}.tmp"):
        f = d / RESUME_STATE
        if not f.exists():
            continue
        try:
            state = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if best[1] is None or state.get("step", 0) > best[1].get("step", 0):
            best = (d, state)
    return best


def clear_resume(out_dir: str | Path) -> None:
    """Delete every resumable state under ``out_dir`` (``resume/``, ``resume.tmp/``, ``resume.old/``)."""
    for suffix in ("", ".tmp", ".old"):
        shutil.rmtree(Path(out_dir) / f"{RESUME_DIR}{suffix}", ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())


def save_resume(accelerator: Any, out_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write the resumable state (every rank calls this): ``accelerator.save_state`` into
    ``resume.tmp/`` (weights or FSDP shards, optimizer, the registered LR scheduler, each
    rank's RNG states), then the main process writes ``state`` as ``trainer_state.json``,
    fsyncs, and swaps the directory in for ``resume/`` by renames (the previous state is
    removed), so a kill at any moment leaves one complete state (:func:`find_resume`)."""
    out = Path(out_dir)
    tmp, final, old = out / f"{RESUME_DIR}.tmp", out / RESUME_DIR, out / f"{RESUME_DIR}.old"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)  # torch.save keeps tied weights as they are
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        with (tmp / RESUME_STATE).open("w") as f:
            f.write(json.dumps(state))
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_or_start(accelerator: Any, out: Path, fingerprint: dict[str, Any], strict: bool, say: Any,
                    total_steps: int) -> dict[str, Any] | None:
    """Load the newest complete resumable state under ``out`` into ``accelerator`` (every rank calls this)
    when it was written for ``fingerprint`` and return its ``trainer_state.json``; else None.

    A state for other inputs is discarded with a message saying what differs. The main process then
    starts the curve afresh (no state: ``resume/`` and ``loss.jsonl`` removed) or cuts ``loss.jsonl``
    back to the state's step and renames a ``resume.tmp/`` left by a kill into place. ``strict``:
    False for LoRA, whose states hold only the trainable weights (:func:`trainable_weights_only`).
    """
    resume_dir, state = find_resume(out)
    if state is not None and state.get("fingerprint", {}).get("hash") != fingerprint["hash"]:
        say(f"{resume_dir}: resumable state of step {state.get('step')} was written for other inputs "
            f"({_fingerprint_diff(state.get('fingerprint', {}), fingerprint)}); discarding it, starting from step 0")
        resume_dir, state = None, None
    if state is not None:
        accelerator.load_state(str(resume_dir), strict=strict)
        say(f"resuming from step {int(state['step'])} of {total_steps} ({resume_dir})")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        loss_store = out / "loss.jsonl"
        if state is None:
            clear_resume(out)
            loss_store.unlink(missing_ok=True)  # a run from scratch starts its curve afresh
        else:
            _truncate_curve(loss_store, int(state["step"]))  # rows written after the state was saved are redone
            if resume_dir.name != RESUME_DIR:  # a kill between writing a state and renaming it into place
                shutil.rmtree(out / RESUME_DIR, ignore_errors=True)
                resume_dir.rename(out / RESUME_DIR)
    accelerator.wait_for_everyone()
    return state


def _truncate_curve(path: Path, last_step: int) -> int:
    """Rewrite ``loss.jsonl`` keeping the rows of steps up to ``last_step`` (atomic replace); returns how many."""
    rows = [r for r in Store(path).read() if int(r["step"]) <= last_step] if path.exists() else []
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return len(rows)


def trainable_weights_only(models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
    """``save_state`` pre-hook of LoRA runs: keep only the trainable tensors (the adapters) of each state dict."""
    for i, model in enumerate(models[:len(weights)]):
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        weights[i] = {k: v for k, v in weights[i].items() if k in names}


# path components that wrappers insert into module names and that torch's gathered state dict
# (torch.distributed.checkpoint.state_dict.get_model_state_dict) leaves out of its keys
WRAPPER_COMPONENTS = ("_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod")


def adapter_weights(peft_model: Any, state: dict[str, Any]) -> dict[str, Any]:
    """The trainable tensors (the adapters) of ``state``, the gathered full state dict of ``peft_model``, keyed as
    peft saves them in ``adapter_model.safetensors`` (wrapper components and the adapter name left out).

    Why: peft's ``save_pretrained`` picks the adapter entries of ``state`` by prefixes built from the live model's
    module names. Under FSDP2 with FSDP's activation checkpointing each decoder layer is wrapped, so those names read
    ``layers.0._checkpoint_wrapped_module.self_attn.q_proj.lora_A`` while the gathered keys read
    ``layers.0.self_attn.q_proj.lora_A.default.weight``: no prefix matched and the file held no tensors. Here the
    trainable parameters' names are cleaned of :data:`WRAPPER_COMPONENTS` and looked up in ``state``; a trainable
    parameter that is missing raises (better than an empty adapter)."""
    from peft.tuners.tuners_utils import _remove_adapter_name_from_state_dict_key

    adapter_name = peft_model.active_adapter
    out: dict[str, Any] = {}
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        key = ".".join(c for c in name.split(".") if c not in WRAPPER_COMPONENTS)
        if key not in state:
            raise KeyError(f"trainable parameter {name} ({key}) is not in the gathered state dict")
        out[_remove_adapter_name_from_state_dict_key(key, adapter_name)] = state[key]
    if not out:
        raise ValueError("a LoRA model without trainable parameters: no adapter to save")
    return out


def _complete_adapter_file(adapter: Path, weights: dict[str, Any]) -> None:
    """Add to peft's ``adapter_model.safetensors`` in ``adapter`` the adapter ``weights`` that peft left out (all of
    them under FSDP2's activation checkpointing, :func:`adapter_weights`); a complete file is left as it is."""
    from safetensors.torch import load_file, save_file

    f = adapter / "adapter_model.safetensors"
    saved = load_file(str(f)) if f.exists() else {}
    if weights.keys() - saved.keys():
        save_file({**saved, **{k: v.contiguous() for k, v in weights.items()}}, str(f), metadata={"format": "pt"})


def save(model: Any, accelerator: Any, data: Any, P: TrainParams, on_gpu: bool) -> dict[str, Any]:
    """Save the trained student in HF layout and write ``checkpoint.json``; returns its content.

    Full runs: ``model/`` (weights, config, tokenizer with its chat template).
    LoRA: ``adapter/`` (peft) and, with ``save="merged"``, a merged ``model/``.
    Toy students also keep their from-scratch base in ``base/``. ``checkpoint.json``
    names what vLLM should load: ``model`` (the full or merged model, or the base
    for LoRA) and ``adapter`` (or null).
    """
    import torch

    out = Path(P.out_dir).resolve()
    state = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    info: dict[str, Any] = {"model": None, "adapter": None, "chat_format": data.chat_format, "source": P.source,
                            "method": P.method, "objective": P.objective, "student": P.student,
                            "base": str(Path(data.model_source).resolve()) if Path(data.model_source).exists()
                            else data.model_source}
    if accelerator.is_main_process:
        save_dtype = torch.bfloat16 if on_gpu and P.bf16 else None
        if P.method == "full":
            if save_dtype is not None:
                state = {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in state.items()}
            target = out / "model"
            _fresh(target)
            unwrapped.save_pretrained(target, state_dict=state, safe_serialization=True)
            data.tokenizer.save_pretrained(target)
            info["model"] = str(target)
        else:
            adapter = out / "adapter"
            _fresh(adapter)
            unwrapped.save_pretrained(adapter, state_dict=state, safe_serialization=True)
            _complete_adapter_file(adapter, adapter_weights(unwrapped, state))
            data.tokenizer.save_pretrained(adapter)
            info["adapter"], info["model"] = str(adapter), info["base"]
            if P.save == "merged":
                info["model"], info["adapter"] = str(merge_adapter(info["base"], adapter, out / "model",
                                                                   data.tokenizer, save_dtype)), None
                info["unmerged_adapter"] = str(adapter)
        (out / CHECKPOINT).write_text(json.dumps(portable(info, out), indent=2))
    accelerator.wait_for_everyone()
    return info


def _fresh(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def merge_adapter(base: str, adapter: str | Path, target: str | Path, tokenizer: Any, dtype: Any = None) -> Path:
    """Load ``base``, apply the peft ``adapter``, merge it into the weights, save to ``target`` with the tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype) if dtype is not None else \
        AutoModelForCausalLM.from_pretrained(base)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    target = Path(target)
    _fresh(target)
    merged.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target
