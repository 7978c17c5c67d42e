"""Int8 ONNX: the Loihi export's quantized network run by onnxruntime's integer kernels.

The network is `tmkt.export.quantize.quantize_graph(graph, calibration)`, the very object the
netx (Loihi) export writes: the same integer weights, biases, scales, CUBA decays and
thresholds, so the CPU and the chip run one network. A residual graph (resnet18), which netx
cannot take, is quantized with the same rules per neuron group (`tmkt.export.int_graph`: the
synapses summed into one LIF share its scale; an identity shortcut is a 1x1 conv of weight 1).
This module only writes the network as ONNX:

- input: frames `> 0.5` (the chip's input spikes, `netx.INPUT_THRESHOLD`) as uint8;
- every synaptic layer is `MatMulInteger` (uint8 spikes x int8 weights -> exact int32) on an
  im2col made by one `Gather` of pixels in NHWC layout: onnxruntime's `MatMulInteger` runs on the
  VNNI/AMX integer GEMM, while its `ConvInteger` takes a slow generic path (measured: 5x slower
  than the float `Conv`) and `QLinearConv` requantizes its output to 8 bits, which would change
  spikes. The quantizer's weights are 8-bit mantissas with exponent 1 (even integers in
  [-254, 254], `quantize.WEIGHT_EXP`): the GEMM multiplies the int8 mantissas, and the gain
  left (the exponent and the x64 of the neuron's input: 64 << 1 = 128) is carried by the spikes
  themselves, uint8 maps whose spikes are worth 128 (`spike_values`; 32 before a 2x2 sum pool,
  whose sums must stay in uint8, and an int32 x4 after its GEMM);
- average pooling that the netx export folds into the next convolution is undone where the
  folded integer kernel is exactly the pooling's spread of a smaller kernel (non-overlapping
  pooling, the backbones' case): a sum pooling (uint8 `Add` of strided slices, values 0..k*k)
  then the small kernel gives the same integers with k*k fewer multiply-accumulates;
- neurons are the chip's CUBA neurons in int32 (`netx_sim.cuba_step` with iDecay 4096):
  v = trunc(v * (4096 - vDecay) / 4096) + 64 * (a + bias), saturated below at -(2^23 - 1)
  (only where the layer's worst negative current could reach it: a static bound), spike where
  v > 64 * vThMant, reset to 0. Saturation above cannot change a spike (it spikes and resets);
- the readout sums its integer currents; logits are that sum / (T * scale).

Layer order: the unrolled model runs layer by layer, each layer on all T frames at once (one
GEMM over T*B rows, then its T neuron steps), which is valid because the network is
feed-forward (no layer reads a later one), and is exactly the simulator's aligned view. The stream model runs one step
with one int32 membrane per LIF layer (`[B, H, W, C]`, NHWC).

Verification (`verify_onnx_int8`), inside `export_onnx_int8` before the file appears: the
checker, then onnxruntime against the bit-accurate Loihi simulator (`netx_sim.simulate`) on
random and real spikes: every spike of every layer and every readout current must be identical
(integers, no tolerance), and the file's logits equal its debug twin's.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tmkt.export.graph import Add, AvgPool2d, Conv2d, DeployGraph
from tmkt.export.metadata import encode_metadata, graph_metadata
from tmkt.export.int_graph import GroupNet, quantize_residual, simulate_groups
from tmkt.export.netx import INPUT_THRESHOLD, InputMismatchWarning, input_mismatch
from tmkt.export.netx_sim import UV_MAX, layer_current, netx_dense_weight, simulate, to_spikes
from tmkt.export.onnx import MODES, read_onnx_metadata
from tmkt.export.quantize import DECAY_UNITY, WEIGHT_EXP, QLayer, QuantizedNet, quantize_graph
from tmkt.export.report import ExportError, ExportReport, ExportVerificationError
from tmkt.fileio import atomic_bytes

PRECISION = "int8"
OPSET = 17
IR_VERSION = 8  # what opset 17 needs; onnxruntime refuses IR versions newer than it knows
V_MIN = -(UV_MAX - 1)  # the chip's membrane saturates at +-(2^23 - 1)


class Int8VerificationError(ExportVerificationError):
    """onnxruntime's integer model disagrees with the Loihi simulator; `.report` holds the numbers."""

    def __init__(self, message: str, report: "Int8VerifyReport") -> None:
        super().__init__(message, asdict(report))
        self.report = report


# ---------------------------------------------------------------- plan: what each layer runs


