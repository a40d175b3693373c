"""Journald-friendly logging, and no key material in any log of the agent.

The journal is recognised as systemd does it: `$JOURNAL_STREAM` names the
device and inode of the stream; a real file stands in for the journal's socket.
The last test runs the real agent at debug level, through a session with the
broker and through its refusals, and looks for its private key in everything
it printed.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.logging_setup import REDACTED, configure_logging, priority, redact, stream_is_journal
from drivers.pms5003.emulator import Pms5003Emulator
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles
from tests.agentrig import AgentProcess, write_config

LOGGER = "citygate.test"


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def _journal_env(path: Path) -> dict[str, str]:
    info = path.stat()
    return {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}


def test_stderr_is_the_journal_only_when_journal_stream_names_its_device_and_inode(
    tmp_path: Path,
) -> None:
    stream_file = tmp_path / "journal"
    other = tmp_path / "other"
    stream_file.touch()
    other.touch()
    with stream_file.open("w") as stream:
        assert stream_is_journal(stream, _journal_env(stream_file))
        assert not stream_is_journal(stream, _journal_env(other))
        assert not stream_is_journal(stream, {})
        assert not stream_is_journal(stream, {"JOURNAL_STREAM": "garbage"})
        assert not stream_is_journal(stream, {"JOURNAL_STREAM": "1:x"})
    assert not stream_is_journal(io.StringIO(), _journal_env(stream_file))


@pytest.mark.usefixtures("restore_root_logger")
def test_journal_lines_carry_syslog_priorities_and_one_line_per_event(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    path.touch()
    with path.open("w") as stream:
        configure_logging("debug", stream=stream, environ=_journal_env(path))
        log = logging.getLogger(LOGGER)
        log.debug("d")
        log.info("spool %s", "ok")
        log.warning("broker gone")
        log.error("two\nlines")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("crashed")
        log.critical("disk full")
    lines = path.read_text().splitlines()
    assert lines[:5] == [
        f"<7>{LOGGER}: d",
        f"<6>{LOGGER}: spool ok",
        f"<4>{LOGGER}: broker gone",
        f"<3>{LOGGER}: two\\nlines",
        lines[4],
    ]
    assert lines[4].startswith(f"<3>{LOGGER}: crashed\\nTraceback (most recent call last):\\n")
    assert lines[4].endswith("ValueError: boom")
    assert lines[5] == f"<2>{LOGGER}: disk full"
    assert len(lines) == 6


@pytest.mark.usefixtures("restore_root_logger")
def test_untrusted_text_cannot_forge_a_journal_line(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    path.touch()
    with path.open("w") as stream:
        configure_logging("info", stream=stream, environ=_journal_env(path))
        logging.getLogger(LOGGER).info("sensor id %r", "x\r\n<0>kernel: panic\x1b[2J\x00")
    [line] = path.read_text().splitlines()
    assert line == f"<6>{LOGGER}: sensor id 'x\\r\\n<0>kernel: panic\\x1b[2J\\x00'"


@pytest.mark.usefixtures("restore_root_logger")
def test_outside_the_journal_lines_read_level_logger_message() -> None:
    stream = io.StringIO()
    configure_logging("warning", stream=stream, environ={})
    log = logging.getLogger(LOGGER)
    log.info("not shown")
    log.warning("retrying in %.1f s", 2.0)
    assert stream.getvalue() == f"WARNING {LOGGER}: retrying in 2.0 s\n"


@pytest.mark.usefixtures("restore_root_logger")
def test_configure_replaces_earlier_handlers_instead_of_doubling_lines() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", stream=first, environ={})
    configure_logging("info", stream=second, environ={})
    logging.getLogger(LOGGER).info("once")
    assert first.getvalue() == ""
    assert second.getvalue() == f"INFO {LOGGER}: once\n"


def test_levels_map_to_syslog_priorities() -> None:
    assert [priority(n) for n in (5, 10, 15, 20, 25, 30, 40, 50, 60)] == [7, 7, 7, 6, 6, 4, 3, 2, 2]


def test_pem_private_keys_are_redacted_whole_or_truncated(lab: LabFiles) -> None:
    _, key_path = lab.clients["gw-a"]
    pem = key_path.read_text()
    assert redact(f"loaded {pem.strip()} ok") == f"loaded {REDACTED} ok"
    assert redact("head " + pem[:60]) == f"head {REDACTED}"
    rsa_like = "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----"
    assert redact(rsa_like) == REDACTED
    certificate = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"
    assert redact(certificate) == certificate


@pytest.mark.usefixtures("restore_root_logger")
def test_a_key_passed_to_a_logger_by_mistake_never_reaches_the_output(lab: LabFiles) -> None:
    _, key_path = lab.clients["gw-a"]
    stream = io.StringIO()
    configure_logging("debug", stream=stream, environ={})
    logging.getLogger(LOGGER).debug("identity %s", key_path.read_text())
    assert "PRIVATE KEY" not in stream.getvalue()
    assert REDACTED in stream.getvalue()


def _key_material(key_path: Path) -> list[str]:
    """Forms in which the private key could show up in a log."""
    pem = key_path.read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    raw = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    body = [line for line in pem.decode().splitlines() if not line.startswith("-----")]
    forms = ["PRIVATE KEY", *body, raw.hex(), base64.b64encode(raw).decode(), repr(raw)[2:-1]]
    secret = raw[-32:]  # the Ed25519 seed (the last OCTET STRING of the PKCS#8 DER)
    forms += [secret.hex(), base64.b64encode(secret).decode(), repr(secret)[2:-1]]
    return forms


@pytest.mark.integration
def test_the_agent_never_logs_its_private_key(
    lab: LabFiles, broker: LabBroker, tmp_path: Path
) -> None:
    """Debug level, a real session, a broker outage and a refused key: no key material."""
    _, key_path = lab.clients["gw-a"]
    outputs: list[str] = []

    async def session() -> None:
        with Pms5003Emulator(period_s=0.1, seed=5, wait_for_host=True) as sensor:
            config = write_config(tmp_path, lab, broker.port, {"air_1": sensor.port})
            text = config.read_text().replace('log_level = "info"', 'log_level = "debug"')
            config.write_text(text)
            agent = AgentProcess(config, tmp_path / "agent.log")
            await agent.start()
            async with asyncio.timeout(20):
                while "connected to" not in agent.output() or sensor.frames_sent < 20:
                    await asyncio.sleep(0.1)
            broker.stop()
            await asyncio.sleep(1.0)
            broker.start()
            await asyncio.sleep(1.0)
            assert await agent.stop() == 0
            outputs.append(agent.output())

    asyncio.run(session())

    loose_key = tmp_path / "loose.key"
    loose_key.write_bytes(key_path.read_bytes())
    loose_key.chmod(0o644)  # refused: readable by others
    config = tmp_path / "gateway.toml"
    config.write_text(config.read_text().replace(str(key_path), str(loose_key)))
    refused = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    assert refused.returncode != 0
    outputs.append(refused.stdout + refused.stderr)

    everything = "\n".join(outputs)
    assert "DEBUG" in everything  # the debug level was really on
    leaked = [form for form in _key_material(key_path) if form and form in everything]
    assert leaked == []
