"""The papers' findings on the demo over seeds: the findings table of cdlib.findings, per seed and pooled.

    python benchmarks/demo_seeds.py outputs/demo-seeds      (after `make demo-seeds`: three seeds)
    python benchmarks/demo_seeds.py outputs/demo            (one seed: the demo)
    python benchmarks/demo_seeds.py outputs/demo-seeds --figure docs/demo_pareto.png

Prints every student beside its base (accuracy ± SE, output tokens, training tokens and hours) and the
findings table (each claim of Compress-Distill, Distilling the Essence and Mixed-Policy Distillation: the
paper's figure, the published runs measured alike, this grid's figure per seed, held or not and why);
exits 1 when a claim does not hold. A claim holds when it holds in every seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl

from cdlib import findings, paper, results, student_runs


def figure(runs: pl.DataFrame, out: str) -> None:
    """Accuracy against mean output tokens, one mark per seed and source (the README's figure)."""
    import altair as alt
    import vl_convert as vlc

    df = findings.students(runs).rename({"teacher": "seed"})  # params/demo_seeds.yaml: one toy teacher per seed
    chart = alt.Chart(df.to_pandas()).mark_point(filled=True, size=160, opacity=0.85).encode(
        x=alt.X("mean_completion_tokens:Q", scale=alt.Scale(type="log", domain=[8, 1000]), title="mean output tokens"),
        y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1]), title="accuracy (held-out problems)"),
        color=alt.Color("source:N", title="student"), shape=alt.Shape("seed:N", title="seed"),
        tooltip=["seed", "source", "accuracy", "mean_completion_tokens", "train_tokens"],
    ).properties(width=720, height=480, title="Toy demo: accuracy against output length (pretrained base, the same "
                                              "epochs for every source; 'pretrain' is the base before distillation)")
    with open(out, "wb") as f:
        f.write(vlc.vegalite_to_png(chart.to_json(), scale=1.5))


def main(grid_dir: str, fig: str | None = None) -> int:
    grid = Path(grid_dir)
    grid = grid.parent if grid.suffix == ".parquet" else grid
    runs = student_runs.grid_runs(results.read_grid(grid))
    if runs is None:
        print(f"{grid}: no runs")
        return 1
    scored = runs.filter(pl.col("accuracy").is_not_null())
    table = findings.findings(scored, paper.runs())
    with pl.Config(tbl_hide_dataframe_shape=True, float_precision=3, tbl_rows=60, tbl_width_chars=220,
                   fmt_str_lengths=160, tbl_hide_column_data_types=True):
        print(findings.students(scored))
        print(table.select("paper", "claim", "papers_figure", "grid", "verdict", "why"))
    failed = table.filter(pl.col("verdict") == "not held")
    print(f"{table.filter(pl.col('verdict') == 'held').height} of {table.height} claims hold"
          + (f"; not held: {', '.join(failed['claim'])}" if failed.height else ""))
    if fig:
        figure(scored, fig)
        print(f"figure: {fig}")
    return 1 if failed.height else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    fig = args[args.index("--figure") + 1] if "--figure" in args else None
    paths = [a for a in args if a not in ("--figure", fig)]
    sys.exit(main(paths[0] if paths else "outputs/demo-seeds", fig))
