"""Online enrollment end to end: the registrar, a gateway with a claim certificate, mosquitto.

Everything runs as operations and technicians run it: `citygate provision
token new` (with the lab claim CA), `citygate provision registrar` as its own
process, and `citygate provision enroll` on a gateway directory holding only
its config, the CA bundle and the claim certificate. The broker is a real
mosquitto with the enrollment listener, the registrar's ACL lines and a CRL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.identity import load_identity
from agent.mqtt import ConnectFailed, PublishRefused, Session, SessionSettings
from agent.rotation import request_topic
from provisioning.broker import LabBroker
from provisioning.labconfig import write_gateway_config
from tests.agentrig import citygate
from tests.test_registrar import OnlineLab, enrollment, make_online_lab, online_broker

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Online:
    lab: OnlineLab
    broker: LabBroker
    registrar_log: Path


@contextlib.contextmanager
def registrar_process(lab: OnlineLab, broker: LabBroker, log: Path) -> Iterator[None]:
    """`citygate provision registrar` as its own process, until the block ends."""
    cert, key = lab.files.clients["registrar"]
    args = [
        "provision", "registrar", "--ca", str(lab.ca_dir), "--broker-host", "localhost",
        "--broker-port", str(broker.port), "--cert", str(cert), "--key", str(key),
        "--ca-bundle", str(lab.files.ca_cert), "--tokens", str(lab.tokens),
        "--allow", str(lab.allow), "--days", "30",
    ]  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", *args], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 15
        while "registrar ready" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the registrar did not get ready"
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


@pytest.fixture(scope="module")
def online(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Online]:
    directory = tmp_path_factory.mktemp("online")
    lab = make_online_lab(directory)
    with (
        online_broker(lab, directory / "broker") as broker,
        registrar_process(lab, broker, directory / "registrar.log"),
    ):
        yield Online(lab, broker, directory / "registrar.log")


def _gateway(online: Online, directory: Path, gateway_id: str) -> tuple[Path, str]:
    """A gateway as the image leaves it: config, CA bundle, claim certificate; and its token."""
    identity = directory / "identity"
    identity.mkdir(parents=True)
    shutil.copy(online.lab.files.ca_cert, identity / "ca.crt")
    made = citygate(
        "provision", "token", "new", "--tokens", str(online.lab.tokens), "--gateway-id",
        gateway_id, "--json", "--claim-ca", str(online.lab.claim_dir), "--out", str(identity),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    config = write_gateway_config(
        directory / "gateway.toml",
        lab=online.lab.files,
        gateway="gw-a",  # only for the shape; the identity paths are replaced below
        broker_port=online.broker.port,
        state_dir=directory / "state",
        sensors={},
    )
    text = config.read_text()
    cert, key = online.lab.files.clients["gw-a"]
    text = text.replace(str(key), str(identity / "gateway.key"))
    text = text.replace(str(cert), str(identity / "gateway.crt"))
    text = text.replace(str(online.lab.files.ca_cert), str(identity / "ca.crt"))
    config.write_text(text)
    return config, json.loads(made.stdout)["token"]


def _enroll(
    online: Online, config: Path, token: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    port = str(online.broker.claim_port)
    return citygate(
        "provision", "enroll", "--config", str(config), "--token", token, "--port", port, *extra
    )


def test_gateway_with_a_claim_certificate_and_a_token_enrolls_online_and_connects(
    online: Online, tmp_path: Path
) -> None:
    config, token = _gateway(online, tmp_path, "gw-new")
    result = _enroll(online, config, token)
    assert result.returncode == 0, result.stderr
    assert "made the gateway key" in result.stdout
    assert "accepts the new certificate" in result.stdout
    identity_dir = tmp_path / "identity"
    key = identity_dir / "gateway.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    identity = load_identity(key, identity_dir / "gateway.crt", identity_dir / "ca.crt")
    assert identity.gateway_id == "gw-new"
    assert "enrollment (token" in online.registrar_log.read_text()
    again = _enroll(online, config, token)  # the first-boot script may run twice
    assert again.returncode == 0, again.stderr
    assert "already enrolled" in again.stdout


def test_a_replayed_token_is_refused_and_nothing_is_installed(
    online: Online, tmp_path: Path
) -> None:
    config, token = _gateway(online, tmp_path / "first", "gw-new")
    assert _enroll(online, config, token).returncode == 0
    thief, _ = _gateway(online, tmp_path / "second", "gw-new")  # same gateway, another key
    result = _enroll(online, thief, token)
    assert result.returncode == 1
    assert "the registrar refused the enrollment" in result.stderr
    assert "already used" in result.stderr
    assert not (tmp_path / "second" / "identity" / "gateway.crt").exists()


def test_an_expired_or_unknown_token_is_refused_with_the_reason(
    online: Online, tmp_path: Path
) -> None:
    config, _ = _gateway(online, tmp_path, "gw-new")
    result = _enroll(online, config, "AAAA-BBBB-CCCC-DDDD-EEEE-FFFF-GGGG-HHHH")
    assert result.returncode == 1
    assert "not known" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_claim_certificate_can_do_nothing_but_ask_for_its_own_gateways_certificate(
    online: Online, tmp_path: Path
) -> None:
    lab, broker = online.lab, online.broker
    claim_cert, claim_key = lab.claim("gw-new", tmp_path)
    claim_port = broker.claim_port
    assert claim_port is not None

    def settings(cert: Path, key: Path, port: int, client: str) -> SessionSettings:
        plain = broker.session_settings(cert, key, lab.files.ca_cert, client_id=client)
        return dataclasses.replace(plain, port=port)

    async def scenario() -> None:
        claim = await Session.open(settings(claim_cert, claim_key, claim_port, "gw-new"))
        try:
            request = enrollment("gw-new", "AAAA-BBBB").encode()
            await claim.publish(request_topic("citygate", "gw-new"), request)  # allowed
            for topic in ("citygate/gw-new/telemetry", "citygate/gw-a/enroll/request",
                          "citygate/gw-new/enroll/reply"):  # fmt: skip
                with pytest.raises(PublishRefused) as refused:
                    await claim.publish(topic, b"{}")
                assert refused.value.reason == 135
        finally:
            await claim.close()
        with pytest.raises(ConnectFailed, match="no CONNACK"):  # not on the main listener
            await Session.open(settings(claim_cert, claim_key, broker.port, "gw-new"))
        cert, key = lab.files.clients["gw-a"]
        with pytest.raises(ConnectFailed, match="no CONNACK"):  # fleet certificates: not here
            await Session.open(settings(cert, key, claim_port, "gw-a"))

    asyncio.run(scenario())


def test_enroll_without_an_answer_says_what_to_do_and_leaves_the_token_unused(
    online: Online, tmp_path: Path
) -> None:
    config, token = _gateway(online, tmp_path, "gw-new")
    quiet = make_online_lab(tmp_path / "quiet")  # a broker with no registrar behind it
    with online_broker(quiet, tmp_path / "quiet-broker") as broker:
        port = str(broker.claim_port)
        text = config.read_text().replace(f"port = {online.broker.port}", f"port = {broker.port}")
        config.write_text(text)
        shutil.copy(quiet.files.ca_cert, tmp_path / "identity" / "ca.crt")
        claim_cert, claim_key = quiet.claim("gw-new", tmp_path / "identity")
        result = citygate(
            "provision", "enroll", "--config", str(config), "--token", token, "--port", port,
            "--timeout", "1",
        )  # fmt: skip
    assert result.returncode == 1
    assert "no answer from the registrar within 1 s" in result.stderr
    assert claim_cert.exists()
    assert claim_key.exists()
    listed = citygate("provision", "token", "list", "--tokens", str(online.lab.tokens), "--json")
    states = [json.loads(line)["state"] for line in listed.stdout.splitlines()]
    assert any(state.startswith("valid until") for state in states)
