# %% [markdown]
# # Stage 5: student evaluation
#
# Paper section 4 and 5.4, Appendices D and F (Tables 7 and 9). The trained student answers
# every held-out question greedily, with the chat template it was trained with and the
# paper's 8,192-token cap; answers are extracted and verified with `cdlib.answers`.
# Rerunning resumes from `outputs.jsonl`.

# %% tags=["parameters"]
out_dir: str = "outputs/scratch/evaluate"  # cell directory (the grid runner sets it)
seed: int = 0  # seed for subsampling and the toy world
datasets: list = ["toy"]  # eval dataset names from cdlib.datasets.REGISTRY (paper: 12 in-distribution + 9 OOD)
data_paths: dict = {}  # dataset name -> local JSONL/Parquet in the original layout (offline clusters)
limit: int = None  # questions per dataset after a seeded shuffle (None: all)
toy: dict = {}  # toy world knobs (cdlib.params.ToyParams)
model: str = "outputs/demo/train/toy__tiny__full__extractive"  # train cell directory, checkpoint directory or hub id
split: str = "eval"  # which split to answer: eval (held out) or train
chat_format: str = "auto"  # chat template the student was trained with: auto, qwen, llama3, harmony, plain
engine: dict = {"kind": "vllm"}  # student engine (cdlib.params.EngineParams); LoRA adapters through vLLM's LoRA support
sampling: dict = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 8192}  # greedy, paper's 8,192-token cap
grouping: str = "paper"  # report groups: "paper" (the n its ± imply) or "dataset" (cdlib.datasets' groups)

# %%
import IPython.display

import cdlib.evaluate
import cdlib.outputs
import cdlib.params

P = cdlib.params.from_notebook("evaluate", globals())
P

# %% [markdown]
# What will be loaded: a train cell resolves to its checkpoint (and LoRA adapter).

# %%
cdlib.outputs.resolve_model(P.model)

# %% [markdown]
# Generate, extract, verify and score. Metrics as the paper defines them.

# %%
metrics = cdlib.evaluate.run(P)
cdlib.outputs.write_metrics(P.out_dir, metrics)
{k: v for k, v in metrics.items() if k not in ("groups", "rules")}

# %% [markdown]
# Accuracy per report group with its standard error and the paper's ± (ci95 = 1.96 × SE), one
# row of Table 7. Which dataset feeds which group is one table, `cdlib.evaluate.GROUPINGS[grouping]`:

# %%
IPython.display.display(cdlib.evaluate.grouping_table(P.grouping))
cdlib.evaluate.group_table(metrics)

# %% [markdown]
# Which extraction rule found each answer (many `none` or `truncated` means the student
# rarely finishes or ignores the answer format).

# %%
cdlib.evaluate.rule_table(metrics)

# %% [markdown]
# A few outputs, wrong ones and those cut at the token cap first.

# %%
cdlib.evaluate.worst_outputs(P.out_dir, n=10)

# %% [markdown]
# The end of two wrong outputs, where the answer should be.

# %%
print(cdlib.evaluate.wrong_endings(P.out_dir, n=2))
