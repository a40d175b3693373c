"""The systemd unit: what it promises, its sandbox score, and the agent inside W^X memory.

`systemd-analyze security --offline=true` scores the unit file without a running
systemd (DESIGN.md §7); `systemd-analyze verify --root` checks it against the
real unit search path. The agent itself runs under the kernel's
memory-deny-write-execute (prctl PR_SET_MDWE, what MemoryDenyWriteExecute=yes
enforces) against a real broker. The unit running under a real systemd, with
every directive applied, is tested in tests/test_deb.py.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import OtaConfig
from agent.ota.task import EXIT_RESTART
from drivers.pms5003.emulator import Pms5003Emulator
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles
from tests.agentrig import capture, new_capture, write_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "images" / "systemd" / "citygate.service"
MAX_EXPOSURE = 2.0
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (systemd)"
)


def _directives(text: str) -> dict[str, list[str]]:
    """`Key=value` lines by key (systemd allows a key more than once), comments dropped."""
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def _one(directives: dict[str, list[str]], key: str) -> str:
    values = directives.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def _exposure(unit: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager",
         f"--threshold={int(MAX_EXPOSURE * 10)}", str(unit)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match[1]), result


def test_the_unit_is_a_notify_service_with_watchdog_restart_and_start_limit() -> None:
    unit = _directives(UNIT.read_text())
    assert _one(unit, "Type") == "notify"
    assert _one(unit, "NotifyAccess") == "main"
    assert _one(unit, "WatchdogSec") == "30s"
    assert _one(unit, "Restart") == "on-failure"
    assert int(_one(unit, "StartLimitBurst")) > 1
    assert _one(unit, "StartLimitIntervalSec")
    assert _one(unit, "ExecStart") == (
        "/opt/citygate/current/bin/citygate run --config /etc/citygate/gateway.toml"
    )


def test_the_committed_release_guards_every_start_and_a_broken_guard_never_blocks_it() -> None:
    unit = _directives(UNIT.read_text())
    guard = _one(unit, "ExecStartPre")
    assert guard.startswith("-"), "a failing guard must not keep the agent from starting"
    program, *args = guard.removeprefix("-").split()
    assert Path(program) == OtaConfig().root / "committed" / "bin" / "citygate"
    assert args[:2] == ["ota", "guard"]
    run_config = _one(unit, "ExecStart").split("--config", 1)[1].split()[0]
    assert args[2:] == ["--config", run_config]


def test_exit_status_75_restarts_the_agent_and_is_not_a_failure() -> None:
    unit = _directives(UNIT.read_text())
    assert _one(unit, "RestartForceExitStatus") == str(EXIT_RESTART) == "75"
    assert _one(unit, "SuccessExitStatus") == str(EXIT_RESTART)


def _seconds(value: str) -> float:
    units = {"s": 1, "min": 60, "h": 3600}
    match = re.fullmatch(r"(\d+)(s|min|h)", value)
    assert match, value
    return int(match[1]) * units[match[2]]


def test_the_start_limit_lets_a_failed_trial_roll_back_and_still_stops_a_crash_loop() -> None:
    """Every start counts, the restarts after exit 75 too.

    A failed trial costs max_trial_starts + 1 starts (the restart into the new
    release, its crashes, the guard's rollback); the start that ran the update
    and one more (a certificate renewal, an earlier crash) must fit as well, or
    systemd gives up before the guard can switch back. A crash loop of a
    committed release must still reach the limit within the interval.
    """
    unit = _directives(UNIT.read_text())
    burst = int(_one(unit, "StartLimitBurst"))
    assert burst >= OtaConfig().max_trial_starts + 1 + 2
    interval = _seconds(_one(unit, "StartLimitIntervalSec"))
    assert burst * _seconds(_one(unit, "RestartSec")) < interval


def test_the_release_root_is_the_only_writable_path_beside_state_and_identity() -> None:
    unit = _directives(UNIT.read_text())
    assert _one(unit, "ProtectSystem") == "strict"
    assert sorted(unit["ReadWritePaths"]) == sorted(
        [str(OtaConfig().root), "/etc/citygate/identity"]
    )


def test_the_unit_runs_as_the_unprivileged_service_user_with_state_and_journal() -> None:
    unit = _directives(UNIT.read_text())
    assert _one(unit, "User") == "citygate"
    assert _one(unit, "Group") == "citygate"
    assert _one(unit, "SupplementaryGroups") == "dialout"
    assert _one(unit, "StateDirectory") == "citygate"
    assert "StandardOutput" not in unit  # the default: the journal
    assert "StandardError" not in unit


def test_the_sandbox_has_every_directive_the_issue_asks_for() -> None:
    unit = _directives(UNIT.read_text())
    for key, value in {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "DevicePolicy": "closed",
        "MemoryDenyWriteExecute": "yes",
    }.items():
        assert _one(unit, key) == value, key
    assert unit["SystemCallFilter"][0] == "@system-service"
    assert sorted(unit["DeviceAllow"]) == [
        "char-ttyACM rw", "char-ttyAMA rw", "char-ttyS rw", "char-ttyUSB rw"
    ]  # fmt: skip


@needs_analyze
def test_the_offline_security_score_is_at_most_two() -> None:
    exposure, result = _exposure(UNIT)
    assert exposure <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stdout


@needs_analyze
def test_the_score_check_fails_a_unit_without_its_sandbox(tmp_path: Path) -> None:
    text = UNIT.read_text()
    bare = tmp_path / "citygate.service"
    bare.write_text(
        text[: text.index("# file system:")] + "\n[Install]\nWantedBy=multi-user.target\n"
    )
    exposure, result = _exposure(bare)
    assert exposure > MAX_EXPOSURE
    assert result.returncode != 0


def _verify(root: Path, unit_text: str) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` in a root that holds the system's units and the agent."""
    system = root / "lib" / "systemd" / "system"
    shutil.copytree("/lib/systemd/system", system, symlinks=True)
    (system / "citygate.service").write_text(unit_text)
    for link in ("current", "committed"):
        agent = root / "opt" / "citygate" / link / "bin" / "citygate"
        agent.parent.mkdir(parents=True)
        agent.write_text("#!/bin/sh\n")
        agent.chmod(0o755)
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "--man=no", "citygate.service"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


@needs_analyze
def test_systemd_analyze_verify_finds_nothing_to_complain_about(tmp_path: Path) -> None:
    result = _verify(tmp_path, UNIT.read_text())
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_analyze
def test_verify_would_report_a_misspelt_directive(tmp_path: Path) -> None:
    misspelt = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict")
    result = _verify(tmp_path, misspelt)
    assert "Unknown key 'ProtectSystm'" in result.stderr


# -- MemoryDenyWriteExecute=yes and the agent's native code ---------------------------

_MDWE_PREAMBLE = f"""
import ctypes, sys
if ctypes.CDLL(None, use_errno=True).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0):
    sys.exit("prctl(PR_SET_MDWE) failed: errno %d" % ctypes.get_errno())
"""


def _mdwe_supported() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", _MDWE_PREAMBLE], capture_output=True, check=False, timeout=30
    )
    return probe.returncode == 0


