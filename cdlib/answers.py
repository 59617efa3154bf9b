"""Answer extraction and verification: the type-specific cascade of the paper (section 3.1).

Public API (other stages and external checks call exactly these)::

    extract(response, answer_type, choices=None) -> str | None
    extract_with_rule(response, answer_type, choices=None) -> (value, rule)
    verify(pred, gold, answer_type) -> bool
    is_correct(response, gold, answer_type, choices=None) -> bool

``answer_type`` is one of :data:`ANSWER_TYPES`. For ``"letter"`` the gold is the
letter ("C") and ``choices``, when given, are the option texts in order.

How a response is read:

1. :func:`cdlib.traces.parse_response` splits it into reasoning and final answer
   (``<think>``, gpt-oss harmony, plain). A truncated response (reasoning never
   closed) is never scored from its unfinished reasoning: rule ``"truncated"``.
2. The cascade runs on the final answer; only if it finds nothing does it run
   on the (tail of the) reasoning. In order: the last ``\\boxed{}`` (nested
   braces); else the last *statement* by position among ``#### x``, "the (final)
   answer is x" and ``Answer: x`` (a question, "maybe the answer is 5?", states
   nothing); else the last bold ``**x**`` that is not a heading (``**Step 3:**``);
   then the type's fallback: last number (numeric), a letter in the valid range or
   an option's text (letter), yes/no/true/false (boolean), the last ``$...$`` math
   or the whole answer when it is bare math (latex).
3. :func:`verify` compares with exact rational arithmetic (``3.50`` = ``3.5``,
   ``1,000`` = ``1000``, ``\\frac{1}{2}`` = ``0.5``); only what that cannot settle
   (``\\sqrt``, intervals, symbolic LaTeX) goes to math-verify.

Number spellings read as one value: LaTeX thousands separators (``14{,}916``,
``11,\\! 111,\\! 100``), ``1 000`` when it is the whole answer, ``.4``, a decimal
comma that cannot be a thousands group (``2,74``, ``1000,99``, ``0,111``; ``-2,1`` stays
a list), every numeric fraction spelling (``\\frac{10}{9}``, ``\\dfrac``, ``\\tfrac``,
``\\cfrac``, ``\\frac34``, ``\\frac3{3}``) as ``10/9``, and ``$`` as currency or as a math
delimiter alike (``$10,200 + $255 = $10,455``). A gold with no finite decimal expansion
(1/12) also matches a prediction written with at least six decimals that is within one
unit of its last decimal (``0.0833333333333333``).

Which answer wins (decided here; tests/test_answers_formats.py holds the realistic cases):

- The final answer part beats the reasoning: after ``</think>``, or gpt-oss's ``final``
  channel (the last one if there are several). The reasoning is read only when the
  answer part states nothing, and an unclosed ``<think>`` or analysis channel is never
  scored (``truncated``).
- Within a part, the last statement wins: the last ``\\boxed{}``, but an "answer is" /
  "Answer:" statement written *after* the last boxed answer overrides it (a model that
  boxes 255 and then concludes "The final answer is $10,455$" answered 10,455). A
  repeated or corrected answer therefore counts as its last version.
- Plain text (Llama) has no reasoning part, so its whole text is the answer part: a
  "#### 577" recited mid-way beats a closing sentence with no marker ("Tom ends up
  with 18 pens"); a response with no marker at all gives its last number.
- Several boxed answers separated only by "and", commas or ``\\quad`` (``\\boxed{-2}
  \\quad\\text{and}\\quad \\boxed{1}``) form one answer set, for LaTeX answers only;
  comma-separated answers compare as sets (math-verify's reading; MATH's own
  equivalence test calls ``4, 10, -2`` and ``10, 4, -2`` different), tuples ``(a, b)`` in order.
- A negated letter never counts: "C, not A", "not A but C", "réponse est C non A",
  "B。不是 A" all give the letter that is not negated.
- Other languages: the prompts are English, but answers inside French, Spanish, German
  or Chinese sentences are read: "la réponse est", "Réponse :", "respuesta es",
  "Antwort:", "答案是", "答案：" are answer markers, and numbers may touch CJK text
  ("共有99颗"). Anything else in another language falls to the type's fallback.
- "x = 1/3 \\approx 1.3": the exact value before the approximation.
- A numeric response ending in symbolic math (``$\\frac{1+\\sqrt{5}}{2}$``, ``$-[0,1)$``)
  is compared as LaTeX, not by its last digit.

Safety: model text never reaches ``eval``/``sympify``/``parse_expr``. math-verify
is called only with its LaTeX extraction (an ANTLR parser building SymPy
objects; its ``ExprExtractionConfig`` would call ``parse_expr`` and is never
used), with its signal timeout disabled, inside a worker process that is killed
when it misses the deadline (:data:`LATEX_TIMEOUT_S`). That works from any
thread. All regular expressions are free of nested quantifiers and run on a
bounded tail (:data:`TAIL_CHARS`), so a 1 MB hostile response costs milliseconds.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from decimal import Decimal, localcontext
from fractions import Fraction
from functools import lru_cache

from cdlib.prompts import LETTERS
from cdlib.traces import parse_response

ANSWER_TYPES = ("numeric", "letter", "boolean", "latex")

#: Rule names reported by :func:`extract_with_rule`, in cascade order.
RULES = (
    "boxed",
    "hash",
    "answer_is",
    "answer_colon",
    "bold",
    "last_number",
    "letter",
    "option_text",
    "boolean",
    "math_env",
    "truncated",
    "none",
)

#: Characters at the end of each part that the regex rules look at.
TAIL_CHARS = 8000
#: A marker's phrase (e.g. the rest of the "Answer:" line) is cut to this length.
PHRASE_CHARS = 300
#: Longest boxed content considered.
BOXED_CHARS = 2000
#: Longest string handed to math-verify; longer ones are not equal.
MAX_VERIFY_CHARS = 1000
#: Deadline in seconds for one math-verify comparison (the worker is killed after it).
LATEX_TIMEOUT_S = 5.0
#: Letters allowed when no choices are given (A-J covers MMLU-Pro's ten options). With
#: choices, the first len(choices) of :data:`cdlib.prompts.LETTERS` (A..Z, the one
#: index <-> letter mapping of prompts, gold answers and extraction; TruthfulQA has 13).
DEFAULT_LETTERS = LETTERS[:10]
#: Digits of a number literal; longer runs are ignored (no giant int conversions).
MAX_DIGITS = 60


@dataclass(frozen=True)
class Extraction:
    """Result of the cascade: the value, the rule that fired, and where.

    ``source`` is ``"answer"`` (final-answer part), ``"reasoning"`` (fallback)
    or ``""`` when nothing was found; ``format`` and ``truncated`` come from
    :func:`cdlib.traces.parse_response`.
    """

    value: str | None
    rule: str
    source: str
    format: str
    truncated: bool


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


def extract(
    response: str,
    answer_type: str,
    choices: list[str] | None = None,
    *,
    think_prefilled: bool = False,
) -> str | None:
    """The extracted answer of ``response`` (normalised), or None.

    ``think_prefilled``: the chat template already emitted ``<think>``, so a
    response without ``</think>`` is unfinished reasoning (never scored).
    """
    return extract_detailed(response, answer_type, choices, think_prefilled=think_prefilled).value


def extract_with_rule(
    response: str,
    answer_type: str,
    choices: list[str] | None = None,
    *,
    think_prefilled: bool = False,
) -> tuple[str | None, str]:
    """``(value, rule)``; ``rule`` is one of :data:`RULES` (``"none"`` when nothing matched)."""
    result = extract_detailed(response, answer_type, choices, think_prefilled=think_prefilled)
    return result.value, result.rule


def is_correct(
    response: str,
    gold: str,
    answer_type: str,
    choices: list[str] | None = None,
    *,
    think_prefilled: bool = False,
) -> bool:
    """Whether the answer extracted from ``response`` equals ``gold``."""
    value = extract(response, answer_type, choices, think_prefilled=think_prefilled)
    return verify(value, gold, answer_type)


def extract_detailed(
    response: str,
    answer_type: str,
    choices: list[str] | None = None,
    *,
    think_prefilled: bool = False,
) -> Extraction:
    """Run the cascade on the final answer, then on the reasoning as a fallback."""
    _check_type(answer_type)
    parsed = parse_response(response or "", think_prefilled=think_prefilled)
    if parsed.truncated:
        return Extraction(None, "truncated", "", parsed.format, True)
    ctx = _Context(answer_type, choices)
    for source, text in (("answer", parsed.answer), ("reasoning", parsed.reasoning)):
        if not text:
            continue
        value, rule = _cascade(text, ctx)
        if value is not None:
            return Extraction(value, rule, source, parsed.format, False)
    return Extraction(None, "none", "", parsed.format, False)


def verify(pred: str | None, gold: str, answer_type: str) -> bool:
    """Whether an extracted value ``pred`` equals ``gold`` for ``answer_type``.

    Never raises on model text and never runs longer than about
    :data:`LATEX_TIMEOUT_S` seconds. Numeric and LaTeX values that are the same
    string once stripped are equal without asking math-verify (which could time
    out on them, or fail to parse them, and judge them unequal).
    """
    _check_type(answer_type)
    if pred is None or gold is None:
        return False
    pred, gold = str(pred).strip(), str(gold).strip()
    if not pred or not gold:
        return False
    if answer_type == "letter":
        return _letter_key(pred) == _letter_key(gold) != ""
    if answer_type == "boolean":
        p, g = _as_bool(pred), _as_bool(gold)
        return p is not None and p == g
    if pred == gold:
        return True
    p, g = _as_fraction(pred), _as_fraction(gold)
    if g is None and answer_type == "numeric" and not _MATHY_RE.search(gold):
        spelled = _numeric_from_phrase(gold, boxed=False)  # gold such as "$5" or "5 apples"
        g = _as_fraction(spelled) if spelled is not None else None
    if p is not None and g is not None:
        return p == g or _truncated_expansion_of(pred, p, g)
    if answer_type == "numeric" and p is None and not _MATHY_RE.search(pred):
        return False  # words, not a number and not math: nothing to compare
    if len(pred) > MAX_VERIFY_CHARS or len(gold) > MAX_VERIFY_CHARS:
        return False
    return _latex_equal(pred, gold)


_DECIMALS_RE = re.compile(r"\.(\d{6,%d})\D*$" % MAX_DIGITS)


def _truncated_expansion_of(pred: str, p: Fraction, g: Fraction) -> bool:
    """``0.0833333333333333`` for 1/12: a gold that has no finite decimal expansion,
    written with at least six decimals and within one unit of the last decimal."""
    match = _DECIMALS_RE.search(pred[:200])
    if match is None:
        return False
    den = g.denominator
    for factor in (2, 5):
        while den % factor == 0:
            den //= factor
    return den != 1 and abs(p - g) < Fraction(1, 10 ** len(match.group(1)))


def _check_type(answer_type: str) -> None:
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type {answer_type!r} is not one of {ANSWER_TYPES}")


# --------------------------------------------------------------------------- #
# The cascade
# --------------------------------------------------------------------------- #

# "the (final|correct|best) answer is", "the correct option is", "answer would be".
# Also the French, Spanish, German and Chinese phrasings ("la réponse est", "答案是").
_ANSWER_IS_RE = re.compile(
    r"(?i)(?:\b(?:(?:answer|option|choice)[ \t*_]{0,3}(?:is|would be|should be|will be)"
    r"|r[ée]ponse (?:est|serait)|respuesta es|antwort (?:ist|lautet))\b|答案(?:是|为|應該是|应该是))"
    r"[ \t*_:]{0,4}"
)
# "Answer: x", "**Final Answer:** x", "Answer：x", "Réponse : x", "答案：x".
_ANSWER_COLON_RE = re.compile(
    r"(?i)(?:\b(?:answer|r[ée]ponse|respuesta|antwort)|答案|回答)[ \t*_]{0,3}[:：][ \t*_]{0,3}"
)
# "**Final Answer**" as a heading, the answer on the next line.
_FINAL_HEADING_RE = re.compile(r"(?i)\bfinal answer[ \t*_#]{0,4}\n")
# Bold text: "**73**" but not the span between two bold phrases ("** and **").
_BOLD_RE = re.compile(r"\*\*(?=[^\s*])([^*\n]{0,199}[^\s*])\*\*")
_HEADING_RE = re.compile(r"(?i)^(?:step|part|case|stage|phase|method|approach)\b|:$")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox|box)\b")  # "\box{A}": Math-Verify issue 16

# A number: optional sign and "$", thousands groups or plain digits, decimals
# (".4" too, and a decimal comma where it cannot be a thousands group: "2,74",
# "1000,99"; "0,111" is read as 0.111; "-2,1" stays a list), an optional "/denominator". Not preceded
# by an ASCII letter, digit, "." or "^" (units such as "cm^2", identifiers such as
# "x2" and exponents are not answers); CJK text may touch it ("共有99颗").
_NUM_RE = re.compile(
    r"(?<![A-Za-z0-9_.^\\])(?P<neg>-\s?)?\\?\$?\s?"
    r"(?:(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d{1,%d}(?!\d))"
    r"(?:(?P<dec>\.\d{1,%d}(?!\d))|(?P<cdec>,\d{2}(?![\d,])|,\d{4,%d}(?![\d,])))?"
    r"|(?P<bare>\.\d{1,%d}(?!\d)))"
    r"(?:\s?/\s?(?P<den>\d{1,%d})(?!\d|\.\d))?" % ((MAX_DIGITS,) * 5)
)
# A numeric LaTeX fraction in any spelling: \frac{10}{9}, \dfrac, \tfrac, \cfrac, \frac34, \frac3{3}.
_FRAC_ANY_RE = re.compile(
    r"\\[dtc]?frac\s*(?:\{\s*(?P<num>-?\d{1,%d}(?:\.\d{1,%d})?)\s*\}|(?P<num1>\d))"
    r"\s*(?:\{\s*(?P<den>-?\d{1,%d}(?:\.\d{1,%d})?)\s*\}|(?P<den1>\d))(?![\d{])" % ((MAX_DIGITS,) * 4)
)
# LaTeX thousands separators: 14{,}916, 14 {, }916, 11,\! 111,\! 100, 32,\,349.
_LATEX_THOUSANDS_RE = re.compile(r"(?<=\d)(?:\s?\{\s?,\s?\}\s?|,\s?\\[!,; ]\s?)(?=\d{3}(?!\d))")
# "1 000" (spaces, no-break or thin spaces between groups) when it is the whole answer.
_SPACE_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:[ \u00a0\u202f]\d{3})+(?:\.\d{1,%d})?" % MAX_DIGITS)
_LETTER_RE = re.compile(r"(?<![A-Za-z0-9\\'’])(?P<open>\()?(?P<letter>[A-Za-z])(?P<close>\))?(?![A-Za-z0-9'’])")
_BOOL_RE = re.compile(r"(?i)(?<![A-Za-z])(yes|no|true|false)(?![A-Za-z])")
_TEXT_WRAP_RE = re.compile(
    r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}"
)
_LATEX_SPACING_RE = re.compile(r"\\[,;:! ]|\\q?quad\b|\\left\b|\\right\b|\\displaystyle\b")
_MATHY_RE = re.compile(r"\\[A-Za-z]|\^|\bsqrt\b|\bpi\b")
#: Words that negate the option right after them ("not A", "non A", "不是 A"); see the module docstring.
_NEGATIONS = (
    "not", "n't", "rather than", "instead of", "nor", "neither", "except", "excluding", "never",
    "non", "pas", "plutôt que", "no es", "nicht", "kein", "不是", "而不是", "并非", "非",
)


class _Context:
    """Per-call settings: the answer type and, for letters, the valid range and options."""

    __slots__ = ("answer_type", "letters", "_choices", "_options")

    def __init__(self, answer_type: str, choices: list[str] | None):
        self.answer_type = answer_type
        self.letters = DEFAULT_LETTERS
        self._choices = None
        self._options: list[tuple[str, str]] | None = None
        if answer_type == "letter" and choices:
            self.letters = LETTERS[: min(len(choices), 26)]
            self._choices = tuple(str(c) for c in choices)

    @property
    def options(self) -> list[tuple[str, str]]:
        """Normalised option texts, computed on first use (most answers name a letter)."""
        if self._options is None:
            self._options = _normalised_options(self._choices) if self._choices else []
        return self._options

    def from_phrase(self, phrase: str, boxed: bool = False) -> str | None:
        """The value a marker (boxed, ####, answer is, ...) points at, or None."""
        if self.answer_type == "numeric":
            return _numeric_from_phrase(phrase, boxed)
        if self.answer_type == "letter":
            return _letter_from_phrase(phrase, self, boxed)
        if self.answer_type == "boolean":
            return _bool_from_phrase(phrase)
        return _latex_from_phrase(phrase, boxed)


def _cascade(text: str, ctx: _Context) -> tuple[str | None, str]:
    """Apply the rules in order to one part of a response."""
    boxes = _boxed_spans(text)
    if len(boxes) > 1 and ctx.answer_type == "latex":
        answer_set = _boxed_set(text, boxes)
        if answer_set is not None:
            boxes.insert(0, (boxes[-1][0], boxes[0][1], answer_set))
    for _, end, content in boxes:
        value = ctx.from_phrase(content, boxed=True)
        if value is not None:
            later = _later_statement(text[end:end + TAIL_CHARS], ctx)
            return later if later is not None else (value, "boxed")
    tail = _ascii_minus(text[-TAIL_CHARS:])
    value_rule = _last_statement(tail, ctx)
    if value_rule is not None:
        return value_rule
    for match in _last_matches(_BOLD_RE, tail):
        if _HEADING_RE.search(match.group(1)):
            continue  # "**Step 7:**" is a heading, not an answer
        value = ctx.from_phrase(match.group(1))
        if value is not None:
            return value, "bold"
    return _fallback(tail, ctx)


def _last_statement(tail: str, ctx: _Context) -> tuple[str, str] | None:
    """The last "#### x", "the answer is x" or "Answer: x" that gives a value (by position:
    a model's final "The best answer is C." beats a "#### 577" it recited earlier).
    A question ("Maybe the answer is 578?") states nothing."""
    marks = [(m.end(), "answer_is") for m in _last_matches(_ANSWER_IS_RE, tail)]
    marks += [(m.end(), "answer_colon") for m in _last_matches(_ANSWER_COLON_RE, tail)]
    marks += [(m.end(), "answer_colon") for m in _last_matches(_FINAL_HEADING_RE, tail)]
    hash_at = tail.rfind("####")
    if hash_at >= 0:
        marks.append((hash_at + 4, "hash"))
    for end, rule in sorted(marks, reverse=True):
        phrase = _line_after(tail, end)
        if rule == "answer_is" and _is_question(phrase):
            continue
        value = ctx.from_phrase(phrase)
        if value is not None:
            return value, rule
    return None


def _is_question(phrase: str) -> bool:
    """Whether the sentence the phrase starts ends with a question mark."""
    for i, ch in enumerate(phrase):
        if ch == "?" or ch == "？":
            return True
        if ch in "!\n。" or ch == "." and (i + 1 == len(phrase) or phrase[i + 1] in " \n"):
            return False
    return False


def _later_statement(after: str, ctx: _Context) -> tuple[str, str] | None:
    """A statement (see :func:`_last_statement`) after the last boxed answer, which then
    wins ("\\boxed{255} ... The final answer is $10,455$")."""
    if "nswer" not in after and "NSWER" not in after and "####" not in after and "答案" not in after:
        return None
    return _last_statement(_ascii_minus(after), ctx)


def _fallback(tail: str, ctx: _Context) -> tuple[str | None, str]:
    """The type-specific last resort when no marker matched."""
    kind = ctx.answer_type
    if kind == "numeric":
        symbolic = _symbolic_ending(tail)
        if symbolic is not None:
            return symbolic, "math_env"
        value = _last_number(tail)
        return (value, "last_number") if value is not None else (None, "none")
    if kind == "letter":
        value = _letter_in_text(tail, ctx)
        if value is not None:
            return value, "letter"
        value = _match_option(tail, ctx.options)
        return (value, "option_text") if value is not None else (None, "none")
    if kind == "boolean":
        value = _bool_in_text(tail)
        return (value, "boolean") if value is not None else (None, "none")
    value = _last_math_env(tail)
    if value is not None:
        return value, "math_env"
    bare = tail.strip().rstrip(".")
    if len(bare) <= PHRASE_CHARS and _looks_like_math(bare) and "\n" not in bare:
        return bare, "math_env"  # the whole answer is math without delimiters: "(x-2)(x+2)"
    value = _last_number(tail)
    return (value, "last_number") if value is not None else (None, "none")


_SYMBOLIC_RE = re.compile(r"\\sqrt|\\pi\b")


def _symbolic_ending(tail: str) -> str | None:
    """The closing math span when it is symbolic (``\\frac{1+\\sqrt{5}}{2}``, ``[0,1)``):
    its last digit is not a numeric answer, so it goes to verify() as LaTeX."""
    end = tail.rstrip(" \t\n.")
    if not end.endswith(("$", "\\]", "\\)")):
        return None
    env = _last_math_env(end)
    if env is None or "=" in env:
        return None
    interval = env.lstrip("-")[:1] in "[(" and env[-1:] in "])" and "," in env
    if not interval and not _SYMBOLIC_RE.search(env):
        return None
    return env


def _last_matches(pattern: re.Pattern, text: str, keep: int = 3) -> list[re.Match]:
    """The last ``keep`` matches of ``pattern`` in ``text``, last first."""
    found: list[re.Match] = []
    for match in pattern.finditer(text):
        found.append(match)
        if len(found) > keep:
            del found[0]
    found.reverse()
    return found


def _line_after(text: str, start: int) -> str:
    """The rest of the line after a marker; the next non-empty line if that is blank."""
    end = text.find("\n", start, start + PHRASE_CHARS)
    line = text[start:end if end >= 0 else start + PHRASE_CHARS]
    if line.strip(" \t*_:#") or end < 0:
        return line
    nxt = text[end + 1:end + 1 + PHRASE_CHARS].lstrip()
    stop = nxt.find("\n")
    return nxt[:stop] if stop >= 0 else nxt


def _boxed_spans(text: str, attempts: int = 4) -> list[tuple[int, int, str]]:
    """``(start, end, content)`` of the last few ``\\boxed{...}`` (or ``\\fbox``, ``\\box``),
    last first (nested braces)."""
    found: list[tuple[int, int, str]] = []
    end = len(text)
    for _ in range(2 * attempts):  # bounded: unbalanced "\boxed{" baits cost at most this
        if len(found) == attempts:
            break
        at = max(text.rfind("\\box", 0, end), text.rfind("\\fbox", 0, end))
        if at < 0:
            break
        end = at
        match = _BOXED_RE.match(text, at)
        if match is None:
            continue
        pos = match.end()
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if pos < len(text) and text[pos] == "{":
            content = _braced(text, pos)
            if content is not None:
                found.append((at, pos + len(content) + 2, content))
        else:  # "\boxed 5"
            token = text[pos:pos + 40].split(None, 1)
            if token:
                found.append((at, pos + len(token[0]), token[0].rstrip("$.,")))
    return found

#: What may stand between boxed answers that together form one answer set.
_SET_WORDS = ("\\text", "\\mathrm", "\\qquad", "\\quad", "and", "or", "et", "und", "y", "和", "或")


def _boxed_set(text: str, boxes: list[tuple[int, int, str]]) -> str | None:
    """``"-2, 1"`` for ``\\boxed{-2} \\quad \\text{and} \\quad \\boxed{1}``: the last boxed
    answers joined when only separators stand between them (in order, repeats dropped)."""
    group = [boxes[0][2]]
    for i in range(1, len(boxes)):
        between = text[boxes[i][1]:boxes[i - 1][0]]
        if len(between) > 60:
            break
        for word in _SET_WORDS:
            between = between.replace(word, " ")
        if between.strip(" \t\n,;$.{}[]()\\"):
            break
        group.append(boxes[i][2])
    if len(group) < 2:
        return None
    ordered = list(dict.fromkeys(c.strip() for c in reversed(group)))
    return ", ".join(ordered) if len(ordered) > 1 else None


def _braced(text: str, open_at: int) -> str | None:
    """Text inside the braces opening at ``open_at``, or None if unbalanced within bounds."""
    depth = 0
    limit = min(len(text), open_at + BOXED_CHARS)
    for i in range(open_at, limit):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:i]
    return None


