"""benchmarks/demo_seeds.py: the demo's claim check, on accuracies measured on this machine (the README's
three-seed table, and the 64-wide students of benchmarks/demo_width_probe.yaml, whose seed-2 gaps are noise)."""

import importlib.util
from pathlib import Path

import polars as pl

SPEC = importlib.util.spec_from_file_location("demo_seeds", Path(__file__).parents[1] / "benchmarks" / "demo_seeds.py")
demo_seeds = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(demo_seeds)


def rows(acc: dict[str, float], tokens: dict[str, float], n: int = 200) -> pl.DataFrame:
    """Evaluate rows as results.parquet has them, with the binomial standard error of ``n`` questions."""
    return pl.DataFrame({"stage": ["evaluate"] * len(acc), "source": list(acc),
                         "accuracy": list(acc.values()),
                         "accuracy_se": [(a * (1 - a) / (n - 1)) ** 0.5 for a in acc.values()],
                         "mean_completion_tokens": [tokens[s] for s in acc]})


TOKENS = {"extractive": 47.0, "truncated": 43.0, "answer_only": 10.0, "raw": 201.0}


def test_the_demos_seeds_hold():
    for acc in ({"extractive": 0.810, "truncated": 0.390, "answer_only": 0.160, "raw": 0.055},
                {"extractive": 0.755, "truncated": 0.410, "answer_only": 0.205, "raw": 0.535},
                {"extractive": 0.785, "truncated": 0.170, "answer_only": 0.240, "raw": 0.125}):
        assert demo_seeds.check(rows(acc, TOKENS)) == []


def test_a_gap_within_the_noise_is_not_a_win():
    # 64-wide students, seed 2: extractive is ahead by 0.5 and 1 point, far inside 200 questions' noise
    problems = demo_seeds.check(rows({"extractive": 0.180, "truncated": 0.170, "answer_only": 0.175, "raw": 0.045},
                                     TOKENS))
    assert len(problems) == 2 and all("does not beat" in p for p in problems)
    assert "answer_only 0.175" in problems[0] and "truncated 0.170" in problems[1]
    # the same gap with a real margin holds: the threshold moves with the standard errors
    assert demo_seeds.check(rows({"extractive": 0.400, "truncated": 0.170, "answer_only": 0.175}, TOKENS)) == []


def test_margin_is_z_standard_errors_of_the_difference():
    assert abs(demo_seeds.margin(0.03, 0.04) - 1.96 * 0.05) < 1e-12


def test_too_many_tokens_fails_and_main_exits_1(tmp_path):
    acc = {"extractive": 0.8, "truncated": 0.3, "answer_only": 0.2, "raw": 0.1}
    problems = demo_seeds.check(rows(acc, {**TOKENS, "extractive": 120.0}))
    assert problems == ["extractive tokens 120 > 0.5 x raw 201"]
    good, bad = tmp_path / "good.parquet", tmp_path / "bad.parquet"
    rows(acc, TOKENS).write_parquet(good)
    pl.concat([rows(acc, TOKENS).with_columns(seed=pl.lit("s0")),
               rows({**acc, "extractive": 0.31}, TOKENS).with_columns(seed=pl.lit("s1"))]).write_parquet(bad)
    assert demo_seeds.main(str(good)) == 0
    assert demo_seeds.main(str(bad)) == 1
