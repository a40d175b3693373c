"""PMS5003 codec, stream parser and options: vectors, properties and the sample config."""

from __future__ import annotations

import ast
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers import OptionError, family
from drivers.pms5003 import FAMILY, Pms5003Options, StreamParser, codec

VECTORS = Path(__file__).parent.parent / "vectors" / "plantower_pms5003.json"
PACKAGE = Path(codec.__file__).parent
# vector field name -> our quantity name (SENSORS.md names are descriptive, not ours)
FIELD_TO_QUANTITY = {"pm1_atm": "pm1", "pm2_5_atm": "pm2_5", "pm10_atm": "pm10"}


def _vectors() -> list[dict[str, Any]]:
    data: dict[str, Any] = json.loads(VECTORS.read_text())
    vectors: list[dict[str, Any]] = data["vectors"]
    return vectors


def _hex(text: str) -> bytes:
    return bytes.fromhex(text)


def _values(records: list[tuple[str, str, float]]) -> dict[str, float]:
    return {quantity: value for quantity, _unit, value in records}


def _frame(pm1: int, pm2_5: int, pm10: int) -> bytes:
    return codec.encode_frame([pm1, pm2_5, pm10, pm1, pm2_5, pm10, 300, 100, 20, 5, 1, 0, 0x9700])


def _check_frame_vector(vector: dict[str, Any]) -> None:
    frame = _hex(vector["hex"])
    if vector.get("expect_error"):
        with pytest.raises(ValueError, match=r"\S"):
            codec.decode_frame(frame)
        return
    values = _values(codec.decode_frame(frame))
    for field, expected in vector["expect"].items():
        if field in FIELD_TO_QUANTITY:
            assert values[FIELD_TO_QUANTITY[field]] == expected


def _check_stream_vector(vector: dict[str, Any]) -> None:
    parser = StreamParser()
    frames = parser.feed(_hex(vector["hex"]))
    expect = vector["expect"]
    assert len(frames) == expect["frames"] == parser.frames
    for field, expected in expect.items():
        if field in FIELD_TO_QUANTITY:
            assert [_values(f)[FIELD_TO_QUANTITY[field]] for f in frames] == expected


def _check_command_vector(vector: dict[str, Any]) -> None:
    wire = _hex(vector["hex"])
    expect = vector["expect"]
    assert codec.parse_command(wire) == (expect["cmd"], expect["data"])
    assert codec.command(expect["cmd"], expect["data"]) == wire


def _check_ack_vector(vector: dict[str, Any]) -> None:
    wire = _hex(vector["hex"])
    assert vector["expect"]["checksum_ok"] is True
    cmd, data = codec.parse_ack(wire)
    assert codec.ack_frame(cmd, data) == wire
    parser = StreamParser()
    assert parser.feed(wire) == []
    assert (parser.acks, parser.bad_bytes, parser.bad_frames) == (1, 0, 0)


CHECKS = {
    "frame": _check_frame_vector,
    "stream": _check_stream_vector,
    "command": _check_command_vector,
    "ack8": _check_ack_vector,
}


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: str(v["id"]))
def test_every_vector_decodes_as_documented(vector: dict[str, Any]) -> None:
    assert vector["kind"] in CHECKS, f"no check for vector kind {vector['kind']!r}"
    CHECKS[vector["kind"]](vector)


def test_valid_frame_gives_atmospheric_values_in_ug_per_m3() -> None:
    frame = codec.encode_frame([11, 22, 33, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0x9700])
    assert codec.decode_frame(frame) == [
        ("pm1", "ug/m3", 1.0),
        ("pm2_5", "ug/m3", 2.0),
        ("pm10", "ug/m3", 3.0),
    ]
    assert FAMILY.decode(frame, {}).records == codec.decode_frame(frame)


