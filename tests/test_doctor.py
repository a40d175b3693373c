"""`citygate doctor`: one line per check, and every fault a technician meets pinpointed.

The doctor runs as a subprocess against a real mosquitto with mTLS (running or
stopped), real key and certificate files, real pseudo-terminals for sensor
ports, and a real spool file. The judgements of dates, disk and backlog are
pure functions and are checked here with fixed values.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import serial
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from agent.cli import main as cli_main
from agent.keys import PrivateKey
from agent.spool import Spool
from drivers.base import Reading
from drivers.pms5003.emulator import Pms5003Emulator
from provisioning.broker import LabBroker
from provisioning.doctor_checks import Status, judge_certificate, judge_clock
from provisioning.doctor_device import SpoolDepth, judge_disk, judge_spool
from provisioning.pki import (
    LabFiles,
    generate_key,
    issue_certificate,
    write_certificate,
    write_private_key,
)
from provisioning.procscan import agent_config
from tests.agentrig import citygate

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def pty_port() -> Iterator[str]:
    """A serial port path: the slave side of a pseudo-terminal (the master stays open)."""
    master, slave = os.openpty()
    name = os.ttyname(slave)
    os.close(slave)  # nobody holds the port; it can be opened while the master is open
    try:
        yield name
    finally:
        os.close(master)


def _ca_key(lab: LabFiles) -> PrivateKey:
    key = serialization.load_pem_private_key(lab.ca_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _identity(directory: Path, lab: LabFiles, *, days: int = 365) -> tuple[Path, Path]:
    """A gateway key and a certificate for gw-a from the lab CA, in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    ca = x509.load_pem_x509_certificate(lab.ca_cert.read_bytes())
    cert = issue_certificate(ca, _ca_key(lab), "gw-a", key.public_key(), days=days)
    key_path, cert_path = directory / "gateway.key", directory / "gateway.crt"
    write_private_key(key_path, key)
    write_certificate(cert_path, cert)
    return key_path, cert_path


def _expired_certificate(path: Path, key_path: Path, lab: LabFiles) -> None:
    """A certificate for the key at `key_path` that expired a minute ago."""
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    ca = x509.load_pem_x509_certificate(lab.ca_cert.read_bytes())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-a")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ca.not_valid_before_utc)  # within the (fresh) lab CA's period
        .not_valid_after(now - timedelta(minutes=1))
        .sign(_ca_key(lab), hashes.SHA256())  # the lab CA key is ECDSA P-256
    )
    write_certificate(path, cert)


def _config(
    directory: Path,
    key: Path,
    cert: Path,
    ca: Path,
    port: int,
    sensors: dict[str, str] | None = None,
) -> Path:
    text = f"""
[gateway]
state_dir = "{directory / "state"}"
[identity]
key = "{key}"
cert = "{cert}"
ca = "{ca}"
[broker]
host = "localhost"
port = {port}
"""
    for sid, port_path in (sensors or {}).items():
        text += f'[sensors.{sid}]\ndriver = "pms5003"\nport = "{port_path}"\n'
    path = directory / "gateway.toml"
    path.write_text(text)
    return path


def _doctor(config: Path, *extra: str) -> tuple[int, dict[str, tuple[str, str]], str]:
    """Run the doctor; return its exit status, {check name: (status, line)} and the text."""
    result = citygate("doctor", "--config", str(config), "--timeout", "3", *extra)
    assert result.stderr == ""
    lines: dict[str, tuple[str, str]] = {}
    for line in result.stdout.splitlines():
        status, _, rest = line.partition("  ")
        if status.strip() in ("ok", "WARN", "FAIL", "skip"):
            name, _, message = rest.strip().partition("  ")
            lines[name] = (status.strip(), message.strip())
    return result.returncode, lines, result.stdout


