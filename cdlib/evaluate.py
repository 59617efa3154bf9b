"""Stage 5: student evaluation and the paper's inference metrics (sections 4, 5.4; Tables 7 and 9).

The student generates greedily, with the chat template it was trained with and
the token cap from params (8,192 in the paper), through ``cdlib.engines``
(LoRA students through vLLM's LoRA support). Each record's output is kept in
``outputs.jsonl`` (resumable). :func:`summarize` computes, exactly as the paper
defines them:

* accuracy per report group with its standard error sqrt(p(1-p)/n) and the
  paper's Table 7 ± (``ci95`` = 1.96 × SE, a 95% interval half-width);
* overall accuracy over every record (not the mean of the groups);
* mean completion tokens over all records and excluding truncated ones;
* truncation rate: the share of records whose finish reason is ``length``;
* median reasoning characters and tokens, with the inter-quartile range;
* accuracy per 1k tokens: overall accuracy / (mean completion tokens / 1000);
* how often each extraction rule fired.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cdlib.progress import tqdm  # text inside grid cells (log.txt), widgets in JupyterLab

from cdlib import answers, datasets, prompts
from cdlib import tokenizer as toklib
from cdlib.engines import Completion, Engine, answer_missing, get_engine
from cdlib.outputs import engine_for, read_metrics, resolve_model
from cdlib.params import EvaluateParams
from cdlib.tables import count_table
from cdlib.store import Store
from cdlib.traces import parse_response

CI95_Z = 1.96  # Table 7's ± = 1.96 * SE
GROUPS = ("Math", "Science", "Medicine", "Common-sense", "OOD-Reasoning", "OOD-Knowledge")
OVERALL_ONLY = "Overall-only"  # datasets that count in Overall but in no group column

# Report groups: which dataset feeds which Table 7 column. One visible table per grouping;
# a dataset missing from a table (the toy world, a new dataset) keeps its row's own ``group``.
#
# "paper" (default) reproduces the group sizes that the paper's ± imply. Its ± is
# 1.96*sqrt(p(1-p)/n), so n = p(1-p)(1.96/±)^2 can be read back from every cell of Table 7:
#   Math 1,753 = GSM8k 1,319 + MultiArith 180 + AQUA-RAT 254 (Table 1 eval sizes);
#   Science 1,172 = ARC-Challenge alone (no MMLU-STEM);
#   Medicine 5,581 = MedQA 1,273 + MedMCQA 4,183 + MedExpQA 125 (no MMLU-Medical);
#   Common-sense 1,221 = CommonsenseQA;
#   the columns printed "OOD Reason." and "OOD Know." have the n of MMLU-STEM (1,274) and
#   MMLU-Medical (1,417) in 53 of the 55 rows (tests/test_paper_mode.py checks these against Table 7);
#   the OOD benchmarks (HellaSwag, ..., MMLU humanities/social sciences/other) then count in Overall only.
# "dataset" is the grouping of cdlib.datasets (MMLU-STEM in Science, MMLU-Medical in Medicine,
# the OOD benchmarks in the two OOD columns): what section 4's prose describes.
PAPER_GROUPS = {
    "gsm8k": "Math", "multiarith": "Math", "aqua_rat": "Math",
    "arc_challenge": "Science",
    "medqa": "Medicine", "medmcqa": "Medicine", "medexpqa": "Medicine",
    "commonsense_qa": "Common-sense",
    "mmlu_stem": "OOD-Reasoning", "mmlu_medical": "OOD-Knowledge",
    **{d: OVERALL_ONLY for d in ("hellaswag", "winogrande", "piqa", "arc_easy", "boolq", "truthfulqa",
                                 "mmlu_humanities", "mmlu_social_sciences", "mmlu_other")},
}
GROUPINGS: dict[str, dict[str, str]] = {"paper": PAPER_GROUPS, "dataset": {}}


def report_group(record: dict[str, Any], grouping: str = "paper") -> str:
    """The report group of an evaluated record under ``grouping`` (a key of :data:`GROUPINGS`)."""
    if grouping not in GROUPINGS:
        raise ValueError(f"evaluate: grouping {grouping!r} unknown; known: {', '.join(GROUPINGS)}")
    return GROUPINGS[grouping].get(record.get("dataset"), record.get("group"))


def think_prefilled(tokenizer: Any) -> bool:
    """Whether the chat template's generation prompt already opens the think block."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:
        return False
    return text.rstrip().endswith("<think>")


