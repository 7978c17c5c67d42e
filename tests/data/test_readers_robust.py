"""Hostile and long event files (issue 15): each case is one named error naming the file, or the
right result; the chunked readers give what a whole-file reference gives."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import zipfile

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_events import AEDAT4_XML, aedat4_bytes, assert_same, atis_record, evt2_words, evt3_words, make, write_raw3
from typer.testing import CliRunner

import tmkt.data.events as events_mod
from tmkt.cli import app
from tmkt.data.events import (
    EVENT_DTYPE,
    DecompressedSizeError,
    EventFileError,
    EventOrderError,
    ReadLimits,
    open_events,
    read_events,
    scan_events,
    summarize,
    time_windows,
    write_events,
)
from tmkt.errors import TmktError
from tmkt.runtime.classifier import split_windows


def raises_for(path, match: str = ""):
    return pytest.raises(EventFileError, match=re.escape(str(path)) + ".*" + match)


def random_events(seed: int, n: int, w: int = 34, h: int = 34, span: int = 10**6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return make(rng.integers(0, w, n), rng.integers(0, h, n), np.sort(rng.integers(0, span, n)), rng.integers(0, 2, n))


def run_tmkt(*args: str) -> subprocess.CompletedProcess:
    """tmkt in its own process: a decoder that aborts shows as a signal exit code, not a dead pytest."""
    return subprocess.run([sys.executable, "-m", "tmkt", *args], capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------- AEDAT4


def aedat4_file(tmp_path, name="rec.aedat4", n=30, seed=2):
    ev = random_events(seed, n, 128, 128)
    path = tmp_path / name
    path.write_bytes(aedat4_bytes([ev[: n // 2], ev[n // 2 :]], 128, 128))
    return path, ev


def description_offset(data: bytes) -> int:
    """Offset in the file of the first byte of the XML description."""
    return data.index(b'<dv version="2.0">')


def test_aedat4_non_utf8_description_is_one_line_and_the_process_survives(tmp_path):
    path, _ = aedat4_file(tmp_path, "bad.aedat4")
    data = bytearray(path.read_bytes())
    at = description_offset(bytes(data)) + 240  # inside the XML, as byte 296 of the file
    data[at] = 0xF8
    path.write_bytes(bytes(data))
    with raises_for(path, "not UTF-8"):
        read_events(path)
    good = tmp_path / "ok.npz"
    write_events(good, random_events(0, 20), (34, 34))
    res = run_tmkt("data", "info", str(path), str(good), "--json")
    assert res.returncode == 1, res.stderr  # was 134 (Rust abort)
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}") and "UTF-8" in errors[0], res.stderr
    assert "panicked" not in res.stderr and "Traceback" not in res.stderr
    assert [s["path"] for s in json.loads(res.stdout)] == [str(good)]


def patch_at(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new) :]


@pytest.mark.parametrize(
    "patch, what",
    [
        (lambda d: d[:14] + struct.pack("<I", 10**6) + d[18:], "declares"),  # header longer than the file
        (lambda d: d[:18] + struct.pack("<I", 60000) + d[22:], "outside"),  # root offset out of range
        (lambda d: patch_at(d, 18 + struct.unpack_from("<I", d, 18)[0], struct.pack("<i", -(10**6))), "outside"),  # vtable
        (lambda d: patch_at(d, 18 + struct.unpack_from("<I", d, 18)[0], struct.pack("<i", 3)), "vtable|outside"),
    ],
)
def test_aedat4_corrupt_header_offsets(tmp_path, patch, what):
    path, _ = aedat4_file(tmp_path)
    bad = tmp_path / "bad.aedat4"
    bad.write_bytes(patch(path.read_bytes()))
    with raises_for(bad, what):
        read_events(bad)


def test_aedat4_reads_packet_by_packet(tmp_path):
    path, ev = aedat4_file(tmp_path, n=40)
    stream = open_events(path, limits=ReadLimits(chunk_events=5))
    chunks = list(stream.chunks())
    assert len(chunks) == 2  # one per packet of 20 (a chunk is at least chunk_events long)
    assert_same(np.concatenate(chunks), ev)
    assert stream.sensor_size == (128, 128, 2)


def test_aedat4_description_without_event_stream(tmp_path):
    path, _ = aedat4_file(tmp_path)
    data = path.read_bytes().replace(b">EVTS<", b">IMUS<")
    bad = tmp_path / "imu.aedat4"
    bad.write_bytes(data)
    with raises_for(bad):
        read_events(bad)
    assert "sizeX" in AEDAT4_XML  # the test file carries the sensor size the reader takes


def zstd_raw_frame(data: bytes) -> bytes:
    """A valid Zstandard frame holding `data` in raw (stored) blocks, from the format's spec:
    magic, a descriptor (single segment, 4-byte content size), then 3-byte block headers
    (size << 3 | type 0 << 1 | last)."""
    out = struct.pack("<IB", 0xFD2FB528, 0xA0) + struct.pack("<I", len(data))
    blocks = [data[i : i + 1 << 16] for i in range(0, len(data), 1 << 16)] or [b""]
    for k, block in enumerate(blocks):
        out += ((len(block) << 3) | int(k == len(blocks) - 1)).to_bytes(3, "little") + block
    return out


def zstd_aedat4(plain: bytes, width: int, height: int, packet=zstd_raw_frame) -> bytes:
    """The uncompressed AEDAT4 file `plain` rewritten with compression Zstd (3) in its header and
    each packet body replaced by `packet(body)`."""
    import flatbuffers

    (length,) = struct.unpack_from("<I", plain, 14)
    pos, bodies = 18 + length, []
    while pos < len(plain):
        stream_id, size = struct.unpack_from("<ii", plain, pos)
        bodies.append((stream_id, plain[pos + 8 : pos + 8 + size]))
        pos += 8 + size
    b = flatbuffers.Builder(256)
    desc = b.CreateString(AEDAT4_XML.format(w=width, h=height))
    b.StartObject(3)
    b.PrependInt32Slot(0, 3, 0)  # compression: Zstd
    b.PrependInt64Slot(1, -1, 0)
    b.PrependUOffsetTRelativeSlot(2, desc, 0)
    b.Finish(b.EndObject(), file_identifier=b"IOHE")
    header = bytes(b.Output())
    out = b"#!AER-DAT4.0\r\n" + struct.pack("<I", len(header)) + header
    for stream_id, body in bodies:
        packed = packet(body)
        out += struct.pack("<ii", stream_id, len(packed)) + packed
    return out


def test_aedat4_zstd_packets_and_a_panicking_one(tmp_path):
    ev = random_events(8, 30, 128, 128)
    plain = aedat4_bytes([ev[:10], ev[10:]], 128, 128)
    path = tmp_path / "z.aedat4"
    path.write_bytes(zstd_aedat4(plain, 128, 128))
    assert_same(read_events(path).events, ev)  # decoded by aedat's zstd
    # a packet that decompresses to 4 bytes: aedat's Rust code panics (flatbuffers asserts 12 bytes)
    bad = tmp_path / "short.aedat4"
    bad.write_bytes(zstd_aedat4(plain, 128, 128, packet=lambda body: zstd_raw_frame(body[:4])))
    with raises_for(bad, "cannot decode a Zstd packet"):
        read_events(bad)
    res = run_tmkt("data", "info", str(bad), str(path), "--json")
    assert res.returncode == 1 and "panicked" not in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert [line for line in res.stderr.splitlines() if line.strip()][0].startswith(f"error: {bad}: cannot decode")
    assert json.loads(res.stdout)[0]["events"] == len(ev)


# --------------------------------------------------------------------------- npy / npz / h5


def test_npy_sub_array_field_is_named(tmp_path):
    arr = np.zeros(3, dtype=[("x", "<u2", (2,)), ("y", "<u2"), ("t", "<i8"), ("p", "u1")])
    path = tmp_path / "sub.npy"
    np.save(path, arr)
    with raises_for(path, "field 'x' holds a sub-array of shape \\(2,\\)"):
        read_events(path)
    npz = tmp_path / "sub.npz"
    np.savez(npz, events=arr)
    with raises_for(npz, "field 'x' holds a sub-array"):
        read_events(npz)
    two_d = tmp_path / "2d.npz"
    np.savez(two_d, x=np.zeros((3, 2)), y=np.zeros(3), t=np.zeros(3), p=np.zeros(3))
    with raises_for(two_d, "array 'x' has shape \\(3, 2\\)"):
        read_events(two_d)


def zero_bomb(path, n: int) -> None:
    """An .npz of compressed zeros: x, y (uint16), t (int64), p (uint8), n each, written in pieces."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, dtype in (("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "u1")):
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array_header_1_0(fh, {"descr": dtype, "fortran_order": False, "shape": (n,)})
                block = np.zeros(1 << 20, dtype).tobytes()
                for start in range(0, n, 1 << 20):
                    fh.write(block[: (min(n, start + (1 << 20)) - start) * np.dtype(dtype).itemsize])


