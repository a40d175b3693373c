"""The uplink against a real mosquitto with mutual TLS and the citygate ACL."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import pytest

from agent.backoff import Backoff
from agent.envelope import VerificationError, encode_senml, seal, signer_for
from agent.identity import Identity, load_identity
from agent.mqtt import ConnectFailed, PublishRefused, Session, SessionSettings
from agent.spool import Spool
from agent.tls import client_context, verifier_context
from agent.uplink import OutboxSender, Uplink
from agent.verify import Verifier, trust_store
from drivers.base import Reading
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles

pytestmark = pytest.mark.integration


def _identity(lab: LabFiles, name: str) -> Identity:
    cert, key = lab.clients[name]
    return load_identity(key, cert, lab.ca_cert)


def _settings(broker: LabBroker, tls: ssl.SSLContext, client_id: str = "") -> SessionSettings:
    return SessionSettings(
        host="localhost", port=broker.port, client_id=client_id, tls=tls, connect_timeout_s=3.0
    )


def _message(identity: Identity, topic: str, seq: int) -> bytes:
    readings = [Reading("air_1", "pm2_5", 12.0 + seq, "ug/m3", 1_760_000_000.0 + seq)]
    senml = encode_senml(identity.gateway_id, readings)
    return seal(
        senml,
        signer=signer_for(identity.key),
        gateway_id=identity.gateway_id,
        seq=seq,
        iat=1_760_000_000,
        topic=topic,
    )


def _verifier_settings(lab: LabFiles, broker: LabBroker) -> SessionSettings:
    cert, key = lab.clients["verifier"]
    return _settings(broker, verifier_context(cert, key, lab.ca_cert))


def test_gateway_publishes_and_verifier_receives_and_verifies(
    lab: LabFiles, broker: LabBroker
) -> None:
    gw = _identity(lab, "gw-a")
    topic = "citygate/gw-a/telemetry"
    verifier = Verifier(trust_store(lab.ca_cert, [lab.clients["gw-a"][0]]))

    async def scenario() -> None:
        async with await Session.open(_verifier_settings(lab, broker)) as sub:
            await sub.subscribe("citygate/+/telemetry")
            async with await Session.open(_settings(broker, client_context(gw), "gw-a")) as pub:
                await pub.publish(topic, _message(gw, topic, 7))
            async with asyncio.timeout(10):
                msg = await anext(sub.messages())
        checked = verifier.check(msg.topic, msg.payload)
        assert (checked.gateway_id, checked.seq) == ("gw-a", 7)
        assert checked.records[0].v == 19

    asyncio.run(scenario())


def test_client_without_certificate_gets_no_connack(lab: LabFiles, broker: LabBroker) -> None:
    tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(lab.ca_cert))

    async def scenario() -> None:
        with pytest.raises(ConnectFailed, match=r"CONNACK|cannot reach"):
            await Session.open(_settings(broker, tls))

    asyncio.run(scenario())


def test_client_with_certificate_from_another_ca_gets_no_connack(
    lab: LabFiles, other_lab: LabFiles, broker: LabBroker
) -> None:
    cert, key = other_lab.clients["gw-a"]
    tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(lab.ca_cert))
    tls.load_cert_chain(cert, key)

    async def scenario() -> None:
        with pytest.raises(ConnectFailed, match=r"CONNACK|cannot reach"):
            await Session.open(_settings(broker, tls))

    asyncio.run(scenario())


def test_publishing_to_another_gateways_topic_is_refused_with_135(
    lab: LabFiles, broker: LabBroker
) -> None:
    gw = _identity(lab, "gw-a")

    async def scenario() -> None:
        async with await Session.open(_settings(broker, client_context(gw), "gw-a")) as pub:
            with pytest.raises(PublishRefused) as refused:
                await pub.publish("citygate/gw-b/telemetry", b"x")
        assert refused.value.reason == 135

    asyncio.run(scenario())


def test_agent_reports_a_refused_message_and_keeps_it(
    lab: LabFiles, broker: LabBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gw = _identity(lab, "gw-a")
    spool = Spool(tmp_path / "spool.sqlite", tmp_path / "seq", budget_bytes=1 << 24)
    spool.add([Reading("air_1", "pm2_5", 3.0, "ug/m3", 1_760_000_000.0)])
    spool.commit()
    wrong = "citygate/gw-b/telemetry"  # e.g. a misconfigured prefix or a copied spool
    spool.pack(10, lambda readings, seq: (wrong, _message(gw, wrong, seq)))
    uplink = Uplink(
        _settings(broker, client_context(gw), "gw-a"),
        Backoff(0.1, 1.0),
        status_topic="citygate/gw-a/status",
        online=b"online",
        offline=b"offline",
    )
    sender = OutboxSender(spool, uplink, window=4)

    async def scenario() -> None:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(uplink.run()), group.create_task(sender.run())]
            async with asyncio.timeout(10):
                await sender.drained()  # everything but the refused message
                for _ in range(5):  # new rows to send: the refused one must not go again
                    sender.wake()
                    await asyncio.sleep(0.02)
            for task in tasks:
                task.cancel()

    with caplog.at_level(logging.ERROR, logger="agent.uplink"):
        asyncio.run(scenario())
    assert any("reason 135" in r.getMessage() for r in caplog.records)
    assert uplink.counters.refused == 1  # tried once in the session, not in a loop
    assert spool.stats().messages == 1  # nothing is deleted without a successful PUBACK
    spool.close()


def test_replayed_or_tampered_messages_fail_verification(lab: LabFiles, broker: LabBroker) -> None:
    gw_a = _identity(lab, "gw-a")
    gw_b = _identity(lab, "gw-b")
    topic_a = "citygate/gw-a/telemetry"
    topic_b = "citygate/gw-b/telemetry"
    genuine = _message(gw_a, topic_a, 1)
    flipped = bytearray(genuine)
    flipped[len(flipped) // 2] ^= 0x01
    verifier = Verifier(trust_store(lab.ca_cert, [lab.clients["gw-a"][0], lab.clients["gw-b"][0]]))

    async def scenario() -> list[tuple[str, bytes]]:
        got: list[tuple[str, bytes]] = []
        async with await Session.open(_verifier_settings(lab, broker)) as sub:
            await sub.subscribe("citygate/+/telemetry")
            async with await Session.open(_settings(broker, client_context(gw_b), "gw-b")) as b:
                await b.publish(topic_b, genuine)  # gw-b replays gw-a's message as its own
            async with await Session.open(_settings(broker, client_context(gw_a), "gw-a")) as a:
                await a.publish(topic_a, bytes(flipped))
                await a.publish(topic_a, genuine)
            messages = sub.messages()
            async with asyncio.timeout(10):
                for _ in range(3):
                    msg = await anext(messages)
                    got.append((msg.topic, msg.payload))
        return got

    received = asyncio.run(scenario())
    outcomes = []
    for topic, payload in received:
        try:
            verifier.check(topic, payload)
            outcomes.append("ok")
        except VerificationError:
            outcomes.append("failed")
    assert outcomes == ["failed", "failed", "ok"]
    assert (verifier.verified, verifier.failed) == (1, 2)
