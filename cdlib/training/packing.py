"""Sample packing: best-fit-decreasing bins and packed batches without cross-example attention.

The paper trains on 16,384-token sequences with sample packing (section 4,
Appendix H.3). This module does the two halves of that:

* :func:`pack` puts examples (given by their token lengths) into bins of at most
  ``max_len`` tokens with best-fit-decreasing. The search for the best bin is a
  bisect over the sorted list of distinct remaining capacities, so packing the
  paper's ~283k traces takes well under a second per pass of the loop rather than
  the O(n^2) of a linear scan over open bins.
* :func:`collate_packed` turns bins of SFT examples (``cdlib.training.sft``) into model
  inputs where every example restarts its ``position_ids`` at 0 and no token
  attends across examples, in one of two layouts:

  - ``attention="varlen"`` (``attn_implementation="flash_attention_2"`` on a GPU, or
    ``"cdlib_sdpa_varlen"``, :func:`sdpa_varlen_attention`, sdpa one example at a time, the CPU default):
    padding-free. All bins of the micro-batch are concatenated into one row of
    shape ``[1, total]`` and the varlen kwargs ``cu_seq_lens_q/k`` and
    ``max_length_q/k`` are passed; transformers 5.19 hands them to
    ``flash_attn_varlen_func`` (``modeling_flash_attention_utils._flash_attention_forward``) and
    to any registered attention function as keyword arguments.
  - ``attention="sdpa"`` or ``"eager"``: one row per bin, padded, with a
    block-diagonal causal 4D mask ``[rows, 1, L, L]`` (bool for sdpa, additive
    float for eager). transformers 5.19 uses a 4D mask as given
    (``masking_utils._preprocess_mask_arguments``), for every layer: right for
    models whose layers all attend causally to the whole sequence (Llama, Qwen2,
    Ministral3), wrong for sliding-window layers, whose window it replaces.
  - sliding-window models on sdpa/eager (gpt-oss): ``sliding_window=W`` makes
    ``attention_mask`` a dict by layer type, ``{"full_attention": block mask,
    "sliding_attention": block mask within the last W tokens}`` (the window as
    transformers 5.19 draws it, ``masking_utils.sliding_window_overlay``). A model
    with layer types takes such a dict as its per-layer masks as given
    (``GptOssModel.forward``: ``isinstance(attention_mask, dict)``), so the window
    and gpt-oss's attention sinks (a per-query extra logit) stay what they are
    one by one. A single 4D mask would replace the window in the sliding layers,
    and gpt-oss does not pass ``position_ids`` to its mask builders, so leaving
    the mask out does not give per-example masks either (both measured: loss off
    by 6e-3 to 1e-2).

Whether a model can be packed at all on a layout is :func:`packed_layout`'s
answer: layers with a recurrence over the sequence (Qwen3.5's gated delta-net
linear attention and its short convolution) carry state across example
boundaries in transformers' torch path, which takes no sequence boundaries. On
the varlen layout those layers are made to run each example of the packed row on
its own (:func:`split_linear_attention`); on sdpa/eager packing is refused and
the trainer lays out one example per row (right-padded: the recurrence is causal,
trailing padding never reaches a real token) and records why.

Labels are the SFT labels (``-100`` where masked), with the label of each
example's first token set to ``-100``: the model shifts labels by one over the
whole row, and that first label is never a target when the example runs alone,
so masking it keeps the last token of one example from being trained to predict
the first token of the next. A packed batch thus gives exactly the loss of its
examples run one by one.

Every batch carries ``use_cache=False``. In transformers 5.19 a model called
without it builds a ``DynamicCache`` even in training mode, and with a cache
present the mask code skips its detection of packed ``position_ids``
(``masking_utils._preprocess_mask_arguments``): a padding-free row run with sdpa
and no explicit mask then attends across examples without any error (measured
here: logits off by up to 0.5 on a tiny Qwen2). The cache also wastes memory.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100
LAYOUTS = ("varlen", "sdpa", "eager")


@dataclass(frozen=True)
class Layout:
    """How a model's micro-batches are laid out: ``attention`` is the :func:`collate_packed` layout,
    or ``"padded"`` (:func:`collate_padded`, one example per row); ``packing`` whether rows hold several
    examples; ``reason`` why the layout differs from the one asked for (empty when it does not);
    ``sliding_window``: the window of the model's sliding layers, drawn into their own block masks."""

    attention: str
    packing: bool
    reason: str = ""
    sliding_window: int | None = None
    split_linear: bool = False  # run linear-attention layers example by example (:func:`split_linear_attention`)


