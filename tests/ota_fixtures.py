"""Tiny real wheels and update bundles for the OTA tests.

`make_wheel` writes an installable wheel with zipfile (dist-info METADATA, WHEEL,
entry_points.txt and a RECORD with sha256 entries): pip installs it like any other.
`make_bundle` packs wheels and the pip installer wheel into a bundle in the format
of agent/ota/bundle.py, and can add hostile members or a doctored manifest for the
tests that prove the reader refuses them. `pip_wheel` finds the pip wheel matching
the test interpreter's pip, offline when it can, and caches it once for all sessions.

Trust: test data only; nothing here is used by the product.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import tarfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import images.bundle
from agent.ota.bundle import (
    MANIFEST,
    NAME,
    REQUIREMENTS,
    WHEELS,
    Manifest,
    WheelEntry,
    platform_tag,
    python_tag,
)

CREATED = "2026-01-01T00:00:00+00:00"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so the same inputs make the same wheel bytes


@dataclass(frozen=True)
class Member:
    """A raw tar member for hostile bundles: any name, type, link target or declared size."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    size: int | None = None  # the size in the header (default: len(data))


def make_wheel(
    directory: Path,
    name: str = NAME,
    version: str = "9.0",
    *,
    scripts: Mapping[str, str] | None = None,
    files: Mapping[str, str | bytes] | None = None,
    requires: Sequence[str] = (),
) -> Path:
    """Write `<name>-<version>-py3-none-any.whl` into `directory` and return its path.

    `scripts` maps console script names to "module:function"; `files` maps paths
    inside the wheel (e.g. "tinyprobe/__init__.py") to their contents; `requires`
    become Requires-Dist lines.
    """
    directory.mkdir(parents=True, exist_ok=True)
    dist = f"{name.replace('-', '_')}-{version}"
    info = f"{dist}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    contents: dict[str, bytes] = {
        path: text.encode() if isinstance(text, str) else text
        for path, text in (files or {}).items()
    }
    contents[f"{info}/METADATA"] = metadata.encode()
    contents[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: citygate-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    if scripts:
        lines = "".join(f"{k} = {v}\n" for k, v in sorted(scripts.items()))
        contents[f"{info}/entry_points.txt"] = f"[console_scripts]\n{lines}".encode()
    record = "".join(
        f"{path},sha256={_record_hash(data)},{len(data)}\n" for path, data in contents.items()
    )
    contents[f"{info}/RECORD"] = f"{record}{info}/RECORD,,\n".encode()
    path = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, data in contents.items():
            archive.writestr(zipfile.ZipInfo(member, _ZIP_TIME), data)
    return path


def _record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def bundle_manifest(
    version: str,
    wheels: Sequence[Path],
    installer: Path,
    *,
    platform: str | None = None,
    python: str | None = None,
) -> Manifest:
    """The valid manifest of a bundle holding `wheels` and the `installer` pip wheel."""
    entries = tuple(WheelEntry.of(w) for w in [*wheels, installer])
    return Manifest(
        name=NAME,
        version=version,
        python=python or python_tag(),
        platform=platform or platform_tag(),
        created=CREATED,
        wheels=entries,
        installer=installer.name,
    )


def make_bundle(
    out: Path,
    version: str,
    wheels: Sequence[Path],
    *,
    platform: str | None = None,
    python: str | None = None,
    installer_wheel: Path | None = None,
    extra_members: Sequence[Member] = (),
    manifest_patch: Mapping[str, object] | None = None,
    manifest_raw: bytes | None = None,
    requirements_raw: bytes | None = None,
    omit: Sequence[str] = (),
    replace: Mapping[str, bytes] | None = None,
) -> Path:
    """Write a bundle of `wheels` (plus the pip installer wheel) to `out` and return its path.

    `out` may be an existing directory: the bundle is then `out/citygate-<version>.bundle`.
    Hostile options for tests: `extra_members` appended raw; `manifest_patch` merged
    into the manifest document (a value of None deletes the field); `manifest_raw`
    and `requirements_raw` replace those members' bytes; `omit` leaves out members by
    name (e.g. "wheels/x.whl"); `replace` swaps a member's data (header size follows).
    """
    if out.is_dir():
        out = out / f"{NAME}-{version}.bundle"
    installer = installer_wheel or pip_wheel()
    manifest = bundle_manifest(version, wheels, installer, platform=platform, python=python)
    document = json.loads(manifest.to_json())
    for key, value in (manifest_patch or {}).items():
        if value is None:
            document.pop(key, None)
        else:
            document[key] = value
    members = [
        Member(
            MANIFEST, manifest_raw if manifest_raw is not None else json.dumps(document).encode()
        ),
        Member(
            REQUIREMENTS,
            requirements_raw if requirements_raw is not None else manifest.requirements().encode(),
        ),
        *(Member(f"{WHEELS}/{w.name}", w.read_bytes()) for w in [*wheels, installer]),
    ]
    members = [
        Member(m.name, (replace or {}).get(m.name, m.data)) for m in members if m.name not in omit
    ]
    write_tar(out, [*members, *extra_members])
    return out


def write_tar(out: Path, members: Sequence[Member]) -> None:
    """A plain POSIX tar of exactly `members`, as given (no checks: tests make bad ones)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type = member.type
            info.linkname = member.linkname
            info.mode = 0o644
            info.mtime = 1_767_225_600
            regular = member.type in (tarfile.REGTYPE, tarfile.AREGTYPE)
            info.size = member.size if member.size is not None else len(member.data)
            if regular:
                data = member.data.ljust(info.size, b"\0")[: info.size]
                tar.addfile(info, io.BytesIO(data))
            else:
                info.size = 0
                tar.addfile(info)


@functools.cache
def pip_wheel() -> Path:
    """The pip wheel of the test interpreter's pip version, cached in ~/.cache/citygate-test-wheels.

    Found offline when possible (the interpreter's ensurepip bundle, Debian's
    /usr/share/python-wheels); otherwise downloaded once with the machine's pip config.
    Override the directory with $CITYGATE_TEST_WHEELS.
    """
    default = Path.home() / ".cache" / "citygate-test-wheels"
    return images.bundle.pip_wheel(Path(os.environ.get("CITYGATE_TEST_WHEELS", default)))
