"""A private file (an identity key, a SuperNode key) is replaced whole or not at all:
owner-only from creation, fsynced, renamed into place, its directory fsynced."""

from __future__ import annotations

import os
import stat

import pytest

from bract.flower import files


def _entries(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("fail_at", ["fsync", "replace"])
def test_a_write_that_fails_midway_leaves_the_old_file_and_no_debris(tmp_path, monkeypatch,
                                                                     fail_at) -> None:
    key = tmp_path / "identity.key"
    key.write_bytes(b"old key\n")

    def crash(*args, **kwargs):
        raise OSError(5, "Input/output error (simulated crash)")

    monkeypatch.setattr(os, fail_at, crash)
    with pytest.raises(OSError, match="simulated crash"):
        files.write_private_bytes(key, b"new key\n")
    assert key.read_bytes() == b"old key\n"
    assert _entries(tmp_path) == ["identity.key"]


def test_a_write_is_owner_only_durable_and_atomic(tmp_path, monkeypatch) -> None:
    key = tmp_path / "keys" / "identity.key"
    key.parent.mkdir()
    key.write_bytes(b"old key\n")
    key.chmod(0o644)  # a wider file it replaces: the new one is still 0600
    synced: list[str] = []
    renamed: list[tuple[str, str, int]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        renamed.append((os.path.dirname(src), os.fspath(dst),
                        stat.S_IMODE(os.stat(src).st_mode)))
        assert open(src, "rb").read() == b"new key\n"  # complete before it is renamed
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    files.write_private_bytes(key, b"new key\n")
    assert key.read_bytes() == b"new key\n"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert renamed == [(str(key.parent), str(key), 0o600)]  # same directory, 0600 already
    assert synced == ["file", "directory"]  # the data, then the rename
    assert _entries(key.parent) == ["identity.key"]
