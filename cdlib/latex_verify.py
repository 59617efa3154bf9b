"""math-verify in a worker process with a deadline, for what exact arithmetic cannot settle.

:func:`cdlib.answers.verify` compares numbers exactly itself; ``\\sqrt``, intervals and
symbolic LaTeX come here. Model text never reaches ``eval``/``sympify``/``parse_expr``:
math-verify is called only with its LaTeX extraction (an ANTLR parser building SymPy
objects; its ``ExprExtractionConfig`` would call ``parse_expr`` and is never used), with
its signal timeout disabled, inside a worker process (``python -m cdlib.latex_verify
--math-verify-worker``) that is killed when it misses the deadline (:data:`LATEX_TIMEOUT_S`).
That works from any thread. Results are cached (:func:`latex_equal`).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from functools import lru_cache

#: Deadline in seconds for one math-verify comparison (the worker is killed after it).
LATEX_TIMEOUT_S = 5.0


@lru_cache(maxsize=65536)
def latex_equal(pred: str, gold: str) -> bool:
    """Whether math-verify finds the LaTeX ``pred`` equal to ``gold`` (cached); False past the deadline."""
    return VERIFIER.equal(pred, gold)


class LatexVerifier:
    """Runs math-verify in a child process; a call past the deadline kills it.

    math-verify's own timeout uses ``signal.alarm``, which only works on the
    main thread; here it is disabled and the deadline is enforced from outside,
    so :func:`cdlib.answers.verify` is bounded on any thread. Calls are serialised by a lock.
    """

    def __init__(self, timeout_s: float = LATEX_TIMEOUT_S, startup_timeout_s: float = 120.0):
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._owner = os.getpid()
        self._buffer = b""
        self.timeouts = 0

    def equal(self, pred: str, gold: str) -> bool:
        """One comparison in the worker (started on first use, or again after a kill); False on a timeout
        or a dead worker."""
        if self._owner != os.getpid():  # forked child: never share the parent's pipe
            self._lock, self._proc, self._buffer, self._owner = threading.Lock(), None, b"", os.getpid()
        with self._lock:
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._start()
                self._proc.stdin.write((json.dumps([pred, gold]) + "\n").encode())
                self._proc.stdin.flush()
                return self._read_line(time.monotonic() + self.timeout_s) == "1"
            except TimeoutError:
                self.timeouts += 1
                self.close()
                return False
            except (OSError, ValueError):
                self.close()
                return False

    def _start(self) -> None:
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._buffer = b""
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "cdlib.latex_verify", "--math-verify-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        if self._read_line(time.monotonic() + self.startup_timeout_s) != "ready":
            raise OSError("math-verify worker did not start")

    def _read_line(self, deadline: float) -> str:
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                raise OSError("math-verify worker exited")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode().strip()

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass


VERIFIER = LatexVerifier()
atexit.register(VERIFIER.close)


def _worker_main() -> None:
    """Loop of the math-verify worker: one JSON ``[pred, gold]`` per line in, "1"/"0" out."""
    try:
        import resource

        limit = 4 * 1024**3  # a runaway SymPy power fails with MemoryError, not the machine
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # nothing the libraries print can corrupt the protocol
    import logging

    logging.disable(logging.CRITICAL)
    from math_verify import LatexExtractionConfig
    from math_verify import parse as mv_parse
    from math_verify import verify as mv_verify

    config = [LatexExtractionConfig()]

    @lru_cache(maxsize=4096)
    def parsed(latex: str):
        # LaTeX extraction only: ExprExtractionConfig would call sympy's parse_expr (eval).
        body = latex.strip().strip("$").replace("$", " ")
        return mv_parse(f"${body}$", extraction_config=config, parsing_timeout=None)

    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        try:
            pred, gold = json.loads(line)
            gold_parsed, pred_parsed = parsed(gold), parsed(pred)
            same = bool(gold_parsed and pred_parsed) and bool(
                mv_verify(gold_parsed, pred_parsed, timeout_seconds=None)
            )
        except Exception:  # model text: any failure means "not equal"
            same = False
        out.write("1\n" if same else "0\n")
        out.flush()


if __name__ == "__main__" and "--math-verify-worker" in sys.argv:
    _worker_main()
