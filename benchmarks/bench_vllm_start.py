"""vLLM start-up on CPU: the engine core in spawned processes (vLLM's default) against in-process.

Each repeat builds a tiny model's ``cdlib`` VLLMEngine in a fresh Python process with one
torch thread (as a grid cell pinned to one core by ``--jobs`` has), generates 64 x 128
tokens greedily, and reports the seconds from process start to the first completion and
to exit. ``spawned`` sets ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` (vLLM's default), which
turns the in-process choice of :func:`cdlib.engines.vllm.single_core_cpu` off. Repeats
alternate between the two modes; the ratio is per pair.

    .venv/bin/python benchmarks/bench_vllm_start.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import sys, time
t0 = time.time()
from cdlib.engines import close_all, get_engine
from cdlib.params import EngineParams, SamplingParams

def main():
    eng = get_engine(EngineParams(kind="vllm", model=sys.argv[1], dtype="float32", gpu_memory_utilization=0.2,
                                  max_model_len=1024, enforce_eager=True))
    out = eng.generate(["hello world"] * 64, SamplingParams(temperature=0, max_tokens=128))
    t1 = time.time()
    assert len(out) == 64 and all(c.finish_reason != "error" for c in out)
    close_all()
    print(f"FIRST {t1 - t0:.2f}", flush=True)

if __name__ == "__main__":
    main()
"""


def run(model: str, spawned: bool) -> tuple[float, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if spawned:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    else:
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", CHILD, model], env=env, capture_output=True, text=True, timeout=900)
    total = time.time() - t0
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("FIRST")]
    if p.returncode != 0 or not line:
        raise SystemExit(f"child failed ({'spawned' if spawned else 'in-process'}):\n{p.stderr[-3000:]}")
    return float(line[0].split()[1]), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from cdlib.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as d:
        make_tiny_model(d)
        ratios = []
        for r in range(args.repeats):
            res = {}
            for spawned in ((False, True) if r % 2 else (True, False)):
                res[spawned] = run(d, spawned)
                name = "spawned   " if spawned else "in-process"
                print(f"repeat {r}: {name} first completion {res[spawned][0]:6.1f} s, process {res[spawned][1]:6.1f} s",
                      flush=True)
            ratios.append(res[False][1] / res[True][1])
        print(f"in-process / spawned wall per pair: {', '.join(f'{x:.2f}' for x in ratios)} "
              f"(mean {sum(ratios) / len(ratios):.2f})")


if __name__ == "__main__":
    main()
