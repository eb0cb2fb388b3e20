"""The anchor of the capture prior: one policy, one name.

The capture prior of cell c is eta_c ~ TruncN(log M0 - log L_c, sigma_M^2, low = 0). Its anchor
L_c is called the **library size** everywhere in pln-ref (``fit(..., library_size=)``,
``simulate(..., library_size=)``, ``Simulation.library_size``); the realised sum of a cell's counts
is called its **total counts** (``data.total_counts``, scanpy's ``total_counts``). By default the
anchor is the realised total (the empirical-Bayes plug-in of real data); simulation and SBC pass
the exogenous anchor they drew.

Policy for a cell whose anchor is 0 (an all-zero cell with the default anchor): a ValueError
naming the cells, never a silent floor. log L_c must be finite for every cell.
"""

from __future__ import annotations

import numpy as np

__all__ = ["resolve_log_anchor"]


def resolve_log_anchor(counts, log_anchor=None, *, library_size=None) -> np.ndarray:
    """log L_c for every cell, shape (N,).

    ``library_size`` (N,) or scalar: the anchor L_c (positive, finite); ``log_anchor``: its log
    (finite); give at most one. Neither: L_c = sum_g u_cg, the realised total counts, which must
    be positive for every cell. ``counts``: (N, G) array, scipy.sparse matrix or
    ``pln_ref.counts.CountMatrix`` (only its row sums
    and its number of rows are used), or the number of cells N when an anchor is given.
    """
    N = int(counts) if isinstance(counts, (int, np.integer)) else counts.shape[0]
    if library_size is not None and log_anchor is not None:
        raise ValueError("give either library_size or log_anchor, not both")
    if library_size is not None:
        L = _per_cell("library_size", library_size, N)
        if np.any(~np.isfinite(L)) or np.any(L <= 0):
            bad = np.flatnonzero(~(np.isfinite(L) & (L > 0)))
            raise ValueError(f"library_size must be positive and finite for every cell; "
                             f"{bad.size} are not (cells {_first(bad)})")
        return np.log(L)
    if log_anchor is not None:
        la = _per_cell("log_anchor", log_anchor, N)
        if np.any(~np.isfinite(la)):
            bad = np.flatnonzero(~np.isfinite(la))
            raise ValueError(f"log_anchor contains NaN or inf for {bad.size} cells (cells {_first(bad)}); "
                             "a library size of 0 has no log")
        return la
    if isinstance(counts, (int, np.integer)):
        raise ValueError("no counts to take the default anchor from: pass library_size")
    if hasattr(counts, "total_counts"):  # a pln_ref.counts.CountMatrix
        L = counts.total_counts()
    else:
        L = np.asarray(counts.sum(axis=1), dtype=float).reshape(-1)
    if np.any(L <= 0):
        bad = np.flatnonzero(L <= 0)
        raise ValueError(
            f"{bad.size} cells have zero library size (all-zero cells {_first(bad)}: their total counts, "
            "the default anchor of the capture prior, are 0); remove these cells or pass library_size")
    return np.log(L)


def _per_cell(name: str, value, N: int) -> np.ndarray:
    arr = np.asarray(value, dtype=float)
    if arr.ndim == 0:
        return np.full(N, float(arr))
    if arr.shape != (N,):
        raise ValueError(f"{name} must have shape ({N},) (one entry per cell) or be a scalar, got shape {arr.shape}")
    return arr.copy()


def _first(idx: np.ndarray, n: int = 10) -> str:
    s = ", ".join(str(i) for i in idx[:n])
    return s + (f", ... ({idx.size - n} more)" if idx.size > n else "")
