"""Reading an answer's value out of a phrase, per answer type, and normalising it.

The extraction cascade (:mod:`cdlib.answers`) finds *where* a response states its
answer (a boxed span, the line after "the answer is", the tail of the text); this
module reads the *value* there: :class:`Context` holds one call's answer type and
options and dispatches to the per-type readers (numbers as one canonical spelling,
option letters that are not words or negated, yes/no, LaTeX), and the fallbacks the
cascade uses when no marker matched. :func:`as_fraction`, :func:`letter_key` and
:func:`as_bool` read values for :func:`cdlib.answers.verify`. The number spellings
read are listed in :mod:`cdlib.answers`' docstring. Every regular expression is free
of nested quantifiers and sees bounded text (:data:`BOXED_CHARS`, :data:`MAX_DIGITS`).
"""

from __future__ import annotations

import re
from decimal import Decimal, localcontext
from fractions import Fraction
from functools import lru_cache

from cdlib.prompts import LETTERS

#: Longest boxed content considered.
BOXED_CHARS = 2000
#: Letters allowed when no choices are given (A-J covers MMLU-Pro's ten options). With
#: choices, the first len(choices) of :data:`cdlib.prompts.LETTERS` (A..Z, the one
#: index <-> letter mapping of prompts, gold answers and extraction; TruthfulQA has 13).
DEFAULT_LETTERS = LETTERS[:10]
#: Digits of a number literal; longer runs are ignored (no giant int conversions).
MAX_DIGITS = 60

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
MATHY_RE = re.compile(r"\\[A-Za-z]|\^|\bsqrt\b|\bpi\b")
#: Words that negate the option right after them ("not A", "non A", "不是 A"); see cdlib.answers' docstring.
_NEGATIONS = (
    "not", "n't", "rather than", "instead of", "nor", "neither", "except", "excluding", "never",
    "non", "pas", "plutôt que", "no es", "nicht", "kein", "不是", "而不是", "并非", "非",
)


class Context:
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
            self._options = normalised_options(self._choices) if self._choices else []
        return self._options

    def from_phrase(self, phrase: str, boxed: bool = False) -> str | None:
        """The value a marker (boxed, ####, answer is, ...) points at, or None."""
        if self.answer_type == "numeric":
            return numeric_from_phrase(phrase, boxed)
        if self.answer_type == "letter":
            return letter_from_phrase(phrase, self, boxed)
        if self.answer_type == "boolean":
            return bool_from_phrase(phrase)
        return latex_from_phrase(phrase, boxed)


def _clean(phrase: str) -> str:
    """Strip markdown emphasis and LaTeX wrappers that carry no value."""
    s = ascii_minus(phrase[:BOXED_CHARS])
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


def ascii_minus(text: str) -> str:
    """``text`` with the Unicode minus sign (U+2212) as ``-``."""
    return text.replace("\u2212", "-") if "\u2212" in text else text


def _negated(text: str, start: int) -> bool:
    """Whether the words just before ``start`` negate the candidate ("not A but C")."""
    before = text[max(0, start - 16):start].lower().rstrip(" \t*(:,")
    return before.endswith(_NEGATIONS)


_SENTENCE_STOP_RE = re.compile(r"[.!?。！？]\s")


def numeric_from_phrase(phrase: str, boxed: bool) -> str | None:
    """The number a marker's phrase states, canonical (:func:`_canonical`), or None; after a
    non-boxed marker only its own sentence counts, and ``x = 5`` gives the right of the last ``=``."""
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
    if boxed and MATHY_RE.search(s):
        latex = s.strip().strip("$").strip()
        return latex or None  # e.g. 2\sqrt{3}: left to verify()/math-verify
    for match in _NUM_RE.finditer(s):
        if _negated(s, match.start()):
            continue
        value = _number_from_match(match)
        if value is not None:
            return _canonical(value)
    return None


def last_number(text: str) -> str | None:
    """Fallback: the last number in ``text``, canonical (the exact value before an ``\\approx``)."""
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


def _letter_candidates(text: str, ctx: Context):
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


def letter_from_phrase(phrase: str, ctx: Context, boxed: bool) -> str | None:
    """The option letter a marker's phrase names, else the option whose text it quotes, or None."""
    s = _clean(phrase)
    for match, letter in _letter_candidates(s, ctx):
        if boxed and s[:match.start()].strip(" \t$:{}[]"):
            break  # boxed math such as "\Delta E" is not a letter answer
        return letter
    return match_option(s, ctx.options)


def letter_in_text(text: str, ctx: Context) -> str | None:
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
def normalised_options(choices: tuple[str, ...]) -> list[tuple[str, str]]:
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


def match_option(text: str, options: list[tuple[str, str]]) -> str | None:
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


def bool_from_phrase(phrase: str) -> str | None:
    """``"yes"``/``"no"`` from the first yes/no/true/false of a marker's phrase, or None."""
    match = _BOOL_RE.search(_clean(phrase))
    return _as_bool_word(match.group(1)) if match else None


def bool_in_text(text: str) -> str | None:
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


def latex_from_phrase(phrase: str, boxed: bool = False) -> str | None:
    """Boxed content as is; after other markers the math env, else the math-looking clause."""
    s = phrase.strip()
    if boxed:
        return s or None
    inner = last_math_env(s)
    if inner is not None:
        return inner
    s = s.replace("**", "")
    end = _SENTENCE_END_RE.search(s)
    s = (s[:end.start()] if end else s).strip().rstrip(".").strip()
    return s if s and looks_like_math(s) else None


def looks_like_math(text: str) -> bool:
    """No prose words once LaTeX commands and \\text{} are removed ("x^2+1" yes, "Step 1" no)."""
    bare = _LATEX_COMMAND_RE.sub(" ", _TEXT_WRAP_RE.sub(" ", text))
    return _PROSE_WORD_RE.search(bare) is None and any(not ch.isspace() for ch in bare)


def last_math_env(text: str) -> str | None:
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


def as_fraction(text: str) -> Fraction | None:
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


def letter_key(text: str) -> str:
    """A letter answer as one upper-case letter (``"(c)."`` -> ``"C"``), or ``""`` if it is not one."""
    if len(text) == 1:
        return text.upper() if text.isalpha() else ""
    s = _clean(text).strip().strip("()[]{}.:*$ ").strip()
    return s.upper() if len(s) == 1 and s.isalpha() else ""


def as_bool(text: str) -> bool | None:
    """A yes/no/true/false answer as a bool, or None."""
    word = text.strip().strip(".!*$ ").lower()
    if word in ("yes", "true"):
        return True
    if word in ("no", "false"):
        return False
    return None
