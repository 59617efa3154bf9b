# %% [markdown]
# # Explore traces
#
# The question pool per dataset and split; every teacher's reasoning traces beside each
# compressor's and the truncated version; their length distributions (the paper's
# Figure 2, with a dataset menu, token range and flagged switch in JupyterLab); one question
# side by side; and a browser to pick teacher, dataset and example. All logic is in
# `cdlib.explore`. Every source is counted with the same `tokenizer`, so lengths and ratios
# (rho = tokens / raw tokens) compare.

# %% tags=["parameters"]
out_dir: str = "outputs/scratch/explore"  # cell directory: figures and metrics.json go here
seed: int = 0  # seed of the pool's subsampling and of the example picked when `example` is None
datasets: list = ["toy"]  # question pool: dataset names from cdlib.datasets.REGISTRY
data_paths: dict = {}  # question pool: dataset name -> local JSONL/Parquet in the original layout
limit: int = None  # question pool: questions per dataset after a seeded shuffle (None: all)
toy: dict = {}  # question pool: toy world knobs (cdlib.params.ToyParams)
splits: list = ["train", "eval"]  # question pool: splits shown
generate: dict = {"toy": "outputs/demo/generate/toy"}  # label -> generate or import cell (default: make demo's)
compressed: dict = {"extractive": "outputs/demo/compress/toy__extractive"}  # compressor (teacher/compressor) -> cell
truncated: dict = {"truncated": "outputs/demo/truncate/toy"}  # label ("teacher/label" for several teachers) -> cell
tokenizer: str = "whitespace"  # counts every source alike: "whitespace", "chars/4" or a HF tokenizer id/path
filter_datasets: list = []  # show only these datasets (empty: all)
min_tokens: int = None  # shortest reasoning shown, in tokens (None: no bound)
max_tokens: int = None  # longest reasoning shown, in tokens (None: no bound)
flagged: str = "exclude"  # flagged compressions/truncations: "exclude" (as in training), "include" or "only"
example: str = None  # trace id shown side by side (None: one drawn with `seed`)
bins: int = 50  # histogram bins of the length figure

# %%
from IPython.display import HTML

import cdlib.explore
import cdlib.figures
import cdlib.outputs
import cdlib.params

P = cdlib.params.from_notebook("explore", globals())
P

# %% [markdown]
# ## The question pool
#
# Rows per dataset and split after subsampling (`limit` per dataset, shuffled with `seed`),
# beside the paper's Table 1 count where it gives one.

# %%
cdlib.explore.pool_stats(P)

# %% [markdown]
# ## Traces
#
# One row per (teacher, source, trace). Lengths per source: median, quartiles, 90th
# percentile (the paper: compressed traces are under 500 tokens up to the 90th), rho.

# %%
traces = cdlib.explore.load(P.generate, P.compressed, P.truncated, P.tokenizer)
cdlib.explore.length_stats(traces)

# %% [markdown]
# The traces shown from here on: `filter_datasets`, `min_tokens` to `max_tokens`, `flagged`.
# Per dataset:

# %%
view = cdlib.explore.filter_traces(traces, P.filter_datasets, P.min_tokens, P.max_tokens, P.flagged)
cdlib.outputs.write_metrics(P.out_dir, cdlib.explore.metrics(view))
cdlib.explore.length_stats(view, by=["teacher", "source", "dataset"])

# %% [markdown]
# ## Reasoning lengths (Figure 2)
#
# One row per teacher, one panel per source; hover a bar for its counts. The controls under
# the chart (dataset, token range, flagged) work in JupyterLab and in the saved
# `fig2_lengths.html`; `fig2_lengths.png` and `.svg` show the parameters' view.

# %%
chart = cdlib.figures.lengths_chart(view, bins=P.bins, include_flagged=P.flagged != "exclude")
cdlib.figures.save_chart(chart, f"{P.out_dir}/fig2_lengths")
chart

# %% [markdown]
# ## One question side by side
#
# Raw, each compressor's and the truncated reasoning of one question (flagged versions
# included, with their flag), lengths and rho first, then the texts.

# %%
shown = cdlib.explore.pick_example(view, P.example, P.seed)
cdlib.explore.side_by_side(traces, shown).drop("reasoning")

# %%
HTML(cdlib.explore.side_by_side_html(traces, shown))

# %% [markdown]
# ## Browse
#
# Pick teacher, dataset and example (JupyterLab with ipywidgets; without ipywidgets this
# shows the example above).

# %%
cdlib.explore.browser(view, shown)
