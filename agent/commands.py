"""Operational commands from the broker: bounded, validated and rate-limited.

The agent listens on two topics (DESIGN.md §4): `<prefix>/<gw>/cmd/<name>`
for commands and `<prefix>/<gw>/ota/offer` for update offers. A command is a
JSON object of at most `MAX_COMMAND_BYTES` bytes (UTF-8, no NUL byte, known
keys only, no duplicate key); the only one so far is `cmd/health` (payload
`{}` or empty), which asks for a health report now. An offer is
`{"version": "1.4.2"}` and is only a hint that an update exists.

Who may send them is the broker's decision, not ours: the client certificate
(mutual TLS) names the sender and the broker's ACL lets only the operator
identities (`LabBroker(operators=...)`: `topic write <prefix>/+/cmd/#` and
`<prefix>/+/ota/offer`) and the gateway itself (its own subtree) write a
gateway's command topics. Nothing here adds a signature, so a command may only
ask for what the broker's word is enough for: a health report now. Trust in an
update never comes from an offer; it comes from the signed bundle (OTA).

What we trust about a message's content: nothing. Every message is checked
here and anything unexpected is rejected: logged at WARNING (topic, reason,
size and a short escaped prefix, never the payload), counted by reason, and
reported through `on_event("command_rejected", ...)`. Hostile input is bounded
at every step: the broker drops for us any message bigger than the session's
`max_packet_size` (`MAX_PACKET_SIZE` for the agent), the session drops what
finds the command inbox full, a token bucket rejects commands beyond `burst`
at `rate_per_s`, and rejections are logged and reported at most once per
`REPORT_EVERY_S` (with the number left out since); the last rejection of a burst
is reported once that time has passed, so the reports account for every
rejection (a report and the ones it says it left out). No exception from a
message or a callback ends the task.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from agent.mqtt import Inbox, Message, PublishRefused, Session, SessionLost

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 4096
#: what the agent's session lets the broker send it: commands, offers and enrollment replies fit
MAX_PACKET_SIZE = 64 * 1024
#: commands waiting to be handled; more are dropped by the session (and counted)
INBOX_SIZE = 32
RATE_PER_S = 1.0
BURST = 5
REPORT_EVERY_S = 1.0

# rejection reasons: a fixed vocabulary, so that they can be counted and alerted on
RATE_LIMITED = "rate limited"
TOO_LARGE = "too large"
RETAINED = "retained command"
NUL_BYTE = "NUL byte"
NOT_UTF8 = "not UTF-8"
NOT_JSON = "not JSON"
DUPLICATE_KEY = "duplicate key"
NOT_OBJECT = "not a JSON object"
UNKNOWN_KEY = "unknown key"
MISSING_KEY = "missing key"
WRONG_TYPE = "wrong type"
BAD_VERSION = "not a version"
UNKNOWN_COMMAND = "unknown command"
REASONS = frozenset(
    {
        RATE_LIMITED, TOO_LARGE, RETAINED, NUL_BYTE, NOT_UTF8, NOT_JSON, DUPLICATE_KEY,
        NOT_OBJECT, UNKNOWN_KEY, MISSING_KEY, WRONG_TYPE, BAD_VERSION, UNKNOWN_COMMAND,
    }
)  # fmt: skip

# 1.4.2, 1.4.2-rc.1, 1.4.2+build.7, 0.3.dev2, 2024.5: digits first, then a short ASCII tail
_VERSION = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9}){1,3}(?:[-+.]?[0-9A-Za-z][0-9A-Za-z.+-]{0,47})?")


class Rejected(Exception):
    """A message that is not a valid command; `reason` is one of the reasons above."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class HealthRequest:
    """`cmd/health`: publish a health report now."""


@dataclass(frozen=True, slots=True)
class OtaOffer:
    """`ota/offer`: an update to `version` may exist (a hint, never a reason to trust it)."""

    version: str


Command = HealthRequest | OtaOffer


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    body = dict(pairs)
    if len(body) != len(pairs):
        raise Rejected(DUPLICATE_KEY)
    return body


