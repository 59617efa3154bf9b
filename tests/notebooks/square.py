# %% [markdown]
# A tiny stand-in stage for the grid runner tests: squares `x`, optionally fails or sleeps.

# %% tags=["parameters"]
out_dir: str = "outputs/scratch/square"  # cell directory, set by the grid runner
x: int = 2  # the number to square
upstream: str = ""  # an upstream cell directory whose metrics are added
fail: bool = False  # raise an error in the work cell
sleep_s: float = 0.0  # seconds to sleep before finishing
log: str = ""  # file to which 'start <out_dir>' and 'end <out_dir>' lines are appended
steps: int = 0  # spread sleep_s over this many steps of a progress bar (cdlib.progress.tqdm)

# %%
import json
import time
from pathlib import Path

out = Path(out_dir)
if log:
    with open(log, "a") as f:
        f.write(f"start {out_dir}\n")

# %%
y = x * x
if upstream:
    y += json.loads((Path(upstream) / "metrics.json").read_text())["y"]
if fail:
    raise RuntimeError(f"asked to fail with x={x}")
if steps:
    from cdlib.progress import tqdm

    for _ in tqdm(range(steps), desc="work", unit="step", mininterval=0):
        time.sleep(sleep_s / steps)
else:
    time.sleep(sleep_s)

# %%
import os

cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))  # the runner's --jobs pins each cell
(out / "metrics.json").write_text(json.dumps({"y": y, "x": x, "cpus": cpus, "omp": os.environ.get("OMP_NUM_THREADS")}))
if log:
    with open(log, "a") as f:
        f.write(f"end {out_dir}\n")
