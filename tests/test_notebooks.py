"""Notebook rules: one literal parameters cell with help comments, no def/class, keys match the models."""

from pathlib import Path

import pytest

from cdlib import notebook as nbtools
from cdlib.params import STAGE_MODELS

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.py")) + sorted((REPO / "tests/notebooks").glob("*.py"))
ALIASES = {"paper": "report"}  # notebook name -> stage model name where they differ
STAGE_NOTEBOOKS = {ALIASES.get(p.stem.split("_", 1)[1], p.stem.split("_", 1)[1]): p
                   for p in (REPO / "notebooks").glob("[0-9][0-9]_*.py")}


def test_every_stage_model_has_its_notebook():
    assert set(STAGE_MODELS) - {"train"} <= set(STAGE_NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(path):
    assert nbtools.lint(path) == []


@pytest.mark.parametrize("stage", sorted(set(STAGE_NOTEBOOKS) & set(STAGE_MODELS)))
def test_stage_notebook_declares_exactly_the_model_fields(stage):
    declared = nbtools.declared_parameters(STAGE_NOTEBOOKS[stage])
    assert set(declared) == set(STAGE_MODELS[stage].model_fields)
    assert all(p["help"] for p in declared.values())


def test_no_ipynb_is_tracked():
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "*.ipynb"], cwd=REPO, capture_output=True, text=True).stdout
    assert tracked.strip() == ""


BAD = '''# %% tags=["parameters"]
n: int = 3  # how many
m: int = n + 1  # derived
k: str = "x"
# %%
def helper():
    return 1
'''


def test_lint_catches_each_rule(tmp_path):
    p = tmp_path / "bad.py"
    p.write_text(BAD)
    problems = "\n".join(nbtools.lint(p))
    assert "bad.py:3: parameter 'm' is not a literal" in problems
    assert "bad.py:4: parameter 'k' has no '# help' comment" in problems
    assert "bad.py:6: 'helper' is defined in a notebook" in problems
    p.write_text("# %%\nx = 1\n")
    assert "exactly one cell tagged 'parameters'" in nbtools.lint(p)[0]


def test_declared_parameters_via_papermill():
    d = nbtools.declared_parameters(REPO / "tests/notebooks/square.py")
    assert d["x"] == {"type": "int", "default": "2", "help": "the number to square"}
    assert list(d) == ["out_dir", "x", "upstream", "fail", "sleep_s", "log", "steps"]
