"""The paper's model families at tiny scale (cdlib.tiny): packing exact or refused per attention path,
LoRA target modules, chat formats against the evaluation engine, save -> reload -> generate.

Packing checks build each family's tiny config straight from :func:`cdlib.tiny.family_config`
(a 64-token vocabulary, no tokenizer); gpt-oss gets a 6-token window so that it bites inside the
short examples. Tests that need the tokenizers use the cached tiny models (``cdlib.tiny.resolve``).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM

from cdlib.pack import Layout, compare_to_one_by_one, pack, packed_layout
from cdlib.tiny import FAMILIES, family_config

VOCAB = 64
WINDOW = 6  # gpt-oss's 128-token window scaled down to the examples below


def make_examples(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for k, n in enumerate([7, 13, 5, 20, 9, 11, 3, 16]):
        ids = [rng.randrange(3, VOCAB) for _ in range(n)]
        p = 0 if k % 2 else rng.randrange(1, n)  # a masked "prompt" on every other example
        examples.append({"id": f"e{k}", "input_ids": ids, "labels": [-100] * p + ids[p:]})
    return examples


EXAMPLES = make_examples()
BINS = pack([len(ex["input_ids"]) for ex in EXAMPLES], 32)
# Qwen3.5's torch gated delta-net runs a Python loop per 64-token chunk and layer: three examples
# (7, 13 and 5 tokens, one packed row) keep its checks to a few seconds
FEW = EXAMPLES[:3]
FEW_BINS = pack([len(ex["input_ids"]) for ex in FEW], 32)


def varlen_cpu_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         sliding_window=None, s_aux=None, **kwargs):
    """CPU stand-in for a varlen flash kernel: causal attention inside each ``cu_seq_lens`` segment,
    within ``sliding_window`` and with the sink logits ``s_aux`` (gpt-oss) as the kernels take them.
    A row without ``cu_seq_lens`` (one example, right-padded) is one causal segment."""
    cu = kwargs.get("cu_seq_lens_q")
    length = query.shape[2]
    bounds = [(0, length)] if cu is None else list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    if cu is not None:
        assert query.shape[0] == 1 and torch.equal(cu, kwargs["cu_seq_lens_k"])
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = torch.empty_like(query)
    for s, e in bounds:
        scores = query[:, :, s:e] @ key[:, :, s:e].transpose(-1, -2) * scaling
        allowed = torch.ones(e - s, e - s, dtype=torch.bool).tril()
        if sliding_window is not None:
            allowed = allowed.triu(-(sliding_window - 1))
        scores = scores.masked_fill(~allowed, float("-inf"))
        if s_aux is not None:
            sink = s_aux.reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
            probs = torch.cat([scores, sink], -1).softmax(-1)[..., :-1]
        else:
            probs = scores.softmax(-1)
        out[:, :, s:e] = probs @ value[:, :, s:e]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("varlen_cpu_test", varlen_cpu_attention)


def tiny(family: str, attn: str):
    overrides = {"sliding_window": WINDOW} if family == "gpt_oss" else {}
    config = family_config(family, VOCAB, {"bos": 1, "eos": 2, "pad": 0}, **overrides)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn).eval()


def cpu_attention(family: str) -> str:
    return "eager" if family == "gpt_oss" else "sdpa"  # transformers refuses sdpa for gpt-oss (sinks)


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("path", ["cpu", "flash"])
def test_packing_is_exact_or_refused_per_family_and_path(family, path):
    attn = cpu_attention(family) if path == "cpu" else "varlen_cpu_test"
    model = tiny(family, attn)
    layout = packed_layout(model.config, "flash" if path == "flash" else attn)
    linear = "linear_attention" in model.config.layer_types if hasattr(model.config, "layer_types") else False
    if linear:  # Qwen3.5: the gated delta-net cannot take sequence boundaries on these paths
        assert not layout.packing and layout.attention == "padded"
        assert "packing refused" in layout.reason and "linear attention" in layout.reason
        examples, bins = FEW, [[i] for i in range(len(FEW))]
    else:
        assert layout.packing
        examples, bins = EXAMPLES, BINS
        assert len(bins) < len(EXAMPLES)  # real packing happens
    got = compare_to_one_by_one(model, examples, bins, layout)
    assert got["loss_diff"] <= 1e-5 and got["grad_diff"] <= 1e-5, (family, path, layout, got)


@pytest.mark.parametrize("family", ["qwen3_5", "gpt_oss"])
def test_the_single_block_mask_leaks_where_packing_needs_more(family):
    """What the layouts above prevent: one 4D block mask on packed rows is wrong for these families."""
    attn = cpu_attention(family)
    model = tiny(family, attn)
    examples, bins = (FEW, FEW_BINS) if family == "qwen3_5" else (EXAMPLES, BINS)
    assert len(bins) < len(examples)
    got = compare_to_one_by_one(model, examples, bins, Layout(attn, True))
    assert got["loss_diff"] > 1e-4 or got["grad_diff"] > 1e-3, got


def test_gpt_oss_sliding_layers_get_their_window_in_the_packed_mask():
    layout = packed_layout(tiny("gpt_oss", "eager").config, "eager")
    assert layout.sliding_window == WINDOW and "sliding" in layout.reason
    from cdlib.pack import collate

    mask = collate(EXAMPLES, BINS, layout)["attention_mask"]
    full, sliding = mask["full_attention"], mask["sliding_attention"]
    seen_full = (full[0, 0] == 0).sum(-1)
    seen_sliding = (sliding[0, 0] == 0).sum(-1)
    assert int(seen_sliding.max()) == WINDOW and int(seen_full.max()) > WINDOW
