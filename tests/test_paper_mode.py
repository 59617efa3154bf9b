"""Paper mode: params/paper.yaml follows the paper's protocol; deviations are named options."""

import math

import polars as pl
import pytest

from cdlib.chat_templates import load_template
from cdlib import compress, evaluate, paper, truncate
from cdlib.training import data as train_data
from cdlib.datasets import REGISTRY
from cdlib.grid import Grid
from cdlib.params import CompressParams, TruncateParams
from cdlib.store import Store

TRACES = [  # toy stand-ins for a teacher's verified traces; q3's compression loses the answer (flagged)
    {"id": "q1", "reasoning": "Ann has 3 pens. She buys 2 more. 3 + 2 = 5. So the answer is 5."},
    {"id": "q2", "reasoning": "Ben has 4 coins. Wait, let me check. He gives 1 away. 4 - 1 = 3. So the answer is 3."},
    {"id": "q3", "reasoning": "Hmm."},
]
GOLD = {"q1": "5", "q2": "3", "q3": "7"}


def _write_traces(path):
    Store(path / "traces.jsonl").append(
        [{**t, "dataset": "toy", "domain": "toy", "group": "Math", "split": "train", "question": f"Question {t['id']}?",
          "gold": GOLD[t["id"]], "answer_type": "numeric", "answer": f"The answer is \\boxed{{{GOLD[t['id']]}}}.",
          "extracted": GOLD[t["id"]], "choices": None} for t in TRACES])


def _source_ids(tmp_path, compress_params, truncate_params):
    """Question ids each source of a Qwen-teacher cell set trains on, with paper.yaml's stage params."""
    gen, comp, trunc = tmp_path / "generate", tmp_path / "compress", tmp_path / "truncate"
    _write_traces(gen)
    keep = ("check_answer", "recompress_attempts", "drop_flagged")
    compress.run(CompressParams(out_dir=str(comp), traces=str(gen), compressor="extractive",
                                **{k: compress_params[k] for k in keep}))
    truncate.run(TruncateParams(out_dir=str(trunc), traces=str(gen), compressed=str(comp), tokenizer="whitespace",
                                mode="length_matched", drop_flagged=truncate_params["drop_flagged"]))
    data = {"raw": gen, "answer_only": gen, "extractive": comp, "truncated": trunc}
    return {s: {r["id"] for r in train_data.load_records(d, s)[0]} for s, d in data.items()}


def test_every_source_of_the_paper_grid_trains_on_the_same_question_ids(tmp_path):
    g = Grid("params/paper.yaml")
    comp = {c.params["drop_flagged"] for c in g.select("compress")}
    assert comp == {False} and {c.params["recompress_attempts"] for c in g.select("compress")} == {0}
    (cut,) = g.select("truncate")
    ids = _source_ids(tmp_path / "paper", g.select("compress")[0].params, cut.params)
    assert all(v == {"q1", "q2", "q3"} for v in ids.values()), ids
    flags = compress.table5(tmp_path / "paper" / "compress").filter(pl.col("dataset") == "overall").row(0, named=True)
    assert (flags["flagged"], flags["dropped"]) == (1, 0) and flags["flag_rate"] == pytest.approx(1 / 3)
    # the ablation (drop_flagged) is what makes the sets differ
    ablation = _source_ids(tmp_path / "drop", {"check_answer": True, "recompress_attempts": 0, "drop_flagged": True},
                           {"drop_flagged": True})
    assert ablation["extractive"] == ablation["truncated"] == {"q1", "q2"} != ablation["raw"]


def test_paper_grouping_reproduces_the_n_that_table7_plus_minus_implies():
    """± = 1.96 sqrt(p(1-p)/n) with n from Table 1's eval sizes under cdlib.evaluate.PAPER_GROUPS."""
    sizes: dict[str, int] = {}
    for ds, group in evaluate.PAPER_GROUPS.items():
        if group != evaluate.OVERALL_ONLY:
            sizes[group] = sizes.get(group, 0) + REGISTRY[ds].table1_eval
    assert sizes["Science"] == 1172 and sizes["Medicine"] == 5581
    names = {"Math": "math", "Science": "science", "Medicine": "medicine", "Common-sense": "commonsense",
             "OOD-Reasoning": "ood_reasoning", "OOD-Knowledge": "ood_knowledge"}
    t7 = paper.runs()
    hits = total = 0
    for group, col in names.items():
        rows = t7.filter(pl.col("group") == col)
        for p, ci in zip(rows["accuracy"], rows["ci95"]):
            total += 1
            hits += abs(round(1.96 * math.sqrt(p * (1 - p) / sizes[group]), 3) - ci) <= 0.0011
    assert hits / total >= 0.95, (hits, total)


