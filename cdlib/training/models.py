"""Models for :mod:`cdlib.train`: attention layout, loading the student and KL teacher, LoRA, optimizer.

:func:`attention_layout` picks the attention implementation and packing layout of a student;
:func:`load_student` / :func:`load_teacher` load them (toy, hub id, local or train-cell checkpoints);
:func:`add_lora` wraps the student with the family's LoRA targets (:func:`lora_targets`);
:func:`make_optimizer` builds the optimizer the paper's H.3 names where it can run (8-bit AdamW from
bitsandbytes or torchao, falling back to torch AdamW with the reason), :func:`set_tf32` and
:func:`apply_liger` switch the GPU options; :func:`flops_estimate` and :func:`count_params` feed the metrics.
"""

from __future__ import annotations

import os
import resource
from typing import Any

from cdlib.training import packing as packlib
from cdlib.params import TrainParams
from cdlib.training.data import Prepared, TrainError


def attention_layout(P: TrainParams, on_gpu: bool, source: str | None = None) -> tuple[str, str]:
    """``(attn_implementation, collate layout)`` of a student.

    ``auto``: flash-attention 2 on a GPU where installed, else sdpa one packed example at a time
    (``sdpa_varlen``, :func:`cdlib.training.packing.sdpa_varlen_attention`); both take padding-free rows with
    ``cu_seq_lens`` (layout ``varlen``). With ``source`` (the model to load), ``auto`` falls back to
    ``eager`` with per-layer block masks where the model's class supports neither (transformers refuses
    sdpa and flash-attention 2 for gpt-oss, whose sinks need eager or a sink-aware kernel). ``sdpa`` and
    ``eager`` ask for rows padded to the longest with 4D block masks. Whether the rows may be packed is
    :func:`cdlib.training.packing.packed_layout`'s.
    """
    import importlib.util

    impl = P.attn_implementation
    if impl == "auto":
        impl = "flash_attention_2" if on_gpu and importlib.util.find_spec("flash_attn") else "sdpa_varlen"
        if source is not None and not _supports_attention(source, impl):
            impl = "eager"
    if impl == "sdpa_varlen":
        return packlib.register_sdpa_varlen(), "varlen"
    return impl, {"flash_attention_2": "varlen", "sdpa": "sdpa", "eager": "eager"}[impl]


