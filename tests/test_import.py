"""The import stage (issue 32): real rows of public trace sets -> the generate stage's records.

The rows under tests/fixtures/trace_sets/ are copied from public sources (README there); every
test here reads them through cdlib.trace_import or the import notebook under the grid runner.
"""

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from cdlib import trace_import as ti
from cdlib.params import ImportParams
from cdlib.store import Store, check_upstream

REPO = Path(__file__).resolve().parents[1]
SETS = REPO / "tests/fixtures/trace_sets"
GENERATE_FIELDS = ("id", "dataset", "domain", "group", "split", "question", "choices", "gold", "answer_type",
                   "response", "reasoning", "answer", "extracted", "rule", "round", "prompt_tokens",
                   "completion_tokens", "finish_reason", "correct", "truncated")


def imported(tmp_path, **params):
    P = ImportParams(out_dir=str(tmp_path / "cell"), **params)
    metrics = ti.run(P)
    return metrics, Store(tmp_path / "cell/traces.jsonl").read()


def test_openr1_row_verified_by_this_project(tmp_path):
    metrics, (rec,) = imported(tmp_path, source=str(SETS / "openr1_math"))
    assert set(GENERATE_FIELDS) <= set(rec)
    assert rec["layout"] == "openr1_math" and rec["dataset"] == "openr1_math" and rec["id"] == "openr1_math/0"
    assert rec["question"].startswith("## Task B-1.3.") and rec["gold"].startswith("v_{R}=4")
    assert rec["reasoning"].startswith("Okay, so I need to find the speed") and "</think>" not in rec["reasoning"]
    assert rec["answer"].endswith("\\(\\boxed{4}\\) km/h.") and rec["response"].startswith("<think>\n")
    assert (rec["extracted"], rec["rule"], rec["correct"], rec["flag"]) == ("4", "boxed", True, None)
    assert rec["source_correct"] is True and rec["source_id"] == "586fd646-76d6-5070-8c81-9993ab9d8559"
    assert rec["completion_tokens"] == len(rec["reasoning"].split()) + len(rec["answer"].split())
    assert rec["answer_type"] == "latex" and rec["finish_reason"] == "stop" and rec["drop"] is False
    assert metrics["kept"] == 1 and metrics["total_correct"] == 1 and metrics["source_agrees"] == 1
    assert check_upstream(tmp_path / "cell/traces.jsonl", "compress") == 1  # metrics' kept matches the store


def test_each_layout_of_the_real_rows(tmp_path):
    metrics, recs = imported(tmp_path, source=str(SETS), dataset="sets")
    by = {r["layout"]: r for r in recs}
    assert metrics["layouts"] == {"chat_log": 5, "limo": 1, "messages": 3, "openr1_math": 1, "openthoughts": 1,
                                  "s1k": 1}
    # OpenThoughts markers; this quoted row is cut inside its thought: unfinished reasoning is never scored
    ot = by["openthoughts"]
    assert ot["question"].startswith("Return your final response within \\boxed{}. Ms. Blackwell")
    assert ot["reasoning"].startswith("Okay, let's see.") and "<|begin_of_thought|>" not in ot["reasoning"]
    assert (ot["truncated"], ot["rule"], ot["flag"], ot["finish_reason"]) == (True, "truncated", "no_answer", "length")
    # messages with <think>, no gold column: extracted but not verifiable
    msgs = [r for r in recs if "openr1_math_messages.jsonl" in r["source_row"]]
    assert [m["extracted"] for m in msgs] == ["4", "180"] and {m["flag"] for m in msgs} == {"no_gold"}
    assert all(m["correct"] is None and m["gold"] is None for m in msgs)
    # an OpenAI-compatible request/response log: reasoning_content, CJK
    (log,) = [r for r in recs if r["source_row"].endswith("deepseek_v4_pro.jsonl:1")]
    assert log["question"] == "你是谁" and log["reasoning"].startswith("嗯，用户问了一个简单的自我介绍问题")
    assert log["answer"].startswith("你好！我是DeepSeek") and log["source_id"] == "as-j8iwhei6hm"
    assert metrics["flags"] == {"wrong_answer": 0, "no_answer": 3, "no_gold": 7} and metrics["kept"] == 12


