"""Every low-rank operation equals its dense counterpart (small G, 1e-10)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pln_ref.lowrank import LowRankCov, PosteriorPrecision, spd_inverse


def _case(seed, G, k, N):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(G, k)) * rng.uniform(0.1, 2.0)
    d = rng.uniform(0.01, 2.0, G)
    lam = np.exp(rng.normal(0, 3, size=(N, G)))  # lambdas from 1e-4 to 1e4
    return rng, W, d, lam


def _rel(a, b):
    return np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b)))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), G=st.integers(2, 12), data=st.data())
def test_lowrank_equals_dense(seed, G, data):
    k = data.draw(st.integers(1, G - 1))
    N = data.draw(st.integers(1, 4))
    rng, W, d, lam = _case(seed, G, k, N)
    cov = LowRankCov(W, d)
    S = W @ W.T + np.diag(d)
    Si = np.linalg.inv(S)
    v = rng.normal(size=(N, G))
    assert _rel(cov.inv_mv(v), v @ Si) < 1e-10
    assert _rel(cov.mv(v), v @ S) < 1e-10
    assert abs(cov.logdet() - np.linalg.slogdet(S)[1]) < 1e-10 * max(1, abs(cov.logdet()))
    assert _rel(cov.diag(), np.diag(S)) < 1e-12

    P = PosteriorPrecision(cov, lam)
    A = np.stack([np.diag(l) + Si for l in lam])
    assert _rel(P.solve(v), np.linalg.solve(A, v[..., None])[..., 0]) < 1e-10
    B = rng.normal(size=(N, G, 3))
    assert _rel(P.solve(B), np.linalg.solve(A, B)) < 1e-10
    assert np.max(np.abs(P.logdet() - np.linalg.slogdet(A)[1])) < 1e-9 * max(1, np.abs(P.logdet()).max())
    assert _rel(P.inv_diag(), np.diagonal(np.linalg.inv(A), axis1=1, axis2=2)) < 1e-10
    assert _rel(P.mv(v), np.einsum("ngh,nh->ng", A, v)) < 1e-10


def test_posterior_draws_have_covariance_A_inverse():
    """Square-root draws: Monte Carlo covariance within 5 MC standard errors of dense A^{-1}."""
    rng, W, d, lam = _case(3, 6, 2, 2)
    cov = LowRankCov(W, d)
    P = PosteriorPrecision(cov, lam)
    n = 100_000
    x = P.sample(rng, n)
    C_mc = np.einsum("sng,snh->ngh", x, x) / n
    C = np.linalg.inv(P.dense())
    # SE of a sample covariance of Gaussians: sqrt((C_gh^2 + C_gg C_hh) / n)
    se = np.sqrt((C**2 + np.einsum("ng,nh->ngh", np.diagonal(C, 0, 1, 2), np.diagonal(C, 0, 1, 2))) / n)
    z = np.abs(C_mc - C) / se
    assert z.max() < 5.0, z.max()
    assert np.abs(x.mean(axis=0)).max() < 5 * np.sqrt(np.diagonal(C, 0, 1, 2).max() / n)


def test_S_is_well_conditioned_without_cancellation():
    """S = I + W^T diag(lam/(1+lam d)) W stays >= I even for tiny d and huge lambda."""
    rng = np.random.default_rng(0)
    W = rng.normal(size=(30, 3)) * 5
    d = np.full(30, 1e-8)
    lam = np.full((2, 30), 1e7)
    P = PosteriorPrecision(LowRankCov(W, d), lam)
    assert np.all(np.linalg.eigvalsh(P.S) >= 1.0 - 1e-12)


def test_bad_shapes():
    with pytest.raises(ValueError, match="strictly positive"):
        LowRankCov(np.ones((3, 1)), np.array([1.0, 0.0, 1.0]))
    cov = LowRankCov(np.ones((3, 1)), np.ones(3))
    with pytest.raises(ValueError, match="lam must have shape"):
        PosteriorPrecision(cov, np.ones((2, 4)))


def test_lowrank_solve_broadcasts_batch_dimensions():
    """lowrank_solve with leading batch dimensions (draws x rows) and a given S^{-1} equals
    PosteriorPrecision.solve row by row, and the dense solve."""
    from pln_ref.lowrank import lowrank_solve

    rng, W, d, lam = _case(7, 9, 3, 4)
    cov = LowRankCov(W, d)
    P = PosteriorPrecision(cov, lam)
    b = rng.normal(size=(5, 4, 9))  # (draws, rows, G) against per-row factors (rows, ...)
    out = lowrank_solve(cov, P.r, P.S_inv(), b)
    assert out.shape == b.shape
    for s in range(5):
        np.testing.assert_array_equal(out[s], P.solve(b[s]))
    A = P.dense()
    assert _rel(out, np.linalg.solve(A[None], b[..., None])[..., 0]) < 1e-10


def test_inv_mv_W_equals_dense():
    """``inv_mv_W`` gives Sigma^{-1} v and W^T Sigma^{-1} v (= K^{-1} V^T v) of the dense Sigma,
    including a gene with d at the 1e-6 floor."""
    rng = np.random.default_rng(5)
    G, k = 30, 4
    d = rng.uniform(0.1, 2.0, G)
    d[3] = 1e-6
    cov = LowRankCov(rng.normal(size=(G, k)), d)
    v = rng.normal(size=(6, G))
    a, aW = cov.inv_mv_W(v)
    dense = np.linalg.solve(cov.dense(), v.T).T
    np.testing.assert_allclose(a, dense, rtol=1e-7, atol=1e-6 * np.abs(dense).max())
    np.testing.assert_allclose(aW, dense @ cov.W, rtol=1e-7, atol=1e-9 * np.abs(dense @ cov.W).max())


@pytest.mark.parametrize("shape", [(0, 3, 3), (5, 3, 3), (200, 1, 1), (200, 5, 5), (100, 10, 10),
                                   (7, 20, 3, 3), (300, 12, 12), (80, 13, 13)])
def test_spd_inverse_equals_lapack_and_leaves_its_input(shape):
    """The vectorised sweep (stacks >= 64 of order <= 12) and the LAPACK fallback both give S^{-1}
    to round-off, for any leading shape, without writing into S (k = 1: the stack-last copy of a
    (n, 1, 1) array must not be a view of it)."""
    rng = np.random.default_rng(0)
    *lead, k, _ = shape
    A = rng.normal(size=(*lead, k, k))
    S = A @ np.swapaxes(A, -1, -2) + np.eye(k)
    S0 = S.copy()
    X = spd_inverse(S)
    assert X.shape == S.shape and X.flags.c_contiguous
    assert np.array_equal(S, S0)
    if S.size:
        np.testing.assert_allclose(X @ S, np.broadcast_to(np.eye(k), S.shape), atol=1e-12)
        np.testing.assert_allclose(X, np.linalg.inv(S0), rtol=1e-11, atol=1e-13)
    # with logdet=True: the same inverse and log det S from the pivots (the LAPACK fallback: slogdet)
    X2, ld = spd_inverse(S, logdet=True)
    assert np.array_equal(X2, X) and ld.shape == tuple(lead)
    if S.size:
        np.testing.assert_allclose(ld, np.linalg.slogdet(S0)[1], rtol=1e-12, atol=1e-12)


def test_inv_mv_quad_and_logdet_S_equal_dense():
    """``inv_mv_quad`` gives Sigma^{-1} v and v^T Sigma^{-1} v, and ``PosteriorPrecision.logdet_S``
    from the inversion's pivots equals 2 sum log diag(L_S) of the Cholesky factor."""
    rng = np.random.default_rng(5)
    G, k = 40, 4
    d = rng.uniform(0.1, 1.0, G)
    d[3] = 1e-6  # a Heywood gene
    cov = LowRankCov(rng.normal(size=(G, k)), d)
    v = rng.normal(size=(6, G))
    a, quad = cov.inv_mv_quad(v)
    dense = np.linalg.solve(cov.dense(), v.T).T
    np.testing.assert_allclose(a, dense, rtol=1e-7, atol=1e-6 * np.abs(dense).max())
    np.testing.assert_allclose(quad, np.einsum("ng,ng->n", v, dense), rtol=1e-9)
    lam = np.exp(rng.normal(size=(70, G)))  # a stack of >= 64: the sweep route
    P = PosteriorPrecision(cov, lam)
    P.S_inv()
    ld_chol = 2.0 * np.sum(np.log(np.diagonal(np.linalg.cholesky(P.S), axis1=-2, axis2=-1)), axis=-1)
    np.testing.assert_allclose(P.logdet_S(), ld_chol, rtol=1e-12)
    Sinv = np.linalg.inv(cov.dense())
    dense_ld = [np.linalg.slogdet(np.diag(lam[c]) + Sinv)[1] for c in range(3)]
    np.testing.assert_allclose(P.logdet()[:3], dense_ld, rtol=1e-9)


