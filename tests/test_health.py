"""Health reports and events: the status encoding, the report's content, the bounded
event queue, driver watching, and delivery through a real mosquitto with mTLS."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.backoff import Backoff
from agent.envelope import (
    EncodingError,
    Record,
    TrustedKey,
    VerificationError,
    VerifiedMessage,
    encode_status,
    open_sealed,
    seal,
    signer_for,
)
from agent.health import Groups, Health, Link, is_recovery, report_groups
from agent.identity import Identity, load_identity
from agent.keys import kid_for
from agent.mqtt import Session, SessionLost
from agent.spool import Spool, SpoolFull, SpoolStats
from agent.uplink import Uplink
from agent.verify import Verifier, subscribe_and_verify, trust_store
from drivers.base import DriverState, Emit
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles

GW = "gw-a"
HEALTH = f"citygate/{GW}/health"
EVENTS = f"citygate/{GW}/events"
NOW = 1_767_225_600.0


def _clock() -> float:
    return NOW


class StubDriver:
    """A driver whose state the test sets (health reads nothing but `state()`)."""

    def __init__(self, sensor_id: str, state: DriverState) -> None:
        self.sensor_id = sensor_id
        self.current = state

    async def run(self, emit: Emit) -> None:
        await asyncio.Event().wait()

    def state(self) -> DriverState:
        return self.current


async def _no_session() -> Session:
    """A link that never comes up."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def _health(
    *,
    key: Ed25519PrivateKey | None = None,
    events_max: int = 10,
    sources: Callable[[], Groups] | None = None,
    take_seq: Callable[[], int] | None = None,
    events_topic: str = EVENTS,
    interval_s: float = 60.0,
    poll_s: float = 1.0,
) -> Health:
    counter = iter(range(1_000_000))
    return Health(
        gateway_id=GW,
        signer=signer_for(key or Ed25519PrivateKey.generate()),
        health_topic=HEALTH,
        events_topic=events_topic,
        interval_s=interval_s,
        events_max=events_max,
        take_seq=take_seq or (lambda: next(counter)),
        sources=sources or (lambda: {"agent": [("connects", "count", 1)]}),
        clock=_clock,
        poll_s=poll_s,
    )


# --- encoding ---------------------------------------------------------------


def test_a_sealed_status_pack_opens_with_every_value_type_intact() -> None:
    key = Ed25519PrivateKey.generate()
    groups: Groups = {
        "agent": [
            ("spool_bytes", "B", 4096),
            ("disk_full", "", False),
            ("update", "", "idle"),
            ("cert_expires_in", "s", 86_400.5),
        ],
        "air_1": [("available", "", True), ("reason", "", "ok"), ("bad_checksum", "count", 3)],
    }
    senml = encode_status(GW, groups, NOW)
    message = seal(senml, signer=signer_for(key), gateway_id=GW, seq=9, iat=int(NOW), topic=HEALTH)
    trusted = {kid_for(key.public_key()): TrustedKey(GW, key.public_key())}

    opened = open_sealed(message, HEALTH, trusted)

    assert (opened.gateway_id, opened.seq, opened.iat) == (GW, 9, int(NOW))
    assert opened.records == (
        Record("agent", "spool_bytes", "B", 4096.0, NOW),
        Record("agent", "disk_full", "", False, NOW),
        Record("agent", "update", "", "idle", NOW),
        Record("agent", "cert_expires_in", "s", 86_400.5, NOW),
        Record("air_1", "available", "", True, NOW),
        Record("air_1", "reason", "", "ok", NOW),
        Record("air_1", "bad_checksum", "count", 3.0, NOW),
    )
    assert [type(r.v) for r in opened.records[:3]] == [float, bool, str]
    with pytest.raises(VerificationError, match="signature"):
        open_sealed(message, EVENTS, trusted)  # signed for the health topic only


def test_the_status_pack_uses_rfc8428_integer_labels_and_canonical_cbor() -> None:
    groups: Groups = {"agent": [("connects", "count", 2), ("disk_full", "", True)]}
    pack = cbor2.loads(encode_status(GW, groups, NOW + 0.5))

    assert pack == [
        {-2: f"urn:dev:citygate:{GW}:agent:", -3: NOW + 0.5, 0: "connects", 1: "count", 2: 2},
        {0: "disk_full", 4: True},
    ]
    assert encode_status(GW, groups, NOW) == cbor2.dumps(
        cbor2.loads(encode_status(GW, groups, NOW)), canonical=True
    )


