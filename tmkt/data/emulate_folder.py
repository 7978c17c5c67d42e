"""Record a folder of images with the emulated DVS, one event file per image.

The folder tree is kept: ``IMAGES/<class>/<name>.jpg`` becomes ``OUT/<class>/<name>.<fmt>``,
so a class-per-folder image set becomes an event set in the same layout (N-Caltech101's
``<class>/*.bin`` with ``fmt="bin"``). The camera sees luminance (Pillow's ``L``, ITU-R
601-2), as a monochrome sensor filming a monitor does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from tmkt.data.emulator import EmulatorConfig, emulate, sensor_size_for
from tmkt.data.events import write_events
from tmkt.data.static import IMAGE_SUFFIXES

FORMATS = ("bin", "npz", "h5", "npy")


def list_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursive), in sorted order."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_luminance(path: str | Path, fit: tuple[int, int] | None = None) -> np.ndarray:
    """Luminance of an image file, float32 ``[H, W]`` in [0, 1].

    ``fit = (W, H)``: a larger image is shrunk (bilinear, aspect kept) to fit in it.
    """
    with Image.open(path) as im:
        gray = im.convert("L")
    if fit is not None and (gray.width > fit[0] or gray.height > fit[1]):
        scale = min(fit[0] / gray.width, fit[1] / gray.height)
        size = (max(1, int(gray.width * scale)), max(1, int(gray.height * scale)))
        gray = gray.resize(size, Image.BILINEAR)
    return np.asarray(gray, dtype=np.float32) / np.float32(255.0)


def emulate_folder(
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    fmt: str = "npz",
    config: EmulatorConfig = EmulatorConfig(),
    fit: tuple[int, int] | None = None,
    on_file: Callable[[Path], None] | None = None,
) -> dict:
    """Emulate every image under ``images_dir`` and write its events under ``out_dir``.

    Args:
        images_dir: a folder of images, class sub-folders allowed.
        out_dir: where the event files go (created), same relative paths.
        fmt: ``bin`` (N-MNIST / N-Caltech101 ATIS records; sensor at most 256x239), ``npz``,
            ``h5`` or ``npy``.
        config: the emulated camera; image ``i`` (sorted order) uses noise seed ``(seed, i)``.
        fit: ``(W, H)`` sensor to fit: images are first shrunk so that image + padding fits.
        on_file: called after each image (progress bars).

    Returns:
        summary: ``files``, ``written``, ``events`` (total), ``events_per_file`` (mean),
        ``classes`` (first-level sub-folders), ``failed`` (list of ``"path: reason"``).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: no such folder")
    files = list_images(images_dir)
    image_fit = None
    if fit is not None:
        image_fit = (fit[0] - 2 * config.padding, fit[1] - 2 * config.padding)
        if min(image_fit) < 1:
            raise ValueError(f"fit {fit} leaves no room for the image inside {config.padding} px of padding")
    written, total, failed = 0, 0, []
    for i, path in enumerate(files):
        rel = path.relative_to(images_dir)
        try:
            image = load_luminance(path, image_fit)
            events = emulate(image, config, index=i)
            target = out_dir / rel.with_suffix(f".{fmt}")
            target.parent.mkdir(parents=True, exist_ok=True)
            write_events(target, events, sensor_size_for(image.shape, config))
            written += 1
            total += len(events)
        except (OSError, ValueError) as exc:  # unreadable image, sensor too large for .bin, ...
            failed.append(f"{rel}: {exc}")
        if on_file is not None:
            on_file(path)
    classes = sorted({p.relative_to(images_dir).parts[0] for p in files if len(p.relative_to(images_dir).parts) > 1})
    return {
        "files": len(files),
        "written": written,
        "events": total,
        "events_per_file": total / written if written else 0.0,
        "classes": classes,
        "failed": failed,
    }
