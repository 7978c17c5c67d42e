"""Event file readers, writers, validation and summary, on files written here by hand."""

from __future__ import annotations

import json
import re
import struct
import warnings

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tmkt.cli import app
from tmkt.data.events import (
    EVENT_DTYPE,
    EventFileError,
    Recording,
    read_events,
    summarize,
    validate_events,
    write_events,
)


def make(x, y, t, p) -> np.ndarray:
    ev = np.empty(len(x), dtype=EVENT_DTYPE)
    ev["x"], ev["y"], ev["t"], ev["p"] = x, y, t, p
    return ev


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == EVENT_DTYPE
    for f in ("x", "y", "t", "p"):
        np.testing.assert_array_equal(got[f], want[f], err_msg=f)


def raises_for(path):
    """pytest.raises for an EventFileError whose message names the file."""
    return pytest.raises(EventFileError, match=re.escape(str(path)))


# --------------------------------------------------------------------------- ATIS .bin

def atis_record(x: int, y: int, t: int, p: int) -> bytes:
    """One 40-bit ATIS record, from the format description: x, y, p<<7 | t[22:16], t[15:8], t[7:0]."""
    return bytes([x, y, (p << 7) | (t >> 16), (t >> 8) & 0xFF, t & 0xFF])


def test_bin_hand_written_with_overflow_marker(tmp_path):
    path = tmp_path / "sample.bin"
    records = [(3, 4, 10, 1), (33, 0, 500, 0), (0, 33, 2**23 - 1, 1)]
    data = b"".join(atis_record(*r) for r in records)
    data += bytes([0, 240, 0, 0, 0])  # overflow marker: +2**13 us for every later event
    data += atis_record(7, 8, 5, 0)
    path.write_bytes(data)
    with pytest.warns(UserWarning, match="not sorted"):
        rec = read_events(path)
    want = make([3, 33, 0, 7], [4, 0, 33, 8], [10, 500, 2**23 - 1, 2**13 + 5], [1, 0, 1, 0])
    # the marker makes the last timestamp smaller than the one before: sorted, with a warning
    order = np.argsort(want["t"], kind="stable")
    assert_same(rec.events, want[order])
    assert rec.sensor_size == (34, 34, 2)  # fits N-MNIST
    assert rec.path == str(path)


def test_bin_writer_matches_hand_encoding_and_tonic(tmp_path):
    from tonic.io import read_mnist_file

    rng = np.random.default_rng(1)
    n = 200
    ev = make(rng.integers(0, 34, n), rng.integers(0, 34, n), np.sort(rng.integers(0, 2**23, n)), rng.integers(0, 2, n))
    path = tmp_path / "w.bin"
    write_events(path, ev, (34, 34))
    assert path.read_bytes() == b"".join(atis_record(*map(int, e)) for e in ev[["x", "y", "t", "p"]])
    ref = read_mnist_file(str(path), dtype=np.dtype([("x", int), ("y", int), ("t", int), ("p", int)]))
    for f in ("x", "y", "t", "p"):
        np.testing.assert_array_equal(ref[f], ev[f])


def test_bin_long_recording_round_trip(tmp_path):
    # timestamps beyond the 23-bit field need overflow markers; tonic's reader must agree
    from tonic.io import read_mnist_file

    t = np.array([0, 2**23 - 1, 2**23, 2**23 + 70_000, 3 * 2**23 + 17])
    ev = make([1, 2, 3, 4, 5], [5, 4, 3, 2, 1], t, [0, 1, 0, 1, 1])
    path = tmp_path / "long.bin"
    write_events(path, ev, (34, 34))
    assert_same(read_events(path).events, ev)
    ref = read_mnist_file(str(path), dtype=np.dtype([("x", int), ("y", int), ("t", int), ("p", int)]))
    np.testing.assert_array_equal(ref["t"], t)


def test_bin_ncaltech_size_inferred_or_given(tmp_path):
    path = tmp_path / "caltech.bin"
    path.write_bytes(atis_record(200, 150, 1, 1) + atis_record(10, 3, 2, 0))
    assert read_events(path).sensor_size == (201, 151, 2)
    assert read_events(path, sensor_size=(240, 180)).sensor_size == (240, 180, 2)
    with raises_for(path):
        read_events(path, sensor_size=(34, 34))  # x = 200 is outside


