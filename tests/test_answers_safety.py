"""Safety and time bounds: model text never executes, every call is bounded.

- hostile strings in \\boxed{} (and as gold) do nothing, also on the math-verify path;
- the module never calls eval/exec/sympify/parse_expr or math-verify's
  ExprExtractionConfig (which calls parse_expr);
- math-verify runs under our own deadline from non-main threads (its signal
  timeout cannot), and a hanging comparison returns False within the bound;
- 1 MB responses built to make regular expressions backtrack finish in < 2 s.
"""

from __future__ import annotations

import ast
import inspect
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cdlib import answer_values, answers, latex_verify
from cdlib.answers import ANSWER_TYPES, extract_with_rule, is_correct, verify

MED = ["Pneumothorax", "Cardiac tamponade", "Myocardial infarction", "Pulmonary embolism"]

HOSTILE_TEMPLATES = [
    "__import__('os').system('touch {marker}')",
    "eval(\"__import__('os').system('touch {marker}')\")",
    "exec('import os; os.system(\"touch {marker}\")')",
    "(lambda: __import__('os').system('touch {marker}'))()",
    "().__class__.__base__.__subclasses__()[0]('touch {marker}')",
    "Symbol('x').__init__.__globals__['os'].system('touch {marker}')",
    "\\text{__import__('subprocess').call(['touch', '{marker}'])}",
]


@pytest.mark.parametrize("answer_type", ANSWER_TYPES)
@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_hostile_boxed_does_nothing(tmp_path, answer_type, template):
    marker = tmp_path / "pwned"
    payload = template.replace("{marker}", str(marker))
    response = f"<think>ok</think>\nThe answer is \\boxed{{{payload}}}"
    value, rule = extract_with_rule(response, answer_type, MED if answer_type == "letter" else None)
    # The numeric reader takes no number from it; the latex reader keeps it as text.
    if answer_type == "latex":
        assert (value, rule) == (payload, "boxed")
    assert is_correct(response, "1", answer_type) is False
    # As the gold too, and verified against itself through math-verify.
    verify(payload, payload, answer_type)
    verify("\\frac{1}{2}", payload, answer_type)
    assert not marker.exists()


@pytest.mark.parametrize("module", [answers, answer_values, latex_verify], ids=lambda m: m.__name__)
def test_module_never_calls_code_executing_functions(module):
    tree = ast.parse(inspect.getsource(module))
    builtins = {"eval", "exec", "compile", "__import__"}
    anywhere = {"sympify", "parse_expr", "ExprExtractionConfig", "simplify", "S"}
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            used.add(node.func.id)
        elif isinstance(node, ast.Attribute):
            used.add(node.attr)  # e.g. sympy.sympify, but also re.compile (harmless)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            used.update(alias.name.split(".")[-1] for alias in node.names)
    called_builtins = {
        node.func.id for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert not (called_builtins & builtins), called_builtins & builtins
    assert not (used & anywhere), used & anywhere


@pytest.fixture
def short_deadline(monkeypatch):
    """A 2 s math-verify deadline and an empty result cache for this test."""
    monkeypatch.setattr(latex_verify.VERIFIER, "timeout_s", 2.0)
    latex_verify.latex_equal.cache_clear()
    yield 2.0
    latex_verify.latex_equal.cache_clear()


HANGING = ["9^{9^{9^{9}}}", "2003^{2002^{2001}}", "(x+1)^{100000}"]


@pytest.mark.parametrize("latex", HANGING)
def test_hanging_math_verify_is_cut_off_in_a_thread(short_deadline, latex):
    assert verify("\\sqrt{12}", "2\\sqrt{3}", "latex") is True  # worker up and working
    result: dict[str, object] = {}

    def work():
        start = time.perf_counter()
        result["value"] = verify(latex, "1", "latex")
        result["seconds"] = time.perf_counter() - start

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert result["value"] is False
    assert result["seconds"] < short_deadline + 1.5, result["seconds"]
    # The killed worker is replaced transparently.
    latex_verify.latex_equal.cache_clear()
    assert verify("\\frac{\\pi}{4}", "\\frac{1}{4}\\pi", "latex") is True  # not identical: math-verify runs


def test_math_verify_from_many_threads():
    pairs = [
        ("\\sqrt{12}", "2\\sqrt{3}", True),
        ("[0,1)", "[0, 1)", True),
        ("(0,1]", "[0,1]", False),
        ("x^2+1", "1+x^2", True),
        ("\\sqrt{13}", "2\\sqrt{3}", False),
        ("\\frac{\\pi}{3}", "\\frac{\\pi}{4}", False),
    ] * 3
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda p: verify(p[0], p[1], "latex"), pairs))
    assert got == [p[2] for p in pairs]


def test_overlong_latex_is_not_sent_to_math_verify():
    long_pred = "x+" * 600 + "1"
    start = time.perf_counter()
    assert verify(long_pred, "1", "latex") is False
    assert time.perf_counter() - start < 0.5


