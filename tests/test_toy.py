"""cdlib.toy: the seeded arithmetic world and the scripted teacher."""

from __future__ import annotations

import random
import re

import pytest

from cdlib import toy
from cdlib.params import ToyParams

SMALL = ToyParams(n_train=300, n_test=100)


def final_answer(text: str) -> str:
    m = re.search(r"</think>\n\nThe answer is \\boxed\{(-?\d+)\}\.$", text)
    assert m, text[-80:]
    return m[1]


def trace_equations(text: str) -> list[str]:
    think = text.split("<think>\n", 1)[1].split("\n</think>", 1)[0]
    return [line for line in think.splitlines() if toy.is_equation_line(line)]


def test_world_sizes_schema_and_determinism():
    train, test = toy.generate(SMALL, "train"), toy.generate(SMALL, "test")
    assert len(train) == 300 and len(test) == 100
    assert train == toy.generate(SMALL, "train") and test == toy.generate(SMALL, "test")
    row = train[0]
    assert set(row) == {"id", "dataset", "domain", "group", "split", "question", "choices", "gold", "answer_type"}
    assert row["id"] == "toy/train/0" and test[0]["id"] == "toy/test/0"
    assert {r["split"] for r in train} == {"train"} and {r["split"] for r in test} == {"eval"}
    assert all(r["answer_type"] == "numeric" and r["choices"] is None and r["gold"].isdigit() for r in train + test)
    assert toy.generate(ToyParams(n_train=300, n_test=100, seed=1), "train") != train


def test_train_and_test_never_share_arithmetic():
    keys = lambda rows: {toy.parse_question(r["question"]).key for r in rows}  # noqa: E731
    train, test = keys(toy.generate(SMALL, "train")), keys(toy.generate(SMALL, "test"))
    assert len(train) == 300 and len(test) == 100 and not train & test


@pytest.mark.parametrize(
    "params",
    [
        ToyParams(n_train=200, n_test=50),
        ToyParams(n_train=200, n_test=50, min_steps=1, max_steps=4, max_start=20, max_operand=5, ops=["+", "-", "*"]),
    ],
)
def test_problems_respect_the_knobs_and_gold_is_the_arithmetic(params):
    for row in toy.generate(params, "train") + toy.generate(params, "test"):
        problem = toy.parse_question(row["question"], row["id"])
        assert 1 <= problem.start <= params.max_start
        assert params.min_steps <= len(problem.steps) <= params.max_steps
        for op, k in problem.steps:
            assert op in params.ops and 1 <= k <= params.max_operand
        assert min(problem.values()) >= 0  # subtraction never goes below zero
        assert row["gold"] == str(problem.answer)
    ops_seen = {op for r in toy.generate(params, "train") for op, _ in toy.parse_question(r["question"]).steps}
    assert ops_seen == set(params.ops)


def test_question_wording_is_a_small_vocabulary():
    words = {w for r in toy.generate(SMALL, "train") for w in re.findall(r"[A-Za-z]+", r["question"])}
    assert len(words) < 40, sorted(words)


def test_too_small_a_world_is_an_error():
    with pytest.raises(toy.ToyError, match=r"toy train split: found only \d+ of 500 distinct problems"):
        toy.generate(ToyParams(n_train=500, n_test=10, min_steps=1, max_steps=1, max_start=3, max_operand=3), "train")


def test_solution_steps_are_the_true_minimal_equations():
    row = {"id": "x", "question": "Tom has 5 apples. Tom gets 3 more apples. Then Tom gives away 2 apples. How many "
                                  "apples does Tom have now?"}
    assert toy.solution_steps(row) == ["Tom gets 3 more: 5 + 3 = 8", "Tom gives away 2: 8 - 2 = 6"]
    row = {"id": "y",
           "question": "Eva has 4 pens. Eva ends up with 3 times as many pens. How many pens does Eva have now?"}
    assert toy.solution_steps(row) == ["Eva ends up with 3 times as many: 4 * 3 = 12"]
    for r in toy.generate(SMALL, "test"):
        steps = toy.solution_steps(r)
        assert all(toy.is_equation_line(s) and toy.equation_is_correct(s) for s in steps)
        assert steps[-1].endswith(f"= {r['gold']}")
    with pytest.raises(toy.ToyError, match=r"row 'z': not a toy question"):
        toy.solution_steps({"id": "z", "question": "What is the capital of France?"})


def test_teacher_at_temperature_zero_is_greedy_and_correct():
    for row in toy.generate(SMALL, "test"):
        text = toy.teacher_response(row, random.Random(1), temperature=0.0, slip_rate=1.0)
        assert text == toy.teacher_response(row, random.Random(2), temperature=0.0, slip_rate=1.0)
        assert text.startswith("<think>\n") and final_answer(text) == row["gold"]
        # the load-bearing lines are exactly the true solution, in order
        assert trace_equations(text) == toy.solution_steps(row)


