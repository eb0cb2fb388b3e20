"""The eta-marginal Laplace posterior (pln_ref.eta_marginal): node solves against dense algebra,
the marginal against brute-force 1-D quadrature with dense small-G Laplace, the exact p(eta | u)
and E[x | u] of a G = 2 model integrated on a grid, draws against the computed moments, and the
result protocol (draws, logpdf, moments, PPC, AnnData, ArviZ, save/load) through
LaplaceResult.with_eta_marginal."""

import dataclasses
import math

import numpy as np
import pytest
from scipy.special import gammaln

import pln_ref
from pln_ref import truncnorm
from pln_ref.eta_marginal import EtaMarginalPosterior, eta_marginal, x_newton_fixed_eta
from pln_ref.laplace import newton_map
from pln_ref.lowrank import LowRankCov
from pln_ref.model import log_joint
from pln_ref.params import Capture, PLNParams

# the result-protocol tests, run below on a Laplace result whose posterior is the eta marginal
import test_protocol as tp
from test_protocol import (  # noqa: F401  (collected here with the fixture ``res`` of this module)
    sim, test_draws_match_moments_density_and_subset, test_per_cell_summaries, test_ppc_through_the_posterior,
    test_save_load_atomic_roundtrip, test_to_anndata_schema_and_h5ad_roundtrip, test_to_arviz,
    test_types_settings_diagnostics_history)


@pytest.fixture(scope="module")
def res(sim):
    base = pln_ref.fit(tp._adata(sim), k=tp.K, n_steps=40, progress=False)
    out = base.with_eta_marginal(sim.counts)
    assert isinstance(out.posterior, EtaMarginalPosterior) and base.posterior is base.cells
    return out


@pytest.fixture(scope="module")
def small():
    """G = 6, k = 2, 5 cells with library sizes 30-3000 (eta near and away from its bound)."""
    p = pln_ref.random_params(6, 2, seed=3, capture=True, mean_log_rate=3.0)
    L = np.array([30.0, 100.0, 300.0, 1000.0, 3000.0])
    s = pln_ref.simulate(p, 5, seed=4, library_size=L)
    u, la = np.asarray(s.counts, float), np.asarray(s.log_anchor)
    g = newton_map(u, p, la)
    return p, u, la, g, eta_marginal(u, g, la)


def _dense_laplace_in_x(u, p, la, etas):
    """Brute force: for each eta (E,) of one cell, x*(eta) by dense Newton and
    log p(u, x*, eta) + G/2 log 2 pi - 1/2 log det(diag(lambda) + Sigma^{-1}) with dense G x G."""
    G = u.size
    Si = np.linalg.inv(p.sigma_dense())
    x = np.tile(np.log(u + 1.0), (etas.size, 1)) + etas[:, None]
    for _ in range(100):
        lam = np.exp(x - etas[:, None])
        g = u - lam - (x - p.mu) @ Si
        A = Si[None] + lam[:, :, None] * np.eye(G)[None]
        step = np.linalg.solve(A, g[..., None])[..., 0]
        x = x + step
        if np.max(np.abs(step)) < 1e-13:
            break
    lam = np.exp(x - etas[:, None])
    A = Si[None] + lam[:, :, None] * np.eye(G)[None]
    lj = log_joint(np.tile(u, (etas.size, 1)), x, etas, p, np.full(etas.size, la))
    return x, lj + 0.5 * G * math.log(2 * math.pi) - 0.5 * np.linalg.slogdet(A)[1]


