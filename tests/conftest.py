"""Shared test fixtures: tiny models built once per test session.

``tiny_model_dir``: a randomly initialised 2-layer Qwen2 model (hidden 128,
head dim 64) with its own byte-level BPE tokenizer and chat template, made by
:func:`cdlib.tiny.make_tiny_model` in a session temp dir (a few seconds).
Load it with transformers, peft or vLLM (CPU: ``gpu_memory_utilization=0.2``).

``demo_checkout``: a throw-away checkout (pyproject, notebooks, JupyterLab settings) whose
``outputs/demo`` holds what ``make demo`` leaves for its first stages (generate, extractive
compression, truncation; the demo's own cell ids, a small toy pool), run by the grid runner.

``tiny_lora_dir``: a peft LoRA adapter (rank 8, q/k/v/o projections) of that
model with random, non-zero weights, so generating with it differs from the
base model.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from cdlib.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_lora_dir(tiny_model_dir, tmp_path_factory) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,  # random B as well as A: the adapter changes the outputs
    )
    model = get_peft_model(base, config)
    out = tmp_path_factory.mktemp("tiny") / "lora"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def demo_checkout(tmp_path_factory) -> Path:
    import yaml

    root = tmp_path_factory.mktemp("demo") / "checkout"
    root.mkdir()
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    for folder in ("notebooks", "jupyter"):
        shutil.copytree(REPO / folder, root / folder)
    demo = yaml.safe_load((REPO / "params/demo.yaml").read_text())
    grid = {
        "name": "demo",
        "axes": {"teacher": {"toy": demo["axes"]["teacher"]["toy"]},
                 "compressor": {"extractive": demo["axes"]["compressor"]["extractive"]}},
        "stages": {k: demo["stages"][k] for k in ("generate", "compress", "truncate")},
    }
    grid["stages"]["generate"]["params"]["toy"] = {"n_train": 40, "n_test": 8, "slip_rate": 0.3}
    (root / "params").mkdir()
    (root / "params/mini.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", "params/mini.yaml"], cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for cell in ("generate/toy", "compress/toy__extractive", "truncate/toy"):
        assert (root / "outputs/demo" / cell / "manifest.json").exists(), cell
    return root
