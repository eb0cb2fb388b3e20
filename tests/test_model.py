"""The NumPy density: gradient vs finite differences, -H vs the dense Hessian, log-concavity."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.stats import multivariate_normal, poisson, truncnorm

from pln_ref import Capture, PLNParams
from pln_ref.model import grad_log_joint, log_joint, neg_hessian


def _draw(seed, G, k, N, capture=True):
    rng = np.random.default_rng(seed)
    p = PLNParams(rng.normal(1, 1, G), rng.normal(size=(G, k)) * 0.5, rng.uniform(0.05, 1, G),
                  Capture(rng.uniform(500, 5000), rng.uniform(0.2, 2)) if capture else None)
    x = rng.normal(1, 1.5, size=(N, G))
    eta = rng.uniform(0.01, 3, N) if capture else None
    u = rng.poisson(np.exp(rng.normal(1, 2, size=(N, G)))).astype(float)
    la = np.log(rng.uniform(100, 5000, N))
    return rng, p, x, eta, u, la


def test_log_joint_equals_scipy_terms():
    """Full normalised density = Poisson pmf x multivariate normal x truncated normal (scipy)."""
    rng, p, x, eta, u, la = _draw(1, 5, 2, 3)
    ref = []
    for c in range(3):
        lp = poisson.logpmf(u[c], np.exp(x[c] - eta[c])).sum()
        lp += multivariate_normal(p.mu, p.sigma_dense()).logpdf(x[c])
        m = np.log(p.capture.M0) - la[c]
        s = p.capture.sigma_M
        lp += truncnorm((0 - m) / s, np.inf, loc=m, scale=s).logpdf(eta[c])
        ref.append(lp)
    np.testing.assert_allclose(log_joint(u, x, eta, p, la), ref, rtol=1e-11)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), G=st.integers(2, 8), capture=st.booleans())
def test_gradient_matches_finite_differences(seed, G, capture):
    rng, p, x, eta, u, la = _draw(seed, G, 1, 2, capture)
    gx, ge = grad_log_joint(u, x, eta, p, la)
    h = 1e-6
    for c, g in [(0, int(rng.integers(G))), (1, int(rng.integers(G)))]:
        e = np.zeros_like(x)
        e[c, g] = h
        fd = (log_joint(u, x + e, eta, p, la)[c] - log_joint(u, x - e, eta, p, la)[c]) / (2 * h)
        assert abs(fd - gx[c, g]) <= 1e-5 * max(1.0, abs(gx[c, g]))
    if capture:
        e = np.zeros(2)
        e[1] = h
        fd = (log_joint(u, x, eta + e, p, la)[1] - log_joint(u, x, eta - e, p, la)[1]) / (2 * h)
        assert abs(fd - ge[1]) <= 1e-5 * max(1.0, abs(ge[1]))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), G=st.integers(2, 8))
def test_hessian_blocks_and_negative_definite(seed, G):
    """-H from the blocks equals the finite-difference Hessian and is positive definite."""
    rng, p, x, eta, u, la = _draw(seed, G, 1, 1)
    H = neg_hessian(x, eta, p)
    D = H.dense()[0]
    z0 = np.concatenate([x[0], eta])
    h = 1e-5

    def grad(z):
        gx, ge = grad_log_joint(u, z[None, :G], z[G:], p, la)
        return np.concatenate([gx[0], ge])

    fd = np.stack([(grad(z0 + h * e) - grad(z0 - h * e)) / (2 * h) for e in np.eye(G + 1)])
    np.testing.assert_allclose(-fd, D, rtol=1e-5, atol=1e-5 * np.abs(D).max())
    assert np.linalg.eigvalsh(D).min() > 0  # strictly log-concave
    assert abs(H.logdet()[0] - np.linalg.slogdet(D)[1]) < 1e-9 * max(1, abs(H.logdet()[0]))


def test_no_capture_requires_zero_eta():
    _, p, x, _, u, _ = _draw(0, 4, 1, 2, capture=False)
    with pytest.raises(ValueError, match="eta must be 0"):
        log_joint(u, x, np.ones(2), p)
