"""Argument types shared by the ``bract`` subcommands: each turns a command-line
string into a value or raises ``argparse.ArgumentTypeError`` naming the problem."""

from __future__ import annotations

import argparse
import math

__all__ = ["finite_float", "nonnegative_int", "positive_float", "positive_int"]


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _integer(text, 1)


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    return _integer(text, 0)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def finite_float(text: str) -> float:
    """A finite number (no inf, no nan)."""
    value = _number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def positive_float(text: str, what: str = "") -> float:
    """A finite number > 0; ``what`` (e.g. ``"epsilon"``) starts the error message."""
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        prefix = f"{what} " if what else ""
        raise argparse.ArgumentTypeError(f"{prefix}must be a finite number > 0, got {text}")
    return value


def output_dir_problem(path: object, flag: str = "--out", *,
                       create: bool = True) -> str | None:
    """Why ``path`` cannot be a run's output directory (an existing file, a place this
    process cannot create or write), or ``None`` when it can. Creates the directory
    (and proves it writable) unless ``create`` is false; then it writes nothing and
    checks that the nearest existing folder on the way is a writable directory."""
    import os
    import tempfile
    from pathlib import Path

    out = Path(str(path)).expanduser()
    if out.exists() and not out.is_dir():
        return f"{flag} {out} is an existing file, not a directory: name a directory"
    if not create:
        for part in (out, *out.absolute().parents):
            if part.exists():
                if not part.is_dir():
                    return (f"{flag} {out} cannot be made: {part} is a file, not a "
                            "directory: name a directory")
                if not os.access(part, os.W_OK | os.X_OK):
                    return (f"{flag} {out} cannot be written ({part} is not writable): "
                            "name a writable directory")
                return None
        return None
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".bract-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return (f"{flag} {out} cannot be written ({exc.strerror or exc}): name a writable "
                "directory")
    return None
