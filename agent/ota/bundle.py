"""The update bundle: one plain tar holding a manifest, a hash-pinned requirements file and wheels.

    manifest.json        format, name, version, python, platform, created, wheels, installer
    requirements.txt     `name==version --hash=sha256:<hex>` per wheel except the installer (pip)
    wheels/<file>.whl    every wheel the manifest lists, nothing else

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
import json
import os
import platform
import re
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

FORMAT = 1
NAME = "citygate"
MANIFEST = "manifest.json"
REQUIREMENTS = "requirements.txt"
WHEELS = "wheels"
_TEXT_MAX = 1 << 20  # manifest.json and requirements.txt are small; refuse anything bigger
_CHUNK = 1 << 16
_MANIFEST_KEYS = frozenset(
    {"format", "name", "version", "python", "platform", "created", "wheels", "installer"}
)
_WHEEL_KEYS = frozenset({"file", "sha256", "size"})
_WHEEL_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,200}\.whl")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PYTHON = re.compile(r"[0-9]{1,2}\.[0-9]{1,3}")
_PLATFORM = re.compile(r"[a-z0-9_]{1,32}-[a-z0-9_]{1,32}")
_REQUIREMENT = re.compile(r"(?P<name>[A-Za-z0-9._-]+)==(?P<version>\S+) --hash=sha256:(?P<sha>\S+)")


class BundleError(Exception):
    """The bundle is malformed or unsafe; the message names the member or field and why."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what a bundle may hold (a signed bundle is still not allowed to fill the disk)."""

    max_members: int = 500
    max_member_bytes: int = 128 << 20
    max_total_bytes: int = 512 << 20


@dataclass(frozen=True)
class WheelEntry:
    file: str  # a bare wheel file name, member wheels/<file>
    sha256: str  # lowercase hex
    size: int  # bytes

    @classmethod
    def of(cls, path: Path) -> WheelEntry:
        """The entry describing the wheel file at `path`."""
        digest = hashlib.sha256()
        with path.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
        return cls(path.name, digest.hexdigest(), path.stat().st_size)


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str  # PEP 440, normalised
    python: str  # "3.11"
    platform: str  # "linux-x86_64"
    created: str  # ISO-8601, UTC
    wheels: tuple[WheelEntry, ...]
    installer: str  # the file of the pip wheel among `wheels`

    def to_json(self) -> bytes:
        """manifest.json as the bundle holds it."""
        document = {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "python": self.python,
            "platform": self.platform,
            "created": self.created,
            "wheels": [{"file": w.file, "sha256": w.sha256, "size": w.size} for w in self.wheels],
            "installer": self.installer,
        }
        return (json.dumps(document, indent=2) + "\n").encode()

    def requirements(self) -> str:
        """requirements.txt in pip's hash-checking mode: every wheel but the installer."""
        lines = []
        for wheel in self.wheels:
            if wheel.file != self.installer:
                name, version, _, _ = parse_wheel_filename(wheel.file)
                lines.append(f"{name}=={version} --hash=sha256:{wheel.sha256}\n")
        return "".join(lines)


def platform_tag() -> str:
    """This machine's platform as bundles name it, e.g. "linux-x86_64" or "linux-aarch64"."""
    return f"{platform.system().lower()}-{platform.machine().lower()}"


def python_tag() -> str:
    """The running interpreter's minor version, e.g. "3.11"."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def read_manifest(bundle: Path, limits: Limits = Limits()) -> Manifest:
    """Check the bundle's structure from its tar headers and return its validated manifest."""
    with _open(bundle, limits) as (stream, size):
        return _scan(bundle, stream, size, limits)[0]


def unpack(bundle: Path, dest: Path, limits: Limits = Limits()) -> Manifest:
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
    _fsync_dir(dest.parent)
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
    return directory == WHEELS and _WHEEL_FILE.fullmatch(file) is not None


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


def parse_manifest(raw: bytes, limits: Limits = Limits()) -> Manifest:
    """Validate manifest.json field by field."""
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{MANIFEST} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise BundleError(f"{MANIFEST} must be a JSON object")
    if unknown := sorted(set(document) - _MANIFEST_KEYS):
        raise BundleError(f"{MANIFEST}: unknown field {unknown[0]!r}")
    if missing := sorted(_MANIFEST_KEYS - set(document)):
        raise BundleError(f"{MANIFEST}: field {missing[0]!r} is missing")
    fmt = document["format"]
    if type(fmt) is not int or fmt != FORMAT:
        raise BundleError(
            f"{MANIFEST}: field 'format' is {fmt!r}; this agent reads format {FORMAT}"
        )
    wheels = _wheels(document["wheels"], limits)
    installer = _text(document, "installer")
    if installer not in {w.file for w in wheels}:
        raise BundleError(f"{MANIFEST}: field 'installer' {installer!r} is not among 'wheels'")
    if canonicalize_name(parse_wheel_filename(installer)[0]) != "pip":
        raise BundleError(f"{MANIFEST}: field 'installer' {installer!r} is not a pip wheel")
    return Manifest(
        name=_name(document),
        version=_version(document),
        python=_matching(document, "python", _PYTHON, "like 3.11"),
        platform=_matching(document, "platform", _PLATFORM, "like linux-x86_64"),
        created=_created(document),
        wheels=wheels,
        installer=installer,
    )


