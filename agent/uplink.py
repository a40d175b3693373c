"""The uplink: keeps an MQTT session up and sends the outbox through it.

`Uplink.run` opens sessions forever, waiting a jittered exponential backoff
between failed attempts (never a tight loop), and announces each live session
with a retained `status` message (the Will says "offline" if we vanish).
`OutboxSender.run` publishes outbox rows in seq order with a bounded window
of unacknowledged messages, and deletes a row only when its PUBACK arrived
with a success reason. When the session drops, every unacknowledged row is
sent again, byte-identical, on the next session. A row the broker refuses
(e.g. 135 Not authorized) is reported and kept; it is tried again on the next
session, never in a loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
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
from agent.spool import OutboxRow, Spool

log = logging.getLogger(__name__)

#: acknowledged rows are deleted in groups of at most this many (and whenever the sender idles)
ACK_GROUP = 64


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
                try:
                    session = await self._open(self._settings)
                    await session.publish(self._status_topic, self._online, retain=True)
                except (ConnectFailed, SessionLost, PublishRefused) as exc:
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
                if s.tls is None:
                    log.error("INSECURE: this MQTT session is plaintext (development only)")
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
    """Publishes outbox rows in seq order and acknowledges them in the spool."""

    def __init__(self, spool: Spool, uplink: Uplink, *, window: int) -> None:
        self._spool = spool
        self._uplink = uplink
        self._window = window
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._refused: set[int] = set()
        self._acked: list[int] = []  # PUBACKed, delete not yet committed
        self._in_flight = 0

    def wake(self) -> None:
        """Tell the sender the outbox has new rows."""
        self._wake.set()

    async def drained(self) -> None:
        """Wait until everything but the refused messages is acknowledged."""
        while self._spool.pending_messages > len(self._refused):
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
            self._flush_acks()

    def _flush_acks(self) -> None:
        """Delete acknowledged rows, many per transaction (flash wear, not safety)."""
        acked, self._acked = self._acked, []
        self._spool.ack(acked)

    async def _drain(self, session: Session) -> None:
        slots = asyncio.Semaphore(self._window)
        after = -1
        self._refused.clear()
        async with asyncio.TaskGroup() as group:
            while True:
                self._wake.clear()
                rows = self._spool.outbox(after_seq=after, limit=self._window)
                for row in rows:
                    await slots.acquire()
                    self._in_flight += 1
                    group.create_task(self._send(session, row, slots), name=f"publish-{row.seq}")
                    after = row.seq
                if rows:
                    continue
                self._flush_acks()
                if self._in_flight == 0:
                    self._idle.set()
                await _first(self._wake.wait(), session.lost)
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
            self._acked.append(row.seq)
            if len(self._acked) >= ACK_GROUP:
                self._flush_acks()
            self._uplink.counters.published += 1
        finally:
            self._in_flight -= 1
            slots.release()
            self._wake.set()


async def _first(aw: Awaitable[object], lost: asyncio.Future[str]) -> None:
    task: asyncio.Future[Any] = asyncio.ensure_future(aw)
    waiters: set[asyncio.Future[Any]] = {task, lost}
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
