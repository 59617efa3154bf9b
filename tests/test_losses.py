"""The chunked linear + cross-entropy loss head: equal to the full-logits loss in value
and gradients (fp32), on raw tensors and inside real tiny transformers models (Qwen2 toy, Llama, LoRA)."""

from __future__ import annotations

import pytest
import torch

from cdlib.training import losses


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) <= rel * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_equals_full_logits(chunk, with_bias):
    g = torch.Generator().manual_seed(chunk)
    h = torch.randn(64, 24, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (0.3 * torch.randn(301, 24, generator=g)).requires_grad_()
    b = torch.randn(301, generator=g).requires_grad_() if with_bias else None
    t = torch.randint(0, 301, (64,), generator=g)
    params = [x for x in (h, w, b) if x is not None]
    ref = losses.linear_cross_entropy(h, w, b, t, impl="full")
    ref_grads = torch.autograd.grad(3.0 * ref, params)
    out = losses.linear_cross_entropy(h, w, b, t, chunk_tokens=chunk)
    grads = torch.autograd.grad(3.0 * out, params)
    assert _close(out / 64, ref / 64)
    assert all(_close(a, r) for a, r in zip(grads, ref_grads))
    with torch.no_grad():
        assert _close(losses.linear_cross_entropy(h, w, b, t, chunk_tokens=chunk) / 64, ref / 64)


def _llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _toy(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def _lora(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(_toy(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))


@pytest.mark.parametrize("build", ["toy", "llama", "lora"])
def test_fused_head_in_a_model_equals_the_full_logits_loss(build, tiny_model_dir, tmp_path):
    from cdlib.training.losses import cross_entropy_sum

    model = {"toy": lambda: _toy(tiny_model_dir), "llama": lambda: _llama(tmp_path),
             "lora": lambda: _lora(tiny_model_dir)}[build]()
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 33), generator=g)
    labels = ids.clone()
    labels[0, :10] = -100  # prompt tokens carry no loss
    labels[1, 20:] = -100
    inputs = {"input_ids": ids, "use_cache": False}
    params = [p for p in model.parameters() if p.requires_grad]

    ref, n = cross_entropy_sum(model(**inputs).logits, labels)
    ref_grads = torch.autograd.grad(ref / n, params)
    with losses.fused_head(model, labels, chunk_tokens=5):
        out = model(**inputs).logits
    assert out.dim() == 0
    grads = torch.autograd.grad(out / n, params)
    assert _close(out / n, ref / n)
    assert all(_close(a, r) for a, r in zip(grads, ref_grads))
    assert model(**inputs).logits.shape == (2, 33, vocab)  # the head is itself again outside the context
    assert "forward" not in vars(model.get_output_embeddings())


def test_resolve_falls_back_and_names_what_is_missing():
    assert losses.resolve("full") == "full"
    if not torch.cuda.is_available():
        assert losses.resolve("auto") == "chunked"
        with pytest.raises(ValueError, match="liger-kernel"):
            losses.resolve("liger")
    with pytest.raises(ValueError, match="choose one of"):
        losses.resolve("fast")


def test_training_with_the_chunked_head_follows_the_full_logits_run(tmp_path):
    """The training loop's default head (chunked on CPU) gives the full-logits run's losses, step by step."""
    import cdlib.generate
    from cdlib import train as T
    from cdlib.params import GenerateParams, ToyParams, TrainParams
    from cdlib.store import Store

    data = tmp_path / "generate"
    cdlib.generate.run(GenerateParams(out_dir=str(data), toy=ToyParams(n_train=40)))
    curves, metrics = {}, {}
    for head in ("full", "auto"):
        P = TrainParams(out_dir=str(tmp_path / head), data=str(data), max_steps=4, log_every=1, seq_len=1024,
                        tiny_layers=1, gradient_checkpointing=False, loss_head=head, loss_chunk_tokens=64)
        metrics[head] = T.run(P, progress=False, log=lambda *a: None)
        records = sorted(Store(tmp_path / head / "loss.jsonl").read(), key=lambda r: r["step"])
        curves[head] = [r["loss"] for r in records]
    assert metrics["full"]["loss_head"] == "full"
    if not torch.cuda.is_available():
        assert metrics["auto"]["loss_head"] == "chunked"
    assert len(curves["full"]) == 4
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(curves["auto"], curves["full"])), curves
    assert abs(metrics["auto"]["val_loss"] - metrics["full"]["val_loss"]) <= 1e-5 * metrics["full"]["val_loss"]
