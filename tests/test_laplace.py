"""Per-cell Newton: step = dense solve, MAP = L-BFGS-B, bound handling, extremes, draws."""

import numpy as np
import pytest
from scipy.optimize import minimize

import pln_ref
from pln_ref import Capture, PLNParams
from pln_ref.laplace import newton_map
from pln_ref.model import grad_log_joint, log_joint, neg_hessian


def _setup(seed=0, G=10, k=2, N=30, M0=2000.0):
    rng = np.random.default_rng(seed)
    p = PLNParams(rng.normal(1, 1, G), rng.normal(size=(G, k)) * 0.5, rng.uniform(0.1, 0.5, G),
                  Capture(M0, 0.5))
    la = np.log(rng.uniform(100, 5000, N))
    x = p.mu + rng.normal(size=(N, k)) @ p.W.T + np.sqrt(p.d) * rng.normal(size=(N, G))
    eta = np.abs(rng.normal(np.log(M0) - la, 0.5))
    u = rng.poisson(np.exp(x - eta[:, None])).astype(float)
    return rng, p, u, la


def test_newton_step_equals_dense_solve():
    """The Schur/Woodbury step (delta_x, delta_eta) equals (-H)^{-1} g solved densely."""
    rng, p, u, la = _setup(G=8, N=5)
    x = np.log(u + 0.5) + 1.0
    eta = np.full(5, 1.0)
    gx, ge = grad_log_joint(u, x, eta, p, la)
    H = neg_hessian(x, eta, p)
    b, s = H.schur()
    a = H.A.solve(gx)
    deta = (ge + np.einsum("ng,ng->n", H.lam, a)) / s
    dx = a + b * deta[:, None]
    dense = np.linalg.solve(H.dense(), np.concatenate([gx, ge[:, None]], axis=1)[..., None])[..., 0]
    np.testing.assert_allclose(np.concatenate([dx, deta[:, None]], axis=1), dense, rtol=1e-10, atol=1e-12)


def test_map_equals_lbfgsb():
    """Every cell's MAP matches scipy L-BFGS-B (bounded eta >= 0) to 1e-6, bound cells included."""
    rng, p, u, la = _setup(seed=1, G=10, N=30, M0=2000.0)
    p = p.with_capture(Capture(400.0, 0.5))  # prior puts many cells' MAP on eta = 0
    post = newton_map(u, p, la, gtol=1e-10)
    assert post.converged.all()
    assert post.on_bound.sum() >= 3  # the bound is exercised
    G = p.G
    for c in range(u.shape[0]):
        def f(z):
            return -log_joint(u[c:c + 1], z[None, :G], z[G:], p, la[c:c + 1])[0]

        def g(z):
            gx, ge = grad_log_joint(u[c:c + 1], z[None, :G], z[G:], p, la[c:c + 1])
            return -np.concatenate([gx[0], ge])

        z0 = np.concatenate([np.log(u[c] + 0.5), [1.0]])
        r = minimize(f, z0, jac=g, method="L-BFGS-B", bounds=[(None, None)] * G + [(0, None)],
                     options={"ftol": 1e-16, "gtol": 1e-11, "maxiter": 20000, "maxcor": 50})
        np.testing.assert_allclose(r.x[:G], post.x_map[c], atol=1e-6)
        assert abs(r.x[G] - post.eta_map[c]) < 1e-6
        assert f(r.x) >= f(np.concatenate([post.x_map[c], [post.eta_map[c]]])) - 1e-9


def test_extremes_no_nan():
    """Counts up to 1e7, all-zero cells, and a cold start far away: finite MAPs, all converged."""
    rng, p, u, la = _setup(seed=2, G=12, N=6)
    u[0] = 0.0
    u[1, 3] = 1e7
    u[2, :] = 1e6
    post = newton_map(u, p, la)
    assert np.all(np.isfinite(post.x_map)) and np.all(np.isfinite(post.eta_map))
    assert post.converged.all(), post.grad_norm
    assert post.grad_norm.max() <= 1e-6
    # far-away start (exp overflow on the first trial steps) still converges to the same MAP
    post2 = newton_map(u, p, la, x0=post.x_map + 30.0, eta0=post.eta_map)
    assert post2.converged.all()
    np.testing.assert_allclose(post2.x_map, post.x_map, atol=1e-7)


