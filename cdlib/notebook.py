"""Reading, checking and inspecting the percent-format stage notebooks.

The notebooks under ``notebooks/`` are jupytext ``py:percent`` files. Each has
exactly one cell tagged ``parameters`` holding literal assignments written
``name: type = value  # help``; the next cell validates them through
:mod:`cdlib.params`. Logic lives in cdlib, so a notebook holds no ``def`` or
``class``. :func:`lint` enforces these rules and :func:`declared_parameters`
reports what a notebook declares, through papermill's own inspection.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


class NotebookError(ValueError):
    """A notebook breaks the project's notebook rules."""


def read(path: str | Path):
    """Read a percent-format ``.py`` (or ``.ipynb``) notebook as an nbformat node with a kernelspec;
    a file that is no notebook (a ``.yaml``, JSON that is not a notebook) raises :class:`NotebookError`
    naming it."""
    import jupytext

    try:
        nb = jupytext.read(str(path))
    except OSError:
        raise
    except Exception as e:  # jupytext's JupytextFormatError, nbformat's NotJSONError, a reader's ValueError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NotebookError(f"{path}: not a notebook ({first[:200]})") from None
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata.setdefault("language_info", {"name": "python"})
    return nb


def project_root(start: str | Path | None = None) -> Path | None:
    """The checkout of this project that holds ``start`` (default: the working directory), or None.

    A checkout is the nearest directory at or above ``start`` with a ``pyproject.toml``
    naming ``compress-distill`` beside a ``notebooks/`` folder.
    """
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        meta = d / "pyproject.toml"
        if (d / "notebooks").is_dir() and meta.is_file() and 'name = "compress-distill"' in meta.read_text():
            return d
    return None


def enter_project_root() -> Path:
    """Make relative paths resolve from the repository root, whatever the kernel's working directory.

    JupyterLab starts a notebook's kernel in the notebook's folder (``notebooks/``), while
    the grid runner and the README write every path relative to the repository root
    (``outputs/demo/...``). Called by every notebook's validation cell
    (:func:`cdlib.params.from_notebook`): inside a checkout it changes to the root and says
    so once; outside one (a grid run in another folder) it leaves the directory alone.
    Returns the working directory in force.
    """
    cwd = Path.cwd().resolve()
    root = project_root(cwd)
    if root is not None and root != cwd:
        os.chdir(root)
        print(f"working directory: {root} (paths in the parameters resolve from the repository root)")
        return root
    return cwd


def _parameter_cells(nb) -> list[int]:
    return [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]


def lint(path: str | Path) -> list[str]:
    """Problems with a notebook, as ``file:line: message`` strings (empty if it is clean).

    Checks: exactly one ``parameters`` cell; every statement in it is an annotated
    assignment of a literal (``ast.literal_eval`` accepts it) with a ``# help``
    comment on its line, and papermill reads it (its parser drops, with only a log line,
    a line whose help comment holds `` = ``); no ``def``/``class`` anywhere in the notebook.
    """
    path = Path(path)
    problems: list[str] = []
    text = path.read_text()
    lines = text.splitlines()
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as e:
        return [f"{path}:{e.lineno}: syntax error: {e.msg}"]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            problems.append(f"{path}:{node.lineno}: '{node.name}' is defined in a notebook; move it to cdlib")
    nb = read(path)
    cells = _parameter_cells(nb)
    if len(cells) != 1:
        return problems + [f"{path}: expected exactly one cell tagged 'parameters', found {len(cells)}"]
    # Locate the parameters cell in the .py text to report real line numbers.
    marker = next((i for i, ln in enumerate(lines) if ln.startswith("# %%") and "parameters" in ln), None)
    offset = (marker + 1) if marker is not None and path.suffix == ".py" else 0
    src = nb.cells[cells[0]].source
    try:
        cell_tree = ast.parse(src)
    except SyntaxError as e:
        return problems + [f"{path}:{offset + (e.lineno or 0)}: syntax error in parameters cell: {e.msg}"]
    src_lines = src.splitlines()
    papermill_reads = declared_parameters(path)  # papermill skips, with a mere log line, a line it cannot parse
    for stmt in cell_tree.body:
        line_no = offset + stmt.lineno
        if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name) or stmt.value is None:
            problems.append(f"{path}:{line_no}: parameters cell holds only 'name: type = value  # help' lines")
            continue
        name = stmt.target.id
        try:
            ast.literal_eval(stmt.value)
        except ValueError:
            problems.append(f"{path}:{line_no}: parameter '{name}' is not a literal")
        last = src_lines[(stmt.end_lineno or stmt.lineno) - 1]
        comment = last.split("#", 1)[1].strip() if "#" in last else ""
        if not comment:
            problems.append(f"{path}:{line_no}: parameter '{name}' has no '# help' comment")
        elif name not in papermill_reads:
            problems.append(f"{path}:{line_no}: papermill cannot read parameter '{name}', so no grid may set it "
                            f"(its parser gives up on some help comments, e.g. one holding ' = ')")
    return problems


