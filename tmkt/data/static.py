"""Static images for knowledge transfer: HSV V channel, resized, as a 2-channel sequence.

The static side of TMKT (and of EKT) feeds an RGB image to the SNN as the HSV value channel
``V = max(R, G, B) / 255`` in [0, 1] (a gray image is its own V), bilinearly resized to the
training size, copied to the two polarity channels and repeated at every time step:
``[T, 2, H, W]`` float32.

Readers for the static counterparts of the event sets, Pillow and numpy only (no pickle):

- Caltech101 image folders: ``101_ObjectCategories/<class>/*.jpg``;
- CIFAR-10 binary batches: ``cifar-10-batches-bin/data_batch_{1..5}.bin`` and
  ``test_batch.bin``, records of 1 label byte + 3072 bytes (R, G, B planes of 32x32);
- MNIST idx files: ``train-images-idx3-ubyte`` etc., gzipped or not.

A pool (``ArrayStaticPool``, ``FolderStaticPool``) holds one such set with its labels and
gives ``value(i)``, the V channel of image ``i`` at the training size; images are converted
on demand, so a pool of 50 000 CIFAR images costs its uint8 array and nothing more.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".webp")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR10_RECORD = 1 + 3 * 32 * 32

# idx type codes (the third byte of the magic number) -> numpy big-endian dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ------------------------------------------------------------------ conversion


def hsv_value(image) -> np.ndarray:
    """HSV V channel of an image, float32 ``[H, W]`` in [0, 1].

    Args:
        image: a PIL image, or an array ``[H, W]`` (gray) or ``[H, W, C]`` (RGB; a 4th alpha
            channel is ignored). uint8 values are divided by 255; float values are taken to be
            in [0, 1] already and clipped.
    """
    if isinstance(image, Image.Image):
        image = _pil_to_array(image)
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1)
    elif arr.ndim != 2:
        raise ValueError(f"expected an image [H, W] or [H, W, C], got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    if arr.dtype.kind in "iu":
        raise ValueError(f"integer images must be uint8, got {arr.dtype}")
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """uint8 ``[H, W]`` for gray images, ``[H, W, 3]`` for everything else."""
    if image.mode in ("L", "RGB"):
        return np.asarray(image)
    if image.mode in ("1", "LA") or (image.mode == "P" and image.palette and image.palette.mode == "L"):
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float image ``[H, W]`` to ``size = (H', W')`` with Pillow's bilinear filter."""
    h, w = size
    image = np.asarray(image, dtype=np.float32)
    if image.shape == (h, w):
        return image.copy()
    return np.asarray(Image.fromarray(image, mode="F").resize((w, h), Image.BILINEAR), dtype=np.float32)


def static_value(image, size: tuple[int, int]) -> np.ndarray:
    """V channel at the training size: float32 ``[H, W]`` in [0, 1] (``size = (H, W)``)."""
    return np.clip(resize_bilinear(hsv_value(image), size), 0.0, 1.0)


def repeat_frames(value: np.ndarray, timesteps: int) -> np.ndarray:
    """``[H, W]`` -> the same frame on 2 channels at every step, float32 ``[T, 2, H, W]``."""
    value = np.asarray(value, dtype=np.float32)
    return np.ascontiguousarray(np.broadcast_to(value, (timesteps, 2, *value.shape)))


def static_frames(image, size: tuple[int, int], timesteps: int) -> np.ndarray:
    """An RGB or gray image as the static input sequence, float32 ``[T, 2, H, W]``."""
    return repeat_frames(static_value(image, size), timesteps)


def load_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 ``[H, W]`` (gray) or ``[H, W, 3]`` (colour)."""
    with Image.open(path) as im:
        im.load()
        return _pil_to_array(im)


# ------------------------------------------------------------------ pools


class ArrayStaticPool:
    """Static images held in memory (CIFAR-10, MNIST, digits).

    Attributes:
        images: ``[N, H, W]`` or ``[N, H, W, 3]`` (uint8, or float in [0, 1]).
        labels: ``[N]`` int64. class_names: names of the label indices. size: ``(H, W)`` out.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names, size: tuple[int, int]):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = tuple(class_names)
        self.size = tuple(size)

    def __len__(self) -> int:
        return len(self.labels)

    def value(self, i: int) -> np.ndarray:
        """V channel of image ``i`` at ``size``: float32 ``[H, W]``."""
        return static_value(self.images[i], self.size)