def test_teacher_works_first_then_overthinks():
    rows = toy.generate(SMALL, "test")
    texts = [toy.teacher_response(r, random.Random(i), 0.7, 0.0) for i, r in enumerate(rows)]
    joined = "\n".join(texts)
    assert "Let me double check" in joined and "Hmm," in joined and "Going backwards" in joined
    for text, row in zip(texts, rows):
        think = text.split("</think>")[0]
        lines = think.splitlines()
        assert len(think) > 3 * len("\n".join(toy.solution_steps(row)))  # mostly filler
        # re-checks and restatements never look like equation lines
        assert all(not toy.is_equation_line(x) for x in lines if "double check" in x or "backwards" in x)
        # the work (every step line, then the answer) comes before any re-check: a cut at half the
        # trace keeps all of it, as Distilling the Essence assumes of real traces
        last_step = max(i for i, x in enumerate(lines) if toy.is_equation_line(x))
        first_check = min(i for i, x in enumerate(lines) if "double check" in x)
        assert lines[last_step + 1].startswith("So the final number") and last_step + 1 < first_check
        assert len("\n".join(lines[: last_step + 2])) < 0.5 * len(think)


def test_teacher_is_deterministic_given_the_rng():
    row = toy.generate(SMALL, "test")[0]
    a = toy.teacher_response(row, random.Random(7), 1.0, 0.3)
    assert a == toy.teacher_response(row, random.Random(7), 1.0, 0.3)
    others = {toy.teacher_response(row, random.Random(s), 1.0, 0.3) for s in range(10)}
    assert len(others) > 1


def test_slips_grow_with_temperature_and_propagate():
    rows = toy.generate(ToyParams(n_train=10, n_test=400), "test")

    def wrong_rate(temperature: float) -> float:
        rng = random.Random(0)
        wrong = [final_answer(toy.teacher_response(r, rng, temperature, 0.2)) != r["gold"] for r in rows]
        return sum(wrong) / len(rows)

    rates = [wrong_rate(t) for t in (0.0, 0.5, 1.0, 2.0)]
    assert rates[0] == 0.0 and 0 < rates[1] < rates[2] < rates[3]
    # expected at T=1 with 2-3 steps and p=0.2 per step: about 1 - 0.8^2.5 = 0.43
    assert 0.3 < rates[2] < 0.55

    rng = random.Random(3)
    slipped = 0
    for row in rows:
        text = toy.teacher_response(row, rng, 1.0, 0.3)
        equations = trace_equations(text)
        wrong = [i for i, e in enumerate(equations) if not toy.equation_is_correct(e)]
        # each line starts from the previous line's result and the answer is the last result
        for prev, cur in zip(equations, equations[1:]):
            assert toy.EQUATION_RE.match(cur)[1] == toy.EQUATION_RE.match(prev)[4]
        assert final_answer(text) == equations[-1].split(" = ")[1]
        if wrong:
            slipped += 1
            assert final_answer(text) != row["gold"] or len(wrong) > 1  # a single slip always changes the answer
    assert slipped > 50


def test_pretrain_corpus_is_neither_train_nor_test_and_holds_every_fact():
    params = ToyParams(n_train=300, n_test=50, min_steps=2, max_steps=3, n_pretrain=700, pretrain_fact_repeats=2)
    rows = {split: toy.generate(params, split) for split in ("train", "test", "pretrain")}
    keys = {split: [toy.parse_question(r["question"]).key for r in rs] for split, rs in rows.items()}
    assert not set(keys["pretrain"]) & (set(keys["train"]) | set(keys["test"]))
    one_step = [k for k in keys["pretrain"] if len(k[1]) == 1]
    top = params.max_start + params.max_steps * params.max_operand
    # every fact an equation of a trace can need, twice: start 1..top, each operand, never below zero
    facts = {(a, ((op, k),)) for a in range(1, top + 1) for op in ("+", "-")
             for k in range(1, params.max_operand + 1) if op == "+" or k <= a}
    assert set(one_step) == facts and len(one_step) == 2 * len(facts)
    longer = keys["pretrain"][len(one_step):]
    assert len(longer) == len(set(longer)) == 700 and {len(k[1]) for k in longer} == {2}  # no three-step problem


@pytest.mark.parametrize("work_in_words", [False, True])
def test_base_response_is_a_worked_solution_without_slips(work_in_words):
    rows = toy.generate(ToyParams(n_train=20, n_test=5, n_pretrain=300), "pretrain")
    for row in rows:
        text = toy.base_response(row, work_in_words)
        assert text.startswith("<think>\n") and text.endswith(f"The answer is \\boxed{{{row['gold']}}}.")
        equations = [line.split(": ")[-1] for line in text.splitlines() if toy.is_equation_line(line)]
        assert equations == [s.split(": ")[-1] for s in toy.solution_steps(row)]  # every step, none slipped
        problem = toy.parse_question(row["question"])
        drill = len(problem.steps) == 1 and not (work_in_words and toy.crosses_ten(problem.start, *problem.steps[0]))
        assert (len(text.splitlines()) == 6) == drill, text  # a fact is drilled: its step line and the answer
        assert ("Let me think:" in text) == (work_in_words and any(
            toy.crosses_ten(a, op, k) for (op, k), a in zip(problem.steps, problem.values())))


