"""Simulator, closed-form moments, truncated-normal capture factors and the method of moments.

Run with ``pytest -s tests/test_simulate_moments.py`` to see the worst z-scores and MoM errors.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats
from scipy.special import log_ndtr

from pln_ref.moments import (
    MomentsFit,
    moments_fit,
    all_pairs,
    capture_factors,
    method_of_moments,
    mixture_capture_factors,
    moment_zscores,
    pln_covariance,
    pln_moments,
)
from pln_ref.params import Capture, PLNParams
from pln_ref.simulation import MAX_POISSON_RATE, random_params, simulate
from pln_ref.truncnorm import mgf as truncnorm_mgf


def sample_truncnorm_lower0(m, s, rng):
    from pln_ref import truncnorm

    return truncnorm.sample(m, s, rng)

N_BIG = 200_000


# ------------------------------------------------------------------ truncated normal
@pytest.mark.parametrize("m,s", [(2.0, 0.5), (0.3, 1.0), (-1.0, 0.5), (-8.0, 0.5), (-30.0, 0.7)])
def test_truncnorm_sampler_matches_scipy(m, s):
    rng = np.random.default_rng(0)
    draws = sample_truncnorm_lower0(np.full(20_000, m), s, rng)
    assert np.all(draws >= 0) and np.all(np.isfinite(draws))
    ref = stats.truncnorm(a=-m / s, b=np.inf, loc=m, scale=s)
    ks = stats.kstest(draws, ref.cdf)
    assert ks.pvalue > 1e-3, (m, s, ks)
    se = ref.std() / np.sqrt(draws.size)
    assert abs(draws.mean() - ref.mean()) < 4.5 * se


def test_truncnorm_sampler_far_tail():
    # m/s = -1e4: eta | eta >= 0 is ~ Exponential(rate |m|/s^2) to relative O((s/m)^2)
    m, s = -5000.0, 0.5
    draws = sample_truncnorm_lower0(np.full(200_000, m), s, np.random.default_rng(3))
    assert np.all(np.isfinite(draws)) and np.all(draws >= 0)
    scale = s * s / abs(m)
    assert draws.mean() == pytest.approx(scale, rel=0.01)
    assert stats.kstest(draws / scale, "expon").pvalue > 1e-3


def _quad_mgf(t, m, s):
    lz = log_ndtr(m / s)

    def f(e):
        return np.exp(t * e - 0.5 * ((e - m) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi) - lz)

    # the truncated density has its mass within [max(0, m) - 0, max(0, m) + 40 s] (and near 0 if m < 0)
    hi = max(m, 0.0) + 40 * s
    pts = [p for p in (m, s * s / max(-m, 1e-3)) if 0 < p < hi]
    val, err = integrate.quad(f, 0.0, hi, points=pts or None, epsabs=0, epsrel=1e-12, limit=400)
    return val


@pytest.mark.parametrize("t", [-1.0, -2.0])
@pytest.mark.parametrize("m,s", [(3.0, 0.5), (1.0, 0.3), (0.0, 0.5), (-2.0, 0.5), (-20.0, 0.5), (-50.0, 1.0)])
def test_truncnorm_mgf_vs_quadrature(t, m, s):
    closed = float(truncnorm_mgf(t, m, s))
    num = _quad_mgf(t, m, s)
    assert closed == pytest.approx(num, rel=1e-7), (t, m, s, closed, num)


def test_truncnorm_mgf_vs_monte_carlo():
    rng = np.random.default_rng(1)
    worst = 0.0
    for m, s in [(2.0, 0.5), (0.0, 0.8), (-3.0, 0.5)]:
        eta = sample_truncnorm_lower0(np.full(1_000_000, m), s, rng)
        for t in (-1.0, -2.0):
            v = np.exp(t * eta)
            z = (v.mean() - truncnorm_mgf(t, m, s)) / (v.std() / np.sqrt(v.size))
            worst = max(worst, abs(z))
    print(f"\n[truncnorm MGF vs MC, 1e6 draws] worst |z| = {worst:.2f}")
    assert worst < 4.0


@settings(max_examples=200, deadline=None)
@given(m=st.floats(-200, 200), s=st.floats(0.05, 5.0))
def test_capture_factors_properties(m, s):
    e1 = float(truncnorm_mgf(-1.0, m, s))
    e2 = float(truncnorm_mgf(-2.0, m, s))
    assert np.isfinite(e1) and np.isfinite(e2)
    assert 0 < e1 <= 1 + 1e-12 and 0 < e2 <= e1 + 1e-12  # eta >= 0
    assert e2 >= e1 * e1 * (1 - 1e-9)  # Jensen


def test_mixture_factors_are_cell_averages():
    cap = Capture(M0=1000.0, sigma_M=0.4)
    la = np.log(np.array([50.0, 200.0, 900.0, 3000.0]))
    e1c, e2c = capture_factors(cap, la)
    e1, e2 = mixture_capture_factors(cap, la)
    assert e1 == pytest.approx(e1c.mean()) and e2 == pytest.approx(e2c.mean())
    # anchor above M0: m < 0, eta pushed to 0, capture factor near 1
    assert e1c[-1] > e1c[0]
    assert np.allclose(capture_factors(None, la), 1.0)


# ------------------------------------------------------------------ closed forms, consistency
def test_covariance_pairs_match_dense_and_variance():
    p = random_params(7, 3, seed=5, capture=True)
    la = np.log([30.0, 100.0, 400.0])
    dense = pln_covariance(p, la)
    pairs = np.array([[0, 1], [2, 6], [3, 3], [6, 0]])
    assert np.allclose(pln_covariance(p, la, pairs=pairs), dense[pairs[:, 0], pairs[:, 1]], rtol=1e-13)
    assert np.allclose(np.diag(dense), pln_moments(p, la).var, rtol=1e-13)
    assert np.allclose(dense, dense.T)
    # capture adds positive covariance: e2 > e1^2 makes Cov > the fixed-eta value at e1
    mom = pln_moments(p, la)
    assert mom.e2 > mom.e1**2


def test_no_capture_moments_match_seed_formulas():
    p = random_params(5, 2, seed=2)
    S = p.sigma_dense()
    E = np.exp(p.mu + np.diag(S) / 2)
    mom = pln_moments(p)
    assert np.allclose(mom.mean, E)
    assert np.allclose(mom.var, E + E**2 * (np.exp(np.diag(S)) - 1))
    C = pln_covariance(p)
    off = ~np.eye(5, dtype=bool)
    assert np.allclose(C[off], (np.outer(E, E) * (np.exp(S) - 1))[off])


def test_capture_requires_anchor():
    p = random_params(4, 1, seed=0, capture=True)
    with pytest.raises(ValueError, match="log_anchor"):
        pln_moments(p)


# ------------------------------------------------------------------ simulator
def test_simulate_basic_shapes_and_determinism():
    p = random_params(5, 2, seed=0, capture=True)
    a = simulate(p, 300, seed=11)
    b = simulate(p, 300, seed=11)
    assert a.counts.shape == (300, 5) and a.counts.dtype == np.int64
    assert a.x.shape == (300, 5) and a.eta.shape == (300,) and a.log_anchor.shape == (300,)
    assert np.array_equal(a.counts, b.counts) and np.array_equal(a.eta, b.eta)
    assert np.all(a.eta >= 0)
    # default anchor: L = M0 * kappa, kappa log-uniform on [0.05, 0.5]
    kappa = np.exp(a.log_anchor) / p.capture.M0
    assert kappa.min() >= 0.05 - 1e-12 and kappa.max() <= 0.5 + 1e-12


def test_simulate_anchor_is_exogenous_and_no_capture_eta_zero():
    p = random_params(5, 2, seed=0, capture=True)
    la = np.linspace(2.0, 6.0, 50)
    sim = simulate(p, 50, seed=1, log_anchor=la)
    assert np.array_equal(sim.log_anchor, la)
    sim2 = simulate(p, 50, seed=1, library_size=np.exp(la))
    assert np.allclose(sim2.log_anchor, la)
    with pytest.raises(ValueError, match="not both"):
        simulate(p, 5, seed=0, log_anchor=la[:5], library_size=np.exp(la[:5]))
    q = random_params(5, 2, seed=0)
    s0 = simulate(q, 100, seed=3)
    assert np.all(s0.eta == 0)
    assert s0.log_anchor is None and s0.library_size is None  # no capture: no anchor


def test_simulate_latent_covariance():
    p = random_params(6, 2, seed=4)
    sim = simulate(p, 100_000, seed=5)
    C = np.cov(sim.x, rowvar=False)
    assert np.abs(C - p.sigma_dense()).max() < 0.03
    assert np.abs(sim.x.mean(0) - p.mu).max() < 0.02


def test_simulate_truncnorm_eta_given_anchor():
    p = random_params(4, 1, seed=0, capture=Capture(M0=1000.0, sigma_M=0.5))
    sim = simulate(p, 100_000, seed=1, library_size=100.0)
    m = np.log(1000.0 / 100.0)
    ref = stats.truncnorm(a=-m / 0.5, b=np.inf, loc=m, scale=0.5)
    assert stats.kstest(sim.eta, ref.cdf).pvalue > 1e-3


def test_simulate_rate_overflow_raises():
    p = PLNParams(mu=np.array([30.0, 0.0]), W=np.array([[0.1], [0.1]]), d=np.array([0.1, 0.1]))
    with pytest.raises(ValueError, match="MAX_POISSON_RATE"):
        simulate(p, 10, seed=0)
    assert MAX_POISSON_RATE == 1e12


def test_to_anndata(tmp_path):
    p = random_params(5, 2, seed=0, capture=True)
    sim = simulate(p, 40, seed=2)
    ad = sim.to_anndata()
    assert ad.shape == (40, 5)
    assert np.array_equal(np.asarray(ad.X), sim.counts)
    assert np.allclose(ad.obs["eta_true"], sim.eta)
    assert np.allclose(ad.obs["capture_efficiency_true"], np.exp(-sim.eta))
    assert np.allclose(ad.obs["total_counts"], sim.counts.sum(1))
    assert np.allclose(ad.obs["library_size"], np.exp(sim.log_anchor))
    assert np.allclose(ad.obsm["x_true"], sim.x)
    assert np.allclose(ad.varm["W_true"], p.W)
    assert np.allclose(ad.var["mu_true"], p.mu) and np.allclose(ad.var["d_true"], p.d)
    assert ad.uns["true_params"]["M0"] == p.capture.M0
    path = tmp_path / "sim.h5ad"
    ad.write_h5ad(path)
    import anndata

    back = anndata.read_h5ad(path)
    assert np.allclose(back.uns["true_params"]["W"], p.W)
    # no capture: uns has no M0
    assert "M0" not in simulate(random_params(4, 1, seed=0), 5, seed=0).to_anndata().uns["true_params"]


# ------------------------------------------------------------------ moment identities (big N)
@pytest.mark.parametrize("capture", [False, True])
def test_moment_identities_large_simulation(capture):
    p = random_params(6, 2, seed=101, capture=capture)
    sim = simulate(p, N_BIG, seed=202)
    res = moment_zscores(sim.counts, p, sim.log_anchor)
    n_z = res["z_mean"].size + res["z_var"].size + res["z_cov"].size
    print(
        f"\n[moments, capture={capture}, N={N_BIG}, G=6, k=2] {n_z} z-scores, worst |z| = "
        f"{res['max_abs_z']:.2f} ({res['worst']})"
    )
    assert res["pairs"].shape == (15, 2)
    assert res["max_abs_z"] < 4.0


def test_moment_zscores_detect_wrong_params():
    p = random_params(6, 2, seed=101, capture=True)
    sim = simulate(p, 50_000, seed=203)
    wrong = PLNParams(mu=p.mu, W=p.W * 1.3, d=p.d, capture=p.capture)
    assert moment_zscores(sim.counts, wrong, sim.log_anchor)["max_abs_z"] > 10
    # ignoring capture (eta=0) is detected too
    assert moment_zscores(sim.counts, p.with_capture(None))["max_abs_z"] > 10


# ------------------------------------------------------------------ method of moments
# Measured over 40 random (params, simulation) seeds at N=200k, G=8, k=2 (max over entries):
#   no capture: max|mu err| median 0.006 (max 0.026), max|Sigma err| median 0.011 (max 0.055)
#   capture:    max|mu err| median 0.012 (max 0.039), max|Sigma err| median 0.026 (max 0.080)
# (capture makes counts ~10x smaller -> more Poisson noise). Bounds: (median of 5 seeds, every seed).
MOM_TOL = {
    False: {"mu_med": 0.012, "sig_med": 0.025, "mu_max": 0.03, "sig_max": 0.06},
    True: {"mu_med": 0.025, "sig_med": 0.045, "mu_max": 0.05, "sig_max": 0.10},
}


@pytest.mark.parametrize("capture", [False, True])
def test_method_of_moments_recovers_mu_sigma(capture):
    mu_errs, sig_errs, naive_errs = [], [], []
    for rep in range(5):
        p = random_params(8, 2, seed=300 + rep, capture=capture)
        sim = simulate(p, N_BIG, seed=400 + rep)
        est, info = moments_fit(
            sim.counts, 2, capture=p.capture, log_anchor=sim.log_anchor if capture else None
        )
        assert info["fa_converged"] and info["n_var_clamped"] == 0
        assert est.capture == p.capture
        mu_errs.append(np.abs(est.mu - p.mu).max())
        sig_errs.append(np.abs(est.sigma_dense() - p.sigma_dense()).max())
        if capture:
            naive = method_of_moments(sim.counts, 2)  # capture ignored in the inversion
            naive_errs.append(np.abs(naive.sigma_dense() - p.sigma_dense()).max())
    print(
        f"\n[MoM capture={capture}, N={N_BIG}, G=8, k=2, 5 seeds] max|mu err| per seed "
        f"{np.round(mu_errs, 4).tolist()}, max|Sigma err| per seed {np.round(sig_errs, 4).tolist()}"
    )
    tol = MOM_TOL[capture]
    assert np.median(mu_errs) < tol["mu_med"] and np.median(sig_errs) < tol["sig_med"]
    assert max(mu_errs) < tol["mu_max"] and max(sig_errs) < tol["sig_max"]
    if capture:
        # capture adds covariance e2 - e1^2 to every pair: ignoring it is clearly worse
        print(f"   same data, capture ignored: max|Sigma err| per seed {np.round(naive_errs, 3).tolist()}")
        assert min(naive_errs) > 3 * max(sig_errs)


def test_method_of_moments_robust_to_zero_and_constant_genes():
    p = random_params(6, 2, seed=7)
    sim = simulate(p, 2_000, seed=8)
    u = np.array(sim.counts, dtype=float)
    u[:, 1] = 0.0  # all-zero gene
    u[:, 4] = 3.0  # constant gene (Var = 0 < E)
    for cap in (None, Capture(M0=200.0, sigma_M=0.5)):
        est, info = moments_fit(u, 2, capture=cap)
        assert np.all(np.isfinite(est.mu)) and np.all(np.isfinite(est.W)) and np.all(est.d > 0)
        assert np.all(est.d >= 1e-3)
        assert info["n_zero_genes"] == 1
        assert info["n_var_clamped"] >= 2
        # all-zero gene: mean floored at 0.5/N, so mu = log(0.5/N / e1) - sigma_floor/2
        assert est.mu[1] == pytest.approx(np.log(0.5 / 2_000 / info["e1"]) - 0.5 * 1e-2)


def test_method_of_moments_streamed_path_matches_dense():
    p = random_params(60, 3, seed=9)
    sim = simulate(p, 20_000, seed=10)
    dense = method_of_moments(sim.counts, 3)
    streamed, info = moments_fit(sim.counts, 3, dense_max_genes=10, oversample=20)
    assert info["path"] == "streamed"
    S_d, S_s, S_true = dense.sigma_dense(), streamed.sigma_dense(), p.sigma_dense()
    diff = np.abs(S_s - S_d).max()
    err_d, err_s = np.abs(S_d - S_true).max(), np.abs(S_s - S_true).max()
    print(f"\n[MoM streamed vs dense, G=60, N=20k] max|diff|={diff:.4f}, errors dense {err_d:.4f} streamed {err_s:.4f}")
    assert np.allclose(streamed.mu, dense.mu)
    assert err_s < 1.5 * err_d + 0.02


@pytest.mark.parametrize("block", [1, 7, 40, 1000])
def test_streamed_operator_rows_equal_the_clipped_log_moment_matrix(block):
    """``fa_rows`` forms Sigma_hat X block by block as the plain formula over the whole matrix:
    S_ij = clip(log(c0 + c1 R_ij), -b_ij, b_ij), b_ij = max_corr sqrt(s_i s_j), log of a
    non-positive argument -> -b_ij, S_ii = s_i; the clamped off-diagonal pairs are counted once per
    ordered pair, and ``count=False`` gives the same rows with a count of 0."""
    from pln_ref.moments import _offdiag_inverter, fa_rows

    rng = np.random.default_rng(3)
    G, r, c0, c1, mc = 40, 5, 0.9, 1.3, 0.99
    Qr = rng.normal(size=(G, r))
    s = rng.uniform(0.05, 2.0, G)
    X = rng.normal(size=(G, 3))
    R = Qr @ Qr.T
    arg = c0 + c1 * R
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = np.where(arg > 0, np.log(np.where(arg > 0, arg, 1.0)), -np.inf)
    b = mc * np.sqrt(np.outer(s, s))
    S = np.clip(raw, -b, b)
    S[np.diag_indices(G)] = s
    off = ~np.eye(G, dtype=bool)
    n_clamped = int(np.count_nonzero(((raw > b) | (raw < -b)) & off))
    assert np.count_nonzero(arg <= 0) > 0 and n_clamped > 0  # both branches are exercised
    inv = _offdiag_inverter(s, c0, c1, mc)
    out, total = fa_rows(Qr, X, 0, G, block, inv)
    np.testing.assert_allclose(out, S @ X, rtol=1e-12, atol=1e-12)
    assert total == n_clamped
    out2, total2 = fa_rows(Qr, X, 0, G, block, inv, count=False)
    assert np.array_equal(out2, out) and total2 == 0
    lo, hi = 11, 29  # a range of rows, as one Dask worker computes it
    part, _ = fa_rows(Qr, X, lo, hi, block, inv)
    np.testing.assert_allclose(part, out[lo:hi], rtol=1e-12, atol=1e-12)


def test_gram_factor_is_as_good_as_the_exact_truncated_svd():
    """Qr Qr^T from the randomized range finder approximates Z^T Z within 1% of the optimal rank-r
    error (the exact truncated SVD's), its top singular values within 1e-3, and an operator Z gives
    the same factor as the array."""
    from scipy.sparse.linalg import aslinearoperator

    from pln_ref.moments import gram_factor

    rng = np.random.default_rng(4)
    N, G, r = 400, 120, 8
    Z = rng.normal(size=(N, 12)) @ (rng.normal(size=(12, G)) * np.linspace(3.0, 0.5, 12)[:, None])
    Z += 0.3 * rng.normal(size=(N, G))
    gram = Z.T @ Z
    _, sv, vt = np.linalg.svd(Z, full_matrices=False)
    best = np.linalg.norm(gram - (vt[:r].T * sv[:r] ** 2) @ vt[:r], 2)
    Qr = gram_factor(Z, r, seed=1)
    assert Qr.shape == (G, r)
    assert np.linalg.norm(gram - Qr @ Qr.T, 2) <= 1.01 * best
    np.testing.assert_allclose(np.linalg.norm(Qr, axis=0), sv[:r], rtol=1e-3)
    np.testing.assert_allclose(gram_factor(aslinearoperator(Z), r, seed=1), Qr, rtol=1e-10, atol=1e-10)


def test_method_of_moments_bad_input():
    u = np.ones((10, 4))
    with pytest.raises(ValueError, match="k < G"):
        method_of_moments(u, 4)
    with pytest.raises(ValueError, match="at least 2 cells"):
        method_of_moments(np.ones((1, 4)), 1)
    with pytest.raises(ValueError, match="non-integer"):
        method_of_moments(u * 0.5, 1)
    with pytest.raises(ValueError, match=r"log_anchor must have shape \(10,\)"):
        method_of_moments(u, 1, capture=Capture(M0=10.0), log_anchor=np.zeros(3))
    # the one anchor policy: an all-zero cell has no default anchor (no silent floor at 1)
    u0 = u.copy()
    u0[3] = 0.0
    with pytest.raises(ValueError, match="zero library size"):
        method_of_moments(u0, 1, capture=Capture(M0=10.0))
    assert isinstance(moments_fit(u, 1), MomentsFit)


def test_all_pairs():
    assert all_pairs(4).tolist() == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]


@pytest.mark.parametrize("dense_max_genes", [2000, 10])
def test_moments_fit_sparse_input_equals_dense(dense_max_genes):
    """moments_fit reads the counts by blocks (dense path: blocked Gram; streamed path: the centred
    scaled counts as an operator): CSR input gives the dense input's estimate."""
    import scipy.sparse as sp

    from pln_ref.moments import moments_fit

    p = random_params(40, 2, seed=7, capture=True)
    sim = simulate(p, 300, seed=8)
    a = moments_fit(sim.counts, 2, capture=p.capture, log_anchor=sim.log_anchor, dense_max_genes=dense_max_genes)
    b = moments_fit(sp.csr_matrix(sim.counts), 2, capture=p.capture, log_anchor=sim.log_anchor,
                    dense_max_genes=dense_max_genes)
    assert a.info["path"] == ("dense" if dense_max_genes >= 40 else "streamed")
    for x, y in ((a.params.mu, b.params.mu), (a.params.d, b.params.d), (a.params.W @ a.params.W.T, b.params.W @ b.params.W.T)):
        np.testing.assert_allclose(y, x, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(a.info["mean_count"], sim.counts.mean(0))
