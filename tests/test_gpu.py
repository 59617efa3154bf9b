"""GPU tier (``make test-gpu``, marker ``gpu``): what only a CUDA machine can check.

Never run on the CPU development machines; a session lent a GPU runs it and records the
result in benchmarks/README.md. Each test needs at most a minute on one H100:

* the fused loss kernels (Cut Cross-Entropy, Liger) agree with the chunked head in bf16;
* a toy student trains in bf16 with FlashAttention varlen packing (where flash-attn is
  installed), bitsandbytes 8-bit AdamW and the default fused loss head, and its loss falls;
* FSDP2 over two visible GPUs trains the same run (skipped with one GPU);
* vLLM on the GPU generates with a LoRA adapter, differently from the base model;
* the paper's families (Qwen3.5, Qwen3.5-MoE, Llama, gpt-oss, Ministral-3) at tiny scale: packed rows equal
  to one by one on the CUDA attention paths, and a bf16 training run per family.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="the gpu tier needs a CUDA device")]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> Path:
    import cdlib.generate
    from cdlib.params import GenerateParams, ToyParams

    out = tmp_path_factory.mktemp("gen") / "generate"
    cdlib.generate.run(GenerateParams(out_dir=str(out), toy=ToyParams(n_train=200)))
    return out


@pytest.mark.parametrize("impl", ["cce", "liger"])
def test_fused_loss_kernels_match_the_chunked_head(impl):
    from cdlib.training import losses

    if not losses.available(impl):
        pytest.skip(f"{impl} is not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(2048, 512, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
    w = (0.05 * torch.randn(151936, 512, device="cuda", generator=g)).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, 151936, (2048,), device="cuda", generator=g)
    ref = losses.linear_cross_entropy(h.float(), w.float(), None, t, impl="chunked")
    out = losses.linear_cross_entropy(h, w, None, t, impl=impl)
    assert abs(float(out) - float(ref)) <= 2e-2 * abs(float(ref))
    out.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


def test_bf16_training_with_flash_varlen_8bit_adam_and_fused_head(traces, tmp_path):
    from cdlib import train as T
    from cdlib.params import TrainParams

    P = TrainParams(out_dir=str(tmp_path / "run"), data=str(traces), max_steps=30, log_every=5, seq_len=2048,
                    tiny_layers=2, learning_rate=1e-3, bf16=True, optimizer="adamw_8bit")
    m = T.run(P, progress=False, log=print)
    assert m["precision"] == "bf16" and m["steps"] == 30
    if importlib.util.find_spec("flash_attn"):
        assert m["attn_implementation"] == "flash_attention_2" and m["layout"] == "varlen"
    if importlib.util.find_spec("bitsandbytes"):
        assert m["optimizer"] == "bitsandbytes.AdamW8bit"
    assert m["loss_head"] in ("cce", "liger", "chunked")
    assert m["train_loss"] < m["train_loss_first"]


def test_fsdp2_over_two_gpus(traces, tmp_path):
    from cdlib import train as T
    from cdlib.params import TrainParams

    if T.visible_gpus() < 2:
        pytest.skip("FSDP2 needs two visible GPUs")
    P = TrainParams(out_dir=str(tmp_path / "fsdp"), data=str(traces), max_steps=10, log_every=5, seq_len=2048,
                    tiny_layers=2, learning_rate=1e-3, bf16=True, optimizer="adamw",
                    accelerate_config=str(REPO / "slurm/accelerate/fsdp2.yaml"))
    m = T.launch(P, num_processes=2, timeout=600)
    assert m["distributed_type"] == "FSDP" and m["fsdp_version"] == 2
    assert m["train_loss"] < m["train_loss_first"]


def test_vllm_gpu_generation_with_a_lora_adapter(tiny_model_dir, tiny_lora_dir):
    from cdlib.engines import close_all, get_engine
    from cdlib.params import EngineParams, SamplingParams

    greedy = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=16)
    base = dict(kind="vllm", model=str(tiny_model_dir), dtype="bfloat16", gpu_memory_utilization=0.3,
                max_model_len=512, enable_lora=True, max_lora_rank=8)
    prompts = ["Ann has 3 apples. Ann gets 4 more.", "Then 3 + 4 = 7. So the answer is"]
    plain = get_engine(EngineParams(**base)).generate(prompts, greedy)
    adapted = get_engine(EngineParams(**base, lora_path=str(tiny_lora_dir))).generate(prompts, greedy)
    close_all()
    assert all(c.error is None and c.completion_tokens >= 1 for c in plain + adapted)
    assert [c.text for c in plain] != [c.text for c in adapted]


# --------------------------------------------------------------------------- the paper's families on CUDA


def _cuda_family_model(family: str, attn: str, dtype):
    from transformers import AutoModelForCausalLM

    from cdlib.tiny import family_config

    overrides = {"sliding_window": 6} if family == "gpt_oss" else {}  # the CPU tests' window, scaled to the rows
    config = family_config(family, 64, {"bos": 1, "eos": 2, "pad": 0}, **overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn).cuda().eval()


def _family_rows():
    import random

    from cdlib.training.packing import pack

    rng = random.Random(0)
    examples = []
    for k, n in enumerate([7, 13, 5, 20, 9, 11]):
        ids = [rng.randrange(3, 64) for _ in range(n)]
        p = 0 if k % 2 else rng.randrange(1, n)
        examples.append({"id": f"e{k}", "input_ids": ids, "labels": [-100] * p + ids[p:]})
    return examples, pack([len(e["input_ids"]) for e in examples], 32)


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe", "llama", "gpt_oss", "ministral3"])
def test_family_packing_on_cuda_equals_one_by_one(family):
    """Each family's packed layout on CUDA gives the loss and gradients of its examples run one by one.

    fp32 on sdpa / eager (gpt-oss's sinks) to the CPU tests' 1e-5 scale; bf16 on a varlen flash kernel where
    flash-attn is installed, to a bf16 tolerance (Qwen3.5's linear-attention layers split at cu_seq_lens).
    """
    from cdlib.training.packing import (compare_to_one_by_one, packed_layout, register_sdpa_varlen,
                                        split_linear_attention)

    examples, bins = _family_rows()
    paths = [("eager" if family == "gpt_oss" else "sdpa", torch.float32, 1e-4)]
    if family != "gpt_oss":  # cdlib's varlen sdpa (auto without flash-attn), fp32
        paths.append((register_sdpa_varlen(), torch.float32, 1e-4))
    if importlib.util.find_spec("flash_attn") and family != "gpt_oss":
        paths.append(("flash_attention_2", torch.bfloat16, 3e-2))
    for attn, dtype, tol in paths:
        model = _cuda_family_model(family, attn, dtype)
        layout = packed_layout(model.config, attn if attn in ("sdpa", "eager") else "varlen")
        if layout.split_linear:
            split_linear_attention(model)
        use_bins = bins if layout.packing else [[i] for i in range(len(examples))]
        got = compare_to_one_by_one(model, examples, use_bins, layout)
        assert got["loss_diff"] <= tol * max(1.0, got["loss"]) and got["grad_diff"] <= 10 * tol, (family, attn, got)


@pytest.mark.parametrize("student", ["tiny-qwen3.5", "tiny-llama", "tiny-gpt-oss"])
def test_family_trains_in_bf16_on_cuda(student, traces, tmp_path):
    """A tiny student of each paper family trains on CUDA in bf16 through cdlib.train and its loss falls."""
    from cdlib import train as T
    from cdlib.params import TrainParams

    P = TrainParams(out_dir=str(tmp_path / "run"), data=str(traces), student=student, max_steps=20,
                    log_every=5, seq_len=1024, learning_rate=1e-3, bf16=True)
    m = T.run(P, progress=False, log=print)
    assert m["train_loss"] < m["train_loss_first"], m
