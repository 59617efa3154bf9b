"""Best-fit-decreasing packing and packed batches that match examples run one by one (cdlib.training.packing)."""

from __future__ import annotations

import random
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AttentionInterface, Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from cdlib.training.packing import check_bins, collate_packed, pack, packing_efficiency

VOCAB = 97


def naive_bfd_loads(lengths: list[int], max_len: int) -> list[int]:
    """Reference best-fit-decreasing by linear scan (O(n * bins)); returns the sorted bin loads."""
    loads: list[int] = []
    for n in sorted(lengths, reverse=True):
        fits = [b for b, load in enumerate(loads) if load + n <= max_len]
        if fits:
            best = max(fits, key=lambda b: loads[b])
            loads[best] += n
        else:
            loads.append(n)
    return sorted(loads)


# --------------------------------------------------------------------------- bins


@settings(max_examples=200, deadline=None)
@given(
    max_len=st.integers(1, 64),
    lengths=st.lists(st.integers(1, 64), max_size=60),
)
def test_pack_is_a_partition_within_capacity_and_matches_reference_bfd(max_len, lengths):
    lengths = [min(n, max_len) for n in lengths]
    bins = pack(lengths, max_len)
    check_bins(bins, lengths, max_len)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= max_len for b in bins)
    # any tie-breaking of best-fit-decreasing leaves the same multiset of bin loads
    assert sorted(sum(lengths[i] for i in b) for b in bins) == naive_bfd_loads(lengths, max_len)


def test_pack_best_fit_fills_bins():
    # 6 + 4 and 5 + 5 fill two bins of 10 exactly; first-fit order alone would not matter here,
    # but best fit must put 4 with 6 (room 4) rather than with 5 (room 5)
    lengths = [5, 6, 4, 5]
    bins = pack(lengths, 10)
    assert sorted(sorted(lengths[i] for i in b) for b in bins) == [[4, 6], [5, 5]]
    assert packing_efficiency(lengths, bins, 10) == 1.0


def test_pack_overlong_example_is_an_error_naming_index_and_length():
    with pytest.raises(ValueError, match=r"example 2 has length 17 > max_len 16"):
        pack([3, 4, 17, 2], 16)
    with pytest.raises(ValueError, match=r"example 1 has length 0"):
        pack([3, 0], 16)


def test_pack_is_fast_on_many_examples():
    rng = random.Random(0)
    lengths = [min(16384, max(1, int(rng.lognormvariate(7.3, 0.8)))) for _ in range(100_000)]
    start = time.perf_counter()
    bins = pack(lengths, 16384)
    elapsed = time.perf_counter() - start
    check_bins(bins, lengths, 16384)
    assert elapsed < 10, f"packing 100k examples took {elapsed:.1f}s"
    assert packing_efficiency(lengths, bins, 16384) > 0.995


# --------------------------------------------------------------------------- packed batches on a tiny model


def tiny_model(attn: str, sliding_window: int | None = None) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    window = {"use_sliding_window": True, "sliding_window": sliding_window, "max_window_layers": 0,
              "layer_types": ["sliding_attention"] * 2} if sliding_window else {}
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        **window,
    )
    model = Qwen2ForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32)
    return model.eval()  # no dropout; gradients still flow


