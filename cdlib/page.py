"""The report's page and its table files: tables as Markdown, LaTeX and HTML, figures embedded, one self-contained page.

:class:`ReportPage` collects sections of tables, figures and notes (a table or figure that
cannot be made becomes a note, never an error) and writes ``index.html``;
:func:`write_table` writes one table as ``.md`` and ``.tex``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import polars as pl

from cdlib.figures import save_chart

def _cell(v: object, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _cells(df: pl.DataFrame, digits: int | dict[str, int]) -> list[list[str]]:
    d = (lambda c: digits.get(c, 3)) if isinstance(digits, dict) else (lambda c: digits)
    return [[_cell(v, d(c)) for c, v in zip(df.columns, row)] for row in df.iter_rows()]


def to_markdown(df: pl.DataFrame, digits: int | dict[str, int] = 3) -> str:
    """A GitHub-flavoured Markdown table; floats to ``digits`` places (per column with a dict), nulls as a dash."""
    esc = [[c.replace("|", "\\|") for c in row] for row in _cells(df, digits)]
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in esc]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _latex_escape(s: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in s).replace("—", "---")


def to_latex(df: pl.DataFrame, digits: int | dict[str, int] = 3, caption: str | None = None) -> str:
    """A booktabs ``tabular`` (in a ``table`` float when a caption is given); numbers right-aligned."""
    align = "".join("r" if df[c].dtype.is_numeric() else "l" for c in df.columns)
    body = [" & ".join(_latex_escape(c) for c in row) + r" \\" for row in _cells(df, digits)]
    lines = [rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(_latex_escape(c) for c in df.columns) + r" \\", r"\midrule", *body, r"\bottomrule",
             r"\end{tabular}"]
    if caption:
        lines = [r"\begin{table}[t]", r"\centering", *lines, rf"\caption{{{_latex_escape(caption)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(df: pl.DataFrame, path_stem: str | Path, digits: int | dict[str, int] = 3,
                caption: str | None = None) -> list[Path]:
    """Write ``<stem>.md`` and ``<stem>.tex``; return both paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    md, tex = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".tex")
    md.write_text(to_markdown(df, digits))
    tex.write_text(to_latex(df, digits, caption))
    return [md, tex]


def _auto_digits(df: pl.DataFrame, digits: int | dict[str, int]) -> dict[str, int]:
    """Per-column decimals: the table's own, raised so small values (toy runs: 0.002 h) keep two
    significant digits."""
    out = {}
    for col in df.columns:
        d = digits.get(col, 3) if isinstance(digits, dict) else digits
        if df[col].dtype.is_float():
            vals = df[col].drop_nulls().drop_nans().abs()
            vals = vals.filter(vals > 0)
            if vals.len() and vals.max() < 1:
                d = max(d, min(6, math.ceil(-math.log10(vals.max())) + 1))
        out[col] = d
    return out


def to_html(df: pl.DataFrame, digits: int | dict[str, int] = 3) -> str:
    """An HTML table (numbers right-aligned, nulls as a dash)."""
    import html

    numeric = [df[c].dtype.is_numeric() for c in df.columns]
    head = "".join(f'<th class="{"num" if n else ""}">{html.escape(c)}</th>' for c, n in zip(df.columns, numeric))
    body = "\n".join("<tr>" + "".join(f'<td class="{"num" if n else ""}">{html.escape(v)}</td>'
                                      for v, n in zip(row, numeric)) + "</tr>" for row in _cells(df, digits))
    return f'<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>'


PAGE_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0;
       background: #fafafa; }
