"""``validation/benchmarks/capture_gauge.py``: the gauge split recovers a known shift
mu + a 1, W + 1 b^T behind a rotation, and its per-cell evidence is the evaluator's objective."""

import numpy as np

import pln_ref
from pln_ref.outer.evaluate import Evaluator


def test_gauge_components_recovers_shift_behind_rotation(bench_script):
    cg = bench_script("capture_gauge")
    rng = np.random.default_rng(5)
    G, k = 30, 3
    W_ref = rng.normal(size=(G, k))
    W_ref -= W_ref.mean(axis=0)  # 1^T W_ref = 0: the rotation that aligns is then exactly Q0
    mu_ref = rng.normal(size=G)
    Q0, _ = np.linalg.qr(rng.normal(size=(k, k)))
    a, b = 0.3, np.array([0.2, -0.1, 0.05])
    rest_mu = rng.normal(scale=1e-2, size=G)
    rest_mu -= rest_mu.mean()
    mu_fit = mu_ref + a + rest_mu
    W_fit = (W_ref + b[None, :]) @ Q0.T
    out = cg.gauge_components(mu_fit, W_fit, mu_ref, W_ref)
    assert abs(out["a"] - a) < 1e-12
    np.testing.assert_allclose(out["b"], b, atol=1e-12)
    np.testing.assert_allclose(out["Q"], Q0, atol=1e-10)
    assert out["W_rms_rest"] < 1e-12 < out["W_rms"]
    assert abs(out["mu_rms_rest"] - np.sqrt(np.mean(rest_mu**2))) < 1e-12


def test_cell_evidence_is_the_evaluator_objective(bench_script):
    cg = bench_script("capture_gauge")
    truth = pln_ref.random_params(6, 2, seed=2, capture=True, mean_log_rate=1.5)
    sim = pln_ref.simulate(truth, 30, seed=3)
    u, la = sim.counts.astype(float), sim.log_anchor
    r = cg.cell_evidence(u, la, truth.capture, truth.mu, truth.W, truth.d)
    ev = Evaluator(u, la, truth.capture)
    assert abs(r["value"] - ev(truth.mu, truth.W, truth.d, gtol=1e-9, with_grad=False).value) < 1e-9
    assert r["l"].shape == (30,) and np.all(r["s"] > 0) and np.all(r["eta"] >= 0)
