"""Helpers for checking a parsed TOML file: where each key is written, typed reads.

`tomllib` returns plain dicts without positions, so config errors would have no
line to point at. `KeyLines` scans the raw text once, follows table headers,
dotted keys and inline tables, and remembers the first line on which each key
path appears. It validates nothing: it is asked about text that `tomllib` has
already accepted, and on anything else it gives its best guess.

`Table` reads one table's keys with type and range checks and files each
problem in a `Report` under its key path; `agent.config` turns those into
file:line:key issues.

Trust: none needed; the input may be any string. The scanner never raises,
always terminates, and falls back to the nearest known line (then line 1).
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

KeyPath = tuple[str, ...]

_BARE_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
#: deeper arrays/inline tables are skipped without recording their keys
_MAX_DEPTH = 32


def render_key(path: Sequence[str]) -> str:
    """A key path as it would be written in TOML: `sensors.bin_7.port`, `sensors."a b"`."""
    return ".".join(
        part if part and set(part) <= _BARE_KEY_CHARS else json.dumps(part) for part in path
    )


class KeyLines:
    """Line numbers (1-based) of the key paths defined in one TOML text."""

    def __init__(self, text: str) -> None:
        self._lines: dict[KeyPath, int] = {}
        _Scanner(text, self._lines).run()
        # the first line of anything below each path: one lookup per question, however
        # many keys the file has and however many problems are asked about
        self._first_below: dict[KeyPath, int] = {}
        for known, line in self._lines.items():
            for end in range(1, len(known) + 1):
                prefix = known[:end]
                self._first_below[prefix] = min(line, self._first_below.get(prefix, line))

    def line_of(self, path: Sequence[str]) -> int:
        """The line defining `path`, else of its first descendant, else of its nearest ancestor.

        Line 1 if none of them is written in the text.
        """
        key = tuple(path)
        if key in self._lines:
            return self._lines[key]
        if key in self._first_below:
            return self._first_below[key]
        for end in range(len(key) - 1, 0, -1):
            if key[:end] in self._lines:
                return self._lines[key[:end]]
        return 1


def _decode_quoted(raw: str) -> str:
    """The value of a quoted key as TOML reads it; the raw inner text if that fails."""
    try:
        value = tomllib.loads(f"k = {raw}").get("k")
    except tomllib.TOMLDecodeError:
        value = None
    return value if isinstance(value, str) else raw[1:-1]


class _Scanner:
    """One pass over the text; records paths into the shared dict (first line wins)."""

    def __init__(self, text: str, lines: dict[KeyPath, int]) -> None:
        self.s = text
        self.i = 0
        self.line = 1
        self.lines = lines

    # -- characters -------------------------------------------------------------

    def peek(self, ahead: int = 0) -> str:
        j = self.i + ahead
        return self.s[j] if j < len(self.s) else ""

    def advance(self, count: int = 1) -> None:
        for _ in range(count):
            if self.i >= len(self.s):
                return
            if self.s[self.i] == "\n":
                self.line += 1
            self.i += 1

    def skip_blanks(self) -> None:
        while self.peek() in (" ", "\t"):
            self.advance()

    def skip_to_line_end(self) -> None:
        while self.peek() not in ("", "\n"):
            self.advance()

    def skip_space_and_comments(self) -> None:
        while True:
            char = self.peek()
            if char in (" ", "\t", "\r", "\n"):
                self.advance()
            elif char == "#":
                self.skip_to_line_end()
            else:
                return

    def record(self, path: KeyPath, line: int) -> None:
        self.lines.setdefault(path, line)

    # -- structure -------------------------------------------------------------

    def run(self) -> None:
        table: KeyPath = ()
        while True:
            self.skip_space_and_comments()
            if self.peek() == "":
                return
            start = self.i
            if self.peek() == "[":
                table = self.header(table)
            else:
                self.key_value(table, depth=0)
            self.skip_to_line_end()
            if self.i == start:
                self.advance()

    def header(self, current: KeyPath) -> KeyPath:
        line = self.line
        self.advance(2 if self.peek(1) == "[" else 1)
        parts = self.dotted_key()
        if parts is None:
            return current
        self.record(parts, line)
        return parts

    def key_value(self, table: KeyPath | None, depth: int) -> None:
        """`key = value`; keys under `table`, or not recorded at all if it is None."""
        line = self.line
        parts = self.dotted_key()
        if parts is None:
            return
        self.skip_blanks()
        if self.peek() != "=":
            return
        self.advance()
        if table is None:
            self.value(None, depth)
            return
        path = table + parts
        for end in range(len(table) + 1, len(path) + 1):
            self.record(path[:end], line)
        self.value(path, depth)

    def dotted_key(self) -> KeyPath | None:
        parts: list[str] = []
        while True:
            self.skip_blanks()
            part = self.simple_key()
            if part is None:
                return None
            parts.append(part)
            self.skip_blanks()
            if self.peek() != ".":
                return tuple(parts)
            self.advance()

    def simple_key(self) -> str | None:
        quote = self.peek()
        if quote in ('"', "'"):
            start = self.i
            self.string(quote, multiline=False)
            return _decode_quoted(self.s[start : self.i])
        start = self.i
        while self.peek() in _BARE_KEY_CHARS and self.peek() != "":
            self.advance()
        return self.s[start : self.i] if self.i > start else None

    # -- values ------------------------------------------------------------------

    def value(self, path: KeyPath | None, depth: int) -> None:
        self.skip_blanks()
        char = self.peek()
        if char in ('"', "'"):
            multiline = self.s.startswith(char * 3, self.i)
            self.string(char, multiline=multiline)
        elif char == "[":
            self.array(depth + 1)
        elif char == "{":
            self.inline_table(path, depth + 1)
        else:
            while self.peek() not in ("", ",", "]", "}", "#", "\n"):
                self.advance()

    def string(self, quote: str, *, multiline: bool) -> None:
        if multiline:
            self.advance(3)
            while self.peek() != "":
                if quote == '"' and self.peek() == "\\":
                    self.advance(2)
                elif self.s.startswith(quote * 3, self.i):
                    self.advance(3)
                    # up to two more quotes may belong to the content
                    for _ in range(2):
                        if self.peek() == quote:
                            self.advance()
                    return
                else:
                    self.advance()
            return
        self.advance()
        while self.peek() not in ("", "\n"):
            char = self.peek()
            if quote == '"' and char == "\\":
                self.advance(2)
                continue
            self.advance()
            if char == quote:
                return

    def array(self, depth: int) -> None:
        self.advance()
        while True:
            self.skip_space_and_comments()
            char = self.peek()
            if char in ("", "]"):
                self.advance()
                return
            start = self.i
            if char == "," or depth > _MAX_DEPTH:
                self.advance()
            else:
                self.value(None, depth)  # keys inside array elements are not located
            if self.i == start:
                self.advance()

    def inline_table(self, path: KeyPath | None, depth: int) -> None:
        self.advance()
        while True:
            self.skip_space_and_comments()
            char = self.peek()
            if char in ("", "}"):
                self.advance()
                return
            start = self.i
            if char == "," or depth > _MAX_DEPTH:
                self.advance()
            else:
                self.key_value(path, depth)
            if self.i == start:
                self.advance()


# -- typed reads of one table, problems keyed by path -------------------------------


def describe_type(value: object) -> str:
    """The TOML name of a parsed value's type, for messages."""
    if isinstance(value, bool):
        return "boolean"
    names = {int: "integer", float: "float", str: "string", list: "array", dict: "table"}
    return names.get(type(value), "date/time")


