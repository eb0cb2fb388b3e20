"""Importance sampling with a per-cell approximate posterior as proposal, and its PSIS diagnostic.

For cell c with draws (x_s, eta_s) ~ q_c (Laplace, VAE, ...), the log importance ratios are

    log r_sc = log p(u_c, x_s, eta_s | theta) - log q_c(x_s, eta_s)

where log p is the exact, normalised log joint (``pln_ref.model.log_joint``, which mirrors
``stan/pln_cell.stan``). Two uses:

* the marginal likelihood (evidence) of the cell, p(u_c | theta) = E_q[r] (``is_log_evidence``):
  log p_hat = logsumexp_s(log r_s) - log S, with Monte Carlo SE by the delta method,
  se(log p_hat) = sd_s(r_s) / (sqrt(S) mean_s(r_s)) (computed from r_s / max r, no overflow);
* the Pareto shape k-hat of the largest ratios (Yao et al. 2018; Vehtari et al. 2024,
  ``arviz.psislw``): k-hat < 0.5 good, < 0.7 usable (the IS estimate and its SE are reliable),
  larger means q's tails are too light and the estimate (and its SE) cannot be trusted.

The PSIS-reweighted draws give improved posterior moments (``psis_moments``).
Moved here from ``pln_ref.validation.psis`` so that the fitting code (``pln_ref.newcells``,
``pln_ref.ppc``) does not import the validation harness; the harness re-exports these names.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

__all__ = ["PsisResult", "psis", "psis_moments", "exact_log_joint_draws", "is_log_evidence",
           "KHAT_THRESHOLD"]

#: k-hat above which an importance-sampling estimate is flagged as unreliable.
KHAT_THRESHOLD = 0.7


@dataclass
class PsisResult:
    """khat (N,), normalised smoothed log weights lw (S, N)."""

    khat: np.ndarray
    lw: np.ndarray

    def share_below(self, t: float) -> float:
        return float(np.mean(self.khat < t))

    def summary(self) -> dict:
        k = self.khat
        return {"n_cells": int(k.size), "share_khat_lt_0.5": self.share_below(0.5),
                "share_khat_lt_0.7": self.share_below(0.7), "median": float(np.median(k)),
                "p90": float(np.quantile(k, 0.9)), "worst": float(np.max(k))}


def psis(log_ratios: np.ndarray, reff: float = 1.0) -> PsisResult:
    """PSIS on log importance ratios (S draws, N cells) -> k-hat (N,) and log weights (S, N).

    Ratios of -inf (draws outside the support, e.g. eta < 0) get weight 0.
    """
    import arviz as az

    lr = np.asarray(log_ratios, dtype=float)
    if lr.ndim == 1:
        lr = lr[:, None]
    if lr.ndim != 2 or lr.shape[0] < 10:
        raise ValueError(f"log_ratios must be (S >= 10, N), got {lr.shape}")
    if np.any(np.isnan(lr)) or np.any(lr == np.inf):
        raise ValueError("log_ratios contain NaN or +inf")
    finite_min = np.where(np.isfinite(lr), lr, np.inf).min(axis=0)
    # -inf -> far below the smallest finite ratio of the cell (weight underflows to 0)
    lr = np.where(np.isfinite(lr), lr, finite_min[None, :] - 1e3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lw, k = az.psislw(lr.T.copy(), reff=reff)
    return PsisResult(khat=np.asarray(k, dtype=float).reshape(-1), lw=np.asarray(lw).T)


def psis_moments(draws: np.ndarray, lw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PSIS-reweighted posterior mean and SD of draws (S, N, ...) with log weights lw (S, N)."""
    d = np.asarray(draws, dtype=float)
    w = np.exp(lw - np.max(lw, axis=0, keepdims=True))
    w = w / w.sum(axis=0, keepdims=True)
    w = w.reshape(w.shape + (1,) * (d.ndim - 2))
    mean = np.sum(w * d, axis=0)
    var = np.sum(w * (d - mean) ** 2, axis=0)
    return mean, np.sqrt(var)


def exact_log_joint_draws(counts: np.ndarray, x: np.ndarray, eta: np.ndarray, params,
                          log_anchor: np.ndarray | None) -> np.ndarray:
    """log p(u_c, x_sc, eta_sc | theta) for draws x (S, N, G), eta (S, N) -> (S, N).

    Uses ``pln_ref.model.log_joint`` on the stacked (S*N, G) batch; with capture, eta <= 0
    gives -inf (outside the support); without capture eta is ignored (identically 0).
    """
    from .model import log_joint

    x = np.asarray(x, dtype=float)
    S, N, G = x.shape
    u = np.broadcast_to(np.asarray(counts, dtype=float)[None], (S, N, G)).reshape(S * N, G)
    if params.capture is None:
        return log_joint(u, x.reshape(S * N, G), None, params).reshape(S, N)
    eta = np.asarray(eta, dtype=float)
    la = np.broadcast_to(np.asarray(log_anchor, dtype=float)[None], (S, N)).reshape(S * N)
    ok = eta.reshape(-1) > 0
    out = np.full(S * N, -np.inf)
    if ok.any():
        out[ok] = log_joint(u[ok], x.reshape(S * N, G)[ok], eta.reshape(-1)[ok], params, la[ok])
    return out.reshape(S, N)


def is_log_evidence(log_ratios: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Importance-sampling estimate of log E_q[r] per cell from log ratios (S, N) (module docstring).

    Returns (log p_hat (N,), Monte Carlo SE of log p_hat (N,)). With r_s = e^{log r_s - max}:
    log p_hat = max + log mean_s r_s, se = sd_s(r_s) / (sqrt(S) mean_s r_s).
    """
    lr = np.asarray(log_ratios, dtype=float)
    if lr.ndim != 2 or lr.shape[0] < 2:
        raise ValueError(f"log_ratios must be (S >= 2, N), got {lr.shape}")
    S = lr.shape[0]
    est = logsumexp(lr, axis=0) - np.log(S)
    top = np.max(lr, axis=0)
    top = np.where(np.isfinite(top), top, 0.0)
    r = np.exp(lr - top)
    m = r.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        se = r.std(axis=0, ddof=1) / (np.sqrt(S) * m)
    return est, se
