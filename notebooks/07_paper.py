# %% [markdown]
# # The paper's tables and figures from a grid
#
# Reads a grid's outputs (`outputs/<grid>/results.parquet` and the stage cells) and
# regenerates every table (Markdown + LaTeX) and figure (PNG, SVG, interactive HTML) the
# grid has data for, side by side with the published numbers where the grid uses the
# paper's names. Everything lands in `out_dir`; open `out_dir/index.html` in a browser,
# no notebook needed. Missing stages are skipped with a note on that page.

# %% tags=["parameters"]
out_dir: str = "outputs/scratch/report"  # where tables/, figures/, side_by_side/ and index.html go
seed: int = 0  # unused; kept for a uniform interface
grid_dir: str = "outputs/demo"  # the grid's output directory: outputs/<grid name>
side_by_side: bool = True  # also write the grid's numbers beside the published ones (paper names only)
pue: float = 1.15  # datacentre power usage effectiveness (paper H.5)
grid_kg_co2_per_kwh: float = 0.079  # grid carbon intensity in kg CO2eq per kWh (paper H.5: Finland 2023)
gpu_watts: float = 700  # GPU board power in watts (H100 SXM)

# %%
import IPython.display
import polars as pl

import cdlib.outputs
import cdlib.params
import cdlib.report
import cdlib.results

P = cdlib.params.from_notebook("report", globals())
P

# %% [markdown]
# Which finished cells the grid holds, per stage.

# %%
grid = cdlib.results.read_grid(P.grid_dir)
pl.DataFrame([{"cell": c.id, "kind": c.kind, **c.axes} for c in grid.cells.values()])

# %% [markdown]
# Build every table and figure, and the page that shows them.

# %%
built = cdlib.report.build_report(P.grid_dir, P.out_dir, P)
cdlib.outputs.write_metrics(P.out_dir, {"tables": len(built["tables"]), "figures": len(built["figures"]),
                                     "side_by_side": len(built["side_by_side"]), "notes": len(built["notes"])})
print(built["index"])
print("\n".join(built["notes"]) or "no notes")

# %% [markdown]
# Overall accuracy (Table 3) and inference efficiency (Table 9), when the grid has evaluations.

# %%
tables = built["tables"]
table3 = IPython.display.Markdown(tables["table3"][0].read_text()) if "table3" in tables else "no Table 3"
IPython.display.display(table3)
IPython.display.Markdown(tables["table9"][0].read_text()) if "table9" in tables else "no Table 9"

# %% [markdown]
# The figures (open the page for the interactive versions).

# %%
for name, (png, svg, html) in built["figures"].items():
    IPython.display.display(IPython.display.Markdown(f"**{name}**"),
                            IPython.display.Image(filename=str(png), width=900))
