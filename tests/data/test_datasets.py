"""Static images, static readers, event folder datasets, the frame cache, pairing, and the
built-in digits set."""

import colorsys
import gzip
import json
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import tmkt.data.datasets as ds
from tmkt.data.digits import digits_images
from tmkt.data.emulator import EmulatorConfig, emulate
from tmkt.data.events import EVENT_DTYPE, Recording, write_events
from tmkt.data.registry import build_data, build_data_for_run, frames_from_events
from tmkt.data.spec import DataSpec
from tmkt.data.static import (
    hsv_value,
    load_image,
    read_cifar10,
    read_idx,
    read_mnist,
    static_frames,
    static_value,
)

# ------------------------------------------------------------------ helpers


def _events(rng, n, w, h, x0=0, y0=0, t_max=50_000):
    ev = np.zeros(n, EVENT_DTYPE)
    ev["x"] = rng.integers(x0, x0 + w, n)
    ev["y"] = rng.integers(y0, y0 + h, n)
    ev["t"] = np.sort(rng.integers(0, t_max, n))
    ev["p"] = rng.integers(0, 2, n)
    return ev


def _reference_frames(ev, width, height, T, shift=False):
    """Independent binning: np.add.at on time bins over [t_first, t_last], last bin closed."""
    x, y = ev["x"].astype(int), ev["y"].astype(int)
    if shift:
        x, y = x - x.min(), y - y.min()
    t = ev["t"].astype(np.int64)
    span = t.max() - t.min()
    b = np.minimum((t - t.min()) * T // span, T - 1)
    out = np.zeros((T, 2, height, width), np.float32)
    np.add.at(out, (b, ev["p"].astype(int), y, x), 1)
    return out


def _write_idx(path, array):
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


# ------------------------------------------------------------------ static images


def test_hsv_value_matches_colorsys_and_gray_is_kept():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = np.array([[colorsys.rgb_to_hsv(*(px / 255.0))[2] for px in row] for row in rgb])
    assert np.allclose(hsv_value(rgb), expected, atol=1e-6)
    assert np.allclose(hsv_value(rgb), rgb.max(axis=2) / 255.0)
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 255, np.uint8)], axis=2)
    assert np.array_equal(hsv_value(rgba), hsv_value(rgb))  # alpha ignored
    gray = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    assert np.allclose(hsv_value(gray), gray / 255.0)
    assert np.allclose(hsv_value(Image.fromarray(rgb)), rgb.max(axis=2) / 255.0)


def test_static_frames_repeat_the_resized_value_on_two_channels():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    frames = static_frames(rgb, (10, 12), timesteps=4)
    assert frames.shape == (4, 2, 10, 12) and frames.dtype == np.float32
    assert np.allclose(frames, (rgb.max(axis=2) / 255.0)[None, None])  # same size: no resampling
    flat = np.full((9, 9, 3), 200, np.uint8)
    assert np.allclose(static_frames(flat, (4, 6), 2), 200 / 255.0, atol=1e-6)  # resize keeps a constant
    # Pillow's bilinear (triangle) filter is symmetric: on a linear ramp shrunk 2x, each
    # output pixel away from the borders is the mean of the two input columns it covers.
    ramp = np.tile(np.arange(8) * 30, (4, 1)).astype(np.uint8)
    small = static_value(ramp, (4, 4))
    assert np.allclose(small[:, 1:3], ((ramp[0, 2:6:2].astype(int) + ramp[0, 3:7:2]) / 2 / 255.0)[None], atol=1e-5)


