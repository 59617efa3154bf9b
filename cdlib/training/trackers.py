"""Experiment trackers of a training run (``TrainParams.report_to``), through accelerate's tracker API.

TensorBoard, Weights & Biases, MLflow or trackio: :func:`start_tracking` opens the run with every
training parameter as its config, :func:`track_steps` sends each logged step (loss, EMA, learning rate,
the KL run's cross-entropy, tokens/s). Used by :mod:`cdlib.train`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cdlib.params import TrainParams


def start_tracking(accelerator: Any, P: TrainParams, out: Path) -> dict[str, float] | None:
    """Start ``P.report_to``'s tracker through accelerate; None for "none", else the throughput clock.

    The run is named after the cell directory and its config holds every training
    parameter (scalars as they are, the rest as text, which every tracker accepts).
    Credentials (``WANDB_API_KEY``, ``MLFLOW_TRACKING_URI``, ...) come from the
    environment, as each tracker documents. TensorBoard writes under
    ``<out_dir>/trackers/<tracker_project>``.
    """
    if P.report_to == "none":
        return None
    config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in P.model_dump().items()}
    names = {"wandb": {"name": out.name}, "mlflow": {"run_name": out.name}, "trackio": {"name": out.name}}
    accelerator.init_trackers(P.tracker_project, config=config,
                              init_kwargs={P.report_to: names[P.report_to]} if P.report_to in names else {})
    return {"time": time.time(), "tokens": 0}  # the last logged step, for throughput


def track_steps(accelerator: Any, clock: dict[str, float] | None, records: list[dict[str, Any]]) -> None:
    """Send logged steps to the tracker: loss, EMA, learning rate, KL run's CE, and tokens/s since the last log."""
    if clock is None or not records:
        return
    now = time.time()
    throughput = (records[-1]["tokens"] - clock["tokens"]) / max(now - clock["time"], 1e-9)
    clock.update(time=now, tokens=records[-1]["tokens"])
    for rec in records:
        values = {"train/loss": rec["loss"], "train/ema": rec["ema"], "train/lr": rec["lr"],
                  "train/tokens": rec["tokens"]}
        if "ce" in rec:
            values["train/ce"] = rec["ce"]
        if rec is records[-1]:
            values["train/tokens_per_s"] = throughput
        accelerator.log(values, step=rec["step"])
