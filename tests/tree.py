"""What a refused command must leave untouched: a snapshot of a directory tree."""

from __future__ import annotations

import os
from pathlib import Path


def tree_snapshot(root: Path) -> dict[str, tuple[bool, int, bytes]]:
    """Every entry under ``root`` (and ``root`` itself): kind, mtime and bytes, so two
    snapshots are equal only if nothing was created, moved, removed or written."""
    seen = {".": (True, root.stat().st_mtime_ns, b"")}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            is_dir = path.is_dir()
            seen[str(path.relative_to(root))] = (
                is_dir, path.stat().st_mtime_ns, b"" if is_dir else path.read_bytes())
    return seen