def test_chat_logs_recorded_from_four_providers(tmp_path):
    """Recorded chat completions (pydantic-ai's test cassettes): DeepSeek's `reasoning_content`, the `reasoning`
    field of OpenRouter and Groq (vLLM's name for it since 0.11), and Groq's raw format (`<think>` in content)."""
    source = SETS / "chat_log/pydantic_ai_cassettes.jsonl"
    metrics, recs = imported(tmp_path / "a", source=str(source))
    assert [r["layout"] for r in recs] == ["chat_log"] * 4 and metrics["layouts"] == {"chat_log": 4}
    deepseek, glm, qwen3, raw = recs
    assert deepseek["question"] == "How do I cross the street?"
    assert deepseek["reasoning"].startswith("Okay, the user is asking how to cross the street.")
    assert deepseek["answer"].startswith("Crossing the street safely") and deepseek["source_id"].startswith("181d9669")
    assert glm["reasoning"].startswith("1.  **Deconstruct the User's Prompt:**")
    assert glm["answer"].startswith("Of course. This is an excellent question")
    assert qwen3["reasoning"].startswith("Okay, let's see.") and qwen3["answer"] == "4"
    assert raw["reasoning"].startswith("Okay, so I want to make Uruguayan alfajores.")
    assert raw["answer"].startswith("To make Uruguayan alfajores") and "think>" not in raw["reasoning"] + raw["answer"]
    for r in recs:  # every trace read whole, none scored against a gold the log does not have
        assert r["reasoning"] and r["answer"] and r["truncated"] is False and r["finish_reason"] == "stop"
        assert r["gold"] is None and r["correct"] is None and r["flag"] == "no_gold"
        assert r["response"].startswith("<think>\n") and r["response"].count("</think>") == 1
        assert r["completion_tokens"] == len(r["reasoning"].split()) + len(r["answer"].split())
    # the grid names a gold column beside the log: Qwen3's "4" verifies
    row = json.loads(source.read_text(encoding="utf-8").splitlines()[2])
    own = tmp_path / "qwen3.jsonl"
    own.write_text(json.dumps({**row, "ref": "4"}) + "\n")
    _, (rec,) = imported(tmp_path / "b", source=str(own), columns={"gold": "ref"})
    assert (rec["extracted"], rec["correct"], rec["flag"], rec["answer_type"]) == ("4", True, None, "numeric")


def test_s1k_row_from_a_csv_round_trip_copy(tmp_path):
    """A real s1K row (AIME 2020-I-6) as boovines/SEPO datasets/test_s1k.json holds it: written through CSV, so
    `thinking_trajectories` is the list's Python repr (a string) and a `dataset_source` column is added (README there).
    The repr is read back to the list: the reasoning is the Gemini thinking itself, not ``['\\n...`` with escapes."""
    metrics, (rec,) = imported(tmp_path, source=str(SETS / "s1k"))
    assert (rec["layout"], rec["dataset"], rec["id"]) == ("s1k", "s1k", "s1k/0")
    assert rec["question"].startswith("A flat board has a circular hole with radius $1$")
    assert rec["reasoning"].startswith("The problem describes a geometric configuration involving two circular holes")
    assert rec["reasoning"].endswith("Find $m+n = 160 + 13 = 173$.") and "\\n" not in rec["reasoning"]
    assert "$h_1 = \\sqrt{R^2 - 1}$" in rec["reasoning"] and not rec["reasoning"].startswith("[")
    assert rec["answer"].startswith("Solution:\nLet the radii") and rec["answer"].endswith("$\\boxed{173}$")
    assert (rec["gold"], rec["extracted"], rec["rule"], rec["correct"], rec["flag"]) == ("173", "173", "boxed", True,
                                                                                       None)
    assert (rec["truncated"], rec["finish_reason"], rec["source_correct"], rec["answer_type"]) == (False, "stop", None,
                                                                                                "numeric")
    assert metrics["kept"] == 1 and metrics["total_correct"] == 1 and metrics["layouts"] == {"s1k": 1}