# --------------------------------------------------------------------------- #
# Phrase cleaning and per-type readers
# --------------------------------------------------------------------------- #


def _clean(phrase: str) -> str:
    """Strip markdown emphasis and LaTeX wrappers that carry no value."""
    s = _ascii_minus(phrase[:BOXED_CHARS])
    if "\\" in s or "{" in s:
        s = _plain_numbers(s)
    if "\\" not in s:
        return s.replace("**", " ") if "*" in s else s
    s = s.replace("**", " ")
    for _ in range(3):
        unwrapped = _TEXT_WRAP_RE.sub(r"\1", s)
        if unwrapped == s:
            break
        s = unwrapped
    s = _LATEX_SPACING_RE.sub(" ", s)
    return s.replace("\\%", "%").replace("\\$", "$").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def _plain_numbers(s: str) -> str:
    """LaTeX spellings of numbers as plain text: ``14{,}916`` and ``11,\\! 111`` as
    ``14,916`` and ``11,111``, numeric fractions (``\\frac{10}{9}``, ``\\tfrac12``,
    ``\\frac3{3}``) as ``10/9``, and ``\\approx11`` with a space before the number."""
    if "," in s:
        s = _LATEX_THOUSANDS_RE.sub(",", s)
    if "frac" in s:
        s = _FRAC_ANY_RE.sub(_frac_as_slash, s)
    if "\\approx" in s:
        s = s.replace("\\approx", "\\approx ")
    return s


