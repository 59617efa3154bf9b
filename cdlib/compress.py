"""Stage 2: trace compression (paper section 3.2, Appendix B, Table 5).

Two kinds of compressor:

* ``extractive`` needs no model and works on any trace: it keeps the sentences
  that carry computation or new claims and drops hedges, re-checks and
  restatements (:func:`extractive`);
* ``toy-rewriter`` (toy world only) stands in for a teacher rewriting a student's
  trajectory (Mixed-Policy Distillation): whatever the trajectory, it writes the
  correct minimal solution, one equation per step (:func:`cdlib.toy.solution_steps`),
  each crossing of a ten worked in words when the student's samples work that way,
  and the final answer (:func:`toy_rewrite`);
* any other name is a model behind ``cdlib.engines`` given a generic prompt
  (question, trace, verified answer -> a shorter trace keeping the essential
  steps, insights and the final answer) at temperature 0.3, or, for
  Mixed-Policy Distillation, a prompt to rewrite a *student's* reasoning.

The paper does not print its compression prompt (section 3.2 only describes it),
so the shipped one is named ``reconstructed``: our wording of that description,
not the authors' text. ``prompt`` may also be a path to a text file holding a
template with the ``{question}``, ``{reasoning}`` and ``{answer}`` fields
(:func:`prompt_template`).

Every compressed trace gets per-example ratios in characters and tokens and an
answer-preservation check (the paper's future work, section 7): a compression
that is empty, degenerate, longer than the original, drops the verified answer or
contradicts it is *flagged* (``flag``). What happens next is two options:
``recompress_attempts`` retries flagged ones, and ``drop_flagged`` marks what is
still flagged as ``drop`` so that truncation, training and the compression
tables leave it out (:func:`cdlib.outputs.dropped`). The paper compresses every trace once
and trains on every compression (``recompress_attempts: 0``, ``drop_flagged:
false`` in ``params/paper.yaml``): every source then trains on the same question
ids and the flags are only reported. The verified final answer itself is kept
unchanged (``answer``).

A request that ends in a permanent engine error (flag ``error``: the engine
answered with an error that sending it again cannot fix) is a compression that
never came back, not an empty trace: it is always dropped, whatever
``drop_flagged`` says (:func:`cdlib.outputs.failed`), so no length-matched cut is made to 0
tokens. Training runs that name this cell in ``same_questions_as`` leave that
question out of every source alike (:func:`cdlib.training.data.load_records`).

Input traces may come from student sampling with ``keep="all"`` (MPD): a trace
whose ``correct`` is False carries a wrong answer, so the rewriter is given the gold
answer as the verified one, the record's ``answer`` becomes the gold answer, and
with ``prompt="rewrite_student"`` a rewrite may be longer than the student's
trajectory (a short wrong attempt needs more steps once fixed).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cdlib.progress import tqdm  # text inside grid cells (log.txt), widgets in JupyterLab

from cdlib import answers, tokenizer
from cdlib.engines import Completion, Engine, answer_missing, get_engine
from cdlib.outputs import dropped_expr
from cdlib.params import CompressParams
from cdlib.store import Store, read_upstream
from cdlib.toy import concise_solution, works_in_words
from cdlib.traces import parse_response

# Our reconstruction of the prompt the paper describes in section 3.2 (it is not printed there).
RECONSTRUCTED_PROMPT = """You are given a question, a model's reasoning trace for it, and the verified final answer.
Rewrite the reasoning as a much shorter trace that keeps the essential logical steps, the key
insights and every calculation needed to reach the answer, and drops repetition, false starts,
hedging and re-checking. Do not add new claims. End with the final answer.
Write only the shortened reasoning.

Question:
{question}

Reasoning trace:
{reasoning}

Verified final answer:
{answer}"""

REWRITE_STUDENT_PROMPT = """A student model wrote the reasoning below for the question. Rewrite it as a concise,
correct reasoning trace in the student's own style: keep its useful steps, fix or remove wrong
or wasted steps, drop repetition and hedging, and reach the verified final answer.
Write only the rewritten reasoning.

Question:
{question}

Student reasoning:
{reasoning}

