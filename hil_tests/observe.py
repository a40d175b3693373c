"""Watching the agent from outside: what reaches the broker, and what the process costs.

`Observer` is the cloud side of a rig: a verifying subscriber on
`<prefix>/#` with a persistent session (so that nothing published while it
reconnects is lost to it), built from `agent.verify.subscribe_and_verify` and
`tests.agentrig.Capture`. It keeps every message in arrival order with its
topic and arrival time (`arrivals`), files verified telemetry in its `Capture`
(raw copies by (gateway, seq), as `tests.agentrig.read_spool` comparisons
expect), and answers the questions scenarios ask: readings per sensor,
duplicate copies and whether they are byte-identical, readings that came back
under a second sequence number, and the signed health and events packs read
generically as records grouped by subject (`agent` or a sensor id).

`ProcessProbe` samples a process's CPU time, resident memory and bytes
written from /proc. `wait_until` polls a condition against a deadline; it
never judges how long anything took.

Trust: nothing here trusts a payload: telemetry, health and events count only
once `agent.envelope.open_sealed` has verified them against the gateways'
certificates; the retained status (JSON, unsigned by design) is kept apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent.envelope import Record, TrustedKey, VerificationError, VerifiedMessage
from agent.verify import Verifier, subscribe_and_verify, trust_store
from provisioning.broker import LabBroker
from provisioning.pki import LabFiles
from tests.agentrig import Capture

_SUBSCRIBE_TIMEOUT_S = 15.0

#: the topics below <prefix>/<gateway>/ whose messages the gateway signs (DESIGN §4)
SIGNED_BY_GATEWAY = ("telemetry", "health", "events")
#: one verified reading as `tests.agentrig` keys them: (sensor, quantity, time, value)
ReadingKey = tuple[str, str, float, float]


async def wait_until(
    predicate: Callable[[], bool], *, timeout_s: float, what: str, poll_s: float = 0.05
) -> None:
    """Return once `predicate()` holds; AssertionError naming `what` after `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            while not predicate():  # polls state observed from outside
                await asyncio.sleep(poll_s)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}") from None


@dataclass(frozen=True)
class Arrival:
    """One message as the observer received it. `message` is set once verified; `error`
    says why verification failed; both are None for the unsigned status."""

    index: int
    at: float  # time.monotonic() on arrival
    topic: str
    payload: bytes
    message: VerifiedMessage | None = None
    error: str | None = None

    @property
    def kind(self) -> str:
        """The topic below `<prefix>/<gateway>/`: telemetry, health, events, status, ..."""
        parts = self.topic.split("/", 2)
        return parts[2] if len(parts) == 3 else ""

    @property
    def gateway(self) -> str:
        parts = self.topic.split("/", 2)
        return parts[1] if len(parts) > 1 else ""


@dataclass(frozen=True)
class SignedPack:
    """A verified health or events message, its records grouped by subject."""

    arrival: Arrival
    message: VerifiedMessage

    @property
    def records(self) -> tuple[Record, ...]:
        return self.message.records

    def subjects(self) -> dict[str, dict[str, float | str | bool]]:
        """{subject: {record name: value}}; for a name given twice the last one wins."""
        grouped: dict[str, dict[str, float | str | bool]] = {}
        for record in self.message.records:
            grouped.setdefault(record.sensor, {})[record.n] = record.v
        return grouped

    def value(self, subject: str, name: str) -> float | str | bool | None:
        return self.subjects().get(subject, {}).get(name)


class _FilingVerifier(Verifier):
    """A Verifier that hands every message it is asked about, verified or not, to `file`
    (`subscribe_and_verify` gives its callbacks no topic; the verifier sees it)."""

    def __init__(
        self, trusted: Mapping[bytes, TrustedKey], prefix: str, file: Callable[[Arrival], None]
    ) -> None:
        super().__init__(trusted, prefix=prefix)
        self._file = file
        self._count = 0

    def check(self, topic: str, payload: bytes) -> VerifiedMessage:
        at, index = time.monotonic(), self._count
        self._count += 1
        if topic.endswith("/status"):  # JSON and retained: the one unsigned topic (DESIGN §4)
            self._file(Arrival(index, at, topic, payload))
            raise _Unsigned(topic)
        try:
            message = super().check(topic, payload)
        except VerificationError as exc:
            self._file(Arrival(index, at, topic, payload, error=str(exc)))
            raise
        self._file(Arrival(index, at, topic, payload, message=message))
        return message


class _Unsigned(VerificationError):
    """The status topic: not a verification failure."""


class Observer:
    """The verifying subscriber of a rig; `start()` once the broker runs, `stop()` at the end."""

    def __init__(
        self,
        lab: LabFiles,
        broker: LabBroker,
        gateways: Iterable[str],
        *,
        prefix: str = "citygate",
        client: str = "verifier",
    ) -> None:
        self._lab = lab
        self._broker = broker
        self._client = client
        self.prefix = prefix
        trusted = trust_store(lab.ca_cert, [lab.clients[g][0] for g in gateways])
        self.arrivals: list[Arrival] = []
        self._verifier = _FilingVerifier(trusted, prefix, self._file)
        self.capture = Capture(self._verifier)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe; returns once the broker has granted the subscription."""
        cert, key = self._lab.clients[self._client]
        settings = self._broker.session_settings(
            cert, key, self._lab.ca_cert, client_id=self._client, persistent=True
        )
        subscribed = asyncio.Event()
        self._stop.clear()
        self._task = asyncio.create_task(
            subscribe_and_verify(
                settings,
                self._verifier,
                on_verified=lambda _message, _payload: None,
                on_failed=lambda _topic, _exc: None,
                stop=self._stop,
                subscribed=subscribed,
                topic_filter=f"{self.prefix}/#",
            ),
            name="hil-observer",
        )
        waiter = asyncio.create_task(subscribed.wait())
        done, _ = await asyncio.wait(
            {waiter, self._task}, timeout=_SUBSCRIBE_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        waiter.cancel()
        if waiter not in done:
            await self.stop()
            raise RuntimeError(f"the observer did not subscribe within {_SUBSCRIBE_TIMEOUT_S} s")

    async def stop(self) -> None:
        self._stop.set()
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _file(self, arrival: Arrival) -> None:
        self.arrivals.append(arrival)
        if arrival.kind != "telemetry":
            return
        if arrival.message is not None:
            key = (arrival.message.gateway_id, arrival.message.seq)
            self.capture.raw[key].append(arrival.payload)
            self.capture.messages.append(arrival.message)
        elif arrival.error is not None:
            self.capture.failures.append(f"{arrival.topic}: {arrival.error}")

    # -- telemetry --------------------------------------------------------------------------

    @property
    def failures(self) -> list[str]:
        """Messages on the topics a gateway signs (telemetry, health, events) that failed
        verification. Other topics (commands, enrollment) are kept in `arrivals` only."""
        return [
            f"{a.topic}: {a.error}"
            for a in self.arrivals
            if a.error is not None and a.kind in SIGNED_BY_GATEWAY
        ]

    def telemetry(self) -> dict[tuple[str, int], VerifiedMessage]:
        """Verified telemetry, one per (gateway, seq), in order of first arrival."""
        unique: dict[tuple[str, int], VerifiedMessage] = {}
        for message in self.capture.messages:
            unique.setdefault((message.gateway_id, message.seq), message)
        return unique

    def readings_total(self) -> int:
        """Readings in distinct messages: each (gateway, seq) counted once."""
        return sum(len(m.records) for m in self.telemetry().values())

    def readings_by_sensor(self) -> Counter[str]:
        return Counter(r.sensor for m in self.telemetry().values() for r in m.records)

    def quantities_by_sensor(self) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for message in self.telemetry().values():
            for record in message.records:
                found.setdefault(record.sensor, set()).add(record.n)
        return found

    def duplicate_copies(self) -> int:
        """Copies received beyond the first of each (gateway, seq): re-sends after a lost PUBACK."""
        return sum(len(copies) - 1 for copies in self.capture.raw.values())

    def differing_duplicates(self) -> list[tuple[str, int]]:
        """(gateway, seq) received with different bytes: a message re-signed instead of re-sent."""
        return [key for key, copies in self.capture.raw.items() if len(set(copies)) > 1]

    def repeated_readings(self) -> Counter[ReadingKey]:
        """Readings found in more than one distinct message (data sent twice under new seqs)."""
        seen = Counter(
            (r.sensor, r.n, round(r.t, 3), float(r.v))
            for m in self.telemetry().values()
            for r in m.records
            if isinstance(r.v, int | float)
        )
        return Counter({key: n for key, n in seen.items() if n > 1})

    # -- health, events, status -----------------------------------------------------------

    def packs(self, kind: str) -> list[SignedPack]:
        """Verified messages on `<prefix>/<gateway>/<kind>` ("health", "events"), in order."""
        return [
            SignedPack(a, a.message)
            for a in self.arrivals
            if a.kind == kind and a.message is not None
        ]

    def health(self) -> list[SignedPack]:
        return self.packs("health")

    def events(self) -> list[SignedPack]:
        return self.packs("events")

    def latest(self, kind: str, subject: str, name: str) -> float | str | bool | None:
        """The most recent value of record `name` for `subject` in `kind` packs, if any."""
        for pack in reversed(self.packs(kind)):
            value = pack.value(subject, name)
            if value is not None:
                return value
        return None

    def statuses(self) -> list[Mapping[str, object]]:
        """The retained status messages (online/offline), decoded from JSON, in order."""
        found: list[Mapping[str, object]] = []
        for arrival in self.arrivals:
            if arrival.kind == "status":
                with contextlib.suppress(ValueError):
                    decoded = json.loads(arrival.payload)
                    if isinstance(decoded, dict):
                        found.append(decoded)
        return found


@dataclass(frozen=True)
class ProcessSample:
    at: float  # time.monotonic()
    cpu_s: float  # user + system time so far
    rss_bytes: int
    write_bytes: int  # bytes the process caused to be written to storage so far


@dataclass
class ProcessProbe:
    """Samples of one process from /proc (Linux): CPU time, resident memory, bytes written."""

    pid: int
    samples: list[ProcessSample] = field(default_factory=list)

    def sample(self) -> ProcessSample:
        """Take one sample (kept in `samples`); ProcessLookupError once the process is gone."""
        base = Path(f"/proc/{self.pid}")
        try:
            stat = (base / "stat").read_text()
            status = (base / "status").read_text()
            io = (base / "io").read_text()
        except FileNotFoundError:
            raise ProcessLookupError(self.pid) from None
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 3
        ticks = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15
        taken = ProcessSample(
            at=time.monotonic(),
            cpu_s=ticks / os.sysconf("SC_CLK_TCK"),
            rss_bytes=_kib_field(status, "VmRSS") * 1024,
            write_bytes=_plain_field(io, "write_bytes"),
        )
        self.samples.append(taken)
        return taken

    def cpu_fraction(self) -> float:
        """CPU time over elapsed time between the first and the last sample (figures only)."""
        if len(self.samples) < 2:
            return 0.0
        first, last = self.samples[0], self.samples[-1]
        elapsed = last.at - first.at
        return (last.cpu_s - first.cpu_s) / elapsed if elapsed > 0 else 0.0


def _kib_field(text: str, name: str) -> int:
    for line in text.splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    return 0  # a zombie has no VmRSS


def _plain_field(text: str, name: str) -> int:
    for line in text.splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    raise ValueError(f"no {name} in /proc io")
