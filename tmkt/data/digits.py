"""The built-in ``digits`` pair: scikit-learn's 8x8 digits, upsampled, half of them recorded by
the emulated DVS.

scikit-learn's bundled ``load_digits`` (1797 gray 8x8 images, values 0..16, ten classes) is
upsampled bilinearly to ``image_size`` (32x32) and cut by index in two halves: the first 898
images are the static pool, the other 899 the event pool (recorded on a 36x36 sensor, three
saccades of ~100 ms). Everything else is shared with ``mnist`` in ``tmkt.data.builtin``.
"""

from __future__ import annotations

import numpy as np

from tmkt.data.builtin import DIGIT_NAMES, SPLIT, BuiltinSet, split_three
from tmkt.data.static import resize_bilinear

CLASS_NAMES = DIGIT_NAMES

__all__ = ["CLASS_NAMES", "DIGITS", "SPLIT", "digits_images", "split_three"]


def digits_images(image_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as float32 ``[N, S, S]`` intensities in [0, 1] and int64 labels ``[N]``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    small = (d.images / 16.0).astype(np.float32)
    images = np.stack([resize_bilinear(im, (image_size, image_size)) for im in small])
    return np.clip(images, 0.0, 1.0), d.target.astype(np.int64)


def _halves(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    half = len(labels) // 2
    return np.arange(half), np.arange(half, len(labels))


DIGITS = BuiltinSet(name="digits", images=digits_images, pools=_halves, image_size=32, input_size=(32, 32))