def test_sigma_inverse_is_accurate_with_heywood_genes():
    """Sigma^{-1} v with genes at the d floor (1e-6) and k = 30: cond(K) = 1 + s_max^2 ~ 1e6, and
    forming K^{-1} explicitly left a backward error |Sigma (Sigma^{-1} v) - v| of about 1e-4 of |v|
    (the per-cell Newton then stalled). Through the SVD of D^{1/2} W it stays near 1e-8."""
    rng = np.random.default_rng(3)
    G, k = 200, 30
    W = rng.normal(0.0, 0.4, (G, k))
    d = rng.uniform(0.02, 0.5, G)
    d[[5, 40, 77, 120, 151, 190]] = 1e-6
    cov = LowRankCov(W, d)
    v = rng.normal(0.0, 2.0, (50, G))
    a, wa = cov.inv_mv_W(v)
    assert np.max(np.abs(cov.mv(a) - v)) < 1e-6 * np.max(np.abs(v))
    np.testing.assert_allclose(wa, a @ W, rtol=1e-7, atol=1e-7 * np.max(np.abs(wa)))
    np.testing.assert_allclose(cov.inv_mv(v), a, rtol=0, atol=1e-12 * np.max(np.abs(a)))
    # log det Sigma against the dense determinant
    sign, ld = np.linalg.slogdet(cov.dense())
    assert sign > 0 and abs(cov.logdet() - ld) < 1e-6 * abs(ld)


@pytest.mark.parametrize("k", [1, 2, 5, 13])
def test_unpack_pairs_inverts_pack_pairs(k):
    """unpack_pairs(pack_pairs(S)) = S for stacks of symmetric matrices of any leading shape, from a
    non-contiguous packed slice too (the Newton unpacks P[:, :n_pairs]), and the result is a new
    writable array (callers add to its diagonal)."""
    rng = np.random.default_rng(k)
    cov = LowRankCov(rng.normal(size=(20, k)), rng.uniform(0.1, 1.0, 20))
    A = rng.normal(size=(3, 4, k, k))
    S = A + np.swapaxes(A, -1, -2)
    P = cov.pack_pairs(S)
    assert P.shape == (3, 4, k * (k + 1) // 2)
    np.testing.assert_array_equal(cov.unpack_pairs(P), S)
    wide = np.concatenate([P, rng.normal(size=(3, 4, 2))], axis=-1)[..., :P.shape[-1]]
    wide0 = wide.copy()
    out = cov.unpack_pairs(wide)
    np.testing.assert_array_equal(out, S)
    out[..., 0, 0] += 1.0
    np.testing.assert_array_equal(wide, wide0)
