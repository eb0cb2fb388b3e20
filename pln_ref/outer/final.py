"""The posteriors and the per-cell evidence at the fitted globals, by blocks of cells.

After the outer optimisation every cell's MAP is solved once more at the final globals (warm
started from the optimiser's MAPs) and its Laplace evidence l_c is evaluated. Done for all cells at
once this holds every N x G work array of Newton and of ``laplace_terms`` together (issue 13: the
largest peak of a fit). ``final_posteriors`` runs Newton and the evidence one block of cells at a
time and keeps, per cell x gene, only the MAP x* (written into the warm start's array when it is
given). The precision A_c = diag(lambda_c) + Sigma^{-1} is kept as its k x k factor; lambda =
exp(x* - eta*), the derived diagonals (``MapPrecision``) and bbar = A^{-1} Sigma^{-1} 1
(``MapCellPosteriors``) are recomputed on access. ``map_posteriors`` builds the same objects from
stored MAPs (a saved result), block by block.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..counts import CountMatrix
from ..laplace import PER_CELL_FIELDS, CellPosteriors, newton_map
from ..lowrank import LowRankCov, PosteriorPrecision
from ..model import eta_bbar, eta_schur
from ..params import PLNParams
from .evaluate import laplace_objective

__all__ = ["MapPrecision", "MapCellPosteriors", "FinalPosteriors", "final_posteriors", "final_block",
           "assemble_final", "map_posteriors"]



class MapPrecision(PosteriorPrecision):
    """``PosteriorPrecision`` at the MAPs that stores no N x G array of its own: lambda =
    exp(x_map - eta_map), r = 1 / (1 + lambda d) and m = lambda + 1/d are recomputed from the
    (shared) MAP arrays on access; S_c and its Cholesky factor (N x k x k) are stored."""

    def __init__(self, cov: LowRankCov, x_map: np.ndarray, eta_map: np.ndarray, S: np.ndarray,
                 L_S: np.ndarray) -> None:
        self.cov, self.S, self.L_S = cov, S, L_S
        self._x, self._eta = x_map, eta_map

    @property
    def lam(self) -> np.ndarray:
        """lambda_c = exp(x_c - eta_c), (N, G), computed on access."""
        return np.exp(self._x - self._eta[:, None])

    @property
    def r(self) -> np.ndarray:
        """1 / (1 + lambda d), (N, G), computed on access."""
        return 1.0 / (1.0 + self.lam * self.cov.d)

    @property
    def m(self) -> np.ndarray:
        """lambda + 1/d, (N, G), computed on access."""
        return self.lam + self.cov.dinv


class MapCellPosteriors(CellPosteriors):
    """``CellPosteriors`` (precision a ``MapPrecision``) that stores no N x G array beyond x_map:
    bbar = A^{-1} Sigma^{-1} 1 (capture only) is recomputed on access (``model.eta_bbar``, one
    O(N G k) solve); construct with ``bbar=None``."""

    @property
    def bbar(self) -> np.ndarray | None:
        return None if self.params.capture is None else eta_bbar(self.precision)

    @bbar.setter
    def bbar(self, value) -> None:
        if value is not None:
            raise AttributeError("MapCellPosteriors.bbar is derived from the MAPs; pass bbar=None")

    def subset(self, idx) -> "MapCellPosteriors":
        """The posteriors of a subset of cells (index, slice or boolean mask), again a
        ``MapCellPosteriors``: only the subset's rows are read (no all-cell lambda or bbar is
        derived, so a block of cells costs a block)."""
        P = self.precision
        f = self._sliced(idx, ("x_map",))
        return MapCellPosteriors(params=self.params, bbar=None, **f,
                                 precision=MapPrecision(P.cov, f["x_map"], f["eta_map"], P.S[idx], P.L_S[idx]))


class FinalPosteriors(NamedTuple):
    """``cells``: the posteriors of all cells (precision a ``MapPrecision``); ``evidence``: l_c (N,)
    (None when not asked for)."""

    cells: CellPosteriors
    evidence: np.ndarray | None


def final_block(u: np.ndarray, params: PLNParams, log_anchor: np.ndarray | None, x0: np.ndarray | None,
                eta0: np.ndarray | None, *, gtol: float, cov: LowRankCov, lgamma_sum: np.ndarray,
                with_evidence: bool = True) -> dict:
    """One block of cells of the final pass: ``laplace.newton_map`` of the dense counts ``u`` (n, G)
    from the warm start x0 / eta0 (any float dtype, or None), then its Laplace evidence. Returns
    only what the result keeps: {"x_map" (n, G) float64, "S", "L_S" (n, k, k), the ``PER_CELL_FIELDS``
    fields (None where the posterior has none), "evidence" (n,) or None}."""
    post = newton_map(u, params, log_anchor, x0=x0, eta0=eta0, gtol=gtol, cov=cov)
    out = {"x_map": post.x_map, "S": post.precision.S, "L_S": post.precision.L_S,
           **{name: getattr(post, name) for name in PER_CELL_FIELDS}, "evidence": None}
    if with_evidence:
        out["evidence"] = laplace_objective(u, params, log_anchor, post, with_grad=False,
                                            lgamma_sum=lgamma_sum)[0]
    return out


def assemble_final(params: PLNParams, blocks, N: int, *, x_map: np.ndarray | None = None,
                   with_evidence: bool = True) -> FinalPosteriors:
    """The ``FinalPosteriors`` of N cells from ``blocks``, an iterable of (slice of cells, dict of
    ``final_block``) consumed one block at a time (each block's arrays are copied into the kept
    arrays and dropped). ``x_map``: a writeable float64 or float32 (N, G) array to write the MAPs into
    (default: a new float64 one)."""
    cov = LowRankCov.from_params(params)
    G, k = cov.G, cov.k
    x_map = np.empty((N, G)) if x_map is None else x_map
    S, L_S = np.empty((N, k, k)), np.empty((N, k, k))
    per_cell = {name: None for name in PER_CELL_FIELDS}
    evidence = np.empty(N) if with_evidence else None
    for sl, part in blocks:
        x_map[sl], S[sl], L_S[sl] = part["x_map"], part["S"], part["L_S"]
        if with_evidence:
            evidence[sl] = part["evidence"]
        for name in per_cell:
            val = part[name]
            if val is None:
                continue
            if per_cell[name] is None:
                per_cell[name] = np.empty(N, dtype=val.dtype)
            per_cell[name][sl] = val
        del part
    cells = MapCellPosteriors(params=params, x_map=x_map, bbar=None,
                              precision=MapPrecision(cov, x_map, per_cell["eta_map"], S, L_S), **per_cell)
    return FinalPosteriors(cells, evidence)


def final_posteriors(counts, params: PLNParams, log_anchor: np.ndarray | None, *,
                     x0: np.ndarray | None = None, eta0: np.ndarray | None = None,
                     gtol: float = 1e-6, block_cells: int, reuse_x0: bool = False,
                     with_evidence: bool = True, map_dtype="float64") -> FinalPosteriors:
    """Every cell's Laplace posterior (``laplace.newton_map`` from the warm start ``x0``/``eta0``)
    and Laplace evidence (``laplace_objective``) at ``params``, ``block_cells`` cells at a time.

    ``counts``: an array, scipy.sparse matrix or ``CountMatrix`` (read one dense block at a time).
    ``map_dtype``: storage of the result's x_map ("float64" or "float32"; each block is solved in
    float64). ``reuse_x0=True`` writes the MAPs into ``x0`` ((N, G) in ``map_dtype``) instead of a
    new array: the warm start is then overwritten (each block is read before it is written), and
    the fit holds one N x G MAP array instead of two.
    ``with_evidence=False``: the posteriors only (``evidence`` None; e.g. ``transform`` of new cells).
    Memory: the kept arrays (x_map, per-cell vectors and k x k factors) plus the work arrays of one
    block; a float32 warm start (``WARM_START_DTYPE`` of the blocked evaluation) is read block by
    block into float64."""
    u = CountMatrix(counts)
    N, G = u.shape
    if isinstance(block_cells, bool) or int(block_cells) < 1:
        raise ValueError(f"block_cells must be a positive integer, got {block_cells!r}")
    bc = int(block_cells)
    cov = LowRankCov.from_params(params)
    lgam = u.lgamma_sums()
    dt = np.dtype(map_dtype)
    if dt not in (np.float64, np.float32):
        raise ValueError(f"map_dtype must be float64 or float32, got {map_dtype!r}")
    if reuse_x0 and (x0 is None or x0.dtype != dt or x0.shape != (N, G) or not x0.flags.writeable):
        raise ValueError(f"reuse_x0 needs x0 as a writeable {dt} (N, G) array")

    def blocks():
        for lo in range(0, N, bc):
            sl = slice(lo, min(N, lo + bc))
            pick = lambda a: None if a is None else a[sl]  # noqa: E731
            yield sl, final_block(u.block(sl.start, sl.stop), params, pick(log_anchor), pick(x0), pick(eta0),
                                  gtol=gtol, cov=cov, lgamma_sum=lgam[sl], with_evidence=with_evidence)

    return assemble_final(params, blocks(), N, x_map=x0 if reuse_x0 else np.empty((N, G), dtype=dt),
                          with_evidence=with_evidence)


def map_posteriors(params: PLNParams, x_map: np.ndarray, eta_map: np.ndarray, *, block_cells: int,
                   **per_cell) -> MapCellPosteriors:
    """The Laplace posteriors at given MAPs (e.g. a saved result's), built block by block: per cell
    S_c = I + W^T diag(lambda r) W and its Cholesky factor, and with capture the eta Schur
    complement s = 1/sigma_M^2 + lambda^T bbar (``model.eta_schur``); nothing N x G is kept beyond
    ``x_map`` itself. ``per_cell``: the other (N,) fields of ``CellPosteriors`` (on_bound, converged,
    grad_norm, n_iter, objective, delta, log_anchor, converged_by); ``eta_map`` is used only with
    capture (None: zeros)."""
    N, G = x_map.shape
    eta_map = np.zeros(N) if eta_map is None else eta_map
    if isinstance(block_cells, bool) or int(block_cells) < 1:
        raise ValueError(f"block_cells must be a positive integer, got {block_cells!r}")
    bc = int(block_cells)
    cov = LowRankCov.from_params(params)
    k = cov.k
    S, L_S = np.empty((N, k, k)), np.empty((N, k, k))
    s = np.empty(N) if params.capture is not None else None
    for lo in range(0, N, bc):
        sl = slice(lo, min(N, lo + bc))
        with np.errstate(over="ignore"):
            lam = np.exp(x_map[sl] - eta_map[sl, None])
        A = PosteriorPrecision(cov, lam)
        S[sl], L_S[sl] = A.S, A.L_S
        if s is not None:
            s[sl] = eta_schur(A, 1.0 / params.capture.sigma_M**2).s
        del A, lam
    per_cell.setdefault("s", s)
    per_cell.setdefault("converged_by", None)
    return MapCellPosteriors(params=params, x_map=x_map, eta_map=eta_map, bbar=None,
                             precision=MapPrecision(cov, x_map, eta_map, S, L_S), **per_cell)
