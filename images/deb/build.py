"""Build the citygate Debian package with dpkg-deb: `python3 -m images.deb`.

What the package holds:

    /opt/citygate/releases/<version>/      the release (images/deb/release.py)
    /opt/citygate/current                  -> releases/<version>, switched by postinst
    /usr/bin/citygate                      -> /opt/citygate/current/bin/citygate
    /lib/systemd/system/citygate.service   images/systemd/citygate.service
    /usr/lib/modules-load.d/citygate.conf  the USB serial drivers, loaded at boot
    /etc/citygate/gateway.toml             docs/sample-gateway.toml, a conffile
    /usr/share/doc/citygate/               copyright, changelog

and the control files: control (Depends on the Python and glibc the release
was built for), conffiles, md5sums, and the maintainer scripts in images/deb/
(postinst, prerm, postrm) with the release's version filled in. Every file is
root-owned in the package (`dpkg-deb --root-owner-group`), so building needs no
root; file times are clamped to the last commit (SOURCE_DATE_EPOCH).

Trust: the project tree is trusted; the staging tree is scanned for build paths
before it is packed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

from images.deb.release import PACKAGE, PREFIX, BuildError, build_release, leftovers, run

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CONFFILES = ("/etc/citygate/gateway.toml",)
DEFAULT_MAINTAINER = "citygate maintainers <citygate@example.invalid>"
_MAINTAINER_SCRIPTS = ("postinst", "prerm", "postrm")
_PEP440 = re.compile(
    r"(?P<release>\d+(?:\.\d+)*)(?:(?P<pre>a|b|rc)(?P<pre_n>\d+))?"
    r"(?:\.post(?P<post>\d+))?(?:\.dev(?P<dev>\d+))?(?:\+(?P<local>[a-z0-9.]+))?"
)


@dataclass(frozen=True, slots=True)
class Package:
    path: Path
    version: str  # the project's (PEP 440) version, also the release directory's name
    debian_version: str
    architecture: str


def debian_version(version: str) -> str:
    """The Debian version that sorts like the PEP 440 `version` (dev, then pre-releases first)."""
    match = _PEP440.fullmatch(version)
    if match is None:
        raise BuildError(f"cannot map version {version!r} to a Debian version")
    parts = match.groupdict()
    result = parts["release"]
    if parts["pre"]:
        result += f"~{parts['pre']}{parts['pre_n']}"
    if parts["post"]:
        result += f"+post{parts['post']}"
    if parts["dev"]:  # a dev release of X sorts before X's pre-releases: "~~" before "~"
        plain = not parts["pre"] and not parts["post"]
        result += f"{'~~' if plain else '~'}dev{parts['dev']}"
    if parts["local"]:
        result += f"+{parts['local']}"
    return result


def project_metadata(project: Path) -> dict[str, object]:
    with (project / "pyproject.toml").open("rb") as f:
        meta: dict[str, object] = tomllib.load(f)["project"]
    return meta


def _architecture() -> str:
    return run(["dpkg", "--print-architecture"], what="dpkg --print-architecture").strip()


def _source_date_epoch(project: Path) -> int:
    if value := os.environ.get("SOURCE_DATE_EPOCH"):
        return int(value)
    try:
        return int(run(["git", "-C", project, "log", "-1", "--format=%ct"], what="git log"))
    except (BuildError, ValueError, OSError):
        return int(time.time())  # not a git checkout: files keep their times up to now


# -- the rest of the payload and the control files -----------------------------------


def _install_file(source: Path, target: Path, mode: int = 0o644) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.chmod(mode)


def _payload(stage: Path, project: Path, maintainer: str, deb_version: str, epoch: int) -> None:
    systemd = HERE.parent / "systemd"
    _install_file(systemd / "citygate.service", stage / "lib/systemd/system/citygate.service")
    _install_file(systemd / "modules-load.conf", stage / "usr/lib/modules-load.d/citygate.conf")
    _install_file(project / "docs/sample-gateway.toml", stage / "etc/citygate/gateway.toml")
    (stage / "usr/bin").mkdir(parents=True, exist_ok=True)
    (stage / "usr/bin/citygate").symlink_to(PREFIX / "current/bin/citygate")
    doc = stage / "usr/share/doc" / PACKAGE
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(_COPYRIGHT)
    when = format_datetime(datetime.fromtimestamp(epoch, UTC))
    changelog = (
        f"{PACKAGE} ({deb_version}) unstable; urgency=medium\n\n"
        f"  * Release {deb_version} of the citygate gateway agent.\n\n"
        f" -- {maintainer}  {when}\n"
    )
    with (
        (doc / "changelog.gz").open("wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=epoch, filename="") as out,
    ):
        out.write(changelog.encode())


_COPYRIGHT = """\
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: citygate

Files: *
Copyright: 2025-2026 the citygate authors
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.

