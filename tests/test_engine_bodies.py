"""The openai engine against a server whose bodies are not completions.

A real HTTP server on 127.0.0.1 answers each request with whatever the test
scripts for its prompt: an HTML page, JSON cut short, ``{"choices": []}``, a
choice without its text, a 5xx page. Each bad answer must become an error
completion for its own prompt, whose message names the endpoint's URL and
what was wrong, never a crash of the batch or a bare KeyError.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cdlib.engines import get_engine
from cdlib.engines import openai as engine_openai
from cdlib.params import EngineParams, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)

Answer = tuple[int, str, bytes]  # status, content type, body


def completion_body(text: str, chat: bool = True) -> bytes:
    """A well-formed OpenAI completion answering ``text``."""
    usage = {"prompt_tokens": 3, "completion_tokens": len(text.split()), "total_tokens": 3 + len(text.split())}
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    else:
        choice = {"index": 0, "text": text, "finish_reason": "stop"}
    return json.dumps({"id": "c", "object": "completion", "created": 0, "model": "m", "choices": [choice],
                       "usage": usage}).encode()


class ScriptedServer(ThreadingHTTPServer):
    """An OpenAI-compatible endpoint on 127.0.0.1 answering ``answer(prompt, headers) -> (status, type, body)``.

    Records each request's prompt. An answer whose content type ends in
    ``;short=N`` announces N more bytes than it sends and hangs up (a body cut
    by the connection); one ending in ``;trickle=S`` sends its body one byte
    every S seconds.
    """

    daemon_threads = True

    def __init__(self, answer: Callable[[str, dict[str, str]], Answer]):
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.answer = answer
        self.prompts: list[str] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def count(self, prompt: str) -> int:
        return self.prompts.count(prompt)

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _ScriptedHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        srv: ScriptedServer = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
        with srv.lock:
            srv.prompts.append(prompt)
        status, kind, data = srv.answer(prompt, dict(self.headers))
        kind, _, short = kind.partition(";short=")
        kind, _, trickle = kind.partition(";trickle=")
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data) + int(short or 0)))
        self.end_headers()
        if trickle:
            with contextlib.suppress(OSError):  # the client hangs up once its deadline passes
                for i in range(len(data)):
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(float(trickle))
            return
        self.wfile.write(data)
        if short:
            self.close_connection = True


@pytest.fixture
def scripted():
    servers: list[ScriptedServer] = []

    def start(answer) -> ScriptedServer:
        servers.append(ScriptedServer(answer))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


HTML = b"<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1>" + b" " * 300 + b"</body></html>"
BODIES: dict[str, tuple[bytes, str]] = {  # prompt -> (200 body, the fault the message must name)
    "html": (HTML, "returned a non-JSON body (text/html"),
    "truncated": (completion_body("fine")[:40], "returned a non-JSON body (application/json, 40 bytes)"),
    "empty choices": (b'{"choices": []}', "returned an empty 'choices' list"),
    "no choices": (b'{"error": {"message": "model overloaded"}}', "returned no 'choices' list"),
    "list": (b"[1, 2]", "returned JSON that is not an object"),
    "no message": (b'{"choices": [{"index": 0, "finish_reason": "stop"}]}', "returned a choice without a 'message'"),
}


def _answer(prompt: str, headers: dict[str, str]) -> Answer:
    if prompt in BODIES:
        kind = "text/html; charset=utf-8" if prompt == "html" else "application/json"
        return 200, kind, BODIES[prompt][0]
    return 200, "application/json", completion_body(f"echo {prompt}", chat=True)


def test_unclear_bodies_become_errors_naming_the_endpoint_and_the_fault(scripted):
    server = scripted(_answer)
    engine = get_engine(EngineParams(kind="openai", model="m", base_url=server.base_url, max_retries=1))
    prompts = ["first", *BODIES, "last"]
    out = engine.generate([[{"role": "user", "content": p}] for p in prompts], GREEDY)
    assert [c.answer for c in (out[0], out[-1])] == ["echo first", "echo last"]  # the batch survives
    for prompt, c in zip(prompts[1:-1], out[1:-1]):
        fault = BODIES[prompt][1]
        assert c.finish_reason == "error" and c.text == "" and c.transient, (prompt, c)
        assert c.error.startswith(f"BadBodyError: {server.base_url}/chat/completions {fault}"), (prompt, c.error)
        assert c.error.endswith(" (2 tries)")  # 1 + min(BAD_BODY_RETRIES, max_retries)
        assert server.count(prompt) == 2
    html_error = out[1 + list(BODIES).index("html")].error
    assert f"{len(HTML)} bytes): '<html><head><title>502 Bad Gateway" in html_error
    assert len(html_error) < 500  # the first characters, whitespace collapsed, not the whole page
    assert server.count("first") == server.count("last") == 1


def test_bad_bodies_are_retried_and_a_good_second_answer_is_kept(scripted):
    sent: list[str] = []

    def flaky(prompt, headers):
        sent.append(prompt)
        if len(sent) <= 2:
            return 200, "application/json", b'{"choices": []}'
        return 200, "application/json", completion_body("recovered", chat=False)

    server = scripted(flaky)
    engine = get_engine(EngineParams(kind="openai", model="m", base_url=server.base_url, max_retries=5))
    [c] = engine.generate(["complete me"], GREEDY)
    assert (c.finish_reason, c.text, c.error) == ("stop", "recovered", None)
    assert len(sent) == 1 + engine_openai.BAD_BODY_RETRIES


def test_plain_completion_without_text_and_no_retries(scripted):
    server = scripted(lambda prompt, headers: (200, "application/json", b'{"choices": [{"index": 0}]}'))
    engine = get_engine(EngineParams(kind="openai", model="m", base_url=server.base_url, max_retries=0))
    [c] = engine.generate(["complete me"], GREEDY)
    assert c.error == (f"BadBodyError: {server.base_url}/completions returned a choice without 'text' "
                       "(application/json, 27 bytes): '{\"choices\": [{\"index\": 0}]}'")
    assert server.count("complete me") == 1  # max_retries=0: no retry of a bad body either


def test_http_errors_and_cut_bodies_name_the_endpoint(scripted):
    def answer(prompt, headers):
        if prompt == "bad request":
            return 400, "application/json", b'{"error": {"message": "max_tokens is too large"}}'
        if prompt == "cut":
            return 200, "application/json;short=100", completion_body("never complete")
        return 503, "text/html", HTML

    server = scripted(answer)
    engine = get_engine(EngineParams(kind="openai", model="m", base_url=server.base_url, max_retries=0))
    unavailable, rejected, cut = engine.generate(["down", "bad request", "cut"], GREEDY)
    url = f"{server.base_url}/completions"
    assert unavailable.error.startswith(f"InternalServerError: {url} answered HTTP 503 after 0 retries (text/html, "
                                        f"{len(HTML)} bytes)")
    assert unavailable.transient
    assert rejected.error.startswith(f"BadRequestError: {url} answered HTTP 400 (application/json")
    assert "max_tokens is too large" in rejected.error and not rejected.transient
    assert cut.error.startswith(f"APIConnectionError: {url}: Connection error. (RemoteProtocolError")
    assert cut.transient and all(c.finish_reason == "error" for c in (unavailable, rejected, cut))


def test_request_timeout_is_a_deadline_for_the_whole_request(scripted):
    """A server trickling its body a byte at a time never lets a read wait long; the request still ends at
    ``request_timeout_s``, not when the body (ten times as long) is done."""
    body = completion_body("slow", chat=False) + b" " * 100
    interval = 10 * 1.0 / len(body)  # the whole body takes 10 s
    server = scripted(lambda prompt, headers: (200, f"application/json;trickle={interval}", body))
    engine = get_engine(EngineParams(kind="openai", model="m", base_url=server.base_url, max_retries=0,
                                     request_timeout_s=1.0))
    t0 = time.monotonic()
    [c] = engine.generate(["complete me"], GREEDY)
    elapsed = time.monotonic() - t0
    assert c.finish_reason == "error" and c.transient and "timed out" in c.error, c
    assert elapsed < 2.5 * engine.params.request_timeout_s, f"a 1 s deadline held the request {elapsed:.1f} s"