def test_cifar10_binary_reader(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(2)
    planes = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)  # record, channel, row, col
    labels = [7, 0, 9]
    blob = b"".join(bytes([lab]) + planes[i].tobytes() for i, lab in enumerate(labels))
    (folder / "data_batch_1.bin").write_bytes(blob)
    (folder / "data_batch_2.bin").write_bytes(blob[: 3073])
    (folder / "test_batch.bin").write_bytes(blob[3073:])
    images, y, classes = read_cifar10(tmp_path, train=True)
    assert images.shape == (4, 32, 32, 3)
    assert y.tolist() == [7, 0, 9, 7]
    assert images[1, 5, 6, 2] == planes[1, 2, 5, 6] and images[2, 31, 0, 0] == planes[2, 0, 31, 0]
    assert classes[7] == "horse"
    images, y, _ = read_cifar10(folder, train=False)
    assert y.tolist() == [0, 9] and np.array_equal(images[0], planes[1].transpose(1, 2, 0))
    (folder / "test_batch.bin").write_bytes(blob[:100])
    with pytest.raises(ValueError, match="records"):
        read_cifar10(folder, train=False)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-bin"):
        read_cifar10(tmp_path / "nothing")


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_reader(tmp_path, gz):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels)
    x, y, classes = read_mnist(tmp_path, train=False)
    assert np.array_equal(x, images) and y.tolist() == [3, 1, 4, 1, 5] and classes[3] == "3"
    assert np.array_equal(read_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}"), labels)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        read_mnist(tmp_path, train=True)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 5, 28, 28) + b"\x00" * 10)
    with pytest.raises(ValueError, match="expected"):
        read_idx(tmp_path / "bad")


# ------------------------------------------------------------------ event folders


@pytest.fixture
def ncaltech_tree(tmp_path):
    """2 classes x 2 recordings (tonic layout) and a Caltech101 image folder with an extra class."""
    rng = np.random.default_rng(4)
    events_root = tmp_path / "tonic"
    files = {}
    for cls in ("cat", "dog"):
        folder = events_root / "NCALTECH101" / "Caltech101" / cls
        folder.mkdir(parents=True)
        for k in range(2):
            ev = _events(rng, 400, 40, 30, x0=5 + 3 * k, y0=7)
            write_events(folder / f"image_{k:04d}.bin", ev, (60, 50))
            files[(cls, k)] = ev
    static_root = tmp_path / "caltech101" / "101_ObjectCategories"
    for cls in ("Faces", "cat", "dog"):
        (static_root / cls).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 26, 3), dtype=np.uint8)).save(static_root / cls / f"{k}.jpg")
    return events_root, tmp_path / "caltech101", files


def test_ncaltech101_folder_pairs_by_class_name_and_bins_as_tonic(ncaltech_tree, tmp_path):
    events_root, static_root, files = ncaltech_tree
    bundle = build_data(
        "ncaltech101",
        timesteps=3,
        input_size=(180, 240),  # the full sensor: no resize, so counts can be checked exactly
        data_root=str(events_root),
        static_root=str(static_root),
        cache_dir=str(tmp_path / "cache"),
        options={"split_fraction": 0.5},
    )
    spec = bundle.spec
    assert spec.class_names == ("cat", "dog") and spec.sensor_size == (240, 180, 2)
    assert len(bundle.train) == 2 and len(bundle.test) == 2 and bundle.val is bundle.test
    assert sorted(bundle.train.labels.tolist()) == [0, 1] and sorted(bundle.test.labels.tolist()) == [0, 1]
    assert bundle.has_static
    for i in range(len(bundle.test)):
        frames, label = bundle.test[i]
        path = bundle.test.paths[i]
        cls, k = os.path.basename(os.path.dirname(path)), int(path[-8:-4])
        assert spec.class_names[label] == cls
        expected = _reference_frames(files[(cls, k)], 240, 180, 3, shift=True)
        assert torch.equal(frames, torch.from_numpy(expected))
    static, events, label = bundle.train[0]
    pool = bundle.train.static
    j = bundle.train.static_index(0)
    assert os.path.basename(os.path.dirname(pool.paths[j])) == spec.class_names[label]  # Faces dropped
    assert torch.equal(static, torch.from_numpy(static_frames(load_image(pool.paths[j]), (180, 240), 3)))
    assert static.shape == events.shape == (3, 2, 180, 240)