def test_npz_decompression_bomb_is_refused_and_the_cap_can_be_raised(tmp_path):
    path = tmp_path / "bomb.npz"
    n = 6_000_000  # 78 MB of zeros declared, about 80 KB stored
    zero_bomb(path, n)
    assert path.stat().st_size < 200_000
    with pytest.raises(DecompressedSizeError, match=re.escape(str(path)) + ".*max-expansion"):
        scan_events(path)
    res = CliRunner().invoke(app, ["data", "info", str(path)])
    assert res.exit_code == 1 and "fold" in res.output and res.exception is None or isinstance(res.exception, SystemExit)
    # a genuine (if odd) file: with the cap raised it reads, a chunk at a time
    summary = scan_events(path, limits=ReadLimits(max_expansion=10_000))
    assert summary["events"] == n and summary["t_first_us"] == summary["t_last_us"] == 0
    assert summary["sensor_size"] == [1, 1, 2] and summary["on_events"] == 0
    res = CliRunner().invoke(app, ["data", "info", str(path), "--max-expansion", "10000", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["events"] == n


def test_h5_compressed_bomb(tmp_path, monkeypatch):
    monkeypatch.setattr(events_mod, "MIN_BOMB_BYTES", 1 << 20)
    path = tmp_path / "bomb.h5"
    n = 1 << 20
    with h5py.File(path, "w") as fh:
        for name, dtype in (("x", "u2"), ("y", "u2"), ("t", "i8"), ("p", "u1")):
            fh.create_dataset(name, data=np.zeros(n, dtype), compression="gzip", chunks=(1 << 16,))
    with pytest.raises(DecompressedSizeError, match=re.escape(str(path))):
        read_events(path)
    assert len(read_events(path, limits=ReadLimits(max_expansion=1e6)).events) == n


def test_npy_truncated_data_and_pickled_objects(tmp_path):
    path = tmp_path / "cut.npy"
    np.save(path, make([1, 2, 3], [1, 1, 1], [1, 2, 3], [0, 1, 0]))
    path.write_bytes(path.read_bytes()[:-5])
    with raises_for(path, "truncated"):
        read_events(path)
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with raises_for(obj):
        read_events(obj)


@pytest.mark.parametrize(
    "t, what",
    [
        (np.array([0, 2**63 + 5], dtype=np.uint64), "above 2\\*\\*63"),  # wrapped to negative before
        (np.array([0.0, 1e30]), "beyond the int64 range"),
    ],
)
def test_timestamps_beyond_int64_are_named(tmp_path, t, what):
    path = tmp_path / "t.npz"
    np.savez(path, x=np.zeros(2, "u2"), y=np.zeros(2, "u2"), t=t, p=np.zeros(2, "u1"))
    with raises_for(path, what):
        read_events(path)


def test_sensor_size_array_must_be_small(tmp_path):
    path = tmp_path / "s.npz"
    np.savez(path, x=[0], y=[0], t=[0], p=[0], sensor_size=np.zeros(5000))
    with raises_for(path, "sensor_size"):
        read_events(path)


# --------------------------------------------------------------------------- Prophesee


def test_prophesee_header_line_too_long(tmp_path):
    path = tmp_path / "long.raw"
    path.write_bytes(b"% evt 3.0 " + b"a" * 100_000 + b"\n% end\n")
    with raises_for(path, "header"):
        read_events(path)


def test_evt2_and_dat_decoders_match_expelliarmus(tmp_path):
    from expelliarmus import Wizard

    rng = np.random.default_rng(5)
    n = 3000
    ev = make(rng.integers(0, 640, n), rng.integers(0, 480, n), np.sort(rng.integers(0, 2**31, n)), rng.integers(0, 2, n))
    raw = tmp_path / "r.raw"
    words = evt2_words(zip(ev["t"].tolist(), ev["x"].tolist(), ev["y"].tolist(), ev["p"].tolist()))
    raw.write_bytes(b"% evt 2.0\n% end\n" + struct.pack(f"<{len(words)}I", *words))
    dat = tmp_path / "r.dat"
    t_dat = ev["t"].copy()
    t_dat[n // 2 :] -= 2**30  # goes back once: the reader (like expelliarmus) counts a 32-bit wrap
    body = np.empty((n, 2), "<u4")
    body[:, 0] = t_dat
    body[:, 1] = ev["x"].astype(np.uint32) | (ev["y"].astype(np.uint32) << 14) | (ev["p"].astype(np.uint32) << 28)
    dat.write_bytes(b"% Height 480\n% Width 640\n% end\n" + bytes([0x0C, 8]) + body.tobytes())
    for path, encoding in ((raw, "evt2"), (dat, "dat")):
        ref = Wizard(encoding=encoding).read(str(path))
        for chunk in (7, 1 << 20):
            got = read_events(path, sensor_size=(640, 480), limits=ReadLimits(chunk_events=chunk)).events
            for f in ("x", "y", "t", "p"):
                np.testing.assert_array_equal(got[f], ref[f].astype(np.int64), err_msg=f"{path.name} {f} chunk={chunk}")


@pytest.mark.filterwarnings("ignore:.*not sorted")
@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3 * 2**24), st.integers(0, 1279), st.integers(0, 719), st.integers(0, 1)), max_size=80),
       st.integers(1, 40))
