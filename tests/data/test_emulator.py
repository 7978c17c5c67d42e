"""The emulated DVS: determinism, polarity and counts at a moving edge, noise statistics,
and the `tmkt data emulate` command writing files that read back."""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tmkt.cli import app
from tmkt.data.emulate_folder import load_luminance
from tmkt.data.emulator import (
    EmulatorConfig,
    emulate,
    emulate_batch,
    saccade_path,
    sensor_size_for,
    threshold_maps,
)
from tmkt.data.events import EVENT_DTYPE, read_events

# Short saccades keep the tests fast; the physics is the same at any duration.
FAST = dict(saccade_duration_us=30_000, time_resolution_us=1_000)


def _blob(h=16, w=16, seed=0):
    """A smooth random gray image in [0, 1]."""
    rng = np.random.default_rng(seed)
    small = rng.random((4, 4)).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((w, h), Image.BILINEAR))


def _check_stream(ev, cfg, shape):
    w, h, _ = sensor_size_for(shape, cfg)
    assert ev.dtype == EVENT_DTYPE
    assert np.all(np.diff(ev["t"]) >= 0)
    assert ev["t"].min() >= 0 and ev["t"].max() <= cfg.duration_us
    assert ev["x"].max() < w and ev["y"].max() < h
    assert set(np.unique(ev["p"])) <= {0, 1}


def test_same_seed_same_events_other_seed_differs():
    img = _blob()
    cfg = EmulatorConfig(seed=3, **FAST)
    a, b = emulate(img, cfg), emulate(img, cfg)
    assert len(a) > 100
    assert np.array_equal(a, b)
    _check_stream(a, cfg, img.shape)
    c = emulate(img, EmulatorConfig(seed=4, **FAST))
    assert not (len(a) == len(c) and np.array_equal(a, c))


def test_batches_and_chunks_do_not_change_recordings():
    imgs = np.stack([_blob(seed=s) for s in range(5)])
    cfg = EmulatorConfig(**FAST)
    whole = emulate_batch(imgs, cfg, chunk=64)
    chunked = emulate_batch(imgs, cfg, chunk=2)
    for i in range(5):
        assert np.array_equal(whole[i], chunked[i])
        assert np.array_equal(whole[i], emulate(imgs[i], cfg, index=i))
    assert not np.array_equal(whole[0], whole[1])


def test_saccades_form_a_closed_triangle():
    cfg = EmulatorConfig(saccade_amplitude=3.0, **FAST)
    t, dx, dy = saccade_path(cfg)
    steps = cfg.saccade_duration_us // cfg.time_resolution_us
    assert t[-1] == cfg.duration_us and len(t) == 3 * steps + 1
    corners = np.stack([dx[::steps], dy[::steps]], axis=1)
    assert np.allclose(corners[0], corners[3])  # back to the start
    sides = np.linalg.norm(np.diff(corners, axis=0), axis=1)
    assert np.allclose(sides, [np.hypot(1.5, 3), np.hypot(1.5, 3), 3.0])
    assert np.allclose(corners[:3].mean(axis=0), 0)  # centred


def test_moving_edge_gives_on_when_brighter_off_when_darker():
    """A bright left half: while the image moves right (saccades 1-2) pixels at the edge get
    brighter (ON only), moving back (saccade 3) they get darker (OFF only). Counts per pixel
    match an independent computation of the log-intensity change at the edge."""
    h, w, c = 24, 24, 12
    img = np.zeros((h, w), np.float32)
    img[:, :c] = 1.0
    cfg = EmulatorConfig(mismatch_sigma=0.0, noise_rate=0.0, saccade_amplitude=2.0, padding=3, **FAST)
    ev = emulate(img, cfg)
    pad, a = cfg.padding, cfg.saccade_amplitude
    rows = (ev["y"] >= pad + a + 1) & (ev["y"] < pad + h - a - 1)  # away from the top/bottom borders
    centre = rows & (ev["x"] >= pad + c - a - 1) & (ev["x"] <= pad + c + a)
    d = cfg.saccade_duration_us
    assert centre.sum() > 50
    assert np.all(ev["p"][centre & (ev["t"] < 2 * d)] == 1)
    assert np.all(ev["p"][centre & (ev["t"] > 2 * d)] == 0)
    # Interior rows only fire at the two vertical edges (the image's left border and the centre).
    left = rows & (ev["x"] <= pad + a + 1)
    assert np.all(centre | left | ~rows)

    # Independent count: a pixel at sensor column x sees image column u = x - pad - dx; the
    # bilinear value of the step edge is 1 for u <= c - 1, 0 for u >= c, linear in between.
    _, dx, _ = saccade_path(cfg)
    steps = d // cfg.time_resolution_us
    cols = np.arange(pad + c - 3, pad + c + 3)

    def value(x, shift):
        return np.clip(c - (x - pad - shift), 0.0, 1.0)

    l0 = np.log(value(cols, dx[0]) + cfg.log_eps)
    l1 = np.log(value(cols, dx[2 * steps]) + cfg.log_eps)
    expected_on = np.floor((l1 - l0) / cfg.threshold + 1e-6).astype(int)
    row = pad + h // 2
    for x, n_on in zip(cols, expected_on):
        at = (ev["x"] == x) & (ev["y"] == row)
        on, off = int((ev["p"][at] == 1).sum()), int((ev["p"][at] == 0).sum())
        assert abs(on - n_on) <= 1, (x, on, n_on)
        assert off in (on, on - 1)  # back to the start: the same levels crossed down
    assert expected_on.sum() > 10