def test_node_newton_matches_dense(small):
    p, u, la, g, em = small
    cov = LowRankCov.from_params(p)
    etas = np.array([0.0, 0.3, 1.7, 2.5, 4.0])
    x, f, A, it, conv = x_newton_fixed_eta(u, np.log(u + 0.5), etas, p.mu, cov)
    assert conv.all() and it.max() < 30
    for c in range(5):
        xd, lpd = _dense_laplace_in_x(u[c], p, la[c], etas[c:c + 1])
        np.testing.assert_allclose(x[c], xd[0], atol=1e-8)
        Ad = np.linalg.inv(p.sigma_dense()) + np.diag(np.exp(xd[0] - etas[c]))
        np.testing.assert_allclose(A.logdet()[c], np.linalg.slogdet(Ad)[1], atol=1e-6)
    # the node values of the posterior are the dense log p~(eta_j)
    for c in range(5):
        _, lpd = _dense_laplace_in_x(u[c], p, la[c], em.nodes[c])
        np.testing.assert_allclose(em.log_p_nodes[c], lpd, atol=1e-5)  # x-Newton decrement tol 1e-8


def test_marginal_matches_brute_force_quadrature(small):
    """log Z, E eta, Var eta and log q(eta) (5 nodes by default) against a 4001-point trapezoid
    rule on the dense Laplace-in-x log density (same integrand, independent algebra and quadrature)."""
    p, u, la, g, em = small
    mean, var = em.eta_mean_var()
    for c in range(5):
        etas = np.linspace(em.nodes[c, 0], em.nodes[c, -1], 4001)
        _, lp = _dense_laplace_in_x(u[c], p, la[c], etas)
        top = lp.max()
        Z = np.trapezoid(np.exp(lp - top), etas)
        q = np.exp(lp - top) / Z
        m = np.trapezoid(etas * q, etas)
        v = np.trapezoid((etas - m) ** 2 * q, etas)
        assert abs(em.log_evidence[c] - (top + math.log(Z))) < 2e-3
        assert abs(mean[c] - m) < 3e-3 * math.sqrt(v)
        assert abs(var[c] / v - 1) < 5e-3
        pick = etas[::400]
        np.testing.assert_allclose(em.eta_logpdf(np.repeat(pick[:, None], 5, axis=1))[:, c],
                                   lp[::400] - top - math.log(Z), atol=1e-2)


def test_eta_density_normalised_and_draws_follow_cdf(small):
    *_, em = small
    # the piecewise-exponential density integrates to 1 on its grid
    for c in range(em.N):
        fine = np.linspace(em.grid[c, 0], em.grid[c, -1], 20001)
        arg = np.tile(em.grid[:, :1].T, (fine.size, 1))
        arg[:, c] = fine
        assert abs(np.trapezoid(np.exp(em.eta_logpdf(arg)[:, c]), fine) - 1) < 1e-6
    e = em.sample_eta(np.random.default_rng(0), 40000)
    assert np.all(e >= em.grid[:, 0]) and np.all(e <= em.grid[:, -1]) and np.all(e >= 0)
    # Kolmogorov-Smirnov distance of the draws from the exact CDF on the grid
    for c in range(em.N):
        F_emp = np.searchsorted(np.sort(e[:, c]), em.grid[c], side="right") / e.shape[0]
        assert np.max(np.abs(F_emp - em.cdf[c])) < 1.63 / math.sqrt(e.shape[0]) * 1.5


def test_draws_match_the_node_mixture_moments(small):
    *_, em = small
    S = 40000
    x, e = em.sample(np.random.default_rng(1), S)
    m, v = em.eta_mean_var()
    assert np.all(np.abs(e.mean(0) - m) < 4.5 * np.sqrt(v / S))
    np.testing.assert_allclose(e.var(0), v, rtol=0.03)
    mx, sx = em.mean_x(), em.sd_x()
    assert np.all(np.abs(x.mean(0) - mx) < 4.5 * sx / math.sqrt(S))
    np.testing.assert_allclose(x.std(0), sx, rtol=0.02)
    np.testing.assert_allclose(np.exp(x).mean(0), em.expected_exp_x(), rtol=0.03)
    # logpdf without the skew transform: the x | eta part is the two-node Gaussian mixture (dense
    # check for one draw; the skewed density is checked on a grid in
    # test_mean_and_skew_of_x_given_eta_against_two_dimensional_quadrature)
    em = dataclasses.replace(em, skew=False)
    c, s = 2, 5
    j, w = em._node_pos(e[s])
    mean = em._cond_mean(e[s], j, w)[c]
    Si = np.linalg.inv(em.params.sigma_dense())
    dens = 0.0
    for jj, ww in ((j[c], 1 - w[c]), (j[c] + 1, w[c])):
        A = Si + np.diag(em.lam_nodes[c, jj])
        r = x[s, c] - mean
        dens += ww * math.exp(-0.5 * (6 * math.log(2 * math.pi) - np.linalg.slogdet(A)[1] + r @ A @ r))
    lq = em.logpdf(x[s:s + 1], e[s:s + 1])[0, c]
    assert abs(lq - (em.eta_logpdf(e[s])[c] + math.log(dens))) < 1e-9


