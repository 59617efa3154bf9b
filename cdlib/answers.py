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
when it misses the deadline (:mod:`cdlib.latex_verify`). That works from any
thread. All regular expressions are free of nested quantifiers and run on a
bounded tail (:data:`TAIL_CHARS`), so a 1 MB hostile response costs milliseconds.
"""

from __future__ import annotations

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from cdlib.answer_values import (BOXED_CHARS, MATHY_RE, MAX_DIGITS, Context, as_bool, as_fraction, ascii_minus,
                                 bool_in_text, last_math_env, last_number, letter_in_text, letter_key, looks_like_math,
                                 match_option, numeric_from_phrase)
from cdlib.latex_verify import latex_equal
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
#: Longest string handed to math-verify; longer ones are not equal.
MAX_VERIFY_CHARS = 1000


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
    ctx = Context(answer_type, choices)
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
    :data:`cdlib.latex_verify.LATEX_TIMEOUT_S` seconds. Numeric and LaTeX values that are the same
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
        return letter_key(pred) == letter_key(gold) != ""
    if answer_type == "boolean":
        p, g = as_bool(pred), as_bool(gold)
        return p is not None and p == g
    if pred == gold:
        return True
    p, g = as_fraction(pred), as_fraction(gold)
    if g is None and answer_type == "numeric" and not MATHY_RE.search(gold):
        spelled = numeric_from_phrase(gold, boxed=False)  # gold such as "$5" or "5 apples"
        g = as_fraction(spelled) if spelled is not None else None
    if p is not None and g is not None:
        return p == g or _truncated_expansion_of(pred, p, g)
    if answer_type == "numeric" and p is None and not MATHY_RE.search(pred):
        return False  # words, not a number and not math: nothing to compare
    if len(pred) > MAX_VERIFY_CHARS or len(gold) > MAX_VERIFY_CHARS:
        return False
    return latex_equal(pred, gold)


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




def _cascade(text: str, ctx: Context) -> tuple[str | None, str]:
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
    tail = ascii_minus(text[-TAIL_CHARS:])
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


def _last_statement(tail: str, ctx: Context) -> tuple[str, str] | None:
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


def _later_statement(after: str, ctx: Context) -> tuple[str, str] | None:
    """A statement (see :func:`_last_statement`) after the last boxed answer, which then
    wins ("\\boxed{255} ... The final answer is $10,455$")."""
    if "nswer" not in after and "NSWER" not in after and "####" not in after and "答案" not in after:
        return None
    return _last_statement(ascii_minus(after), ctx)


def _fallback(tail: str, ctx: Context) -> tuple[str | None, str]:
    """The type-specific last resort when no marker matched."""
    kind = ctx.answer_type
    if kind == "numeric":
        symbolic = _symbolic_ending(tail)
        if symbolic is not None:
            return symbolic, "math_env"
        value = last_number(tail)
        return (value, "last_number") if value is not None else (None, "none")
    if kind == "letter":
        value = letter_in_text(tail, ctx)
        if value is not None:
            return value, "letter"
        value = match_option(tail, ctx.options)
        return (value, "option_text") if value is not None else (None, "none")
    if kind == "boolean":
        value = bool_in_text(tail)
        return (value, "boolean") if value is not None else (None, "none")
    value = last_math_env(tail)
    if value is not None:
        return value, "math_env"
    bare = tail.strip().rstrip(".")
    if len(bare) <= PHRASE_CHARS and looks_like_math(bare) and "\n" not in bare:
        return bare, "math_env"  # the whole answer is math without delimiters: "(x-2)(x+2)"
    value = last_number(tail)
    return (value, "last_number") if value is not None else (None, "none")


_SYMBOLIC_RE = re.compile(r"\\sqrt|\\pi\b")


def _symbolic_ending(tail: str) -> str | None:
    """The closing math span when it is symbolic (``\\frac{1+\\sqrt{5}}{2}``, ``[0,1)``):
    its last digit is not a numeric answer, so it goes to verify() as LaTeX."""
    end = tail.rstrip(" \t\n.")
    if not end.endswith(("$", "\\]", "\\)")):
        return None
    env = last_math_env(end)
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
