"""Pareto-smoothed importance sampling diagnostics for per-cell approximate posteriors.

For cell c with draws (x_s, eta_s) ~ q_c (Laplace, VAE, ...), the log importance ratios are

    log r_sc = log p(u_c, x_s, eta_s | theta) - log q_c(x_s, eta_s)

where log p is the exact, normalised log joint of ``pln_cell`` (``pln_ref.model.log_joint``,
or equivalently BridgeStan's ``log_density`` on the unconstrained draws minus the Jacobian
log eta). The Pareto shape k-hat of the largest ratios (Yao et al. 2018; Vehtari et al. 2024,
``arviz.psislw``) says whether q_c is close enough to the exact posterior for importance
sampling: k-hat < 0.5 good, < 0.7 usable, larger means the approximation's tails are too light.
The PSIS-reweighted draws give improved posterior means and SDs.

``psis``, ``psis_moments``, ``PsisResult`` and ``exact_log_joint_draws`` live in
``pln_ref.importance`` (the fitting code uses them) and are re-exported here; this module adds
the BridgeStan density path and ``cell_psis``.
"""

from __future__ import annotations

import numpy as np

# the implementation lives in the fitting package (pln_ref.importance); re-exported here
from ..importance import PsisResult, exact_log_joint_draws, psis, psis_moments  # noqa: F401

__all__ = [
    "PsisResult",
    "psis",
    "psis_moments",
    "exact_log_joint_draws",
    "bridgestan_log_joint_draws",
    "cell_psis",
]


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
