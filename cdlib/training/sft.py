"""SFT examples: ``User: q -> Assistant: <think>t</think> a`` in the student's own chat format.

Paper section 3.3: the student is trained on ``<think> t~ </think> a`` where the
trace ``t~`` is the raw teacher trace, a compressor's output or a length-matched
truncation. Answer-only (section 3.3, Appendix H.3) removes the whole think block:
``answer_only_think="none"`` (the paper; TrainParams default) trains on the answer alone, per chat format
(:func:`format_texts`); ``"empty"`` keeps an empty closed block instead,
with next-token loss on assistant tokens only (Axolotl ``train_on_eot: turn``:
the end-of-turn token is trained too).

Chat formats (``chat_format``, ``"auto"`` detects from the tokenizer's template):

* ``qwen``: ChatML templates with ``<think>``; the trace is passed as the
  message's ``reasoning_content``. Templates that pre-fill ``<think>`` in the
  generation prompt or hide reasoning in rendered assistant turns are detected,
  and the completion is then rebuilt so that the trained text is exactly the
  generation prompt the model sees at inference followed by what it should
  generate there.
* ``llama3`` (and any other template without a reasoning field): the think tags
  travel as plain text inside the assistant content.
* ``harmony`` (gpt-oss): the trace goes in the ``analysis`` channel through the
  message's ``thinking`` field, the answer in the ``final`` channel.
* ``plain``: no chat template: ``User: q\\nAssistant: <think>\\nt\\n</think>\\n\\na<eos>``.

The prompt is always tokenized on its own (as an inference engine does with the
rendered generation prompt) and the completion after it. Each example is a dict:

``id``, ``input_ids``, ``labels`` (``-100`` where masked; the first token is
always masked since it is never a target), ``spans`` (``{"prompt": [s, e],
"cot": [s, e], "answer": [s, e]}`` token offsets; ``cot`` holds the think block
with its tags, ``answer`` the rest of the turn including the end-of-turn token),
``format``, ``source``, ``eot_id``, ``cot_close`` (the text that closes the think
block: ``</think>``, or ``<|end|>`` for harmony's analysis message), ``loss_on``
and ``cut`` (``None``, ``"ratio"`` for a Distilling-the-Essence sequence cut,
``"seq_len"`` for the ``overlong="truncate"`` policy).

:func:`audit` checks a built dataset before training and shows a few examples
with their supervised tokens marked.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from typing import Any

from cdlib.prompts import build_prompt
from cdlib.tokenizer import decode_prefix

IGNORE_INDEX = -100
SECTIONS = ("prompt", "cot", "answer")
FORMATS = ("qwen", "llama3", "harmony", "plain")

# Placeholders rendered through the template in place of the real trace and answer, so a
# template that strips or rewrites content cannot corrupt the texts (they are put back after).
_THINK = "\u2063COTPLACEHOLDER\u2063"
_ANSWER = "\u2063ANSWERPLACEHOLDER\u2063"
_THINK_OPEN = "<think>\n"
_THINK_CLOSE = "</think>"


class SFTError(ValueError):
    """A record cannot be turned into an example; the message names the record id."""


class AuditError(ValueError):
    """The mask audit found examples that must not be trained on; the message names them."""


def detect_format(tokenizer: Any) -> str:
    """Chat format of a tokenizer from its template: harmony, llama3, qwen or plain (no template).

    A template of another family that is not recognised is handled like
    ``llama3`` (think tags inside the assistant content), which works for any
    template that renders the content as given.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return "plain"
    if isinstance(template, dict):  # named templates: use the default one
        template = template.get("default") or next(iter(template.values()))
    if "<|channel|>" in template:
        return "harmony"
    if "<|im_start|>" in template or "reasoning_content" in template or "<think>" in template:
        return "qwen"
    return "llama3"


# --------------------------------------------------------------------------- texts


def _prompt_of(record: dict[str, Any]) -> str:
    if isinstance(record.get("prompt"), str):
        return record["prompt"]
    try:
        return build_prompt(record)
    except Exception as e:
        raise SFTError(f"record {record.get('id')!r}: cannot build the user prompt: {e}") from e


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation: bool,
            kwargs: dict[str, Any] | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **(kwargs or {}))


