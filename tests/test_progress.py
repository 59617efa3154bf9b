"""Run-level progress of grid runs: log parsing, the status line, plain lines off a terminal."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading

from cdlib import progress


def test_cell_progress_prefers_the_stage_bar_over_papermills(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("Executing:  33%|###3      | 4/12 [00:01<00:02,  2.74cell/s]\n")
    assert progress.cell_progress(log) == ("cells", 4, 12)
    with log.open("a") as f:
        f.write("train:  10%|#         | 150/1500 [00:30<04:30,  5.00step/s, loss=3.2]\n")
        f.write("train:  43%|####3     | 640/1500 [02:08<02:52,  5.00step/s, loss=1.9]\r")
        f.write("Executing:  42%|####1     | 5/12 [00:01<00:02,  2.74cell/s]\n")
    assert progress.cell_progress(log) == ("train", 640, 1500)
    assert progress.cell_progress(tmp_path / "missing.txt") is None
    (tmp_path / "empty.txt").write_text("no bars here 3/4 apples")
    assert progress.cell_progress(tmp_path / "empty.txt") is None


def test_line_counts_done_running_and_eta(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("round 1/4:  50%|#####     | 20/40 [00:02<00:02, 10q/s]\n")
    p = progress.RunProgress(total=4, jobs=1, stream=io.StringIO())
    p.started("generate/toy", tmp_path / "gone.txt")
    p.finished("generate/toy")
    p.started("compress/toy__x", log)
    line = p.line()
    assert line.startswith("grid: 1/4 cells done · running: compress/toy__x 20/40 round 1/4 (50%)"), line
    assert "elapsed" in line and "ETA ~" in line


def test_plain_lines_off_a_terminal_only_when_something_changed(tmp_path):
    out = io.StringIO()
    p = progress.RunProgress(total=2, stream=out, interval=0.01)
    assert not p.tty
    p._draw()
    p._draw()  # nothing changed but the clock: no second line
    p.started("a", tmp_path / "x")
    p._draw()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert lines[1].startswith("grid: 0/2 cells done · running: a")


def test_ticker_thread_prints_and_stops(tmp_path):
    class Stream(io.StringIO):
        def __init__(self):
            super().__init__()
            self.wrote = threading.Event()

        def write(self, s):
            self.wrote.set()
            return super().write(s)

    out = Stream()
    p = progress.RunProgress(total=1, stream=out, interval=0.01).start()
    assert out.wrote.wait(30)  # a condition, not a fixed sleep
    p.stop()
    assert "grid: 0/1 cells done" in out.getvalue()


def test_text_bars_inside_grid_cells():
    code = ("from cdlib.progress import tqdm\n"
            "for _ in tqdm(range(3), desc='train', unit='step', mininterval=0): pass\n")
    env = {**os.environ, progress.TEXT_ENV: "1"}
    err = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stderr
    assert "train: 100%" in err and "3/3 [" in err


def test_grid_run_prints_cells_done_and_the_running_cells_step(tmp_path):
    """A real grid run, output not a terminal: plain progress lines naming the running cell's x/y."""
    import yaml
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    grid = {"name": "prog", "output_root": str(tmp_path / "out"),
            "axes": {"x": {"two": {"all": {"x": 2}}, "three": {"all": {"x": 3}}}},
            "stages": {"sq": {"notebook": str(repo / "tests/notebooks/square.py"), "axes": ["x"],
                              "params": {"sleep_s": 4.0, "steps": 40}}}}
    path = tmp_path / "prog.yaml"
    path.write_text(yaml.safe_dump(grid))
    env = {**os.environ, "CDLIB_PROGRESS_INTERVAL": "0.3", "CDLIB_PROGRESS_S": "0"}
    out = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", str(path)], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "\r" not in out.stdout
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("grid: ")]
    stepping = [ln for ln in lines if " work (" in ln]
    assert stepping, out.stdout[-3000:]  # e.g. 'grid: 0/2 cells done · running: sq/2 17/40 work (42%) · elapsed 3s'
    assert any(ln.startswith("grid: 1/2 cells done") and "ETA ~" in ln for ln in lines), lines
    assert out.stdout.splitlines()[-1].startswith("run finished in ") and \
        out.stdout.splitlines()[-1].endswith(": 2 done, 0 failed, 0 blocked"), out.stdout[-500:]


def test_a_stage_bar_wins_over_a_librarys_unlabelled_counts(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("round 1/1:  25%|##5       | 4/16 [00:02<00:06, 2q/s]\n"
                   "Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:00<00:00, 9.9it/s]\n")
    assert progress.cell_progress(log) == ("round 1/1", 4, 16)


def test_a_running_cell_never_shows_100_percent(tmp_path):
    from cdlib.progress import RunProgress, running_percent

    assert running_percent(1500, 1500) == 99 and running_percent(640, 1500) == 42
    log = tmp_path / "log.txt"
    log.write_text("train: 100%|##########| 1500/1500 [00:10<00:00]\n")
    p = RunProgress(total=3, stream=open(tmp_path / "out.txt", "w"), interval=60)
    p.started("train/x", log)
    assert "1500/1500 train (99%)" in p.line() and "100%" not in p.line()


def test_the_eta_times_each_cell_left_by_its_own_stage_and_planned_size():
    """Three 2-second cells finished: the mean of all cells would say a 200-step training cell takes 2 s.
    It is timed by training cells instead (a 100-step one took 100 s in an earlier run): 200 s; a cell of
    a stage never seen takes its kind's time, then any cell's; running cells count what is left of them."""
    train = ("train", "train", ("steps", 200.0))
    est = progress.Estimator(prior=[(("train", "train", ("steps", 100.0)), 100.0)])
    for _ in range(3):
        est.add(("generate", "generate", None), 2.0)
    assert est.seconds(train) == 200.0
    assert est.seconds(("pretrain", "train", ("steps", 50.0))) == 50.0  # its kind's time per step
    assert est.seconds(("evaluate", "evaluate", None)) == 2.0  # nothing of its stage or kind: any cell's
    assert est.remaining([train, train], [], jobs=2) == 200.0
    assert est.remaining([], [(train, 30.0, 0.25)], jobs=1) == 150.0  # its bar: a quarter done
    assert est.remaining([], [(("generate", "generate", None), 0.5, None)], jobs=1) == 1.5
    assert progress.Estimator().remaining([train], [], jobs=1) is None
    assert progress.planned_size("train", {"max_steps": 0, "epochs": 3}) == ("epochs", 3.0)

    p = progress.RunProgress(total=2, stream=io.StringIO(), cells={"generate/toy": ("generate", "generate", None),
                                                                  "train/x": train},
                             prior=[(("train", "train", ("steps", 100.0)), 100.0),
                                    (("generate", "generate", None), 4.0)])
    assert p.line().endswith("ETA ~3m24s"), p.line()  # from the earlier run's manifests, before any cell ends
    p.skipped("generate/toy")
    assert p.line().endswith("ETA ~3m20s"), p.line()
