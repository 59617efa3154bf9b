# %% [markdown]
# # Stage 1 without a teacher: import a reasoning-trace set
#
# A public set (OpenThoughts, OpenR1-Math, Bespoke-Stratos, s1K, LIMO, OpenAI-compatible
# `reasoning_content` logs) or one's own outputs, from the hub or local files, written as the
# generate stage's records (`traces.jsonl`), so compression, truncation, training, evaluation
# and the report run on it. Each answer is extracted and verified by this project
# (`cdlib.answers`); a row that does not verify is kept with a flag, or dropped (`unverified`).
# The layouts known and how rows map: `cdlib.trace_import`.

# %% tags=["parameters"]
out_dir: str = "outputs/scratch/import"  # cell directory (the grid runner sets it)
seed: int = 0  # unused by the import itself (every stage has one)
source: str = "tests/fixtures/trace_sets"  # hub dataset id, or a local JSONL/JSON/Parquet file or directory
config: str = None  # hub config, e.g. OpenR1-Math-220k's "default"
split: str = "train"  # hub split (a local file or directory is read whole)
layout: str = "auto"  # a layout of cdlib.trace_import.LAYOUTS, "columns", or "auto" (recognised per row)
columns: dict = {}  # question, reasoning, answer, response, gold: the column holding each (overrides the layout)
dataset: str = None  # the records' dataset name (None: the source's last path part)
answer_type: str = "auto"  # auto (numeric gold: numeric, else latex), numeric, latex, letter or boolean
tokenizer: str = "whitespace"  # counts completion tokens: "whitespace" or a HF tokenizer id/path
unverified: str = "flag"  # rows whose answer does not verify: "flag" (kept, flagged) or "drop"
limit: int = None  # the first rows only (None: all)
license: str = None  # the set's license where its files state none

# %%
import cdlib.outputs
import cdlib.params
import cdlib.store
import cdlib.trace_import

P = cdlib.params.from_notebook("import", globals())
P

# %% [markdown]
# Import: read, split reasoning from answer, extract and verify, count tokens.

# %%
metrics = cdlib.trace_import.run(P)
cdlib.outputs.write_metrics(P.out_dir, metrics)
metrics

# %% [markdown]
# Per dataset: kept traces, verified, flagged, mean reasoning length.

# %%
cdlib.trace_import.table(P.out_dir)

# %% [markdown]
# One imported trace as the downstream stages see it.

# %%
traces = cdlib.store.Store(f"{P.out_dir}/traces.jsonl").read()
{k: (v[:600] if isinstance(v, str) else v) for k, v in traces[0].items()} if traces else "no traces"
