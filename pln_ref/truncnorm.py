"""The normal distribution truncated to [0, inf): the one implementation used by pln-ref.

eta ~ TruncN(loc, scale^2, low = 0) appears as the capture prior (loc = m = log M0 - log L_c,
scale = sigma_M), as the eta marginal of the Laplace posterior (loc = eta_hat + delta,
scale = 1/sqrt(s)) and as the VAE's q(eta). With alpha = loc / scale (the standardised distance
of the mode from the bound) and a = -alpha (the standardised bound)::

    log p(eta)  = -(eta - loc)^2 / (2 scale^2) - log scale - 1/2 log 2 pi - log Phi(alpha),  eta >= 0
    E eta       = loc + scale h,                 h = phi(a) / (1 - Phi(a))   (inverse Mills ratio)
    Var eta     = scale^2 (1 + a h - h^2)
    E e^{t eta} = exp(loc t + scale^2 t^2 / 2) Phi(alpha + scale t) / Phi(alpha)

Every function is elementwise (NumPy broadcasting) and stable for alpha in [-1e3, 1e3] and beyond:

* log Phi by ``scipy.special.log_ndtr`` (no underflow in the left tail);
* h = sqrt(2/pi) / erfcx(a / sqrt 2) (no 0/0 when Phi(alpha) underflows);
* far in the tail (a > 5) the mean and variance come from the continued fraction of the Mills
  ratio, h - a = 1 / (a + 2 / (a + 3 / (a + ...))), so E eta = scale (h - a) and
  Var eta = scale^2 (a + 2c - e) / ((a + e) (a + c)^2) with c = 2/(a + e), e = 3/(a + ...):
  no cancellation where 1 + a h - h^2 ~ 1/a^2 would lose every digit;
* the MGF in log space, with the erfcx form when both Phi arguments are negative;
* draws and quantiles by inverse CDF in log space (``ndtri_exp``), from the lower tail when
  alpha > 0 and from the upper tail otherwise, and far in the tail (alpha < -5) as eta = scale y
  with y solving the survival equation in the erfcx form by Newton, so the bulk and the far tail
  keep full relative precision (at alpha = -45 the draws are finite and positive, ~ scale / 45).
"""

from __future__ import annotations

import numpy as np
from scipy.special import erfcx, log_ndtr, ndtri_exp

from .constants import LOG_2PI

__all__ = ["inv_mills", "log_normaliser", "logpdf", "mean", "variance", "mean_var", "log_mgf", "mgf", "ppf",
           "sample"]

_SQRT2 = float(np.sqrt(2.0))
_SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))
_CF_SWITCH = 5.0  # a = -alpha above which the continued fraction gives the mean and variance
_CF_TERMS = 60    # terms of the continued fraction (converged to round-off for a > 5)


def _check_scale(scale) -> np.ndarray:
    scale = np.asarray(scale, dtype=float)
    if np.any(~(scale > 0)) or np.any(~np.isfinite(scale)):
        raise ValueError("truncated-normal scale must be positive and finite")
    return scale


def log_normaliser(loc, scale) -> np.ndarray:
    """log Z = log P(N(loc, scale^2) >= 0) = log Phi(loc / scale)."""
    return log_ndtr(np.asarray(loc, dtype=float) / _check_scale(scale))


def logpdf(x, loc, scale) -> np.ndarray:
    """log TruncN(x | loc, scale^2, low=0) = log N(x | loc, scale^2) - log Phi(loc / scale); -inf for x < 0."""
    x = np.asarray(x, dtype=float)
    scale = _check_scale(scale)
    z = (x - loc) / scale
    out = -0.5 * z**2 - np.log(scale) - 0.5 * LOG_2PI - log_ndtr(np.asarray(loc, dtype=float) / scale)
    return np.where(x >= 0, out, -np.inf)


def inv_mills(a) -> np.ndarray:
    """Inverse Mills ratio h(a) = phi(a) / (1 - Phi(a)) = sqrt(2/pi) / erfcx(a / sqrt 2), stable
    for every a (no 0/0 where Phi underflows). phi(t) / Phi(t) is ``inv_mills(-t)``."""
    with np.errstate(over="ignore"):
        return _SQRT_2_OVER_PI / erfcx(np.asarray(a, dtype=float) / _SQRT2)


_inv_mills = inv_mills


def _cf_tail(a: np.ndarray, first: int) -> np.ndarray:
    """t_first of the backward recursion t_j = j / (a + t_{j+1}), t_{J+1} = 0 (a > 0)."""
    t = np.zeros_like(a)
    for j in range(_CF_TERMS, first - 1, -1):
        t = j / (a + t)
    return t


