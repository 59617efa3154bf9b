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

The training objectives built on it (moved here from ``cdlib.train``): :func:`sft_loss` (the SFT
cross-entropy, through the fused head or from full logits, :func:`cross_entropy_sum`) and
:func:`kl_sum` (MPD's token-level divergence to a teacher, forward / reverse / JSD, computed over
chunks of ``kl_chunk_tokens`` supervised positions with its gradient filled in during the forward
pass). Batches from the training loader carry their supervised positions (:func:`supervised_rows`),
so none of these reads anything back from the device.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from typing import Any

import torch
import torch.nn.functional as F

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
    positions (:func:`supervised_rows`), planned in the data loader: selecting them needs no
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


# --------------------------------------------------------------------------- training objectives


def _shifted(logits: Any, labels: Any, rows: Any = None) -> tuple[Any, Any]:
    """Logits and targets of the supervised positions (labels shifted by one).

    ``rows``: :func:`supervised_rows` of ``labels``, planned in the data loader (a batch's
    ``supervised_rows``); selecting them takes no host synchronisation, a boolean mask does
    (the size of its result must be read back). Same positions, same order either way.
    """
    if rows is not None:
        return logits.reshape(-1, logits.shape[-1]).index_select(0, rows), labels.reshape(-1).index_select(0, rows + 1)
    shift_labels = labels[..., 1:]
    mask = shift_labels != IGNORE_INDEX
    return logits[..., :-1, :][mask], shift_labels[mask]


def cross_entropy_sum(logits: Any, labels: Any, rows: Any = None) -> tuple[Any, int]:
    """Summed next-token cross-entropy over supervised tokens (fp32) and their count (``rows``: see
    :func:`_shifted`)."""

    sel, target = _shifted(logits, labels, rows)
    return F.cross_entropy(sel.float(), target, reduction="sum"), int(target.numel())


