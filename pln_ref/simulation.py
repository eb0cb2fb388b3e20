"""Exact forward simulation of the PLN model with (optional) capture, anchor exogenous.

Generative order for one cell c (seed ``pln-model.md`` + notes "the capture prior uses the data"):

    1. anchor   L_c                       (exogenous covariate: given, or drawn, never the realised sum)
    2. eta_c    ~ TruncN(log M0 - log L_c, sigma_M^2, low = 0)     (capture loss; 0 without capture)
    3. x_c      = mu + W z_c + sqrt(d) * eps_c,  z_c ~ N(0, I_k), eps_c ~ N(0, I_G)
                                                 => x_c ~ N(mu, Sigma), Sigma = W W^T + diag(d)
    4. u_cg     ~ Poisson(exp(x_cg - eta_c))

Inference that should be exactly consistent with the simulation must receive ``log_anchor``
(``Simulation.log_anchor``), not log(sum_g u_cg).

Default anchor (capture on, neither ``library_size`` nor ``log_anchor`` given): derived from the
parameters, ``L_c = M0 * kappa_c`` with the nominal capture efficiency ``kappa_c`` log-uniform on
[0.05, 0.5] (``DEFAULT_EFFICIENCY_RANGE``). With ``random_params(..., capture=True)``,
M0 = E[sum_g exp(x_g)] is the expected total mRNA, so the realised library sum_g u_cg is of the same
order as L_c (about kappa_c M0 when the truncation at 0 is not active): the anchor is consistent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from . import truncnorm
from .anchor import resolve_log_anchor
from .lowrank import LowRankCov
from .params import Capture, PLNParams

__all__ = [
    "Simulation",
    "simulate",
    "random_params",
    "MAX_POISSON_RATE",
    "DEFAULT_EFFICIENCY_RANGE",
]

#: Largest Poisson rate exp(x - eta) the simulator accepts; above it ``simulate`` raises ValueError.
MAX_POISSON_RATE = 1e12
#: Default range of the nominal capture efficiency L_c / M0 (log-uniform) when no anchor is given.
DEFAULT_EFFICIENCY_RANGE = (0.05, 0.5)


@dataclass(frozen=True)
class Simulation:
    """One simulated data set.

    counts : (N, G) int64 observed u.
    x : (N, G) true log-rates.
    eta : (N,) true capture loss (0 without capture).
    log_anchor : (N,) the exogenous anchor log L_c used by the capture prior (pass it to inference,
        e.g. ``fit(..., library_size=sim.library_size)``); None without capture unless one was given.
    params : the true PLNParams.
    """

    counts: np.ndarray
    x: np.ndarray
    eta: np.ndarray
    log_anchor: np.ndarray | None
    params: PLNParams

    @property
    def n_cells(self) -> int:
        return self.counts.shape[0]

    @property
    def library_size(self) -> np.ndarray | None:
        """The anchor L_c = exp(log_anchor) of the capture prior (N,) (``pln_ref.anchor``)."""
        return None if self.log_anchor is None else np.exp(self.log_anchor)

    @property
    def total_counts(self) -> np.ndarray:
        """Realised total counts sum_g u_cg (N,) (not the anchor)."""
        return self.counts.sum(axis=1)

    def to_anndata(self):
        """AnnData with X = counts and every true quantity attached (anndata >= 0.10 API).

        obs: library_size (the anchor L_c) and log_anchor (when there is one), total_counts
             (realised), eta_true, capture_efficiency_true (= exp(-eta)).
        var: mu_true, d_true, sigma_gg_true.   obsm['x_true'] (N, G).   varm['W_true'] (G, k).
        uns['true_params']: mu, W, d, k, and M0 / sigma_M (only when capture is on).
        """
        import anndata as ad
        import pandas as pd

        p = self.params
        cols = {} if self.log_anchor is None else {"library_size": self.library_size,
                                                    "log_anchor": self.log_anchor}
        obs = pd.DataFrame(
            {**cols, "total_counts": self.total_counts, "eta_true": self.eta,
             "capture_efficiency_true": np.exp(-self.eta)},
            index=[f"cell{i}" for i in range(self.n_cells)],
        )
        var = pd.DataFrame(
            {"mu_true": p.mu, "d_true": p.d, "sigma_gg_true": p.sigma_diag()},
            index=[f"gene{g}" for g in range(p.G)],
        )
        true = {"mu": np.array(p.mu), "W": np.array(p.W), "d": np.array(p.d), "k": int(p.k)}
        if p.capture is not None:
            true["M0"] = float(p.capture.M0)
            true["sigma_M"] = float(p.capture.sigma_M)
        adata = ad.AnnData(
            X=np.asarray(self.counts),
            obs=obs,
            var=var,
            obsm={"x_true": np.asarray(self.x)},
            varm={"W_true": np.array(p.W)},
            uns={"true_params": true},
        )
        return adata


def _resolve_anchor(params: PLNParams, n_cells: int, rng, library_size, log_anchor) -> np.ndarray | None:
    """The given anchor (``anchor.resolve_log_anchor``), or with capture and none given the default
    L_c = M0 kappa_c (module docstring); None without capture and no anchor."""
    if library_size is not None or log_anchor is not None:
        return resolve_log_anchor(n_cells, log_anchor, library_size=library_size)
    if params.capture is None:
        return None
    lo, hi = DEFAULT_EFFICIENCY_RANGE
    log_kappa = rng.uniform(np.log(lo), np.log(hi), size=n_cells)
    return np.log(params.capture.M0) + log_kappa


def simulate(
    params: PLNParams,
    n_cells: int,
    *,
    seed,
    library_size=None,
    log_anchor=None,
) -> Simulation:
    """Draw ``n_cells`` cells from the PLN model (see module docstring for the exact order).

    ``library_size`` (N,) or scalar: anchor L_c; ``log_anchor``: its log (give at most one). With
    capture and neither given, L_c = M0 * kappa_c, kappa_c log-uniform on [0.05, 0.5].
    ``seed``: anything ``np.random.default_rng`` accepts (int, SeedSequence, Generator).
    Raises ValueError if any Poisson rate exp(x - eta) exceeds ``MAX_POISSON_RATE`` (1e12).
    Memory: O(N G); no G x G array is formed.
    """
    if not isinstance(params, PLNParams):
        raise ValueError("params must be a pln_ref.PLNParams")
    n_cells = int(n_cells)
    if n_cells < 1:
        raise ValueError(f"n_cells must be >= 1, got {n_cells}")
    rng = np.random.default_rng(seed)

    la = _resolve_anchor(params, n_cells, rng, library_size, log_anchor)
    if params.capture is not None:
        m = params.capture.prior_mean(la)
        eta = truncnorm.sample(m, params.capture.sigma_M, rng)
    else:
        eta = np.zeros(n_cells)

    x = params.mu + LowRankCov.from_params(params).sample(rng, n_cells)  # mu + W z + sqrt(d) eps

    log_rate = x - eta[:, None]
    max_log_rate = float(log_rate.max())
    if max_log_rate > np.log(MAX_POISSON_RATE):
        n_bad = int(np.sum(log_rate > np.log(MAX_POISSON_RATE)))
        raise ValueError(
            f"Poisson rate exp(x - eta) exceeds MAX_POISSON_RATE={MAX_POISSON_RATE:g} in {n_bad} entries "
            f"(max log-rate {max_log_rate:.2f}); reduce mu or Sigma"
        )
    counts = rng.poisson(np.exp(log_rate)).astype(np.int64)

    for a in (counts, x, eta, la):
        if a is not None:
            a.setflags(write=False)
    return Simulation(counts=counts, x=x, eta=eta, log_anchor=la, params=params)


def random_params(
    G: int,
    k: int,
    *,
    seed,
    mean_log_rate: float = 1.0,
    mu_sd: float = 0.5,
    capture: bool | float | Capture | None = False,
    sigma_M: float = 0.5,
    d_range: tuple[float, float] = (0.05, 0.5),
    loading_range: tuple[float, float] = (0.15, 0.5),
) -> PLNParams:
    """A realistic random parameter set for tests, benchmarks and demos.

    mu_g ~ N(mean_log_rate, mu_sd^2); d_g ~ U(d_range); W_g = r_g * v_g with v_g uniform on the unit
    sphere in R^k and r_g^2 ~ U(loading_range). Hence Sigma_gg = r_g^2 + d_g lies in
    [0.2, 1.0] by default, and the factor share r_g^2 / Sigma_gg is 23%..91%, so correlations
    Sigma_gh / sqrt(Sigma_gg Sigma_hh) are substantial (|corr| up to ~0.9) with both signs.

    capture: False/None -> no capture; True -> Capture(M0 = E[sum_g exp(x_g)]
    = sum_g exp(mu_g + Sigma_gg/2), sigma_M) (the expected total mRNA per cell, consistent with the
    simulator's default anchor); a float -> that M0; a Capture -> used as is.
    """
    G, k = int(G), int(k)
    if not (1 <= k < G):
        raise ValueError(f"need 1 <= k < G, got k={k}, G={G}")
    rng = np.random.default_rng(seed)
    mu = mean_log_rate + mu_sd * rng.standard_normal(G)
    d = rng.uniform(*d_range, size=G)
    v = rng.standard_normal((G, k))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    r2 = rng.uniform(*loading_range, size=G)
    W = np.sqrt(r2)[:, None] * v
    if capture is None or capture is False:
        cap = None
    elif capture is True:
        cap = Capture(M0=float(np.sum(np.exp(mu + 0.5 * (r2 + d)))), sigma_M=sigma_M)
    elif isinstance(capture, Capture):
        cap = capture
    else:
        cap = Capture(M0=float(capture), sigma_M=sigma_M)
    return PLNParams(mu=mu, W=W, d=d, capture=cap)
