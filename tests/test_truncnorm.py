"""The one truncated normal on [0, inf) (``pln_ref.truncnorm``) against mpmath and scipy,
over loc/scale in [-1e3, 1e3]."""

from __future__ import annotations

import mpmath as mp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from pln_ref import truncnorm

mp.mp.dps = 50


def _ref(loc: float, scale: float) -> dict:
    """Exact moments, normaliser and MGF(-1) of TruncN(loc, scale^2, low=0) in 50-digit arithmetic."""
    loc, scale = mp.mpf(loc), mp.mpf(scale)
    alpha = loc / scale
    Z = mp.ncdf(alpha)
    h = mp.npdf(alpha) / Z  # phi(a) / (1 - Phi(a)) with a = -alpha
    a = -alpha
    mean = loc + scale * h
    var = scale**2 * (1 + a * h - h * h)
    lmgf = -loc + scale**2 / 2 + mp.log(mp.ncdf(alpha - scale)) - mp.log(Z)
    return {"log_Z": float(mp.log(Z)), "mean": float(mean), "var": float(var), "log_mgf": float(lmgf)}


@settings(max_examples=150, deadline=None)
@given(alpha=st.floats(-1e3, 1e3), scale=st.floats(0.01, 10.0))
def test_moments_and_normaliser_match_mpmath(alpha, scale):
    loc = alpha * scale
    r = _ref(loc, scale)
    m, v = truncnorm.mean_var(loc, scale)
    assert float(m) == pytest.approx(r["mean"], rel=1e-10, abs=1e-300)
    assert float(v) == pytest.approx(r["var"], rel=1e-9, abs=1e-300)
    assert float(truncnorm.log_normaliser(loc, scale)) == pytest.approx(r["log_Z"], rel=1e-12, abs=1e-15)
    assert float(truncnorm.log_mgf(-1.0, loc, scale)) == pytest.approx(r["log_mgf"], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("alpha", [-1e3, -45.0, -38.5, -8.3, 0.0, 2.0, 40.0, 1e3])
def test_logpdf_matches_scipy_and_is_minus_inf_below_zero(alpha):
    scale = 0.7
    loc = alpha * scale
    lo = max(loc, 0.0)
    x = np.array([lo, lo + 0.1 * scale / max(1.0, abs(alpha)), lo + 2 * scale])
    ref = [float(mp.log(mp.npdf(mp.mpf(xx), mp.mpf(loc), mp.mpf(scale)) / mp.ncdf(mp.mpf(alpha)))) for xx in x]
    assert np.allclose(truncnorm.logpdf(x, loc, scale), ref, rtol=1e-12)
    assert truncnorm.logpdf(-1e-9, loc, scale) == -np.inf
    if abs(alpha) < 30:  # scipy's own range of accuracy
        sp = stats.truncnorm(a=-alpha, b=np.inf, loc=loc, scale=scale)
        assert np.allclose(truncnorm.logpdf(x, loc, scale), sp.logpdf(x), rtol=1e-9)


@pytest.mark.parametrize("alpha", [-1e3, -45.0, -5.0, 0.0, 3.0, 1e3])
def test_ppf_inverts_the_cdf(alpha):
    scale = 0.5
    loc = alpha * scale
    q = np.array([1e-12, 1e-3, 0.3, 0.5, 0.9, 1 - 1e-9])
    x = truncnorm.ppf(q, loc, scale)
    assert np.all(np.isfinite(x)) and np.all(x >= 0) and np.all(np.diff(x) > 0)
    for qq, xx in zip(q, x):
        a, z = mp.mpf(alpha), (mp.mpf(xx) - mp.mpf(loc)) / mp.mpf(scale)
        cdf = (mp.ncdf(z) - mp.ncdf(-a)) / mp.ncdf(a) if alpha > 0 else 1 - mp.ncdf(-z) / mp.ncdf(a)
        assert float(cdf) == pytest.approx(qq, rel=1e-6)


@pytest.mark.parametrize("alpha", [-90.0, -45.0, -8.0, -1.0, 0.5, 4.0])
def test_sample_matches_the_distribution(alpha):
    """Draws are finite, >= 0 and distributed as the exact CDF (KS), also at loc/scale = -45 and
    -90 where a naive inverse CDF returns inf."""
    scale = 0.5
    loc = alpha * scale
    draws = truncnorm.sample(np.full(20_000, loc), scale, np.random.default_rng(0))
    assert np.all(np.isfinite(draws)) and np.all(draws >= 0)
    m, v = truncnorm.mean_var(loc, scale)
    assert abs(draws.mean() - m) < 4.5 * np.sqrt(v / draws.size)
    def cdf(x):  # exact CDF of the truncated normal
        return float((mp.ncdf((mp.mpf(x) - loc) / scale) - mp.ncdf(-mp.mpf(alpha))) / mp.ncdf(mp.mpf(alpha)))

    if alpha > -30:  # the mpmath CDF difference is exact here; in the far tail compare rescaled
        assert stats.kstest(draws[:2000], np.vectorize(cdf)).pvalue > 1e-3
    else:  # eta | eta >= 0 ~ Exponential(rate |alpha| / scale) to relative O(1/alpha^2)
        assert stats.kstest(draws / (scale / abs(alpha)), "expon").pvalue > 1e-3


def test_bad_scale_is_rejected():
    with pytest.raises(ValueError, match="scale"):
        truncnorm.mean_var(0.0, 0.0)
    with pytest.raises(ValueError, match="scale"):
        truncnorm.logpdf(1.0, 0.0, -1.0)
