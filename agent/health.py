"""Signed health reports and events (DESIGN.md §4, topics `health` and `events`).

Status travels in the telemetry envelope: a SenML CBOR pack with one record
group per subject (a sensor id, or "agent" for the gateway itself), sealed as
a COSE_Sign1 for its topic, so `citygate verify` and every consumer that
verifies telemetry verifies health and events too. Text and yes/no values use
SenML's `vs` and `vb`.

- `encode_status` and `report_groups` are pure functions of values.
- `Health` is the orchestrator. It publishes a report on each new session,
  then every `interval_s` and on `request()`; it queues events in a bounded
  queue (when full, the oldest goes and is counted) and publishes them in
  order, one at a time, removing each only after its PUBACK. An event is
  signed once, at its first attempt, and re-sent byte-identical after a lost
  session, so consumers drop duplicates by (gateway, seq) as for telemetry.
  An event that happens while the wall clock cannot be believed (a gateway
  booted at 1970) is timed by boot time and dated, then sent, once it can
  (agent.clock.Moment): never sent with a 1970 time.
  It also watches the drivers and turns availability changes into
  `sensor_fault` / `sensor_recovered` events.

Trusts: its arguments and the sources it polls (the agent's own parts). A
source that fails costs one report, logged, never the service.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from agent.clock import Moment, WallClock
from agent.envelope import EncodingError, Signer, StatusRecord, check_name, encode_status, seal
from agent.mqtt import PublishRefused, SessionLost
from agent.spool import SpoolStats
from drivers.base import Driver

log = logging.getLogger(__name__)

#: the subject of everything about the gateway itself (sensor subjects are sensor ids)
AGENT: Final = "agent"
#: how often driver states are polled for availability changes
POLL_S: Final = 1.0
#: a driver that has never been available is reported faulty after this long
STARTUP_GRACE_S: Final = 30.0

#: subject -> its records, in the order they are to be sent
Groups = Mapping[str, Sequence[StatusRecord]]

_COUNT: Final = "count"  # SenML unit of a counter value (RFC 8428 §12.1)
_BYTES: Final = "B"  # SenML unit byte (RFC 8798)
_RECOVERY_WORDS: Final = frozenset({"ok", "recovered", "synced"})


def report_groups(
    *,
    spool: SpoolStats,
    drivers: Sequence[Driver],
    cert_not_after: float,
    clock_synced: bool,
    connects: int,
    update_state: str = "idle",
    now: float,
) -> dict[str, list[StatusRecord]]:
    """A health report: the "agent" group, then one group per driver (subject = sensor id).

    `cert_not_after` is the certificate's end as unix seconds; `connects`
    counts sessions since start. A driver group says whether the sensor is
    available, why (or why not), and the driver's counters.
    """
    groups: dict[str, list[StatusRecord]] = {
        AGENT: [
            ("spool_readings", _COUNT, spool.readings + spool.buffered),
            ("spool_unsynced", _COUNT, spool.unsynced),
            ("spool_messages", _COUNT, spool.messages),
            ("spool_bytes", _BYTES, spool.bytes_used),
            ("dropped_readings", _COUNT, spool.dropped_readings),
            ("dropped_memory", _COUNT, spool.memory_dropped),
            ("disk_full", "", spool.disk_full),
            ("clock_synced", "", clock_synced),
            ("cert_expires_in", "s", math.floor(cert_not_after - now)),
            ("connects", _COUNT, connects),
            ("update", "", update_state),
        ]
    }
    for driver in drivers:
        state = driver.state()
        groups[driver.sensor_id] = [
            ("available", "", state.available),
            ("reason", "", state.reason),
            *((name, _COUNT, count) for name, count in sorted(state.counters.items())),
        ]
    return groups


def is_recovery(kind: str) -> bool:
    """Whether an event kind reports a return to normal (`disk_ok`, `sensor_recovered`,
    `clock_synced`) rather than an alarm (`clock_unsynced` is an alarm)."""
    return kind.rsplit("_", 1)[-1] in _RECOVERY_WORDS


# --- orchestration ----------------------------------------------------------


class Link(Protocol):
    """What health needs of a live MQTT session (agent.mqtt.Session is the real one)."""

    lost: asyncio.Future[str]  # completes when the connection is gone

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Return on a successful PUBACK; raise PublishRefused or SessionLost otherwise."""


