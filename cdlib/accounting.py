"""Compute and energy accounting as the paper's Appendix H.4 and H.5 do it, for published or grid runs."""

from __future__ import annotations

import polars as pl

from cdlib.results import KINDS, GridOutputs, compressor_name
from cdlib.student_runs import train_info
from cdlib.tables import paper_name, table11

def compute_energy(gpu_hours: float, gpu_watts: float = 700.0, pue: float = 1.15,
                   kg_co2_per_kwh: float = 0.079) -> dict[str, float]:
    """Appendix H.5 accounting: energy = GPU-hours x board power x PUE; emissions = energy x grid intensity.

    Defaults are the paper's: H100 SXM TDP 700 W, PUE 1.15, 79 gCO2eq/kWh (Finland 2023).
    """
    if gpu_hours < 0 or gpu_watts <= 0 or pue < 1 or kg_co2_per_kwh < 0:
        raise ValueError(f"compute_energy: bad inputs gpu_hours={gpu_hours}, gpu_watts={gpu_watts}, "
                         f"pue={pue}, kg_co2_per_kwh={kg_co2_per_kwh}")
    effective_watts = gpu_watts * pue
    energy_kwh = gpu_hours * effective_watts / 1000
    return {"gpu_hours": gpu_hours, "effective_watts": effective_watts, "energy_kwh": energy_kwh,
            "emissions_kg_co2": energy_kwh * kg_co2_per_kwh}


def compute_table(runs: pl.DataFrame, upstream_gpu_hours: float = 0.0, gpu_watts: float = 700.0,
                  pue: float = 1.15, kg_co2_per_kwh: float = 0.079) -> pl.DataFrame:
    """Appendix H.4/H.5 totals for a set of runs: quantity, value (names as in ``cdlib.paper.compute()``)."""
    t = table11(runs)
    student = t["gpu_hours"].sum()
    trunc = t.filter(pl.col("source") == "truncated")["gpu_hours"].sum()
    energy = compute_energy(student + upstream_gpu_hours, gpu_watts, pue, kg_co2_per_kwh)
    rows = {
        "student_training_gpu_hours": student,
        "main_grid_gpu_hours": student - trunc,
        "truncation_ablation_gpu_hours": trunc,
        "upstream_gpu_hours": upstream_gpu_hours,
        "total_gpu_hours": energy["gpu_hours"],
        "effective_watts": energy["effective_watts"],
        "energy_kwh": energy["energy_kwh"],
        "emissions_kg_co2": energy["emissions_kg_co2"],
    }
    return pl.DataFrame({"quantity": list(rows), "value": [float(v) for v in rows.values()]})


H4_TEACHER = "Qwen3.5-397B-A17B"  # the one teacher whose passes Appendix H.4 times and counts


def upstream_teachers(g: GridOutputs) -> list[str]:
    """The teachers whose generation and compressions count as upstream, as Appendix H.4 counts them.

    H.4: "the teacher pass over 345,383 questions took ≈ 43.5 h (≈ 348 H100-h); compressing the 283,335
    correct traces took 1 h 09 m with Ministral-3-14B (≈ 9.2 H100-h) and 8 h 19 m with Llama-3.3-70B
    (≈ 66.5 H100-h) ... the upstream stages thus contribute ≈ 424 H100-hours" (283,335 is the Qwen
    teacher's Table 4 total): the Qwen teacher's pass and its two compressions; the gpt-oss teacher's
    pass and compressions are not counted (nor evaluation or judging). A grid with the Qwen teacher
    counts it alone; a grid without it (toy teachers) has nothing to follow and counts every teacher.
    """
    teachers = sorted({t for c in g.cells.values() if c.kind in ("generate", "compress")
                       and (t := g.lineage_axes(c).get("teacher"))})
    h4 = [t for t in teachers if paper_name(t, "teacher") == H4_TEACHER]
    return h4 or teachers


