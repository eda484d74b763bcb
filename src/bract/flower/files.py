"""Atomic, durable file writes for the records a federation must never leave half-written
or lose: a hospital's privacy state and signed ledger, a run's report and checkpoints."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

# One step's records (a round's report row and its checkpoint) are written under this
# lock; once the process is stopping, no thread writes a record again.
_commit = threading.RLock()
_frozen = threading.Event()
#: What runs when the process freezes its records (:func:`on_freeze`), in order.
_on_freeze: list[Callable[[], None]] = []


def on_freeze(callback: Callable[[], None]) -> Callable[[], None]:
    """Run ``callback`` when :func:`freeze_records` stops this process (an interrupt),
    before any child process is stopped; returns the function that unregisters it.
    For a record of what was under way (a secure round's recorded view) that must be
    written as it stands rather than lost. An error it raises is ignored."""
    _on_freeze.append(callback)

    def remove() -> None:
        with contextlib.suppress(ValueError):
            _on_freeze.remove(callback)

    return remove


def _park_if_frozen() -> None:
    # The process is exiting (see freeze_records): wait for it instead of writing.
    while _frozen.is_set():
        time.sleep(3600)


@contextlib.contextmanager
def committing() -> Iterator[None]:
    """Write one step's records as a unit with respect to :func:`freeze_records`: a
    freeze waits for a commit under way to end, and a commit that starts after a
    freeze never writes (its thread waits for the process to exit)."""
    with _commit:
        _park_if_frozen()
        yield


def freeze_records(wait: float) -> None:
    """Stop this process from writing records: wait up to ``wait`` seconds for a commit
    under way (:func:`committing`) to finish, then make every later write wait forever.

    For a process that is about to exit because it was interrupted: whatever its threads
    observe from here on (a hospital's process killed by the stop itself) is not a
    result, so none of it may reach the report, ledger or checkpoint."""
    got = _commit.acquire(timeout=wait)
    _frozen.set()
    if got:
        _commit.release()
    for callback in list(_on_freeze):
        with contextlib.suppress(Exception):
            callback()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably.

    Guarantee: at every moment, a crash or power loss included, ``path`` is either the
    file it was (or absent) or the complete new one; never empty or partial, and once
    this returns the new file survives a power loss. The text goes to a temporary file
    in the same directory, which is fsynced, renamed over ``path`` (``os.replace``),
    and the directory is fsynced so the rename lasts; directories it creates are made
    durable too (:func:`make_directory`). A failure removes the temporary file and
    leaves ``path`` as it was. Nothing is written once :func:`freeze_records` has run
    in this process."""
    path = Path(path)
    with committing():
        make_directory(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_directory(path.parent)


def write_private_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the owner only, atomically and durably.

    Guarantee: at every moment, a crash or power loss included, ``path`` is either
    absent, the file it was, or the complete new one; never empty or partial. The bytes
    go to a temporary file created with mode 0600 in the same directory (so a key
    never inherits the wider mode of a file it replaces), which is fsynced, renamed
    over ``path`` (``os.replace``), and the directory is fsynced so the rename lasts;
    directories it creates are made durable too (:func:`make_directory`).
    A failure removes the temporary file and leaves ``path`` as it was.
    """
    path = Path(path)
    make_directory(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def make_directory(directory: Path) -> None:
    """Create ``directory`` and its missing parents (as ``mkdir -p``), durably: the
    parent of each directory it creates is fsynced, so a file later fsynced into it is
    not lost with a directory entry a power loss dropped."""
    directory = Path(directory)
    created: list[Path] = []
    d = directory
    while not d.is_dir() and d.parent != d:
        created.append(d)
        d = d.parent
    if not created:
        return
    directory.mkdir(parents=True, exist_ok=True)
    for d in reversed(created):
        fsync_directory(d.parent)


def fsync_directory(directory: Path) -> None:
    """Flush ``directory``'s entries (a rename into it) to disk; a file system that
    cannot fsync a directory (``EINVAL``) is left as it is."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` archive at ``path``, read in full.

    Guarantee: any file content at all either yields a name-to-array mapping of
    non-object arrays or raises ValueError with one line naming ``path`` and what is
    wrong with it (missing, not a zip archive, truncated, a damaged member, pickled
    objects); no other exception escapes for a bad file.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("it is a single .npy array, not an .npz archive")
            return {name: np.asarray(data[name]) for name in data.files}
    except MemoryError:
        raise ValueError(f"{path} is not a readable .npz archive "
                         "(it declares arrays too large to read)") from None
    except Exception as exc:  # zipfile, zlib and numpy raise many types for damage
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path} is not a readable .npz archive "
                         f"({type(exc).__name__}: {detail})") from None