header { background: #1f3b57; color: #fff; padding: 1.4em 2em 1em; }
header h1 { margin: 0 0 .2em; font-size: 1.6em; }
header p { margin: .2em 0; opacity: .9; }
nav { background: #fff; border-bottom: 1px solid #ddd; padding: .5em 2em; position: sticky; top: 0; z-index: 2; }
nav a { margin-right: 1.2em; color: #1f3b57; text-decoration: none; font-weight: 500; }
main { max-width: 1400px; margin: 0 auto; padding: 1em 2em 4em; }
section { background: #fff; border: 1px solid #e3e3e3; border-radius: 6px; padding: .6em 1.4em 1.2em; margin: 1.2em 0; }
h2 { color: #1f3b57; border-bottom: 2px solid #e8eef4; padding-bottom: .2em; }
h3 { margin: 1.4em 0 .2em; font-size: 1.05em; }
p.what { color: #555; margin: .2em 0 .6em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .4em .8em; margin: .6em 0; color: #5a4a00; }
.scroll { overflow-x: auto; max-height: 34em; overflow-y: auto; border: 1px solid #eee; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th { position: sticky; top: 0; background: #f0f4f8; text-align: left; }
th, td { padding: .25em .7em; border-bottom: 1px solid #eee; white-space: nowrap; }
td.num, th.num { text-align: right; }
tbody tr:hover { background: #f6f9fc; }
.files { font-size: 12.5px; color: #666; margin: .3em 0 0; }
.files a { color: #1f6fb2; }
figure { margin: .6em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; background: #fff; }
details summary { cursor: pointer; font-weight: 500; margin: .4em 0; }
"""


@dataclass
class _Section:
    id: str
    title: str
    what: str
    parts: list[str] = dc_field(default_factory=list)


class ReportPage:
    """Collects tables, figures and notes into sections and writes them, then ``index.html``.

    Every table and figure is made by a callable, so a missing input or an error turns into
    a note on the page instead of stopping the report.
    """

    def __init__(self, out_dir: str | Path):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.sections: list[_Section] = []
        self.tables: dict[str, list[Path]] = {}
        self.figures: dict[str, list[Path]] = {}
        self.notes: list[str] = []

    def section(self, id: str, title: str, what: str) -> None:
        self.sections.append(_Section(id, title, what))

    def note(self, text: str) -> None:
        import html

        self.notes.append(f"{self.sections[-1].title if self.sections else 'report'}: {text}")
        self.sections[-1].parts.append(f'<p class="note">{html.escape(text)}</p>')

    def needs(self, frame: Any, note: str) -> bool:
        """Whether ``frame`` is there; when it is None, ``note`` (what is skipped and why) goes on the page."""
        if frame is None:
            self.note(note)
        return frame is not None

    def _link(self, paths: list[Path], labels: list[str]) -> str:
        return " · ".join(f'<a href="{p.relative_to(self.out).as_posix()}">{lab}</a>' for p, lab in zip(paths, labels))

    def table(self, name: str, make, caption: str, what: str, digits=3,
              folder: str = "tables", details: bool = False) -> pl.DataFrame | None:
        """Write ``<folder>/<name>.md/.tex`` from ``make()`` and add it to the current section.

        ``digits``: decimals for every column, a dict per column, or a function of the frame giving one.
        """
        import html

        try:
            df = make()
            if df is not None and not df.is_empty():
                d = _auto_digits(df, digits(df) if callable(digits) else digits)
        except Exception as e:  # a report never stops on one table
            self.note(f"{caption} not made: {type(e).__name__}: {e}")
            return None
        if df is None or df.is_empty():
            self.note(f"{caption}: no rows.")
            return None
        paths = write_table(df, self.out / folder / name, d, caption=caption)
        self.tables[f"{folder}/{name}"] = paths
        block = (f'<p class="what">{html.escape(what)}</p><div class="scroll">{to_html(df, d)}</div>'
                 f'<p class="files">{df.height} rows · {self._link(paths, ["Markdown", "LaTeX"])}</p>')
        title = html.escape(caption)
        self.sections[-1].parts.append(
            f'<details id="{folder}-{name}"><summary>{title}</summary>{block}</details>' if details
            else f'<h3 id="{folder}-{name}">{title}</h3>{block}')
        return df

    def figure(self, name: str, make, caption: str, what: str) -> list[Path] | None:
        """Write ``figures/<name>.png/.svg/.html`` from the chart ``make()`` returns; embed the SVG."""
        import base64
        import html

        try:
            paths = save_chart(make(), self.out / "figures" / name)
        except Exception as e:
            self.note(f"{caption} not drawn: {type(e).__name__}: {e}")
            return None
        self.figures[name] = paths
        png, svg, interactive = paths
        data = base64.b64encode(svg.read_bytes()).decode()
        self.sections[-1].parts.append(
            f'<h3 id="figures-{name}">{html.escape(caption)}</h3><p class="what">{html.escape(what)}</p>'
            f'<figure><img alt="{html.escape(caption)}" src="data:image/svg+xml;base64,{data}"></figure>'
            f'<p class="files">{self._link([interactive, png, svg], ["interactive (tooltips)", "PNG", "SVG"])}</p>')
        return paths

    def write(self, title: str, subtitle_lines: list[str]) -> Path:
        import html

        nav = "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in self.sections)
        body = "\n".join(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>'
                         f'<p class="what">{html.escape(s.what)}</p>'
                         + "\n".join(s.parts) + "</section>" for s in self.sections)
        sub = "".join(f"<p>{line}</p>" for line in subtitle_lines)
        page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{html.escape(title)}</title><style>{PAGE_CSS}</style></head>\n<body>"
                f"<header><h1>{html.escape(title)}</h1>{sub}</header><nav>{nav}</nav><main>\n{body}\n</main></body></html>\n")
        path = self.out / "index.html"
        path.write_text(page)
        return path

