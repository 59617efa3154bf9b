"""compress-distill: the shared library behind the stage notebooks (see README.md)."""

__version__ = "0.1.0"

import sys as _sys

# jsonschema imports rfc3987_syntax when it is installed (jupyter-events' jsonschema[format-nongpl] pulls it in),
# only to check the "iri"/"iri-reference" string formats, and that import builds a Lark grammar: ~3.5 s of CPU
# in every process that imports jsonschema, i.e. every cell's runner (papermill -> nbformat) and the report
# (altair), ~90 CPU-seconds of a `make demo`. Nothing here validates IRIs, so the module is marked absent,
# which jsonschema handles as "not installed" (the two formats go unchecked). Import it yourself before
# cdlib if you need them.
_sys.modules.setdefault("rfc3987_syntax", None)