def layer_types(config: Any) -> list[str]:
    """The layer types of a transformers config (``layer_types``, else ``sliding_attention`` for every layer
    when the config has a ``sliding_window`` in use, else ``full_attention``)."""
    types = list(getattr(config, "layer_types", None) or [])
    if types:
        return types
    n = int(getattr(config, "num_hidden_layers", 0) or 0)
    window = getattr(config, "sliding_window", None)
    sliding = window is not None and getattr(config, "use_sliding_window", True)
    return ["sliding_attention" if sliding else "full_attention"] * n


def packed_layout(config: Any, attention: str, packing: bool = True) -> Layout:
    """The exact layout for a model (its transformers ``config``) on an attention path, or packing refused.

    ``attention`` is the trainer's path: ``varlen`` (padding-free, cu_seq_lens kwargs), ``sdpa`` or ``eager``.

    * Linear-attention layers (``layer_types`` holding ``linear_attention``: Qwen3.5, Qwen3.5-MoE):
      transformers 5.19's torch path of the gated delta-net (``causal_conv1d_fn``,
      ``torch_chunk_gated_delta_rule``) takes no sequence boundaries, so the convolution and the
      recurrent state run from one example into the next (measured: gradients off by up to 1e-2).
      On ``varlen`` the row is packed and ``split_linear`` is set: the trainer makes those layers run
      each ``cu_seq_lens`` segment on its own (:func:`split_linear_attention`, with whatever kernel
      the layer uses) while the attention layers and MLPs run the packed row. On sdpa/eager packing
      is refused: one example per row (right-padded).
    * Sliding-window layers on sdpa/eager (gpt-oss): a block mask per layer type, the sliding one
      within the window (:func:`collate_packed` ``sliding_window``).
    * Otherwise the layout asked for (4D block mask on sdpa/eager, varlen kwargs, which carry
      each layer's ``sliding_window`` and gpt-oss's sinks to the kernel).
    """
    if attention not in LAYOUTS:
        raise ValueError(f"attention must be 'varlen', 'sdpa' or 'eager', got {attention!r}")
    if not packing:
        return Layout("padded", False)
    types = layer_types(config)
    model_type = getattr(config, "model_type", "?")
    if "linear_attention" in types:
        n = types.count("linear_attention")
        if attention == "varlen":
            return Layout("varlen", True, (
                f"{model_type}: {n} of its {len(types)} layers are linear attention (gated delta-net); they run "
                "each packed example on its own (split at cu_seq_lens), the other layers the packed row"),
                split_linear=True)
        return Layout("padded", False, (
            f"packing refused for {model_type} on {attention}: {n} of its {len(types)} layers are linear attention "
            "(gated delta-net) whose convolution and recurrent state would run across example boundaries "
            "(transformers' torch path takes no cu_seqlens); training one example per row (right-padded) instead"))
    if "sliding_attention" in types and attention in ("sdpa", "eager"):
        window = getattr(config, "sliding_window", None)
        if not window:
            raise ValueError(f"{model_type}: sliding_attention layers but no sliding_window in the config")
        return Layout(attention, True, (
            f"{model_type} has sliding-window layers: packed rows get a block mask per layer type, the sliding "
            f"one within {window} tokens (one 4D mask would replace the window)"), sliding_window=int(window))
    return Layout(attention, True)


