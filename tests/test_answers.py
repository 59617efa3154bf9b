"""Extraction cascade and verification: every rule and answer type.

Each case asserts the extracted value, the rule that fired and the verdict
against a gold answer. Cases reported against peer tools live in
tests/test_answers_issues.py; safety and time bounds in
tests/test_answers_safety.py.
"""

from __future__ import annotations

import pytest

from cdlib.answers import (
    ANSWER_TYPES,
    RULES,
    extract,
    extract_detailed,
    extract_with_rule,
    is_correct,
    verify,
)

MED = ["Pneumothorax", "Cardiac tamponade", "Myocardial infarction", "Pulmonary embolism"]
AQUA = ["A)21", "B)22", "C)23.5", "D)24", "E)25"]
ABCD = ["alpha", "beta", "gamma", "delta"]

# (response, answer_type, choices, gold, expected value, expected rule, expected verdict)
CASES = [
    # ----------------------------------------------------------------- numeric
    # boxed
    ("The answer is \\boxed{42}.", "numeric", None, "42", "42", "boxed", True),
    ("\\boxed{42}", "numeric", None, "41", "42", "boxed", False),
    ("So \\boxed{1,234}", "numeric", None, "1234", "1234", "boxed", True),
    ("\\boxed{\\$18.00}", "numeric", None, "18", "18", "boxed", True),
    ("\\boxed{18 \\text{ dollars}}", "numeric", None, "18", "18", "boxed", True),
    ("\\boxed{\\text{18 apples}}", "numeric", None, "18", "18", "boxed", True),
    ("\\boxed{x = 5}", "numeric", None, "5", "5", "boxed", True),
    ("\\boxed{2 + 3 = 5}", "numeric", None, "5", "5", "boxed", True),
    ("\\boxed{-7}", "numeric", None, "-7", "-7", "boxed", True),
    ("\\boxed{3.50}", "numeric", None, "3.5", "3.5", "boxed", True),
    ("\\boxed{\\frac{3}{4}}", "numeric", None, "0.75", "0.75", "boxed", True),
    ("\\boxed{\\dfrac{1}{3}}", "numeric", None, "1/3", "1/3", "boxed", True),
    ("\\boxed{-\\frac{1}{2}}", "numeric", None, "-0.5", "-0.5", "boxed", True),
    ("\\boxed{\\frac12}", "numeric", None, "0.5", "0.5", "boxed", True),
    ("\\boxed{25\\%}", "numeric", None, "25", "25", "boxed", True),
    ("\\boxed{{42}}", "numeric", None, "42", "42", "boxed", True),
    ("\\[\\boxed{1{,}000}\\]", "numeric", None, "1000", "1000", "boxed", True),  # LaTeX thousands separator
    ("First \\boxed{3}. Wait, recount: \\boxed{5}", "numeric", None, "5", "5", "boxed", True),
    ("\\fbox{12}", "numeric", None, "12", "12", "boxed", True),
    ("\\boxed 7", "numeric", None, "7", "7", "boxed", True),
    ("\\boxed{2\\sqrt{3}}", "numeric", None, "2\\sqrt{3}", "2\\sqrt{3}", "boxed", True),
    ("\\boxed{unknown} so the answer is 9", "numeric", None, "9", "9", "answer_is", True),
    # hash
    ("He made 70,000 profit.\n#### 70,000", "numeric", None, "70000", "70000", "hash", True),
    ("#### $29.00", "numeric", None, "29", "29", "hash", True),
    ("####18", "numeric", None, "18", "18", "hash", True),
    ("#### -3", "numeric", None, "-3", "-3", "hash", True),
    ("#### 0.50", "numeric", None, ".5", "0.5", "hash", True),
    # answer is
    ("The answer is 42.", "numeric", None, "42", "42", "answer_is", True),
    ("Thus the final answer is: 3.50", "numeric", None, "3.5", "3.5", "answer_is", True),
    ("The answer is -12 degrees.", "numeric", None, "-12", "-12", "answer_is", True),
    ("The answer is not 5 but 7.", "numeric", None, "7", "7", "answer_is", True),
    ("The answer is 25%.", "numeric", None, "25", "25", "answer_is", True),
    ("The correct answer is 1/2 of the pie.", "numeric", None, "0.5", "0.5", "answer_is", True),
    ("the answer is therefore $1,299.", "numeric", None, "1299", "1299", "answer_is", True),
    ("The answer is 42 because 6*7=42 and 10 more is 52.", "numeric", None, "42", "42", "answer_is", True),
    ("The answer would be 8 hours.", "numeric", None, "8", "8", "answer_is", True),
    ("The answer is 41.", "numeric", None, "42", "41", "answer_is", False),
    ("The answer is 12 and the answer is 13.", "numeric", None, "13", "13", "answer_is", True),
    ("The answer is\n\n15", "numeric", None, "15", "15", "answer_is", True),
    ("So the answer is 3 + 4 = 7.", "numeric", None, "7", "7", "answer_is", True),
    ("The answer is x = 12 cm.", "numeric", None, "12", "12", "answer_is", True),
    ("The answer is \u22125.", "numeric", None, "-5", "-5", "answer_is", True),
    # answer colon
    ("Answer: 15", "numeric", None, "15", "15", "answer_colon", True),
    ("**Final Answer:** 1,000,000", "numeric", None, "1000000", "1000000", "answer_colon", True),
    ("**Final Answer**\n\n12 apples", "numeric", None, "12", "12", "answer_colon", True),
    ("Answer：7", "numeric", None, "7", "7", "answer_colon", True),
    ("answer: $4.25", "numeric", None, "4.25", "4.25", "answer_colon", True),
    ("Answer: 3 apples\nAnswer: 4 apples", "numeric", None, "4", "4", "answer_colon", True),
    # bold
    ("So Tom needs **18** minutes.", "numeric", None, "18", "18", "bold", True),
    ("**Step 1** add. Total: **73**", "numeric", None, "73", "73", "bold", True),
    ("The total is **$2,500**.", "numeric", None, "2500", "2500", "bold", True),
    # last number
    ("So she has 18 apples left.", "numeric", None, "18", "18", "last_number", True),
    ("He ran 5.5 km.", "numeric", None, "5.5", "5.5", "last_number", True),
    ("It costs $1,299.", "numeric", None, "1299", "1299", "last_number", True),
    ("The area is 18 cm^2.", "numeric", None, "18", "18", "last_number", True),
    ("Then 3/4 of the pie", "numeric", None, "0.75", "0.75", "last_number", True),
    ("It dropped to -4 degrees", "numeric", None, "-4", "-4", "last_number", True),
    ("In total 10.", "numeric", None, "10", "10", "last_number", True),
    ("Between 3-5 people came, so 8 chairs.", "numeric", None, "8", "8", "last_number", True),
    ("A total of 1,000,000.00 dollars", "numeric", None, "1e6", "1000000", "last_number", False),
    ("Total = 007", "numeric", None, "7", "7", "last_number", True),
    ("About 12.", "numeric", None, "12.0", "12", "last_number", True),
    ("Variable x2 is 9", "numeric", None, "9", "9", "last_number", True),
    # nothing
    ("I don't know.", "numeric", None, "42", None, "none", False),
    ("", "numeric", None, "42", None, "none", False),
    # think / harmony: answer part first, reasoning as fallback
    ("<think>so 6*7 = 42</think>", "numeric", None, "42", "42", "last_number", True),
    ("<think>The answer is 5.</think>The answer is 7.", "numeric", None, "7", "7", "answer_is", True),
    ("<think>x</think>\n\n\\boxed{12}", "numeric", None, "12", "12", "boxed", True),
    ("<think>\nlong reasoning with 40 + 2 = 42\n", "numeric", None, "42", None, "truncated", False),
    ("analysisWe need 6*7.assistantfinalThe answer is 42.", "numeric", None, "42", "42", "answer_is", True),
    (
        "<|channel|>analysis<|message|>Compute 5<|end|><|start|>assistant<|channel|>final<|message|>**Answer: "
        "42**<|return|>",
        "numeric", None, "42", "42", "answer_colon", True,
    ),
    # ------------------------------------------------------------------ letter
    # boxed
    ("\\boxed{C}", "letter", None, "C", "C", "boxed", True),
    ("\\boxed{C}", "letter", None, "B", "C", "boxed", False),
    ("\\boxed{\\text{(C)}}", "letter", None, "C", "C", "boxed", True),
    ("\\boxed{\\textbf{D}}", "letter", None, "D", "D", "boxed", True),
    ("\\boxed{(B)}", "letter", None, "B", "B", "boxed", True),
    ("\\boxed{C: Cardiac tamponade}", "letter", MED, "C", "C", "boxed", True),
    ("\\boxed{B) Cardiac tamponade}", "letter", MED, "B", "B", "boxed", True),
    ("\\boxed{Cardiac tamponade}", "letter", MED, "B", "B", "boxed", True),
    ("\\boxed{\\text{Cardiac tamponade}}", "letter", MED, "B", "B", "boxed", True),
    ("$\\boxed{\\mathrm{A}}$", "letter", None, "A", "A", "boxed", True),
    ("\\boxed{b}", "letter", None, "B", "B", "boxed", True),
    ("\\boxed{\\langle H\\rangle \\ll \\Delta E}\n\n**Answer: D**", "letter", ABCD, "D", "D", "answer_colon", True),
    ("\\boxed{E}\nAnswer: B", "letter", ABCD, "B", "B", "answer_colon", True),
    # hash
    ("#### C", "letter", None, "C", "C", "hash", True),
    ("#### (A)", "letter", None, "A", "A", "hash", True),
    # answer is
    ("The answer is (C).", "letter", None, "C", "C", "answer_is", True),
    ("The answer is C.", "letter", None, "C", "C", "answer_is", True),
    ("The answer is not A but C.", "letter", None, "C", "C", "answer_is", True),
    ("The answer is B because a car moves.", "letter", None, "B", "B", "answer_is", True),
    ("I would say the correct answer is c", "letter", None, "C", "C", "answer_is", True),
    ("The answer is A.", "letter", None, "A", "A", "answer_is", True),
    ("The answer is (A) Pneumothorax.", "letter", MED, "A", "A", "answer_is", True),
    ("The best answer is D. Option A is wrong.", "letter", None, "D", "D", "answer_is", True),
    ("The correct option is B.", "letter", None, "B", "B", "answer_is", True),
    ("I think A is wrong; the answer is C", "letter", None, "C", "C", "answer_is", True),
    ("The answer is Cardiac tamponade.", "letter", MED, "B", "B", "answer_is", True),
    ("The answer is 22", "letter", AQUA, "B", "B", "answer_is", True),
    ("The answer is 23.5 km", "letter", AQUA, "C", "C", "answer_is", True),
    ("The answer is rather than A, C.", "letter", None, "C", "C", "answer_is", True),
    ("The answer is **B**.", "letter", None, "B", "B", "answer_is", True),
    ("The answer is (E).", "letter", AQUA, "E", "E", "answer_is", True),
    ("The answer is E.", "letter", MED, "A", None, "none", False),
    ("The answer is A large dose of aspirin.", "letter", None, "A", None, "none", False),
    # answer colon
    ("Answer: D", "letter", None, "D", "D", "answer_colon", True),
    ("**Answer:** (B) Cardiac tamponade", "letter", MED, "B", "B", "answer_colon", True),
    ("**Answer: C) Myocardial infarction**", "letter", MED, "C", "C", "answer_colon", True),
    ("answer: b", "letter", None, "B", "B", "answer_colon", True),
    ("Answer: (a)", "letter", None, "A", "A", "answer_colon", True),
    ("Final Answer: E", "letter", MED, "E", None, "none", False),
    ("Final Answer:\nB", "letter", None, "B", "B", "answer_colon", True),
    ("Answer: A\n...\nAnswer: D", "letter", None, "D", "D", "answer_colon", True),
    # bold
    ("I'd go with **B**.", "letter", None, "B", "B", "bold", True),
    ("**Key point**: option **(D)**", "letter", None, "D", "D", "bold", True),
    ("**Pulmonary embolism** fits.", "letter", MED, "D", "D", "bold", True),
    # letter fallback
    ("C", "letter", None, "C", "C", "letter", True),
    ("(D) is right", "letter", None, "D", "D", "letter", True),
    ("Option B fits best.", "letter", None, "B", "B", "letter", True),
    ("C) Myocardial infarction", "letter", MED, "C", "C", "letter", True),
    ("I pick A", "letter", None, "A", "A", "letter", True),
    ("Not A, so B.", "letter", None, "B", "B", "letter", True),
    ("A patient with chest pain", "letter", None, "A", None, "none", False),
    ("Hmm, maybe D or E.", "letter", MED, "D", "D", "letter", True),
    # option text fallback
    ("It is cardiac tamponade.", "letter", MED, "B", "B", "option_text", True),
    ("Most likely a pulmonary embolism given the D-dimer", "letter", MED, "D", "D", "option_text", True),
    ("B-cell lymphoma, so the answer is cardiac tamponade", "letter", MED, "B", "B", "answer_is", True),
    ("Its B-cell count is high.", "letter", None, "B", None, "none", False),
    ("Most likely a pulmonary embolism here", "letter", MED, "D", "D", "option_text", True),
    ("So the distance is 24", "letter", AQUA, "D", "D", "option_text", True),
    ("\\boxed{22}", "letter", AQUA, "B", "B", "boxed", True),
    ("\\boxed{23.5}", "letter", AQUA, "B", "C", "boxed", False),
    ("Probably gamma rays.", "letter", ABCD, "C", "C", "option_text", True),
    ("no idea", "letter", MED, "B", None, "none", False),
    # think / harmony letter
    ("<think>A? no, B? maybe C</think>\n\nThe answer is (C).", "letter", None, "C", "C", "answer_is", True),
    ("<think>Let me consider option A.</think>", "letter", None, "A", "A", "letter", True),
    ("<think>The answer is B. Checking A again", "letter", None, "B", None, "truncated", False),
    ("analysisCompare options.assistantfinal**B**", "letter", None, "B", "B", "bold", True),
    # ----------------------------------------------------------------- boolean
    ("\\boxed{Yes}", "boolean", None, "yes", "yes", "boxed", True),
    ("\\boxed{\\text{No}}", "boolean", None, "no", "no", "boxed", True),
    ("The answer is no.", "boolean", None, "no", "no", "answer_is", True),
    ("The answer is no.", "boolean", None, "yes", "no", "answer_is", False),
    ("Answer: True", "boolean", None, "yes", "yes", "answer_colon", True),
    ("Answer: false", "boolean", None, "False", "no", "answer_colon", True),
    ("#### yes", "boolean", None, "true", "yes", "hash", True),
    ("It holds: **False**", "boolean", None, "no", "no", "bold", True),
    ("Yes, because the ratio is constant.", "boolean", None, "yes", "yes", "boolean", True),
    ("No.", "boolean", None, "no", "no", "boolean", True),
    ("After checking, the statement is true.", "boolean", None, "True", "yes", "boolean", True),
    ("YES", "boolean", None, "Yes", "yes", "boolean", True),
    ("I am not sure.", "boolean", None, "yes", None, "none", False),
    ("Nobody knows; trueish", "boolean", None, "yes", None, "none", False),
    ("<think>yes? no?</think>\n\nThe answer is yes.", "boolean", None, "yes", "yes", "answer_is", True),
    ("<think>It is clearly yes", "boolean", None, "yes", None, "truncated", False),
    # ------------------------------------------------------------------- latex
    ("\\boxed{\\frac{1}{2}}", "latex", None, "0.5", "\\frac{1}{2}", "boxed", True),
    ("\\boxed{\\dfrac{1}{2}}", "latex", None, "\\frac{1}{2}", "\\dfrac{1}{2}", "boxed", True),
    ("\\boxed{\\frac{3}{4}}", "latex", None, "\\frac{6}{8}", "\\frac{3}{4}", "boxed", True),
    ("\\boxed{0.75}", "latex", None, "\\frac{3}{4}", "0.75", "boxed", True),
    ("\\boxed{\\frac{2}{3}}", "latex", None, "0.67", "\\frac{2}{3}", "boxed", False),
    ("\\boxed{\\sqrt{12}}", "latex", None, "2\\sqrt{3}", "\\sqrt{12}", "boxed", True),
    ("\\boxed{\\sqrt{13}}", "latex", None, "2\\sqrt{3}", "\\sqrt{13}", "boxed", False),
    ("\\boxed{[0,1)}", "latex", None, "[0, 1)", "[0,1)", "boxed", True),
    ("\\boxed{(0,1]}", "latex", None, "[0,1]", "(0,1]", "boxed", False),
    ("\\boxed{x^2+1}", "latex", None, "1+x^2", "x^2+1", "boxed", True),
    ("\\boxed{\\frac{\\pi}{4}}", "latex", None, "\\frac{\\pi}{4}", "\\frac{\\pi}{4}", "boxed", True),
    ("\\[ \\boxed{3} \\]", "latex", None, "3", "3", "boxed", True),
    ("The answer is $\\frac{\\pi}{4}$.", "latex", None, "\\pi/4", "\\frac{\\pi}{4}", "answer_is", True),
    ("The answer is \\(2\\sqrt{2}\\).", "latex", None, "\\sqrt{8}", "2\\sqrt{2}", "answer_is", True),
    ("Answer: $-\\frac{1}{2}$", "latex", None, "-0.5", "-\\frac{1}{2}", "answer_colon", True),
    ("#### \\frac{5}{6}", "latex", None, "\\frac{10}{12}", "\\frac{5}{6}", "hash", True),
    ("So we get $x^2+1$.", "latex", None, "1+x^2", "x^2+1", "math_env", True),
    ("Hence\n\\[\n\\frac{7}{2}\n\\]", "latex", None, "3.5", "\\frac{7}{2}", "math_env", True),
    ("The answer is 5 because it fits.", "latex", None, "5", "5", "answer_is", True),
    ("The answer is x^2+1, as shown.", "latex", None, "1+x^2", "x^2+1", "answer_is", True),
    ("The answer is the one above; see $y=3$.", "latex", None, "3", "y=3", "answer_is", True),
    ("**Step 1**: we get 12.", "latex", None, "12", "12", "last_number", True),
    ("It equals 12.", "latex", None, "12", "12", "last_number", True),
    ("nothing here", "latex", None, "1", None, "none", False),
    ("<think>$x=1$ and", "latex", None, "1", None, "truncated", False),
]


