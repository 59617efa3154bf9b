"""cdlib.engines: toy, openai (fake and real vLLM server), vllm (real, CPU) and hf engines, and sharding.

The vLLM tests load the tiny model of ``tiny_model_dir`` once for the module
(about 30-60 s on 2 cores); the OpenAI tests against a real server start
``python -m vllm.entrypoints.openai.api_server`` once. Retries, concurrency
and the API key are tested against a small local HTTP server that speaks the
OpenAI wire format and misbehaves on request.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdlib import engines
from cdlib.engines import vllm as engine_vllm
from cdlib.engines import Completion, get_engine, shard
from cdlib.params import EngineParams, SamplingParams, ToyParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
SCHEMA = {
    "type": "object",
    "properties": {
        "faithful": {"type": "boolean"},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
        "label": {"type": "string", "enum": ["yes", "no"]},
    },
    "required": ["faithful", "score", "label"],
    "additionalProperties": False,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- shard


@given(n=st.integers(0, 60), num_shards=st.integers(1, 9), strided=st.booleans())
def test_shards_partition_the_pool(n, num_shards, strided):
    items = [f"q{i}" for i in range(n)]
    parts = [shard(items, i, num_shards, strided=strided) for i in range(num_shards)]
    assert sorted(sum(parts, [])) == sorted(items)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    if not strided:
        assert sum(parts, []) == items  # contiguous: concatenation restores the order
    assert parts == [shard(items, i, num_shards, strided=strided) for i in range(num_shards)]  # stable


def test_shard_examples_and_bad_index():
    items = list(range(10))
    assert shard(items, 0, 3) == [0, 1, 2] and shard(items, 2, 3) == [6, 7, 8, 9]
    assert shard(items, 1, 3, strided=True) == [1, 4, 7]
    with pytest.raises(ValueError, match="shard index=3"):
        shard(items, 3, 3)


# --------------------------------------------------------------------------- toy


@pytest.fixture(scope="module")
def toy_rows():
    from cdlib import toy

    return toy.generate(ToyParams(n_train=8, n_test=4), split="train")


def test_toy_engine_is_deterministic_per_seed_row_and_attempt(toy_rows):
    engine = get_engine(EngineParams(kind="toy"), toy=ToyParams(slip_rate=0.5))
    prompts = [r["question"] for r in toy_rows]
    hot = SamplingParams(temperature=1.0, seed=7, max_tokens=10_000)
    first = engine.generate(prompts, hot, rows=toy_rows)
    assert [c.text for c in first] == [c.text for c in engine.generate(prompts, hot, rows=toy_rows)]
    # another attempt (rejection-sampling round) or seed draws other traces
    retry_rows = [dict(r, attempt=1) for r in toy_rows]
    assert [c.text for c in engine.generate(prompts, hot, rows=retry_rows)] != [c.text for c in first]
    other_seed = hot.model_copy(update={"seed": 8})
    assert [c.text for c in engine.generate(prompts, other_seed, rows=toy_rows)] != [c.text for c in first]
    for c, prompt in zip(first, prompts):
        assert c.finish_reason == "stop" and c.error is None
        assert c.completion_tokens == len(c.text.split())
        assert c.prompt_tokens == len(prompt.split())
        assert c.reasoning and "\\boxed{" in c.answer and "<think>" not in c.answer


def test_toy_engine_cuts_at_max_tokens_and_stop(toy_rows):
    engine = get_engine(EngineParams(kind="toy"))
    rows = toy_rows[:2]
    chats = [[{"role": "user", "content": r["question"]}] for r in rows]
    cut = engine.generate(chats, SamplingParams(temperature=0, max_tokens=5), rows=rows)
    full = engine.generate(chats, SamplingParams(temperature=0, max_tokens=10_000), rows=rows)
    for c, f in zip(cut, full):
        assert c.finish_reason == "length" and c.completion_tokens == 5
        assert f.text.startswith(c.text) and len(c.text.split()) == 5
    stopped = engine.generate(chats, SamplingParams(temperature=0, stop=["</think>"]), rows=rows)
    assert all(s.finish_reason == "stop" and "</think>" not in s.text and s.text for s in stopped)


def test_toy_engine_needs_one_row_per_prompt(toy_rows):
    engine = get_engine(EngineParams(kind="toy"))
    with pytest.raises(ValueError, match="1 prompts, None rows"):
        engine.generate(["q"], GREEDY)
    with pytest.raises(ValueError, match="mix plain strings and chats"):
        engine.generate(["q", [{"role": "user", "content": "q"}]], GREEDY, rows=toy_rows[:2])


# --------------------------------------------------------------------------- fake OpenAI server


class FakeOpenAI(ThreadingHTTPServer):
    """An OpenAI-compatible server on 127.0.0.1 that records requests and can misbehave.

    ``drop_first``: close the socket without answering for the first N requests;
    prompts containing "DROP" are always dropped; ``delay`` seconds per answer;
    counts the largest number of requests in flight; echoes the prompt back.
    """

    daemon_threads = True

    def __init__(self, drop_first: int = 0, delay: float = 0.0):
        super().__init__(("127.0.0.1", 0), _FakeHandler)
        self.drop_first, self.delay = drop_first, delay
        self.requests: list[dict] = []
        self.times: list[float] = []
        self.auth: list[str | None] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def close(self):
        self.shutdown()
        self.server_close()


class _FakeHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        srv: FakeOpenAI = self.server  # type: ignore[assignment]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests.append(body)
            srv.times.append(time.monotonic())
            srv.auth.append(self.headers.get("Authorization"))
            n = len(srv.requests)
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        try:
            prompt = body["messages"][-1]["content"] if "messages" in body else body["prompt"]
            if n <= srv.drop_first or "DROP" in prompt:
                self.close_connection = True  # hang up without a response
                return
            time.sleep(srv.delay)
            n = len(prompt.split())
            usage = {"prompt_tokens": n, "completion_tokens": 2, "total_tokens": n + 2}
            if "messages" in body:
                message = {"role": "assistant", "content": f"echo {prompt}"}
                if "THINK" in prompt:  # as a vLLM server with a reasoning parser answers
                    message["reasoning"] = "server-side reasoning"
                choice = {"index": 0, "message": message, "finish_reason": "stop"}
                out = {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                       "choices": [choice], "usage": usage}
            else:
                choice = {"index": 0, "text": f"echo {prompt}", "finish_reason": "length", "logprobs": None}
                out = {"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
                       "choices": [choice], "usage": usage}
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        finally:
            with srv.lock:
                srv.in_flight -= 1


@pytest.fixture
def fake_server():
    servers = []

    def start(**kwargs) -> FakeOpenAI:
        servers.append(FakeOpenAI(**kwargs))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_openai_retries_with_backoff_after_dropped_connections(fake_server):
    server = fake_server(drop_first=2)
    engine = get_engine(EngineParams(kind="openai", model="m", base_url=server.base_url, max_retries=3))
    [c] = engine.generate(["hello there"], GREEDY)
    assert c == Completion(text="echo hello there", reasoning="", answer="echo hello there", prompt_tokens=2,
                           completion_tokens=2, finish_reason="length")
    assert len(server.requests) == 3
    gaps = [b - a for a, b in zip(server.times, server.times[1:])]
    assert gaps[0] > 0.3 and gaps[1] > 1.4 * gaps[0]  # exponential backoff (0.5 s, 1 s, with jitter)


def test_openai_failed_request_becomes_error_completion(fake_server):
    server = fake_server()
    engine = get_engine(EngineParams(kind="openai", model="m", base_url=server.base_url, max_retries=1))
    out = engine.generate([[{"role": "user", "content": c}] for c in ("one", "DROP me", "three")], GREEDY)
    assert [c.finish_reason for c in out] == ["stop", "error", "stop"]
    assert out[1].text == "" and "Connection" in out[1].error
    assert [c.answer for c in (out[0], out[2])] == ["echo one", "echo three"]
    assert sum("DROP" in json.dumps(r) for r in server.requests) == 2  # first try + max_retries


def test_openai_concurrency_is_bounded(fake_server):
    server = fake_server(delay=0.25)
    engine = get_engine(EngineParams(kind="openai", model="m", base_url=server.base_url, max_concurrency=3))
    out = engine.generate([f"prompt {i}" for i in range(10)], GREEDY)
    assert [c.text for c in out] == [f"echo prompt {i}" for i in range(10)]  # order kept
    assert server.max_in_flight == 3


def test_openai_key_read_from_named_env_var(fake_server, monkeypatch):
    server = fake_server()
    params = EngineParams(kind="openai", model="m", base_url=server.base_url, api_key_env="CDLIB_TEST_KEY")
    monkeypatch.delenv("CDLIB_TEST_KEY", raising=False)
    with pytest.raises(KeyError, match="CDLIB_TEST_KEY"):
        get_engine(params)
    monkeypatch.setenv("CDLIB_TEST_KEY", "sk-secret-123")
    engine = get_engine(params)
    engine.generate(["hi"], GREEDY)
    assert server.auth == ["Bearer sk-secret-123"]
    assert "sk-secret" not in repr(engine.params) + json.dumps(engine.params.model_dump())


def test_openai_request_body_schema_sampling_and_server_reasoning(fake_server):
    server = fake_server()
    params = EngineParams(kind="openai", model="teacher", base_url=server.base_url,
                          chat_template_kwargs={"enable_thinking": False})
    engine = get_engine(params)
    sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_tokens=33, seed=5, stop=["END"])
    [chat] = engine.generate([[{"role": "user", "content": "THINK about it"}]], sampling, json_schema=SCHEMA)
    [plain] = engine.generate(["complete me"], sampling, json_schema=SCHEMA)
    chat_body, plain_body = server.requests
    assert chat_body["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": SCHEMA}}
    assert chat_body["chat_template_kwargs"] == {"enable_thinking": False}
    assert plain_body["structured_outputs"] == {"json": SCHEMA, "disable_any_whitespace": True}
    for body in (chat_body, plain_body):
        keys = ("model", "temperature", "top_p", "top_k", "max_tokens", "seed", "stop")
        assert tuple(body[k] for k in keys) == ("teacher", 0.7, 0.9, 20, 33, 5, ["END"])
    assert chat.reasoning == "server-side reasoning" and chat.answer == "echo THINK about it"
    assert chat.text == "<think>\nserver-side reasoning\n</think>\n\necho THINK about it"
    assert plain.finish_reason == "length"


def test_openai_needs_base_url():
    with pytest.raises(ValueError, match="base_url"):
        get_engine(EngineParams(kind="openai", model="m"))


# --------------------------------------------------------------------------- vllm (real, CPU)


def vllm_params(model_dir, **kw) -> EngineParams:
    base = dict(kind="vllm", model=str(model_dir), dtype="float32", gpu_memory_utilization=0.2, max_model_len=512,
                enable_lora=True, max_lora_rank=8)
    return EngineParams(**(base | kw))


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir, server_launch):
    # server_launch: the OpenAI server test's server starts first, so that its start-up
    # overlaps this in-process load (each takes about a minute here)
    engine = get_engine(vllm_params(tiny_model_dir))
    engine.llm  # load once for the module
    yield engine
    engines.close_all()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_vllm_plain_and_chat_generation(vllm_engine, tokenizer, tiny_model_dir):
    prompts = ["Ann has 3 apples.", "Then 3 + 4 = 7. So the answer is"]
    out = vllm_engine.generate(prompts, GREEDY)
    assert out == vllm_engine.generate(prompts, GREEDY)  # greedy is deterministic
    for c, p in zip(out, prompts):
        assert c.prompt_tokens == len(tokenizer(p)["input_ids"])
        assert 1 <= c.completion_tokens <= 12 and c.finish_reason in ("stop", "length") and c.error is None
        assert c.finish_reason == "stop" or c.completion_tokens == 12
    chat = [[{"role": "user", "content": "How many apples?"}]]
    [c] = vllm_engine.generate(chat, GREEDY)
    templated = tokenizer.apply_chat_template(chat[0], tokenize=False, add_generation_prompt=True)
    assert c.prompt_tokens == len(tokenizer(templated)["input_ids"])
    # chat_template_kwargs reach the template: enable_thinking=False adds the empty think block
    no_think = get_engine(vllm_params(tiny_model_dir, chat_template_kwargs={"enable_thinking": False}))
    assert no_think.llm is vllm_engine.llm  # same LLM arguments: the loaded model is reused
    [d] = no_think.generate(chat, GREEDY)
    assert d.prompt_tokens == c.prompt_tokens + len(tokenizer("<think>\n\n</think>\n\n")["input_ids"])


def test_prefilled_think_block_makes_unclosed_text_reasoning(vllm_engine, tiny_model_dir):
    hf = get_engine(EngineParams(kind="hf", model=str(tiny_model_dir), dtype="float32"))
    for engine in (vllm_engine, hf):
        opened, plain = engine.generate(["Ann has 3 apples.<think>\n", "Ann has 3 apples."], GREEDY)
        assert "</think>" not in opened.text
        assert (opened.reasoning, opened.answer) == (opened.text.strip(), "")
        assert (plain.reasoning, plain.answer) == ("", plain.text.strip())


def test_vllm_json_schema_output_is_valid(vllm_engine):
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=120, seed=3)
    out = vllm_engine.generate([f"Judge {i}:" for i in range(4)], sampling, json_schema=SCHEMA)
    for c in out:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_vllm_overlong_prompt_fails_alone(vllm_engine):
    out = vllm_engine.generate(["short prompt", "apples " * 800, "another"], GREEDY)
    assert [c.finish_reason == "error" for c in out] == [False, True, False]
    assert "512" in out[1].error  # names the context limit


def test_vllm_lora_adapter_changes_and_matches_peft(vllm_engine, tiny_model_dir, tiny_lora_dir):
    prompts = ["Ann has 3 apples.", "Ben gives away 2 pens."]
    base = vllm_engine.generate(prompts, GREEDY)
    lora_engine = get_engine(vllm_params(tiny_model_dir, lora_path=str(tiny_lora_dir)))
    assert lora_engine.llm is vllm_engine.llm  # adapters ride on the loaded model
    with_lora = lora_engine.generate(prompts, GREEDY)
    assert [c.text for c in with_lora] != [c.text for c in base]
    # the same adapter through transformers + peft gives the same greedy tokens
    hf = get_engine(EngineParams(kind="hf", model=str(tiny_model_dir), dtype="float32", lora_path=str(tiny_lora_dir)))
    assert [c.text for c in hf.generate(prompts, GREEDY)] == [c.text for c in with_lora]
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        get_engine(vllm_params(tiny_model_dir, lora_path=str(tiny_model_dir))).generate(prompts, GREEDY)


# --------------------------------------------------------------------------- hf


def test_hf_engine_batches_with_left_padding_like_vllm(vllm_engine, tiny_model_dir, tokenizer):
    hf = get_engine(EngineParams(kind="hf", model=str(tiny_model_dir), dtype="float32"))
    prompts = ["Ann has 3 apples.", "Then 3 + 4 = 7. So the answer is", "Dev gets 4 coins."]
    batched = hf.generate(prompts, GREEDY)
    assert batched == [hf.generate([p], GREEDY)[0] for p in prompts]  # padding does not change outputs
    assert [c.text for c in batched] == [c.text for c in vllm_engine.generate(prompts, GREEDY)]
    for c, p in zip(batched, prompts):
        assert c.prompt_tokens == len(tokenizer(p)["input_ids"])
    chat = [[{"role": "user", "content": "How many apples?"}]]
    assert [c.text for c in hf.generate(chat, GREEDY)] == [c.text for c in vllm_engine.generate(chat, GREEDY)]
    with pytest.raises(ValueError, match="no structured JSON output"):
        hf.generate(prompts, GREEDY, json_schema=SCHEMA)


# --------------------------------------------------------------------------- openai against a real vLLM server


@pytest.fixture(scope="module")
def server_launch(tiny_model_dir, tmp_path_factory):
    """Start ``python -m vllm.entrypoints.openai.api_server`` on a free port (not yet ready); stop it after."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--gpu-memory-utilization", "0.2", "--max-model-len", "512"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc, port, log_path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its engine-core processes
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def vllm_server(server_launch):
    """The base URL of the launched server, once ``/health`` answers 200."""
    proc, port, log_path = server_launch
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"vLLM server not ready after 300 s:\n{log_path.read_text()[-3000:]}")
        time.sleep(1)