def test_event_frames_are_cached_and_not_reread(ncaltech_tree, tmp_path, monkeypatch):
    events_root, _, _ = ncaltech_tree
    calls = []
    real = ds.events_io.read_events

    def counting(path, sensor_size=None):
        calls.append(str(path))
        return real(path, sensor_size)

    monkeypatch.setattr(ds.events_io, "read_events", counting)
    kwargs = dict(timesteps=4, input_size=(12, 16), data_root=str(events_root), cache_dir=str(tmp_path / "c"))
    bundle = build_data("ncaltech101", **kwargs)
    first = [bundle.train[i][1] for i in range(len(bundle.train))]
    assert len(calls) == len(bundle.train) == 4  # split_fraction 0.9 of 2 rounds to 2 per class
    again = build_data("ncaltech101", **kwargs)
    second = [again.train[i][1] for i in range(len(again.train))]
    assert len(calls) == 4  # all hits
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    build_data("ncaltech101", **{**kwargs, "timesteps": 5}).train[0]
    assert len(calls) == 5  # other binning, other key
    os.utime(again.train.events.paths[0], ns=(1, 1))  # the file changed: bin it again
    again.train[0]
    assert len(calls) == 6
    assert not bundle.train.has_static and bundle.train[0][0].shape == (0,)


def test_nmnist_and_mnist_static(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "NMNIST"
    files = {}
    for split in ("Train", "Test"):
        for digit in ("0", "1"):
            (root / split / digit).mkdir(parents=True)
            ev = _events(rng, 300, 34, 34)
            write_events(root / split / digit / "00001.bin", ev, (34, 34))
            files[(split, digit)] = ev
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    _write_idx(mnist / "train-images-idx3-ubyte.gz", images)
    _write_idx(mnist / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 0, 1, 5], np.uint8))
    bundle = build_data(
        "nmnist", timesteps=2, data_root=str(tmp_path), static_root=str(mnist), cache_dir=str(tmp_path / "c")
    )
    assert bundle.spec.class_names == tuple("0123456789") and bundle.spec.input_size == (34, 34)
    assert bundle.train.labels.tolist() == [0, 1] and bundle.test.labels.tolist() == [0, 1]
    frames, label = bundle.test[1]
    assert label == 1 and torch.equal(frames, torch.from_numpy(_reference_frames(files[("Test", "1")], 34, 34, 2)))
    for _ in range(3):
        for epoch in range(3):
            bundle.train.set_epoch(epoch)
            j = bundle.train.static_index(1)
            assert bundle.train.static.labels[j] == 1 and j in (1, 4)


def test_dvsgesture_has_no_static_pool(tmp_path):
    rng = np.random.default_rng(6)
    expected = {}
    for split, user in (("ibmGestureTrain", "user01_fluorescent"), ("ibmGestureTest", "user24_led")):
        folder = tmp_path / "DVSGesture" / split / user
        folder.mkdir(parents=True)
        for label in (0, 3):
            n = 500
            t_ms = np.sort(rng.integers(0, 2000, n))
            arr = np.stack([rng.integers(0, 128, n), rng.integers(0, 128, n), rng.integers(0, 2, n), t_ms], axis=1)
            np.save(folder / f"{label}.npy", arr.astype(np.int32))
            ev = np.zeros(n, EVENT_DTYPE)
            ev["x"], ev["y"], ev["p"], ev["t"] = arr[:, 0], arr[:, 1], arr[:, 2], t_ms * 1000
            expected[(split, label)] = ev
    bundle = build_data(
        "dvsgesture", timesteps=3, input_size=(128, 128), data_root=str(tmp_path), cache_dir=str(tmp_path / "c")
    )
    assert not bundle.has_static
    assert bundle.spec.class_names[3] == "Right arm cw" and len(bundle.spec.class_names) == 11
    assert bundle.train.labels.tolist() == [0, 3]
    static, events, label = bundle.train[1]
    assert static.numel() == 0 and label == 3 and events.shape == (3, 2, 128, 128)
    frames, label = bundle.test[1]
    assert torch.equal(frames, torch.from_numpy(_reference_frames(expected[("ibmGestureTest", 3)], 128, 128, 3)))
    with pytest.raises(ValueError, match="no static counterpart"):
        build_data("dvsgesture", timesteps=3, data_root=str(tmp_path), static_root=str(tmp_path))


