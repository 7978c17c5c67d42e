"""Loss terms against hand computations and a naive numpy CKA."""

import math

import numpy as np
import pytest
import torch

from tmkt.train.losses import alignment_loss, linear_cka, linear_cka_per_step, mag_loss, mrp_loss, tet_loss


def _naive_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. (2019), feature-space form, in float64 with no shortcuts."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    num = np.linalg.norm(y.T @ x, "fro") ** 2
    return float(num / (np.linalg.norm(x.T @ x, "fro") * np.linalg.norm(y.T @ y, "fro")))


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize(("b", "n", "m"), [(16, 5, 7), (8, 40, 30), (12, 12, 100)])
def test_cka_matches_naive_numpy_in_both_forms(b, n, m):
    # n, m < b takes the feature path, n, m > b the Gram path
    x = _rng(1).normal(size=(b, n))
    y = x[:, : min(n, m)] @ _rng(2).normal(size=(min(n, m), m)) + 0.5 * _rng(3).normal(size=(b, m))
    got = linear_cka(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)).item()
    assert got == pytest.approx(_naive_cka(x, y), abs=2e-5)


def test_cka_of_identical_features_is_one():
    x = torch.tensor(_rng(4).normal(size=(10, 300)), dtype=torch.float32)
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-5)
    x = torch.tensor(_rng(5).normal(size=(30, 4)), dtype=torch.float32)
    assert linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("n", [6, 50])
def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling(n):
    b = 20
    x = _rng(6).normal(size=(b, n))
    y = np.tanh(x @ _rng(7).normal(size=(n, n))) + 0.3 * _rng(8).normal(size=(b, n))
    q, _ = np.linalg.qr(_rng(9).normal(size=(n, n)))
    base = linear_cka(torch.tensor(x), torch.tensor(y)).item()
    rotated = linear_cka(torch.tensor(x @ q * 37.0), torch.tensor(y * 1e-3)).item()
    assert rotated == pytest.approx(base, abs=1e-5)
    assert 0.0 < base < 1.0


def test_cka_of_constant_features_is_finite_with_finite_gradient():
    x = torch.ones(8, 20, requires_grad=True)
    y = torch.randn(8, 20)
    c = linear_cka(x, y)
    c.backward()
    assert c.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(x.grad).all()


def test_cka_per_step_equals_loop_and_alignment_loss():
    T, B, N = 4, 6, 50
    x = torch.randn(T, B, N)
    y = x + torch.randn(T, B, N) * torch.linspace(0.1, 3, T)[:, None, None]
    per = linear_cka_per_step(x, y)
    loop = [_naive_cka(x[t].double().numpy(), y[t].double().numpy()) for t in range(T)]
    assert per.tolist() == pytest.approx(loop, abs=2e-5)
    w = torch.tensor([0.1, 0.4, 0.7, 1.0])
    want = sum(w[t].item() * (1 - abs(loop[t])) for t in range(T)) / T
    assert alignment_loss(per, w).item() == pytest.approx(want, abs=2e-5)


def test_tet_equals_hand_computation():
    logits = torch.tensor(
        [[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], [[0.0, 1.0, 0.0], [-1.0, 2.0, 1.0]]]
    )  # [T=2, B=2, K=3]
    labels = torch.tensor([0, 2])
    lam, target = 0.25, 1.0

    def ce(row, k):
        return -row[k] + math.log(sum(math.exp(v) for v in row))

    rows = logits.tolist()
    ce_t = [(ce(rows[t][0], 0) + ce(rows[t][1], 2)) / 2 for t in range(2)]
    mse_t = [sum((v - target) ** 2 for r in rows[t] for v in r) / 6 for t in range(2)]
    want = (1 - lam) * sum(ce_t) / 2 + lam * sum(mse_t) / 2
    assert tet_loss(logits, labels, lam=lam, target=target).item() == pytest.approx(want, rel=1e-6)

    w = torch.tensor([0.2, 0.9])
    want_w = (1 - lam) * (0.2 * ce_t[0] + 0.9 * ce_t[1]) / 2 + lam * (0.2 * mse_t[0] + 0.9 * mse_t[1]) / 2
    assert tet_loss(logits, labels, lam=lam, target=target, step_weights=w).item() == pytest.approx(want_w, rel=1e-6)

    # label smoothing eps: CE against (1 - eps) one-hot + eps / K
    eps = 0.1

    def ce_s(row, k):
        lse = math.log(sum(math.exp(v) for v in row))
        return sum(((1 - eps) * (j == k) + eps / 3) * (lse - row[j]) for j in range(3))

    ce_st = [(ce_s(rows[t][0], 0) + ce_s(rows[t][1], 2)) / 2 for t in range(2)]
    want_s = (1 - lam) * sum(ce_st) / 2 + lam * sum(mse_t) / 2
    got_s = tet_loss(logits, labels, lam=lam, target=target, label_smoothing=eps).item()
    assert got_s == pytest.approx(want_s, rel=1e-6)


def test_mag_and_mrp_losses():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])
    labels = torch.tensor([[0.0, 1.0], [1.0, 1.0]])

    def bce(z, y):
        s = 1 / (1 + math.exp(-z))
        return -(y * math.log(s) + (1 - y) * math.log(1 - s))

    want = (bce(0, 0) + bce(2, 1) + bce(-1, 1) + bce(3, 1)) / 4
    assert mag_loss(logits, labels).item() == pytest.approx(want, rel=1e-6)
    assert mrp_loss(torch.tensor([0.2, 0.9]), torch.tensor([0.5, 1.0])).item() == pytest.approx(
        (0.3**2 + 0.1**2) / 2, rel=1e-6
    )
