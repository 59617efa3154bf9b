"""The training loss head without full logits: linear + cross-entropy over chunks of positions.

A causal LM's loss usually builds ``tokens x vocabulary`` logits, upcasts them to fp32
and takes the cross-entropy: at 16,384 tokens x Qwen's 151,936 entries that is ~10 GB of
fp32 per row before the softmax and its gradient double it, which is why the paper trained
with Cut Cross-Entropy and Liger kernels (Appendix H.3). Here the head's output is never
materialised:

* :func:`linear_cross_entropy` takes the final hidden states of the supervised positions
  and the output embedding, and walks them in chunks of ``chunk_tokens`` positions:
  logits of one chunk (fp32), their log-sum-exp, the loss, and the gradients with respect
  to the hidden states and the weight, computed in the same pass (softmax minus one-hot),
  so backward only scales them. Peak memory is O(chunk x vocabulary) plus one
  gradient of the weight, whatever the sequence length. On a GPU where ``liger-kernel``
  or ``cut-cross-entropy`` is installed, :func:`linear_cross_entropy` hands the same
  inputs to their fused kernels instead (``impl``).
* :func:`fused_head` runs a transformers causal LM with that head: inside the context,
  the model's output embedding returns the summed loss instead of logits (its forward is
  overridden on the instance, so parameters, state-dict names, FSDP sharding and peft
  wrapping are unchanged, and the weight is used inside the model's own forward, where
  FSDP has it unsharded).
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Any

import torch

IGNORE_INDEX = -100
IMPLS = ("auto", "full", "chunked", "liger", "cce")


def available(impl: str) -> bool:
    """Whether a fused-kernel implementation can run here (its package and a CUDA device)."""
    if impl == "chunked" or impl == "full":
        return True
    package = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}[impl]
    return torch.cuda.is_available() and importlib.util.find_spec(package) is not None


def resolve(impl: str) -> str:
    """``auto``: Cut Cross-Entropy, else Liger, where installed on a GPU; otherwise the chunked head.
    A named fused kernel that cannot run here is an error naming what is missing."""
    if impl == "auto":
        return next((i for i in ("cce", "liger") if available(i)), "chunked")
    if impl not in IMPLS:
        raise ValueError(f"loss head {impl!r}: choose one of {', '.join(IMPLS)}")
    if not available(impl):
        need = {"liger": "liger-kernel", "cce": "cut-cross-entropy"}[impl]
        raise ValueError(f"loss head {impl!r} needs a CUDA GPU and the {need} package")
    return impl


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropies of ``hidden @ weight.T (+ bias)`` against ``targets``, chunk by chunk,
    with the gradients computed in forward (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, want_grad):  # noqa: D102
        n = hidden.shape[0]
        # want_grad: grad mode where the loss was asked for (False under torch.no_grad(): validation);
        # needs_input_grad alone stays True there
        need = [want_grad and x for x in ctx.needs_input_grad[:3]]
        grad_h = torch.empty_like(hidden) if need[0] else None
        grad_w = torch.zeros_like(weight) if need[1] else None
        grad_b = torch.zeros_like(bias) if bias is not None and need[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, chunk):
            h, t = hidden[s:s + chunk], targets[s:s + chunk]
            logits = (h @ weight.T).float()  # the only chunk x vocab tensor: the rest is done in place
            if bias is not None:
                logits += bias.float()
            total -= logits.gather(1, t[:, None]).sum()
            top = logits.amax(dim=-1, keepdim=True)
            denom = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)
            total += (denom.log() + top).sum()  # log-sum-exp of the chunk's rows
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            probs = logits.div_(denom)  # softmax
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0  # d loss / d logits
            g = probs.to(weight.dtype)
            if grad_h is not None:
                torch.mm(g, weight, out=grad_h[s:s + chunk])
            if grad_w is not None:
                grad_w.addmm_(g.T, h)
            if grad_b is not None:
                grad_b += g.sum(0)
        ctx.save_for_backward(*(x if x is not None else torch.empty(0) for x in (grad_h, grad_w, grad_b)))
        ctx.present = (grad_h is not None, grad_w is not None, grad_b is not None)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        saved = ctx.saved_tensors
        grads = [s * grad_out.to(s.dtype) if present else None for s, present in zip(saved, ctx.present)]
        return grads[0], grads[1], grads[2], None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_tokens: int = 512, impl: str = "chunked") -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) of ``hidden [N, d] @ weight[V, d].T + bias`` against ``targets [N]``.

    ``impl``: "chunked" (this module, any device), "full" (all logits at once, the
    reference), "liger" or "cce" (fused GPU kernels, see :func:`resolve`).
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0  # keeps every parameter in the graph
    if impl == "full":
        logits = (hidden @ weight.T).float()
        if bias is not None:
            logits = logits + bias.float()
        return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    if impl == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy(hidden, weight, targets, bias=bias, reduction="sum").float()
    if impl == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce

        if bias is not None:
            raise ValueError("cut-cross-entropy: an output layer with a bias is not supported; use 'chunked'")
        return cce(hidden, weight, targets, reduction="sum").float()
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, max(1, int(chunk_tokens)),
                                            torch.is_grad_enabled())


@contextlib.contextmanager
def fused_head(model: Any, labels: torch.Tensor, chunk_tokens: int = 512, impl: str = "chunked",
               rows: torch.Tensor | None = None):
    """Within the context, ``model(**inputs).logits`` is the summed next-token cross-entropy over the
    positions whose shifted ``labels`` are not -100 (the SFT loss), computed by
    :func:`linear_cross_entropy` from the final hidden states: no logits are built.

    ``model`` is the unwrapped transformers model (or its peft wrapper); its output
    embedding must be a linear layer. Labels are shifted here as the model's own loss
    shifts them (position t predicts label t + 1). ``rows``: the flat indices of the supervised
    positions (``cdlib.train._supervised_rows``), planned in the data loader: selecting them needs no
    host synchronisation, where a boolean mask must read its result's size back from the device.
    """
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"fused loss head: {type(model).__name__} has no linear output embedding")
    if rows is None:
        targets = labels[..., 1:]
        mask = targets != IGNORE_INDEX
        targets = targets[mask]
    else:
        targets = labels.reshape(-1).index_select(0, rows + 1)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        h = hidden[..., :-1, :][mask] if rows is None else hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        return linear_cross_entropy(h, head.weight, getattr(head, "bias", None), targets, chunk_tokens, impl)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward
