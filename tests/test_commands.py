"""Commands and update offers: what is accepted, what is rejected, and floods.

The first half checks the pure parts (the parser, the token bucket, the report
throttle) and `Commands.handle` with a clock the test moves. The second half
runs `Commands` on the real uplink against mosquitto with an "operator"
identity allowed by the ACL to write every gateway's command topics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import commands as c
from agent.backoff import Backoff
from agent.commands import (
    Commands,
    HealthRequest,
    OtaOffer,
    Rejected,
    Throttle,
    TokenBucket,
    parse_command,
)
from agent.identity import load_identity
from agent.mqtt import Message, PublishRefused, Session, SessionSettings
from agent.tls import client_context
from agent.uplink import Uplink
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles, make_lab_pki

BASE = "citygate/gw-a"


def _message(topic: str, payload: bytes, *, retain: bool = False) -> Message:
    return Message(f"{BASE}/{topic}", payload, retain)


# -- the parser -------------------------------------------------------------------------------

ACCEPTED = [
    ("cmd/health", b"", HealthRequest()),
    ("cmd/health", b"{}", HealthRequest()),
    ("cmd/health", b" { } \n", HealthRequest()),
    ("ota/offer", b'{"version": "1.4.2"}', OtaOffer("1.4.2")),
    ("ota/offer", b'{"version": "1.4.2-rc.1+build.7"}', OtaOffer("1.4.2-rc.1+build.7")),
    ("ota/offer", b'{"version": "0.3.dev2"}', OtaOffer("0.3.dev2")),
]

REJECTED = [
    ("cmd/reboot", b"{}", c.UNKNOWN_COMMAND),
    ("cmd/health/now", b"{}", c.UNKNOWN_COMMAND),
    ("cmd", b"{}", c.UNKNOWN_COMMAND),
    ("cmd/health", b"{}" + b" " * c.MAX_COMMAND_BYTES, c.TOO_LARGE),
    ("cmd/health", b"\xff\xfe{}", c.NOT_UTF8),
    ("cmd/health", b"\xed\xa0\x80", c.NOT_UTF8),  # a UTF-16 surrogate is not UTF-8
    ("cmd/health", b"{}\x00", c.NUL_BYTE),
    ("cmd/health", b"{'a': 1}", c.NOT_JSON),
    ("cmd/health", b"[" * 4000, c.NOT_JSON),
    ("cmd/health", b"[]", c.NOT_OBJECT),
    ("cmd/health", b"null", c.NOT_OBJECT),
    ("cmd/health", b'{"now": true}', c.UNKNOWN_KEY),
    ("ota/offer", b"", c.NOT_JSON),
    ("ota/offer", b"{}", c.MISSING_KEY),
    ("ota/offer", b'{"version": 2}', c.WRONG_TYPE),
    ("ota/offer", b'{"version": NaN}', c.NOT_JSON),
    ("ota/offer", b'{"version": "1.0", "url": "http://x"}', c.UNKNOWN_KEY),
    ("ota/offer", b'{"version": "1.0", "version": "9.9"}', c.DUPLICATE_KEY),
    ("ota/offer", b'{"version": "latest"}', c.BAD_VERSION),
    ("ota/offer", b'{"version": "../../1.0"}', c.BAD_VERSION),
    ("ota/offer", b'{"version": "1.0\\u0000"}', c.BAD_VERSION),
    ("ota/offer", b'{"version": "\\u0661.\\u0662"}', c.BAD_VERSION),  # Arabic-Indic digits
    ("ota/offer", json.dumps({"version": "1." + "9" * 60}).encode(), c.BAD_VERSION),
]


@pytest.mark.parametrize(("topic", "payload", "expected"), ACCEPTED)
def test_valid_commands_and_offers_are_accepted(
    topic: str, payload: bytes, expected: object
) -> None:
    assert parse_command(BASE, _message(topic, payload)) == expected


@pytest.mark.parametrize(("topic", "payload", "reason"), REJECTED)
def test_anything_else_is_rejected_with_its_reason(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(Rejected) as caught:
        parse_command(BASE, _message(topic, payload))
    assert caught.value.reason == reason


def test_a_retained_command_is_rejected_but_a_retained_offer_is_fine() -> None:
    """A retained command would run again at every connection; an offer stays true."""
    with pytest.raises(Rejected, match=c.RETAINED):
        parse_command(BASE, _message("cmd/health", b"{}", retain=True))
    offer = _message("ota/offer", b'{"version": "2.0.0"}', retain=True)
    assert parse_command(BASE, offer) == OtaOffer("2.0.0")


def test_another_gateways_topics_are_not_ours() -> None:
    with pytest.raises(Rejected, match=c.UNKNOWN_COMMAND):
        parse_command(BASE, Message("citygate/gw-b/cmd/health", b"{}", False))


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_topics = st.sampled_from(["cmd/health", "ota/offer", "cmd/x", "cmd/health/x"]) | st.text(
    max_size=30
)


@given(
    topic=_topics,
    payload=st.binary(max_size=c.MAX_COMMAND_BYTES + 64)
    | _json.map(lambda value: json.dumps(value).encode()),
    retain=st.booleans(),
)
def test_the_parser_never_fails_otherwise_than_by_rejecting(
    topic: str, payload: bytes, retain: bool
) -> None:
    reason: str | None = None
    try:
        command = parse_command(BASE, _message(topic, payload, retain=retain))
    except Rejected as rejected:
        reason = rejected.reason
    else:
        if isinstance(command, HealthRequest):
            assert (topic, retain) == ("cmd/health", False)
            assert payload == b"" or json.loads(payload) == {}
        else:
            assert (topic, json.loads(payload)) == ("ota/offer", {"version": command.version})
    assert reason is None or reason in c.REASONS


# -- rate limit and report throttle ----------------------------------------------------------


def test_the_token_bucket_allows_a_burst_then_its_rate_and_nothing_for_a_clock_going_back() -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=5, now=100.0)
    assert [bucket.take(100.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.take(100.5) is False
    assert bucket.take(101.0) is True
    assert bucket.take(50.0) is False  # the clock jumped back: no free tokens
    assert bucket.take(1000.0) is True  # refilled, but never beyond the burst
    assert sum(bucket.take(1000.0) for _ in range(10)) == 4


def test_the_throttle_lets_one_report_through_per_interval_and_counts_the_rest() -> None:
    throttle = Throttle(1.0)
    assert [throttle.allow(10.0) for _ in range(4)] == [0, None, None, None]
    assert throttle.allow(10.9) is None
    assert throttle.allow(11.0) == 4
    assert throttle.allow(11.5) is None


@dataclass
class Seen:
    """What the callbacks of a `Commands` saw."""

    health: int = 0
    offers: list[str] = field(default_factory=list)
    events: list[tuple[str, dict[str, object]]] = field(default_factory=list)

    def on_health_request(self) -> None:
        self.health += 1

    def on_event(self, kind: str, /, **fields: object) -> None:
        self.events.append((kind, fields))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _no_session() -> Session:
    raise AssertionError("handle() needs no session")


def _commands(seen: Seen, clock: Clock, **kwargs: object) -> Commands:
    return Commands(
        "gw-a",
        prefix="citygate",
        sessions=_no_session,
        on_health_request=seen.on_health_request,
        on_ota_offer=seen.offers.append,
        on_event=seen.on_event,
        clock=clock,
        **kwargs,  # type: ignore[arg-type]
    )


def _rejection_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "agent.commands" and r.levelno == logging.WARNING
    ]


def test_commands_beyond_the_burst_are_rate_limited_and_rejections_are_logged_once_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen, clock = Seen(), Clock()
    commands = _commands(seen, clock)
    with caplog.at_level(logging.INFO, logger="agent.commands"):
        for _ in range(10):
            commands.handle(_message("cmd/health", b"{}"))
        assert seen.health == c.BURST
        assert commands.counters.rejected == {c.RATE_LIMITED: 10 - c.BURST}
        assert len(_rejection_lines(caplog)) == 1
        clock.now += 1.0
        commands.handle(_message("cmd/health", b"{}"))  # one token back
        commands.handle(_message("cmd/health", b"{}"))
    assert seen.health == c.BURST + 1
    lines = _rejection_lines(caplog)
    assert len(lines) == 2
    assert lines[0].startswith(f"command rejected on '{BASE}/cmd/health': rate limited (2 bytes")
    assert lines[1].endswith(f"; {10 - c.BURST - 1} more rejection(s) not logged")
    assert [fields["not_reported"] for _, fields in seen.events] == [0, 10 - c.BURST - 1]
    assert seen.events[0] == (
        "command_rejected",
        {
            "subject": "commands",
            "topic": f"{BASE}/cmd/health",
            "reason": c.RATE_LIMITED,
            "size": 2,
            "not_reported": 0,
        },
    )


def test_a_rejection_log_line_escapes_the_topic_and_shows_only_a_prefix_of_the_payload(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen, clock = Seen(), Clock()
    commands = _commands(seen, clock)
    payload = b"\x1b[2J\n" + b"A" * 40 + b"SECRET-TAIL"
    with caplog.at_level(logging.WARNING, logger="agent.commands"):
        commands.handle(_message("cmd/evil\nFAKE LOG LINE", payload))
    (line,) = _rejection_lines(caplog)
    assert "\n" not in line
    assert "\x1b" not in line
    assert "SECRET-TAIL" not in line
    assert f"unknown command ({len(payload)} bytes" in line
    assert seen.events[0][1]["reason"] == c.UNKNOWN_COMMAND


def test_a_failing_callback_is_logged_and_does_not_escape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug in a handler")

    commands = Commands(
        "gw-a",
        prefix="citygate",
        sessions=_no_session,
        on_health_request=broken,
        on_ota_offer=broken,
        on_event=broken,
    )
    with caplog.at_level(logging.ERROR, logger="agent.commands"):
        commands.handle(_message("cmd/health", b""))
        commands.handle(_message("ota/offer", b'{"version": "1.0.0"}'))
        commands.handle(_message("cmd/nope", b""))
    assert commands.counters.accepted == 2
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 3


# -- against the broker -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def operator_lab(tmp_path_factory: pytest.TempPathFactory) -> LabFiles:
    return make_lab_pki(tmp_path_factory.mktemp("pki"), clients=["gw-a", "gw-b", "operator"])


@pytest.fixture
def operator_broker(operator_lab: LabFiles, tmp_path: Path) -> Iterator[LabBroker]:
    with LabBroker(
        tmp_path / "broker",
        ca_cert=operator_lab.ca_cert,
        server_cert=operator_lab.server_cert,
        server_key=operator_lab.server_key,
        operators=["operator"],
    ) as running:
        yield running


def _client(lab: LabFiles, broker: LabBroker, name: str) -> SessionSettings:
    cert, key = lab.clients[name]
    return broker.session_settings(cert, key, lab.ca_cert, client_id=name)


@dataclass
class Agent:
    """The agent's side: the real uplink, and `Commands` served on its sessions."""

    uplink: Uplink
    commands: Commands
    seen: Seen
    clock: Clock


@asynccontextmanager
async def _agent(lab: LabFiles, broker: LabBroker, **kwargs: object) -> AsyncIterator[Agent]:
    cert, key = lab.clients["gw-a"]
    settings = SessionSettings(
        host="localhost",
        port=broker.port,
        client_id="gw-a",
        tls=client_context(load_identity(key, cert, lab.ca_cert)),
        connect_timeout_s=2.0,
        max_packet_size=c.MAX_PACKET_SIZE,
    )
    uplink = Uplink(
        settings,
        Backoff(0.05, 0.2),
        status_topic=f"{BASE}/status",
        online=b"online",
        offline=b"offline",
    )
    seen, clock = Seen(), Clock()
    commands = Commands(
        "gw-a",
        prefix="citygate",
        sessions=uplink.session,
        on_health_request=seen.on_health_request,
        on_ota_offer=seen.offers.append,
        on_event=seen.on_event,
        clock=clock,
        **kwargs,  # type: ignore[arg-type]
    )
    tasks = [
        asyncio.create_task(uplink.run(), name="uplink"),
        asyncio.create_task(commands.run(), name="commands"),
    ]
    try:
        async with asyncio.timeout(15):
            await commands.subscribed.wait()
        yield Agent(uplink, commands, seen, clock)
        for task in tasks:
            assert not task.done(), f"task {task.get_name()} ended"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until(predicate: Callable[[], bool], what: str, limit_s: float = 15.0) -> None:
    try:
        async with asyncio.timeout(limit_s):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def _health_works(agent: Agent, operator: Session) -> None:
    """A valid cmd/health, sent now, reaches the callback."""
    before = agent.seen.health
    await operator.publish(f"{BASE}/cmd/health", b"{}")
    await _until(lambda: agent.seen.health == before + 1, "the health request")


