"""Pareto-smoothed importance sampling diagnostics for per-cell approximate posteriors.

For cell c with draws (x_s, eta_s) ~ q_c (Laplace, VAE, ...), the log importance ratios are

    log r_sc = log p(u_c, x_s, eta_s | theta) - log q_c(x_s, eta_s)

where log p is the exact, normalised log joint of ``pln_cell`` (``pln_ref.model.log_joint``,
or equivalently BridgeStan's ``log_density`` on the unconstrained draws minus the Jacobian
log eta). The Pareto shape k-hat of the largest ratios (Yao et al. 2018; Vehtari et al. 2024,
``arviz.psislw``) says whether q_c is close enough to the exact posterior for importance
sampling: k-hat < 0.5 good, < 0.7 usable, larger means the approximation's tails are too light.
The PSIS-reweighted draws give improved posterior means and SDs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PsisResult",
    "psis",
    "psis_moments",
    "exact_log_joint_draws",
    "bridgestan_log_joint_draws",
    "cell_psis",
]


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
                          log_anchor: np.ndarray) -> np.ndarray:
    """log p(u_c, x_sc, eta_sc | theta) for draws x (S, N, G), eta (S, N) -> (S, N).

    Uses ``pln_ref.model.log_joint`` on the stacked (S*N, G) batch; eta <= 0 gives -inf.
    """
    from ..model import log_joint

    x = np.asarray(x, dtype=float)
    eta = np.asarray(eta, dtype=float)
    S, N, G = x.shape
    u = np.broadcast_to(np.asarray(counts, dtype=float)[None], (S, N, G)).reshape(S * N, G)
    la = np.broadcast_to(np.asarray(log_anchor, dtype=float)[None], (S, N)).reshape(S * N)
    ok = eta.reshape(-1) > 0
    out = np.full(S * N, -np.inf)
    if params.capture is None:
        ok = np.ones(S * N, dtype=bool)
    if ok.any():
        out[ok] = log_joint(u[ok], x.reshape(S * N, G)[ok], eta.reshape(-1)[ok], params, la[ok])
    return out.reshape(S, N)


def bridgestan_log_joint_draws(counts: np.ndarray, x: np.ndarray, eta: np.ndarray, params,
                               log_anchor: np.ndarray) -> np.ndarray:
    """Same as :func:`exact_log_joint_draws` through BridgeStan's ``pln_cell``:

        log p = log_density(theta_unc) - log eta      (Jacobian of eta's lower=0 bound)

    One single-cell model per cell (the program's density is a sum over its cells).
    """
    from .engines import bridgestan_model
    from .standata import pln_cell_data, pln_cell_unconstrain

    x = np.asarray(x, dtype=float)
    eta = np.asarray(eta, dtype=float)
    counts = np.asarray(counts)
    la = np.asarray(log_anchor, dtype=float)
    S, N, G = x.shape
    out = np.full((S, N), -np.inf)
    for c in range(N):  # validation-only path: one small model per cell
        model = bridgestan_model("pln_cell", pln_cell_data(counts[c:c + 1], params, la[c:c + 1]))
        for s in range(S):
            if eta[s, c] <= 0:
                continue
            theta = pln_cell_unconstrain(x[s, c][None, :], eta[s, c:c + 1])
            out[s, c] = model.log_density(np.asarray(theta, dtype=float)) - np.log(eta[s, c])
    return out


def cell_psis(method, counts: np.ndarray, params, log_anchor: np.ndarray, *, n_draws: int = 2000,
              seed: int = 0, sample_kwargs: dict | None = None, path: str = "numpy") -> dict:
    """PSIS diagnostics of a per-cell approximate posterior.

    method: ``.sample(rng, n_draws, **sample_kwargs) -> (x (S,N,G), eta (S,N))`` and
    ``.logpdf(x, eta) -> (S, N)``; path "numpy" (model.log_joint) or "bridgestan".
    Returns {"result": PsisResult, "summary": ..., "mean_x", "sd_x", "mean_eta", "sd_eta"}
    where the means/SDs are PSIS-reweighted (the improved estimate).
    """
    rng = np.random.default_rng(seed)
    x, eta = method.sample(rng, n_draws, **(sample_kwargs or {}))
    log_q = np.asarray(method.logpdf(x, eta), dtype=float)
    fn = exact_log_joint_draws if path == "numpy" else bridgestan_log_joint_draws
    if path not in ("numpy", "bridgestan"):
        raise ValueError(f"path must be 'numpy' or 'bridgestan', got {path!r}")
    log_p = fn(counts, x, eta, params, log_anchor)
    res = psis(log_p - log_q)
    mx, sx = psis_moments(x, res.lw)
    me, se = psis_moments(eta, res.lw)
    return {"result": res, "summary": res.summary(), "mean_x": mx, "sd_x": sx,
            "mean_eta": me, "sd_eta": se}
