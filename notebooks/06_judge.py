# %% [markdown]
# # Stage 6: faithfulness judge
#
# Paper Appendix G (Table 10). A judge compares each compressed trace with its raw trace
# and returns a verdict under a JSON schema (faithfulness, coverage, clarity 1-5, verdict,
# answer alignment, failure modes, rationale). Responses that do not parse are recorded as
# parse failures, never dropped. The toy world uses `judge: rule` (no model).

# %% tags=["parameters"]
out_dir: str = "outputs/scratch/judge"  # cell directory (the grid runner sets it)
seed: int = 0  # unused; kept for a uniform interface
compressed: str = "outputs/demo/compress/toy__extractive"  # compress cell directory holding compressed.jsonl
judge: str = "llm"  # "llm" (the engine below, structured JSON output) or "rule" (toy world)
engine: dict = {"kind": "vllm"}  # judge engine (cdlib.params.EngineParams)
sampling: dict = {"temperature": 0.0, "max_tokens": 2048}  # judge sampling: greedy, 2,048-token cap
raw_chars: int = 40000  # raw trace shown to the judge, middle-truncated to this many characters
compressed_chars: int = 12000  # compressed trace shown to the judge, middle-truncated likewise
exclude_datasets: list = []  # datasets not judged (paper Table 10: mmlu_stem, mmlu_medical)
limit: int = None  # judge only the first N compressions (None: all)

# %%
import cdlib.judge
import cdlib.outputs
import cdlib.params

P = cdlib.params.from_notebook("judge", globals())
P

# %%
metrics = cdlib.judge.run(P)
cdlib.outputs.write_metrics(P.out_dir, metrics)
{k: v for k, v in metrics.items() if k not in ("per_dataset", "failure_modes")}

# %% [markdown]
# Table 10 for this compressor: judged traces, mean faithfulness, % faithful, % answer-aligned.

# %%
cdlib.judge.table10(P.out_dir)

# %% [markdown]
# Failure modes named by the judge (a trace can have several).

# %%
cdlib.judge.failure_mode_table(metrics)

# %% [markdown]
# A few judged examples, least faithful first: the compression and the judge's verdict.

# %%
cdlib.judge.least_faithful(P.out_dir, P.compressed, n=10)

# %%
print(cdlib.judge.least_faithful_text(P.out_dir, P.compressed, n=2))