class Report:
    """Problems found so far, keyed by the dotted key path they belong to."""

    def __init__(self) -> None:
        self.problems: list[tuple[KeyPath, str]] = []
        self._where: set[KeyPath] = set()  # `has` in constant time: a file may hold thousands

    def add(self, where: KeyPath, message: str) -> None:
        self.problems.append((where, message))
        self._where.add(where)

    def has(self, where: KeyPath) -> bool:
        return where in self._where


class Table:
    """Typed reads of one table's keys; a bad value is reported and its default returned.

    The defaults stand in only so checking can go on: `load_config` raises
    before anything built from them is returned.
    """

    def __init__(self, report: Report, where: KeyPath, data: Mapping[str, Any]) -> None:
        self.report = report
        self.where = where
        self.data = data
        self.read: list[str] = []

    def problem(self, key: str, message: str) -> None:
        self.report.add((*self.where, key), message)

    def ok(self, *keys: str) -> bool:
        return not any(self.report.has((*self.where, key)) for key in keys)

    def _take(self, key: str, required: bool, expected: str, kinds: tuple[type, ...]) -> Any:
        """The value if present and of one of `kinds`; else None (after reporting)."""
        self.read.append(key)
        if key not in self.data:
            if required:
                self.problem(key, "missing required key")
            return None
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, kinds):
            self.problem(key, f"expected {expected}, got {describe_type(value)}")
            return None
        return value

    def text(self, key: str, default: str | None, check: Callable[[str], str | None]) -> str:
        value = self._take(key, default is None, "a string", (str,))
        if value is None:
            return default or ""
        if problem := check(value):
            self.problem(key, problem)
        return str(value)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self._take(key, False, "a string", (str,))
        if value is None:
            return default
        if value not in choices:
            self.problem(key, f"must be one of: {', '.join(choices)}; got {value!r}")
        return str(value)

    def boolean(self, key: str, default: bool) -> bool:
        self.read.append(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if not isinstance(value, bool):
            self.problem(key, f"expected true or false, got {describe_type(value)}")
            return default
        return value

    def integer(self, key: str, default: int, low: int, high: int | None) -> int:
        value = self._take(key, False, "an integer", (int,))
        if value is None:
            return default
        if high is None and value < low:
            self.problem(key, f"must be at least {low}, got {value}")
        elif high is not None and not low <= value <= high:
            self.problem(key, f"must be between {low} and {high}, got {value}")
        return int(value)

    def number(self, key: str, default: float, *, at_most: float) -> float:
        """A float (integers accepted) in (0, at_most]."""
        value = self._take(key, False, "a number", (int, float))
        if value is None:
            return default
        if not (math.isfinite(value) and 0 < value <= at_most):
            self.problem(key, f"must be greater than 0 and at most {at_most:g}, got {value}")
        return float(value)

    def required_number(self, key: str, *, at_most: float) -> float:
        """A required float (integers accepted) in (0, at_most]; NaN after reporting."""
        value = self._take(key, True, "a number", (int, float))
        if value is None:
            return math.nan
        if not (math.isfinite(value) and 0 < value <= at_most):
            self.problem(key, f"must be greater than 0 and at most {at_most:g}, got {value}")
        return float(value)

    def path(self, key: str, default: Path | None, base: Path) -> Path:
        """A file system path; a relative one is taken from `base`."""
        value = self._take(key, default is None, "a string", (str,))
        if value is None:
            return default or base
        if not value or "\x00" in value:
            self.problem(key, "a path cannot contain a NUL character" if value else "empty path")
            return base
        return base / str(value)

    def finish(self) -> None:
        """Report the keys that the schema does not have."""
        expected = ", ".join(self.read)
        for key in self.data:
            if key not in self.read:
                self.problem(key, f"unknown key; expected one of: {expected}")
