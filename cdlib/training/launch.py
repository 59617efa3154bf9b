"""Launching a training run across processes: ``accelerate launch`` over the visible GPUs, or torchrun on CPU.

:func:`launch` writes the cell's parameters to ``<out_dir>/train_params.json`` and runs
``python -m cdlib.train`` on every rank (:func:`cdlib.train.main`, which first calls :func:`die_with_parent`);
the main rank writes its metrics to :data:`METRICS_FILE`, read back here. :func:`cdlib.train.train`
chooses between this and an in-process run.

The ranks die with whoever launched them, so no orphaned rank keeps training into the cell directory
beside a rerun: the launcher (torchrun or accelerate) runs in its own session, is sent SIGKILL by the
kernel when the launching process dies (Linux's parent-death signal, even when that process is
SIGKILLed), and its process group is stopped when :func:`launch` leaves by an exception (an
interrupted kernel, a timeout); each rank in turn asks for SIGKILL when its launcher dies
(torchrun starts every rank in a session of its own, out of reach of the launcher's group).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from cdlib.params import TrainParams

METRICS_FILE = "train_metrics.json"  # written by the worker entry point, read back by launch()
RANK_MODULE = "cdlib.train"  # what every rank runs (python -m): the train stage's worker entry point
STOP_GRACE_S = 10.0  # after SIGTERM, how long the launcher has to stop its ranks before SIGKILL


def visible_gpus() -> int:
    """Number of CUDA devices this process can see (0 without CUDA)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover
        return 0


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the OS send this process ``sig`` when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``;
    elsewhere nothing). A parent that died before the call is caught too: the process is then reparented."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a launcher and its process group: SIGTERM (torchrun then stops its ranks), SIGKILL after
    :data:`STOP_GRACE_S` (its ranks then die of their parent-death signal)."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def launch(P: TrainParams, num_processes: int | None = None, cpu: bool = False,
           env: dict[str, str] | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Run :func:`cdlib.train.run` across processes and return the main rank's metrics.

    The params go to ``<out_dir>/train_params.json`` and every rank runs
    ``python -m cdlib.train <json>``. GPUs: ``accelerate launch [--config_file
    P.accelerate_config] --num_processes N -m cdlib.train <json>`` (N:
    ``num_processes`` or the visible GPUs). ``cpu=True``: ``torchrun
    --nproc_per_node N`` (accelerate's own launcher runs a single process with
    ``--cpu``); the ranks talk over gloo; with ``accelerate_config`` set too, ``accelerate launch`` with that
    config and no visible GPU (``fsdp2-cpu.yaml``: FSDP2 over gloo, :func:`cdlib.train.fsdp_on_cpu`). Output
    streams to this process's stdout/stderr; a failing launch raises ``subprocess.CalledProcessError``, one past
    ``timeout`` seconds ``subprocess.TimeoutExpired``. Either way, and on any exception
    (an interrupt), the launcher and its ranks are stopped before this returns; if this
    process dies, they die with it (see the module's docstring).
    """
    out = Path(P.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params_path = out / "train_params.json"
    params_path.write_text(P.model_dump_json(indent=2))
    (out / METRICS_FILE).unlink(missing_ok=True)
    n = num_processes or max(1, visible_gpus())
    bindir = Path(sys.executable).parent
    env = {**os.environ, **(env or {})}
    if cpu and P.accelerate_config:  # CPU ranks under the config (slurm/accelerate/fsdp2-cpu.yaml: FSDP2 over gloo)
        env["CUDA_VISIBLE_DEVICES"] = ""
        cpu = False
    if cpu:
        cmd = [str(bindir / "torchrun") if (bindir / "torchrun").exists() else "torchrun",
               "--nproc_per_node", str(n), "-m", RANK_MODULE, str(params_path)]
    else:
        cmd = [str(bindir / "accelerate") if (bindir / "accelerate").exists() else "accelerate", "launch"]
        if P.accelerate_config:
            cmd += ["--config_file", P.accelerate_config]
        cmd += ["--num_processes", str(n), "-m", RANK_MODULE, str(params_path)]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)
    try:
        rc = proc.wait(timeout=timeout)
    except BaseException:  # a timeout, an interrupted kernel: no rank outlives this call
        _stop(proc)
        raise
    if rc:
        _stop(proc)  # ranks a failed launcher left behind
        raise subprocess.CalledProcessError(rc, cmd)
    return json.loads((out / METRICS_FILE).read_text())
