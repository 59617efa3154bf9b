"""Hiding credentials that ride inside URLs before any text is written or shown.

A server's address may carry its key: ``http://user:sk-...@host/v1`` (userinfo) or
``https://host/v1?api_key=...`` (a query parameter). :func:`scrub_text` replaces those parts
with ``***`` in any text (a params file, a manifest, a notebook, a log line, an error
message); :func:`scrub_value` does it to every string inside dicts and lists. It is a leaf
(no import from the rest of cdlib), so every writer can call it. Header values and a known
key are scrubbed by :func:`cdlib.engines.base.scrub`, which quotes server bodies.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# scheme://userinfo@ : whatever precedes '@' in the authority part (user, user:password, a token)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@?#'\"<>]+@")
# ?name=value or &name=value where the name says key, token, secret, password, signature or auth
_QUERY = re.compile(r"(?i)([?&][\w.-]*(?:key|token|secret|passw|pwd|sig|auth|credential)[\w.-]*=)[^&#\s'\"<>\\]+")


def scrub_text(text: str) -> str:
    """``text`` with URL credentials (userinfo, secret-named query parameters) replaced by ``***``."""
    if "://" not in text and "=" not in text:
        return text
    return _QUERY.sub(lambda m: m.group(1) + MASK, _USERINFO.sub(lambda m: m.group(1) + MASK + "@", text))


def scrub_value(value: Any) -> Any:
    """``value`` with :func:`scrub_text` applied to every string in it (dict keys and values, lists, tuples)."""
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {scrub_value(k): scrub_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub_value(v) for v in value)
    return value