def test_cifar10dvs_scan_and_pairing_with_cifar10(tmp_path, monkeypatch):
    root = tmp_path / "CIFAR10DVS"
    for cls in ("airplane", "truck"):
        (root / cls).mkdir(parents=True)
        for k in range(2):
            (root / cls / f"cifar10_{cls}_{k}.aedat4").write_bytes(b"placeholder")
    rng = np.random.default_rng(7)
    ev = _events(rng, 200, 128, 128)
    # No aedat4 writer exists here: the reader is replaced, the rest of the path is real.
    def fake_reader(path, sensor_size=None):
        return Recording(ev, (128, 128, 2), str(path))

    monkeypatch.setattr(ds.events_io, "read_events", fake_reader)
    cifar = tmp_path / "cifar-10-batches-bin"
    cifar.mkdir()
    labels = [0, 9, 9, 3]
    pix = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    (cifar / "data_batch_1.bin").write_bytes(b"".join(bytes([lab]) + pix[i].tobytes() for i, lab in enumerate(labels)))
    bundle = build_data(
        "cifar10dvs", timesteps=2, data_root=str(tmp_path), static_root=str(tmp_path), cache_dir=str(tmp_path / "c"),
        options={"split_fraction": 0.5},
    )
    assert bundle.spec.class_names[9] == "truck" and sorted(bundle.train.labels.tolist()) == [0, 9]
    for i in range(2):
        static, events, label = bundle.train[i]
        j = bundle.train.static_index(i)
        assert labels[j] == label
        rgb = pix[j].reshape(3, 32, 32).transpose(1, 2, 0)
        assert torch.allclose(static[0, 0], torch.from_numpy(static_value(rgb, (48, 48))))
    (root / "unicorn").mkdir()
    (root / "unicorn" / "x.aedat4").write_bytes(b"")
    with pytest.raises(ValueError, match="unicorn"):
        ds.scan_cifar10dvs(tmp_path)


@pytest.mark.parametrize("name", ["ncaltech101", "cifar10dvs", "nmnist", "dvsgesture"])
def test_missing_folder_says_which_layout(tmp_path, name):
    with pytest.raises(FileNotFoundError, match="expected"):
        build_data(name, timesteps=2, data_root=str(tmp_path))


def test_split_per_class_is_seeded_and_complete():
    labels = np.repeat(np.arange(3), [10, 20, 5])
    a1, b1 = ds.split_per_class(labels, 0.9, seed=0)
    a2, b2 = ds.split_per_class(labels, 0.9, seed=0)
    assert np.array_equal(a1, a2) and np.array_equal(b1, b2)
    assert np.bincount(labels[a1]).tolist() == [9, 18, 4]
    assert sorted(np.concatenate([a1, b1]).tolist()) == list(range(35))
    a3, _ = ds.split_per_class(labels, 0.9, seed=1)
    assert not np.array_equal(a1, a3)


def test_spec_round_trips_through_json():
    spec = DataSpec("digits", ("a", "b"), (36, 36, 2), (32, 32), 6, {"by": "count", "binary": True})
    assert DataSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError):
        DataSpec("x", ("a",), (4, 4, 2), (4, 4), 2, {"normalize": True})


# ------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    cache = tmp_path_factory.mktemp("digits-cache")
    return build_data("digits", timesteps=4, cache_dir=str(cache)), cache


def test_digits_sizes_classes_and_spec(digits):
    bundle, _ = digits
    spec = bundle.spec
    assert spec.class_names == tuple("0123456789") and spec.input_size == (32, 32)
    assert spec.sensor_size == (36, 36, 2) and spec.timesteps == 4
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 899
    assert len(bundle.train.static) == 898
    counts = np.bincount(bundle.train.labels, minlength=10)
    assert counts.min() >= 50 and abs(len(bundle.val) - 180) <= 3 and abs(len(bundle.test) - 180) <= 3
    static, events, label = bundle.train[0]
    assert static.shape == events.shape == (4, 2, 32, 32) and static.dtype == events.dtype == torch.float32
    assert 0 <= float(static.min()) and float(static.max()) <= 1
    assert float(events.sum()) > 100


def test_digits_frames_are_the_emulated_recordings(digits):
    """The cached event frames equal frames_from_events of a fresh emulation of that image."""
    bundle, _ = digits
    images, labels = digits_images()
    half = len(images) // 2
    val = bundle.val
    # val item -> event pool index: ArrayEventDataset keeps the order of the split indices
    from tmkt.data.digits import SPLIT, split_three

    _, val_idx, _ = split_three(labels[half:], SPLIT, seed=0)
    for i in (0, 7):
        j = int(val_idx[i])
        ev = emulate(images[half + j], EmulatorConfig(seed=0), index=j)
        expected = frames_from_events(ev, bundle.spec)
        assert np.allclose(val.frames(i), expected, atol=1e-5)
        assert val.labels[i] == labels[half + j]


