"""The per-cell log joint density of the PLN with capture, its gradient and Hessian blocks.

Mirrors ``stan/pln_cell.stan`` exactly (full normalising constants), batched over N cells::

    log p(u, x, eta | theta) = sum_g [u_g (x_g - eta) - e^{x_g - eta} - log u_g!]
                               + log N(x | mu, Sigma)
                               + log TruncN(eta | m, sigma_M^2, low = 0),     m = log M0 - log L

    log TruncN(eta | m, s, 0) = log N(eta | m, s^2) - log Phi(m / s)

Gradient (lambda = e^{x - eta})::

    g_x   = u - lambda - Sigma^{-1} (x - mu)
    g_eta = -sum_g u_g + sum_g lambda_g - (eta - m) / sigma_M^2

Negative Hessian::

    -H = [[diag(lambda) + Sigma^{-1},  -lambda                         ],
          [-lambda^T,                  sum_g lambda_g + 1 / sigma_M^2  ]]

The x-block is a ``PosteriorPrecision`` (low rank plus diagonal); nothing is G x G.
Without capture (``params.capture is None``) eta is identically 0 and has no prior term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.special import gammaln

from . import truncnorm
from .anchor import resolve_log_anchor
from .lowrank import LowRankCov, PosteriorPrecision
from .params import PLNParams

__all__ = [
    "log_joint",
    "grad_log_joint",
    "neg_hessian",
    "NegHessian",
    "eta_schur",
    "eta_bbar",
    "EtaSchur",
    "cell_gradient",
    "poisson_loglik",
]


def _eta_or_zero(params: PLNParams, eta, N: int) -> np.ndarray:
    if params.capture is None:
        if eta is not None and np.any(np.asarray(eta) != 0):
            raise ValueError("params.capture is None (no capture), so eta must be 0 or None")
        return np.zeros(N)
    if eta is None:
        raise ValueError("eta is required when params.capture is set")
    eta = np.asarray(eta, dtype=float)
    if eta.shape != (N,):
        raise ValueError(f"eta must have shape ({N},), got {eta.shape}")
    return eta


def _cell_inputs(u, x, eta, params: PLNParams, log_anchor, cov: LowRankCov | None):
    """Validated (u, x, eta, cov, m, sigma_M) of N cells: m = log M0 - log L_c from the one anchor
    policy (``anchor.resolve_log_anchor``); m and sigma_M are None without capture."""
    u = np.asarray(u, dtype=float)
    x = np.asarray(x, dtype=float)
    if x.shape != u.shape:
        raise ValueError(f"x has shape {x.shape} but counts have shape {u.shape}")
    eta = _eta_or_zero(params, eta, u.shape[0])
    cov = cov or LowRankCov.from_params(params)
    cap = params.capture
    if cap is None:
        return u, x, eta, cov, None, None
    return u, x, eta, cov, cap.prior_mean(resolve_log_anchor(u, log_anchor)), cap.sigma_M


def poisson_loglik(u: np.ndarray, x: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """sum_g [u_g (x_g - eta) - e^{x_g - eta} - log u_g!], shape (N,)."""
    z = x - eta[:, None]
    with np.errstate(over="ignore"):
        return np.sum(u * z - np.exp(z) - gammaln(u + 1.0), axis=1)


def log_joint(
    u: np.ndarray,
    x: np.ndarray,
    eta: np.ndarray | None,
    params: PLNParams,
    log_anchor: np.ndarray | None = None,
    *,
    cov: LowRankCov | None = None,
) -> np.ndarray:
    """Full log p(u, x, eta | theta) per cell (see module docstring), shape (N,).

    ``log_anchor`` is log L_c of the capture prior; it defaults to the log of the realised
    library size sum_g u_g (the empirical-Bayes anchor of real data).
    """
    u, x, eta, cov, m, sigma_M = _cell_inputs(u, x, eta, params, log_anchor, cov)
    out = poisson_loglik(u, x, eta) + cov.logpdf(x, params.mu)
    if m is not None:
        out = out + truncnorm.logpdf(eta, m, sigma_M)
    return out


def cell_gradient(
    u: np.ndarray, x: np.ndarray, eta: np.ndarray, mu: np.ndarray, cov: LowRankCov,
    m: np.ndarray | None, sigma_M: float | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one gradient kernel of the log joint, with lambda = e^{x - eta} it computes on the way::

        g_x   = u - lambda - Sigma^{-1} (x - mu)
        g_eta = -sum_g u_g + sum_g lambda_g - (eta - m) / sigma_M^2   (zeros when m is None)

    Arrays (n, G) / (n,) of already-validated cells; returns (g_x, g_eta, lambda).
    """
    with np.errstate(over="ignore"):
        lam = np.exp(x - eta[:, None])
    g_x = u - lam - cov.inv_mv(x - mu)
    if m is None:
        return g_x, np.zeros(len(eta)), lam
    g_eta = lam.sum(axis=1) - u.sum(axis=1) - (eta - m) / sigma_M**2
    return g_x, g_eta, lam


