"""What every engine shares: the :class:`Completion` a request ends in, the :class:`Engine` interface,
the two kinds of prompt (plain strings or chats), how a failed request is told apart (transient or
rejected) and how a server's error body is scrubbed before it is stored; :func:`shard` splits a
question pool across Slurm array tasks. The back-ends (:mod:`cdlib.engines.hf`, ``toy``, ``vllm``,
``openai``) build on these; :func:`cdlib.engines.get_engine` picks one.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from cdlib.params import EngineParams, SamplingParams
from cdlib.traces import THINK_OPEN, parse_response

Prompt = str | list[dict[str, Any]]


# --------------------------------------------------------------------------- results


@dataclass
class Completion:
    """One generated completion.

    ``text`` is the full generated text (reasoning included, as the model wrote
    it); ``reasoning`` and ``answer`` are its two parts as split by
    :func:`cdlib.traces.parse_response` (or by the server's reasoning parser):
    ``reasoning`` is ``""`` for a response without reasoning, ``answer`` is
    ``""`` when the reasoning never closed; both are ``None`` for an error.
    Token counts are the engine's own (the toy engine counts whitespace words).
    ``finish_reason`` is ``"stop"``, ``"length"`` or ``"error"``; ``error``
    holds the message of a failed request. ``transient`` says whether a failed
    request may succeed when sent again (network, timeouts, 5xx/429 after the
    client's retries, an unreadable body): the stages do not count such an error
    as an answer, leave the item unanswered and end the cell failed, so a rerun
    sends exactly those items. A request the engine rejects as such (a prompt
    longer than the context: vLLM's ValueError, HTTP 400/413/422) is not transient.
    """

    text: str
    reasoning: str | None = None
    answer: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    error: str | None = None
    transient: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The completion as a plain dict (for JSONL records)."""
        return asdict(self)


def split_reasoning(text: str, think_prefilled: bool = False) -> tuple[str, str]:
    """Split generated text into ``(reasoning, answer)`` with :func:`cdlib.traces.parse_response`.

    ``think_prefilled``: the prompt already ends with ``<think>`` (templates of
    R1-style models open the think block themselves), so text without
    ``</think>`` is unfinished reasoning rather than an answer.
    """
    parsed = parse_response(text, think_prefilled=think_prefilled)
    return parsed.reasoning, parsed.answer


def prompt_opens_think(prompt_text: str | None) -> bool:
    """True when a rendered prompt ends inside an opened ``<think>`` block (the template prefilled it)."""
    return bool(prompt_text) and prompt_text.rstrip().endswith(THINK_OPEN)


def make_completion(
    text: str, prompt_tokens: int, completion_tokens: int, finish_reason: str | None, think_prefilled: bool = False
) -> Completion:
    """A back-end's answer as a :class:`Completion`: the text split into reasoning and answer, the token
    counts, ``finish_reason`` "length" when the token cap cut it and "stop" otherwise."""
    reasoning, answer = split_reasoning(text, think_prefilled)
    return Completion(
        text=text,
        reasoning=reasoning,
        answer=answer,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason="length" if finish_reason == "length" else "stop",
    )


def error_completion(exc: BaseException, prompt_tokens: int = 0, transient: bool = True) -> Completion:
    """A failed request as a :class:`Completion` (``finish_reason="error"``, the exception in ``error``);
    ``transient`` says whether sending it again may succeed."""
    return Completion(text="", prompt_tokens=prompt_tokens, finish_reason="error", error=f"{type(exc).__name__}: {exc}",
                      transient=transient)


def rejects_request(exc: BaseException) -> bool:
    """True for an HTTP error that says the request itself is invalid (400, 413, 422): sending it again cannot help."""
    return getattr(exc, "status_code", None) in (400, 413, 422)


_SECRET_HEADER_RE = re.compile(
    r"(?i)\b((?:proxy-)?authorization|x-api-key|api[-_]key)([\"']?\s*[:=]\s*[\"']?)([^\"'\r\n,;&}]*)"
)


def scrub(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` with the values of ``Authorization`` / ``api-key`` headers (or ``api_key=`` parameters) and
    every occurrence of each of ``secrets`` replaced by ``***``: for error messages that quote a server's
    body, which may echo the request's headers, before they are stored or shown."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _SECRET_HEADER_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)


def is_chat(prompts: Sequence[Prompt]) -> bool:
    """Whether ``prompts`` are chats (lists of ``{"role", "content"}`` messages) rather than plain strings;
    a mix of the two, or a malformed chat, is a ValueError naming the prompt."""
    kinds = {isinstance(p, str) for p in prompts}
    if len(kinds) > 1:
        raise ValueError("prompts mix plain strings and chats; pass one kind per call")
    if not prompts or isinstance(prompts[0], str):
        return False
    for i, chat in enumerate(prompts):
        if not isinstance(chat, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in chat):
            raise ValueError(f"prompt {i}: a chat must be a list of {{'role', 'content'}} dicts, got {chat!r:.200}")
    return True


# --------------------------------------------------------------------------- interface


class Engine:
    """Base class: ``generate(prompts, sampling, json_schema=None, rows=None) -> list[Completion]``."""

    def __init__(self, params: EngineParams):
        self.params = params

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingParams,
        json_schema: dict | None = None,
        rows: Sequence[dict] | None = None,
    ) -> list[Completion]:
        """Generate one completion per prompt (plain strings or chats), in order.

        ``json_schema`` constrains the output to JSON matching the schema
        (vllm, openai). ``rows`` are the question rows behind the prompts,
        needed by the toy engine and ignored by the others.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Free the engine's resources (models, processes, connections)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def shard(items: Sequence[Any], index: int, num_shards: int, strided: bool = False) -> list[Any]:
    """The part of ``items`` that shard ``index`` of ``num_shards`` works on (Slurm array tasks).

    Contiguous by default: shard sizes differ by at most one and the shards,
    concatenated in index order, give back ``items``. ``strided=True`` takes
    every ``num_shards``-th item instead (mixes easy and hard questions when
    the pool is sorted). Either way the split depends only on the order of
    ``items``, so pass a stably ordered pool (e.g. sorted by id or a seeded
    shuffle). Each shard writes its own store; merge them with
    :func:`cdlib.store.merge`.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards}: must be >= 1")
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index={index}: must be in 0..{num_shards - 1}")
    items = list(items)
    if strided:
        return items[index::num_shards]
    n = len(items)
    return items[index * n // num_shards : (index + 1) * n // num_shards]
