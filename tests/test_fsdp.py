"""FSDP2 executed: training cells launched with slurm/accelerate/fsdp2-cpu.yaml on 2 CPU ranks over gloo, through
the project's own launch path (:func:`cdlib.training.launch.launch`, ``accelerate launch``), against one process.

What holds: the model is fully sharded (``fully_shard`` per decoder layer), with FSDP's activation checkpointing; the
resumable state is sharded (torch.distributed.checkpoint, one shard per rank) and a killed run resumes from it; the
final model is gathered into the HF layout that ``from_pretrained`` (and so the evaluation engine) loads; losses
and saved weights equal the one-process run's with the same global batch (2 ranks x 1 micro-batch vs 1 process x
2 accumulated), within float tolerance (the reductions run in another order); LoRA and the KL teacher too (the saved
adapter loads with peft and gives the one-process adapter's logits).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cdlib import outputs
from cdlib.training import checkpoint
from cdlib import train as T
from cdlib.training.launch import launch
from cdlib.params import TrainParams
from cdlib.store import Store
from test_launch import _processes_naming  # tests/ is on the path (its conftest.py)

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "slurm/accelerate/fsdp2-cpu.yaml")
ENV = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
COMMON = dict(seq_len=512, limit=40, tiny_layers=2, log_every=1, warmup_ratio=0, val_fraction=0.1)


@pytest.fixture(scope="module")
def toy_traces(tmp_path_factory) -> Path:
    from cdlib import generate
    from cdlib.params import GenerateParams, ToyParams

    out = tmp_path_factory.mktemp("gen") / "generate"
    generate.run(GenerateParams(out_dir=str(out), toy=ToyParams(n_train=40, n_test=5), rounds=1))
    return out


def _pair(tmp_path: Path, **kw) -> tuple[TrainParams, TrainParams]:
    """The FSDP2 cell (2 ranks, 1 micro-batch each per step) and its one-process twin (2 accumulated)."""
    two = TrainParams(out_dir=str(tmp_path / "fsdp"), grad_accum=1, accelerate_config=CONFIG, **kw)
    return two, two.model_copy(update={"out_dir": str(tmp_path / "one"), "grad_accum": 2, "accelerate_config": None})


def _losses(out: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in sorted(Store(out / "loss.jsonl").read(), key=lambda r: r["step"])]


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), (k, (a[k] - b[k]).abs().max())


def _assert_fsdp2(m: dict) -> None:
    assert (m["distributed_type"], m["fsdp_version"], m["processes"], m["ranks_finished"]) == ("FSDP", 2, 2, 2)
    assert m["activation_checkpointing"] == "fsdp"


def test_fsdp2_on_two_cpu_ranks_trains_and_saves_as_one_process(toy_traces, tmp_path):
    """Full fine-tuning; a sharded resumable state is written mid-run (save_every) and removed once the model is
    saved; the gathered HF model loads and equals the one-process model. The validation split packs into 3 rows,
    so rank 1 has fewer than rank 0: under FSDP its forwards are collectives, and this hung before validate()
    padded it with discarded forwards."""
    from transformers import AutoModelForCausalLM

    two, one = _pair(tmp_path, data=str(toy_traces), max_steps=3, save_every=2, **COMMON)
    m2 = launch(two, num_processes=2, cpu=True, env={"OMP_NUM_THREADS": "1"}, timeout=300)  # cpu: accelerate too
    _assert_fsdp2(m2)
    m1 = T.run(one, progress=False, log=lambda *a: None)
    assert m1["distributed_type"] == "NO" and m1["micro_batches"] == m2["micro_batches"]
    assert m1["trainable_tokens"] == m2["trainable_tokens"]
    assert _losses(Path(two.out_dir)) == pytest.approx(_losses(Path(one.out_dir)), rel=1e-5)
    assert m2["val_loss"] == pytest.approx(m1["val_loss"], rel=1e-5)
    assert not (Path(two.out_dir) / checkpoint.RESUME_DIR).exists()
    info = outputs.read_checkpoint(two.out_dir)
    assert info["model"] == str((Path(two.out_dir) / "model").resolve()) and info["adapter"] is None
    loaded = AutoModelForCausalLM.from_pretrained(info["model"])  # what the evaluation engine loads
    alone = AutoModelForCausalLM.from_pretrained(Path(one.out_dir) / "model")
    _assert_close({k: v for k, v in loaded.state_dict().items()}, {k: v for k, v in alone.state_dict().items()})


def _kill_after_first_state(P: TrainParams, timeout: float = 300) -> int:
    """Launch ``P`` on 2 ranks in a child process, SIGKILL that process once a resumable state is complete (its
    ranks die with it, cdlib.training.launch); returns the state's step."""
    script = ("import sys; from cdlib.training.launch import launch; from cdlib.params import TrainParams\n"
              f"launch(TrainParams.model_validate_json(sys.stdin.read()), num_processes=2, env={ENV!r})")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdin=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.stdin.write(P.model_dump_json())
    proc.stdin.close()
    state = Path(P.out_dir) / checkpoint.RESUME_DIR / checkpoint.RESUME_STATE
    deadline = time.monotonic() + timeout
    try:
        while not state.exists():
            assert proc.poll() is None, "the run ended before its first resumable state"
            assert time.monotonic() < deadline, "no resumable state in time"
            time.sleep(0.05)
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 60
        while _processes_naming(str(Path(P.out_dir) / "train_params.json")):
            assert time.monotonic() < deadline, "the ranks outlived their launcher"
            time.sleep(0.25)
    finally:
        for pid in _processes_naming(str(Path(P.out_dir) / "train_params.json")):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
    return int(json.loads(state.read_text())["step"])


