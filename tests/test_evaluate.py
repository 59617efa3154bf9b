"""Evaluation metrics checked against hand-computed values."""

import math

import pytest

from cdlib.evaluate import group_table, summarize


def rec(group, correct, tokens, finish="stop", rchars=0, rtoks=0, rule="boxed"):
    return {"group": group, "correct": correct, "completion_tokens": tokens, "finish_reason": finish,
            "reasoning_chars": rchars, "reasoning_tokens": rtoks, "rule": rule}


RECORDS = [
    rec("Math", True, 100, rchars=400, rtoks=90),
    rec("Math", False, 8192, "length", rchars=30000, rtoks=8100, rule="truncated"),  # hit the cap
    rec("Math", True, 50, rchars=100, rtoks=40, rule="answer_is"),
    rec("Medicine", False, 4, rchars=0, rtoks=0, rule="none"),  # empty answer
    rec("Medicine", True, 300, rchars=1000, rtoks=250, rule="letter"),
]


def test_metrics_match_hand_computed_values():
    m = summarize(RECORDS)
    assert m["n"] == 5
    assert m["accuracy"] == pytest.approx(3 / 5)  # over every record, not the mean of groups (0.667+0.5)/2
    assert m["accuracy_se"] == pytest.approx(math.sqrt(0.6 * 0.4 / 5))
    se = math.sqrt(2 / 9 / 3)
    assert m["groups"]["Math"] == {"accuracy": pytest.approx(2 / 3), "se": pytest.approx(se),
                                   "ci95": pytest.approx(1.96 * se), "n": 3}
    assert m["accuracy_ci95"] == pytest.approx(1.96 * math.sqrt(0.6 * 0.4 / 5))
    assert m["groups"]["Medicine"]["accuracy"] == pytest.approx(0.5)
    assert m["mean_completion_tokens"] == pytest.approx((100 + 8192 + 50 + 4 + 300) / 5)
    assert m["mean_completion_tokens_excl_trunc"] == pytest.approx((100 + 50 + 4 + 300) / 4)
    assert m["truncation_rate"] == pytest.approx(0.2)
    # reasoning chars sorted: 0, 100, 400, 1000, 30000 -> median 400, q1 100, q3 1000
    assert (m["median_reasoning_chars"], m["reasoning_chars_q1"], m["reasoning_chars_q3"]) == (400, 100, 1000)
    assert (m["median_reasoning_tokens"], m["reasoning_tokens_q1"], m["reasoning_tokens_q3"]) == (90, 40, 250)
    assert m["acc_per_1k_tokens"] == pytest.approx(0.6 / (8646 / 5 / 1000))
    assert m["rules"] == {"boxed": 1, "truncated": 1, "answer_is": 1, "none": 1, "letter": 1}


def test_quantiles_interpolate_like_numpy():
    m = summarize([rec("Math", True, 1, rchars=c) for c in (1, 2, 3, 4)])
    assert (m["reasoning_chars_q1"], m["median_reasoning_chars"], m["reasoning_chars_q3"]) == (1.75, 2.5, 3.25)


def test_group_table_has_overall_row():
    t = group_table(summarize(RECORDS))
    assert t["group"].to_list() == ["Math", "Medicine", "Overall"]
    assert t.filter(t["group"] == "Overall")["accuracy"][0] == pytest.approx(0.6)


def test_empty():
    assert summarize([]) == {"n": 0}


def test_paper_table7_plus_minus_is_a_95_percent_interval_not_the_se():
    """Table 7's ± is 1.96*sqrt(p(1-p)/n): Common-sense 0.599 at n = 1,221 prints 0.027; the SE would be 0.014."""
    from cdlib import paper

    p, n = 0.599, 1221
    records = [rec("Common-sense", i < round(p * n), 10) for i in range(n)]
    g = summarize(records)["groups"]["Common-sense"]
    pub = paper.runs().filter((paper.pl.col("group") == "commonsense") & (paper.pl.col("accuracy") == 0.599)
                              & (paper.pl.col("source") == "raw")).row(0, named=True)
    assert round(g["ci95"], 3) == pub["ci95"] == 0.027
    assert round(g["se"], 3) != pub["ci95"]


def test_notebook_tables_come_from_cdlib_evaluate(tmp_path):
    """What 05_evaluate shows: groupings, rule counts, wrong and capped outputs first."""
    from cdlib import evaluate
    from cdlib.store import Store

    paper = evaluate.grouping_table("paper")
    assert dict(zip(paper["dataset"], paper["group"]))["medexpqa"] == "Medicine"
    assert evaluate.grouping_table("dataset").columns == ["dataset", "group"]
    with pytest.raises(ValueError, match="grouping 'papr' unknown"):
        evaluate.grouping_table("papr")
    assert sorted(evaluate.rule_table(summarize(RECORDS)).rows()) == [
        ("answer_is", 1), ("boxed", 1), ("letter", 1), ("none", 1), ("truncated", 1)]
    assert evaluate.rule_table(summarize(RECORDS + [rec("Math", True, 1)])).row(0) == ("boxed", 2)
    assert evaluate.rule_table({}).height == 0
    base = {"group": "Math", "gold": "7", "rule": "boxed", "completion_tokens": 5}
    Store(tmp_path / "outputs.jsonl").append([
        {**base, "id": "right", "extracted": "7", "correct": True, "finish_reason": "stop", "text": "so 7"},
        {**base, "id": "wrong", "extracted": "6", "correct": False, "finish_reason": "stop",
         "text": "x" * 2000 + "so 6"},
        {**base, "id": "capped", "extracted": None, "correct": False, "finish_reason": "length", "text": "and then"}])
    worst = evaluate.worst_outputs(tmp_path, n=2)
    assert worst["id"].to_list() == ["capped", "wrong"] and worst.columns == list(evaluate.OUTPUT_COLUMNS)
    text = evaluate.wrong_endings(tmp_path, n=1, chars=100)
    assert text.startswith("2 wrong of 3\n--- wrong: gold 7, extracted 6 (stop)\n") and "x" * 96 + "so 6\n" in text
    assert "x" * 97 not in text and "capped" not in text
    assert evaluate.wrong_endings(tmp_path / "none") == "0 wrong of 0"
