"""Register maps as data: load and check a profile (shipped TOML, a user's file, or inline).

A profile says how to read one kind of Modbus device: its default unit id and
serial settings, its limits (registers per request, gap filling per function,
unreadable holes), its timing (minimum idle time between requests, timeout,
retries, warm-up), an optional trigger write before each poll, and its fields
(quantity, unit, function, address, type, word order, scale, offset). The
shipped profiles live in `profiles/*.toml`; README.md documents every key.

Trust: profile files and inline maps are user input, unverified until
`profile_from_table` accepts them; every problem raises `ProfileError` naming
the key (``registers[3].type``). A loaded `Profile` is immutable and its reads
are planned once, by the codec's planner.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from drivers.modbus import codec

_T = TypeVar("_T")

PROFILE_DIR = Path(__file__).parent / "profiles"
PARITIES = ("N", "E", "O")
BAUD_RATES = (1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200)

_PROFILE_KEYS = frozenset(
    {
        "description", "unit_id", "baud", "parity", "stop_bits", "period_s", "max_registers",
        "max_gap", "min_idle_ms", "timeout_ms", "retries", "warmup_s", "word_order", "holes",
        "trigger", "registers",
    }
)  # fmt: skip
_FIELD_KEYS = frozenset(
    {
        "quantity", "unit", "function", "address", "type", "word_order", "scale", "offset",
        "publish", "status_mask", "status_bits",
    }
)  # fmt: skip


class ProfileError(ValueError):
    """A profile or register map is wrong; `key` names the offending key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True, slots=True)
class Field:
    """One value in the device's registers."""

    quantity: str
    unit: str
    function: int
    address: int
    kind: str
    word_order: str = "ABCD"
    scale: float = 1.0
    offset: float = 0.0
    publish: bool = True
    #: non-zero marks a status word: any of these bits set means the poll has no reading
    status_mask: int = 0
    #: names of the status bits, bit 0 first, for the reason shown
    status_bits: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        return codec.TYPE_REGISTERS[self.kind]

    def as_codec_field(self) -> tuple[str, str, int, str, str, float, float]:
        return (self.quantity, self.unit, self.address, self.kind, self.word_order,
                self.scale, self.offset)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Trigger:
    """A register write (function 6) before each poll, then a wait (URM13 passive mode)."""

    address: int
    value: int
    wait_s: float


@dataclass(frozen=True, slots=True)
class Read:
    """One planned request: `count` registers from `start` with `function`, and its fields."""

    function: int
    start: int
    count: int
    fields: tuple[Field, ...]


@dataclass(frozen=True, slots=True)
class Profile:
    """A checked register map with the device's settings and limits."""

    name: str
    fields: tuple[Field, ...]
    description: str = ""
    unit_id: int = 1
    baud: int = 9600
    parity: str = "N"
    stop_bits: int = 1
    period_s: float = 10.0
    max_registers: int = codec.MAX_READ_REGISTERS
    max_gaps: Mapping[int, int] = field(default_factory=dict)
    holes: tuple[tuple[int, int, int], ...] = ()
    min_idle_s: float = 0.0
    timeout_s: float = 1.0
    retries: int = 1
    warmup_s: float = 0.0
    trigger: Trigger | None = None
    reads: tuple[Read, ...] = ()

    def with_settings(self, **changes: Any) -> Profile:
        """A copy with other settings (or a word order forced on every field); replanned."""
        order = changes.pop("word_order", None)
        fields = self.fields
        if order is not None:  # 16-bit fields keep theirs: byte-swapping orders are explicit
            fields = tuple(f if f.count == 1 else replace(f, word_order=order) for f in fields)
        return plan(replace(self, fields=fields, **changes))


def plan(profile: Profile) -> Profile:
    """The profile with its reads planned; ProfileError if its limits cannot be met."""
    fields = profile.fields
    try:
        groups = codec.plan_reads(
            [(f.function, f.address, f.count) for f in fields],
            profile.max_registers,
            dict(profile.max_gaps),
            list(profile.holes),
        )
    except codec.PlanError as exc:
        raise ProfileError("registers", str(exc)) from None
    reads = tuple(
        Read(function, start, count, tuple(fields[i] for i in indices))
        for function, start, count, indices in groups
    )
    return replace(profile, reads=reads)


# -- loading ------------------------------------------------------------------------