def pack(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Best-fit-decreasing: bins of example indices whose lengths sum to at most ``max_len``.

    Every index appears in exactly one bin. Items are placed longest first, each
    into the open bin with the least remaining capacity that still fits it (a new
    bin when none does). Ties are broken deterministically, so the same lengths
    always give the same bins. Bins are returned in creation order (fullest,
    longest-item bins first); shuffle them for training.

    Raises ``ValueError`` naming the index and length of an example longer than
    ``max_len`` (or of a length below 1); apply an overlong policy first
    (``cdlib.training.sft.apply_overlong``).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    for i, n in enumerate(lengths):
        if n > max_len:
            raise ValueError(f"example {i} has length {n} > max_len {max_len}; truncate or drop it first")
        if n < 1:
            raise ValueError(f"example {i} has length {n}; lengths must be >= 1")

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # remaining capacity -> stack of bin ids with exactly that much room, and the sorted
    # distinct capacities present (at most max_len + 1 values, so bisect/insert stay cheap)
    by_room: dict[int, list[int]] = {}
    rooms: list[int] = []

    def add_bin(bin_id: int, room: int) -> None:
        if room == 0:
            return  # full: never a candidate again
        stack = by_room.get(room)
        if stack is None:
            by_room[room] = [bin_id]
            bisect.insort(rooms, room)
        else:
            stack.append(bin_id)

    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(rooms, n)
        if k == len(rooms):  # nothing fits: open a new bin
            bins.append([i])
            add_bin(len(bins) - 1, max_len - n)
            continue
        room = rooms[k]
        stack = by_room[room]
        bin_id = stack.pop()
        if not stack:
            del by_room[room]
            del rooms[k]
        bins[bin_id].append(i)
        add_bin(bin_id, room - n)
    return bins


def packing_efficiency(lengths: Sequence[int], bins: Sequence[Sequence[int]], max_len: int) -> float:
    """Share of capacity filled with real tokens: ``sum(lengths) / (len(bins) * max_len)``."""
    if not bins:
        return 0.0
    return sum(lengths[i] for b in bins for i in b) / (len(bins) * max_len)


def check_bins(bins: Sequence[Sequence[int]], lengths: Sequence[int], max_len: int) -> None:
    """Raise ``ValueError`` unless every index appears exactly once and no bin overflows."""
    seen = [0] * len(lengths)
    for b, members in enumerate(bins):
        total = sum(lengths[i] for i in members)
        if total > max_len:
            raise ValueError(f"bin {b} holds {total} tokens > max_len {max_len}")
        for i in members:
            seen[i] += 1
    missing = [i for i, c in enumerate(seen) if c == 0]
    repeated = [i for i, c in enumerate(seen) if c > 1]
    if missing or repeated:
        raise ValueError(f"bins are not a partition: missing {missing[:10]}, repeated {repeated[:10]}")


# --------------------------------------------------------------------------- batches


def _block_causal_mask(segment_lengths: list[list[int]], row_len: int, dtype: torch.dtype,
                       window: int | None = None) -> torch.Tensor:
    """``[rows, 1, row_len, row_len]`` causal mask that only lets a token see its own segment.

    ``segment_lengths[r]`` lists the lengths of the segments laid end to end in
    row ``r`` (examples, then padding as its own segment so no row is fully
    masked). Bool: True = attend (sdpa). Float: 0 = attend, dtype min = masked.
    ``window``: a token sees itself and at most ``window - 1`` tokens before it.
    """
    rows = len(segment_lengths)
    seg_ids = torch.empty(rows, row_len, dtype=torch.long)
    for r, segs in enumerate(segment_lengths):
        seg_ids[r] = torch.repeat_interleave(torch.arange(len(segs)), torch.tensor(segs))
    return _segment_mask(seg_ids, dtype, window)


def _segment_mask(seg_ids: torch.Tensor, dtype: torch.dtype, window: int | None) -> torch.Tensor:
    """The block-diagonal causal mask of rows of segment ids ``[rows, L]``, on their device."""
    row_len = seg_ids.shape[-1]
    same = seg_ids[:, :, None] == seg_ids[:, None, :]
    causal = torch.ones(row_len, row_len, dtype=torch.bool, device=seg_ids.device).tril()
    if window is not None:
        causal = causal.triu(-(window - 1))
    allowed = (same & causal)[:, None]
    if dtype == torch.bool:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=seg_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def block_mask_from_positions(position_ids: torch.Tensor, layout: Layout,
                              mask_dtype: torch.dtype | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
    """The ``attention_mask`` :func:`collate_packed` builds for ``layout`` (sdpa/eager), derived from the batch's
    ``position_ids`` ``[rows, L]`` where they are (on the GPU: no ``L x L`` mask built on the host and copied).

    Every example, and the padding of a row, starts at position 0, so a segment begins where the
    position is 0; the result equals the collated mask element for element.
    """
    dtype = mask_dtype or (torch.bool if layout.attention == "sdpa" else torch.float32)
    seg_ids = (position_ids == 0).cumsum(-1)
    mask = _segment_mask(seg_ids, dtype, None)
    if layout.sliding_window is None:
        return mask
    return {"full_attention": mask, "sliding_attention": _segment_mask(seg_ids, dtype, layout.sliding_window)}


def collate_packed(
    examples: Sequence[dict[str, Any]],
    bins: Sequence[Sequence[int]],
    *,
    attention: str = "sdpa",
    pad_id: int = 0,
    pad_to: int | None = None,
    mask_dtype: torch.dtype | None = None,
    sliding_window: int | None = None,
    build_mask: bool = True,
) -> dict[str, Any]:
    """One micro-batch from ``bins`` (lists of indices into ``examples``).

    ``examples`` are dicts with ``input_ids`` and ``labels`` (``cdlib.training.sft``).
    Returns tensors ready for ``model(**batch)``: ``input_ids``, ``labels``,
    ``position_ids`` (restarting at 0 per example), ``use_cache=False`` and

    * ``attention="varlen"``: every bin concatenated into one row ``[1, total]``
      (no padding at all) plus ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32 cumulative
      example lengths; ``cu_seq_lens_host`` the same as a tuple of ints) and
      ``max_length_q``/``max_length_k`` (int), the varlen
      kwargs of transformers' flash-attention path (and of :func:`sdpa_varlen_attention`). ``pad_to`` is ignored.
    * ``attention="sdpa"`` / ``"eager"``: one row per bin, padded with ``pad_id``
      to the longest bin (or to ``pad_to``), and ``attention_mask``, a 4D
      block-diagonal causal mask (bool for sdpa, additive float32 for eager
      unless ``mask_dtype`` says otherwise). Padding gets label ``-100`` and
      attends only to itself.
    * ``sliding_window`` (sdpa/eager): ``attention_mask`` is a dict by layer type,
      ``full_attention`` the block mask above and ``sliding_attention`` the same
      limited to the last ``sliding_window`` tokens (for models with sliding layers).
    * ``build_mask=False`` (sdpa/eager): no ``attention_mask``; the trainer derives it on the device
      from ``position_ids`` (:func:`block_mask_from_positions`).
    """
    if attention not in LAYOUTS:
        raise ValueError(f"attention must be one of {', '.join(LAYOUTS)}, got {attention!r}")
    rows_ids: list[list[int]] = []
    rows_labels: list[list[int]] = []
    rows_pos: list[list[int]] = []
    rows_segs: list[list[int]] = []
    for members in bins:
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        segs: list[int] = []
        for i in members:
            ex = examples[i]
            n = len(ex["input_ids"])
            if len(ex["labels"]) != n:
                raise ValueError(f"example {ex.get('id', i)!r}: {len(ex['labels'])} labels for {n} input_ids")
            ids += ex["input_ids"]
            # the first token is never a target when the example runs alone; masking it here
            # keeps the previous example's last token from predicting it across the boundary
            labels += [IGNORE_INDEX, *ex["labels"][1:]]
            pos += range(n)
            segs.append(n)
        rows_ids.append(ids)
        rows_labels.append(labels)
        rows_pos.append(pos)
        rows_segs.append(segs)

    if attention == "varlen":
        seg_lens = [n for segs in rows_segs for n in segs]
        bounds = (0, *itertools.accumulate(seg_lens))
        cu = torch.tensor(bounds, dtype=torch.int32)
        longest = max(seg_lens)
        return {
            "input_ids": torch.tensor([[t for row in rows_ids for t in row]]),
            "labels": torch.tensor([[t for row in rows_labels for t in row]]),
            "position_ids": torch.tensor([[p for row in rows_pos for p in row]]),
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "cu_seq_lens_host": bounds,  # the same bounds on the host, for sdpa_varlen_attention: no device read
            "max_length_q": longest,
            "max_length_k": longest,
            "use_cache": False,
        }

    row_len = max(len(r) for r in rows_ids)
    if pad_to is not None:
        if pad_to < row_len:
            raise ValueError(f"pad_to {pad_to} is shorter than the longest bin ({row_len} tokens)")
        row_len = pad_to
    for ids, labels, pos, segs in zip(rows_ids, rows_labels, rows_pos, rows_segs):
        n_pad = row_len - len(ids)
        if n_pad:
            ids += [pad_id] * n_pad
            labels += [IGNORE_INDEX] * n_pad
            pos += range(n_pad)
            segs.append(n_pad)
    batch = {
        "input_ids": torch.tensor(rows_ids),
        "labels": torch.tensor(rows_labels),
        "position_ids": torch.tensor(rows_pos),
        "use_cache": False,
    }
    if not build_mask:
        return batch
    if mask_dtype is None:
        mask_dtype = torch.bool if attention == "sdpa" else torch.float32
    mask = _block_causal_mask(rows_segs, row_len, mask_dtype)
    if sliding_window is not None:
        mask = {"full_attention": mask,
                "sliding_attention": _block_causal_mask(rows_segs, row_len, mask_dtype, sliding_window)}
    return {**batch, "attention_mask": mask}


def collate_padded(examples: Sequence[dict[str, Any]], *, pad_id: int = 0) -> dict[str, Any]:
    """Unpacked baseline: one example per row, right-padded to the longest, with a 2D padding mask."""
    row_len = max(len(ex["input_ids"]) for ex in examples)
    ids, labels, mask = [], [], []
    for ex in examples:
        n_pad = row_len - len(ex["input_ids"])
        ids.append(list(ex["input_ids"]) + [pad_id] * n_pad)
        labels.append(list(ex["labels"]) + [IGNORE_INDEX] * n_pad)
        mask.append([1] * len(ex["input_ids"]) + [0] * n_pad)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask),
            "use_cache": False}