def test_reconstructed_prompt_and_prompt_files(tmp_path):
    assert compress.prompt_template("reconstructed") is compress.RECONSTRUCTED_PROMPT
    with pytest.raises(ValueError, match="renamed 'reconstructed'"):
        compress.prompt_template("paper")
    f = tmp_path / "p.txt"
    f.write_text("Shorten.\n{question}\n{reasoning}\n{answer}")
    assert compress.prompt_template(str(f)).startswith("Shorten.")
    f.write_text("Shorten {reasoning}")
    with pytest.raises(ValueError, match="p.txt has fields"):
        compress.prompt_template(str(f))


@pytest.mark.parametrize("name,kwargs", [("qwen_think", {}), ("qwen3_5", {"enable_thinking": False}), ("llama3", {}),
                                         ("harmony", {}), (None, {})])
def test_answer_only_trains_on_the_answer_after_the_prompt_evaluation_renders(name, kwargs):
    """No think block in the trained completion, and the prompt is the generation prompt evaluation sends."""
    from test_sft import make_tokenizer

    from cdlib.training import sft

    tok = make_tokenizer(load_template(name) if name else None)
    rec = {"id": "q1", "prompt": "What is 2+3?", "answer": "The answer is \\boxed{5}."}
    texts = sft.format_texts(rec, tok, source="answer_only", answer_only_think="none", chat_template_kwargs=kwargs)
    assert rec["answer"] in texts["completion"] and "think" not in texts["completion"]  # harmony: final channel
    assert "analysis" not in texts["completion"] and texts["cot_close"] is None
    if name:
        assert texts["prompt"] == tok.apply_chat_template([{"role": "user", "content": rec["prompt"]}], tokenize=False,
                                                          add_generation_prompt=True, **kwargs)
    ex = sft.build_example(rec, tok, source="answer_only", answer_only_think="none", chat_template_kwargs=kwargs)
    sft.audit([ex], tok)


def test_paper_mode_trains_and_evaluates_qwen_answer_only_with_the_template_of_every_run(tmp_path):
    """H.3: answer-only differs only in its data; section 4: evaluated with the training template. Qwen3.5's
    generation prompt opens <think>: the answer-only completion closes it, empty, then answers."""
    import yaml

    from test_sft import make_tokenizer

    from cdlib.training import sft

    g = Grid("params/paper.yaml")
    cells = [c for c in g.cells if c.stage in ("train", "evaluate") and c.axes.get("source") == "answer_only"]
    assert cells and all("enable_thinking" not in str(c.params) for c in cells)
    tok = make_tokenizer(load_template("qwen3_5"))
    rec = {"id": "q1", "prompt": "What is 2+3?", "answer": "The answer is \\boxed{5}."}
    texts = sft.format_texts(rec, tok, source="answer_only", answer_only_think="none")
    assert texts["prompt"] == tok.apply_chat_template([{"role": "user", "content": rec["prompt"]}], tokenize=False,
                                                      add_generation_prompt=True)  # what evaluation sends
    assert texts["prompt"].endswith("<think>\n") and texts["completion"].startswith("\n</think>\n\n" + rec["answer"])
    sft.audit([sft.build_example(rec, tok, source="answer_only", answer_only_think="none")], tok)
    # the non-thinking template: a named option, off; applied, it reaches training and evaluation alike
    spec = yaml.safe_load(open("params/paper.yaml"))
    option = spec["x-non-thinking-answer-only"]
    spec["stages"]["train"]["overrides"].append(option["train"])
    spec["stages"]["evaluate"].setdefault("overrides", []).append(option["evaluate"])
    path = tmp_path / "paper_non_thinking.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    on = [c for c in Grid(path).cells if c.stage in ("train", "evaluate") and c.axes.get("source") == "answer_only"
          and c.axes["student"].startswith("qwen")]
    kwargs = [c.params.get("chat_template_kwargs") or c.params["engine"].get("chat_template_kwargs") for c in on]
    assert len(on) == 8 and all(k == {"enable_thinking": False} for k in kwargs), kwargs  # 2 students x 2 methods


