"""Comparison metrics and PSIS on cases with known answers."""

import numpy as np
import pytest
from scipy import stats

from pln_ref.validation.compare import (central_interval_coverage, compare_draws, corr_x_eta, summarise, wasserstein1)
from pln_ref.validation.gate import GateFailedError, GateResult
from pln_ref.validation.psis import psis, psis_moments

EXACT = GateResult(passed=True, reasons=[], table=[])  # reference draws exact by construction


def test_two_gaussians_known_shift_and_ratio():
    rng = np.random.default_rng(1)
    S, Q = 40_000, 5
    shift, ratio = 0.3, 1.5
    nuts = rng.normal(0.0, 2.0, size=(S, Q))
    meth = rng.normal(shift * 2.0, 2.0 * ratio, size=(S, Q))
    c = compare_draws(meth, nuts, gate=EXACT)
    # MC error of the standardised mean difference ~ sqrt((1 + ratio^2)/S) = 0.009
    np.testing.assert_allclose(c.std_mean_error, shift, atol=0.04)
    np.testing.assert_allclose(c.sd_ratio, ratio, rtol=0.02)
    # coverage of N(0,1) draws by the N(0.3, 1.5^2) central 90% interval, in sd_NUTS units
    lo, hi = shift + ratio * stats.norm.ppf([0.05, 0.95])
    np.testing.assert_allclose(c.cover90, stats.norm.cdf(hi) - stats.norm.cdf(lo), atol=0.01)
    # exact W1 for Gaussians N(0,1) vs N(a, b^2): int |Phi^-1(p) (b - 1) + a| dp, numerically
    p = (np.arange(200_000) + 0.5) / 200_000
    w1 = np.mean(np.abs(stats.norm.ppf(p) * (ratio - 1) + shift))
    np.testing.assert_allclose(c.w1_scaled, w1, atol=0.03)


def test_identical_distributions_coverage_and_summary():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(20_000, 50)), rng.normal(size=(20_000, 50))
    c = compare_draws(a, b, gate=EXACT, label="same")
    np.testing.assert_allclose(c.cover50, 0.5, atol=0.02)
    np.testing.assert_allclose(c.cover90, 0.9, atol=0.012)
    s = summarise(c)
    assert s["std_mean_error"]["median_abs"] < 0.02
    assert 0.97 < s["sd_ratio"]["min"] <= s["sd_ratio"]["max"] < 1.03
    assert s["w1_scaled"]["worst"] < 0.06
    assert s["n_quantities"] == 50


