"""Launching a training run across processes: ``accelerate launch`` over the visible GPUs, or torchrun on CPU.

:func:`launch` writes the cell's parameters to ``<out_dir>/train_params.json`` and runs
``python -m cdlib.train`` on every rank (:func:`cdlib.train.main`); the main rank writes its
metrics to :data:`METRICS_FILE`, read back here. :func:`cdlib.train.train` chooses between this
and an in-process run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cdlib.params import TrainParams

METRICS_FILE = "train_metrics.json"  # written by the worker entry point, read back by launch()


def visible_gpus() -> int:
    """Number of CUDA devices this process can see (0 without CUDA)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover
        return 0


def launch(P: TrainParams, num_processes: int | None = None, cpu: bool = False,
           env: dict[str, str] | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Run :func:`cdlib.train.run` across processes and return the main rank's metrics.

    The params go to ``<out_dir>/train_params.json`` and every rank runs
    ``python -m cdlib.train <json>``. GPUs: ``accelerate launch [--config_file
    P.accelerate_config] --num_processes N -m cdlib.train <json>`` (N:
    ``num_processes`` or the visible GPUs). ``cpu=True``: ``torchrun
    --nproc_per_node N`` (accelerate's own launcher runs a single process with
    ``--cpu``); the ranks talk over gloo. Output streams to this process's
    stdout/stderr; a failing launch raises ``subprocess.CalledProcessError``.
    """
    out = Path(P.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params_path = out / "train_params.json"
    params_path.write_text(P.model_dump_json(indent=2))
    (out / METRICS_FILE).unlink(missing_ok=True)
    n = num_processes or max(1, visible_gpus())
    bindir = Path(sys.executable).parent
    if cpu:
        cmd = [str(bindir / "torchrun") if (bindir / "torchrun").exists() else "torchrun",
               "--nproc_per_node", str(n), "-m", "cdlib.train", str(params_path)]
    else:
        cmd = [str(bindir / "accelerate") if (bindir / "accelerate").exists() else "accelerate", "launch"]
        if P.accelerate_config:
            cmd += ["--config_file", P.accelerate_config]
        cmd += ["--num_processes", str(n), "-m", "cdlib.train", str(params_path)]
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})}, timeout=timeout)
    return json.loads((out / METRICS_FILE).read_text())
