"""Decoding a Work API answer's body: bounded, strict JSON (every answer is validated).

- Size: the exchange stops reading past `max_bytes` (`_transports`); this module never sees more.
- Numbers: NaN, Infinity and -Infinity (which Python's json accepts) are refused, and so is a float literal that
  overflows to an infinity (1e999). Out-of-range values and booleans where numbers belong are the models' checks.
- Depth: at most `MAX_DEPTH` nested arrays/objects. Counting brackets (in C) bounds the depth from above, so the
  walk that measures it runs only for the rare answer with that many brackets at all.

Every violation is a `ValueError`; the client turns it into a `ResponseError` (an unknown outcome for the core).
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32
"""Nested arrays/objects allowed in an answer (a work object needs 3, a list page 5)."""


class AnswerError(ValueError):
    """The body is not acceptable JSON."""


def _no_constant(name: str) -> Any:
    raise AnswerError(f"a JSON {name} is not a number the Work API sends")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise AnswerError("a JSON number out of range")
    return value


_decoder = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float)


def decode(raw: bytes) -> Any:
    """The JSON value of `raw` (UTF-8), or AnswerError."""
    try:
        value = _decoder.decode(raw.decode())
    except AnswerError:
        raise
    except RecursionError:
        raise AnswerError(f"the answer nests deeper than {MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise AnswerError(f"the answer is not JSON ({type(exc).__name__})") from None
    # Counting brackets (in C) bounds the depth from above: only a body with many brackets is walked.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _depth_exceeds(value, MAX_DEPTH):
        raise AnswerError(f"the answer nests deeper than {MAX_DEPTH} levels")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