def test_evt3_chunks_decode_as_the_whole(tmp_path_factory, raw, chunk):
    """The stateful EVT3 decoder, fed 2-byte words `chunk` at a time, equals one pass over all."""
    events = sorted(raw, key=lambda e: e[0])
    words = evt3_words(events)
    words[len(words) // 2 : len(words) // 2] = [(0x3 << 12) | (1 << 11) | 40, (0x4 << 12) | 0xFFF, (0x5 << 12) | 0x81]
    path = tmp_path_factory.mktemp("evt3") / "r.raw"
    write_raw3(path, words)
    whole = events_mod._decode_evt3(np.array(words, np.uint16))
    got = read_events(path, sensor_size=(1280, 720), limits=ReadLimits(chunk_events=chunk))
    want = whole[np.argsort(whole["t"], kind="stable")]
    assert_same(got.events, want)


def test_atis_chunks_match_tonic(tmp_path):
    from tonic.io import read_mnist_file

    rng = np.random.default_rng(3)
    records = []
    for k in range(500):
        if k % 37 == 5:
            records.append(bytes([0, 240, 0, 0, 0]))  # overflow marker
        else:
            records.append(atis_record(int(rng.integers(0, 34)), int(rng.integers(0, 34)), int(rng.integers(0, 2**23)), int(rng.integers(0, 2))))
    path = tmp_path / "r.bin"
    path.write_bytes(b"".join(records))
    ref = read_mnist_file(str(path), dtype=np.dtype([("x", int), ("y", int), ("t", int), ("p", int)]))
    stream = open_events(path, limits=ReadLimits(chunk_events=11))
    got = np.concatenate(list(stream.chunks()))
    for f in ("x", "y", "t", "p"):
        np.testing.assert_array_equal(got[f], ref[f], err_msg=f)
    assert stream.sensor_size == (34, 34, 2) and not stream.sorted


# --------------------------------------------------------------------------- chunked reading


FORMATS = [".npz", ".npy", ".h5", ".bin", ".raw3", ".dat"]


def write_any(path_stem, fmt: str, ev: np.ndarray, sensor=(34, 34)):
    if fmt == ".raw3":
        path = path_stem.with_suffix(".raw")
        write_raw3(path, evt3_words(zip(ev["t"].tolist(), ev["x"].tolist(), ev["y"].tolist(), ev["p"].tolist())),
                   header=b"% evt 3.0\n% format EVT3;height=34;width=34\n% end\n")
    elif fmt == ".dat":
        path = path_stem.with_suffix(".dat")
        body = np.empty((len(ev), 2), "<u4")
        body[:, 0] = ev["t"]
        body[:, 1] = ev["x"].astype(np.uint32) | (ev["y"].astype(np.uint32) << 14) | (ev["p"].astype(np.uint32) << 28)
        path.write_bytes(b"% Width 34\n% Height 34\n% end\n" + bytes([0x0C, 8]) + body.tobytes())
    else:
        path = path_stem.with_suffix(fmt)
        write_events(path, ev, sensor)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_scan_and_chunks_equal_the_whole_file(tmp_path, fmt):
    ev = random_events(11, 1000, span=2**22)
    path = write_any(tmp_path / "rec", fmt, ev)
    rec = read_events(path)
    assert_same(rec.events, ev)
    small = open_events(path, limits=ReadLimits(chunk_events=13))
    pieces = list(small.chunks())
    assert len(pieces) > 10 and all(len(p) <= 13 * (1 if fmt != ".raw3" else 12) for p in pieces)
    assert_same(np.concatenate(pieces), ev)
    assert small.sensor_size == rec.sensor_size == (34, 34, 2)
    assert scan_events(path, limits=ReadLimits(chunk_events=13)) == summarize(rec)


def test_scan_of_unsorted_file_warns_and_spans_min_to_max(tmp_path):
    ev = make([0, 1, 2], [0, 0, 0], [50, 10, 30], [1, 0, 1])
    path = tmp_path / "u.npz"
    np.savez(path, x=ev["x"], y=ev["y"], t=ev["t"], p=ev["p"])
    with pytest.warns(UserWarning, match="not sorted"):
        s = scan_events(path, limits=ReadLimits(chunk_events=1))
    assert (s["t_first_us"], s["t_last_us"], s["events"]) == (10, 50, 3)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 5000), min_size=0, max_size=60),
    st.integers(1, 700),
    st.integers(1, 9),
)
def test_time_windows_equal_split_windows(times, window, chunk):
    t = np.sort(np.array(times, dtype=np.int64))
    ev = make(np.zeros(len(t)), np.zeros(len(t)), t, np.zeros(len(t)))
    chunks = [ev[i : i + chunk] for i in range(0, len(ev), chunk)]
    got = list(time_windows(iter(chunks), window))
    want = split_windows(ev, window, max_windows=None)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_same(g, w)