def test_work_in_words_is_make_ten_and_compression_drops_it():
    from cdlib.compress import extractive

    row = {"id": "w", "question": "Tom has 8 apples. Tom gets 7 more apples. Then Tom gives away 6 apples. "
                                  "How many apples does Tom have now?"}
    text = toy.teacher_response(row, random.Random(0), 0.0, 0.0, work_in_words=True)
    # the choice to work in words comes right after the two numbers it depends on; the step's label is written once
    assert ("Tom gets 7 more: 8 + 7 crosses a ten.\nLet me think: 8 and 2 make 10, and 5 more make 15.\n"
            "8 + 7 = 15\n") in text
    assert ("Tom gives away 6: 15 - 6 crosses a ten.\nLet me think: 15 take away 5 leaves 10, and 1 more leaves 9.\n"
            "15 - 6 = 9\n") in text
    think = text.split("<think>\n")[1].split("\n</think>")[0]
    assert extractive(think, row["question"]).splitlines() == [
        "Tom gets 7 more: 8 + 7 crosses a ten.", "8 + 7 = 15", "Tom gives away 6: 15 - 6 crosses a ten.", "15 - 6 = 9",
        "So the final number of apples is 9."]
    assert "Let me think" not in toy.teacher_response(row, random.Random(0), 0.0, 0.0)


def test_the_toy_teachers_rewrite_keeps_the_students_way_of_working():
    from cdlib.compress import toy_rewrite

    row = {"id": "r", "question": "Mia has 9 pens. Mia finds 4 more pens. Mia loses 2 pens. "
                                  "How many pens does Mia have now?", "gold": "11"}
    plain = toy_rewrite({**row, "reasoning": "Mia gets 4 more: 9 + 4 = 12\nWait, let me double check."})
    assert plain == ("Mia starts with 9 pens.\nMia gets 4 more: 9 + 4 = 13\nMia gives away 2: 13 - 2 = 11\n"
                     "So the final number of pens is 11.")
    worked = toy_rewrite({**row, "reasoning": "Let me think: 9 and 1 make 10, and 3 more make 12.\nMia gets 4 more"})
    # every value right, the crossing of a ten worked in words as the student works it; no filler
    assert worked.splitlines() == ["Mia starts with 9 pens.", "Mia gets 4 more: 9 + 4 crosses a ten.",
                                   "Let me think: 9 and 1 make 10, and 3 more make 13.", "9 + 4 = 13",
                                   *plain.splitlines()[2:]]
    # a student that works in words (read off all its trajectories) gets the words also where this one skipped them
    assert toy_rewrite({**row, "reasoning": "Mia gets 4 more: 9 + 4 = 12"}, in_words=True) == worked


def test_the_toy_rewriter_works_every_crossing_in_words_for_a_student_that_works_in_words(tmp_path):
    """compress.run with the toy rewriter reads the student's way of working off all its samples: a sample that
    skipped the words on a crossing is rewritten with them (else MPD teaches the student to skip them)."""
    import json

    from cdlib import compress
    from cdlib.params import CompressParams

    def sample(i: int, question: str, reasoning: str) -> dict:
        return {"id": f"toy/train/{i}", "question": question, "gold": str(toy.parse_question(question).answer),
                "answer_type": "numeric", "reasoning": reasoning, "answer": "The answer is \\boxed{0}.",
                "extracted": "0", "correct": False}

    rows = [sample(0, "Mia has 9 pens. Mia finds 4 more pens. How many pens does Mia have now?",
                   "Let me think: 9 and 1 make 10, and 3 more make 13.\nMia gets 4 more: 9 + 4 = 13"),
            sample(1, "Tom has 8 apples. Tom gets 7 more apples. How many apples does Tom have now?",
                   "Tom gets 7 more: 8 + 7 = 14")]  # skipped the words on a crossing
    (tmp_path / "sample").mkdir()
    (tmp_path / "sample" / "traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    compress.run(CompressParams(out_dir=str(tmp_path / "rewrite"), traces=str(tmp_path / "sample"),
                                compressor="toy-rewriter", prompt="rewrite_student"))
    out = {json.loads(x)["id"]: json.loads(x) for x in (tmp_path / "rewrite/compressed.jsonl").read_text().splitlines()}
    assert out["toy/train/1"]["reasoning"].splitlines() == [
        "Tom starts with 8 apples.", "Tom gets 7 more: 8 + 7 crosses a ten.",
        "Let me think: 8 and 2 make 10, and 5 more make 15.", "8 + 7 = 15", "So the final number of apples is 15."]
    # a student that never works in words keeps its way: no words in any rewrite
    rows[0]["reasoning"] = "Mia gets 4 more: 9 + 4 = 13"
    (tmp_path / "sample" / "traces.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    compress.run(CompressParams(out_dir=str(tmp_path / "plain"), traces=str(tmp_path / "sample"),
                                compressor="toy-rewriter", prompt="rewrite_student"))
    assert "Let me think" not in (tmp_path / "plain/compressed.jsonl").read_text()
