"""The one reader of numbers in file headers: agent files, prefix blocks, cache
cards and agent archives all take their offsets, shapes and counts from here.

A header is JSON, and JSON has more numbers than a header may hold: Python's
reader accepts `Infinity` and `NaN`, `1e400`, `2.5` and `-3`, and metadata
carries numbers as strings. Every one of them is refused here with a
`HeaderNumberError` (a ValueError) naming the field, so no caller meets an
OverflowError or a float where it indexes, slices or allocates.
"""

from __future__ import annotations

import math

MAX_COUNT = (1 << 63) - 1


class HeaderNumberError(ValueError):
    """A header field that is not a number in its range."""


def count(value: object, what: str, lo: int = 0, hi: int = MAX_COUNT) -> int:
    """An integer in [lo, hi]: a JSON integer, or a decimal string of one (metadata values)."""
    if isinstance(value, str) and value.lstrip("-").isdecimal() and value.isascii() and len(value) <= 20:
        value = int(value)
    if type(value) is not int:
        raise HeaderNumberError(f"{what} is {value!r:.40}, not an integer")
    if not lo <= value <= hi:
        raise HeaderNumberError(f"{what} is {value}, outside [{lo}, {hi}]")
    return value


def real(value: object, what: str, lo: float, hi: float) -> float:
    """A finite number in [lo, hi] (a JSON integer or float, or a string of one)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise HeaderNumberError(f"{what} is {value!r:.40}, not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HeaderNumberError(f"{what} is {value!r:.40}, not a finite number")
    if not lo <= value <= hi:
        raise HeaderNumberError(f"{what} is {value}, outside [{lo}, {hi}]")
    return float(value)


def shape(value: object, what: str, hi: int, most_dims: int = 8) -> list[int]:
    """A tensor shape: a list of at most `most_dims` counts, each at most `hi`."""
    if not isinstance(value, list) or len(value) > most_dims:
        raise HeaderNumberError(f"{what} is not a list of at most {most_dims} dimensions")
    return [count(d, f"{what}[{i}]", 0, hi) for i, d in enumerate(value)]
