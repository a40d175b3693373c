"""One session, several consumers: inboxes, their bounds, and the Maximum Packet Size.

Against the real mosquitto of conftest (mutual TLS, the citygate ACL). The
gateway gw-a publishes to its own command topics itself: the ACL lets it
write its whole subtree, and an MQTT 5 subscriber receives its own messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from agent.commands import Commands
from agent.identity import load_identity
from agent.mqtt import Inbox, Message, Session, SessionLost, SessionSettings
from agent.rotation import EnrollReply, EnrollRequest, exchange, new_request_id
from agent.tls import client_context
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles

pytestmark = pytest.mark.integration

BASE = "citygate/gw-a"


def _gateway(
    lab: LabFiles, broker: LabBroker, max_packet_size: int | None = None
) -> SessionSettings:
    cert, key = lab.clients["gw-a"]
    return SessionSettings(
        host="localhost",
        port=broker.port,
        client_id="gw-a",
        tls=client_context(load_identity(key, cert, lab.ca_cert)),
        connect_timeout_s=3.0,
        max_packet_size=max_packet_size,
    )


async def _until(predicate: Callable[[], bool], what: str, limit_s: float = 10.0) -> None:
    try:
        async with asyncio.timeout(limit_s):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def _collect(inbox: Inbox, into: list[Message]) -> None:
    async for message in inbox:
        into.append(message)  # noqa: PERF401 - read live by the test


def test_each_inbox_gets_only_its_topics_and_a_message_no_inbox_wants_is_counted_and_dropped(
    lab: LabFiles, broker: LabBroker
) -> None:
    commands: list[Message] = []
    replies: list[Message] = []

    async def scenario() -> Session:
        async with await Session.open(_gateway(lab, broker)) as session:
            with (
                session.inbox(f"{BASE}/cmd/#", maxsize=8) as cmd_inbox,
                session.inbox(f"{BASE}/enroll/reply", maxsize=8) as reply_inbox,
            ):
                with pytest.raises(RuntimeError, match="inbox"):
                    session.messages()
                for topic_filter in (f"{BASE}/cmd/#", f"{BASE}/enroll/reply", f"{BASE}/ota/offer"):
                    await session.subscribe(topic_filter)
                readers = [
                    asyncio.create_task(_collect(cmd_inbox, commands)),
                    asyncio.create_task(_collect(reply_inbox, replies)),
                ]
                for topic in ("cmd/health", "enroll/reply", "ota/offer", "cmd/other"):
                    await session.publish(f"{BASE}/{topic}", topic.encode())
                await _until(
                    lambda: len(commands) == 2 and len(replies) == 1 and session.unmatched == 1,
                    "two commands, one reply and one unmatched message",
                )
                for reader in readers:
                    reader.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
        return session

    session = asyncio.run(scenario())
    assert [m.topic for m in commands] == [f"{BASE}/cmd/health", f"{BASE}/cmd/other"]
    assert [m.payload for m in replies] == [b"enroll/reply"]
    assert session.unmatched == 1


def test_a_consumer_that_does_not_read_holds_only_its_inbox_size_and_the_rest_is_dropped(
    lab: LabFiles, broker: LabBroker
) -> None:
    """Memory stays bounded whatever arrives: the inbox keeps the first `maxsize` messages,
    counts the rest as dropped, and takes messages again once it has room."""
    flood, room = 300, 10

    async def scenario() -> None:
        async with await Session.open(_gateway(lab, broker)) as session:
            with session.inbox(f"{BASE}/cmd/#", maxsize=room) as inbox:
                await session.subscribe(f"{BASE}/cmd/#")
                await asyncio.gather(
                    *(session.publish(f"{BASE}/cmd/x", str(i).encode()) for i in range(flood))
                )
                await _until(lambda: inbox.dropped == flood - room, "the overflow to be dropped")
                kept = [(await inbox.get()).payload for _ in range(room)]
                assert kept == [str(i).encode() for i in range(room)]
                with pytest.raises(TimeoutError):  # nothing else was held back
                    async with asyncio.timeout(0.2):
                        await inbox.get()
                await session.publish(f"{BASE}/cmd/x", b"after")
                async with asyncio.timeout(10):
                    assert (await inbox.get()).payload == b"after"
                assert not session.lost.done()
                assert inbox.dropped == flood - room

    asyncio.run(scenario())


def test_the_broker_never_sends_a_message_bigger_than_the_maximum_packet_size(
    lab: LabFiles, broker: LabBroker
) -> None:
    """The CONNECT property makes mosquitto drop the big message for us; the session stays up."""
    limit = 64 * 1024
    sizes = [100 * 1024, 1024, 2 * 1024 * 1024, limit - 1024]

    async def scenario() -> list[int]:
        async with await Session.open(_gateway(lab, broker, max_packet_size=limit)) as session:
            with session.inbox(f"{BASE}/cmd/#", maxsize=8) as inbox:
                await session.subscribe(f"{BASE}/cmd/#")
                for size in sizes:
                    await session.publish(f"{BASE}/cmd/big", bytes(size))
                await session.publish(f"{BASE}/cmd/end", b"")
                received: list[int] = []
                async with asyncio.timeout(10):
                    async for message in inbox:
                        if message.topic.endswith("/end"):
                            break
                        received.append(len(message.payload))
                assert not session.lost.done()
                return received

    assert asyncio.run(scenario()) == [1024, limit - 1024]


def test_an_inbox_hands_out_what_it_holds_and_then_ends_when_the_session_is_lost(
    lab: LabFiles, broker: LabBroker
) -> None:
    async def scenario() -> None:
        session = await Session.open(_gateway(lab, broker))
        with session.inbox(f"{BASE}/cmd/#", maxsize=8) as inbox:
            await session.subscribe(f"{BASE}/cmd/#")
            await session.publish(f"{BASE}/cmd/x", b"last")
            await _until(lambda: inbox.pending == 1, "the message to be queued")
            await session.close()
            assert (await inbox.get()).payload == b"last"
            with pytest.raises(SessionLost):
                await inbox.get()
            assert [m async for m in inbox] == []

    asyncio.run(scenario())


def test_a_renewal_and_the_commands_share_the_agents_session_without_taking_each_others_messages(
    lab: LabFiles, broker: LabBroker
) -> None:
    """The renewal's reply and a command arrive together on one session: each consumer gets
    its own (gw-a answers its own request here, which its ACL allows)."""

    async def scenario() -> tuple[EnrollReply, tuple[int, dict[str, int]]]:
        async with await Session.open(_gateway(lab, broker)) as session:
            health: list[None] = []

            async def this_session() -> Session:
                return session

            commands = Commands(
                "gw-a",
                prefix="citygate",
                sessions=this_session,
                on_health_request=lambda: health.append(None),
                on_ota_offer=lambda version: None,
            )
            serving = asyncio.create_task(commands.serve(session))
            async with asyncio.timeout(10):
                await commands.subscribed.wait()
            request = EnrollRequest("gw-a", new_request_id(), "csr", token="t")
            answer = EnrollReply(request.request_id, error="refused", message="a test")

            async def answer_it() -> None:
                await session.publish(f"{BASE}/cmd/health", b"{}")
                stray = EnrollReply(new_request_id(), error="refused").encode()
                await session.publish(f"{BASE}/enroll/reply", stray)
                await session.publish(f"{BASE}/enroll/reply", answer.encode())

            answering: list[asyncio.Task[None]] = []
            reply = await exchange(
                session,
                "citygate",
                request,
                10.0,
                on_sent=lambda: answering.append(asyncio.create_task(answer_it())),
            )
            await asyncio.gather(*answering)
            await _until(lambda: len(health) == 1, "the health request")
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            counters = commands.counters
            return reply, (counters.accepted, counters.rejected)

    reply, (accepted, rejected) = asyncio.run(scenario())
    assert reply.message == "a test"
    assert (accepted, rejected) == (1, {})  # no reply reached the commands
