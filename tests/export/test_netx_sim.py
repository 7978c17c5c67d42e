"""The bit-accurate CUBA simulator: a two-neuron example worked by hand (decay truncated toward
zero, 24-bit wrap, saturation, strict threshold), integer convolution against PyTorch, timelines."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tmkt.export.netx_sim import conv_current, cuba_step, dense_current, run_cuba, to_spikes
from tmkt.runtime.lava import from_lava_timeline, to_lava_timeline


def test_two_neurons_by_hand():
    # iDecay 1000 (u keeps 3096/4096), vDecay 2048 (v halves), vThMant 10 (spike when v > 640)
    a = np.array([[5, -5], [6, 0], [0, 0]], np.int64)  # [T, 2]
    spikes, v = run_cuba(a[:, None, :], np.zeros(2, np.int64), 1000, 2048, 10)
    # step 1: u = [320, -320], v = u, no spike (320 < 640)
    # step 2: neuron 0: u = (320*3096 >> 12) + 384 = 241 + 384 = 625; v = (320*2048 >> 12) + 625 = 785 > 640: spike, v = 0
    #         neuron 1: u = -(320*3096 >> 12) = -241 (toward zero, not floor's -242); v = -160 - 241 = -401
    # step 3: neuron 0: u = 625*3096 >> 12 = 472; v = 0 + 472 = 472
    #         neuron 1: u = -(241*3096 >> 12) = -182; v = -(401*2048 >> 12) - 182 = -200 - 182 = -382
    assert spikes[:, 0].tolist() == [[0, 0], [1, 0], [0, 0]]
    assert v[:, 0].tolist() == [[320, -320], [0, -401], [472, -382]]


def test_threshold_is_strict_and_bias_is_shifted():
    zero = np.zeros(2, np.int64)
    s, _, v = cuba_step(np.array([10, 11]), zero, zero, zero, 4096, 4096, 10)
    assert s.tolist() == [False, True] and v.tolist() == [640, 0]  # v == 640 does not spike
    s, _, v = cuba_step(np.array([0, 0]), zero, zero, np.array([3, -2]), 4096, 4096, 10)
    assert v.tolist() == [192, -128] and not s.any()


def test_current_wraps_once_in_24_bits_and_voltage_saturates():
    zero = np.zeros(3, np.int64)
    a = np.array([2**17 + 5, 2**17, -(2**17)])
    s, u, v = cuba_step(a, zero, zero, zero, 4096, 0, 2**17 - 1)
    # 2^23 + 320 > 2^23 wraps to 320 - 2^23; exactly 2^23 stays (lava wraps only above it);
    # -2^23 wraps to +2^23
    assert u.tolist() == [320 - 2**23, 2**23, 2**23]
    assert v.tolist() == [320 - 2**23, 0, 0] and s.tolist() == [False, True, True]  # 2^23 - 1 > (2^17-1) << 6
    # negative saturation of v with a perfect integrator (vDecay 0)
    vv = np.zeros(1, np.int64)
    uu = np.zeros(1, np.int64)
    for _ in range(3):
        _, uu, vv = cuba_step(np.array([-100000]), uu, vv, np.zeros(1, np.int64), 4096, 0, 2**17 - 1)
    assert vv.tolist() == [-(2**23 - 1)]


@pytest.mark.parametrize("stride,padding,dilation,groups", [((1, 1), (1, 1), (1, 1), 1), ((2, 1), (0, 2), (2, 1), 2)])
def test_conv_current_equals_pytorch(stride, padding, dilation, groups):
    rng = np.random.default_rng(0)
    x = (rng.random((3, 4, 9, 10)) < 0.4).astype(np.uint8)
    w = rng.integers(-256, 255, (6, 4 // groups, 3, 2))
    got = conv_current(x, w, stride, padding, dilation, groups, chunk_bytes=4096)  # force several chunks
    want = F.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(), None, stride, padding, dilation, groups)
    assert np.array_equal(got, want.round().long().numpy())
    wd = rng.integers(-256, 255, (5, 4 * 9 * 10))
    assert np.array_equal(dense_current(x.reshape(3, -1), wd), x.reshape(3, -1).astype(np.int64) @ wd.T)


def test_conv_current_wraps_to_24_bits():
    x = np.ones((1, 1, 300, 300), np.uint8)
    w = np.full((1, 1, 300, 300), 200)  # 9e4 * 200 = 1.8e7 > 2^23
    got = conv_current(x, w, (1, 1), (0, 0), (1, 1), 1)
    assert got.item() == 300 * 300 * 200 - 2**24


def test_timeline_round_trip_and_binarize():
    aligned = np.arange(3 * 2 * 4).reshape(3, 2, 4)  # [T=3, N=2, 4]
    tl = to_lava_timeline(aligned, layer_index=2, total_steps=3 * 2 + 3)
    assert tl[:2].sum() == 0 and np.array_equal(tl[2], aligned[0, 0]) and np.array_equal(tl[5], aligned[0, 1])
    assert np.array_equal(from_lava_timeline(tl, 2, 3, 2), aligned)
    assert to_spikes(np.array([0.0, 0.2, 3.0, -1.0])).tolist() == [0, 1, 1, 0]