def test_vector_frame_with_repaired_checksum_decodes() -> None:
    broken = _hex(next(v for v in _vectors() if v["id"] == "bad_checksum")["hex"])
    repaired = broken[:30] + (int.from_bytes(broken[30:], "big") - 1).to_bytes(2, "big")
    assert _values(codec.decode_frame(repaired)) == {"pm1": 0.0, "pm2_5": 8.0, "pm10": 8.0}


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (_frame(1, 2, 3)[:31], "31 bytes"),
        (b"BN" + _frame(1, 2, 3)[2:], "bad header"),
        (_frame(1, 2, 3)[:3] + b"\x1d" + _frame(1, 2, 3)[4:], "bad length field 29"),
        (
            codec.encode_frame([0] * 12 + [0x9700], checksum_delta=1),
            "expected 0x0142, frame has 0x0143",
        ),
    ],
)
def test_bad_frames_are_rejected_with_a_precise_reason(frame: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        codec.decode_frame(frame)


def test_command_with_wrong_lrc_is_rejected() -> None:
    with pytest.raises(ValueError, match="LRC"):
        codec.parse_command(bytes.fromhex("42 4D E2 00 00 00 71"))


def test_named_commands_match_the_documented_bytes() -> None:
    assert codec.PASSIVE_MODE.hex() == "424de100000170"
    assert codec.ACTIVE_MODE.hex() == "424de100010171"
    assert codec.PASSIVE_READ.hex() == "424de200000171"
    assert codec.SLEEP_COMMAND.hex() == "424de400000173"
    assert codec.WAKE_COMMAND.hex() == "424de400010174"


def test_frame_split_across_feeds_is_reassembled() -> None:
    parser = StreamParser()
    frame = _frame(4, 5, 6)
    assert all(parser.feed(frame[i : i + 1]) == [] for i in range(31))
    assert [_values(f) for f in parser.feed(frame[31:])] == [{"pm1": 4, "pm2_5": 5, "pm10": 6}]


def test_ack_between_frames_is_counted_not_treated_as_noise() -> None:
    parser = StreamParser()
    frames = parser.feed(_frame(1, 1, 1) + codec.ack_frame(0xE1, 1) + _frame(2, 2, 2))
    assert [_values(f)["pm1"] for f in frames] == [1, 2]
    assert (parser.frames, parser.acks, parser.bad_bytes, parser.bad_frames) == (2, 1, 0, 0)


def test_bad_checksum_frame_is_counted_and_next_frame_recovered() -> None:
    parser = StreamParser()
    bad = codec.encode_frame([9] * 13, checksum_delta=1)
    frames = parser.feed(bad + _frame(7, 7, 7))
    assert [_values(f)["pm2_5"] for f in frames] == [7]
    assert parser.bad_frames >= 1
    assert parser.bad_bytes == len(bad)


def test_pending_input_stays_bounded_on_endless_noise() -> None:
    parser = StreamParser()
    for _ in range(200):
        parser.feed(b"\x42\x4d\x00\x1c" + bytes(range(100)))
        assert parser.pending <= codec.MAX_PENDING


frame_words = st.lists(st.integers(0, 0xFFFF), min_size=13, max_size=13)
garbage_without_0x42 = st.binary(max_size=80).map(lambda b: b.replace(b"\x42", b"\x00"))


@given(
    items=st.lists(st.tuples(garbage_without_0x42, frame_words), max_size=8),
    tail=garbage_without_0x42,
    cuts=st.lists(st.integers(1, 40), max_size=30),
)
def test_frames_separated_by_garbage_are_all_recovered(
    items: list[tuple[bytes, list[int]]], tail: bytes, cuts: list[int]
) -> None:
    stream = b"".join(garbage + codec.encode_frame(words) for garbage, words in items) + tail
    parser = StreamParser()
    got: list[list[tuple[str, str, float]]] = []
    pos = 0
    for size in [*cuts, len(stream)]:  # feed in arbitrary pieces
        got += parser.feed(stream[pos : pos + size])
        pos += size
    assert [[v for _q, _u, v in f] for f in got] == [[float(x) for x in w[3:6]] for _g, w in items]
    assert parser.bad_bytes == sum(len(g) for g, _w in items) + len(tail)
    assert parser.frames == len(items)


@given(chunks=st.lists(st.binary(max_size=64), max_size=20))
def test_arbitrary_bytes_never_raise_and_every_byte_is_accounted_for(chunks: list[bytes]) -> None:
    parser = StreamParser()
    for chunk in chunks:
        parser.feed(chunk)
        assert parser.pending <= codec.MAX_PENDING
    consumed = 32 * parser.frames + 8 * parser.acks + parser.bad_bytes + parser.pending
    assert consumed == sum(len(c) for c in chunks)


def test_codec_imports_nothing_so_it_runs_on_micropython() -> None:
    tree = ast.parse((PACKAGE / "codec.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert imports == []


# -- options ---------------------------------------------------------------------------


def _sample_table() -> dict[str, Any]:
    with (PACKAGE / "sample.toml").open("rb") as fh:
        table: dict[str, Any] = tomllib.load(fh)["sensors"]["air_1"]
    return table


def test_sample_config_is_accepted_by_the_registered_family() -> None:
    table = _sample_table()
    assert table["driver"] == family("pms5003").name == "pms5003"
    options = family("pms5003").parse_options("air_1", table)
    assert options == Pms5003Options(port="/dev/ttyAMA0", mode="passive")


def test_readme_shows_the_sample_config_verbatim() -> None:
    sample = (PACKAGE / "sample.toml").read_text()
    assert f"```toml\n{sample}```" in (PACKAGE / "README.md").read_text()


def test_defaults_apply_when_only_the_port_is_given() -> None:
    options = FAMILY.parse_options("air_1", {"port": "/dev/ttyUSB0"})
    assert options == Pms5003Options("/dev/ttyUSB0", 9600, "active", 2.3, 10.0)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"port": None}, "port"),
        ({"port": ""}, "port"),
        ({"port": 3}, "port"),
        ({"baud": "9600"}, "baud"),
        ({"baud": 9601}, "baud"),
        ({"baud": True}, "baud"),
        ({"mode": "fast"}, "mode"),
        ({"poll_interval_s": "2"}, "poll_interval_s"),
        ({"poll_interval_s": 0}, "poll_interval_s"),
        ({"silence_timeout_s": -1.0}, "silence_timeout_s"),
        ({"silence_timeout_s": False}, "silence_timeout_s"),
        ({"silence_timeout_s": 2.0}, "silence_timeout_s"),  # not above the poll interval
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_option_raises_option_error_naming_the_key(changes: dict[str, Any], key: str) -> None:
    table = {**_sample_table(), **changes}
    table = {k: v for k, v in table.items() if v is not None}
    with pytest.raises(OptionError) as info:
        FAMILY.parse_options("air_1", table)
    assert info.value.key == key


def test_create_rejects_options_of_another_family() -> None:
    with pytest.raises(TypeError):
        FAMILY.create("air_1", {"port": "/dev/ttyAMA0"})


def test_created_driver_is_unavailable_until_it_runs() -> None:
    driver = FAMILY.create("air_1", FAMILY.parse_options("air_1", _sample_table()))
    state = driver.state()
    assert driver.sensor_id == "air_1"
    assert (state.available, state.reason) == (False, "not started")
    assert set(state.counters) == {
        "frames",
        "bad_frames",
        "bad_bytes",
        "acks",
        "warmup_frames",
        "blank_frames",
        "reopens",
        "spurious_wakes",
    }
