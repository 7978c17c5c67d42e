"""Deploy graph -> a chain of netx layers in 8-bit fixed point (lava-dl netx 0.6.0, Loihi CUBA).

Two steps, each a plain function:

1. `fold_for_netx(g)`: netx 0.6.0 builds only `input`, `conv`, `dense`, `flatten` layers, so
   average pooling is folded *exactly* into the next synaptic layer (the graph puts pooling after
   the LIF, so the pool sees binary spikes and every neuron layer still receives binary spikes):
   - AvgPool2d(k, s, p) then Conv2d(K, S, P, D) == one Conv2d with stride s*S, padding s*P + p,
     dilation 1 and a kernel of size s*D*(K-1) + k where tap `a` of the conv is spread over
     `s*D*a + u` (u < k) and divided by k*k (count_include_pad). Exact as long as the pooled
     map's zero padding covers only the input's zero padding (checked; else GraphError);
   - AvgPool2d then Flatten then Dense == a Dense over the unpooled map (weight = adjoint of the
     pooling applied to every row).
   The result is a list of `FloatLayer`, each synapse + neuron (or the readout head).
2. `quantize_graph`: one scale per layer, s = 254 / max|W|, weights rounded to even integers
   w = 2 * round(W*s / 2) in [-254, 254]: an 8-bit signed mantissa (int8, [-127, 127]) with weight
   exponent 1, which is what Loihi's mixed-sign 8-bit synapse holds (lava's `truncate_weights`
   drops the LSB of 8-bit mixed-sign weights) and what the int8 ONNX export
   (`tmkt.export.onnx_int8`) multiplies on the CPU: one quantizer, the same integers on both
   exits. The scale is lowered only where the bias round(b*s) would leave its
   13 bits (netx writes bias_mant with bias_exp 6) or the worst-case input current of a neuron
   the 24-bit current register (|a_in| << 6 < 2^23). Threshold -> vThMant = ceil(v_th*s) - 1
   (Loihi spikes on v > vThMant << 6: for integer currents this is exactly v >= v_th*s), 17 bits.
   A layer whose threshold overflows 17 bits, or whose bias forces its weights below 5 bits,
   raises LavaExportError naming it.

Neurons: our LIF (v = (1 - 1/tau) v + I, hard reset to 0) is a CUBA neuron with iDecay 4096
(current = this step's input) and vDecay round(4096 / tau). The head has no LIF: it becomes a
dense readout with iDecay 4096, vDecay 0 (a perfect integrator) and the largest threshold
(2^17 - 1), whose accumulated input current over T steps is the (scaled) sum of the logits.

The readout never saturates (`readout_scale`): its membrane v = 64 * (running sum of W_int s_t +
b_int) must stay at or below vThMant << 6 = 64 * (2^17 - 1), inside the 24-bit register and under
the threshold, at every step of every sample, so that the membrane read after T steps (what
lava-dl and the chip give) is the exact integer logit sum. Its scale is the 8-bit one, lowered
until T steps at the largest per-step |current| seen on calibration spikes fit (headroom: a
sample would have to sustain the calibration's peak current at every one of the T steps to reach
the limit); without calibration, until the worst case of any binary input fits (Σ|W| + |b| at
every step; always safe, coarser). A readout that would keep fewer than 5 weight bits raises
ReadoutRangeError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from tmkt.export.graph import LIF, Add, AvgPool2d, Conv2d, Dense, DeployGraph, Flatten, GraphError, Input, conv_output_size

TARGET = "lava (netx 0.6.0)"
WEIGHT_MIN, WEIGHT_MAX = -256, 254  # netx clips mixed-sign dense weights outside this range
WEIGHT_EXP = 1  # weights are int8 mantissas << 1 (even integers): Loihi's 8-bit mixed-sign weight
BIAS_MAX = 2**12 - 1  # bias_mant: signed 13 bits
VTH_MAX = 2**17 - 1  # vThMant: unsigned 17 bits
CURRENT_MAX = 2**17 - 1  # |a_in| << 6 must stay below 2^23 (24-bit current register)
DECAY_UNITY = 4096


class LavaExportError(GraphError):
    """A graph that cannot go to lava-dl netx 0.6.0; the message names the layer."""


class ReadoutRangeError(LavaExportError):
    """The readout membrane cannot stay inside Loihi's 24-bit range (and under its threshold) for
    T steps without dropping below 5 weight bits; the message names the layer and the figures."""


@dataclass(frozen=True)
class CubaParams:
    """netx `neuron/` group of a CUBA layer (integers as Loihi takes them)."""

    i_decay: int = DECAY_UNITY
    v_decay: int = 0
    v_th_mant: int = 0
    ref_delay: int = 1


@dataclass(frozen=True, kw_only=True)
class ConvGeometry:
    """Stride, padding and dilation ((y, x) pairs) and groups of a convolution. A dense layer
    keeps the default, which is no geometry at all (stride 1, no padding)."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @classmethod
    def of(cls, conv: Conv2d) -> ConvGeometry:
        return cls(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)

    def output_shape(self, out_channels: int, in_shape: tuple[int, ...], kernel_size: tuple[int, int]) -> tuple[int, int, int]:
        """(C, H, W) of the convolution's output for an input map `in_shape` (C, H, W)."""
        height, width = (
            conv_output_size(size, k, s, p, d)
            for size, k, s, p, d in zip(in_shape[1:], kernel_size, self.stride, self.padding, self.dilation)
        )
        return (out_channels, height, width)