def _frac_as_slash(match: re.Match) -> str:
    num = match.group("num") or match.group("num1")
    den = match.group("den") or match.group("den1")
    if "." in den:
        return match.group(0)  # 9.5/3.14 is not one number literal; left to math-verify
    at = match.start()
    space = " " if at > 0 and match.string[at - 1].isdigit() else ""  # "2\frac12" is not "21/2"
    return f"{space}{num}/{den}"


def _whole_spaced_number(text: str) -> str | None:
    """``1 000`` or ``1 000 000.5`` when that is all the text says (spaces as thousands separators)."""
    bare = text.strip().strip("$").strip().rstrip(".")
    if len(bare) > 4 * MAX_DIGITS or not _SPACE_THOUSANDS_RE.fullmatch(bare):
        return None
    return _canonical(Fraction(bare.replace(" ", "").replace("\u00a0", "").replace("\u202f", "")))


def _ascii_minus(text: str) -> str:
    return text.replace("\u2212", "-") if "\u2212" in text else text


def _negated(text: str, start: int) -> bool:
    """Whether the words just before ``start`` negate the candidate ("not A but C")."""
    before = text[max(0, start - 16):start].lower().rstrip(" \t*(:,")
    return before.endswith(_NEGATIONS)


_SENTENCE_STOP_RE = re.compile(r"[.!?。！？]\s")


