# %% [markdown]
# # Stage 1: teacher traces with rejection sampling
#
# Paper section 3.1 and Appendix A (Table 4). Every pending question goes to the
# teacher in one batch per round; answers are extracted and verified with
# `cdlib.answers`; only verified-correct traces are kept; wrong ones are asked again,
# up to `rounds` rounds. Rerunning resumes from `traces.jsonl` / `attempts.jsonl`.
# For Mixed-Policy Distillation a student samples instead (`model`: its train cell) and
# `keep: all` keeps every trajectory, right or wrong, with its verdict.

# %% tags=["parameters"]
out_dir: str = "outputs/scratch/generate"  # cell directory (the grid runner sets it)
seed: int = 0  # seed for subsampling and the toy world
datasets: list = ["toy"]  # dataset names from cdlib.datasets.REGISTRY
data_paths: dict = {}  # dataset name -> local JSONL/Parquet in the original layout (offline clusters)
limit: int = None  # questions per dataset after a seeded shuffle (None: all)
toy: dict = {}  # toy world knobs (cdlib.params.ToyParams)
split: str = "train"  # which split: train (trace generation) or eval
engine: dict = {"kind": "toy"}  # teacher engine (cdlib.params.EngineParams): kind, model, parallelism, ...
sampling: dict = {}  # teacher sampling (cdlib.params.SamplingParams): temperature, top_p, max_tokens, seed
rounds: int = 4  # K: rejection-sampling rounds for wrong answers
chunk_size: int = None  # questions per engine call (None: a whole round at once)
shard_index: int = 0  # this Slurm array task's shard of the question pool
num_shards: int = 1  # number of shards the pool is split into
model: str = None  # replaces engine.model: a train cell directory, model dir or hub id (MPD: the student samples)
keep: str = "correct"  # "correct" (rejection sampling) or "all" (every answered attempt, with its verdict: MPD)

# %%
import cdlib.generate
import cdlib.outputs
import cdlib.params
import cdlib.prompts
import cdlib.store

P = cdlib.params.from_notebook("generate", globals())
P

# %% [markdown]
# The question pool of this cell, and one question as the teacher sees it.

# %%
pool = cdlib.generate.load_questions(P)
print(f"{len(pool)} questions")
print(cdlib.prompts.build_prompt(pool[0]) if pool else "no questions")

# %% [markdown]
# Rejection sampling. Progress per round; correct traces leave the pool.

# %%
metrics = cdlib.generate.run(P)
cdlib.outputs.write_metrics(P.out_dir, metrics)
metrics["total_correct"], metrics["accuracy"]

# %% [markdown]
# Table 4 for this teacher: kept traces, reasoning length, completion tokens, accuracy, rounds.

# %%
cdlib.generate.table4(P.out_dir)

# %% [markdown]
# One kept trace.

# %%
traces = cdlib.store.Store(f"{P.out_dir}/traces.jsonl").read()
print(traces[0]["response"] if traces else "no traces kept")
