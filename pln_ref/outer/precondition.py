"""The initial inverse Hessian H0 of the outer L-BFGS: a Gaussian (Fisher) model of the curvature
of the Laplace evidence in (mu, W), diagonal in s.

Model. Near the optimum, what a cell's counts tell about the globals is approximately a Gaussian
observation of its log rates x_c - eta_c 1 with Poisson noise diag(1 / lambda_c). With eta_c drawn
from its prior (variance v_c, the TruncNormal(m_c, sigma_M, low = 0) variance) and
x_c ~ N(mu, Sigma)::

    y_c ~ N(mu - E[eta_c] 1, C),   C = W W^T + v 1 1^T + diag(d + e),   v = mean_c v_c,
    e_g = 1 / lambdatilde_g:  1 / (Sigma_gg + e_g) = mean_c lambda_cg / (1 + lambda_cg Sigma_gg)

(``effective_rate``). The noise differs between cells, so one C cannot be exact; e_g is chosen so
that each gene's scalar information about x_g, 1 / (Sigma_gg + 1 / lambda_cg) per cell, has the
right mean over cells. That information is concave in lambda, so the plain mean rate
(e_g = 1 / mean_c lambda_cg, used before) overstates it for genes whose rate varies much between
cells: sparse, heavy-tailed genes (90-97% zeros and maxima in the hundreds on real counts), whose
mu and W then took steps that were too short, and L-BFGS spent its tail on them.

The Fisher information of that Gaussian per cell is, for mu, C^{-1}, and for W (a G x k direction
V), F(V) = C^{-1} V K + B V^T B with B = C^{-1} W and K = W^T C^{-1} W; the mu-W cross terms
vanish. H0 drops the second term of F (it carries the rotation null space W -> W A, A skew, which
makes F singular) and damps K::

    H0 q_mu = C q_mu,    H0 Q_W = C Q_W (K + delta tr(K)/k I)^{-1}    (delta = 1e-3),

both O(G k^2) through the low-rank C (never G x G). The s block (d = D_FLOOR + s^2) keeps the
diagonal curvature of ``diagonal_curvature``.

Why the v 1 1^T term: the counts pin x - eta, so a shift of every mu_g by the same amount is
opposed only by eta's prior; without the term H0 takes that direction (and its coupling with W)
as stiff as the per-gene noise says, and L-BFGS crawls along it.

Measured on real scRNA counts, 2000 cells x 200 genes, k = 5, with the exact Hessian of the
evidence at the optimum (finite differences of the exact gradient): the generalised condition
number of the Hessian against H0^{-1} (rotation null space excluded) is 905 for the diagonal
preconditioner, 265 for C without v, 57 with v, 31 for the exact block-diagonal (mu | W | s)
Hessian (these with e_g = 1 / mean_c lambda_cg). Evaluations of the evidence to the certificate,
mean rate -> ``effective_rate`` (same certificate tolerance 3e-4; real counts from
``pyPLNmodels.load_scrna``, 2000 cells, the G most expressed genes): G = 1000, k = 10: 94 -> 60;
G = 2000, k = 10: 165 -> 88; G = 1000, k = 5: 88 -> 62; G = 500, k = 5: 58 -> 55; G = 200, k = 5:
32 -> 43 (the longer certification: within 1e-3 after 30 instead of 27); simulated G = 1000,
k = 10: 31 -> 18; simulated 2000 x 14,000, k = 5: 66 -> 58. Full L-BFGS fits
(``validation/benchmarks/bench_speed.py``): see the module docstring of ``lbfgs``.

Models closer to the exact Hessian did not make a better H0 (``validation/benchmarks/outer_hessian.py``,
real 2000 x 200 counts, k = 5, at the optimum; generalised eigenvalues of the exact Hessian against
each model, rotation null space excluded). This H0: kappa 69, 5-95% spread 5.9, 57 outliers
(below 0.3 or above 3 times the median). The observed information of the Gaussian working model
(the counts read at each cell's MAP as Gaussian observations with precision lambda; formula in that
script) is within 7.6% of the Hessian: spread 1.5, kappa 43. This H0 rescaled gene by gene so
that its (mu_g, W_g, s_g) blocks are the working model's: spread 1.6, 14 outliers. Yet in the fit
(steps to the certificate; this H0: 40 on real 2000 x 200, 58 on real 2000 x 1000, k = 10, 15 on
the simulated 2000 x 1000):
- on real 2000 x 200, the working model's own per-gene blocks took 135 steps (27 cross-gene
  directions, moves of mu along W and of W within its column space, sit at 0.005-0.14 of the
  median); the whole working model from the start, 71-78 (far from the optimum the observed
  information is a poor metric), and switched in after 20 steps of this H0, 37;
- the rescaled H0 switched in after 10 steps, 34, 85 and 15 steps (frozen at the switch, 59 on
  2000 x 1000).
Rebuilding this H0 every 5 steps instead of every step left the steps unchanged (57 against 58 on
2000 x 1000; never rebuilt: 119). The steps left come from the change of the Hessian along the
path and from the certificate's tail, not from the model of the Hessian at the optimum.
"""

from __future__ import annotations

import numpy as np

from .. import truncnorm
from ..lowrank import LowRankCov

__all__ = ["diagonal_curvature", "FisherPreconditioner", "eta_prior_variance", "preconditioner",
           "effective_rate"]

#: damping delta of K in the W block, relative to its mean eigenvalue tr(K)/k
DAMPING = 1e-3