def _tiny():
    W = np.array([[0.6], [0.4]])
    d = np.array([0.3, 0.5])
    mu = np.array([2.0, 1.0])
    p = PLNParams(mu, W, d, Capture(M0=float(np.exp(mu).sum() * 1.3), sigma_M=0.5))
    u = np.array([[4.0, 1.0], [12.0, 3.0], [1.0, 0.0]])
    return p, u, np.log(u.sum(1))


def test_exact_marginal_on_a_two_gene_model():
    """G = 2: p(u, x, eta) integrated on a 201 x 201 x 300 grid gives the exact posterior
    moments. The eta marginal (and E x) of the new posterior are within 0.01 posterior SD of them,
    the Gaussian Laplace posterior is off by 0.03-0.15 SD (fails this test)."""
    p, u, la = _tiny()
    g = newton_map(u, p, la)
    em = eta_marginal(u, g, la)
    mg, vg = g.eta_mean_var()
    mm, vm = em.eta_mean_var()
    x1 = np.linspace(p.mu[0] - 4.0, p.mu[0] + 4.5, 201)
    x2 = np.linspace(p.mu[1] - 4.5, p.mu[1] + 4.5, 201)
    X = np.stack(np.meshgrid(x1, x2, indexing="ij"), -1).reshape(-1, 2)
    for c in range(3):
        eg = np.linspace(0.0, em.nodes[c, -1] * 1.3, 300)
        lp = np.stack([log_joint(np.broadcast_to(u[c], X.shape), X, np.full(len(X), e), p,
                                 np.full(len(X), la[c])) for e in eg])
        P = np.exp(lp - lp.max())
        pe = P.sum(1) / np.trapezoid(P.sum(1), eg)
        me = np.trapezoid(eg * pe, eg)
        sde = math.sqrt(np.trapezoid((eg - me) ** 2 * pe, eg))
        w = P.sum(0) / P.sum()
        mx = w @ X
        sx = np.sqrt(w @ (X - mx) ** 2)
        assert abs(mm[c] - me) / sde < 0.01 and abs(math.sqrt(vm[c]) / sde - 1) < 0.01
        assert np.all(np.abs(em.mean_x()[c] - mx) / sx < 0.015)
        assert np.all(np.abs(em.sd_x()[c] / sx - 1) < 0.02)
        # the Gaussian Laplace posterior misses the skew (the mean sits at the mode)
        assert abs(mg[c] - me) / sde > 0.02 and np.max(np.abs(g.mean_x()[c] - mx) / sx) > 0.07


