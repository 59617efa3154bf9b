"""The training loop reads nothing back from the device per micro-batch.

On a GPU every ``.item()`` / ``float(t)`` / ``int(t)`` / ``bool(t)`` / ``.tolist()`` of a
device tensor waits for the GPU to finish all queued work. ``cdlib.train.run`` plans the
token counts in the data loader and keeps the losses on the device, reading them once per
``log_every`` steps. On CPU nothing waits, so the test counts those calls instead: two
tiny runs that differ only in their number of steps must differ by at most one read per
extra loss read (a loop that read a loss or a token count per micro-batch differs by
several per extra step). The packed block mask the loop derives from ``position_ids`` on
the device equals the one the collate used to build on the host.
"""

from __future__ import annotations

import sys

import pytest
import torch

from cdlib.training import packing as packlib
from cdlib import train as T
from cdlib.params import GenerateParams, ToyParams, TrainParams

READS = ("item", "tolist", "__float__", "__int__", "__bool__")


@pytest.fixture(scope="module")
def toy_cell(tmp_path_factory):
    import cdlib.generate

    out = tmp_path_factory.mktemp("gen") / "generate"
    cdlib.generate.run(GenerateParams(out_dir=str(out), toy=ToyParams(n_train=40)))
    return out


def _count_reads(monkeypatch) -> dict[str, int]:
    """Count value reads of tensors, except torch.optim's of its step counters (CPU tensors on a GPU too)."""
    counts = {"n": 0}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **k):
            if "torch/optim/" not in sys._getframe(1).f_code.co_filename.replace("\\", "/"):
                counts["n"] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def test_no_device_read_per_micro_batch(toy_cell, tmp_path, monkeypatch):
    base = TrainParams(out_dir=str(tmp_path / "prep"), data=str(toy_cell), seq_len=512, tiny_layers=1, tiny_hidden=64,
                       gradient_checkpointing=False, grad_accum=2, log_every=1, max_steps=1, val_fraction=0.1,
                       save_every=0, optimizer="adamw")
    data = T.prepare(base, is_main=True)
    counts = _count_reads(monkeypatch)
    reads = {}
    for steps in (1, 3):
        P = base.model_copy(update={"out_dir": str(tmp_path / f"s{steps}"), "max_steps": steps})
        before = counts["n"]
        m = T.run(P, data=data, progress=False, log=lambda *a: None)
        reads[steps] = counts["n"] - before
        assert m["steps"] == steps
    # 2 more steps = 4 more micro-batches, 2 more loss reads (log_every 1)
    assert reads[3] - reads[1] <= 2, f"device reads: {reads[1]} in 1 step, {reads[3]} in 3"
    # the training stack is recorded in the metrics (paper H.3; none of it applies on CPU)
    assert (m["optimizer"], m["optimizer_requested"], m["optimizer_note"]) == ("torch.AdamW", "adamw", None)
    assert m["tf32"] is (True if torch.cuda.is_available() else None) and m["liger_kernels"] is None


@pytest.mark.parametrize("attention,window", [("sdpa", None), ("eager", None), ("sdpa", 3)])
def test_block_mask_from_positions_equals_the_collated_one(attention, window):
    examples = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in (5, 3, 1, 4, 2)]
    bins = [[0, 2], [1, 3, 4]]
    layout = packlib.Layout(attention=attention, packing=True, sliding_window=window)
    built = packlib.collate(examples, bins, layout)
    lean = packlib.collate(examples, bins, layout, build_mask=False)
    assert "attention_mask" not in lean
    derived = packlib.block_mask_from_positions(lean["position_ids"], layout)
    if window is None:
        assert torch.equal(derived, built["attention_mask"])
    else:
        assert built["attention_mask"].keys() == derived.keys()
        assert all(torch.equal(derived[k], built["attention_mask"][k]) for k in derived)


# --------------------------------------------------------------------------- paper H.3's training stack


@pytest.mark.parametrize("name,package", [("adamw_bnb_8bit", "bitsandbytes"), ("adamw_8bit", "bitsandbytes"),
                                          ("adamw_torch_8bit", "torchao")])
def test_8bit_optimizers_fall_back_to_torch_adamw_saying_why(name, package):
    import importlib.util

    params = [torch.nn.Parameter(torch.zeros(3))]
    P = TrainParams(out_dir="unused", data="unused", optimizer=name)
    _, used, note = T.make_optimizer(params, P, 1e-3, on_gpu=False)
    assert used == "torch.AdamW" and name in note and package in note and "CUDA GPU" in note
    if importlib.util.find_spec(package) is None:  # a GPU without the package says which one is missing
        _, used, note = T.make_optimizer(params, P, 1e-3, on_gpu=True)
        assert used == "torch.AdamW" and f"{package} is not installed" in note
    _, used, note = T.make_optimizer(params, P.model_copy(update={"optimizer": "adamw"}), 1e-3, on_gpu=False)
    assert (used, note) == ("torch.AdamW", None)


def test_paper_grid_trains_with_h3s_stack():
    """H.3: adamw_bnb_8bit for LoRA, adamw_torch_8bit for Full, TF32, Cut Cross-Entropy and the Liger kernels."""
    from cdlib.grid import Grid

    cells = Grid("params/paper.yaml").select("train")
    assert len(cells) == 55
    for c in cells:
        P = TrainParams(**{k: v for k, v in c.params.items() if k in TrainParams.model_fields})
        assert P.optimizer == {"lora": "adamw_bnb_8bit", "full": "adamw_torch_8bit"}[P.method], c.id
        assert (P.tf32, P.loss_head, P.liger_kernels) == (True, "cce", True), c.id
