"""Stage 1: teacher traces with rejection sampling (paper section 3.1, Appendix A).

Each round sends every pending question to the engine (one call per round, or
per ``chunk_size`` questions so a crash loses at most one chunk), extracts and
verifies each answer with :mod:`cdlib.answers`, keeps only verified-correct
traces, and drops the answered questions from the pool; up to ``rounds`` rounds.

Two stores in the cell directory make it resumable:

* ``traces.jsonl``: one record per question answered correctly (id = question id):
  the question row, the response split into ``reasoning`` and ``answer``, the
  extracted value and rule, token counts and the round it came from;
* ``attempts.jsonl``: one record per attempt (id = ``<question id>#r<round>``):
  extracted value, rule, verdict, finish reason, error.

Killed and rerun, the stage skips answered questions and finished attempts, so
no question is asked twice once answered.

Mixed-Policy Distillation's student sampling is the same stage with ``keep="all"``:
every answered attempt becomes a trace record (with ``correct`` saying whether it
was right; engine errors are retried in the next round, nothing else is), and
``model`` names the sampler, e.g. a train cell directory, resolved to its checkpoint
(and LoRA adapter) by :func:`cdlib.outputs.resolve_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cdlib.progress import tqdm  # text inside grid cells (log.txt), widgets in JupyterLab

from cdlib import answers, prompts
from cdlib.engines import Completion, Engine, answer_missing, get_engine, shard
from cdlib.outputs import engine_for
from cdlib.params import GenerateParams
from cdlib.store import Store


def load_questions(P: GenerateParams) -> list[dict[str, Any]]:
    """The question pool of this cell: each dataset's split, subsampled, then this shard's part."""
    from cdlib import datasets

    return shard(datasets.load_many(P), P.shard_index, P.num_shards)


def _trace_record(row: dict[str, Any], c: Completion, ex: answers.Extraction, rnd: int, ok: bool) -> dict[str, Any]:
    return {**{k: row.get(k) for k in ("id", "dataset", "domain", "group", "split", "question", "choices",
                                       "gold", "answer_type")},
            "response": c.text, "reasoning": c.reasoning or "", "answer": c.answer or "",
            "extracted": ex.value, "rule": ex.rule, "round": rnd, "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason, "correct": ok,
            "truncated": ex.truncated}


def _attempt_record(row: dict[str, Any], c: Completion, ex: answers.Extraction, rnd: int, ok: bool) -> dict[str, Any]:
    return {"id": f"{row['id']}#r{rnd}", "question_id": row["id"], "dataset": row["dataset"], "round": rnd,
            "correct": ok, "extracted": ex.value, "rule": ex.rule, "truncated": ex.truncated,
            "finish_reason": c.finish_reason, "error": c.error, "completion_tokens": c.completion_tokens,
            "reasoning_chars": len(c.reasoning or "")}


def engine_params(P: GenerateParams):
    """The engine of this cell: ``P.engine`` with ``P.model`` (when set) resolved to what to load.

    A train cell directory gives its checkpoint and, for LoRA students, its adapter
    (``enable_lora`` and ``lora_path`` are set for the engine).
    """
    return engine_for(P.engine, P.model) if P.model else P.engine


def _restore_attempts(traces: Store, attempts: Store) -> int:
    """Write the attempt record of every stored trace whose attempt is missing (a kill between the two appends).

    A trace is written before its attempt, so a kill in between leaves a trace
    without its attempt record; everything an attempt record holds is in the trace,
    so it is derived here and a resumed cell counts exactly the attempts of an
    uninterrupted one (Table 4). Returns the number restored.
    """
    missing = [t for t in traces if f"{t['id']}#r{t['round']}" not in attempts]
    attempts.append({"id": f"{t['id']}#r{t['round']}", "question_id": t["id"], "dataset": t["dataset"],
                     "round": t["round"], "correct": t["correct"], "extracted": t["extracted"], "rule": t["rule"],
                     "truncated": t.get("truncated", t.get("finish_reason") == "length"),
                     "finish_reason": t["finish_reason"], "error": None, "completion_tokens": t["completion_tokens"],
                     "reasoning_chars": len(t.get("reasoning") or "")} for t in missing)
    return len(missing)


def run(P: GenerateParams, engine: Engine | None = None, chunk_size: int | None = None) -> dict[str, Any]:
    """Run rejection sampling for the cell ``P.out_dir``; return the metrics (also written by the notebook).

    ``engine`` defaults to ``get_engine(P.engine, P.toy)``; ``chunk_size`` (default
    ``P.chunk_size``) bounds how many questions go to the engine per call.

    Each question has ``rounds`` answered attempts, under the retry rules of
    :func:`cdlib.engines.answer_missing`. A transient engine error (network, 5xx after
    the client's retries) is not an answer: it is recorded in ``attempts.jsonl`` as
    ``<id>#r<round>#e<k>`` with ``transient: true`` but uses up no round, the question is
    asked again (at most ``rounds`` failed requests per question per run), and if
    questions are still unanswered because of errors at the end the stage raises
    :class:`cdlib.engines.UnansweredError`: the cell ends failed and a rerun sends
    exactly those questions. A cell whose engine answered not one request (every one
    rejected, e.g. HTTP 400) raises :class:`cdlib.engines.NothingAnsweredError`: it
    kept nothing, so it is failed, not done.
    """
    out = Path(P.out_dir)
    traces, attempts = Store(out / "traces.jsonl", writable=True), Store(out / "attempts.jsonl", writable=True)
    pool = load_questions(P)
    _restore_attempts(traces, attempts)
    rounds_used: dict[str, int] = {}  # answered attempts per question (a transient error is not one)
    errors: dict[str, int] = {}  # transient errors per question, over every run (names the next error record)
    for a in attempts:
        if a.get("transient"):
            errors[a["question_id"]] = errors.get(a["question_id"], 0) + 1
        else:
            rounds_used[a["question_id"]] = max(rounds_used.get(a["question_id"], 0), a["round"] + 1)
    bar: Any = None
    n_ok = 0

    def ask(eng: Engine, todo: list[dict[str, Any]], rnd: int) -> list[Completion]:
        sampling = P.sampling if P.sampling.seed is None else P.sampling.model_copy(
            update={"seed": P.sampling.seed + rnd})
        rows = [{**r, "attempt": rnd} for r in todo]
        return eng.generate([prompts.build_messages(r) for r in rows], sampling, rows=rows)

    def take(rnd: int, pairs: list[tuple[dict[str, Any], Completion]]) -> list[str]:
        nonlocal n_ok
        good, tried = [], []
        for row, c in pairs:
            qid = row["id"]
            if c.transient:
                tried.append({"id": f"{qid}#r{rnd}#e{errors.get(qid, 0)}", "question_id": qid,
                              "dataset": row["dataset"], "round": rnd, "correct": False,
                              "finish_reason": "error", "error": c.error, "transient": True})
                errors[qid] = errors.get(qid, 0) + 1
                continue
            ex = answers.extract_detailed(c.text, row["answer_type"], row.get("choices"))
            ok = c.finish_reason != "error" and answers.verify(ex.value, row["gold"], row["answer_type"])
            tried.append(_attempt_record(row, c, ex, rnd, ok))
            if ok or (P.keep == "all" and c.finish_reason != "error"):
                good.append(_trace_record(row, c, ex, rnd, ok))
        traces.append(good)  # traces first: a kill before the attempts is repaired by _restore_attempts
        attempts.append(tried)
        n_ok += sum(r["correct"] for r in good)
        bar.set_postfix(correct=n_ok)
        return [r["id"] for r in good]

    def progress(rnd: int, todo: list[dict[str, Any]]) -> Any:
        nonlocal bar, n_ok
        bar, n_ok = tqdm(total=len(todo), desc=f"round {rnd + 1}/{P.rounds}", unit="q"), 0
        return bar

    answer_missing("generate", pool, traces, engine or (lambda: get_engine(engine_params(P), P.toy)), ask, take,
                   budget=P.rounds, used=rounds_used, chunk=chunk_size or P.chunk_size, log=attempts,
                   progress=progress)
    return metrics(out, pool)


def table4(out_dir: str | Path):
    """Per-dataset statistics of the paper's Table 4 as a polars frame.

    Columns: dataset, questions, n_correct (correct traces kept; :func:`cdlib.tables.table4`'s name), accuracy
    (final yield: n_correct / questions), first_round_accuracy, mean_reasoning_chars and
    mean_completion_tokens (over kept traces), attempts (answered ones: a transient
    engine error is not an attempt), rounds (largest round used), truncated and
    errors (attempts that hit the token cap; failed requests, transient ones included), kept (every
    trace kept: equal to n_correct unless ``keep="all"`` also kept wrong ones).
    """
    import polars as pl

    out = Path(out_dir)
    tr = Store(out / "traces.jsonl").to_polars()
    at = Store(out / "attempts.jsonl").to_polars()
    if at.is_empty():
        return pl.DataFrame()
    if "transient" not in at.columns:  # stores written before transient errors were recorded
        at = at.with_columns(transient=pl.lit(False))
    answered = ~pl.col("transient").fill_null(False)
    per_attempt = at.group_by("dataset").agg(
        questions=pl.col("question_id").n_unique(),
        first_round_accuracy=pl.col("correct").filter((pl.col("round") == 0) & answered).mean(),
        attempts=answered.sum(),
        rounds=pl.col("round").filter(answered).max() + 1,
        truncated=(pl.col("finish_reason") == "length").sum(),
        errors=(pl.col("finish_reason") == "error").sum(),
    )
    if tr.is_empty():
        kept = pl.DataFrame({"dataset": [], "n_correct": [], "kept": [], "mean_reasoning_chars": [],
                             "mean_completion_tokens": []},
                            schema={"dataset": pl.String, "n_correct": pl.UInt32, "kept": pl.UInt32,
                                    "mean_reasoning_chars": pl.Float64, "mean_completion_tokens": pl.Float64})
    else:
        from cdlib.tables import trace_means

        correct = pl.col("correct").fill_null(True) if "correct" in tr.columns else pl.lit(True)
        means = trace_means(tr, ["dataset"]).drop("n_correct")  # over every kept trace (keep: all keeps wrong ones)
        kept = tr.group_by("dataset").agg(n_correct=correct.sum(), kept=pl.len()).join(means, on="dataset")
    df = per_attempt.join(kept, on="dataset", how="left").with_columns(pl.col("n_correct", "kept").fill_null(0))
    df = df.with_columns(accuracy=pl.col("n_correct") / pl.col("questions")).sort("dataset")
    return df.select("dataset", "questions", "n_correct", "accuracy", "first_round_accuracy", "mean_reasoning_chars",
                     "mean_completion_tokens", "attempts", "rounds", "truncated", "errors", "kept")


def metrics(out_dir: str | Path, pool: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """metrics.json content: the Table 4 rows and totals."""
    df = table4(out_dir)
    rows = df.to_dicts() if not df.is_empty() else []
    total = sum(r["n_correct"] for r in rows)
    asked = sum(r["questions"] for r in rows)
    return {"per_dataset": rows, "total_correct": total, "questions": len(pool) if pool is not None else asked,
            "accuracy": total / asked if asked else None,
            "attempts": sum(r["attempts"] for r in rows), "kept": sum(r["kept"] for r in rows)}


def merge_shards(shard_dirs: list[str | Path], dest: str | Path) -> dict[str, Any]:
    """Merge the stores of generate cells that each ran one shard (``shard_index``/``num_shards``,
    e.g. one Slurm array task each) into ``dest``, which downstream stages then read as one cell.

    Returns the metrics of the merged cell (also what ``metrics.json`` should hold).
    """
    from cdlib.store import merge

    dest = Path(dest)
    for name in ("traces.jsonl", "attempts.jsonl"):
        merge([Path(d) / name for d in shard_dirs if (Path(d) / name).exists()], dest / name)
    return metrics(dest)
