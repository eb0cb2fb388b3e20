"""The factorisation helpers of pln_ref.eta_marginal against independent computations:
``lowrank.chol_inverse`` (Cholesky factor and inverse vectorised over the batch axis) against LAPACK
(np.linalg.cholesky / np.linalg.inv) and against the defining identities L L^T = S, S S^{-1} = I;
``_gaussian_block`` (a block of the Gaussian posterior with its factorisation sliced) against
``CellPosteriors.subset``, which refactorises the block from lambda (the way ``eta_marginal`` built
its blocks before the slicing); ``_taylor_start`` against a per-(cell, node) loop."""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pln_ref
from pln_ref.eta_marginal import _gaussian_block, _taylor_start, _x_star_derivatives, eta_marginal
from pln_ref.laplace import CellPosteriors, newton_map
from pln_ref.lowrank import PosteriorPrecision
from pln_ref.lowrank import chol_inverse as _chol_inv

EPS = np.finfo(float).eps


def _spd_batch(rng, n, k, log10_cond=0.0, shift_identity=False):
    """n random SPD k x k matrices Q diag(e) Q^T with eigenvalues e log-spaced over 10^log10_cond
    (each matrix its own random orthogonal Q and scale); ``shift_identity``: I + B B^T (S >= I_k, the
    matrices of ``_node_factor``)."""
    if shift_identity:
        B = rng.standard_normal((n, k, k)) * rng.uniform(0.1, 30.0, (n, 1, 1))
        return np.eye(k) + B @ np.swapaxes(B, 1, 2)
    Q, _ = np.linalg.qr(rng.standard_normal((n, k, k)))
    e = 10.0 ** (np.linspace(0.0, log10_cond, k)[None] + rng.uniform(-2, 2, (n, 1)))
    S = (Q * e[:, None, :]) @ np.swapaxes(Q, 1, 2)
    return 0.5 * (S + np.swapaxes(S, 1, 2))  # exactly symmetric


def _check_chol_inv(S, log10_cond):
    n, k, _ = S.shape
    L, S_inv = _chol_inv(S)
    assert L.shape == S_inv.shape == (n, k, k)
    assert L.flags.c_contiguous and S_inv.flags.c_contiguous  # ``set_rows`` writes rows into them
    # L is lower triangular with a positive diagonal (upper part exactly zero)
    iu = np.triu_indices(k, 1)
    assert np.all(L[:, iu[0], iu[1]] == 0.0)
    assert np.all(np.diagonal(L, axis1=1, axis2=2) > 0.0)
    # backward stable: L L^T = S to round-off relative to ||S||, whatever the conditioning
    nS = np.linalg.norm(S, 2, axis=(1, 2))[:, None, None]
    assert np.all(np.abs(L @ np.swapaxes(L, 1, 2) - S) <= 50 * k * EPS * nS)
    # against LAPACK: the Cholesky factor is unique, the difference is bounded by the conditioning
    cond = 10.0 ** log10_cond
    L_ref = np.linalg.cholesky(S)
    nL = np.linalg.norm(L_ref, 2, axis=(1, 2))[:, None, None]
    assert np.all(np.abs(L - L_ref) <= 50 * k * EPS * max(1.0, math.sqrt(cond)) * nL)
    Si_ref = np.linalg.inv(S)
    nSi = np.linalg.norm(Si_ref, 2, axis=(1, 2))[:, None, None]
    assert np.all(np.abs(S_inv - Si_ref) <= 50 * k * EPS * cond * nSi)
    assert np.all(np.abs(S_inv - np.swapaxes(S_inv, 1, 2)) <= 10 * EPS * nSi)
    # S S^{-1} = I to eps * cond
    assert np.all(np.abs(S @ S_inv - np.eye(k)) <= 50 * k * EPS * cond)
    return L, S_inv


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40), k=st.integers(1, 12),
       log10_cond=st.sampled_from([0.0, 1.0, 3.0, 6.0, 10.0]), shift=st.booleans())
def test_chol_inv_matches_lapack(seed, n, k, log10_cond, shift):
    rng = np.random.default_rng(seed)
    S = _spd_batch(rng, n, k, log10_cond, shift)
    if shift:  # I + B B^T: the condition number is at most 1 + ||B||^2
        log10_cond = math.log10(np.linalg.cond(S).max())
    _check_chol_inv(S, log10_cond)


