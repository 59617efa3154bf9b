"""Engine benchmarks: toy teacher speed, OpenAI-engine concurrency, vLLM generation throughput.

1. ``toy``: completions per second of the scripted teacher on toy train rows.
2. ``openai``: requests per second against a local OpenAI-compatible stub
   that answers each request after a fixed latency (``--latency``), for
   several ``max_concurrency`` values: shows the bounded thread pool overlapping
   requests (ideal: concurrency / latency).
3. ``vllm``: load time and generated tokens per second of the ``vllm`` engine
   (``--model``; default: a tiny 2-layer Qwen2 made by ``cdlib.tiny`` in a temp
   dir), ``--n`` prompts of ``--max-tokens`` each. On CPU machines
   ``--gpu-memory-utilization 0.2``; on an H100 pass a real model and 0.9.

Run: ``.venv/bin/python benchmarks/bench_engines.py`` (``--skip-vllm`` for the
first two only).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cdlib.engines import close_all, get_engine
from cdlib.params import EngineParams, SamplingParams, ToyParams


def bench_toy(n: int) -> None:
    from cdlib import toy

    rows = toy.generate(ToyParams(n_train=n, n_test=10), split="train")
    engine = get_engine(EngineParams(kind="toy"))
    start = time.perf_counter()
    out = engine.generate([r["question"] for r in rows], SamplingParams(temperature=1.0, seed=0), rows=rows)
    dt = time.perf_counter() - start
    words = sum(c.completion_tokens for c in out)
    print(f"toy: {len(out)} completions in {dt:.2f} s = {len(out) / dt:,.0f}/s ({words / dt:,.0f} words/s)")


def _stub_server(latency: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(latency)
            out = {
                "id": "x", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def bench_openai(n: int, latency: float) -> None:
    server = _stub_server(latency)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        for concurrency in (1, 8, 32):
            engine = get_engine(EngineParams(kind="openai", model="stub", base_url=url, max_concurrency=concurrency))
            count = n if concurrency > 1 else max(1, n // 8)
            start = time.perf_counter()
            out = engine.generate([f"p{i}" for i in range(count)], SamplingParams(max_tokens=1))
            dt = time.perf_counter() - start
            assert all(c.error is None for c in out)
            print(f"openai: max_concurrency={concurrency:>2}: {count} requests in {dt:.2f} s = {count / dt:,.1f} req/s "
                  f"(ideal {concurrency / latency:,.0f})")
            engine.close()
    finally:
        server.shutdown()


def bench_vllm(model: str | None, n: int, max_tokens: int, gpu_memory_utilization: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            from cdlib.tiny import make_tiny_model

            model = str(make_tiny_model(f"{tmp}/tiny"))
        params = EngineParams(kind="vllm", model=model, gpu_memory_utilization=gpu_memory_utilization,
                              max_model_len=2048)
        engine = get_engine(params)
        start = time.perf_counter()
        engine.llm
        load = time.perf_counter() - start
        prompts = [f"Question {i}: Ann has {i % 9 + 1} apples." for i in range(n)]
        sampling = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=max_tokens, seed=0)
        engine.generate(prompts[:4], sampling)  # warm-up
        start = time.perf_counter()
        out = engine.generate(prompts, sampling)
        dt = time.perf_counter() - start
        tokens = sum(c.completion_tokens for c in out)
        shown = model if not model.startswith(tmp) else "tiny 2-layer hidden-128"
        print(f"vllm: load {load:.1f} s; {n} prompts, {tokens} generated tokens in {dt:.2f} s = "
              f"{tokens / dt:,.0f} tok/s (model {shown})")
        close_all()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy-n", type=int, default=2000)
    ap.add_argument("--openai-n", type=int, default=256)
    ap.add_argument("--latency", type=float, default=0.05, help="stub server seconds per request")
    ap.add_argument("--model", default=None, help="vLLM model (default: a fresh tiny model)")
    ap.add_argument("--n", type=int, default=64, help="vLLM prompts")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.2)
    ap.add_argument("--skip-vllm", action="store_true")
    args = ap.parse_args()
    bench_toy(args.toy_n)
    bench_openai(args.openai_n, args.latency)
    if not args.skip_vllm:
        bench_vllm(args.model, args.n, args.max_tokens, args.gpu_memory_utilization)


if __name__ == "__main__":  # vLLM spawns processes
    main()