def grid_compute(g: GridOutputs, gpu_watts: float = 700.0, pue: float = 1.15,
                 kg_co2_per_kwh: float = 0.079) -> tuple[pl.DataFrame, pl.DataFrame] | None:
    """Appendix H.4/H.5 for a grid: GPU-hours, energy and emissions per stage, and the paper's totals.

    Returns (per-stage frame, quantities frame). Quantities follow ``cdlib.paper.compute()``'s
    names: total = student training + upstream, as in H.5, where upstream is what H.4 counts: the
    teacher pass and the compressions of :func:`upstream_teachers` (the Qwen teacher in the paper's
    grid). The other teachers' passes, a student's own sampling (``GridOutputs.student_samples``) and the
    rewrites of its samples (MPD) are ``other_upstream_gpu_hours``, outside that total; evaluation, judge and
    truncation cells are reported beside it (``all_cells_*``).
    """
    if not g.cells:
        return None
    rows = []
    counted = set(upstream_teachers(g))
    for c in g.cells.values():
        wall, gpus, gh = c.cost.get("wall_clock_s"), c.cost.get("gpus"), c.cost.get("gpu_hours")
        if c.kind == "train":
            info = train_info(c)
            gh, gpus = info["gpu_hours"], info["gpus"]
        rows.append({"stage": c.kind or c.stage, "cell": c.id, "wall_clock_h": (wall or 0) / 3600, "gpus": gpus,
                     "gpu_hours": float(gh or 0.0), "source": g.lineage_axes(c).get("source"),
                     "compressor": compressor_name(c) if c.kind == "compress" else None,
                     "h4_upstream": c.kind in ("generate", "compress") and not g.student_samples(c)
                     and not (c.kind == "compress" and g.rewrites_student(c))
                     and g.lineage_axes(c).get("teacher") in counted})
    df = pl.DataFrame(rows, infer_schema_length=None)
    energy = lambda h: compute_energy(h, gpu_watts, pue, kg_co2_per_kwh)  # noqa: E731
    order = {k: i for i, k in enumerate(KINDS)}
    per_stage = df.group_by("stage").agg(cells=pl.len(), wall_clock_hours=pl.col("wall_clock_h").sum(),
                                         gpu_hours=pl.col("gpu_hours").sum())
    per_stage = per_stage.with_columns(
        energy_kwh=pl.col("gpu_hours").map_elements(lambda h: energy(h)["energy_kwh"], return_dtype=pl.Float64),
        emissions_kg_co2=pl.col("gpu_hours").map_elements(lambda h: energy(h)["emissions_kg_co2"],
                                                          return_dtype=pl.Float64),
    ).sort(pl.col("stage").replace_strict(order, default=len(order), return_dtype=pl.Int64))

    def hours(kind: str, upstream: bool = False) -> float:
        part = df.filter(pl.col("stage") == kind)
        return float((part.filter("h4_upstream") if upstream else part)["gpu_hours"].sum())

    train = df.filter(pl.col("stage") == "train")
    trunc = float(train.filter(pl.col("source") == "truncated")["gpu_hours"].sum())
    q: dict[str, float] = {"student_training_gpu_hours": hours("train"),
                           "main_grid_gpu_hours": hours("train") - trunc, "truncation_ablation_gpu_hours": trunc,
                           "teacher_gpu_hours": hours("generate", upstream=True)}
    for name, part in df.filter((pl.col("stage") == "compress") & pl.col("h4_upstream")).group_by(
            "compressor", maintain_order=True):
        q[f"compress_{name[0]}_gpu_hours"] = float(part["gpu_hours"].sum())
    q["compression_gpu_hours"] = hours("compress", upstream=True)
    q["upstream_gpu_hours"] = q["teacher_gpu_hours"] + q["compression_gpu_hours"]
    q["other_upstream_gpu_hours"] = hours("generate") + hours("compress") - q["upstream_gpu_hours"]
    if q["student_training_gpu_hours"]:
        q["upstream_over_training"] = q["upstream_gpu_hours"] / q["student_training_gpu_hours"]
    total = energy(q["student_training_gpu_hours"] + q["upstream_gpu_hours"])
    q.update(gpu_watts=gpu_watts, pue=pue, effective_watts=total["effective_watts"], total_gpu_hours=total["gpu_hours"],
             energy_kwh=total["energy_kwh"], grid_g_co2_per_kwh=kg_co2_per_kwh * 1000,
             emissions_kg_co2=total["emissions_kg_co2"])
    every = energy(float(df["gpu_hours"].sum()))
    q.update(all_cells_gpu_hours=every["gpu_hours"], all_cells_energy_kwh=every["energy_kwh"],
             all_cells_emissions_kg_co2=every["emissions_kg_co2"],
             all_cells_wall_clock_hours=float(df["wall_clock_h"].sum()))
    return per_stage, pl.DataFrame({"quantity": list(q), "value": [float(v) for v in q.values()]})

