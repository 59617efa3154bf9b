"""The run layout of :mod:`cdlib.tables` from a grid: one row per (run, report group).

A run is an evaluate cell with the train cell it was evaluated from (or a train cell not yet
evaluated, or a model evaluated as it is); its keys (teacher, student, method, source) come
from the axes of its cells and those upstream, its training columns from the train cell's
metrics (budget as training recorded it, tokens, hours, losses, the neighbouring methods'
settings) and its accuracy per group from the evaluate cell's metrics. :func:`grid_losses`
gives each run's loss curve (Figure 3).
"""

from __future__ import annotations

from typing import Any

import polars as pl

from cdlib.results import GROUP_NAMES, NO_VALUE, GridCell, GridOutputs
from cdlib.tables import RUN_KEYS

def _budget(params: dict[str, Any], metrics: dict[str, Any] | None = None) -> str | None:
    """How a train cell's length was set, for cells recorded before cdlib.train wrote its ``budget_label``
    (published or older grids): compute-matched (``token_budget``), ``max_steps`` or epochs.

    Read from the cell's params.yaml; without one, from its metrics (``budget_mode``,
    ``token_budget``, ``max_steps``, ``epochs`` as cdlib.train records them); else None.
    """
    src = params or {}
    if not src and metrics and metrics.get("budget_mode"):
        mode = metrics["budget_mode"]
        src = {"token_budget": metrics.get("token_budget") if mode == "tokens" else None,
               "max_steps": metrics.get("max_steps") if mode == "steps" else None, "epochs": metrics.get("epochs")}
    if not src:
        return None
    if src.get("token_budget"):
        return f"compute-matched ({int(src['token_budget']):,} tokens)"
    if src.get("max_steps"):
        return f"max_steps {src['max_steps']}"
    epochs = float(src.get("epochs") or 1.0)
    return f"epoch-based ({epochs:g} epoch{'s' if epochs != 1 else ''})"


def _run_keys(g: GridOutputs, cells: list[GridCell | None]) -> dict[str, str]:
    """teacher/student/method/source of a run from its cells' axes (and the train params when
    an axis is absent); extra axes of these cells are appended to ``method`` so runs stay distinct."""
    present = [c for c in cells if c is not None]
    lineage: dict[str, str] = {}
    for c in reversed(present):
        lineage.update(g.lineage_axes(c))
    train = next((c for c in present if c.kind == "train"), None)
    tp = train.params if train else {}
    keys = {"teacher": lineage.get("teacher") or (g.teacher_of(present[0]) if present else None),
            "student": lineage.get("student") or tp.get("student"),
            "method": lineage.get("method") or tp.get("method"), "source": lineage.get("source") or tp.get("source")}
    extra = {k: v for c in present for k, v in c.axes.items() if k not in RUN_KEYS and k != "compressor"}
    if extra and keys["method"]:
        keys["method"] += " (" + ", ".join(f"{k}={v}" for k, v in extra.items()) + ")"
    return {k: (str(v) if v is not None else NO_VALUE) for k, v in keys.items()}


def train_info(t: GridCell | None) -> dict[str, Any]:
    """Run-level training columns of a train cell: train_tokens, train_hours, gpus, gpu_hours, losses, budget."""
    if t is None:
        return {}
    m, cost = t.metrics, t.cost
    first = lambda *vals: next((v for v in vals if v is not None), None)  # noqa: E731
    wall = first(m.get("train_wall_clock_s"), m.get("wall_clock_s"), cost.get("wall_clock_s"))
    hours = first(m.get("train_hours"), wall / 3600 if wall is not None else None)
    gpus = first(m.get("gpus"), cost.get("gpus"))
    # names as the issue gives them, then as cdlib.train writes them
    return {"train_tokens": first(m.get("train_tokens"), m.get("trainable_tokens")), "train_hours": hours, "gpus": gpus,
            "source_tokens": m.get("source_tokens.supervised"),  # whole source data, one pass (Tables 6, 11)
            "overlong_dropped": m.get("overlong_dropped"),  # samples over seq_len left out (overlong: drop; Table 6)
            "gpu_hours": first(m.get("gpu_hours"), cost.get("gpu_hours"),
                               gpus * hours if gpus is not None and hours is not None else None),
            "final_train_loss": first(m.get("final_train_loss"), m.get("train_loss_ema"), m.get("train_loss")),
            "final_val_loss": first(m.get("final_val_loss"), m.get("val_loss")),
            "budget": m.get("budget_label") or _budget(t.params, m), "train_cell": t.id, **_neighbour_info(t)}


DEFAULT_LOSS_ON = ("cot", "answer")  # cdlib.params.TrainParams.loss_on


def _train_setting(t: GridCell, key: str) -> Any:
    """A train cell's parameter from its params.yaml, else as cdlib.train recorded it in its metrics."""
    if key in t.params:
        return t.params[key]
    return t.metrics.get(key)


def neighbour_label(params: dict[str, Any]) -> str | None:
    """The source label of a neighbouring-method run from its train params, or None for a plain SFT run.

    Mixed-Policy Distillation (``source: mpd``): ``mpd`` (``mpd-sft`` without the KL
    objective); any other KL run: ``kl-<source>``. Distilling the Essence: ``dte-<ratio>``
    (``-reasoning`` when only the reasoning span is cut) and ``-<sections>`` for a
    non-default ``loss_on`` (``dte-cot``, ``dte-0.5-cot``); on data other than raw traces
    the source comes first (``extractive+dte-0.5``).
    """
    source = str(params.get("source") or "raw")
    objective = params.get("objective") or "sft"
    if source == "mpd":
        return "mpd" if objective == "kl" else "mpd-sft"
    ratio = params.get("truncate_ratio")
    loss_on = params.get("loss_on") or list(DEFAULT_LOSS_ON)
    loss_on = loss_on.split("+") if isinstance(loss_on, str) else list(loss_on)
    parts = []
    if ratio is not None:
        parts.append(f"{float(ratio):g}" + ("-reasoning" if params.get("truncate_span") == "reasoning" else ""))
    if set(loss_on) != set(DEFAULT_LOSS_ON):
        parts.append("+".join(loss_on))
    label = None
    if parts:
        label = "dte-" + "-".join(parts)
        label = label if source == "raw" else f"{source}+{label}"
    if objective == "kl":
        return f"kl-{label or source}"
    return label