def test_window_widening_blocks_and_subset(small):
    p, u, la, g, em = small
    narrow = eta_marginal(u, g, la, width=(1.0, 1.0))  # ends far from negligible: must widen
    assert np.all(narrow.n_widen >= 1)
    lp = narrow.log_p_nodes
    assert np.all(lp.max(1) - lp[:, -1] > 9.0)
    np.testing.assert_allclose(narrow.eta_mean_var()[0], em.eta_mean_var()[0], atol=5e-3 * np.sqrt(em.eta_mean_var()[1]).min())
    np.testing.assert_allclose(narrow.log_evidence, em.log_evidence, atol=1e-3)
    blocked = eta_marginal(u, g, la, block_size=2)
    np.testing.assert_allclose(blocked.eta_mean_var()[0], em.eta_mean_var()[0], rtol=1e-12)
    np.testing.assert_allclose(blocked.sd_x(), em.sd_x(), rtol=1e-12)
    sub = em.subset([1, 3])
    np.testing.assert_allclose(sub.mean_x(), em.mean_x()[[1, 3]], rtol=1e-12)
    np.testing.assert_array_equal(sub.x_map, em.x_map[[1, 3]])
    # eta="map": the Gaussian posterior's conditional at the MAP, unchanged
    np.testing.assert_array_equal(em.sd_x("map"), g.sd_x("map"))
    x, e = em.sample(np.random.default_rng(0), 3, eta="map")
    np.testing.assert_array_equal(e, np.broadcast_to(g.eta_map, e.shape))


def test_log_evidence_close_to_gaussian_evidence_for_deep_cells():
    """For a well-sequenced cell the eta posterior is nearly Gaussian: log Z agrees with the
    Gaussian Laplace evidence (fit_laplace.laplace_objective) to 0.02 nats (a wrong constant
    such as 1/2 log 2 pi would be 0.92)."""
    from pln_ref.fit_laplace import laplace_objective

    p = pln_ref.random_params(8, 2, seed=9, capture=True, mean_log_rate=6.0)
    s = pln_ref.simulate(p, 4, seed=10, library_size=np.full(4, 20000.0))
    u, la = np.asarray(s.counts, float), np.asarray(s.log_anchor)
    g = newton_map(u, p, la)
    em = eta_marginal(u, g, la)
    lg, _ = laplace_objective(u, p, la, g, with_grad=False)
    np.testing.assert_allclose(em.log_evidence, lg, atol=2e-2)


def test_bad_input():
    p, u, la = _tiny()
    g = newton_map(u, p, la)
    with pytest.raises(ValueError, match="shape"):
        eta_marginal(u[:, :1], g, la)
    with pytest.raises(ValueError, match="n_nodes"):
        eta_marginal(u, g, la, n_nodes=3)
    p0 = PLNParams(p.mu, p.W, p.d, None)
    with pytest.raises(ValueError, match="needs capture"):
        eta_marginal(u, newton_map(u, p0), None)


def test_validation_cell_comparison_runs_the_new_family(small):
    """The validation harness fits and compares the eta-marginal family (draw metrics, PSIS k-hat,
    report rows for eta) beside the Gaussian one; reference draws here are the method's own
    (exact by construction), so every figure must sit at its nominal value."""
    from pln_ref.validation.gate import GateResult
    from pln_ref.validation.report import _cell_section, _headline
    from pln_ref.validation.runs import _fit_method, _method_block

    p, u, la, g, em = small
    idx = np.arange(u.shape[0])
    method, extra = _fit_method("laplace_eta_marginal", u, la, idx, p, 2, vae_steps=0, seed=0, progress=False)
    assert isinstance(method, EtaMarginalPosterior) and extra["converged"] == u.shape[0]
    ref_x, ref_e = method.sample(np.random.default_rng(11), 4000)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        res, figs = _method_block("laplace_eta_marginal", method, ref_x, ref_e, GateResult(True, [], []), u, p, la,
                                  Path(tmp), n_draws=4000, seed=0, lib=np.exp(la), force=False)
        assert all((Path(tmp) / f).exists() for f in figs)
    assert res["eta"]["std_mean_error"]["median_abs"] < 0.05
    assert 0.9 < res["eta"]["sd_ratio"]["min"] and res["eta"]["sd_ratio"]["max"] < 1.1
    # q against the exact density: usable in most cells (the mean-corrected x | eta raises the
    # k-hat estimate of low-count cells, measured 0.42-0.72 here against 0.06-0.39 for the Gaussian,
    # while the SD of the log ratios halves)
    assert len(res["khat"]) == 5 and res["psis"]["median"] < 0.7
    m = {"cell": {"design": {"G": 6, "k": 2, "n_cells": 5, "library_range": [30, 3000], "total_count_quantiles": [1, 2, 3],
                             "zero_fraction": 0.0, "nuts": {"chains": 4, "draws": 1000}},
                  "nuts": {"cells_passed": 5, "refits": 0, "seconds": 1.0, "cells_failed": []},
                  "methods": {"laplace_eta_marginal": dict(res, seconds=1.0)}}}
    text = "\n".join(_headline(m) + _cell_section(m["cell"]))
    assert "laplace_eta_marginal: median abs std. mean error (eta)" in text
    assert "laplace_eta_marginal: SD ratio range (eta)" in text


