"""SFT example building, chat formats, section masks, truncation and the mask audit (cdlib.training.sft)."""

from __future__ import annotations

import math
import re

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from cdlib.chat_templates import load_template
from cdlib.training import sft
from cdlib.params import TrainParams

SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>",
]
CORPUS = [
    "What is 3 plus 4? First add 3 and 4 to get 7. Check: 7 minus 4 is 3. The answer is 7.",
    "user assistant system analysis final reasoning helpful Cutting Knowledge Date December",
]

# A Qwen3-thinking-style template: the generation prompt pre-fills '<think>\n' AND the last
# assistant turn renders its reasoning (so the full render still starts with the prompt).
PREFILL_AND_RENDER = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + m.reasoning_content + '\\n</think>\\n\\n' + m.content"
    " + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}"
)

RECORD = {
    "id": "q1",
    "prompt": "What is 3 plus 4?",
    "reasoning": "First add 3 and 4 to get 7. Check: 7 minus 4 is 3.",
    "answer": "The answer is 7.",
}


def make_tokenizer(template: str | None) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer trained here, with the special tokens of every family."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token="<|begin_of_text|>", chat_template=template,
    )


@pytest.fixture(scope="module")
def toks() -> dict[str, PreTrainedTokenizerFast]:
    return {
        "qwen": make_tokenizer(load_template("qwen_think")),
        "qwen_prefill": make_tokenizer(load_template("qwen_think_prefill")),
        "qwen_prefill_render": make_tokenizer(PREFILL_AND_RENDER),
        "llama3": make_tokenizer(load_template("llama3")),
        "harmony": make_tokenizer(load_template("harmony")),
        "plain": make_tokenizer(None),
    }


def section(tok, ex, name: str) -> str:
    s, e = ex["spans"][name]
    return tok.decode(ex["input_ids"][s:e], skip_special_tokens=False)


def inference_prompt_ids(tok, question: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "name, fmt, cot, answer",
    [
        ("qwen", "qwen", f"<think>\n{RECORD['reasoning']}\n</think>", "\n\nThe answer is 7.<|im_end|>"),
        ("qwen_prefill", "qwen", f"{RECORD['reasoning']}\n</think>", "\n\nThe answer is 7.<|im_end|>"),
        ("qwen_prefill_render", "qwen", f"{RECORD['reasoning']}\n</think>", "\n\nThe answer is 7.<|im_end|>"),
        ("llama3", "llama3", f"<think>\n{RECORD['reasoning']}\n</think>", "\n\nThe answer is 7.<|eot_id|>"),
        (
            "harmony", "harmony", f"<|channel|>analysis<|message|>{RECORD['reasoning']}<|end|>",
            "<|start|>assistant<|channel|>final<|message|>The answer is 7.<|return|>",
        ),
    ],
)
def test_chat_formats_train_on_what_the_model_sees_at_inference(toks, name, fmt, cot, answer):
    tok = toks[name]
    ex = sft.build_example(RECORD, tok)
    assert ex["format"] == fmt
    p_start, p_end = ex["spans"]["prompt"]
    # the prompt tokens are exactly the generation prompt an engine feeds the model
    assert ex["input_ids"][p_start:p_end] == inference_prompt_ids(tok, RECORD["prompt"])
    assert section(tok, ex, "cot") == cot
    assert section(tok, ex, "answer") == answer
    # spans tile the sequence
    assert ex["spans"]["cot"][0] == p_end and ex["spans"]["answer"][1] == len(ex["input_ids"])
    # loss on assistant tokens only, end-of-turn included
    labels = ex["labels"]
    assert all(x == -100 for x in labels[:p_end])
    assert labels[p_end:] == ex["input_ids"][p_end:]
    eot = re.search(r"<\|[a-z_]+\|>$", answer).group()
    assert ex["input_ids"][-1] == ex["eot_id"] == tok.convert_tokens_to_ids(eot)


def test_prefilled_think_tag_is_not_duplicated(toks):
    for name in ("qwen_prefill", "qwen_prefill_render"):
        tok = toks[name]
        text = tok.decode(sft.build_example(RECORD, tok)["input_ids"], skip_special_tokens=False)
        assert text.count("<think>") == 1 and text.count("</think>") == 1, name


