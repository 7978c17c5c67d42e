"""Torch datasets over event folders (tonic's layouts), a frame cache, and static pairing.

Nothing here downloads: each reader looks in a local folder laid out as tonic leaves it
and, when the files are not there, raises ``FileNotFoundError`` saying what layout it
expected. ``root`` may be tonic's ``save_to`` folder (which holds ``NCALTECH101/``,
``CIFAR10DVS/``, ``NMNIST/``, ``DVSGesture/``) or the data set folder itself.

- N-Caltech101: ``Caltech101/<class>/*.bin`` (all class folders, BACKGROUND_Google included,
  as tonic and EKT use them); sensor 240x180, each recording shifted to the origin as tonic
  does. No official split: 90/10 per class by a seeded permutation.
- CIFAR10-DVS: ``<class>/*.aedat4`` with the ten CIFAR-10 class names; sensor 128x128.
  No official split: 90/10 per class.
- N-MNIST: ``Train/<digit>/*.bin`` and ``Test/<digit>/*.bin``; sensor 34x34.
- DVS128-Gesture: tonic's preprocessed ``ibmGestureTrain/<user>_<lighting>/<label>.npy``
  (and ``ibmGestureTest``), the file name being the class index; sensor 128x128.

Binned frames are cached on disk as ``.npy``, keyed by the file (absolute path, mtime, size)
and every binning parameter, so later epochs never decode raw events again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tmkt.data import events as events_io
from tmkt.data.spec import DataSpec, frames_from_events
from tmkt.data.static import CIFAR10_CLASSES, repeat_frames
from tmkt.fileio import atomic_path

CACHE_VERSION = 1

DVSGESTURE_CLASSES = (
    "Hand clapping",
    "Right hand wave",
    "Left hand wave",
    "Right arm cw",
    "Right arm ccw",
    "Left arm cw",
    "Left arm ccw",
    "Arm roll",
    "Air drums",
    "Air guitar",
    "Other gestures",
)


def default_cache_dir() -> Path:
    """``~/.cache/tmkt`` (``$XDG_CACHE_HOME/tmkt`` when that is set)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tmkt"


# ------------------------------------------------------------------ folder scanning


@dataclass(frozen=True)
class EventFiles:
    """The recordings of one data set split: paths, labels ``[N]`` int64, class names."""

    paths: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]


def _first_dir(candidates: list[Path], pattern: str) -> Path | None:
    """The first candidate folder that holds a file matching ``pattern`` one level down."""
    for cand in candidates:
        if cand.is_dir() and next(cand.glob(f"*/{pattern}"), None) is not None:
            return cand
    return None


def _class_tree(folder: Path, suffix: str, class_names: tuple[str, ...] | None = None) -> EventFiles:
    """``<folder>/<class>/*<suffix>``; classes sorted unless ``class_names`` fixes the order."""
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and any(d.glob(f"*{suffix}")))
    if class_names is None:
        class_names = tuple(found)
    else:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise ValueError(f"{folder}: unexpected class folders {unknown}; expected names among {list(class_names)}")
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        files = sorted((folder / name).glob(f"*{suffix}")) if (folder / name).is_dir() else []
        paths += [str(f) for f in files]
        labels += [label] * len(files)
    return EventFiles(tuple(paths), np.asarray(labels, dtype=np.int64), tuple(class_names))


def scan_ncaltech101(root: str | Path) -> EventFiles:
    """All N-Caltech101 recordings under ``root`` (see the module docstring)."""
    root = Path(root).expanduser()
    folder = _first_dir([root / "NCALTECH101" / "Caltech101", root / "Caltech101", root], "*.bin")
    if folder is None:
        raise FileNotFoundError(
            f"no N-Caltech101 recordings under {root}: expected Caltech101/<class>/*.bin "
            "(or NCALTECH101/Caltech101/<class>/*.bin, tonic's layout); tmkt never downloads"
        )
    return _class_tree(folder, ".bin")


def scan_cifar10dvs(root: str | Path) -> EventFiles:
    """All CIFAR10-DVS recordings under ``root``: ``<class>/*.aedat4``."""
    root = Path(root).expanduser()
    folder = _first_dir([root / "CIFAR10DVS", root], "*.aedat4")
    if folder is None:
        raise FileNotFoundError(
            f"no CIFAR10-DVS recordings under {root}: expected <class>/*.aedat4 with classes "
            f"{', '.join(CIFAR10_CLASSES)} (or CIFAR10DVS/<class>/*.aedat4); tmkt never downloads"
        )
    return _class_tree(folder, ".aedat4", CIFAR10_CLASSES)