def test_bin_truncated(tmp_path):
    path = tmp_path / "cut.bin"
    path.write_bytes(atis_record(1, 1, 1, 1) + b"\x01\x02")
    with raises_for(path) as info:
        read_events(path)
    assert "truncated" in str(info.value)


def test_bin_writer_refuses_large_sensor(tmp_path):
    with raises_for(tmp_path / "big.bin"):
        write_events(tmp_path / "big.bin", make([0], [0], [0], [0]), (346, 260))


# --------------------------------------------------------------------------- AEDAT4

AEDAT4_XML = (
    '<dv version="2.0"><node name="outInfo" path="/mainloop/Recorder/outInfo/">'
    '<node name="0" path="/mainloop/Recorder/outInfo/0/">'
    '<attr key="compression" type="string">NONE</attr>'
    '<attr key="originalOutputName" type="string">events</attr>'
    '<attr key="typeIdentifier" type="string">EVTS</attr>'
    '<node name="info" path="/mainloop/Recorder/outInfo/0/info/">'
    '<attr key="sizeX" type="int">{w}</attr><attr key="sizeY" type="int">{h}</attr>'
    '<attr key="source" type="string">tmkt-test</attr></node></node></node></dv>'
)


def aedat4_bytes(packets: list[np.ndarray], width: int, height: int) -> bytes:
    """A genuine uncompressed AEDAT4 file: magic, length-prefixed IOHeader flatbuffer, then
    packets (int32 stream id, int32 size, size-prefixed 'EVTS' EventPacket flatbuffer)."""
    import flatbuffers

    b = flatbuffers.Builder(256)
    desc = b.CreateString(AEDAT4_XML.format(w=width, h=height))
    b.StartObject(3)
    b.PrependInt32Slot(0, 0, 0)  # compression: None
    b.PrependInt64Slot(1, -1, 0)  # file_data_position: -1 (no data table)
    b.PrependUOffsetTRelativeSlot(2, desc, 0)
    b.Finish(b.EndObject(), file_identifier=b"IOHE")
    header = bytes(b.Output())
    out = b"#!AER-DAT4.0\r\n" + struct.pack("<I", len(header)) + header
    for ev in packets:
        b = flatbuffers.Builder(1024)
        b.StartVector(16, len(ev), 8)
        for e in ev[::-1]:  # struct Event {int64 t; int16 x; int16 y; bool on;} (16 bytes)
            b.Prep(8, 16)
            b.Pad(3)
            b.PrependBool(bool(e["p"]))
            b.PrependInt16(int(e["y"]))
            b.PrependInt16(int(e["x"]))
            b.PrependInt64(int(e["t"]))
        vec = b.EndVector()
        b.StartObject(1)
        b.PrependUOffsetTRelativeSlot(0, vec, 0)
        b.FinishSizePrefixed(b.EndObject(), file_identifier=b"EVTS")
        body = bytes(b.Output())
        out += struct.pack("<ii", 0, len(body)) + body
    return out


def test_aedat4_genuine_file(tmp_path):
    rng = np.random.default_rng(2)
    ev = make(rng.integers(0, 128, 30), rng.integers(0, 128, 30), np.sort(rng.integers(0, 10**6, 30)), rng.integers(0, 2, 30))
    path = tmp_path / "cifar.aedat4"
    path.write_bytes(aedat4_bytes([ev[:12], ev[12:]], 128, 128))
    cut = tmp_path / "cut.aedat4"
    cut.write_bytes(path.read_bytes()[:-7])
    with raises_for(cut):  # truncated last packet
        read_events(cut)
    rec = read_events(path)
    assert_same(rec.events, ev)
    assert rec.sensor_size == (128, 128, 2)


def test_aedat4_bad_magic(tmp_path):
    path = tmp_path / "bad.aedat4"
    path.write_bytes(b"#!AER-DAT3.1\r\n" + b"\0" * 40)
    with raises_for(path):
        read_events(path)


# --------------------------------------------------------------------------- DVS-Gesture .npy

@pytest.mark.parametrize("dtype", [np.int64, np.float64])
def test_dvsgesture_npy_layout(tmp_path, dtype):
    # tonic's preprocessed DVSGesture sample: columns x, y, p, t with t in milliseconds
    arr = np.array([[1, 2, 1, 0], [127, 0, 0, 3], [5, 127, 1, 40]], dtype=dtype)
    path = tmp_path / "gesture.npy"
    np.save(path, arr)
    rec = read_events(path)
    assert_same(rec.events, make([1, 127, 5], [2, 0, 127], [0, 3000, 40000], [1, 0, 1]))
    assert rec.sensor_size == (128, 128, 2)


