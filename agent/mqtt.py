"""One MQTT 5 session over mutually authenticated TLS, as an asyncio object.

This is the seam between paho-mqtt (callbacks on its network thread) and the
agent (coroutines). `Session.open` connects and waits for a successful
CONNACK; `publish` returns when the broker acknowledged the message (PUBACK
reason below 0x80) and raises `PublishRefused` otherwise. A session is never
reconnected: when the link drops, `lost` completes and every pending publish
fails with `SessionLost`; the owner (`agent.uplink`) opens a new one after a
backoff delay. That keeps paho's own retry logic, and its re-sending of stale
packets, out of the way.

Incoming messages: a session used by one consumer reads them all with
`messages`. A session shared by several consumers (the agent's: certificate
rotation, commands) routes them instead: each consumer opens an `Inbox` for its
topic filters and gets only the messages that match them; once a session has
an inbox, a message no inbox matches is counted (`unmatched`) and dropped.
Every queue is bounded and filled on paho's thread, which drops and counts a
message that finds its queue full rather than wait or grow; with
`max_packet_size` the broker drops any message bigger than that for us
instead of sending it (MQTT 5 Maximum Packet Size). So hostile senders cost
us at most the queues' capacity in memory, and never block the network thread.

paho exceptions and reason codes are translated here, once.
Trusts: the broker's identity as verified by the TLS context it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)


class UplinkError(Exception):
    """Base of the errors of the MQTT side."""


class ConnectFailed(UplinkError):
    """No session: TCP/TLS failed, the broker refused us, or no CONNACK in time."""


class SessionLost(UplinkError):
    """The connection dropped; messages not yet acknowledged must be sent again."""


class PublishRefused(UplinkError):
    """The broker answered with a failure reason (>= 0x80), e.g. 135 Not authorized."""

    def __init__(self, topic: str, reason: int, name: str) -> None:
        super().__init__(f"broker refused publish to {topic}: reason {reason} ({name})")
        self.topic = topic
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True


@dataclass(frozen=True, slots=True)
class SessionSettings:
    host: str
    port: int
    client_id: str
    tls: ssl.SSLContext | None  # None only for the development plaintext mode
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    inflight: int = 16
    will: Will | None = None
    # a consumer that must not miss messages while it is away keeps its session
    clean_start: bool = True
    session_expiry_s: int = 0
    # the largest packet the broker may send us: it drops bigger messages for us (MQTT 5
    # Maximum Packet Size, in CONNECT); None asks for no limit (a telemetry verifier's choice)
    max_packet_size: int | None = None


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    retain: bool


#: capacity of the queue `Session.messages` reads (a single consumer's)
MESSAGES_QUEUE = 10_000


class Inbox:
    """The messages of some topic filters, for one consumer, in a queue of `maxsize`.

    Filled on paho's thread: a message that finds the queue full is dropped
    there and counted in `dropped`. `get` (or `async for`) takes them in
    arrival order; the messages already queued are still handed out after the
    session is lost, then `get` raises `SessionLost` (and iteration ends).
    Leaving the `with` block (or `close`) stops the routing to it.
    """

    def __init__(
        self,
        filters: tuple[str, ...],
        maxsize: int,
        loop: asyncio.AbstractEventLoop,
        lost: asyncio.Future[str],
        on_close: Callable[[Inbox], None] | None = None,
    ) -> None:
        self.filters = filters
        self.maxsize = maxsize
        self.dropped = 0
        self._loop = loop
        self._lost = lost
        self._lock = threading.Lock()  # guards _held, dropped and _closed across threads
        self._held = 0  # admitted on paho's thread and not yet taken
        self._closed = False
        self._items: deque[Message] = deque()  # touched on the loop's thread only
        self._wake = asyncio.Event()
        self._on_close = on_close

    def __enter__(self) -> Inbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> Inbox:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.get()
        except SessionLost:
            raise StopAsyncIteration from None

    async def get(self) -> Message:
        """The next message; SessionLost once the session is gone and the queue empty."""
        while not self._items:
            if self._closed:
                raise SessionLost("inbox closed")
            if self._lost.done():
                raise SessionLost(f"connection lost: {self._lost.result()}")
            self._wake.clear()
            await self._wake.wait()  # cancelling this wait loses no message
        message = self._items.popleft()
        with self._lock:
            self._held -= 1
        return message

    @property
    def pending(self) -> int:
        """Messages waiting to be taken."""
        return len(self._items)

    def matches(self, topic: str) -> bool:
        return any(paho.topic_matches_sub(f, topic) for f in self.filters)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        if self._on_close is not None:
            self._on_close(self)
        self._items.clear()
        self._wake.set()

    def offer(self, message: Message) -> None:
        """On paho's thread: admit the message if there is room, else drop and count it."""
        with self._lock:
            if self._closed:
                return
            admitted = self._held < self.maxsize
            if admitted:
                self._held += 1
            else:
                self.dropped += 1
            dropped = self.dropped
        if admitted:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody reads any more
                self._loop.call_soon_threadsafe(self._put, message)
        elif dropped == 1 or dropped % 1000 == 0:  # a flood must not flood the log as well
            log.warning(
                "dropping messages on %s: queue of %d full (%d dropped so far)",
                ascii(message.topic[:100]),
                self.maxsize,
                dropped,
            )

    def _put(self, message: Message) -> None:
        if not self._closed:
            self._items.append(message)
            self._wake.set()

    def wake_up(self) -> None:
        self._wake.set()


