"""New cells under fitted globals: their posteriors (``transform``) and their log-likelihood
(``score_samples``), for every result of the protocol (Laplace and VAE).

The fitted globals theta = (mu, W, d, capture) stay fixed; each new cell c gets the method's
posterior of its latents (x_c, eta_c) and a per-cell estimate of its marginal log-likelihood

    log p(u_c | theta) = log int int prod_g Poisson(u_cg | e^{x_g - eta}) N(x | mu, Sigma)
                                   TruncN(eta | log M0 - log L_c, sigma_M^2, low=0) dx deta

(exact normalising constants, log u! included; eta = 0 without capture). The anchor L_c of a new
cell is its own realised total count by default (the policy of ``pln_ref.anchor``) or
``library_size``.

Methods of ``score_samples``:

* ``"laplace"``: the Laplace evidence of the cell at its MAP (``fit_laplace.laplace_objective``:
  log p(u, xi*) - 1/2 log det(-H) + (G+1)/2 log 2 pi, with eta's integral restricted to eta >= 0),
  the objective the Laplace fit maximises; deterministic (Monte Carlo SE 0, no k-hat).
* ``"elbo"`` (VAE results): the closed-form ELBO of the encoder's q, a lower bound on log p.
* ``"is"``: importance sampling with the result's own posterior as proposal q (Laplace posterior
  for Laplace results, the VAE posterior for VAE results) against the exact joint density:
  log p_hat = log mean_s p(u, x_s, eta_s) / q(x_s, eta_s), its Monte Carlo SE and the PSIS k-hat
  per cell (``pln_ref.importance``). A cell with k-hat > 0.7 is *flagged*: its estimate (and SE)
  is unreliable and ``CellScores.summary`` reports it separately instead of averaging it in
  silently.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .anchor import resolve_log_anchor
from .counts import CountMatrix
from .exceptions import ConvergenceWarning
from .importance import KHAT_THRESHOLD, exact_log_joint_draws, is_log_evidence, psis
from .protocol import CellPosterior

__all__ = ["transform", "score_samples", "CellScores", "SCORE_METHODS"]

#: score_samples methods: "laplace" and "is" for every result, "elbo" for VAE results.
SCORE_METHODS = ("laplace", "elbo", "is")
_BLOCK_ENTRIES = 1 << 21  # draws x cells x genes per importance-sampling block (16 MB per array)


@dataclass
class CellScores:
    """Per-cell log-likelihood estimates of ``score_samples`` (module docstring).

    estimate : (N,) log p(u_c | theta) (or the ELBO); mc_se : (N,) Monte Carlo SE of the estimate
    (0 for the deterministic methods); khat : (N,) PSIS k-hat of the importance ratios (NaN for
    the deterministic methods); method, n_draws.
    """

    method: str
    estimate: np.ndarray
    mc_se: np.ndarray
    khat: np.ndarray
    n_draws: int = 0

    @property
    def flagged(self) -> np.ndarray:
        """Cells whose importance-sampling estimate is unreliable (k-hat > 0.7), (N,) bool."""
        return np.nan_to_num(self.khat, nan=0.0) > KHAT_THRESHOLD

    def mean(self, include_flagged: bool = True) -> float:
        """Mean estimate per cell (over all cells, or over the unflagged ones)."""
        keep = np.ones(self.estimate.shape, bool) if include_flagged else ~self.flagged
        return float(np.mean(self.estimate[keep])) if keep.any() else float("nan")

    def summary(self) -> dict:
        """Mean per cell with its between-cell SE and Monte Carlo SE; flagged cells reported."""
        e, n = self.estimate, self.estimate.size
        out = {"method": self.method, "n_cells": int(n), "n_draws": int(self.n_draws),
               "mean": float(e.mean()), "se_between_cells": float(e.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
               "mc_se_of_mean": float(np.sqrt(np.sum(self.mc_se**2)) / n),
               "n_flagged_khat_gt_0.7": int(self.flagged.sum())}
        if np.isfinite(self.khat).any():
            k = self.khat
            out.update({"share_khat_lt_0.5": float(np.mean(k < 0.5)),
                        "share_khat_lt_0.7": float(np.mean(k < 0.7)),
                        "khat_median": float(np.median(k)), "khat_max": float(np.max(k)),
                        "mean_unflagged": self.mean(include_flagged=False)})
        return out


def _counts_for(result, counts) -> CountMatrix:
    """The new counts as a ``CountMatrix`` (checked; kept in their storage, CSR stays CSR)."""
    u = CountMatrix(counts)
    G = result.params.G
    if u.shape[1] != G:
        raise ValueError(f"new counts have {u.shape[1]} genes but the model was fitted on G={G} genes")
    return u


def _log_anchor(result, u: CountMatrix, library_size, log_anchor) -> np.ndarray | None:
    """log L_c of the new cells (``anchor.resolve_log_anchor``); None without capture."""
    if result.params.capture is None:
        return None
    return resolve_log_anchor(u, log_anchor, library_size=library_size)


def _laplace_posteriors(result, u: CountMatrix, la, gtol=None, *, with_evidence: bool = False):
    """(posteriors, evidence or None) of the cells u at the result's globals, by blocks of cells
    (``outer.final.final_posteriors``: per cell x gene only the MAPs are kept)."""
    from .fit_laplace import evaluation_block_cells
    from .outer.final import final_posteriors

    gtol = float(gtol if gtol is not None else (result.settings or {}).get("gtol") or 1e-6)
    post, evidence = final_posteriors(u, result.params, la, gtol=gtol, with_evidence=with_evidence,
                                      block_cells=evaluation_block_cells(u.shape[1]))
    if not post.converged.all():
        warnings.warn(f"{int((~post.converged).sum())} of {post.N} new cells did not reach the Newton "
                      f"tolerance gtol={gtol:g}", ConvergenceWarning, stacklevel=3)
    return post, evidence


def transform(result, counts, library_size=None, *, log_anchor=None) -> CellPosterior:
    """Per-cell posteriors of new cells under the fitted globals of ``result``.

    counts (N, G) (array, sparse or AnnData, the fit's genes in the fit's order; read by blocks of
    cells, CSR stays CSR); library_size
    (N,) or scalar: the anchors L_c (default: each cell's total counts), or ``log_anchor``.
    Returns the method's posterior object, the same type as ``result.posterior``: Laplace
    ``CellPosteriors`` (per-cell Newton MAP of (x, eta) and its Laplace approximation, solved by
    blocks of cells; per cell x gene only the MAP is stored, ``outer.final.MapCellPosteriors``) or the
    VAE's ``VAEPosterior`` (one encoder pass).
    """
    u = _counts_for(result, counts)
    la = _log_anchor(result, u, library_size, log_anchor)
    if result.inference_method == "vae":
        return result.encode(u, la)
    return _laplace_posteriors(result, u, la)[0]


def _importance(post: CellPosterior, u, params, la, n_draws: int, rng) -> tuple[np.ndarray, ...]:
    """log p_hat, MC SE, k-hat per cell with ``post`` as proposal, in blocks of cells."""
    N, G = u.shape
    est, se, khat = np.empty(N), np.empty(N), np.empty(N)
    block = max(1, _BLOCK_ENTRIES // (n_draws * G))
    for lo in range(0, N, block):
        idx = np.arange(lo, min(N, lo + block))
        q = post.subset(idx)
        x, eta = q.sample(rng, n_draws)
        log_q = np.asarray(q.logpdf(x, eta), dtype=float)
        log_p = exact_log_joint_draws(u.block(lo, lo + idx.size), x, eta, params, None if la is None else la[idx])
        lr = log_p - log_q
        est[idx], se[idx] = is_log_evidence(lr)
        khat[idx] = psis(lr).khat
    return est, se, khat


def score_samples(result, counts, method: str | None = None, *, n_draws: int = 2000,
                  library_size=None, log_anchor=None, seed=0) -> CellScores:
    """Per-cell log p(u_c | theta) of (new) cells under the fitted globals (module docstring).

    method : "laplace" (Laplace evidence; the default for Laplace results), "elbo" (VAE results;
        their default) or "is" (importance sampling with the result's posterior as proposal,
        ``n_draws`` draws per cell, seeded by ``seed``).
    Returns a ``CellScores`` (estimate, mc_se, khat, flagged).
    """
    if method is None:
        method = "elbo" if result.inference_method == "vae" else "laplace"
    if method not in SCORE_METHODS:
        raise ValueError(f"method must be one of {', '.join(SCORE_METHODS)}, got {method!r}")
    if method == "elbo" and result.inference_method != "vae":
        raise ValueError('method="elbo" needs a VAE result; Laplace results score with "laplace" or "is"')
    u = _counts_for(result, counts)
    la = _log_anchor(result, u, library_size, log_anchor)
    N = u.shape[0]
    if method == "laplace":
        est = _laplace_posteriors(result, u, la, with_evidence=True)[1]
        return CellScores("laplace", est, np.zeros(N), np.full(N, np.nan))
    if method == "elbo":
        est = np.asarray(result.elbo(u, la), dtype=float)
        return CellScores("elbo", est, np.zeros(N), np.full(N, np.nan))
    n_draws = int(n_draws)
    if n_draws < 10:
        raise ValueError(f"n_draws must be >= 10 for importance sampling, got {n_draws}")
    post = result.encode(u, la) if result.inference_method == "vae" else _laplace_posteriors(result, u, la)[0]
    est, se, khat = _importance(post, u, result.params, la, n_draws, np.random.default_rng(seed))
    return CellScores("is", est, se, khat, n_draws=n_draws)
