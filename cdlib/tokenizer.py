"""Tokenizers for counting and cutting traces: any HF tokenizer, or whitespace words for the toy world.

Compression ratios in tokens (Table 5) and the length-matched truncation ablation
(paper 3.3: the raw trace is tokenized with the *compressor's* tokenizer) need a
tokenizer that may differ from the student's. ``load("whitespace")`` (alias
``"toy"``) splits on whitespace, which is what the toy engine counts;
anything else is a HF hub id or local directory given to ``AutoTokenizer``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Protocol

_WORD = re.compile(r"\S+")


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list: ...
    def decode(self, ids: list) -> str: ...


def decode_prefix(tok: object, ids: list) -> str:
    """The text of the first tokens of a text (``tok.decode(ids)``), without the replacement character that a
    cut inside a multi-byte character leaves at its end: byte-level BPE tokenizers split rarer characters
    (CJK, math symbols such as the multiplication or square-root sign) into byte tokens, and a prefix ending
    between them decodes to U+FFFD, which training would then learn."""
    return tok.decode(ids).rstrip("\ufffd")


class WhitespaceTokenizer:
    """Words separated by whitespace; ``decode`` joins them with single spaces."""

    name = "whitespace"

    def encode(self, text: str) -> list[str]:
        return _WORD.findall(text)

    def decode(self, ids: list[str]) -> str:
        return " ".join(ids)


class HFTokenizer:
    """A transformers tokenizer without special tokens, so counts are of the text alone."""

    def __init__(self, name: str):
        from transformers import AutoTokenizer

        self.name = name
        self.tok = AutoTokenizer.from_pretrained(name)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@lru_cache(maxsize=8)
def load(name: str | None) -> WhitespaceTokenizer | HFTokenizer:
    """The tokenizer called ``name``: "whitespace"/"toy"/None, or a HF hub id / local path."""
    if name in (None, "", "whitespace", "toy"):
        return WhitespaceTokenizer()
    from cdlib.tiny import resolve

    return HFTokenizer(resolve(name))


def count(texts: list[str], name: str | None) -> list[int]:
    """Token counts of ``texts`` under tokenizer ``name`` (batched for HF tokenizers)."""
    tok = load(name)
    if isinstance(tok, HFTokenizer) and texts:
        return [len(ids) for ids in tok.tok(list(texts), add_special_tokens=False)["input_ids"]]
    return [len(tok.encode(t)) for t in texts]
