"""Stage 6: faithfulness of compressed traces (paper Appendix G, Table 10).

An LLM judge sees the question, the canonical answer, the raw trace and the
compressed trace (middle-truncated to ``raw_chars`` / ``compressed_chars``,
keeping both ends) and returns a :class:`Verdict` under a JSON schema enforced by
structured decoding. A response cut at the judge's token cap, or one that does
not parse, is recorded as a parse failure, never dropped.

The toy world has a rule-based judge instead (:func:`rule_verdict`): a
compression is faithful when every equation in it is true and appears in the
raw trace, and it reaches the canonical answer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cdlib import answers
from cdlib.engines import Completion, Engine, answer_missing, get_engine
from cdlib.params import JudgeParams
from cdlib.store import Store, read_upstream
from cdlib.tables import count_table, judge_means, judged

FailureMode = Literal["contradiction", "unsupported_claim", "omitted_key_step", "answer_mismatch",
                      "overcompression", "incoherent", "empty_original", "empty_compressed"]


class Verdict(BaseModel):
    """The judge's structured output (Appendix G.1)."""

    model_config = ConfigDict(extra="forbid")
    faithfulness: int = Field(ge=1, le=5)
    coverage: int = Field(ge=1, le=5)
    clarity: int = Field(ge=1, le=5)
    verdict: Literal["faithful", "partially_faithful", "unfaithful"]
    answer_alignment: bool
    failure_modes: list[FailureMode]
    rationale: str


SCHEMA = Verdict.model_json_schema()

PROMPT = """You compare a compressed reasoning trace with the original trace it was made from.

Question:
{question}

Canonical answer: {answer}

Original trace:
{raw}

Compressed trace:
{compressed}

Score the compressed trace:
- faithfulness (1-5): is every claim, calculation and conclusion supported by or consistent with the
  original? Omitting redundant exploration, false starts and verbosity is acceptable; introducing
  unsupported claims is not.
- coverage (1-5): are the essential steps needed to support the canonical answer preserved?
- clarity (1-5): is it coherent and usable as a deliberation?
- verdict: faithful, partially_faithful or unfaithful.
- answer_alignment: would the compressed trace, read on its own, support the canonical answer?
- failure_modes: any of contradiction, unsupported_claim, omitted_key_step, answer_mismatch,
  overcompression, incoherent, empty_original, empty_compressed (empty list if none).
- rationale: one or two sentences.
Reply with the JSON object only."""


def middle_truncate(text: str, limit: int, marker: str = "\n[... middle truncated ...]\n") -> str:
    """``text`` if it fits in ``limit`` characters, else its head and tail around ``marker``."""
    if len(text) <= limit:
        return text
    keep = max(limit - len(marker), 2)
    head = keep // 2
    return text[:head] + marker + text[len(text) - (keep - head):]


def build_prompt(rec: dict[str, Any], raw_chars: int = 40000, compressed_chars: int = 12000) -> str:
    """The judge's prompt for one compressed record (fields of ``compressed.jsonl``)."""
    return PROMPT.format(question=rec.get("question", ""), answer=rec.get("gold", ""),
                         raw=middle_truncate(rec.get("original_reasoning", ""), raw_chars),
                         compressed=middle_truncate(rec.get("reasoning", ""), compressed_chars))


def parse(text: str, finish_reason: str = "stop") -> tuple[Verdict | None, str | None]:
    """``(verdict, None)`` or ``(None, reason)``: cut at the token cap, invalid JSON, or schema mismatch."""
    if finish_reason == "length":
        return None, "truncated at the judge's token cap"
    if finish_reason == "error":
        return None, "request failed"
    body = text.strip()
    m = re.search(r"\{.*\}", body, re.DOTALL)  # tolerate a reasoning preamble or code fences
    try:
        return Verdict.model_validate(json.loads(m.group(0) if m else body)), None
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg}"
    except ValidationError as e:
        return None, "schema: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())


_EQ = re.compile(r"(-?\d+)\s*([-+*])\s*(-?\d+)\s*=\s*(-?\d+)")


