"""Progress: the stages' bars, and the grid runner's run-level view.

Stages draw their bars with :func:`tqdm`: a widget in JupyterLab, text elsewhere. Inside a
grid cell (the runner sets ``CDLIB_TEXT_PROGRESS``) the bar is plain text on stderr, which
papermill copies into the cell's ``log.txt``, refreshed every ``CDLIB_PROGRESS_S`` seconds
(default 10) so logs stay small. The runner reads the last ``x/y`` of each running cell's
log (:func:`cell_progress`) and :class:`RunProgress` prints cells done / total, each
running cell with its own progress, elapsed time and an ETA (:class:`Estimator`: each cell
left timed by the finished cells of its own stage or kind, scaled by its planned size, as the
mean of all cells would let the 2-second cells hide the long training ones): a line redrawn in place on a
terminal, plain lines every ``interval`` seconds otherwise (CI logs, ``nohup``; default 30,
``CDLIB_PROGRESS_INTERVAL`` sets it).
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

TEXT_ENV = "CDLIB_TEXT_PROGRESS"
# tqdm's "12/345 [" (counts before the elapsed-time bracket); papermill's own cell bar says "Executing"
_COUNTS = re.compile(r"(?:([\w .()/-]{1,40}?):\s*)?(?:\d+%\|[^|]*\|\s*)?(\d+)/(\d+) \[")


def tqdm(*args: Any, **kwargs: Any):
    """A tqdm bar: ``tqdm.auto`` (widgets in JupyterLab), or plain text on stderr inside a grid cell."""
    if os.environ.get(TEXT_ENV):
        from tqdm.std import tqdm as text_tqdm

        kwargs.setdefault("file", sys.stderr)
        kwargs.setdefault("mininterval", float(os.environ.get("CDLIB_PROGRESS_S", "10")))
        kwargs.setdefault("ascii", True)
        return text_tqdm(*args, **kwargs)
    from tqdm.auto import tqdm as auto_tqdm

    return auto_tqdm(*args, **kwargs)


def cell_progress(log: str | Path, tail_bytes: int = 16384) -> tuple[str, int, int] | None:
    """The last progress count in a cell's log: ``(label, done, total)``, or None.

    A stage's own labelled bar (``train: 640/1500``) wins over unlabelled counts (a
    library's bar, e.g. vLLM loading checkpoint shards) and those over papermill's
    notebook-cell bar (``Executing: 4/12``).
    """
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - tail_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    found = [((m.group(1) or "").strip(), int(m.group(2)), int(m.group(3))) for m in _COUNTS.finditer(text)]
    stage = [x for x in found if x[0] and x[0] != "Executing"]  # a stage's own labelled bar
    other = [x for x in found if not x[0]]  # unlabelled counts (a library's bar)
    pick = (stage or other or found or [None])[-1]
    if pick is None or pick[2] <= 0:
        return None
    label = pick[0].strip() or "progress"
    return ("cells" if label == "Executing" else label), pick[1], pick[2]


def running_percent(done: int, total: int) -> int:
    """A running cell's percentage, at most 99: its last bar may be full while the notebook's later
    cells (saving, metrics, charts) still run, and 100% is kept for a cell that is done."""
    return min(99, int(100 * done / total))


def _own_stdout() -> TextIO:
    try:
        sys.stdout.flush()
        return os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8", errors="replace")
    except (AttributeError, OSError, ValueError):  # no file descriptor (a captured stream): write to it as is
        return sys.stdout


def duration(seconds: float) -> str:
    """``seconds`` as a short wall-clock length: ``42s``, ``3m05s``, ``1h07m``."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


#: a cell as the ETA sees it: (stage, kind, planned size), the size a (unit, amount) pair or None
CellKey = tuple[str, "str | None", "tuple[str, float] | None"]


def planned_size(kind: str | None, params: dict[str, Any]) -> tuple[str, float] | None:
    """A cell's planned amount of work where its params say it: a training cell's ``max_steps``, else its
    ``epochs``; None for other kinds (their time is taken as their stage's)."""
    if kind == "train":
        if isinstance(params.get("max_steps"), (int, float)) and params["max_steps"] > 0:
            return "steps", float(params["max_steps"])
        if isinstance(params.get("epochs"), (int, float)) and params["epochs"] > 0:
            return "epochs", float(params["epochs"])
    return None


