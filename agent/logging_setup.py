"""Logging for a service whose stderr is the systemd journal, and for humans otherwise.

`configure_logging(level)` installs one handler on the root logger, writing to
stderr in one of two formats:

- when stderr *is* the journal (systemd sets `$JOURNAL_STREAM` to the
  "device:inode" of the stream it connected, and it matches stderr), every event
  is exactly one line, `<N>logger: message`, where `<N>` is the syslog priority
  that journald strips and stores (so `journalctl -p warning` works) and no
  timestamp is added (the journal has one). Newlines and other control
  characters are escaped, tracebacks included, so no text can start a forged
  line of its own;
- otherwise `LEVEL logger: message`, with tracebacks as Python prints them.

Both formats pass every record through `redact`, which replaces PEM private
key blocks by a marker: a key must never reach a log, whoever passed it.

Trust: log messages may carry text from sensors and the network; they are
escaped here, never interpreted.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import TextIO

#: syslog priorities (RFC 5424) that journald reads from a `<N>` line prefix
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
_PEM_PRIVATE = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(-----END \1PRIVATE KEY-----|\Z)", re.DOTALL
)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r"}

REDACTED = "[private key redacted]"


def redact(text: str) -> str:
    """`text` with every PEM private key block (even a truncated one) replaced."""
    return _PEM_PRIVATE.sub(REDACTED, text)


def priority(levelno: int) -> int:
    """The syslog priority for a logging level (levels between two take the lower one)."""
    for threshold in sorted(_PRIORITY, reverse=True):
        if levelno >= threshold:
            return _PRIORITY[threshold]
    return 7


def _escape(text: str) -> str:
    return _CONTROL.sub(lambda m: _NAMED_ESCAPES.get(m[0], f"\\x{ord(m[0]):02x}"), text)


class JournalFormatter(logging.Formatter):
    """`<N>logger: message` on one line, tracebacks included (escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        text = redact(super().format(record))
        return f"<{priority(record.levelno)}>{record.name}: {_escape(text)}"


class PlainFormatter(logging.Formatter):
    """`LEVEL logger: message`, as a terminal or a log file reads best."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True if `stream` is the journal stream systemd announced in `$JOURNAL_STREAM`."""
    announced = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, sep, inode = announced.partition(":")
    if not sep:
        return False
    try:
        info = os.fstat(stream.fileno())
        return (info.st_dev, info.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):  # no file descriptor (a StringIO) or a malformed value
        return False


def configure_logging(
    level: str,
    *,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Route all logging to `stream` (default stderr) at `level`; returns the handler."""
    out = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(out)
    journal = stream_is_journal(out, environ)
    handler.setFormatter(JournalFormatter() if journal else PlainFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    return handler