def test_x_star_derivatives_match_a_polynomial_fit_of_the_node_solves(small):
    """d^n x*/d eta^n at the joint mode (Bell-polynomial recursion) against the derivatives of a
    degree-10 polynomial fitted to x*(eta_hat + h t), t in [-1, 1] (17 tight x-Newton solves per cell)."""
    from pln_ref.eta_marginal import _x_star_derivatives

    p, u, la, g, em = small
    cov = LowRankCov.from_params(p)
    der = _x_star_derivatives(g, 4)
    np.testing.assert_allclose(der[0], g.b, rtol=1e-12)
    t = np.linspace(-1.0, 1.0, 17)
    for c in range(u.shape[0]):
        h = 0.5 / math.sqrt(g.s[c])
        etas = g.eta_map[c] + h * t
        x, *_ , conv = x_newton_fixed_eta(np.tile(u[c], (t.size, 1)), np.tile(g.x_map[c], (t.size, 1)), etas,
                                          p.mu, cov, tol=1e-26)
        coef = np.polynomial.polynomial.polyfit(t, x, 10)  # (11, G)
        for n in range(1, 5):
            fit = coef[n] * math.factorial(n) / h**n
            scale = np.abs(fit).max()
            assert np.max(np.abs(der[n - 1, c] - fit)) < 2e-3 * scale + 1e-6, (c, n)


def test_warm_start_order_changes_iterations_not_results():
    """The order-6 Taylor start leaves far fewer node Newton iterations than the order-2 start and
    the same posterior up to the decrement tolerance (node log densities within 2e-4, moments
    within 1e-4 posterior SD)."""
    from pln_ref.validation.design import simulate_cells

    params, sim = simulate_cells(20, 3, 300, seed=1)
    u, la = np.asarray(sim.counts, float), np.asarray(sim.log_anchor)
    g = newton_map(u, params, la)
    e6, e2 = eta_marginal(u, g, la), eta_marginal(u, g, la, warm_order=2)
    assert e6.converged.all() and e2.converged.all()
    assert e6.node_iter.mean() < 0.3 * e2.node_iter.mean()
    np.testing.assert_allclose(e6.log_p_nodes, e2.log_p_nodes, atol=2e-4)
    (m6, v6), (m2, _) = e6.eta_mean_var(), e2.eta_mean_var()
    assert np.max(np.abs(m6 - m2) / np.sqrt(v6)) < 1e-4
    assert np.max(np.abs(e6.mean_x() - e2.mean_x()) / e6.sd_x()) < 1e-4
    assert np.max(np.abs(e6.sd_x() / e2.sd_x() - 1)) < 1e-4
    with pytest.raises(ValueError, match="warm_order"):
        eta_marginal(u, g, la, warm_order=0)


