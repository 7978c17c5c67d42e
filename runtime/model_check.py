"""Check an ONNX model file and its tmkt metadata before onnxruntime sees it.

onnxruntime meets a corrupt or inconsistent file with its own exceptions (InvalidArgument,
InvalidGraph, a protobuf error), and a graph that disagrees with its metadata fails later, in
the middle of a run (an IndexError when the graph has more outputs than there are class names,
a ValueError when stream metadata sits on an unrolled graph, a MemoryError when the metadata
asks for a 100000 x 100000 sensor). `check_model_file` finds all of these first and raises one
`ModelFileError` (a `TmktError`) whose message names the file and the fault:

1. the file: exists, not empty, at most 2 GiB (protobuf's limit; tmkt embeds its weights);
2. the protobuf parses; no tensor refers to an external data file; floating-point tensors are
   finite (a NaN weight would make every prediction the first class);
3. the metadata: UTF-8 text, tmkt's keys and types (`tmkt.export.metadata.check_metadata`), a
   mode of `MODES`, a binning `DataSpec` accepts (its limits: `MAX_TIMESTEPS`, `MAX_SIDE`,
   `MAX_SAMPLE_ELEMENTS` of `tmkt.data.spec`), at most `MAX_CLASSES` class names and
   state shapes of at most `MAX_STATE_ELEMENTS` values;
4. `onnx.checker` with full shape inference;
5. the graph's inputs and outputs against the metadata: the unrolled model takes ``events``
   `[T, B, C, H, W]` and gives ``step_logits`` `[T, B, K]`; the stream model takes ``frame``
   `[B, C, H, W]` plus one membrane per state and gives logits `[B, K]` and each state's next
   membrane, with the state's shape and dtype; K is the number of class names; no other input.
"""

from __future__ import annotations

import os
from typing import Any

from tmkt.errors import TmktError

__all__ = ["MAX_CLASSES", "MAX_MODEL_BYTES", "MAX_STATE_ELEMENTS", "ModelFileError", "check_model_file"]

MAX_MODEL_BYTES = 2**31 - 1  # protobuf's limit; tmkt never writes external data
MAX_CLASSES = 100_000
MAX_STATE_ELEMENTS = 2**26  # values of one membrane per sample (a float32 state of 256 MiB)

_DTYPES = {"float32": 1, "int32": 6}  # metadata state dtype -> onnx.TensorProto elem_type
_FLOAT_TYPES = (1, 10, 11)  # FLOAT, FLOAT16, DOUBLE


class ModelFileError(TmktError, ValueError):
    """An ONNX model file that tmkt cannot run; the message names the file and the fault."""


def _load(path: str):
    import onnx

    try:
        return onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf decode errors have no common base class
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelFileError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {first})") from None


