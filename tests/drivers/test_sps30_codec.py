"""SPS30 SHDLC codec and stream parser: vectors through `citygate decode`, properties, options."""

from __future__ import annotations

import ast
import json
import math
import struct
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers import OptionError, family
from drivers.sps30 import FAMILY, Sps30Options, codec
from tests.agentrig import citygate

VECTORS = Path(__file__).parent.parent / "vectors" / "sensirion_sps30.json"
PACKAGE = Path(codec.__file__).parent
NAMES = [name for name, _unit in codec.QUANTITIES]


def _vectors() -> list[dict[str, Any]]:
    data: dict[str, Any] = json.loads(VECTORS.read_text())
    vectors: list[dict[str, Any]] = data["vectors"]
    return vectors


def _hex(text: str) -> bytes:
    return bytes.fromhex(text)


def _floats(*values: float) -> bytes:
    return struct.pack(">10f", *values)


SAMPLE = (1.5, 2.25, 3.1, 4.0, 10.0, 11.5, 12.0, 12.5, 13.0, 0.55)


def test_every_vector_decodes_as_documented_through_the_command_line() -> None:
    vectors = _vectors()
    result = citygate("decode", "sps30", *[v["hex"] for v in vectors])
    lines = result.stdout.splitlines()
    assert len(lines) == len(vectors), result.stderr
    for vector, line in zip(vectors, lines, strict=True):
        got = json.loads(line)
        where = vector["id"]
        if vector.get("expect_error"):
            assert got == {"ok": False, "error": "bad checksum: expected 0xfc, frame has 0xfd"}
            continue
        assert got["ok"] is True, where
        assert got["records"] == [], where  # no vector carries measured values
        if vector["kind"] == "mosi":
            assert got["note"].startswith(f"host command 0x{vector['build']['cmd']:02x} ("), where
    notes = {v["id"]: json.loads(line).get("note") for v, line in zip(vectors, lines, strict=True)}
    assert notes["no_new_data"] == "no new measured values yet"
    assert notes["not_allowed_in_state"] == (
        "sensor refused 0x00 (start measurement): state 0x43: command not allowed in current state"
    )


@pytest.mark.parametrize("vector", _vectors(), ids=lambda v: str(v["id"]))
def test_every_vector_field_matches_the_codec(vector: dict[str, Any]) -> None:
    wire = _hex(vector["hex"])
    if vector.get("expect_error"):
        with pytest.raises(codec.FrameError, match="bad checksum"):
            codec.decode(wire)
    elif vector["kind"] == "mosi":
        build = vector["build"]
        assert codec.mosi_frame(build["cmd"], _hex(build["data"])) == wire
        assert codec.parse_mosi(wire) == (codec.ADDRESS, build["cmd"], _hex(build["data"]))
        assert codec.classify(wire) == "mosi"
    else:
        expect = vector["expect"]
        address, cmd, state, data = codec.parse_miso(wire)
        assert (address, cmd, state, len(data)) == (0, expect["cmd"], expect["state"], 0)
        assert codec.miso_frame(cmd, state, data) == wire
        assert codec.decode(wire) == []


def test_float_reply_gives_ten_records_in_sensor_order() -> None:
    frame = codec.miso_frame(codec.CMD_READ, 0, _floats(*SAMPLE))
    records = codec.decode(frame)
    assert [(n, u) for n, u, _v in records] == list(codec.QUANTITIES)
    assert [v for _n, _u, v in records] == list(SAMPLE)
    assert FAMILY.decode(frame, {}).records == records
    assert {"pm1", "pm2_5", "pm4", "pm10", "particle_size"} <= set(NAMES)
    assert dict(codec.QUANTITIES)["pm10"] == "ug/m3"
    assert dict(codec.QUANTITIES)["particle_size"] == "um"


def test_uint16_reply_reports_particle_size_in_micrometres() -> None:
    words = struct.pack(">10H", 1, 2, 3, 4, 50, 60, 70, 80, 90, 523)
    records = codec.decode(codec.miso_frame(codec.CMD_READ, 0, words))
    assert [v for _n, _u, v in records] == [1, 2, 3, 4, 50, 60, 70, 80, 90, 0.523]


def test_float32_is_decoded_by_arithmetic_to_the_shortest_decimal() -> None:
    for value in (0.1, 1e-3, 123.45, 999.99, 65535.5, 1.0e-40, 3.4e38, -2.5, 0.0):
        decoded = codec.measured_values(struct.pack(">f", value) + bytes(36))[0][2]
        assert struct.pack(">f", decoded) == struct.pack(">f", value)
        assert len(repr(decoded)) <= len(repr(value)) + 1


@pytest.mark.parametrize("bits", [0x7F800000, 0xFF800000, 0x7FC00000])
def test_non_finite_values_are_rejected(bits: int) -> None:
    frame = codec.miso_frame(codec.CMD_READ, 0, bits.to_bytes(4, "big") + bytes(36))
    with pytest.raises(codec.FrameError, match=r"byte 0 is (NaN|infinite)"):
        codec.decode(frame)