def mean_var(loc, scale) -> tuple[np.ndarray, np.ndarray]:
    """(E eta, Var eta) of TruncN(loc, scale^2, low=0) (module docstring), elementwise."""
    loc = np.asarray(loc, dtype=float)
    scale = _check_scale(scale)
    loc, scale = np.broadcast_arrays(loc, scale)
    a = -loc / scale
    tail = a > _CF_SWITCH
    mean = np.empty(a.shape)
    var = np.empty(a.shape)
    # bulk and right side: direct formulas with the stable inverse Mills ratio
    ab = np.where(tail, 0.0, a)
    h = _inv_mills(ab)
    mean_b = loc + scale * h
    var_b = scale**2 * np.maximum(1.0 + ab * h - h * h, 0.0)
    # far left tail (mode well below the bound): continued fraction, no cancellation
    at = np.where(tail, a, _CF_SWITCH + 1.0)
    e = _cf_tail(at, 3)
    c = 2.0 / (at + e)
    delta = 1.0 / (at + c)  # h - a
    mean_t = scale * delta
    var_t = scale**2 * (at + 2.0 * c - e) / ((at + e) * (at + c) ** 2)
    mean[...] = np.where(tail, mean_t, mean_b)
    var[...] = np.where(tail, var_t, var_b)
    return mean, var


def mean(loc, scale) -> np.ndarray:
    """E eta = loc + scale phi(a) / (1 - Phi(a)), a = -loc/scale."""
    return mean_var(loc, scale)[0]


def variance(loc, scale) -> np.ndarray:
    """Var eta = scale^2 (1 + a h - h^2), h the inverse Mills ratio at a = -loc/scale."""
    return mean_var(loc, scale)[1]


def log_mgf(t, loc, scale) -> np.ndarray:
    """log E[e^{t eta}] = loc t + scale^2 t^2 / 2 + log Phi(alpha + scale t) - log Phi(alpha).

    When both Phi arguments are negative, log Phi(z) = -z^2/2 + log(erfcx(-z/sqrt2)/2) and the
    quadratic terms cancel exactly, so log E = log erfcx(-z1/sqrt2) - log erfcx(-z0/sqrt2)."""
    loc = np.asarray(loc, dtype=float)
    scale = _check_scale(scale)
    t = np.asarray(t, dtype=float)
    z1, z0 = loc / scale + scale * t, loc / scale
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        direct = loc * t + 0.5 * (scale * t) ** 2 + log_ndtr(z1) - log_ndtr(z0)
        both_neg = np.log(erfcx(-z1 / _SQRT2)) - np.log(erfcx(-z0 / _SQRT2))
    return np.where((z0 < 0) & (z1 < 0), both_neg, direct)


def mgf(t, loc, scale) -> np.ndarray:
    """E[e^{t eta}] (see ``log_mgf``)."""
    return np.exp(log_mgf(t, loc, scale))


def ppf(q, loc, scale) -> np.ndarray:
    """Quantile function: the eta >= 0 with P(eta' <= eta) = q, q in (0, 1).

    alpha = loc/scale > 0 (bulk away from the bound): Phi(z) = Phi(-alpha) + q Phi(alpha), solved
    in log space from below; -5 <= alpha <= 0: 1 - Phi(z) = (1 - q) Phi(alpha), solved from above;
    eta = loc + scale z. Far tail (a = -alpha > 5), where loc + scale z would cancel: eta = scale y
    with y the root of g(y) = log Q(a + y) - log Q(a) = log(1 - q), Q = 1 - Phi, written without
    cancellation as g(y) = -a y - y^2/2 + log(erfcx((a + y)/sqrt 2) / erfcx(a/sqrt 2)) and solved by
    Newton (g' = -h(a + y)) from y0 = -log(1 - q)/a, which converges monotonically (g is concave
    and g(y0) <= log(1 - q))."""
    q = np.asarray(q, dtype=float)
    loc = np.asarray(loc, dtype=float)
    scale = _check_scale(scale)
    if np.any(~np.isfinite(loc)):
        raise ValueError("truncated-normal location contains NaN or inf")
    alpha = loc / scale
    lz = log_ndtr(alpha)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        lower = ndtri_exp(np.logaddexp(log_ndtr(-alpha), np.log(q) + lz))
        upper = -ndtri_exp(np.log1p(-q) + lz)
        z = np.where(alpha > 0, lower, upper)
        out = loc + scale * z
        tail = alpha < -_CF_SWITCH
        if np.any(tail):
            a = np.where(tail, -alpha, _CF_SWITCH + 1.0)
            target = np.log1p(-q)
            y = -target / a
            log_e0 = np.log(erfcx(a / _SQRT2))
            for _ in range(12):
                g = -a * y - 0.5 * y * y + np.log(erfcx((a + y) / _SQRT2)) - log_e0
                y = np.maximum(y + (g - target) / _inv_mills(a + y), 0.0)
            out = np.where(tail, scale * y, out)
    return np.maximum(out, 0.0)


def sample(loc, scale, rng: np.random.Generator, size=None) -> np.ndarray:
    """Exact draws by inverse CDF: eta = ppf(1 - U), U ~ Uniform(0, 1) the survival probability
    (``rng.random``; 1 - U is exact in double precision). ``size`` defaults to the broadcast shape
    of loc and scale."""
    loc = np.asarray(loc, dtype=float)
    shape = np.broadcast_shapes(loc.shape, np.shape(scale)) if size is None else size
    u = rng.random(shape)
    u = np.where(u > 0, u, np.finfo(float).tiny)  # rng.random is in [0, 1)
    return ppf(1.0 - u, loc, scale)
