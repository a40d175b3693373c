"""The Debian package: built once per session, inspected, installed, upgraded, booted.

- What dpkg-deb sees: contents, control fields, conffiles, maintainer scripts
  (shellcheck) and lintian's findings.
- Installed into a throw-away root: an overlay of this machine's own root file
  system, mounted in a private mount namespace (`unshare --mount`). dpkg runs the
  maintainer scripts chrooted into a complete Debian (adduser, deb-systemd-helper,
  python3.11 are really there), every write lands in a tmpfs, and all of it
  vanishes with the namespace. Then the installed tree runs `citygate --version`
  and `citygate config check`; remove, purge and an A/B upgrade are checked too.
- Booted: systemd-nspawn boots that root with systemd as PID 1, sharing the
  host's network so the agent reaches the test's broker and a pty sensor bound
  in as /dev/ttyUSB0. The unit runs with every sandbox directive in force; the
  agent reports READY and STATUS, a frozen agent is killed by the watchdog and
  restarted, the package is upgraded under the running service, and the
  journal holds the agent's lines with their levels.

The namespace tests need root (they mount); the boot test also needs
systemd-nspawn (Debian package systemd-container). They skip otherwise.
"""

from __future__ import annotations

import asyncio
import grp
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from images.deb import BuildError, Package, build_deb, debian_version
from images.deb.release import target_python
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles
from tests.agentrig import Capture, capture, new_capture

ROOT = Path(__file__).resolve().parent.parent
VERSION_BUMP = ".post1"  # the upgrade test's second package: 0.1.0 -> 0.1.0.post1

needs_dpkg = pytest.mark.skipif(
    shutil.which("dpkg-deb") is None or not Path("/usr/bin/python3").exists(),
    reason="needs dpkg-deb and the distribution's /usr/bin/python3 (Debian)",
)
needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="installing into a throw-away root mounts an overlay: run as root",
)
needs_nspawn = pytest.mark.skipif(
    shutil.which("systemd-nspawn") is None, reason="needs systemd-nspawn (systemd-container)"
)

pytestmark = [needs_dpkg, pytest.mark.integration]


# -- building -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def deb_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The build environment and the wheels, shared by the session's two builds."""
    return tmp_path_factory.mktemp("deb-cache")


@pytest.fixture(scope="session")
def package(tmp_path_factory: pytest.TempPathFactory, deb_cache: Path) -> Package:
    """The package as `make deb` builds it (gzip instead of xz: the same files, built faster)."""
    return build_deb(tmp_path_factory.mktemp("deb"), cache=deb_cache, compression="gzip")


