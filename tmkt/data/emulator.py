"""Emulated DVS: a static image seen by an event camera making three saccades.

This reproduces the way N-MNIST and N-Caltech101 were recorded (Orchard et al. 2015): an
ATIS on a pan-tilt unit looks at a still image and moves along a small triangle, one side
per saccade (~100 ms each). Here the image moves over the sensor instead, by sub-pixel
bilinear interpolation, and each pixel behaves like a DVS pixel:

- it compares the log intensity ``L = log(I + log_eps)`` with a stored reference;
- each time ``L - ref`` crosses its ON (or OFF) threshold, it emits one ON (OFF) event and
  moves the reference by one threshold (several events per simulation step when the change
  spans several thresholds), timestamps placed by linear interpolation between steps;
- thresholds differ per pixel (Gaussian mismatch, fixed for a sensor, i.e. for a seed and a
  sensor shape, as one physical camera recorded a whole data set);
- background activity adds Poisson noise events at ``noise_rate`` Hz per pixel, uniform in
  time and polarity (different for every recording).

Events are a structured array of ``tmkt.data.events.EVENT_DTYPE`` (x, y, t in integer
microseconds, p in {0: OFF, 1: ON}), sorted by t. The sensor is the image plus ``padding``
pixels on each side; the surround is black (the monitor's border), and whatever the motion
carries off the sensor is lost, as with a real camera. Not modelled: refractory period,
pixel bandwidth (low-pass), shot noise in the intensity, hot pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tmkt.data.events import EVENT_DTYPE

# Lower bound of a pixel's threshold, as a share of the mean: a Gaussian draw near zero would
# make one pixel fire thousands of events per step, which no real pixel does.
_MIN_THRESHOLD_SHARE = 0.25


@dataclass(frozen=True)
class EmulatorConfig:
    """Parameters of the emulated camera and of its saccades.

    threshold: mean contrast threshold, in log-intensity units (ON and OFF alike).
    mismatch_sigma: standard deviation of the per-pixel threshold (same units).
    noise_rate: background-activity events per pixel per second (Hz).
    saccade_amplitude: side of the saccade triangle, in pixels.
    saccade_duration_us: duration of one saccade (three per recording).
    time_resolution_us: simulation step; event times are interpolated within it.
    padding: pixels of black surround on each side of the image (sensor = image + 2*padding).
    log_eps: intensity offset in ``log(I + log_eps)`` (dark current; intensities in [0, 1]).
    seed: seeds the threshold mismatch (per sensor) and the noise (per recording).
    """

    threshold: float = 0.25
    mismatch_sigma: float = 0.03
    noise_rate: float = 0.5
    saccade_amplitude: float = 2.0
    saccade_duration_us: int = 100_000
    time_resolution_us: int = 1_000
    padding: int = 2
    log_eps: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold}")
        if self.mismatch_sigma < 0:
            raise ValueError(f"mismatch_sigma must be >= 0, got {self.mismatch_sigma}")
        if self.noise_rate < 0:
            raise ValueError(f"noise_rate must be >= 0, got {self.noise_rate}")
        if self.saccade_amplitude < 0:
            raise ValueError(f"saccade_amplitude must be >= 0, got {self.saccade_amplitude}")
        if self.time_resolution_us < 1 or self.saccade_duration_us < self.time_resolution_us:
            raise ValueError("need 1 <= time_resolution_us <= saccade_duration_us")
        if self.saccade_duration_us % self.time_resolution_us:
            raise ValueError("saccade_duration_us must be a multiple of time_resolution_us")
        if self.padding < 0:
            raise ValueError(f"padding must be >= 0, got {self.padding}")
        if not self.log_eps > 0:
            raise ValueError(f"log_eps must be > 0, got {self.log_eps}")

    @property
    def duration_us(self) -> int:
        """Length of a recording: three saccades."""
        return 3 * self.saccade_duration_us


def sensor_size_for(image_shape: tuple[int, int], config: EmulatorConfig) -> tuple[int, int, int]:
    """Sensor size ``(W, H, 2)`` (tonic order) for an image of shape ``(H, W)``."""
    h, w = image_shape
    return (w + 2 * config.padding, h + 2 * config.padding, 2)


def saccade_path(config: EmulatorConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Times and image offsets of the three saccades.

    The image moves at constant speed along the triangle (0, 0) -> (A/2, A) -> (A, 0) -> (0, 0)
    (x, y in pixels, A = saccade_amplitude), centred on its centroid so the image stays
    centred on the sensor on average.

    Returns:
        t_us [K+1] int64, dx [K+1] float64, dy [K+1] float64 with K = duration / resolution.
    """
    a = config.saccade_amplitude
    corners = np.array([[0.0, 0.0], [a / 2, a], [a, 0.0], [0.0, 0.0]])
    corners -= corners[:3].mean(axis=0)
    steps = config.saccade_duration_us // config.time_resolution_us
    s = np.arange(3 * steps + 1) / steps  # position along the path, in saccades
    seg = np.minimum(s.astype(np.int64), 2)
    frac = (s - seg)[:, None]
    xy = corners[seg] * (1 - frac) + corners[seg + 1] * frac
    t_us = np.arange(3 * steps + 1, dtype=np.int64) * config.time_resolution_us
    return t_us, xy[:, 0], xy[:, 1]