def test_limo_row_and_its_final_answer(tmp_path):
    """GAIR/LIMO's row 0 (README there): `solution` is DeepSeek-R1's whole response without <think> markers, cut
    here before its **Final Answer** line, so it is reasoning that never reached its answer (never scored). The same
    row with the end the set gives it ("**Final Answer**", then \\boxed{025}) splits there and verifies against
    "25"."""
    source = SETS / "limo/gair_limo-train.jsonl"
    metrics, (rec,) = imported(tmp_path / "a", source=str(source))
    assert (rec["layout"], rec["gold"], rec["answer_type"]) == ("limo", "25", "numeric")
    assert rec["question"].startswith("Find the last three digits of the product of the positive roots")
    assert rec["reasoning"].startswith("Okay, so I need to find the last three digits") and rec["answer"] == ""
    assert (rec["truncated"], rec["flag"], rec["correct"], rec["finish_reason"]) == (True, "no_answer", False, "length")
    row = json.loads(source.read_text(encoding="utf-8"))
    ended = tmp_path / "ended.jsonl"
    ended.write_text(json.dumps({**row, "solution": row["solution"].replace("[...]", "ose three digits.\n\n"
                                                                             "**Final Answer**\n\\boxed{025}")}))
    _, (rec,) = imported(tmp_path / "b", source=str(ended))
    assert rec["reasoning"].endswith("ose three digits.") and rec["answer"] == "**Final Answer**\n\\boxed{025}"
    assert (rec["extracted"], rec["correct"], rec["flag"]) == ("25", True, None)  # 025 read as the number 25
    assert rec["response"] == "<think>\n" + rec["reasoning"] + "\n</think>\n\n" + rec["answer"]


def test_mixture_of_thoughts_row_quoted_in_a_named_file(tmp_path):
    """An open-r1/Mixture-of-Thoughts row (codeforces-cots source) as Trinity-RFT's DPO/SFT tutorial quotes it,
    "simplified" (README there: two forks' copies of that page at named commits): the set's own columns (`messages`
    with content before role, `num_tokens`, `source`), nearly every text cut. Read as `messages`: the extra columns
    are ignored, the thinking is what lies between <think> and </think> (here only the cut), the closing sentence of
    the code answer is the answer; a code row has no gold, so nothing is verified."""
    source = SETS / "mixture_of_thoughts/codeforces_cots-trinity_rft_quote.jsonl"
    row = json.loads(source.read_text(encoding="utf-8"))
    assert list(row) == ["messages", "num_tokens", "source"] and list(row["messages"][0]) == ["content", "role"]
    assert ti.detect(row, "row") == "messages"
    metrics, (rec,) = imported(tmp_path, source=str(source))
    assert rec["layout"] == "messages" and metrics["layouts"] == {"messages": 1}
    assert rec["question"] == "You will be given a competitive programming problem[...]"
    assert rec["reasoning"] == "[...]" and "think>" not in rec["answer"]
    assert rec["answer"].endswith("This approach efficiently combines hashing and dynamic programming to solve the "
                                  "problem within the given constraints.")
    assert (rec["gold"], rec["correct"], rec["flag"], rec["truncated"]) == (None, None, "no_gold", False)
    assert rec["response"] == "<think>\n[...]\n</think>\n\n" + rec["answer"] and rec["source_correct"] is None