ACCOUNTING_KEYS = ("labels", "example_lengths", "supervised_rows", "n_supervised")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch as the model takes it: labels (the loss is computed here) and accounting keys removed,
    ``use_cache=False`` kept."""
    return {k: v for k, v in batch.items() if k not in ACCOUNTING_KEYS}


def sft_loss(model: Any, head_model: Any, batch: dict[str, Any], head: str, chunk_tokens: int) -> tuple[Any, int]:
    """Summed cross-entropy of ``batch``'s supervised tokens and their count.

    ``head`` "full" builds the model's logits (:func:`cross_entropy_sum`); any other
    (:func:`resolve`) computes the loss from the final hidden states in
    chunks or a fused kernel, never building ``tokens x vocab`` logits
    (:func:`fused_head`; ``head_model`` is the unwrapped model whose output
    embedding it takes over). A batch from the training loader carries its supervised
    positions (``supervised_rows``) and their count (``n_supervised``), so nothing is read
    back from the device.
    """
    rows = batch.get("supervised_rows")
    if head == "full":
        return cross_entropy_sum(model(**model_inputs(batch)).logits, batch["labels"], rows)
    with fused_head(head_model, batch["labels"], chunk_tokens, head, rows=rows):
        ce = model(**model_inputs(batch)).logits
    n = batch.get("n_supervised")
    return ce, n if n is not None else int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


KL_DIRECTIONS = ("forward", "reverse", "jsd")


def supervised_rows(labels: Any) -> Any:
    """Flat indices (into ``logits.reshape(-1, V)``) of the positions whose next token is supervised,
    in the order :func:`_shifted` selects them."""

    mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    mask[..., :-1] = labels[..., 1:] != IGNORE_INDEX
    return mask.reshape(-1).nonzero().squeeze(1)


def _kl_chunk(s: Any, t: Any, direction: str, want_grad: bool) -> tuple[Any, Any]:
    """Divergence summed over the rows of one chunk of logits (fp32) and, with ``want_grad``, its
    gradient with respect to ``s``; the value is computed as by the unchunked :func:`kl_sum`
    (JSD's log m with ``logaddexp`` instead of a stacked ``logsumexp``, equal to rounding).

    With ``q = softmax(s)`` and a loss ``L(q)``, ``dL/ds = q * (g - <q, g>)`` where
    ``g = dL/dq``: forward KL gives ``q - p``, reverse ``q * (log q - log p - KL)``,
    JSD ``q * (h - <q, h>)`` with ``h = (log q - log m) / 2``. Work tensors are
    reused in place where that is simple: a chunk's peak is a handful of
    ``rows x vocab`` fp32 tensors (``benchmarks/bench_kl.py``).
    """

    log_q = F.log_softmax(s, dim=-1)
    log_p = F.log_softmax(t, dim=-1)
    del s, t
    grad = None
    if direction == "forward":
        loss = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
        if want_grad:
            grad = log_q.exp_().sub_(log_p.exp_())
    elif direction == "reverse":
        loss = F.kl_div(log_p, log_q, log_target=True, reduction="sum")
        if want_grad:
            grad = log_q - log_p
            q = log_q.exp_()
            del log_p
            grad.sub_((q * grad).sum(-1, keepdim=True)).mul_(q)
    else:
        log_m = torch.logaddexp(log_p, log_q).sub_(math.log(2.0))  # = the reference's logsumexp of the pair
        loss = 0.5 * (F.kl_div(log_m, log_p, log_target=True, reduction="sum")
                      + F.kl_div(log_m, log_q, log_target=True, reduction="sum"))
        if want_grad:
            del log_p
            grad = log_q.sub(log_m).mul_(0.5)
            del log_m
            q = log_q.exp_()
            grad.sub_((q * grad).sum(-1, keepdim=True)).mul_(q)
    return loss, grad


class _ChunkedKL(torch.autograd.Function):
    """Sum of :func:`_kl_chunk` over chunks of supervised rows; the gradient is filled in forward."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, rows, direction, vocab, chunk):
        width = student_logits.shape[-1]
        s_flat = student_logits.reshape(-1, width)
        t_flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        v = width if vocab is None else min(vocab, width)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.zeros_like(s_flat) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        for start in range(0, rows.numel(), chunk):
            idx = rows[start:start + chunk]
            loss, g = _kl_chunk(s_flat[idx, :v].float(), t_flat[idx, :v].float(), direction, want_grad)
            total += loss
            if g is not None:
                grad[idx, :v] = g.to(grad.dtype)
            del g
        ctx.shape, ctx.spent = student_logits.shape, False
        ctx.save_for_backward(grad if want_grad else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.spent:
            raise RuntimeError("the chunked KL's gradient buffer is scaled in place: backward runs once "
                               "(retain_graph is not supported; use kl_chunk_tokens=0)")
        ctx.spent = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output).view(ctx.shape), None, None, None, None, None


def kl_sum(student_logits: Any, teacher_logits: Any, labels: Any, direction: str = "forward",
           vocab: int | None = None, chunk_tokens: int | None = None, rows: Any = None) -> tuple[Any, int]:
    """Token-level divergence to the teacher, summed over supervised tokens, and their count.

    With p the teacher's and q the student's next-token distribution at a position:
    ``forward`` = KL(p || q) (mode covering; MPD's default), ``reverse`` = KL(q || p),
    ``jsd`` = (KL(p || m) + KL(q || m)) / 2 with m = (p + q) / 2: TRL's GKD
    ``generalized_jsd_loss`` at beta 0, 1 and 0.5 (equal to float precision, trl 1.16;
    Distilling the Essence's code calls -sum p log q "forward KL": the same gradient,
    a value larger by the teacher's entropy). Only the first
    ``vocab`` logits are compared (models often pad their output layer beyond
    the tokenizer). Computed in fp32.

    ``chunk_tokens`` (training passes ``TrainParams.kl_chunk_tokens``) computes the
    same sum over chunks of that many supervised positions: the fp32 work tensors
    are ``chunk x vocab`` instead of ``tokens x vocab``, and the gradient to the
    student logits is computed analytically chunk by chunk during the forward pass
    into one buffer of the logits' shape and dtype (the size backward produces
    anyway), so nothing of ``tokens x vocab`` in fp32 is kept for backward. The
    teacher logits are constants there (training computes them under ``no_grad``),
    and backward may run once. ``None`` or 0: all positions at once through
    autograd, the reference implementation. ``rows``: the supervised positions planned in the
    data loader (:func:`supervised_rows`), so that no host synchronisation is needed.
    """

    if direction not in KL_DIRECTIONS:  # TrainParams.kl_direction admits only these: a caller's slip
        raise ValueError(f"kl_direction must be forward, reverse or jsd, got {direction!r}")
    if chunk_tokens:
        rows = supervised_rows(labels) if rows is None else rows
        loss = _ChunkedKL.apply(student_logits, teacher_logits.detach(), rows, direction, vocab,
                                            int(chunk_tokens))
        return loss, int(rows.numel())
    s, _ = _shifted(student_logits, labels, rows)
    t, target = _shifted(teacher_logits, labels, rows)
    if vocab is not None:
        s, t = s[..., :vocab], t[..., :vocab]
    log_q = F.log_softmax(s.float(), dim=-1)
    log_p = F.log_softmax(t.float(), dim=-1)
    if direction == "forward":
        loss = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    elif direction == "reverse":
        loss = F.kl_div(log_p, log_q, log_target=True, reduction="sum")
    else:
        log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
        loss = 0.5 * (F.kl_div(log_m, log_p, log_target=True, reduction="sum")
                      + F.kl_div(log_m, log_q, log_target=True, reduction="sum"))
    return loss, int(target.numel())