@pytest.fixture(scope="session")
def upgrade(tmp_path_factory: pytest.TempPathFactory, deb_cache: Path) -> Package:
    """A second release of the same tree, one version up."""
    tree = tmp_path_factory.mktemp("tree")
    for name in ("agent", "drivers", "provisioning", "images", "docs"):
        shutil.copytree(
            ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
    shutil.copy(ROOT / "README.md", tree / "README.md")
    text = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', text, re.MULTILINE)
    assert version
    bumped = text.replace(version[0], f'version = "{version[1]}{VERSION_BUMP}"', 1)
    (tree / "pyproject.toml").write_text(bumped)
    out = tmp_path_factory.mktemp("deb-upgrade")
    return build_deb(out, project=tree, cache=deb_cache, compression="gzip")


@pytest.mark.parametrize(
    ("pep440", "debian"),
    [
        ("0.1.0", "0.1.0"),
        ("1.2.0rc1", "1.2.0~rc1"),
        ("1.2.0.dev3", "1.2.0~~dev3"),
        ("1.2.0.post1", "1.2.0+post1"),
        ("1.2.0a1.dev2", "1.2.0~a1~dev2"),
        ("1.2.0+gw7", "1.2.0+gw7"),
    ],
)
def test_python_versions_map_to_debian_versions_that_sort_alike(pep440: str, debian: str) -> None:
    assert debian_version(pep440) == debian


def test_debian_orders_the_mapped_versions_as_python_does() -> None:
    ordered = ["1.0.dev1", "1.0a1.dev2", "1.0a1", "1.0rc1", "1.0", "1.0.post1.dev1", "1.0.post1"]
    mapped = [debian_version(v) for v in ordered]
    for lower, higher in itertools.pairwise(mapped):
        result = subprocess.run(["dpkg", "--compare-versions", lower, "lt", higher], check=False)
        assert result.returncode == 0, f"{lower} < {higher}"


def test_an_unmappable_version_is_refused() -> None:
    with pytest.raises(BuildError, match="cannot map version"):
        debian_version("1!2.0")


def test_the_build_refuses_an_interpreter_the_gateway_does_not_have() -> None:
    if Path(sys.executable).resolve().parent == Path("/usr/bin"):
        pytest.skip("this test runs under the system interpreter itself")
    with pytest.raises(BuildError, match=r"/usr/bin/python3\.X"):
        target_python(sys.executable)


# -- what dpkg-deb sees ------------------------------------------------------------


def _contents(deb: Path) -> dict[str, tuple[str, str, str]]:
    """path -> (mode string, owner/group, link target) from `dpkg-deb --contents`."""
    listing = subprocess.run(
        ["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    entries = {}
    for line in listing.splitlines():
        mode, owner, _size, _date, _time, rest = line.split(maxsplit=5)
        path, _, target = rest.partition(" -> ")
        entries[path.removeprefix(".")] = (mode, owner, target)
    return entries


def _control(deb: Path, member: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "--info", str(deb), member], capture_output=True, text=True, check=True
    ).stdout


def test_the_package_is_named_for_its_version_and_architecture(package: Package) -> None:
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert package.path.name == f"citygate_{package.debian_version}_{arch}.deb"


def test_the_package_holds_the_release_unit_config_and_docs(package: Package) -> None:
    entries = _contents(package.path)
    release = f"/opt/citygate/releases/{package.version}"
    for path in (
        f"{release}/bin/citygate",
        f"{release}/pyvenv.cfg",
        "/lib/systemd/system/citygate.service",
        "/usr/lib/modules-load.d/citygate.conf",
        "/etc/citygate/gateway.toml",
        "/usr/share/doc/citygate/copyright",
        "/usr/share/doc/citygate/changelog.gz",
    ):
        assert path in entries, path
    assert entries["/usr/bin/citygate"][2] == "/opt/citygate/current/bin/citygate"
    assert entries[f"{release}/bin/python3.11"][2] == "/usr/bin/python3.11"
    assert "/opt/citygate/current" not in entries  # postinst switches it
    assert {owner for _, owner, _ in entries.values()} == {"root/root"}
    assert not [p for p in entries if "/site-packages/pip/" in p or p.endswith("/bin/pip")]
    assert f"{release}/lib/python3.11/site-packages/agent/__pycache__/service.cpython-311.pyc" in (
        entries
    )
    assert (ROOT / "docs/sample-gateway.toml").read_text() in _extracted_sample(package.path)


def _extracted_sample(deb: Path) -> str:
    data = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.extractfile("./etc/citygate/gateway.toml")
        assert member is not None
        return member.read().decode()


def test_the_control_fields_name_the_runtime_the_release_was_built_for(package: Package) -> None:
    control = _control(package.path, "control")
    fields = dict(
        line.split(": ", 1) for line in control.splitlines() if line and not line[0].isspace()
    )
    assert fields["Package"] == "citygate"
    assert fields["Version"] == package.debian_version
    depends = [d.strip() for d in fields["Depends"].split(",")]
    assert "python3.11" in depends
    assert "adduser" in depends
    assert any(re.fullmatch(r"libc6 \(>= 2\.\d+\)", d) for d in depends)
    assert int(fields["Installed-Size"]) > 1000


def test_the_sample_config_is_the_only_conffile(package: Package) -> None:
    assert _control(package.path, "conffiles") == "/etc/citygate/gateway.toml\n"
    md5sums = _control(package.path, "md5sums")
    assert "etc/citygate/gateway.toml" not in md5sums
    assert f"opt/citygate/releases/{package.version}/bin/citygate\n" in md5sums


@pytest.fixture
def maintainer_scripts(package: Package, tmp_path: Path) -> Path:
    subprocess.run(["dpkg-deb", "--control", str(package.path), str(tmp_path)], check=True)
    return tmp_path


def test_the_maintainer_scripts_name_this_release(maintainer_scripts: Path) -> None:
    postinst = (maintainer_scripts / "postinst").read_text()
    assert "@VERSION@" not in postinst
    assert re.search(r"^RELEASE=\d", postinst, re.MULTILINE)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_the_maintainer_scripts_pass_shellcheck(maintainer_scripts: Path) -> None:
    scripts = [str(maintainer_scripts / name) for name in ("postinst", "prerm", "postrm")]
    result = subprocess.run(
        ["shellcheck", "--shell=sh", *scripts], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


# -- installed into a throw-away root ----------------------------------------------

_SETUP = r"""
set -eu
base=$1 out=$2
shift 2
mount --make-rprivate /
mount -t tmpfs -o mode=0755 tmpfs "$base"
mkdir "$base/lower" "$base/upper" "$base/work" "$base/root"
mount --bind / "$base/lower"
mount -t overlay overlay \
    -o "lowerdir=$base/lower,upperdir=$base/upper,workdir=$base/work" "$base/root"
R=$base/root
mount --rbind /dev "$R/dev"
mount -t proc proc "$R/proc"
inroot() { chroot "$R" "$@"; }
as_service() { chroot "$R" setpriv --reuid=citygate --regid=citygate --init-groups "$@"; }
"""


def _in_throwaway_root(
    tmp_path: Path, body: str, *args: str | Path, timeout: float = 180
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """Run `body` (sh) with $R, a throw-away copy of this system's root, and $out."""
    base = tmp_path / "overlay"
    out = tmp_path / "out"
    base.mkdir()
    out.mkdir()
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", _SETUP + body, "sh", str(base), str(out),
         *map(str, args)],
        capture_output=True, text=True, check=False, timeout=timeout,
    )  # fmt: skip
    return out, result


def _gateway_config(port: str, broker_port: int = 8883) -> str:
    """A provisioned gateway's config: the identity where postinst expects it, one sensor."""
    return f"""\
[gateway]
state_dir = "/var/lib/citygate"
[identity]
key = "/etc/citygate/identity/gateway.key"
cert = "/etc/citygate/identity/gateway.crt"
ca = "/etc/citygate/identity/ca.crt"
[broker]
host = "localhost"
port = {broker_port}
backoff_initial_s = 0.1
backoff_max_s = 1.0
[spool]
commit_interval_s = 0.2
batch_interval_s = 0.5
[sensors.air_1]
driver = "pms5003"
port = "{port}"
"""


_PROVISION = r"""
install -m 600 "$KEY" "$R/etc/citygate/identity/gateway.key"
install -m 644 "$CERT" "$R/etc/citygate/identity/gateway.crt"
install -m 644 "$CA" "$R/etc/citygate/identity/ca.crt"
inroot chown citygate:citygate /etc/citygate/identity/gateway.key \
    /etc/citygate/identity/gateway.crt /etc/citygate/identity/ca.crt
"""


def _identity_env(lab: LabFiles) -> str:
    cert, key = lab.clients["gw-a"]
    return f'KEY="{key}" CERT="{cert}" CA="{lab.ca_cert}"\n'


@needs_namespaces
def test_the_installed_tree_runs_version_and_config_check(
    package: Package, lab: LabFiles, tmp_path: Path
) -> None:
    master, slave = os.openpty()
    config = tmp_path / "provisioned.toml"
    config.write_text(_gateway_config(os.ttyname(slave)))
    body = (
        _identity_env(lab)
        + r"""
dpkg --root="$R" -i "$1" > "$out/dpkg.log" 2>&1
inroot getent passwd citygate > "$out/passwd"
inroot stat -c '%U:%G %a' /etc/citygate/identity /var/lib/citygate > "$out/modes"
readlink "$R/opt/citygate/current" > "$out/current"
readlink "$R/opt/citygate/committed" > "$out/committed"
inroot stat -c '%n %U:%G %a' /opt/citygate /opt/citygate/releases \
    "/opt/citygate/releases/$3" > "$out/release-root"
inroot stat -c '%n %U:%G' /opt/citygate/current /opt/citygate/committed > "$out/links"
readlink "$R/etc/systemd/system/multi-user.target.wants/citygate.service" > "$out/wants"
inroot dpkg --verify citygate > "$out/verify" 2>&1
inroot /opt/citygate/current/bin/citygate --version > "$out/version"
inroot citygate --version >> "$out/version"
status=0
inroot citygate config check /etc/citygate/gateway.toml > "$out/sample" 2>&1 || status=$?
echo "exit $status" >> "$out/sample"
"""
        + _PROVISION
        + r"""
cp "$2" "$R/etc/citygate/gateway.toml"
as_service /opt/citygate/current/bin/citygate config check /etc/citygate/gateway.toml \
    > "$out/provisioned" 2>&1
systemd-analyze verify --root="$R" citygate.service > "$out/analyze" 2>&1
"""
    )
    try:
        out, result = _in_throwaway_root(tmp_path, body, package.path, config, package.version)
    finally:
        os.close(master)
        os.close(slave)
    assert result.returncode == 0, result.stderr + _read(out, "dpkg.log")
    user = _read(out, "passwd").strip().split(":")
    assert (user[0], user[5], user[6]) == ("citygate", "/var/lib/citygate", "/usr/sbin/nologin")
    assert int(user[2]) < 1000  # a system account
    assert _read(out, "modes").splitlines() == ["citygate:citygate 700", "citygate:citygate 750"]
    assert _read(out, "current").strip() == f"releases/{package.version}"
    assert _read(out, "committed").strip() == f"releases/{package.version}"
    # updates write releases and switch links as citygate; the sticky bit keeps the
    # package's own (root-owned) release out of the agent's reach
    assert _read(out, "release-root").splitlines() == [
        "/opt/citygate root:citygate 1775",
        "/opt/citygate/releases root:citygate 1775",
        f"/opt/citygate/releases/{package.version} root:root 755",
    ]
    assert _read(out, "links").splitlines() == [
        "/opt/citygate/current citygate:citygate",
        "/opt/citygate/committed citygate:citygate",
    ]
    assert _read(out, "wants").strip() == "/lib/systemd/system/citygate.service"
    assert _read(out, "version").splitlines() == [f"citygate {package.version}"] * 2
    # the sample config is valid; only what provisioning and wiring add is missing
    *problems, status = _read(out, "sample").splitlines()
    assert status == "exit 1"
    missing = r"/etc/citygate/gateway\.toml:\d+: (\S+): no such (?:file|device) \S+"
    keys = [re.fullmatch(missing, line) for line in problems]
    assert None not in keys, problems
    assert {"identity.key", "identity.cert", "identity.ca"} <= {k[1] for k in keys if k}
    assert _read(out, "provisioned") == "/etc/citygate/gateway.toml: ok (1 sensor(s))\n"
    assert _read(out, "verify") == ""
    assert _read(out, "analyze") == ""


async def _stop_container(container: asyncio.subprocess.Process) -> None:
    """Stop the nspawn container if it still runs: SIGTERM, then SIGKILL after 30 s."""
    if container.returncode is not None:
        return
    container.terminate()
    try:
        async with asyncio.timeout(30):
            await container.wait()
    except TimeoutError:
        container.kill()
        await container.wait()


def _read(out: Path, name: str) -> str:
    path = out / name
    return path.read_text() if path.exists() else f"<{name} missing>"


@needs_namespaces
def test_remove_keeps_config_and_state_and_purge_removes_them_with_the_user(
    package: Package, tmp_path: Path
) -> None:
    body = r"""
dpkg --root="$R" -i "$1" > "$out/dpkg.log" 2>&1
echo "# changed on this gateway" >> "$R/etc/citygate/gateway.toml"
dpkg --root="$R" -i "$1" >> "$out/dpkg.log" 2>&1
tail -n 1 "$R/etc/citygate/gateway.toml" > "$out/after-reinstall"
touch "$R/etc/citygate/identity/gateway.key" "$R/var/lib/citygate/spool.sqlite"
dpkg --root="$R" -r citygate >> "$out/dpkg.log" 2>&1
for p in /etc/citygate/gateway.toml /etc/citygate/identity/gateway.key \
    /var/lib/citygate/spool.sqlite /opt/citygate /usr/bin/citygate; do
    if [ -e "$R$p" ]; then echo "kept $p"; else echo "gone $p"; fi
done > "$out/after-remove"
inroot getent passwd citygate > /dev/null && echo "user kept" >> "$out/after-remove"
dpkg --root="$R" -P citygate >> "$out/dpkg.log" 2>&1
for p in /etc/citygate /var/lib/citygate /opt/citygate; do
    if [ -e "$R$p" ]; then echo "kept $p"; else echo "gone $p"; fi
done > "$out/after-purge"
inroot getent passwd citygate > /dev/null || echo "user gone" >> "$out/after-purge"
inroot getent group citygate > /dev/null || echo "group gone" >> "$out/after-purge"
"""
    out, result = _in_throwaway_root(tmp_path, body, package.path)
    assert result.returncode == 0, result.stderr + _read(out, "dpkg.log")
    assert _read(out, "after-reinstall") == "# changed on this gateway\n"
    assert _read(out, "after-remove").splitlines() == [
        "kept /etc/citygate/gateway.toml",
        "kept /etc/citygate/identity/gateway.key",
        "kept /var/lib/citygate/spool.sqlite",
        "gone /opt/citygate",
        "gone /usr/bin/citygate",
        "user kept",
    ]
    assert _read(out, "after-purge").splitlines() == [
        "gone /etc/citygate",
        "gone /var/lib/citygate",
        "gone /opt/citygate",
        "user gone",
        "group gone",
    ]


@needs_namespaces
def test_an_upgrade_switches_the_release_and_keeps_config_identity_and_user(
    package: Package, upgrade: Package, lab: LabFiles, tmp_path: Path
) -> None:
    body = (
        _identity_env(lab)
        + r"""
dpkg --root="$R" -i "$1" > "$out/dpkg.log" 2>&1
"""
        + _PROVISION
        + r"""
echo "# changed on this gateway" >> "$R/etc/citygate/gateway.toml"
inroot id -u citygate > "$out/uid-before"
dpkg --root="$R" -i "$2" >> "$out/dpkg.log" 2>&1
inroot id -u citygate > "$out/uid-after"
readlink "$R/opt/citygate/current" > "$out/current"
ls "$R/opt/citygate/releases" > "$out/releases"
inroot citygate --version > "$out/version"
tail -n 1 "$R/etc/citygate/gateway.toml" > "$out/conffile"
inroot stat -c '%U %a' /etc/citygate/identity/gateway.key > "$out/key"
"""
    )
    out, result = _in_throwaway_root(tmp_path, body, package.path, upgrade.path)
    assert result.returncode == 0, result.stderr + _read(out, "dpkg.log")
    assert _read(out, "current").strip() == f"releases/{upgrade.version}"
    assert _read(out, "releases").split() == [upgrade.version]
    assert _read(out, "version").strip() == f"citygate {upgrade.version}"
    assert _read(out, "conffile") == "# changed on this gateway\n"
    assert _read(out, "key").strip() == "citygate 600"
    assert _read(out, "uid-after") == _read(out, "uid-before")


#: what an update does to the release root, done by the service user with the package's
#: own agent.ota.release: `trial V` (V installed and switched to, the flow on its trial)
#: or `commit V...` (each installed, the last switched to and committed, older pruned)
_UPDATE = """
import json, logging, sys
from pathlib import Path
from agent.ota.release import Releases

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
releases = Releases(Path("/opt/citygate"))
action, *versions = sys.argv[1:]
for version in versions:  # a release as an update leaves it, written by the service user
    program = releases.path(version) / "bin" / "citygate"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\\n")
    program.chmod(0o755)
releases.switch(versions[-1])
if action == "commit":
    releases.commit(versions[-1])
else:
    state = Path("/var/lib/citygate/ota/state.json")
    state.parent.mkdir(exist_ok=True)
    flow = {"state": "trial", "target": versions[-1], "from_version": releases.committed(),
            "trial_starts": 1, "trial_deadline": None}
    state.write_text(json.dumps({"ota": {"1": flow}}))
print("links", releases.current(), releases.committed())
"""


@needs_namespaces
def test_the_package_replaces_an_older_update_on_trial_but_never_a_newer_one(
    package: Package, upgrade: Package, lab: LabFiles, tmp_path: Path
) -> None:
    """ADR 0004 "OTA": the package's release becomes current and committed only when it is
    newer than both; a trial it replaces is finished (refused), and the agent's prune of
    old releases cannot remove the package's root-owned one."""
    on_trial = f"{package.version}.post0"  # between the two packages
    config = tmp_path / "provisioned.toml"
    config.write_text(_gateway_config("/dev/ttyUSB0"))
    update = tmp_path / "update.py"
    update.write_text(_UPDATE)
    body = (
        _identity_env(lab)
        + r"""
old=$1 new=$2 old_release=/opt/citygate/releases/$5 new_release=/opt/citygate/releases/$6
links() { readlink "$R/opt/citygate/current" "$R/opt/citygate/committed" | tr '\n' ' '; }
dpkg --root="$R" -i "$old" > "$out/dpkg.log" 2>&1
"""
        + _PROVISION
        + r"""
cp "$3" "$R/etc/citygate/gateway.toml"
cp "$4" "$R/tmp/update.py"
as_service "$old_release/bin/python" -I /tmp/update.py trial "$7" > "$out/trial" 2>&1
dpkg --root="$R" -i "$new" >> "$out/dpkg.log" 2>&1
links > "$out/after-upgrade"
as_service "$new_release/bin/citygate" ota status --json > "$out/status" 2>&1
as_service "$new_release/bin/python" -I /tmp/update.py commit 8.0 9.0 > "$out/commit" 2>&1
LC_ALL=C ls "$R/opt/citygate/releases" | tr '\n' ' ' > "$out/after-commit"
dpkg --root="$R" -i "$old" >> "$out/dpkg.log" 2>&1
links > "$out/after-downgrade"
LC_ALL=C ls "$R/opt/citygate/releases" | tr '\n' ' ' > "$out/releases"
inroot stat -c '%U:%G %a' /opt/citygate /opt/citygate/releases > "$out/modes"
inroot dpkg --verify citygate > "$out/verify" 2>&1
"""
    )
    args = (package.path, upgrade.path, config, update, package.version, upgrade.version)
    out, result = _in_throwaway_root(tmp_path, body, *args, on_trial)
    log = result.stderr + _read(out, "dpkg.log")
    assert result.returncode == 0, log
    assert _read(out, "trial") == f"links {on_trial} {package.version}\n"

    # newer than the release on trial: both links move; the trial is over, its version refused
    new = f"releases/{upgrade.version}"
    assert _read(out, "after-upgrade") == f"{new} {new} ", log
    status = json.loads(_read(out, "status"))
    assert (status["state"], status["refused"]) == ("idle", [on_trial]), status
    assert f"citygate ota guard: rolled back {on_trial}" in log

    # the agent switches and prunes in the release root, but cannot remove the package's release
    assert _read(out, "commit").splitlines()[-1] == "links 9.0 9.0"
    warnings = [line for line in _read(out, "commit").splitlines() if line.startswith("WARNING")]
    assert [w for w in warnings if f"/opt/citygate/releases/{upgrade.version}'" in w], warnings
    assert _read(out, "after-commit") == f"{upgrade.version} 8.0 9.0 "  # {on_trial} pruned

    # an older package (here a downgrade) leaves the newer update current and committed
    assert _read(out, "after-downgrade") == "releases/9.0 releases/9.0 ", log
    assert _read(out, "releases") == f"{package.version} 8.0 9.0 "
    assert _read(out, "modes").splitlines() == ["root:citygate 1775"] * 2
    changed = _read(out, "verify").splitlines()
    assert [line for line in changed if not line.endswith(" c /etc/citygate/gateway.toml")] == []


# -- booted with systemd as PID 1 ---------------------------------------------------

_TEST_DROP_IN = """\
# The only changes to the unit under test: a short watchdog and restart delay, so that
# the watchdog test takes seconds instead of a minute.
[Service]
WatchdogSec=3s
RestartSec=1s
"""

_RUNNER_UNITS = {
    "citygate-test.target": """\
[Unit]
Description=citygate package test
Requires=citygate-test.service
After=citygate-test.service
""",
    "citygate-test.service": """\
[Unit]
Description=citygate package test: drives citygate.service, then powers off
SuccessAction=poweroff-force
FailureAction=poweroff-force
[Service]
Type=oneshot
ExecStart=/bin/sh /citygate-test/run.sh
StandardOutput=file:/out/runner.log
StandardError=inherit
""",
}

_RUNNER = r"""
set -u
out=/out
unit=citygate.service
show() {
    systemctl show "$unit" -p ActiveState -p SubState -p Result -p MainPID -p NRestarts \
        -p StatusText -p WatchdogUSec > "$out/$1.show"
}
prop() { systemctl show "$unit" -p "$1" --value; }
wait_until() {  # wait_until SECONDS COMMAND...: poll until the command succeeds
    limit=$(( $1 * 10 )); shift
    while ! "$@"; do
        limit=$((limit - 1))
        if [ "$limit" -le 0 ]; then echo "timed out: $*"; return 1; fi
        sleep 0.1
    done
}
state_is() { [ "$(prop ActiveState)/$(prop SubState)" = "$1" ]; }
restarted() { [ "$(prop MainPID)" != "$1" ] && state_is active/running; }
connected() { case "$(prop StatusText)" in "connected to "*) return 0 ;; esac; return 1; }

systemctl start "$unit"; echo $? > "$out/start.rc"
show started
if ! state_is active/running; then  # no READY=1 within TimeoutStartSec, or a crash
    journalctl -u "$unit" -o json --no-pager > "$out/journal.json"
    echo "citygate.service did not start" > "$out/runner.done"
    exit 1
fi
pid=$(prop MainPID)
grep -E '^(Uid|Gid|Groups|NoNewPrivs|Seccomp|CapEff|CapBnd):' "/proc/$pid/status" \
    > "$out/proc-status"
wait_until 90 test -e "$out/host-saw-messages"
wait_until 20 connected  # STATUS= follows the broker link
show running

kill -STOP "$pid"  # a stalled agent: no more watchdog pings (systemd follows its kill with CONT)
wait_until 30 restarted "$pid"
show restarted

pid=$(prop MainPID)
dpkg -i /citygate-test/upgrade.deb > "$out/upgrade.log" 2>&1; echo $? > "$out/upgrade.rc"
wait_until 30 restarted "$pid"
show upgraded
/usr/bin/citygate --version > "$out/upgraded-version"
wait_until 60 test -e "$out/host-saw-upgraded-messages"

systemctl stop "$unit"
show stopped
journalctl -u "$unit" -o json --no-pager > "$out/journal.json"
echo done > "$out/runner.done"
"""


def _show(out: Path, name: str) -> dict[str, str]:
    text = _read(out, f"{name}.show")
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


@needs_namespaces
@needs_nspawn
def test_under_systemd_the_sandboxed_agent_notifies_is_watched_upgraded_and_journaled(
    package: Package, upgrade: Package, lab: LabFiles, broker: LabBroker, tmp_path: Path
) -> None:
    from drivers.pms5003.emulator import Pms5003Emulator

    runner = tmp_path / "runner"
    runner.mkdir()
    (runner / "run.sh").write_text(_RUNNER)
    shutil.copy(upgrade.path, runner / "upgrade.deb")
    for name, text in _RUNNER_UNITS.items():
        (runner / name).write_text(text)
    (runner / "test.conf").write_text(_TEST_DROP_IN)
    config = runner / "gateway.toml"
    config.write_text(_gateway_config("/dev/ttyUSB0", broker.port))
    body = (
        _identity_env(lab)
        + r"""
runner=$1 pty=$2
dpkg --root="$R" -i "$3" > "$out/dpkg.log" 2>&1
"""
        + _PROVISION
        + r"""
cp "$runner/gateway.toml" "$R/etc/citygate/gateway.toml"
mkdir -p "$R/etc/systemd/system/citygate.service.d" "$R/citygate-test"
cp "$runner/test.conf" "$R/etc/systemd/system/citygate.service.d/test.conf"
cp "$runner/citygate-test.service" "$runner/citygate-test.target" "$R/etc/systemd/system/"
cp "$runner/run.sh" "$runner/upgrade.deb" "$R/citygate-test/"
rm -f "$R/usr/sbin/policy-rc.d"  # a container image's "start no services": a gateway has none
umount -R "$R/dev" "$R/proc"
exec systemd-nspawn --quiet --register=no --keep-unit --directory="$R" \
    --bind="$out:/out" --bind="$pty:/dev/ttyUSB0" \
    --boot systemd.unit=citygate-test.target
"""
    )
    out_holder: list[Path] = []
    verified = new_capture(lab, ["gw-a"])

    async def scenario() -> int:
        stop = asyncio.Event()
        subscribed = asyncio.Event()
        watcher = asyncio.create_task(capture(lab, broker, verified, stop, subscribed))
        await subscribed.wait()
        with Pms5003Emulator(period_s=0.2, seed=7, wait_for_host=True) as sensor:
            os.chown(sensor.port, 0, _dialout_gid())
            os.chmod(sensor.port, 0o660)
            base, out = tmp_path / "overlay", tmp_path / "out"
            base.mkdir()
            out.mkdir()
            out_holder.append(out)
            with (tmp_path / "nspawn.log").open("wb") as console:
                container = await asyncio.create_subprocess_exec(
                    "unshare", "--mount", "sh", "-c", _SETUP + body, "sh", str(base), str(out),
                    str(runner), sensor.port, str(package.path),
                    stdout=console, stderr=console,
                )  # fmt: skip
            try:
                async with asyncio.timeout(240):
                    await _drive(out, verified, broker)
                    return await container.wait()
            finally:
                await _stop_container(container)
                stop.set()
                await watcher

    code = asyncio.run(scenario())
    out = out_holder[0]
    context = _read(out, "runner.log") + (tmp_path / "nspawn.log").read_text(errors="replace")
    assert _read(out, "runner.done") == "done\n", context
    assert code == 0, context

    # READY=1 came (a notify unit is only active once it has), with a status line
    assert _read(out, "start.rc").strip() == "0", context
    started = _show(out, "started")
    assert (started["ActiveState"], started["SubState"]) == ("active", "running")
    assert started["WatchdogUSec"] == "3s"
    assert re.fullmatch(
        r"(connected|connecting) to localhost:\d+; .*spooled", started["StatusText"]
    )
    # the pings kept it alive while it ran well past the watchdog timeout
    running = _show(out, "running")
    assert (running["NRestarts"], running["MainPID"]) == ("0", started["MainPID"])
    assert running["StatusText"].startswith(f"connected to localhost:{broker.port}; ")

    # the sandbox as the kernel sees it
    status = dict(line.split(":", 1) for line in _read(out, "proc-status").splitlines())
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"
    assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == 0
    assert status["Uid"].split()[0] != "0"
    assert str(_dialout_gid()) in status["Groups"].split()

    # a frozen agent is killed by the watchdog and restarted
    restarted = _show(out, "restarted")
    assert restarted["NRestarts"] == "1"
    assert restarted["MainPID"] != started["MainPID"]
    journal = [json.loads(line) for line in _read(out, "journal.json").splitlines()]
    by_systemd = [str(e["MESSAGE"]) for e in journal if e.get("SYSLOG_IDENTIFIER") == "systemd"]
    watchdog = by_systemd.index("citygate.service: Watchdog timeout (limit 3s)!")
    assert "citygate.service: Failed with result 'watchdog'." in by_systemd[watchdog:]

    # dpkg -i under the running service: stopped, switched, started again
    assert _read(out, "upgrade.rc").strip() == "0", _read(out, "upgrade.log")
    upgraded = _show(out, "upgraded")
    assert upgraded["ActiveState"] == "active"
    assert upgraded["MainPID"] != restarted["MainPID"]
    assert _read(out, "upgraded-version").strip() == f"citygate {upgrade.version}"
    assert _show(out, "stopped")["Result"] == "success"

    # every message the agent sent verified; the journal holds its lines with their levels
    assert verified.failures == []
    agent = [e for e in journal if e.get("SYSLOG_IDENTIFIER") == "citygate"]
    lines = [(str(e["PRIORITY"]), str(e["MESSAGE"])) for e in agent]
    assert ("6", f"agent.uplink: connected to localhost:{broker.port} as gw-a") in lines
    assert any(p == "4" and m.startswith("agent.uplink: connection to") for p, m in lines), lines
    assert not [m for _, m in lines if re.match(r"<\d>|(DEBUG|INFO|WARNING|ERROR) ", m)]
    starts = [m for _, m in lines if m.startswith("agent.service: citygate ")]
    assert [m.split()[2] for m in starts] == [package.version] * 2 + [upgrade.version]


async def _drive(out: Path, verified: Capture, broker: LabBroker) -> None:
    """The host's side of the runner: messages arrive, a broker outage, the upgrade's messages."""
    while not (out / "running.show").exists() and not (out / "start.rc").exists():
        await asyncio.sleep(0.1)
    while len(verified.messages) < 3:
        if (out / "runner.done").exists():
            return
        await asyncio.sleep(0.1)
    broker.stop()  # the agent logs a warning: the journal must show it at warning level
    await asyncio.sleep(1.5)
    broker.start()
    seen = len(verified.messages)
    while len(verified.messages) < seen + 3:
        await asyncio.sleep(0.1)
    (out / "host-saw-messages").touch()
    while not (out / "upgraded.show").exists():
        if (out / "runner.done").exists():
            return
        await asyncio.sleep(0.1)
    seen = len(verified.messages)
    while len(verified.messages) < seen + 3:
        await asyncio.sleep(0.1)
    (out / "host-saw-upgraded-messages").touch()


def _dialout_gid() -> int:
    return grp.getgrnam("dialout").gr_gid


# -- an update under systemd ---------------------------------------------------------

OTA_BUMP = ".post9"  # the update's version: the package's, one up


@pytest.fixture(scope="session")
def update_repo(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, package: Package
) -> Path:
    """A TUF repository (images.repo) offering a bundle of this tree (images.bundle), one
    version up; the bundle's dependency wheels are kept in pytest's cache between runs."""
    kept = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    cache = kept.mkdir("citygate-bundle-deb") if kept else tmp_path_factory.mktemp("bundles")
    out = tmp_path_factory.mktemp("update")
    bundle = out / f"citygate-{package.version}{OTA_BUMP}.bundle"
    repo = out / "repo"
    for args in (
        ["images.bundle", "build", "--version", f"{package.version}{OTA_BUMP}", "--out", bundle,
         "--cache", cache],
        ["images.repo", "init", repo, "--keys", out / "keys"],
        ["images.repo", "add", repo, bundle, "--keys", out / "keys"],
    ):  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", *map(str, args)],
            capture_output=True, text=True, check=False, cwd=ROOT, timeout=900,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    for path in [repo, *repo.rglob("*")]:  # the gateway reads it as the service user
        path.chmod(0o755 if path.is_dir() else 0o644)
    return repo


_OTA_CONFIG = """\
[ota]
check_interval_s = 0
trial_deadline_s = 120
[health]
interval_s = 5
"""

_OTA_RUNNER = r"""
set -u
out=/out
unit=citygate.service
new=$(cat /citygate-test/new-version)
show() {
    systemctl show "$unit" -p ActiveState -p SubState -p Result -p MainPID -p NRestarts \
        > "$out/$1.show"
}
prop() { systemctl show "$unit" -p "$1" --value; }
wait_until() {  # wait_until SECONDS COMMAND...: poll until the command succeeds
    limit=$(( $1 * 10 )); shift
    while ! "$@"; do
        limit=$((limit - 1))
        if [ "$limit" -le 0 ]; then echo "timed out: $*"; return 1; fi
        sleep 0.1
    done
}
state_is() { [ "$(prop ActiveState)/$(prop SubState)" = "$1" ]; }
restarted() { [ "$(prop MainPID)" != "$1" ] && state_is active/running; }
committed() { [ "$(readlink /opt/citygate/committed)" = "releases/$new" ]; }
finish() {
    journalctl -u "$unit" -o json --no-pager > "$out/journal.json"
    journalctl -u citygate-apply.service -o cat --no-pager > "$out/apply.log"
    echo "$1" > "$out/runner.done"
}

systemctl start "$unit"
if ! state_is active/running; then finish "citygate.service did not start"; exit 1; fi
pid=$(prop MainPID)
show started

# the update, installed by the agent's code under the unit's own sandbox: the unit file
# with only its process type, guard, watchdog, restart and start timeout changed
apply="/opt/citygate/current/bin/citygate ota apply --repo /updates"
sed -e "s|^ExecStart=.*|ExecStart=$apply --config /etc/citygate/gateway.toml|" \
    -e 's/^Type=notify/Type=oneshot/' -e '/^ExecStartPre=/d' -e '/^NotifyAccess=/d' \
    -e '/^WatchdogSec=/d' -e '/^Restart/d' -e '/^SuccessExitStatus=/d' \
    -e 's/^TimeoutStartSec=.*/TimeoutStartSec=10min/' -e '/^\[Install\]/,$d' \
    /lib/systemd/system/citygate.service > /etc/systemd/system/citygate-apply.service
systemctl daemon-reload
systemctl start citygate-apply.service; echo $? > "$out/apply.rc"

# the agent sees the switch and exits 75; systemd starts it again: the guard, the new release
wait_until 60 restarted "$pid" || { finish "no restart after the switch"; exit 1; }
show switched
# on trial until a signed health report is acknowledged, then committed
wait_until 120 committed || { finish "not committed"; exit 1; }
setpriv --reuid=citygate --regid=citygate --init-groups \
    citygate ota status --json > "$out/status.json" 2>&1
show committed
systemctl stop "$unit"
show stopped
finish done
"""


@needs_namespaces
@needs_nspawn
def test_under_systemd_an_update_installs_in_the_sandbox_restarts_on_trial_and_commits(
    package: Package, update_repo: Path, lab: LabFiles, broker: LabBroker, tmp_path: Path
) -> None:
    """ADR 0004 "OTA" and ADR 0007: the unit as shipped lets the agent's code install and
    switch a release, restarts the agent after exit 75 without calling it a failure, runs
    the committed release's guard first, and the new release commits itself."""
    new = f"{package.version}{OTA_BUMP}"
    runner = tmp_path / "runner"
    runner.mkdir()
    (runner / "run.sh").write_text(_OTA_RUNNER)
    (runner / "new-version").write_text(new + "\n")
    for name, text in _RUNNER_UNITS.items():
        (runner / name).write_text(text)
    (runner / "test.conf").write_text(_TEST_DROP_IN)
    (runner / "gateway.toml").write_text(
        _gateway_config("/dev/null", broker.port).split("[sensors.air_1]")[0] + _OTA_CONFIG
    )
    body = (
        _identity_env(lab)
        + r"""
runner=$1 repo=$2
dpkg --root="$R" -i "$3" > "$out/dpkg.log" 2>&1
"""
        + _PROVISION
        + r"""
cp "$runner/gateway.toml" "$R/etc/citygate/gateway.toml"
install -m 0644 "$repo/metadata/1.root.json" "$R/etc/citygate/update-root.json"
mkdir -p "$R/etc/systemd/system/citygate.service.d" "$R/citygate-test" "$R/updates"
cp "$runner/test.conf" "$R/etc/systemd/system/citygate.service.d/test.conf"
cp "$runner/citygate-test.service" "$runner/citygate-test.target" "$R/etc/systemd/system/"
cp "$runner/run.sh" "$runner/new-version" "$R/citygate-test/"
rm -f "$R/usr/sbin/policy-rc.d"
umount -R "$R/dev" "$R/proc"
exec systemd-nspawn --quiet --register=no --keep-unit --directory="$R" \
    --bind="$out:/out" --bind-ro="$repo:/updates" \
    --boot systemd.unit=citygate-test.target
"""
    )
    base, out = tmp_path / "overlay", tmp_path / "out"
    base.mkdir()
    out.mkdir()
    verified = new_capture(lab, ["gw-a"])

    async def scenario() -> int:
        stop = asyncio.Event()
        subscribed = asyncio.Event()
        watcher = asyncio.create_task(capture(lab, broker, verified, stop, subscribed))
        await subscribed.wait()
        with (tmp_path / "nspawn.log").open("wb") as console:
            container = await asyncio.create_subprocess_exec(
                "unshare", "--mount", "sh", "-c", _SETUP + body, "sh", str(base), str(out),
                str(runner), str(update_repo), str(package.path),
                stdout=console, stderr=console,
            )  # fmt: skip
        try:
            async with asyncio.timeout(300):
                return await container.wait()
        finally:
            await _stop_container(container)
            stop.set()
            await watcher

    code = asyncio.run(scenario())
    context = (
        _read(out, "runner.log")
        + _read(out, "apply.log")
        + (tmp_path / "nspawn.log").read_text(errors="replace")
    )
    assert _read(out, "runner.done") == "done\n", context
    assert code == 0, context

    # installed, self-tested and switched by `citygate ota apply` under the unit's sandbox
    assert _read(out, "apply.rc").strip() == "0", context
    assert f"switched: switched to {new}" in _read(out, "apply.log"), context
    # exit 75: restarted, and not a failure
    started, switched = _show(out, "started"), _show(out, "switched")
    assert switched["NRestarts"] == "1"
    assert switched["MainPID"] != started["MainPID"]
    assert (switched["ActiveState"], switched["Result"]) == ("active", "success")
    journal = [json.loads(line) for line in _read(out, "journal.json").splitlines()]
    by_systemd = [str(e["MESSAGE"]) for e in journal if e.get("SYSLOG_IDENTIFIER") == "systemd"]
    assert not [m for m in by_systemd if "Failed with result" in m], by_systemd
    # the committed release's guard ran before each start and counted the trial's start
    agent = [str(e["MESSAGE"]) for e in journal if e.get("SYSLOG_IDENTIFIER") == "citygate"]
    guard = [m for m in agent if m.startswith("citygate ota guard: ")]
    assert guard == [
        "citygate ota guard: not in trial (idle)",
        f"citygate ota guard: trial of {new}: start 1 of 3",
    ], agent
    starts = [m.split()[2] for m in agent if m.startswith("agent.service: citygate ")]
    assert starts == [package.version, new]
    # the new release committed itself after a signed health report was acknowledged
    status = json.loads(_read(out, "status.json"))
    assert (status["state"], status["current"], status["committed"]) == ("idle", new, new)
    assert status["releases"] == [package.version, new]
    assert _show(out, "stopped")["Result"] == "success"
    assert verified.failures == []


# -- lintian ------------------------------------------------------------------------

#: lintian tags this package is expected to carry, and why
EXPECTED_LINTIAN = {
    "dir-or-file-in-opt": "the release layout lives in /opt by design (FHS add-on, A/B releases)",
    "package-installs-python-pycache-dir": "bytecode is compiled at build time: /opt is read-only",
    "unusual-interpreter": "the release's scripts run the release's own interpreter",
    "script-not-executable": "bundled modules (pyserial, pymodbus) carry a shebang line",
    "no-manual-page": "citygate --help documents every command",
}


@pytest.fixture(scope="session", autouse=True)
def lintian_run(package: Package) -> Iterator[subprocess.Popen[str] | None]:
    """lintian takes a while: it starts as soon as the package exists and runs alongside."""
    if shutil.which("lintian") is None:
        yield None
        return
    run = subprocess.Popen(
        ["lintian", "--tag-display-limit", "0", "--fail-on", "none", str(package.path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    yield run
    if run.poll() is None:
        run.kill()
    run.communicate()


@pytest.mark.skipif(shutil.which("lintian") is None, reason="lintian not installed")
def test_lintian_finds_no_errors_beyond_the_documented_ones(
    lintian_run: subprocess.Popen[str],
) -> None:
    stdout, stderr = lintian_run.communicate(timeout=300)
    tags = [line.split()[:3] for line in stdout.splitlines() if line[:2] in ("E:", "W:")]
    unexpected = sorted({f"{sev} {tag}" for sev, _, tag in tags if tag not in EXPECTED_LINTIAN})
    errors = [tag for tag in unexpected if tag.startswith("E:")]
    assert errors == [], stdout
    assert lintian_run.returncode == 0, stderr


@pytest.fixture(autouse=True)
def _no_stray_mounts() -> Iterator[None]:
    """The throw-away roots live in private mount namespaces: none may leak to this one."""
    yield
    mounts = Path("/proc/self/mounts").read_text()
    assert "/overlay/root" not in mounts