def test_chol_inv_k1_exact_and_ill_conditioned():
    # k = 1: L = sqrt(s), S^{-1} = 1 / s (to one rounding), over 20 decades
    s = 10.0 ** np.linspace(-10, 10, 41)
    L, S_inv = _chol_inv(s[:, None, None])
    np.testing.assert_allclose(L[:, 0, 0], np.sqrt(s), rtol=EPS)
    np.testing.assert_allclose(S_inv[:, 0, 0], 1.0 / s, rtol=2 * EPS)
    # a Hilbert matrix (k = 8: cond 1.5e10) in a batch with well-conditioned ones: the batch
    # entries are independent, the ill-conditioned one agrees with LAPACK to eps * cond
    k = 8
    H = 1.0 / (np.arange(k)[:, None] + np.arange(k)[None] + 1.0)
    rng = np.random.default_rng(0)
    S = np.concatenate([_spd_batch(rng, 3, k), H[None], _spd_batch(rng, 3, k)])
    L, S_inv = _check_chol_inv(S, math.log10(np.linalg.cond(H)))
    L1, S_inv1 = _chol_inv(S[[0, 1, 2, 4, 5, 6]])
    np.testing.assert_array_equal(L1, L[[0, 1, 2, 4, 5, 6]])
    np.testing.assert_array_equal(S_inv1, S_inv[[0, 1, 2, 4, 5, 6]])
    # the exact inverse of the Hilbert matrix has integer entries (up to 4e12 here)
    i = np.arange(1, k + 1)
    Hinv = ((-1.0) ** (i[:, None] + i[None]) * (i[:, None] + i[None] - 1)
            * np.array([[math.comb(k + a - 1, k - b) * math.comb(k + b - 1, k - a)
                         * math.comb(a + b - 2, a - 1) ** 2 for b in i] for a in i], dtype=float))
    assert np.abs(S_inv[3] - Hinv).max() <= 1e-5 * np.abs(Hinv).max()


def test_chol_inv_input_layout_is_irrelevant():
    """A non-contiguous (transposed / strided) batch gives the same factors as its contiguous copy."""
    rng = np.random.default_rng(1)
    S = _spd_batch(rng, 10, 4, 2.0)
    big = np.zeros((20, 4, 4))
    big[::2] = np.swapaxes(S, 1, 2)  # S symmetric: the transposed view is S
    view = np.swapaxes(big[::2], 1, 2)
    assert not view.flags.c_contiguous
    for a, b in zip(_chol_inv(view), _chol_inv(S)):
        np.testing.assert_array_equal(a, b)