class Session:
    """A connected MQTT 5 client. Use `async with await Session.open(settings)`."""

    def __init__(self, settings: SessionSettings, loop: asyncio.AbstractEventLoop) -> None:
        self._settings = settings
        self._loop = loop
        self._lock = threading.Lock()  # guards _pending/_early between threads
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._early: dict[int, int] = {}  # PUBACKs that beat publish() returning its mid
        self._subacks: dict[int, asyncio.Future[list[int]]] = {}
        self._early_subacks: dict[int, list[int]] = {}
        self._window = asyncio.Semaphore(settings.inflight)
        self._connack: asyncio.Future[int] = loop.create_future()
        self.lost: asyncio.Future[str] = loop.create_future()
        self._stopping = asyncio.Lock()
        self._network_stopped = False
        self._routes_lock = threading.Lock()
        self._routes: tuple[Inbox, ...] = ()
        self._routed = False  # set by the first inbox; then `messages` is closed for good
        self._default = Inbox(("#",), MESSAGES_QUEUE, loop, self.lost)
        self.unmatched = 0  # messages dropped because no inbox wanted them
        self.lost.add_done_callback(self._wake_inboxes)
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=False,
        )
        if settings.tls is not None:
            client.tls_set_context(settings.tls)
        client.connect_timeout = settings.connect_timeout_s
        # paho must never queue on its own: our window is the only queue
        client.max_inflight_messages_set(settings.inflight + 1)
        client.max_queued_messages_set(0)
        if settings.will is not None:
            will = settings.will
            client.will_set(will.topic, will.payload, qos=1, retain=will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client

    @classmethod
    async def open(cls, settings: SessionSettings) -> Session:
        session = cls(settings, asyncio.get_running_loop())
        await session._connect()
        return session

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- public -------------------------------------------------------------

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Send and wait for the broker's acknowledgement (QoS 1) or the socket write (QoS 0)."""
        async with self._window:
            self._raise_if_lost()
            # never hold self._lock while calling into paho: paho calls on_publish with
            # its own mutex held, so holding ours here could deadlock
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise SessionLost(f"publish failed: {paho.error_string(info.rc)}")
            future: asyncio.Future[int] = self._loop.create_future()
            with self._lock:
                early = self._early.pop(info.mid, None)
                if early is None:
                    self._pending[info.mid] = future
                else:
                    future.set_result(early)
            reason = await self._until_lost(future)
        if reason >= 0x80:
            raise PublishRefused(topic, reason, _reason_name(reason))

    async def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._raise_if_lost()
        rc, mid = self._client.subscribe(topic_filter, qos=qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise SessionLost(f"subscribe failed: {paho.error_string(rc)}")
        future: asyncio.Future[list[int]] = self._loop.create_future()
        with self._lock:
            early = self._early_subacks.pop(mid, None)
            if early is None:
                self._subacks[mid] = future
            else:
                future.set_result(early)
        granted = await self._until_lost(future)
        if any(code >= 0x80 for code in granted):
            raise PublishRefused(topic_filter, granted[0], "subscription refused")

    def messages(self) -> AsyncIterator[Message]:
        """Every message from subscriptions, until the session is lost: for a single consumer.

        It starts queueing when the session opens, so nothing sent between
        `subscribe` and the first read is lost. Once the session has an inbox,
        it ends (a RuntimeError if asked for afterwards).
        """
        if self._routed:
            raise RuntimeError("this session routes its messages to inboxes: use inbox()")
        return self._default

    def inbox(self, *filters: str, maxsize: int) -> Inbox:
        """Route the messages matching `filters` to a new inbox of `maxsize` messages.

        Open it before subscribing, so that nothing the subscription brings
        (a retained message) arrives before there is somewhere to put it. A
        message that several inboxes match goes to each of them.
        """
        if not filters or maxsize < 1:
            raise ValueError("an inbox needs a topic filter and room for a message")
        inbox = Inbox(filters, maxsize, self._loop, self.lost, self._forget)
        with self._routes_lock:
            self._routes = (*self._routes, inbox)
            first = not self._routed
            self._routed = True
        if first:
            self._default.close()
        return inbox

    def _forget(self, inbox: Inbox) -> None:
        with self._routes_lock:
            self._routes = tuple(r for r in self._routes if r is not inbox)

    async def close(self) -> None:
        """Disconnect cleanly (no Will) and stop paho's thread."""
        if not self.lost.done():
            self._client.disconnect()
        await self._stop_network()
        if not self.lost.done():
            self.lost.set_result("closed")

    # -- connection ---------------------------------------------------------

    async def _connect(self) -> None:
        s = self._settings
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if s.session_expiry_s:
            properties.SessionExpiryInterval = s.session_expiry_s
        if s.max_packet_size is not None:
            properties.MaximumPacketSize = s.max_packet_size
        try:
            await asyncio.to_thread(
                self._client.connect,
                s.host,
                s.port,
                s.keepalive_s,
                clean_start=s.clean_start,
                properties=properties,
            )
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConnectFailed(f"cannot reach {s.host}:{s.port}: {exc}") from exc
        self._client.loop_start()
        try:
            waiters: set[asyncio.Future[Any]] = {self._connack, self.lost}
            async with asyncio.timeout(s.connect_timeout_s):
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            await self._abandon()
            raise ConnectFailed(
                f"no CONNACK from {s.host}:{s.port} within {s.connect_timeout_s:g} s"
            ) from None
        if self._connack not in done:
            await self._abandon()
            raise ConnectFailed(
                f"no CONNACK from {s.host}:{s.port}: connection dropped ({self.lost.result()})"
                " - is our certificate accepted by the broker?"
            )
        reason = self._connack.result()
        if reason != 0:
            await self._abandon()
            raise ConnectFailed(
                f"broker {s.host}:{s.port} refused the connection: reason {reason}"
                f" ({_reason_name(reason)})"
            )

    async def _abandon(self) -> None:
        self._client.disconnect()
        await self._stop_network()
        if not self.lost.done():
            self.lost.set_result("abandoned")

    async def _stop_network(self) -> None:
        """Stop paho's thread and close its sockets now.

        paho closes the socket pair that wakes its thread only when the client
        is garbage-collected, and a client and its session refer to each other
        (the callbacks): left to the collector, every session of a flapping
        link would keep two descriptors open until a full collection.
        """
        # close() may run twice at once (a goodbye and the uplink's own cleanup): two
        # concurrent loop_stop calls race inside paho, so only the first one stops it
        async with self._stopping:
            if self._network_stopped:
                return
            await asyncio.to_thread(self._client.loop_stop)
            self._client._reset_sockets()  # paho has no public way to release them
            self._network_stopped = True

    async def _until_lost(self, future: asyncio.Future[Any]) -> Any:
        waiters: set[asyncio.Future[Any]] = {future, self.lost}
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if future in done:
            return future.result()
        future.cancel()
        raise SessionLost(f"connection lost: {self.lost.result()}")

    def _raise_if_lost(self) -> None:
        if self.lost.done():
            raise SessionLost(f"connection lost: {self.lost.result()}")

    # -- paho callbacks (network thread) ------------------------------------

    def _post(self, future: asyncio.Future[Any], value: object) -> None:
        """Settle `future` on the event loop; a loop already closed has nobody waiting."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_settle, future, value)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._post(self._connack, reason.value)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        why = f"reason {reason.value} ({reason.getName()})"
        self._post(self.lost, why)

    def _on_publish(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            future = self._pending.pop(mid, None)
            if future is None:
                self._early[mid] = reason.value
                return
        self._post(future, reason.value)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        codes = [r.value for r in reasons]
        with self._lock:
            future = self._subacks.pop(mid, None)
            if future is None:
                self._early_subacks[mid] = codes
                return
        self._post(future, codes)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        # an exception here would end paho's thread (and the session with it, unnoticed)
        try:
            message = Message(msg.topic, bytes(msg.payload), bool(msg.retain))
        except UnicodeDecodeError:
            with self._routes_lock:
                self.unmatched += 1
            return
        with self._routes_lock:
            routed, routes = self._routed, self._routes
        wanted = [inbox for inbox in routes if inbox.matches(message.topic)]
        if routed and not wanted:
            with self._routes_lock:
                self.unmatched += 1
        for inbox in wanted if routed else [self._default]:
            inbox.offer(message)

    def _wake_inboxes(self, lost: asyncio.Future[str]) -> None:
        with self._routes_lock:
            routes = self._routes
        for inbox in (*routes, self._default):
            inbox.wake_up()


def _settle(future: asyncio.Future[Any], value: object) -> None:
    if not future.done():
        future.set_result(value)


def _reason_name(value: int) -> str:
    with contextlib.suppress(Exception):
        return str(ReasonCode(paho.PUBACK >> 4, identifier=value).getName())
    return "unknown"
