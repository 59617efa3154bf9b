"""A finished output tree moved or copied elsewhere keeps working from its new place."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import yaml

from cdlib import serve
from cdlib.outputs import portable, resolve_model


def test_moved_train_cells_load_their_own_models(tiny_model_dir, tiny_lora_dir, tmp_path):
    """checkpoint.json names models inside the tree relative to the cell: after the tree moves, the
    evaluate and serve paths load the moved copies, and the old place may be gone."""
    grid = tmp_path / "old/outputs/demo"
    base, cell = grid / "pretrain/toy__tiny", grid / "train/toy__tiny__lora__extractive"
    shutil.copytree(tiny_model_dir, base / "model")
    shutil.copytree(tiny_lora_dir, cell / "adapter")
    info = {"model": str(base / "model"), "adapter": str(cell / "adapter"), "base": str(base / "model"),
            "student": "/shared/models/elsewhere", "method": "lora"}
    (cell / "checkpoint.json").write_text(json.dumps(portable(info, cell)))
    recorded = json.loads((cell / "checkpoint.json").read_text())
    assert recorded["model"] == "../../pretrain/toy__tiny/model" and recorded["adapter"] == "adapter"
    assert recorded["student"] == "/shared/models/elsewhere"

    new = tmp_path / "new/copy"
    shutil.move(tmp_path / "old/outputs", new)
    shutil.rmtree(tmp_path / "old")
    moved = new / "demo/train/toy__tiny__lora__extractive"
    target = resolve_model(str(moved))
    assert target == {"model": str((new / "demo/pretrain/toy__tiny/model").resolve()),
                      "adapter": str((moved / "adapter").resolve())}
    cmd = serve.command(str(moved), cpu=True, train_prompt=False)
    assert cmd[cmd.index("--model") + 1] == target["model"]


def test_grid_copied_under_another_output_root_is_done_not_a_conflict(demo_checkout, tmp_path):
    """The finished mini grid copied to another output_root: its cells are done there (params.yaml
    recorded the old root's paths), and a real change of params names the key that differs."""
    root = tmp_path / "checkout"
    shutil.copytree(demo_checkout, root, ignore=shutil.ignore_patterns("*.lock"))
    shutil.move(root / "outputs", root / "elsewhere")
    grid = yaml.safe_load((root / "params/mini.yaml").read_text())
    grid["output_root"] = "elsewhere"
    (root / "params/moved.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    run = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", "params/moved.yaml"], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "conflict" not in run.stdout + run.stderr
    grid["stages"]["truncate"]["params"]["tolerance"] = 3
    (root / "params/moved.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    run = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", "params/moved.yaml"], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert "differs from the grid's params in tolerance;" in run.stdout + run.stderr


def test_grid_runs_from_a_folder_inside_the_checkout(demo_checkout):
    """`grid status ../params/mini.yaml` from notebooks/ finds the notebooks and the outputs at the root."""
    out = subprocess.run([sys.executable, "-m", "cdlib.grid", "status", "../params/mini.yaml"],
                         cwd=demo_checkout / "notebooks", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "does not exist" not in out.stdout + out.stderr and "truncate/toy" in out.stdout
    assert not (demo_checkout / "notebooks/outputs").exists()
    helped = subprocess.run([sys.executable, "-m", "cdlib.grid", "--help"], capture_output=True, text=True, timeout=60)
    assert all(f"  {c} " in helped.stdout for c in ("run", "status", "slurm"))
    assert "python -m cdlib.grid slurm params/paper.yaml" in helped.stdout