def test_llama3_keeps_think_tags_as_plain_text_and_bos_once(toks):
    tok = toks["llama3"]
    ex = sft.build_example(RECORD, tok)
    text = tok.decode(ex["input_ids"], skip_special_tokens=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system")
    assert text.count("<|begin_of_text|>") == 1
    assert "<|start_header_id|>assistant<|end_header_id|>\n\n<think>\n" in text


def test_plain_format_without_template(toks):
    tok = toks["plain"]
    ex = sft.build_example(RECORD, tok)
    assert ex["format"] == "plain"
    assert section(tok, ex, "prompt") == "<|begin_of_text|>User: What is 3 plus 4?\nAssistant: "
    assert section(tok, ex, "answer").endswith(tok.eos_token)


def test_explicit_format_overrides_detection(toks):
    # a ChatML template forced to the inline (llama3-style) path still renders the same text
    tok = toks["qwen"]
    auto = sft.build_example(RECORD, tok)
    inline = sft.build_example(RECORD, tok, chat_format="llama3")
    assert inline["format"] == "llama3"
    assert inline["input_ids"] == auto["input_ids"]


@pytest.mark.parametrize("name", ["qwen", "qwen_prefill", "llama3", "harmony", "plain"])
def test_answer_only_keeps_an_empty_closed_think_block(toks, name):
    tok = toks[name]
    ex = sft.build_example(RECORD, tok, source="answer_only")
    cot = section(tok, ex, "cot")
    assert RECORD["reasoning"] not in tok.decode(ex["input_ids"])
    assert cot.strip().endswith(ex["cot_close"])
    assert cot.replace("<think>", "").replace("</think>", "").replace("<|channel|>analysis<|message|>", "").replace(
        "<|end|>", ""
    ).strip() == ""
    assert "The answer is 7." in section(tok, ex, "answer")
    sft.audit([ex], tok)  # passes


def test_prompt_comes_from_build_prompt_when_absent(toks, monkeypatch):
    monkeypatch.setattr(sft, "build_prompt", lambda row: f"Q: {row['question']}")
    rec = {k: v for k, v in RECORD.items() if k != "prompt"} | {"question": "3 plus 4"}
    ex = sft.build_example(rec, toks["qwen"])
    assert "Q: 3 plus 4" in section(toks["qwen"], ex, "prompt")


def test_missing_fields_name_the_record(toks):
    with pytest.raises(sft.SFTError, match="'q9'.*answer"):
        sft.build_example({"id": "q9", "prompt": "x", "reasoning": "y"}, toks["qwen"])
    with pytest.raises(sft.SFTError, match="'q9'.*reasoning"):
        sft.build_example({"id": "q9", "prompt": "x", "answer": "y"}, toks["qwen"])
    # answer-only needs no trace
    sft.build_example({"id": "q9", "prompt": "x", "answer": "y"}, toks["qwen"], source="answer_only")


# --------------------------------------------------------------------------- masks and truncation


@pytest.mark.parametrize("loss_on", [["cot"], ["answer"], ["prompt", "cot", "answer"], ["cot", "answer"]])
def test_section_masks(toks, loss_on):
    ex = sft.build_example(RECORD, toks["qwen"], loss_on=loss_on)
    for name, (s, e) in ex["spans"].items():
        want = ex["input_ids"][s:e] if name in loss_on else [-100] * (e - s)
        if s == 0:  # the first token is never a target
            want = [-100] + want[1:]
        assert ex["labels"][s:e] == want, name
    counts = sft.section_tokens([ex])
    assert counts["supervised_cot"] == (counts["total_cot"] if "cot" in loss_on else 0)


def test_ratio_truncation_over_the_sequence(toks):
    tok = toks["qwen"]
    full = sft.build_example(RECORD, tok)
    n = len(full["input_ids"])
    # rounded down as Distilling the Essence's code cuts (int(len * x)); some of these ratios round differently up
    ratios = (0.3, 0.5, 0.7)
    assert any(int(r * n) != math.ceil(r * n) for r in ratios), n
    for r in ratios:
        assert len(sft.build_example(RECORD, tok, truncate_ratio=r)["input_ids"]) == int(r * n), r
    half = sft.build_example(RECORD, tok, truncate_ratio=0.5, truncate_span="sequence")
    assert half["input_ids"] == full["input_ids"][: len(half["input_ids"])]
    assert half["labels"] == full["labels"][: len(half["input_ids"])]
    assert half["cut"] == "ratio"
    assert max(e for _, e in half["spans"].values()) == len(half["input_ids"])
    sft.audit([half], tok)  # an intended cut: no end-of-turn / think checks


def test_reasoning_cut_never_trains_half_a_character():
    """Byte-level BPE splits rarer characters into byte tokens; a cut between them must not leave U+FFFD."""
    from transformers import AutoTokenizer

    from cdlib.tiny import resolve

    tok = AutoTokenizer.from_pretrained(resolve("tiny-qwen3.5"))
    trace = "首先 3 × 4 = 12，然后 12 ÷ 2 = 6，√36 = 6。答案是 6"
    ids = tok(trace, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode(ids[:k]) for k in range(1, len(ids))), "the trace splits characters"
    rec = {"id": "r", "prompt": "q", "reasoning": trace, "answer": "The answer is \\boxed{6}."}
    bad = [r / 50 for r in range(1, 50)
           if "\ufffd" in tok.decode(sft.build_example(rec, tok, truncate_ratio=r / 50,
                                                        truncate_span="reasoning")["input_ids"])]
    assert not bad, bad


def test_ratio_truncation_over_the_reasoning_only(toks):
    tok = toks["qwen"]
    full = sft.build_example(RECORD, tok)
    cut = sft.build_example(RECORD, tok, truncate_ratio=0.5, truncate_span="reasoning")
    trace_tokens = len(tok(RECORD["reasoning"], add_special_tokens=False)["input_ids"])
    kept = math.ceil(0.5 * trace_tokens)
    assert cut["cut"] is None
    assert section(tok, cut, "answer") == section(tok, full, "answer")
    cot = section(tok, cut, "cot")
    assert cot.startswith("<think>\n") and cot.endswith("\n</think>")
    kept_text = tok.decode(tok(RECORD["reasoning"], add_special_tokens=False)["input_ids"][:kept]).strip()
    assert cot == f"<think>\n{kept_text}\n</think>"
    assert len(cot) < len(section(tok, full, "cot"))
    sft.audit([cut], tok)


def test_overlong_policies(toks):
    tok = toks["qwen"]
    records = [RECORD, {**RECORD, "id": "long", "reasoning": RECORD["reasoning"] * 20}]
    short_len = len(sft.build_example(RECORD, tok)["input_ids"])
    long_len = len(sft.build_example(records[1], tok)["input_ids"])
    with pytest.raises(ValueError, match=f"'long'.*length {long_len}"):
        sft.build_examples(records, tok, max_len=short_len, overlong="error")
    kept, info = sft.build_examples(records, tok, max_len=short_len, overlong="drop")
    assert [e["id"] for e in kept] == ["q1"] and info["overlong_ids"] == ["long"]
    cut, info = sft.build_examples(records, tok, max_len=short_len, overlong="truncate")
    assert len(cut[1]["input_ids"]) == short_len and cut[1]["cut"] == "seq_len"
    with pytest.raises(sft.AuditError, match="cut by the sequence length.*'long'"):
        sft.audit(cut, tok)
    sft.audit(cut, tok, allow_cut=True)


def test_build_dataset_from_train_params(toks):
    params = TrainParams(out_dir="x", data="y", source="answer_only", loss_on=["answer"], seq_len=64, overlong="drop")
    examples, info = sft.build_dataset([RECORD], toks["qwen"], params)
    assert info["n_examples"] == 1
    assert info["tokens"]["supervised_cot"] == 0 and info["tokens"]["supervised_answer"] > 0


# --------------------------------------------------------------------------- audit


def test_audit_report_shows_the_supervised_spans(toks):
    tok = toks["qwen"]
    examples = [sft.build_example({**RECORD, "id": f"q{i}"}, tok) for i in range(5)]
    report = sft.audit(examples, tok, n_show=2)
    assert report.count("--- id") == 2
    assert f"⟦<think>\n{RECORD['reasoning']}\n</think>\n\nThe answer is 7.<|im_end|>⟧" in report
    assert "<|im_start|>user\nWhat is 3 plus 4?" in report.split("⟦")[0]


def test_audit_rejects_an_all_zero_mask(toks):
    ex = sft.build_example(RECORD, toks["qwen"])
    bad = {**ex, "id": "zero", "labels": [-100] * len(ex["labels"])}
    with pytest.raises(sft.AuditError, match=r"all-zero loss mask.*'zero'"):
        sft.audit([ex, bad], toks["qwen"])


def test_audit_rejects_an_unsupervised_end_of_turn(toks):
    ex = sft.build_example(RECORD, toks["llama3"])
    bad = {**ex, "id": "noeot", "labels": ex["labels"][:-1] + [-100]}
    with pytest.raises(sft.AuditError, match=r"end-of-turn token not supervised.*'noeot'"):
        sft.audit([bad], toks["llama3"])
    # a sequence that does not end with the end-of-turn token is caught too
    trimmed = {**ex, "id": "short", "input_ids": ex["input_ids"][:-1], "labels": ex["labels"][:-1]}
    with pytest.raises(sft.AuditError, match=r"'short'"):
        sft.audit([trimmed], toks["llama3"])


@pytest.mark.parametrize("name", ["qwen", "harmony"])
def test_audit_rejects_an_unclosed_think_block(toks, name):
    tok = toks[name]
    for source in ("raw", "answer_only"):
        ex = sft.build_example(RECORD, tok, source=source)
        close_id = tok.convert_tokens_to_ids(ex["cot_close"])
        ids = [tok.convert_tokens_to_ids("<|endoftext|>") if t == close_id else t for t in ex["input_ids"]]
        bad = {**ex, "id": f"open-{source}", "input_ids": ids}
        with pytest.raises(sft.AuditError, match=rf"think block not closed.*'open-{source}'"):
            sft.audit([bad], tok)


def test_audit_rejects_examples_longer_than_the_sequence(toks):
    ex = sft.build_example(RECORD, toks["qwen"])
    with pytest.raises(sft.AuditError, match=r"longer than the sequence length"):
        sft.audit([ex], toks["qwen"], max_len=len(ex["input_ids"]) - 1)
    sft.audit([ex], toks["qwen"], max_len=len(ex["input_ids"]))


# --------------------------------------------------------------------------- with the project's own pieces


def test_toy_rows_with_the_tiny_tokenizer_and_build_prompt():
    """Toy questions (cdlib.toy), user turn from cdlib.prompts, the tiny student's tokenizer (cdlib.tiny)."""
    import random

    from cdlib import prompts, tiny, toy
    from cdlib.params import ToyParams
    from cdlib.traces import parse_response

    rows = toy.generate(ToyParams(n_train=4, n_test=2), split="train")
    tok = tiny.train_tokenizer(tiny.default_corpus(50), vocab_size=400)
    records = []
    for row in rows:
        parsed = parse_response(toy.teacher_response(row, random.Random(0), temperature=0.0, slip_rate=0.0))
        records.append({**row, "reasoning": parsed.reasoning, "answer": parsed.answer})
    examples, info = sft.build_examples(records, tok, max_len=4096)
    report = sft.audit(examples, tok, n_show=1)
    assert info["n_examples"] == len(rows) and "⟦<think>" in report
    for row, ex in zip(records, examples):
        assert ex["format"] == "qwen"
        assert ex["input_ids"][: ex["spans"]["prompt"][1]] == inference_prompt_ids(tok, prompts.build_prompt(row))
        assert section(tok, ex, "cot") == f"<think>\n{row['reasoning'].strip()}\n</think>"
        assert section(tok, ex, "answer") == f"\n\n{row['answer'].strip()}<|im_end|>"
    # the template's enable_thinking=False pre-fills an empty think block: the prompt carries it then
    ex = sft.build_example(records[0], tok, source="answer_only", chat_template_kwargs={"enable_thinking": False})
    assert section(tok, ex, "prompt").endswith("<think>\n\n</think>\n\n")
    assert section(tok, ex, "cot") == "" and section(tok, ex, "answer") == f"{records[0]['answer'].strip()}<|im_end|>"
    sft.audit([ex], tok)
    with pytest.raises(sft.SFTError, match="already closes the think block"):
        sft.build_example(records[0], tok, chat_template_kwargs={"enable_thinking": False})