def shipped_profiles() -> list[str]:
    """Names of the profiles in profiles/*.toml."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name, or a TOML file by path; ProfileError names the key."""
    if "/" not in name_or_path and not name_or_path.endswith(".toml"):
        path = PROFILE_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            known = ", ".join(shipped_profiles())
            raise ProfileError("profile", f"no profile {name_or_path!r}; shipped: {known}")
        name = name_or_path
    else:
        path = Path(name_or_path)
        name = path.stem
    try:
        with path.open("rb") as fh:
            table = tomllib.load(fh)
    except OSError as exc:
        raise ProfileError("profile", f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError("profile", f"{path} is not valid TOML: {exc}") from None
    try:
        return profile_from_table(name, table)
    except ProfileError as exc:
        raise ProfileError("profile", f"{path}: {exc}") from None


def profile_from_table(name: str, table: Mapping[str, Any]) -> Profile:
    """Check a profile table (a whole file, or the settings of an inline map)."""
    for key in table:
        if key not in _PROFILE_KEYS:
            raise ProfileError(key, "unknown key in a register map")
    if "registers" not in table:
        raise ProfileError("registers", "missing: the array of register fields")
    order = _choice(table, "word_order", codec.WORD_ORDERS, "ABCD")
    fields = parse_fields(table["registers"], order)
    trigger = _trigger(table.get("trigger"))
    profile = Profile(
        name=name,
        fields=fields,
        description=_string(table, "description", ""),
        unit_id=_integer(table, "unit_id", 1, 0, 255),
        baud=_baud(table.get("baud", 9600)),
        parity=_choice(table, "parity", PARITIES, "N"),
        stop_bits=_integer(table, "stop_bits", 1, 1, 2),
        period_s=_number(table, "period_s", 10.0, 0.05, 86400.0),
        max_registers=_integer(table, "max_registers", codec.MAX_READ_REGISTERS, 1, 125),
        max_gaps=_max_gaps(table.get("max_gap", 0)),
        holes=_holes(table.get("holes", [])),
        min_idle_s=_number(table, "min_idle_ms", 0.0, 0.0, 10000.0) / 1000.0,
        timeout_s=_number(table, "timeout_ms", 1000.0, 1.0, 60000.0) / 1000.0,
        retries=_integer(table, "retries", 1, 0, 10),
        warmup_s=_number(table, "warmup_s", 0.0, 0.0, 86400.0),
        trigger=trigger,
    )
    return plan(profile)


def parse_fields(raw: object, default_order: str = "ABCD") -> tuple[Field, ...]:
    """Check an array of register tables; ProfileError names ``registers[i].key``."""
    if not isinstance(raw, list) or not raw:
        raise ProfileError("registers", "must be a non-empty array of tables")
    fields = tuple(_field(i, entry, default_order) for i, entry in enumerate(raw))
    seen: set[str] = set()
    for i, f in enumerate(fields):
        if f.publish and f.quantity in seen:
            raise ProfileError(f"registers[{i}].quantity", f"{f.quantity!r} appears twice")
        seen.add(f.quantity)
    return fields


def _field(index: int, entry: object, default_order: str) -> Field:
    where = f"registers[{index}]"
    if not isinstance(entry, dict):
        raise ProfileError(where, "must be a table")
    for key in entry:
        if key not in _FIELD_KEYS:
            raise ProfileError(f"{where}.{key}", "unknown key in a register field")
    try:
        return _checked_field(entry, default_order)
    except ProfileError as exc:
        raise ProfileError(f"{where}.{exc.key}", exc.message) from None


def _checked_field(entry: Mapping[str, Any], default_order: str) -> Field:
    quantity = entry.get("quantity")
    if not isinstance(quantity, str) or not _is_quantity_name(quantity):
        raise ProfileError("quantity", "must be a lower-case name such as active_power")
    for key in ("function", "address", "type"):
        if key not in entry:
            raise ProfileError(key, "missing")
    kind = _choice(entry, "type", tuple(sorted(codec.TYPE_REGISTERS)), "")
    mask = _integer(entry, "status_mask", 0, 0, 0xFFFF)
    bits = entry.get("status_bits", [])
    if not isinstance(bits, list) or not all(isinstance(b, str) for b in bits):
        raise ProfileError("status_bits", "must be an array of strings (bit 0 first)")
    publish = entry.get("publish", mask == 0)
    if not isinstance(publish, bool):
        raise ProfileError("publish", "must be true or false")
    return Field(
        quantity=quantity,
        unit=_string(entry, "unit", ""),
        function=_choice(entry, "function", codec.READ_FUNCTIONS, 0),
        address=_integer(entry, "address", 0, 0, 0xFFFF),
        kind=kind,
        word_order=_choice(entry, "word_order", codec.WORD_ORDERS, default_order),
        scale=_number(entry, "scale", 1.0, -1e12, 1e12),
        offset=_number(entry, "offset", 0.0, -1e12, 1e12),
        publish=publish,
        status_mask=mask,
        status_bits=tuple(bits),
    )


def _is_quantity_name(name: str) -> bool:
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789_")
    return bool(name) and name[0].isalpha() and set(name) <= allowed


def _trigger(raw: object) -> Trigger | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"address", "value", "wait_ms"}:
        raise ProfileError("trigger", "must be a table { address, value, wait_ms }")
    for key in ("address", "value"):
        if key not in raw:
            raise ProfileError(f"trigger.{key}", "missing")
    try:
        return Trigger(
            address=_integer(raw, "address", 0, 0, 0xFFFF),
            value=_integer(raw, "value", 0, 0, 0xFFFF),
            wait_s=_number(raw, "wait_ms", 0.0, 0.0, 60000.0) / 1000.0,
        )
    except ProfileError as exc:
        raise ProfileError(f"trigger.{exc.key}", exc.message) from None