def _answer_tail(tokenizer: Any, user: dict[str, str], kwargs: dict[str, Any] | None) -> str:
    """What the template puts after the answer to end the turn (e.g. ``<|im_end|>``)."""
    full = _render(tokenizer, [user, {"role": "assistant", "content": _ANSWER}], False, kwargs)
    if _ANSWER not in full:
        raise SFTError("the chat template does not render the assistant content")
    return full.split(_ANSWER, 1)[1].rstrip()


def _template_tail(tokenizer: Any, fmt: str, user: dict[str, str], prompt: str,
                   kwargs: dict[str, Any] | None) -> str | None:
    """The completion as the template renders it, with placeholders; None if the template hides it.

    Returns ``full[len(prompt):]`` when the full conversation starts with the
    generation prompt and contains the trace placeholder exactly once, before
    the answer placeholder.
    """
    if fmt == "qwen":
        candidates = [
            {"role": "assistant", "content": _ANSWER, "reasoning_content": _THINK},
            {"role": "assistant", "content": f"{_THINK_OPEN}{_THINK}\n{_THINK_CLOSE}\n\n{_ANSWER}"},
        ]
    elif fmt == "harmony":
        candidates = [
            {"role": "assistant", "content": _ANSWER, "thinking": _THINK},
            {"role": "assistant", "content": _ANSWER, "reasoning_content": _THINK},
        ]
    else:  # llama3 and unknown templates: think tags as plain text in the content
        candidates = [{"role": "assistant", "content": f"{_THINK_OPEN}{_THINK}\n{_THINK_CLOSE}\n\n{_ANSWER}"}]
    for message in candidates:
        full = _render(tokenizer, [user, message], False, kwargs)
        if not full.startswith(prompt):
            continue
        tail = full[len(prompt):]
        if tail.count(_THINK) == 1 and tail.count(_ANSWER) == 1 and tail.index(_THINK) < tail.index(_ANSWER):
            return tail.rstrip()
    return None


