"""compress-distill: the shared library behind the stage notebooks.

One module per stage (``generate``, ``compress``, ``truncate``, ``train``, ``evaluate``, ``judge``,
``trace_import``), called by the notebooks; three packages they stand on (``grid``: grid files and the
runner; ``engines``: text generation; ``training``: what ``train`` is made of); the report side
(``results``, ``tables``, ``figures``, ``report``, ...); and the shared modules below them all
(``store``, ``params``, ``outputs``, ``answers``, ...). README.md's Layout section draws the map.
"""

import sys as _sys

__version__ = "0.1.0"
__all__ = ["__version__"]

# jsonschema imports rfc3987_syntax when it is installed (jupyter-events' jsonschema[format-nongpl] pulls it in),
# only to check the "iri"/"iri-reference" string formats, and that import builds a Lark grammar: ~3.5 s of CPU
# in every process that imports jsonschema, i.e. every cell's runner (papermill -> nbformat) and the report
# (altair), ~90 CPU-seconds of a `make demo`. Nothing here validates IRIs, so the module is marked absent,
# which jsonschema handles as "not installed" (the two formats go unchecked). Import it yourself before
# cdlib if you need them.
_sys.modules.setdefault("rfc3987_syntax", None)
