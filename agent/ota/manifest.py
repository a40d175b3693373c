"""The update bundle's manifest: its model, and field-by-field validation of what a bundle says.

    manifest.json        format, name, version, python, platform, created, wheels, installer
    requirements.txt     `name==version --hash=sha256:<hex>` per wheel except the installer (pip)

`parse_manifest` turns manifest.json's bytes into a `Manifest` or raises BundleError
naming the field; `check_requirements` proves requirements.txt pins exactly the
manifest's wheels (but the installer) by their sha256. Both are functions of bytes:
reading the tar that holds them is agent.ota.bundle's job.

Trust: none. The bytes come from a bundle that is signed, but a buggy or compromised
build machine must still not get an unlisted wheel installed or a name outside the
bundle format accepted, so every field is checked for type, form and bounds (`Limits`).
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

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
    "check_requirements",
    "is_wheel_file",
    "parse_manifest",
    "platform_tag",
    "python_tag",
]

FORMAT = 1
NAME = "citygate"
MANIFEST = "manifest.json"
REQUIREMENTS = "requirements.txt"
WHEELS = "wheels"
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


def is_wheel_file(file: str) -> bool:
    """Whether `file` is a bare wheel file name of the form bundles allow (no directories)."""
    return _WHEEL_FILE.fullmatch(file) is not None


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
    if not isinstance(file, str) or not is_wheel_file(file):
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


def check_requirements(raw: bytes, manifest: Manifest) -> None:
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
