"""The chat templates shipped with cdlib (``<name>.jinja`` beside this file): the paper's families' own
templates (``qwen3_5``, ``llama3``, ``harmony``, ``gpt_oss``) and the toy students' (``qwen_think``,
``qwen_think_prefill``), read by the tiny models' tokenizers (:mod:`cdlib.tiny`) and the tests of the
SFT chat formats (:mod:`cdlib.training.sft`).
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent

__all__ = ["TEMPLATE_DIR", "load_template"]


def load_template(name: str) -> str:
    """Text of a bundled chat template (``cdlib/chat_templates/<name>.jinja``), e.g. ``"qwen_think"``."""
    path = TEMPLATE_DIR / f"{name}.jinja"
    if not path.exists():
        known = sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))
        raise FileNotFoundError(f"no chat template {name!r} in {TEMPLATE_DIR}; known: {known}")
    return path.read_text()