def supervised_tokens(batch: dict[str, Any]) -> int:
    """Number of tokens that carry loss in a batch (after the model's one-token shift)."""
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


def collate(examples: Sequence[dict[str, Any]], bins: Sequence[Sequence[int]], layout: Layout,
            pad_id: int = 0, build_mask: bool = True) -> dict[str, Any]:
    """A micro-batch in ``layout`` (:func:`packed_layout`): packed rows, or one example per row when
    packing is off or refused (every bin is then a single example). ``build_mask=False``: packed
    sdpa/eager rows come without their block mask (:func:`block_mask_from_positions` derives it)."""
    if not layout.packing:
        if any(len(b) != 1 for b in bins):
            raise ValueError(f"layout {layout.attention!r} does not pack: bins must hold one example each")
        return collate_padded([examples[b[0]] for b in bins], pad_id=pad_id)
    return collate_packed(examples, bins, attention=layout.attention, pad_id=pad_id,
                          sliding_window=layout.sliding_window if layout.attention != "varlen" else None,
                          build_mask=build_mask)


def compare_to_one_by_one(model: Any, examples: Sequence[dict[str, Any]], bins: Sequence[Sequence[int]],
                          layout: Layout, pad_id: int = 0) -> dict[str, float]:
    """Loss and gradients of ``examples`` laid out in ``layout`` against each example run alone.

    Both sides compute the summed next-token cross-entropy over supervised tokens divided by their
    total count, in fp32, and backpropagate it. Returns ``loss`` (the reference), ``loss_diff`` and
    ``grad_diff`` (largest absolute difference over every parameter's gradient). The reference runs
    each example as the only row, with no mask and default positions. Dropout should be off
    (``model.eval()``). The check the per-family tests (and a GPU run) make of every layout.
    """
    import torch.nn.functional as F

    def summed(logits, labels):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")

    device = next(model.parameters()).device
    n = sum(sum(1 for x in ex["labels"][1:] if x != IGNORE_INDEX) for ex in examples)
    model.zero_grad(set_to_none=True)
    ref = 0.0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]], device=device)
        loss = summed(model(input_ids=ids, use_cache=False).logits, torch.tensor([ex["labels"]], device=device)) / n
        loss.backward()
        ref += float(loss.detach())
    ref_grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
             for k, v in collate(examples, bins, layout, pad_id).items()}
    labels = batch.pop("labels")
    loss = summed(model(**batch).logits, labels) / n
    loss.backward()
    grad_diff = max((float((p.grad - ref_grads[k]).abs().max()) for k, p in model.named_parameters()
                     if p.grad is not None and k in ref_grads), default=0.0)
    return {"loss": ref, "loss_diff": abs(float(loss.detach()) - ref), "grad_diff": grad_diff}


