"""Bit-accurate numpy simulation of a netx network as lava runs it with `select_tag="fixed_pt"`.

Follows lava-nc 0.10.0's fixed-point process models (read from its source):
- CUBA neuron (`PyLifModelBitAcc`, `PyLifResetModelBitAcc` in lava/proc/lif/models.py), per step:
      u = sign(p) * (|p| >> 12) + (a_in << 6),   p = u * (4096 - iDecay)     (netx du = iDecay - 1,
          and the model adds ds_offset 1 back); then u wraps once into (-2^23, 2^23]
      v = sign(q) * (|q| >> 12) + u + (bias << 6), q = v * (4096 - vDecay)   (bias_exp = 6 in netx)
          saturated to [-(2^23 - 1), 2^23 - 1]
      spike = v > (vThMant << 6); v = 0 where it spiked (u is kept).
- Dense (`PyDenseModelBitAcc`): a_out = W @ s_in, exact integers; netx first clips mixed-sign
  weights to [-256, 254], the model's exponent/truncation round trip is exact for such ints.
- Conv (`PyConvModelFixed`): true convolution of the flipped kernel (= PyTorch correlation of
  the stored kernel), output wrapped to signed 24 bits.
- Every synapse sends the previous step's result: one step of latency per synaptic layer.
- `hdf5.Network(reset_interval=T)` zeroes u and v of layer k (input = 0) at the steps
  t = 1 + k (mod T), i.e. exactly when the first frame of each sample reaches that layer.

Because of that reset, layer k's spikes at lava step 1 + n*T + j + k are a function of sample n
alone; this simulator therefore computes the *aligned* view, every layer on frames j = 0..T-1 of
a batch of samples, vectorised over the batch (`tmkt.runtime.lava` converts to and from lava's
pipelined, back-to-back timeline).

It lives in `export` because it is the reference the netx export is checked against before the
file appears, as onnxruntime is for ONNX; `tmkt.runtime.loihi_sim` evaluates a netx file on a
data set with it.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from tmkt.export.quantize import QLayer, QuantizedNet

UV_MAX = 2**23
DECAY_SHIFT = 12
ACT_SHIFT = 6  # synaptic input, bias (bias_exp) and threshold are MSB-aligned by 6 bits


@dataclass
class SimResult:
    """Aligned outputs for a batch.

    spikes: per netx layer, input first, `[T, B, *shape]` uint8 ((C, H, W) or (N,)).
    readout_v: `[T, B, K]` membrane (int64, 1/64 units) of the readout layer.
    readout_current: `[B, K]` sum over T of the readout's input current + bias (integer logits).
    readout_in_range: `[B]` True where the readout membrane never saturated or spiked, i.e.
        where reading `v / 64` on Loihi gives exactly `readout_current`.

    `prediction` is what the chip reports (the readout membrane after T steps, as lava-dl gives
    it); `exact_prediction` the argmax of the integer sum, which equals it where in range.
    """

    spikes: list[np.ndarray]
    readout_v: np.ndarray
    readout_current: np.ndarray
    readout_in_range: np.ndarray

    @property
    def prediction(self) -> np.ndarray:
        """`[B]` class index: argmax of the readout membrane after the last step (first on ties)."""
        return self.readout_v[-1].argmax(axis=1)

    @property
    def exact_prediction(self) -> np.ndarray:
        """`[B]` class index: argmax of the exact integer logit sum (no chip provides it)."""
        return self.readout_current.argmax(axis=1)


def to_spikes(frames: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Event frames (counts) -> binary input spikes: 1 where frame > threshold (uint8)."""
    return (np.asarray(frames) > threshold).astype(np.uint8)


# ---------------------------------------------------------------- neuron


def _decay(x: np.ndarray, decay: int) -> np.ndarray:
    p = x * (4096 - int(decay))
    return np.sign(p) * (np.abs(p) >> DECAY_SHIFT)


