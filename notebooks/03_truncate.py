# %% [markdown]
# # Stage 3: truncated traces
#
# The paper's length-matched ablation (section 3.3): each raw trace is cut to the token
# length of its compressed version under the compressor's tokenizer (±1 token after
# re-encoding), the final answer unchanged. `mode: ratio` keeps the first `ratio` of each
# trace's tokens instead (Distilling the Essence).

# %% tags=["parameters"]
out_dir: str = "outputs/scratch/truncate"  # cell directory (the grid runner sets it)
seed: int = 0  # unused; kept for a uniform interface
traces: str = "outputs/demo/generate/toy"  # generate cell directory (raw traces)
compressed: str = "outputs/demo/compress/toy__extractive"  # compress cell directory whose lengths are matched
mode: str = "length_matched"  # "length_matched" (paper) or "ratio" (Distilling the Essence)
ratio: float = 0.5  # kept fraction of tokens in ratio mode
tokenizer: str = "whitespace"  # the compressor's tokenizer: HF id/path, or "whitespace" for the toy world
tolerance: int = 1  # accepted token mismatch after decode and re-encode
drop_flagged: bool = True  # leave cuts missing their target by more than tolerance out of training (paper: false)

# %%
import cdlib.outputs
import cdlib.params
import cdlib.store
import cdlib.truncate

P = cdlib.params.from_notebook("truncate", globals())
P

# %%
metrics = cdlib.truncate.run(P)
cdlib.outputs.write_metrics(P.out_dir, metrics)
metrics

# %% [markdown]
# One trace cut to its budget: compare with the compressed version of the same question.

# %%
df = cdlib.store.Store(f"{P.out_dir}/truncated.jsonl").to_polars()
row = df.row(0, named=True)
print(f"{row['truncated_tokens']} of {row['original_tokens']} tokens (target {row['target_tokens']})\n")
print(row["reasoning"], "\n\nanswer:", row["answer"])
df.select("dataset", "original_tokens", "target_tokens", "truncated_tokens", "flag").describe()
