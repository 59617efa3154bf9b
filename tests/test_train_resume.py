"""Resumable training and the chunked KL divergence.

A toy student trains for real in a subprocess (``python -m cdlib.train``) that is killed
with SIGKILL once it has written a resumable state; the rerun in the same directory must
pick up at that state's step and finish with exactly the losses, token counts and weights
of an uninterrupted run with the same seed (state restore is bit-exact on CPU), with one
``loss.jsonl`` row per step. The same holds for a LoRA student under the KL objective
(the state then holds only the adapters, and LoRA dropout's random numbers continue where
they stopped). A state written for other params is discarded with a message naming it.

The chunked divergence equals the all-at-once one, value and gradient, in every direction
and for chunk sizes that do not divide the token count.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cdlib.training import checkpoint, losses
from cdlib import train as T
from cdlib.params import GenerateParams, ToyParams, TrainParams

REPO = Path(__file__).resolve().parents[1]
QUICK = dict(seq_len=1024, gradient_checkpointing=False, log_every=3, tiny_layers=1, limit=60, learning_rate=2e-3)


@pytest.fixture(scope="module")
def toy_traces(tmp_path_factory) -> Path:
    """A generate cell of the toy world: about 100 verified teacher traces."""
    import cdlib.generate

    out = tmp_path_factory.mktemp("gen") / "generate"
    cdlib.generate.run(GenerateParams(out_dir=str(out), toy=ToyParams(n_train=100)))
    return out


def _kill_after_first_state(P: TrainParams) -> int:
    """Train ``P`` in a subprocess, SIGKILL it as soon as ``resume/`` holds a complete state; return its step."""
    out = Path(P.out_dir)
    out.mkdir(parents=True)
    params = out / "params.json"
    params.write_text(P.model_dump_json())
    log_path = out.parent / f"{out.name}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cdlib.train", str(params)], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            deadline = time.time() + 180
            while not (out / checkpoint.RESUME_DIR / checkpoint.RESUME_STATE).exists():
                assert proc.poll() is None, f"training ended (rc {proc.returncode}) without a state: {log_path}"
                assert time.time() < deadline, f"no resumable state after 180 s: {log_path}"
                time.sleep(0.01)
        finally:
            proc.kill()  # SIGKILL: no cleanup runs
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoint.json").exists(), "killed before the end of training"
    step = checkpoint.find_resume(out)[1]["step"]
    assert step > 0 and step % P.save_every == 0
    return step


def _curve_rows(out: Path) -> list[dict]:
    """Every line of loss.jsonl, duplicates included (Store.read does not deduplicate what is on disk)."""
    return [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines() if line.strip()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(next(path.glob("*.safetensors")))


def _check_resumed_equals_uninterrupted(P: TrainParams, killed_step: int, log: list[str], weights_dir: str) -> dict:
    """Rerun ``P`` in its killed directory and uninterrupted in a sibling one; both must agree exactly."""
    out = Path(P.out_dir)
    m = T.run(P, progress=False, log=log.append)
    assert m["resumed_from_step"] == killed_step
    assert f"resuming from step {killed_step} of {P.max_steps} ({out / checkpoint.RESUME_DIR})" in log
    assert m["steps"] == P.max_steps
    rows = _curve_rows(out)
    assert [r["step"] for r in rows] == list(range(1, P.max_steps + 1)), "each step once, in order"
    assert [r["id"] for r in rows] == [str(s) for s in range(1, P.max_steps + 1)]
    assert rows[-1]["tokens"] == m["trainable_tokens"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(checkpoint.RESUME_DIR)], "resume/ deleted at the end"

    straight = P.model_copy(update={"out_dir": str(out.parent / f"{out.name}-straight")})
    m0 = T.run(straight, progress=False, log=lambda *a: None)
    assert m0["resumed_from_step"] is None
    # bit-exact on CPU: weights, optimizer, scheduler and RNG states are restored, the data order is the plan's
    assert [r["loss"] for r in rows] == [r["loss"] for r in _curve_rows(Path(straight.out_dir))]
    assert [r["lr"] for r in rows] == [r["lr"] for r in _curve_rows(Path(straight.out_dir))]
    for key in ("train_loss", "train_loss_first", "train_loss_ema", "train_loss_tail_mean", "val_loss", "val_kl",
                "trainable_tokens", "total_tokens_seen", "tokens_per_section", "flops", "steps"):
        assert m[key] == m0[key], key
    a, b = _weights(out / weights_dir), _weights(Path(straight.out_dir) / weights_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return m


def test_killed_run_resumes_at_its_state_and_ends_as_an_uninterrupted_run(toy_traces, tmp_path):
    P = TrainParams(out_dir=str(tmp_path / "killed"), data=str(toy_traces), max_steps=60, save_every=4, **QUICK)
    step = _kill_after_first_state(P)
    out = Path(P.out_dir)
    state = json.loads((out / checkpoint.RESUME_DIR / checkpoint.RESUME_STATE).read_text())
    assert len(state["step_losses"]) == step and state["fingerprint"]["params"]["seed"] == 0
    assert {r["step"] for r in _curve_rows(out)} >= set(range(1, step + 1)), "the curve reached the state's step"

    # the same state under other params: discarded with a message, the run starts over
    other = tmp_path / "other"
    other.mkdir()
    shutil.copytree(out / checkpoint.RESUME_DIR, other / checkpoint.RESUME_DIR)
    shutil.copy(out / "loss.jsonl", other / "loss.jsonl")
    log: list[str] = []
    changed = P.model_copy(update={"out_dir": str(other), "learning_rate": 3e-3, "max_steps": 12})
    m = T.run(changed, progress=False, log=log.append)
    said = "\n".join(str(x) for x in log)
    assert f"{other / checkpoint.RESUME_DIR}: resumable state of step {step} was written for other inputs" in said
    assert "learning_rate: 0.002 -> 0.003" in said and "max_steps: 60 -> 12" in said
    assert "starting from step 0" in said
    assert m["resumed_from_step"] is None and m["steps"] == 12
    assert [r["step"] for r in _curve_rows(other)] == list(range(1, 13)), "a fresh curve"
    assert not (other / checkpoint.RESUME_DIR).exists()

    # a kill in the middle of writing the next state leaves an incomplete resume.tmp/: ignored
    (out / f"{checkpoint.RESUME_DIR}.tmp").mkdir()
    (out / f"{checkpoint.RESUME_DIR}.tmp" / "optimizer.bin").write_bytes(b"half")
    log = []
    m = _check_resumed_equals_uninterrupted(P, step, log, "model")
    assert m["save_every"] == 4 and m["wall_clock_s"] >= m["train_s"] > 0


def test_killed_lora_kl_run_resumes_from_a_state_of_adapters_only(toy_traces, tmp_path):
    """LoRA (dropout draws random numbers) under the chunked JSD objective; the state is the adapters only.

    The state is then moved to ``resume.tmp/`` with no ``resume/``: what a kill between
    writing a new state and renaming it into place leaves; the rerun resumes from it."""
    from cdlib.tiny import make_tiny_model

    teacher = make_tiny_model(tmp_path / "teacher", seed=0, num_layers=2)
    student = make_tiny_model(tmp_path / "student", seed=1, num_layers=1)  # same corpus: same tokenizer
    P = TrainParams(out_dir=str(tmp_path / "killed"), data=str(toy_traces), student=str(student), objective="kl",
                    kl_teacher=str(teacher), kl_direction="jsd", kl_chunk_tokens=50, method="lora", lora_rank=4,
                    lora_alpha=8, lora_dropout=0.1, max_steps=40, save_every=5, **{**QUICK, "learning_rate": 3e-3})
    step = _kill_after_first_state(P)
    out = Path(P.out_dir)
    saved = torch.load(out / checkpoint.RESUME_DIR / "pytorch_model.bin", weights_only=True)
    assert saved and all("lora_" in k for k in saved), "a LoRA state holds the adapters, not the frozen base"
    shutil.rmtree(out / f"{checkpoint.RESUME_DIR}.tmp", ignore_errors=True)
    (out / checkpoint.RESUME_DIR).rename(out / f"{checkpoint.RESUME_DIR}.tmp")

    log: list[str] = []
    m = T.run(P, progress=False, log=log.append)
    assert m["resumed_from_step"] == step
    assert f"resuming from step {step} of 40 ({out / (checkpoint.RESUME_DIR + '.tmp')})" in log
    assert [r["step"] for r in _curve_rows(out)] == list(range(1, 41))
    assert m["val_kl"] is not None and m["kl_direction"] == "jsd"

    straight = P.model_copy(update={"out_dir": str(tmp_path / "straight")})
    m0 = T.run(straight, progress=False, log=lambda *a: None)
    assert [r["loss"] for r in _curve_rows(out)] == [r["loss"] for r in _curve_rows(tmp_path / "straight")]
    assert m["val_loss"] == m0["val_loss"] and m["val_kl"] == m0["val_kl"]
    a, b = _weights(out / "adapter"), _weights(tmp_path / "straight" / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [p.name for p in out.iterdir() if p.name.startswith(checkpoint.RESUME_DIR)]


# --------------------------------------------------------------------------- chunked KL


def _logits(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(2, 37, 301, generator=g) * 3).to(dtype)
    t = (torch.randn(2, 37, 301, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 280, (2, 37), generator=g)
    labels[:, :6] = -100  # prompts
    labels[1, 20:26] = -100  # a packed row's second prompt
    return s, t, labels


@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_chunked_kl_equals_unchunked_in_value_and_gradient(direction):
    s, t, labels = _logits()
    ref_s = s.clone().requires_grad_()
    ref, n = losses.kl_sum(ref_s, t, labels, direction, vocab=290)
    (ref * 0.37).backward()
    assert n == 2 * 31 - 6
    for chunk in (1, 7, 13, 56, 4096):  # 7 and 13 do not divide the 56 supervised positions
        cs = s.clone().requires_grad_()
        got, m = losses.kl_sum(cs, t, labels, direction, vocab=290, chunk_tokens=chunk)
        (got * 0.37).backward()
        assert m == n
        assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-5), (direction, chunk)
        assert torch.allclose(cs.grad, ref_s.grad, atol=1e-5, rtol=1e-4), (direction, chunk)
        assert not cs.grad[..., 290:].any(), "padding columns get no gradient"
        assert not cs.grad[0, :5].any() and not cs.grad[:, -1].any(), "unsupervised positions get no gradient"
        with torch.no_grad():  # validation: no gradient buffer
            value = float(losses.kl_sum(s, t, labels, direction, 290, chunk)[0])
            assert value == pytest.approx(float(ref.detach()), rel=1e-5)
    assert float(losses.kl_sum(s, s, labels, direction, chunk_tokens=5)[0]) == pytest.approx(0.0, abs=1e-4)


def test_chunked_kl_on_bf16_logits_and_a_single_backward():
    s, t, labels = _logits(torch.bfloat16, seed=1)
    ref_s, cs = s.clone().requires_grad_(), s.clone().requires_grad_()
    ref, _ = losses.kl_sum(ref_s, t, labels, "forward")
    got, _ = losses.kl_sum(cs, t, labels, "forward", chunk_tokens=9)
    assert got.dtype == ref.dtype == torch.float32
    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    (ref * 2).backward()
    (got * 2).backward(retain_graph=True)
    assert cs.grad.dtype == torch.bfloat16
    assert torch.allclose(cs.grad.float(), ref_s.grad.float(), atol=2e-3, rtol=2e-2)
    with pytest.raises(RuntimeError, match="backward runs once"):
        got.backward()
    with pytest.raises(ValueError, match="kl_direction"):
        losses.kl_sum(s, t, labels, "sideways", chunk_tokens=4)
