"""`runtime/model_check.py`: corrupt or inconsistent ONNX models are one named error naming the
file, before onnxruntime sees them; `tmkt infer` prints that line and exits 1."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from tmkt.cli import app
from tmkt.data.events import EVENT_DTYPE, write_events
from tmkt.errors import TmktError
from tmkt.export.metadata import FORMAT, FORMAT_KEY, encode_metadata
from tmkt.runtime import EventClassifier
from tmkt.runtime.model_check import ModelFileError, check_model_file

T, C, H, W = 3, 2, 4, 4
CLASSES = ["a", "b", "c"]


def metadata(mode: str, **changes) -> dict:
    meta = {
        FORMAT_KEY: FORMAT,
        "tmkt_version": "test",
        "timesteps": T,
        "input_shape": [C, H, W],
        "sensor_size": [8, 8, 2],
        "binning": {"by": "time", "binary": False, "shift_to_origin": False, "resize": "frames"},
        "class_names": CLASSES,
        "neuron": {"tau": 2.0, "v_threshold": 1.0, "v_reset": 0.0},
        "mode": mode,
    }
    if mode == "stream":
        meta["states"] = [{"layer": "l", "input": "v", "output": "v_out", "shape": [len(CLASSES)]}]
    meta.update(changes)
    return meta


def tiny_model(mode: str, k: int = len(CLASSES), **meta_changes) -> onnx.ModelProto:
    """A linear readout of the frames written with onnx.helper, with tmkt's inputs, outputs and
    metadata: unrolled events [T, B, C, H, W] -> step_logits [T, B, K] and logits [B, K]; stream
    frame [B, C, H, W] + v [B, K] -> logits [B, K] = frame . W + v / 2, and v_out = logits."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [C * H * W, k], rng.normal(size=C * H * W * k).astype(np.float32).ravel())
    if mode == "unrolled":
        shape = helper.make_tensor("shape", TensorProto.INT64, [3], [T, -1, C * H * W])
        nodes = [
            helper.make_node("Reshape", ["events", "shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["step_logits"]),
            helper.make_node("ReduceMean", ["step_logits"], ["logits"], axes=[0], keepdims=0),
        ]
        inputs = [helper.make_tensor_value_info("events", TensorProto.FLOAT, [T, "batch", C, H, W])]
        outputs = [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k]),
            helper.make_tensor_value_info("step_logits", TensorProto.FLOAT, [T, "batch", k]),
        ]
        inits = [weight, shape]
    else:
        shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, C * H * W])
        half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
        nodes = [
            helper.make_node("Reshape", ["frame", "shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["cur"]),
            helper.make_node("Mul", ["v", "half"], ["leak"]),
            helper.make_node("Add", ["cur", "leak"], ["logits"]),
            helper.make_node("Identity", ["logits"], ["v_out"]),
        ]
        inputs = [
            helper.make_tensor_value_info("frame", TensorProto.FLOAT, ["batch", C, H, W]),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, ["batch", k]),
        ]
        outputs = [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k]),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["batch", k]),
        ]
        inits = [weight, shape, half]
    graph = helper.make_graph(nodes, f"tiny_{mode}", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    helper.set_model_props(model, encode_metadata(metadata(mode, **meta_changes)))
    return model


def save(model: onnx.ModelProto, path) -> str:
    path.write_bytes(model.SerializeToString())
    return str(path)


def raises_for(path, match: str = ""):
    return pytest.raises(TmktError, match=re.escape(str(path)) + ".*" + match)


@pytest.mark.parametrize("mode", ["unrolled", "stream"])
def test_valid_models_pass_and_run(tmp_path, mode):
    path = save(tiny_model(mode), tmp_path / f"{mode}.onnx")
    meta = check_model_file(path)
    assert meta["mode"] == mode and meta["class_names"] == CLASSES
    clf = EventClassifier(path, provider="cpu")
    ev = np.zeros(5, EVENT_DTYPE)
    ev["x"], ev["y"], ev["t"] = [0, 1, 2, 3, 7], [0, 1, 2, 3, 7], [0, 10, 20, 30, 40]
    p = clf.predict(ev)
    assert p.label in CLASSES and abs(float(p.probabilities.sum()) - 1) < 1e-9


def test_unreadable_files(tmp_path):
    good = tiny_model("unrolled").SerializeToString()
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match=re.escape(str(empty)) + ": the model file is empty"):
        check_model_file(empty)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(good[: len(good) // 2])
    with raises_for(cut, "not a readable ONNX model"):
        check_model_file(cut)
    with raises_for(tmp_path / "absent.onnx", "no such"):
        check_model_file(tmp_path / "absent.onnx")


def test_non_utf8_metadata(tmp_path):
    data = tiny_model("unrolled").SerializeToString()
    at = data.index(b'"a","b","c"')
    bad = tmp_path / "utf8.onnx"
    bad.write_bytes(data[: at + 1] + b"\xf8" + data[at + 2 :])  # class name "a" -> 0xF8
    with raises_for(bad):
        check_model_file(bad)


def test_fewer_class_names_than_outputs(tmp_path):
    path = save(tiny_model("unrolled", class_names=["a", "b"]), tmp_path / "names.onnx")
    with raises_for(path, "step_logits.*shape \\[3, '\\?', 3\\].*\\[3, 'B', 2\\]"):
        check_model_file(path)


def test_stream_metadata_on_an_unrolled_graph(tmp_path):
    model = tiny_model("unrolled")
    helper.set_model_props(model, encode_metadata(metadata("stream")))
    path = save(model, tmp_path / "mixed.onnx")
    with raises_for(path, "inputs \\['events'\\] do not match its stream metadata"):
        check_model_file(path)


def test_state_shape_and_dtype_checked(tmp_path):
    states = [{"layer": "l", "input": "v", "output": "v_out", "shape": [5]}]
    path = save(tiny_model("stream", states=states), tmp_path / "state.onnx")
    with raises_for(path, "input 'v' has shape \\['\\?', 3\\], the metadata implies \\['B', 5\\]"):
        check_model_file(path)
    states = [{"layer": "l", "input": "v", "output": "v_out", "shape": [3], "dtype": "int32"}]
    path = save(tiny_model("stream", states=states), tmp_path / "dtype.onnx")
    with raises_for(path, "element type"):
        check_model_file(path)


@pytest.mark.parametrize(
    "changes, what",
    [
        (dict(sensor_size=[100_000, 100_000, 2]), "sensor_size"),  # was a MemoryError
        (dict(timesteps=10**9), "timesteps"),
        (dict(binning="x"), "binning"),
        (dict(mode="sideways"), "mode"),
        (dict(class_names=[]), "class_names"),
    ],
)
def test_metadata_limits(tmp_path, changes, what):
    model = tiny_model("unrolled")
    del model.metadata_props[:]
    helper.set_model_props(model, encode_metadata({**metadata("unrolled"), **changes}))
    path = save(model, tmp_path / "meta.onnx")
    with raises_for(path, what):
        check_model_file(path)


def test_graph_that_fails_the_checker(tmp_path):
    model = tiny_model("unrolled")
    model.graph.node[1].input[1] = "nowhere"  # MatMul reads a tensor nobody makes
    path = save(model, tmp_path / "graph.onnx")
    with raises_for(path, "checker"):
        check_model_file(path)


def test_external_data_is_refused(tmp_path):
    model = tiny_model("unrolled")
    for k, init in enumerate(model.graph.initializer):  # external data holds raw bytes only
        model.graph.initializer[k].CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init), init.name))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    with raises_for(tmp_path / "ext.onnx", "external data"):
        check_model_file(tmp_path / "ext.onnx")


def test_cli_infer_prints_one_line_for_a_bad_model(tmp_path):
    events = tmp_path / "r.npz"
    ev = np.zeros(3, EVENT_DTYPE)
    ev["t"] = [0, 1, 2]
    write_events(events, ev, (8, 8))
    path = save(tiny_model("unrolled", class_names=["a", "b"]), tmp_path / "bad.onnx")
    res = CliRunner().invoke(app, ["infer", path, str(events)])
    assert res.exit_code == 1 and res.exception is None or isinstance(res.exception, SystemExit)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), res.output
    good = save(tiny_model("unrolled"), tmp_path / "good.onnx")
    res = CliRunner().invoke(app, ["infer", good, str(events), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["predictions"][0]["label"] in CLASSES


def test_nan_weights_are_refused(tmp_path):
    model = tiny_model("unrolled")
    w = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0, 0] = np.nan
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "w"))
    path = save(model, tmp_path / "nan.onnx")
    with raises_for(path, "tensor 'w' holds NaN"):
        check_model_file(path)
