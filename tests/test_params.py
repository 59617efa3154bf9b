"""Stage parameter models and every grid file under params/."""

from pathlib import Path

import pytest

from cdlib.grid import Grid
from cdlib.params import STAGE_MODELS, ParamsError, TrainParams, load_yaml, validate

REPO = Path(__file__).resolve().parents[1]
GRID_FILES = sorted((REPO / "params").glob("*.yaml")) + sorted((REPO / "benchmarks").glob("*.yaml"))


def test_unknown_key_is_rejected_with_key_and_file():
    with pytest.raises(ParamsError, match=r"params/x\.yaml: key 'lora_rnak': unknown key"):
        validate("train", {"out_dir": "o", "data": "d", "lora_rnak": 8}, source="params/x.yaml")


def test_wrong_type_is_rejected_with_key_and_value():
    with pytest.raises(ParamsError, match=r"f\.yaml: key 'epochs': .*number.*'one'"):
        validate("train", {"out_dir": "o", "data": "d", "epochs": "one"}, source="f.yaml")
    with pytest.raises(ParamsError, match=r"key 'engine\.kind': .*'vllm'.*'gpt'"):
        validate("generate", {"out_dir": "o", "engine": {"kind": "gpt"}}, source="f.yaml")
    with pytest.raises(ParamsError, match=r"key 'engine\.tensor_paralel_size': unknown key"):
        validate("generate", {"out_dir": "o", "engine": {"tensor_paralel_size": 2}}, source="f.yaml")


def test_missing_required_key_and_unknown_stage():
    with pytest.raises(ParamsError, match=r"key 'data': required key is missing"):
        validate("train", {"out_dir": "o"}, source="f.yaml")
    with pytest.raises(ParamsError, match=r"unknown stage 'trian'"):
        validate("trian", {}, source="f.yaml")


def test_paper_defaults():
    p = TrainParams(out_dir="o", data="d")
    assert (p.lora_rank, p.lora_alpha, p.lora_dropout, p.seq_len, p.warmup_ratio, p.val_fraction) == (
        64, 32, 0.05, 16384, 0.1, 0.05)
    assert set(STAGE_MODELS) == {"explore", "generate", "compress", "truncate", "train", "evaluate",
                                 "judge", "report", "import"}


def test_there_are_grid_files():
    assert GRID_FILES, "params/ holds the grid files"


@pytest.mark.parametrize("path", GRID_FILES, ids=lambda p: p.name)
def test_every_grid_file_validates(path):
    """Every cell of every grid validates against its stage model and its notebook's parameters."""
    grid = Grid(path, root=REPO)
    assert grid.cells
    grid.validate_cells()


def test_strings_are_not_coerced_to_numbers_or_bools():
    """Strict params: a quoted '8' or 'false' is refused, naming the key; int -> float is kept."""
    base = {"out_dir": "o", "data": "d"}
    with pytest.raises(ParamsError, match=r"key 'lora_rank': .*integer.*'8'"):
        validate("train", {**base, "lora_rank": "8"}, source="f.yaml")
    with pytest.raises(ParamsError, match=r"key 'packing': .*boolean.*'false'"):
        validate("train", {**base, "packing": "false"}, source="f.yaml")
    with pytest.raises(ParamsError, match=r"key 'engine\.max_retries': .*integer.*'3'"):
        validate("generate", {"out_dir": "o", "engine": {"max_retries": "3"}}, source="f.yaml")
    with pytest.raises(ParamsError, match=r"key 'seq_len': .*integer"):
        validate("train", {**base, "seq_len": 1024.5}, source="f.yaml")
    p = validate("train", {**base, "epochs": 2, "learning_rate": 1e-4, "packing": False}, source="f.yaml")
    assert (p.epochs, type(p.epochs), p.learning_rate, p.packing) == (2.0, float, 1e-4, False)


def test_yaml_reads_exponents_as_floats_and_refuses_duplicate_keys(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text("x-a: &a {n: 1, m: 2}\nlr: 1e-4\nbig: -2.5E+3\nquoted: '1e-4'\nmerged: {<<: *a, n: 3}\n")
    assert load_yaml(f) == {"x-a": {"n": 1, "m": 2}, "lr": 1e-4, "big": -2500.0, "quoted": "1e-4",
                            "merged": {"n": 3, "m": 2}}  # a merge key's values may be overridden
    f.write_text("stages:\n  train:\n    params: {seed: 1}\n    params: {seed: 2}\n")
    duplicate = r"g\.yaml:4:5: invalid YAML: duplicate key 'params' \(first given on line 3\)"
    with pytest.raises(ParamsError, match=duplicate):
        load_yaml(f)
    f.write_text("a: {seed: 1, seed: 2}\n")
    with pytest.raises(ParamsError, match=r"g\.yaml:1:14: .*duplicate key 'seed'"):
        load_yaml(f)


@pytest.mark.parametrize("path", sorted((REPO / "notebooks").glob("[0-9][0-9]_*.py")), ids=lambda p: p.name)
def test_notebook_defaults_validate_strictly(path):
    """Every stage notebook's parameters cell, as written, passes its stage model in strict mode."""
    import ast

    from cdlib.notebook import declared_parameters

    stage = {"paper": "report"}.get(path.stem.split("_", 1)[1], path.stem.split("_", 1)[1])
    values = {k: ast.literal_eval(v["default"]) for k, v in declared_parameters(path).items()}
    validate(stage, values, source=str(path))
