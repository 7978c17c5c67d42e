"""Metadata every exported artefact carries, as one flat dict of JSON-encoded strings.

The same dict goes into ONNX `metadata_props`, netx HDF5 attributes and NIR metadata, so a
reader of any artefact gets back what inference needs (T, input shape, sensor size, binning,
class names) and what a human needs (neuron parameters, tmkt version, data set, method).

Keys (values are JSON):
    tmkt_format   "tmkt-export/1" (marks an artefact written by tmkt)
    tmkt_version  str
    timesteps     int, frames per sample T
    input_shape   [C, H, W]
    sensor_size   [W, H, 2]
    binning       {"by": "time"|"count", "binary": bool, "shift_to_origin": bool, "resize": "events"|"frames"}
    class_names   [str, ...]
    neuron        {"tau", "v_threshold", "v_reset"}
    plus optional keys (dataset, backbone, method, mode, states, ...) kept as they are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


from tmkt.errors import TmktError
FORMAT = "tmkt-export/1"
FORMAT_KEY = "tmkt_format"
REQUIRED_KEYS = ("tmkt_version", "timesteps", "input_shape", "sensor_size", "binning", "class_names", "neuron")


class MetadataError(TmktError, ValueError):
    """Missing or malformed tmkt metadata; the message names the artefact and the key."""


def graph_metadata(meta: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The metadata dict of an artefact: a deploy graph's `meta` plus `extra` (mode, states, ...).

    Raises MetadataError when a required key is missing (a graph lowered without `lower_run`).
    """
    out = {FORMAT_KEY: FORMAT, **dict(meta), **extra}
    check_metadata(out, "deploy graph meta")
    return out


def check_metadata(meta: Mapping[str, Any], where: str) -> None:
    """Check presence and types of the required keys."""
    if meta.get(FORMAT_KEY) != FORMAT:
        raise MetadataError(f"{where}: no tmkt metadata (key {FORMAT_KEY!r} missing or not {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise MetadataError(f"{where}: tmkt metadata lacks key(s) {', '.join(missing)}")
    t = meta["timesteps"]
    if not isinstance(t, int) or isinstance(t, bool) or t < 1:
        raise MetadataError(f"{where}: metadata 'timesteps' must be a positive integer, got {t!r}")
    shape = meta["input_shape"]
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise MetadataError(f"{where}: metadata 'input_shape' must be [C, H, W], got {shape!r}")
    size = meta["sensor_size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)):
        raise MetadataError(f"{where}: metadata 'sensor_size' must be [W, H, 2], got {size!r}")
    names = meta["class_names"]
    if not (isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names)):
        raise MetadataError(f"{where}: metadata 'class_names' must be a non-empty list of strings")
    if not isinstance(meta["binning"], Mapping):
        raise MetadataError(f"{where}: metadata 'binning' must be an object, got {meta['binning']!r}")
    if not isinstance(meta["neuron"], Mapping):
        raise MetadataError(f"{where}: metadata 'neuron' must be an object, got {meta['neuron']!r}")


def encode_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    """Every value as compact JSON (sorted keys inside objects, so files are reproducible)."""
    return {str(k): json.dumps(v, sort_keys=True, separators=(",", ":")) for k, v in meta.items()}


def decode_metadata(props: Mapping[str, str], where: str = "<metadata>") -> dict[str, Any]:
    """Inverse of `encode_metadata`, then `check_metadata`.

    Keys of other writers (non-JSON values) are kept as plain strings.
    """
    out: dict[str, Any] = {}
    for k, v in props.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, json.JSONDecodeError):
            out[k] = v
    check_metadata(out, where)
    return out


def data_spec(meta: Mapping[str, Any]):
    """The `tmkt.data.spec.DataSpec` that bins raw events the way the model was trained.

    Raises MetadataError when the stored binning is not one the data layer knows.
    """
    from tmkt.data.spec import LEGACY_RESIZE, DataSpec

    try:
        return DataSpec(
            name=str(meta.get("dataset", "unknown")),
            class_names=tuple(meta["class_names"]),
            sensor_size=tuple(int(v) for v in meta["sensor_size"]),
            input_size=tuple(int(v) for v in meta["input_shape"][1:]),
            timesteps=int(meta["timesteps"]),
            binning={"resize": LEGACY_RESIZE, **meta["binning"]},  # files from before "resize" resized frames
        )
    except (ValueError, TypeError, KeyError) as e:
        raise MetadataError(f"metadata cannot describe the binning: {e}") from None