def diagonal_curvature(info_mu: np.ndarray, N: int, s: np.ndarray, grad_d: np.ndarray, k: int) -> np.ndarray:
    """Diagonal curvature estimate of F = -L on z = (mu, vec W, s) (length G (k + 2)): with
    h_g = info_mu_g / N = mean_c (lambda - lambda^2 diag A^{-1} - q^2/s)_g the observed information
    of mu_g, curvature h_g for mu_g and for each W_ga, and 2 s_g^2 h_g^2 + max(-2 dL/dd_g, 0) for
    s_g (the Fisher information 1/(2 d^2) of a variance times (dd/ds)^2 = 4 s^2, plus the 2 F_d term
    of F_ss that dominates for genes pressing on the floor). Floored at 1e-3 x its median (keeps
    coordinates with almost no information from taking huge trial steps)."""
    h = np.maximum(np.asarray(info_mu, dtype=float) / N, 0.0)
    # F_ss = 4 s^2 F_dd + 2 F_d: near s = 0 (a gene pressing on the floor, dL/dd < 0) the second
    # term dominates; without it those genes creep to the floor geometrically
    curv = np.concatenate([h, np.repeat(h, k), 2.0 * s * s * h * h + np.maximum(-2.0 * grad_d, 0.0)])
    return np.maximum(curv, 1e-3 * max(float(np.median(curv)), 1e-300))


class FisherPreconditioner:
    """H0 of the module docstring as a callable on z-vectors (mu, vec W, s) of length G (k + 2).

    ``rate`` (G,): lambdatilde_g, the noise of gene g is e_g = 1 / lambdatilde_g
    (``effective_rate``); ``eta_var``: v, the mean prior variance of eta (0 without capture);
    ``s_inv_curv`` (G,): the inverse curvature of the s block."""

    def __init__(self, W: np.ndarray, d: np.ndarray, rate: np.ndarray, eta_var: float,
                 s_inv_curv: np.ndarray, damping: float = DAMPING) -> None:
        G, k = W.shape
        self.G, self.k = G, k
        diag = d + 1.0 / np.maximum(np.asarray(rate, dtype=float), 1e-12)
        # C = U U^T + diag(d + e), U = [W, sqrt(v) 1]
        self.U = W if eta_var <= 0 else np.column_stack([W, np.full(G, np.sqrt(eta_var))])
        self.diag = diag
        B = LowRankCov(self.U, diag).inv_mv(W.T).T  # C^{-1} W (G, k)
        K = W.T @ B
        K = 0.5 * (K + K.T)
        self.K_inv = np.linalg.inv(K + damping * max(float(np.trace(K)) / k, 1e-300) * np.eye(k))
        self.s_inv_curv = np.asarray(s_inv_curv, dtype=float)

    def _C(self, X: np.ndarray) -> np.ndarray:
        """C X for X (G,) or (G, m)."""
        if X.ndim == 1:
            return self.U @ (self.U.T @ X) + self.diag * X
        return self.U @ (self.U.T @ X) + self.diag[:, None] * X

    def __call__(self, q: np.ndarray) -> np.ndarray:
        G, k = self.G, self.k
        out = np.empty_like(q)
        out[:G] = self._C(q[:G])
        out[G:G + G * k] = (self._C(q[G:G + G * k].reshape(G, k)) @ self.K_inv).ravel()
        out[G + G * k:] = self.s_inv_curv * q[G + G * k:]
        return out


def eta_prior_variance(capture, log_anchor: np.ndarray | None) -> float:
    """v = mean_c Var(eta_c), eta_c ~ TruncNormal(log M0 - log L_c, sigma_M, low = 0); 0 without
    capture."""
    if capture is None or log_anchor is None:
        return 0.0
    return float(np.mean(truncnorm.variance(capture.prior_mean(log_anchor), capture.sigma_M)))


def preconditioner(ev, z: np.ndarray, G: int, k: int, from_z, eta_var: float, kind: str = "fisher"):
    """H0 at z from the evaluator's last evaluation (at z): a ``FisherPreconditioner`` (``kind``
    "fisher", when the evaluation carries lambda sums; ``eta_var`` from ``eta_prior_variance``),
    else the diagonal 1 / ``diagonal_curvature`` as an array; None before any evaluation with
    gradient. ``from_z`` maps z to (mu, W, d)."""
    last = ev.last_evaluation
    if last is None or last.terms.info_mu is None:
        return None
    terms, grad = last.terms, last.grad
    s = z[G + G * k:]
    D = 1.0 / diagonal_curvature(terms.info_mu, ev.N, s, grad["d"], k)
    if kind != "fisher" or terms.rate_info is None:
        return D
    _, W, d = from_z(z, G, k)
    rate = effective_rate(terms.rate_info / ev.N, LowRankCov(W, d).diag())
    return FisherPreconditioner(W, d, rate, eta_var, D[G + G * k:])


def effective_rate(info_mean: np.ndarray, sigma_diag: np.ndarray) -> np.ndarray:
    """lambdatilde_g with 1 / (Sigma_gg + 1 / lambdatilde_g) = m_g, m_g = ``info_mean`` =
    mean_c lambda_cg / (1 + lambda_cg Sigma_gg) (``LaplaceTerms.rate_info`` / N):

        1 / lambdatilde_g = 1 / m_g - Sigma_gg    (>= 0, since m_g <= 1 / Sigma_gg)

    The noise 1 / lambdatilde_g is floored at 1e-12 and capped at 1e12 (a gene with no counts)."""
    m = np.maximum(np.asarray(info_mean, dtype=float), 1e-300)
    noise = np.clip(1.0 / m - np.asarray(sigma_diag, dtype=float), 1e-12, 1e12)
    return 1.0 / noise
