"""The bundle reader refuses every unsafe or inconsistent bundle; the builder makes good ones.

Hostile bundles are real tar files written by tests/ota_fixtures.py; the real
builder (`python -m images.bundle build`) runs once per session against a wheel
cache kept in pytest's cache directory, and its bundle is installed offline with
the pip wheel it carries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from agent.ota.bundle import (
    BundleError,
    Limits,
    Manifest,
    parse_manifest,
    platform_tag,
    python_tag,
    read_manifest,
    unpack,
)
from images.bundle import copy_project, set_version
from tests.ota_fixtures import Member, make_bundle, make_wheel, pip_wheel

ROOT = Path(__file__).resolve().parents[1]
PROBE = {"tinyprobe/__init__.py": "def main() -> None:\n    print('probe ok')\n"}


@pytest.fixture
def wheels(tmp_path: Path) -> list[Path]:
    """citygate 9.0 (a console script) and one dependency."""
    directory = tmp_path / "made"
    return [
        make_wheel(
            directory, scripts={"citygate": "tinyprobe:main"}, files=PROBE, requires=["dep1==1.0"]
        ),
        make_wheel(directory, "dep1", "1.0", files={"dep1.py": "X = 1\n"}),
    ]


def _bundle(tmp_path: Path, wheels: list[Path], **options: object) -> Path:
    return make_bundle(tmp_path / "citygate-9.0.bundle", "9.0", wheels, **options)  # type: ignore[arg-type]


def _refused(bundle: Path, dest: Path, match: str, limits: Limits | None = None) -> None:
    """unpack refuses with `match`, and leaves neither `dest` nor a partial directory behind."""
    before = sorted(dest.parent.iterdir())
    with pytest.raises(BundleError, match=match):
        unpack(bundle, dest, limits or Limits())
    assert not dest.exists()
    assert sorted(dest.parent.iterdir()) == before


def test_a_valid_bundle_round_trips(tmp_path: Path, wheels: list[Path]) -> None:
    bundle = _bundle(tmp_path, wheels)
    manifest = read_manifest(bundle)
    assert (manifest.name, manifest.version) == ("citygate", "9.0")
    assert (manifest.python, manifest.platform) == (python_tag(), platform_tag())
    assert manifest.installer == pip_wheel().name
    assert [w.file for w in manifest.wheels] == [*(w.name for w in wheels), pip_wheel().name]

    dest = tmp_path / "unpacked"
    assert unpack(bundle, dest) == manifest
    for wheel in [*wheels, pip_wheel()]:
        assert (dest / "wheels" / wheel.name).read_bytes() == wheel.read_bytes()
    assert parse_manifest((dest / "manifest.json").read_bytes()) == manifest
    assert (dest / "requirements.txt").read_text() == manifest.requirements()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["citygate-9.0.bundle", "made", "unpacked"]


def test_the_unpacked_bundle_installs_offline_with_its_own_pip(
    tmp_path: Path, wheels: list[Path]
) -> None:
    dest = tmp_path / "unpacked"
    manifest = unpack(_bundle(tmp_path, wheels), dest)
    venv = _install(dest, manifest, tmp_path / "venv")
    result = subprocess.run([venv / "bin" / "citygate"], capture_output=True, text=True, check=True)
    assert result.stdout == "probe ok\n"


def _install(unpacked: Path, manifest: Manifest, venv: Path) -> Path:
    """Install the bundle's wheels the way a gateway does: offline, hashes required."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    wheels = unpacked / "wheels"
    subprocess.run(
        [venv / "bin" / "python", wheels / manifest.installer / "pip", "install", "--isolated",
         "--quiet", "--no-index", "--find-links", wheels, "--require-hashes", "--no-cache-dir",
         "-r", unpacked / "requirements.txt"],
        check=True, env=env, timeout=600,
    )  # fmt: skip
    return venv