def test_wasserstein_matches_scipy_unequal_sizes():
    rng = np.random.default_rng(3)
    a, b = rng.gamma(2.0, size=(137, 4)), rng.normal(size=(61, 4))
    ours = wasserstein1(a, b)
    ref = [stats.wasserstein_distance(a[:, q], b[:, q]) for q in range(4)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_coverage_function_and_shapes():
    rng = np.random.default_rng(4)
    m = rng.normal(size=(10_000, 3, 2))
    r = rng.normal(size=(10_000, 3, 2))
    cov = central_interval_coverage(m, r, 0.5)
    assert cov.shape == (6,)
    c = compare_draws(m, r, gate=EXACT)
    assert c.sd_ratio.shape == (3, 2)


def test_failed_gate_refused_unless_forced():
    bad = GateResult(passed=False, reasons=["R-hat of x[0] = 1.2 (needs < 1.01)"], table=[])
    a = np.random.default_rng(0).normal(size=(100, 3))
    with pytest.raises(GateFailedError, match="R-hat"):
        compare_draws(a, a, gate=bad)
    with pytest.raises(GateFailedError, match="no gate"):
        compare_draws(a, a, gate=None)
    c = compare_draws(a, a, gate=bad, force=True)
    assert c.forced and summarise(c)["forced"]


def test_forced_comparison_warns_that_the_gate_failed():
    import warnings

    from pln_ref.validation.gate import ForcedComparisonWarning

    bad = GateResult(passed=False, reasons=["3 divergent transitions"], table=[])
    a = np.random.default_rng(1).normal(size=(100, 2))
    with pytest.warns(ForcedComparisonWarning, match="failed its gate: 3 divergent transitions"):
        compare_draws(a, a, gate=bad, force=True, label="laplace")
    with pytest.warns(ForcedComparisonWarning, match="was not gated"):
        compare_draws(a, a, gate=None, force=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a passed gate compares silently, forced or not
        assert not compare_draws(a, a, gate=EXACT, force=True).forced


def test_bad_input_raises():
    a = np.zeros((100, 3))
    with pytest.raises(ValueError, match="quantity shape"):
        compare_draws(np.ones((10, 3)), np.ones((10, 4)), gate=EXACT)
    with pytest.raises(ValueError, match="zero NUTS standard deviation"):
        compare_draws(np.random.default_rng(0).normal(size=(100, 3)), a, gate=EXACT)
    with pytest.raises(ValueError, match="NaN"):
        compare_draws(np.full((10, 2), np.nan), np.ones((10, 2)), gate=EXACT)


def _gauss_logpdf(x, m, s):
    return stats.norm.logpdf(x, m, s).sum(-1)


def test_psis_khat_small_when_q_equals_p_large_when_q_narrow():
    rng = np.random.default_rng(5)
    S, N, D = 2000, 12, 3
    # q = p: ratios constant up to MC noise -> k-hat small
    x = rng.normal(size=(S, N, D))
    lr = _gauss_logpdf(x, 0, 1) - _gauss_logpdf(x, 0, 1)
    res = psis(lr + 1e-9 * rng.normal(size=lr.shape))
    assert np.max(res.khat) < 0.3
    # q much narrower than p (sd 0.4 vs 1 in 3 dims): heavy-tailed weights -> k-hat > 0.7
    xq = rng.normal(scale=0.3, size=(S, N, D))
    res2 = psis(_gauss_logpdf(xq, 0, 1) - _gauss_logpdf(xq, 0, 0.3))
    assert np.median(res2.khat) > 0.7
    assert res2.share_below(0.7) <= 0.25 and res.share_below(0.5) == 1.0
    # slightly wide q: good k-hat and reweighting corrects the mean of a shifted proposal
    xs = rng.normal(0.3, 1.2, size=(4 * S, N, 1))
    res3 = psis(_gauss_logpdf(xs, 0, 1) - _gauss_logpdf(xs, 0.3, 1.2))
    mean, sd = psis_moments(xs, res3.lw)
    assert np.max(res3.khat) < 0.5
    assert abs(np.mean(mean)) < 0.03 and abs(np.mean(sd) - 1) < 0.03
    assert abs(np.mean(xs.mean(0)) - 0.3) < 0.03  # unweighted mean is off by the shift


def test_exact_log_joint_numpy_equals_bridgestan_path():
    """log p of pln_cell draws: model.log_joint == BridgeStan log_density - log eta."""
    from pln_ref.validation.psis import bridgestan_log_joint_draws, exact_log_joint_draws
    from pln_ref.simulation import random_params, simulate

    p = random_params(5, 2, seed=0, mean_log_rate=3.0, capture=True)
    sim = simulate(p, 2, seed=1)
    rng = np.random.default_rng(0)
    x = np.asarray(sim.x)[None] + 0.1 * rng.normal(size=(3, 2, 5))
    eta = np.abs(np.asarray(sim.eta)[None] + 0.1 * rng.normal(size=(3, 2))) + 0.01
    a = exact_log_joint_draws(sim.counts, x, eta, p, sim.log_anchor)
    b = bridgestan_log_joint_draws(sim.counts, x, eta, p, sim.log_anchor)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-8)
    eta[0, 0] = -0.5  # outside the support
    assert exact_log_joint_draws(sim.counts, x, eta, p, sim.log_anchor)[0, 0] == -np.inf


def test_corr_x_eta_known_correlation_and_shape_check():
    # x_g = eta + noise with Var(noise) = v_g: corr = 1 / sqrt(1 + v_g)
    rng = np.random.default_rng(4)
    S, N = 200_000, 2
    v = np.array([0.0001, 1.0, 3.0])
    eta = rng.normal(size=(S, N))
    x = eta[..., None] + rng.normal(size=(S, N, 3)) * np.sqrt(v)
    c = corr_x_eta(x, eta)
    assert c.shape == (N, 3)
    np.testing.assert_allclose(c, np.broadcast_to(1 / np.sqrt(1 + v), (N, 3)), atol=5e-3)
    np.testing.assert_allclose(corr_x_eta(-x, eta), -c)
    with pytest.raises(ValueError, match="eta"):
        corr_x_eta(x, eta[:, :1])