@pytest.mark.slow
def test_killed_fsdp2_run_resumes_from_its_sharded_state(toy_traces, tmp_path):
    """The resumable state holds one torch.distributed.checkpoint shard per rank, not a gathered model; the
    relaunched cell resumes from it and ends where an uninterrupted FSDP2 run ends."""
    kw = dict(data=str(toy_traces), max_steps=40, save_every=2, grad_accum=1, accelerate_config=CONFIG, **COMMON)
    killed = TrainParams(out_dir=str(tmp_path / "killed"), **kw)
    step = _kill_after_first_state(killed)
    resume = Path(killed.out_dir) / checkpoint.RESUME_DIR
    shards = sorted(p.name for p in (resume / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert len(shards) == 2, sorted(p.name for p in resume.rglob("*"))
    assert not list(resume.glob("*.safetensors")) and not list(resume.glob("pytorch_model*.bin"))
    m = launch(killed, num_processes=2, env=ENV, timeout=300)
    _assert_fsdp2(m)
    assert m["resumed_from_step"] == step and step < 40
    straight = TrainParams(out_dir=str(tmp_path / "straight"), **kw)
    m0 = launch(straight, num_processes=2, env=ENV, timeout=300)
    assert _losses(Path(killed.out_dir)) == pytest.approx(_losses(Path(straight.out_dir)), rel=1e-5)
    assert m["val_loss"] == pytest.approx(m0["val_loss"], rel=1e-5)
    _assert_close(_safetensors(Path(killed.out_dir) / "model" / "model.safetensors"),
                  _safetensors(Path(straight.out_dir) / "model" / "model.safetensors"))


def _adapter_logits(info: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``ids`` from the base with the peft adapter of a train cell's checkpoint.json loaded on it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(info["model"]), info["adapter"]).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
def test_lora_with_the_kl_teacher_under_fsdp2_equals_one_process(toy_traces, tmp_path):
    """LoRA adapters on a sharded frozen base, trained against a KL teacher (loaded whole on every rank, not
    sharded): the curve (KL and CE), the validation KL and the saved adapter equal the one-process run's; the
    adapter loads on the base with peft and gives the one-process adapter's logits, which differ from the base's.

    This failed with an adapter_model.safetensors holding no tensors: peft chose the adapter entries by the live
    module names, which FSDP's activation checkpointing wraps (cdlib.training.checkpoint.adapter_weights)."""
    from transformers import AutoModelForCausalLM

    from cdlib.tiny import make_tiny_model

    teacher = make_tiny_model(tmp_path / "teacher", seed=0, num_layers=2)
    student = make_tiny_model(tmp_path / "student", seed=1, num_layers=2)
    two, one = _pair(tmp_path, data=str(toy_traces), student=str(student), objective="kl", kl_teacher=str(teacher),
                     method="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.0, learning_rate=5e-3, max_steps=4,
                     save_every=2, **{**COMMON, "seq_len": 1024})  # the tiny models' tokenizer makes longer rows
    m2 = launch(two, num_processes=2, env=ENV, timeout=300)
    _assert_fsdp2(m2)
    m1 = T.run(one, progress=False, log=lambda *a: None)
    for key in ("loss", "ce"):
        assert _losses(Path(two.out_dir), key) == pytest.approx(_losses(Path(one.out_dir), key), rel=1e-5), key
    assert m2["val_kl"] == pytest.approx(m1["val_kl"], rel=1e-5) and m2["val_kl"] > 0
    a = _safetensors(Path(two.out_dir) / "adapter" / "adapter_model.safetensors")
    _assert_close(a, _safetensors(Path(one.out_dir) / "adapter" / "adapter_model.safetensors"))
    assert all("lora_" in k and "_checkpoint_wrapped_module" not in k for k in a)
    assert len(a) == 2 * sum(m2["lora"]["adapted"].values())  # lora_A and lora_B of every adapted module
    info, info1 = outputs.read_checkpoint(two.out_dir), outputs.read_checkpoint(one.out_dir)
    ids = torch.arange(3, 40).reshape(1, -1)
    logits = _adapter_logits(info, ids)
    assert torch.allclose(logits, _adapter_logits(info1, ids), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(info["model"]).eval()(input_ids=ids).logits
    assert (logits - base).abs().max() > 1e-3  # the adapter was trained and is applied


@pytest.mark.slow
def test_killed_fsdp2_lora_run_resumes_as_an_uninterrupted_one(toy_traces, tmp_path):
    """LoRA with the KL teacher under FSDP2, killed after its first resumable state and relaunched: it resumes
    from the sharded state (under FSDP accelerate saves the whole sharded model, adapters and frozen base, so
    checkpoint.trainable_weights_only has nothing to filter) and its curve and adapter equal an uninterrupted run's."""
    from cdlib.tiny import make_tiny_model

    teacher = make_tiny_model(tmp_path / "teacher", seed=0, num_layers=2)
    student = make_tiny_model(tmp_path / "student", seed=1, num_layers=2)
    kw = dict(data=str(toy_traces), student=str(student), objective="kl", kl_teacher=str(teacher), method="lora",
              lora_rank=4, lora_alpha=8, lora_dropout=0.0, learning_rate=5e-3, max_steps=16, save_every=2,
              grad_accum=1, accelerate_config=CONFIG, **{**COMMON, "seq_len": 1024})
    killed = TrainParams(out_dir=str(tmp_path / "killed"), **kw)
    step = _kill_after_first_state(killed)
    assert len(list((Path(killed.out_dir) / checkpoint.RESUME_DIR / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    m = launch(killed, num_processes=2, env=ENV, timeout=300)
    _assert_fsdp2(m)
    assert m["resumed_from_step"] == step and step < 16
    straight = TrainParams(out_dir=str(tmp_path / "straight"), **kw)
    m0 = launch(straight, num_processes=2, env=ENV, timeout=300)
    for key in ("loss", "ce"):
        assert _losses(Path(killed.out_dir), key) == pytest.approx(_losses(Path(straight.out_dir), key), rel=1e-5), key
    assert m["val_kl"] == pytest.approx(m0["val_kl"], rel=1e-5)
    _assert_close(_safetensors(Path(killed.out_dir) / "adapter" / "adapter_model.safetensors"),
                  _safetensors(Path(straight.out_dir) / "adapter" / "adapter_model.safetensors"))
