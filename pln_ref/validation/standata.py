"""Data dicts of the Stan programs ``stan/pln_cell.stan`` and ``stan/pln_joint.stan``, their
initial values and the unconstrained parameter vector of ``pln_cell``.

These translate a PLN data set (counts, :class:`pln_ref.params.PLNParams`, anchors) into what
the Stan programs declare; :mod:`pln_ref.validation.engines` runs the programs on them.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..params import PLNParams

__all__ = ["pln_cell_data", "pln_cell_unconstrain", "pln_joint_data", "pln_joint_inits"]


def _counts_int(counts) -> np.ndarray:
    from ..data import as_counts

    arr = as_counts(counts)  # NaN, inf, negative, non-integer, shape: ValueError naming it
    if arr.max() > np.iinfo(np.int32).max:
        raise ValueError("counts exceed Stan's 32-bit integer range")
    return arr.astype(np.int64)


def _log_anchor(counts: np.ndarray, log_anchor) -> np.ndarray:
    """log L_c by the one anchor policy (``pln_ref.anchor.resolve_log_anchor``)."""
    from ..anchor import resolve_log_anchor

    return resolve_log_anchor(counts, None if log_anchor is None else np.asarray(log_anchor, float).reshape(-1))


def pln_cell_data(counts, params: PLNParams, log_anchor) -> dict:
    """Data dict of ``stan/pln_cell.stan``: u, mu, W, d, log_M0, sigma_M, log_L = log_anchor.

    ``params.capture`` must be set (pln_cell always has eta > 0 with the TruncN prior).
    """
    if not isinstance(params, PLNParams):
        raise ValueError("params must be a pln_ref.params.PLNParams")
    if params.capture is None:
        raise ValueError("pln_cell needs a capture prior: params.capture is None (use params.with_capture(Capture(M0)))")
    u = _counts_int(counts)
    N, G = u.shape
    if G != params.G:
        raise ValueError(f"counts have G={G} genes but params have G={params.G}")
    return {
        "N": N, "G": G, "k": params.k, "u": u,
        "mu": np.asarray(params.mu, float), "W": np.asarray(params.W, float), "d": np.asarray(params.d, float),
        "log_M0": float(np.log(params.capture.M0)), "sigma_M": float(params.capture.sigma_M),
        "log_L": _log_anchor(u, log_anchor),
    }


def pln_cell_unconstrain(x, eta) -> np.ndarray:
    """theta_unc of pln_cell: (x[1], ..., x[N]) cell-major (C order of the (N, G) array), then log eta."""
    x = np.asarray(x, dtype=float)
    eta = np.asarray(eta, dtype=float).reshape(-1)
    if x.ndim != 2:
        raise ValueError(f"x must be (N, G), got shape {x.shape}")
    if eta.shape != (x.shape[0],):
        raise ValueError(f"eta must have N={x.shape[0]} entries, got shape {eta.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(eta))):
        raise ValueError("x or eta contains NaN or inf")
    if np.any(eta <= 0):
        raise ValueError("eta must be > 0 (pln_cell declares eta with lower=0)")
    return np.concatenate([x.ravel(order="C"), np.log(eta)])


def pln_joint_data(
    counts,
    k: int,
    *,
    capture=None,
    log_anchor=None,
    mu_loc=None,
    mu_scale: float = 2.5,
    w_scale: float = 1.0,
    d_loc: float = float(np.log(0.2)),
    d_scale: float = 1.0,
    centred: bool = False,
) -> dict:
    """Data dict of ``stan/pln_joint.stan``.

    centred=False (default, measured to mix best, see the top of pln_joint.stan):
    x^(c) = mu + W z^(c) + sqrt(d) * e^(c) with z, e standard normal; centred=True: x is the
    parameter and log N(x | mu, Sigma) is evaluated by Woodbury (its log density then equals
    priors + sum_c log_joint_c + Jacobians exactly, which the equivalence test checks).

    Priors (weakly informative):
        mu_g  ~ N(mu_loc_g, mu_scale^2)    default mu_loc_g = log(mean_c u_cg + 0.5) + mean_c m_c
                                           (data-dependent guess; pass a fixed mu_loc for SBC)
        W_ga  ~ N(0, w_scale^2)            (rotation-invariant; identified output W_id, Sigma)
        d_g   ~ LogNormal(d_loc, d_scale^2) default median 0.2, 95% in (0.03, 1.4): zero density
                                           at d = 0 keeps away from the Heywood boundary
        eta_c ~ TruncN(log M0 - log L_c, sigma_M^2, low=0) if capture (a pln_ref.Capture) is given
    log_anchor defaults to the log realised total counts log(sum_g u_cg) (empirical Bayes; an SBC
    must pass the exogenous anchor it simulated from), by the one anchor policy (``pln_ref.anchor``).
    """
    from ..params import Capture

    u = _counts_int(counts)
    N, G = u.shape
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < G:
        raise ValueError(f"k must be an integer with 1 <= k < G={G}, got {k!r}")
    if capture is not None and not isinstance(capture, Capture):
        raise ValueError("capture must be a pln_ref.Capture or None")
    # the anchor enters only the capture prior: without capture log_L is unused (zeros)
    la = _log_anchor(u, log_anchor) if capture is not None or log_anchor is not None else np.zeros(N)
    if capture is not None:
        log_M0, sigma_M = float(np.log(capture.M0)), float(capture.sigma_M)
        shift = float(np.mean(log_M0 - la))
    else:
        log_M0, sigma_M, shift = 0.0, 1.0, 0.0
    if mu_loc is None:
        mu_loc = np.log(u.mean(axis=0) + 0.5) + shift
    mu_loc = np.asarray(mu_loc, dtype=float).reshape(-1)
    if mu_loc.shape != (G,) or not np.all(np.isfinite(mu_loc)):
        raise ValueError(f"mu_loc must be {G} finite numbers")
    for name, val in (("mu_scale", mu_scale), ("w_scale", w_scale), ("d_scale", d_scale)):
        if not (np.isfinite(val) and val > 0):
            raise ValueError(f"{name} must be positive and finite, got {val!r}")
    if not np.isfinite(d_loc):
        raise ValueError(f"d_loc must be finite, got {d_loc!r}")
    return {
        "N": N, "G": G, "k": int(k), "u": u, "capture": int(capture is not None),
        "log_M0": log_M0, "sigma_M": sigma_M, "log_L": la,
        "mu_loc": mu_loc, "mu_scale": float(mu_scale), "w_scale": float(w_scale),
        "d_loc": float(d_loc), "d_scale": float(d_scale), "centred": int(bool(centred)),
    }


def pln_joint_inits(data: Mapping[str, Any], params: PLNParams, x, eta=None) -> dict:
    """Constrained initial values of pln_joint for either parameterisation.

    centred: x_c = x.  Non-centred: z = 0 and e = (x - mu) / sqrt(d), so that
    x = mu + W z + sqrt(d) e reproduces x exactly.  eta is required iff data["capture"] == 1.
    """
    N, G, k = int(data["N"]), int(data["G"]), int(data["k"])
    x = np.asarray(x, dtype=float)
    if x.shape != (N, G):
        raise ValueError(f"x must have shape ({N}, {G}), got {x.shape}")
    if params.G != G or params.k != k:
        raise ValueError(f"params have (G, k) = ({params.G}, {params.k}) but data have ({G}, {k})")
    capture = int(data["capture"]) == 1
    if capture:
        if eta is None:
            raise ValueError("eta is required when data['capture'] == 1")
        eta = np.asarray(eta, dtype=float).reshape(-1)
        if eta.shape != (N,) or np.any(eta <= 0):
            raise ValueError(f"eta must be {N} positive numbers")
    centred = int(data.get("centred", 0)) == 1
    out = {"mu": params.mu, "W": params.W, "d": params.d,
           "x_c": x if centred else np.zeros((0, G)),
           "z": np.zeros((0 if centred else N, k)),
           "e": np.zeros((0, G)) if centred else (x - params.mu) / np.sqrt(params.d),
           "eta": eta if capture else np.zeros(0)}
    return out