def threshold_maps(sensor_hw: tuple[int, int], config: EmulatorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel ON and OFF thresholds ``[H, W]`` float32 of one emulated sensor.

    Drawn from the seed and the sensor shape only, so every recording made with one config on
    one sensor shape shares them, as recordings from one physical camera do.
    """
    h, w = sensor_hw
    rng = np.random.default_rng([config.seed, h, w, 0x7E5])
    floor = _MIN_THRESHOLD_SHARE * config.threshold
    on = config.threshold + config.mismatch_sigma * rng.standard_normal((h, w))
    off = config.threshold + config.mismatch_sigma * rng.standard_normal((h, w))
    return np.maximum(on, floor).astype(np.float32), np.maximum(off, floor).astype(np.float32)


def _as_intensity(images: np.ndarray) -> np.ndarray:
    """Images ``[N, H, W]`` as float32 intensities in [0, 1] (uint8 is divided by 255)."""
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"expected grayscale images [N, H, W], got shape {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    images = images.astype(np.float32)
    if not np.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    return np.clip(images, 0.0, 1.0)


def _noise_events(rng: np.random.Generator, sensor_hw: tuple[int, int], config: EmulatorConfig) -> np.ndarray:
    """Background activity of one recording: Poisson count, uniform pixel, time and polarity."""
    h, w = sensor_hw
    expected = config.noise_rate * (config.duration_us * 1e-6) * h * w
    n = int(rng.poisson(expected)) if expected > 0 else 0
    ev = np.empty(n, dtype=EVENT_DTYPE)
    ev["x"] = rng.integers(0, w, n)
    ev["y"] = rng.integers(0, h, n)
    ev["t"] = rng.integers(0, config.duration_us, n)
    ev["p"] = rng.integers(0, 2, n)
    return ev


def emulate_batch(
    images: np.ndarray, config: EmulatorConfig, *, start_index: int = 0, chunk: int = 64
) -> list[np.ndarray]:
    """Record each image of a batch with the emulated camera.

    Args:
        images: ``[N, H, W]`` grayscale, float in [0, 1] (clipped) or uint8 (divided by 255).
        config: camera and saccade parameters.
        start_index: index of ``images[0]`` in a larger collection; recording ``i`` draws its
            noise from ``(config.seed, start_index + i)``, so results do not depend on how a
            collection is cut into batches.
        chunk: images simulated together (vectorized); the result does not depend on it.

    Returns:
        N structured arrays of EVENT_DTYPE, each sorted by t, on a sensor of
        ``sensor_size_for((H, W), config)``.
    """
    img = _as_intensity(images)
    out: list[np.ndarray] = []
    # Chunks keep the per-step arrays in cache: one 900-image array is twice as slow.
    for s in range(0, img.shape[0], max(1, chunk)):
        out.extend(_emulate_chunk(img[s : s + chunk], config, start_index + s))
    return out


def _emulate_chunk(img: np.ndarray, config: EmulatorConfig, start_index: int) -> list[np.ndarray]:
    """``emulate_batch`` on float32 intensities ``[N, H, W]``, all simulated at once."""
    n_img, h, w = img.shape
    pad = config.padding
    hs, ws = h + 2 * pad, w + 2 * pad
    t_us, dx, dy = saccade_path(config)
    th_on, th_off = threshold_maps((hs, ws), config)

    # Black canvas around the image, wide enough for every offset of the path.
    margin = pad + int(math.ceil(max(np.abs(dx).max(), np.abs(dy).max()))) + 2
    # The canvas holds I + log_eps: bilinear weights sum to 1, so interpolating it gives the
    # shifted I + log_eps directly, ready for the log.
    eps = np.float32(config.log_eps)
    canvas = np.full((n_img, h + 2 * margin, w + 2 * margin), eps, np.float32)
    canvas[:, margin : margin + h, margin : margin + w] += img
    # Sensor pixel (y, x) at step k sees image point (y - pad - dy_k, x - pad - dx_k), i.e.
    # canvas point (y + c - dy_k, x + c - dx_k) with c = margin - pad: a uniform shift, so the
    # bilinear interpolation blends shifted views of the canvas (no gather).
    c = margin - pad
    sy, sx = c - dy, c - dx
    y0, x0 = np.floor(sy).astype(np.int64), np.floor(sx).astype(np.int64)
    fy, fx = (sy - y0).astype(np.float32), (sx - x0).astype(np.float32)

    def frame(k: int) -> np.ndarray:
        """I + log_eps seen by the sensor at step k, ``[N, hs, ws]``."""
        a, b = y0[k], x0[k]
        left = canvas[:, a : a + hs + 1, b : b + ws]
        rows = left + fx[k] * (canvas[:, a : a + hs + 1, b + 1 : b + 1 + ws] - left)
        return rows[:, :-1] + fy[k] * (rows[:, 1:] - rows[:, :-1])

    # Each pixel fires when log(J) leaves (ref - th_off, ref + th_on). Testing J against the
    # bounds exp(ref + th_on), exp(ref - th_off) in linear units spares a log of every pixel at
    # every step; logs are taken only where a bound was crossed.
    th_on_f, th_off_f = th_on.reshape(-1), th_off.reshape(-1)
    prev = frame(0)  # the pixels are adapted to the first view: no events at t = 0
    ref = np.log(prev)
    upper = np.exp(ref + th_on)
    lower = np.exp(ref - th_off)
    ref_f, upper_f, lower_f = ref.reshape(-1), upper.reshape(-1), lower.reshape(-1)
    groups: list[tuple[np.ndarray, ...]] = []
    for k in range(1, len(t_us)):
        cur = frame(k)
        hit = cur >= upper
        hit |= cur <= lower
        flat = np.flatnonzero(hit)
        if flat.size:
            pix = flat % (hs * ws)
            l_cur = np.log(cur.reshape(-1)[flat])
            ref_before = ref_f[flat]
            d = l_cur - ref_before
            on = d > 0
            th = np.where(on, th_on_f[pix], th_off_f[pix])
            n_f = np.floor(np.abs(d) / th).astype(np.int64)
            ok = n_f >= 1  # rounding at a bound can flag a pixel that has not crossed
            flat, pix, l_cur, ref_before, on, th, n_f = (v[ok] for v in (flat, pix, l_cur, ref_before, on, th, n_f))
            step = np.where(on, th, -th)
            l_prev = np.log(prev.reshape(-1)[flat])
            groups.append((flat, np.full(flat.size, k), n_f, on, step, ref_before, l_prev, l_cur))
            new_ref = ref_before + n_f * step
            ref_f[flat] = new_ref
            upper_f[flat] = np.exp(new_ref + th_on_f[pix])
            lower_f[flat] = np.exp(new_ref - th_off_f[pix])
        prev = cur

    per_image: list[list[np.ndarray]] = [[] for _ in range(n_img)]
    if groups:
        flat, k, n_f, on, step, ref_before, l_prev, l_cur = (np.concatenate(parts) for parts in zip(*groups))
        rep = np.repeat(np.arange(flat.size), n_f)
        first = np.cumsum(n_f) - n_f
        j = np.arange(rep.size) - first[rep] + 1  # the j-th threshold crossed in this step
        level = ref_before[rep] + j * step[rep]
        dl = l_cur[rep] - l_prev[rep]
        frac = np.clip((level - l_prev[rep]) / np.where(dl == 0, 1, dl), 0.0, 1.0)
        t = t_us[k[rep] - 1] + np.rint(frac * config.time_resolution_us).astype(np.int64)
        img_idx = flat[rep] // (hs * ws)
        pix = flat[rep] % (hs * ws)
        ev = np.empty(rep.size, dtype=EVENT_DTYPE)
        ev["x"] = pix % ws
        ev["y"] = pix // ws
        ev["t"] = t
        ev["p"] = on[rep]
        order = np.argsort(img_idx, kind="stable")
        ev = ev[order]
        bounds = np.searchsorted(img_idx[order], np.arange(n_img + 1))
        for i in range(n_img):
            per_image[i].append(ev[bounds[i] : bounds[i + 1]])

    out = []
    for i in range(n_img):
        rng = np.random.default_rng([config.seed, start_index + i])
        per_image[i].append(_noise_events(rng, (hs, ws), config))
        ev = np.concatenate(per_image[i])
        out.append(ev[np.argsort(ev["t"], kind="stable")])
    return out


def emulate(image: np.ndarray, config: EmulatorConfig, *, index: int = 0) -> np.ndarray:
    """Record one grayscale image ``[H, W]`` (float in [0, 1] or uint8); see ``emulate_batch``.

    Returns:
        Events (EVENT_DTYPE, sorted by t) on a sensor of ``sensor_size_for(image.shape, config)``.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"expected a grayscale image [H, W], got shape {image.shape}")
    return emulate_batch(image[None], config, start_index=index)[0]