def test_stuffing_escapes_exactly_the_four_special_bytes() -> None:
    raw = bytes(range(256))
    wire = codec.stuff(raw)
    assert len(wire) == 256 + 4
    assert codec.FLAG not in wire
    assert codec.unstuff(wire) == raw
    assert codec.stuff(b"\x7e\x7d\x11\x13") == _hex("7D 5E 7D 5D 7D 31 7D 33")


def test_a_measured_value_that_needs_stuffing_round_trips() -> None:
    data = _floats(9.0625, 63.5, *SAMPLE[2:])  # 0x41110000 and 0x427e0000
    frame = codec.miso_frame(codec.CMD_READ, 0, data)
    assert len(frame) == 4 + 1 + len(data) + 2 + 2  # two bytes were escaped
    assert codec.parse_miso(frame)[3] == data


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (_hex("7E 00 03 00 00 FC"), "starts and ends with 0x7e"),
        (_hex("7E 00 03 7D 7E"), "unexpected 0x7e|middle of an escape"),
        (_hex("7E 00 03 7D 20 00 FC 7E"), "invalid escape 0x7d 0x20"),
        (_hex("7E 00 03 7E"), "at least 4"),
        (_hex("7E 00 03 00 05 F7 7E"), "matches neither"),
        (_hex("7E 00 03 00 02 01 02 F7 7E"), "measured values are 2 bytes"),
    ],
)
def test_bad_frames_are_rejected_with_a_precise_reason(wire: bytes, reason: str) -> None:
    with pytest.raises(codec.FrameError, match=reason):
        codec.decode(wire)


def test_state_byte_meanings_and_the_device_error_flag() -> None:
    assert codec.state_text(0x43) == "0x43: command not allowed in current state"
    assert codec.state_text(0x01) == "0x01: wrong data length for this command"
    assert codec.state_text(0x7F) == "0x7f: unknown error code"
    assert codec.state_text(0x80).endswith("device error flag set (see the status register)")
    flagged = codec.miso_frame(codec.CMD_READ, 0x80, _floats(*SAMPLE))
    decoded = FAMILY.decode(flagged, {})
    assert len(decoded.records) == 10  # the values are still valid
    assert "device error flag" in decoded.note
    assert codec.status_text(1 << 4 | 1 << 21) == "fan speed out of range, fan failure"
    assert codec.status_text(0) == "ok"


def test_info_text_stops_at_the_terminator() -> None:
    assert codec.info_text(b"ABC123\x00\xff") == "ABC123"
    assert codec.info_text(b"A\x01B") == "A?B"


def test_stream_restarts_at_the_closing_flag_of_a_broken_frame() -> None:
    good = codec.miso_frame(codec.CMD_READ, 0, _floats(*SAMPLE))
    empty = codec.miso_frame(codec.CMD_READ)
    parser = codec.StreamParser()
    # a frame cut short runs into the next one's opening flag; noise; an empty read
    frames = parser.feed(good[:20] + good + b"\x01\x02" + empty)
    assert [len(f[3]) for f in frames] == [40, 0]
    assert parser.bad_frames == 1
    assert parser.bad_bytes == 20 + 2
    assert parser.frame_bytes == len(good) + len(empty)


def test_mosi_parser_sees_host_commands_and_skips_the_wake_pulse() -> None:
    parser = codec.StreamParser(miso=False)
    wake = codec.WAKE_PULSE + codec.mosi_frame(codec.CMD_WAKE)
    frames = parser.feed(wake + codec.mosi_frame(codec.CMD_START, b"\x01\x03"))
    assert frames == [(0, codec.CMD_WAKE, 0, b""), (0, codec.CMD_START, 0, b"\x01\x03")]
    assert parser.bad_bytes == 1


def test_a_stream_split_at_every_boundary_decodes_the_same() -> None:
    values = codec.miso_frame(codec.CMD_READ, 0, _floats(9.0625, 63.5, *SAMPLE[2:]))
    stream = (
        b"\x7d\x7e"
        + values[:25]  # truncated: runs into the next frame's opening flag
        + values
        + codec.miso_frame(codec.CMD_READ)
        + b"\x7e\x7e\x00"
        + codec.miso_frame(codec.CMD_START, 0x43)
    )
    whole = codec.StreamParser().feed(stream)
    assert [(cmd, state, len(data)) for _a, cmd, state, data in whole] == [
        (codec.CMD_READ, 0, 40),
        (codec.CMD_READ, 0, 0),
        (codec.CMD_START, 0x43, 0),
    ]
    for cut in range(len(stream) + 1):
        parser = codec.StreamParser()
        assert parser.feed(stream[:cut]) + parser.feed(stream[cut:]) == whole, cut


frames_strategy = st.lists(
    st.tuples(
        st.binary(max_size=12).map(lambda b: b.replace(b"\x7e", b"")),
        st.sampled_from([codec.CMD_READ, codec.CMD_START, codec.CMD_INFO]),
        st.integers(0, 0xFF),
        st.binary(max_size=48),
    ),
    max_size=6,
)