def run(P: EvaluateParams, engine=None) -> dict[str, Any]:
    """Generate for every eval question not yet in ``outputs.jsonl``, score, and return the metrics.

    A transient engine error is not an answer (it would count as a wrong one): it is
    not stored, and questions left so raise :class:`cdlib.engines.UnansweredError`
    after the rest is stored (the cell fails; a rerun sends exactly those). A student
    that answered no request at all raises :class:`cdlib.engines.NothingAnsweredError`.
    """
    out = Store(Path(P.out_dir) / "outputs.jsonl", writable=True)
    rows = datasets.load_many(P)
    target = resolve_model(P.model)
    prefilled = False
    tok = None
    if P.engine.kind != "toy":
        tok = toklib.load(P.engine.tokenizer or target["model"])
        prefilled = think_prefilled(tok.tok)

    def ask(eng: Engine, part: list[dict[str, Any]], attempt: int) -> list[Completion]:
        return eng.generate([prompts.build_messages(r) for r in part], P.sampling, rows=part)

    def take(attempt: int, pairs: list[tuple[dict[str, Any], Completion]]) -> None:
        recs = []
        for r, c in pairs:
            if c.transient:  # not an answer: not stored, sent again by a rerun
                continue
            ex = answers.extract_detailed(c.text, r["answer_type"], r.get("choices"), think_prefilled=prefilled)
            reasoning = parse_response(c.text, think_prefilled=prefilled).reasoning
            recs.append({**{f: r.get(f) for f in ("id", "dataset", "domain", "group", "split", "gold",
                                                  "answer_type", "choices")},
                         "text": c.text, "reasoning": reasoning, "extracted": ex.value, "rule": ex.rule,
                         "correct": bool(answers.verify(ex.value, r["gold"], r["answer_type"])),
                         "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason,
                         "error": c.error, "reasoning_chars": len(reasoning),
                         "reasoning_tokens": len(tok.encode(reasoning)) if tok else len(reasoning.split())})
        out.append(recs)

    answer_missing("evaluate", rows, out, engine or (lambda: get_engine(engine_for(P.engine, P.model), P.toy)),
                   ask, take, chunk=512, progress=lambda attempt, todo: tqdm(total=len(todo), desc="evaluate",
                                                                              unit="q"))
    return {**summarize(out.read(), P.grouping), **trained_with(P.model)}


def trained_with(model: str) -> dict[str, Any]:
    """What the evaluated student was trained on, when ``model`` is a train cell: its trainable
    tokens and budget mode, so one results row holds accuracy, output length and training cost."""
    m = read_metrics(model, strict=True)
    if m is None:
        return {}
    return {"train_tokens": m.get("trainable_tokens"), "train_budget_mode": m.get("budget_mode"),
            "train_wall_clock_s": m.get("wall_clock_s")}


