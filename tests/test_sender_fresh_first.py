"""Fresh first: after an outage new messages overtake the backlog, which drains in order.

The rate is checked by counting, never by the clock: the token bucket on
simulated clock values, and the sender against a real mosquitto by where the
fresh message lands in the order the broker delivers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.backoff import Backoff
from agent.identity import Identity, load_identity
from agent.mqtt import Session, SessionSettings
from agent.spool import Spool
from agent.tls import client_context, verifier_context
from agent.uplink import OutboxSender, TokenBucket, Uplink
from drivers.base import Reading
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles

TOPIC = "citygate/gw-a/telemetry"
BACKLOG = 4
#: one backlog message per 0.2 s, burst of 1: the test has 0.2 s to pack its fresh message
RATE = 5.0


def test_token_bucket_gives_a_burst_then_the_rate_and_saves_no_more_than_the_burst() -> None:
    bucket = TokenBucket(10.0, 3)
    bucket.refill(100.0)
    now, given = 100.0, 0
    for _ in range(100):  # one simulated second, waking exactly when told to
        wait = bucket.take(now)
        if wait == 0.0:
            given += 1
        elif now + wait > 101.0:
            break
        else:
            now += wait
    assert given == 3 + 10
    assert [bucket.take(1000.0) for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # a long pause: 3
    assert bucket.take(1000.0) > 0.0


def test_token_bucket_refuses_a_rate_that_is_no_rate() -> None:
    for rate in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="rate"):
            TokenBucket(rate, 1)


def _build(readings: Sequence[Reading], seq: int) -> tuple[str, bytes]:
    return TOPIC, str(seq).encode()


def _pack(spool: Spool, n: int) -> list[int]:
    """`n` messages of one reading each; their seqs."""
    seqs = []
    for _ in range(n):
        spool.add([Reading("air_1", "pm2_5", 1.0, "ug/m3", 1_760_000_000.0)])
        spool.commit()
        row = spool.pack(1, _build)
        assert row is not None
        seqs.append(row.seq)
    return seqs


@pytest.mark.integration
def test_fresh_message_overtakes_the_backlog_after_start_and_after_a_reconnect(
    lab: LabFiles, broker: LabBroker, tmp_path: Path
) -> None:
    cert, key = lab.clients["gw-a"]
    gw: Identity = load_identity(key, cert, lab.ca_cert)
    settings = SessionSettings(
        host="localhost",
        port=broker.port,
        client_id="gw-a",
        tls=client_context(gw),
        connect_timeout_s=3.0,
    )
    spool = Spool(tmp_path / "spool.sqlite", tmp_path / "seq", budget_bytes=1 << 24)
    outage = _pack(spool, BACKLOG)  # waited through an outage before the agent started
    gate = asyncio.Event()  # closed: the gateway cannot connect

    async def open_session(s: SessionSettings) -> Session:
        await gate.wait()
        return await Session.open(s)

    uplink = Uplink(
        settings,
        Backoff(0.1, 0.5),
        status_topic="citygate/gw-a/status",
        online=b"online",
        offline=b"offline",
        open_session=open_session,
    )
    sender = OutboxSender(spool, uplink, window=BACKLOG, backlog_rate=RATE)
    vcert, vkey = lab.clients["verifier"]
    verifier = SessionSettings(
        host="localhost",
        port=broker.port,
        client_id="",
        tls=verifier_context(vcert, vkey, lab.ca_cert),
        connect_timeout_s=3.0,
    )

    async def after_first_backlog_message(published_before: int) -> int:
        """Wait until the session's first backlog message is acknowledged; pack a fresh one."""
        async with asyncio.timeout(10):
            while uplink.counters.published <= published_before:
                await asyncio.sleep(0.005)
        (fresh,) = _pack(spool, 1)
        sender.wake()
        return fresh

    async def scenario() -> tuple[list[int], list[int], int, list[int], int]:
        async with await Session.open(verifier) as sub, asyncio.TaskGroup() as group:
            await sub.subscribe(TOPIC)
            tasks = [group.create_task(uplink.run()), group.create_task(sender.run())]
            gate.set()
            fresh_1 = await after_first_backlog_message(0)
            async with asyncio.timeout(10):
                await sender.drained()
            # a reconnect: another client takes over the gateway's client id, and the
            # gateway cannot come back until the gate opens; meanwhile a backlog builds up
            gate.clear()
            async with await Session.open(settings) as intruder:
                async with asyncio.timeout(10):
                    while uplink.connected:
                        await asyncio.sleep(0.005)
                during = _pack(spool, BACKLOG)
                gate.set()
                fresh_2 = await after_first_backlog_message(uplink.counters.published)
                async with asyncio.timeout(10):
                    await sender.drained()
                    await intruder.lost  # the gateway took its client id back
            got: list[int] = []
            messages = sub.messages()
            async with asyncio.timeout(10):
                while len(got) < 2 * (BACKLOG + 1):
                    got.append(int((await anext(messages)).payload))
            for task in tasks:
                task.cancel()
        return got, outage, fresh_1, during, fresh_2

    got, outage, fresh_1, during, fresh_2 = asyncio.run(scenario())
    spool.close()
    first, second = got[: BACKLOG + 1], got[BACKLOG + 1 :]
    for order, backlog, fresh in ((first, outage, fresh_1), (second, during, fresh_2)):
        assert [seq for seq in order if seq != fresh] == backlog  # the backlog in seq order
        # the fresh message went out right after the first backlog one: the rest of the
        # backlog was still waiting for its rate (one position of slack for a slow machine)
        assert order.index(fresh) <= 2, order