Files: opt/citygate/releases/*/lib/*
Copyright: 2025-2026 the authors of each bundled Python distribution
License: various
 The release directory bundles the Python distributions citygate depends on
 (cryptography, paho-mqtt, cbor2, pyserial, tinydb, pymodbus, bleak and what
 they need). Each one's licence is in its *.dist-info directory.
"""


def _normalise_modes(stage: Path) -> None:
    for path in stage.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o755)
        else:
            path.chmod(0o755 if path.stat().st_mode & 0o100 else 0o644)


def _md5sums(stage: Path) -> str:
    lines = []
    for path in sorted(stage.rglob("*")):
        relative = path.relative_to(stage)
        if relative.parts[0] == "DEBIAN" or path.is_symlink() or not path.is_file():
            continue
        if "/" + str(relative) in CONFFILES:
            continue  # dpkg keeps the hashes of conffiles itself
        lines.append(f"{hashlib.md5(path.read_bytes()).hexdigest()}  {relative}\n")  # noqa: S324 -- dpkg's format
    return "".join(lines)


def _installed_size_kib(stage: Path) -> int:
    total = 0
    for path in stage.rglob("*"):
        if path.relative_to(stage).parts[0] == "DEBIAN":
            continue
        size = 0 if path.is_symlink() or path.is_dir() else path.stat().st_size
        total += max(1, -(-size // 1024))
    return total


def _control(fields: dict[str, str]) -> str:
    head = "".join(f"{key}: {value}\n" for key, value in fields.items())
    return head + _DESCRIPTION


_DESCRIPTION = """\
Description: gateway agent for city sensors
 citygate reads waste-bin, air-quality and utility-meter sensors over serial
 lines, Modbus and Bluetooth Low Energy, keeps every reading on local flash
 until the cloud has acknowledged it, signs the telemetry (COSE_Sign1 over
 SenML) and sends it over mutually authenticated MQTT 5.
 .
 This package installs one release of the agent as a self-contained virtual
 environment in /opt/citygate/releases/<version>, linked from
 /opt/citygate/current, a hardened systemd unit (citygate.service) and a
 sample configuration, /etc/citygate/gateway.toml.
"""


def _control_files(stage: Path, fields: dict[str, str], version: str) -> None:
    control = stage / "DEBIAN"
    control.mkdir()
    for name in _MAINTAINER_SCRIPTS:
        text = (HERE / name).read_text().replace("@VERSION@", version)
        (control / name).write_text(text)
        (control / name).chmod(0o755)
    (control / "conffiles").write_text("".join(f"{path}\n" for path in CONFFILES))
    (control / "md5sums").write_text(_md5sums(stage))
    (control / "control").write_text(_control(fields))


# -- the whole build -----------------------------------------------------------------


def build_deb(
    out_dir: Path,
    *,
    project: Path = ROOT,
    python: str = "/usr/bin/python3",
    cache: Path | None = None,
    maintainer: str = DEFAULT_MAINTAINER,
    compression: str = "xz",
) -> Package:
    """Build `citygate_<version>_<arch>.deb` into `out_dir`; return what was built.

    `cache` keeps the build's own virtual environment and the dependencies' wheels
    between builds; by default both live in a temporary directory. The project's
    own wheel is always built afresh.
    """
    meta = project_metadata(project)
    version = str(meta["version"])
    deb_version = debian_version(version)
    architecture = _architecture()
    epoch = _source_date_epoch(project)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="citygate-deb-") as tmp:
        work = Path(tmp)
        keep = cache.resolve() if cache else work
        stage = work / "root"
        release = build_release(stage, project, version, python=python, cache=keep)
        _payload(stage, project, maintainer, deb_version, epoch)
        if found := leftovers(stage, [work, keep, project.resolve()]):
            raise BuildError("build paths left in the package: " + ", ".join(found[:10]))
        _normalise_modes(stage)
        glibc = ".".join(map(str, release.glibc))
        fields = {
            "Package": PACKAGE,
            "Version": deb_version,
            "Architecture": architecture,
            "Maintainer": maintainer,
            "Installed-Size": str(_installed_size_kib(stage)),
            "Depends": f"python{release.python_version}, libc6 (>= {glibc}), adduser",
            "Suggests": "bluez",
            "Section": "net",
            "Priority": "optional",
        }
        _control_files(stage, fields, version)
        target = out_dir / f"{PACKAGE}_{deb_version}_{architecture}.deb"
        run(
            ["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build", stage, target],
            what="dpkg-deb --build",
            env={"SOURCE_DATE_EPOCH": str(epoch)},
        )
    return Package(target, version, deb_version, architecture)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m images.deb", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="default: dist/")
    parser.add_argument(
        "--python",
        default="/usr/bin/python3",
        help="the interpreter the gateway runs (default: /usr/bin/python3)",
    )
    parser.add_argument(
        "--cache", type=Path, help="keep the build environment and the wheels here between builds"
    )
    parser.add_argument("--maintainer", default=DEFAULT_MAINTAINER, help="the Maintainer field")
    parser.add_argument(
        "--compression",
        default="xz",
        choices=["xz", "gzip"],
        help="xz (default: smallest) or gzip (fastest to build)",
    )
    args = parser.parse_args(argv)
    try:
        package = build_deb(
            args.out,
            python=args.python,
            cache=args.cache,
            maintainer=args.maintainer,
            compression=args.compression,
        )
    except BuildError as exc:
        print(f"citygate deb: {exc}", file=sys.stderr)
        return 1
    print(package.path)
    return 0
