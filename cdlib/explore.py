"""Exploring traces: the question pool, reasoning lengths per source (Figure 2), traces side by side.

The logic behind ``notebooks/00_explore.py``. :func:`load` reads the traces of
one or more teachers (generate cells) with their compressions (compress cells)
and truncations (truncate cells) into one tidy polars frame, one row per
(teacher, source, trace), every source's reasoning counted with the *same*
tokenizer so that lengths and ratios compare:

=================  ==============================================================
teacher, source    teacher label; "raw", a compressor name, or a truncation label
id, dataset, ...   the question's id, dataset, domain, group, question and gold
reasoning, answer  this source's reasoning text and the (unchanged) final answer
flag               the compress/truncate stage's flag (null: sound; raw: always null)
chars, tokens      length of ``reasoning`` in characters and tokens
original_*         the same for the teacher's raw trace of this question
rho_chars/tokens   chars / original_chars and tokens / original_tokens (raw: 1.0)
=================  ==============================================================

On that frame: :func:`filter_traces` (datasets, token range, flags),
:func:`length_stats` (median, quartiles, 90th percentile, ratios),
:func:`cdlib.figures.lengths_chart` (the paper's Figure 2: token histograms per teacher and
source, optionally with a dataset menu, token-range sliders and a flagged switch
that work in the browser with no kernel),
:func:`side_by_side` / :func:`side_by_side_html` (one question's raw, compressed
and truncated reasoning with lengths and ratios; headless-safe) and
:func:`browser` (ipywidgets menus around the side-by-side view in JupyterLab).
:func:`pool_stats` shows the question pool per dataset and split (Table 1 counts,
subsampling ``limit`` and ``seed``).
"""

from __future__ import annotations

import html
import math
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import polars as pl

from cdlib import figures, tables
from cdlib import tokenizer as toklib
from cdlib.store import read_fields

QUESTION_FIELDS = ["id", "dataset", "domain", "group", "question", "gold"]
COLUMNS = ["teacher", "source", *QUESTION_FIELDS, "reasoning", "answer", "flag", "chars", "tokens",
           "original_chars", "original_tokens", "rho_chars", "rho_tokens"]
FLAGGED = ("exclude", "include", "only")
KEPT = (*QUESTION_FIELDS, "reasoning", "answer", "flag")  # the fields read from each record


class ExploreError(ValueError):
    """Bad explore input; the message names the parameter key, file or value."""


# --------------------------------------------------------------------------- question pool


def pool_stats(params: Any, splits: Iterable[str] | None = None) -> pl.DataFrame:
    """The question pool per dataset and split: :func:`cdlib.datasets.stats` plus ``limit`` and ``seed``.

    ``params`` is a :class:`cdlib.params.DataParams` (``datasets``, ``data_paths``,
    ``limit``, ``seed``, ``toy``); ``splits`` defaults to ``params.splits`` or both
    "train" and "eval". Datasets in the order of ``params.datasets``, then splits in
    the order given. ``rows`` is what this pool holds after subsampling,
    ``table1_rows`` the paper's Table 1 count where it gives one.
    """
    from cdlib import datasets

    splits = list(splits or getattr(params, "splits", None) or ["train", "eval"])
    frames = [datasets.stats(datasets.load_many(params, split)) for split in splits]
    rank = {name: i for i, name in enumerate(params.datasets)}
    split_rank = {name: i for i, name in enumerate(splits)}
    out = pl.concat(frames).sort(pl.col("dataset").replace_strict(rank, default=len(rank), return_dtype=pl.Int64),
                                 pl.col("split").replace_strict(split_rank, default=len(split_rank),
                                                                return_dtype=pl.Int64), maintain_order=True)
    return out.with_columns(limit=pl.lit(params.limit, dtype=pl.Int64), seed=pl.lit(params.seed, dtype=pl.Int64))


# --------------------------------------------------------------------------- loading


def count_tokens(texts: list[str], tokenizer: str = "whitespace") -> list[int]:
    """Token counts of ``texts``: "chars/4" is the rough estimate ceil(characters / 4);
    anything else goes to :func:`cdlib.tokenizer.count` ("whitespace", a HF id or path)."""
    if tokenizer == "chars/4":
        return [math.ceil(len(t) / 4) for t in texts]
    return toklib.count(texts, tokenizer)


def _read(directory: str | Path, filename: str, what: str) -> pl.DataFrame:
    """The fields of ``filename`` that explore shows (:data:`KEPT`), read line by line.

    A paper-scale compress cell holds gigabytes (every original trace beside its
    compression); :class:`cdlib.store.Store` would hold the whole file and every full
    record at once. A last line cut mid-write is skipped; another bad line raises with
    the file and line.
    """
    path = Path(directory) / filename
    if not path.is_file():
        raise ExploreError(f"explore: {what}: {path} does not exist")
    df = _read_fast(path)
    if df is None:  # a line polars cannot parse: the line-by-line reader names it
        df = read_fields(path, list(KEPT))
    return df if df.width else pl.DataFrame(schema={k: pl.String for k in KEPT})