def grad_log_joint(
    u: np.ndarray,
    x: np.ndarray,
    eta: np.ndarray | None,
    params: PLNParams,
    log_anchor: np.ndarray | None = None,
    *,
    cov: LowRankCov | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(g_x, g_eta) of ``log_joint`` by ``cell_gradient`` (zeros for g_eta without capture)."""
    u, x, eta, cov, m, sigma_M = _cell_inputs(u, x, eta, params, log_anchor, cov)
    g_x, g_eta, _ = cell_gradient(u, x, eta, params.mu, cov, m, sigma_M)
    return g_x, g_eta


class EtaSchur(NamedTuple):
    """Pieces of the eta Schur complement of -H (``eta_schur``)."""

    b: np.ndarray  # (N, G) A^{-1} lambda
    bbar: np.ndarray  # (N, G) 1 - b = A^{-1} Sigma^{-1} 1
    s: np.ndarray  # (N,) 1/sigma_M^2 + lambda^T bbar  (> 0)
    sol: np.ndarray | None  # (N, G) A^{-1} rhs when rhs is given


def eta_bbar(A: PosteriorPrecision) -> np.ndarray:
    """bbar = A^{-1} Sigma^{-1} 1 = 1 - b (N, G): the x-part of the eta column of (-H)^{-1} per unit
    of eta (``eta_schur``). Sigma^{-1} 1 is the same for every cell: one broadcast solve."""
    return A.solve(A.cov.inv_mv(np.ones(A.cov.G)))


def eta_schur(A: PosteriorPrecision, prec_eta: float, rhs: np.ndarray | None = None) -> EtaSchur:
    """The eta Schur complement of -H without cancellation, from one factorisation of A.

        bbar = A^{-1} Sigma^{-1} 1 = 1 - b,   b = A^{-1} lambda   (since A 1 = lambda + Sigma^{-1} 1)
        s    = 1/sigma_M^2 + sum_g lambda_g - lambda^T b = 1/sigma_M^2 + lambda^T bbar

    (the direct form c - lambda^T A^{-1} lambda cancels catastrophically for large lambda).
    ``prec_eta`` = 1/sigma_M^2; with ``rhs`` (N, G) also A^{-1} rhs (one factorisation, two
    right-hand sides).
    """
    bbar = eta_bbar(A)
    sol = None if rhs is None else A.solve(rhs)
    s = prec_eta + np.einsum("ng,ng->n", A.lam, bbar)
    return EtaSchur(1.0 - bbar, bbar, s, sol)


@dataclass
class NegHessian:
    """-H of N cells: x-block A = diag(lambda) + Sigma^{-1} (low rank), border -lambda,
    eta-eta entry c = sum lambda + 1/sigma_M^2 (``prec_eta`` = 1/sigma_M^2; None without capture)."""

    A: PosteriorPrecision
    lam: np.ndarray
    prec_eta: float | None

    @property
    def c_eta(self) -> np.ndarray | None:
        return None if self.prec_eta is None else self.lam.sum(axis=1) + self.prec_eta

    def schur(self) -> tuple[np.ndarray, np.ndarray]:
        """b = A^{-1} lambda and s = c - lambda^T b (> 0), computed stably (``eta_schur``)."""
        if self.prec_eta is None:
            raise ValueError("no eta block without capture")
        es = eta_schur(self.A, self.prec_eta)
        return es.b, es.s

    def logdet(self) -> np.ndarray:
        """log det(-H) = log det A + log s (matrix-determinant lemma + Schur complement)."""
        ld = self.A.logdet()
        if self.prec_eta is None:
            return ld
        _, s = self.schur()
        return ld + np.log(s)

    def dense(self) -> np.ndarray:
        """Dense (N, G+1, G+1) -H (tests only)."""
        Ad = self.A.dense()
        if self.prec_eta is None:
            return Ad
        N, G = self.lam.shape
        out = np.zeros((N, G + 1, G + 1))
        out[:, :G, :G] = Ad
        out[:, :G, G] = -self.lam
        out[:, G, :G] = -self.lam
        out[:, G, G] = self.c_eta
        return out


def neg_hessian(
    x: np.ndarray, eta: np.ndarray | None, params: PLNParams, *, cov: LowRankCov | None = None
) -> NegHessian:
    """Blocks of -H at (x, eta) (module docstring); the data u do not enter the Hessian."""
    x = np.asarray(x, dtype=float)
    N = x.shape[0]
    eta = _eta_or_zero(params, eta, N)
    cov = cov or LowRankCov.from_params(params)
    with np.errstate(over="ignore"):
        lam = np.exp(x - eta[:, None])
    A = PosteriorPrecision(cov, lam)
    prec = None if params.capture is None else 1.0 / params.capture.sigma_M**2
    return NegHessian(A=A, lam=lam, prec_eta=prec)