def test_blank_image_gives_poisson_noise_at_the_configured_rate():
    img = np.zeros((40, 40), np.float32)
    cfg = EmulatorConfig(noise_rate=4.0, padding=0, **FAST)
    counts = [len(emulate(img, cfg, index=i)) for i in range(4)]
    expected = cfg.noise_rate * cfg.duration_us * 1e-6 * 40 * 40  # 576 per recording
    mean = np.mean(counts)
    assert abs(mean - expected) < 5 * np.sqrt(expected / 4)
    ev = emulate(img, cfg)
    _check_stream(ev, cfg, img.shape)
    assert 0.4 < ev["p"].mean() < 0.6
    assert len(emulate(img, EmulatorConfig(noise_rate=0.0, **FAST))) == 0
    # A uniform gray image filling the sensor: only its borders, where the black surround
    # slides in, can fire; the inside has no contrast to see.
    ev = emulate(np.full((20, 20), 0.6, np.float32), EmulatorConfig(noise_rate=0.0, padding=0, **FAST))
    border = np.minimum(np.minimum(ev["x"], 19 - ev["x"].astype(int)), np.minimum(ev["y"], 19 - ev["y"].astype(int)))
    assert len(ev) > 0 and border.max() <= 1


def test_threshold_mismatch_statistics_and_sensor_fixedness():
    cfg = EmulatorConfig(threshold=0.3, mismatch_sigma=0.04, seed=1)
    on, off = threshold_maps((60, 60), cfg)
    assert abs(on.mean() - 0.3) < 0.005 and abs(off.mean() - 0.3) < 0.005
    assert abs(on.std() - 0.04) < 0.005
    assert not np.array_equal(on, off)
    again, _ = threshold_maps((60, 60), cfg)
    assert np.array_equal(on, again)  # one sensor per seed and shape


def test_higher_threshold_fewer_events():
    img = _blob()
    low = emulate(img, EmulatorConfig(threshold=0.1, noise_rate=0, **FAST))
    high = emulate(img, EmulatorConfig(threshold=0.4, noise_rate=0, **FAST))
    assert len(low) > 2.5 * len(high) > 0


def test_bad_config_is_refused():
    with pytest.raises(ValueError):
        EmulatorConfig(threshold=0)
    with pytest.raises(ValueError):
        EmulatorConfig(saccade_duration_us=1500, time_resolution_us=1000)


@pytest.mark.parametrize("fmt", ["bin", "npz", "h5"])
def test_emulate_command_writes_files_that_read_back(tmp_path, fmt):
    images = tmp_path / "images"
    for cls in ("cat", "dog"):
        (images / cls).mkdir(parents=True)
        for k in range(2):
            rgb = (np.random.default_rng([len(cls), k]).random((12, 14, 3)) * 255).astype(np.uint8)
            Image.fromarray(rgb).resize((28, 24)).save(images / cls / f"im{k}.png")
    out = tmp_path / "events"
    result = CliRunner().invoke(app, ["data", "emulate", str(images), str(out), "--format", fmt, "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert "4/4 images" in result.output
    cfg = EmulatorConfig(seed=5)
    for i, src in enumerate(sorted(images.rglob("*.png"))):
        target = out / src.relative_to(images).with_suffix(f".{fmt}")
        rec = read_events(target, sensor_size=(32, 28) if fmt == "bin" else None)
        expected = emulate(load_luminance(src), cfg, index=i)
        assert rec.sensor_size == (32, 28, 2)
        assert np.array_equal(rec.events, expected)


def test_emulate_command_rejects_bad_input(tmp_path):
    runner = CliRunner(env={"COLUMNS": "400"})  # wide: rich must not wrap the long tmp paths
    result = runner.invoke(app, ["data", "emulate", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert result.exit_code != 0 and "no such folder" in result.output
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / "a.png")
    result = runner.invoke(app, ["data", "emulate", str(tmp_path / "imgs"), str(tmp_path / "out"), "--format", "avi"])
    assert result.exit_code != 0 and "--format" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no raw traceback
    # A .bin sensor holds at most 256 columns: the file fails with a message, exit code 1.
    Image.fromarray(np.zeros((10, 300), np.uint8)).save(tmp_path / "imgs" / "wide.png")
    result = runner.invoke(app, ["data", "emulate", str(tmp_path / "imgs"), str(tmp_path / "out"), "--format", "bin"])
    assert result.exit_code == 1 and "wide.png" in result.output
    result = runner.invoke(
        app, ["data", "emulate", str(tmp_path / "imgs"), str(tmp_path / "out"), "--format", "bin", "--fit", "240x180"]
    )
    assert result.exit_code == 0, result.output
    assert read_events(tmp_path / "out" / "wide.bin").events["x"].max() < 240


def test_emulate_command_out_dir_is_a_file(tmp_path):
    """Regression: OUT_DIR naming a file failed once per image ('Not a directory'); now one usage error."""
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "out.txt").write_text("x")
    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["data", "emulate", str(tmp_path / "imgs"), str(tmp_path / "out.txt")])
    assert result.exit_code == 2 and "OUT_DIR" in result.output and "is a file" in result.output
    assert (tmp_path / "out.txt").read_text() == "x"
