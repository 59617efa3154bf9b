"""The papers' headline findings, each checked on a grid's runs: the first section of the report.

Each :class:`Claim` is one sentence of Compress-Distill (abstract, section 4), Distilling the Essence
or Mixed-Policy Distillation (their abstracts), with a measure computed per *configuration* (teacher,
student, method: one training recipe, which on the demo's seed grid includes the seed) from the run
layout of :mod:`cdlib.student_runs` (overall rows). The same measure on the published runs
(:func:`cdlib.paper.runs`) gives the paper's own figure beside the grid's, where the paper's tables
allow it; the neighbours' figures come from their abstracts.

A claim holds on a grid when it holds in every configuration that can show it. Orderings use the
rule of ``make demo-seeds``: a win is a gap of more than :data:`Z` standard errors of the difference
(the runs' ``se``); "beats or matches" only asks that the other side does not win. Ratios are judged
against the weakest end of the paper's stated range, within 5% (``training tokens at 12-30% of raw``
holds at 31.5% or less; the paper's median reasoning gives 2.9x where its text says 3x). A
claim that does not hold says why in one sentence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl

Z = 1.96  # a win: the gap exceeds 1.96 standard errors of the difference (two-sided 95%)

CD, DTE, MPD = "Compress-Distill", "Distilling the Essence", "Mixed-Policy Distillation"
NOT_COMPRESSED = {"raw", "answer_only", "truncated", "pretrain", "untrained", "mpd", "mpd-sft"}
RETAINED_DTE = 0.75  # the demo's bar for DtE's 50% cut (the paper: ~91% on average)


def margin(se_a: float | None, se_b: float | None) -> float:
    """The smallest accuracy gap that counts as a win: :data:`Z` standard errors of the difference of two
    independent accuracies (conservative: both students answer the same questions)."""
    return Z * ((se_a or 0.0) ** 2 + (se_b or 0.0) ** 2) ** 0.5


@dataclass
class Outcome:
    """One claim in one configuration: the measured value, as shown, and whether it holds (with why not)."""

    value: float | None
    shown: str
    held: bool
    why: str = ""


Runs = dict[str, dict[str, Any]]  # source -> that run's overall row, one configuration


def compressed_sources(runs: Runs) -> list[str]:
    """Sources trained on compressed traces (any source not raw, answer-only, truncated, a base or a neighbour)."""
    return sorted(s for s in runs if s not in NOT_COMPRESSED and not s.startswith(("dte-", "kl-")) and "+" not in s)


def _wins(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    """(gap a - b, the margin a win needs)."""
    return a["accuracy"] - b["accuracy"], margin(a.get("se"), b.get("se"))


def _ratio(num: Any, den: Any) -> float | None:
    return float(num) / float(den) if num is not None and den not in (None, 0) else None


# --------------------------------------------------------------------------- the measures


def raw_best(r: Runs) -> Outcome | None:
    """Raw beats every other main-grid source (compressed, answer-only) by more than the noise."""
    others = compressed_sources(r) + (["answer_only"] if "answer_only" in r else [])
    if "raw" not in r or not others:
        return None
    worst = min(others, key=lambda s: _wins(r["raw"], r[s])[0] - _wins(r["raw"], r[s])[1])
    gap, need = _wins(r["raw"], r[worst])
    shown = f"raw {r['raw']['accuracy']:.3f} vs {worst} {r[worst]['accuracy']:.3f}"
    if gap > need:
        return Outcome(gap, shown, True)
    if gap < -need:
        return Outcome(gap, shown, False, f"{worst} beats raw by {-gap:.3f} (more than {need:.3f})")
    return Outcome(gap, shown, False, f"raw leads {worst} by {gap:.3f}, within the noise ({need:.3f})")


def retained(r: Runs) -> Outcome | None:
    """The best compressed accuracy / raw accuracy: at most 1 (raw stays best) and at least a half (the paper's
    lowest is 89%, "up to 96%" its highest)."""
    comps = compressed_sources(r)
    if "raw" not in r or not comps or not r["raw"]["accuracy"]:
        return None
    best = max(comps, key=lambda s: r[s]["accuracy"])
    ratio = r[best]["accuracy"] / r["raw"]["accuracy"]
    shown = f"{ratio:.0%} ({best})"
    if ratio > 1:
        return Outcome(ratio, shown, False, f"{best} is more accurate than raw")
    if ratio < 0.5:
        return Outcome(ratio, shown, False, f"{best} keeps less than half of raw's accuracy")
    return Outcome(ratio, shown, True)


def _cost_ratio(column: str, inverse: bool, bound: float, what: str,
                given: str | None = None) -> Callable[[Runs], Outcome | None]:
    """A measure of raw's ``column`` over a compressed run's (``inverse``) or the other way round, judged against
    ``bound``; ``given`` names a column holding the ratio itself where a table prints it (the paper's Table 6
    speed-up, computed from hours it rounds to 0.1)."""
    def measure(r: Runs) -> Outcome | None:
        if "raw" not in r:
            return None
        raw = r["raw"].get(column)
        values = {s: (r[s].get(given) if given and r[s].get(given) is not None else
                      _ratio(raw, r[s].get(column)) if inverse else _ratio(r[s].get(column), raw))
                  for s in compressed_sources(r)}
        values = {s: v for s, v in values.items() if v is not None}  # missing, or a zero denominator: nothing
        if not values:
            return None
        s = min(values, key=values.get) if inverse else max(values, key=values.get)  # the weakest compressor
        v = values[s]
        shown = f"{v:.1f}x ({s})" if inverse else f"{v:.0%} ({s})"
        # within 5% of the paper's weakest end: its own runs give 2.9x shorter reasoning where its text says 3x
        ok = v >= 0.95 * bound if inverse else v <= 1.05 * bound
        return Outcome(v, shown, ok, "" if ok else f"{what}: {shown}, the paper's weakest is "
                                                   f"{f'{bound:g}x' if inverse else f'{bound:.0%}'}")
    return measure


def beats_or_matches_truncation(r: Runs) -> Outcome | None:
    """The best compressed source is not beaten by length-matched truncation."""
    comps = compressed_sources(r)
    if "truncated" not in r or not comps:
        return None
    best = max(comps, key=lambda s: r[s]["accuracy"])
    gap, need = _wins(r[best], r["truncated"])
    shown = f"{best} {r[best]['accuracy']:.3f} vs truncated {r['truncated']['accuracy']:.3f}"
    if gap < -need:
        return Outcome(gap, shown, False, f"truncation beats {best} by {-gap:.3f} (more than {need:.3f})")
    return Outcome(gap, shown, True)


def answer_only_cheapest(r: Runs) -> Outcome | None:
    """Answer-only trains on the fewest tokens of the main-grid sources."""
    main = [s for s in ["raw", "answer_only", *compressed_sources(r)] if s in r and r[s].get("train_tokens")]
    if "answer_only" not in main or len(main) < 2:
        return None
    cheapest = min(main, key=lambda s: r[s]["train_tokens"])
    v = r["answer_only"]["train_tokens"] / r["raw"]["train_tokens"] if "raw" in main else None
    shown = f"{v:.0%} of raw's tokens" if v is not None else f"{r['answer_only']['train_tokens']:,} tokens"
    return Outcome(v, shown, cheapest == "answer_only", "" if cheapest == "answer_only" else f"{cheapest} is cheaper")


def answer_only_worst(r: Runs) -> Outcome | None:
    """Every other main-grid source (raw, compressed) beats answer-only by more than the noise."""
    others = [s for s in ["raw", *compressed_sources(r)] if s in r]
    if "answer_only" not in r or not others:
        return None
    closest = min(others, key=lambda s: _wins(r[s], r["answer_only"])[0] - _wins(r[s], r["answer_only"])[1])
    gap, need = _wins(r[closest], r["answer_only"])
    shown = f"answer-only {r['answer_only']['accuracy']:.3f} vs {closest} {r[closest]['accuracy']:.3f}"
    if gap > need:
        return Outcome(gap, shown, True)
    if gap < 0:
        return Outcome(gap, shown, False, f"answer-only leads {closest} by {-gap:.3f}")
    return Outcome(gap, shown, False, f"{closest} leads answer-only by {gap:.3f}, not more than the noise ({need:.3f})")


def answer_only_unstable(r: Runs) -> Outcome | None:
    """Full fine-tuning only: answer-only collapses (half its answers hit the cap, or under half raw's accuracy)."""
    if "answer_only" not in r or "raw" not in r or not str(r["answer_only"].get("method", "")).startswith("full"):
        return None
    a = r["answer_only"]
    trunc = a.get("truncation_rate") or 0.0
    ratio = _ratio(a["accuracy"], r["raw"]["accuracy"]) or 0.0
    shown = f"{trunc:.0%} hit the cap, {ratio:.0%} of raw's accuracy"
    ok = trunc >= 0.5 or ratio < 0.5
    return Outcome(ratio, shown, ok, "" if ok else "answer-only keeps most of raw's accuracy and ends its answers")


def dte_retained(r: Runs) -> Outcome | None:
    """Distilling the Essence's 50% sequence cut / the full-sequence (raw) run's accuracy, at least RETAINED_DTE."""
    if "dte-0.5" not in r or "raw" not in r or not r["raw"]["accuracy"]:
        return None
    v = r["dte-0.5"]["accuracy"] / r["raw"]["accuracy"]
    ok = v >= RETAINED_DTE
    return Outcome(v, f"{v:.0%}", ok, "" if ok else f"the 50% cut keeps {v:.0%} of raw's accuracy, under "
                                                       f"{RETAINED_DTE:.0%}" + (
        f" ({r['dte-0.5'].get('truncation_rate') or 0:.0%} of its answers hit the cap)"
        if (r["dte-0.5"].get("truncation_rate") or 0) > 0.1 else ""))


def dte_time(r: Runs) -> Outcome | None:
    """Training time of the 50% cut / the full-sequence run's: about half (at most 0.65)."""
    if "dte-0.5" not in r or "raw" not in r:
        return None
    v = _ratio(r["dte-0.5"].get("train_hours"), r["raw"].get("train_hours"))
    if v is None:
        return None
    ok = v <= 0.65
    return Outcome(v, f"{v:.0%} of the time", ok, "" if ok else f"the cut run took {v:.0%} of the full run's time")


def _mpd(r: Runs) -> str | None:
    """The Mixed-Policy Distillation run of a configuration: ``mpd`` (KL to a teacher model), else ``mpd-sft``
    (cross-entropy on the teacher's rewrites: the KL to a teacher whose distribution is its rewrite alone, as
    the toy world's scripted teacher's is)."""
    return next((s for s in ("mpd", "mpd-sft") if s in r), None)


def mpd_shorter(r: Runs) -> Outcome | None:
    """MPD's outputs are shorter than those of the student it starts from (the raw-trace student)."""
    m = _mpd(r)
    if m is None or "raw" not in r:
        return None
    v = _ratio(r[m].get("mean_completion_tokens"), r["raw"].get("mean_completion_tokens"))
    if v is None:
        return None
    return Outcome(v, f"{1 - v:.0%} fewer tokens", v < 1, "" if v < 1 else "MPD's outputs are not shorter")


def mpd_accuracy(r: Runs) -> Outcome | None:
    """MPD is not beaten by the student it starts from (no accuracy lost)."""
    m = _mpd(r)
    if m is None or "raw" not in r:
        return None
    gap, need = _wins(r[m], r["raw"])
    shown = f"{m} {r[m]['accuracy']:.3f} vs its start {r['raw']['accuracy']:.3f}"
    if gap < -need:
        return Outcome(gap, shown, False, f"MPD loses {-gap:.3f} against its start (more than {need:.3f})")
    return Outcome(gap, shown, True)


@dataclass(frozen=True)
class Claim:
    paper: str
    claim: str
    papers_figure: str  # the paper's own words or numbers
    measure: Callable[[Runs], Outcome | None]
    published: bool = True  # also measured on the paper's published runs (its tables allow it)


CLAIMS = [
    Claim(CD, "Raw traces keep the highest accuracy", "raw best at every scale, both teachers (Table 7)", raw_best),
    Claim(CD, "Compressed students keep most of raw accuracy, never more", "up to 96% of raw", retained),
    Claim(CD, "Compressed traces cut training tokens", "12-30% of raw",
          _cost_ratio("train_tokens", False, 0.30, "training tokens")),
    Claim(CD, "Compressed traces train faster", "2.0-7.6x faster",
          _cost_ratio("train_hours", True, 2.0, "training speed-up", given="speedup")),
    Claim(CD, "Compressed students reason shorter", "median reasoning 3-19x shorter (section 5)",
          _cost_ratio("median_reasoning_chars", True, 3.0, "reasoning shortening")),
    Claim(CD, "Compressed traces beat or match length-matched truncation", "usually beat or match (Table 3)",
          beats_or_matches_truncation),
    Claim(CD, "Answer-only is the cheapest", "fewest training tokens (Table 6)", answer_only_cheapest),
    Claim(CD, "Answer-only is the least accurate", "performs worst (Table 7)", answer_only_worst),
    Claim(CD, "Answer-only is unstable under full fine-tuning", "collapses: 99.9% hit the cap (Table 9)",
          answer_only_unstable),
    Claim(DTE, "The first 50% of every sequence keeps most of full-sequence accuracy",
          f"~91% on average (demo's bar: {RETAINED_DTE:.0%})", dte_retained, published=False),
    Claim(DTE, "... at about half the training time", "about 50% less time, memory and FLOPs", dte_time,
          published=False),
    Claim(MPD, "Shorter outputs than the student it starts from", "up to 27.1% fewer tokens", mpd_shorter,
          published=False),
    Claim(MPD, "No accuracy lost against the student it starts from", "better accuracy (Qwen3-1.7B)", mpd_accuracy,
          published=False),
]

CONFIG = ["teacher", "student", "method"]


def configurations(runs: pl.DataFrame) -> dict[tuple, Runs]:
    """The overall rows of ``runs`` (the run layout) per configuration (teacher, student, method): source -> row."""
    ov = runs.filter(pl.col("group") == "overall") if "group" in runs.columns else runs
    ov = ov.filter(pl.col("accuracy").is_not_null())
    if "se" not in ov.columns:
        ov = ov.with_columns(se=pl.lit(None, pl.Float64))
    out: dict[tuple, Runs] = {}
    for row in ov.to_dicts():
        out.setdefault(tuple(row.get(k) for k in CONFIG), {})[str(row["source"])] = row
    return out


def _published(claim: Claim, published: dict[tuple, Runs] | None) -> str:
    """The claim's measure on the paper's published runs: its range over configurations, or ''."""
    if not claim.published or not published:
        return ""
    outs = [o for r in published.values() if (o := claim.measure(r)) is not None and o.value is not None]
    if not outs:
        return ""
    lo, hi = min(outs, key=lambda o: o.value), max(outs, key=lambda o: o.value)
    span = lo.shown if lo is hi or lo.shown == hi.shown else f"{lo.shown} ... {hi.shown}"
    return f"holds in {sum(o.held for o in outs)} of {len(outs)} runs' configurations; {span}"


def findings(runs: pl.DataFrame, published: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per claim: paper, claim, verdict, the grid's figure per configuration, the paper's figure, why.

    ``runs`` is the run layout of :func:`cdlib.student_runs.grid_runs`; ``published`` the same layout of the
    paper's runs (:func:`cdlib.paper.runs`), measured alike where the paper's tables allow (column
    ``published``). ``verdict`` is "held" when the claim holds in every configuration that can show it,
    "not held" otherwise, "not run" when no configuration can show it.
    """
    configs = configurations(runs)
    pub = configurations(published) if published is not None else None
    rows = []
    for claim in CLAIMS:
        outs = {cfg: o for cfg, r in configs.items() if (o := claim.measure(r)) is not None}
        if not outs:
            verdict, shown, why = "not run", "", "no configuration of this grid has the runs it compares"
        else:
            failed = {cfg: o for cfg, o in outs.items() if not o.held}
            verdict = "held" if not failed else "not held"
            varying = [i for i in range(len(CONFIG)) if len({cfg[i] for cfg in outs}) > 1]  # e.g. the seed
            label = lambda cfg: "".join(f"{cfg[i]}/" for i in varying)[:-1] + ": " if varying else ""  # noqa: E731
            shown = "; ".join(label(cfg) + o.shown for cfg, o in outs.items())
            why = "; ".join((label(cfg) + o.why) for cfg, o in failed.items())
            if failed and len(outs) > 1:
                why = f"fails in {len(failed)} of {len(outs)} configurations: " + why
        rows.append({"paper": claim.paper, "claim": claim.claim, "verdict": verdict, "grid": shown,
                     "papers_figure": claim.papers_figure, "why": why, "published": _published(claim, pub)})
    return pl.DataFrame(rows)


def students(runs: pl.DataFrame) -> pl.DataFrame:
    """Every evaluated student beside the base it starts from (source ``pretrain``), overall rows: accuracy
    ± SE, output tokens, cap-hits, training tokens and hours, best first within a configuration."""
    cols = [*CONFIG, "source", "accuracy", "se", "mean_completion_tokens", "truncation_rate", "train_tokens",
            "train_hours"]
    ov = runs.filter(pl.col("group") == "overall") if "group" in runs.columns else runs
    return ov.select([c for c in cols if c in ov.columns]).sort([*CONFIG, "accuracy"], descending=[False] * 3 + [True],
                                                              nulls_last=True)
