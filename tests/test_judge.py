"""The faithfulness judge: schema, parse failures, middle truncation, the toy rule judge."""

import json

import pytest

from cdlib import judge

GOOD = {"faithfulness": 5, "coverage": 4, "clarity": 5, "verdict": "faithful", "answer_alignment": True,
        "failure_modes": [], "rationale": "keeps every step"}


def test_valid_json_parses():
    v, err = judge.parse(json.dumps(GOOD))
    assert err is None and v.verdict == "faithful" and v.coverage == 4
    v, err = judge.parse("Sure.\n```json\n" + json.dumps(GOOD) + "\n```")
    assert err is None and v.faithfulness == 5


@pytest.mark.parametrize("bad,needle", [
    ({**GOOD, "faithfulness": 6}, "faithfulness"),
    ({**GOOD, "verdict": "mostly"}, "verdict"),
    ({**GOOD, "failure_modes": ["typo"]}, "failure_modes"),
    ({k: v for k, v in GOOD.items() if k != "rationale"}, "rationale"),
    ({**GOOD, "extra": 1}, "extra"),
])
def test_invalid_json_is_a_parse_failure(bad, needle):
    v, err = judge.parse(json.dumps(bad))
    assert v is None and err.startswith("schema:") and needle in err


def test_truncated_and_broken_responses_are_parse_failures():
    assert judge.parse(json.dumps(GOOD)[:40], "length") == (None, "truncated at the judge's token cap")
    v, err = judge.parse('{"faithfulness": 5, "coverage":')
    assert v is None and err.startswith("invalid JSON")


def test_schema_is_strict_for_structured_decoding():
    s = judge.SCHEMA
    assert s["additionalProperties"] is False
    assert set(s["required"]) == set(GOOD)
    assert "omitted_key_step" in json.dumps(s)


def test_middle_truncation_keeps_both_ends():
    text = "A" * 30000 + "MIDDLE" + "Z" * 30000
    out = judge.middle_truncate(text, 40000)
    assert len(out) <= 40000 and out.startswith("A" * 1000) and out.endswith("Z" * 1000) and "MIDDLE" not in out
    assert judge.middle_truncate("short", 100) == "short"
    p = judge.build_prompt({"question": "q", "gold": "7", "original_reasoning": text, "reasoning": "B" * 20000})
    assert "A" * 100 in p and "Z" * 100 in p and "B" * 12000 not in p


RAW = "We start with 8.\n8 - 5 = 3\nLet me double check: 8 - 5 = 3.\n3 + 4 = 7\nSo 7."
BASE = {"answer_type": "numeric", "gold": "7", "choices": None, "original_reasoning": RAW}


@pytest.mark.parametrize("comp,verdict,modes", [
    ("8 - 5 = 3\n3 + 4 = 7\nSo the answer is 7.", "faithful", []),
    ("8 - 5 = 3\n3 + 4 = 8\nSo the answer is 8.", "unfaithful",
     ["contradiction", "unsupported_claim", "answer_mismatch"]),
    ("8 - 4 = 4\n4 + 3 = 7\nSo the answer is 7.", "partially_faithful", ["unsupported_claim"]),
    ("So the answer is 7.", "partially_faithful", ["omitted_key_step"]),  # no steps left at all
    ("", "unfaithful", ["empty_compressed"]),
])
def test_rule_judge(comp, verdict, modes):
    v = judge.rule_verdict({**BASE, "reasoning": comp})
    assert v.verdict == verdict and v.failure_modes == modes


def test_notebook_tables_come_from_cdlib_judge(tmp_path):
    """What 06_judge shows: failure-mode counts, least faithful first, parse failures before all."""
    from cdlib.store import Store

    assert judge.failure_mode_table({"failure_modes": {"incoherent": 1, "contradiction": 3}}).rows() == [
        ("contradiction", 3), ("incoherent", 1)]
    comp, out = tmp_path / "compress", tmp_path / "judge"
    Store(comp / "compressed.jsonl").append(
        {"id": i, "reasoning": f"compressed {i}", "flag": None, "original_chars": 10, "compressed_chars": 5}
        for i in ("a", "b", "c"))
    base = {"dataset": "toy", "compressor": "extractive", "flag": None, "parse_error": None}
    Store(out / "judgements.jsonl").append([
        {**base, "id": "a", **GOOD},
        {**base, "id": "b", **GOOD, "faithfulness": 2, "verdict": "unfaithful", "rationale": "adds a step"},
        {**base, "id": "c", "parse_error": "invalid JSON: x"}])
    worst = judge.least_faithful(out, comp, n=2)
    assert worst["id"].to_list() == ["c", "b"] and worst.columns == list(judge.EXAMPLE_COLUMNS)
    text = judge.least_faithful_text(out, comp, n=3, chars=12)
    assert text.splitlines()[3:5] == ["--- b: unfaithful (faithfulness 2); adds a step", "compressed b"]
    assert text.index("--- c") < text.index("--- b") < text.index("--- a")
    assert judge.least_faithful(tmp_path / "empty", comp).height == 0
