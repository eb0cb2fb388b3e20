"""pln_ref.outer.precondition: the Fisher H0 of the outer L-BFGS equals its dense formula, is
symmetric positive definite, and the fit it drives reaches the same optimum as the diagonal H0."""

import functools

import numpy as np
import pytest

import pln_ref
import pln_ref.fit_laplace as fit_laplace
from pln_ref import truncnorm
from pln_ref.fit_laplace import optimize_globals
from pln_ref.outer.evaluate import Evaluator
from pln_ref.outer.lbfgs import run_lbfgs
from pln_ref.outer.precondition import FisherPreconditioner, effective_rate, eta_prior_variance
from pln_ref.outer.start import initial_globals


def _operator(G=7, k=3, seed=0, eta_var=0.2):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(G, k))
    d = rng.uniform(0.05, 1.0, G)
    lam = rng.uniform(0.1, 20.0, G)
    s_curv = rng.uniform(0.5, 2.0, G)
    return W, d, lam, s_curv, FisherPreconditioner(W, d, lam, eta_var, s_curv)


def test_fisher_preconditioner_equals_its_dense_formula():
    """H0 q_mu = C q_mu, H0 Q_W = C Q_W (K + delta tr(K)/k I)^{-1}, H0 q_s = q_s / curvature, with
    C = W W^T + v 1 1^T + diag(d + 1/lambdatilde) and K = W^T C^{-1} W, against dense algebra."""
    G, k, v = 7, 3, 0.2
    W, d, lam, s_inv, P = _operator(G, k, eta_var=v)
    C = W @ W.T + v * np.ones((G, G)) + np.diag(d + 1.0 / lam)
    K = W.T @ np.linalg.solve(C, W)
    Kd = K + 1e-3 * np.trace(K) / k * np.eye(k)
    rng = np.random.default_rng(1)
    q = rng.normal(size=G * (k + 2))
    out = P(q)
    np.testing.assert_allclose(out[:G], C @ q[:G], rtol=1e-12)
    np.testing.assert_allclose(out[G:G + G * k].reshape(G, k), C @ q[G:G + G * k].reshape(G, k) @ np.linalg.inv(Kd),
                               rtol=1e-10)
    np.testing.assert_allclose(out[G + G * k:], s_inv * q[G + G * k:], rtol=1e-12)


@pytest.mark.parametrize("eta_var", [0.0, 0.25])
def test_fisher_preconditioner_is_symmetric_positive_definite(eta_var):
    G, k = 6, 2
    *_, P = _operator(G, k, seed=3, eta_var=eta_var)
    M = np.column_stack([P(e) for e in np.eye(G * (k + 2))])
    np.testing.assert_allclose(M, M.T, rtol=1e-10, atol=1e-12)
    assert np.linalg.eigvalsh(0.5 * (M + M.T)).min() > 0


def test_eta_prior_variance_is_the_mean_truncated_prior_variance():
    p = pln_ref.random_params(5, 1, seed=0, capture=True)
    la = np.log(np.array([50.0, 500.0, 5000.0]))
    v = eta_prior_variance(p.capture, la)
    assert v == pytest.approx(np.mean(truncnorm.variance(p.capture.prior_mean(la), p.capture.sigma_M)))
    assert 0 < v < p.capture.sigma_M ** 2  # truncation at 0 shrinks the variance
    assert eta_prior_variance(None, la) == 0.0


def test_fisher_and_diagonal_h0_reach_the_same_optimum(monkeypatch):
    """Both H0 drive L-BFGS to the same evidence (within 2e-4 nats/cell; each certificate's
    tolerance is 1e-4)."""
    p = pln_ref.random_params(15, 3, seed=11, capture=True, mean_log_rate=1.5)
    sim = pln_ref.simulate(p, 700, seed=12)
    u, la = sim.counts.astype(float), sim.log_anchor
    init = initial_globals(u, 3, p.capture, la).params
    out = {}
    for kind in ("fisher", "diagonal"):
        monkeypatch.setattr(fit_laplace, "run_lbfgs", functools.partial(run_lbfgs, precondition=kind))
        st, q = optimize_globals(u, init, la, progress=False)
        out[kind] = (st, q)
        assert st.stop_rule in ("certificate", "gradient")
    ev = Evaluator(u, la, p.capture)
    vals = {k: ev(q.mu, q.W, q.d, gtol=1e-9, with_grad=False).value for k, (_, q) in out.items()}
    print(f"steps: fisher {out['fisher'][0].step}, diagonal {out['diagonal'][0].step}; values {vals}")
    assert abs(vals["fisher"] - vals["diagonal"]) < 2e-4


def test_run_lbfgs_refuses_an_unknown_preconditioner():
    p = pln_ref.random_params(5, 1, seed=0, capture=True)
    sim = pln_ref.simulate(p, 50, seed=1)
    ev = Evaluator(sim.counts.astype(float), sim.log_anchor, p.capture)
    with pytest.raises(ValueError, match="precondition must be"):
        run_lbfgs(ev, None, n_steps=1, gtol=1e-6, rule=None, precondition="newton")


def test_effective_rate_gives_each_gene_its_mean_information():
    """1 / (Sigma_gg + 1 / lambdatilde_g) = mean_c lambda_cg / (1 + lambda_cg Sigma_gg); equal rates in
    every cell give lambdatilde = lambda; rates that vary between cells give less than their mean
    (the information is concave in lambda)."""
    rng = np.random.default_rng(4)
    N, G = 300, 6
    sgg = rng.uniform(0.2, 30.0, G)
    lam = np.exp(rng.normal(-2.0, 2.5, size=(N, G)))  # sparse, heavy-tailed genes
    m = np.mean(lam / (1.0 + lam * sgg), axis=0)
    rate = effective_rate(m, sgg)
    np.testing.assert_allclose(1.0 / (sgg + 1.0 / rate), m, rtol=1e-10)
    assert np.all(rate < lam.mean(axis=0))
    const = np.full((N, G), 3.7)
    np.testing.assert_allclose(effective_rate(np.mean(const / (1.0 + const * sgg), axis=0), sgg), 3.7, rtol=1e-9)


def test_laplace_terms_rate_info_is_the_summed_information_at_the_maps():
    p = pln_ref.random_params(9, 2, seed=5, capture=True)
    sim = pln_ref.simulate(p, 40, seed=6)
    ev = Evaluator(sim.counts.astype(float), sim.log_anchor, p.capture)
    e = ev(p.mu, p.W, p.d)
    lam = e.post.precision.lam
    sgg = np.einsum("ga,ga->g", p.W, p.W) + p.d
    np.testing.assert_allclose(e.terms.rate_info, np.sum(lam / (1.0 + lam * sgg), axis=0), rtol=1e-12)
