"""Time-step mixup: the switch probability, the law of the switch step, and the mixed frames."""

import math

import numpy as np
import pytest
import torch

from tmkt.train.tsm import expected_event_frames, sample_switch_steps, solve_switch_prob, time_step_mixup

pytestmark = pytest.mark.usefixtures("one_thread")


def _expected_by_definition(p: float, T: int) -> float:
    """The paper's sum, term by term: sum_t (T + 1 - t) p (1 - p)^(t - 1)."""
    return sum((T + 1 - t) * p * (1 - p) ** (t - 1) for t in range(1, T + 1))


@pytest.mark.parametrize(("r", "p"), [(0.1, 0.019), (0.5, 0.131), (0.9, 0.50)])
def test_switch_prob_matches_table_for_T10(r, p):
    got = float(solve_switch_prob(torch.tensor([r], dtype=torch.float64), 10)[0])
    assert got == pytest.approx(p, abs=6e-4)
    assert _expected_by_definition(got, 10) == pytest.approx(r * 10, rel=1e-9)


@pytest.mark.parametrize("T", [1, 2, 4, 6, 10, 16])
def test_switch_prob_solves_the_defining_equation(T):
    r = torch.linspace(0, 1, 21, dtype=torch.float64)
    p = solve_switch_prob(r, T)
    for ri, pi in zip(r.tolist(), p.tolist()):
        assert 0.0 <= pi <= 1.0
        assert _expected_by_definition(pi, T) == pytest.approx(ri * T, abs=1e-9)
    # closed form used by the solver agrees with the sum
    assert expected_event_frames(torch.tensor(0.3, dtype=torch.float64), T).item() == pytest.approx(
        _expected_by_definition(0.3, T), abs=1e-12
    )
    assert torch.all(p[1:] >= p[:-1])


def test_switch_prob_rejects_bad_ratio():
    with pytest.raises(ValueError):
        solve_switch_prob(torch.tensor([1.2]), 10)


@pytest.mark.parametrize(("r", "T"), [(0.1, 10), (0.3, 4), (0.5, 10), (0.75, 6), (0.9, 10)])
def test_mean_share_of_event_frames_equals_r(r, T):
    n = 40_000
    g = torch.Generator().manual_seed(1234)
    static = torch.zeros(T, n, 1)
    events = torch.ones(T, n, 1)
    mix = time_step_mixup(static, events, torch.full((n,), r), g)
    share = mix.mix_ratio.double()
    se = share.std().item() / math.sqrt(n)
    assert abs(share.mean().item() - r) < 4 * se + 1e-12


def test_switch_step_follows_truncated_geometric_law():
    T, n, r = 6, 60_000, 0.4
    p = float(solve_switch_prob(torch.tensor([r]), T)[0])
    g = torch.Generator().manual_seed(7)
    t_star = sample_switch_steps(torch.full((n,), p), T, g).numpy()
    counts = np.bincount(t_star, minlength=T + 1) / n
    want = [p * (1 - p) ** t for t in range(T)] + [(1 - p) ** T]  # 0-based t*, last = never switched
    for got, w in zip(counts, want):
        assert abs(got - w) < 4 * math.sqrt(w * (1 - w) / n)


def test_mixed_frames_labels_and_ratio():
    T, B = 8, 64
    g = torch.Generator().manual_seed(3)
    static = torch.randn(T, B, 2, 3, 3)
    events = torch.randn(T, B, 2, 3, 3)
    mix = time_step_mixup(static, events, torch.rand(B, generator=torch.Generator().manual_seed(4)), g)
    t_star = mix.switch_step.tolist()
    assert len(set(t_star)) > 3  # the draw covers early, late and (likely) no switches
    for b in range(B):
        for t in range(T):
            src = events if t >= t_star[b] else static
            assert torch.equal(mix.mixed[t, b], src[t, b])
            assert mix.frame_labels[t, b].item() == float(t >= t_star[b])
        assert mix.mix_ratio[b].item() == pytest.approx(sum(t >= t_star[b] for t in range(T)) / T)
    assert torch.allclose(mix.mix_ratio, mix.frame_labels.mean(0))


def test_extreme_ratios_give_pure_sequences():
    T, B = 5, 16
    static, events = torch.zeros(T, B, 1), torch.ones(T, B, 1)
    g = torch.Generator().manual_seed(0)
    none = time_step_mixup(static, events, torch.zeros(B), g)
    assert torch.equal(none.mixed, static) and torch.all(none.switch_step == T)
    full = time_step_mixup(static, events, torch.ones(B), g)
    assert torch.equal(full.mixed, events) and torch.all(full.switch_step == 0)


def test_deterministic_for_a_fixed_generator():
    T, B = 6, 32
    static, events = torch.zeros(T, B, 1), torch.ones(T, B, 1)
    r = torch.full((B,), 0.5)
    a = time_step_mixup(static, events, r, torch.Generator().manual_seed(11))
    b = time_step_mixup(static, events, r, torch.Generator().manual_seed(11))
    c = time_step_mixup(static, events, r, torch.Generator().manual_seed(12))
    assert torch.equal(a.switch_step, b.switch_step)
    assert not torch.equal(a.switch_step, c.switch_step)