def _handled(commands: Commands) -> int:
    counters = commands.counters
    return counters.accepted + sum(counters.rejected.values()) + counters.dropped


def _hostile(rand: random.Random) -> tuple[str, bytes]:
    """A topic and payload that no gateway may accept, of one of several kinds."""
    size = rand.randrange(1, 6000)
    word = "x" + "".join(rand.choices("abcdefghij/", k=rand.randrange(1, 12)))
    kind = rand.randrange(7)
    if kind == 0:
        return "cmd/health", b"\xff" + rand.randbytes(size)
    if kind == 1:
        return "cmd/health", b"\x00" + rand.randbytes(size)
    if kind == 2:
        return f"cmd/{word}", b"{}"
    if kind == 3:
        version = rand.choice([1, None, "latest", [1], {"a": 1}, "1." * 40])
        return "ota/offer", json.dumps({"version": version}).encode()
    if kind == 4:
        return "cmd/health", json.dumps({word: rand.random()}).encode()
    if kind == 5:
        return "cmd/health", b"{}" + b" " * (c.MAX_COMMAND_BYTES + size)
    return "cmd/health", b"{" * size


@pytest.mark.integration
def test_only_operators_and_the_gateway_itself_may_send_it_commands(
    operator_lab: LabFiles, operator_broker: LabBroker
) -> None:
    lab, broker = operator_lab, operator_broker

    async def scenario() -> Seen:
        async with (
            _agent(lab, broker) as agent,
            await Session.open(_client(lab, broker, "operator")) as operator,
        ):
            await operator.publish(f"{BASE}/cmd/health", b"{}")
            await operator.publish(f"{BASE}/ota/offer", b'{"version": "1.2.3"}')
            await _until(lambda: agent.seen.offers == ["1.2.3"], "the offer")
            async with await Session.open(_client(lab, broker, "gw-b")) as other:
                with pytest.raises(PublishRefused) as caught:
                    await other.publish(f"{BASE}/cmd/health", b"{}")
                assert caught.value.reason == 135  # Not authorized
            with pytest.raises(PublishRefused):
                await operator.publish(f"{BASE}/telemetry", b"forged")
            await _health_works(agent, operator)
            return agent.seen

    seen = asyncio.run(scenario())
    assert seen.health == 2
    assert seen.events == []