@pytest.mark.parametrize(
    ("member", "match"),
    [
        (Member("wheels/../../escaped.whl", b"x"), "'..'"),
        (Member("../escaped.whl", b"x"), "'..'"),
        (Member("/tmp/absolute.whl", b"x"), "absolute"),
        (Member("wheels/link.whl", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "link"),
        (Member("wheels/hard.whl", type=tarfile.LNKTYPE, linkname="manifest.json"), "link"),
        (Member("wheels/char.whl", type=tarfile.CHRTYPE), "only regular files"),
        (Member("wheels/block.whl", type=tarfile.BLKTYPE), "only regular files"),
        (Member("wheels/fifo.whl", type=tarfile.FIFOTYPE), "only regular files"),
        (Member("wheels/sparse.whl", b"x", type=tarfile.GNUTYPE_SPARSE), "only regular files"),
        (Member("other", type=tarfile.DIRTYPE), "only directory"),
        (Member("wheels/sub", type=tarfile.DIRTYPE), "only directory"),
        (Member("notes.txt", b"x"), "not part of the bundle format"),
        (Member("wheels/readme.txt", b"x"), "not part of the bundle format"),
        (Member("manifest.json", b"{}"), "appears twice"),
    ],
    ids=lambda v: v.name if isinstance(v, Member) else None,
)
def test_a_hostile_member_is_refused_before_anything_is_written(
    tmp_path: Path, wheels: list[Path], member: Member, match: str
) -> None:
    bundle = _bundle(tmp_path, wheels, extra_members=[member])
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(BundleError, match=match):
        read_manifest(bundle)
    _refused(bundle, work / "unpacked", match)
    assert not (tmp_path / "escaped.whl").exists()
    assert not Path("/tmp/absolute.whl").exists()


def test_a_member_bigger_than_the_limit_is_refused(tmp_path: Path, wheels: list[Path]) -> None:
    bundle = _bundle(tmp_path, wheels)
    limit = pip_wheel().stat().st_size - 1
    _refused(bundle, tmp_path / "u", "pip-.*more than the limit", Limits(max_member_bytes=limit))
    unpack(bundle, tmp_path / "u", Limits(max_member_bytes=limit + 1))


def test_a_bundle_bigger_than_the_total_limit_is_refused(
    tmp_path: Path, wheels: list[Path]
) -> None:
    bundle = _bundle(tmp_path, wheels)
    _refused(bundle, tmp_path / "u", "more than the limit", Limits(max_total_bytes=100_000))


def test_a_bundle_with_too_many_members_is_refused(tmp_path: Path, wheels: list[Path]) -> None:
    bundle = _bundle(tmp_path, wheels)  # manifest, requirements and three wheels
    _refused(bundle, tmp_path / "u", "more than 4 members", Limits(max_members=4))
    unpack(bundle, tmp_path / "u", Limits(max_members=5))


def test_a_wheel_whose_sha256_differs_from_the_manifest_is_refused(
    tmp_path: Path, wheels: list[Path]
) -> None:
    data = bytearray(wheels[1].read_bytes())
    data[10] ^= 0xFF  # same size, other bytes
    bundle = _bundle(tmp_path, wheels, replace={f"wheels/{wheels[1].name}": bytes(data)})
    read_manifest(bundle)  # the headers are fine; only the data is wrong
    _refused(bundle, tmp_path / "u", f"{wheels[1].name}.*sha256 .* does not match")


def test_a_wheel_whose_size_differs_from_the_manifest_is_refused(
    tmp_path: Path, wheels: list[Path]
) -> None:
    name = f"wheels/{wheels[1].name}"
    bundle = _bundle(tmp_path, wheels, replace={name: wheels[1].read_bytes() + b"\0"})
    _refused(bundle, tmp_path / "u", "bytes, but manifest.json says")


def test_a_missing_wheel_is_refused(tmp_path: Path, wheels: list[Path]) -> None:
    bundle = _bundle(tmp_path, wheels, omit=[f"wheels/{wheels[1].name}"])
    _refused(bundle, tmp_path / "u", f"lists 'wheels/{wheels[1].name}', which is missing")


def test_an_unlisted_wheel_is_refused(tmp_path: Path, wheels: list[Path]) -> None:
    extra = make_wheel(tmp_path / "extra", "intruder", "1.0")
    member = Member(f"wheels/{extra.name}", extra.read_bytes())
    bundle = _bundle(tmp_path, wheels, extra_members=[member])
    _refused(bundle, tmp_path / "u", "intruder-1.0-py3-none-any.whl' is not listed")


def test_a_bundle_without_manifest_or_requirements_is_refused(
    tmp_path: Path, wheels: list[Path]
) -> None:
    _refused(_bundle(tmp_path, wheels, omit=["manifest.json"]), tmp_path / "u", "no manifest")
    _refused(_bundle(tmp_path, wheels, omit=["requirements.txt"]), tmp_path / "u", "no requirem")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "must be a JSON object"),
    ],
)
def test_a_manifest_that_is_not_a_json_object_is_refused(
    tmp_path: Path, wheels: list[Path], raw: bytes, match: str
) -> None:
    _refused(_bundle(tmp_path, wheels, manifest_raw=raw), tmp_path / "u", match)


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"format": 2}, "'format' is 2"),
        ({"format": True}, "'format' is True"),
        ({"surprise": 1}, "unknown field 'surprise'"),
        ({"created": None}, "field 'created' is missing"),
        ({"name": "othergate"}, "'name' is 'othergate'"),
        ({"version": "nine"}, "'version' 'nine' is not a PEP 440"),
        ({"version": "09.0"}, "not in normal form"),
        ({"version": 9}, "'version' must be a non-empty string"),
        ({"python": "3"}, "'python' is '3'"),
        ({"platform": "../x"}, "'platform' is '../x'"),
        ({"created": "yesterday"}, "'created' 'yesterday' is not ISO-8601"),
        ({"created": "2026-01-01T00:00:00+02:00"}, "must be in UTC"),
        ({"created": "2026-01-01T00:00:00"}, "must be in UTC"),
        ({"wheels": []}, "'wheels' must be a non-empty list"),
        ({"wheels": {}}, "'wheels' must be a non-empty list"),
        ({"installer": "dep1-1.0-py3-none-any.whl"}, "is not a pip wheel"),
        ({"installer": "pip-1-py3-none-any.whl"}, "not among 'wheels'"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else None,
)
def test_a_manifest_field_out_of_its_rules_is_refused(
    tmp_path: Path, wheels: list[Path], patch: dict[str, object], match: str
) -> None:
    bundle = _bundle(tmp_path, wheels, manifest_patch=patch)
    with pytest.raises(BundleError, match=match):
        read_manifest(bundle)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"file": "../x.whl"}, r"wheels\[0\].file '../x.whl' is not a plain wheel"),
        ({"file": "notawheel.whl"}, r"wheels\[0\].file .* not a valid wheel name"),
        ({"sha256": "AB" * 32}, r"wheels\[0\].sha256 must be 64 lowercase hex"),
        ({"size": "12"}, r"wheels\[0\].size '12' must be an integer"),
        ({"size": 0}, r"wheels\[0\].size 0 must be an integer"),
        ({"size": 1 << 40}, r"wheels\[0\].size \d+ must be an integer"),
        ({"extra": 1}, r"wheels\[0\] must be an object with exactly"),
    ],
)
def test_a_wheel_entry_out_of_its_rules_is_refused(
    tmp_path: Path, wheels: list[Path], change: dict[str, object], match: str
) -> None:
    document = json.loads(read_manifest(_bundle(tmp_path, wheels)).to_json())
    document["wheels"][0] |= change
    with pytest.raises(BundleError, match=match):
        parse_manifest(json.dumps(document).encode())


