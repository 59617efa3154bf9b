# %% [markdown]
# # Stage 2: trace compression
#
# Paper section 3.2, Appendix B (Tables 2 and 5), Figure 1. A compressor rewrites each
# verified trace into a shorter one; `extractive` needs no model. Each compression is
# checked: empty, degenerate, longer-than-original, answer-dropping and
# answer-contradicting outputs are flagged. Re-compressing them (`recompress_attempts`) and
# leaving them out downstream (`drop_flagged`) are options; the paper compresses every trace
# once and keeps every compression (params/paper.yaml), so there the flags are only reported.

# %% tags=["parameters"]
out_dir: str = "outputs/scratch/compress"  # cell directory (the grid runner sets it)
seed: int = 0  # seed (sampling seeds of re-compressions are derived from it)
traces: str = "outputs/demo/generate/toy"  # input cell directory holding traces.jsonl (generate, or student samples)
compressor: str = "extractive"  # "extractive" or "toy-rewriter" (no model), or a label for the model in `engine`
engine: dict = {"kind": "toy"}  # compressor engine (cdlib.params.EngineParams); unused by extractive
sampling: dict = {"temperature": 0.3, "max_tokens": 8192}  # compressor sampling (paper: temperature 0.3)
prompt: str = "reconstructed"  # "reconstructed" (our wording of the paper's prompt), "rewrite_student" (MPD), or a file
tokenizer: str = None  # tokenizer for token counts (None: the engine's, or whitespace for extractive)
check_answer: bool = True  # flag compressions that drop or contradict the verified answer
recompress_attempts: int = 1  # extra attempts for flagged compressions (model compressors; paper: 0)
drop_flagged: bool = True  # leave still-flagged compressions out of truncation and training (paper: false)
limit: int = None  # compress only the first N traces (None: all)

# %%
import polars as pl

import cdlib.compress
import cdlib.outputs
import cdlib.params

P = cdlib.params.from_notebook("compress", globals())
P

# %%
metrics = cdlib.compress.run(P)
cdlib.outputs.write_metrics(P.out_dir, metrics)
{k: v for k, v in metrics.items() if k != "per_dataset"}

# %% [markdown]
# Table 5 for this (teacher, compressor): mean compressed length and ratios per dataset.

# %%
cdlib.compress.table5(P.out_dir)

# %% [markdown]
# One trace before and after, and the flagged compressions (used for training unless `drop_flagged`).

# %%
df = cdlib.compress.load(P.out_dir, include_flagged=True)
example = df.row(0, named=True)
print(example["original_reasoning"], "\n\n=== compressed ===\n", example["reasoning"])
df.filter(pl.col("flag").is_not_null()).select("id", "flag", "reasoning").head(10)