@dataclass(eq=False, kw_only=True)
class NetxLayer:
    """One netx layer: a synapse (conv or dense) and its neurons.

    `kind` "conv": weight [O, I/groups, kh, kw] (PyTorch order, correlation); "dense": [O, I].
    `in_shape`/`out_shape` exclude the batch: (C, H, W) or (N,). `flatten` marks a dense layer
    fed by a (C, H, W) map, flattened in C, H, W order.
    """

    name: str
    kind: str
    weight: np.ndarray
    bias: np.ndarray
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    geometry: ConvGeometry = ConvGeometry()
    flatten: bool = False

    @property
    def stride(self) -> tuple[int, int]:
        return self.geometry.stride

    @property
    def padding(self) -> tuple[int, int]:
        return self.geometry.padding

    @property
    def dilation(self) -> tuple[int, int]:
        return self.geometry.dilation

    @property
    def groups(self) -> int:
        return self.geometry.groups


@dataclass(eq=False, kw_only=True)
class FloatLayer(NetxLayer):
    """A netx layer in float64 before quantization; `lif` is None for the readout head."""

    lif: LIF | None


@dataclass(eq=False, kw_only=True)
class QLayer(NetxLayer):
    """A quantized netx layer: integer weight/bias (int32), CUBA parameters and its weight scale."""

    neuron: CubaParams
    scale: float
    readout: bool = False


@dataclass(eq=False)
class QuantizedNet:
    """The netx network: input (C, H, W) binary spikes, then `layers` (the last one the readout)."""

    input_shape: tuple[int, int, int]
    layers: list[QLayer]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def depth(self) -> int:
        """Pipeline delay of the readout in steps (one per synaptic layer)."""
        return len(self.layers)


# ---------------------------------------------------------------- pooling folds (exact, float64)


def fold_pool_into_conv(pool: AvgPool2d, conv: Conv2d, in_shape: tuple[int, int, int], name: str) -> Conv2d:
    """AvgPool2d then Conv2d as one Conv2d over the unpooled map `in_shape` (C, H, W).

    Raises LavaExportError when the two are not exactly one convolution (the pooling drops
    trailing rows/columns that the conv's zero padding would then see, or kernel > stride + pad).
    """
    (k_h, k_w), (s_h, s_w), (p_h, p_w) = pool.kernel_size, pool.stride, pool.padding
    (kk_h, kk_w), (ss_h, ss_w), (pp_h, pp_w), (d_h, d_w) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    _, h, w = in_shape
    for axis, k, s, p, size in (("height", k_h, s_h, p_h, h), ("width", k_w, s_w, p_w, w)):
        pooled = (size + 2 * p - k) // s + 1
        # a pooled position just outside the map must read nothing but padding
        if k > s + p or s * pooled - p < size:
            raise LavaExportError(
                f"layer {name!r}: average pooling (kernel {k}, stride {s}, padding {p}) over a {size}-wide "
                f"{axis} cannot be folded exactly into the next convolution for {TARGET}"
            )
    w_src = conv.weight.astype(np.float64)
    o, ig, _, _ = w_src.shape
    kh_eff, kw_eff = s_h * d_h * (kk_h - 1) + k_h, s_w * d_w * (kk_w - 1) + k_w
    folded = np.zeros((o, ig, kh_eff, kw_eff))
    for tap_y in range(kk_h):  # every tap of the conv kernel reads a k_h x k_w window of the pooling
        for tap_x in range(kk_w):
            for pool_y in range(k_h):
                for pool_x in range(k_w):
                    y, x = s_h * d_h * tap_y + pool_y, s_w * d_w * tap_x + pool_x
                    folded[:, :, y, x] += w_src[:, :, tap_y, tap_x] / (k_h * k_w)
    return Conv2d(
        folded, conv.bias.astype(np.float64), (s_h * ss_h, s_w * ss_w), (s_h * pp_h + p_h, s_w * pp_w + p_w), (1, 1), conv.groups
    )