def test_a_wheel_listed_twice_is_refused(tmp_path: Path, wheels: list[Path]) -> None:
    document = json.loads(read_manifest(_bundle(tmp_path, wheels)).to_json())
    document["wheels"].append(document["wheels"][0])
    with pytest.raises(BundleError, match="lists a file twice"):
        parse_manifest(json.dumps(document).encode())


@pytest.mark.parametrize(
    ("requirements", "match"),
    [
        ("", "does not pin citygate-9.0"),
        ("citygate==9.0\n", "line 1: expected"),
        ("citygate==9.0 --hash=sha256:" + "0" * 64 + "\n", "line 1: hash 0000"),
        ("dep1==1.0 --hash=sha256:{citygate}\n", "pins dep1==1.0 to the hash of citygate"),
    ],
)
def test_requirements_that_do_not_pin_exactly_the_wheels_are_refused(
    tmp_path: Path, wheels: list[Path], requirements: str, match: str
) -> None:
    valid = read_manifest(_bundle(tmp_path, wheels))
    raw = requirements.format(citygate=valid.wheels[0].sha256).encode()
    _refused(_bundle(tmp_path, wheels, requirements_raw=raw), tmp_path / "u", match)


@pytest.mark.parametrize("where", ["first header", "middle", "last header", "last data"])
def test_a_truncated_bundle_is_refused(tmp_path: Path, wheels: list[Path], where: str) -> None:
    bundle = _bundle(tmp_path, wheels)
    with tarfile.open(bundle) as tar:
        last = tar.getmembers()[-1]
    cut = {
        "first header": 100,
        "middle": bundle.stat().st_size // 2,
        "last header": last.offset + 100,
        "last data": last.offset_data + last.size - 1,
    }[where]
    bundle.write_bytes(bundle.read_bytes()[:cut])
    match = "truncated|not a readable tar|which is missing"
    with pytest.raises(BundleError, match=match):
        read_manifest(bundle)  # from the headers alone
    _refused(bundle, tmp_path / "u", match)