SDPA_VARLEN = "cdlib_sdpa_varlen"


def segment_bounds(kwargs: dict[str, Any]) -> list[int] | tuple[int, ...]:
    """A packed varlen row's example boundaries as ints: ``cu_seq_lens_host`` (:func:`collate_packed`
    puts it in the batch, no device read), else ``cu_seq_lens_q`` read back once."""
    return kwargs.get("cu_seq_lens_host") or kwargs["cu_seq_lens_q"].tolist()


def sdpa_varlen_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          sliding_window: int | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention over a padding-free packed row, one ``cu_seq_lens_q`` segment at a time, with torch's sdpa.

    The attention function registered as ``attn_implementation="cdlib_sdpa_varlen"``
    (:func:`register_sdpa_varlen`): what flash-attention's varlen kernel does on a GPU, for sdpa on any
    device. Each example attends causally to itself only (``is_causal`` sdpa, or a banded mask within
    ``sliding_window`` for a sliding layer longer than its window), so a packed row costs the sum of its
    examples' squared lengths instead of the square of the row: on the demo's 1,024-token rows of ~130-token
    examples the block-mask path spent half of each training step in attention (``benchmarks/README.md``).
    Exact by construction: the same per-example causal attention as the examples run one by one.

    A call without ``cu_seq_lens_q`` (one example per row, right-padded; generation) is one causal
    segment per row: right padding comes after every real token, so no real token sees it. transformers
    builds no mask for this function, so left-padded batches are not for it; attention sinks (gpt-oss's
    ``s_aux``) are refused: use sdpa or eager there. The segment bounds come from the batch's
    ``cu_seq_lens_host`` (:func:`segment_bounds`), so no layer reads the device.
    """
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"{SDPA_VARLEN}: attention sinks (gpt-oss) are not supported; use attn_implementation "
                         "'eager' (its packed rows get per-layer block masks)")
    cu = kwargs.get("cu_seq_lens_q")
    length = query.shape[2]
    if cu is None:
        bounds = [(0, length)]
    else:
        if query.shape[0] != 1:
            raise ValueError(f"{SDPA_VARLEN}: a packed row has batch size 1, got {query.shape[0]}")
        edges = segment_bounds(kwargs)
        bounds = list(zip(edges[:-1], edges[1:]))
    gqa = query.shape[1] != key.shape[1]
    drop = dropout if module.training else 0.0
    parts = []
    for s, e in bounds:
        mask = None
        if sliding_window is not None and e - s > sliding_window:
            mask = torch.ones(e - s, e - s, dtype=torch.bool, device=query.device).tril().triu(-(sliding_window - 1))
        parts.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], attn_mask=mask, is_causal=mask is None,
            dropout_p=drop, scale=scaling, enable_gqa=gqa))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2).contiguous(), None


def register_sdpa_varlen() -> str:
    """Register :func:`sdpa_varlen_attention` with transformers' attention interface (idempotent); returns
    its ``attn_implementation`` name. No mask function is registered for it, so transformers builds no
    ``L x L`` mask for a packed row (``masking_utils._preprocess_mask_arguments`` skips unknown names)."""
    from transformers import AttentionInterface

    AttentionInterface.register(SDPA_VARLEN, sdpa_varlen_attention)
    return SDPA_VARLEN


def split_linear_attention(model: Any) -> int:
    """Make every linear-attention module (``*.linear_attn``: Qwen3.5's gated delta-net) of ``model`` run
    a packed varlen row one ``cu_seq_lens_q`` segment at a time; returns how many were changed.

    Each segment goes through the module's own forward (its torch path or the fla / causal-conv1d
    kernels, whichever it uses) as a sequence of its own, with no mask and no cache, and the outputs
    are concatenated: the convolution and the recurrent state start afresh at every example, as when
    the examples run one by one. Calls without ``cu_seq_lens_q`` (unpacked rows, generation with a
    cache) go through unchanged. Idempotent.
    """
    count = 0
    for name, module in model.named_modules():
        if not name.endswith("linear_attn") or getattr(module, "_cdlib_split", False):
            continue

        def forward(hidden_states, cache_params=None, attention_mask=None, _orig=module.forward, **kwargs):
            cu = kwargs.get("cu_seq_lens_q")
            if cu is None or cache_params is not None:
                return _orig(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)
            rest = {k: v for k, v in kwargs.items()
                    if k not in ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seq_lens_host", "max_length_q", "max_length_k",
                                 "position_ids")}
            if hidden_states.shape[0] != 1:
                raise ValueError(f"{name}: a varlen row has batch size 1, got {hidden_states.shape[0]}")
            bounds = segment_bounds(kwargs)
            parts = [_orig(hidden_states[:, s:e], cache_params=None, attention_mask=None, **rest)
                     for s, e in zip(bounds[:-1], bounds[1:])]
            return torch.cat(parts, dim=1)

        module.forward = forward
        module._cdlib_split = True
        count += 1
    return count

