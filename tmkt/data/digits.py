"""The built-in ``digits`` pair: a tiny static + event data set that needs no download.

scikit-learn's bundled ``load_digits`` (1797 gray 8x8 images, values 0..16, ten classes) is
upsampled bilinearly to ``image_size`` (32x32) and cut by index in two halves that never
share an image, as a real static set and a real event set would not:

- the first 898 images are the **static pool** (the "RGB" side: V channel = intensity);
- the other 899 are the **event pool**: each is recorded by the emulated DVS
  (``tmkt.data.emulator``, three saccades, ~300 ms), then split 60/20/20 per class into
  train / val / test by a seeded permutation.

Event frames are binned like any recording (``frames_from_events``) on the emulated sensor
(image + 2 * padding pixels per side) and resized to ``input_size``. The emulation and binning
of the whole event pool takes a few seconds and is cached on disk, keyed by every emulator
and binning parameter, so the modality gap can be varied through ``options`` (noise rate,
threshold, mismatch, saccade, time resolution...) without stale results.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np

from tmkt.data.binning import resize_frames
from tmkt.data.datasets import ArrayEventDataset, PairedDataset, default_cache_dir, stratified_fraction
from tmkt.data.emulator import EmulatorConfig, emulate_batch, sensor_size_for
from tmkt.data.spec import DEFAULT_BINNING, DataBundle, DataSpec, frames_from_events
from tmkt.data.static import ArrayStaticPool, resize_bilinear
from tmkt.fileio import atomic_path

CACHE_VERSION = 1
CLASS_NAMES = tuple(str(d) for d in range(10))
SPLIT = (0.6, 0.2, 0.2)  # train / val / test share of the event pool, per class
EMULATOR_KEYS = tuple(f.name for f in fields(EmulatorConfig))
OPTION_KEYS = (*EMULATOR_KEYS, "by", "binary", "image_size")


def digits_images(image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as float32 ``[N, S, S]`` intensities in [0, 1] and int64 labels ``[N]``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    small = (d.images / 16.0).astype(np.float32)
    images = np.stack([resize_bilinear(im, (image_size, image_size)) for im in small])
    return np.clip(images, 0.0, 1.0), d.target.astype(np.int64)


def split_three(labels: np.ndarray, shares: tuple[float, float, float], seed: int) -> tuple[np.ndarray, ...]:
    """Per-class seeded split into three parts of about ``shares`` (the third takes the rest)."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        n_train = int(round(shares[0] * idx.size))
        n_val = int(round(shares[1] * idx.size))
        for part, chunk in zip(parts, (idx[:n_train], idx[n_train : n_train + n_val], idx[n_train + n_val :])):
            part.append(chunk)
    return tuple(np.sort(np.concatenate(p)) for p in parts)


def _parse_options(options: dict | None, seed: int) -> tuple[EmulatorConfig, dict, int]:
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"unknown digits options {unknown}; known: {list(OPTION_KEYS)}")
    emu = {k: options[k] for k in EMULATOR_KEYS if k in options}
    emu.setdefault("seed", seed)
    # Binary frames by default: the Loihi export feeds the network spikes, so a model trained on
    # binary frames loses nothing to input binarization (count frames cost ~1.7 points there,
    # see docs/loihi.md); float accuracy on digits is the same either way. `-o binary=false` for counts.
    binning = {**DEFAULT_BINNING, "binary": True, **{k: options[k] for k in ("by", "binary") if k in options}}
    return EmulatorConfig(**emu), binning, int(options.get("image_size", 32))


def digits_pools(
    config: EmulatorConfig, spec: DataSpec, image_size: int, cache_dir: str | Path | None
) -> dict[str, np.ndarray]:
    """Both pools, cached on disk as one ``.npz`` keyed by every emulator and binning parameter.

    Returns:
        ``static`` float32 ``[Ns, S, S]`` intensities and ``static_labels`` ``[Ns]``;
        ``frames`` float32 ``[Ne, T, 2, H, W]`` (the event pool, binned) and ``labels`` ``[Ne]``.
    """
    ident = {
        "version": CACHE_VERSION,
        "emulator": asdict(config),
        "image_size": image_size,
        "spec": {k: v for k, v in spec.to_dict().items() if k != "name"},
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    target = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "digits" / f"{key}.npz"
    names = ("static", "static_labels", "frames", "labels")
    if target.is_file():
        try:
            with np.load(target, allow_pickle=False) as z:
                return {n: z[n] for n in names}
        except (OSError, ValueError, KeyError):
            pass  # torn or foreign file: rebuild and overwrite
    images, labels = digits_images(image_size)
    half = len(images) // 2
    recordings = emulate_batch(images[half:], config)
    # Bin at sensor resolution, then resize all frames in one call: the same numbers as
    # frames_from_events(ev, spec) per recording (the resize acts per frame), many times faster.
    w, h = spec.sensor_size[:2]
    native = replace(spec, input_size=(h, w))
    frames = np.stack([frames_from_events(ev, native) for ev in recordings])
    n, t = frames.shape[:2]
    frames = resize_frames(frames.reshape(n * t, 2, h, w), spec.input_size).reshape(n, t, 2, *spec.input_size)
    pools = {"static": images[:half], "static_labels": labels[:half], "frames": frames, "labels": labels[half:]}
    with atomic_path(target, suffix=".npz") as tmp, open(tmp, "wb") as fh:  # a concurrent build never reads half a file
        np.savez(fh, **pools)
    return pools


def build_digits(
    *,
    timesteps: int,
    input_size: tuple[int, int] | None = None,
    event_fraction: float = 1.0,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    options: dict | None = None,
) -> DataBundle:
    """The digits static/event pair (see the module docstring).

    Args:
        timesteps: T, frames per sample.
        input_size: ``(H, W)`` the network sees; default 32x32.
        event_fraction: share of the event *training* pool kept, per class (at least one per
            class); nested across fractions for one seed.
        seed: seeds the split, the pairing and (unless ``options["seed"]``) the emulator.
        cache_dir: where the emulated frames are cached (default ``~/.cache/tmkt``).
        options: ``EmulatorConfig`` fields (``noise_rate``, ``threshold``, ...), binning
            ``by`` / ``binary``, and ``image_size`` (upsampled digit side, default 32).

    Returns:
        DataBundle: train pairs (static, events, label), val/test events, spec.
    """
    config, binning, image_size = _parse_options(options, seed)
    input_size = tuple(input_size) if input_size is not None else (32, 32)
    spec = DataSpec(
        name="digits",
        class_names=CLASS_NAMES,
        sensor_size=sensor_size_for((image_size, image_size), config),
        input_size=input_size,
        timesteps=int(timesteps),
        binning=binning,
    )
    pools = digits_pools(config, spec, image_size, cache_dir)
    frames, ev_labels = pools["frames"], pools["labels"]
    train, val, test = split_three(ev_labels, SPLIT, seed)
    if event_fraction < 1.0:
        train = train[stratified_fraction(ev_labels[train], event_fraction, seed)]
    static = ArrayStaticPool(pools["static"], pools["static_labels"], CLASS_NAMES, input_size)

    def events(idx: np.ndarray) -> ArrayEventDataset:
        return ArrayEventDataset(frames[idx], ev_labels[idx], CLASS_NAMES)

    return DataBundle(
        train=PairedDataset(events(train), static, spec.timesteps, seed=seed),
        val=events(val),
        test=events(test),
        spec=spec,
    )