def _refuse_constant(name: str) -> object:
    raise Rejected(NOT_JSON)  # NaN, Infinity: not JSON, whatever Python's parser allows


def _json_object(payload: bytes) -> dict[str, object]:
    if b"\x00" in payload:
        raise Rejected(NUL_BYTE)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected(NOT_UTF8) from None
    try:
        body = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." deeper than the stack
        raise Rejected(NOT_JSON) from None
    if not isinstance(body, dict):
        raise Rejected(NOT_OBJECT)
    return body


def _only_keys(body: dict[str, object], allowed: frozenset[str]) -> None:
    if not body.keys() <= allowed:
        raise Rejected(UNKNOWN_KEY)


def parse_command(base: str, message: Message) -> Command:
    """The command `message` carries, for the gateway whose topics start with `base`.

    Raises Rejected for anything else. Pure: no I/O, no clock.
    """
    if len(message.payload) > MAX_COMMAND_BYTES:
        raise Rejected(TOO_LARGE)
    if message.topic == f"{base}/ota/offer":
        body = _json_object(message.payload)
        _only_keys(body, frozenset({"version"}))
        version = body.get("version")
        if version is None:
            raise Rejected(MISSING_KEY)
        if not isinstance(version, str):
            raise Rejected(WRONG_TYPE)
        if _VERSION.fullmatch(version) is None:
            raise Rejected(BAD_VERSION)
        return OtaOffer(version)
    if message.topic != f"{base}/cmd/health":
        raise Rejected(UNKNOWN_COMMAND)
    if message.retain:  # stored by the broker: it would run again at every connection
        raise Rejected(RETAINED)
    if message.payload:
        _only_keys(_json_object(message.payload), frozenset())
    return HealthRequest()


class TokenBucket:
    """At most `burst` at once and `rate_per_s` on average; a clock going back gives nothing."""

    def __init__(self, rate_per_s: float, burst: int, now: float) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    def take(self, now: float) -> bool:
        elapsed = max(now - self._stamp, 0.0)
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._stamp = max(now, self._stamp)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class Throttle:
    """Lets one report through per `every_s` and counts the ones it holds back."""

    def __init__(self, every_s: float) -> None:
        self._every = every_s
        self._last: float | None = None
        self._held_back = 0

    def allow(self, now: float) -> int | None:
        """None to stay silent; else how many were held back since the last report."""
        if self._last is not None and 0.0 <= now - self._last < self._every:
            self._held_back += 1
            return None
        self._last = now
        held_back, self._held_back = self._held_back, 0
        return held_back

    def due_in(self, now: float) -> float | None:
        """None if nothing is held back; else how long until it may be reported (0: now)."""
        if not self._held_back or self._last is None:
            return None
        return max(self._last + self._every - now, 0.0)

    def flush(self, now: float) -> int:
        """Report the held-back ones now, the last of them in full: how many others there
        were. Only once `due_in(now)` is 0."""
        self._last = now
        held_back, self._held_back = self._held_back - 1, 0
        return held_back


class EventSink(Protocol):
    """Where the agent's alerts go: `on_event("command_rejected", subject="commands", ...)`."""

    def __call__(self, kind: str, /, **fields: object) -> None: ...


def _no_event(kind: str, /, **fields: object) -> None:
    return None


@dataclass(slots=True)
class CommandCounters:
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # by reason
    dropped: int = 0  # found the inbox full: never looked at