def _text(document: dict[str, Any], field: str) -> str:
    value = document[field]
    if not isinstance(value, str) or not value:
        raise BundleError(f"{MANIFEST}: field {field!r} must be a non-empty string, not {value!r}")
    return value


def _matching(document: dict[str, Any], field: str, pattern: re.Pattern[str], hint: str) -> str:
    value = _text(document, field)
    if pattern.fullmatch(value) is None:
        raise BundleError(f"{MANIFEST}: field {field!r} is {value!r}; expected a value {hint}")
    return value


def _name(document: dict[str, Any]) -> str:
    name = _text(document, "name")
    if name != NAME:
        raise BundleError(f"{MANIFEST}: field 'name' is {name!r}; this agent installs {NAME!r}")
    return name


def _version(document: dict[str, Any]) -> str:
    value = _text(document, "version")
    try:
        normal = str(Version(value))
    except InvalidVersion as exc:
        raise BundleError(
            f"{MANIFEST}: field 'version' {value!r} is not a PEP 440 version"
        ) from exc
    if normal != value:
        raise BundleError(
            f"{MANIFEST}: field 'version' {value!r} is not in normal form (write {normal!r})"
        )
    return value


def _created(document: dict[str, Any]) -> str:
    value = _text(document, "created")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise BundleError(f"{MANIFEST}: field 'created' {value!r} is not ISO-8601") from exc
    if moment.utcoffset() != timedelta(0):
        raise BundleError(f"{MANIFEST}: field 'created' {value!r} must be in UTC")
    return value


def _wheels(value: object, limits: Limits) -> tuple[WheelEntry, ...]:
    if not isinstance(value, list) or not value:
        raise BundleError(f"{MANIFEST}: field 'wheels' must be a non-empty list")
    if len(value) > limits.max_members:
        raise BundleError(f"{MANIFEST}: field 'wheels' lists more than {limits.max_members}")
    entries = tuple(_wheel(i, item, limits) for i, item in enumerate(value))
    files = [e.file for e in entries]
    if len(set(files)) != len(files):
        raise BundleError(f"{MANIFEST}: field 'wheels' lists a file twice")
    return entries


def _wheel(index: int, item: object, limits: Limits) -> WheelEntry:
    where = f"{MANIFEST}: wheels[{index}]"
    if not isinstance(item, dict) or set(item) != _WHEEL_KEYS:
        raise BundleError(f"{where} must be an object with exactly 'file', 'sha256' and 'size'")
    file, sha, size = item["file"], item["sha256"], item["size"]
    if not isinstance(file, str) or _WHEEL_FILE.fullmatch(file) is None:
        raise BundleError(f"{where}.file {file!r} is not a plain wheel file name")
    try:
        parse_wheel_filename(file)
    except InvalidWheelFilename as exc:
        raise BundleError(f"{where}.file {file!r} is not a valid wheel name: {exc}") from exc
    if not isinstance(sha, str) or _SHA256.fullmatch(sha) is None:
        raise BundleError(f"{where}.sha256 must be 64 lowercase hex digits, not {sha!r}")
    if type(size) is not int or not 0 < size <= limits.max_member_bytes:
        raise BundleError(
            f"{where}.size {size!r} must be an integer in 1..{limits.max_member_bytes}"
        )
    return WheelEntry(file, sha, size)


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
            _check_requirements((partial / REQUIREMENTS).read_bytes(), manifest)
    _fsync_dir(partial / WHEELS)
    _fsync_dir(partial)


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


def _check_requirements(raw: bytes, manifest: Manifest) -> None:
    """requirements.txt pins exactly the manifest's wheels (but pip) by their sha256."""
    want = {w.sha256: w.file for w in manifest.wheels if w.file != manifest.installer}
    pins = {w.sha256: parse_wheel_filename(w.file)[:2] for w in manifest.wheels}
    try:
        lines = [line for line in raw.decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise BundleError(f"{REQUIREMENTS} is not UTF-8 text") from exc
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        match = _REQUIREMENT.fullmatch(line.strip())
        if match is None:
            raise BundleError(
                f"{REQUIREMENTS} line {number}: expected 'name==version --hash=sha256:<hex>'"
            )
        sha = match["sha"]
        if sha not in want or sha in seen:
            raise BundleError(
                f"{REQUIREMENTS} line {number}: hash {sha[:16]}... is not one wheel of {MANIFEST}"
            )
        name, version = pins[sha]
        if canonicalize_name(match["name"]) != name or match["version"] != str(version):
            raise BundleError(
                f"{REQUIREMENTS} line {number}: pins {match['name']}=={match['version']} "
                f"to the hash of {want[sha]}"
            )
        seen.add(sha)
    if missing := sorted(want[s] for s in set(want) - seen):
        raise BundleError(f"{REQUIREMENTS} does not pin {missing[0]} listed in {MANIFEST}")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