def scan_nmnist(root: str | Path, train: bool) -> EventFiles:
    """N-MNIST ``Train/<digit>/*.bin`` or ``Test/<digit>/*.bin`` under ``root``."""
    root = Path(root).expanduser()
    split = "Train" if train else "Test"
    folder = _first_dir([root / "NMNIST" / split, root / split], "*.bin")
    if folder is None:
        raise FileNotFoundError(
            f"no N-MNIST {split} recordings under {root}: expected {split}/<digit 0-9>/*.bin "
            f"(or NMNIST/{split}/<digit>/*.bin, tonic's layout); tmkt never downloads"
        )
    return _class_tree(folder, ".bin", tuple(str(d) for d in range(10)))


def scan_dvsgesture(root: str | Path, train: bool) -> EventFiles:
    """DVS128-Gesture ``ibmGesture{Train,Test}/<user>_<lighting>/<label>.npy`` under ``root``."""
    root = Path(root).expanduser()
    split = "ibmGestureTrain" if train else "ibmGestureTest"
    folder = _first_dir([root / "DVSGesture" / split, root / split], "*.npy")
    if folder is None:
        raise FileNotFoundError(
            f"no DVS128-Gesture recordings under {root}: expected tonic's preprocessed layout "
            f"{split}/<user>_<lighting>/<class index>.npy (or DVSGesture/{split}/...); tmkt never downloads"
        )
    paths: list[str] = []
    labels: list[int] = []
    for sub in sorted(d for d in folder.iterdir() if d.is_dir()):
        for f in sorted(sub.glob("*.npy")):
            if not f.stem.isdigit() or int(f.stem) >= len(DVSGESTURE_CLASSES):
                raise ValueError(f"{f}: DVS128-Gesture file names are class indices 0..{len(DVSGESTURE_CLASSES) - 1}")
            paths.append(str(f))
            labels.append(int(f.stem))
    return EventFiles(tuple(paths), np.asarray(labels, dtype=np.int64), DVSGESTURE_CLASSES)


def subset(files: EventFiles, index: np.ndarray) -> EventFiles:
    """The recordings at ``index``."""
    index = np.asarray(index, dtype=np.int64)
    return EventFiles(tuple(files.paths[i] for i in index), files.labels[index], files.class_names)


# ------------------------------------------------------------------ splits


