"""Build an update bundle: `python -m images.bundle build --version V --out FILE`.

The bundle (format: agent/ota/bundle.py) holds citygate at version V and every
wheel it needs, pinned by sha256, plus the pip wheel that installs them on the
gateway without network. Steps:

1. copy the project (git-tracked and untracked-but-not-ignored files in a git
   checkout; otherwise the tree minus virtual environments, .git, dist, build,
   caches and node_modules) to a temporary directory and set V in its pyproject.toml;
2. `pip wheel` it with images/deb/constraints.txt. The dependency wheels (and the
   build backend's) are kept in the cache: a later build runs pip offline from the
   cache with no pip configuration at all, and only rebuilds citygate; when the
   cache lacks something pip runs with the machine's configuration and the index;
3. add the pip wheel of the building interpreter's pip version as the installer;
4. write manifest.json and requirements.txt, tar it all, check the result with the
   gateway's own reader, and rename it into place (temporary file, fsync, rename).

Trust: the project tree, the cache and the package index are trusted at build time;
the bundle is then signed by the update repository (images/repo.py).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from agent.ota.bundle import (
    MANIFEST,
    NAME,
    REQUIREMENTS,
    WHEELS,
    BundleError,
    Manifest,
    WheelEntry,
    platform_tag,
    python_tag,
    read_manifest,
)
from images.deb.release import BuildError, run

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "images" / "deb" / "constraints.txt"
_SKIP_DIRS = frozenset(
    {".git", "dist", "build", "node_modules", "__pycache__", ".pytest_cache", ".mypy_cache",
     ".ruff_cache", ".hypothesis"}
)  # fmt: skip
_VERSION_LINE = re.compile(r'^version[ \t]*=[ \t]*"[^"\n]*"[ \t]*$', re.MULTILINE)


def default_cache() -> Path:
    """~/.cache/citygate-bundle (or under $XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "citygate-bundle"


def build(version: str, out: Path, *, project: Path = ROOT, cache: Path | None = None) -> Manifest:
    """Build the bundle of `project` at `version` into `out`; return its manifest."""
    version = _normal_version(version)
    cache = cache or default_cache()
    with tempfile.TemporaryDirectory(prefix="citygate-bundle-") as scratch:
        tree = Path(scratch) / "project"
        copy_project(project, tree)
        set_version(tree / "pyproject.toml", version)
        wheels = Path(scratch) / "wheels"
        build_wheels(tree, wheels, cache)
        installer = pip_wheel(cache / "installer")
        manifest = _manifest(version, wheels, installer)
        write_bundle(out, manifest, [*sorted(wheels.glob("*.whl")), installer])
    return manifest


def _normal_version(version: str) -> str:
    try:
        normal = str(Version(version))
    except InvalidVersion as exc:
        raise BuildError(f"--version {version!r} is not a PEP 440 version") from exc
    if normal != version:
        raise BuildError(f"--version {version!r}: write it in normal form, {normal!r}")
    return version


def copy_project(project: Path, tree: Path) -> None:
    """Copy the project's source files (not its environments, caches or outputs) to `tree`."""
    if not (project / "pyproject.toml").is_file():
        raise BuildError(f"{project} has no pyproject.toml; pass --project the citygate checkout")
    for relative in _project_files(project):
        source = project / relative
        if source.is_file() and not source.is_symlink():
            target = tree / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _project_files(project: Path) -> list[str]:
    if (project / ".git").exists() and shutil.which("git"):
        listed = run(
            ["git", "-C", project, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            what="git ls-files",
        )
        return sorted({name for name in listed.split("\0") if name})
    files = []
    for directory, subdirs, names in os.walk(project):
        subdirs[:] = [
            d for d in subdirs if d not in _SKIP_DIRS and not d.startswith(".venv")
            and not d.endswith(".egg-info")
        ]  # fmt: skip
        files += [str(Path(directory, n).relative_to(project)) for n in names]
    return sorted(files)


def set_version(pyproject: Path, version: str) -> None:
    """Rewrite `version = "..."` of the [project] table, and check that it took."""
    text = pyproject.read_text(encoding="utf-8")
    start = re.search(r"^\[project\]\s*$", text, re.MULTILINE)
    if start is None:
        raise BuildError(f"{pyproject} has no [project] table")
    end = re.compile(r"^\[", re.MULTILINE).search(text, start.end())
    section = text[start.end() : end.start() if end else len(text)]
    new_section, count = _VERSION_LINE.subn(f'version = "{version}"', section, count=1)
    if count != 1:
        raise BuildError(f'{pyproject}: [project] has no line `version = "..."` to rewrite')
    text = text[: start.end()] + new_section + text[start.end() + len(section) :]
    pyproject.write_text(text, encoding="utf-8")
    written = tomllib.loads(text)["project"]["version"]
    if written != version:
        raise BuildError(f"{pyproject}: version is {written!r} after rewriting it to {version!r}")


def build_wheels(tree: Path, wheels: Path, cache: Path) -> None:
    """Wheels of citygate and every dependency into `wheels`; dependencies kept in `cache`."""
    deps, backend = cache / "deps", cache / "build-backend"
    wheels.mkdir(parents=True, exist_ok=True)
    common: list[str | Path] = ["wheel", "--quiet", "--wheel-dir", wheels]
    common += ["--constraint", CONSTRAINTS, "--find-links", deps, "--find-links", backend]
    if deps.is_dir():
        try:
            _pip([*common, "--no-index", tree], what="pip wheel (offline)", offline=True)
        except BuildError:
            for partial in wheels.iterdir():
                partial.unlink()
        else:
            print("wheels: dependencies from the cache, offline", file=sys.stderr)
            return
    _pip([*common, tree], what="pip wheel", offline=False)
    print("wheels: dependencies from the package index (cached for next time)", file=sys.stderr)
    requires: list[str] = tomllib.loads((tree / "pyproject.toml").read_text())["build-system"][
        "requires"
    ]
    _pip(["download", "--quiet", "--only-binary=:all:", "--dest", backend, *requires],
         what="pip download (build backend)", offline=False)  # fmt: skip
    deps.mkdir(parents=True, exist_ok=True)
    for wheel in wheels.glob("*.whl"):
        if canonicalize_name(parse_wheel_filename(wheel.name)[0]) != NAME:
            _copy_atomic(wheel, deps / wheel.name)


def _pip(args: Sequence[str | Path], *, what: str, offline: bool) -> None:
    """Run the building interpreter's pip; offline means no configuration and no PIP_* variables."""
    env = {k: v for k, v in os.environ.items() if not (offline and k.startswith("PIP_"))}
    env |= {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    isolated = ["--isolated"] if offline else []
    if offline:
        env["PIP_CONFIG_FILE"] = os.devnull
    result = subprocess.run(
        [sys.executable, "-m", "pip", *isolated, *(str(a) for a in args)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise BuildError(f"{what} failed (exit {result.returncode}):\n{tail}")


def pip_wheel(cache: Path) -> Path:
    """The wheel of this interpreter's pip version, kept in `cache`.

    Taken from the interpreter's ensurepip bundle or Debian's /usr/share/python-wheels
    when it is there (no network), otherwise downloaded once with the machine's pip config.
    """
    version = importlib.metadata.version("pip")
    name = f"pip-{version}-py3-none-any.whl"
    cached = cache / name
    if cached.is_file():
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    import ensurepip

    for directory in (
        Path(ensurepip.__file__).parent / "_bundled",
        Path("/usr/share/python-wheels"),
    ):
        if (directory / name).is_file():
            _copy_atomic(directory / name, cached)
            return cached
    with tempfile.TemporaryDirectory(dir=cache) as download:
        _pip(["download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", download,
              f"pip=={version}"], what="pip download pip", offline=False)  # fmt: skip
        _copy_atomic(Path(download) / name, cached)
    return cached


def _copy_atomic(source: Path, target: Path) -> None:
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".part-", delete=False) as part:
        with source.open("rb") as stream:
            shutil.copyfileobj(stream, part)
        part.flush()
        os.fsync(part.fileno())
    os.replace(part.name, target)


def _manifest(version: str, wheels: Path, installer: Path) -> Manifest:
    files = sorted(wheels.glob("*.whl"))
    own = [f for f in files if canonicalize_name(parse_wheel_filename(f.name)[0]) == NAME]
    if [str(parse_wheel_filename(f.name)[1]) for f in own] != [version]:
        raise BuildError(f"pip wheel made {[f.name for f in own]}, not one {NAME} {version} wheel")
    if any(f.name == installer.name for f in files):
        raise BuildError(f"{installer.name} is both a dependency and the installer")
    created = os.environ.get("SOURCE_DATE_EPOCH")
    moment = datetime.fromtimestamp(int(created), UTC) if created else datetime.now(UTC)
    return Manifest(
        name=NAME,
        version=version,
        python=python_tag(),
        platform=platform_tag(),
        created=moment.replace(microsecond=0).isoformat(),
        wheels=tuple(WheelEntry.of(f) for f in [*files, installer]),
        installer=installer.name,
    )


def write_bundle(out: Path, manifest: Manifest, wheels: Sequence[Path]) -> None:
    """Tar the manifest, requirements and `wheels` to `out` atomically, checked by the reader."""
    by_name = {w.name: w for w in wheels}
    mtime = int(datetime.fromisoformat(manifest.created).timestamp())
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", delete=False) as part:
        try:
            with tarfile.open(fileobj=part, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name, data in [
                    (MANIFEST, manifest.to_json()),
                    (REQUIREMENTS, manifest.requirements().encode()),
                ]:
                    _add(tar, name, io.BytesIO(data), len(data), mtime)
                for entry in manifest.wheels:
                    with by_name[entry.file].open("rb") as wheel:
                        _add(tar, f"{WHEELS}/{entry.file}", wheel, entry.size, mtime)
            os.fchmod(part.fileno(), 0o644)  # published: anyone may read it
            part.flush()
            os.fsync(part.fileno())
            read_manifest(Path(part.name))
        except (BundleError, OSError) as exc:
            os.unlink(part.name)
            raise BuildError(f"writing {out} failed: {exc}") from exc
    os.replace(part.name, out)
    fd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _add(tar: tarfile.TarFile, name: str, data: IO[bytes], size: int, mtime: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, mtime
    tar.addfile(info, data)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m images.bundle", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="build citygate-<version>.bundle")
    make.add_argument("--version", required=True, help="the release's PEP 440 version")
    make.add_argument("--out", type=Path, required=True, help="the bundle file to write")
    make.add_argument("--project", type=Path, default=ROOT, help="the checkout (default: this one)")
    make.add_argument(
        "--cache", "--wheels-cache", type=Path, default=None,
        help=f"dependency wheels kept between builds (default: {default_cache()})",
    )  # fmt: skip
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        manifest = build(args.version, args.out, project=args.project, cache=args.cache)
    except BuildError as exc:
        print(f"citygate bundle: {exc}", file=sys.stderr)
        return 1
    size = args.out.stat().st_size
    print(
        f"{args.out}: citygate {manifest.version}, {len(manifest.wheels)} wheels, "
        f"{size / 1e6:.1f} MB, {time.monotonic() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