def fold_pool_into_dense(pool: AvgPool2d, dense: Dense, in_shape: tuple[int, int, int]) -> Dense:
    """AvgPool2d then Flatten then Dense as one Dense over the flattened unpooled map (C*H*W)."""
    import torch
    import torch.nn.functional as F

    c, h, w = in_shape
    x = torch.zeros((dense.weight.shape[0], c, h, w), dtype=torch.float64, requires_grad=True)
    pooled = F.avg_pool2d(x, pool.kernel_size, pool.stride, pool.padding)
    rows = torch.from_numpy(dense.weight.astype(np.float64)).reshape(pooled.shape)
    # pooling is linear: W_unpooled[o] = pool^T(W[o]), i.e. the vector-Jacobian product
    (grad,) = torch.autograd.grad(pooled, x, grad_outputs=rows)
    return Dense(grad.reshape(dense.weight.shape[0], -1).numpy(), dense.bias.astype(np.float64))


# ---------------------------------------------------------------- graph -> chain of netx layers


def _chain(g: DeployGraph) -> list[str]:
    names = list(g.nodes)
    for prev, name in zip(names, names[1:]):
        node = g.nodes[name]
        if isinstance(node, Add):
            raise LavaExportError(
                f"layer {name!r} (residual Add): {TARGET} has no residual layer type; "
                "export a feed-forward backbone (small, vgg) or use ONNX / NIR"
            )
        if g.inputs[name] != (prev,):
            raise LavaExportError(f"layer {name!r}: {TARGET} takes a plain chain of layers; it reads {g.inputs[name]}")
    if g.output != names[-1]:
        raise LavaExportError(f"graph output {g.output!r} is not its last layer")
    return names


class _Synapse(NamedTuple):
    """A conv or dense layer (pooling folded in) waiting for the LIF that turns its current into spikes."""

    name: str
    node: Conv2d | Dense
    in_shape: tuple[int, ...]
    flatten: bool


