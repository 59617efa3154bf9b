"""The demo's claim over seeds: compressed traces beat answer-only and length-matched truncation
on accuracy, by more than the sampling noise of 200 questions, with far fewer output tokens than raw
traces.

    python benchmarks/demo_seeds.py outputs/demo-seeds/results.parquet   (after `make demo-seeds`)
    python benchmarks/demo_seeds.py outputs/demo/results.parquet         (one seed: the demo)
    python benchmarks/demo_seeds.py outputs/demo-seeds/results.parquet --figure docs/demo_pareto.png

Prints one table per seed (accuracy, mean completion tokens, trainable tokens per source) and
whether the claim holds; exits 1 if it fails for any seed.
"""

from __future__ import annotations

import sys

import polars as pl

COMPRESSED = "extractive"
FAR_FEWER = 0.5  # "far fewer": at most half of the raw student's mean completion tokens
Z = 1.96  # "beats": the accuracy gap exceeds 1.96 standard errors of the difference (two-sided 95%)


def margin(acc_se: float, other_se: float) -> float:
    """The smallest accuracy gap that counts as beating: ``Z`` standard errors of the difference of two
    independent accuracies (conservative here: both students answer the same questions)."""
    return Z * (acc_se ** 2 + other_se ** 2) ** 0.5


def check(df: pl.DataFrame) -> list[str]:
    """Failures of the claim in one seed's evaluate rows (empty list: it holds). A gap within the noise
    of the evaluation (:func:`margin`, from the rows' ``accuracy_se``) is not a win."""
    acc = dict(zip(df["source"], df["accuracy"]))
    se = dict(zip(df["source"], df["accuracy_se"])) if "accuracy_se" in df.columns else {}
    tok = dict(zip(df["source"], df["mean_completion_tokens"]))
    problems = []
    for other in ("answer_only", "truncated"):
        if other not in acc:
            continue
        need = margin(se.get(COMPRESSED) or 0.0, se.get(other) or 0.0)
        if not acc[COMPRESSED] - acc[other] > need:
            problems.append(f"{COMPRESSED} accuracy {acc[COMPRESSED]:.3f} does not beat {other} {acc[other]:.3f} "
                            f"by more than {need:.3f} ({Z} standard errors of the difference)")
    if "raw" in tok and not tok[COMPRESSED] <= FAR_FEWER * tok["raw"]:
        problems.append(f"{COMPRESSED} tokens {tok[COMPRESSED]:.0f} > {FAR_FEWER} x raw {tok['raw']:.0f}")
    return problems


def figure(res: pl.DataFrame, out: str) -> None:
    """Accuracy against mean output tokens, one mark per seed and source (the README's figure)."""
    import altair as alt
    import vl_convert as vlc

    chart = alt.Chart(res.select("seed", "source", "accuracy", "mean_completion_tokens").to_pandas()).mark_point(
        filled=True, size=160, opacity=0.85).encode(
        x=alt.X("mean_completion_tokens:Q", scale=alt.Scale(type="log", domain=[9, 1000]), title="mean output tokens"),
        y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1]), title="accuracy (200 held-out problems)"),
        color=alt.Color("source:N", title="training source"), shape=alt.Shape("seed:N", title="seed"),
        tooltip=["seed", "source", "accuracy", "mean_completion_tokens"],
    ).properties(width=720, height=480,
                 title="Toy demo, three seeds: accuracy against output length (equal compute)")
    with open(out, "wb") as f:
        f.write(vlc.vegalite_to_png(chart.to_json(), scale=1.5))


def main(path: str, fig: str | None = None) -> int:
    res = pl.read_parquet(path).filter(pl.col("stage") == "evaluate")
    if "method" in res.columns:
        res = res.filter(pl.col("method").is_null() | (pl.col("method") == "full"))  # the LoRA cell is extra
    if "seed" not in res.columns:
        res = res.with_columns(seed=pl.lit("s0"))
    failed = False
    cols = ["source", "accuracy", "accuracy_se", "mean_completion_tokens", "train_tokens"]
    with pl.Config(tbl_hide_dataframe_shape=True, float_precision=3):
        for seed, df in res.sort("seed").group_by("seed", maintain_order=True):
            print(f"\nseed {seed[0]}")
            print(df.select([c for c in cols if c in df.columns]).sort("accuracy", descending=True))
            problems = check(df)
            failed |= bool(problems)
            print("claim holds" if not problems else "CLAIM FAILS: " + "; ".join(problems))
    if fig:
        figure(res, fig)
        print(f"figure: {fig}")
    return 1 if failed else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    fig = args[args.index("--figure") + 1] if "--figure" in args else None
    paths = [a for a in args if a != "--figure" and a != fig]
    sys.exit(main(paths[0] if paths else "outputs/demo-seeds/results.parquet", fig))