def rule_verdict(rec: dict[str, Any]) -> Verdict:
    """The toy world's judge: every equation true and present in the raw trace, and the answer reached."""
    raw, comp = rec.get("original_reasoning", ""), rec.get("reasoning", "")
    if not raw.strip() or not comp.strip():
        mode = "empty_original" if not raw.strip() else "empty_compressed"
        return Verdict(faithfulness=1, coverage=1, clarity=1, verdict="unfaithful", answer_alignment=False,
                       failure_modes=[mode], rationale=f"{mode.replace('_', ' ')} trace")
    eqs = _EQ.findall(comp)
    raw_eqs = set(_EQ.findall(raw))
    false = [e for e in eqs if {"+": int(e[0]) + int(e[2]), "-": int(e[0]) - int(e[2]),
                                "*": int(e[0]) * int(e[2])}[e[1]] != int(e[3])]
    unsupported = [e for e in eqs if e not in raw_eqs]
    aligned = answers.verify(answers.extract(comp, rec["answer_type"], rec.get("choices")), rec["gold"],
                             rec["answer_type"])
    modes: list[str] = []
    if false:
        modes.append("contradiction")
    if unsupported:
        modes.append("unsupported_claim")
    if not aligned:
        modes.append("answer_mismatch")
    missing = [e for e in raw_eqs if e not in set(eqs)]
    if missing and not eqs:
        modes.append("omitted_key_step")
    faith = 5 - 2 * bool(false) - 2 * bool(unsupported)
    coverage = 5 if not missing else max(1, 5 - len(missing))
    verdict = "faithful" if not modes else ("unfaithful" if false or not aligned else "partially_faithful")
    return Verdict(faithfulness=max(faith, 1), coverage=coverage, clarity=5 if eqs else 3, verdict=verdict,
                   answer_alignment=aligned, failure_modes=modes,
                   rationale=f"{len(eqs)} equations, {len(false)} false, {len(unsupported)} not in the raw trace")


def run(P: JudgeParams, engine=None) -> dict[str, Any]:
    """Judge every compressed record of ``P.compressed`` not yet in ``judgements.jsonl``; return metrics.

    A transient engine error is no verdict: it is not stored, and records left so
    raise :class:`cdlib.engines.UnansweredError` (the cell fails; a rerun sends exactly those).
    A judge that answered no request at all raises :class:`cdlib.engines.NothingAnsweredError`.
    """
    recs = read_upstream(Path(P.compressed) / "compressed.jsonl", "judge")
    skip = set(P.exclude_datasets)  # Table 10's scope leaves the MMLU groups out (params/paper.yaml)
    recs = [r for r in recs if r.get("dataset") not in skip]
    if P.limit:
        recs = recs[: P.limit]
    out = Store(Path(P.out_dir) / "judgements.jsonl", writable=True)

    def base(r: dict[str, Any]) -> dict[str, Any]:
        return {k: r.get(k) for k in ("id", "dataset", "domain", "group", "compressor", "flag")}

    if P.judge == "rule":
        out.append({**base(r), **rule_verdict(r).model_dump(), "parse_error": None} for r in recs if r["id"] not in out)
        return metrics(P.out_dir)

    def ask(eng: Engine, rows: list[dict[str, Any]], attempt: int) -> list[Completion]:
        chats = [[{"role": "user", "content": build_prompt(r, P.raw_chars, P.compressed_chars)}] for r in rows]
        return eng.generate(chats, P.sampling, json_schema=SCHEMA, rows=rows)

    def take(attempt: int, pairs: list[tuple[dict[str, Any], Completion]]) -> None:
        batch = []
        for r, c in pairs:
            if c.transient:  # no verdict: not stored, sent again by a rerun
                continue
            v, err = parse(c.answer if c.answer else c.text, c.finish_reason)
            batch.append({**base(r), **(v.model_dump() if v else {}), "parse_error": err, "raw_response": c.text,
                          "error": c.error})
        out.append(batch)

    answer_missing("judge", recs, out, engine or (lambda: get_engine(P.engine)), ask, take, chunk=1024)
    return metrics(P.out_dir)