def cuba_step(
    a_in: np.ndarray, u: np.ndarray, v: np.ndarray, bias: np.ndarray, i_decay: int, v_decay: int, v_th_mant: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One CUBA update (all int64): returns (spikes bool, u, v). See the module docstring."""
    u = _decay(u, i_decay) + (a_in << ACT_SHIFT)
    # lava wraps once: (2^23 + k) -> k - 2^23 ... exactly its two np.where's
    u = np.where(u > UV_MAX, u - 2 * UV_MAX, np.where(u <= -UV_MAX, u + 2 * UV_MAX, u))
    v = np.clip(_decay(v, v_decay) + u + (bias << ACT_SHIFT), -(UV_MAX - 1), UV_MAX - 1)
    s = v > (int(v_th_mant) << ACT_SHIFT)
    return s, u, np.where(s, 0, v)


def run_cuba(
    a_in: np.ndarray, bias: np.ndarray, i_decay: int, v_decay: int, v_th_mant: int
) -> tuple[np.ndarray, np.ndarray]:
    """Run a CUBA layer over `a_in` `[T, B, *shape]` from zero state; returns (spikes uint8, v)."""
    u = np.zeros(a_in.shape[1:], np.int64)
    v = np.zeros(a_in.shape[1:], np.int64)
    spikes, vs = np.zeros(a_in.shape, np.uint8), np.zeros(a_in.shape, np.int64)
    for t in range(a_in.shape[0]):
        s, u, v = cuba_step(a_in[t].astype(np.int64), u, v, bias, i_decay, v_decay, v_th_mant)
        spikes[t], vs[t] = s, v
    return spikes, vs


# ---------------------------------------------------------------- synapses


def _matmul_exact(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Integer a @ w via float BLAS; exact because every partial sum is bounded below 2^24
    (float32) or 2^53 (float64) by sum|w| (a is 0/1)."""
    bound = float(np.abs(w).sum(axis=0).max(initial=0))
    dtype = np.float32 if bound < 2**24 else np.float64
    return np.rint(a.astype(dtype) @ w.astype(dtype)).astype(np.int64)


def dense_current(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """`x` `[N, I]` binary -> `[N, O]` integer currents."""
    return _matmul_exact(x, weight.T)


def conv_current(
    x: np.ndarray, weight: np.ndarray, stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int], groups: int, chunk_bytes: int = 1 << 27,
) -> np.ndarray:
    """`x` `[N, C, H, W]` binary, `weight` `[O, C/g, kh, kw]` (correlation, PyTorch order) ->
    `[N, O, Ho, Wo]` integer currents wrapped to signed 24 bits as lava's fixed-point conv does."""
    n, c, h, w = x.shape
    o, cg, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, Ho, Wo, kh, kw]
    ho, wo = win.shape[2], win.shape[3]
    og = o // groups
    out = np.empty((n, o, ho, wo), np.int64)
    per_sample = ho * wo * cg * kh * kw * 4
    step = max(1, chunk_bytes // max(per_sample, 1))
    for g in range(groups):
        wg = weight[g * og:(g + 1) * og].reshape(og, -1).T  # [cg*kh*kw, og]
        for i in range(0, n, step):
            cols = win[i:i + step, g * cg:(g + 1) * cg].transpose(0, 2, 3, 1, 4, 5).reshape(-1, cg * kh * kw)
            res = _matmul_exact(cols, wg).reshape(-1, ho, wo, og)
            out[i:i + step, g * og:(g + 1) * og] = res.transpose(0, 3, 1, 2)
    return (out + (1 << 23)) % (1 << 24) - (1 << 23)


def netx_dense_weight(weight: np.ndarray) -> np.ndarray:
    """The dense weight lava uses: netx's optimize_weight_bits clips mixed-sign matrices."""
    w = weight.astype(np.int64)
    if (w.max() > 254 and w.min() < 0) or (w.min() < -256 and w.max() > 0):
        w = np.clip(w, -256, 254)
    return w


def layer_current(layer: QLayer, x: np.ndarray) -> np.ndarray:
    """Synaptic current of one layer for binary input `x` `[N, *in_shape]`."""
    if layer.kind == "conv":
        return conv_current(x, layer.weight.astype(np.int64), layer.stride, layer.padding, layer.dilation, layer.groups)
    return dense_current(x.reshape(x.shape[0], -1), netx_dense_weight(layer.weight))


# ---------------------------------------------------------------- network


SIM_BYTES = 1 << 30  # working memory the simulator may take at once (int64 currents and states)


def sample_chunk(timesteps: int, shapes: list[tuple[int, ...]], budget: int | None = None) -> int:
    """Samples simulated at once so that a layer's int64 current, membranes and their
    temporaries (about 8 arrays of `[T, B, *shape]`) stay within `budget` bytes: samples are
    independent, so the simulator runs a large batch (512 calibration samples, a test split)
    in chunks of this many instead of holding 10s of GB (a VGG-SNN at 48x48)."""
    per_sample = 8 * 8 * timesteps * max((int(np.prod(s)) for s in shapes), default=1)
    return max(1, (SIM_BYTES if budget is None else budget) // per_sample)


def hidden_spikes(layers: list[QLayer], spikes: np.ndarray) -> np.ndarray:
    """Spikes `[T, B, I]` (flattened) that the layers before the readout, `layers`, send it for
    input `spikes` `[T, B, C, H, W]`: what the readout's range is calibrated on."""
    x = np.asarray(spikes)
    t, b = x.shape[:2]
    step = sample_chunk(t, [tuple(x.shape[2:])] + [tuple(q.out_shape) for q in layers])
    if b > step:
        return np.concatenate([hidden_spikes(layers, x[:, i:i + step]) for i in range(0, b, step)], axis=1)
    cur = (x > 0).astype(np.uint8)
    for layer in layers:
        a = layer_current(layer, cur.reshape(t * b, *cur.shape[2:])).reshape(t, b, *layer.out_shape)
        bias = layer.bias.astype(np.int64).reshape(-1, *([1] * (len(layer.out_shape) - 1)))
        cur, _ = run_cuba(a, bias, layer.neuron.i_decay, layer.neuron.v_decay, layer.neuron.v_th_mant)
    return cur.reshape(t, b, -1)


def simulate(net: QuantizedNet, spikes: np.ndarray, keep_spikes: bool = True) -> SimResult:
    """Run binary input `spikes` `[T, B, C, H, W]` through `net`, aligned per sample.

    The input layer (iDecay 4096, vDecay 4096, vThMant 0) passes a 0/1 input through unchanged;
    larger integer inputs also give one spike (it fires on a_in >= 1). A large batch runs in
    chunks of samples (`sample_chunk`). `keep_spikes=False` leaves `spikes` empty (the
    predictions and the readout's range only: what evaluating a data set needs).
    """
    x = np.asarray(spikes)
    if x.ndim != 5 or tuple(x.shape[2:]) != tuple(net.input_shape):
        raise ValueError(f"spikes must be [T, B, {', '.join(map(str, net.input_shape))}], got {x.shape}")
    if np.any(x < 0) or not np.all(np.equal(np.mod(x, 1), 0)):
        raise ValueError("input spikes must be non-negative integers (binarize frames with to_spikes)")
    t, b = x.shape[:2]
    step = sample_chunk(t, [tuple(x.shape[2:])] + [tuple(q.out_shape) for q in net.layers])
    if b > step:
        parts = [simulate(net, x[:, i:i + step], keep_spikes) for i in range(0, b, step)]
        return SimResult([np.concatenate(layer, axis=1) for layer in zip(*(p.spikes for p in parts))],
                         np.concatenate([p.readout_v for p in parts], axis=1),
                         np.concatenate([p.readout_current for p in parts]),
                         np.concatenate([p.readout_in_range for p in parts]))
    cur = (x > 0).astype(np.uint8)
    out = [cur]
    readout_v = readout_current = None
    for layer in net.layers:
        a = layer_current(layer, cur.reshape(t * b, *cur.shape[2:])).reshape(t, b, *layer.out_shape)
        bias = layer.bias.astype(np.int64).reshape(-1, *([1] * (len(layer.out_shape) - 1)))
        n = layer.neuron
        cur, v = run_cuba(a, bias, n.i_decay, n.v_decay, n.v_th_mant)
        out.append(cur)
        if layer.readout:
            readout_v = v
            readout_current = (a + bias).sum(axis=0)
    if readout_v is None or readout_current is None:
        raise ValueError("the network has no readout layer")
    in_range = _readout_in_range(readout_v, out[-1], net.layers[-1].neuron.v_decay)
    return SimResult(out if keep_spikes else [], readout_v, readout_current, in_range)


def _readout_in_range(v: np.ndarray, spikes: np.ndarray, v_decay: int) -> np.ndarray:
    """`[B]` True where the readout membrane `v` `[T, B, K]` never saturated, never spiked and
    never decayed: where reading it on Loihi gives the exact integer logit sum."""
    return (np.abs(v).max(axis=0).max(axis=1) < UV_MAX - 1) & ~spikes.any(axis=(0, 2)).astype(bool) & (v_decay == 0)


def readout_in_range(readout: QLayer, inputs: np.ndarray) -> np.ndarray:
    """`SimResult.readout_in_range` of the readout alone, from its input spikes `inputs` `[T, B, I]`
    (`hidden_spikes`): what the quantizer checks on its calibration without simulating the whole
    network a second time."""
    t, b = inputs.shape[:2]
    a = layer_current(readout, inputs.reshape(t * b, -1)).reshape(t, b, *readout.out_shape)
    n = readout.neuron
    s, v = run_cuba(a, readout.bias.astype(np.int64), n.i_decay, n.v_decay, n.v_th_mant)
    return _readout_in_range(v, s, n.v_decay)