def _quantile(xs: list[float], q: float) -> float | None:
    """Linear-interpolation quantile (numpy's default), None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(records: list[dict[str, Any]], grouping: str = "paper") -> dict[str, Any]:
    """The paper's evaluation metrics of a list of scored records (see the module docstring).

    Groups follow ``grouping`` (:data:`GROUPINGS`); Overall always counts every record.
    """
    n = len(records)
    if not n:
        return {"n": 0}
    correct = [bool(r["correct"]) for r in records]
    acc = sum(correct) / n
    tokens = [r["completion_tokens"] for r in records]
    trunc = [r["finish_reason"] == "length" for r in records]
    not_trunc = [t for t, x in zip(tokens, trunc) if not x]
    rchars = [r["reasoning_chars"] for r in records]
    rtoks = [r["reasoning_tokens"] for r in records]
    mean_tokens = sum(tokens) / n
    groups: dict[str, dict[str, Any]] = {}
    labels = [report_group(r, grouping) for r in records]
    for g in dict.fromkeys(labels):
        sub = [c for lab, c in zip(labels, correct) if lab == g]
        p = sum(sub) / len(sub)
        se = math.sqrt(p * (1 - p) / len(sub))
        groups[str(g)] = {"accuracy": p, "se": se, "ci95": CI95_Z * se, "n": len(sub)}
    rules: dict[str, int] = {}
    for r in records:
        rules[r["rule"]] = rules.get(r["rule"], 0) + 1
    return {
        "n": n,
        "grouping": grouping,
        "accuracy": acc,
        "accuracy_se": math.sqrt(acc * (1 - acc) / n),
        "accuracy_ci95": CI95_Z * math.sqrt(acc * (1 - acc) / n),
        "groups": groups,
        "mean_completion_tokens": mean_tokens,
        "mean_completion_tokens_excl_trunc": (sum(not_trunc) / len(not_trunc)) if not_trunc else None,
        "truncation_rate": sum(trunc) / n,
        "median_reasoning_chars": _quantile(rchars, 0.5),
        "reasoning_chars_q1": _quantile(rchars, 0.25),
        "reasoning_chars_q3": _quantile(rchars, 0.75),
        "median_reasoning_tokens": _quantile(rtoks, 0.5),
        "reasoning_tokens_q1": _quantile(rtoks, 0.25),
        "reasoning_tokens_q3": _quantile(rtoks, 0.75),
        "acc_per_1k_tokens": acc / (mean_tokens / 1000) if mean_tokens else None,
        "rules": rules,
        "errors": sum(r["finish_reason"] == "error" for r in records),
    }


def group_table(metrics: dict[str, Any]):
    """Per-group accuracy with standard errors and Table 7's ± (ci95), plus the overall row, as a polars frame."""
    import polars as pl

    rows = [{"group": g, **v} for g, v in metrics.get("groups", {}).items()]
    rows.append({"group": "Overall", "accuracy": metrics["accuracy"], "se": metrics["accuracy_se"],
                 "ci95": metrics.get("accuracy_ci95"), "n": metrics["n"]})
    return pl.DataFrame(rows)


def grouping_table(grouping: str = "paper"):
    """Which dataset feeds which report group under ``grouping`` (a key of :data:`GROUPINGS`), as a polars frame.

    A dataset not listed keeps its row's own ``group`` (the "dataset" grouping lists none).
    """
    import polars as pl

    if grouping not in GROUPINGS:
        raise ValueError(f"evaluate: grouping {grouping!r} unknown; known: {', '.join(GROUPINGS)}")
    table = GROUPINGS[grouping]
    return pl.DataFrame({"dataset": list(table), "group": list(table.values())},
                        schema={"dataset": pl.String, "group": pl.String})


def rule_table(metrics: dict[str, Any]):
    """How often each extraction rule found the answer (:func:`summarize`'s ``rules``), most frequent first.

    Many ``none`` or ``truncated`` means the student rarely finishes or ignores the answer format.
    """
    return count_table(metrics.get("rules", {}), "rule")


OUTPUT_COLUMNS = ("id", "group", "gold", "extracted", "correct", "rule", "completion_tokens", "finish_reason")


def worst_outputs(out_dir: str | Path, n: int = 10):
    """The first ``n`` scored outputs of an evaluate cell, wrong ones first and, among them, those cut at
    the token cap first: :data:`OUTPUT_COLUMNS` as a polars frame."""
    import polars as pl

    df = Store(Path(out_dir) / "outputs.jsonl").to_polars()
    if df.is_empty():
        return df
    return df.sort("correct", pl.col("finish_reason") != "length").select(OUTPUT_COLUMNS).head(n)


def wrong_endings(out_dir: str | Path, n: int = 2, chars: int = 1500) -> str:
    """How many outputs of an evaluate cell are wrong, then the last ``chars`` characters of the first ``n``
    wrong ones (where the answer should be), each under a line with its id, gold, extracted answer and finish."""
    import polars as pl

    df = Store(Path(out_dir) / "outputs.jsonl").to_polars()
    wrong = df.filter(~pl.col("correct")) if not df.is_empty() else df
    parts = [f"{wrong.height} wrong of {df.height}"]
    for rec in wrong.head(n).to_dicts():
        parts.append(f"--- {rec['id']}: gold {rec['gold']}, extracted {rec['extracted']} ({rec['finish_reason']})\n"
                     f"{rec['text'][-chars:]}\n")
    return "\n".join(parts)
