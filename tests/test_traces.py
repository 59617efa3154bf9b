"""Response parsing: <think>, gpt-oss harmony (token and decoded forms), plain text."""

from __future__ import annotations

import dataclasses
import time

import pytest

from cdlib.traces import ParsedResponse, format_think, parse_response, strip_reasoning

HARMONY_RAW = (
    "<|channel|>analysis<|message|>We need 6*7 = 42.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>The answer is 42.<|return|>"
)


@pytest.mark.parametrize(
    "text, reasoning, answer, fmt, truncated",
    [
        ("<think>\nplan\n</think>\n\nThe answer is 4.", "plan", "The answer is 4.", "think", False),
        ("<think></think>42", "", "42", "think", False),
        ("<think>\n\n</think>\n\nB", "", "B", "think", False),
        # Template pre-filled <think>: the response starts inside the block.
        ("plan it\n</think>\nAnswer: 7", "plan it", "Answer: 7", "think", False),
        # Text before <think> is not reasoning.
        ("Sure. <think>x</think>y", "x", "y", "think", False),
        # Reasoning that mentions </think> earlier: the last close tag ends it.
        ("<think>a </think> b </think> final", "a </think> b", "final", "think", False),
        # Unclosed: the token cap hit inside the reasoning.
        ("<think>\nso the answer is 42 and", "so the answer is 42 and", "", "think", True),
        (HARMONY_RAW, "We need 6*7 = 42.", "The answer is 42.", "harmony", False),
        # Harmony without <|start|> / <|return|> (vLLM strips the stop token).
        (
            "<|channel|>analysis<|message|>think<|end|><|channel|>final<|message|>B",
            "think", "B", "harmony", False,
        ),
        # Analysis + commentary (tool call header) + final.
        (
            "<|channel|>analysis<|message|>a<|end|><|start|>assistant<|channel|>commentary to=functions.calc "
            "<|constrain|>json<|message|>{\"x\":1}<|call|><|start|>assistant<|channel|>final<|message|>C<|return|>",
            "a\n{\"x\":1}", "C", "harmony", False,
        ),
        # Analysis never ended: truncated.
        ("<|channel|>analysis<|message|>We need to compute 12 + 30 = 42 so", "We need to compute 12 + 30 = 42 so",
         "", "harmony", True),
        # Analysis ended but no final message: not truncated, no answer.
        ("<|channel|>analysis<|message|>done<|end|>", "done", "", "harmony", False),
        # Decoded with special tokens skipped.
        ("analysisWe need 6*7.assistantfinalThe answer is 42.", "We need 6*7.", "The answer is 42.", "harmony", False),
        ("analysisFirst.assistantcommentaryTool.assistantfinal**C**", "First.\nTool.", "**C**", "harmony", False),
        ("analysisWe need to think about 42 and", "We need to think about 42 and", "", "harmony", True),
        # Plain text, including text that starts with the word "analysis".
        ("The answer is 42.", "", "The answer is 42.", "plain", False),
        ("analysis of the data shows 5", "", "analysis of the data shows 5", "plain", False),
        ("Analysis: it is 5", "", "Analysis: it is 5", "plain", False),
        ("", "", "", "plain", False),
    ],
)
def test_parse_response(text, reasoning, answer, fmt, truncated):
    parsed = parse_response(text)
    assert parsed == ParsedResponse(reasoning, answer, fmt, truncated)


def test_prefilled_think_without_close_is_truncated():
    parsed = parse_response("We compute 40 + 2 = 42 and then", think_prefilled=True)
    assert parsed.truncated and parsed.answer == "" and parsed.format == "think"
    assert parse_response("We compute 40 + 2 = 42 and then").truncated is False


def test_prefilled_think_with_close_is_normal():
    parsed = parse_response("reasoning\n</think>\n\nC", think_prefilled=True)
    assert (parsed.reasoning, parsed.answer, parsed.truncated) == ("reasoning", "C", False)


def test_parsed_response_is_frozen():
    parsed = parse_response("<think>a</think>b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.answer = "x"  # type: ignore[misc]


def test_format_think_exact_and_roundtrip():
    text = format_think("step 1\nstep 2", "The answer is 7.")
    assert text == "<think>\nstep 1\nstep 2\n</think>\n\nThe answer is 7."
    parsed = parse_response(text)
    assert (parsed.reasoning, parsed.answer, parsed.format) == ("step 1\nstep 2", "The answer is 7.", "think")


def test_format_think_keeps_arguments_verbatim():
    assert format_think(" t ", " a") == "<think>\n t \n</think>\n\n a"


def test_strip_reasoning():
    assert strip_reasoning(HARMONY_RAW) == "The answer is 42."
    assert strip_reasoning("<think>unfinished 42") == ""


@pytest.mark.parametrize(
    "hostile",
    [
        "<think>" * 200_000,
        "</think>" * 150_000,
        "<|channel|>analysis<|message|>" * 40_000,
        "<|channel|>" * 100_000 + "<|message|>",
        "analysisX" + "assistantcommentary" * 60_000,
    ],
)
def test_parse_is_linear_on_1mb(hostile):
    start = time.perf_counter()
    parse_response(hostile)
    assert time.perf_counter() - start < 2.0