# --------------------------------------------------------------------------- Prophesee

EVENTS_P = [(100, 5, 7, 1), (130, 600, 400, 0), (5000, 1, 2, 1), (70000, 3, 3, 0), (70000, 639, 479, 1)]


def test_dat_hand_written(tmp_path):
    header = b"% Data file containing CD events.\n% Version 2\n% Width 640\n% Height 480\n% end\n"
    body = b"".join(struct.pack("<II", t, x | (y << 14) | (p << 28)) for t, x, y, p in EVENTS_P)
    path = tmp_path / "rec.dat"
    path.write_bytes(header + bytes([0x0C, 8]) + body)
    rec = read_events(path)
    t, x, y, p = zip(*EVENTS_P)
    assert_same(rec.events, make(x, y, t, p))
    assert rec.sensor_size == (640, 480, 2)
    cut = tmp_path / "cut.dat"
    cut.write_bytes(header + bytes([0x0C, 8]) + body[:-3])
    with raises_for(cut) as info:
        read_events(cut)
    assert "truncated" in str(info.value)


def evt2_words(events) -> list[int]:
    words, high = [], None
    for t, x, y, p in events:
        if t >> 6 != high:
            high = t >> 6
            words.append((0x8 << 28) | high)  # EVT_TIME_HIGH: t[33:6]
        words.append((p << 28) | ((t & 63) << 22) | (x << 11) | y)  # CD_OFF / CD_ON
    return words


def test_raw_evt2_hand_written(tmp_path):
    header = b"% evt 2.0\n% format EVT2;height=480;width=640\n% geometry 640x480\n% end\n"
    path = tmp_path / "rec.raw"
    words = evt2_words(EVENTS_P)
    words.insert(3, 0xE << 28)  # an OTHERS word, to be skipped
    path.write_bytes(header + struct.pack(f"<{len(words)}I", *words))
    t, x, y, p = zip(*EVENTS_P)
    rec = read_events(path)
    assert_same(rec.events, make(x, y, t, p))
    assert rec.sensor_size == (640, 480, 2)
    cut = tmp_path / "cut.raw"
    cut.write_bytes(path.read_bytes()[:-1])
    with raises_for(cut):
        read_events(cut)


def evt3_words(events) -> list[int]:
    """Plain EVT3: TIME_HIGH on change, TIME_LOW on change, ADDR_Y on change, then ADDR_X."""
    words, high, low, yy = [], None, None, None
    for t, x, y, p in events:
        if (t >> 12) & 0xFFF != high:
            high = (t >> 12) & 0xFFF
            words.append((0x8 << 12) | high)
        if t & 0xFFF != low:
            low = t & 0xFFF
            words.append((0x6 << 12) | low)
        if y != yy:
            yy = y
            words.append(y)
        words.append((0x2 << 12) | (p << 11) | x)
    return words


def write_raw3(path, words, header=b"% evt 3.0\n% format EVT3;height=720;width=1280\n% end\n"):
    path.write_bytes(header + struct.pack(f"<{len(words)}H", *words))


def test_raw_evt3_vectors_and_wraps(tmp_path):
    # time low wrapping with a time-high step (4000 -> 4100), a 24-bit wrap, vector events
    words = evt3_words([(4000, 1, 2, 1), (4100, 3, 4, 0)])
    words += [(0x8 << 12) | 0xFFF, (0x6 << 12) | 0x005, 10]  # t = 0xFFF005, y = 10
    words += [(0x3 << 12) | (1 << 11) | 100]  # VECT_BASE_X: ON, x = 100
    words += [(0x4 << 12) | 0b100000000101]  # VECT_12: x = 100, 102, 111
    words += [(0x5 << 12) | 0b10000001]  # VECT_8: x = 112, 119
    words += [(0x7 << 12) | 3, (0xA << 12)]  # CONTINUED_4 and EXT_TRIGGER: no CD events
    words += [(0x8 << 12) | 0x000, (0x6 << 12) | 0x001, 20, (0x2 << 12) | 7]  # after wrap
    path = tmp_path / "v.raw"
    write_raw3(path, words)
    rec = read_events(path)
    t_vec = 0xFFF005
    want = make(
        [1, 3, 100, 102, 111, 112, 119, 7],
        [2, 4, 10, 10, 10, 10, 10, 20],
        [4000, 4100] + [t_vec] * 5 + [2**24 + 1],
        [1, 0, 1, 1, 1, 1, 1, 0],
    )
    assert_same(rec.events, want)
    assert rec.sensor_size == (1280, 720, 2)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3 * 2**20), st.integers(0, 1279), st.integers(0, 719), st.integers(0, 1)), max_size=60))
