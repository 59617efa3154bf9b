"""Experiment tracking through accelerate's tracker API, with TensorBoard offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdlib import train as T
from cdlib.params import GenerateParams, ToyParams, TrainParams
from cdlib.store import Store


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> Path:
    import cdlib.generate

    out = tmp_path_factory.mktemp("gen") / "generate"
    cdlib.generate.run(GenerateParams(out_dir=str(out), toy=ToyParams(n_train=60)))
    return out


def test_tensorboard_gets_loss_lr_throughput_and_config(traces, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "toy__tiny__full__raw"
    P = TrainParams(out_dir=str(out), data=str(traces), max_steps=6, log_every=2, seq_len=1024, tiny_layers=1,
                    gradient_checkpointing=False, report_to="tensorboard", tracker_project="proj")
    T.run(P, progress=False, log=lambda *a: None)
    runs = list((out / "trackers" / "proj").rglob("events.out.tfevents.*"))
    assert runs, list((out / "trackers").rglob("*"))
    acc = EventAccumulator(str(runs[0].parent)).Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/tokens_per_s", "val/loss"} <= set(scalars), scalars
    curve = sorted(Store(out / "loss.jsonl").read(), key=lambda r: r["step"])
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(logged) == [r["step"] for r in curve] == list(range(1, 7))  # every step, as loss.jsonl
    assert all(abs(logged[r["step"]] - r["loss"]) < 1e-5 for r in curve)
    assert all(e.value > 0 for e in acc.Scalars("train/tokens_per_s"))
    assert [e.step for e in acc.Scalars("train/tokens_per_s")] == [2, 4, 6]  # once per log_every


def test_no_tracker_by_default_and_unknown_one_is_refused(traces, tmp_path):
    from cdlib.params import ParamsError, validate

    P = TrainParams(out_dir=str(tmp_path / "t"), data=str(traces), max_steps=2, seq_len=1024, tiny_layers=1,
                    gradient_checkpointing=False)
    assert P.report_to == "none"
    T.run(P, progress=False, log=lambda *a: None)
    assert not (tmp_path / "t" / "trackers").exists()
    with pytest.raises(ParamsError, match="report_to"):
        validate("train", {"data": "x", "report_to": "neptune"})