Verified final answer:
{answer}"""

PROMPTS = {"reconstructed": RECONSTRUCTED_PROMPT, "rewrite_student": REWRITE_STUDENT_PROMPT}
PROMPT_FIELDS = ("question", "reasoning", "answer")


def prompt_template(prompt: str) -> str:
    """The compression prompt template named ``prompt``: a key of :data:`PROMPTS` or a text file's path.

    A file must use exactly the fields ``{question}``, ``{reasoning}`` and
    ``{answer}`` (literal braces doubled, as in :meth:`str.format`).
    """
    import string

    if prompt in PROMPTS:
        return PROMPTS[prompt]
    path = Path(prompt)
    if not path.is_file():
        hint = " (the shipped prompt was renamed 'reconstructed': the paper does not print its prompt)" \
            if prompt == "paper" else ""
        raise ValueError(f"compress: prompt {prompt!r} is neither one of {', '.join(PROMPTS)} nor a file{hint}")
    text = path.read_text()
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as e:
        raise ValueError(f"compress: prompt file {path}: {e} (write literal braces as {{{{ and }}}})") from None
    if fields != set(PROMPT_FIELDS):
        raise ValueError(f"compress: prompt file {path} has fields {sorted(fields)}; it needs exactly "
                         f"{{question}}, {{reasoning}} and {{answer}}")
    return text


RULE_BASED = ("extractive", "toy-rewriter")  # compressors that need no model

FLAGS = ("empty", "degenerate_repetition", "longer_than_original", "drops_answer", "contradicts_answer", "error")

# ------------------------------------------------------------------ extractive compressor

_SENTENCE = re.compile(r"[^\n.!?]*(?:[.!?](?=\s|$)|\n|$)")
_COMPUTATION = re.compile(r"\d\s*(?:[-+*/×÷^=<>]|\\times|\\frac|\\cdot)\s*[\d(\\]|=")
_HEDGE = re.compile(
    r"^(?:wait|hmm+|um+|okay|ok|alright|so,? let me|let me (?:double[- ]?check|check|verify|re-?read|make sure|"
    r"think|see|confirm|reconsider|go back|keep going)|let's (?:see|check|verify|double[- ]?check)|"
    r"actually|alternatively|double[- ]?check|to (?:confirm|be sure|double[- ]?check)|i think|i'm not sure|"
    r"that (?:seems|looks|is) right|yes|right|good|great|sure|hold on|on second thought|but wait)\b",
    re.IGNORECASE)
_CONCLUSION = re.compile(r"\b(?:therefore|thus|hence|so the|the answer|final answer|which means|we get|"
                         r"because|since|implies|must be|is correct|correct answer|rule out|eliminat)\b", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_WORDS = re.compile(r"[a-z]+")


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w=+\-*/]", " ", s.lower())).strip()


def extractive(reasoning: str, question: str = "") -> str:
    """Keep the load-bearing sentences of a trace: computations and new claims, in order.

    Dropped: hedges and re-checks (``Wait``, ``Let me double check``, ``Hmm``),
    exact repeats of an earlier kept step, restatements of the question, and
    sentences whose numbers were all stated before and that compute nothing.
    The last sentence that states a conclusion is always kept. Never returns an
    empty string for a non-empty trace.
    """
    sents = _sentences(reasoning)
    if not sents:
        return ""
    q_words = set(_WORDS.findall(question.lower()))
    seen_numbers = set(_NUMBER.findall(question))
    seen: set[str] = set()
    keep: list[str] = []
    for s in sents:
        key = _norm(s)
        if not key or key in seen:
            continue
        computes = bool(_COMPUTATION.search(s))
        nums = set(_NUMBER.findall(s))
        words = set(_WORDS.findall(s.lower()))
        if not computes and _HEDGE.match(s):
            continue
        if computes:
            if _HEDGE.match(s) and key.split("=")[-1].strip() and any(_norm(k) in key for k in keep if "=" in k):
                continue  # a re-check of a step already kept
            keep.append(s)
        elif nums and not nums <= seen_numbers:
            keep.append(s)  # a claim with a new quantity
        elif _CONCLUSION.search(s) and words and len(words & q_words) / len(words) < 0.6:
            keep.append(s)  # a reasoning claim that is not a restatement of the question
        seen.add(key)
        seen_numbers |= nums
    final = next((s for s in reversed(sents) if _CONCLUSION.search(s) or _NUMBER.search(s)), sents[-1])
    if final not in keep:
        keep.append(final)
    return "\n".join(keep)


def toy_rewrite(rec: dict[str, Any], in_words: bool | None = None) -> str:
    """The toy world's stand-in for a teacher rewriting a trajectory (:func:`cdlib.toy.concise_solution`).

    ``rec`` is a toy trace record (or a question row): every value is the correct one, since the toy
    teacher knows the solution of every toy question, and a student that works steps out in words
    ("Let me think: ...") keeps that way of working: with ``in_words`` every crossing of a ten is worked in
    words, also where this trajectory skipped it (:func:`run` reads it off all the student's trajectories;
    by default, off this one alone). The conclusion is worded as the toy teacher words it ("So the final
    number of pens is 3."), as a real teacher rewrites in its own words.
    """
    in_words = works_in_words(rec.get("reasoning")) if in_words is None else in_words
    return concise_solution(rec, work_in_words=in_words)


def verified_answer(rec: dict[str, Any]) -> str:
    """The answer a compressor is told is verified: the trace's own, or the gold one for a wrong trace."""
    if rec.get("correct") is False:
        return str(rec.get("gold", ""))
    return rec.get("answer") or rec.get("extracted") or str(rec.get("gold", ""))


# ------------------------------------------------------------------ checks


def check(compressed: str, original: str, rec: dict[str, Any], allow_longer: bool = False) -> str | None:
    """The first problem of a compressed trace (one of :data:`FLAGS`), or None if it looks sound.

    ``allow_longer`` skips the ``longer_than_original`` check (rewrites of student trajectories).
    """
    text = compressed.strip()
    if not text:
        return "empty"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) >= 6 and len(set(lines)) <= len(lines) / 3:
        return "degenerate_repetition"
    if not allow_longer and len(text) > len(original.strip()) > 0:
        return "longer_than_original"
    ex = answers.extract_detailed(text, rec["answer_type"], rec.get("choices"))
    if ex.value is None:
        return "drops_answer"
    if not answers.verify(ex.value, rec["gold"], rec["answer_type"]):
        return "contradicts_answer"
    return None


