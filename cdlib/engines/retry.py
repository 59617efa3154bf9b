"""The retry rules every generating stage follows: :func:`answer_missing` sends an engine the items a
store does not hold yet, and says when a cell must end failed.

A request that fails for a reason that may pass (network, timeouts, 5xx after the client's retries:
``Completion.transient``) is not an answer: it uses up no attempt, is not stored as a result, and the
item is sent again, at most ``budget`` times in one run. An item whose last request failed so is
unanswered, and the stage raises :class:`UnansweredError` once everything answered is stored: the cell
ends failed and a rerun sends exactly those items. A request the engine rejects as such (HTTP 400, a
prompt longer than the context) is an answer that used its turn: it is stored with its error, and a
stage whose every stored answer is such an error raises :class:`NothingAnsweredError` (it kept
nothing, so it is failed, not done).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from cdlib.engines.base import Completion, Engine
from cdlib.store import Store

Row = dict[str, Any]


class UnansweredError(RuntimeError):
    """A stage ended while some items got no answer because of transient engine errors.

    Everything answered is stored; the failed items are not, so rerunning the cell
    (``python -m cdlib.grid run`` reruns failed cells) sends exactly those items.
    """

    def __init__(self, stage: str, failed: dict[str, str | None], total: int):
        self.failed = failed
        first = next(iter(failed.values())) or "unknown error"
        ids = ", ".join(list(failed)[:5]) + (", ..." if len(failed) > 5 else "")
        super().__init__(f"{stage}: {len(failed)} of {total} items unanswered because of engine errors "
                         f"(e.g. {first[:300]}); the answered ones are stored, rerun the cell to send "
                         f"exactly these: {ids}")


class NothingAnsweredError(RuntimeError):
    """A stage's engine answered none of its requests (e.g. a server rejecting each one with HTTP 400).

    The failed requests are stored as errors, and a rerun does not send them again (a
    rejected request is an answer that used its turn): the cell stays failed until the
    engine is fixed and the cell's directory is deleted.
    """

    def __init__(self, stage: str, n: int, first_error: str, where: Path | str):
        super().__init__(f"{stage}: the engine answered none of {n} items; the first error: {first_error[:300]} "
                         f"(every one is recorded in {where}); fix the engine, delete the cell's directory and "
                         f"rerun it")


def raise_if_nothing_answered(stage: str, records: Iterable[Row], where: Path | str) -> None:
    """Raise :class:`NothingAnsweredError` when ``records`` (a stage's stored requests or results, each with
    the engine's ``error``, None for an answer) are not empty and every one holds an error."""
    n, first = 0, None
    for rec in records:
        if rec.get("error") is None:
            return
        n += 1
        first = first or str(rec["error"])
    if n:
        raise NothingAnsweredError(stage, n, first, where)


def answer_missing(
    stage: str,
    items: Iterable[Row],
    store: Store,
    engine: Engine | Callable[[], Engine],
    ask: Callable[[Engine, list[Row], int], Sequence[Completion]],
    take: Callable[[int, list[tuple[Row, Completion]]], Iterable[str] | None],
    *,
    budget: int = 1,
    used: dict[str, int] | None = None,
    chunk: int | None = None,
    log: Store | None = None,
    progress: Callable[[int, list[Row]], Any] | None = None,
    finish: Callable[[list[Row]], None] | None = None,
) -> None:
    """Send ``engine`` every item of ``items`` (rows with an ``id``) that ``store`` does not hold, under
    the retry rules of this module; raise when the cell must end failed.

    Each item has ``budget`` answered attempts; ``used`` (item id -> attempts answered in earlier runs,
    from the stage's own log) resumes the count and is kept up to date. Items go out grouped by attempt
    number, ``chunk`` at a time (all at once by default): ``ask(engine, rows, attempt)`` returns one
    completion per row.
    ``engine`` may be a function that builds it, called only when something is to be sent.
    ``take(attempt, pairs)`` stores what the stage keeps of a chunk: it gets every ``(row, completion)``,
    transient failures included (to log them, never as answers), and returns the ids that need no
    further attempt (None: every answered one). ``progress(attempt, rows)``, when given, returns a bar
    (``update(n)``, ``close()``) shown while an attempt's items are sent.

    Once nothing is left to send, ``finish(left)`` gets the items answered ``budget`` times without
    finishing (the stage keeps the last answer of each, and what it derives from its records) before the
    checks: :class:`UnansweredError` when an item's last request failed transiently, then
    :class:`NothingAnsweredError` when every record of ``log`` (default ``store``) holds an engine error.
    """
    pending = {r["id"]: r for r in items if r["id"] not in store}
    total = len(pending)
    used = {} if used is None else used
    errors_now: dict[str, int] = {}  # transient failures per item in this run
    failed: dict[str, str | None] = {}  # item id -> its last request's transient error
    built: Engine | None = None
    while True:
        by_attempt: dict[int, list[Row]] = {}
        for i, r in pending.items():
            if used.get(i, 0) < budget and errors_now.get(i, 0) < budget:
                by_attempt.setdefault(used.get(i, 0), []).append(r)
        if not by_attempt:
            break
        if built is None:
            built = engine if hasattr(engine, "generate") else engine()  # an engine, or what builds one
        for attempt, rows in sorted(by_attempt.items()):
            bar = progress(attempt, rows) if progress else None
            step = chunk or len(rows)
            for k in range(0, len(rows), step):
                part = rows[k:k + step]
                pairs = list(zip(part, ask(built, part, attempt)))
                for r, c in pairs:
                    if c.transient:
                        failed[r["id"]] = c.error
                        errors_now[r["id"]] = errors_now.get(r["id"], 0) + 1
                    else:
                        failed.pop(r["id"], None)
                        used[r["id"]] = attempt + 1
                done = take(attempt, pairs)
                for i in (done if done is not None else (r["id"] for r, c in pairs if not c.transient)):
                    pending.pop(i, None)
                if bar is not None:
                    bar.update(len(part))
            if bar is not None:
                bar.close()
    if finish is not None:
        finish([r for i, r in pending.items() if i not in failed])
    if failed:
        raise UnansweredError(stage, failed, total)
    log = store if log is None else log
    raise_if_nothing_answered(stage, log, log.path)