def _numeric_from_phrase(phrase: str, boxed: bool) -> str | None:
    s = _clean(phrase)
    if not boxed:  # the sentence that states the answer, not the next one's equations
        stop = _SENTENCE_STOP_RE.search(s)
        if stop is not None and _NUM_RE.search(s, 0, stop.start()):
            s = s[:stop.start()]
    if "=" in s:  # "3 + 4 = 7", "x = 5": the value is on the right of the last "="
        value = _numeric_value(s.rsplit("=", 1)[1], boxed)
        if value is not None:
            return value
    return _numeric_value(s, boxed)


def _numeric_value(s: str, boxed: bool) -> str | None:
    spaced = _whole_spaced_number(s)
    if spaced is not None:
        return spaced
    if boxed and _MATHY_RE.search(s):
        latex = s.strip().strip("$").strip()
        return latex or None  # e.g. 2\sqrt{3}: left to verify()/math-verify
    for match in _NUM_RE.finditer(s):
        if _negated(s, match.start()):
            continue
        value = _number_from_match(match)
        if value is not None:
            return _canonical(value)
    return None


def _last_number(text: str) -> str | None:
    spaced = _whole_spaced_number(text)
    if spaced is not None:
        return spaced
    text = _plain_numbers(text)
    last = previous = None
    for match in _NUM_RE.finditer(text):
        previous, last = last, match
    if last is None:
        return None
    if previous is not None and "approx" in text[previous.end():last.start()] or (
        previous is not None and "≈" in text[previous.end():last.start()]
    ):
        last = previous  # "x = 1/3 \approx 1.3": the exact value, not its rounding
    value = _number_from_match(last)
    return _canonical(value) if value is not None else None


