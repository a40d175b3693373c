"""The agent's side of systemd's notification protocol (sd_notify(3)), in plain stdlib.

Under `Type=notify` systemd hands the service `$NOTIFY_SOCKET`, a datagram
socket to report to: `READY=1` once started, `STATUS=...` for `systemctl
status`, `WATCHDOG=1` at least every `$WATCHDOG_USEC`, `STOPPING=1` when it
begins to shut down. `Notifier` sends those datagrams to a filesystem socket or,
when the address starts with "@", to an abstract-namespace one. Without
`$NOTIFY_SOCKET` every call does nothing, so the agent runs the same way from a
terminal, a test or a container.

`keep_alive` is a coroutine that pings the watchdog from the event loop every
half `$WATCHDOG_USEC`. There is deliberately no thread: if the loop stalls (a
blocking call, a busy loop, a deadlock), the pings stop and systemd kills and
restarts the agent.

Trust: the environment comes from the service manager and is only parsed, never
executed. The socket is write-only and non-blocking; nothing is ever read from
it. A failed send is logged (once per kind of failure), never raised: a
notification must not take the agent down.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

#: How often STATUS= is refreshed when no watchdog asks for more frequent pings.
STATUS_EVERY_S = 10.0


def _address(value: str) -> str | None:
    """The socket address for `$NOTIFY_SOCKET`, or None if it is not one sd_notify accepts."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def _watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    """`$WATCHDOG_USEC` if the watchdog is meant for process `pid` (sd_watchdog_enabled(3))."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner is not None:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    return usec


def _field(value: str) -> str:
    """One assignment per line: newlines inside a value would start a new (forged) field."""
    return " ".join(value.splitlines())


class Notifier:
    """Sends sd_notify datagrams; every method is a no-op when `address` is None."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec if address is not None else None
        self._socket: socket.socket | None = None
        self._failed: set[int] = set()  # errnos already logged, so a dead socket is logged once

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None
    ) -> Notifier:
        """The notifier systemd asked for through `$NOTIFY_SOCKET` and `$WATCHDOG_USEC`."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = _address(raw) if raw else None
        if raw and address is None:
            log.warning("ignoring NOTIFY_SOCKET=%r: not a socket path or @abstract name", raw)
        usec = _watchdog_usec(env, os.getpid() if pid is None else pid)
        return cls(address, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens for notifications."""
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Seconds between watchdog pings (half the timeout), or None without a watchdog."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2e6

    def send(self, **fields: str) -> bool:
        """Send one datagram of `KEY=value` lines; True if it was sent (or not wanted)."""
        if self._address is None:
            return True
        message = "".join(f"{key}={_field(value)}\n" for key, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                self._socket.setblocking(False)  # a busy systemd costs a ping, never the loop
            self._socket.sendto(message.encode("utf-8", "replace"), self._address)
        except OSError as exc:
            code = exc.errno or 0
            if code not in self._failed:
                self._failed.add(code)
                reason = errno.errorcode.get(code, str(code))
                log.warning("cannot notify systemd (%s): %s", reason, exc.strerror or exc)
            return False
        return True

    def ready(self, status: str | None = None) -> None:
        """Start-up is complete: systemd moves the unit from activating to active."""
        if status is None:
            self.send(READY="1")
        else:
            self.send(READY="1", STATUS=status)

    def status(self, text: str) -> None:
        """A one-line status for `systemctl status`."""
        self.send(STATUS=text)

    def watchdog(self) -> None:
        """The agent is alive: resets systemd's watchdog timer."""
        if self._watchdog_usec is not None:
            self.send(WATCHDOG="1")

    def stopping(self, status: str | None = None) -> None:
        """Shutdown has begun: systemd shows the unit as deactivating."""
        if status is None:
            self.send(STOPPING="1")
        else:
            self.send(STOPPING="1", STATUS=status)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


async def keep_alive(notifier: Notifier, status: Callable[[], str] | None = None) -> None:
    """Ping the watchdog and refresh STATUS= from the event loop until cancelled.

    Pings every `notifier.watchdog_interval_s` (half of `$WATCHDOG_USEC`), or
    refreshes the status every `STATUS_EVERY_S` without a watchdog; returns at
    once when not under systemd. `status` is called on the loop; its text is
    sent only when it changed. A wake-up that comes a whole period late means
    the loop was blocked, and is logged with how long.
    """
    if not notifier.enabled:
        return
    period = notifier.watchdog_interval_s or STATUS_EVERY_S
    last_status: str | None = None
    due = time.monotonic()
    while True:
        fields: dict[str, str] = {}
        if notifier.watchdog_interval_s is not None:
            fields["WATCHDOG"] = "1"
        if status is not None:
            try:
                text = status()
            except Exception:
                log.exception("status for systemd failed")
            else:
                if text != last_status:
                    fields["STATUS"] = last_status = text
        if fields:
            notifier.send(**fields)
        due += period
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        late = time.monotonic() - due
        if late > period:
            log.warning("event loop was blocked for about %.1f s", late)
            due = time.monotonic()
