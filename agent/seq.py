"""The message sequence number: strictly increasing for the life of the signing key.

`seq` goes into every signed message (DESIGN.md §3) so a consumer can drop
duplicates by (gateway, seq). It must never repeat, across restarts, crashes
and even the loss of the spool file. The counter therefore lives in its own
small file, named after the key id, and is *reserved ahead* in blocks: the file
holds an upper bound that no issued number has reached, written atomically and
fsynced before any number below it is handed out. A crash wastes at most one
block of numbers; it can never reissue one.
"""

from __future__ import annotations

import os
from pathlib import Path

BLOCK = 4096


class SeqError(Exception):
    """The sequence file is unreadable or corrupt; refusing to guess a number."""


class SeqCounter:
    """Hands out sequence numbers; `floor` raises the start (e.g. the spool's last seq + 1)."""

    def __init__(self, path: Path, *, floor: int = 0, block: int = BLOCK) -> None:
        self._path = path
        self._block = block
        self._next = max(floor, _read_bound(path))
        self._bound = self._next  # nothing reserved yet in this process

    @property
    def path(self) -> Path:
        return self._path

    def peek(self) -> int:
        """The number the next `take` returns."""
        return self._next

    def take(self) -> int:
        if self._next >= self._bound:
            bound = self._next + self._block
            _write_bound(self._path, bound)  # may raise (disk full): then nothing is handed out
            self._bound = bound
        seq = self._next
        self._next += 1
        return seq


def _read_bound(path: Path) -> int:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return 0
    except (OSError, UnicodeDecodeError) as exc:
        raise SeqError(f"{path}: cannot read sequence file: {exc}") from exc
    if not text.isdigit():
        raise SeqError(f"{path}: sequence file is corrupt ({text[:20]!r}); restore it or remove it")
    return int(text)


def _write_bound(path: Path, bound: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{bound}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