def _doctor_here(
    capsys: pytest.CaptureFixture[str], config: Path, *extra: str
) -> tuple[int, dict[str, tuple[str, str]], str]:
    """`_doctor`, but in this process: an emulated sensor keeps its pty's slave side open
    in this process, which the doctor (rightly) ignores only for its own process."""
    capsys.readouterr()
    status = cli_main(["doctor", "--config", str(config), "--timeout", "3", *extra])
    out, err = capsys.readouterr()
    assert err == ""
    lines: dict[str, tuple[str, str]] = {}
    for line in out.splitlines():
        state, _, rest = line.partition("  ")
        if state.strip() in ("ok", "WARN", "FAIL", "skip"):
            name, _, message = rest.strip().partition("  ")
            lines[name] = (state.strip(), message.strip())
    return status, lines, out


@pytest.fixture
def gateway(tmp_path: Path, lab: LabFiles) -> tuple[Path, Path, Path]:
    """A healthy gateway's identity files: key, a one-year certificate, and their paths."""
    key, cert = _identity(tmp_path / "identity", lab)
    return key, cert, lab.ca_cert


pytestmark = pytest.mark.integration


def test_doctor_has_help_that_explains_its_lines() -> None:
    result = citygate("doctor", "--help")
    assert result.returncode == 0
    assert "usage: citygate doctor" in result.stdout
    assert "ok, WARN, FAIL or skip" in " ".join(result.stdout.split())


# -- a healthy gateway -----------------------------------------------------------------