def test_digits_pairing_always_matches_classes(digits):
    bundle, _ = digits
    train, pool = bundle.train, bundle.train.static
    for epoch in range(3):
        train.set_epoch(epoch)
        idx = [train.static_index(i) for i in range(len(train))]
        assert np.array_equal(pool.labels[idx], train.labels)
    train.set_epoch(0)
    first = [train.static_index(i) for i in range(50)]
    assert first == [train.static_index(i) for i in range(50)]
    train.set_epoch(1)
    assert first != [train.static_index(i) for i in range(50)]
    static, _, label = train[5]
    assert torch.equal(static[2, 1], torch.from_numpy(pool.value(train.static_index(5))))


def test_digits_event_fraction_is_stratified_and_nested(digits):
    bundle, cache = digits
    full = bundle.train.labels
    kept = {}
    for frac in (0.03, 0.1, 0.3):
        b = build_data("digits", timesteps=4, event_fraction=frac, cache_dir=str(cache))
        per_class = np.bincount(b.train.labels, minlength=10)
        expected = np.maximum(1, np.round(frac * np.bincount(full, minlength=10))).astype(int)
        assert per_class.tolist() == expected.tolist()
        assert len(b.val) == len(bundle.val) and len(b.test) == len(bundle.test)
        kept[frac] = {b.train.events.frames(i).tobytes() for i in range(len(b.train))}
    assert kept[0.03] <= kept[0.1] <= kept[0.3]


def test_digits_build_is_deterministic_and_keyed_by_emulator_options(tmp_path):
    quick = {"saccade_duration_us": 20_000, "time_resolution_us": 2_000}
    a = build_data("digits", timesteps=3, seed=1, cache_dir=str(tmp_path / "a"), options=quick)
    b = build_data("digits", timesteps=3, seed=1, cache_dir=str(tmp_path / "b"), options=quick)
    assert np.array_equal(a.test.frames(3), b.test.frames(3))
    assert np.array_equal(a.train.events.labels, b.train.events.labels)
    noisy_options = {**quick, "noise_rate": 50.0}
    noisy = build_data("digits", timesteps=3, seed=1, cache_dir=str(tmp_path / "a"), options=noisy_options)
    assert len(list((tmp_path / "a" / "digits").glob("*.npz"))) == 2
    assert noisy.test.frames(3).sum() > a.test.frames(3).sum()
    with pytest.raises(ValueError, match="unknown digits options"):
        build_data("digits", timesteps=3, options={"noise": 1.0})


def test_build_data_for_run_rebuilds_the_runs_own_test_split(digits):
    _, cache = digits
    # a run trained with its own seed, emulator option and count frames (not today's binary default)
    options = {"noise_rate": 2.0}
    config = {
        "data": {"name": "digits", "timesteps": 4, "input_size": [32, 32],
                 "binning": {"by": "time", "binary": False, "resize": "events"}},
        "train": {"seed": 3, "data_options": options, "event_fraction": 1.0, "data_root": None, "cache_dir": str(cache)},
    }
    want = build_data("digits", timesteps=4, input_size=(32, 32), seed=3, cache_dir=str(cache),
                      options={**options, "by": "time", "binary": False})
    got = build_data_for_run(config)
    assert got.spec == want.spec and len(got.test) == len(want.test)
    for i in (0, len(want.test) // 2, len(want.test) - 1):
        np.testing.assert_array_equal(np.asarray(got.test[i][0]), np.asarray(want.test[i][0]))
        assert got.test[i][1] == want.test[i][1]
    default = build_data("digits", timesteps=4, input_size=(32, 32), cache_dir=str(cache))
    assert not np.array_equal(np.asarray(default.test[0][0]), np.asarray(got.test[0][0]))
    # a run stored before binning had "resize" was trained on bilinearly resized frames: it gets them back
    del config["data"]["binning"]["resize"]
    legacy = build_data_for_run(config)
    assert legacy.spec.binning["resize"] == "frames"
    frames = np.asarray(legacy.test[0][0])
    assert not np.array_equal(frames, np.round(frames))  # fractional: resized after binning