def fold_for_netx(g: DeployGraph) -> list[FloatLayer]:
    """Group the deploy graph into netx layers (pooling folded), float64; raises naming the layer."""
    names = _chain(g)
    layers: list[FloatLayer] = []
    pending: list[tuple[str, AvgPool2d | Flatten]] = []  # pool/flatten after a spike source
    src_shape: tuple[int, ...] = g.input_shape  # shape of the last spike source (input or LIF)
    waiting: _Synapse | None = None  # synapse awaiting its LIF

    for name in names[1:]:
        node = g.nodes[name]
        if isinstance(node, (AvgPool2d, Flatten)):
            if waiting is not None:
                raise LavaExportError(
                    f"layer {name!r} ({type(node).__name__}) between {waiting.name!r} and its neuron: "
                    f"a neuron layer on {TARGET} must receive a synapse's current directly"
                )
            pending.append((name, node))
            continue
        if isinstance(node, (Conv2d, Dense)):
            if waiting is not None:
                raise LavaExportError(
                    f"layer {name!r} reads the current of {waiting.name!r} (no neuron between): "
                    f"the input of every synaptic layer on {TARGET} must be binary spikes"
                )
            cur, flatten = node, False
            kinds = [type(op).__name__ for _, op in pending]
            allowed = [[], ["AvgPool2d"]] if isinstance(node, Conv2d) else [[], ["Flatten"], ["AvgPool2d", "Flatten"]]
            if kinds not in allowed:
                raise LavaExportError(
                    f"layer {pending[0][0]!r}: {' -> '.join(kinds)} before {name!r} cannot be folded for {TARGET} "
                    "(supported: AvgPool2d -> Conv2d, [AvgPool2d ->] Flatten -> Dense)"
                )
            if kinds and kinds[0] == "AvgPool2d":
                pname, pool = pending[0]
                if isinstance(node, Conv2d):
                    cur = fold_pool_into_conv(pool, node, src_shape, pname)  # type: ignore[arg-type]
                else:
                    cur = fold_pool_into_dense(pool, node, src_shape)  # type: ignore[arg-type]
            flatten = bool(kinds) and kinds[-1] == "Flatten"
            shape = src_shape
            if isinstance(cur, Dense) and len(shape) == 3 and not flatten:
                raise LavaExportError(f"layer {name!r}: Dense on a (C, H, W) map needs a Flatten first")
            if isinstance(cur, Conv2d) and len(shape) != 3:
                raise LavaExportError(f"layer {name!r}: Conv2d needs a (C, H, W) input, got {shape}")
            pending = []
            waiting = _Synapse(name, cur, shape, flatten)
            if name == g.output:
                layers.append(_float_layer(waiting, name, None))
                waiting = None
            continue
        if isinstance(node, LIF):
            if waiting is None:
                raise LavaExportError(
                    f"layer {name!r} (LIF) is not fed by a Conv2d or Dense (non-binary input to a neuron layer); "
                    f"{TARGET} cannot take it"
                )
            if node.v_reset != 0.0:
                raise LavaExportError(f"layer {name!r}: v_reset={node.v_reset} but Loihi CUBA neurons reset to 0")
            layers.append(_float_layer(waiting, f"{waiting.name}+{name}", node))
            src_shape, waiting = g.shapes[name], None
            continue
        raise LavaExportError(f"layer {name!r}: {type(node).__name__} is not supported on {TARGET}")
    if waiting is not None or pending:
        raise LavaExportError(f"the graph ends without a readout: {TARGET} export needs a Dense head as last layer")
    if not layers or layers[-1].lif is not None or layers[-1].kind != "dense":
        raise LavaExportError(f"graph output {g.output!r} must be a Dense head for {TARGET}")
    return layers


def _float_layer(synapse: _Synapse, name: str, lif: LIF | None) -> FloatLayer:
    weight, bias = synapse.node.weight.astype(np.float64), synapse.node.bias.astype(np.float64)
    if isinstance(synapse.node, Conv2d):
        geometry = ConvGeometry.of(synapse.node)
        out_shape = geometry.output_shape(synapse.node.out_channels, synapse.in_shape, synapse.node.kernel_size)
        return FloatLayer(name=name, kind="conv", weight=weight, bias=bias, in_shape=tuple(synapse.in_shape),
                          out_shape=out_shape, geometry=geometry, lif=lif)
    return FloatLayer(name=name, kind="dense", weight=weight, bias=bias, in_shape=tuple(synapse.in_shape),
                      out_shape=(weight.shape[0],), flatten=synapse.flatten, lif=lif)


# ---------------------------------------------------------------- quantization


def _worst_current(weight: np.ndarray, bias: np.ndarray) -> float:
    """Largest |input current| any binary input can give one neuron (per output, both signs)."""
    w = weight.reshape(weight.shape[0], -1)
    pos = np.clip(w, 0, None).sum(1) + np.clip(bias, 0, None)
    neg = np.clip(-w, 0, None).sum(1) + np.clip(-bias, 0, None)
    return float(max(pos.max(), neg.max()))


def layer_scale(layer: FloatLayer) -> float:
    """Weight scale of one layer: the full 8-bit range, narrowed only where the bias would leave
    its 13 bits or the worst-case input current of a neuron its 24-bit register (|a_in| < 2^17)."""
    wmax = float(np.abs(layer.weight).max())
    if wmax == 0.0:
        raise LavaExportError(f"layer {layer.name!r}: all weights are zero; netx cannot map an empty synapse")
    scale = WEIGHT_MAX / wmax
    bmax = float(np.abs(layer.bias).max(initial=0.0))
    if bmax * scale > BIAS_MAX:
        scale = BIAS_MAX / bmax * (1 - 1e-9)
    worst = _worst_current(layer.weight, np.zeros_like(layer.bias)) * scale
    if worst > CURRENT_MAX:
        scale *= CURRENT_MAX / worst * (1 - 1e-9)
    return scale