MB = 1_000_000
BACKTRACK_BAITS = {
    "answer-is": "the answer is " * (MB // 14),
    "answer-colon": "Answer:" * (MB // 7),
    "final-heading": "final answer " * (MB // 13),
    "stars": "*" * MB,
    "bold-open": "**a" * (MB // 3),
    "thousands": "1," * (MB // 2),
    "digits": "1" * MB,
    "decimals": "9." * (MB // 2),
    "minus": "- " * (MB // 2),
    "boxed-open": "\\boxed{" * (MB // 7),
    "braces": "\\boxed" + "{" * MB,
    "dollars": "$" * MB,
    "display": "\\[" * (MB // 2),
    "parens": "(" * MB,
    "letters": "A " * (MB // 2),
    "negations": "not " * (MB // 4),
    "hashes": "#### " * (MB // 5),
    "text-wrap": "\\text{" * (MB // 6),
    "frac": "\\frac{1}{" * (MB // 9),
    "yes-no": "yes no " * (MB // 7),
    "spaces-then-number": " " * MB + "1",
    "think-unclosed": "<think>" + "answer is 1 " * (MB // 12),
    "harmony-bait": "<|channel|>analysis<|message|>" * (MB // 30),
    "latex-thousands": "1{,}" * (MB // 4),
    "latex-thousands-bang": "11,\\! " * (MB // 6),
    "frac-variants": "\\tfrac1{" * (MB // 8),
    "boxed-set": "\\boxed{1} and " * (MB // 14),
    "space-thousands": "1 000 " * (MB // 6),
    "bare-decimals": ".4 " * (MB // 3),
    "decimal-commas": "0,11 " * (MB // 5),
    "approx": "1\\approx" * (MB // 8),
    "answer-after-boxed": "\\boxed{1} The answer is " * (MB // 25),
    "cjk-marker": "答案是" * (MB // 3),
}


@pytest.mark.parametrize("answer_type", ANSWER_TYPES)
@pytest.mark.parametrize("name", sorted(BACKTRACK_BAITS))
def test_one_megabyte_bait_is_bounded(name, answer_type):
    response = BACKTRACK_BAITS[name]
    start = time.perf_counter()
    is_correct(response, "1", answer_type, MED if answer_type == "letter" else None)
    assert time.perf_counter() - start < 2.0


def test_answer_at_the_end_of_1mb_is_still_found():
    response = "x " * (MB // 2) + "\nThe answer is 42."
    start = time.perf_counter()
    assert extract_with_rule(response, "numeric") == ("42", "answer_is")
    assert time.perf_counter() - start < 2.0


def _verify_and_worker_pid(pred: str, gold: str) -> tuple[bool, int]:
    return verify(pred, gold, "latex"), latex_verify.VERIFIER._proc.pid


def test_forked_child_gets_its_own_worker():
    """A forked child must not talk to the parent's worker over the inherited pipe.

    (Popen.poll() in the child already treats the parent's worker as gone; the
    verifier's pid check also replaces a lock that may have been held at fork.)
    """
    import multiprocessing

    latex_verify.latex_equal.cache_clear()
    assert verify("\\sqrt{12}", "2\\sqrt{3}", "latex") is True  # parent's worker running
    parent_worker = latex_verify.VERIFIER._proc.pid
    with multiprocessing.get_context("fork").Pool(1) as pool:
        same, child_worker = pool.apply(_verify_and_worker_pid, ("\\sqrt{8}", "2\\sqrt{2}"))
    assert same is True
    assert child_worker != parent_worker
    assert verify("\\sqrt{18}", "3\\sqrt{2}", "latex") is True  # parent's pipe not disturbed
    assert latex_verify.VERIFIER._proc.pid == parent_worker


class _CountingVerifier:
    """Wraps the real math-verify worker and counts the comparisons it is asked for."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def equal(self, pred, gold):
        self.calls.append((pred, gold))
        return self.real.equal(pred, gold)


def test_identical_strings_are_equal_without_math_verify(monkeypatch):
    """A math-verify timeout (or parse failure) judged two identical strings unequal."""
    counting = _CountingVerifier(latex_verify.VERIFIER)
    monkeypatch.setattr(latex_verify, "VERIFIER", counting)
    latex_verify.latex_equal.cache_clear()
    for value in HANGING + [" \\frac{\\pi}{4} ", "(1,2]"]:
        assert verify(value, value.strip(), "latex") is True
    long_latex = "+".join(f"x_{{{i}}}" for i in range(400))  # past MAX_VERIFY_CHARS: math-verify never sees it
    assert len(long_latex) > answers.MAX_VERIFY_CHARS and verify(long_latex, long_latex, "latex") is True
    assert verify("(1,2]", "(1,2]", "numeric") is True  # an interval gold: no number in it, still the same answer
    assert counting.calls == []
    assert verify("\\sqrt{12}", "2\\sqrt{3}", "latex") is True  # a different spelling still goes to math-verify
    assert counting.calls == [("\\sqrt{12}", "2\\sqrt{3}")]
    latex_verify.latex_equal.cache_clear()