def _model_output(text: str) -> str:
    """The compression itself: a reasoning model's answer part, else the whole text."""
    parsed = parse_response(text)
    return parsed.answer if parsed.format != "plain" and parsed.answer else text.strip()


# ------------------------------------------------------------------ stage


def _record(rec: dict[str, Any], compressed: str, P: CompressParams, flag: str | None, attempts: int,
            error: str | None = None) -> dict[str, Any]:
    keep = ("id", "dataset", "domain", "group", "split", "question", "choices", "gold", "answer_type", "answer",
            "extracted")
    fixed = {}
    if rec.get("correct") is False:  # a wrong student trajectory: train towards the gold answer
        fixed = {"answer": f"The answer is \\boxed{{{rec.get('gold')}}}.", "extracted": rec.get("gold"),
                 "original_correct": False}
    return {**{k: rec.get(k) for k in keep}, **fixed, "reasoning": compressed,
            "original_reasoning": rec.get("reasoning", ""),
            "compressor": P.compressor, "flag": flag, "drop": flag == "error" or (flag is not None and P.drop_flagged),
            "attempts": attempts, "error": error,
            "original_chars": len(rec.get("reasoning", "")), "compressed_chars": len(compressed)}


def run(P: CompressParams, engine=None) -> dict[str, Any]:
    """Compress every trace of ``P.traces`` not yet in ``P.out_dir/compressed.jsonl``; return the metrics.

    A flagged compression is sent again up to ``recompress_attempts`` times. Each
    answered request of a model compressor is written to ``attempts.jsonl`` (id
    ``<trace id>#a<attempt>``) before the next one is sent, so a rerun resumes each
    trace at its next attempt and the budget of ``1 + recompress_attempts`` answered
    requests per trace holds across runs. A transient engine error uses up no attempt
    and is never stored: traces still without an answer because of errors at the end
    raise :class:`cdlib.engines.UnansweredError` (the cell fails; a rerun sends exactly
    those). Traces whose every request failed (not one answer) raise
    :class:`cdlib.engines.NothingAnsweredError` naming the first error.
    """
    src = read_upstream(Path(P.traces) / "traces.jsonl", "compress")
    if P.limit:
        src = src[: P.limit]
    out = Store(Path(P.out_dir) / "compressed.jsonl", writable=True)
    if P.compressor in RULE_BASED:
        todo = [r for r in src if r["id"] not in out]
        longer_ok = P.prompt == "rewrite_student"
        # the toy teacher reads the student's way of working off all its trajectories: a rewrite of a sample
        # that skipped the words on a crossing would teach the student to skip them (benchmarks/README.md)
        in_words = P.compressor == "toy-rewriter" and any(works_in_words(r.get("reasoning")) for r in src)
        batch = []
        for r in tqdm(todo, desc=f"{P.compressor} compression", unit="trace"):
            if P.compressor == "extractive":
                c = extractive(r.get("reasoning", ""), r.get("question", ""))
            else:
                c = toy_rewrite(r, in_words)
            flag = check(c, r.get("reasoning", ""), r, allow_longer=longer_ok) if P.check_answer else None
            batch.append(_record(r, c, P, flag, 1))
            if len(batch) >= 1000:
                out.append(batch)
                batch = []
        out.append(batch)
        _add_token_counts(Path(P.out_dir), P)
    else:
        _compress_with_model(P, src, out, engine)
    return metrics(P.out_dir)


