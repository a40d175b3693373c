"""Write TOML from parsed values, remembering which key path each line holds.

`TomlLines` writes tables and `key = value` lines from values that `tomllib`
produced (strings, numbers, booleans, dates and times, arrays, tables), so a
table copied from one file into another keeps its meaning. It also answers
which key path a line of its output holds, so that a problem found in the
written file can be reported where the value came from.

Trust: none needed; every string is escaped, every key quoted where TOML needs it.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping, Sequence

from agent._tomlpos import KeyPath

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) in (0x7F, 0x85, 0x2028, 0x2029):
            # controls must be escaped; NEL, LS and PS are, so that YAML around it keeps them
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _float(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)


def _scalar(value: object) -> str | None:
    """A string, number, boolean, date or time as TOML; None for anything else."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, dt.date | dt.time):  # datetime is a date
        return value.isoformat()
    return None


def toml_key(path: KeyPath) -> str:
    """A dotted key: bare parts where TOML allows them, quoted (and escaped) otherwise."""
    return ".".join(part if _BARE_KEY.fullmatch(part) else toml_string(part) for part in path)


def toml_value(value: object) -> str:
    """One TOML value, inline (tables become inline tables)."""
    if (scalar := _scalar(value)) is not None:
        return scalar
    if isinstance(value, Mapping):
        items = ", ".join(f"{toml_key((str(k),))} = {toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML for a {type(value).__name__}")


class TomlLines:
    """A TOML text built line by line; `key_at(n)` is the key path written on line n."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._keys: list[KeyPath] = []
        self._table: KeyPath = ()

    def comment(self, text: str) -> None:
        self._lines.append(f"# {text}" if text else "#")
        self._keys.append(())

    def table(self, path: KeyPath) -> None:
        self._lines.append(f"[{toml_key(path)}]")
        self._keys.append(path)
        self._table = path

    def value(self, path: KeyPath, value: object) -> None:
        """`key = value` for `path`, which must lie in the table written last."""
        if path[:-1] != self._table:
            raise ValueError(f"{toml_key(path)} is not in [{toml_key(self._table)}]")
        self._lines.append(f"{toml_key(path[-1:])} = {toml_value(value)}")
        self._keys.append(path)

    def key_at(self, line: int) -> KeyPath:
        """The key path of 1-based `line`; () for a comment or a line that is not there."""
        return self._keys[line - 1] if 1 <= line <= len(self._keys) else ()

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"