def test_doctor_passes_on_a_healthy_gateway_and_logs_in_to_the_broker(
    tmp_path: Path,
    gateway: tuple[Path, Path, Path],
    broker: LabBroker,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with Pms5003Emulator(period_s=0.2) as sensor:
        config = _config(tmp_path, *gateway, broker.port, {"air_1": sensor.port})
        status, lines, text = _doctor_here(capsys, config)
    assert status == 0, text
    assert [name for name, (s, _) in lines.items() if s == "FAIL"] == []
    expected_ok = ["config", "identity", "certificate", "broker dns", "broker tcp", "broker tls"]
    assert all(lines[name][0] == "ok" for name in expected_ok), text
    assert lines["broker mqtt"] == (
        "ok",
        "the broker accepted gateway gw-a (CONNACK) and we disconnected",
    )
    state, line = lines["sensor air_1"]
    assert state == "ok", text
    assert line.startswith(f"pms5003 on {sensor.port} answered: pm"), line
    assert line.endswith(" ug/m3") or line.endswith(" #/0.1L"), line
    assert lines["spool"][0] == "ok"
    assert lines["disk"][0] == "ok"


def test_doctor_json_lists_every_check_in_order_with_its_status(
    tmp_path: Path,
    gateway: tuple[Path, Path, Path],
    broker: LabBroker,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with Pms5003Emulator(period_s=0.2) as sensor:
        config = _config(tmp_path, *gateway, broker.port, {"air_1": sensor.port})
        status, _, out = _doctor_here(capsys, config, "--json")
    body = json.loads(out)
    assert status == 0
    assert body["ok"] is True
    assert [c["name"] for c in body["checks"]] == [
        "config", "identity", "certificate", "clock", "broker dns", "broker tcp",
        "broker tls", "broker mqtt", "sensor air_1", "disk", "spool", "updates",
    ]  # fmt: skip
    assert {c["status"] for c in body["checks"]} <= {"ok", "warn"}


# -- faults: each one pinpointed, with what to do ---------------------------------------


def test_doctor_fails_with_a_clear_line_when_the_broker_is_down(
    tmp_path: Path, gateway: tuple[Path, Path, Path], broker: LabBroker
) -> None:
    config = _config(tmp_path, *gateway, broker.port)
    broker.stop()
    status, lines, text = _doctor(config)
    assert status == 1
    assert lines["broker tcp"] == (
        "FAIL",
        f"localhost:{broker.port} refused the connection: the broker is down or listens on "
        "another port: check broker.port in the config, and ask operations whether the broker "
        "is running",
    )
    assert lines["broker tls"][0] == "skip"
    assert lines["broker mqtt"][0] == "skip"
    assert lines["identity"][0] == "ok"
    assert "1 check(s) failed" in text


def test_doctor_names_chmod_for_a_key_others_can_read(
    tmp_path: Path, gateway: tuple[Path, Path, Path]
) -> None:
    key, cert, ca = gateway
    key.chmod(0o644)
    status, lines, _ = _doctor(_config(tmp_path, key, cert, ca, 1))
    assert status == 1
    assert lines["identity"][0] == "FAIL"
    assert lines["identity"][1].endswith(f"run chmod 600 {key}")


def test_doctor_fails_an_expired_certificate_and_says_how_to_renew(
    tmp_path: Path, gateway: tuple[Path, Path, Path], lab: LabFiles, broker: LabBroker
) -> None:
    key, cert, ca = gateway
    _expired_certificate(cert, key, lab)
    status, lines, text = _doctor(_config(tmp_path, key, cert, ca, broker.port))
    assert status == 1
    assert lines["identity"][0] == "ok"  # the files themselves are fine
    state, line = lines["certificate"]
    assert state == "FAIL"
    assert f"certificate {cert} expired on" in line
    assert "citygate provision csr" in line
    assert lines["broker mqtt"][0] == "FAIL", text  # and the broker refuses it


def test_doctor_fails_a_certificate_from_another_ca_at_identity_and_at_tls(
    tmp_path: Path, gateway: tuple[Path, Path, Path], other_lab: LabFiles, broker: LabBroker
) -> None:
    key, cert, _ = gateway
    status, lines, _ = _doctor(_config(tmp_path, key, cert, other_lab.ca_cert, broker.port))
    assert status == 1
    assert lines["identity"][0] == "FAIL"
    assert "was not issued by any CA in" in lines["identity"][1]
    assert lines["broker tls"] == (
        "FAIL",
        f"the broker's certificate is not from the CA in {other_lab.ca_cert}: install the "
        "fleet's CA bundle as identity.ca, or check broker.host",
    )


def test_doctor_fails_a_missing_serial_port(
    tmp_path: Path, gateway: tuple[Path, Path, Path]
) -> None:
    config = _config(tmp_path, *gateway, 1, {"bin_7": "/dev/ttyUSB-unplugged"})
    status, lines, _ = _doctor(config)
    assert status == 1
    assert lines["sensor bin_7"] == (
        "FAIL",
        "pms5003 port /dev/ttyUSB-unplugged does not exist: check the sensor's cable and USB "
        "adapter (ls -l /dev/serial/by-id/), or fix sensors.bin_7.port in the config",
    )


def test_doctor_fails_a_silent_sensor_by_a_real_test_read_and_names_it(
    tmp_path: Path, gateway: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with Pms5003Emulator(period_s=0.2) as sensor:
        sensor.set_silent(True)
        config = _config(tmp_path, *gateway, 1, {"air_1": sensor.port})
        started = time.monotonic()
        status, lines, text = _doctor_here(capsys, config, "--sensor-timeout", "2")
    assert status == 1
    state, line = lines["sensor air_1"]
    assert state == "FAIL", text
    # poll_interval_s 2.3 (the driver's default) + 1 s is longer than --sensor-timeout 2
    assert line.startswith(
        f"pms5003 on {sensor.port}: no reading within 3.3 s (nothing received from the sensor)"
    ), line
    assert line.endswith("check the sensor's wiring and power, and its baud rate in the config")
    assert time.monotonic() - started < 15


def _fill(path: Path) -> int:
    """Write zeros to `path` until the disk refuses; the errno it refused with."""
    with path.open("wb", buffering=0) as out:
        while True:
            try:
                out.write(b"\0" * 4096)
            except OSError as exc:
                return exc.errno or 0


def test_doctor_fails_a_full_disk_with_a_hint(
    tmp_path: Path, gateway: tuple[Path, Path, Path]
) -> None:
    assert os.geteuid() == 0, "this test mounts a tmpfs: run it as root (CI does)"
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(state_dir)], check=True)
    try:
        assert _fill(state_dir / "filler") == errno.ENOSPC
        status, lines, text = _doctor(_config(tmp_path, *gateway, 1))
    finally:
        subprocess.run(["umount", str(state_dir)], check=True)
    assert status == 1
    state, line = lines["disk"]
    assert state == "FAIL", text
    assert line.startswith(f"only 0.0 MiB free on {state_dir}: the spool cannot keep readings")
    assert "journalctl --vacuum-size" in line


def test_doctor_fails_a_port_another_program_holds_and_names_it(
    tmp_path: Path, gateway: tuple[Path, Path, Path], pty_port: str
) -> None:
    config = _config(tmp_path, *gateway, 1, {"air_1": pty_port})
    with serial.Serial(pty_port, exclusive=True, timeout=0):
        status, lines, _ = _doctor(config)
    assert status == 1
    state, line = lines["sensor air_1"]
    assert state == "FAIL"
    assert f"{pty_port} is held by another program: process {os.getpid()} (" in line
    assert f"stop it (kill {os.getpid()})" in line


def test_doctor_lists_every_config_problem_and_skips_what_needs_the_config(
    tmp_path: Path,
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[broker]\nhost = "x"\nport = 0\n[gateway]\nlog_level = "loud"\n')
    status, lines, text = _doctor(config)
    assert status == 1
    assert lines["config"][0] == "FAIL"
    assert f"{config}:3: broker.port:" in text
    assert f"{config}:5: gateway.log_level:" in text
    assert f"{config}:0: identity:" in text or "identity" in text
    assert lines["identity"][0] == "skip"
    assert lines["spool"][0] == "skip"
    assert lines["updates"][0] == "skip"


def test_doctor_says_which_config_to_pass_when_there_is_none(tmp_path: Path) -> None:
    status, lines, _ = _doctor(tmp_path / "missing.toml")
    assert status == 1
    assert lines["config"][0] == "FAIL"
    assert "pass the gateway's config with --config" in lines["config"][1]


def test_doctor_reports_the_spool_backlog_and_drops_without_writing_to_it(
    tmp_path: Path, gateway: tuple[Path, Path, Path]
) -> None:
    config = _config(tmp_path, *gateway, 1)
    path = tmp_path / "state" / "spool.sqlite"
    spool = Spool(path, tmp_path / "state" / "seq", budget_bytes=1 << 20)
    now = time.time()
    spool.add([Reading("air_1", "pm2_5", float(i), "ug/m3", now + i) for i in range(5)])
    spool.commit()
    spool.pack(2, lambda readings, seq: ("citygate/gw-a/telemetry", b"signed"))
    spool.close()
    before = path.read_bytes()
    _, lines, _ = _doctor(config)
    assert lines["spool"] == (
        "ok",
        f"{path}: 3 reading(s) and 1 message(s) waiting, 0 reading(s) dropped",
    )
    assert path.read_bytes() == before


# -- next to the running agent ----------------------------------------------------------


def test_doctor_next_to_the_running_agent_leaves_its_port_and_its_session_alone(
    tmp_path: Path, gateway: tuple[Path, Path, Path], broker: LabBroker, pty_port: str
) -> None:
    config = _config(tmp_path, *gateway, broker.port, {"air_1": pty_port})
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            stdout=out, stderr=out,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while "connected to" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        status, lines, text = _doctor(config)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=20)
    assert status == 0, text
    assert lines["sensor air_1"] == (
        "ok",
        f"{pty_port} is in use by the running agent (pid {agent.pid})",
    )
    assert lines["broker mqtt"][0] == "ok"
    assert f"the running agent (pid {agent.pid}) is connected" in lines["broker mqtt"][1]
    assert log.read_text().count("connected to") == 1  # never taken over, never reconnected


def test_the_agent_is_recognised_by_its_command_line_and_config() -> None:
    assert agent_config(["/usr/bin/citygate", "run", "--config", "/etc/c.toml"]) == "/etc/c.toml"
    assert agent_config(["python3", "-m", "agent.cli", "run", "--config=g.toml"]) == "g.toml"
    assert agent_config(["/usr/bin/citygate", "doctor", "--config", "/etc/c.toml"]) is None
    assert agent_config(["vim", "run", "--config", "x"]) is None


# -- the judgements ----------------------------------------------------------------------


def test_a_certificate_is_ok_far_from_expiry_warned_under_30_days_and_failed_after() -> None:
    path = Path("/etc/citygate/identity/gateway.crt")
    start = NOW - timedelta(days=300)
    assert judge_certificate(path, start, NOW + timedelta(days=65), NOW).status is Status.OK
    soon = judge_certificate(path, start, NOW + timedelta(days=29, hours=1), NOW)
    assert soon.status is Status.WARN
    assert "expires in 29 days" in soon.message
    expired = judge_certificate(path, start, NOW - timedelta(days=3), NOW)
    assert expired.status is Status.FAIL
    assert "(3 days ago)" in expired.message
    early = judge_certificate(path, NOW + timedelta(hours=2), NOW + timedelta(days=90), NOW)
    assert early.status is Status.FAIL
    assert "clock" in early.hint


def test_a_clock_that_was_never_set_fails_and_says_how_to_set_it() -> None:
    check = judge_clock(
        datetime(1970, 1, 1, 0, 3, tzinfo=UTC),
        not_before=None,
        newest_file=None,
        synchronised=False,
    )
    assert check.status is Status.FAIL
    assert "never set" in check.message
    assert "date -u -s" in check.hint


def test_a_clock_behind_the_certificate_or_the_files_is_warned() -> None:
    before_cert = judge_clock(
        NOW, not_before=NOW + timedelta(hours=3), newest_file=None, synchronised=True
    )
    assert before_cert.status is Status.WARN
    assert "before the certificate's start" in before_cert.message
    spool = Path("/var/lib/citygate/spool.sqlite")
    behind = judge_clock(
        NOW, not_before=None, newest_file=(spool, NOW + timedelta(days=40)), synchronised=True
    )
    assert behind.status is Status.WARN
    assert f"40 days behind {spool}" in behind.message
    close = judge_clock(
        NOW, not_before=None, newest_file=(spool, NOW + timedelta(hours=2)), synchronised=True
    )
    assert close.status is Status.OK


def test_an_unsynchronised_clock_is_warned_and_a_synchronised_one_passes() -> None:
    unsynced = judge_clock(NOW, not_before=None, newest_file=None, synchronised=False)
    assert unsynced.status is Status.WARN
    assert "timedatectl" in unsynced.hint
    assert judge_clock(NOW, not_before=None, newest_file=None, synchronised=True).status is (
        Status.OK
    )


def test_a_nearly_full_disk_fails_and_one_short_of_the_spool_budget_is_warned() -> None:
    mib = 1 << 20
    where = Path("/var/lib/citygate")
    full = judge_disk(where, 3 * mib, 64 * mib, 10 * mib)
    assert full.status is Status.FAIL
    assert "journalctl --vacuum-size" in full.hint
    short = judge_disk(where, 40 * mib, 64 * mib, 10 * mib)
    assert short.status is Status.WARN
    assert "may grow by 54 MiB" in short.message
    assert judge_disk(where, 500 * mib, 64 * mib, 10 * mib).status is Status.OK


def test_dropped_readings_and_an_old_backlog_are_warned() -> None:
    path = Path("/var/lib/citygate/spool.sqlite")
    dropped = judge_spool(path, SpoolDepth(10, 2, 30.0, dropped=120))
    assert dropped.status is Status.WARN
    assert "120 reading(s) dropped" in dropped.message
    old = judge_spool(path, SpoolDepth(0, 40, 3 * 3600.0, dropped=0))
    assert old.status is Status.WARN
    assert "3.0 h old" in old.message
    assert judge_spool(path, SpoolDepth(3, 1, 60.0, dropped=0)).status is Status.OK