@pytest.mark.parametrize(
    "response, answer_type, choices, gold, value, rule, verdict",
    CASES,
    ids=[f"{i:03d}-{c[1]}-{c[5]}" for i, c in enumerate(CASES)],
)
def test_cascade(response, answer_type, choices, gold, value, rule, verdict):
    assert extract_with_rule(response, answer_type, choices) == (value, rule)
    assert extract(response, answer_type, choices) == value
    assert verify(value, gold, answer_type) is verdict
    assert is_correct(response, gold, answer_type, choices) is verdict


def test_every_rule_and_type_is_covered():
    rules = {c[5] for c in CASES}
    assert rules == set(RULES), set(RULES) - rules
    assert {c[1] for c in CASES} == set(ANSWER_TYPES)
    assert len(CASES) >= 150


# (pred, gold, answer_type, verdict): verify() on stored values.
VERIFY_CASES = [
    ("3.50", "3.5", "numeric", True),
    ("3.5", "3.50", "numeric", True),
    ("1,000", "1000", "numeric", True),
    ("1000", "1,000", "numeric", True),
    ("0.5", "1/2", "numeric", True),
    ("-0", "0", "numeric", True),
    ("+7", "7", "numeric", True),
    ("7", "7.0001", "numeric", False),
    ("$18", "18", "numeric", True),
    ("18", "$18", "numeric", True),
    ("5", "5.0", "numeric", True),
    ("5", "5 apples", "numeric", True),
    ("2", "2\\sqrt{3}", "numeric", False),
    ("-5", "\u22125", "numeric", True),
    ("18%", "18", "numeric", True),
    ("eighteen", "18", "numeric", False),
    ("", "18", "numeric", False),
    (None, "18", "numeric", False),
    ("c", "C", "letter", True),
    ("(C)", "C", "letter", True),
    ("C", "(C)", "letter", True),
    ("C", "D", "letter", False),
    ("CD", "C", "letter", False),
    ("yes", "True", "boolean", True),
    ("no", "yes", "boolean", False),
    ("maybe", "yes", "boolean", False),
    ("\\frac{1}{2}", "0.5", "latex", True),
    ("\\tfrac{1}{2}", "\\dfrac{1}{2}", "latex", True),
    ("1/3", "0.333", "latex", False),
]


