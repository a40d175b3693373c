"""The update bundle: one plain tar holding a manifest, a hash-pinned requirements file and wheels.

    manifest.json        format, name, version, python, platform, created, wheels, installer
    requirements.txt     `name==version --hash=sha256:<hex>` per wheel except the installer (pip)
    wheels/<file>.whl    every wheel the manifest lists, nothing else

This module reads the tar: `read_manifest` checks a bundle's structure, `unpack` writes
it out. What the manifest and requirements.txt may say is agent.ota.manifest's (whose
public names are re-exported here, so callers import the bundle format from one place).

Trust: the bundle's own bytes have been checked against signed TUF metadata before
it gets here, so it was published by whoever holds the targets key. This module
still trusts nothing inside it: a buggy or compromised build machine must not be
able to write outside the destination, exhaust the disk or slip in an unlisted
wheel. Every tar member is checked from its header before any data is read (a
fixed set of regular-file names, no links, devices or odd types, bounded count and
sizes, data inside the file), the manifest is validated field by field, and every
wheel's size and sha256 are checked against the manifest while it is unpacked.
`unpack` writes into a temporary sibling of the destination, fsyncs, and renames:
the destination either holds a complete, checked bundle or does not exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from agent.durable import fsync_directory
from agent.ota.manifest import (
    FORMAT,
    MANIFEST,
    NAME,
    REQUIREMENTS,
    WHEELS,
    BundleError,
    Limits,
    Manifest,
    WheelEntry,
    check_requirements,
    is_wheel_file,
    parse_manifest,
    platform_tag,
    python_tag,
)

__all__ = [
    "FORMAT",
    "MANIFEST",
    "NAME",
    "REQUIREMENTS",
    "WHEELS",
    "BundleError",
    "Limits",
    "Manifest",
    "WheelEntry",
    "parse_manifest",
    "platform_tag",
    "python_tag",
    "read_manifest",
    "unpack",
]

_TEXT_MAX = 1 << 20  # manifest.json and requirements.txt are small; refuse anything bigger
_CHUNK = 1 << 16
_LIMITS = Limits()  # the defaults (frozen: one shared value is safe)


def read_manifest(bundle: Path, limits: Limits = _LIMITS) -> Manifest:
    """Check the bundle's structure from its tar headers and return its validated manifest."""
    with _open(bundle, limits) as (stream, size):
        return _scan(bundle, stream, size, limits)[0]


def unpack(bundle: Path, dest: Path, limits: Limits = _LIMITS) -> Manifest:
    """Unpack a checked bundle to `dest` (which must not exist) and return its manifest.

    Every wheel's size and sha256 are verified while it is written; the files are
    written into a temporary sibling of `dest`, fsynced, and renamed to `dest`.
    BundleError: the bundle is bad; OSError: `dest`'s file system failed (e.g. it is full).
    """
    if dest.exists() or dest.is_symlink():
        raise BundleError(f"{dest} already exists; remove it before unpacking a bundle there")
    with _open(bundle, limits) as (stream, size):
        manifest, manifest_sha = _scan(bundle, stream, size, limits)
        stream.seek(0)
        partial = Path(
            tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
        )
        try:
            _extract(bundle, stream, partial, manifest, manifest_sha, limits=limits)
            os.rename(partial, dest)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    fsync_directory(dest.parent)
    return manifest


@contextlib.contextmanager
def _open(bundle: Path, limits: Limits) -> Iterator[tuple[IO[bytes], int]]:
    """The bundle file, opened once (both passes read the same bytes), and its size."""
    try:
        stream = bundle.open("rb")
    except OSError as exc:
        raise BundleError(f"cannot open bundle {bundle}: {exc.strerror or exc}") from exc
    with stream:
        size = os.fstat(stream.fileno()).st_size
        overhead = 2048 * (limits.max_members + 2)  # headers (incl. pax), padding, end blocks
        if size > limits.max_total_bytes + overhead:
            raise BundleError(
                f"bundle {bundle} is {size} bytes, more than the limit of "
                f"{limits.max_total_bytes} bytes of content"
            )
        yield stream, size


def _members(
    bundle: Path, stream: IO[bytes], size: int, limits: Limits
) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """Each member of the tar, refused as soon as its header breaks a rule."""
    seen: set[str] = set()
    total = 0
    try:
        with tarfile.open(fileobj=stream, mode="r:") as tar:
            for member in tar:
                if len(seen) >= limits.max_members:
                    raise BundleError(f"bundle {bundle} has more than {limits.max_members} members")
                _check_member(member, size, limits)
                if member.name in seen:
                    raise BundleError(f"member {member.name!r} appears twice in bundle {bundle}")
                seen.add(member.name)
                total += member.size
                if total > limits.max_total_bytes:
                    raise BundleError(
                        f"bundle {bundle} holds more than {limits.max_total_bytes} bytes "
                        f"(at member {member.name!r})"
                    )
                yield tar, member
    except (tarfile.TarError, EOFError) as exc:
        raise BundleError(f"bundle {bundle} is not a readable tar: {exc}") from exc


