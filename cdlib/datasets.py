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

This module holds the registry and the loading API; :mod:`cdlib.dataset_files` reads
raw rows from the hub or local files, and :mod:`cdlib.dataset_layouts` maps each
original layout (every mapping names its source in a comment). Bad input (a missing
column, an unknown dataset, a gold answer outside the choices) is a
:class:`DatasetError` naming the dataset and the row.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

from cdlib import toy as toy_world
from cdlib.dataset_files import raw_rows
from cdlib.dataset_layouts import (DatasetError, DatasetSpec, RowError, map_aqua_rat, map_boolq, map_gpqa, map_gsm8k,
                                   map_hellaswag, map_labelled_choices, map_medexpqa, map_medmcqa, map_medqa, map_mmlu,
                                   map_multiarith, map_piqa, map_svamp, map_truthfulqa, map_winogrande, medmcqa_file,
                                   piqa_file)
from cdlib.params import ToyParams
from cdlib.prompts import LETTERS, PromptError

SCHEMA = ("id", "dataset", "domain", "group", "split", "question", "choices", "gold", "answer_type")
ANSWER_TYPES = ("numeric", "letter", "boolean", "latex")
GROUPS = ("Math", "Science", "Medicine", "Common-sense", "OOD-Reasoning", "OOD-Knowledge")


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


# --------------------------------------------------------------------------- registry


def _mmlu(name: str, title: str, domain: str, group: str, subjects: tuple[str, ...],
          train: tuple[str, ...], **sizes: Any) -> DatasetSpec:  # fmt: skip
    """An MMLU subject group: cais/mmlu, one hub config per subject, dev (train) / test (eval)."""
    return DatasetSpec(
        name, title, domain, group, "letter", "cais/mmlu", None, train, ("test",),
        ("question", "choices|A", "answer"), map_mmlu, subjects=subjects, csv_columns=MMLU_CSV_COLUMNS, **sizes,
    )  # fmt: skip


_SPECS = [
    # ---- in-distribution, paper Table 1 (train split / eval split / sizes as printed there)
    DatasetSpec("gsm8k", "GSM8k", "Mathematics", "Math", "numeric", "openai/gsm8k", "main", ("train",), ("test",),
                ("question", "answer"), map_gsm8k, table1_train=7473, table1_eval=1319),
    DatasetSpec("multiarith", "MultiArith", "Mathematics", "Math", "numeric", "ChilleD/MultiArith", None,
                ("train",), ("test",), ("question|sQuestion", "final_ans|lSolutions"), map_multiarith,
                table1_train=420, table1_eval=180),
    # SVAMP: Table 1 lists 1,000 train questions and no eval split; ChilleD/SVAMP splits the
    # 1,000 into train (700) and test (300), so "train" reads both.
    DatasetSpec("svamp", "SVAMP", "Mathematics", "Math", "numeric", "ChilleD/SVAMP", None, ("train", "test"), (),
                ("Body", "Question", "Answer"), map_svamp, id_column="ID", table1_train=1000),
    DatasetSpec("aqua_rat", "AQUA-RAT", "Mathematics", "Math", "letter", "deepmind/aqua_rat", "raw", ("train",),
                ("test",), ("question", "options", "correct"), map_aqua_rat, table1_train=97467, table1_eval=254),
    DatasetSpec("arc_challenge", "ARC-Challenge", "Science", "Science", "letter", "allenai/ai2_arc", "ARC-Challenge",
                ("train",), ("test",), ("question", "answerKey"), map_labelled_choices, id_column="id",
                table1_train=1119, table1_eval=1172),
    DatasetSpec("gpqa_diamond", "GPQA Diamond", "Science", "Science", "letter", "Idavidrein/gpqa", "gpqa_diamond",
                ("train",), (), ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                                 "Incorrect Answer 3"), map_gpqa, id_column="Record ID", table1_train=198),
    DatasetSpec("commonsense_qa", "CommonsenseQA", "Logic/Commonsense", "Common-sense", "letter", "tau/commonsense_qa",
                None, ("train",), ("validation",), ("question", "answerKey"), map_labelled_choices,
                id_column="id", table1_train=9741, table1_eval=1221),
    DatasetSpec("medqa", "MedQA", "Medical", "Medicine", "letter", "GBaker/MedQA-USMLE-4-options", None, ("train",),
                ("test",), ("question", "options", "answer_idx"), map_medqa, table1_train=10178, table1_eval=1273),
    DatasetSpec("medmcqa", "MedMCQA", "Medical", "Medicine", "letter", "openlifescienceai/medmcqa", None, ("train",),
                ("validation",), ("question", "opa", "opb", "opc", "opd", "cop"), map_medmcqa, id_column="id",
                file_fixup=medmcqa_file, table1_train=182822, table1_eval=4183),
    DatasetSpec("medexpqa", "MedExpQA", "Medical", "Medicine", "letter", "HiTZ/MedExpQA", "en", ("train",), ("test",),
                ("full_question", "options", "correct_option"), map_medexpqa, id_column="id",
                table1_train=434, table1_eval=125),
    _mmlu("mmlu_stem", "MMLU-STEM", "MMLU-STEM", "Science", MMLU_STEM, ("dev",), table1_train=45, table1_eval=1274),
    _mmlu("mmlu_medical", "MMLU-Medical", "MMLU-Medical", "Medicine", MMLU_MEDICAL, ("dev",),
          table1_train=35, table1_eval=1417),
    # ---- out-of-distribution, paper section 4: evaluation only (no train split); eval = the
    # labelled split that lm-evaluation-harness evaluates on.
    # HellaSwag's "ind" is no row id: two train rows share ind 38 (a wikihow and an activitynet
    # row, allenai/OLMo-Eval's few-shot rows), so rows are numbered by position instead.
    DatasetSpec("hellaswag", "HellaSwag", "Commonsense", "OOD-Reasoning", "letter", "Rowan/hellaswag", None, (),
                ("validation",), ("activity_label", "ctx_a", "ctx_b", "endings", "label"), map_hellaswag),
    DatasetSpec("winogrande", "WinoGrande", "Commonsense", "OOD-Reasoning", "letter", "allenai/winogrande",
                "winogrande_xl", (), ("validation",), ("sentence", "option1", "option2", "answer"), map_winogrande),
    DatasetSpec("piqa", "PIQA", "Physical commonsense", "OOD-Reasoning", "letter", "baber/piqa", None, (),
                ("validation",), ("goal", "sol1", "sol2", "label"), map_piqa, file_fixup=piqa_file),
    DatasetSpec("arc_easy", "ARC-Easy", "Science", "OOD-Reasoning", "letter", "allenai/ai2_arc", "ARC-Easy", (),
                ("test",), ("question", "answerKey"), map_labelled_choices, id_column="id"),
    DatasetSpec("boolq", "BoolQ", "Reading comprehension", "OOD-Reasoning", "boolean", "google/boolq", None, (),
                ("validation",), ("question", "passage", "answer|label"), map_boolq),
    DatasetSpec("truthfulqa", "TruthfulQA", "Truthfulness", "OOD-Reasoning", "letter", "truthfulqa/truthful_qa",
                "multiple_choice", (), ("validation",), ("question", "mc1_targets"), map_truthfulqa),
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
                raise RowError(f"an option is empty: {choices!r}")
            choices = [str(c).strip() for c in choices]
    except (RowError, PromptError) as e:  # PromptError: a gold position past Z
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
        for raw, where, id_prefix, index in raw_rows(spec, source_split, path):
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
