"""The GPU cost model's arithmetic (cdlib.cost, benchmarks/cost_model.py)."""

import math

import pytest

from cdlib import cost, paper


def _paper(q: str) -> float:
    c = paper.compute()
    return float(c.filter(c["quantity"] == q)["value"][0])


def test_grid_and_tables_agree():
    """The 55 train cells of params/paper.yaml are exactly Table 11's runs."""
    cells = cost.grid_train_cells("params/paper.yaml")
    runs = set(cost.train_runs().select("teacher", "student", "method", "source").iter_rows())
    assert len(cells) == 55 and set(cells) == runs


def test_calibrated_training_reproduces_the_papers_hours():
    """No lever: the per-(student, method) MFU gives back the paper's 280.9 H100-h (0.5%: its rounding)."""
    h = cost.training_hours()["projected_h"].sum()
    assert h == pytest.approx(_paper("student_training_gpu_hours"), rel=5e-3)
    mfu = cost.training_calibration()["mfu"]
    assert ((mfu > 0.05) & (mfu < 0.6)).all()  # plausible H100 utilisation, not a unit slip (x1000 / x1e-3)


def test_no_lever_reproduces_the_papers_total():
    """With no lever, the paper's scope sums to its 705 H100-h (424 upstream + 280.9 training) within 1%."""
    df = cost.stages(apply=())
    s = cost.summary(df)
    assert s["projected_h"] == pytest.approx(_paper("total_gpu_hours"), rel=0.01)
    scope = df.filter("in_paper_scope")
    upstream = scope.filter(scope["kind"] != "train")["projected_h"].sum()
    assert upstream == pytest.approx(_paper("upstream_gpu_hours"), rel=0.01)


@pytest.mark.parametrize("lever", ["packing", "fused_loss", "vllm_dp", "prefix_cache", "no_resample_answered"])
def test_each_lever_moves_only_its_stage(lever):
    base = cost.stages(apply=())
    moved = cost.stages(apply=(lever,), factors={lever: 0.5})
    stage = cost.levers()[lever].stage
    for a, b in zip(base.iter_rows(named=True), moved.iter_rows(named=True)):
        expected = a["projected_h"] * (0.5 if a["kind"] == stage else 1.0)
        assert math.isclose(b["projected_h"], expected, rel_tol=1e-9), (lever, a["stage"])


def test_token_budget_moves_only_training_and_caps_raw_runs():
    base = cost.stages(apply=())
    capped = cost.stages(apply=("token_budget",))
    for a, b in zip(base.iter_rows(named=True), capped.iter_rows(named=True)):
        if a["kind"] == "train":
            assert b["projected_h"] < 0.6 * a["projected_h"]  # raw runs dominate and drop to compressed size
        else:
            assert b["projected_h"] == a["projected_h"]
    runs = cost.training_hours(token_budget=True)
    assert (runs.filter(runs["source"] == "raw")["train_tokens"] < 120e6).all()


def test_unknown_lever_is_named():
    with pytest.raises(KeyError, match="warp_drive"):
        cost.stages(apply=("warp_drive",))


def test_upstream_is_h4s_three_passes_rebuilt_from_wall_clock():
    """App. H.4: the Qwen teacher pass and its two compressions, wall-clock x 8 GPUs, give the printed 348 / 66.5 /
    9.2 and 424 (= H.5's 704.9 - 280.9); the gpt-oss teacher's passes, evaluation and judging are outside it."""
    up = cost.paper_upstream()
    for r in up.iter_rows(named=True):
        assert r["gpu_hours"] == pytest.approx(r["printed"], abs=0.05), r["stage"]
    assert up["gpu_hours"].sum() == pytest.approx(_paper("upstream_gpu_hours"), abs=0.5)
    assert up["gpu_hours"].sum() == pytest.approx(_paper("total_gpu_hours") - _paper("student_training_gpu_hours"),
                                                  abs=0.5)
    df = cost.stages(apply=())
    scope = df.filter("in_paper_scope")
    assert set(scope["stage"]) == set(up["stage"]) | {"train"}
    assert not df.filter(df["stage"].str.contains("gpt-oss") | df["kind"].is_in(["evaluate", "judge"]))[
        "in_paper_scope"].any()


def test_goal_gap_says_which_stage_alone_exceeds_the_goal():
    gap = cost.goal_gap(cost.stages())
    row = {r["stage"]: r for r in gap.iter_rows(named=True)}
    assert row["generate/qwen3.5-397b"]["alone_over_goal"] and row["train"]["alone_over_goal"]
    assert row["generate/qwen3.5-397b"]["speedup_if_alone"] is None  # training alone is already over the goal
    s = cost.summary(cost.stages())
    assert gap["speedup_if_uniform"][0] == pytest.approx(s["projected_h"] / s["goal_h"])
    budget = cost.goal_gap(cost.stages(apply=("token_budget",)))
    teacher = budget.filter(budget["stage"] == "generate/qwen3.5-397b")
    others = budget["projected_h"].sum() - teacher["projected_h"][0]
    assert teacher["speedup_if_alone"][0] == pytest.approx(teacher["projected_h"][0] / (s["goal_h"] - others))
