"""A training launch dies with the process that launched it (torchrun on CPU, accelerate launch as on GPUs):
SIGKILL the launching process while its ranks train, and the ranks are gone soon after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _processes_naming(text: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line holds ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.25)


@pytest.fixture(scope="module")
def toy_traces(tmp_path_factory):
    from cdlib import generate
    from cdlib.params import GenerateParams, ToyParams

    out = tmp_path_factory.mktemp("gen") / "generate"
    generate.run(GenerateParams(out_dir=str(out), toy=ToyParams(n_train=40, n_test=5), rounds=1))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("cpu,ranks", [(True, 2), (False, 1)], ids=["torchrun", "accelerate"])
def test_ranks_die_with_the_process_that_launched_them(toy_traces, tmp_path, cpu, ranks):
    from cdlib.params import TrainParams

    P = TrainParams(out_dir=str(tmp_path / "run"), data=str(toy_traces), max_steps=100_000, seq_len=512, limit=20,
                    tiny_layers=1, tiny_hidden=64, gradient_checkpointing=False, log_every=1, save_every=0,
                    val_fraction=0.1, warmup_ratio=0)
    script = ("import sys; from cdlib.training.launch import launch; from cdlib.params import TrainParams\n"
              f"launch(TrainParams.model_validate_json(sys.stdin.read()), num_processes={ranks}, cpu={cpu}, "
              "env={'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''})")
    launcher = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    launcher.stdin.write(P.model_dump_json())
    launcher.stdin.close()
    params = str(tmp_path / "run" / "train_params.json")
    loss = tmp_path / "run" / "loss.jsonl"
    try:
        _wait_for(lambda: loss.exists() and len(loss.read_text().splitlines()) >= 2, 300, "the ranks to train")
        assert len([p for p in _processes_naming(params) if p != launcher.pid]) >= ranks
        launcher.kill()  # SIGKILL: the launching process runs no cleanup of its own
        launcher.wait()
        _wait_for(lambda: not _processes_naming(params), 60, "the launcher and its ranks to die")
    finally:
        for pid in _processes_naming(params):  # a failing run leaves nothing behind either
            os.kill(pid, signal.SIGKILL)
