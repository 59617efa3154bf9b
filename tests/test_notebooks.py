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
    """Same names, and the same default values as the model.

    The grid runner injects only the keys a grid sets and validates cells with the model's
    defaults, so a notebook default that differs would run what was not validated. Exempt:
    keys the model requires (the notebook points at the cells `make demo` leaves, so it runs in JupyterLab), and
    an optional input cell the model leaves None that the notebook points at a cell of the demo
    (``outputs/demo/<stage>/<cell>``), so each notebook runs by hand on what `make demo` leaves.
    """
    import ast

    model = STAGE_MODELS[stage]
    declared = nbtools.declared_parameters(STAGE_NOTEBOOKS[stage])
    assert set(declared) == set(model.model_fields)
    assert all(p["help"] for p in declared.values())
    values = {k: ast.literal_eval(p["default"]) for k, p in declared.items()}
    required = {k for k, f in model.model_fields.items() if f.is_required()}
    scratch_inputs = {k for k, v in values.items() if isinstance(v, str) and v.startswith("outputs/demo/")
                      and model.model_fields[k].default is None}
    from_notebook = model.model_validate(values).model_dump()
    from_model = model.model_validate({k: values[k] for k in required}).model_dump()
    differ = {k: (from_notebook[k], from_model[k]) for k in model.model_fields
              if k not in required | scratch_inputs and from_notebook[k] != from_model[k]}
    assert differ == {}, f"{STAGE_NOTEBOOKS[stage].name}: notebook default != model default (notebook, model): {differ}"


def test_no_ipynb_is_tracked():
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "*.ipynb"], cwd=REPO, capture_output=True, text=True).stdout
    assert tracked.strip() == ""


BAD = '''# %% tags=["parameters"]
n: int = 3  # how many
m: int = n + 1  # derived
k: str = "x"
w: float = 1.0  # loss = w x KL
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
    assert "bad.py:5: papermill cannot read parameter 'w'" in problems
    assert "bad.py:7: 'helper' is defined in a notebook" in problems
    p.write_text("# %%\nx = 1\n")
    assert "exactly one cell tagged 'parameters'" in nbtools.lint(p)[0]


def test_declared_parameters_via_papermill():
    d = nbtools.declared_parameters(REPO / "tests/notebooks/square.py")
    assert d["x"] == {"type": "int", "default": "2", "help": "the number to square"}
    assert list(d) == ["out_dir", "x", "upstream", "fail", "sleep_s", "log", "steps"]


@pytest.mark.parametrize("name", ["05_evaluate.py", "06_judge.py"])
def test_evaluate_and_judge_notebooks_hold_no_frame_logic(name):
    """Their tables come from cdlib.evaluate / cdlib.judge; the notebook only calls them."""
    text = (REPO / "notebooks" / name).read_text()
    assert "polars" not in text and "pl." not in text and ".to_polars(" not in text


def test_papermill_runs_a_py_notebook_directly_on_the_demo_cells(demo_checkout):
    """`papermill notebooks/03_truncate.py out.ipynb -p key value`, as a papermill user runs it: the
    .py is read through jupytext (cdlib.notebook.TextNotebooks) and its defaults find the demo's cells."""
    import json
    import subprocess
    import sys

    papermill = Path(sys.executable).with_name("papermill")
    out = subprocess.run([str(papermill), "notebooks/03_truncate.py", "out.ipynb", "-p", "mode", "ratio",
                          "-p", "ratio", "0.25"], cwd=demo_checkout, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    nb = json.loads((demo_checkout / "out.ipynb").read_text())
    assert nb["metadata"]["papermill"]["parameters"] == {"mode": "ratio", "ratio": 0.25}
    cut = [json.loads(ln) for ln in (demo_checkout / "outputs/scratch/truncate/truncated.jsonl").open()]
    assert cut and all(r["truncated_tokens"] <= 0.25 * r["original_tokens"] + 1 for r in cut)


def test_explore_charts_render_offline_without_a_cdn(demo_checkout, tmp_path):
    """00_explore run by papermill with every proxy pointed at a closed loopback port: its charts are
    SVG drawn in the kernel (cdlib.figures.render_offline), and no output loads Vega from a CDN."""
    import json
    import os
    import subprocess
    import sys

    closed = "http://127.0.0.1:9"
    env = {**os.environ, "HTTP_PROXY": closed, "HTTPS_PROXY": closed, "http_proxy": closed,
           "https_proxy": closed, "NO_PROXY": "", "no_proxy": "", "HF_HUB_OFFLINE": "1"}
    out_nb = tmp_path / "explore.ipynb"
    papermill = Path(sys.executable).with_name("papermill")
    run = subprocess.run([str(papermill), "notebooks/00_explore.py", str(out_nb), "-p", "out_dir", str(tmp_path / "x")],
                         cwd=demo_checkout, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    outputs = [o for c in json.loads(out_nb.read_text())["cells"] for o in c.get("outputs", [])]
    svgs = [o for o in outputs if "image/svg+xml" in o.get("data", {})]
    assert svgs, "no chart was drawn as SVG"
    text = json.dumps(outputs)
    for cdn in ("cdn.jsdelivr.net", "unpkg.com", "cdnjs", "vega@", "vega-lite@"):
        assert cdn not in text, cdn