def _read_fast(path: Path) -> pl.DataFrame | None:
    """:data:`KEPT` of a JSONL store with polars' reader (100k long traces in seconds), up to its last
    newline (a line in flight is skipped, as the store does); None when polars cannot parse it."""
    with path.open("rb") as f:
        data = f.read()
    data = data[: data.rfind(b"\n") + 1]
    if not data.strip():
        return pl.DataFrame()
    try:
        df = pl.read_ndjson(data, infer_schema_length=None)
    except Exception:  # noqa: BLE001 - any parse problem falls back to the reader that names the line
        return None
    return df.select([pl.col(k) if k in df.columns else pl.lit(None, pl.String).alias(k) for k in KEPT])


def _owner(key: str, teachers: list[str], what: str) -> tuple[str, str]:
    """(teacher, source) of a ``compressed``/``truncated`` key: "source" or "teacher/source"."""
    teacher, _, source = key.rpartition("/")
    if not teacher:
        if len(teachers) != 1:
            raise ExploreError(f"explore: {what}['{key}']: several teachers ({', '.join(teachers)}); "
                               f"write the key as 'teacher/{key}'")
        teacher = teachers[0]
    if teacher not in teachers:
        raise ExploreError(f"explore: {what}['{key}']: teacher '{teacher}' is not a key of generate "
                           f"({', '.join(teachers)})")
    if not source or source == "raw":
        raise ExploreError(f"explore: {what}['{key}']: needs a source name other than 'raw'")
    return teacher, source


def _frame(records: pl.DataFrame, teacher: str, source: str, tokenizer: str) -> pl.DataFrame:
    """:func:`_read`'s fields as the first columns of :data:`COLUMNS`, with lengths in characters and tokens."""
    df = records.select(
        teacher=pl.lit(teacher, pl.String), source=pl.lit(source, pl.String),
        **{k: pl.col(k).cast(pl.String) for k in QUESTION_FIELDS},
        reasoning=pl.col("reasoning").cast(pl.String).fill_null(""),
        answer=pl.col("answer").cast(pl.String).fill_null(""), flag=pl.col("flag").cast(pl.String))
    if tokenizer == "whitespace":  # str.split() counts, vectorised (the same runs of non-space characters)
        tokens = pl.col("reasoning").str.count_matches(r"\S+").cast(pl.Int64)
    else:
        tokens = pl.Series(count_tokens(df["reasoning"].to_list(), tokenizer), dtype=pl.Int64)
    return df.with_columns(chars=pl.col("reasoning").str.len_chars().cast(pl.Int64), tokens=tokens)


def load(generate: dict[str, str], compressed: dict[str, str] | None = None,
         truncated: dict[str, str] | None = None, tokenizer: str = "whitespace") -> pl.DataFrame:
    """Every teacher's raw, compressed and truncated traces as one frame (columns: :data:`COLUMNS`).

    ``generate`` maps a teacher label to its generate cell (``traces.jsonl``);
    ``compressed`` maps a compressor name to a compress cell (``compressed.jsonl``)
    and ``truncated`` a label such as "truncated" to a truncate cell
    (``truncated.jsonl``); with several teachers their keys read "teacher/name".
    All reasoning is counted with ``tokenizer`` (see :func:`count_tokens`), so the
    compress stage's own counts (the compressor's tokenizer) are not used here.
    ``original_*`` and the ratios come from the raw trace of the same teacher and
    question id; they are null for a trace whose raw trace is missing.
    """
    if not generate:
        raise ExploreError("explore: generate: name at least one generate cell (teacher -> directory)")
    teachers = list(generate)
    parts = [_frame(_read(d, "traces.jsonl", f"generate['{t}']"), t, "raw", tokenizer) for t, d in generate.items()]
    seen: dict[tuple[str, str], str] = {}
    for what, mapping, filename in (("compressed", compressed, "compressed.jsonl"),
                                    ("truncated", truncated, "truncated.jsonl")):
        for key, directory in (mapping or {}).items():
            teacher, source = _owner(key, teachers, what)
            if (teacher, source) in seen:
                raise ExploreError(f"explore: {what}['{key}']: teacher '{teacher}' already has a source "
                                   f"'{source}' ({seen[teacher, source]})")
            seen[teacher, source] = f"{what}['{key}']"
            parts.append(_frame(_read(directory, filename, f"{what}['{key}']"), teacher, source, tokenizer))
    df = pl.concat(parts)
    raw = df.filter(pl.col("source") == "raw").select(
        "teacher", "id", original_chars=pl.col("chars"), original_tokens=pl.col("tokens"))
    df = df.join(raw, on=["teacher", "id"], how="left", maintain_order="left")
    return df.with_columns(
        rho_chars=pl.col("chars") / pl.col("original_chars"),
        rho_tokens=pl.col("tokens") / pl.col("original_tokens"),
    ).select(COLUMNS)