def _check_tensors(path: str, proto) -> None:
    """Every tensor embedded (no external data file) and, if floating point, finite."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelFileError(
                f"{path}: tensor {tensor.name!r} refers to an external data file; tmkt models embed their weights"
            )
        if tensor.data_type not in _FLOAT_TYPES:
            continue
        try:
            values = numpy_helper.to_array(tensor)
        except Exception as exc:  # a size that disagrees with the dims, an unknown type
            raise ModelFileError(f"{path}: tensor {tensor.name!r} cannot be read ({type(exc).__name__}: {exc})"[:300]) from None
        if not np.isfinite(values).all():
            raise ModelFileError(f"{path}: tensor {tensor.name!r} holds NaN or infinite values")


def _metadata(path: str, proto) -> dict[str, Any]:
    from tmkt.export.metadata import MetadataError, data_spec, decode_metadata
    from tmkt.export.onnx import MODES

    props = {}
    for prop in proto.metadata_props:
        try:
            key, value = prop.key, prop.value
        except UnicodeDecodeError as exc:
            raise ModelFileError(f"{path}: metadata is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        for text in (key, value):
            if not isinstance(text, str):  # protobuf hands invalid UTF-8 back as bytes
                where = key if isinstance(key, str) else repr(key[:40])
                raise ModelFileError(f"{path}: metadata entry {where!r} is not UTF-8 text")
        props[key] = value
    meta = decode_metadata(props, path)  # MetadataError names the file and the key
    if meta.get("mode") not in MODES:
        raise ModelFileError(f"{path}: metadata 'mode' must be one of {MODES}, got {meta.get('mode')!r}"[:300])
    try:
        data_spec(meta)
    except MetadataError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    if len(meta["class_names"]) > MAX_CLASSES:
        raise ModelFileError(f"{path}: metadata lists {len(meta['class_names']):,} class names, over {MAX_CLASSES:,}")
    states = meta.get("states", [])
    if meta["mode"] == "stream":
        if not isinstance(states, list) or not all(_state_ok(s) for s in states):
            raise ModelFileError(
                f"{path}: metadata 'states' must be a list of {{input, output, shape, dtype}} with positive "
                f"shapes of at most {MAX_STATE_ELEMENTS:,} values and dtype float32 or int32"
            )
        names = [s["input"] for s in states]
        if len(set(names)) != len(names) or "frame" in names:
            raise ModelFileError(f"{path}: metadata 'states' repeats an input name or uses 'frame'")
    return meta


def _state_ok(state: Any) -> bool:
    if not isinstance(state, dict) or not isinstance(state.get("input"), str):
        return False
    if "output" in state and not isinstance(state["output"], str):
        return False
    if state.get("dtype", "float32") not in _DTYPES:
        return False
    shape = state.get("shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 4:
        return False
    total = 1
    for v in shape:
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            return False
        total *= v
    return total <= MAX_STATE_ELEMENTS


def _checker(path: str, proto) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError, and errors of malformed protos
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ModelFileError(f"{path}: fails the ONNX checker ({type(exc).__name__}: {first})") from None


def _signature(value) -> tuple[int, list[int | None]] | None:
    """(elem_type, dims with None for symbolic ones) of a graph input/output, None if untyped."""
    t = value.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim]
    return t.tensor_type.elem_type, dims


def _expect(path: str, where: str, value, elem: int, dims: list[int | None]) -> None:
    """`value` (a graph input/output) has elem_type `elem` and `dims` (None: any size)."""
    sig = _signature(value)
    if sig is None:
        raise ModelFileError(f"{path}: {where} {value.name!r} has no tensor type and shape")
    got_elem, got = sig
    want = ["B" if d is None else d for d in dims]
    if got_elem != elem:
        raise ModelFileError(f"{path}: {where} {value.name!r} has element type {got_elem}, expected {elem}")
    if len(got) != len(dims) or any(w is not None and g != w for g, w in zip(got, dims)):
        shown = ["?" if g is None else g for g in got]
        raise ModelFileError(f"{path}: {where} {value.name!r} has shape {shown}, the metadata implies {want}")


def _check_io(path: str, proto, meta: dict[str, Any]) -> None:
    graph = proto.graph
    initialized = {t.name for t in graph.initializer}
    feeds = {v.name: v for v in graph.input if v.name not in initialized}
    outputs = list(graph.output)
    by_name = {v.name: v for v in outputs}
    t = meta["timesteps"]
    c, h, w = meta["input_shape"]
    k = len(meta["class_names"])
    states = meta.get("states", []) if meta["mode"] == "stream" else []
    if meta["mode"] == "unrolled":
        wanted = {"events": [t, None, c, h, w]}
    else:
        wanted = {"frame": [None, c, h, w], **{s["input"]: [None, *s["shape"]] for s in states}}
    missing = [name for name in wanted if name not in feeds]
    extra = [name for name in feeds if name not in wanted]
    if missing or extra:
        raise ModelFileError(
            f"{path}: the graph's inputs {sorted(feeds)} do not match its {meta['mode']} metadata, which feeds "
            f"{sorted(wanted)}" + (f" (missing {missing})" if missing else "") + (f" (unexpected {extra})" if extra else "")
        )
    dtypes = {s["input"]: _DTYPES[s.get("dtype", "float32")] for s in states}
    for name, dims in wanted.items():
        _expect(path, "input", feeds[name], dtypes.get(name, 1), dims)
    # the classifier names class k for logit k: as many class names as logits
    if meta["mode"] == "unrolled":
        if "step_logits" not in by_name:
            raise ModelFileError(f"{path}: the unrolled model has no output 'step_logits' (outputs: {list(by_name)})")
        _expect(path, "output", by_name["step_logits"], 1, [t, None, k])
        return
    if len(outputs) < 1 + len(states):
        raise ModelFileError(
            f"{path}: the stream model gives {len(outputs)} output(s); its {len(states)} state(s) need the logits "
            "and one membrane each"
        )
    _expect(path, "output", outputs[0], 1, [None, k])
    for i, s in enumerate(states):
        out = by_name.get(s["output"]) if "output" in s else outputs[1 + i]
        if out is None:
            raise ModelFileError(f"{path}: the stream model has no output {s['output']!r} for state {s['input']!r}")
        _expect(path, "output", out, _DTYPES[s.get("dtype", "float32")], [None, *s["shape"]])


def check_model_file(path: str | os.PathLike) -> dict[str, Any]:
    """Check an ONNX model file before onnxruntime loads it (see the module docstring).

    Returns:
        the model's decoded tmkt metadata.

    Raises:
        ModelFileError (or MetadataError, also a TmktError): one line naming the file and the fault.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such model file")
    size = os.path.getsize(path)
    if size == 0:
        raise ModelFileError(f"{path}: the model file is empty")
    if size > MAX_MODEL_BYTES:
        raise ModelFileError(f"{path}: {size / 2**30:.2f} GiB is over the 2 GiB an ONNX file can hold without external data")
    proto = _load(path)
    _check_tensors(path, proto)
    meta = _metadata(path, proto)
    _checker(path, proto)
    _check_io(path, proto, meta)
    return meta