def make_examples(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for k, n in enumerate([7, 13, 5, 20, 9, 11, 3, 16]):
        ids = [rng.randrange(1, VOCAB) for _ in range(n)]
        # mask a "prompt" prefix and keep the rest supervised, like SFT labels; every other
        # example is fully supervised, so its first label is set and the collator must mask it
        p = 0 if k % 2 else rng.randrange(1, n)
        labels = [-100] * p + ids[p:]
        examples.append({"id": f"e{k}", "input_ids": ids, "labels": labels})
    return examples


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token losses with the causal shift, over every row."""
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


def one_by_one(model, examples) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    model.zero_grad()
    n_tokens = sum(sum(1 for x in ex["labels"][1:] if x != -100) for ex in examples)
    total = 0.0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor([ex["labels"]])
        loss = summed_loss(model(input_ids=ids).logits, labels) / n_tokens
        loss.backward()
        total = total + loss.detach()
    return total, {k: p.grad.clone() for k, p in model.named_parameters()}, n_tokens


def packed(model, batch, n_tokens) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    model.zero_grad()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    loss = summed_loss(logits, batch["labels"]) / n_tokens
    loss.backward()
    # the model's own loss with num_items_in_batch must agree too
    hf_loss = model(**batch, num_items_in_batch=n_tokens).loss
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}, hf_loss.detach()


def assert_same(ref, got):
    ref_loss, ref_grads, _ = ref
    loss, grads, hf_loss = got
    assert torch.allclose(loss, ref_loss, atol=1e-5, rtol=0), (loss, ref_loss)
    assert torch.allclose(hf_loss, ref_loss, atol=1e-5, rtol=0), (hf_loss, ref_loss)
    for name, g in ref_grads.items():
        diff = (grads[name] - g).abs().max().item()
        assert diff <= 1e-5, f"gradient of {name} differs by {diff}"


@pytest.fixture(scope="module")
def examples_and_bins():
    examples = make_examples()
    bins = pack([len(ex["input_ids"]) for ex in examples], 32)
    assert len(bins) < len(examples) and max(len(b) for b in bins) > 1  # real packing happens
    return examples, bins


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_4d_mask_batch_equals_examples_one_by_one(examples_and_bins, attn):
    examples, bins = examples_and_bins
    model = tiny_model(attn)
    ref = one_by_one(model, examples)
    batch = collate_packed(examples, bins, attention=attn, pad_to=32)
    assert batch["attention_mask"].shape == (len(bins), 1, 32, 32)
    assert batch["attention_mask"].dtype == (torch.bool if attn == "sdpa" else torch.float32)
    assert_same(ref, packed(model, batch, ref[2]))


def test_packed_rows_without_the_block_mask_leak_across_examples(examples_and_bins):
    # the same rows with a plain causal mask (2D padding mask) give a different loss: the test can fail
    examples, bins = examples_and_bins
    model = tiny_model("sdpa")
    ref = one_by_one(model, examples)
    batch = collate_packed(examples, bins, attention="sdpa", pad_to=32)
    leaky = {"input_ids": batch["input_ids"], "labels": batch["labels"],
             "attention_mask": torch.ones_like(batch["input_ids"]), "use_cache": False}
    loss, _, _ = packed(model, leaky, ref[2])
    assert not torch.allclose(loss, ref[0], atol=1e-4)


def varlen_cpu_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """CPU stand-in for flash_attn_varlen_func: causal attention inside each cu_seq_lens segment only."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None:  # an unpacked row (the one-by-one reference): one causal segment per row
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    assert query.shape[0] == 1 and torch.equal(cu_q, cu_k)
    assert int(kwargs["max_length_q"]) == int(cu_q.diff().max())
    out = torch.empty_like(query)
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        out[:, :, s:e] = F.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, scale=scaling, enable_gqa=True
        )
    return out.transpose(1, 2).contiguous(), None


def test_padding_free_varlen_batch_equals_examples_one_by_one(examples_and_bins):
    """The varlen layout: the kwargs reach the attention function and give the exact loss."""
    AttentionInterface.register("varlen_cpu_test", varlen_cpu_attention)
    examples, bins = examples_and_bins
    model = tiny_model("varlen_cpu_test")
    ref = one_by_one(model, examples)
    batch = collate_packed(examples, bins, attention="varlen")
    total = sum(len(ex["input_ids"]) for ex in examples)
    assert batch["input_ids"].shape == (1, total) and "attention_mask" not in batch
    # the same cumulative lengths transformers derives from position_ids for flash_attention_2
    (cu_q, _), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert torch.equal(batch["cu_seq_lens_q"], cu_q) and batch["max_length_q"] == int(max_q)
    assert_same(ref, packed(model, batch, ref[2]))


def test_padding_free_row_with_sdpa_uses_position_ids(examples_and_bins):
    """transformers 5.19 also builds the block mask itself from restarting position_ids (sdpa, no mask)."""
    examples, bins = examples_and_bins
    model = tiny_model("sdpa")
    ref = one_by_one(model, examples)
    batch = collate_packed(examples, bins, attention="varlen")
    row = {k: batch[k] for k in ("input_ids", "labels", "position_ids", "use_cache")}
    assert_same(ref, packed(model, row, ref[2]))
    # without use_cache=False the model builds a cache, skips packed-sequence detection and leaks
    leaky = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    loss, _, _ = packed(model, leaky, ref[2])
    assert not torch.allclose(loss, ref[0], atol=1e-4)


@pytest.mark.parametrize("window", [None, 4])
def test_sdpa_varlen_attention_equals_examples_one_by_one(examples_and_bins, window):
    """cdlib's own varlen attention (the CPU default): sdpa one packed example at a time, exact, also
    within a sliding window shorter than the examples (each example alone sees the same window)."""
    from cdlib.training.packing import register_sdpa_varlen

    examples, bins = examples_and_bins
    model = tiny_model(register_sdpa_varlen(), sliding_window=window)
    ref = one_by_one(model, examples)
    batch = collate_packed(examples, bins, attention="varlen")
    assert_same(ref, packed(model, batch, ref[2]))
    if window:  # the window bites: the same model without it gives another loss
        plain = tiny_model(register_sdpa_varlen())
        assert not torch.allclose(one_by_one(plain, examples)[0], ref[0], atol=1e-4)


def test_sdpa_varlen_attention_refuses_sinks_and_batches_of_rows():
    from cdlib.training.packing import sdpa_varlen_attention

    q = torch.zeros(2, 2, 6, 4)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="sinks"):
        sdpa_varlen_attention(module, q[:1], q[:1], q[:1], None, s_aux=torch.zeros(2), cu_seq_lens_q=cu)
    with pytest.raises(ValueError, match="batch size 1"):
        sdpa_varlen_attention(module, q, q, q, None, cu_seq_lens_q=cu)