class Estimator:
    """Seconds a grid's cells take, learnt from finished ones.

    A cell left is timed by the cells of its own stage finished in this run, else those recorded in earlier
    manifests (``prior``), else cells of its kind, else all cells; where both it and those cells have a
    planned size of one unit (:func:`planned_size`) the time per unit is scaled to its own size."""

    def __init__(self, prior: list[tuple[CellKey, float]] | None = None):
        self.prior = list(prior or [])
        self.now: list[tuple[CellKey, float]] = []

    def add(self, key: CellKey, seconds: float) -> None:
        self.now.append((key, seconds))

    def seconds(self, key: CellKey) -> float | None:
        stage, kind, size = key
        for match in (lambda k: k[0] == stage, lambda k: kind is not None and k[1] == kind, lambda k: True):
            for pool in (self.now, self.prior):
                found = [(k, t) for k, t in pool if match(k)]
                if found:
                    sized = [t / k[2][1] for k, t in found if size and k[2] and k[2][0] == size[0]]
                    return sum(sized) / len(sized) * size[1] if sized else sum(t for _, t in found) / len(found)
        return None

    def remaining(self, pending: list[CellKey], running: list[tuple[CellKey, float, float | None]],
                  jobs: int) -> float | None:
        """Seconds until the run ends: the cells not started and what is left of the running ones (elapsed
        seconds and the fraction their bar shows), shared over ``jobs`` slots but never less than the longest
        single cell; None while nothing is known to time them by."""
        left = []
        for key in pending:
            t = self.seconds(key)
            if t is None:
                return None
            left.append(t)
        for key, elapsed, fraction in running:
            t = self.seconds(key)
            if t is None:
                return None
            left.append(t * (1 - fraction) if fraction is not None else max(0.0, t - elapsed))
        return max(sum(left) / max(1, jobs), max(left, default=0.0))


class RunProgress:
    """Run-level progress of one ``grid run``: call :meth:`started` / :meth:`finished` per cell.

    ``start()`` launches a thread that prints :meth:`line` every ``interval`` seconds
    (a redrawn line on a terminal, a plain line otherwise, only when it changed);
    ``stop()`` ends it. The ETA is :meth:`Estimator.remaining` over the cells left, each
    timed by its own stage or kind (``cells``: cell id -> its :data:`CellKey`; ``prior``:
    cells recorded in earlier manifests); a cell not in ``cells`` counts as one of stage "?".
    """

    def __init__(self, total: int, jobs: int = 1, stream: TextIO | None = None, interval: float | None = None,
                 cells: dict[str, CellKey] | None = None, prior: list[tuple[CellKey, float]] | None = None):
        self.total, self.jobs = total, max(1, jobs)
        self.cells = dict(cells or {})
        self.estimator = Estimator(prior)
        self.ended: set[str] = set()
        # the runner's own stdout, duplicated now: while a cell runs in this process its output
        # (file descriptors 1 and 2) goes to the cell's log.txt, and the progress lines must not
        self._owned = stream is None
        self.stream = stream or _own_stdout()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if interval is None:
            interval = float(os.environ.get("CDLIB_PROGRESS_INTERVAL", 2.0 if self.tty else 30.0))
        self.interval = interval
        self.t0 = time.monotonic()
        self.done = 0
        self.durations: list[float] = []
        self.running: dict[str, tuple[Path, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last = ""

    def started(self, cell_id: str, log: str | Path) -> None:
        with self._lock:
            self.running[cell_id] = (Path(log), time.monotonic())

    def finished(self, cell_id: str) -> None:
        with self._lock:
            _, t = self.running.pop(cell_id, (None, None))
            self.done += 1
            self.ended.add(cell_id)
            if t is not None:
                self.durations.append(time.monotonic() - t)
                self.estimator.add(self._key(cell_id), time.monotonic() - t)

    def skipped(self, cell_id: str) -> None:
        """A cell of the run that will not run (blocked, refused, found done): no longer left to time."""
        with self._lock:
            self.ended.add(cell_id)

    def _key(self, cell_id: str) -> CellKey:
        return self.cells.get(cell_id, ("?", None, None))

    def line(self) -> str:
        """``grid: 12/25 cells done · running: train/x 640/1500 train (43%) · elapsed 4m12s · ETA ~6m``."""
        with self._lock:
            running = dict(self.running)
            done, ended = self.done, set(self.ended)
        parts = [f"grid: {done}/{self.total} cells done"]
        shown = []
        now = time.monotonic()
        timing: list[tuple[CellKey, float, float | None]] = []
        for cid, (log, t0) in running.items():
            p = cell_progress(log)
            timing.append((self._key(cid), now - t0, min(1.0, p[1] / p[2]) if p else None))
            if p is None:
                shown.append(cid)
                continue
            label, x, y = p
            shown.append(f"{cid} {x}/{y} {label} ({running_percent(x, y)}%)")
        if shown:
            parts.append("running: " + ", ".join(shown))
        elapsed = time.monotonic() - self.t0
        parts.append(f"elapsed {duration(elapsed)}")
        pending = [k for cid, k in self.cells.items() if cid not in ended and cid not in running]
        pending += [("?", None, None)] * max(0, self.total - len(ended) - len(running) - len(pending))
        eta = self.estimator.remaining(pending, timing, self.jobs) if done or self.estimator.prior else None
        if eta is not None:
            parts.append(f"ETA ~{duration(eta)}")
        return " · ".join(parts)

    def _draw(self, force: bool = False) -> None:
        text = self.line()
        if self.tty:
            self.stream.write("\r\x1b[K" + text[: 200])
        elif force or text.split(" · elapsed")[0] != self._last.split(" · elapsed")[0]:
            self.stream.write(text + "\n")
        else:
            return
        self._last = text
        self.stream.flush()

    def say(self, message: str) -> None:
        """Print a cell's start or end line (on a terminal, above the redrawn progress line)."""
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(message + "\n")
        self.stream.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._draw()

    def start(self) -> RunProgress:
        self._thread = threading.Thread(target=self._loop, name="grid-progress", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.flush()
        if self._owned and self.stream is not sys.stdout:
            self.stream.close()
