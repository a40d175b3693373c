"""The uplink: keeps an MQTT session up and sends the outbox through it.

`Uplink.run` opens sessions forever, waiting a jittered exponential backoff
between failed attempts (never a tight loop), and announces each live session
with a retained `status` message (the Will says "offline" if we vanish).

`OutboxSender.run` publishes outbox rows with a bounded window of
unacknowledged messages, and deletes a row only when its PUBACK arrived with a
success reason. When the session drops, every unacknowledged row is sent
again, byte-identical, on the next session. A row the broker refuses (e.g. 135
Not authorized) is reported and kept; it is tried again on the next session,
never in a loop.

Fresh first (DESIGN.md §2). At the start of each session the sender notes the
highest seq in the outbox, the watermark. Rows above it are fresh: they go out
at once, in seq order, and always before the backlog. Rows up to the watermark
(the backlog: whatever waited through the outage, or was in flight when the
last session dropped) go out in seq order, at no more than `backlog_rate`
messages per second on average (a token bucket on the event loop's clock, with
a burst of a tenth of a second's worth, at most the window). So after an outage
new readings arrive within seconds while the backlog drains in order without
flooding the link or the broker.

Acknowledged rows are deleted in groups (flash wear): when a group is full, when
its oldest acknowledgement is `ACK_MAX_AGE_S` old (so a power cut in a long
backlog re-sends little and the backlog still shrinks on a gateway that restarts
often), and whenever the sender idles. A group the spool cannot
delete (disk full) is kept and tried again `ACK_RETRY_S` later; a reconnect in
the meantime sends those rows once more, which is harmless. The sender never
dies of a spool that cannot write.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from agent.backoff import Backoff
from agent.mqtt import (
    ConnectFailed,
    PublishRefused,
    Session,
    SessionLost,
    SessionSettings,
    Will,
)
from agent.spool import OutboxRow, Spool, SpoolError

log = logging.getLogger(__name__)

#: acknowledged rows are deleted in groups of at most this many (and whenever the sender idles)
ACK_GROUP = 64
#: backlog messages per second when the caller does not say (config: backlog_messages_per_s)
BACKLOG_RATE = 50.0
#: the backlog may go out in bursts of this many seconds' worth (at most the window)
BACKLOG_BURST_S = 0.1
#: a group of acknowledgements the spool could not delete is tried again after this long
ACK_RETRY_S = 1.0
#: ... and a group is deleted once its oldest PUBACK is this old, even if not full: a power
#: cut then re-sends at most this long's worth of acknowledged messages
ACK_MAX_AGE_S = 1.0


@dataclass(slots=True)
class UplinkCounters:
    connects: int = 0
    connect_failures: int = 0
    published: int = 0
    refused: int = 0
    last_error: str = ""


def status_payload(state: str, *, gateway_id: str, version: str, boot_time: float) -> bytes:
    body = {"state": state, "gateway": gateway_id, "version": version, "boot_time": int(boot_time)}
    return json.dumps(body, separators=(",", ":")).encode()


class TokenBucket:
    """At most `rate` tokens per second on average and `burst` at once.

    Pure: the caller passes the clock's value (the event loop's time) and sleeps.
    """

    def __init__(self, rate: float, burst: int) -> None:
        if not (math.isfinite(rate) and rate > 0 and burst >= 1):
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self._rate = rate
        self._burst = float(burst)
        self._tokens = 0.0
        self._last = 0.0
        self.refill(0.0)

    def refill(self, now: float) -> None:
        """Start again with a full bucket (a new session)."""
        self._tokens = self._burst
        self._last = now

    def take(self, now: float) -> float:
        """Take a token and return 0.0, or return the seconds until one is due (taking none)."""
        self._tokens = min(self._burst, self._tokens + max(0.0, now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0 - 1e-9:  # rounding: waking exactly when told gives a token
            self._tokens = max(0.0, self._tokens - 1.0)
            return 0.0
        return (1.0 - self._tokens) / self._rate


class Uplink:
    """Owns the connection: one live `Session` at a time, reopened with backoff."""

    def __init__(
        self,
        settings: SessionSettings,
        backoff: Backoff,
        *,
        status_topic: str,
        online: bytes,
        offline: bytes,
        rand: random.Random | None = None,
        open_session: Callable[[SessionSettings], Awaitable[Session]] = Session.open,
    ) -> None:
        self._settings = replace(settings, will=Will(status_topic, offline, retain=True))
        self._backoff = backoff
        self._status_topic = status_topic
        self._online = online
        self._offline = offline
        self._rand = rand or random.Random()
        self._open = open_session
        self._session: Session | None = None
        self._changed = asyncio.Event()
        self.counters = UplinkCounters()

    @property
    def connected(self) -> bool:
        return self._session is not None and not self._session.lost.done()

    async def session(self) -> Session:
        """Wait for a live session."""
        while True:
            current = self._session
            if current is not None and not current.lost.done():
                return current
            self._changed.clear()
            await self._changed.wait()

    async def run(self) -> None:
        attempt = 0
        s = self._settings
        try:
            while True:
                session: Session | None = None
                try:
                    session = await self._open(self._settings)
                    if s.tls is None:
                        log.error("INSECURE: this MQTT session is plaintext (development only)")
                    await session.publish(self._status_topic, self._online, retain=True)
                except (ConnectFailed, SessionLost, PublishRefused) as exc:
                    if session is not None:  # connected, but the status did not go through
                        await session.close()
                    self.counters.connect_failures += 1
                    self.counters.last_error = str(exc)
                    delay = self._backoff.delay(attempt, self._rand)
                    attempt += 1
                    log.warning("broker %s:%d: %s; retrying in %.1f s", s.host, s.port, exc, delay)
                    await asyncio.sleep(delay)
                    continue
                attempt = 0
                self.counters.connects += 1
                log.info("connected to %s:%d as %s", s.host, s.port, s.client_id)
                self._set(session)
                reason = await session.lost
                self._set(None)
                await session.close()
                self.counters.last_error = f"connection lost: {reason}"
                log.warning("connection to %s:%d lost: %s", s.host, s.port, reason)
        finally:
            current, self._session = self._session, None
            if current is not None:
                await asyncio.shield(current.close())

    async def say_goodbye(self) -> None:
        """Publish the retained offline status and disconnect cleanly (a clean stop)."""
        current = self._session
        if current is None or current.lost.done():
            return
        try:
            async with asyncio.timeout(2.0):
                await current.publish(self._status_topic, self._offline, retain=True)
        except (TimeoutError, SessionLost, PublishRefused) as exc:
            log.warning("could not publish offline status: %s", exc)
        self._set(None)
        await current.close()

    def _set(self, session: Session | None) -> None:
        self._session = session
        self._changed.set()


class OutboxSender:
    """Publishes outbox rows, fresh ones first, and acknowledges them in the spool."""

    def __init__(
        self, spool: Spool, uplink: Uplink, *, window: int, backlog_rate: float = BACKLOG_RATE
    ) -> None:
        self._spool = spool
        self._uplink = uplink
        self._window = window
        burst = max(1, min(window, math.ceil(backlog_rate * BACKLOG_BURST_S)))
        self._bucket = TokenBucket(backlog_rate, burst)  # raises on a bad rate, here and now
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._refused: set[int] = set()
        self._acked: set[int] = set()  # PUBACKed, delete not yet committed
        self._acked_since = 0.0  # loop time of the oldest PUBACK in `_acked`
        self._ack_retry_at = 0.0  # loop time before which a failed delete is not tried again
        self._in_flight = 0

    def wake(self) -> None:
        """Tell the sender the outbox has new rows."""
        self._wake.set()

    async def drained(self) -> None:
        """Wait until the broker acknowledged everything but the refused messages."""
        while self._spool.pending_messages > len(self._refused) + len(self._acked):
            self._idle.clear()
            self.wake()
            await self._idle.wait()

    async def run(self) -> None:
        try:
            while True:
                session = await self._uplink.session()
                try:
                    await self._drain(session)
                except* SessionLost:
                    pass  # wait for the next session and send everything unacknowledged again
                self._flush_acks()
        finally:
            self._flush_acks(retry_now=True)

    def _flush_acks(self, *, retry_now: bool = False) -> None:
        """Delete acknowledged rows, many per transaction (flash wear, not safety).

        If the spool cannot write, the seqs are kept and tried again after
        ACK_RETRY_S: the rows are safe, and at worst sent once more.
        """
        if not self._acked:
            return
        now = asyncio.get_running_loop().time()
        if now < self._ack_retry_at and not retry_now:
            return
        acked = sorted(self._acked)
        try:
            self._spool.ack(acked)
        except SpoolError as exc:
            if not self._ack_retry_at:
                log.error("cannot delete %d acknowledged message(s), kept: %s", len(acked), exc)
            self._ack_retry_at = now + ACK_RETRY_S
            return
        if self._ack_retry_at:
            log.info("acknowledged messages are deleted again")
            self._ack_retry_at = 0.0
        self._acked.difference_update(acked)

    async def _drain(self, session: Session) -> None:
        """Send until the session is lost: fresh rows at once, the backlog at a bounded rate."""
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self._window)
        watermark = self._spool.outbox_last_seq()
        fresh_after = watermark  # rows above the watermark: fresh
        backlog_after = -1  # rows up to the watermark: the backlog, not yet sent if > this
        self._bucket.refill(loop.time())
        self._refused.clear()
        async with asyncio.TaskGroup() as group:

            def send(row: OutboxRow) -> None:  # a slot is held
                self._in_flight += 1
                group.create_task(self._send(session, row, slots), name=f"publish-{row.seq}")

            while True:
                self._wake.clear()
                fresh = self._spool.outbox(after_seq=fresh_after, limit=self._window)
                for row in fresh:
                    await slots.acquire()
                    send(row)
                    fresh_after = row.seq
                if fresh:
                    continue
                wait: float | None = None
                if backlog_after < watermark and not slots.locked():
                    backlog = self._spool.outbox(
                        after_seq=backlog_after, limit=1, max_seq=watermark
                    )
                    if not backlog:
                        backlog_after = watermark
                        continue
                    row = backlog[0]
                    wait = self._bucket.take(loop.time())
                    if wait == 0.0:
                        await slots.acquire()  # free: checked above
                        send(row)
                        backlog_after = row.seq
                        continue
                if backlog_after >= watermark:  # nothing left to send in this session
                    self._flush_acks()
                    if self._in_flight == 0:
                        self._idle.set()
                    if self._acked:  # a delete failed: try again in a while
                        wait = max(0.0, self._ack_retry_at - loop.time())
                await _first(self._wake.wait(), session.lost, at_most_s=wait)
                if session.lost.done():
                    raise SessionLost(str(session.lost.result()))

    async def _send(self, session: Session, row: OutboxRow, slots: asyncio.Semaphore) -> None:
        try:
            await session.publish(row.topic, row.payload, qos=1)
        except PublishRefused as exc:
            self._uplink.counters.refused += 1
            self._uplink.counters.last_error = str(exc)
            if row.seq not in self._refused:
                self._refused.add(row.seq)
                log.error("message seq %d kept for retry: %s", row.seq, exc)
        else:
            now = asyncio.get_running_loop().time()
            if not self._acked:
                self._acked_since = now
            self._acked.add(row.seq)
            if len(self._acked) >= ACK_GROUP or now - self._acked_since >= ACK_MAX_AGE_S:
                self._flush_acks()
            self._uplink.counters.published += 1
        finally:
            self._in_flight -= 1
            slots.release()
            self._wake.set()


async def _first(
    aw: Awaitable[object], lost: asyncio.Future[str], *, at_most_s: float | None = None
) -> None:
    """Wait for `aw`, the session's loss or `at_most_s` seconds, whichever comes first."""
    task: asyncio.Future[Any] = asyncio.ensure_future(aw)
    waiters: set[asyncio.Future[Any]] = {task, lost}
    try:
        await asyncio.wait(waiters, timeout=at_most_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