# --------------------------------------------------------------------------- filtering and statistics


def filter_traces(df: pl.DataFrame, datasets: Iterable[str] | None = None, min_tokens: int | None = None,
                  max_tokens: int | None = None, flagged: str = "include",
                  sources: Iterable[str] | None = None, teachers: Iterable[str] | None = None) -> pl.DataFrame:
    """The rows of ``df`` (from :func:`load`) in the given datasets, token range and flag state.

    The token range (inclusive) applies to each row's own ``tokens``. ``flagged``:
    "include" keeps every row, "exclude" drops flagged rows (what training uses),
    "only" keeps just the flagged ones. Empty or None filters keep everything;
    names that ``df`` does not hold are an error naming them.
    """
    if flagged not in FLAGGED:
        raise ExploreError(f"explore: flagged must be one of {FLAGGED}, got {flagged!r}")
    if min_tokens is not None and max_tokens is not None and min_tokens > max_tokens:
        raise ExploreError(f"explore: min_tokens ({min_tokens}) > max_tokens ({max_tokens})")
    cond = pl.lit(True)
    for column, wanted in (("dataset", datasets), ("source", sources), ("teacher", teachers)):
        wanted = list(wanted or [])
        if not wanted:
            continue
        unknown = sorted(set(wanted) - set(df[column].unique().to_list()))
        if unknown:
            raise ExploreError(f"explore: {column} {unknown} not in the traces "
                               f"(have {sorted(df[column].unique().drop_nulls().to_list())})")
        cond &= pl.col(column).is_in(wanted)
    if min_tokens is not None:
        cond &= pl.col("tokens") >= min_tokens
    if max_tokens is not None:
        cond &= pl.col("tokens") <= max_tokens
    if flagged == "exclude":
        cond &= pl.col("flag").is_null()
    elif flagged == "only":
        cond &= pl.col("flag").is_not_null()
    return df.filter(cond)


def length_stats(df: pl.DataFrame, by: Iterable[str] = ("teacher", "source")) -> pl.DataFrame:
    """Reasoning-length statistics per group: traces, flagged, mean/median/quartile/p90/max tokens,
    mean chars, rho (ratio of mean tokens to mean original tokens) and the mean per-trace rho."""
    by = list(by)
    if df.is_empty():
        return pl.DataFrame(schema={c: pl.String for c in by} | {"traces": pl.UInt32})
    out = df.group_by(by, maintain_order=True).agg(
        traces=pl.len(), flagged=pl.col("flag").is_not_null().sum(),
        mean_tokens=pl.col("tokens").mean(), median_tokens=pl.col("tokens").median(),
        q1_tokens=pl.col("tokens").quantile(0.25), q3_tokens=pl.col("tokens").quantile(0.75),
        p90_tokens=pl.col("tokens").quantile(0.9), max_tokens=pl.col("tokens").max(),
        mean_chars=pl.col("chars").mean(),
        rho_tokens=pl.col("tokens").sum() / pl.col("original_tokens").sum(),
        mean_rho_tokens=pl.col("rho_tokens").mean(), mean_rho_chars=pl.col("rho_chars").mean(),
    )
    if "source" in by:
        order = {s: i for i, s in enumerate(figures.source_order(df))}
        out = out.sort([*(c for c in by if c != "source" and c != "dataset"),
                        pl.col("source").replace_strict(order, return_dtype=pl.Int64),
                        *(["dataset"] if "dataset" in by else [])], maintain_order=True)
    return out


# --------------------------------------------------------------------------- charts


# --------------------------------------------------------------------------- side by side


def pick_example(df: pl.DataFrame, example: str | None = None, seed: int = 0) -> str:
    """``example`` if some row of ``df`` has that id (else an error naming it), or an id drawn with ``seed``."""
    ids = sorted(df["id"].unique().to_list())
    if not ids:
        raise ExploreError("explore: no traces to pick an example from (check the filters)")
    if example is None:
        return random.Random(seed).choice(ids)
    if example not in ids:
        raise ExploreError(f"explore: example {example!r} is not among the {len(ids)} traces shown (e.g. {ids[0]!r})")
    return example