class Commands:
    """Handles the gateway's commands and update offers on every session of the uplink.

    `sessions` returns a live session (`Uplink.session`); `run` serves each
    one until it is lost, then waits for the next. The callbacks run on the
    event loop and must return quickly (set an event, start a task).
    """

    def __init__(
        self,
        gateway_id: str,
        *,
        prefix: str,
        sessions: Callable[[], Awaitable[Session]],
        on_health_request: Callable[[], None],
        on_ota_offer: Callable[[str], None],
        on_event: EventSink = _no_event,
        rate_per_s: float = RATE_PER_S,
        burst: int = BURST,
        inbox_size: int = INBOX_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base = f"{prefix}/{gateway_id}"
        self._sessions = sessions
        self._on_health_request = on_health_request
        self._on_ota_offer = on_ota_offer
        self._on_event = on_event
        self._inbox_size = inbox_size
        self._clock = clock
        self._bucket = TokenBucket(rate_per_s, burst, clock())
        self._reports = Throttle(REPORT_EVERY_S)
        self._held: _Shown | None = None  # the last rejection held back by the throttle
        self.counters = CommandCounters()
        self.subscribed = asyncio.Event()  # set while a session is subscribed to our topics

    @property
    def topic_filters(self) -> tuple[str, str]:
        return f"{self._base}/cmd/#", f"{self._base}/ota/offer"

    async def run(self) -> None:
        while True:
            await self.serve(await self._sessions())

    async def serve(self, session: Session) -> None:
        """Subscribe on `session` and handle what arrives until the session is lost."""
        dropped_before = self.counters.dropped
        with session.inbox(*self.topic_filters, maxsize=self._inbox_size) as inbox:
            try:
                for topic_filter in self.topic_filters:
                    await session.subscribe(topic_filter)
                self.subscribed.set()
                while True:
                    message = await self._next(inbox)
                    self.counters.dropped = dropped_before + inbox.dropped
                    if message is None:
                        self._report_held_back()
                    else:
                        self.handle(message)
            except SessionLost:
                pass
            except PublishRefused as exc:  # the ACL: no commands until the next session
                log.error("commands are off for this connection: %s", exc)
                await asyncio.wait({session.lost})
            finally:
                self.subscribed.clear()
                self.counters.dropped = dropped_before + inbox.dropped

    async def _next(self, inbox: Inbox) -> Message | None:
        """The next message; None when held-back rejections are due to be reported first."""
        while (wait := self._reports.due_in(self._clock())) is not None:
            if wait <= 0.0:
                return None
            try:
                async with asyncio.timeout(wait):
                    return await inbox.get()  # cancelling the wait loses no message
            except TimeoutError:
                continue  # due now by `clock`? (a test's clock may stand still)
        return await inbox.get()

    def handle(self, message: Message) -> None:
        """Check one message and act on it, or reject it; never raises."""
        now = self._clock()
        try:
            if not self._bucket.take(now):
                raise Rejected(RATE_LIMITED)
            command = parse_command(self._base, message)
        except Rejected as rejected:
            self._reject(message, rejected.reason, now)
            return
        self.counters.accepted += 1
        try:
            if isinstance(command, OtaOffer):
                log.info("update offered: version %s (a hint only)", command.version)
                self._on_ota_offer(command.version)
            else:
                log.info("health report requested")
                self._on_health_request()
        except Exception:  # a bug in a handler must not end the command task
            log.exception("handling %s failed", command)

    def _reject(self, message: Message, reason: str, now: float) -> None:
        self.counters.rejected[reason] = self.counters.rejected.get(reason, 0) + 1
        topic, payload = message.topic[:120], message.payload
        shown = _Shown(ascii(topic), topic, reason, len(payload), payload[:24])
        held_back = self._reports.allow(now)
        if held_back is None:
            self._held = shown
        else:
            self._held = None
            self._report(shown, held_back)

    def _report_held_back(self) -> None:
        """The last rejection of a burst, with the number of the others left out."""
        held_back = self._reports.flush(self._clock())
        if self._held is not None:
            self._report(self._held, held_back)
            self._held = None

    def _report(self, shown: _Shown, held_back: int) -> None:
        log.warning(
            "command rejected on %s: %s (%d bytes, starting %r)%s",
            shown.logged_topic,
            shown.reason,
            shown.size,
            shown.start,
            f"; {held_back} more rejection(s) not logged" if held_back else "",
        )
        try:
            self._on_event(
                "command_rejected",
                subject="commands",
                topic=shown.topic,
                reason=shown.reason,
                size=shown.size,
                not_reported=held_back,
            )
        except Exception:  # same as a handler
            log.exception("reporting a rejected command failed")


@dataclass(frozen=True, slots=True)
class _Shown:
    """What a report says about one rejected message: never more of the payload than its
    start."""

    logged_topic: str  # escaped: no raw line breaks in the log
    topic: str
    reason: str
    size: int
    start: bytes
