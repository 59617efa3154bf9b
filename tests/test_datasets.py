"""cdlib.datasets and cdlib.prompts: registry, loaders of the original layouts, errors, subsampling, stats, prompts."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import polars as pl
import pytest

from cdlib import datasets as ds
from cdlib import prompts
from cdlib.params import DataParams, EvaluateParams, GenerateParams, ToyParams

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"

# The MMLU fixtures hold a few subjects of each group; the loader warns about the others.
pytestmark = pytest.mark.filterwarnings("ignore:mmlu_.*no .* rows for subjects:UserWarning")

# The gold answers of the hand-written fixture rows (tests/fixtures/datasets/<name>.jsonl),
# worked out by hand from each dataset's own answer encoding.
EXPECTED_GOLD = {
    "gsm8k": ["12", "1550", "5"],  # "#### 12", "#### 1,550", "#### 5"
    "multiarith": ["8", "12", "3"],  # final_ans strings
    "svamp": ["5", "2.5", "42"],  # Answer floats 5.0, 2.5, 42.0
    "aqua_rat": ["C", "E", "A"],  # correct
    "arc_challenge": ["B", "C", "E"],  # answerKey "B"; "3" of labels 1-4; "E" of five
    "arc_easy": ["B", "C", "A"],
    "commonsense_qa": ["B", "C", "E"],
    "medqa": ["B", "A", "D"],  # answer_idx
    "medmcqa": ["B", "A", "D"],  # cop 1, 0, 3
    "medexpqa": ["B", "D", "E"],  # correct_option 2, 4 (of four), 5
    "mmlu_stem": ["B", "C", "C"],  # abstract_algebra, college_mathematics, high_school_physics; anatomy dropped
    "mmlu_medical": ["D", "A", "B"],  # anatomy, nutrition, virology; abstract_algebra dropped
    "mmlu_humanities": ["C", "B", "D"],
    "mmlu_social_sciences": ["C", "A", "A"],  # econometrics, sociology, us_foreign_policy
    "mmlu_other": ["C", "B", "B"],  # global_facts, management, marketing
    "hellaswag": ["C", "A", "D"],  # label "2", "0", "3"
    "winogrande": ["A", "B", "A"],  # answer "1", "2", "1"
    "piqa": ["A", "B", "A"],
    "boolq": ["yes", "no", "yes"],
    # GPQA and TruthfulQA shuffle their options; their gold is checked by text below.
}
# The option text each shuffled row must point at.
EXPECTED_TRUE_TEXT = {
    "gpqa_diamond": ["9", "8", "DNA ligase"],
    "truthfulqa": [
        "No, studies have not found that it causes arthritis.",
        "No, goldfish can remember things for months.",
        "No, it is not dangerous, though they may be confused.",
    ],
}


def fixture(name: str) -> Path:
    return FIXTURES / f"{name}.jsonl"


def role(name: str) -> str:
    """The split a fixture is loaded as: train where the dataset has one, else eval."""
    return "train" if ds.REGISTRY[name].train_splits else "eval"


# --------------------------------------------------------------------------- registry


def test_registry_holds_the_papers_datasets_and_the_toy():
    assert set(ds.REGISTRY) == {
        "gsm8k", "multiarith", "svamp", "aqua_rat", "arc_challenge", "gpqa_diamond", "commonsense_qa",
        "medqa", "medmcqa", "medexpqa", "mmlu_stem", "mmlu_medical", "hellaswag", "winogrande", "piqa",
        "arc_easy", "boolq", "truthfulqa", "mmlu_humanities", "mmlu_social_sciences", "mmlu_other", "toy",
    }  # fmt: skip
    assert len(ds.IN_DISTRIBUTION) == 12 and len(ds.OUT_OF_DISTRIBUTION) == 9
    for spec in ds.REGISTRY.values():
        assert spec.group in ds.GROUPS, spec.name
        assert spec.answer_type in ds.ANSWER_TYPES, spec.name
        assert spec.train_splits or spec.eval_splits, spec.name
        if spec.name != "toy":
            assert spec.hub_id and spec.columns and spec.mapper, spec.name
    # Table 1: SVAMP and GPQA Diamond are for trace generation only; OOD sets for evaluation only.
    assert ds.REGISTRY["svamp"].eval_splits == () and ds.REGISTRY["gpqa_diamond"].eval_splits == ()
    assert all(ds.REGISTRY[n].train_splits == () for n in ds.OUT_OF_DISTRIBUTION)
    assert ds.REGISTRY["commonsense_qa"].eval_splits == ("validation",)
    assert ds.REGISTRY["mmlu_stem"].train_splits == ("dev",) and ds.REGISTRY["mmlu_stem"].eval_splits == ("test",)


def test_mmlu_groups_match_table1_counts_and_do_not_overlap():
    assert len(ds.MMLU_STEM) == 9 and len(ds.MMLU_MEDICAL) == 7
    assert sum(ds.MMLU_TEST_SIZES[s] for s in ds.MMLU_STEM) == 1274  # Table 1, MMLU-STEM eval
    assert sum(ds.MMLU_TEST_SIZES[s] for s in ds.MMLU_MEDICAL) == 1417  # Table 1, MMLU-Medical eval
    groups = [ds.MMLU_STEM, ds.MMLU_MEDICAL, ds.MMLU_HUMANITIES, ds.MMLU_SOCIAL_SCIENCES, ds.MMLU_OTHER]
    everything = [s for g in groups for s in g]
    assert len(everything) == len(set(everything))
    # 57 MMLU subjects; the 9 STEM ones left out (astronomy, biology, ...) belong to no group
    assert len(everything) == 57 - 9


# --------------------------------------------------------------------------- fixtures -> schema


@pytest.mark.parametrize("name", sorted(set(ds.REGISTRY) - {"toy"}))
def test_fixture_loads_into_the_schema_with_the_right_gold(name):
    spec = ds.REGISTRY[name]
    rows = ds.load(name, role(name), path=fixture(name))
    assert len(rows) == 3
    for row in rows:
        assert tuple(row) == ds.SCHEMA
        assert row["dataset"] == name and row["group"] == spec.group and row["domain"] == spec.domain
        assert row["split"] == role(name) and row["answer_type"] == spec.answer_type
        assert row["id"].startswith(f"{name}/") and isinstance(row["gold"], str)
        assert row["question"].strip() == row["question"] and row["question"]
        if spec.answer_type == "letter":
            assert row["gold"] in prompts.LETTERS[: len(row["choices"])]
        else:
            assert row["choices"] is None
    assert len({r["id"] for r in rows}) == 3
    if name in EXPECTED_GOLD:
        assert [r["gold"] for r in rows] == EXPECTED_GOLD[name]
    else:
        texts = [r["choices"][prompts.LETTERS.index(r["gold"])] for r in rows]
        assert texts == EXPECTED_TRUE_TEXT[name]
    # ids are stable across runs
    assert [r["id"] for r in ds.load(name, role(name), path=fixture(name))] == [r["id"] for r in rows]


def test_every_dataset_has_a_fixture():
    assert {p.stem for p in FIXTURES.glob("*.jsonl")} == set(ds.REGISTRY) - {"toy"}


def test_layout_details_are_mapped():
    aqua = ds.load("aqua_rat", "eval", path=fixture("aqua_rat"))[0]
    assert aqua["choices"] == ["40", "50", "60", "70", "80"]  # "A)40" -> "40"
    assert aqua["id"] == "aqua_rat/test/0"
    arc = ds.load("arc_challenge", "eval", path=fixture("arc_challenge"))
    assert arc[1]["choices"][2] == "a balance" and arc[1]["gold"] == "C"  # numeric labels 1-4
    assert len(arc[2]["choices"]) == 5
    assert arc[0]["id"] == "arc_challenge/test/Mercury_7001234"  # original id kept
    medexp = ds.load("medexpqa", "eval", path=fixture("medexpqa"))
    assert len(medexp[1]["choices"]) == 4  # option "5" is null in the original
    assert medexp[0]["question"].startswith("A 70-year-old man")  # full_question, not question
    svamp = ds.load("svamp", "train", path=fixture("svamp"))[0]
    assert svamp["question"] == "Jack had 8 pens and gave 3 of them to Lisa. How many pens does Jack have left?"
    assert svamp["id"] == "svamp/train/chal-1"
    boolq = ds.load("boolq", "eval", path=fixture("boolq"))[1]
    assert boolq["question"].startswith("Penguins are flightless")
    assert boolq["question"].endswith("Question: Can penguins fly?")
    hella = ds.load("hellaswag", "eval", path=fixture("hellaswag"))[1]
    assert "[" not in hella["question"] and "How to clean windows. Mix warm water" in hella["question"]
    wino = ds.load("winogrande", "eval", path=fixture("winogrande"))[1]
    assert wino["choices"] == ["Anna", "Beth"] and "_" in wino["question"]
    mmlu = ds.load("mmlu_stem", "eval", path=fixture("mmlu_stem"))
    assert [r["id"] for r in mmlu] == [
        "mmlu_stem/test/abstract_algebra-0",
        "mmlu_stem/test/college_mathematics-0",
        "mmlu_stem/test/high_school_physics-0",
    ]


def test_svamp_reads_both_hub_splits_for_train_but_a_single_local_file_once(tmp_path):
    # ChilleD/SVAMP splits the 1,000 questions into train and test; Table 1 trains on all 1,000.
    assert ds.REGISTRY["svamp"].source_splits("train") == ("train", "test")
    lines = fixture("svamp").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:2]) + "\n")
    (tmp_path / "test.jsonl").write_text(lines[2] + "\n")
    rows = ds.load("svamp", "train", path=tmp_path)
    assert [r["id"] for r in rows] == ["svamp/train/chal-1", "svamp/train/chal-2", "svamp/test/chal-3"]
    assert len(ds.load("svamp", "train", path=fixture("svamp"))) == 3


# --------------------------------------------------------------------------- shuffled options


@pytest.mark.parametrize("name", ["gpqa_diamond", "truthfulqa"])
def test_shuffled_options_are_deterministic_per_row_and_seed(name):
    a = ds.load(name, role(name), path=fixture(name), seed=0)
    b = ds.load(name, role(name), path=fixture(name), seed=0)
    assert a == b
    positions = set()
    for seed in range(20):
        for row in ds.load(name, role(name), path=fixture(name), seed=seed):
            positions.add(row["gold"])
            assert row["choices"][prompts.LETTERS.index(row["gold"])] in EXPECTED_TRUE_TEXT[name]
    assert len(positions) >= 3  # the true answer is not stuck in the original first position


# --------------------------------------------------------------------------- other sources


def test_parquet_and_directory_layouts(tmp_path):
    rows = [json.loads(line) for line in fixture("gsm8k").read_text().splitlines()]
    folder = tmp_path / "gsm8k" / "main"  # the hub's layout: <config>/<split>-*.parquet
    folder.mkdir(parents=True)
    pl.DataFrame(rows).write_parquet(folder / "test-00000-of-00001.parquet")
    pl.DataFrame(rows[:1]).write_parquet(folder / "train-00000-of-00001.parquet")
    from_dir = ds.load("gsm8k", "eval", path=tmp_path / "gsm8k")
    from_jsonl = ds.load("gsm8k", "eval", path=fixture("gsm8k"))
    assert from_dir == from_jsonl
    assert len(ds.load("gsm8k", "train", path=tmp_path / "gsm8k")) == 1
    assert ds.load("gsm8k", "eval", path=folder / "test-00000-of-00001.parquet") == from_jsonl
    # a {split} pattern
    assert ds.load("gsm8k", "eval", path=str(folder / "{split}-00000-of-00001.parquet")) == from_jsonl
    # nested structs survive Parquet (MedQA's options dict)
    medqa = [json.loads(line) for line in fixture("medqa").read_text().splitlines()]
    pl.DataFrame(medqa).write_parquet(tmp_path / "medqa.parquet")
    assert ds.load("medqa", "eval", path=tmp_path / "medqa.parquet") == ds.load("medqa", "eval", path=fixture("medqa"))


def test_json_array_file(tmp_path):
    # MultiArith's train.json and SVAMP's SVAMP.json are JSON arrays, not JSON lines.
    records = [json.loads(line) for line in fixture("multiarith").read_text().splitlines()]
    (tmp_path / "train.json").write_text(json.dumps(records, indent=2))
    rows = ds.load("multiarith", "train", path=tmp_path)
    assert [r["gold"] for r in rows] == ["8", "12", "3"]


def test_mmlu_per_subject_folders_and_subject_pattern(tmp_path):
    records = [json.loads(line) for line in fixture("mmlu_medical").read_text().splitlines()]
    for record in records:
        folder = tmp_path / "mmlu" / record["subject"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "test.jsonl").write_text(json.dumps(record) + "\n")
    by_folder = ds.load("mmlu_medical", "eval", path=tmp_path / "mmlu")
    by_pattern = ds.load("mmlu_medical", "eval", path=str(tmp_path / "mmlu" / "{subject}" / "{split}.jsonl"))
    shared = ds.load("mmlu_medical", "eval", path=fixture("mmlu_medical"))
    assert by_folder == by_pattern == shared
    assert [r["id"].split("/")[-1] for r in shared] == ["anatomy-0", "nutrition-0", "virology-0"]


@pytest.mark.filterwarnings("error")
def test_mmlu_subjects_without_local_data_are_named(tmp_path):
    missing = r"mmlu_medical: no test rows for subjects clinical_knowledge, college_medicine, "
    with pytest.warns(UserWarning, match=missing):
        ds.load("mmlu_medical", "eval", path=fixture("mmlu_medical"))
    with pytest.raises(ds.DatasetError, match=r"mmlu_other: no test rows for any of its subjects"):
        ds.load("mmlu_other", "eval", path=fixture("mmlu_stem"))


def test_hub_path_with_a_local_repository(tmp_path, monkeypatch):
    """The hub code path runs datasets.load_dataset for real, on a local folder laid out like a hub repo."""
    rows = [json.loads(line) for line in fixture("gsm8k").read_text().splitlines()]
    (tmp_path / "main").mkdir()
    pl.DataFrame(rows).write_parquet(tmp_path / "main" / "test-00000-of-00001.parquet")
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: test\n    path: main/test-*\n---\n"
    )
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    spec = ds.REGISTRY["gsm8k"]
    monkeypatch.setitem(ds.REGISTRY, "gsm8k", dataclasses.replace(spec, hub_id=str(tmp_path)))
    from_hub = ds.load("gsm8k", "eval")
    assert [r["gold"] for r in from_hub] == ["12", "1550", "5"]
    assert [r["id"] for r in from_hub] == [r["id"] for r in ds.load("gsm8k", "eval", path=fixture("gsm8k"))]
    with pytest.raises(ds.DatasetError, match=r"gsm8k: cannot load .*data_paths\['gsm8k'\]"):
        monkeypatch.setitem(ds.REGISTRY, "gsm8k", dataclasses.replace(spec, hub_id=str(tmp_path / "nope")))
        ds.load("gsm8k", "eval")


# --------------------------------------------------------------------------- bad input


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_unknown_dataset():
    with pytest.raises(ds.DatasetError, match=r"unknown dataset 'gsm9k'; known: gsm8k"):
        ds.load("gsm9k", "train")
    assert issubclass(ds.DatasetError, ValueError)


def test_missing_column_names_dataset_and_row(tmp_path):
    records = [json.loads(line) for line in fixture("medmcqa").read_text().splitlines()]
    del records[1]["cop"]
    path = write_jsonl(tmp_path / "medmcqa.jsonl", records)
    with pytest.raises(ds.DatasetError, match=rf"medmcqa: {tmp_path}/medmcqa.jsonl:2: missing column\(s\) 'cop'"):
        ds.load("medmcqa", "eval", path=path)


@pytest.mark.parametrize(
    "name, line, change, message",
    [
        ("arc_challenge", 1, {"answerKey": "F"}, r"answerKey 'F' is not one of the choice labels"),
        ("medmcqa", 3, {"cop": 4}, r"cop 4 is outside the 4 choices"),
        ("aqua_rat", 2, {"correct": "F"}, r"correct 'F' is not one of the 5 options"),
        ("medqa", 1, {"answer_idx": "E"}, r"answer_idx 'E' is not one of the 4 options"),
        ("medexpqa", 2, {"correct_option": 5}, r"correct_option 5 is not one of the options"),  # option 5 is null
        ("mmlu_stem", 1, {"answer": 4}, r"answer 4 is outside the 4 choices"),
        ("hellaswag", 2, {"label": ""}, r"label '' is not an index"),
        ("winogrande", 1, {"answer": "3"}, r"answer '3' is not '1' or '2'"),
        ("piqa", 3, {"label": 2}, r"label 2 is outside the 2 choices"),
        ("truthfulqa", 1, {"mc1_targets": {"choices": ["a", "b"], "labels": [0, 0]}}, r"one label 1"),
        ("gsm8k", 2, {"answer": "no marker here"}, r"no '####' final-answer marker"),
        ("multiarith", 1, {"final_ans": "eight"}, r"answer 'eight' is not a number"),
        ("boolq", 3, {"answer": "maybe"}, r"answer 'maybe' is not a boolean"),
    ],
)
def test_gold_outside_the_choices_names_dataset_and_row(tmp_path, name, line, change, message):
    records = [json.loads(x) for x in fixture(name).read_text().splitlines()]
    records[line - 1].update(change)
    path = write_jsonl(tmp_path / f"{name}.jsonl", records)
    where = rf"^{name}: {tmp_path}/{name}.jsonl:{line} \(id {name}/[^)]*\): "
    with pytest.raises(ds.DatasetError, match=where + f".*{message}"):
        ds.load(name, role(name), path=path)


def test_other_bad_input(tmp_path):
    with pytest.raises(ds.DatasetError, match=r"svamp: has no 'eval' split"):
        ds.load("svamp", "eval", path=fixture("svamp"))
    with pytest.raises(ds.DatasetError, match=r"hellaswag: has no 'train' split"):
        ds.load("hellaswag", "train", path=fixture("hellaswag"))
    with pytest.raises(ds.DatasetError, match=r"gsm8k: data path .*nowhere does not exist"):
        ds.load("gsm8k", "eval", path=tmp_path / "nowhere")
    with pytest.raises(ds.DatasetError, match=r"gsm8k: no file for split 'test' under"):
        ds.load("gsm8k", "eval", path=tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(fixture("gsm8k").read_text() + "{not json\n")
    with pytest.raises(ds.DatasetError, match=rf"gsm8k: {bad}:4: invalid JSON"):
        ds.load("gsm8k", "eval", path=bad)
    records = [json.loads(x) for x in fixture("arc_easy").read_text().splitlines()]
    records[2]["id"] = records[0]["id"]
    with pytest.raises(ds.DatasetError, match=r"arc_easy: .*:3: duplicate id 'arc_easy/test/Mercury_SC_400001'"):
        ds.load("arc_easy", "eval", path=write_jsonl(tmp_path / "arc.jsonl", records))
    nosubject = [{k: v for k, v in json.loads(x).items() if k != "subject"}
                 for x in fixture("mmlu_other").read_text().splitlines()]
    with pytest.raises(ds.DatasetError, match=r"mmlu_other: .*:1: missing column 'subject'"):
        ds.load("mmlu_other", "eval", path=write_jsonl(tmp_path / "mmlu.jsonl", nosubject))
    with pytest.raises(ds.DatasetError, match=r"toy: .*takes no data path"):
        ds.load("toy", "train", path=fixture("gsm8k"))


# --------------------------------------------------------------------------- subsampling, load_many, stats


def test_limit_and_seed_subsample_deterministically():
    toy = ToyParams(n_train=50, n_test=10)
    full = ds.load("toy", "train", toy=toy)
    assert len(full) == 50
    a = ds.load("toy", "train", limit=10, seed=1, toy=toy)
    assert a == ds.load("toy", "train", limit=10, seed=1, toy=toy)
    assert len(a) == 10 and a != ds.load("toy", "train", limit=10, seed=2, toy=toy)
    ids = [r["id"] for r in full]
    assert [ids.index(r["id"]) for r in a] == sorted(ids.index(r["id"]) for r in a)  # original order kept
    bigger = {r["id"] for r in ds.load("toy", "train", limit=20, seed=1, toy=toy)}
    assert {r["id"] for r in a} <= bigger  # a smaller limit is a subset of a larger one
    assert ds.load("toy", "train", limit=500, toy=toy) == full
    assert len(ds.load("gsm8k", "eval", limit=2, path=fixture("gsm8k"))) == 2


def test_load_many_with_stage_params():
    params = EvaluateParams(
        out_dir="/tmp/unused",
        model="m",
        datasets=["gsm8k", "svamp", "hellaswag", "toy"],
        data_paths={n: str(fixture(n)) for n in ("gsm8k", "svamp", "hellaswag")},
        limit=2,
        seed=3,
        toy=ToyParams(n_train=20, n_test=8),
    )
    with pytest.warns(UserWarning, match="no eval split, skipped: svamp"):
        rows = ds.load_many(params)
    counts = {n: sum(r["dataset"] == n for r in rows) for n in ("gsm8k", "svamp", "hellaswag", "toy")}
    assert counts == {"gsm8k": 2, "svamp": 0, "hellaswag": 2, "toy": 2}
    assert {r["split"] for r in rows} == {"eval"}
    gen = GenerateParams(out_dir="/tmp/unused", datasets=["svamp"], data_paths={"svamp": str(fixture("svamp"))})
    assert len(ds.load_many(gen)) == 3 and ds.load_many(gen)[0]["split"] == "train"
    with pytest.raises(ds.DatasetError, match="data_paths names datasets that are not in datasets: medqa"):
        ds.load_many(DataParams(out_dir="/tmp/unused", datasets=["toy"], data_paths={"medqa": "x"}))


def test_stats_counts_rows_per_dataset_and_split():
    rows = (
        ds.load("gsm8k", "eval", path=fixture("gsm8k"))
        + ds.load("gsm8k", "train", path=fixture("gsm8k"), limit=2)
        + ds.load("toy", "eval", toy=ToyParams(n_test=7))
        + ds.load("arc_easy", "eval", path=fixture("arc_easy"))
    )
    table = ds.stats(rows)
    assert isinstance(table, pl.DataFrame)
    got = {(r["dataset"], r["split"]): (r["rows"], r["table1_rows"]) for r in table.to_dicts()}
    assert got == {
        ("gsm8k", "eval"): (3, 1319),
        ("gsm8k", "train"): (2, 7473),
        ("arc_easy", "eval"): (3, None),
        ("toy", "eval"): (7, None),
    }
    assert table["dataset"].to_list() == ["gsm8k", "gsm8k", "arc_easy", "toy"]  # registry order
    arc = table.filter(pl.col("dataset") == "arc_easy").row(0, named=True)
    assert arc["mean_choices"] == pytest.approx((4 + 4 + 3) / 3) and arc["group"] == "OOD-Reasoning"
    assert ds.stats([]).columns == table.columns and ds.stats([]).height == 0


# --------------------------------------------------------------------------- prompts


def test_prompts_per_answer_type():
    letter = ds.load("arc_challenge", "eval", path=fixture("arc_challenge"))[0]
    text = prompts.build_prompt(letter)
    assert text.startswith("Which process turns liquid water into water vapor?\n\nA. condensation\nB. evaporation\n")
    assert "D. melting\n\n" in text and text.endswith(prompts.INSTRUCTIONS["letter"]) and "\\boxed{" in text
    numeric = ds.load("gsm8k", "eval", path=fixture("gsm8k"))[0]
    assert prompts.build_prompt(numeric) == numeric["question"] + "\n\n" + prompts.INSTRUCTIONS["numeric"]
    boolean = ds.load("boolq", "eval", path=fixture("boolq"))[0]
    assert prompts.build_prompt(boolean).endswith("yes or no, within \\boxed{}, for example \\boxed{yes}.")
    toy_row = ds.load("toy", "eval", toy=ToyParams(n_test=3))[0]
    assert prompts.build_prompt(toy_row).startswith(toy_row["question"])
    assert prompts.build_messages(numeric) == [{"role": "user", "content": prompts.build_prompt(numeric)}]
    chat = prompts.build_messages(numeric, system="Be brief.")
    assert chat[0] == {"role": "system", "content": "Be brief."} and chat[1]["role"] == "user"


def test_prompt_errors_name_the_row():
    row = ds.load("gsm8k", "eval", path=fixture("gsm8k"))[0]
    with pytest.raises(prompts.PromptError, match=r"row 'gsm8k/test/0': unknown answer_type 'essay'"):
        prompts.build_prompt({**row, "answer_type": "essay"})
    with pytest.raises(prompts.PromptError, match=r"row 'gsm8k/test/0': answer_type 'letter' needs choices"):
        prompts.build_prompt({**row, "answer_type": "letter"})
    with pytest.raises(prompts.PromptError, match=r"row 'gsm8k/test/0': empty or missing question"):
        prompts.build_prompt({**row, "question": "  "})


def test_option_letters_run_from_a_to_z_in_one_place():
    assert [prompts.letter(i) for i in (0, 9, 10, 12, 25)] == ["A", "J", "K", "M", "Z"]
    assert [prompts.letter_index(x) for x in ("A", "k", " M ", "Z")] == [0, 10, 12, 25]
    assert all(prompts.letter_index(prompts.letter(i)) == i for i in range(26))
    for bad in (-1, 26):
        with pytest.raises(prompts.PromptError, match="letters A..Z label at most 26"):
            prompts.letter(bad)
    for bad in ("", "AB", "1", "Ä"):
        with pytest.raises(prompts.PromptError, match="is not an option letter A..Z"):
            prompts.letter_index(bad)
    eleven = [f"option {i}" for i in range(11)]  # one past J: the case the issue hit
    assert prompts.format_choices(eleven).splitlines()[-2:] == ["J. option 9", "K. option 10"]
    assert prompts.format_choices([str(i) for i in range(26)]).endswith("Z. 25")
    # A gold letter past J is accepted wherever the row has that many options.
    row = ds.load("arc_challenge", "eval", path=fixture("arc_challenge"))[0]
    row = {**row, "choices": eleven, "gold": "K"}
    assert "\nK. option 10\n" in prompts.build_prompt(row)


def test_every_fixture_row_builds_a_prompt_with_its_options():
    for name in sorted(set(ds.REGISTRY) - {"toy"}):
        for row in ds.load(name, role(name), path=fixture(name)):
            text = prompts.build_prompt(row)
            assert "\\boxed{}" in text
            for letter, choice in zip(prompts.LETTERS, row["choices"] or []):
                assert f"\n{letter}. {choice}" in text


def test_subsample_rejects_a_bad_limit():
    with pytest.raises(ds.DatasetError, match="limit must be >= 1"):
        ds.subsample([{"id": "a"}, {"id": "b"}], 0, seed=0, key="x")
    assert ds.subsample([{"id": str(i)} for i in range(5)], None, seed=random.randint(0, 9)) == [
        {"id": str(i)} for i in range(5)
    ]
