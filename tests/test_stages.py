"""Stages 1-3 on the toy world: rejection sampling and resume, compression checks, truncation properties."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdlib import compress, generate, tokenizer, toy, truncate
from cdlib.engines import get_engine
from cdlib.params import CompressParams, EngineParams, GenerateParams, SamplingParams, ToyParams, TruncateParams
from cdlib.store import Store
from cdlib.traces import parse_response


class Counting:
    """Wraps an engine: records every question id asked; can crash after some calls."""

    def __init__(self, engine, crash_after=None):
        self.engine, self.crash_after, self.asked, self.calls = engine, crash_after, [], 0

    def generate(self, prompts, sampling, json_schema=None, rows=None):
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        self.asked += [r["id"] for r in rows]
        return self.engine.generate(prompts, sampling, json_schema=json_schema, rows=rows)


def gen_params(tmp_path, **kw):
    kw = {"rounds": 4, **kw}
    return GenerateParams(out_dir=str(tmp_path / "gen"), toy=ToyParams(n_train=120, n_test=20, slip_rate=0.5),
                          sampling=SamplingParams(temperature=1.0, max_tokens=2000, seed=0), **kw)


def test_rejection_sampling_keeps_only_correct_and_records_attempts(tmp_path):
    P = gen_params(tmp_path)
    eng = Counting(get_engine(EngineParams(kind="toy"), P.toy))
    m = generate.run(P, engine=eng)
    traces = Store(tmp_path / "gen/traces.jsonl").read()
    attempts = Store(tmp_path / "gen/attempts.jsonl").read()
    assert all(toy.parse_question(t["question"]).answer == int(t["gold"]) for t in traces)
    assert all(t["extracted"] == t["gold"] for t in traces), "only verified-correct traces are kept"
    wrong_first = {a["question_id"] for a in attempts if a["round"] == 0 and not a["correct"]}
    assert wrong_first, "slips at temperature 1 give rejection sampling work to do"
    assert any(a["round"] > 0 and a["correct"] for a in attempts), "a later round recovers some"
    assert len(eng.asked) == len(attempts)
    per_q = {}
    for a in attempts:
        per_q.setdefault(a["question_id"], []).append(a)
    for q, atts in per_q.items():
        assert sum(a["correct"] for a in atts) <= 1 and (not any(a["correct"] for a in atts[:-1])), \
            f"{q}: asked again after a correct answer"
    t4 = generate.table4(P.out_dir)
    row = t4.row(0, named=True)
    assert row["dataset"] == "toy" and row["questions"] == 120 and row["n_correct"] == len(traces) == m["total_correct"]
    assert 0 < row["first_round_accuracy"] < row["accuracy"] <= 1
    assert row["rounds"] <= 4 and row["mean_reasoning_chars"] > 200


def test_resume_after_crash_never_reasks_an_answered_question(tmp_path):
    P = gen_params(tmp_path, chunk_size=25)
    toy_engine = get_engine(EngineParams(kind="toy"), P.toy)
    first = Counting(toy_engine, crash_after=3)
    with pytest.raises(KeyboardInterrupt):
        generate.run(P, engine=first)
    answered = Store(tmp_path / "gen/traces.jsonl").ids
    assert 0 < len(answered) < 120
    second = Counting(toy_engine)
    generate.run(P, engine=second)
    assert not answered & set(second.asked)
    asked_per_round = {}
    for a in Store(tmp_path / "gen/attempts.jsonl"):
        asked_per_round.setdefault((a["question_id"], a["round"]), 0)
        asked_per_round[(a["question_id"], a["round"])] += 1
    assert set(asked_per_round.values()) == {1}


def test_truncated_generation_is_recorded_not_kept(tmp_path):
    P = gen_params(tmp_path, rounds=1)
    P.sampling.max_tokens = 30  # the trace cannot close its think block
    generate.run(P)
    assert len(Store(tmp_path / "gen/traces.jsonl")) == 0
    att = Store(tmp_path / "gen/attempts.jsonl").read()
    assert att and all(a["finish_reason"] == "length" and a["truncated"] and not a["correct"] for a in att)


def test_extractive_compression_keeps_equations_and_drops_rechecks():
    rows = toy.generate(ToyParams(n_train=30, n_test=5), "train")
    rng = random.Random(0)
    for row in rows:
        p = parse_response(toy.teacher_response(row, rng, 0.0, 0.0))
        c = compress.extractive(p.reasoning, row["question"])
        for step in toy.solution_steps(row):
            assert step in c, f"{row['id']}: lost the step {step!r}"
        assert "double check" not in c.lower() and "hmm" not in c.lower()
        assert len(c) < 0.3 * len(p.reasoning)
        assert compress.check(c, p.reasoning, row) is None


@pytest.mark.parametrize("text,flag", [
    ("", "empty"),
    ("so so so\n" * 10, "degenerate_repetition"),
    ("".join(f"Step {i}: 3 + 4 = 7.\n" for i in range(40)) + "The answer is 7.", "longer_than_original"),
    ("We add things up carefully.", "drops_answer"),
    ("3 + 4 = 8\nSo the answer is 8.", "contradicts_answer"),
    ("3 + 4 = 7\nSo the answer is 7.", None),
])
def test_compression_checks(text, flag):
    rec = {"answer_type": "numeric", "gold": "7", "choices": None}
    assert compress.check(text, "Let me see. We have 3 and then 4 more. 3 + 4 = 7. Wait, yes 7. " * 5, rec) == flag


def test_compress_stage_flags_and_tables(tmp_path):
    P = gen_params(tmp_path, rounds=2)
    generate.run(P)
    C = CompressParams(out_dir=str(tmp_path / "comp"), traces=P.out_dir)
    m = compress.run(C)
    df = compress.load(C.out_dir)
    assert m["n"] == len(Store(tmp_path / "gen/traces.jsonl")) and m["flagged"] == 0
    assert 0.05 < m["rho"] < 0.3 and 0.05 < m["rho_tokens_mean"] < 0.3
    assert (df["answer"] != "").all(), "the verified answer is carried over unchanged"
    again = compress.run(C)
    assert again["n"] == m["n"], "rerunning compresses nothing twice"
    t5 = compress.table5(C.out_dir)
    assert t5["dataset"].to_list() == ["toy", "overall"]


class EchoEngine:
    """A stand-in compressor model: returns fixed outputs, to test the recompression loop."""

    def __init__(self, outputs):
        self.outputs, self.calls = list(outputs), 0

    def generate(self, prompts, sampling, json_schema=None, rows=None):
        from cdlib.engines import Completion

        self.calls += 1
        out = self.outputs.pop(0)
        return [Completion(text=out(r)) for r in rows]


def test_model_compressor_recompresses_flagged_then_keeps_flag(tmp_path):
    P = gen_params(tmp_path, rounds=1)
    generate.run(P)
    n = len(Store(tmp_path / "gen/traces.jsonl"))

    def first(r):
        return "" if int(r["id"].rsplit("/", 1)[1]) % 2 else f"So the answer is {r['gold']}."

    def second(r):
        return "the answer is 999999" if int(r["id"].rsplit("/", 1)[1]) % 4 == 1 else f"It is {r['gold']}."

    C = CompressParams(out_dir=str(tmp_path / "comp"), traces=P.out_dir, compressor="m", recompress_attempts=1)
    compress.run(C, engine=EchoEngine([first, second]))
    recs = {r["id"]: r for r in Store(tmp_path / "comp/compressed.jsonl")}
    assert len(recs) == n
    for rid, r in recs.items():
        i = int(rid.rsplit("/", 1)[1])
        if i % 2 == 0:
            assert r["flag"] is None and r["attempts"] == 1
        elif i % 4 == 1:
            assert r["flag"] == "contradicts_answer" and r["attempts"] == 2
        else:
            assert r["flag"] is None and r["attempts"] == 2


WORDS = st.lists(st.sampled_from(["3", "+", "4", "=", "7", "wait", "so", "the", "answer", "is", "\n", "apples",
                                  "Let", "me", "check.", "12,345", "x^2"]), min_size=1, max_size=120)


@settings(max_examples=150, deadline=None)
@given(words=WORDS, frac=st.floats(0.0, 1.0))
def test_cut_whitespace_property(words, frac):
    tok = tokenizer.load("whitespace")
    text = " ".join(words)
    n = len(tok.encode(text))
    target = int(frac * n)
    piece, got = truncate.cut(text, target, tok)
    assert abs(got - target) <= 1 and len(tok.encode(piece)) == got
    assert tok.encode(piece) == tok.encode(text)[: len(tok.encode(piece))]


@pytest.fixture(scope="module")
def bpe(tiny_model_dir):
    return tokenizer.load(str(tiny_model_dir))


@settings(max_examples=100, deadline=None)
@given(words=WORDS, frac=st.floats(0.0, 1.0))
def test_cut_bpe_property(bpe, words, frac):
    text = " ".join(words)
    ids = bpe.encode(text)
    target = int(frac * len(ids))
    piece, got = truncate.cut(text, target, bpe)
    assert abs(got - target) <= 1, (text, target, got)
    assert text.startswith(piece.rstrip()) or piece == text


def test_truncate_cut_never_ends_in_half_a_character():
    from cdlib.tiny import resolve
    from cdlib.tokenizer import HFTokenizer
    from cdlib.truncate import cut

    tok = HFTokenizer(resolve("tiny-qwen3.5"))
    text = "首先 3 × 4 = 12，然后 12 ÷ 2 = 6，√36 = 6。答案是 6"
    n = len(tok.encode(text))
    pieces = [cut(text, k, tok)[0] for k in range(1, n)]
    assert not [p for p in pieces if "\ufffd" in p]
    assert all(text.startswith(p) for p in pieces)


def test_truncate_stage_length_matched_and_ratio(tmp_path):
    P = gen_params(tmp_path, rounds=2)
    generate.run(P)
    C = CompressParams(out_dir=str(tmp_path / "comp"), traces=P.out_dir)
    compress.run(C)
    T = TruncateParams(out_dir=str(tmp_path / "trunc"), traces=P.out_dir, compressed=C.out_dir)
    m = truncate.run(T)
    comp = {r["id"]: r for r in Store(tmp_path / "comp/compressed.jsonl")}
    raw = {r["id"]: r for r in Store(tmp_path / "gen/traces.jsonl")}
    for r in Store(tmp_path / "trunc/truncated.jsonl"):
        assert abs(r["truncated_tokens"] - len(comp[r["id"]]["reasoning"].split())) <= 1
        assert r["answer"] == raw[r["id"]]["answer"]
        assert raw[r["id"]]["reasoning"].split()[: r["truncated_tokens"]] == r["reasoning"].split()
    assert m["mismatches"] == 0 and m["kept_fraction"] < 0.3
    R = TruncateParams(out_dir=str(tmp_path / "ratio"), traces=P.out_dir, mode="ratio", ratio=0.5)
    assert abs(truncate.run(R)["kept_fraction"] - 0.5) < 0.02


def test_sharded_generation_merges_to_the_unsharded_pool(tmp_path):
    shards = []
    for i in range(3):
        P = gen_params(tmp_path, rounds=2, shard_index=i, num_shards=3)
        P.out_dir = str(tmp_path / f"shard{i}")
        generate.run(P)
        shards.append(P.out_dir)
    m = generate.merge_shards(shards, tmp_path / "merged")
    asked = {a["question_id"] for a in Store(tmp_path / "merged/attempts.jsonl")}
    assert len(asked) == 120 and m["per_dataset"][0]["questions"] == 120
    per_shard = [len(Store(f"{d}/traces.jsonl")) for d in shards]
    assert m["total_correct"] == sum(per_shard) and min(per_shard) > 0