def test_no_capture_newton():
    rng, p, u, la = _setup(seed=3, G=6, N=8)
    p0 = p.with_capture(None)
    post = newton_map(u, p0)
    gx, _ = grad_log_joint(u, post.x_map, None, p0)
    assert np.abs(gx).max() <= 1e-6
    assert np.all(post.eta_map == 0)


def test_laplace_draws_match_dense_covariance():
    """Joint (x, eta) draws (eta free, interior cells) have covariance (-H)^{-1} (MC, 5 SE)."""
    rng, p, u, la = _setup(seed=4, G=5, N=3, M0=50000.0)
    post = newton_map(u, p, la)
    assert not post.on_bound.any()
    n = 80_000
    x, e = post.sample(rng, n)
    z = np.concatenate([x, e[..., None]], axis=-1) - np.concatenate([post.x_map, post.eta_map[:, None]], axis=1)
    C_mc = np.einsum("sni,snj->nij", z, z) / n
    C = np.linalg.inv(neg_hessian(post.x_map, post.eta_map, p).dense())
    dg = np.diagonal(C, 0, 1, 2)
    se = np.sqrt((C**2 + dg[:, :, None] * dg[:, None, :]) / n)
    assert (np.abs(C_mc - C) / se).max() < 5.0
    # the eta marginal is N(eta_hat, 1/s) cut at 0 (scipy's truncnorm as the independent reference)
    from scipy.stats import multivariate_normal, norm, truncnorm

    sd_e = np.sqrt(dg[:, -1])
    var_t = truncnorm.var(-post.eta_map / sd_e, np.inf, loc=post.eta_map, scale=sd_e)
    b = post.b
    np.testing.assert_allclose(post.sd_x(), np.sqrt(dg[:, :-1] - b**2 * (dg[:, -1:] - var_t[:, None])), rtol=1e-10)
    np.testing.assert_allclose(post.sd_x(), np.sqrt(dg[:, :-1]), rtol=1e-5)  # truncation is tiny here
    # logpdf: the dense Gaussian density renormalised over eta >= 0
    ref = [multivariate_normal(np.concatenate([post.x_map[c], [post.eta_map[c]]]), C[c]).logpdf(z[:5, c] + np.concatenate([post.x_map[c], [post.eta_map[c]]]))
           - norm.logcdf(post.eta_map[c] / sd_e[c]) for c in range(3)]
    np.testing.assert_allclose(post.logpdf(x[:5], e[:5]), np.array(ref).T, rtol=1e-9)


