"""The `citygate` command line, run as a user runs it: a subprocess, exit codes, output."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.envelope import encode_senml, seal, signer_for
from agent.identity import load_identity
from agent.mqtt import Session, SessionSettings
from agent.tls import client_context
from drivers import family_names
from drivers.base import Reading
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles
from tests.agentrig import citygate, write_config


def _frame(pm1: int, pm25: int, pm10: int) -> str:
    words = [pm1, pm25, pm10, pm1, pm25, pm10, 0, 0, 0, 0, 0, 0, 0x9700]
    body = bytes([0x42, 0x4D, 0x00, 0x1C]) + b"".join(w.to_bytes(2, "big") for w in words)
    return (body + (sum(body) & 0xFFFF).to_bytes(2, "big")).hex()


@pytest.mark.parametrize(
    "command", [[], ["run"], ["config", "check"], ["decode"], ["verify"], ["demo"]]
)
def test_every_command_has_help(command: list[str]) -> None:
    result = citygate(*command, "--help")
    assert result.returncode == 0
    assert "usage: citygate" in result.stdout


def test_version_is_printed() -> None:
    result = citygate("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("citygate ")


def test_decode_prints_one_json_object_per_input() -> None:
    bad = _frame(1, 2, 3)[:-2] + "00"
    result = citygate("decode", "pms5003", _frame(4, 9, 12), bad)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0] == {
        "ok": True,
        "records": [
            {"n": "pm1", "u": "ug/m3", "v": 4},
            {"n": "pm2_5", "u": "ug/m3", "v": 9},
            {"n": "pm10", "u": "ug/m3", "v": 12},
        ],
    }
    assert lines[1]["ok"] is False
    assert "checksum" in lines[1]["error"]
    assert result.returncode == 1


def test_decode_unknown_driver_is_one_line_with_the_choices() -> None:
    result = citygate("decode", "nosuch", "00")
    assert result.returncode == 1
    known = ", ".join(family_names())
    assert result.stderr.strip() == f"citygate: unknown driver 'nosuch'; known: {known}"


def test_config_check_accepts_a_working_config(lab: LabFiles, tmp_path: Path) -> None:
    master, slave = os.openpty()
    try:
        config = write_config(tmp_path, lab, 8883, {"air_1": os.ttyname(slave)})
        result = citygate("config", "check", str(config), "--json")
    finally:
        os.close(master)
        os.close(slave)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"ok": True, "file": str(config), "sensors": 1}


def test_config_check_names_file_line_and_key_of_every_problem(
    lab: LabFiles, tmp_path: Path
) -> None:
    config = write_config(tmp_path, lab, 8883, {"bin_7": "/dev/ttyUSB9"})
    text = config.read_text().replace("port = 8883", "port = 88830")
    config.write_text(text)
    lines = text.splitlines()
    result = citygate("config", "check", str(config))
    assert result.returncode == 1
    port_line = lines.index("port = 88830") + 1
    tty_line = lines.index('port = "/dev/ttyUSB9"') + 1
    assert f"{config}:{port_line}: broker.port:" in result.stderr
    assert f"{config}:{tty_line}: sensors.bin_7.port: no such device /dev/ttyUSB9" in result.stderr


@pytest.mark.integration
def test_verify_prints_verified_readings_as_json_lines(lab: LabFiles, broker: LabBroker) -> None:
    cert, key = lab.clients["gw-a"]
    identity = load_identity(key, cert, lab.ca_cert)
    topic = "citygate/gw-a/telemetry"
    vcert, vkey = lab.clients["verifier"]
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "agent.cli", "verify",
            "--host", "localhost", "--port", str(broker.port),
            "--ca", str(lab.ca_cert), "--cert", str(vcert), "--key", str(vkey),
            "--gateway-cert", str(cert), "--count", "1", "--duration", "30",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    readings = [Reading("air_1", "pm2_5", 7.5, "ug/m3", 1_760_000_000.0)]
    message = seal(
        encode_senml("gw-a", readings),
        signer=signer_for(identity.key),
        gateway_id="gw-a",
        seq=41,
        iat=1_760_000_000,
        topic=topic,
    )

    async def publish_until_seen() -> None:
        settings = SessionSettings("localhost", broker.port, "gw-a", client_context(identity))
        async with await Session.open(settings) as session:
            # the verifier subscribes asynchronously: publish until it has seen one
            for _ in range(100):
                await session.publish(topic, message)
                if proc.poll() is not None:
                    return
                await asyncio.sleep(0.1)

    try:
        asyncio.run(publish_until_seen())
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    first = json.loads(out.splitlines()[0])
    assert first == {
        "gateway": "gw-a",
        "seq": 41,
        "sensor": "air_1",
        "n": "pm2_5",
        "u": "ug/m3",
        "v": 7.5,
        "t": 1_760_000_000,
    }
    summary = json.loads(err.strip().splitlines()[-1])
    assert summary["failed_verification"] == 0
    assert summary["verified"] >= 1


@pytest.mark.integration
def test_demo_ends_with_nothing_lost_and_nothing_failed(tmp_path: Path) -> None:
    result = citygate(
        "demo", "--duration", "8", "--json", "--quiet", "--workdir", str(tmp_path), timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["accepted"] > 0
    assert summary["lost"] == 0
    assert summary["failed_verification"] == 0
    assert summary["readings_received"] + summary["still_spooled"] == summary["accepted"]
    # every family shows up live: serial, Modbus (RTU and TCP), BLE
    assert set(summary["families"].values()) >= {
        "pms5003", "sds011", "sps30", "maxbotix", "a02yyuw", "modbus", "ruuvi", "bthome"
    }  # fmt: skip
    assert all(summary["per_sensor"].get(sid, 0) > 0 for sid in summary["families"])