def test_judge_scope_is_table10s(tmp_path):
    """Qwen teacher only, MMLU groups left out; the rest is an option."""
    from cdlib import judge
    from cdlib.params import JudgeParams

    g = Grid("params/paper.yaml")
    assert [c.id for c in g.select("judge")] == ["judge/qwen3.5-397b__llama70b", "judge/qwen3.5-397b__ministral14b"]
    comp = tmp_path / "compress"
    Store(comp / "compressed.jsonl").append(
        [{"id": f"{d}-0", "dataset": d, "reasoning": "1 + 1 = 2.", "original_reasoning": "1 + 1 = 2.", "gold": "2",
          "answer_type": "numeric", "question": "1+1?", "answer": "2", "flag": None} for d in ("gsm8k", "mmlu_stem")])
    P = JudgeParams(out_dir=str(tmp_path / "judge"), compressed=str(comp), judge="rule",
                    exclude_datasets=g.select("judge")[0].params["exclude_datasets"])
    judge.run(P)
    assert [r["dataset"] for r in Store(tmp_path / "judge" / "judgements.jsonl").read()] == ["gsm8k"]


def test_rounds_are_what_h4_table1_and_table4_allow():
    """H.4's 345,383 requests over Table 1's 310,932 questions with Table 4's 283,335 kept: only K = 2 fits."""
    r = paper.teacher_rounds()
    assert (r["questions"], r["requests"], r["kept"]) == (310_932, 345_383, 283_335)
    assert r["never_answered"] == 27_597 and r["resamples"] == 34_451
    assert (r["rounds"] - 1) * r["never_answered"] <= r["resamples"] < r["rounds"] * r["never_answered"]
    assert r["questions"] == sum(REGISTRY[d].table1_train for d in Grid("params/paper.yaml").select("generate")[0]
                                 .params["datasets"])  # the grid generates over exactly Table 1's pool
    from cdlib import cost

    assert {c.params["rounds"] for c in Grid("params/paper.yaml").select("generate")} == {r["rounds"]}
    assert cost.grid_rounds() == r["rounds"]
    # the model's requests of a teacher follow the rounds: H.4's count for the Qwen teacher, a bound otherwise
    assert cost.teacher_requests("Qwen3.5-397B-A17B", r["rounds"]) == r["requests"]
    assert cost.teacher_requests("gpt-oss-120B", 2) == 310_932 + (310_932 - 281_911)


# settings the paper does not state, as issue review found them: (line of params/paper.yaml, docs row)
UNSTATED = [("sampling: {temperature: 0.6, top_p: 0.95, max_tokens: 16000}", "`sampling` of the Qwen teacher"),
            ("sampling: {temperature: 1.0, top_p: 1.0, max_tokens: 16000}", "`sampling` of the gpt-oss teacher"),
            ("sampling: {temperature: 0.3, max_tokens: 8192}", "compress: `sampling.max_tokens`"),
            ("sampling: {temperature: 0.0, max_tokens: 4096}", "judge: `sampling`"),
            ("engine: {kind: vllm, max_model_len: 16384, gpu_memory_utilization: 0.9", "evaluate: engine"),
            ("chunk_size: 4096", "generate: `chunk_size`"), ("max_grad_norm: 1.0", "`max_grad_norm`"),
            ("weight_decay: 0.0", "`weight_decay`"), ("save: adapter", "train: `save`"),
            ("check_answer: true", "`check_answer`")]


def test_every_setting_the_paper_does_not_state_is_labelled_ours_and_listed():
    lines = open("params/paper.yaml").read().splitlines()
    doc = open("README.md").read()  # its paper-mode table: setting, our value, why
    for key, row in UNSTATED:
        (i,) = [n for n, line in enumerate(lines) if key in line]
        assert any("ours:" in line for line in lines[max(0, i - 3): i + 1]), f"params/paper.yaml: {key!r} not labelled"
        assert row in doc, row
    # prompts in our wording are named reconstructions, like the compression prompt
    for prompt in ("question prompts (`cdlib/prompts.py`)", "judge: prompt (`cdlib/judge.py`)", "compress: `prompt`"):
        line = next(r for r in doc.splitlines() if prompt in r)
        assert "**reconstruction**" in line, line
    text = "\n".join(lines)
    assert "question prompts (cdlib/prompts.py) are a reconstruction" in text
    assert "judge prompt (cdlib/judge.py) is a reconstruction" in text