@dataclass(frozen=True)
class SumPool:
    """A sum pooling (count_include_pad average pooling times k*k) on uint8 spikes."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class IntLayer:
    """One layer of the int8 model: a netx layer, possibly with its pooling taken back out.

    weight: integers of the synapse as run (conv `[O, I, kh, kw]`, dense `[O, I]` in the netx
    flatten order C, H, W); `pool`: the sum pooling before it (None: the weight is the netx one).
    """

    q: QLayer
    weight: np.ndarray
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    pool: SumPool | None
    in_shape: tuple[int, ...]  # what the synapse reads after `pool`: (C, H, W) or (N,)
    source: str  # the node whose spikes it reads (the graph's input or a LIF)

    @property
    def name(self) -> str:
        return self.q.name


@dataclass(frozen=True)
class IntGroup:
    """One LIF layer (or the readout) of the int8 model and the synapses whose currents it sums
    (one for a chain; a residual block adds a second). They share one scale and neuron."""

    name: str
    layers: tuple[IntLayer, ...]

    @property
    def readout(self) -> bool:
        return self.layers[0].q.readout

    @property
    def q(self) -> QLayer:
        return self.layers[0].q

    @property
    def bias(self) -> np.ndarray:
        return np.sum([l.q.bias.astype(np.int64) for l in self.layers], axis=0)


def _pool_before(graph: DeployGraph, synapse: str) -> tuple[AvgPool2d, Conv2d] | None:
    """The AvgPool2d feeding Conv2d node `synapse` directly (folded into it by the quantizer), or None."""
    node = graph.nodes.get(synapse)
    if not isinstance(node, Conv2d):
        return None
    src = graph.nodes[graph.inputs[synapse][0]]
    return (src, node) if isinstance(src, AvgPool2d) else None


def _spread(small: np.ndarray, pool: AvgPool2d, dilation: tuple[int, int], shape: tuple[int, ...]) -> np.ndarray:
    """The folded kernel of `quantize.fold_pool_into_conv` built from integer taps `small`."""
    (k_h, k_w), (s_h, s_w) = pool.kernel_size, pool.stride
    out = np.zeros(shape, np.int64)
    for ty in range(small.shape[2]):
        for tx in range(small.shape[3]):
            y, x = s_h * dilation[0] * ty, s_w * dilation[1] * tx
            out[:, :, y:y + k_h, x:x + k_w] += small[:, :, ty:ty + 1, tx:tx + 1]
    return out


def _unfold_pool(q: QLayer, pool: AvgPool2d, conv: Conv2d, source: str) -> IntLayer | None:
    """The layer as sum pooling + the small integer kernel, when that is exactly the folded
    kernel (the folded taps of one pooling window all rounded to the same integer); else None."""
    (k_h, k_w), (s_h, s_w), (p_h, p_w) = pool.kernel_size, pool.stride, pool.padding
    if k_h * k_w > 255:  # the pooled sum must fit uint8
        return None
    d = conv.dilation
    small = q.weight[:, :, :: s_h * d[0], :: s_w * d[1]][:, :, : conv.kernel_size[0], : conv.kernel_size[1]].astype(np.int64)
    if small.shape[2:] != conv.kernel_size or not np.array_equal(_spread(small, pool, d, q.weight.shape), q.weight):
        return None
    c, h, w = q.in_shape
    pooled = (c, (h + 2 * p_h - k_h) // s_h + 1, (w + 2 * p_w - k_w) // s_w + 1)
    sum_pool = SumPool(pool.kernel_size, pool.stride, pool.padding)
    return IntLayer(q, small, conv.stride, conv.padding, d, sum_pool, pooled, source)


def _int_layer(graph: DeployGraph, q: QLayer, source: str) -> IntLayer:
    if q.neuron.i_decay != DECAY_UNITY:
        raise ExportError(f"int8 ONNX: layer {q.name!r} has iDecay {q.neuron.i_decay}; only 4096 (no current state)")
    if q.kind == "conv" and q.groups != 1:
        raise ExportError(f"int8 ONNX: layer {q.name!r} is a grouped convolution (groups={q.groups}); not supported")
    pooled = _pool_before(graph, q.name.split("+")[0])
    unfolded = _unfold_pool(q, *pooled, source) if pooled is not None else None
    if unfolded is not None:
        return unfolded
    weight = q.weight.astype(np.int64) if q.kind == "conv" else netx_dense_weight(q.weight)
    return IntLayer(q, weight, q.stride, q.padding, q.dilation, None, tuple(q.in_shape), source)


def int8_plan(graph: DeployGraph, net: QuantizedNet | GroupNet) -> list[IntGroup]:
    """The groups of the int8 model for `net`: `quantize_graph(graph, ...)` (a chain: one synapse
    per LIF, as the netx file) or `int_graph.quantize_residual(graph, ...)`."""
    if isinstance(net, GroupNet):
        return [IntGroup(grp.name, tuple(_int_layer(graph, q, src) for q, src in zip(grp.layers, grp.sources)))
                for grp in net.groups]
    groups, source = [], graph.input_name
    for q in net.layers:
        name = q.name if q.readout else q.name.split("+")[-1]
        groups.append(IntGroup(name, (_int_layer(graph, q, source),)))
        source = name
    return groups


def needs_floor(group: IntGroup) -> bool:
    """Whether the membrane can reach the chip's lower saturation -(2^23 - 1): with the most
    negative current c (binary input, bias included, x64), v >= c * 4096 / vDecay at every step."""
    negative = sum(np.clip(-l.q.weight.reshape(l.q.weight.shape[0], -1).astype(np.int64), 0, None).sum(1)
                   for l in group.layers)
    worst = (64 * (group.bias - negative)).min()
    if worst >= 0:
        return False
    if group.q.neuron.v_decay == 0:
        return True
    return -worst * DECAY_UNITY / group.q.neuron.v_decay >= UV_MAX - 1


def _pool_size(layer: IntLayer) -> int:
    return 1 if layer.pool is None else layer.pool.kernel[0] * layer.pool.kernel[1]


def spike_values(plan: list[IntGroup]) -> dict[str, int]:
    """The uint8 value a spike of each source carries in the int8 model: a power of two that
    divides the gain (64 << e for a LIF group's synapse, 1 << e for the readout's) of every
    synapse reading it, with that synapse's (sum-pooled) input still within uint8 and its int32
    accumulator within range. The GEMM on these values then applies the gain itself, so most
    layers need no int32 multiply over their currents (only the rest of the gain, gain // value)."""
    values: dict[str, int] = {}
    for group in plan:
        factor = 1 if group.readout else 64
        for layer in group.layers:
            gain = factor << int8_mantissa(layer.weight)[1]
            k = int(np.prod(layer.weight.shape[1:]))
            value = min(values.get(layer.source, 128), gain & -gain, 1 << int(math.log2(255 // _pool_size(layer))))
            while value > 1 and value * _pool_size(layer) * 128 * k >= 2**31:
                value //= 2
            values[layer.source] = value
    return values


# ---------------------------------------------------------------- ONNX graph builder (NHWC)


class _Graph:
    """Nodes and initializers under construction, with fresh names."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value: np.ndarray, hint: str = "c") -> str:
        from onnx import numpy_helper

        value = np.asarray(value)
        key = (value.dtype.str, value.shape, value.tobytes()) if value.size <= 16 else None
        if key is not None and key in self._consts:
            return self._consts[key]
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(value, name))
        if key is not None:
            self._consts[key] = name
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, out: str | None = None, n_out: int = 1,
           **attrs: Any) -> Any:
        from onnx import helper

        outs = [out] if out is not None else [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs[0] if n_out == 1 else outs


def _i64(*v: int) -> np.ndarray:
    return np.asarray(v, np.int64)


def _pad_nhwc(g: _Graph, x: str, ph: int, pw: int) -> str:
    if ph == 0 and pw == 0:
        return x
    return g.op("Pad", [x, g.const(_i64(0, ph, pw, 0, 0, ph, pw, 0))], "pad")


def _shifted(g: _Graph, x: str, y0: int, x0: int, n_h: int, n_w: int, s_h: int, s_w: int) -> str:
    """`x[:, y0 : y0 + s_h*(n_h-1)+1 : s_h, x0 : ... : s_w, :]` (NHWC)."""
    starts, ends = g.const(_i64(y0, x0)), g.const(_i64(y0 + s_h * (n_h - 1) + 1, x0 + s_w * (n_w - 1) + 1))
    return g.op("Slice", [x, starts, ends, g.const(_i64(1, 2)), g.const(_i64(s_h, s_w))], "slice")


def _sum_pool(g: _Graph, x: str, pool: SumPool, shape: tuple[int, int, int]) -> str:
    """uint8 sum pooling of an NHWC map of (C, H, W) `shape`."""
    (k_h, k_w), (s_h, s_w), (p_h, p_w) = pool.kernel, pool.stride, pool.padding
    _, h, w = shape
    n_h, n_w = (h + 2 * p_h - k_h) // s_h + 1, (w + 2 * p_w - k_w) // s_w + 1
    xp = _pad_nhwc(g, x, p_h, p_w)
    total = None
    for u in range(k_h):
        for v in range(k_w):
            part = _shifted(g, xp, u, v, n_h, n_w, s_h, s_w)
            total = part if total is None else g.op("Add", [total, part], "pool")
    return total  # type: ignore[return-value]


def int8_mantissa(weight: np.ndarray) -> tuple[np.ndarray, int]:
    """(m int8, e) with weight = m << e: the quantizer's 8-bit mantissa and exponent
    (`quantize.WEIGHT_EXP`); e = 0 for integers that fit int8 as they are."""
    w = np.asarray(weight, np.int64)
    for e in (WEIGHT_EXP, 0):
        m = w >> e
        if np.array_equal(m << e, w) and m.min() >= -128 and m.max() <= 127:
            return m.astype(np.int8), e
    raise ExportError(f"int8 ONNX: weights {w.min()}..{w.max()} are not 8-bit mantissas (not from tmkt.export.quantize)")


def _gemm(g: _Graph, a: str, k: int, weight_cols: np.ndarray, hint: str) -> tuple[str, int]:
    """(int32 `[M, O]`, e): the uint8 rows `a` (K wide after a reshape) @ the int8 mantissas of
    `weight_cols` `[K, O]`; the current is that << e."""
    m, e = int8_mantissa(weight_cols)
    a = g.op("Reshape", [a, g.const(_i64(-1, k))], "rows")
    return g.op("MatMulInteger", [a, g.const(m, f"{hint}_w")], f"{hint}_a"), e


def _im2col_index(hp: int, wp: int, taps: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
                  out: tuple[int, int]) -> np.ndarray:
    """Flat pixel index into a padded `hp` x `wp` map of each (output pixel, tap y, tap x), in that
    order: gathering a `[N, hp*wp, C]` map with it gives the im2col rows `[N, ho*wo, kh*kw*C]`."""
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = taps, stride, dilation, out
    y = np.arange(ho)[:, None, None, None] * sh + np.arange(kh)[None, None, :, None] * dh
    x = np.arange(wo)[None, :, None, None] * sw + np.arange(kw)[None, None, None, :] * dw
    assert y.max() < hp and x.max() < wp
    return (y * wp + x).reshape(-1).astype(np.int64)


def _synapse(g: _Graph, x: str, layer: IntLayer, in_shape: tuple[int, ...]) -> tuple[str, int, tuple[int, ...]]:
    """Mantissa current of `layer` for spikes `x` (uint8, NHWC `[N, H, W, C]` or `[N, F]`) of
    (C, H, W) / (F,) `in_shape`: returns (int32 `[rows, O]` a, e, per-sample shape of the
    current, NHWC); the integer current (bias not yet added) is a << e."""
    hint = layer.name.split("+")[0]
    if layer.pool is not None:
        x = _sum_pool(g, x, layer.pool, in_shape)  # type: ignore[arg-type]
    o = layer.weight.shape[0]
    if layer.q.kind == "dense":
        w = layer.weight
        if len(layer.in_shape) == 3:  # netx flattens (C, H, W); our maps are (H, W, C)
            c, h, wd = layer.in_shape
            w = w.reshape(o, c, h, wd).transpose(0, 2, 3, 1).reshape(o, -1)
        return (*_gemm(g, x, w.shape[1], w.T, hint), (o,))
    c, h, w = layer.in_shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.weight.shape[2:], layer.stride, layer.padding, layer.dilation
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        a = x
    else:  # im2col in one Gather of C-byte pixels (2.5-3x faster than a Slice per tap and a Concat)
        hp, wp = h + 2 * ph, w + 2 * pw
        flat = g.op("Reshape", [_pad_nhwc(g, x, ph, pw), g.const(_i64(-1, hp * wp, c))], "flat")
        index = _im2col_index(hp, wp, (kh, kw), (sh, sw), (dh, dw), (ho, wo))
        a = g.op("Gather", [flat, g.const(index, f"{hint}_im2col")], "im2col", axis=1)
    weight_cols = layer.weight.transpose(2, 3, 1, 0).reshape(kh * kw * c, o)  # (tap y, tap x, channel) rows
    return (*_gemm(g, a, kh * kw * c, weight_cols, hint), (ho, wo, o))


def _decay(g: _Graph, v: str, v_decay: int) -> str | None:
    """trunc(v * (4096 - vDecay) / 4096) in int32 (int64 where the product could overflow);
    None when it is zero."""
    num = DECAY_UNITY - int(v_decay)
    if num == 0:
        return None
    div = math.gcd(num, DECAY_UNITY)
    num, den = num // div, DECAY_UNITY // div
    if num * UV_MAX < 2**31:  # |v| <= 2^23: the product fits int32; Div on integers truncates toward 0
        prod = v if num == 1 else g.op("Mul", [v, g.const(np.int32(num))], "decay")
        return prod if den == 1 else g.op("Div", [prod, g.const(np.int32(den))], "decay")
    wide = g.op("Cast", [v], "v64", to=7)  # INT64
    wide = g.op("Div", [g.op("Mul", [wide, g.const(np.int64(num))], "decay"), g.const(np.int64(den))], "decay")
    return g.op("Cast", [wide], "decay", to=6)  # INT32


def _lif_step(g: _Graph, c: str, v: str | None, group: IntGroup, floor: bool, out: str | None = None,
              last: bool = False) -> tuple[str, str | None]:
    """One CUBA step on the scaled current `c` = 64 * (a + bias) from membrane `v` (None: at rest);
    returns (spikes bool, new membrane named `out`; None for the `last` step of the unrolled
    model, whose membrane nothing reads)."""
    n = group.q.neuron
    d = None if v is None else _decay(g, v, n.v_decay)
    h = c if d is None else g.op("Add", [d, c], "v")
    if floor:
        h = g.op("Max", [h, g.const(np.int32(V_MIN))], "v")
    s = g.op("Greater", [h, g.const(np.int32(n.v_th_mant << 6))], "s")
    return s, None if last else g.op("Where", [s, g.const(np.int32(0)), h], "v", out=out)


def _group_current(g: _Graph, spikes: dict[str, tuple[str, tuple[int, ...], int]], group: IntGroup,
                   factor: int) -> tuple[str, tuple[int, ...]]:
    """factor * (sum of the group's integer currents + bias), int32 `[rows, O]`, bias broadcast on
    the channel axis; `spikes` maps a source node to (uint8 NHWC tensor, its (C, H, W) shape,
    the value one spike carries in it)."""
    total, out_shape = None, ()
    for layer in group.layers:
        x, shape, value = spikes[layer.source]
        a, e, out_shape = _synapse(g, x, layer, shape)
        gain = factor << e  # the mantissa's exponent and the factor: the spike value holds part of it
        assert gain % value == 0, (layer.name, gain, value)
        gain //= value
        term = a if gain == 1 else g.op("Mul", [a, g.const(np.int32(gain))], "a")
        total = term if total is None else g.op("Add", [total, term], "a")
    bias = (group.bias * factor).astype(np.int32)
    return g.op("Add", [total, g.const(bias, f"{group.name}_b")], "c"), out_shape  # type: ignore[list-item]


def _uint8_spikes(g: _Graph, fired: str, value: int, hint: str) -> str:
    """Boolean spikes as uint8 maps carrying `value` per spike (`spike_values`)."""
    s = g.op("Cast", [fired], hint, to=2)  # UINT8
    return s if value == 1 else g.op("Mul", [s, g.const(np.uint8(value))], hint)  # 1.6x faster than a Where


def _input_spikes(g: _Graph, frames: str, shape: tuple[int, int, int], value: int) -> str:
    """Frames `[N, C, H, W]` float -> uint8 NHWC spikes (frame > 0.5, as the chip's input layer)
    carrying `value`."""
    s = _uint8_spikes(g, g.op("Greater", [frames, g.const(np.float32(INPUT_THRESHOLD))], "in"), value, "in")
    return g.op("Transpose", [s], "in_nhwc", perm=[0, 2, 3, 1])


def _input_map(g: _Graph, frames: str, plan: list[IntGroup], input_shape: tuple[int, ...]):
    """Both builders' start: ({input node: (its uint8 NHWC spikes, (C, H, W), spike value)},
    `spike_values(plan)`)."""
    values = spike_values(plan)
    src = plan[0].layers[0].source
    return {src: (_input_spikes(g, frames, input_shape, values[src]), tuple(input_shape), values[src])}, values


def _value(name: str, elem: int, shape: list[Any]) -> Any:
    from onnx import helper

    return helper.make_tensor_value_info(name, elem, shape)


def _chw(out_shape: tuple[int, ...]) -> tuple[int, ...]:
    """(H, W, C) -> (C, H, W); (N,) unchanged."""
    return (out_shape[-1], *out_shape[:-1]) if len(out_shape) == 3 else out_shape


def _build_unrolled(plan: list[IntGroup], input_shape: tuple[int, ...], t: int, debug: bool) -> tuple[_Graph, list, list]:
    from onnx import TensorProto as TP

    g = _Graph()
    c, h, w = input_shape
    k = plan[-1].q.weight.shape[0]
    frames = g.op("Reshape", ["events", g.const(_i64(-1, c, h, w))], "frames")
    spikes, values = _input_map(g, frames, plan, input_shape)
    outputs = [_value("logits", TP.FLOAT, ["batch", k]), _value("step_logits", TP.FLOAT, [t, "batch", k])]
    debug_outs = []
    for group in plan[:-1]:
        cur, out_shape = _group_current(g, spikes, group, 64)
        cur = g.op("Reshape", [cur, g.const(_i64(t, -1))], "c_t")
        steps = g.op("Split", [cur, g.const(np.ones(t, np.int64))], "c_step", n_out=t, axis=0) if t > 1 else [cur]
        v, fired, floor = None, [], needs_floor(group)
        for step, ct in enumerate(steps):
            s, v = _lif_step(g, ct, v, group, floor, last=step == t - 1)
            fired.append(s)
        s_all = fired[0] if t == 1 else g.op("Concat", fired, "s_all", axis=0)
        value = values.get(group.name, 1)
        x = g.op("Reshape", [_uint8_spikes(g, s_all, value, "s_u8"), g.const(_i64(-1, *out_shape))], "spikes")
        spikes[group.name] = (x, _chw(out_shape), value)
        if debug:
            g.op("Reshape", [g.op("Cast", [s_all], "s_01", to=TP.UINT8), g.const(_i64(-1, *out_shape))], out=f"s_{group.name}")
            debug_outs.append(_value(f"s_{group.name}", TP.UINT8, ["rows", *out_shape]))
    readout = plan[-1]
    current, _ = _group_current(g, spikes, readout, 1)
    current = g.op("Reshape", [current, g.const(_i64(t, -1, k))], "readout")
    scale = float(readout.q.scale)
    step = g.op("Cast", [current], "step_f", to=TP.FLOAT)
    g.op("Mul", [step, g.const(np.float32(1.0 / scale))], out="step_logits")
    total = g.op("Cast", [g.op("ReduceSum", [current, g.const(_i64(0))], "sum", keepdims=0)], "sum_f", to=TP.FLOAT)
    g.op("Mul", [total, g.const(np.float32(1.0 / (t * scale)))], out="logits")
    if debug:
        g.op("Identity", [current], out="readout_current")
        debug_outs.append(_value("readout_current", TP.INT32, [t, "batch", k]))
    inputs = [_value("events", TP.FLOAT, [t, "batch", c, h, w])]
    return g, inputs, outputs + debug_outs


def _state_shape(group: IntGroup) -> list[int]:
    """Per-sample shape of a LIF layer's membrane in the int8 model (NHWC: H, W, C; or N)."""
    out = tuple(group.q.out_shape)
    return [out[1], out[2], out[0]] if len(out) == 3 else list(out)


def int8_state_names(plan: list[IntGroup]) -> list[dict[str, Any]]:
    """Per LIF layer of the stream model: input/output names, shape (batch excluded, H, W, C) and dtype."""
    return [{"layer": grp.name, "input": f"v_{grp.name}", "output": f"v_{grp.name}_out", "shape": _state_shape(grp),
             "dtype": "int32"} for grp in plan[:-1]]


def _build_stream(plan: list[IntGroup], input_shape: tuple[int, ...], debug: bool) -> tuple[_Graph, list, list]:
    from onnx import TensorProto as TP

    g = _Graph()
    c, h, w = input_shape
    k = plan[-1].q.weight.shape[0]
    spikes, values = _input_map(g, "frame", plan, input_shape)
    inputs = [_value("frame", TP.FLOAT, ["batch", c, h, w])]
    outputs = [_value("logits", TP.FLOAT, ["batch", k])]
    debug_outs = []
    for group, st in zip(plan[:-1], int8_state_names(plan)):
        cur, out_shape = _group_current(g, spikes, group, 64)
        cur = g.op("Reshape", [cur, g.const(_i64(-1, *out_shape))], "c")
        inputs.append(_value(st["input"], TP.INT32, ["batch", *st["shape"]]))
        s, _ = _lif_step(g, cur, st["input"], group, needs_floor(group), out=st["output"])
        outputs.append(_value(st["output"], TP.INT32, ["batch", *st["shape"]]))
        value = values.get(group.name, 1)
        spikes[group.name] = (_uint8_spikes(g, s, value, "spikes"), _chw(out_shape), value)
        if debug:
            g.op("Cast", [s], out=f"s_{group.name}", to=TP.UINT8)
            debug_outs.append(_value(f"s_{group.name}", TP.UINT8, ["batch", *out_shape]))
    readout = plan[-1]
    current, _ = _group_current(g, spikes, readout, 1)
    step = g.op("Cast", [current], "step_f", to=TP.FLOAT)
    g.op("Mul", [step, g.const(np.float32(1.0 / float(readout.q.scale)))], out="logits")
    if debug:
        g.op("Identity", [current], out="readout_current")
        debug_outs.append(_value("readout_current", TP.INT32, ["batch", k]))
    return g, inputs, outputs + debug_outs


def int8_model_proto(plan: list[IntGroup], net: QuantizedNet | GroupNet, mode: str, timesteps: int, debug: bool = False):
    """The onnx.ModelProto of the int8 model (no metadata)."""
    from onnx import helper

    if mode not in MODES:
        raise ExportError(f"mode must be one of {MODES}, got {mode!r}")
    shape = tuple(net.input_shape)
    g, inputs, outputs = _build_unrolled(plan, shape, timesteps, debug) if mode == "unrolled" else _build_stream(plan, shape, debug)
    graph = helper.make_graph(g.nodes, f"tmkt_int8_{mode}", inputs, outputs, g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                             producer_name="tmkt")


# ---------------------------------------------------------------- export


def _with_timesteps(graph: DeployGraph, t: int) -> DeployGraph:
    return graph if graph.meta.get("timesteps") == t else replace(graph, meta={**graph.meta, "timesteps": t})


def int8_metadata(graph: DeployGraph, net: QuantizedNet | GroupNet, plan: list[IntGroup], mode: str, t: int,
                  source_run: str | os.PathLike | None) -> dict[str, Any]:
    """The file's tmkt metadata: the float model's keys plus precision, quantizer figures and states."""
    from tmkt.export.onnx import _io_names

    inputs, outputs, _ = _io_names(graph, mode, False)
    if mode == "stream":
        inputs = ["frame"] + [s["input"] for s in int8_state_names(plan)]
        outputs = ["logits"] + [s["output"] for s in int8_state_names(plan)]
    extra: dict[str, Any] = {
        "timesteps": t, "mode": mode, "precision": PRECISION, "onnx_inputs": inputs, "onnx_outputs": outputs,
        "states": int8_state_names(plan) if mode == "stream" else [],
        "input_threshold": INPUT_THRESHOLD,
        "input_encoding": f"binary spikes: 1 where the event frame > {INPUT_THRESHOLD} (as the Loihi export)",
        "quantizer": {
            "function": ("tmkt.export.int_graph.quantize_residual (the netx rules per neuron group; netx takes no "
                         "residual net)") if isinstance(net, GroupNet) else "tmkt.export.quantize.quantize_graph (the Loihi netx export's)",
            "layers": [l.name for grp in plan for l in grp.layers], "scales": [float(grp.q.scale) for grp in plan],
            "v_th_mant": [int(grp.q.neuron.v_th_mant) for grp in plan[:-1]],
            "v_decay": [int(grp.q.neuron.v_decay) for grp in plan[:-1]],
            "pool_unfolded": [l.pool is not None for grp in plan for l in grp.layers],
            "readout_range": net.meta.get("readout_range"),
        },
    }
    if source_run is not None:
        extra["source_run"] = str(Path(source_run).resolve())
    meta = graph_metadata(graph.meta, **extra)
    meta.pop("readout_range", None)
    return meta


def export_onnx_int8(
    graph: DeployGraph,
    path: str | os.PathLike,
    *,
    verify: bool = True,
    mode: str = "unrolled",
    timesteps: int | None = None,
    calibration: np.ndarray | None = None,
    source_run: str | os.PathLike | None = None,
    check_samples: int = 4,
    seed: int = 0,
) -> ExportReport:
    """Write `graph` as an int8 ONNX model: the Loihi export's quantized network (see the module
    docstring); inputs and outputs as `export_onnx`'s, the stream model's membranes int32 NHWC.

    Args:
        graph: deploy graph with full metadata (`lower_run`): a chain (small, vgg), quantized as
            the netx export, or a residual net (resnet18), quantized per neuron group (`int_graph`).
        path: destination `.onnx`, written atomically.
        verify: compare onnxruntime with the bit-accurate Loihi simulator (residual: its
            semantics over the groups, `int_graph.simulate_groups`) before the file appears
            (`verify_onnx_int8`); raises Int8VerificationError on any differing spike or readout
            current. The checker runs either way.
        mode: "unrolled" or "stream".
        timesteps: T; default the graph's. The readout's scale is set for T steps.
        calibration: binary input spikes `[T, N, C, H, W]` of training samples
            (`netx.calibration_from_run`): the readout's range, exactly as the netx export (pass
            the same to both and both carry the same integers); also the real inputs checked.
        source_run: the run directory, recorded so that `tmkt eval FILE` finds the float model.
        check_samples: random (and as many real) samples verified.
    """
    import onnx

    if mode not in MODES:
        raise ExportError(f"mode must be one of {MODES}, got {mode!r}")
    t = int(timesteps if timesteps is not None else graph.meta.get("timesteps", 0))
    if t < 1:
        raise ExportError(f"timesteps must be >= 1 (none given and graph.meta has none), got {t}")
    mismatch = input_mismatch(graph.meta)
    if mismatch:
        warnings.warn(f"int8 ONNX: {mismatch}; its accuracy will differ from the float model's", InputMismatchWarning,
                      stacklevel=2)
    graph = _with_timesteps(graph, t)
    net, plan = int8_network(graph, calibration)
    proto = int8_model_proto(plan, net, mode, t)
    meta = int8_metadata(graph, net, plan, mode, t, source_run)
    proto.doc_string = f"tmkt int8 {mode} SNN (the Loihi export's integers): {meta.get('backbone', '?')}, T={t}"
    onnx.helper.set_model_props(proto, encode_metadata(meta))
    data = proto.SerializeToString()
    check = "onnxruntime vs integer reference (residual)" if isinstance(net, GroupNet) else "onnxruntime vs Loihi simulator"
    checks = {"onnx.checker": "ok", check: "skipped"}
    figures: dict[str, Any] = {"layers": len(plan), "pool_unfolded": sum(l.pool is not None for grp in plan for l in grp.layers)}
    path = Path(path)
    with atomic_bytes(path, data, suffix=".onnx", exclusive=True) as tmp:  # one writer of `path` at a time
        onnx.checker.check_model(str(tmp), full_check=True)
        if verify:
            rng = np.random.default_rng(seed)
            spikes = (rng.random((t, check_samples, *graph.input_shape)) < 0.3).astype(np.uint8)
            real = 0
            if calibration is not None and calibration.shape[0] == t:  # real samples binned with this T
                real = min(check_samples, calibration.shape[1])
                spikes = np.concatenate([np.asarray(calibration[:, :real], np.uint8), spikes], axis=1)
            report = verify_onnx_int8(graph, net, tmp, spikes, real_samples=real)
            if not report.ok:
                raise Int8VerificationError(f"{path}: {check.replace(' vs ', ' disagrees with the ')}: {report.summary()}",
                                            report)
            checks[check] = report.summary()
            figures.update(asdict(report))
    return ExportReport("onnx", path, f"int8 {mode}, T={t}, {len(data) / 1024:.1f} KiB", checks, figures)


# ---------------------------------------------------------------- verification


@dataclass(frozen=True)
class Int8VerifyReport:
    """onnxruntime's int8 model vs the bit-accurate Loihi simulator on the same binary spikes.

    spikes: neuron-steps compared (all LIF layers, steps, samples), `fired` of them spikes;
    spike_differences: differing neuron-steps per layer;
    current_differences: readout currents (integers, per step) that differ;
    max_abs_logit_diff: the file's logits vs the simulator's integer sum / (T * scale);
    twin_agrees: the file's logits equal those of its debug twin (which gives the spikes);
    chip_agreement: share of samples whose argmax equals the chip readout's (`SimResult.prediction`);
        None for a residual network (no chip file: the reference is `int_graph.simulate_groups`).
    """

    mode: str
    timesteps: int
    samples: int
    real_samples: int
    spikes: int
    fired: int
    spike_differences: dict[str, int]
    current_differences: int
    max_abs_logit_diff: float
    twin_agrees: bool
    chip_agreement: float | None

    @property
    def ok(self) -> bool:
        return self.twin_agrees and self.current_differences == 0 and not any(self.spike_differences.values())

    def summary(self) -> str:
        head = (f"{self.mode} T={self.timesteps}, {self.samples} samples ({self.real_samples} real): ")
        if self.ok:
            chip = "" if self.chip_agreement is None else f", argmax = chip readout on {self.chip_agreement:.0%}"
            return head + (f"{self.spikes:,} neuron-steps ({self.fired:,} spikes) and every readout current identical, "
                           f"max |dlogit| {self.max_abs_logit_diff:.2g}{chip}")
        bad = {k: v for k, v in self.spike_differences.items() if v}
        return head + (f"spikes differ {bad}, {self.current_differences} readout currents differ"
                       + ("" if self.twin_agrees else ", the file disagrees with its debug twin"))


def _session(model: str | bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def run_int8(sess, mode: str, plan: list[IntGroup], frames: np.ndarray, debug: bool) -> dict[str, Any]:
    """Run frames `[T, B, C, H, W]` through an int8 session: {"step_logits" [T, B, K], "logits"
    [B, K]; with `debug` (a debug twin) "spikes" per LIF layer `[T, B, C, H, W]`/`[T, B, N]` and
    "readout_current" `[T, B, K]`}."""
    t, b = frames.shape[:2]
    names = [s["layer"] for s in int8_state_names(plan)]
    frames = np.ascontiguousarray(frames, np.float32)
    out: dict[str, Any] = {}
    if mode == "unrolled":
        res = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"events": frames})))
        out.update(step_logits=res["step_logits"], logits=res["logits"])
        if debug:
            out["spikes"] = {n: res[f"s_{n}"].reshape(t, b, *res[f"s_{n}"].shape[1:]) for n in names}
            out["readout_current"] = res["readout_current"]
    else:
        states = {f"v_{s['layer']}": np.zeros((b, *s["shape"]), np.int32) for s in int8_state_names(plan)}
        steps, spikes, currents = [], {n: [] for n in names}, []
        outs = [o.name for o in sess.get_outputs()]
        for f in frames:
            res = dict(zip(outs, sess.run(None, {"frame": f, **states})))
            steps.append(res["logits"])
            states = {k: res[f"{k}_out"] for k in states}
            if debug:
                for n in names:
                    spikes[n].append(res[f"s_{n}"])
                currents.append(res["readout_current"])
        out.update(step_logits=np.stack(steps), logits=np.stack(steps).mean(0))
        if debug:
            out["spikes"] = {n: np.stack(v) for n, v in spikes.items()}
            out["readout_current"] = np.stack(currents)
    if debug:  # NHWC -> the simulator's (C, H, W)
        out["spikes"] = {n: (s.transpose(0, 1, 4, 2, 3) if s.ndim == 5 else s) for n, s in out["spikes"].items()}
    return out


def _reference(graph: DeployGraph, net: QuantizedNet | GroupNet, plan: list[IntGroup], spikes: np.ndarray):
    """(spikes per LIF group, per-step readout currents `[T, B, K]`, the chip's prediction or None)
    of the integer reference: the Loihi simulator for a chain, `simulate_groups` for a residual net."""
    if isinstance(net, GroupNet):
        ref = simulate_groups(net, spikes)
        return ref["spikes"], ref["readout_current"], None
    sim = simulate(net, spikes)
    readout = net.layers[-1]
    t, b = spikes.shape[:2]
    src = sim.spikes[-2].reshape(t * b, *sim.spikes[-2].shape[2:])
    current = (layer_current(readout, src) + readout.bias.astype(np.int64)).reshape(t, b, -1)
    return {grp.name: sim.spikes[1 + k] for k, grp in enumerate(plan[:-1])}, current, sim.prediction


def verify_onnx_int8(graph: DeployGraph, net: QuantizedNet | GroupNet, path: str | os.PathLike, spikes: np.ndarray, *,
                     real_samples: int = 0) -> Int8VerifyReport:
    """Run the int8 file at `path` and the integer reference (the Loihi simulator) on binary
    `spikes` `[T, B, C, H, W]`: spikes of every layer and readout currents must be identical
    (see `Int8VerifyReport`)."""
    meta = read_onnx_metadata(path)
    mode, t = meta["mode"], int(meta["timesteps"])
    plan = int8_plan(graph, net)
    spikes = np.asarray(spikes[:t], np.uint8)
    want_spikes, want_current, chip_pred = _reference(graph, net, plan, spikes)
    got = run_int8(_session(str(path)), mode, plan, spikes.astype(np.float32), debug=False)
    twin = run_int8(_session(int8_model_proto(plan, net, mode, t, debug=True).SerializeToString()), mode, plan,
                    spikes.astype(np.float32), debug=True)
    diffs = {grp.name: int((twin["spikes"][grp.name] != want_spikes[grp.name]).sum()) for grp in plan[:-1]}
    current_diff = int((twin["readout_current"] != want_current).sum())
    logit_diff = float(np.abs(got["logits"] - want_current.sum(0) / (t * plan[-1].q.scale)).max())
    twin_same = bool(np.array_equal(got["step_logits"], twin["step_logits"]))
    chip = None if chip_pred is None else float((got["logits"].argmax(1) == chip_pred).mean())
    return Int8VerifyReport(mode, t, int(spikes.shape[1]), int(real_samples),
                            int(sum(want_spikes[g.name].size for g in plan[:-1])),
                            int(sum(int(want_spikes[g.name].sum()) for g in plan[:-1])),
                            diffs, current_diff, logit_diff, twin_same, chip)


def int8_network(graph: DeployGraph, calibration: np.ndarray | None = None) -> tuple[QuantizedNet | GroupNet, list[IntGroup]]:
    """The quantized network and the int8 model's groups for `graph`: a chain is quantized by the
    Loihi export's `quantize_graph` (the netx file's integers); a residual graph (resnet18) by
    `int_graph.quantize_residual` (the same rules per neuron group)."""
    residual = any(isinstance(node, Add) for node in graph.nodes.values())
    net = quantize_residual(graph, calibration) if residual else quantize_graph(graph, calibration)
    return net, int8_plan(graph, net)


def input_spikes(frames: np.ndarray) -> np.ndarray:
    """Frames as the int8 model (and the chip) sees them: uint8 spikes, frame > 0.5."""
    return to_spikes(frames, INPUT_THRESHOLD)
