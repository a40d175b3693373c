"""A02YYUW / JSN-SR04T codec, stream parser and options: vectors, properties, sample config."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers import OptionError, family
from drivers.a02yyuw import FAMILY, A02yyuwOptions, FrameError, StreamParser, codec
from tests.agentrig import citygate

VECTOR_DIR = Path(__file__).parent.parent / "vectors"
VECTOR_FILES = ("dfrobot_a02yyuw.json", "jsn_sr04t.json")
PACKAGE = Path(codec.__file__).parent
# vectors that are valid frames but not distances: the vector's own origin says so
# ("application should treat <=30 mm as 'too close/invalid'"), so the family flags them
FLAGGED = {"computed_30mm_blind_zone": "below range"}


def _vectors(name: str) -> list[dict[str, Any]]:
    data: dict[str, Any] = json.loads((VECTOR_DIR / name).read_text())
    vectors: list[dict[str, Any]] = data["vectors"]
    return vectors


def _all_vectors() -> list[dict[str, Any]]:
    return [v for name in VECTOR_FILES for v in _vectors(name)]


@pytest.mark.integration
@pytest.mark.parametrize("name", VECTOR_FILES)
def test_every_frame_vector_decodes_through_the_cli(name: str) -> None:
    frames = [v for v in _vectors(name) if v["kind"] == "frame"]
    result = citygate("decode", "a02yyuw", *[v["hex"] for v in frames])
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == len(frames), result.stderr
    for vector, line in zip(frames, lines, strict=True):
        if vector.get("expect_error"):
            assert line["ok"] is False
            assert "checksum" in line["error"]
        elif vector["id"] in FLAGGED:
            assert (line["records"], line["note"]) == ([], FLAGGED[vector["id"]])
        else:
            expected = vector["expect"]["distance_mm"] / 1000
            assert line["records"] == [{"n": "distance", "u": "m", "v": expected}], vector["id"]
    assert result.returncode == (1 if any(v.get("expect_error") for v in frames) else 0)


@pytest.mark.parametrize("vector", _all_vectors(), ids=lambda v: str(v["id"]))
def test_every_vector_holds_in_process(vector: dict[str, Any]) -> None:
    wire = bytes.fromhex(vector["hex"])
    if vector["kind"] == "raw":  # the JSN-SR04T mode 3 trigger, host -> sensor
        assert wire == codec.TRIGGER
    elif vector.get("expect_error"):
        with pytest.raises(FrameError, match="checksum"):
            codec.frame_mm(wire)
    elif vector["kind"] == "frame":
        assert codec.frame_mm(wire) == vector["expect"]["distance_mm"]
    else:
        parser = StreamParser()
        got = parser.feed(wire)
        assert [r[0][2] for r, _note in got] == [v / 1000 for v in vector["expect"]["readings"]]
        assert parser.frames == len(vector["expect"]["readings"])


def test_a_data_byte_of_0xff_costs_one_slide_not_a_frame() -> None:
    parser = StreamParser()
    got = parser.feed(bytes.fromhex("A1 A7 FF 01 FF FF FF 07 A1 A7"))
    assert [r[0][2] for r, _ in got] == [0.511, 1.953]
    assert (parser.bad_bytes, parser.bad_frames) == (2, 0)
    parser = StreamParser()
    parser.feed(bytes.fromhex("FF FF 07 A1 A7"))
    assert (parser.frames, parser.bad_bytes, parser.bad_frames) == (1, 1, 1)


@pytest.mark.parametrize(
    ("model", "mm", "note"),
    [
        ("a02yyuw", 0, "no echo"),
        ("a02yyuw", 30, "below range"),
        ("a02yyuw", 31, ""),
        ("a02yyuw", 4500, ""),
        ("a02yyuw", 4501, "beyond range"),
        ("a02yyuw", 0xFFFE, "beyond range"),  # SEN0754's error code is not assumed here
        ("jsn_sr04t", 199, "below range"),
        ("jsn_sr04t", 6000, ""),
        ("jsn_sr04t", 6001, "beyond range"),
    ],
)
def test_values_outside_the_range_are_flagged_not_invented(model: str, mm: int, note: str) -> None:
    decoded = FAMILY.decode(codec.encode(mm), {"model": model})
    assert decoded.note == note
    assert decoded.records == ([] if note else [("distance", "m", mm / 1000)])


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\xff\x07\xa1", "3 bytes"),
        (b"\xfe\x07\xa1\xa7", "bad header 0xfe"),
        (b"\xff\x07\xa1\xa8", "expected 0xa7, frame has 0xa8"),
    ],
)
def test_bad_frames_are_rejected_with_a_precise_reason(frame: bytes, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        codec.decode(frame)


def test_unknown_model_in_decode_params_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        FAMILY.decode(codec.encode(1000), {"profile": "hcsr04"})


# -- properties ------------------------------------------------------------------------------


@given(data=st.binary(max_size=8))
def test_any_bytes_decode_or_raise_the_codec_error(data: bytes) -> None:
    try:
        records = codec.decode(data)
    except FrameError:
        return
    assert all(q == "distance" and u == "m" and 0.031 <= v <= 4.5 for q, u, v in records)


@given(values=st.lists(st.integers(0, 0xFFFF), max_size=8), junk=st.binary(max_size=3))
def test_back_to_back_frames_are_all_recovered_even_with_0xff_data(
    values: list[int], junk: bytes
) -> None:
    # junk without 0xFF in front; then frames back to back, whose bytes may be 0xFF
    junk = junk.replace(b"\xff", b"\x00")
    parser = StreamParser()
    got = parser.feed(junk + b"".join(codec.encode(v) for v in values))
    assert [(r, n) for r, n in got] == [codec.classify(v) for v in values]


@given(
    values=st.lists(st.integers(0, 0xFFFF), max_size=5),
    noise=st.lists(st.binary(max_size=5), min_size=5, max_size=5),
)
def test_a_stream_split_at_every_boundary_decodes_the_same(
    values: list[int], noise: list[bytes]
) -> None:
    stream = b"".join(n + codec.encode(v) for n, v in zip(noise, values, strict=False))
    whole = StreamParser()
    expected = whole.feed(stream)
    for cut in range(len(stream) + 1):
        split = StreamParser()
        assert split.feed(stream[:cut]) + split.feed(stream[cut:]) == expected
        assert (split.frames, split.bad_bytes, split.pending) == (
            whole.frames,
            whole.bad_bytes,
            whole.pending,
        )


@given(chunks=st.lists(st.binary(max_size=16), max_size=10))
def test_every_byte_is_accounted_for(chunks: list[bytes]) -> None:
    parser = StreamParser()
    for chunk in chunks:
        parser.feed(chunk)
        assert parser.pending < codec.FRAME_LEN
    consumed = codec.FRAME_LEN * parser.frames + parser.bad_bytes + parser.pending
    assert consumed == sum(len(c) for c in chunks)


# -- options -----------------------------------------------------------------------------------


def _sample_table() -> dict[str, Any]:
    with (PACKAGE / "sample.toml").open("rb") as fh:
        table: dict[str, Any] = tomllib.load(fh)["sensors"]["bin_2"]
    return table


def test_sample_config_is_accepted_by_the_registered_family() -> None:
    table = _sample_table()
    assert table["driver"] == family("a02yyuw").name == "a02yyuw"
    assert family("a02yyuw").parse_options("bin_2", table) == A02yyuwOptions(port="/dev/ttyAMA1")


def test_readme_shows_the_sample_config_verbatim() -> None:
    sample = (PACKAGE / "sample.toml").read_text()
    assert f"```toml\n{sample}```" in (PACKAGE / "README.md").read_text()


def test_triggered_jsn_sr04t_is_accepted() -> None:
    table = {**_sample_table(), "model": "jsn_sr04t", "mode": "triggered"}
    options = FAMILY.parse_options("bin_2", table)
    assert options == A02yyuwOptions("/dev/ttyAMA1", "jsn_sr04t", "triggered")


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"port": None}, "port"),
        ({"model": "hc_sr04"}, "model"),
        ({"mode": "passive"}, "mode"),
        ({"mode": "triggered"}, "mode"),  # only the JSN-SR04T has a trigger mode
        ({"baud": "9600"}, "baud"),
        ({"poll_interval_s": 0.01}, "poll_interval_s"),
        (
            {"model": "jsn_sr04t", "mode": "triggered", "poll_interval_s": 10},
            "silence_timeout_s",
        ),
        ({"trigger": 85}, "trigger"),
    ],
)
def test_bad_option_raises_option_error_naming_the_key(changes: dict[str, Any], key: str) -> None:
    table = {**_sample_table(), **changes}
    table = {k: v for k, v in table.items() if v is not None}
    with pytest.raises(OptionError) as info:
        FAMILY.parse_options("bin_2", table)
    assert info.value.key == key


def test_create_rejects_options_of_another_family() -> None:
    with pytest.raises(TypeError):
        FAMILY.create("bin_2", {"port": "/dev/ttyAMA1"})