def split_per_class(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices per class by a seeded permutation: ``round(fraction * n)`` of each class
    (at least 1) go to the first part, the rest to the second.

    Returns:
        first, second: sorted int64 index arrays.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    first: list[np.ndarray] = []
    second: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        k = max(1, int(round(fraction * idx.size)))
        first.append(idx[:k])
        second.append(idx[k:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def stratified_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a per-class ``fraction`` of a training set (at least 1 per class).

    Each class keeps the first ``max(1, round(fraction * n))`` items of one seeded
    permutation, so for a seed the smaller fractions are subsets of the larger ones (3% of
    the data is inside the 10%, which is inside the 30%).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    keep: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        perm = np.random.default_rng([seed, int(c)]).permutation(idx.size)
        keep.append(idx[perm[: max(1, int(round(fraction * idx.size)))]])
    return np.sort(np.concatenate(keep))


# ------------------------------------------------------------------ frame cache


def cache_key(path: str | Path, spec: DataSpec) -> str:
    """Hex key of one file's frames: file identity (absolute path, mtime, size) and binning."""
    st = os.stat(path)
    ident = {
        "version": CACHE_VERSION,
        "path": os.path.abspath(path),
        "mtime_ns": st.st_mtime_ns,
        "size": st.st_size,
        "sensor_size": list(spec.sensor_size),
        "input_size": list(spec.input_size),
        "timesteps": spec.timesteps,
        "binning": spec.binning,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def cached_frames(path: str | Path, spec: DataSpec, cache_dir: str | Path) -> np.ndarray:
    """Frames ``[T, 2, H, W]`` float32 of one recording, from the cache or binned and stored.

    A changed file (mtime or size) or changed binning gets a new key; stale entries are left
    in place (delete the cache folder to reclaim the space).
    """
    key = cache_key(path, spec)
    target = Path(cache_dir) / spec.name / key[:2] / f"{key}.npy"
    if target.is_file():
        try:
            return np.load(target, allow_pickle=False)
        except (OSError, ValueError):
            pass  # a torn or foreign file: bin again and overwrite it
    rec = events_io.read_events(path, sensor_size=None)
    frames = frames_from_events(rec.events, spec)
    with atomic_path(target, suffix=".npy") as tmp, open(tmp, "wb") as fh:  # workers never read half a file
        np.save(fh, frames)
    return frames


# ------------------------------------------------------------------ datasets


class EventFileDataset(Dataset):
    """Event recordings on disk -> ``(frames [T, 2, H, W] float32 tensor, label int)``.

    Attributes ``labels`` (``[N]`` int64) and ``class_names`` serve samplers and reports.
    """

    def __init__(self, files: EventFiles, spec: DataSpec, cache_dir: str | Path | None = None):
        self.paths = files.paths
        self.labels = files.labels
        self.class_names = files.class_names
        self.spec = spec
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def __len__(self) -> int:
        return len(self.paths)

    def frames(self, i: int) -> np.ndarray:
        """Frames of recording ``i``, float32 ``[T, 2, H, W]``."""
        return cached_frames(self.paths[i], self.spec, self.cache_dir)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.frames(i)), int(self.labels[i])


class ArrayEventDataset(Dataset):
    """Frames held in memory ``[N, T, 2, H, W]`` -> ``(frames tensor, label int)``."""

    def __init__(self, frames: np.ndarray, labels: np.ndarray, class_names):
        if len(frames) != len(labels):
            raise ValueError(f"{len(frames)} samples but {len(labels)} labels")
        self._frames = frames
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = tuple(class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def frames(self, i: int) -> np.ndarray:
        """Frames of sample ``i``, float32 ``[T, 2, H, W]``."""
        return self._frames[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self._frames[i], dtype=np.float32)), int(self.labels[i])


class PairedDataset(Dataset):
    """Each event sample with a random static image of the same class, as TMKT/EKT train.

    Item ``i``: ``(static [T, 2, H, W], events [T, 2, H, W], label)``, float32 tensors and an
    int. The static image is drawn among the pool's images of the label's class with a
    generator seeded by ``(seed, epoch, i)``: the same item gives the same pair within an
    epoch, whatever the worker or order, and a new pair after ``set_epoch``. (With
    ``persistent_workers=True`` the workers keep the epoch they started with.)

    Without a static pool (``static=None``, e.g. DVS128-Gesture, which has no static
    counterpart) the static element is an empty float32 tensor of shape ``[0]``: event-only
    methods ignore it, TMKT and the other transfer methods cannot run (check ``has_static``).
    """

    def __init__(self, events: Dataset, static, timesteps: int, seed: int = 0):
        self.events = events
        self.static = static
        self.timesteps = int(timesteps)
        self.seed = int(seed)
        self.epoch = 0
        self.labels = events.labels
        self.class_names = events.class_names
        self._by_class: dict[int, np.ndarray] = {}
        if static is not None:
            if len(static.class_names) != len(events.class_names):
                raise ValueError(
                    f"static pool has {len(static.class_names)} classes, events have {len(events.class_names)}"
                )
            for c in np.unique(self.labels):
                idx = np.flatnonzero(static.labels == c)
                if idx.size == 0:
                    raise ValueError(f"class {c} ({events.class_names[c]!r}) has no static image to pair with")
                self._by_class[int(c)] = idx

    @property
    def has_static(self) -> bool:
        """Whether items carry a static image (False: the static element is empty)."""
        return self.static is not None

    def set_epoch(self, epoch: int) -> None:
        """Draw new pairs: call once per epoch before iterating."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.events)

    def static_index(self, i: int) -> int:
        """Index in the static pool of the image paired with item ``i`` this epoch."""
        pool = self._by_class[int(self.labels[i])]
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        return int(pool[rng.integers(pool.size)])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        events, label = self.events[i]
        if self.static is None:
            return torch.zeros(0, dtype=torch.float32), events, label
        value = self.static.value(self.static_index(i))
        return torch.from_numpy(repeat_frames(value, self.timesteps)), events, label