def _number_from_match(match: re.Match) -> Fraction | None:
    groups = match.groupdict()
    whole = groups["int"] or "0"
    if whole.startswith("0,") and whole.count(",") == 1:  # "0,111": a decimal comma
        whole = whole.replace(",", ".")
    else:
        whole = whole.replace(",", "")
    comma_decimals = groups.get("cdec")
    digits = whole + (groups["dec"] or groups.get("bare") or ("." + comma_decimals[1:] if comma_decimals else ""))
    try:
        value = Fraction(digits)
        if match.group("den"):
            den = int(match.group("den"))
            if den == 0:
                return None
            value /= den
    except (ValueError, ZeroDivisionError):
        return None
    return -value if match.group("neg") else value


def _fraction_from_parts(neg: str | None, num: str, den: str) -> Fraction | None:
    try:
        value = Fraction(num) / Fraction(den)
    except (ValueError, ZeroDivisionError):
        return None
    return -value if neg else value


def _canonical(value: Fraction) -> str:
    """``7``, ``3.5``, ``-0.125`` or ``1/3``: one spelling per rational number."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    while den % 2 == 0:
        den //= 2
    while den % 5 == 0:
        den //= 5
    if den == 1:  # terminating decimal
        with localcontext() as context:
            context.prec = 2 * MAX_DIGITS + 10
            number = Decimal(value.numerator) / Decimal(value.denominator)
        return format(number.normalize(), "f")
    return f"{value.numerator}/{value.denominator}"


def _letter_candidates(text: str, ctx: _Context):
    """Standalone option letters in ``text`` that are not English words or negated."""
    for match in _LETTER_RE.finditer(text):
        letter = match.group("letter")
        if letter.upper() not in ctx.letters:
            continue
        wrapped = match.group("open") is not None or match.group("close") is not None
        after = text[match.end():match.end() + 2]
        if not wrapped:
            if letter.islower() and text.strip(" \t*.:,)(") != letter:
                continue  # "a", "e.g.": lowercase only as "(c)", "c)" or alone
            if letter in "AIa" and len(after) == 2 and after[0] == " " and after[1].islower():
                continue  # the words "A patient ...", "I think ..."
            if len(after) == 2 and after[0] == "-" and after[1].isalpha():
                continue  # "D-dimer", "B-cell", "X-ray"
        if _negated(text, match.start()):
            continue
        yield match, letter.upper()


def _letter_from_phrase(phrase: str, ctx: _Context, boxed: bool) -> str | None:
    s = _clean(phrase)
    for match, letter in _letter_candidates(s, ctx):
        if boxed and s[:match.start()].strip(" \t$:{}[]"):
            break  # boxed math such as "\Delta E" is not a letter answer
        return letter
    return _match_option(s, ctx.options)


def _letter_in_text(text: str, ctx: _Context) -> str | None:
    """Fallback: the letter the answer opens with, else the last one mentioned."""
    s = _clean(text)
    last = None
    for match, letter in _letter_candidates(s, ctx):
        if not s[:match.start()].strip(" \t*#:>-"):
            return letter
        last = letter
    return last


_OPTION_PREFIX_RE = re.compile(r"\s*\(?([A-Z])\s*[).:]\s*")
_NON_WORD_RE = re.compile(r"[\W_]+")


@lru_cache(maxsize=4096)
def _normalised_options(choices: tuple[str, ...]) -> list[tuple[str, str]]:
    """``[(letter, normalised text)]``; "A) text" prefixes are dropped when every choice has one."""
    prefixes = [_OPTION_PREFIX_RE.match(text) for text in choices]
    prefixed = all(
        m is not None and m.group(1) == LETTERS[i] for i, m in enumerate(prefixes[:26])
    )
    options = []
    for i, text in enumerate(choices[:26]):
        if prefixed:
            text = text[prefixes[i].end():]
        norm = _norm_words(text)
        if norm:
            options.append((LETTERS[i], norm))
    return options


_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+")


def _norm_words(text: str) -> str:
    """Lowercase words only; LaTeX command names (``\\Delta``) are not words."""
    if "\\" in text:
        text = _LATEX_COMMAND_RE.sub(" ", text)
    return " ".join(_NON_WORD_RE.sub(" ", text.lower()).split())


def _match_option(text: str, options: list[tuple[str, str]]) -> str | None:
    """The letter of the option whose text occurs last in ``text`` (longest wins ties)."""
    if not options:
        return None
    haystack = f" {_norm_words(text)} "
    best: tuple[int, int, str] | None = None
    for letter, norm in options:
        at = haystack.rfind(f" {norm} ")
        if at < 0:
            continue
        key = (at + len(norm), len(norm), letter)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None


def _bool_from_phrase(phrase: str) -> str | None:
    match = _BOOL_RE.search(_clean(phrase))
    return _as_bool_word(match.group(1)) if match else None


def _bool_in_text(text: str) -> str | None:
    """Fallback: the yes/no the answer opens with, else the last one."""
    last = None
    for match in _BOOL_RE.finditer(text):
        if not text[:match.start()].strip(" \t*#:>-"):
            return _as_bool_word(match.group(1))
        last = match
    return _as_bool_word(last.group(1)) if last else None


def _as_bool_word(word: str) -> str:
    return "yes" if word.lower() in ("yes", "true") else "no"


_SENTENCE_END_RE = re.compile(r"\.\s|[;,]\s|\s(?:because|since|as|so|which|where)\s")
_PROSE_WORD_RE = re.compile(r"[A-Za-z]{4,}")


def _latex_from_phrase(phrase: str, boxed: bool = False) -> str | None:
    """Boxed content as is; after other markers the math env, else the math-looking clause."""
    s = phrase.strip()
    if boxed:
        return s or None
    inner = _last_math_env(s)
    if inner is not None:
        return inner
    s = s.replace("**", "")
    end = _SENTENCE_END_RE.search(s)
    s = (s[:end.start()] if end else s).strip().rstrip(".").strip()
    return s if s and _looks_like_math(s) else None


def _looks_like_math(text: str) -> bool:
    """No prose words once LaTeX commands and \\text{} are removed ("x^2+1" yes, "Step 1" no)."""
    bare = _LATEX_COMMAND_RE.sub(" ", _TEXT_WRAP_RE.sub(" ", text))
    return _PROSE_WORD_RE.search(bare) is None and any(not ch.isspace() for ch in bare)


def _last_math_env(text: str) -> str | None:
    """Content of the last ``$...$``, ``$$...$$``, ``\\[...\\]`` or ``\\(...\\)`` (found by position)."""
    candidates = []
    for opener, closer in (("\\[", "\\]"), ("\\(", "\\)")):
        close = text.rfind(closer)
        if close >= 0:
            open_ = text.rfind(opener, max(0, close - BOXED_CHARS), close)
            if open_ >= 0:
                candidates.append((close, text[open_ + 2:close]))
    close = text.rfind("$")
    if close > 0:
        open_ = text.rfind("$", max(0, close - BOXED_CHARS), close)
        if open_ >= 0:
            candidates.append((close, text[open_ + 1:close]))
    candidates = [(pos, c.strip().strip("$").strip()) for pos, c in candidates]
    candidates = [(pos, c) for pos, c in candidates if c]
    if not candidates:
        return None
    return max(candidates)[1].rstrip(".,").strip() or None


# --------------------------------------------------------------------------- #
# Verification helpers
# --------------------------------------------------------------------------- #

_PLAIN_NUMBER_RE = re.compile(
    r"(?P<neg>-)?(?P<int>\d{1,3}(?:,\d{3})+|\d{1,%d})?(?:(?P<dec>\.\d{1,%d})|(?P<cdec>,\d{2}|,\d{4,%d}))?"
    r"(?:/(?P<den>\d{1,%d}))?" % ((MAX_DIGITS,) * 4)
)


def _as_fraction(text: str) -> Fraction | None:
    """A plain number, ``a/b`` or ``\\frac{a}{b}`` as an exact Fraction; None otherwise."""
    s = _clean(text[:200]).strip()
    s = s.strip("$").replace(" ", "").rstrip(".")
    if s.startswith("+"):
        s = s[1:]
    s = s.lstrip("$").removesuffix("%")
    if not s:
        return None
    match = _PLAIN_NUMBER_RE.fullmatch(s)
    if match is None or not (match.group("int") or match.group("dec")):
        return None
    return _number_from_match(match)


def _letter_key(text: str) -> str:
    if len(text) == 1:
        return text.upper() if text.isalpha() else ""
    s = _clean(text).strip().strip("()[]{}.:*$ ").strip()
    return s.upper() if len(s) == 1 and s.isalpha() else ""


def _as_bool(text: str) -> bool | None:
    word = text.strip().strip(".!*$ ").lower()
    if word in ("yes", "true"):
        return True
    if word in ("no", "false"):
        return False
    return None


# --------------------------------------------------------------------------- #
# math-verify in a worker process with a deadline
# --------------------------------------------------------------------------- #


@lru_cache(maxsize=65536)
def _latex_equal(pred: str, gold: str) -> bool:
    return _VERIFIER.equal(pred, gold)


class _LatexVerifier:
    """Runs math-verify in a child process; a call past the deadline kills it.

    math-verify's own timeout uses ``signal.alarm``, which only works on the
    main thread; here it is disabled and the deadline is enforced from outside,
    so :func:`verify` is bounded on any thread. Calls are serialised by a lock.
    """

    def __init__(self, timeout_s: float = LATEX_TIMEOUT_S, startup_timeout_s: float = 120.0):
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._owner = os.getpid()
        self._buffer = b""
        self.timeouts = 0

    def equal(self, pred: str, gold: str) -> bool:
        if self._owner != os.getpid():  # forked child: never share the parent's pipe
            self._lock, self._proc, self._buffer, self._owner = threading.Lock(), None, b"", os.getpid()
        with self._lock:
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._start()
                self._proc.stdin.write((json.dumps([pred, gold]) + "\n").encode())
                self._proc.stdin.flush()
                return self._read_line(time.monotonic() + self.timeout_s) == "1"
            except TimeoutError:
                self.timeouts += 1
                self.close()
                return False
            except (OSError, ValueError):
                self.close()
                return False

    def _start(self) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._buffer = b""
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "cdlib.answers", "--math-verify-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        if self._read_line(time.monotonic() + self.startup_timeout_s) != "ready":
            raise OSError("math-verify worker did not start")

    def _read_line(self, deadline: float) -> str:
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                raise OSError("math-verify worker exited")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode().strip()

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass


_VERIFIER = _LatexVerifier()
atexit.register(_VERIFIER.close)


def _worker_main() -> None:
    """Loop of the math-verify worker: one JSON ``[pred, gold]`` per line in, "1"/"0" out."""
    try:
        import resource

        limit = 4 * 1024**3  # a runaway SymPy power fails with MemoryError, not the machine
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # nothing the libraries print can corrupt the protocol
    import logging

    logging.disable(logging.CRITICAL)
    from math_verify import LatexExtractionConfig
    from math_verify import parse as mv_parse
    from math_verify import verify as mv_verify

    config = [LatexExtractionConfig()]

    @lru_cache(maxsize=4096)
    def parsed(latex: str):
        # LaTeX extraction only: ExprExtractionConfig would call sympy's parse_expr (eval).
        body = latex.strip().strip("$").replace("$", " ")
        return mv_parse(f"${body}$", extraction_config=config, parsing_timeout=None)

    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            pred, gold = json.loads(line)
            gold_parsed, pred_parsed = parsed(gold), parsed(pred)
            same = bool(gold_parsed and pred_parsed) and bool(
                mv_verify(gold_parsed, pred_parsed, timeout_seconds=None)
            )
        except Exception:  # model text: any failure means "not equal"
            same = False
        out.write("1\n" if same else "0\n")
        out.flush()


if __name__ == "__main__" and "--math-verify-worker" in sys.argv:
    _worker_main()