def test_raw_evt3_random_round_trip(tmp_path_factory, raw):
    events = sorted(raw, key=lambda e: e[0])
    path = tmp_path_factory.mktemp("evt3") / "r.raw"
    write_raw3(path, evt3_words(events))
    t, x, y, p = (list(c) for c in zip(*events)) if events else ([], [], [], [])
    assert_same(read_events(path, sensor_size=(1280, 720)).events, make(x, y, t, p))


def test_raw_unknown_encoding(tmp_path):
    path = tmp_path / "x.raw"
    path.write_bytes(b"% evt 4.0\n% end\n" + b"\0" * 8)
    with raises_for(path) as info:
        read_events(path)
    assert "encoding" in str(info.value)


# --------------------------------------------------------------------------- npz / npy / h5

@pytest.mark.parametrize("suffix", [".npz", ".npy", ".h5"])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_write_read_round_trip(tmp_path_factory, suffix, data):
    n = data.draw(st.integers(0, 50))
    t = np.sort(np.array(data.draw(st.lists(st.integers(-(10**9), 10**12), min_size=n, max_size=n)), dtype=np.int64))
    x = np.array(data.draw(st.lists(st.integers(0, 345), min_size=n, max_size=n)), dtype=np.int64)
    y = np.array(data.draw(st.lists(st.integers(0, 259), min_size=n, max_size=n)), dtype=np.int64)
    p = np.array(data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), dtype=np.int64)
    ev = make(x, y, t, p)
    path = tmp_path_factory.mktemp("rt") / f"events{suffix}"
    write_events(path, ev, (346, 260))
    rec = read_events(path, sensor_size=None if suffix != ".npy" else (346, 260))
    assert_same(rec.events, ev)
    assert rec.sensor_size == (346, 260, 2)


def test_npz_structured_and_h5_group_layouts(tmp_path):
    raw = np.array([(3, 1, 5, -1), (0, 2, 7, 1)], dtype=[("t", "f8"), ("x", "i4"), ("y", "i2"), ("p", "i1")])
    npz = tmp_path / "s.npz"
    np.savez(npz, events=raw, sensor_size=np.array([4, 8]))
    with pytest.warns(UserWarning, match="not sorted"):
        rec = read_events(npz)
    assert_same(rec.events, make([2, 1], [7, 5], [0, 3], [1, 0]))  # time-sorted, -1 -> 0
    assert rec.sensor_size == (4, 8, 2)
    h5 = tmp_path / "g.h5"
    with h5py.File(h5, "w") as fh:
        g = fh.create_group("events")
        g["x"], g["y"], g["t"], g["p"] = [1, 2], [0, 0], [10, 20], np.array([True, False])
    rec = read_events(h5)
    assert_same(rec.events, make([1, 2], [0, 0], [10, 20], [1, 0]))
    assert rec.sensor_size == (3, 1, 2)  # nothing stored: max + 1