MIN_WEIGHT_BITS = 5  # below this many magnitude bits the layer is refused rather than silently degraded


def readout_sums(weight: np.ndarray, bias: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    """Running sums over T of the readout current, `[T, N, K]`, for input spikes `[T, N, I]`."""
    t, n = inputs.shape[:2]
    current = inputs.reshape(t * n, -1).astype(np.float64) @ weight.T.astype(np.float64) + bias
    return np.cumsum(current.reshape(t, n, -1), axis=0)


def readout_scale(layer: FloatLayer, timesteps: int, inputs: np.ndarray | None = None) -> tuple[float, dict[str, Any]]:
    """Scale of the readout so that its membrane stays in range (module docstring); returns
    (scale, figures). `inputs`: the readout's input spikes on calibration data, `[T, N, I]`."""
    base = layer_scale(layer)
    worst = _worst_current(layer.weight, layer.bias)  # any binary input, bias included
    guaranteed = VTH_MAX / (timesteps * worst) * (1 - 1e-9)
    figures: dict[str, Any] = {"weight_scale_8bit": base, "guaranteed_scale": guaranteed, "timesteps": int(timesteps)}
    if inputs is None:
        scale, basis = min(base, guaranteed), "worst case of any binary input"
    else:
        t, n = inputs.shape[:2]
        per_step = inputs.reshape(t * n, -1).astype(np.float64) @ layer.weight.T + layer.bias
        peak = float(np.abs(per_step).max(initial=0.0))
        calibrated = VTH_MAX / (timesteps * peak) * (1 - 1e-9) if peak > 0 else base
        scale = min(base, max(guaranteed, calibrated))
        basis = "calibration: T steps at the peak per-step current" if scale < base else "8-bit weights"
        figures.update(calibration_samples=int(n), calibration_peak_current=peak)
    figures["basis"] = basis if scale < base else "8-bit weights (already in range)"
    figures["guaranteed"] = scale <= guaranteed
    return scale, figures


def quantize_readout(layer: FloatLayer, timesteps: int, inputs: np.ndarray | None = None) -> tuple[QLayer, dict[str, Any]]:
    """The readout layer scaled to stay in range for T steps (see `readout_scale`); on the
    calibration `inputs` `[T, N, I]` the integer running sums are checked to stay within
    vThMant = 2^17 - 1. Raises ReadoutRangeError below 5 weight bits. Returns (layer, figures)."""
    scale, figures = readout_scale(layer, timesteps, inputs)
    q = quantize_layer(layer, scale=scale)
    if inputs is not None:
        while np.abs(readout_sums(q.weight, q.bias, inputs)).max(initial=0) > VTH_MAX:  # rounding pushed it over
            scale *= 0.99
            q = quantize_layer(layer, scale=scale)
        figures["calibration_peak_sum"] = int(np.abs(readout_sums(q.weight, q.bias, inputs)).max(initial=0))
    bits = math.log2(max(int(np.abs(q.weight).max()), 1)) + 1
    figures.update(scale=q.scale, max_abs_weight=int(np.abs(q.weight).max()), weight_bits=round(bits, 2))
    if np.abs(q.weight).max() < 2 ** (MIN_WEIGHT_BITS - 1):
        hint = "" if inputs is not None else "; pass calibration spikes (tmkt export does) for a tighter bound"
        raise ReadoutRangeError(
            f"readout {layer.name!r}: its membrane stays inside the 24-bit range for T={timesteps} steps only with "
            f"max |weight| {int(np.abs(q.weight).max())} (< {MIN_WEIGHT_BITS} bits; {figures['basis']}){hint}"
        )
    return q, figures


def round_weights(weight: np.ndarray, scale: float) -> np.ndarray:
    """Integer weights at `scale`: the nearest multiple of 2**WEIGHT_EXP (an 8-bit mantissa), int64."""
    step = 1 << WEIGHT_EXP
    return (np.rint(weight * (scale / step)) * step).astype(np.int64)


def quantize_layer(layer: FloatLayer, scale: float | None = None) -> QLayer:
    """Integer weights/bias and CUBA parameters of one layer (at `scale`, default `layer_scale`);
    raises naming it on overflow."""
    chosen = scale is not None  # the caller (quantize_readout) checks the weight bits itself
    scale = layer_scale(layer) if scale is None else scale
    weight_int = round_weights(layer.weight, scale)
    while _worst_current(weight_int.astype(np.float64), np.zeros(weight_int.shape[0])) > CURRENT_MAX:  # rounding pushed it over
        scale *= 0.999
        weight_int = round_weights(layer.weight, scale)
    bias_int = np.rint(layer.bias * scale).astype(np.int64)
    if weight_int.min() < WEIGHT_MIN or weight_int.max() > WEIGHT_MAX:
        raise LavaExportError(f"layer {layer.name!r}: weights overflow 8 bits ({weight_int.min()}..{weight_int.max()})")
    if np.abs(bias_int).max(initial=0) > BIAS_MAX:
        raise LavaExportError(f"layer {layer.name!r}: bias overflows 13 bits ({np.abs(bias_int).max()} > {BIAS_MAX})")
    if not chosen and np.abs(weight_int).max() < 2 ** (MIN_WEIGHT_BITS - 1):
        raise LavaExportError(
            f"layer {layer.name!r}: bias overflows 13 bits unless the weights keep fewer than {MIN_WEIGHT_BITS} bits "
            f"(max |weight| {np.abs(weight_int).max()} at scale {scale:.4g}); the bias is too large relative to the weights"
        )
    if layer.lif is None:  # readout: perfect integrator that never spikes below 2^17 - 1
        neuron = CubaParams(i_decay=DECAY_UNITY, v_decay=0, v_th_mant=VTH_MAX)
    else:
        if layer.lif.v_threshold <= 0:
            raise LavaExportError(f"layer {layer.name!r}: v_threshold must be > 0, got {layer.lif.v_threshold}")
        v_th = math.ceil(layer.lif.v_threshold * scale - 1e-9) - 1
        if v_th > VTH_MAX:
            raise LavaExportError(
                f"layer {layer.name!r}: scaled threshold {v_th} overflows vThMant (17 bits, max {VTH_MAX}); "
                "the weights are too small relative to v_threshold"
            )
        v_decay = int(round(DECAY_UNITY / layer.lif.tau))
        neuron = CubaParams(i_decay=DECAY_UNITY, v_decay=v_decay, v_th_mant=max(v_th, 0))
    return QLayer(
        name=layer.name, kind=layer.kind, weight=weight_int.astype(np.int32), bias=bias_int.astype(np.int32), in_shape=layer.in_shape,
        out_shape=layer.out_shape, geometry=layer.geometry, flatten=layer.flatten, neuron=neuron, scale=float(scale),
        readout=layer.lif is None,
    )


def quantize_graph(g: DeployGraph, calibration: np.ndarray | None = None) -> QuantizedNet:
    """Deploy graph -> QuantizedNet (pooling folded, 8-bit weights, CUBA neurons, a readout that
    stays in range for T = meta["timesteps"] steps).

    calibration: binary input spikes `[T, N, C, H, W]` (training data) from which the readout's
        range is measured; None: the worst case of any input. The readout's figures go to
        `meta["readout_range"]` (the file keeps it in meta/json).
    """
    if not isinstance(g.nodes[g.input_name], Input) or len(g.input_shape) != 3:
        raise LavaExportError(f"the input must be a (C, H, W) map for {TARGET}, got {g.input_shape}")
    folded = fold_for_netx(g)
    hidden = [quantize_layer(layer) for layer in folded[:-1]]
    timesteps = int(g.meta.get("timesteps", 1))
    inputs = None
    if calibration is not None:
        # netx_sim imports this module; the hidden layers' spikes are the readout's input
        from tmkt.export.netx_sim import hidden_spikes, readout_in_range

        inputs = hidden_spikes(hidden, np.asarray(calibration))
        timesteps = max(timesteps, inputs.shape[0])
    readout, figures = quantize_readout(folded[-1], timesteps, inputs)
    if inputs is not None:  # the chip's readout on the calibration, from the spikes already simulated
        figures["calibration_out_of_range"] = int((~readout_in_range(readout, inputs)).sum())
    return QuantizedNet(tuple(g.input_shape), [*hidden, readout], {**g.meta, "readout_range": figures})  # type: ignore[arg-type]