@pytest.mark.parametrize(
    ("groups", "why"),
    [
        ({"air:1": [("available", "", True)]}, "subject"),
        ({"": [("available", "", True)]}, "subject"),
        ({"air_1": [("pm 2.5", "", 1.0)]}, "record name"),
        ({"air_1": [("pm2_5", "ug/m3", math.nan)]}, "non-finite"),
        ({"air_1": []}, "no records"),
        ({}, "at least one group"),
        ({"air_1": [("raw", "", b"\x00")]}, "cannot send"),
    ],
)
def test_values_the_status_pack_cannot_carry_are_refused(groups: Groups, why: str) -> None:
    with pytest.raises(EncodingError, match=why):
        encode_status(GW, groups, NOW)


# --- report content ---------------------------------------------------------


def test_a_report_says_what_waits_what_was_lost_and_how_each_sensor_is() -> None:
    spool = SpoolStats(
        buffered=3,
        readings=5,
        messages=2,
        bytes_used=8192,
        dropped_readings=7,
        next_seq=40,
        memory_dropped=4,
        unsynced=1,
        disk_full=True,
    )
    drivers = [
        StubDriver("air_1", DriverState(True, "ok", {"frames": 10, "bad_checksum": 1})),
        StubDriver("bin_7", DriverState(False, "no echo for 30 s", {})),
    ]

    groups = report_groups(
        spool=spool,
        drivers=drivers,
        cert_not_after=NOW + 3600.9,
        clock_synced=False,
        connects=6,
        update_state="staged 1.4.0",
        now=NOW,
    )

    assert groups == {
        "agent": [
            ("spool_readings", "count", 8),
            ("spool_unsynced", "count", 1),
            ("spool_messages", "count", 2),
            ("spool_bytes", "B", 8192),
            ("dropped_readings", "count", 7),
            ("dropped_memory", "count", 4),
            ("disk_full", "", True),
            ("clock_synced", "", False),
            ("cert_expires_in", "s", 3600),
            ("connects", "count", 6),
            ("update", "", "staged 1.4.0"),
        ],
        "air_1": [
            ("available", "", True),
            ("reason", "", "ok"),
            ("bad_checksum", "count", 1),
            ("frames", "count", 10),
        ],
        "bin_7": [("available", "", False), ("reason", "", "no echo for 30 s")],
    }
    encode_status(GW, groups, NOW)  # and it can be sent as it is


# --- events -----------------------------------------------------------------


def test_a_full_event_queue_drops_the_oldest_and_counts_every_drop() -> None:
    health = _health(events_max=3)
    for number in range(5):
        health.event("sensor_fault", f"s{number}", reason="test")

    assert (health.events_queued, health.events_dropped) == (3, 2)
    assert health.events_published == 0


def test_events_are_logged_once_at_a_level_chosen_by_their_kind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    health = _health()
    with caplog.at_level(logging.INFO, logger="agent.health"):
        for kind in ("sensor_fault", "sensor_recovered", "clock_unsynced", "clock_synced"):
            health.event(kind, "agent")
        health.event("disk_ok", "agent", free_bytes=1e9)
        health.event("command_rejected", subject="commands", size=5000)

    levels = [(r.getMessage(), r.levelno) for r in caplog.records]
    assert levels == [
        ("agent: sensor_fault", logging.WARNING),
        ("agent: sensor_recovered", logging.INFO),
        ("agent: clock_unsynced", logging.WARNING),
        ("agent: clock_synced", logging.INFO),
        ("agent: disk_ok free_bytes=1000000000.0", logging.INFO),
        ("commands: command_rejected size=5000", logging.WARNING),
    ]
    assert not is_recovery("disk_full")


def test_an_event_that_cannot_be_encoded_is_logged_and_dropped_without_raising(
    caplog: pytest.LogCaptureFixture,
) -> None:
    health = _health()
    with caplog.at_level(logging.ERROR, logger="agent.health"):
        health.event("sensor_fault", "air:1")  # ':' cannot be in a subject
        health.event("sensor_fault", "air_1", level=math.inf)

    assert health.events_queued == 0
    assert len(caplog.records) == 2