def _compress_with_model(P: CompressParams, src: list[dict[str, Any]], out: Store, engine: Any) -> None:
    """A model compressor over the traces ``out`` lacks, under :func:`cdlib.engines.answer_missing`'s
    retry rules: ``1 + recompress_attempts`` answered requests per trace, counted across runs from
    ``attempts.jsonl``; what is still flagged at the end is kept with its flag."""
    template = prompt_template(P.prompt)
    longer_ok = P.prompt == "rewrite_student"
    ids = {r["id"] for r in src if r["id"] not in out}
    tried = Store(Path(P.out_dir) / "attempts.jsonl", writable=bool(ids))  # no empty file for a finished cell
    last: dict[str, tuple[str, str | None, str | None]] = {}  # last answer per trace: text, flag, error
    tries: dict[str, int] = {}  # answered requests per trace, over every run (a transient error is not one)
    for a in tried:
        if a["trace_id"] in ids and a["attempt"] + 1 > tries.get(a["trace_id"], 0):
            tries[a["trace_id"]] = a["attempt"] + 1
            last[a["trace_id"]] = (a["reasoning"], a["flag"], a["error"])

    def ask(eng: Engine, rows: list[dict[str, Any]], attempt: int) -> list[Completion]:
        chats = [[{"role": "user", "content": template.format(
            question=r.get("question", ""), reasoning=r.get("reasoning", ""),
            answer=verified_answer(r))}] for r in rows]
        sampling = (P.sampling.model_copy(update={"seed": (P.sampling.seed or 0) + attempt}) if attempt
                    else P.sampling)
        return eng.generate(chats, sampling, rows=rows)

    def take(attempt: int, pairs: list[tuple[dict[str, Any], Completion]]) -> list[str]:
        good, answered = [], []
        for r, c in pairs:
            if c.transient:
                continue
            text = _model_output(c.text) if c.finish_reason != "error" else ""
            if c.finish_reason == "error":
                flag = "error"
            elif P.check_answer:
                flag = check(text, r.get("reasoning", ""), r, allow_longer=longer_ok)
            else:
                flag = None if text.strip() else "empty"
            last[r["id"]] = (text, flag, c.error)
            answered.append({"id": f"{r['id']}#a{attempt}", "trace_id": r["id"], "attempt": attempt,
                             "flag": flag, "error": c.error, "reasoning": text})
            if flag is None:
                good.append(_record(r, text, P, None, attempt + 1))
        out.append(good)  # sound compressions are kept as soon as they exist
        tried.append(answered)  # before the next attempt: a rerun counts these
        return [g["id"] for g in good]

    def finish(left: list[dict[str, Any]]) -> None:
        # what is still flagged after every attempt is kept, with its flag, so it is seen and counted;
        # a trace left without an answer by engine errors is not stored: a rerun sends it again
        out.append([_record(r, last[r["id"]][0], P, last[r["id"]][1], tries[r["id"]], last[r["id"]][2])
                    for r in left])
        _add_token_counts(Path(P.out_dir), P)

    answer_missing("compress", src, out, engine or (lambda: get_engine(P.engine)), ask, take,
                   budget=1 + P.recompress_attempts, used=tries, finish=finish)


