"""``validation/benchmarks/outer_probe.py``: its Hessian-vector products are the columns of the
finite-difference Hessian of ``outer_hessian.py``, and its generalised Rayleigh quotient is
v^T H v / v^T H0^{-1} v (1 when H0 is the inverse of H itself)."""

import numpy as np

import pln_ref
from pln_ref.outer import lbfgs
from pln_ref.outer.evaluate import Evaluator


def test_probe_hvp_and_rayleigh_quotient(bench_script):
    G, k, N = 4, 2, 40
    truth = pln_ref.random_params(G, k, seed=3, capture=True, mean_log_rate=1.5)
    sim = pln_ref.simulate(truth, N, seed=4)
    u, la = sim.counts.astype(float), sim.log_anchor
    params = pln_ref.PLNParams(truth.mu + 0.1, truth.W * 0.9, truth.d + 0.05, truth.capture)
    z = lbfgs.to_z(params.mu, params.W, params.d)
    P, h = len(z), 1e-4
    probe, hess = bench_script("outer_probe"), bench_script("outer_hessian")
    ev = Evaluator(u, la, truth.capture)
    fg = lbfgs._negated_objective(ev, G, k, {"failed": 0}, 1e-10)
    hvp = probe.make_hvp(fg, z, ev, h, tol=1e-10)
    H, _ = hess.fd_hessian(fg, z, h, tol=1e-10)
    rng = np.random.default_rng(0)
    for v in (np.eye(P)[1], np.eye(P)[G + 1], rng.normal(size=P)):
        np.testing.assert_allclose(hvp(v), H @ v, rtol=0, atol=1e-5 * np.abs(H).max() * np.abs(v).max() * P)
    v = rng.normal(size=P)
    assert abs(probe.rayleigh_quotient(hvp, lambda q: q, v) - (v @ H @ v) / (v @ v)) <= 1e-4 * abs(v @ H @ v) / (v @ v)
    Hinv = np.linalg.inv(H)  # H0 = H^{-1}: every direction has rho = 1
    assert abs(probe.rayleigh_quotient(hvp, lambda q: Hinv @ q, v) - 1.0) < 1e-3