def test_time_windows_refuse_unsorted_chunks():
    a, b = make([0], [0], [10], [0]), make([0], [0], [5], [0])
    with pytest.raises(EventOrderError, match="src"):
        list(time_windows(iter([a, b]), 3, "src"))


# --------------------------------------------------------------------------- CLI, several files


def test_data_info_reports_each_bad_file_and_goes_on(tmp_path):
    good = tmp_path / "good.npz"
    write_events(good, random_events(1, 50), (34, 34))
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00\x01\x02")
    res = CliRunner().invoke(app, ["data", "info", str(bad), str(tmp_path / "absent.npz"), str(good), str(tmp_path), "--json"])
    assert res.exit_code == 1
    assert res.exception is None or isinstance(res.exception, SystemExit)
    lines = res.output.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 3
    assert any(str(bad) in e and "truncated" in e for e in errors)
    assert any("absent.npz" in e and "no such file" in e for e in errors)
    assert any("is a folder" in e for e in errors)
    doc = json.loads("\n".join(line for line in lines if not line.startswith("error: ")))
    assert [s["path"] for s in doc] == [str(good)] and doc[0]["events"] == 50


def test_errors_are_tmkt_errors():
    assert issubclass(DecompressedSizeError, TmktError) and issubclass(EventOrderError, EventFileError)
    assert EVENT_DTYPE.itemsize == 13


