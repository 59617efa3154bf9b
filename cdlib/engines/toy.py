"""The toy engine (``kind: toy``): the toy world's scripted teacher (:mod:`cdlib.toy`), deterministic per
question row and round, counting whitespace words as tokens.
"""

from __future__ import annotations

import random
import re

from cdlib.engines.base import Engine, is_chat, make_completion
from cdlib.params import EngineParams, ToyParams
from cdlib.toy import base_response, teacher_response


class ToyEngine(Engine):
    """The toy world's scripted teacher: :func:`cdlib.toy.teacher_response` on each question row.

    ``model: toy-base`` writes the base model's pretraining text instead
    (:func:`cdlib.toy.base_response`: facts drilled, longer problems worked).

    Deterministic: the random generator of a row is seeded by
    ``(sampling.seed, row id, row["attempt"])``, so the generate stage gets a
    fresh draw per rejection-sampling round by setting ``attempt`` (default 0)
    in the rows it passes. Tokens are whitespace-separated words;
    ``max_tokens`` cuts the text after that many words (``finish_reason
    "length"``). Prompts only count toward ``prompt_tokens``.
    """

    def __init__(self, params: EngineParams, toy: ToyParams):
        super().__init__(params)
        self.toy = toy

    def generate(self, prompts, sampling, json_schema=None, rows=None):
        prompts = list(prompts)
        if json_schema is not None:
            raise ValueError("engine kind 'toy' has no structured JSON output (use the rule judge in the toy world)")
        if rows is None or len(rows) != len(prompts):
            raise ValueError(
                f"engine kind 'toy' needs rows= with one question row per prompt "
                f"(got {len(prompts)} prompts, {None if rows is None else len(rows)} rows)"
            )
        chat = is_chat(prompts)
        seed = 0 if sampling.seed is None else sampling.seed
        result = []
        for prompt, row in zip(prompts, rows):
            if "id" not in row:
                raise ValueError(f"toy engine: question row without 'id': {row!r:.200}")
            prompt_text = " ".join(m["content"] for m in prompt) if chat else prompt
            rng = random.Random(f"{seed}/{row['id']}/{row.get('attempt', 0)}")
            if self.params.model == "toy-base":
                text = base_response(row, self.toy.work_in_words)
            else:
                text = teacher_response(row, rng, sampling.temperature, self.toy.slip_rate,
                                        work_in_words=self.toy.work_in_words)
            text, n_tokens, finish = _cut_words(text, sampling.max_tokens)
            for s in sampling.stop:
                if s in text:
                    text, finish = text[: text.index(s)], "stop"
                    n_tokens = len(text.split())
            result.append(make_completion(text, len(prompt_text.split()), n_tokens, finish))
        return result


def _cut_words(text: str, max_tokens: int) -> tuple[str, int, str]:
    """Keep the first ``max_tokens`` whitespace-separated words of ``text`` (spacing preserved)."""
    words = list(re.finditer(r"\S+", text))
    if len(words) <= max_tokens:
        return text, len(words), "stop"
    return text[: words[max_tokens - 1].end()], max_tokens, "length"