def _supports_attention(source: str, impl: str) -> bool:
    """Whether the causal-LM class of the model at ``source`` accepts ``impl`` (sdpa and sdpa_varlen: its
    ``_supports_sdpa``, which transformers checks for registered attention functions too; flash_attention_2)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cls = AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(source))]
    except (KeyError, OSError, ValueError):
        return True  # unknown here: let from_pretrained decide
    if impl in ("sdpa", "sdpa_varlen"):
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


#: Paper H.3's Liger plugin: "fused RMSNorm, RoPE, GLU activation, and gated RMSNorm".
LIGER_KERNELS = ("rms_norm", "rope", "glu", "gated_rms_norm")
_NO_GATED_NORM = "the model has no gated RMSNorm (only Qwen3.5's linear-attention layers do)"
#: What liger-kernel's own patch for each model type can apply (liger_kernel.transformers.monkey_patch,
#: apply_liger_kernel_to_<type>, read at linkedin/Liger-Kernel ead96b6), and why not the rest.
LIGER_SUPPORT: dict[str, dict[str, str | None]] = {
    "llama": {"rms_norm": None, "rope": None, "glu": None, "gated_rms_norm": _NO_GATED_NORM},
    "qwen3_5": {"rms_norm": None, "glu": None,
                "rope": "liger-kernel has no RoPE for Qwen3.5's hybrid attention (its patch raises "
                        "NotImplementedError)",
                "gated_rms_norm": "liger-kernel has no gated RMSNorm kernel (Axolotl's Liger plugin adds its own "
                                  "for Qwen3.5's linear-attention layers)"},
    "gpt_oss": {"rms_norm": None, "rope": None, "gated_rms_norm": _NO_GATED_NORM,
                "glu": "liger-kernel does not patch gpt-oss's experts (clamped SwiGLU, swiglu_limit 7.0)"},
}
LIGER_SUPPORT.update(dict.fromkeys(("qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text"), LIGER_SUPPORT["qwen3_5"]))


def liger_plan(model_type: str | None) -> tuple[list[str], dict[str, str]]:
    """H.3's Liger kernels for a model type: (applied, not covered -> why). Pure, so the mapping is checked
    without liger-kernel or a GPU; :func:`apply_liger` applies the first list."""
    support = LIGER_SUPPORT.get(model_type or "")
    if support is None:
        return [], {k: f"liger-kernel has no kernels for model type {model_type!r}" for k in LIGER_KERNELS}
    return ([k for k in LIGER_KERNELS if support[k] is None],
            {k: str(support[k]) for k in LIGER_KERNELS if support[k] is not None})


def apply_liger(model: Any, on: bool, on_gpu: bool) -> tuple[str | None, dict[str, str]]:
    """Paper H.3's Liger plugin on the loaded model (kernels patched in place by liger-kernel for the model's
    type, as :func:`liger_plan` says); returns what was done or why not, None when off, and each H.3 kernel not
    applied with the reason (both recorded in the metrics, the second also logged).
    The loss head is ``loss_head``'s business (Cut Cross-Entropy or Liger's fused linear cross-entropy)."""
    import importlib.util

    if not on:
        return None, {}
    off = ("off: needs a CUDA GPU" if not on_gpu else "off: liger-kernel is not installed (the 'gpu' extra)"
           if importlib.util.find_spec("liger_kernel") is None else None)
    if off:
        return off, {k: off for k in LIGER_KERNELS}
    model_type = getattr(model.config, "model_type", None)
    applied, missing = liger_plan(model_type)
    if not applied:
        return f"off: liger-kernel has no kernels for model type {model_type!r}", missing
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rms_norm="rms_norm" in applied, rope="rope" in applied,
                                    swiglu="glu" in applied, cross_entropy=False, fused_linear_cross_entropy=False)
    return f"on ({model_type}: {', '.join(applied)})", missing


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


def peak_memory(on_gpu: bool) -> tuple[float, str]:
    if on_gpu:
        import torch

        return torch.cuda.max_memory_allocated() / 2**30, "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak RSS (resource.ru_maxrss)"


def load_student(P: TrainParams, data: Prepared, accelerator: Any, on_gpu: bool,
                 say: Any) -> tuple[Any, dict[str, Any]]:
    """The student model ready for its wrapper (kernels, gradient checkpointing, packed layout, LoRA adapters)
    and a record of how (``attn``, ``layout``, ``rows``, ``lora``, ``params``, ``tf32``, ``liger``, ``fsdp_ac``,
    sizes)."""
    import torch

    attn, layout = attention_layout(P, on_gpu, data.model_source)
    lora = P.method == "lora"
    # full: fp32 master weights, bf16 autocast; LoRA: frozen base in bf16, adapters in fp32 (peft's default)
    load_dtype = torch.bfloat16 if (on_gpu and P.bf16 and lora) else torch.float32
    tf32 = set_tf32(P.tf32)
    model = _load_causal_lm(data.model_source, load_dtype, attn)
    liger, liger_missing = apply_liger(model, P.liger_kernels, on_gpu)
    if liger and liger.startswith("off"):
        say(f"liger_kernels: {liger}")
    elif liger_missing:
        say("liger_kernels: not covered: " + "; ".join(f"{k} ({why})" for k, why in liger_missing.items()))
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
    if rows.split_linear:  # Qwen3.5 on varlen: linear-attention layers run each packed example on its own
        packlib.split_linear_attention(model)
    lora_info = None
    if lora:
        model, lora_info = add_lora(model, P, data.model_source, accelerator.is_main_process, say)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return model, {"attn": attn, "layout": layout, "rows": rows, "lora": lora_info, "params": count_params(model),
                   "tf32": tf32, "liger": liger, "liger_not_covered": liger_missing, "fsdp_ac": fsdp_ac,
                   "n_layers": config.num_hidden_layers, "d_attn": config.num_attention_heads * head_dim}


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


def load_teacher(source: str, student: dict[str, Any], accelerator: Any, bf16: bool,
                 say: Any) -> tuple[Any, int, packlib.Layout]:
    """The frozen KL teacher on the run's device (bf16 on a GPU with ``bf16``), its FLOP-counted params, and
    the row layout both models can take.

    The teacher runs the student's rows, so it gets the same care: its linear-attention layers are split per
    packed example (Qwen3.5, :func:`cdlib.training.packing.split_linear_attention`); where it would need another packed
    layout than the student's (packing refused, or another sliding window in its block masks) the run trains
    one example per row, saying why.
    """
    import torch

    # FSDP's cpu_ram_efficient_loading has transformers fill the weights of every rank but 0 with zeros, for the
    # broadcast that prepare() makes of the sharded student; the teacher is neither sharded nor broadcast, so every
    # rank loads it whole (under FSDP2 on 2 ranks, rank 1 distilled from a zero teacher before this)
    saved = os.environ.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)
    try:
        teacher = _load_causal_lm(source, torch.bfloat16 if bf16 else torch.float32, student["attn"])
    finally:
        if saved is not None:
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = saved
    teacher.eval().requires_grad_(False).to(accelerator.device)
    rows = student["rows"]
    own = packlib.packed_layout(teacher.config, student["layout"], rows.packing)
    if own.split_linear:
        packlib.split_linear_attention(teacher)
    if rows.packing and (own.attention, own.sliding_window) != (rows.attention, rows.sliding_window):
        rows = packlib.Layout("padded", False, f"packing off: the KL teacher {source} cannot take the student's packed "
                                                f"rows ({own.reason or own.attention}); one example per row")
        say(rows.reason)
    return teacher, count_params(teacher)["flops"], rows
