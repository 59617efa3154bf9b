"""Peers' answer cases (tests/fixtures/answer_cases, 270 rows from Math-Verify, lighteval,
the MATH repository and lm-evaluation-harness) through ``cdlib.answers.is_correct``.

The suite asserts an overall rate (at least 97%) and prints the rate per answer type and
per kind, with every miss, so a regression shows where it is. Policy choices (another
language, negated letters, letters past J) have their own exact tests below.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from cdlib.answers import extract, extract_with_rule, is_correct

CASES_FILE = Path(__file__).parent / "fixtures" / "answer_cases" / "cases.jsonl"
TARGET = 0.97
FIELDS = {"gold", "response", "answer_type", "expected", "kind", "source"}


def load_cases() -> list[dict]:
    cases = []
    for line_no, line in enumerate(CASES_FILE.read_text(encoding="utf-8").splitlines(), 1):
        case = json.loads(line)
        missing = FIELDS - case.keys()
        assert not missing, f"{CASES_FILE}:{line_no}: missing {sorted(missing)}"
        cases.append(case)
    return cases


def score(cases: list[dict]) -> tuple[float, dict[str, tuple[int, int]], dict[str, tuple[int, int]], list[dict]]:
    """Overall rate, (hits, total) per answer type and per kind, and the misses."""
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    misses = []
    for case in cases:
        got = is_correct(case["response"], case["gold"], case["answer_type"], case.get("choices"))
        for key in ("type:" + case["answer_type"], "kind:" + case["kind"]):
            totals[key] += 1
            hits[key] += got is case["expected"]
        if got is not case["expected"]:
            misses.append(case)
    by = {key: (hits[key], totals[key]) for key in totals}
    types = {k[5:]: v for k, v in by.items() if k.startswith("type:")}
    kinds = {k[5:]: v for k, v in by.items() if k.startswith("kind:")}
    return 1 - len(misses) / len(cases), types, kinds, misses


def test_peer_suite_rate():
    cases = load_cases()
    assert len(cases) >= 250
    assert {c["answer_type"] for c in cases} == {"numeric", "latex", "letter"}
    assert sum(not c["expected"] for c in cases) >= 25  # the suite also holds wrong answers
    rate, types, kinds, misses = score(cases)
    print(f"\npeer answer cases: {rate:.1%} of {len(cases)}")
    for name, (hit, total) in sorted(types.items()):
        print(f"  type {name:8s} {hit / total:6.1%}  ({hit}/{total})")
    for name, (hit, total) in sorted(kinds.items()):
        print(f"  kind {name:45s} {hit / total:6.1%}  ({hit}/{total})")
    for case in misses:
        print(f"  MISS [{case['kind']}] gold={case['gold'][:60]!r} response=...{case['response'][-80:]!r}")
    assert rate >= TARGET, f"{rate:.1%} < {TARGET:.0%}; {len(misses)} misses listed above"


def test_the_rate_falls_when_verdicts_are_wrong():
    """The suite can fail: with every verdict flipped, the same scoring gives a low rate."""
    flipped = [dict(c, expected=not c["expected"]) for c in load_cases()[:40]]
    rate, _, _, misses = score(flipped)
    assert rate < 0.2 and len(misses) > 32


FOUR = ["alpha", "beta", "gamma", "delta"]
THIRTEEN = [f"statement {i}" for i in range(13)]  # TruthfulQA mc1 rows carry up to 13 options

# (response, answer_type, choices, gold, expected value): decided policies, see cdlib.answers.
POLICY_CASES = [
    # a negated letter never counts
    ("C, not A", "letter", FOUR, "C", "C"),
    ("The answer is C, not A.", "letter", FOUR, "C", "C"),
    ("Not A. The answer is D.", "letter", FOUR, "D", "D"),
    ("It is B rather than A", "letter", FOUR, "B", "B"),
    # answers inside French, Spanish, German and Chinese sentences
    ("réponse est C non A", "letter", FOUR, "C", "C"),
    ("Donc la réponse est B, pas A.", "letter", FOUR, "B", "B"),
    ("B。不是 A", "letter", FOUR, "B", "B"),
    ("答案是 D", "letter", FOUR, "D", "D"),
    ("所以答案是D。", "letter", FOUR, "D", "D"),
    ("答案：C", "letter", FOUR, "C", "C"),
    ("La respuesta es C.", "letter", FOUR, "C", "C"),
    ("Die Antwort ist A.", "letter", FOUR, "A", "A"),
    ("Réponse: Janeth aura encore 220 $ à payer d'ici 12 mois.", "numeric", None, "220", "220"),
    ("所以一共有3 + 10 = 13只鸟。答案：13只", "numeric", None, "13", "13"),
    ("Haley总共有99颗弹珠。", "numeric", None, "99", "99"),
    # letters past J need the row's choices; without them the range is A-J
    ("The answer is M.", "letter", THIRTEEN, "M", "M"),
    ("\\boxed{K}", "letter", THIRTEEN, "K", "K"),
    ("Answer: (L) statement 11", "letter", THIRTEEN, "L", "L"),
    ("It must be statement 12.", "letter", THIRTEEN, "M", "M"),
    ("The answer is M.", "letter", None, "M", None),
    ("The answer is N.", "letter", THIRTEEN, "N", None),
]


@pytest.mark.parametrize("response, answer_type, choices, gold, value", POLICY_CASES)
def test_policy(response, answer_type, choices, gold, value):
    assert extract(response, answer_type, choices) == value
    assert is_correct(response, gold, answer_type, choices) is (value is not None)


# The issue's failure kinds, one line each: (response, answer_type, gold, expected value, rule).
ISSUE_KINDS = [
    ("\\frac{10}{9}", "numeric", "10/9", "10/9", "last_number"),
    ("So $\\boxed{14{,}916}$.", "numeric", "14916", "14916", "boxed"),
    ("is $\\boxed{11,\\! 111,\\! 100}$", "numeric", "11111100", "11111100", "boxed"),
    ("1 000", "numeric", "1000", "1000", "last_number"),
    ("\\boxed{1} and \\boxed{2}", "latex", "1, 2", "1, 2", "boxed"),
    ("He has $10,200 + $255 = $10,455.", "numeric", "10455", "10455", "last_number"),
    (".4", "numeric", "0.4", "0.4", "last_number"),
    ("$\\tfrac{1}{3}$", "numeric", "1/3", "1/3", "last_number"),
    ("\\boxed{\\dfrac{1}{3}}", "numeric", "1/3", "1/3", "boxed"),
    ("\\boxed{\\frac34}", "numeric", "0.75", "0.75", "boxed"),
    ("\\boxed{\\sqrt3}", "latex", "\\sqrt{3}", "\\sqrt3", "boxed"),
    ("\\frac{4}{23}", "numeric", "8/46", "4/23", "last_number"),
    ("(x-2)(x+2)", "latex", "\\left(x-2\\right)\\left(x+2\\right)", "(x-2)(x+2)", "math_env"),
]


@pytest.mark.parametrize("response, answer_type, gold, value, rule", ISSUE_KINDS)
def test_issue_failure_kinds(response, answer_type, gold, value, rule):
    assert extract_with_rule(response, answer_type) == (value, rule)
    assert is_correct(response, gold, answer_type) is True
