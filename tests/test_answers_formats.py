"""Realistic long outputs per chat format, and which answer wins.

Formats: ``<think>`` with and without the closing tag (and with ``<think>`` pre-filled
by the chat template), gpt-oss harmony analysis/final channels (token form and the
text left after decoding without special tokens), Llama-style plain text. Positions:
the answer at the end, in the middle, repeated, contradicted.

The rules these tests pin (also in cdlib.answers' docstring):

- the final answer part (after ``</think>``, the harmony ``final`` channel) beats the
  reasoning; the reasoning is read only when the final part states nothing;
- unfinished reasoning (no ``</think>``, analysis channel never ended) is never scored;
- within a part the last statement wins: the last boxed answer, unless an "answer is"
  statement follows it; a corrected answer counts as its correction.
"""

from __future__ import annotations

import random

import pytest

from cdlib.answers import extract_detailed, is_correct, verify

CHOICES = ["Pneumothorax", "Cardiac tamponade", "Myocardial infarction", "Pulmonary embolism"]


def reasoning(chars: int, seed: int = 0, markers: bool = True) -> str:
    """Reasoning text of about ``chars`` characters, full of numbers, letters and (with
    ``markers``) answer-like phrases ("maybe the answer is 578?", "#### 577", a boxed
    guess) that must not be taken for the answer."""
    rng = random.Random(seed)
    sentences = (
        "First, {a} + {b} = {c}, so the subtotal is {c}.",
        "Wait, let me re-check: {a} times {b} is {p}.",
        "Option {L} mentions the pressure, which does not fit the {a} mmHg reading.",
        "Maybe the answer is {d}? No, that ignores the {b} extra units.",
        "Hmm, so far we have \\(\\frac{{{a}}}{{{b}}}\\) of the total, roughly {a}/{b}.",
        "A similar problem had #### {a} as its answer, but here the numbers differ.",
        "**Step {b}:** multiply by {a} to get {p}.",
        "I could box \\(\\boxed{{{d}}}\\) too early, so let me keep checking.",
    )
    if not markers:
        sentences = tuple(s for s in sentences if "answer" not in s and "box" not in s)
    parts, total = [], 0
    while total < chars:
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        s = rng.choice(sentences).format(a=a, b=b, c=a + b, p=a * b, d=a + 1, L=rng.choice("ABCD"))
        parts.append(s)
        total += len(s) + 1
    return " ".join(parts)


THINK_LONG = reasoning(12_000, seed=1)
ANALYSIS_LONG = reasoning(9_000, seed=2)
HARMONY = "<|channel|>analysis<|message|>{r}<|end|><|start|>assistant<|channel|>final<|message|>{f}<|return|>"
LLAMA_MARKED = (reasoning(3_000, seed=30, markers=False) + " Maybe the answer is 578? No. A similar problem had"
                " #### 577 as its answer. " + reasoning(1_000, seed=31, markers=False)
                + "\n\nIn total, Tom ends up with 18 pens.")
LLAMA_STEPS = "\n\n".join(f"## Step {i}: {reasoning(600, seed=10 + i, markers=False)}" for i in range(1, 8))

