"""The deploy graph: equal to the spikingjelly network, exact BN folding, shapes, errors, round-trips."""

import dataclasses
import inspect
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from spikingjelly.activation_based import neuron as sj_neuron

from tmkt.export import graph as G
from tmkt.models import ModelConfig, build_model
from tmkt.models import randomize_batchnorm as randomize_bn




def sj_spikes(model, x):
    """Spikes of every spikingjelly LIF layer in module order (= the graph's LIF order), and logits."""
    lifs = [m for m in model.trunk.modules() if isinstance(m, sj_neuron.LIFNode)]
    got = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: got.append(out.detach().clone())) for m in lifs]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return got, out["logits"]


BACKBONES = [
    ("small", 1.0, (32, 32)),
    ("vgg", 0.125, (16, 16)),
    ("resnet18", 0.125, (32, 32)),
]


@pytest.mark.parametrize("backbone,width,size", BACKBONES)
def test_deploy_graph_equals_spikingjelly(backbone, width, size):
    torch.manual_seed(1)
    model = randomize_bn(build_model(ModelConfig(backbone=backbone, num_classes=7, input_size=size, width=width)))
    graph = G.lower(model)
    x = (torch.rand(5, 3, 2, *size, generator=torch.Generator().manual_seed(2)) < 0.3).float()
    sj, logits = sj_spikes(model, x)
    out = G.run_graph(graph, x)
    names = graph.lif_names()
    assert len(names) == len(sj)
    for name, s in zip(names, sj):
        got = out["spikes"][name]
        assert got.shape == s.shape, name
        assert torch.equal(got, s), f"{name}: {(got != s).sum().item()} spikes differ"
    rates = [s.mean().item() for s in sj]
    assert all(0.005 < r < 0.9 for r in rates), rates  # the comparison means something
    assert torch.allclose(out["step_logits"], logits, atol=1e-5, rtol=0)
    assert torch.allclose(out["logits"], logits.mean(0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_bias", [False, True])
def test_bn_folding_exact(with_bias):
    g = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(3, 6, 3, padding=1, bias=with_bias).double()
    bn = torch.nn.BatchNorm2d(6).double()
    bn.running_mean.copy_(torch.randn(6, generator=g, dtype=torch.float64))
    bn.running_var.copy_(torch.rand(6, generator=g, dtype=torch.float64) + 0.1)
    bn.weight.data.copy_(torch.randn(6, generator=g, dtype=torch.float64))
    bn.bias.data.copy_(torch.randn(6, generator=g, dtype=torch.float64))
    bn.eval()
    w, b = G.fold_bn(conv.weight.detach().numpy(), None if conv.bias is None else conv.bias.detach().numpy(), bn)
    # independent float64 formula; fold_bn stores float32, so they agree to the float32 rounding
    scale = bn.weight.detach().numpy() / np.sqrt(bn.running_var.numpy() + bn.eps)
    w64 = conv.weight.detach().numpy() * scale[:, None, None, None]
    b0 = conv.bias.detach().numpy() if with_bias else 0.0
    b64 = (b0 - bn.running_mean.numpy()) * scale + bn.bias.detach().numpy()
    assert np.array_equal(w, w64.astype(np.float32)) and np.array_equal(b, b64.astype(np.float32))
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ref = bn(conv(x))
        folded = F.conv2d(x, torch.from_numpy(w).double(), torch.from_numpy(b).double(), padding=1)
        folded64 = F.conv2d(x, torch.from_numpy(w64), torch.from_numpy(np.asarray(b64)), padding=1)
    assert torch.allclose(folded64, ref, atol=1e-12, rtol=0)  # the algebra is exact
    bound = 2**-24 * F.conv2d(x.abs(), torch.from_numpy(np.abs(w64)), padding=1) + 2**-24 * np.abs(b64).max()
    assert ((folded - ref).abs() <= bound * 1.01 + 1e-15).all()  # only float32 rounding of w, b


def test_shapes_against_torch():
    rng = np.random.default_rng(0)
    nodes = {
        "in": G.Input((4, 13, 11)),
        "c1": G.Conv2d(rng.normal(size=(8, 2, 3, 3)), np.zeros(8), stride=2, padding=(1, 2), dilation=1, groups=2),
        "c2": G.Conv2d(rng.normal(size=(8, 8, 3, 2)), np.zeros(8), stride=(1, 2), padding=0, dilation=(2, 1)),
        "l1": G.LIF(2.0, 1.0),
        "p1": G.AvgPool2d(2, 2, 1),
        "f": G.Flatten(),
        "d": G.Dense(rng.normal(size=(5, 8 * 2 * 2)), np.zeros(5)),
    }
    inputs = {"c1": ("in",), "c2": ("c1",), "l1": ("c2",), "p1": ("l1",), "f": ("p1",), "d": ("f",)}
    g = G.DeployGraph(nodes, inputs, output="d")
    vals, _ = G.step_graph(g, torch.randn(3, 4, 13, 11), G.init_state(g, 3))
    for name, v in vals.items():
        assert tuple(v.shape[1:]) == g.shapes[name], name
    assert g.shapes["d"] == (5,)


def test_lowered_shapes():
    model = build_model(ModelConfig(backbone="small", num_classes=4, input_size=(32, 24)))
    g = G.lower(model)
    assert g.input_shape == (2, 32, 24)
    assert g.shapes["pool3"] == (64, 4, 3)
    assert g.shapes["flatten1"] == (64 * 4 * 3,)
    assert g.shapes["head"] == (4,)
    res = G.lower(build_model(ModelConfig(backbone="resnet18", num_classes=3, input_size=(20, 20), width=0.125)))
    (pool,) = [n for n, node in res.nodes.items() if isinstance(node, G.AvgPool2d)]
    src = res.shapes[res.inputs[pool][0]]
    assert res.nodes[pool].kernel_size == src[1:] and res.shapes[pool] == (src[0], 1, 1)


def _small_graph_parts():
    rng = np.random.default_rng(0)
    nodes = {
        "in": G.Input((2, 4, 4)),
        "conv": G.Conv2d(rng.normal(size=(3, 2, 3, 3)), np.zeros(3), padding=1),
        "lif": G.LIF(2.0, 1.0),
        "flat": G.Flatten(),
        "head": G.Dense(rng.normal(size=(2, 48)), np.zeros(2)),
    }
    inputs = {"conv": ("in",), "lif": ("conv",), "flat": ("lif",), "head": ("flat",)}
    return nodes, inputs


@pytest.mark.parametrize(
    "mutate,name",
    [
        (lambda n, i: n.update(head=G.Dense(np.zeros((2, 47)), np.zeros(2))), "head"),
        (lambda n, i: n.update(conv=G.Conv2d(np.zeros((3, 5, 3, 3)), np.zeros(3))), "conv"),
        (lambda n, i: i.update(conv=("lif",)), "conv"),
        (lambda n, i: i.update(lif=()), "lif"),
        (lambda n, i: (n.update(add=G.Add()), i.update(add=("conv",))), "add"),
        (lambda n, i: (n.update(add=G.Add()), i.update(add=("conv", "flat"))), "add"),
        (lambda n, i: n.update(lif=object()), "lif"),
        (lambda n, i: n.update(conv=G.Conv2d(np.zeros((3, 2, 9, 9)), np.zeros(3))), "conv"),
    ],
)
def test_malformed_graph_names_the_node(mutate, name):
    nodes, inputs = _small_graph_parts()
    mutate(nodes, inputs)
    with pytest.raises(G.GraphError, match=f"'{name}'"):
        G.DeployGraph(nodes, inputs, output="head")


def test_malformed_graph_other():
    nodes, inputs = _small_graph_parts()
    with pytest.raises(G.GraphError, match="'nope'"):
        G.DeployGraph(nodes, inputs, output="nope")
    nodes.pop("in")
    with pytest.raises(G.GraphError, match="Input"):
        G.DeployGraph(nodes, inputs, output="head")
    with pytest.raises(ValueError, match="tau"):
        G.LIF(1.0, 1.0)
    with pytest.raises(ValueError, match="Conv2d.bias"):
        G.Conv2d(np.zeros((3, 2, 3, 3)), np.zeros(2))


# ---------------------------------------------------------------- NIR-style round-trip

_EXAMPLES = {
    G.Input: dict(shape=[2, 5, 6]),
    G.Conv2d: dict(
        weight=np.arange(4 * 1 * 3 * 2, dtype=np.float64).reshape(4, 1, 3, 2) / 7,
        bias=np.linspace(-1, 1, 4),
        stride=[2, 1],
        padding=1,
        dilation=(1, 2),
        groups=2,
    ),
    G.Dense: dict(weight=np.eye(3, 5) * 0.5, bias=[0.1, 0.2, 0.3]),
    G.AvgPool2d: dict(kernel_size=3, stride=[2, 1], padding=(1, 0)),
    G.Flatten: dict(),
    G.Add: dict(),
    G.LIF: dict(tau=2.5, v_threshold=0.75, v_reset=0),
}


def _node_classes():
    """Every node dataclass defined in the graph module (found by introspection)."""
    return {
        c
        for _, c in inspect.getmembers(G, inspect.isclass)
        if dataclasses.is_dataclass(c) and c.__module__ == G.__name__ and c is not G.DeployGraph
    }


def _serialize(node) -> bytes:
    """Generic serializer: numpy fields to an npz, the rest to JSON (as NIR writes its nodes)."""
    arrays, plain = {}, {}
    for f in dataclasses.fields(node):
        v = getattr(node, f.name)
        (arrays if isinstance(v, np.ndarray) else plain)[f.name] = v
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(json.dumps({"type": type(node).__name__, **plain}).encode(), np.uint8), **arrays)
    return buf.getvalue()


def _deserialize(data: bytes):
    z = np.load(io.BytesIO(data))
    meta = json.loads(z["__meta__"].tobytes())
    cls = getattr(G, meta.pop("type"))
    return cls(**meta, **{k: z[k] for k in z.files if k != "__meta__"})


def test_every_node_class_round_trips():
    classes = _node_classes()
    assert classes == set(G.NODE_TYPES)
    assert classes == set(_EXAMPLES), "add an example for every node class"
    for cls in classes:
        node = cls(**_EXAMPLES[cls])
        back = _deserialize(_serialize(node))
        assert type(back) is cls
        for f in dataclasses.fields(node):
            a, b = getattr(node, f.name), getattr(back, f.name)
            if isinstance(a, np.ndarray):
                assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b), (cls.__name__, f.name)
            else:
                assert a == b and type(a) is type(b), (cls.__name__, f.name, a, b)


def test_lowered_graph_round_trips_and_runs_the_same():
    model = randomize_bn(build_model(ModelConfig(backbone="resnet18", num_classes=3, input_size=(16, 16), width=0.125)))
    g = G.lower(model, {"timesteps": 3})
    back = G.DeployGraph(
        {n: _deserialize(_serialize(node)) for n, node in g.nodes.items()}, dict(g.inputs), g.output, dict(g.meta)
    )
    assert back.shapes == g.shapes
    x = (torch.rand(3, 2, 2, 16, 16, generator=torch.Generator().manual_seed(0)) < 0.4).float()
    assert torch.equal(G.run_graph(g, x)["step_logits"], G.run_graph(back, x)["step_logits"])