@given(items=frames_strategy, tail=st.binary(max_size=12), cuts=st.lists(st.integers(1, 30)))
def test_frames_between_noise_are_all_recovered_whatever_the_split(
    items: list[tuple[bytes, int, int, bytes]], tail: bytes, cuts: list[int]
) -> None:
    tail = tail.replace(b"\x7e", b"")
    stream = b"".join(noise + codec.miso_frame(cmd, st_, data) for noise, cmd, st_, data in items)
    stream += tail
    parser = codec.StreamParser()
    got: list[tuple[int, int, int, bytes]] = []
    pos = 0
    for size in [*cuts, len(stream)]:
        got += parser.feed(stream[pos : pos + size])
        pos += size
    assert got == [(0, cmd, st_, data) for _n, cmd, st_, data in items]
    assert parser.bad_bytes == sum(len(n) for n, *_rest in items) + len(tail)


@given(chunks=st.lists(st.binary(max_size=40), max_size=20))
def test_arbitrary_bytes_never_raise_and_every_byte_is_accounted_for(chunks: list[bytes]) -> None:
    parser = codec.StreamParser()
    whole = codec.StreamParser()
    got = [frame for chunk in chunks for frame in parser.feed(chunk)]
    assert parser.pending <= codec.MAX_PENDING
    assert parser.frame_bytes + parser.bad_bytes + parser.pending == sum(map(len, chunks))
    assert got == whole.feed(b"".join(chunks))


@given(data=st.binary(max_size=60))
def test_any_bytes_decode_to_records_or_the_codec_error(data: bytes) -> None:
    framed = b"\x7e" + data + b"\x7e"
    for candidate in (data, framed):
        try:
            records = codec.decode(candidate)
        except codec.FrameError:
            continue  # the codec's own error, with a reason (checked by the tests above)
        assert all(math.isfinite(v) for _n, _u, v in records)


@given(values=st.lists(st.floats(0, 1000, width=32), min_size=10, max_size=10))
def test_any_float_sample_decodes_to_the_same_float32_values(values: list[float]) -> None:
    records = codec.decode(codec.miso_frame(codec.CMD_READ, 0, _floats(*values)))
    assert [struct.pack(">f", v) for _n, _u, v in records] == [struct.pack(">f", v) for v in values]


def test_codec_imports_nothing_so_it_runs_on_micropython() -> None:
    tree = ast.parse((PACKAGE / "codec.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert imports == []


# -- options ---------------------------------------------------------------------------


def _sample_table() -> dict[str, Any]:
    with (PACKAGE / "sample.toml").open("rb") as fh:
        table: dict[str, Any] = tomllib.load(fh)["sensors"]["air_3"]
    return table


def test_sample_config_is_accepted_by_the_registered_family() -> None:
    table = _sample_table()
    assert table["driver"] == family("sps30").name == "sps30"
    assert family("sps30").parse_options("air_3", table) == Sps30Options(port="/dev/ttyAMA0")


def test_readme_shows_the_sample_config_verbatim() -> None:
    sample = (PACKAGE / "sample.toml").read_text()
    assert f"```toml\n{sample}```" in (PACKAGE / "README.md").read_text()


def test_defaults_apply_when_only_the_port_is_given() -> None:
    options = FAMILY.parse_options("air_3", {"port": "/dev/ttyUSB1"})
    assert options == Sps30Options("/dev/ttyUSB1", 115200, "float", 1.0, 10.0, True)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"port": None}, "port"),
        ({"port": 7}, "port"),
        ({"baud": 115201}, "baud"),
        ({"output": "double"}, "output"),
        ({"poll_interval_s": 0.1}, "poll_interval_s"),
        ({"poll_interval_s": "1"}, "poll_interval_s"),
        ({"silence_timeout_s": 1.0}, "silence_timeout_s"),  # not above the poll interval
        ({"sleep_on_stop": 1}, "sleep_on_stop"),
        ({"fan_cleaning": True}, "fan_cleaning"),
    ],
)
def test_bad_option_raises_option_error_naming_the_key(changes: dict[str, Any], key: str) -> None:
    table = {**_sample_table(), **changes}
    table = {k: v for k, v in table.items() if v is not None}
    with pytest.raises(OptionError) as info:
        FAMILY.parse_options("air_3", table)
    assert info.value.key == key


def test_create_rejects_options_of_another_family() -> None:
    with pytest.raises(TypeError):
        FAMILY.create("air_3", {"port": "/dev/ttyAMA0"})


def test_created_driver_is_unavailable_until_it_runs() -> None:
    driver = FAMILY.create("air_3", FAMILY.parse_options("air_3", _sample_table()))
    state = driver.state()
    assert driver.sensor_id == "air_3"
    assert (state.available, state.reason) == (False, "not started")
    assert {"frames", "bad_frames", "bad_bytes", "empty_reads", "state_errors"} <= set(
        state.counters
    )
