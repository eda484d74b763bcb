"""Argument types shared by the ``bract`` subcommands: each turns a command-line
string into a value or raises ``argparse.ArgumentTypeError`` naming the problem."""

from __future__ import annotations

import argparse
import math

__all__ = ["finite_float", "positive_int"]


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def finite_float(text: str) -> float:
    """A finite number (no inf, no nan)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value