needs_mdwe = pytest.mark.skipif(
    not _mdwe_supported(), reason="kernel without PR_SET_MDWE (Linux 6.3 or later)"
)


@needs_mdwe
def test_write_execute_protection_is_real_cffi_abi_callbacks_fail_under_it() -> None:
    """The known clash (and the proof that the protection is on): ffi.callback() needs W+X."""
    script = _MDWE_PREAMBLE + (
        "import cffi\n"
        "try:\n"
        "    cffi.FFI().callback('int(int)', lambda x: x)\n"
        "except MemoryError as exc:\n"
        "    print('refused:', exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=30
    )
    assert result.stdout.startswith("refused: Cannot allocate write+execute memory"), result


@needs_mdwe
@pytest.mark.integration
def test_the_agent_signs_and_publishes_under_write_execute_protection(
    lab: LabFiles, broker: LabBroker, tmp_path: Path
) -> None:
    """cryptography (Rust + compiled cffi), ssl, sqlite3, cbor2, pyserial: none needs W+X."""
    out = new_capture(lab, ["gw-a"])
    log = tmp_path / "agent.log"
    script = _MDWE_PREAMBLE + "from agent.cli import main\nsys.exit(main(sys.argv[1:]))\n"

    async def scenario() -> int:
        stop = asyncio.Event()
        subscribed = asyncio.Event()
        watcher = asyncio.create_task(capture(lab, broker, out, stop, subscribed))
        await subscribed.wait()
        with Pms5003Emulator(period_s=0.1, seed=11, wait_for_host=True) as sensor:
            config = write_config(tmp_path, lab, broker.port, {"air_1": sensor.port})
            with log.open("wb") as sink:
                agent = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", script, "run", "--config", str(config),
                    stdout=sink, stderr=sink, cwd=ROOT,
                )  # fmt: skip
            try:
                async with asyncio.timeout(30):
                    while len(out.messages) < 3 and agent.returncode is None:
                        await asyncio.sleep(0.1)
            finally:
                if agent.returncode is None:
                    agent.terminate()
                code = await agent.wait()
        stop.set()
        await watcher
        return code

    code = asyncio.run(scenario())
    assert len(out.messages) >= 3, log.read_text()
    assert out.failures == []
    assert code == 0, log.read_text()