# (id, response, answer_type, choices, gold, value, rule, source, think_prefilled)
FORMAT_CASES = [
    # ------------------------------------------------------------ <think> closed
    ("think-end", f"<think>\n{THINK_LONG}\n</think>\n\nSo Tom has 3 + 15 = 18 pens.\n\n\\boxed{{18}}",
     "numeric", None, "18", "18", "boxed", "answer", False),
    ("think-final-beats-reasoning-box", f"<think>\n{THINK_LONG} So \\boxed{{7}}.\n</think>\n\nThe answer is 9.",
     "numeric", None, "9", "9", "answer_is", "answer", False),
    ("think-answer-only-in-reasoning", f"<think>\n{THINK_LONG}\nThe answer is 42.\n</think>\n\n",
     "numeric", None, "42", "42", "answer_is", "reasoning", False),
    ("think-repeated", f"<think>{THINK_LONG}</think>\n\\boxed{{C}}\n\nTherefore \\boxed{{C}}.",
     "letter", CHOICES, "C", "C", "boxed", "answer", False),
    ("think-contradicted-box-then-box", f"<think>{THINK_LONG}</think>\nFirst guess \\boxed{{12}}. "
     "Wait, I dropped the 3 extra pens: 12 + 3 = 15.\n\n\\boxed{15}",
     "numeric", None, "15", "15", "boxed", "answer", False),
    ("think-contradicted-box-then-statement", f"<think>{THINK_LONG}</think>\n\\boxed{{255}} is the interest. "
     "So after six months she has $10,200 + $255 = $10,455.\nThe final answer is $10,455$.",
     "numeric", None, "10455", "10455", "answer_is", "answer", False),
    ("think-answer-in-middle", f"<think>{THINK_LONG}</think>\nThe answer is (B) Cardiac tamponade.\n\n"
     "Why not the others: A would show absent breath sounds, C shows ST elevation in 2 leads, "
     "D would raise the D-dimer. Option A and option D are therefore excluded.",
     "letter", CHOICES, "B", "B", "answer_is", "answer", False),
    # ---------------------------------------------- <think> pre-filled by the template
    ("prefilled-closed", f"{THINK_LONG}\n</think>\n\n**Answer: D**",
     "letter", CHOICES, "D", "D", "answer_colon", "answer", True),
    # ----------------------------------------------------------- <think> never closed
    ("think-unclosed", f"<think>\n{THINK_LONG}\nSo the answer is 42. But wait, let me verify",
     "numeric", None, "42", None, "truncated", "", False),
    ("think-unclosed-with-box", f"<think>\n{THINK_LONG}\n\\boxed{{C}} hmm, or is it",
     "letter", CHOICES, "C", None, "truncated", "", False),
    ("prefilled-unclosed", f"{THINK_LONG}\nThe answer is 42, I think, unless",
     "numeric", None, "42", None, "truncated", "", True),
    # ------------------------------------------------------------- harmony channels
    ("harmony-end", HARMONY.format(r=ANALYSIS_LONG, f="The total is **18** pens.\n\n\\boxed{18}"),
     "numeric", None, "18", "18", "boxed", "answer", False),
    ("harmony-final-beats-analysis", HARMONY.format(r=ANALYSIS_LONG + " So the answer is B.", f="**C**"),
     "letter", CHOICES, "C", "C", "bold", "answer", False),
    ("harmony-commentary-then-final",
     "<|channel|>analysis<|message|>" + ANALYSIS_LONG + "<|end|><|start|>assistant<|channel|>commentary"
     " to=functions.calc <|constrain|>json<|message|>{\"expr\": \"6*7\"}<|call|>"
     "<|start|>assistant<|channel|>analysis<|message|>The tool says 42.<|end|>"
     "<|start|>assistant<|channel|>final<|message|>Answer: 42<|return|>",
     "numeric", None, "42", "42", "answer_colon", "answer", False),
    ("harmony-two-finals-last-wins",
     HARMONY.format(r=ANALYSIS_LONG, f="The answer is 12.").replace("<|return|>", "<|end|>")
     + "<|start|>assistant<|channel|>final<|message|>Correction: the answer is 15.<|return|>",
     "numeric", None, "15", "15", "answer_is", "answer", False),
    ("harmony-unclosed-analysis", "<|channel|>analysis<|message|>" + ANALYSIS_LONG + " The answer is C, but",
     "letter", CHOICES, "C", None, "truncated", "", False),
    ("harmony-decoded", "analysis" + "We need the total. " + ANALYSIS_LONG + "assistantfinalThe answer is 18.",
     "numeric", None, "18", "18", "answer_is", "answer", False),
    ("harmony-decoded-unclosed", "analysisWe need the total. " + ANALYSIS_LONG + " so 18",
     "numeric", None, "18", None, "truncated", "", False),
    # ----------------------------------------------------------- Llama plain text
    ("llama-end", LLAMA_STEPS + "\n\nThe final answer is: $\\boxed{18}$",
     "numeric", None, "18", "18", "boxed", "answer", False),
    ("llama-letter-end", LLAMA_STEPS + "\n\nThe best answer is C.",
     "letter", CHOICES, "C", "C", "answer_is", "answer", False),
    ("llama-answer-in-middle", "## Step 1: Count the pens\nTom starts with 3 pens and buys 15, so 3 + 15 = 18.\n\n"
     "The answer is 18.\n\n## Check\nHe had 3 pens on day 1 and 15 more on day 2; the store sold 40 pens that day.",
     "numeric", None, "18", "18", "answer_is", "answer", False),
    ("llama-contradicted", LLAMA_STEPS + "\n\nThe answer is 12.\n\nWait, I forgot the 3 pens he already had. "
     "So the answer is 15.",
     "numeric", None, "15", "15", "answer_is", "answer", False),
    ("llama-no-marker", LLAMA_STEPS + "\n\nIn total, Tom ends up with 18 pens.",
     "numeric", None, "18", "18", "last_number", "answer", False),
    # Plain text has no reasoning part: a "####" recited in it beats a last sentence with
    # no marker, so such a response scores wrong (a question "answer is 578?" does not count).
    ("llama-recited-marker-beats-unmarked-end", LLAMA_MARKED, "numeric", None, "18", "577", "hash", "answer", False),
]


@pytest.mark.parametrize(
    "case_id, response, answer_type, choices, gold, value, rule, source, prefilled",
    FORMAT_CASES,
    ids=[case[0] for case in FORMAT_CASES],
)
def test_which_answer_wins(case_id, response, answer_type, choices, gold, value, rule, source, prefilled):
    found = extract_detailed(response, answer_type, choices, think_prefilled=prefilled)
    assert (found.value, found.rule, found.source) == (value, rule, source)
    assert found.truncated is (rule == "truncated")
    expected = verify(value, gold, answer_type)
    assert expected is (value is not None and case_id != "llama-recited-marker-beats-unmarked-end")
    assert is_correct(response, gold, answer_type, choices, think_prefilled=prefilled) is expected


def test_formats_are_recognised():
    formats = {case[0]: extract_detailed(case[1], case[2], case[3], think_prefilled=case[8]).format
               for case in FORMAT_CASES}
    assert {formats[k] for k in formats if k.startswith(("think", "prefilled"))} == {"think"}
    assert {formats[k] for k in formats if k.startswith("harmony")} == {"harmony"}
    assert {formats[k] for k in formats if k.startswith("llama")} == {"plain"}


def test_responses_are_long():
    """The reasoning parts are long enough to push the answer past the scanned tail."""
    assert len(THINK_LONG) > 8_000 and len(ANALYSIS_LONG) > 8_000 and len(LLAMA_STEPS) > 4_000