def test_s1k_layouts_on_made_up_rows(tmp_path):
    """No real s1K-1.1 row is stored here (README there): the columns of the sets' cards, made-up values.
    s1K-1.1's deepseek_grade ("Yes"/"No", Claude's grade of deepseek_attempt) is the set's verdict beside ours."""
    base = {"solution": "128", "question": "For how many rationals ...?", "cot_type": "math",
            "source_type": "qq8933/AIME_1983_2024", "metadata": "{}"}
    v11 = {**base, "gemini_thinking_trajectory": "g", "gemini_attempt": "\\boxed{128}",
           "deepseek_thinking_trajectory": "Alright, 2^8 = 128.", "deepseek_attempt": "**Final Answer**\n\\boxed{128}",
           "gemini_grade": "Yes", "gemini_grade_reason": "r", "deepseek_grade": "No", "deepseek_grade_reason": "r"}
    v1 = {**base, "cot": None, "thinking_trajectories": ["Let me count.", "So 2^8."], "attempt": "The answer is 127."}
    f = tmp_path / "s1k.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in (v11, v1)))
    metrics, (a, b) = imported(tmp_path / "a", source=str(f))
    assert (a["layout"], a["reasoning"], a["gold"], a["extracted"], a["correct"]) == ("s1k_1.1", "Alright, 2^8 = 128.",
                                                                                    "128", "128", True)
    assert a["source_correct"] is False and metrics["source_disagrees"] == 1 and metrics["source_agrees"] == 0
    assert (b["layout"], b["reasoning"], b["correct"], b["flag"]) == ("s1k", "Let me count.\nSo 2^8.", False,
                                                                      "wrong_answer")
    assert b["source_correct"] is None


def test_unverified_drop_and_the_grid_naming_a_gold_column(tmp_path):
    metrics, recs = imported(tmp_path / "a", source=str(SETS), unverified="drop")
    assert [r["layout"] for r in recs] == ["openr1_math", "s1k"]
    assert metrics["dropped"] == 10 and metrics["kept"] == 2
    rows = [json.loads(x) for x in (SETS / "messages/openr1_math_messages.jsonl").read_text().splitlines()]
    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps({**r, "ref": g}) + "\n" for r, g in zip(rows, ["4", "181"])))
    metrics, recs = imported(tmp_path / "b", source=str(own), columns={"gold": "ref"})
    assert [(r["correct"], r["flag"], r["answer_type"]) for r in recs] == [(True, None, "numeric"),
                                                                          (False, "wrong_answer", "numeric")]
    with pytest.raises(ti.ImportFailed, match="every one of the 2 rows"):
        imported(tmp_path / "c", source=str(own), columns={"gold": "ref"}, unverified="drop", limit=None,
                 answer_type="boolean")


def test_unknown_layout_names_columns_and_layouts_and_columns_fix_it(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"q": "What is 2+3?", "thought": "2+3=5", "final": "\\boxed{5}", "ref": "5"}) + "\n")
    with pytest.raises(ti.ImportFailed) as e:
        imported(tmp_path / "a", source=str(f))
    msg = str(e.value)
    assert f"{f}:1" in msg and "(final, q, ref, thought)" in msg
    assert all(name in msg for name in ti.LAYOUTS) and "columns:" in msg
    _, (rec,) = imported(tmp_path / "b", source=str(f),
                         columns={"question": "q", "reasoning": "thought", "answer": "final", "gold": "ref"})
    assert (rec["layout"], rec["reasoning"], rec["extracted"], rec["correct"]) == ("columns", "2+3=5", "5", True)
    with pytest.raises(ti.ImportFailed, match="columns\\['gold'\\]: no column 'gold_answer'"):
        imported(tmp_path / "c", source=str(f),
                 columns={"question": "q", "reasoning": "thought", "gold": "gold_answer"})


