"""Grids: a grid file names axes and stages; each stage has one cell per combination of its axes, and the
runner runs each cell's notebook into its own directory, in order, locally or as Slurm array tasks.

- :mod:`cdlib.grid.spec`: the grid language (loading, checks, expansion into :class:`Cell` s);
- :mod:`cdlib.grid.cells`: one cell on disk (its lock, status, manifest, identity, papermill run);
- :mod:`cdlib.grid.runner`: which cells run and when (one decision rule), ``--jobs N``, ``results.parquet``;
- :mod:`cdlib.grid.slurm`: sbatch array scripts per stage and wave, and ``submit.sh``;
- :mod:`cdlib.grid.status`: ``grid status``;
- :mod:`cdlib.grid.__main__`: the command line, ``python -m cdlib.grid run|status|slurm GRID``.

A cell's files are read through :mod:`cdlib.outputs`.
"""

from cdlib.grid.spec import KINDS, Cell, Grid, GridSpec, Override, SlurmSpec, StageSpec

__all__ = ["KINDS", "Cell", "Grid", "GridSpec", "Override", "SlurmSpec", "StageSpec"]
