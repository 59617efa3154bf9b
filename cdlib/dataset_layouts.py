"""One mapping per benchmark's original layout into the question-row schema of :mod:`cdlib.datasets`, and
:class:`DatasetSpec`, a benchmark's entry in the registry (where it lives, its splits, its mapping).

Each ``map_<dataset>`` takes a raw row in the layout of the hub copy or of the
benchmark's own release (both where they differ) and a shuffle key
(``"<seed>/<row id>"``), and returns ``(question, choices or None, gold)``. A row
it cannot map is a :class:`RowError`, which :func:`cdlib.datasets.load` re-raises
as a :class:`DatasetError` naming the dataset and the row. Where a local file
encodes a column unlike the hub (MedMCQA's 1-based ``cop``, PIQA's separate
labels file), a per-file fix-up (:func:`medmcqa_file`, :func:`piqa_file`) runs
first. Every mapping names its source in a comment.
"""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from cdlib.prompts import LETTERS, letter


class DatasetError(ValueError):
    """Bad dataset input; the message names the dataset and the row (file:line or hub row)."""


class RowError(Exception):
    """A mapping function's complaint about one row; re-raised as DatasetError with dataset and row."""


Mapped = tuple[str, "list[str] | None", str]  # what a mapping returns: question, choices or None, gold


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset: where it lives, its splits, its report labels and how to map its layout."""

    name: str  # registry key (short lowercase slug)
    title: str  # as the paper writes it
    domain: str  # Table 1's domain column (or the OOD group's)
    group: str  # report group, one of cdlib.datasets.GROUPS
    answer_type: str  # one of cdlib.datasets.ANSWER_TYPES
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



# --------------------------------------------------------------------------- value helpers


def _number(value: Any) -> str:
    """A numeric gold answer as a plain string: "1,234" -> "1234", 8.0 -> "8", 2.50 -> "2.5"."""
    text = str(value).strip().replace(",", "").replace("$", "")
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise RowError(f"answer {value!r} is not a number") from None
    if not number.is_finite():
        raise RowError(f"answer {value!r} is not a finite number")
    if number == number.to_integral_value():
        return str(int(number))
    return format(number.normalize(), "f")


def _index(value: Any, n: int, what: str) -> int:
    """An integer position in 0..n-1 from an int or a digit string, else RowError."""
    try:
        i = int(str(value).strip())
    except ValueError:
        raise RowError(f"{what} {value!r} is not an index") from None
    if not 0 <= i < n:
        raise RowError(f"{what} {value!r} is outside the {n} choices")
    return i


def _letter(value: Any, n: int, what: str) -> str:
    """A gold letter that must be one of the first ``n`` letters, else RowError."""
    text = str(value).strip().upper()
    if text not in LETTERS[:n] or not text:
        raise RowError(f"{what} {value!r} is not one of the {n} options {', '.join(LETTERS[:n])}")
    return text


def _gold(choices: list, index: int) -> str:
    """The gold letter of option ``index``; more options than letters A..Z is RowError, with the count."""
    if len(choices) > len(LETTERS):
        raise RowError(f"{len(choices)} options; letters A..Z label at most {len(LETTERS)}")
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
    raise RowError(f"answer {value!r} is not a boolean")


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



def map_gsm8k(raw: dict, key: str) -> Mapped:
    # openai/gsm8k (config "main"): question, answer = worked solution ending in "#### <number>".
    # Source: dataset card; lm-evaluation-harness tasks/gsm8k/gsm8k.yaml (regex "#### (\-?[0-9\.\,]+)").
    answer = str(raw["answer"])
    if "####" not in answer:
        raise RowError("answer has no '####' final-answer marker")
    return raw["question"], None, _number(answer.rsplit("####", 1)[1])


def map_multiarith(raw: dict, key: str) -> Mapped:
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
        raise RowError(f"lSolutions {solutions!r} is not a list of one number")
    return raw["sQuestion"], None, _number(solutions[0])


def map_svamp(raw: dict, key: str) -> Mapped:
    # ChilleD/SVAMP (the layout of arkilpatel/SVAMP's SVAMP.json): ID, Body, Question, Equation,
    # Answer (float), Type. The question a model sees is Body followed by Question.
    return f"{str(raw['Body']).strip()} {str(raw['Question']).strip()}", None, _number(raw["Answer"])


def map_aqua_rat(raw: dict, key: str) -> Mapped:
    # deepmind/aqua_rat (config "raw"): question, options = ["A)21", "B)21.5", ...], rationale,
    # correct = "A".."E". Source: dataset card features (question, options, rationale, correct).
    letters, texts = [], []
    for option in raw["options"]:
        m = re.match(r"\s*([A-Z])\s*\)\s*(.*)", str(option), re.S)
        if m is None:
            raise RowError(f"option {option!r} is not of the form 'A)text'")
        letters.append(m[1])
        texts.append(m[2].strip())
    if letters != list(LETTERS[: len(letters)]):
        raise RowError(f"option letters {letters} are not A, B, C, ... in order")
    return raw["question"], texts, _letter(raw["correct"], len(texts), "correct")


def map_labelled_choices(raw: dict, key: str) -> Mapped:
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
            raise RowError("question is an object without 'stem' and a 'choices' list")
        labels = [str(o["label"]) for o in options]
        texts = [o["text"] for o in options]
        question = question["stem"]
    elif "choices" not in raw:
        raise RowError("no 'choices' column and the question is not an object with 'choices'")
    else:
        labels = [str(label) for label in raw["choices"]["label"]]
        texts = list(raw["choices"]["text"])
    if len(labels) != len(texts):
        raise RowError(f"{len(labels)} choice labels but {len(texts)} choice texts")
    answer = str(raw["answerKey"]).strip()
    if answer not in labels:
        raise RowError(f"answerKey {raw['answerKey']!r} is not one of the choice labels {labels}")
    return question, texts, _gold(texts, labels.index(answer))


def map_gpqa(raw: dict, key: str) -> Mapped:
    # Idavidrein/gpqa (config "gpqa_diamond", CSV): Question, "Correct Answer",
    # "Incorrect Answer 1".."3", "Record ID". The correct answer always comes first in the
    # original, so the options are shuffled, deterministically per row and seed.
    # Source: lm-evaluation-harness tasks/gpqa/zeroshot/utils.py (column names).
    options = [str(raw["Correct Answer"]).strip()] + [str(raw[f"Incorrect Answer {i}"]).strip() for i in (1, 2, 3)]
    choices, gold = _shuffled(options, f"gpqa/{key}")
    return raw["Question"], choices, _gold(choices, gold)


def map_medqa(raw: dict, key: str) -> Mapped:
    # GBaker/MedQA-USMLE-4-options (Jin et al.'s 4_options JSONL): question, answer (text),
    # options = {"A": ..., "D": ...}, meta_info, answer_idx = "A".."D".
    # Source: dataset card features (question, answer, options{A..D}, meta_info, answer_idx).
    options = raw["options"]
    letters = sorted(k for k, v in options.items() if v is not None)
    if letters != list(LETTERS[: len(letters)]):
        raise RowError(f"option keys {letters} are not A, B, C, ...")
    return raw["question"], [options[k] for k in letters], _letter(raw["answer_idx"], len(letters), "answer_idx")


def map_medmcqa(raw: dict, key: str) -> Mapped:
    # openlifescienceai/medmcqa: id, question, opa, opb, opc, opd, cop (0..3: its dataset card
    # declares cop a class label a, b, c, d), choice_type, exp, subject_name, topic_name.
    # Source: lm-evaluation-harness tasks/medmcqa (doc_to_target: cop). The original release's
    # JSON files count cop from 1 (medmcqa/medmcqa README: "cop":1 for opa); medmcqa_file
    # shifts those to 0 before this mapping.
    texts = [raw[c] for c in ("opa", "opb", "opc", "opd")]
    if str(raw["cop"]).strip() == "-1":  # the hub's unlabelled test split
        raise RowError("cop -1: the test split has no labels")
    return raw["question"], texts, _gold(texts, _index(raw["cop"], 4, "cop"))


def medmcqa_file(records: list[tuple[dict, str]], path: Path) -> list[tuple[dict, str]]:
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


def map_medexpqa(raw: dict, key: str) -> Mapped:
    # HiTZ/MedExpQA (config "en", casimedicos JSONL): full_question (clinical case + question),
    # question, options = {"1": ..., "5": ...} (null where a question has fewer options),
    # correct_option = 1..5, explanations, ... Source: dataset card; lighteval's MedExpQA task
    # (options sorted by key, gold = correct_option).
    options = raw["options"]
    keys = sorted((k for k, v in options.items() if v not in (None, "")), key=int)
    correct = str(raw["correct_option"]).strip()
    if correct not in keys:
        raise RowError(f"correct_option {raw['correct_option']!r} is not one of the options {keys}")
    texts = [options[k] for k in keys]
    return raw["full_question"], texts, _gold(texts, keys.index(correct))


def map_mmlu(raw: dict, key: str) -> Mapped:
    # cais/mmlu (one config per subject): question, subject, choices (4 strings), answer (0..3).
    # Source: lm-evaluation-harness tasks/mmlu/default/_default_template_yaml (doc_to_target: answer).
    # The original release (hendrycks/test data/<split>/<subject>_<split>.csv) has no header:
    # question, A, B, C, D, answer letter (MMLU_CSV_COLUMNS).
    if "choices" not in raw:
        choices = [raw[c] for c in "ABCD"]
        return raw["question"], choices, _letter(raw["answer"], 4, "answer")
    choices = list(raw["choices"])
    return raw["question"], choices, _gold(choices, _index(raw["answer"], len(choices), "answer"))


def map_hellaswag(raw: dict, key: str) -> Mapped:
    # Rowan/hellaswag: ind, activity_label, ctx_a, ctx_b, ctx, endings (4), source_id, split,
    # split_type, label (a digit string; empty in the unlabelled test split).
    # Source: lm-evaluation-harness tasks/hellaswag/utils.py (context = activity_label: ctx_a Ctx_b).
    ctx_b = _clean_hellaswag(str(raw["ctx_b"]))
    context = _clean_hellaswag(f"{raw['activity_label']}: {raw['ctx_a']} {ctx_b[:1].upper() + ctx_b[1:]}")
    endings = [_clean_hellaswag(str(e)) for e in raw["endings"]]
    question = f"Which ending is the most plausible continuation of the text?\n\n{context}"
    return question, endings, _gold(endings, _index(raw["label"], len(endings), "label"))


def map_winogrande(raw: dict, key: str) -> Mapped:
    # allenai/winogrande (config "winogrande_xl"): sentence (with a "_" blank), option1, option2,
    # answer = "1" | "2". Source: lm-evaluation-harness tasks/winogrande/preprocess_winogrande.py.
    if "_" not in str(raw["sentence"]):
        raise RowError("sentence has no '_' blank")
    answer = str(raw["answer"]).strip()
    if answer not in ("1", "2"):
        raise RowError(f"answer {raw['answer']!r} is not '1' or '2' (the test split has no labels)")
    question = f"Which option correctly fills the blank (_) in the sentence?\n\n{raw['sentence']}"
    options = [raw["option1"], raw["option2"]]
    return question, options, _gold(options, int(answer) - 1)


def map_piqa(raw: dict, key: str) -> Mapped:
    # baber/piqa (the parquet copy of ybisk/piqa that lm-evaluation-harness uses): goal, sol1,
    # sol2, label (0 | 1). Source: lm-evaluation-harness tasks/piqa/piqa.yaml. The original
    # release's labels sit in <split>-labels.lst beside the JSONL (piqa_file).
    question = f"Which solution better achieves the goal?\n\nGoal: {raw['goal']}"
    options = [raw["sol1"], raw["sol2"]]
    return question, options, _gold(options, _index(raw["label"], 2, "label"))


def piqa_file(records: list[tuple[dict, str]], path: Path) -> list[tuple[dict, str]]:
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


def map_boolq(raw: dict, key: str) -> Mapped:
    # google/boolq: question (lower case, no "?"), answer (bool), passage.
    # Source: dataset card features (question, answer, passage). SuperGLUE's copy
    # (super_glue "boolq"; allenai/OLMo-Eval's few-shot rows) has idx and label (0/1; -1 in
    # its unlabelled test split) instead of answer.
    q = str(raw["question"]).strip()
    q = q[:1].upper() + q[1:] + ("" if q.endswith("?") else "?")
    answer = raw["answer"] if "answer" in raw else raw["label"]
    return f"{str(raw['passage']).strip()}\n\nQuestion: {q}", None, _boolean(answer)


def map_truthfulqa(raw: dict, key: str) -> Mapped:
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
        raise RowError(f"mc1_targets must have one label 1 per set of choices, got labels {labels}")
    true_index = labels.index(1)
    ordered = [choices[true_index]] + [c for i, c in enumerate(choices) if i != true_index]
    shuffled, gold = _shuffled(ordered, f"truthfulqa/{key}")
    return raw["question"], shuffled, _gold(shuffled, gold)