class FolderStaticPool:
    """Static images read from files on demand (Caltech101)."""

    def __init__(self, paths, labels: np.ndarray, class_names, size: tuple[int, int]):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = tuple(class_names)
        self.size = tuple(size)

    def __len__(self) -> int:
        return len(self.labels)

    def value(self, i: int) -> np.ndarray:
        """V channel of image ``i`` at ``size``: float32 ``[H, W]``."""
        return static_value(load_image(self.paths[i]), self.size)


# ------------------------------------------------------------------ readers


def scan_image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """Images of a ``<root>/<class>/<image>`` tree, classes and files in sorted order.

    Returns:
        paths, labels ``[N]`` int64 (index into the class names), class names.
    """
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(f for f in (root / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64), tuple(classes)


def caltech101_pool(root: str | Path, size: tuple[int, int]) -> FolderStaticPool:
    """Caltech101 images, from ``101_ObjectCategories`` or a folder that holds it.

    Looks for ``<root>``, ``<root>/101_ObjectCategories`` and tonic's
    ``<root>/caltech101/101_ObjectCategories``; the folder found must hold one sub-folder of
    images per class.
    """
    root = Path(root).expanduser()
    for cand in (root / "101_ObjectCategories", root / "caltech101" / "101_ObjectCategories", root):
        if cand.is_dir() and any(d.is_dir() for d in cand.iterdir()):
            paths, labels, classes = scan_image_folder(cand)
            if paths:
                return FolderStaticPool(paths, labels, classes, size)
    raise FileNotFoundError(
        f"no Caltech101 images under {root}: expected 101_ObjectCategories/<class>/*.jpg "
        "(the folder itself or its parent)"
    )


def read_cifar10_bin(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch.

    Returns:
        images uint8 ``[N, 32, 32, 3]``, labels int64 ``[N]``.
    """
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _CIFAR10_RECORD:
        raise ValueError(f"{path}: {raw.size} bytes is not a whole number of {_CIFAR10_RECORD}-byte CIFAR-10 records")
    rec = raw.reshape(-1, _CIFAR10_RECORD)
    labels = rec[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise ValueError(f"{path}: label {labels.max()} out of range 0..9 (is this CIFAR-100?)")
    images = rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_cifar10(root: str | Path, train: bool = True) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """CIFAR-10 from ``cifar-10-batches-bin`` (the folder itself or its parent).

    Reads ``data_batch_1..5.bin`` (train) or ``test_batch.bin``; class names from
    ``batches.meta.txt`` when present.

    Returns:
        images uint8 ``[N, 32, 32, 3]``, labels int64 ``[N]``, class names.
    """
    root = Path(root).expanduser()
    folder = root / "cifar-10-batches-bin" if (root / "cifar-10-batches-bin").is_dir() else root
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if train else ["test_batch.bin"]
    files = [folder / n for n in names if (folder / n).is_file()]
    if not files:
        raise FileNotFoundError(
            f"no CIFAR-10 binary batches under {root}: expected cifar-10-batches-bin/"
            f"{'data_batch_1.bin .. data_batch_5.bin' if train else 'test_batch.bin'}"
        )
    parts = [read_cifar10_bin(f) for f in files]
    meta = folder / "batches.meta.txt"
    classes = CIFAR10_CLASSES
    if meta.is_file():
        lines = [ln.strip() for ln in meta.read_text().splitlines() if ln.strip()]
        if len(lines) == 10:
            classes = tuple(lines)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), classes


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (MNIST format), gzipped (``.gz``) or not, as a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(v) for v in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: {len(data) - header} data bytes, expected {expected} for shape {shape}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_mnist(root: str | Path, train: bool = True) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """MNIST from its idx files in ``root`` (or ``root/MNIST/raw``, torchvision's layout).

    Returns:
        images uint8 ``[N, 28, 28]``, labels int64 ``[N]``, class names ``("0", .., "9")``.
    """
    root = Path(root).expanduser()
    prefix = "train" if train else "t10k"
    for folder in (root, root / "raw", root / "MNIST" / "raw"):
        found = []
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            for name in (f"{prefix}-{kind}", f"{prefix}-{kind}.gz"):
                if (folder / name).is_file():
                    found.append(folder / name)
                    break
        if len(found) == 2:
            images, labels = read_idx(found[0]), read_idx(found[1])
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise ValueError(f"{folder}: idx shapes {images.shape} and {labels.shape} do not make an image set")
            return images.astype(np.uint8), labels.astype(np.int64), tuple(str(d) for d in range(10))
    raise FileNotFoundError(
        f"no MNIST idx files under {root}: expected {prefix}-images-idx3-ubyte[.gz] and "
        f"{prefix}-labels-idx1-ubyte[.gz]"
    )