def tiny_model(tmp_path, mode: str) -> str:
    """The hand-built model of tests/runtime/test_model_check.py (8x8 sensor, T=3, 3 classes)."""
    spec = importlib.util.spec_from_file_location(
        "_model_check_tests", Path(__file__).resolve().parents[1] / "runtime" / "test_model_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.save(mod.tiny_model(mode), tmp_path / f"{mode}.onnx")


def test_infer_reports_each_bad_file_and_goes_on(tmp_path):
    model = tiny_model(tmp_path, "stream")
    bad, _ = aedat4_file(tmp_path, "bad.aedat4")
    data = bytearray(bad.read_bytes())
    data[description_offset(bytes(data)) + 240] = 0xF8
    bad.write_bytes(bytes(data))
    ev = random_events(4, 400, 8, 8, span=300_000)
    good = tmp_path / "good.npz"
    write_events(good, ev, (8, 8))
    shuffled = tmp_path / "shuffled.npz"  # time goes back: read whole and sorted, same windows
    order = np.random.default_rng(0).permutation(len(ev))
    np.savez(shuffled, x=ev["x"][order], y=ev["y"][order], t=ev["t"][order], p=ev["p"][order], sensor_size=[8, 8])
    res = run_tmkt("infer", model, str(bad), str(tmp_path / "absent.npz"), str(good), str(shuffled),
                   "--window-ms", "50", "--provider", "cpu", "--json")
    assert res.returncode == 1, res.stderr
    assert "panicked" not in res.stderr and "Traceback" not in res.stderr
    doc = json.loads(res.stdout)
    assert [e["file"] for e in doc["errors"]] == [str(bad), str(tmp_path / "absent.npz")]
    assert "UTF-8" in doc["errors"][0]["error"]
    assert any("not sorted" in w["warning"] for w in doc["warnings"])
    by_file = {}
    for p in doc["predictions"]:
        by_file.setdefault(p["file"], []).append(p)
    windows = split_windows(ev, 50_000, max_windows=None)
    for name in (good, shuffled):
        got = by_file[str(name)]
        assert [p["events"] for p in got] == [len(w) for w in windows]
        np.testing.assert_allclose([p["probabilities"] for p in got], [p["probabilities"] for p in by_file[str(good)]])
