"""How numbers and shapes are written in every table, message and page resify prints.

A leaf of the import graph: the renderer, the report's reasons and the planner's messages all
use these, so a magnitude is written one way everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["fmt_number", "fmt_times", "fmt_similarity", "fmt_shape", "first_line"]


def fmt_number(x: float | None) -> str:
    """A number as 1.23e-05 (one format, so that magnitudes line up); '-' for None.

    >>> fmt_number(0.000123), fmt_number(0), fmt_number(None)
    ('1.23e-04', '0', '-')
    """
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.2e}"


def fmt_times(r: float | None) -> str:
    """A ratio as '3.2×', '412×', '1.5e+20×'.

    >>> fmt_times(3.21), fmt_times(412.0), fmt_times(1.5e20)
    ('3.2×', '412×', '1.5e+20×')
    """
    if r is None:
        return "-"
    if not math.isfinite(r):
        return "∞×" if r > 0 else "-"
    if r < 10:
        return f"{r:.2g}×" if r < 0.1 else f"{r:.1f}×"
    if r < 1e5:
        return f"{r:,.0f}×"
    return f"{r:.1e}×"


def fmt_similarity(x: float | None) -> str:
    """A similarity (1: identical) as '0.298', or as '1 − 3.0e-07' near 1 (where three digits would all read 1).

    >>> fmt_similarity(0.2981), fmt_similarity(0.9999997), fmt_similarity(None)
    ('0.298', '1 − 3.0e-07', '-')
    """
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    if 0.999 < x < 1:
        return f"1 − {1 - x:.1e}"
    return f"{x:.3f}"


def fmt_shape(s: Sequence[int]) -> str:
    """A shape as '[1, 3, 224, 224]'.

    >>> fmt_shape((1, 3, 224, 224))
    '[1, 3, 224, 224]'
    """
    return "[" + ", ".join(str(x) for x in s) + "]"


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty).

    >>> first_line(ValueError("bad shape\\nmore detail")), first_line(KeyError())
    ('bad shape', 'KeyError')
    """
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