@pytest.mark.parametrize("pred, gold, answer_type, verdict", VERIFY_CASES)
def test_verify(pred, gold, answer_type, verdict):
    assert verify(pred, gold, answer_type) is verdict


def test_unknown_answer_type_is_named():
    with pytest.raises(ValueError, match="'multiple'"):
        extract("C", "multiple")
    with pytest.raises(ValueError, match="'int'"):
        verify("1", "1", "int")


def test_extract_detailed_reports_source_and_format():
    found = extract_detailed("<think>so it is 42</think>", "numeric")
    assert (found.value, found.rule, found.source, found.format, found.truncated) == (
        "42", "last_number", "reasoning", "think", False,
    )
    found = extract_detailed("<think>r</think>The answer is 7", "numeric")
    assert (found.source, found.rule) == ("answer", "answer_is")
    found = extract_detailed("We get 12 and then", "numeric", think_prefilled=True)
    assert (found.value, found.rule, found.truncated) == (None, "truncated", True)


def test_choices_limit_letter_range():
    five = ["a1", "b2", "c3", "d4", "e5"]
    assert extract("The answer is E.", "letter", five) == "E"
    assert extract("The answer is E.", "letter", five[:4]) is None
    # Without choices the range is A-J (MMLU-Pro has ten options).
    assert extract("The answer is J.", "letter") == "J"
    assert extract("The answer is K.", "letter") is None


def test_option_prefixes_only_stripped_when_all_have_them():
    # "A. fumigatus" is an option text, not a prefixed "A." option.
    choices = ["A. fumigatus", "C. albicans", "E. coli", "S. aureus"]
    assert extract("It is E. coli", "letter", choices) == "C"
