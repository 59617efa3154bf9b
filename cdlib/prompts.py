"""The user turn that the teacher and the student see for a question row.

One place builds it, so generation (teacher traces), training (the student's
chat) and evaluation all show a model exactly the same text for a row:

- the question (for datasets whose original layout has extra context, such as
  BoolQ's passage, ``cdlib.datasets`` has already folded it into ``question``);
- for multiple choice, the options lettered ``A.``, ``B.``, ... (up to ``Z.``);
- one instruction per answer type asking for the final answer inside
  ``\\boxed{}``, the first rule of the extraction cascade (paper section 3.1).

Rows follow the schema of ``cdlib.datasets`` (``id``, ``question``,
``choices``, ``answer_type``, ...).
"""

from __future__ import annotations

from typing import Any

#: Option letters, in order: A for the first option, Z for the 26th. Real datasets
#: carry up to 13 options (TruthfulQA's mc1 targets); more than 26 is an error.
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# The final-answer format asked for per answer type. Every instruction asks for
# \boxed{...}; the letter and boolean ones also say what goes inside it.
INSTRUCTIONS: dict[str, str] = {
    "numeric": "Please reason step by step, and put your final answer within \\boxed{}.",
    "latex": "Please reason step by step, and put your final answer within \\boxed{}.",
    "letter": (
        "Please reason step by step, and put the letter of the correct option "
        "as your final answer within \\boxed{}, for example \\boxed{A}."
    ),
    "boolean": (
        "Please reason step by step, and put your final answer, yes or no, "
        "within \\boxed{}, for example \\boxed{yes}."
    ),
}


class PromptError(ValueError):
    """A row cannot be turned into a prompt; the message names the row id."""


def letter(index: int) -> str:
    """The letter of the option at 0-based ``index``: 0 -> "A", 12 -> "M", 25 -> "Z".

    The one mapping from option positions to letters (prompts, gold answers, extraction).
    """
    if not 0 <= index < len(LETTERS):
        raise PromptError(f"option {index + 1}: letters A..Z label at most {len(LETTERS)} options")
    return LETTERS[index]


def letter_index(value: str) -> int:
    """The 0-based option position of a letter ("A" -> 0, "m" -> 12), the inverse of :func:`letter`."""
    text = str(value).strip().upper()
    if len(text) != 1 or text not in LETTERS:
        raise PromptError(f"{value!r} is not an option letter A..Z")
    return LETTERS.index(text)


def format_choices(choices: list[str]) -> str:
    """Lettered options, one per line: ``A. first``, ``B. second``, ..., up to ``Z.``"""
    if len(choices) > len(LETTERS):
        raise PromptError(f"{len(choices)} options; letters A..Z label at most {len(LETTERS)}")
    return "\n".join(f"{letter(i)}. {str(text).strip()}" for i, text in enumerate(choices))


def build_prompt(row: dict[str, Any]) -> str:
    """The user-turn text for ``row``: question, lettered options if any, answer instruction."""
    row_id = row.get("id", "<no id>")
    answer_type = row.get("answer_type")
    if answer_type not in INSTRUCTIONS:
        raise PromptError(f"row {row_id!r}: unknown answer_type {answer_type!r}; known: {', '.join(INSTRUCTIONS)}")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise PromptError(f"row {row_id!r}: empty or missing question")
    choices = row.get("choices")
    parts = [question.strip()]
    if answer_type == "letter":
        if not choices:
            raise PromptError(f"row {row_id!r}: answer_type 'letter' needs choices")
        try:
            parts.append(format_choices(choices))
        except PromptError as e:
            raise PromptError(f"row {row_id!r}: {e}") from None
    elif choices:
        raise PromptError(f"row {row_id!r}: answer_type {answer_type!r} must not have choices")
    parts.append(INSTRUCTIONS[answer_type])
    return "\n\n".join(parts)


def build_messages(row: dict[str, Any], system: str | None = None) -> list[dict[str, str]]:
    """Chat messages for ``row``: an optional system turn, then the user turn of :func:`build_prompt`."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": build_prompt(row)})
    return messages