def test_node_factorisation_is_the_one_at_the_returned_x(small):
    """Rows that iterate a different number of times: the returned A (lambda, S, S^{-1}, solves)
    is the factorisation at the final x of each row, not at an earlier iterate."""
    from pln_ref.lowrank import PosteriorPrecision

    p, u, la, g, em = small
    cov = LowRankCov.from_params(p)
    uu = np.repeat(u, 3, axis=0)
    etas = np.tile([0.2, 1.0, 3.0], u.shape[0])
    x0 = np.log(uu + 0.5) + etas[:, None]
    x0[::2] = np.log(uu[::2] + 0.5) + 2.0  # some rows start far off
    x, f, A, it, conv = x_newton_fixed_eta(uu, x0, etas, p.mu, cov, tol=1e-12)
    assert conv.all() and np.unique(it).size > 2
    lam = np.exp(x - etas[:, None])
    np.testing.assert_allclose(A.lam, lam, rtol=1e-12)
    fresh = PosteriorPrecision(cov, lam)
    np.testing.assert_allclose(A.S, fresh.S, rtol=1e-12)
    np.testing.assert_allclose(A.S_inv(), np.linalg.inv(fresh.S), rtol=1e-10, atol=1e-14)
    rhs = np.random.default_rng(0).standard_normal(x.shape)
    np.testing.assert_allclose(A.solve(rhs), fresh.solve(rhs), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(f, [float(v) for v in (np.sum(uu * (x - etas[:, None]) - lam, axis=1)
                                                      - 0.5 * cov.quad(x - p.mu))], rtol=1e-12)


def test_fine_density_is_the_spline_and_the_piecewise_exponential_masses():
    """_fine_density against scipy's not-a-knot CubicSpline evaluated directly and the segment
    masses h e^{l_i} expm1(d_i) / d_i summed and accumulated directly (flat, steep and nearly
    flat segments, chunked rows)."""
    from scipy.interpolate import CubicSpline

    from pln_ref.eta_marginal import _fine_density

    rng = np.random.default_rng(2)
    N, J, F = 300, 5, 257
    lo = rng.uniform(0.0, 2.0, N)
    nodes = lo[:, None] + np.linspace(0.0, 1.0, J)[None] * rng.uniform(0.1, 3.0, N)[:, None]
    logp = -0.5 * ((nodes - nodes.mean(1, keepdims=True)) / rng.uniform(0.05, 2.0, N)[:, None]) ** 2 + rng.normal(0, 50, N)[:, None]
    logp[0] = 7.0  # exactly flat: every d_i = 0
    grid, log_q, cdf, logZ = _fine_density(nodes, logp, F, rows=64)
    tf = np.linspace(0.0, 1.0, F)
    for c in range(N):
        lf = CubicSpline(np.linspace(0.0, 1.0, J), logp[c], bc_type="not-a-knot")(tf)
        gr = nodes[c, 0] + tf * (nodes[c, -1] - nodes[c, 0])
        d = np.diff(lf)
        ratio = np.where(np.abs(d) < 1e-12, 1.0, np.expm1(d) / np.where(d == 0, 1.0, d))
        mass = np.diff(gr) * np.exp(lf[:-1] - lf.max()) * ratio
        Z = lf.max() + math.log(mass.sum())
        np.testing.assert_allclose(grid[c], gr, rtol=1e-14, atol=1e-14)
        assert abs(logZ[c] - Z) < 1e-11 * max(1.0, abs(Z))
        np.testing.assert_allclose(log_q[c], lf - Z, atol=1e-10)
        np.testing.assert_allclose(cdf[c], np.concatenate([[0.0], np.cumsum(mass) / mass.sum()]), atol=1e-12)


def test_taylor_start_stops_before_growing_terms():
    """Far out on a widened window the Taylor series of x*(eta) can grow term by term: the start
    keeps the terms before the first one whose sup norm grows (checked against a direct per-row sum
    on nodes 5-20 SD from the mode, where 10-60% of the rows hit it), and the node solves from it
    converge."""
    from pln_ref.eta_marginal import _taylor_start, _x_star_derivatives
    from pln_ref.validation.design import simulate_cells

    params, sim = simulate_cells(20, 3, 50, seed=1)
    u, la = np.asarray(sim.counts, float), np.asarray(sim.log_anchor)
    g = newton_map(u, params, la)
    der = _x_star_derivatives(g, 6)
    cells = np.arange(u.shape[0])
    nodes = g.eta_map[:, None] + np.array([5.0, 10.0, 20.0])[None] / np.sqrt(g.s)[:, None]
    x0 = _taylor_start(g, der, cells, nodes).reshape(u.shape[0], 3, -1)
    cut = 0
    for c in cells:
        for j in range(3):
            D = nodes[c, j] - g.eta_map[c]
            terms = [der[n, c] * D ** (n + 1) / math.factorial(n + 1) for n in range(6)]
            norms = [np.abs(t).max() for t in terms]
            K = next((n for n in range(1, 6) if norms[n] > norms[n - 1]), 6)
            cut += K < 6
            np.testing.assert_allclose(x0[c, j], g.x_map[c] + sum(terms[:K]), rtol=1e-12, atol=1e-12)
    assert cut >= 10
    wide = eta_marginal(u, g, la, width=(20.0, 20.0))
    assert wide.node_converged.all()


def test_mean_and_skew_of_x_given_eta_against_two_dimensional_quadrature():
    """G = 2, eta fixed at a node: the exact p(x | u, eta) against the
    conditional q(x | eta) on a 241 x 251 grid. The mean correction delta = -1/2 A^{-1} (lambda o diag A^{-1}) puts the
    mean within 0.005 SD (at the mode x*(eta) it is 0.07-0.17 SD off); the skew transform
    (skew=True) is a normalised density with the same mean whose skewness is within 0.02 of the
    exact -0.08 to -0.29 (the Gaussian's is 0)."""
    p, u, la = _tiny()
    g = newton_map(u, p, la)
    ems, em0 = eta_marginal(u, g, la, skew=True), eta_marginal(u, g, la, skew=False)
    x1 = np.linspace(p.mu[0] - 5.0, p.mu[0] + 4.0, 241)
    x2 = np.linspace(p.mu[1] - 5.5, p.mu[1] + 4.0, 251)
    X = np.stack(np.meshgrid(x1, x2, indexing="ij"), -1).reshape(-1, 2)
    dA = (x1[1] - x1[0]) * (x2[1] - x2[0])

    def moments(w):
        w = w / w.sum()
        m = w @ X
        v = w @ (X - m) ** 2
        return m, np.sqrt(v), (w @ (X - m) ** 3) / v ** 1.5

    for c in range(3):
        j = 2
        eta0 = ems.nodes[c, j]
        lp = log_joint(np.broadcast_to(u[c], X.shape), X, np.full(len(X), eta0), p, np.full(len(X), la[c]))
        me, se, ke = moments(np.exp(lp - lp.max()))
        assert np.all(ke < -0.05)
        # the mode x*(eta_j) vs the corrected mean
        assert np.max(np.abs(ems.x_nodes[c, j] - me) / se) > 0.06
        assert np.all(np.abs(ems.x_nodes[c, j] + ems.shift_nodes[c, j] - me) / se < 0.005)
        arg_e = np.full((len(X), 1), eta0)
        for em, skewed in ((ems.subset([c]), True), (em0.subset([c]), False)):
            lq = em.logpdf(X[:, None, :], arg_e)[:, 0] - em.eta_logpdf(arg_e[:1])[0, 0]
            q = np.exp(lq)
            assert abs(q.sum() * dA - 1) < 2e-3
            mq, sq, kq = moments(q)
            assert np.all(np.abs(mq - me) / se < 0.005) and np.all(np.abs(sq / se - 1) < 0.02)
            if skewed:
                assert np.all(np.abs(kq - ke) < 0.02)
            else:
                assert np.all(np.abs(kq) < 1e-3)  # symmetric up to the grid


def test_skew_moments_and_draws_against_dense_algebra(small):
    """kappa3 = -sum_a lambda_a (A^{-1})_ga^3 and the variance the transform adds,
    1/18 sum_ab h_ga h_gb (A^{-1})_ab^2 (h = A^{-1} diag lambda), from the low-rank algebra against
    dense G x G; draws with skew=True match the reported moments (mean, SD incl. the added variance,
    E e^x to third order) and the transform's third cumulant; logpdf is finite at the draws."""
    from pln_ref.eta_marginal import _skew_moments

    p, u, la, g, _ = small
    em = eta_marginal(u, g, la, skew=True)
    N, J, G = em.x_nodes.shape
    k3, vq = em._skew_nodes()
    Si = np.linalg.inv(p.sigma_dense())
    for c in range(N):
        for j in (0, J // 2, J - 1):
            lam = em.lam_nodes[c, j]
            SA = np.linalg.inv(Si + np.diag(lam))
            h = SA * lam[None, :]
            np.testing.assert_allclose(k3[c, j], -(SA ** 3) @ lam, rtol=1e-9, atol=1e-15)
            np.testing.assert_allclose(vq[c, j], np.einsum("ga,gb,ab->g", h, h, SA ** 2) / 18, rtol=1e-9, atol=1e-15)
    # the low-rank part matters: a 1% error in S^{-1} shows beyond the tolerance used above
    k3b, _ = _skew_moments(em._cov(), em.lam_nodes[:, 0], em._S_inv_nodes()[:, 0] * 1.01)
    assert not np.allclose(k3b, k3[:, 0], rtol=1e-6)
    # blocks of rows (one row per block here) give the all-rows result
    lam2, C2 = em.lam_nodes.reshape(N * J, G), em._S_inv_nodes().reshape(N * J, *em.S_nodes.shape[-2:])
    k3c, vqc = _skew_moments(em._cov(), lam2, C2, max_entries=1)
    np.testing.assert_allclose(k3c, k3.reshape(N * J, G), rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(vqc, vq.reshape(N * J, G), rtol=1e-13, atol=1e-300)
    S = 100000
    x, e = em.sample(np.random.default_rng(3), S)
    mx, sx = em.mean_x(), em.sd_x()
    assert np.all(np.abs(x.mean(0) - mx) < 4.5 * sx / math.sqrt(S))
    np.testing.assert_allclose(x.std(0), sx, rtol=0.012)
    np.testing.assert_allclose(np.exp(x).mean(0), em.expected_exp_x(), rtol=0.02)
    assert np.all(np.isfinite(em.logpdf(x[:50], e[:50])))
    sub = em.subset([1, 3])
    assert sub.skew and np.allclose(sub.sd_x(), sx[[1, 3]])


def test_sparse_counts_read_by_blocks_equal_the_dense_path(monkeypatch):
    """CSR counts (and a CountMatrix of them) give the dense input's posterior to 1e-12, reading at
    most ``block_size`` cells of dense counts at a time (no N x G dense copy of the counts)."""
    import scipy.sparse as sp

    from pln_ref.counts import CountMatrix

    p = pln_ref.random_params(12, 2, seed=5, capture=True)
    s = pln_ref.simulate(p, 30, seed=6)
    u, la = np.asarray(s.counts, float), np.asarray(s.log_anchor)
    g = newton_map(u, p, la)
    ref = eta_marginal(u, g, la, block_size=7)
    widest = []
    block = CountMatrix.block
    monkeypatch.setattr(CountMatrix, "block", lambda self, lo, hi: widest.append(hi - lo) or block(self, lo, hi))
    monkeypatch.setattr(CountMatrix, "toarray", lambda self: pytest.fail("counts densified whole"))
    for counts in (sp.csr_matrix(u), CountMatrix(sp.csr_array(u))):
        widest.clear()
        em = eta_marginal(counts, g, la, block_size=7)
        assert max(widest) == 7 and sum(widest) == u.shape[0]
        for name, a in ref.arrays().items():
            np.testing.assert_allclose(em.arrays()[name], a, rtol=1e-12, atol=1e-12, err_msg=name)
    with pytest.raises(ValueError, match="non-integer"):
        eta_marginal(u + 0.5, g, la)