def test_openai_engine_against_vllm_server(vllm_server, vllm_engine, tokenizer):
    engine = get_engine(EngineParams(kind="openai", model="tiny", base_url=vllm_server, max_concurrency=4))
    prompts = ["Ann has 3 apples.", "Then 3 + 4 = 7. So the answer is"]
    out = engine.generate(prompts, GREEDY)
    assert [c.text for c in out] == [c.text for c in vllm_engine.generate(prompts, GREEDY)]
    for c, p in zip(out, prompts):
        assert c.error is None and c.prompt_tokens == len(tokenizer(p)["input_ids"]) and 1 <= c.completion_tokens <= 12
    # chat: the portable response_format (free whitespace allowed, hence the larger budget)
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=400, seed=1)
    chats = [[{"role": "user", "content": f"Judge {i}"}] for i in range(2)]
    plain = engine.generate(["Judge:"], sampling, json_schema=SCHEMA)
    for c in engine.generate(chats, sampling, json_schema=SCHEMA) + plain:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_vllm_seeded_sampling_on_cpu_does_not_kill_the_engine(vllm_engine):
    """vLLM's CPU worker crashes on per-request seeds; the engine drops them there with a warning."""
    sampling = SamplingParams(temperature=0.7, top_p=0.95, max_tokens=8, seed=3)
    with pytest.warns(UserWarning, match="per-request sampling seeds") if not engine_vllm._WARNED else nullcontext():
        out = vllm_engine.generate(["a", "b"], sampling)
    assert [c.finish_reason for c in out] != ["error", "error"] and all(c.text is not None for c in out)
    assert vllm_engine.generate(["a"], GREEDY)[0].finish_reason in ("stop", "length")  # still alive