def _neighbour_info(t: GridCell) -> dict[str, Any]:
    """Distilling the Essence / MPD columns of a train cell: kept fraction, span, sections, objective, cost."""
    ratio = _train_setting(t, "truncate_ratio")
    loss_on = _train_setting(t, "loss_on") or list(DEFAULT_LOSS_ON)
    loss_on = "+".join(loss_on) if isinstance(loss_on, list) else str(loss_on)
    settings = {k: _train_setting(t, k) for k in ("source", "objective", "truncate_span", "kl_direction")}
    settings.update(truncate_ratio=ratio, loss_on=loss_on)
    return {"kept_fraction": float(ratio) if ratio is not None else 1.0,
            "truncate_span": settings["truncate_span"] if ratio is not None else None,
            "loss_on": loss_on, "objective": settings["objective"] or "sft",
            "dte": ratio is not None or set(loss_on.split("+")) != set(DEFAULT_LOSS_ON),
            "data_source": settings["source"], "neighbour": neighbour_label(settings),
            "train_method": _train_setting(t, "method"),
            "kept_token_fraction": t.metrics.get("kept_token_fraction"),
            "train_flops": t.metrics.get("flops"), "peak_memory_gb": t.metrics.get("peak_memory_gb")}


EVAL_RUN_COLUMNS = ("n", "mean_completion_tokens", "mean_completion_tokens_excl_trunc", "truncation_rate",
                    "median_reasoning_chars", "median_reasoning_tokens", "reasoning_tokens_q1", "reasoning_tokens_q3",
                    "acc_per_1k_tokens")


def grid_runs(g: GridOutputs) -> pl.DataFrame | None:
    """Run layout (Tables 3, 6-9, 11, Figure 4, Pareto): a row per (run, group) from the evaluate cells,
    with the training columns of the train cell each was evaluated from; trained runs without an
    evaluation give an overall row with null accuracy. None if there are no runs."""
    rows: list[dict[str, Any]] = []
    used_train: set[str] = set()
    trains = g.of("train")
    for e in g.of("evaluate"):
        t = g.upstream_of(e, "train")
        if t is None:  # no path link (results.parquet only): the train cell with the same run axes
            mine = {k: v for k, v in g.lineage_axes(e).items() if k in RUN_KEYS}
            t = next((c for c in trains if mine and {k: v for k, v in c.axes.items() if k in RUN_KEYS} == mine), None)
        if t is not None:
            used_train.add(t.id)
        keys = _run_keys(g, [e, t])
        if t is None and keys["source"] == NO_VALUE:
            keys["source"] = "untrained"  # a model evaluated as it is (e.g. the student before distillation)
        base = {**keys, **train_info(t), "eval_cell": e.id,
                **{k: e.metrics.get(k) for k in EVAL_RUN_COLUMNS}}
        groups = sorted({k.split(".")[1] for k in e.metrics if k.startswith("groups.") and k.endswith(".accuracy")})
        for grp in groups:
            rows.append({**base, "group": GROUP_NAMES.get(grp, grp),
                         "accuracy": e.metrics.get(f"groups.{grp}.accuracy"),
                         "se": e.metrics.get(f"groups.{grp}.se"), "group_n": e.metrics.get(f"groups.{grp}.n")})
        rows.append({**base, "group": "overall", "accuracy": e.metrics.get("accuracy"),
                     "se": e.metrics.get("accuracy_se"), "group_n": e.metrics.get("n")})
    for t in trains:
        if t.id not in used_train:
            rows.append({**_run_keys(g, [t]), **train_info(t), "group": "overall", "accuracy": None})
    if not rows:
        return None
    for row in rows:
        # a neighbouring method's run is named after it (dte-0.5, mpd) unless the grid named its source itself
        named = any("source" in g.cells[c].axes for c in (row.get("eval_cell"), row.get("train_cell")) if c in g.cells)
        if row.get("neighbour") and not named:
            row["source"] = row["neighbour"]
    df = pl.DataFrame(rows, infer_schema_length=None)
    # two cells with the same keys (e.g. re-evaluations): keep them apart by cell id
    dup = pl.struct(RUN_KEYS + ["group"]).is_duplicated()
    if df.select(dup.any()).item():
        cell = (pl.coalesce(pl.col("eval_cell"), pl.col("train_cell")) if "eval_cell" in df.columns
                else pl.col("train_cell"))
        named = pl.when(dup).then(pl.col("method") + " [" + cell + "]").otherwise(pl.col("method"))
        df = df.with_columns(method=named)
    return df


def grid_losses(g: GridOutputs) -> pl.DataFrame | None:
    """Loss layout (Figure 3) from every train cell's ``loss.jsonl``."""
    parts = []
    for t in g.of("train"):
        df = g.records(t, "loss.jsonl", ["step", "loss"])
        if df is not None:
            parts.append(df.drop_nulls().with_columns(**{k: pl.lit(v) for k, v in _run_keys(g, [t]).items()}))
    return pl.concat(parts, how="diagonal_relaxed") if parts else None