def table10(out_dir: str | Path):
    """Per-dataset verdicts (paper Table 10) plus an overall row: N, mean faithfulness, % faithful, % aligned."""
    import polars as pl

    df = Store(Path(out_dir) / "judgements.jsonl").to_polars()
    if df.is_empty():
        return pl.DataFrame()
    counts = dict(n=pl.len(), parse_failures=pl.col("parse_error").is_not_null().sum())
    means = ["faithfulness", "pct_faithful", "pct_aligned"]  # over the parsed verdicts, as in Table 10
    ok = judged(df)
    per = df.group_by("dataset").agg(**counts).join(judge_means(ok, ["dataset"]).select("dataset", *means),
                                                    on="dataset", how="left").sort("dataset")
    none = pl.DataFrame({m: [None] for m in means}, schema={m: pl.Float64 for m in means})  # nothing parsed
    overall = pl.concat([df.select(dataset=pl.lit("overall"), **counts),
                         judge_means(ok, []).select(means) if ok.height else none], how="horizontal")
    return pl.concat([per, overall], how="vertical_relaxed")


def metrics(out_dir: str | Path) -> dict[str, Any]:
    """metrics.json content: Table 10 rows, overall figures and failure-mode counts."""
    import polars as pl

    t = table10(out_dir)
    if t.is_empty():
        return {"n": 0}
    df = Store(Path(out_dir) / "judgements.jsonl").to_polars()
    modes: dict[str, int] = {}
    if "failure_modes" in df.columns:
        for ms in df["failure_modes"].drop_nulls().to_list():
            for m in ms:
                modes[m] = modes.get(m, 0) + 1
    overall = t.filter(pl.col("dataset") == "overall").to_dicts()[0]
    return {"per_dataset": t.filter(pl.col("dataset") != "overall").to_dicts(),
            **{k: overall[k] for k in ("n", "parse_failures", "faithfulness", "pct_faithful", "pct_aligned")},
            "failure_modes": modes}


def failure_mode_table(metrics: dict[str, Any]):
    """Failure modes named by the judge (:func:`metrics`' ``failure_modes``; a trace can have several) and
    how often, most frequent first, as a polars frame."""
    return count_table(metrics.get("failure_modes", {}), "failure_mode")


EXAMPLE_COLUMNS = ("id", "dataset", "faithfulness", "verdict", "answer_alignment", "failure_modes", "rationale")


def _least_faithful_first(out_dir: str | Path, compressed: str | Path):
    """The judgements of a judge cell beside each compression's ``reasoning`` (from the compress cell
    ``compressed``, flagged ones included), least faithful first, parse failures (no score) before all."""
    from cdlib.compress import load

    judged = Store(Path(out_dir) / "judgements.jsonl").to_polars()
    if judged.is_empty():
        return judged
    joined = judged.join(load(compressed, include_flagged=True).select("id", "reasoning"), on="id", how="left")
    return joined.sort("faithfulness", nulls_last=False)


def least_faithful(out_dir: str | Path, compressed: str | Path, n: int = 10):
    """The ``n`` least faithful judged compressions with the judge's verdict: :data:`EXAMPLE_COLUMNS`."""
    df = _least_faithful_first(out_dir, compressed)
    return df.select(EXAMPLE_COLUMNS).head(n) if not df.is_empty() else df


def least_faithful_text(out_dir: str | Path, compressed: str | Path, n: int = 2, chars: int = 1500) -> str:
    """The ``n`` least faithful compressions as text: a line with id, verdict, faithfulness and the judge's
    rationale, then the compression's first ``chars`` characters."""
    rows = _least_faithful_first(out_dir, compressed).head(n).to_dicts()
    return "\n".join(f"--- {r['id']}: {r['verdict']} (faithfulness {r['faithfulness']}); {r['rationale']}\n"
                     f"{(r['reasoning'] or '')[:chars]}\n" for r in rows)