def _answer_only_texts(tokenizer: Any, fmt: str, question: str, answer: str, rid: Any,
                       kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
    """Texts of an answer-only example without a think block (see :func:`format_texts`); None when the
    template opens or renders a think block for every assistant turn."""
    done = {"cot_end": 0, "format": fmt, "cot_close": None}
    if fmt == "plain":
        return {"prompt": f"{tokenizer.bos_token or ''}User: {question}\nAssistant: ",
                "completion": f"{answer}{tokenizer.eos_token or ''}", **done}
    if not getattr(tokenizer, "chat_template", None):
        raise SFTError(f"record {rid!r}: chat_format {fmt!r} needs a tokenizer with a chat template")
    user = {"role": "user", "content": question}
    prompt = _render(tokenizer, [user], True, kwargs)
    full = _render(tokenizer, [user, {"role": "assistant", "content": _ANSWER}], False, kwargs)
    tail = full[len(prompt):].rstrip() if full.startswith(prompt) else None
    opens = ("<think>", "<|channel|>analysis")
    if tail is not None and tail.count(_ANSWER) == 1 and not any(t in tail for t in (*opens, _THINK_CLOSE)):
        return {"prompt": prompt, "completion": tail.replace(_ANSWER, answer), **done}
    if prompt.rstrip().endswith(_THINK_CLOSE):  # the template's non-thinking prompt holds the closed empty block
        return {"prompt": prompt, "completion": f"{answer}{_answer_tail(tokenizer, user, kwargs)}", **done}
    return None  # the template opens or renders a think block for every turn: see format_texts


def format_texts(
    record: dict[str, Any],
    tokenizer: Any,
    *,
    source: str = "raw",
    chat_format: str = "auto",
    reasoning_key: str = "reasoning",
    chat_template_kwargs: dict[str, Any] | None = None,
    answer_only_think: str = "empty",
) -> dict[str, Any]:
    """Prompt and completion texts of one record, and where the think block ends.

    Returns ``{"prompt", "completion", "cot_end", "format", "cot_close"}`` where
    ``prompt`` is the rendered generation prompt (what the model sees at
    inference), ``completion`` what it should generate after it (think block,
    answer, end-of-turn marker) and ``cot_end`` the character offset in
    ``completion`` just after the think block's closing marker.
    ``source="answer_only"`` with ``answer_only_think="empty"`` keeps the think block,
    empty and closed; with ``"none"`` (the paper: the whole block is stripped) the
    completion is the answer and the end of turn, as the template renders an
    assistant turn without reasoning: ``plain`` ``User: q\nAssistant: a<eos>``,
    ``llama3`` the answer as content, ``harmony`` the ``final`` channel alone, ``qwen``
    the answer after the generation prompt; then ``cot_close`` is None and ``cot_end`` 0.
    A template whose generation prompt opens a think block (Qwen3.5's ``<think>\n``) leaves
    no way to remove it: as the paper trains with the template inherited from the tokenizer
    (H.3, through Axolotl, which renders the answer-only conversation through it) and
    evaluates with the training template (section 4), the completion closes the block the
    prompt opened, empty, before the answer, what ``"empty"`` trains. The template's
    non-thinking prompt (``chat_template_kwargs: {enable_thinking: false}``, which closes the
    empty block inside the prompt, never trained) is an option off in paper mode
    (``x-non-thinking-answer-only`` in params/paper.yaml); evaluation must then render the
    same prompt.
    ``chat_template_kwargs`` go to every ``apply_chat_template`` call; pass the
    same ones the evaluation engine uses (``EngineParams.chat_template_kwargs``).
    """
    rid = record.get("id")
    if "answer" not in record or record["answer"] is None:
        raise SFTError(f"record {rid!r}: missing 'answer'")
    answer = str(record["answer"]).strip()
    if source == "answer_only":
        thought = ""
    else:
        if record.get(reasoning_key) is None:
            raise SFTError(f"record {rid!r}: missing {reasoning_key!r} (the trace) for source {source!r}")
        thought = str(record[reasoning_key]).strip()
    question = _prompt_of(record)

    fmt = detect_format(tokenizer) if chat_format == "auto" else chat_format
    if fmt not in FORMATS:
        raise SFTError(f"record {rid!r}: unknown chat_format {chat_format!r}; known: auto, {', '.join(FORMATS)}")
    if answer_only_think not in ("none", "empty"):
        raise SFTError(f"record {rid!r}: answer_only_think must be 'none' (paper) or 'empty', got "
                       f"{answer_only_think!r}")
    if source == "answer_only" and answer_only_think == "none":
        texts = _answer_only_texts(tokenizer, fmt, question, answer, rid, chat_template_kwargs)
        if texts is not None:
            return texts
        # the template forces a think block: as Axolotl renders the answer-only conversation through it, the
        # block it renders (empty, closed) is part of the answer-only data
    cot_close = "<|end|>" if fmt == "harmony" else _THINK_CLOSE

    if fmt == "plain":
        prompt = f"{tokenizer.bos_token or ''}User: {question}\nAssistant: "
        tail = f"{_THINK_OPEN}{_THINK}\n{_THINK_CLOSE}\n\n{_ANSWER}{tokenizer.eos_token or ''}"
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise SFTError(f"record {rid!r}: chat_format {fmt!r} needs a tokenizer with a chat template")
        user = {"role": "user", "content": question}
        prompt = _render(tokenizer, [user], True, chat_template_kwargs)
        tail = _template_tail(tokenizer, fmt, user, prompt, chat_template_kwargs)
        if tail is None:
            if fmt == "harmony":
                raise SFTError(f"record {rid!r}: the harmony template does not render the analysis channel of "
                               "the last turn")
            # The template hides reasoning (or pre-fills the think tag so the rendered
            # conversation no longer starts with the generation prompt): rebuild the
            # completion the model must generate after the generation prompt.
            eot = _answer_tail(tokenizer, user, chat_template_kwargs)
            if prompt.rstrip().endswith(_THINK_CLOSE):
                # the generation prompt holds a closed (empty) think block, e.g. enable_thinking=False
                if thought:
                    raise SFTError(f"record {rid!r}: the generation prompt already closes the think block "
                                   f"(chat_template_kwargs {chat_template_kwargs}); only answer_only fits it")
                answer_text = f"{answer}{eot}"
                return {"prompt": prompt, "completion": answer_text, "cot_end": 0, "format": fmt,
                        "cot_close": cot_close}
            opened = prompt.endswith(_THINK_OPEN) or prompt.endswith(_THINK_OPEN.strip())
            head = "" if opened else _THINK_OPEN
            tail = f"{head}{_THINK}\n{_THINK_CLOSE}\n\n{_ANSWER}{eot}"

    before, after = tail.split(_THINK)
    close_at = after.find(cot_close)
    if close_at < 0:
        raise SFTError(f"record {rid!r}: the {fmt} completion does not close the think block with {cot_close!r}")
    cot_text = before + thought + after[: close_at + len(cot_close)]
    answer_text = after[close_at + len(cot_close):].replace(_ANSWER, answer)
    return {
        "prompt": prompt,
        "completion": cot_text + answer_text,
        "cot_end": len(cot_text),
        "format": fmt,
        "cot_close": cot_close,
    }


# --------------------------------------------------------------------------- tokens


def _labels(input_ids: list[int], spans: dict[str, list[int]], loss_on: Iterable[str]) -> list[int]:
    labels = [IGNORE_INDEX] * len(input_ids)
    for section in loss_on:
        s, e = spans[section]
        labels[s:e] = input_ids[s:e]
    if labels:
        labels[0] = IGNORE_INDEX  # never a target (nothing precedes it); keeps packing exact
    return labels


def _tokenize(tokenizer: Any, texts: dict[str, Any], rid: Any) -> tuple[list[int], dict[str, list[int]], int]:
    prompt_ids = tokenizer(texts["prompt"], add_special_tokens=False)["input_ids"]
    enc = tokenizer(texts["completion"], add_special_tokens=False, return_offsets_mapping=True)
    comp_ids = enc["input_ids"]
    if not comp_ids:
        raise SFTError(f"record {rid!r}: empty completion")
    ends = [end for _, end in enc["offset_mapping"]]
    n_cot = bisect.bisect_right(ends, texts["cot_end"])  # a token straddling the boundary goes to the answer
    p, n = len(prompt_ids), len(prompt_ids) + len(comp_ids)
    spans = {"prompt": [0, p], "cot": [p, p + n_cot], "answer": [p + n_cot, n]}
    return prompt_ids + comp_ids, spans, comp_ids[-1]


def build_example(
    record: dict[str, Any],
    tokenizer: Any,
    *,
    source: str = "raw",
    chat_format: str = "auto",
    loss_on: Sequence[str] = ("cot", "answer"),
    truncate_ratio: float | None = None,
    truncate_span: str = "sequence",
    reasoning_key: str = "reasoning",
    chat_template_kwargs: dict[str, Any] | None = None,
    answer_only_think: str = "empty",
) -> dict[str, Any]:
    """One training example (see the module docstring for its keys).

    ``loss_on`` picks the supervised sections (Distilling the Essence).
    ``truncate_ratio`` keeps the first X of the tokens: of the whole sequence
    (``truncate_span="sequence"``: ``int(X * n)`` of its ``n`` tokens, at least 2, the cut
    of that paper's public code; the example then ends mid-turn and is marked
    ``cut="ratio"``), or of the trace only (``"reasoning"``: the trace is cut at
    a token boundary and the think block is closed and the answer kept).
    """
    rid = record.get("id")
    bad = [s for s in loss_on if s not in SECTIONS]
    if bad or not loss_on:
        raise SFTError(f"record {rid!r}: loss_on must be a non-empty subset of {SECTIONS}, got {list(loss_on)}")
    if truncate_ratio is not None and not 0 < truncate_ratio <= 1:
        raise SFTError(f"record {rid!r}: truncate_ratio must be in (0, 1], got {truncate_ratio}")
    if truncate_span not in ("sequence", "reasoning"):
        raise SFTError(f"record {rid!r}: truncate_span must be 'sequence' or 'reasoning', got {truncate_span!r}")

    if truncate_ratio is not None and truncate_span == "reasoning" and source != "answer_only":
        trace = str(record.get(reasoning_key) or "").strip()
        trace_ids = tokenizer(trace, add_special_tokens=False)["input_ids"]
        keep = math.ceil(truncate_ratio * len(trace_ids))
        record = {**record, reasoning_key: decode_prefix(tokenizer, trace_ids[:keep]).strip()}

    texts = format_texts(record, tokenizer, source=source, chat_format=chat_format, reasoning_key=reasoning_key,
                         chat_template_kwargs=chat_template_kwargs, answer_only_think=answer_only_think)
    input_ids, spans, eot_id = _tokenize(tokenizer, texts, rid)
    cut = None
    if truncate_ratio is not None and truncate_span == "sequence" and truncate_ratio < 1:
        keep = max(2, int(truncate_ratio * len(input_ids)))  # rounded down, as Distilling the Essence's code cuts
        input_ids, spans, cut = input_ids[:keep], _clip_spans(spans, keep), "ratio"
    return {
        "id": rid,
        "input_ids": input_ids,
        "labels": _labels(input_ids, spans, loss_on),
        "spans": spans,
        "format": texts["format"],
        "source": source,
        "eot_id": eot_id,
        "cot_close": texts["cot_close"],
        "loss_on": list(loss_on),
        "cut": cut,
    }


def _clip_spans(spans: dict[str, list[int]], keep: int) -> dict[str, list[int]]:
    return {k: [min(s, keep), min(e, keep)] for k, (s, e) in spans.items()}


def apply_overlong(examples: list[dict[str, Any]], max_len: int,
                   policy: str = "error") -> tuple[list[dict[str, Any]], list[Any]]:
    """Enforce the sequence length: ``error`` (ValueError naming the id and length), ``truncate``
    (cut to ``max_len``, marked ``cut="seq_len"``) or ``drop``. Returns (examples, ids affected)."""
    if policy not in ("error", "truncate", "drop"):
        raise ValueError(f"overlong policy must be 'error', 'truncate' or 'drop', got {policy!r}")
    kept, affected = [], []
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if n <= max_len:
            kept.append(ex)
            continue
        affected.append(ex.get("id", i))
        if policy == "error":
            raise ValueError(
                f"example {i} (id {ex.get('id')!r}) has length {n} > seq_len {max_len}; "
                "set overlong to 'truncate' or 'drop', or raise seq_len"
            )
        if policy == "truncate":
            cut_labels = list(ex["labels"][:max_len])
            kept.append({**ex, "input_ids": ex["input_ids"][:max_len], "labels": cut_labels,
                         "spans": _clip_spans(ex["spans"], max_len), "cut": "seq_len"})
    return kept, affected


def build_examples(
    records: Iterable[dict[str, Any]],
    tokenizer: Any,
    *,
    source: str = "raw",
    chat_format: str = "auto",
    loss_on: Sequence[str] = ("cot", "answer"),
    truncate_ratio: float | None = None,
    truncate_span: str = "sequence",
    max_len: int | None = None,
    overlong: str = "error",
    reasoning_key: str = "reasoning",
    chat_template_kwargs: dict[str, Any] | None = None,
    answer_only_think: str = "empty",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Examples for all records, with the overlong policy applied at ``max_len``.

    Returns ``(examples, info)``; ``info`` has ``n_records``, ``n_examples``,
    ``overlong_ids`` (truncated or dropped) and ``tokens`` (:func:`section_tokens`).
    """
    examples = [
        build_example(r, tokenizer, source=source, chat_format=chat_format, loss_on=loss_on,
                      truncate_ratio=truncate_ratio, truncate_span=truncate_span, reasoning_key=reasoning_key,
                      chat_template_kwargs=chat_template_kwargs, answer_only_think=answer_only_think)
        for r in records
    ]
    n_records = len(examples)
    affected: list[Any] = []
    if max_len is not None:
        examples, affected = apply_overlong(examples, max_len, overlong)
    info = {"n_records": n_records, "n_examples": len(examples), "overlong": overlong,
            "overlong_ids": affected, "tokens": section_tokens(examples)}
    return examples, info


def build_dataset(
    records: Iterable[dict[str, Any]], tokenizer: Any, params: Any, chat_template_kwargs: dict[str, Any] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """:func:`build_examples` driven by a ``cdlib.params.TrainParams``."""
    return build_examples(
        records, tokenizer, source=params.source, chat_format=params.chat_format, loss_on=params.loss_on,
        truncate_ratio=params.truncate_ratio, truncate_span=params.truncate_span,
        max_len=params.seq_len, overlong=params.overlong, chat_template_kwargs=chat_template_kwargs,
        answer_only_think=getattr(params, "answer_only_think", "none"),
    )


def section_tokens(examples: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Token counts per section (``prompt``/``cot``/``answer``), in total and supervised."""
    counts = {f"{k}_{s}": 0 for k in ("total", "supervised") for s in SECTIONS}
    for ex in examples:
        labels = ex["labels"]
        for s in SECTIONS:
            a, b = ex["spans"][s]
            counts[f"total_{s}"] += b - a
            counts[f"supervised_{s}"] += sum(1 for x in labels[a:b] if x != IGNORE_INDEX)
    counts["total"] = sum(counts[f"total_{s}"] for s in SECTIONS)
    counts["supervised"] = sum(counts[f"supervised_{s}"] for s in SECTIONS)
    return counts


# --------------------------------------------------------------------------- audit


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def _supervised_view(example: dict[str, Any], tokenizer: Any, max_chars: int) -> str:
    """The example decoded, with supervised runs wrapped in ⟦ ⟧ and long runs shortened."""
    ids, labels = example["input_ids"], example["labels"]
    parts, start = [], 0
    while start < len(ids):
        on = labels[start] != IGNORE_INDEX
        end = start
        while end < len(ids) and (labels[end] != IGNORE_INDEX) == on:
            end += 1
        text = _decode(tokenizer, ids[start:end])
        if len(text) > max_chars:
            half = max_chars // 2
            text = f"{text[:half]} …[{len(text) - max_chars} chars]… {text[-half:]}"
        parts.append(f"⟦{text}⟧" if on else text)
        start = end
    return "".join(parts)


def audit(
    examples: Sequence[dict[str, Any]],
    tokenizer: Any,
    n_show: int = 3,
    *,
    max_len: int | None = None,
    allow_cut: bool = False,
    max_chars: int = 400,
) -> str:
    """Check the loss masks of a built dataset and show a few examples; raise :class:`AuditError`.

    Checked on every example (the error lists the offending ids, up to 10 per problem):

    * the mask is not all zero (some label is not ``-100``);
    * unless the example was cut, its last token is the end-of-turn token and is
      supervised (when ``answer`` is in its ``loss_on``);
    * unless cut, its think block is closed: the ``cot`` span ends with
      ``</think>`` (``<|end|>`` for harmony), also for answer-only examples whose
      block is empty (or the prompt does, when the generation prompt holds the
      closed empty block and the ``cot`` span is empty);
    * it was not cut by the sequence length (``cut == "seq_len"``) unless
      ``allow_cut`` (pass ``params.overlong == "truncate"``), and it is not longer
      than ``max_len`` when given.

    Returns a report: counts per section, then ``n_show`` examples decoded with
    the supervised tokens wrapped in ⟦ ⟧.
    """
    if not examples:
        raise AuditError("no examples to train on")
    problems: dict[str, list[Any]] = {}

    def flag(problem: str, ex: dict[str, Any], i: int) -> None:
        problems.setdefault(problem, []).append(ex.get("id", i))

    for i, ex in enumerate(examples):
        labels = ex["labels"]
        if all(x == IGNORE_INDEX for x in labels):
            flag("all-zero loss mask (nothing supervised)", ex, i)
        if max_len is not None and len(ex["input_ids"]) > max_len:
            flag(f"longer than the sequence length {max_len} (would be cut)", ex, i)
        if ex.get("cut") == "seq_len" and not allow_cut:
            flag("cut by the sequence length (end of turn lost)", ex, i)
        if ex.get("cut"):
            continue
        if "answer" in ex.get("loss_on", SECTIONS):
            if ex["input_ids"][-1] != ex["eot_id"] or labels[-1] == IGNORE_INDEX:
                flag("end-of-turn token not supervised", ex, i)
        # the think block ends with the cot span, or with the prompt when the generation
        # prompt itself holds a closed empty block (then the cot span is empty)
        close = ex.get("cot_close", _THINK_CLOSE)
        if close is None:  # answer-only without a think block: nothing to close
            continue
        if not _decode(tokenizer, ex["input_ids"][: ex["spans"]["cot"][1]]).rstrip().endswith(close):
            flag(f"think block not closed with {close!r}", ex, i)

    counts = section_tokens(examples)
    lines = [
        f"mask audit: {len(examples)} examples, {counts['total']} tokens, {counts['supervised']} supervised",
        "  " + ", ".join(f"{s}: {counts[f'supervised_{s}']}/{counts[f'total_{s}']}" for s in SECTIONS)
        + " (supervised/total tokens)",
    ]
    for ex in examples[:n_show]:
        lines.append(f"--- id {ex.get('id')!r} ({ex.get('format')}, {ex.get('source')}, "
                     f"{len(ex['input_ids'])} tokens, spans {ex['spans']}, cut {ex.get('cut')})")
        lines.append(_supervised_view(ex, tokenizer, max_chars))
    report = "\n".join(lines)
    if problems:
        detail = "\n".join(f"  {p}: {len(ids)} example(s), ids {ids[:10]}" for p, ids in problems.items())
        raise AuditError(f"mask audit failed:\n{detail}\n\n{report}")
    return report


def supervised_count(example: dict[str, Any]) -> int:
    """Supervised tokens of one example (its first label is always masked, so packing keeps them all)."""
    return sum(1 for x in example["labels"][1:] if x != IGNORE_INDEX)
