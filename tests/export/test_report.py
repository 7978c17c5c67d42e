"""One shape for every exit: each exporter returns an ExportReport, and a file whose check fails
never appears (the check runs on the temporary file, before the rename)."""

import numpy as np
import pytest
import torch

from tmkt.errors import TmktError
from tmkt.export import graph as G
from tmkt.export import netx as netx_module
from tmkt.export import nir as nir_module
from tmkt.export import onnx as onnx_module
from tmkt.export.netx import export_netx
from tmkt.export.nir import export_nir
from tmkt.export.onnx import export_onnx
from tmkt.export.quantize import LavaExportError
from tmkt.export.report import ExportReport, ExportVerificationError
from tmkt.models import ModelConfig, build_model, randomize_batchnorm


@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    model = randomize_batchnorm(build_model(ModelConfig(backbone="small", num_classes=4, input_size=(16, 16), width=0.5)))
    meta = {
        "timesteps": 3, "input_shape": [2, 16, 16], "sensor_size": [16, 16, 2], "binning": {"by": "time"},
        "class_names": ["a", "b", "c", "d"], "neuron": {"tau": 2.0, "v_threshold": 1.0, "v_reset": 0.0},
        "tmkt_version": "test",
    }
    return G.lower(model, meta)


EXPORTERS = {
    "onnx": (export_onnx, "m.onnx"),
    "netx": (export_netx, "m.net"),
    "nir": (export_nir, "m.nir"),
}


@pytest.mark.parametrize("target", EXPORTERS)
def test_every_exporter_returns_a_report(graph, tmp_path, target):
    export, name = EXPORTERS[target]
    report = export(graph, tmp_path / name, verify=True)
    assert isinstance(report, ExportReport) and report.target == target
    assert report.path == tmp_path / name and report.path.is_file()
    assert report.checks and all(report.checks.values())
    assert report.summary().startswith(f"wrote {tmp_path / name}")
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left beside it


def _failing(exc):
    def check(*args, **kwargs):
        raise exc

    return check


@pytest.mark.parametrize("target", EXPORTERS)
def test_failed_verification_leaves_no_file(graph, tmp_path, target, monkeypatch):
    export, name = EXPORTERS[target]
    kwargs = {}
    if target == "onnx":
        bad = onnx_module.VerifyReport("unrolled", 3, 2, 1.0, 1e-5, 0.5, "step 0, layer lif1", False)
        monkeypatch.setattr(onnx_module, "verify_onnx", lambda *a, **k: bad)
        expected = onnx_module.OnnxVerificationError
    elif target == "nir":
        monkeypatch.setattr(nir_module, "compare_readback",
                            lambda *a, **k: {"max_abs_logit_diff": 0.5, "spikes_identical": False})
        expected = ExportVerificationError
    else:
        monkeypatch.setattr(netx_module, "check_readback", _failing(LavaExportError("read-back differs at layer 'x'")))
        expected = LavaExportError
    (tmp_path / "keep.txt").write_text("other files stay")
    with pytest.raises(expected) as info:
        export(graph, tmp_path / name, verify=True, **kwargs)
    assert isinstance(info.value, TmktError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_failed_lava_check_leaves_no_file(graph, tmp_path):
    def lava_disagrees(path, spikes):
        assert path.is_file() and path != tmp_path / "m.net"  # runs on the temporary file
        assert spikes.shape[:2] == (4, 3)  # [N, T, ...]
        raise LavaExportError("lava-dl and the simulator differ at layer 'conv1+lif1'")

    with pytest.raises(LavaExportError, match="conv1"):
        export_netx(graph, tmp_path / "m.net", lava_check=lava_disagrees)
    assert list(tmp_path.iterdir()) == []


def test_lava_check_result_is_recorded(graph, tmp_path):
    from tmkt.export.netx import read_meta

    def lava_agrees(path, spikes):
        return {"layers": 5, "spikes": int(np.asarray(spikes).sum()), "samples": spikes.shape[0], "lava_seconds": 0.1}

    report = export_netx(graph, tmp_path / "m.net", lava_check=lava_agrees)
    assert report.checks["lava-dl vs simulator"].startswith("identical (") and report.figures["lava"]["layers"] == 5
    assert read_meta(report.path)["check"]["lava"]["identical"] is True


def test_no_verify_skips_the_checks(graph, tmp_path):
    report = export_nir(graph, tmp_path / "m.nir", verify=False)
    assert report.checks == {"NIR read-back vs deploy graph": "skipped"} and report.path.is_file()