def _add_token_counts(out_dir: Path, P: CompressParams) -> None:
    """Write ``tokens.jsonl``: original and compressed token counts per record (compressor's tokenizer)."""
    out = Store(out_dir / "tokens.jsonl", writable=True)
    recs = [r for r in Store(out_dir / "compressed.jsonl") if r["id"] not in out]
    if not recs:
        return
    model_based = P.compressor not in RULE_BASED and P.engine.kind != "toy"
    name = P.tokenizer or ((P.engine.tokenizer or P.engine.model) if model_based else "whitespace")
    orig = tokenizer.count([r["original_reasoning"] for r in recs], name)
    comp = tokenizer.count([r["reasoning"] for r in recs], name)
    out.append({"id": r["id"], "original_tokens": o, "compressed_tokens": c, "tokenizer": name}
               for r, o, c in zip(recs, orig, comp))


def load(out_dir: str | Path, include_flagged: bool = False):
    """Compressed records joined with token counts and ratios, as a polars frame.

    Without ``include_flagged``, records :func:`cdlib.outputs.dropped` downstream are left out (none with
    ``drop_flagged: false``).
    """
    import polars as pl

    out_dir = Path(out_dir)
    df = Store(out_dir / "compressed.jsonl").to_polars()
    if df.is_empty():
        return df
    tok = Store(out_dir / "tokens.jsonl").to_polars()
    if not tok.is_empty():
        df = df.join(tok, on="id", how="left")
    df = df.with_columns(rho_chars=pl.col("compressed_chars") / pl.col("original_chars"))
    if "original_tokens" in df.columns:
        df = df.with_columns(rho_tokens=pl.col("compressed_tokens") / pl.col("original_tokens"))
    if include_flagged:
        return df
    if "drop" not in df.columns:
        df = df.with_columns(drop=pl.lit(None, dtype=pl.Boolean))
    return df.filter(~dropped_expr())


def table5(out_dir: str | Path):
    """Per-dataset compression statistics (paper Table 5) plus an ``overall`` row.

    ``rho`` is the ratio of mean compressed to mean original characters, as in the
    table's caption; ``rho_mean`` is the mean of per-example ratios (the text's "mean ratio").
    Lengths and ratios cover the records kept for training (every record, as in the
    paper, with ``drop_flagged: false``, less the failed ones); ``n``, ``flagged``, ``flag_rate``,
    ``failed`` (compressions that never came back: left out of every source) and ``dropped`` count
    every compression the checker saw.
    """
    import polars as pl

    from cdlib.tables import compression_means, flag_counts

    df = load(out_dir, include_flagged=True)
    if df.is_empty():
        return pl.DataFrame()
    if "drop" not in df.columns:
        df = df.with_columns(drop=pl.lit(None, dtype=pl.Boolean))
    kept = df.filter(~dropped_expr())
    own = dict(mean_original_chars=pl.col("original_chars").mean(), rho_mean=pl.col("rho_chars").mean(),
               rho_tokens_mean=pl.col("rho_tokens").mean())
    columns = ["dataset", "n", "flagged", "flag_rate", "failed", "dropped", "mean_original_chars",
               "mean_compressed_chars", "mean_compressed_tokens", "rho", "rho_mean", "rho_tokens_mean"]
    per = df.group_by("dataset").agg(**flag_counts(dropped_expr())).join(
        kept.group_by("dataset").agg(**own).join(compression_means(kept, ["dataset"]), on="dataset"),
        on="dataset", how="left")
    overall = df.select(dataset=pl.lit("overall"), **flag_counts(dropped_expr()))
    if kept.height:  # else every mean stays null
        overall = pl.concat([overall, kept.select(**own), compression_means(kept, [])], how="horizontal")
    return pl.concat([per.sort("dataset").select(columns), overall], how="diagonal_relaxed").select(columns)


def metrics(out_dir: str | Path) -> dict[str, Any]:
    """metrics.json content: Table 5 rows, overall ratios and flag counts."""
    import polars as pl

    t5 = table5(out_dir)
    if t5.is_empty():
        return {"per_dataset": [], "n": 0}
    overall = t5.filter(pl.col("dataset") == "overall").to_dicts()[0]
    flags = load(out_dir, include_flagged=True).group_by("flag").len().drop_nulls("flag")
    keys = ("n", "flagged", "flag_rate", "failed", "dropped", "mean_compressed_chars", "mean_compressed_tokens", "rho",
            "rho_mean", "rho_tokens_mean")
    return {"per_dataset": t5.filter(pl.col("dataset") != "overall").to_dicts(), **{k: overall[k] for k in keys},
            "flags": dict(zip(flags["flag"], flags["len"]))}
