"""The global parameters of the PLN model with capture, as one small validated structure.

Notation (seed ``pln-model.md``)::

    x^(c)   ~ N(mu, Sigma),   Sigma = W W^T + diag(d),   W in R^{G x k},  d > 0
    eta^(c) ~ TruncN(log M0 - log L_c, sigma_M^2, low = 0)          (capture loss)
    u_g^(c) | x, eta ~ Poisson(exp(x_g^(c) - eta^(c)))

``M0 = None`` switches capture off: eta is then fixed at 0 and u_g ~ Poisson(exp(x_g)).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .lowrank import sigma_dense, sigma_diag

__all__ = ["PLNParams", "Capture"]


@dataclass(frozen=True)
class Capture:
    """Capture prior settings: eta ~ TruncN(log M0 - log L, sigma_M^2, low=0).

    M0 is the prior median total mRNA per cell, sigma_M the prior SD of log capture loss.
    """

    M0: float
    sigma_M: float = 0.5

    def __post_init__(self) -> None:
        if not (np.isfinite(self.M0) and self.M0 > 0):
            raise ValueError(f"capture M0 must be a positive finite number, got {self.M0!r}")
        if not (np.isfinite(self.sigma_M) and self.sigma_M > 0):
            raise ValueError(f"capture sigma_M must be a positive finite number, got {self.sigma_M!r}")

    def prior_mean(self, log_anchor: np.ndarray) -> np.ndarray:
        """m_c = log M0 - log L_c, the location of each cell's capture prior."""
        return np.log(self.M0) - np.asarray(log_anchor, dtype=float)


def _as_float_array(name: str, value, ndim: int) -> np.ndarray:
    arr = np.array(value, dtype=float, copy=True)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-d array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class PLNParams:
    """Globals theta = (mu, W, d) and optional capture settings.

    Attributes
    ----------
    mu : (G,) prior mean of the log-rates.
    W : (G, k) loadings, k < G.
    d : (G,) positive residual variances.
    capture : Capture or None (None = no capture, eta = 0).
    """

    mu: np.ndarray
    W: np.ndarray
    d: np.ndarray
    capture: Capture | None = field(default=None)

    def __post_init__(self) -> None:
        mu = _as_float_array("mu", self.mu, 1)
        W = _as_float_array("W", self.W, 2)
        d = _as_float_array("d", self.d, 1)
        G = mu.shape[0]
        if G < 1:
            raise ValueError("mu must have at least one gene")
        if W.shape[0] != G:
            raise ValueError(f"shape mismatch: W has {W.shape[0]} rows but mu has G={G} entries")
        if d.shape[0] != G:
            raise ValueError(f"shape mismatch: d has {d.shape[0]} entries but mu has G={G}")
        if W.shape[1] >= G:
            raise ValueError(f"rank k={W.shape[1]} must be smaller than the number of genes G={G}")
        if np.any(d <= 0):
            raise ValueError(f"d must be strictly positive; {int(np.sum(d <= 0))} entries are <= 0")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "W", W)
        object.__setattr__(self, "d", d)
        if self.capture is not None and not isinstance(self.capture, Capture):
            raise ValueError("capture must be a pln_ref.Capture or None")

    @property
    def G(self) -> int:
        return self.mu.shape[0]

    @property
    def k(self) -> int:
        return self.W.shape[1]

    def with_capture(self, capture: Capture | None) -> "PLNParams":
        return replace(self, capture=capture)

    def sigma_diag(self) -> np.ndarray:
        """diag(Sigma)_g = sum_a W_ga^2 + d_g (O(Gk); ``lowrank.sigma_diag``)."""
        return sigma_diag(self.W, self.d)

    def sigma_dense(self) -> np.ndarray:
        """Dense Sigma = W W^T + diag(d): G x G, for small G / tests / on request only
        (``lowrank.sigma_dense``)."""
        return sigma_dense(self.W, self.d)

    def correlation_dense(self) -> np.ndarray:
        """Dense gene-gene correlation of x: Sigma_gh / sqrt(Sigma_gg Sigma_hh)."""
        s = np.sqrt(self.sigma_diag())
        return self.sigma_dense() / np.outer(s, s)