def test_a_file_that_is_not_a_plain_tar_is_refused(tmp_path: Path, wheels: list[Path]) -> None:
    bundle = _bundle(tmp_path, wheels)
    compressed = tmp_path / "compressed.bundle"
    with tarfile.open(compressed, "w:gz") as tar:
        tar.add(bundle, "manifest.json")
    _refused(compressed, tmp_path / "u", "not a readable tar")
    _refused(tmp_path / "absent.bundle", tmp_path / "u", "cannot open bundle")


def test_unpack_never_replaces_an_existing_destination(tmp_path: Path, wheels: list[Path]) -> None:
    bundle = _bundle(tmp_path, wheels)
    dest = tmp_path / "u"
    dest.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BundleError, match="already exists"):
        unpack(bundle, dest)
    assert not (tmp_path / "elsewhere").exists()


def test_set_version_rewrites_only_the_project_version(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[build-system]\nversion = "x"\n\n[project]\nname = "citygate"\nversion = "0.1.0"\n'
        '\n[tool.other]\nversion = "7"\n'
    )
    set_version(pyproject, "0.2.0rc1")
    assert pyproject.read_text() == (
        '[build-system]\nversion = "x"\n\n[project]\nname = "citygate"\nversion = "0.2.0rc1"\n'
        '\n[tool.other]\nversion = "7"\n'
    )


def test_copy_project_outside_git_leaves_environments_and_outputs_behind(tmp_path: Path) -> None:
    project = tmp_path / "project"
    for name in ["pyproject.toml", "agent/cli.py", ".venv/bin/python", ".venv-x/a", "dist/a.whl",
                 "build/lib/x.py", ".git/HEAD", "x.egg-info/PKG-INFO", "agent/__pycache__/c.pyc",
                 "node_modules/m/i.js", ".mypy_cache/c"]:  # fmt: skip
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(name)
    (project / ".git").rename(project / "not-git")  # a plain tree, not a checkout
    copy_project(project, tmp_path / "copy")
    copied = sorted(str(p.relative_to(tmp_path / "copy")) for p in (tmp_path / "copy").rglob("*"))
    assert copied == ["agent", "agent/cli.py", "not-git", "not-git/HEAD", "pyproject.toml"]


@pytest.fixture(scope="session")
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real bundle of this checkout, built once per session with a kept wheel cache."""
    out = tmp_path_factory.mktemp("built") / "citygate-0.1.1.bundle"
    cache = request.config.cache.mkdir("citygate-bundle") if request.config.cache else None
    _build("0.1.1", out, cache, os.environ)
    return out


def _build(
    version: str, out: Path, cache: Path | None, env: os._Environ[str] | dict[str, str]
) -> None:
    cached = ["--cache", str(cache)] if cache else []
    subprocess.run(
        [sys.executable, "-m", "images.bundle", "build", "--version", version, "--out", out,
         "--project", ROOT, *cached],
        check=True, cwd=ROOT, env=env, timeout=900,
    )  # fmt: skip


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_the_real_build_installs_offline_and_runs(built: Path, tmp_path: Path) -> None:
    manifest = unpack(built, tmp_path / "unpacked")
    own = [w.file for w in manifest.wheels if w.file.startswith("citygate-")]
    assert own == ["citygate-0.1.1-py3-none-any.whl"]
    assert manifest.installer.startswith("pip-")
    venv = _install(tmp_path / "unpacked", manifest, tmp_path / "venv")
    result = subprocess.run(
        [venv / "bin" / "citygate", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "citygate 0.1.1"


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_rebuild_takes_its_dependencies_from_the_cache_without_an_index(
    built: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    assert request.config.cache is not None
    cache = request.config.cache.mkdir("citygate-bundle")
    nowhere = {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
               "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": "", "PIP_RETRIES": "0",
               "PIP_TIMEOUT": "5"}  # fmt: skip
    out = tmp_path / "citygate-0.1.2.bundle"
    _build("0.1.2", out, cache, {**os.environ, **nowhere})
    first, second = read_manifest(built), read_manifest(out)
    assert second.version == "0.1.2"
    assert {w for w in first.wheels if not w.file.startswith("citygate-")} == {
        w for w in second.wheels if not w.file.startswith("citygate-")
    }