def declared_parameters(path: str | Path) -> dict[str, dict[str, Any]]:
    """The parameters a notebook declares: name -> {type, default, help}, via papermill.inspect_notebook
    (remembered per file and modification time: a cell's run asks twice, the grid once per notebook)."""
    path = Path(path).resolve()
    return dict(_declared_parameters(path, path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=64)
def _declared_parameters(path: Path, mtime_ns: int) -> dict[str, dict[str, Any]]:
    import nbformat
    import papermill

    nb = read(path)
    with tempfile.TemporaryDirectory() as tmp:
        ipynb = Path(tmp) / (Path(path).stem + ".ipynb")
        nbformat.write(nb, str(ipynb))
        info = papermill.inspect_notebook(str(ipynb))
    return {
        name: {"type": p["inferred_type_name"], "default": p["default"], "help": p["help"]}
        for name, p in info.items()
    }


# --------------------------------------------------------------------------- papermill's writes of an executed notebook

#: the prefix that routes papermill's writes of an executed notebook through :class:`_ScrubbedWrites`
SCRUBBED = "cdlib-scrubbed://"
_ERRNO_TEXT = re.compile(r"^\[Errno (\d+)\]")


class NotebookWriteError(OSError):
    """Papermill could not write the executed notebook. ``kernel_error`` is the first error output of its
    cells (ename, evalue) when that was an OS error too (a store cut by a full disk before the notebook was)."""

    kernel_error: tuple[str, str] | None = None


def _first_os_error(buf: str) -> tuple[str, str] | None:
    """The first error output in a notebook's JSON text that reads as an OS error (``[Errno N] ...``)."""
    try:
        cells = json.loads(buf).get("cells", [])
    except ValueError:
        return None
    for cell in cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                evalue = str(out.get("evalue", ""))
                return (out.get("ename", "OSError"), evalue) if _ERRNO_TEXT.match(evalue) else None
    return None


class _ScrubbedWrites:
    """A papermill I/O handler for :data:`SCRUBBED` paths: the executed notebook is written with URL
    credentials scrubbed (:func:`cdlib.secrets.scrub_text`), so the parameters papermill injects (the
    kernel runs the real ones, from memory) and the outputs quoting them keep no key on disk."""

    @staticmethod
    def _local(path: str) -> str:
        return path[len(SCRUBBED):] if path.startswith(SCRUBBED) else path

    def read(self, path: str) -> str:
        return Path(self._local(path)).read_text(encoding="utf-8")

    def listdir(self, path: str) -> list[str]:
        return [os.path.join(self._local(path), f) for f in os.listdir(self._local(path))]

    def pretty_path(self, path: str) -> str:
        return self._local(path)

    def write(self, buf: str, path: str) -> None:
        from cdlib.secrets import scrub_text

        local = self._local(path)
        try:
            with open(local, "w", encoding="utf-8") as f:
                f.write(scrub_text(buf.replace(SCRUBBED, "")))
        except OSError as e:
            err = NotebookWriteError(e.errno, e.strerror or str(e), local)
            err.kernel_error = _first_os_error(buf)
            raise err from e


@functools.cache
def _register_scrubbed_writes() -> None:
    from papermill.iorw import papermill_io

    papermill_io.register(SCRUBBED, _ScrubbedWrites())


def scrubbed_output(path: str | Path) -> str:
    """``path`` as papermill's ``output_path`` whose every write goes through :class:`_ScrubbedWrites`."""
    _register_scrubbed_writes()
    return SCRUBBED + str(path)


# --------------------------------------------------------------------------- papermill reading the .py notebooks


class TextNotebooks:
    """A papermill I/O handler that reads the project's percent-format ``.py`` notebooks through
    jupytext, with a kernelspec, so ``papermill notebooks/03_truncate.py out.ipynb -p mode ratio``
    runs as with an ``.ipynb``. Papermill picks handlers by path prefix; ``pyproject.toml``
    registers this one (entry points ``papermill.io``) for ``notebooks/``, ``./notebooks/`` and
    ``../notebooks/``. Anything that is not a text notebook (the ``.ipynb`` it writes) goes to
    papermill's own local handler."""

    TEXT = (".py", ".md", ".R", ".jl")

    @staticmethod
    def _local():
        from papermill.iorw import LocalHandler

        return LocalHandler()

    def read(self, path: str) -> str:
        if not str(path).endswith(self.TEXT):
            return self._local().read(path)
        import nbformat

        return nbformat.writes(read(path))

    def write(self, buf: str, path: str) -> None:
        return self._local().write(buf, path)

    def listdir(self, path: str) -> list[str]:
        return self._local().listdir(path)

    def pretty_path(self, path: str) -> str:
        return path


#: the handler papermill loads from the ``papermill.io`` entry points
TEXT_NOTEBOOKS = TextNotebooks()
