"""Files that survive a power cut: written whole or not at all, and durable once written.

`write_atomically` writes a temporary file beside the target (created
exclusively, never through a symlink), fsyncs it, renames it over the target
and fsyncs the directory: after a crash the target is the old file or the new
one, never part of one. `fsync_directory` makes a rename, a new file or a
removal in a directory durable (a rename is only in the directory's data).

Used by certificate rotation (agent.rotation), the update client (agent.ota)
and the update repository tooling (images.tufrepo).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` (file mode `mode`), durably, in one step."""
    temporary = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    fsync_directory(path.parent)