@pytest.mark.integration
def test_malformed_commands_are_rejected_counted_and_reported_and_a_valid_one_still_works(
    operator_lab: LabFiles, operator_broker: LabBroker, caplog: pytest.LogCaptureFixture
) -> None:
    lab, broker = operator_lab, operator_broker

    async def scenario() -> Agent:
        async with (
            _agent(lab, broker, burst=1000) as agent,
            await Session.open(_client(lab, broker, "operator")) as operator,
        ):
            for topic, payload, _ in REJECTED:
                await operator.publish(f"{BASE}/{topic}", payload)
            await _until(lambda: _handled(agent.commands) == len(REJECTED), "every rejection")
            await _health_works(agent, operator)
            return agent

    with caplog.at_level(logging.WARNING, logger="agent.commands"):
        agent = asyncio.run(scenario())
    expected: dict[str, int] = {}
    for *_, reason in REJECTED:
        expected[reason] = expected.get(reason, 0) + 1
    assert agent.commands.counters.rejected == expected
    assert agent.commands.counters.accepted == 1
    # the clock stood still: one line and one event stand for all of them
    assert len(_rejection_lines(caplog)) == 1
    assert [kind for kind, _ in agent.seen.events] == ["command_rejected"]


@pytest.mark.integration
def test_a_command_bigger_than_the_maximum_packet_size_never_reaches_the_agent(
    operator_lab: LabFiles, operator_broker: LabBroker
) -> None:
    """The broker drops it for us (a smaller oversized one arrives and is rejected), and the
    session stays up."""
    lab, broker = operator_lab, operator_broker

    async def scenario() -> Agent:
        async with (
            _agent(lab, broker, burst=1000) as agent,
            await Session.open(_client(lab, broker, "operator")) as operator,
        ):
            await operator.publish(f"{BASE}/cmd/health", b"{}" + b" " * (c.MAX_PACKET_SIZE * 2))
            await operator.publish(f"{BASE}/cmd/health", b"{}" + b" " * c.MAX_COMMAND_BYTES)
            await _health_works(agent, operator)
            return agent

    agent = asyncio.run(scenario())
    assert agent.commands.counters.rejected == {c.TOO_LARGE: 1}
    assert agent.uplink.counters.connects == 1