def test_bound_cells_truncated_eta():
    """eta draws are >= 0 for every cell (on the bound and inside near it) and follow the truncated
    Gaussian whose moments eta_mean_var gives."""
    rng, p, u, la = _setup(seed=5, G=8, N=40, M0=200.0)
    post = newton_map(u, p, la)
    ob = np.flatnonzero(post.on_bound)
    assert ob.size > 0
    assert np.all(post.delta[ob] <= 1e-6)
    # delta = (g_eta + lambda^T A^{-1} g_x) / s at (x_map, 0), against the dense A and
    # model.cell_gradient; with a loose Newton tolerance g_x is not small, so its term counts
    from pln_ref.lowrank import LowRankCov
    from pln_ref.model import cell_gradient

    loose = newton_map(u, p, la, gtol=0.3)
    lb = np.flatnonzero(loose.on_bound)
    assert lb.size > 0
    zero = np.zeros(lb.size)
    gx, ge, lam = cell_gradient(u[lb], loose.x_map[lb], zero, p.mu, LowRankCov.from_params(p),
                                p.capture.prior_mean(la)[lb], p.capture.sigma_M)
    a = np.linalg.solve(neg_hessian(loose.x_map[lb], zero, p).A.dense(), gx[..., None])[..., 0]
    term_x = np.einsum("ng,ng->n", lam, a)
    assert np.max(np.abs(term_x)) > 1e-3 * np.max(np.abs(ge))
    np.testing.assert_allclose(loose.delta[lb], (ge + term_x) / loose.s[lb], rtol=1e-7, atol=1e-10)
    near = ~post.on_bound & (post.eta_map * np.sqrt(post.s) < 2.0)  # interior, truncation matters
    assert near.any()
    x, e = post.sample(rng, 20000)
    assert np.all(e >= 0)
    mean, var = post.eta_mean_var()
    se = np.sqrt(var / 20000)
    assert np.all(np.abs(e.mean(axis=0) - mean) < 5 * se)
    assert np.all(np.abs(e.var(axis=0) / var - 1) < 0.06)
    assert np.all(mean[near] > post.eta_map[near])  # the cut at 0 moves the mean up
    assert np.all(np.isfinite(post.logpdf(x[:10], e[:10])))


def test_bridgestan_gradient_mode_same_map():
    """The BridgeStan gradient of stan/pln_cell.stan reaches the NumPy-mode MAP to 1e-8."""
    pytest.importorskip("bridgestan")
    from pln_ref.validation.engines import BridgeStanCellGradient

    rng, p, u, la = _setup(seed=6, G=6, N=4, M0=800.0)
    a = newton_map(u, p, la, gtol=1e-9)
    b = newton_map(u, p, la, gtol=1e-9, gradient=BridgeStanCellGradient(u, p, la))
    assert b.converged.all()
    np.testing.assert_allclose(b.x_map, a.x_map, atol=1e-8)
    np.testing.assert_allclose(b.eta_map, a.eta_map, atol=1e-8)


def test_bad_input():
    rng, p, u, la = _setup(G=5, N=3)
    with pytest.raises(ValueError, match="shape"):
        newton_map(u[:, :4], p, la)
    bad = u.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite and non-negative"):
        newton_map(bad, p, la)
    with pytest.raises(ValueError, match="gradient must be"):
        newton_map(u, p, la, gradient="torch")
    z = u.copy()
    z[1] = 0
    with pytest.raises(ValueError, match="zero library size"):
        newton_map(z, p)


def test_blocks_are_exact():
    """Processing cells in blocks (bounded memory) gives the same posteriors as one block."""
    rng, p, u, la = _setup(seed=7, G=9, N=23)
    a = newton_map(u, p, la)
    b = newton_map(u, p, la, block_size=5)
    for name in ("x_map", "eta_map", "objective", "s", "bbar", "delta", "on_bound"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b.sd_x(), a.sd_x(), rtol=1e-12)
    with pytest.raises(ValueError, match="log_anchor must have shape"):
        newton_map(u, p, la[:-1], block_size=5)


def _direction_case(seed, eta, *, shift, noise):
    """``_newton_direction`` at x = log(u + 1/2) + shift + noise N(0, 1), G = 9, N = len(eta) (the
    NumPy gradient pieces of ``_point``), with the dense (-H) and its full Newton step:
    (params, direction, g_x, g_eta, H, g (N, G + 1, 1), (-H)^{-1} g (N, G + 1))."""
    from pln_ref.laplace import _newton_direction, _point
    from pln_ref.lowrank import LowRankCov

    N = len(eta)
    rng, p, u, la = _setup(seed=seed, G=9, N=N)
    cov = LowRankCov.from_params(p)
    x = np.log(u + 0.5) + shift + noise * rng.normal(size=u.shape)
    m = p.capture.prior_mean(la)
    _, gx, ge, lam = _point(u, u.sum(axis=1), x, eta, p.mu, cov, m, p.capture.sigma_M)
    dr = _newton_direction(u, x, eta, m, p.mu, cov, p.capture.sigma_M, None, np.arange(N), (gx, ge, lam))
    H = neg_hessian(x, eta, p)
    g = np.concatenate([gx, ge[:, None]], axis=1)[..., None]
    return p, dr, gx, ge, H, g, np.linalg.solve(H.dense(), g)[..., 0]