@dataclass(slots=True)
class _Event:
    kind: str
    subject: str
    records: list[StatusRecord]
    when: Moment  # when it happened; dated (if it was by boot time) when first sealed
    message: bytes | None = None  # sealed at the first attempt, then re-sent as is
    on_sent: Callable[[], None] | None = None  # called once the broker has acknowledged it


@dataclass(slots=True)
class _Watched:
    driver: Driver
    since: float | None = None  # loop time of the first poll
    seen_up: bool = False  # has been available since the watch began
    faulted: bool = False  # a sensor_fault was raised and not yet recovered


class Health:
    """Publishes signed health reports and events over the uplink's sessions.

    `event`, `request` and `watch_drivers` are for the event loop's thread
    (like the rest of the agent); `run` does all the I/O.
    """

    def __init__(
        self,
        *,
        gateway_id: str,
        signer: Signer,
        health_topic: str,
        events_topic: str,
        interval_s: float,
        events_max: int,
        take_seq: Callable[[], int],
        sources: Callable[[], Groups],
        clock: Callable[[], float] = time.time,
        wall: WallClock | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        self._gateway_id = gateway_id
        self._signer = signer
        self._health_topic = health_topic
        self._events_topic = events_topic
        self._interval_s = interval_s
        self._events_max = max(1, events_max)
        self._take_seq = take_seq
        self._sources = sources
        self._clock = clock
        self._wall = wall
        self._poll_s = poll_s
        self._queue: deque[_Event] = deque()
        self._wake = asyncio.Event()
        self._report_wanted = False
        self._next_report = 0.0  # loop time
        self._watched: list[_Watched] = []
        self._grace_s = STARTUP_GRACE_S
        self.reports_published = 0
        # set when the broker has acknowledged a signed health report (agent.ota's trial)
        self.report_acked = asyncio.Event()
        self.events_published = 0
        self.events_dropped = 0

    @property
    def events_queued(self) -> int:
        """Events waiting for a session (not counting one in flight)."""
        return len(self._queue)

    def event(
        self,
        kind: str,
        /,
        subject: str,
        *,
        on_sent: Callable[[], None] | None = None,
        **detail: float | str | bool,
    ) -> None:
        """Queue a signed event about `subject` ("agent" or a sensor id); never blocks or raises.

        `on_sent` is called when the broker has acknowledged the event (never, if the
        event is dropped or the process ends first): for events that must survive a
        restart, such as the update history (agent.ota.task).

        The level of its log line follows from `kind` (see `is_recovery`).
        An event that cannot be encoded is logged as an error and dropped.
        With a `wall` clock, an event that happens while it is not trusted is
        timed by boot time, and dated (and sent) once it is.
        """
        when = self._wall.moment() if self._wall is not None else Moment(self._clock(), True)
        records: list[StatusRecord] = [
            ("event", "", kind),
            *((n, "", v) for n, v in detail.items()),
        ]
        try:
            check_name("event kind", kind)
            encode_status(self._gateway_id, {subject: records}, when.t)  # refused now, not later
        except EncodingError as exc:
            log.error("event %r for %r cannot be sent: %s", kind, subject, exc)
            return
        shown = "".join(f" {name}={value!r}" for name, value in detail.items())
        log.log(
            logging.INFO if is_recovery(kind) else logging.WARNING, "%s: %s%s", subject, kind, shown
        )
        if len(self._queue) >= self._events_max:
            self._queue.popleft()
            self.events_dropped += 1
        self._queue.append(_Event(kind, subject, records, when, on_sent=on_sent))
        self._wake.set()

    def request(self) -> None:
        """Publish a report as soon as a session allows (e.g. for a `cmd/health` command)."""
        self._report_wanted = True
        self._wake.set()

    def watch_drivers(self, drivers: Sequence[Driver], *, grace_s: float = STARTUP_GRACE_S) -> None:
        """Raise `sensor_fault` when a driver becomes unavailable (or never becomes available
        within `grace_s` of the first poll) and `sensor_recovered` when it is back."""
        self._watched = [_Watched(driver) for driver in drivers]
        self._grace_s = grace_s

    async def run(self, session: Callable[[], Awaitable[Link]]) -> None:
        """Forever: watch the drivers and publish over each live session `session()` gives."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._watch(), name="health-watch")
            group.create_task(self._publish(session), name="health-publish")

    # -- drivers ------------------------------------------------------------

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for watched in self._watched:
                self._check(watched, loop.time())
            await asyncio.sleep(self._poll_s)

    def _check(self, watched: _Watched, now: float) -> None:
        state = watched.driver.state()
        sensor = watched.driver.sensor_id
        if watched.since is None:
            watched.since = now
        if state.available:
            watched.seen_up = True
            if watched.faulted:
                watched.faulted = False
                self.event("sensor_recovered", sensor)
        elif not watched.faulted and (watched.seen_up or now - watched.since >= self._grace_s):
            watched.faulted = True
            self.event("sensor_fault", sensor, reason=state.reason)

    # -- publishing ---------------------------------------------------------

    async def _publish(self, session: Callable[[], Awaitable[Link]]) -> None:
        while True:
            current = await session()
            try:
                await self._serve(current)
            except SessionLost as exc:
                log.debug("health: session lost (%s); waiting for the next one", exc)
                # a publish can fail just before `lost` completes: never spin on a dying session
                await asyncio.wait({current.lost}, timeout=self._poll_s)

    async def _serve(self, session: Link) -> None:
        """Report now, then report when due and send events, until the session is lost."""
        loop = asyncio.get_running_loop()
        self._report_wanted = True
        while True:
            self._wake.clear()
            if self._report_wanted or loop.time() >= self._next_report:
                await self._send_report(session)
            await self._send_events(session)
            await self._idle(session, until=self._next_report)
            if session.lost.done():
                raise SessionLost(session.lost.result())

    async def _idle(self, session: Link, *, until: float) -> None:
        """Until an event or request arrives, the session is lost, or loop time `until`."""
        waiter: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
        waiters: set[asyncio.Future[Any]] = {waiter, session.lost}
        left = until - asyncio.get_running_loop().time()
        try:
            await asyncio.wait(waiters, timeout=max(0.0, left), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()

    async def _send_report(self, session: Link) -> None:
        self._report_wanted = False
        self._next_report = asyncio.get_running_loop().time() + self._interval_s
        try:
            message = self._seal(self._report_senml(), self._health_topic)
        # the sources are other parts of the agent (spool, drivers, ...): whatever fails
        # there costs this one report, never the service
        except Exception:
            log.exception("health report skipped")
            return
        try:
            await session.publish(self._health_topic, message, qos=1)
        except PublishRefused as exc:
            log.error("health report dropped: %s", exc)
            return
        self.reports_published += 1
        self.report_acked.set()

    def _report_senml(self) -> bytes:
        groups = {subject: list(records) for subject, records in self._sources().items()}
        groups.setdefault(AGENT, []).append(("events_dropped", _COUNT, self.events_dropped))
        return encode_status(self._gateway_id, groups, self._clock())

    async def _send_events(self, session: Link) -> None:
        """Publish queued events in order; each leaves the queue only when acknowledged."""
        while self._queue:
            head = self._queue[0]
            if head.message is None:
                when = self._wall.date(head.when) if self._wall is not None else head.when.t
                if when is None:
                    return  # it happened before the clock was set, which it still is not
                senml = encode_status(self._gateway_id, {head.subject: head.records}, when)
                try:
                    head.message = self._seal(senml, self._events_topic)
                # no seq (e.g. SpoolFull: the seq file cannot grow): keep the event and try
                # again on the next wake; whatever the cause, the service goes on
                except Exception as exc:
                    log.error(
                        "event %s for %s kept, cannot sign it: %s", head.kind, head.subject, exc
                    )
                    return
            self._queue.popleft()
            try:
                await session.publish(self._events_topic, head.message, qos=1)
            except PublishRefused as exc:
                log.error("event %s for %s dropped: %s", head.kind, head.subject, exc)
                continue
            except BaseException:  # lost session or cancelled: it goes again, first
                self._put_back(head)
                raise
            self.events_published += 1
            if head.on_sent is not None:
                try:
                    head.on_sent()
                except Exception:  # the caller's bookkeeping must not end the health task
                    log.exception("after event %s for %s", head.kind, head.subject)

    def _put_back(self, event: _Event) -> None:
        self._queue.appendleft(event)
        while len(self._queue) > self._events_max:
            self._queue.popleft()
            self.events_dropped += 1

    def _seal(self, senml: bytes, topic: str) -> bytes:
        return seal(
            senml,
            signer=self._signer,
            gateway_id=self._gateway_id,
            seq=self._take_seq(),
            iat=int(self._clock()),
            topic=topic,
        )