def test_driver_availability_changes_become_fault_and_recovery_events(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flaky = StubDriver("air_1", DriverState(True, "ok", {}))
    late = StubDriver("bin_7", DriverState(False, "not started", {}))
    health = _health(poll_s=0.01)
    health.watch_drivers([flaky, late], grace_s=3600.0)

    async def settle(count: int) -> None:
        async with asyncio.timeout(5):
            while health.events_queued < count:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # a few more polls: nothing else may come

    async def scenario() -> None:
        runner = asyncio.create_task(health.run(_no_session))
        try:
            await asyncio.sleep(0.05)
            assert health.events_queued == 0  # not yet up is no fault within the grace time
            flaky.current = DriverState(False, "port /dev/ttyUSB0 gone", {})
            await settle(1)
            flaky.current = DriverState(True, "ok", {})
            await settle(2)
            health.watch_drivers([late], grace_s=0.0)  # a sensor that never came up
            await settle(3)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)

    with caplog.at_level(logging.INFO, logger="agent.health"):
        asyncio.run(scenario())

    assert [r.getMessage() for r in caplog.records] == [
        "air_1: sensor_fault reason='port /dev/ttyUSB0 gone'",
        "air_1: sensor_recovered",
        "bin_7: sensor_fault reason='not started'",
    ]
    assert health.events_queued == 3


class FakeLink:
    """A session that records publishes; it is lost at the first publish to `lose_on`.

    A fake because a real session cannot be cut at an exact publish."""

    def __init__(self, *, lose_on: str = "") -> None:
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.lose_on = lose_on
        self.attempts: list[tuple[str, bytes]] = []
        self.published: list[tuple[str, bytes]] = []

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        self.attempts.append((topic, payload))
        await asyncio.sleep(0)
        if topic == self.lose_on:
            self.lost.set_result("link cut")
            raise SessionLost("link cut")
        self.published.append((topic, payload))


async def _until(condition: Callable[[], bool], seconds: float = 15.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.01)


async def _run_over(health: Health, links: list[FakeLink], body: Awaitable[None]) -> None:
    """Run `health` over `links`, one session after the other, while `body` runs."""
    remaining = list(links)

    async def next_link() -> Link:
        while not remaining:
            await asyncio.Event().wait()
        return remaining.pop(0)

    runner = asyncio.create_task(health.run(next_link))
    try:
        await body
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


def test_an_event_cut_off_by_a_lost_session_goes_again_byte_identical_on_the_next() -> None:
    health = _health()
    health.event("sensor_fault", "air_1", reason="gone")
    health.event("sensor_recovered", "air_1")

    async def scenario() -> tuple[FakeLink, FakeLink]:
        first, second = FakeLink(lose_on=EVENTS), FakeLink()
        await _run_over(health, [first, second], _until(lambda: health.events_published == 2))
        return first, second

    first, second = asyncio.run(scenario())

    assert [topic for topic, _ in first.published] == [HEALTH]
    assert [topic for topic, _ in second.published] == [HEALTH, EVENTS, EVENTS]
    cut = first.attempts[-1]
    assert cut == second.published[1]  # the same signed bytes, so the same seq
    assert (health.events_queued, health.events_dropped) == (0, 0)


def test_an_event_without_a_seq_stays_queued_and_goes_later_in_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    issued = iter(range(100))
    calls = 0

    def take_seq() -> int:  # the spool's counter on a full disk: SpoolFull, once
        nonlocal calls
        calls += 1
        if calls == 2:
            raise SpoolFull("seq file cannot grow")
        return next(issued)

    health = _health(take_seq=take_seq)
    health.event("disk_full", "agent")

    async def scenario() -> FakeLink:
        link = FakeLink()

        async def body() -> None:
            await _until(lambda: calls == 2)
            await asyncio.sleep(0.05)
            assert (health.events_queued, health.events_published) == (1, 0)
            health.event("disk_ok", "agent")
            await _until(lambda: health.events_published == 2)

        await _run_over(health, [link], body())
        return link

    with caplog.at_level(logging.ERROR, logger="agent.health"):
        link = asyncio.run(scenario())

    kinds = [
        next(r[3] for r in cbor2.loads(cbor2.loads(payload).value[2]) if r.get(0) == "event")
        for topic, payload in link.published
        if topic == EVENTS
    ]
    assert kinds == ["disk_full", "disk_ok"]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        "event disk_full for agent kept, cannot sign it: seq file cannot grow"
    ]