def test_newton_direction_equals_dense_and_schur():
    """``_newton_direction`` (eta pieces from k-vectors, bbar formed on demand) gives the dense
    (-H)^{-1} g step, s = the Schur complement and bbar = A^{-1} Sigma^{-1} 1 of ``eta_schur``."""
    from pln_ref.model import eta_schur

    p, dr, gx, ge, H, g, dense = _direction_case(3, np.full(6, 1.0), shift=1.0, noise=0.1)
    np.testing.assert_allclose(np.concatenate([dr.step(), dr.deta[:, None]], axis=1), dense, rtol=1e-10, atol=1e-12)
    # the decrement from k-vectors equals g^T (-H)^{-1} g, and the step of a subset of rows is
    # the same rows of the whole step
    np.testing.assert_allclose(dr.dec2, np.einsum("nj,nj->n", g[..., 0], dense), rtol=1e-10)
    for rows in (np.array([True, False, True, True, False, False]),  # formed on the rows
                 np.array([True, True, True, False, True, True])):  # > 80%: all rows, then gathered
        np.testing.assert_allclose(dr.step(rows), dr.step()[rows], rtol=1e-13, atol=1e-15)
    ref = eta_schur(H.A, 1.0 / p.capture.sigma_M**2)
    np.testing.assert_allclose(dr.s, ref.s, rtol=1e-12)
    np.testing.assert_allclose(dr.bbar_rows(slice(None)), ref.bbar, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(dr.bbar_rows(np.array([4, 1])), ref.bbar[[4, 1]], rtol=1e-10, atol=1e-13)


def test_newton_direction_on_the_bound_takes_the_x_step_and_its_decrement():
    """Cells at eta = 0 whose free eta step points outward take the x-only step a = A^{-1} g_x with
    delta_eta = -eta, and their decrement is g_x^T a + g_eta delta_eta; the others the full step."""
    from pln_ref.laplace import _EPS_BOUND

    eta = np.where(np.arange(8) % 2 == 0, 0.0, 1.0)
    _, dr, gx, ge, H, g, free = _direction_case(5, eta, shift=0.0, noise=0.5)
    a = np.linalg.solve(H.A.dense(), gx[..., None])[..., 0]
    held = (eta <= _EPS_BOUND) & (free[:, -1] <= 0)
    assert held.any() and (~held).any()
    dx_ref = np.where(held[:, None], a, free[:, :-1])
    deta_ref = np.where(held, -eta, free[:, -1])
    np.testing.assert_allclose(dr.step(), dx_ref, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dr.deta, deta_ref, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dr.dec2, np.einsum("ng,ng->n", gx, dx_ref) + ge * deta_ref, rtol=1e-9)


def test_line_search_without_acceptable_step_stops_the_cell(monkeypatch):
    """A cell whose f cannot resolve the Newton gain (no step passes Armijo) is reported as
    "roundoff" after one search instead of repeating it up to max_iter; the others converge."""
    import pln_ref.laplace as L

    _, p, u, la = _setup(seed=4, G=10, N=8)
    real = L._fused_line_search
    calls = {"n": 0}

    def failing(prob, usum):  # cell 0 finds no acceptable step in any search it is part of
        calls["n"] += 1
        rows = np.flatnonzero((prob.u == u[0]).all(axis=1))
        if rows.size == 0:
            return real(prob, usum)
        i = rows[0]
        prob = prob._replace(f0=prob.f0.copy(), dec2=prob.dec2.copy())
        prob.f0[i], prob.dec2[i] = 1e300, 1.0  # unattainable: the Armijo test fails at every t
        out = real(prob, usum)
        assert out[4][i] and np.array_equal(out[0][i], prob.x[i])  # stays put, flagged
        _, gxi, _, _ = L._point(prob.u[i:i + 1], usum[i:i + 1], prob.x[i:i + 1], prob.eta[i:i + 1],
                                prob.mu, prob.cov, prob.m[i:i + 1], prob.sigma_M)
        np.testing.assert_allclose(out[3][0][i], gxi[0])  # its gradient is the one at its iterate
        return out

    monkeypatch.setattr(L, "_fused_line_search", failing)
    post = newton_map(u, p, la, gtol=1e-8, max_iter=50)
    assert post.converged_by[0] == "roundoff" and post.n_iter[0] == 1 and not post.converged[0]
    assert post.converged[1:].all()  # the other cells are unaffected
    ref = newton_map(u[1:], p, la[1:], gtol=1e-8)
    np.testing.assert_allclose(post.x_map[1:], ref.x_map, atol=1e-7)


def test_decrement_stop_is_close_to_the_map_and_says_so():
    """With dec_tol, a cell stops at squared Newton decrement <= dec_tol: its f is within about
    dec_tol / 2 of the maximum (checked against a tight solve), it is converged by "decrement",
    and a warm start one step from the MAP takes at most one iteration; dec_tol=None is unchanged."""
    rng, p, u, la = _setup(seed=3, G=12, N=40)
    tight = newton_map(u, p, la, gtol=1e-11)
    assert tight.converged.all()
    loose = newton_map(u, p, la, gtol=1e-11, dec_tol=1e-6)
    assert loose.converged.all()
    assert np.isin(loose.converged_by, ["gradient", "decrement"]).all()
    assert (loose.converged_by == "decrement").sum() >= 10
    gap = tight.objective - loose.objective
    assert gap.min() > -1e-10 and gap.max() <= 1e-6  # f within dec_tol of the max (dec^2 / 2 to 2nd order)
    assert loose.n_iter.sum() < tight.n_iter.sum()
    # the gradient alone would still have held some of these cells
    assert (loose.grad_norm > 1e-8).any()
    # from a nearby warm start: the decrement stops every cell after at most one iteration
    x0 = tight.x_map + 1e-4 * rng.normal(size=tight.x_map.shape)
    warm = newton_map(u, p, la, x0=x0, eta0=tight.eta_map, gtol=1e-11, dec_tol=1e-6)
    assert warm.converged.all() and warm.n_iter.max() <= 1
    assert (tight.objective - warm.objective).max() <= 1e-6
    same = newton_map(u, p, la, gtol=1e-11, dec_tol=None)
    np.testing.assert_array_equal(same.x_map, tight.x_map)


def test_newton_stops_at_the_rounding_noise_of_a_heywood_gene():
    """A gene with d at the floor (1e-6) makes Sigma^{-1} ~ 1e6 amplify the rounding of x - mu, so
    the gradient cannot reach gtol 1e-9 (without the stall rule: 37 iterations per cell on average
    here and 4 cells at max_iter = 200). Cells stop as "roundoff" after a few iterations instead,
    at the same objective as a gtol 1e-6 solve to within its rounding (1e-7 here)."""
    p = pln_ref.random_params(40, 2, seed=5, capture=True, mean_log_rate=1.75, sigma_M=0.5)
    d = p.d.copy()
    d[3] = 1e-6
    p = pln_ref.PLNParams(p.mu, p.W, d, p.capture)
    u = pln_ref.simulate(p, 200, seed=6).counts.astype(float)
    tight = newton_map(u, p, None, gtol=1e-9)
    loose = newton_map(u, p, None, gtol=1e-6)
    assert not np.any(tight.converged_by == "max_iter")
    assert tight.n_iter.max() <= 12
    assert set(np.unique(tight.converged_by)) <= {"gradient", "roundoff"}
    np.testing.assert_allclose(tight.objective, loose.objective, rtol=0, atol=1e-6)
    np.testing.assert_allclose(tight.x_map, loose.x_map, rtol=0, atol=1e-5)
