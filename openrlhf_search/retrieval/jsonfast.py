"""JSON encode/decode for the server and client: orjson when installed (5-10x faster on hit lists), else stdlib.

Both paths accept and produce the same JSON; decoding errors are re-raised as ``ValueError`` so callers can fall
back to the stdlib decoder for a precise message.
"""

from __future__ import annotations

import json

try:  # optional speed-up (pip install orjson)
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None


def dumps(obj) -> bytes:
    """UTF-8 JSON bytes of ``obj``."""
    if _orjson is not None:
        return _orjson.dumps(obj)
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def loads(data: bytes | str):
    """Parse JSON; raises ``ValueError`` (``json.JSONDecodeError`` is one) on any malformed input."""
    if _orjson is not None:
        return _orjson.loads(data)
    return json.loads(data)
