"""The OpenAI-compatible engine: ``vllm serve``, a hosted teacher, any server speaking the API.

Bounded concurrency (``max_concurrency`` requests in flight), the ``openai`` client's
retries with backoff (connection errors, 408/409/429, 5xx), ``request_timeout_s`` as the
deadline of each HTTP request as a whole (:func:`_deadline_client`), bodies that are not a
completion (truncated JSON, HTML, no choices) turned into an error naming the endpoint,
and every stored error message scrubbed of the key (:func:`cdlib.engines.base.scrub`).
Built by :func:`cdlib.engines.get_engine`.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from cdlib.engines.base import (Completion, Engine, Prompt, is_chat, make_completion, prompt_opens_think,
                                rejects_request, scrub)
from cdlib.params import EngineParams, SamplingParams
from cdlib.secrets import scrub_text

#: Characters of a server's body quoted in an error message (scrubbed, whitespace collapsed).
BODY_QUOTE_CHARS = 200
#: Extra tries (at most ``max_retries``) for a request answered with a body that is not a completion.
BAD_BODY_RETRIES = 2
#: Seconds before the first such retry; doubled for the next.
BAD_BODY_BACKOFF_S = 0.25


_deadline = threading.local()  # .at: time.monotonic() by which this thread's HTTP request must be over


def _time_left(timeout: float | None, expired: type[Exception]) -> float | None:
    """``timeout`` cut to what is left of this thread's request deadline; ``expired`` raised when none is."""
    at = getattr(_deadline, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise expired("request_timeout_s: the request as a whole ran past its deadline")
    return left if timeout is None else min(timeout, left)


def _deadline_network(backend: Any) -> Any:
    """``backend`` (an httpcore2 network backend) whose connects, reads and writes all end by the deadline.

    The HTTP client's own timeouts bound each socket operation, so a server that sends
    one byte at a time could hold a request for ever; here every operation waits at most
    what is left of the request's deadline (:data:`_deadline`), whatever its own timeout.
    """
    import httpcore2

    class Stream(httpcore2.NetworkStream):
        def __init__(self, stream: Any):
            self._stream = stream

        def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            return self._stream.read(max_bytes, _time_left(timeout, httpcore2.ReadTimeout))

        def write(self, buffer: bytes, timeout: float | None = None) -> None:
            self._stream.write(buffer, _time_left(timeout, httpcore2.WriteTimeout))

        def close(self) -> None:
            self._stream.close()

        def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None):
            return Stream(self._stream.start_tls(ssl_context, server_hostname,
                                                 _time_left(timeout, httpcore2.ConnectTimeout)))

        def get_extra_info(self, info: str) -> Any:
            return self._stream.get_extra_info(info)

    class Backend(httpcore2.NetworkBackend):
        def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            return Stream(backend.connect_tcp(host, port, _time_left(timeout, httpcore2.ConnectTimeout),
                                              local_address, socket_options))

        def connect_unix_socket(self, path, timeout=None, socket_options=None):
            return Stream(backend.connect_unix_socket(path, _time_left(timeout, httpcore2.ConnectTimeout),
                                                      socket_options))

        def sleep(self, seconds: float) -> None:
            backend.sleep(seconds)

    return Backend()


def _deadline_client(request_timeout_s: float) -> Any:
    """The ``openai`` SDK's HTTP client, every HTTP request of which (each retry its own) ends within
    ``request_timeout_s`` of being sent, connect, upload and a trickled body included.

    The deadline starts in a request event hook and binds the thread that sends it (the
    engine sends each request from one worker thread); the connection pools of the client
    (proxies from the environment included) get a network backend that honours it.
    """
    import openai

    def start(request: Any) -> None:
        _deadline.at = time.monotonic() + request_timeout_s

    client = openai.DefaultHttpxClient(event_hooks={"request": [start]})
    for transport in [client._transport, *client._mounts.values()]:
        if transport is None:  # a pattern that goes direct (no_proxy): the default transport serves it
            continue
        pool = getattr(transport, "_pool", None)
        if pool is None or not hasattr(pool, "_network_backend"):
            warnings.warn("openai engine: this httpx2 does not let request_timeout_s bound a whole request; "
                          "it bounds each read instead", stacklevel=2)
            continue
        pool._network_backend = _deadline_network(pool._network_backend)
    return client


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
        retryable = exc.status_code in (408, 409, 429) or exc.status_code >= 500
        retried = f" after {max_retries} retries" if retryable else ""
        return (f"{type(exc).__name__}: {response.url} answered HTTP {exc.status_code}{retried} "
                f"{_quote_body(response, secrets)}")
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
            http_client=_deadline_client(params.request_timeout_s),
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
                common["response_format"] = {"type": "json_schema",
                                             "json_schema": {"name": "output", "schema": json_schema}}
            create, common["messages"] = self.client.chat.completions.with_raw_response.create, prompt
        else:
            if json_schema is not None:
                extra["structured_outputs"] = {"json": json_schema, "disable_any_whitespace": True}
            create, common["prompt"] = self.client.completions.with_raw_response.create, prompt
        tries = 1 + min(BAD_BODY_RETRIES, p.max_retries)
        for attempt in range(tries):
            try:  # the raw response: its body is read here, so a bad one is named rather than a KeyError
                raw = create(extra_body=extra or None, **common).http_response
                choice, usage = _read_choice(raw, chat, self._secrets)
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
            return make_completion(choice["text"], prompt_tokens, completion_tokens, choice.get("finish_reason"),
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
        return make_completion(content, prompt_tokens, completion_tokens, choice.get("finish_reason"))

    def _failed(self, exc: BaseException) -> Completion:
        """The error completion for a failed request, its message scrubbed of the key and auth headers."""
        message = scrub_text(scrub(_describe_failure(exc, self.params.max_retries, self._secrets), self._secrets))
        return Completion(text="", finish_reason="error", error=message, transient=not rejects_request(exc))

    def generate(self, prompts, sampling, json_schema=None, rows=None):
        prompts = list(prompts)
        if not prompts:
            return []
        chat = is_chat(prompts)
        workers = min(self.params.max_concurrency, len(prompts))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda p: self._request(p, chat, sampling, json_schema), prompts))

    def close(self) -> None:
        self.client.close()