def test_a_failing_source_costs_one_report_and_a_request_brings_the_next(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    def sources() -> Groups:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("spool stats unavailable")
        return {"agent": [("connects", "count", 1)]}

    health = _health(sources=sources)  # the next report would be due in a minute

    async def scenario() -> FakeLink:
        link = FakeLink()

        async def body() -> None:
            await _until(lambda: calls == 1)
            assert link.published == []
            health.request()
            await _until(lambda: health.reports_published == 1)

        await _run_over(health, [link], body())
        return link

    with caplog.at_level(logging.ERROR, logger="agent.health"):
        link = asyncio.run(scenario())
    assert [r.getMessage() for r in caplog.records] == ["health report skipped"]
    assert [topic for topic, _ in link.published] == [HEALTH]


# --- through the real broker ------------------------------------------------


@dataclass
class TopicVerifier(Verifier):
    """The real verifier, remembering the topic each verified message arrived on."""

    arrived: list[tuple[str, VerifiedMessage]] = field(default_factory=list)

    def check(self, topic: str, payload: bytes) -> VerifiedMessage:
        message = super().check(topic, payload)
        self.arrived.append((topic, message))
        return message

    def on(self, topic: str) -> list[VerifiedMessage]:
        return [message for arrived_on, message in self.arrived if arrived_on == topic]


@dataclass
class Rig:
    """The gateway side (uplink + health) and a verifying subscriber on its topics."""

    lab: LabFiles
    broker: LabBroker
    identity: Identity
    spool: Spool
    health: Health
    uplink: Uplink
    verifier: TopicVerifier
    failures: list[str] = field(default_factory=list)


def _rig(lab: LabFiles, broker: LabBroker, tmp_path: Path, **options: Any) -> Rig:
    cert, key = lab.clients[GW]
    identity = load_identity(key, cert, lab.ca_cert)
    spool = Spool(tmp_path / "spool.sqlite", tmp_path / "seq-spool", budget_bytes=1 << 20)
    air = StubDriver("air_1", DriverState(True, "ok", {"frames": 12}))
    uplink = Uplink(
        broker.session_settings(cert, key, lab.ca_cert, client_id=GW),
        Backoff(0.1, 0.5),
        status_topic=f"citygate/{GW}/status",
        online=b"online",
        offline=b"offline",
    )

    def sources() -> Groups:
        return report_groups(
            spool=spool.stats(),
            drivers=[air],
            cert_not_after=identity.not_after.timestamp(),
            clock_synced=True,
            connects=uplink.counters.connects,
            now=NOW,
        )

    options.setdefault("events_topic", EVENTS)
    health = Health(
        gateway_id=GW,
        signer=signer_for(identity.key),
        health_topic=HEALTH,
        interval_s=options.pop("interval_s", 60.0),
        events_max=options.pop("events_max", 10),
        take_seq=spool.take_seq,
        sources=sources,
        clock=_clock,
        **options,
    )
    verifier = TopicVerifier(trust_store(lab.ca_cert, [cert]))
    return Rig(lab, broker, identity, spool, health, uplink, verifier)


async def _subscribe(rig: Rig, stop: asyncio.Event, subscribed: asyncio.Event) -> None:
    cert, key = rig.lab.clients["verifier"]
    settings = rig.broker.session_settings(
        cert, key, rig.lab.ca_cert, client_id="verifier", persistent=True
    )
    await subscribe_and_verify(
        settings,
        rig.verifier,
        on_verified=lambda message, payload: None,
        on_failed=lambda topic, exc: rig.failures.append(f"{topic}: {exc}"),
        stop=stop,
        subscribed=subscribed,
        topic_filter=f"citygate/{GW}/#",
    )


async def _with_gateway(rig: Rig, body: Callable[[], Awaitable[None]]) -> None:
    """Run the subscriber, the uplink and health around `body`, then stop them all."""
    stop, subscribed = asyncio.Event(), asyncio.Event()
    subscriber = asyncio.create_task(_subscribe(rig, stop, subscribed), name="subscriber")
    await _until(subscribed.is_set)
    uplink = asyncio.create_task(rig.uplink.run(), name="uplink")
    health = asyncio.create_task(rig.health.run(rig.uplink.session), name="health")
    try:
        await body()
    finally:
        for task in (health, uplink):
            task.cancel()
        await asyncio.gather(health, uplink, return_exceptions=True)
        stop.set()
        await subscriber
        rig.spool.close()
    assert all(f.startswith(f"citygate/{GW}/status") for f in rig.failures), rig.failures


def _records(message: VerifiedMessage) -> list[tuple[str, str, str, object]]:
    return [(r.sensor, r.n, r.u, r.v) for r in message.records]


@pytest.mark.integration
def test_a_report_and_events_arrive_signed_on_their_topics(
    lab: LabFiles, broker: LabBroker, tmp_path: Path
) -> None:
    rig = _rig(lab, broker, tmp_path)
    rig.health.event("sensor_fault", "air_1", reason="no frames for 30 s")

    async def body() -> None:
        await _until(lambda: len(rig.verifier.on(EVENTS)) == 1)
        rig.health.event("sensor_recovered", "air_1")
        await _until(lambda: len(rig.verifier.on(EVENTS)) == 2)

    asyncio.run(_with_gateway(rig, body))

    [report] = rig.verifier.on(HEALTH)
    fault, recovered = rig.verifier.on(EVENTS)
    agent = {r.n: (r.u, r.v) for r in report.records if r.sensor == "agent"}
    assert agent["spool_readings"] == ("count", 0.0)
    assert agent["connects"] == ("count", 1.0)
    assert agent["clock_synced"] == ("", True)
    assert agent["events_dropped"] == ("count", 0.0)
    assert agent["cert_expires_in"][1] == math.floor(rig.identity.not_after.timestamp() - NOW)
    assert [r for r in _records(report) if r[0] == "air_1"] == [
        ("air_1", "available", "", True),
        ("air_1", "reason", "", "ok"),
        ("air_1", "frames", "count", 12.0),
    ]
    assert _records(fault) == [
        ("air_1", "event", "", "sensor_fault"),
        ("air_1", "reason", "", "no frames for 30 s"),
    ]
    assert _records(recovered) == [("air_1", "event", "", "sensor_recovered")]
    assert {m.gateway_id for m in (report, fault, recovered)} == {GW}
    # one counter with the spool (fresh here); on a new session the report goes first
    assert (report.seq, fault.seq, recovered.seq) == (0, 1, 2)
    assert (rig.health.reports_published, rig.health.events_published) == (1, 2)


@pytest.mark.integration
def test_events_raised_while_the_broker_is_down_arrive_after_reconnecting(
    lab: LabFiles, broker: LabBroker, tmp_path: Path
) -> None:
    rig = _rig(lab, broker, tmp_path, events_max=3)

    async def body() -> None:
        await _until(lambda: len(rig.verifier.on(HEALTH)) == 1)
        await asyncio.to_thread(broker.stop)
        await _until(lambda: not rig.uplink.connected)
        for number in range(5):  # two more than the queue holds: the oldest two go
            rig.health.event("sensor_fault", "air_1", attempt=number)
        await asyncio.to_thread(broker.start)
        await _until(lambda: len(rig.verifier.on(EVENTS)) == 3)
        await _until(lambda: len(rig.verifier.on(HEALTH)) == 2)

    asyncio.run(_with_gateway(rig, body))

    attempts = [{r.n: r.v for r in m.records}["attempt"] for m in rig.verifier.on(EVENTS)]
    assert attempts == [2.0, 3.0, 4.0]
    after = rig.verifier.on(HEALTH)[1]
    assert ("agent", "events_dropped", "count", 2.0) in _records(after)
    assert rig.health.events_dropped == 2


@pytest.mark.integration
def test_an_event_the_broker_refuses_is_dropped_and_reports_go_on(
    lab: LabFiles, broker: LabBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "citygate/gw-b/events"  # the ACL lets gw-a write only under citygate/gw-a/
    rig = _rig(lab, broker, tmp_path, events_topic=wrong, interval_s=0.2)
    rig.health.event("sensor_fault", "air_1", reason="test")
    rig.health.event("sensor_fault", "air_2", reason="test")

    async def body() -> None:
        await _until(lambda: len(rig.verifier.on(HEALTH)) >= 3)

    with caplog.at_level(logging.ERROR, logger="agent.health"):
        asyncio.run(_with_gateway(rig, body))

    refused = [r.getMessage() for r in caplog.records if "reason 135" in r.getMessage()]
    assert len(refused) == 2  # each refused once, then dropped: never a loop
    assert (rig.health.events_queued, rig.health.events_published) == (0, 0)
    assert rig.verifier.on(EVENTS) == []