@pytest.mark.parametrize(
    "name, content",
    [("junk.npz", b"PK\x03\x04 this is not a zip"), ("junk.h5", b"\x89HDF\r\n\x1a\n broken"), ("junk.npy", b"\x93NUMPY garbage")],
)
def test_corrupt_containers(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with raises_for(path):
        read_events(path)


def test_missing_fields_unknown_suffix_missing_file(tmp_path):
    npz = tmp_path / "nof.npz"
    np.savez(npz, x=[1], y=[1], t=[1])
    with raises_for(npz) as info:
        read_events(npz)
    assert "p" in str(info.value)
    with raises_for(tmp_path / "a.txt"):
        read_events(tmp_path / "a.txt")
    with raises_for(tmp_path / "absent.npz") as info:
        read_events(tmp_path / "absent.npz")
    assert "no such file" in str(info.value)


# --------------------------------------------------------------------------- validation

def fields(**cols):
    out = np.empty(len(cols["x"]), dtype=[(k, np.asarray(v).dtype) for k, v in cols.items()])
    for k, v in cols.items():
        out[k] = v
    return out


def test_validate_polarity_conventions_and_sorting():
    ev = fields(x=np.array([1, 0, 2], "i4"), y=np.array([0, 1, 1], "u1"), t=np.array([5, 3, 9]), p=np.array([-1, 1, -1]), extra=np.zeros(3))
    with pytest.warns(UserWarning, match="not sorted"):
        out = validate_events(ev, (3, 2), "mem")
    assert_same(out, make([0, 1, 2], [1, 0, 1], [3, 5, 9], [1, 0, 0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sorted input: no warning
        out = validate_events(fields(x=[0], y=[0], t=[0], p=np.array([True])), (1, 1), "mem")
    assert out["p"][0] == 1


@pytest.mark.parametrize(
    "cols, what",
    [
        (dict(x=[0.0, np.nan], y=[0, 0], t=[0, 1], p=[0, 1]), "NaN"),
        (dict(x=[0, 1], y=[0, 0], t=[0.0, np.nan], p=[0, 1]), "NaN"),
        (dict(x=[0.5, 1], y=[0, 0], t=[0, 1], p=[0, 1]), "non-integer"),
        (dict(x=[0, 9], y=[0, 0], t=[0, 1], p=[0, 1]), "outside"),
        (dict(x=[0, 1], y=[-1, 0], t=[0, 1], p=[0, 1]), "outside"),
        (dict(x=[0, 1], y=[0, 0], t=[0, 1], p=[0, 2]), "polarity"),
        (dict(x=[0, 1], y=[0, 0], t=[0, 1], p=[-1, 0]), "polarity"),
    ],
)
def test_validate_rejects(cols, what):
    with pytest.raises(EventFileError, match=what) as info:
        validate_events(fields(**{k: np.asarray(v) for k, v in cols.items()}), (4, 4), "source.npz")
    assert "source.npz" in str(info.value)


# --------------------------------------------------------------------------- summary and CLI

def test_summarize_numbers():
    ev = make([0, 1, 2, 3], [0, 0, 0, 0], [1_000_000, 1_250_000, 1_500_000, 3_000_000], [1, 1, 0, 1])
    s = summarize(Recording(ev, (4, 1, 2), "r"))
    assert s["events"] == 4 and s["on_events"] == 3 and s["off_events"] == 1
    assert s["duration_s"] == pytest.approx(2.0) and s["rate_ev_s"] == pytest.approx(2.0)
    assert s["on_fraction"] == pytest.approx(0.75)
    assert (s["t_first_us"], s["t_last_us"]) == (1_000_000, 3_000_000)
    empty = summarize(Recording(np.empty(0, EVENT_DTYPE), (4, 1, 2), None))
    assert empty["events"] == 0 and empty["duration_s"] == 0.0 and empty["on_fraction"] is None


def test_cli_info_json_and_table(tmp_path):
    path = tmp_path / "r.bin"
    path.write_bytes(b"".join(atis_record(*r) for r in [(1, 1, 0, 1), (2, 2, 500_000, 0), (3, 3, 1_000_000, 1)]))
    result = CliRunner().invoke(app, ["data", "info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert set(info) >= {"events", "duration_s", "rate_ev_s", "sensor_size", "on_events", "off_events", "on_fraction", "t_first_us", "t_last_us"}
    assert info["events"] == 3 and info["sensor_size"] == [34, 34, 2]
    assert info["duration_s"] == pytest.approx(1.0) and info["rate_ev_s"] == pytest.approx(3.0)
    assert info["on_events"] == 2 and info["off_events"] == 1
    table = CliRunner().invoke(app, ["data", "info", str(path)])
    assert table.exit_code == 0 and "34 x 34" in table.output and "0.667" in table.output


def test_cli_info_bad_file(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(b"\x00\x01\x02")
    result = CliRunner().invoke(app, ["data", "info", str(path)])
    assert result.exit_code == 1
    assert "bad.bin" in result.output and "truncated" in result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_info_folder_is_an_error(tmp_path):
    result = CliRunner().invoke(app, ["data", "info", str(tmp_path)])
    assert result.exit_code == 1 and "is a folder" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