@pytest.mark.integration
@pytest.mark.parametrize("burst", [c.BURST, 100_000], ids=["rate-limited", "all-parsed"])
def test_a_flood_of_hostile_payloads_is_rejected_or_dropped_and_the_agent_still_obeys_after(
    operator_lab: LabFiles,
    operator_broker: LabBroker,
    caplog: pytest.LogCaptureFixture,
    burst: int,
) -> None:
    lab, broker = operator_lab, operator_broker
    rand = random.Random(burst)
    flood = [_hostile(rand) for _ in range(1000)]

    async def scenario() -> Agent:
        async with (
            _agent(lab, broker, burst=burst) as agent,
            await Session.open(_client(lab, broker, "operator")) as operator,
        ):
            await asyncio.gather(
                *(operator.publish(f"{BASE}/{topic}", payload) for topic, payload in flood)
            )
            await _until(lambda: _handled(agent.commands) == len(flood), "the whole flood")
            assert len(_rejection_lines(caplog)) == 1  # the clock stood still
            agent.clock.now += 1.0  # the bucket has a token again
            await _health_works(agent, operator)
            return agent

    with caplog.at_level(logging.WARNING, logger="agent.commands"):
        agent = asyncio.run(scenario())
    counters = agent.commands.counters
    assert (agent.seen.health, agent.seen.offers, counters.accepted) == (1, [], 1)
    assert sum(counters.rejected.values()) + counters.dropped == len(flood)
    if burst == c.BURST:
        assert counters.rejected[c.RATE_LIMITED] >= len(flood) - counters.dropped - c.BURST
    else:
        assert c.RATE_LIMITED not in counters.rejected
        assert len(counters.rejected) >= 6  # every kind of payload was parsed and refused
    assert agent.uplink.counters.connects == 1


@pytest.mark.integration
def test_commands_are_served_again_on_the_next_session_after_the_broker_restarts(
    operator_lab: LabFiles, operator_broker: LabBroker
) -> None:
    lab, broker = operator_lab, operator_broker

    async def scenario() -> Agent:
        async with _agent(lab, broker) as agent:
            async with await Session.open(_client(lab, broker, "operator")) as operator:
                await _health_works(agent, operator)
            await asyncio.to_thread(broker.restart)
            await _until(
                lambda: agent.uplink.counters.connects == 2 and agent.commands.subscribed.is_set(),
                "the agent to reconnect and subscribe again",
            )
            async with await Session.open(_client(lab, broker, "operator")) as operator:
                await _health_works(agent, operator)
            return agent

    agent = asyncio.run(scenario())
    assert agent.seen.health == 2
