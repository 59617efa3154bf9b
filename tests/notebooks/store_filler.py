# %% [markdown]
# A stand-in stage for the disk-fault tests: prints `chatter` bytes, then appends `records` records of 1 kB
# to a store in its directory, so a file-size limit cuts the store first and the executed notebook after.

# %% tags=["parameters"]
out_dir: str = "outputs/scratch/store_filler"  # cell directory, set by the grid runner
chatter: int = 0  # bytes printed before the store is written (they land in the executed notebook)
records: int = 10  # 1 kB records appended to records.jsonl

# %%
import json
from pathlib import Path

from cdlib.store import Store

out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)

# %%
print("." * chatter)
store = Store(out / "records.jsonl")
try:
    store.append({"id": str(i), "text": "x" * 1000} for i in range(records))
except OSError as e:  # the file being written, named as a full disk names it
    raise OSError(e.errno, e.strerror, str(store.path)) from e

# %%
(out / "metrics.json").write_text(json.dumps({"records": records}))