def test_chol_inv_non_spd_rows_are_nan_and_do_not_spread():
    """``_chol_inv`` does not check definiteness (its matrices S = I + W^T diag(lambda r) W are >= I_k,
    and LAPACK's check would cost the per-matrix calls it avoids): a non-positive pivot gives the
    square root of a negative number (NaN, with NumPy's invalid-value RuntimeWarning), or a division
    by a zero pivot. The other matrices of the batch are unaffected."""
    rng = np.random.default_rng(2)
    k = 3
    S = _spd_batch(rng, 5, k, 1.0)
    bad = S.copy()
    bad[1] = np.diag([1.0, -1.0, 2.0])  # indefinite: negative second pivot
    bad[3] = [[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]  # indefinite, positive diagonal
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(bad)
    with pytest.warns(RuntimeWarning, match="invalid value"):
        L, S_inv = _chol_inv(bad)
    for i in (1, 3):
        assert np.isnan(L[i]).any() and np.isnan(S_inv[i]).all()
    ok = [0, 2, 4]
    L_ok, S_inv_ok = _chol_inv(S[ok])
    np.testing.assert_array_equal(L[ok], L_ok)
    np.testing.assert_array_equal(S_inv[ok], S_inv_ok)
    # positive semidefinite and singular: a zero pivot, non-finite output
    sing = np.ones((1, 2, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        L, S_inv = _chol_inv(sing)
    assert not np.isfinite(S_inv).all()


# ---- _gaussian_block --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gaussian():
    """A Gaussian posterior of 23 cells (G = 9, k = 3), its S^{-1} and Cholesky factor computed."""
    p = pln_ref.random_params(9, 3, seed=5, capture=True, mean_log_rate=2.5)
    s = pln_ref.simulate(p, 23, seed=6, library_size=np.geomspace(30.0, 5000.0, 23))
    u, la = np.asarray(s.counts, float), np.asarray(s.log_anchor)
    g = newton_map(u, p, la)
    g.precision.S_inv(), g.precision.L_S  # noqa: B018  (cached on the parent, as in eta_marginal)
    return u, la, g


def _snapshot(g):
    P = g.precision
    arrs = {f.name: getattr(g, f.name) for f in dataclasses.fields(CellPosteriors)
            if isinstance(getattr(g, f.name), np.ndarray)}
    arrs.update(lam=P.lam, r=P.r, S=P.S, S_inv=P.S_inv())
    return {k: v.copy() for k, v in arrs.items()}


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_gaussian_block_equals_the_refactorised_subset(gaussian, data):
    u, la, g = gaussian
    N = g.N
    lo = data.draw(st.integers(0, N - 1), label="lo")
    hi = data.draw(st.integers(lo + 1, N + 3), label="hi")  # past the end as slices allow
    blk = slice(lo, hi)
    before = _snapshot(g)
    B, ref = _gaussian_block(g, blk), g.subset(blk)  # ref: PosteriorPrecision(cov, lam[blk])
    n = ref.N
    assert B.N == n == min(hi, N) - lo
    # every field of the dataclass but the factorisation: the same rows
    for f in dataclasses.fields(CellPosteriors):
        a, b = getattr(B, f.name), getattr(ref, f.name)
        if f.name == "precision":
            continue
        if f.name == "params":
            assert a is g.params
        elif b is None:
            assert a is None
        else:
            np.testing.assert_array_equal(a, b, err_msg=f.name)
    # the factorisation: sliced equals recomputed from lambda to round-off
    PB, PR = B.precision, ref.precision
    assert isinstance(PB, PosteriorPrecision) and PB.cov is g.precision.cov
    np.testing.assert_array_equal(PB.lam, PR.lam)
    np.testing.assert_allclose(PB.r, PR.r, rtol=1e-15)
    np.testing.assert_allclose(PB.S, PR.S, rtol=1e-13)
    np.testing.assert_allclose(PB.S_inv(), PR.S_inv(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(PB.L_S, PR.L_S, rtol=1e-13)
    np.testing.assert_allclose(PB.logdet(), PR.logdet(), rtol=1e-13)
    np.testing.assert_allclose(PB.inv_diag(), PR.inv_diag(), rtol=1e-12)
    v = np.random.default_rng(lo).standard_normal((n, g.precision.cov.G))
    np.testing.assert_allclose(PB.solve(v), PR.solve(v), rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(PB.solve(v), np.linalg.solve(PR.dense(), v[..., None])[..., 0],
                               rtol=1e-9, atol=1e-12)
    for name in ("sd_x", "mean_x", "log_det_neg_H"):
        np.testing.assert_allclose(getattr(B, name)(), getattr(ref, name)(), rtol=1e-12)
    xs, es = B.sample(np.random.default_rng(1), 3)
    xr, er = ref.sample(np.random.default_rng(1), 3)
    np.testing.assert_allclose(xs, xr, rtol=1e-12)
    np.testing.assert_array_equal(es, er)
    # the block's arrays are views of the parent's: using it (lazy L_S, S^{-1}, ...) left them intact
    for k, a in _snapshot(g).items():
        np.testing.assert_array_equal(a, before[k], err_msg=k)


def test_blocked_eta_marginal_leaves_the_gaussian_posterior_intact(gaussian):
    """eta_marginal by blocks (``_gaussian_block``) equals the one-block run and does not write into
    the Gaussian posterior whose factorisation the blocks share."""
    u, la, g = gaussian
    before = _snapshot(g)
    whole = eta_marginal(u, g, la)
    blocked = eta_marginal(u, g, la, block_size=4)
    for k, a in _snapshot(g).items():
        np.testing.assert_array_equal(a, before[k], err_msg=k)
    np.testing.assert_allclose(blocked.log_p_nodes, whole.log_p_nodes, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(blocked.sd_x(), whole.sd_x(), rtol=1e-12)
    np.testing.assert_allclose(blocked.mean_x(), whole.mean_x(), rtol=1e-12)


# ---- _taylor_start ------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["all", "some"])
def test_taylor_start_equals_the_per_node_sum(gaussian, which):
    """The batched product of ``_taylor_start`` against the Taylor sums cell by cell and node by
    node (all terms kept: nodes within 2 SD of the mode, where no term grows), for the block read
    in place (all cells) and a gathered subset of cells."""
    u, la, g = gaussian
    K = 5
    der = _x_star_derivatives(g, K)
    cells = np.arange(g.N) if which == "all" else np.array([0, 3, 4, 11, 22])
    z = np.array([-2.0, -0.7, 0.0, 0.4, 1.9])
    nodes = np.maximum(g.eta_map[cells, None] + z[None] / np.sqrt(g.s[cells])[:, None], 0.0)
    x0 = _taylor_start(g, der, cells, nodes).reshape(cells.size, z.size, -1)
    worst = 0.0
    for a, c in enumerate(cells):
        for j in range(z.size):
            D = nodes[a, j] - g.eta_map[c]
            terms = [der[i, c] * D ** (i + 1) / math.factorial(i + 1) for i in range(K)]
            norms = [np.abs(t).max() for t in terms]
            if any(norms[i] > norms[i - 1] for i in range(1, K)):
                continue  # the truncation rule is tested in test_eta_marginal
            want = g.x_map[c] + sum(terms)
            np.testing.assert_allclose(x0[a, j], want, rtol=1e-13, atol=1e-13)
            worst = max(worst, np.abs(want - g.x_map[c]).max())
    assert worst > 1e-3  # the series contributed


def test_sup_norms_equal_the_max_of_abs_over_the_last_axis():
    """eta_marginal._sup_norms (the Taylor start's per-term sup norms) equals max_g |a_g| on both of
    its paths (short rows via the transposed copy, long rows via max and -min), for 2- and 3-d input."""
    from pln_ref.eta_marginal import _sup_norms

    rng = np.random.default_rng(0)
    for shape in ((7, 1), (3, 5, 20), (4, 33), (2, 3, 100)):
        a = rng.normal(size=shape) * rng.lognormal(size=shape)
        np.testing.assert_array_equal(_sup_norms(a), np.abs(a).max(axis=-1))