def _check_member(member: tarfile.TarInfo, size: int, limits: Limits) -> None:
    """Refuse a member by its header: unsafe name, type or size, or data beyond the file."""
    name = member.name
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise BundleError(f"member {name!r}: absolute names are not allowed")
    if ".." in name.split("/") or "\\" in name:
        raise BundleError(f"member {name!r}: '..' and backslashes are not allowed")
    if member.isdir():
        if name != WHEELS:
            raise BundleError(f"member {name!r}: the only directory allowed is {WHEELS}/")
        return
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        kind = "link" if member.issym() or member.islnk() else f"type {member.type!r}"
        raise BundleError(f"member {name!r}: is a {kind}; only regular files are allowed")
    if not _allowed_name(name):
        raise BundleError(
            f"member {name!r}: not part of the bundle format "
            f"({MANIFEST}, {REQUIREMENTS}, {WHEELS}/<name>.whl)"
        )
    if member.size > limits.max_member_bytes:
        raise BundleError(
            f"member {name!r}: {member.size} bytes, more than the limit of "
            f"{limits.max_member_bytes}"
        )
    if name in (MANIFEST, REQUIREMENTS) and member.size > _TEXT_MAX:
        raise BundleError(f"member {name!r}: {member.size} bytes, more than {_TEXT_MAX}")
    if member.offset_data + member.size > size:
        raise BundleError(f"member {name!r}: the bundle is truncated (its data ends early)")


def _allowed_name(name: str) -> bool:
    if name in (MANIFEST, REQUIREMENTS):
        return True
    directory, _, file = name.partition("/")
    return directory == WHEELS and is_wheel_file(file)


def _scan(bundle: Path, stream: IO[bytes], size: int, limits: Limits) -> tuple[Manifest, str]:
    """Pass one: every header checked, the manifest parsed, members matched against it."""
    sizes: dict[str, int] = {}
    raw: bytes | None = None
    for tar, member in _members(bundle, stream, size, limits):
        if member.isdir():
            continue
        sizes[member.name] = member.size
        if member.name == MANIFEST:
            raw = _read(tar, member)
    if raw is None:
        raise BundleError(f"bundle {bundle} has no {MANIFEST}")
    if REQUIREMENTS not in sizes:
        raise BundleError(f"bundle {bundle} has no {REQUIREMENTS}")
    manifest = parse_manifest(raw, limits)
    _match_members(bundle, manifest, sizes)
    return manifest, hashlib.sha256(raw).hexdigest()


def _match_members(bundle: Path, manifest: Manifest, sizes: dict[str, int]) -> None:
    listed = {f"{WHEELS}/{w.file}": w for w in manifest.wheels}
    present = {name for name in sizes if name.startswith(f"{WHEELS}/")}
    if missing := sorted(set(listed) - present):
        raise BundleError(f"bundle {bundle}: {MANIFEST} lists {missing[0]!r}, which is missing")
    if extra := sorted(present - set(listed)):
        raise BundleError(f"bundle {bundle}: member {extra[0]!r} is not listed in {MANIFEST}")
    for name, entry in listed.items():
        if sizes[name] != entry.size:
            raise BundleError(
                f"member {name!r}: {sizes[name]} bytes, but {MANIFEST} says {entry.size}"
            )


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    source = tar.extractfile(member)
    if source is None:  # pragma: no cover - regular files always have data
        raise BundleError(f"member {member.name!r}: no data")
    try:
        data = source.read(member.size)
    except (tarfile.TarError, EOFError) as exc:
        raise BundleError(f"member {member.name!r}: the bundle is truncated ({exc})") from exc
    if len(data) != member.size:
        raise BundleError(f"member {member.name!r}: the bundle is truncated")
    return data


def _extract(
    bundle: Path,
    stream: IO[bytes],
    partial: Path,
    manifest: Manifest,
    manifest_sha: str,
    *,
    limits: Limits,
) -> None:
    """Pass two: write every member into `partial`, checking sizes and hashes."""
    (partial / WHEELS).mkdir()
    expected = {f"{WHEELS}/{w.file}": w.sha256 for w in manifest.wheels}
    expected[MANIFEST] = manifest_sha
    size = os.fstat(stream.fileno()).st_size
    for tar, member in _members(bundle, stream, size, limits):
        if member.isdir():
            continue
        digest = _copy(tar, member, partial / member.name)
        want = expected.get(member.name)
        if want is not None and digest != want:
            raise BundleError(
                f"member {member.name!r}: sha256 {digest} does not match {MANIFEST} ({want})"
            )
        if member.name == REQUIREMENTS:
            check_requirements((partial / REQUIREMENTS).read_bytes(), manifest)
    fsync_directory(partial / WHEELS)
    fsync_directory(partial)


def _copy(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> str:
    """Write one member's data to a new file (never through a link), fsynced; its sha256."""
    source = tar.extractfile(member)
    if source is None:  # pragma: no cover - regular files always have data
        raise BundleError(f"member {member.name!r}: no data")
    digest = hashlib.sha256()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    with os.fdopen(os.open(target, flags, 0o644), "wb") as out:
        left = member.size
        while left:
            try:
                chunk = source.read(min(_CHUNK, left))
            except (tarfile.TarError, EOFError) as exc:
                raise BundleError(f"member {member.name!r}: the bundle is truncated") from exc
            if not chunk:
                raise BundleError(f"member {member.name!r}: the bundle is truncated")
            digest.update(chunk)
            out.write(chunk)
            left -= len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()