def test_parquet_directory_reads_like_jsonl_and_rerun_adds_nothing(tmp_path):
    rows = [json.loads(x) for x in (SETS / "messages/openr1_math_messages.jsonl").read_text().splitlines()]
    folder = tmp_path / "set/data"
    folder.mkdir(parents=True)
    pl.DataFrame(rows).write_parquet(folder / "train-00000-of-00001.parquet")
    (tmp_path / "set/README.md").write_text("---\nlicense: apache-2.0\n---\n# a set\n")
    metrics, recs = imported(tmp_path, source=str(tmp_path / "set"))
    _, from_jsonl = imported(tmp_path / "j", source=str(SETS / "messages"), dataset="set")
    assert [r["reasoning"] for r in recs] == [r["reasoning"] for r in from_jsonl]
    assert recs[0]["source_row"].endswith("train-00000-of-00001.parquet row 0") and metrics["license"] == "apache-2.0"
    again = ti.run(ImportParams(out_dir=str(tmp_path / "cell"), source=str(tmp_path / "set")))
    assert again["kept"] == 2 and len(Store(tmp_path / "cell/traces.jsonl")) == 2


def test_named_hf_tokenizer_counts_completion_tokens(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    _, (rec,) = imported(tmp_path, source=str(SETS / "chat_log/deepseek_v4_pro.jsonl"), tokenizer=str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    n = (len(tok.encode(rec["reasoning"], add_special_tokens=False))
         + len(tok.encode(rec["answer"], add_special_tokens=False)))
    assert rec["completion_tokens"] == n > len(rec["reasoning"].split())  # CJK has no spaces to split on


def test_hub_id_offline_names_the_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ti.ImportFailed) as e:
        imported(tmp_path, source="no-such-owner/no-such-trace-set", config="default")
    assert "'no-such-owner/no-such-trace-set'" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    with pytest.raises(ti.ImportFailed, match="neither a local file or directory nor a hub id"):
        imported(tmp_path, source=str(tmp_path / "missing" / "x.jsonl"))


def test_import_notebook_runs_under_the_grid_runner(tmp_path):
    grid = {"name": "imp", "output_root": str(tmp_path / "out"),
            "stages": {"import": {"notebook": "notebooks/01_import.py",
                                  "params": {"source": str(SETS), "dataset": "sets"}}}}
    path = tmp_path / "imp.yaml"
    path.write_text(yaml.safe_dump(grid))
    out = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", str(path)], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    cell = tmp_path / "out/imp/import"
    manifest = json.loads((cell / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["kind"] == "import"
    assert json.loads((cell / "metrics.json").read_text())["kept"] == len(Store(cell / "traces.jsonl")) == 12
    res = pl.read_parquet(tmp_path / "out/imp/results.parquet")
    assert res["kind"].to_list() == ["import"]


@pytest.mark.slow
def test_import_grid_through_every_stage(tmp_path):
    """params/import.yaml: the real rows imported, compressed, truncated, trained on, evaluated, reported."""
    spec = yaml.safe_load((REPO / "params/import.yaml").read_text())
    spec = {k: v for k, v in spec.items() if not k.startswith("x-")}
    spec["output_root"] = str(tmp_path / "out")
    spec["stages"]["report"]["params"]["grid_dir"] = str(tmp_path / "out/import")
    grid = tmp_path / "import.yaml"
    grid.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "cdlib.grid", "run", str(grid)], cwd=REPO, capture_output=True,
                         text=True, timeout=3600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    root = tmp_path / "out/import"
    res = pl.read_parquet(root / "results.parquet")
    assert set(res["kind"]) == {"import", "compress", "truncate", "train", "evaluate", "report"}
    ev = res.filter(pl.col("kind") == "evaluate")
    assert set(ev["source"]) == {"raw", "extractive", "truncated"} and ev["accuracy"].is_not_null().all()
    assert len(Store(root / "compress/public-sets/compressed.jsonl")) == 12
    assert "Table" in (root / "report/index.html").read_text()