def _max_gaps(raw: object) -> dict[int, int]:
    if isinstance(raw, int) and not isinstance(raw, bool):
        if not 0 <= raw <= codec.MAX_READ_REGISTERS:
            raise ProfileError("max_gap", f"must be 0-125 registers, got {raw}")
        return dict.fromkeys(codec.READ_FUNCTIONS, raw)
    if not isinstance(raw, dict):
        raise ProfileError("max_gap", 'must be a number of registers or a table {"3" = n, "4" = n}')
    gaps: dict[int, int] = {}
    for key in raw:
        if key not in ("3", "4"):
            raise ProfileError(f"max_gap.{key}", "function codes are 3 and 4")
        gaps[int(key)] = _integer(raw, key, 0, 0, codec.MAX_READ_REGISTERS)
    return gaps


def _holes(raw: object) -> tuple[tuple[int, int, int], ...]:
    if not isinstance(raw, list):
        raise ProfileError("holes", "must be an array of { function, first, last } tables")
    holes = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or set(entry) != {"function", "first", "last"}:
            raise ProfileError(f"holes[{i}]", "must be a table { function, first, last }")
        try:
            function = _choice(entry, "function", codec.READ_FUNCTIONS, 0)
            first = _integer(entry, "first", 0, 0, 0xFFFF)
            last = _integer(entry, "last", 0, first, 0xFFFF)
        except ProfileError as exc:
            raise ProfileError(f"holes[{i}].{exc.key}", exc.message) from None
        holes.append((function, first, last))
    return tuple(holes)


# -- typed reads (shared with the driver's options) ------------------------------------------


def _baud(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in BAUD_RATES:
        raise ProfileError("baud", f"must be one of {list(BAUD_RATES)}, got {value!r}")
    return value


def _string(table: Mapping[str, Any], key: str, default: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise ProfileError(key, f"must be a string, got {type(value).__name__}")
    return value


def _integer(table: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProfileError(key, f"must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise ProfileError(key, f"must be between {low} and {high}, got {value}")
    return value


def _number(table: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProfileError(key, f"must be a number, got {type(value).__name__}")
    if not low <= value <= high:
        raise ProfileError(key, f"must be between {low:g} and {high:g}, got {value:g}")
    return float(value)


def _choice(table: Mapping[str, Any], key: str, choices: Sequence[_T], default: _T) -> _T:
    value = table.get(key, default)
    if value not in choices or isinstance(value, bool):
        shown = ", ".join(repr(c) for c in choices)
        raise ProfileError(key, f"must be one of {shown}, got {value!r}")
    return value  # type: ignore[no-any-return]


#: the typed readers, for the driver's option checks
read_integer = _integer
read_number = _number
read_choice = _choice
read_baud = _baud