def side_by_side(df: pl.DataFrame, example_id: str, teacher: str | None = None) -> pl.DataFrame:
    """One question's reasoning in every source (raw first), with lengths, ratios and flags.

    Columns: teacher, source, tokens, chars, rho_tokens, rho_chars, flag, reasoning,
    answer. With several teachers and ``teacher`` None, each teacher's rows in turn.
    """
    rows = df.filter(pl.col("id") == example_id)
    if teacher is not None:
        rows = rows.filter(pl.col("teacher") == teacher)
    if rows.is_empty():
        which = f" for teacher {teacher!r}" if teacher else ""
        raise ExploreError(f"explore: no trace with id {example_id!r}{which}")
    order = {s: i for i, s in enumerate(figures.source_order(df))}
    rows = rows.sort(pl.col("teacher"), pl.col("source").replace_strict(order, return_dtype=pl.Int64),
                     maintain_order=True)
    return rows.select("teacher", "source", "tokens", "chars", "rho_tokens", "rho_chars", "flag", "reasoning", "answer")


def _header(r: dict[str, Any]) -> str:
    rho = "" if r["rho_tokens"] is None or r["source"] == "raw" else (
        f", ρ = {r['rho_tokens']:.2f} tokens / {r['rho_chars']:.2f} chars")
    flag = f' <span style="color:#c00">flag: {html.escape(r["flag"])}</span>' if r["flag"] else ""
    name = html.escape(tables.SOURCE_LABELS.get(r["source"], r["source"]))
    return f"<b>{html.escape(r['teacher'])} · {name}</b><br>{r['tokens']:,} tokens, {r['chars']:,} chars{rho}{flag}"


def side_by_side_html(df: pl.DataFrame, example_id: str, teacher: str | None = None) -> str:
    """:func:`side_by_side` as HTML: the question and gold, then one column per source."""
    table = side_by_side(df, example_id, teacher)
    first = df.filter(pl.col("id") == example_id).row(0, named=True)
    cols = "".join(
        f'<div style="flex:1;min-width:16em;border:1px solid #ddd;padding:6px">{_header(r)}'
        f'<pre style="white-space:pre-wrap;font-size:85%">{html.escape(r["reasoning"])}</pre>'
        f'<div style="font-size:85%"><i>answer:</i> {html.escape(r["answer"])}</div></div>'
        for r in table.iter_rows(named=True))
    return (f'<div><b>{html.escape(example_id)}</b> ({html.escape(str(first["dataset"]))}), gold '
            f'<code>{html.escape(str(first["gold"]))}</code><p>{html.escape(str(first["question"]))}</p>'
            f'<div style="display:flex;gap:8px;align-items:flex-start">{cols}</div></div>')


def browser(df: pl.DataFrame, example: str | None = None, seed: int = 0) -> Any:
    """Menus to pick teacher, dataset and example, and the side-by-side view below them.

    Returns an ipywidgets ``VBox`` (its ``.children[-1].value`` is the shown HTML),
    or, without ipywidgets, the static :func:`side_by_side_html` of one example as an
    ``IPython.display.HTML``.
    """
    first = pick_example(df, example, seed)
    try:
        import ipywidgets as widgets
    except ImportError:
        from IPython.display import HTML

        return HTML(side_by_side_html(df, first))
    start = df.filter(pl.col("id") == first).row(0, named=True)
    teachers = df["teacher"].unique(maintain_order=True).to_list()
    teacher = widgets.Dropdown(options=teachers, value=start["teacher"], description="Teacher")
    dataset = widgets.Dropdown(options=sorted(df["dataset"].unique().to_list()), value=start["dataset"],
                               description="Dataset")
    pick = widgets.Dropdown(description="Example")
    view = widgets.HTML()

    def ids() -> list[str]:
        chosen = df.filter((pl.col("teacher") == teacher.value) & (pl.col("dataset") == dataset.value))
        return sorted(chosen["id"].unique().to_list())

    def show(_=None) -> None:
        view.value = (side_by_side_html(df, pick.value, teacher.value) if pick.value
                      else "<i>no traces for this teacher and dataset</i>")

    def refill(_=None) -> None:
        options = ids()
        keep = pick.value if pick.value in options else (options[0] if options else None)
        pick.unobserve(show, "value")  # one redraw, after both changes
        pick.options = options
        pick.value = keep
        pick.observe(show, "value")
        show()

    teacher.observe(refill, "value")
    dataset.observe(refill, "value")
    pick.observe(show, "value")
    pick.options = ids()
    pick.value = first if first in pick.options else (pick.options[0] if pick.options else None)
    show()
    return widgets.VBox([widgets.HBox([teacher, dataset, pick]), view])


# --------------------------------------------------------------------------- cell outputs


def metrics(df: pl.DataFrame) -> dict[str, Any]:
    """metrics.json content: :func:`length_stats` rows per teacher and source."""
    return {"per_source": length_stats(df).to_dicts(), "traces": df.height}
