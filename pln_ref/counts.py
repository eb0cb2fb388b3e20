"""A count matrix kept in its own storage and read by blocks of cells.

Every phase of a fit touches the counts u (N cells x G genes) only through

    a block of rows       u[lo:hi]                        (dense float64, one block at a time)
    per-cell sums         sum_g u_cg  and  sum_g log u_cg!  (log 0! = 0, so nonzeros only)
    per-gene reductions   means, variances, the centred Gram u_c^T u_c (G x G), products u V, u^T Y
                          (the method of moments), summed over blocks of cells

so the counts never need a dense N x G copy: ``CountMatrix`` keeps a dense array as it is, a
scipy.sparse matrix as CSR, and an AnnData opened backed (``anndata.read_h5ad(path, backed="r")``)
or a zarr store on disk, and hands out dense blocks. Values are checked (finite, non-negative,
integer) once, block by block, with the same one-line messages as ``data.as_counts``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
from scipy.special import gammaln

from .data import _check_values, _numeric, _raw_counts_hint, is_anndata

__all__ = ["CountMatrix", "DEFAULT_BLOCK_ENTRIES"]

DEFAULT_BLOCK_ENTRIES = 1 << 18  # cells x genes of one dense block (2 MB of float64)


def _resolve_source(data, layer: str | None):
    """(storage, what): the matrix behind ``data`` (AnnData .X / layer, or data itself)."""
    if not is_anndata(data):
        if layer is not None:
            raise ValueError("layer is only meaningful for AnnData input")
        return data, "counts"
    if layer is None:
        if data.X is None:
            raise ValueError(f"AnnData .X is None; pass layer=<name> (available layers: {sorted(data.layers.keys())})")
        return data.X, "counts (AnnData .X)"
    if layer not in data.layers:
        raise ValueError(f"unknown layer {layer!r}; available layers: {sorted(data.layers.keys())}")
    return data.layers[layer], f"counts (AnnData layer {layer!r})"


_LOG_FACTORIAL_MAX = 1 << 20  # largest table of log n! kept (8 MB); larger counts use gammaln
_log_factorial_table = np.zeros(0)


def _log_factorial(v: np.ndarray) -> np.ndarray:
    """log v! = gammaln(v + 1) of non-negative integer values v (float array, any shape): a lookup in
    a cached table of gammaln(n + 1), n = 0, 1, ... (grown to the next power of two above max v),
    which gives the same bits as gammaln at a tenth of its cost per entry; values above 2^20 use
    gammaln directly."""
    global _log_factorial_table
    if v.size == 0:
        return gammaln(v + 1.0)
    top = float(v.max())
    if top >= _LOG_FACTORIAL_MAX:
        return gammaln(v + 1.0)
    if top >= _log_factorial_table.size:
        n = max(1024, 1 << int(top).bit_length())
        _log_factorial_table = gammaln(np.arange(n) + 1.0)
    return _log_factorial_table.take(v.astype(np.intp))


def _row_sums(u, f) -> np.ndarray:
    """sum_g f(u_cg) per row of a dense or CSR block, for an elementwise f with f(0) = 0 (CSR: on
    the stored values only)."""
    if sp.issparse(u):
        rows = np.repeat(np.arange(u.shape[0]), np.diff(u.indptr))
        return np.bincount(rows, weights=f(np.asarray(u.data, dtype=np.float64)), minlength=u.shape[0])
    return f(u).sum(axis=1)


class _Rows:
    """Rows ``idx`` of a row-sliceable source (array, CSR, on-disk dataset), read on demand:
    ``rows[lo:hi]`` and ``rows[index_array]`` index the source at ``idx[...]`` (still increasing,
    as on-disk datasets require); no copy of the source."""

    def __init__(self, src, idx: np.ndarray) -> None:
        self.src, self.idx = src, idx
        self.shape = (int(idx.size), int(src.shape[1]))

    def __getitem__(self, key):
        return self.src[self.idx[key]]

    @property
    def nnz(self) -> int:  # CSR storage: the nonzeros of these rows
        return int(np.diff(self.src.indptr)[self.idx].sum())

    @property
    def T(self):  # CSR storage: the transposed rows (for rmatmul)
        return self.src[self.idx].T

    def __matmul__(self, V):  # CSR storage: (rows) @ V
        return self.src[self.idx] @ V


def shifted_sums(blocks, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum_c (u_c - shift), sum_c (u_c - shift)^2) per gene over dense float64 blocks of cells
    (modified in place): the sums of ``CountMatrix.column_moments``, also taken per partition on
    Dask workers (``outer.dask_eval``)."""
    s1, s2 = np.zeros(len(shift)), np.zeros(len(shift))
    for u in blocks:
        u -= shift
        s1 += u.sum(axis=0)
        s2 += np.einsum("cg,cg->g", u, u)
    return s1, s2


def centred_gram_sum(blocks, mean: np.ndarray) -> np.ndarray:
    """sum over dense float64 blocks (modified in place) of (u - 1 mean^T)^T (u - 1 mean^T), (G, G):
    ``CountMatrix.centred_gram``, also taken per partition on Dask workers."""
    out = np.zeros((len(mean), len(mean)))
    for u in blocks:
        u -= mean
        out += u.T @ u
    return out


class CountMatrix:
    """Counts u (N, G) in dense, CSR or on-disk (backed AnnData / zarr) storage.

    ``CountMatrix(data, layer=None)``: ``data`` a NumPy array / array-like, a scipy.sparse matrix or
    array (kept as CSR), an AnnData (``.X`` or ``.layers[layer]``, in memory or backed), or an
    object with ``shape`` and row slicing that returns arrays or sparse matrices (an h5py dataset,
    anndata's backed sparse dataset). Raises ValueError naming the problem for a non-2-D or empty
    matrix, a non-numeric dtype, NaN, inf, negative or non-integer values (checked block by block,
    so on-disk counts are never loaded whole).
    """

    def __init__(self, data, layer: str | None = None, *, block_entries: int = DEFAULT_BLOCK_ENTRIES) -> None:
        if isinstance(data, CountMatrix):
            self.__dict__.update(data.__dict__)
            return
        src, self.what = _resolve_source(data, layer)
        if sp.issparse(src):
            src = sp.csr_array(src)
            src.sum_duplicates()
            self.storage = "csr"
        elif isinstance(src, np.ndarray) or not (hasattr(src, "shape") and hasattr(src, "__getitem__")):
            src = np.asarray(src)
            self.storage = "dense"
        else:
            self.storage = "disk"
        shape = tuple(src.shape)
        if len(shape) != 2:
            raise ValueError(f"{self.what} must be 2-D (cells x genes), got shape {shape}")
        if shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"{self.what} are empty: shape {shape}")
        self._src = src
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.block_size = max(1, int(block_entries) // self.shape[1])
        self._total = np.empty(self.shape[0])
        self._lgamma = np.empty(self.shape[0])
        # one pass: check the values and keep the two per-cell sums the fit needs
        try:
            for sl, u in self._raw_blocks():
                self._total[sl] = u.sum(axis=1)
                self._lgamma[sl] = _row_sums(u, _log_factorial)
        except ValueError as e:
            if self.what == "counts (AnnData .X)" and ("non-integer" in str(e) or "negative" in str(e)):
                raise ValueError(f"{e}; .X looks normalised: {_raw_counts_hint(sorted(data.layers.keys()))}") from None
            raise

    # ------------------------------------------------------------------ reading
    def _raw_blocks(self) -> Iterator[tuple[slice, np.ndarray | sp.csr_array]]:
        """Checked float64 blocks in storage form (CSR stays CSR)."""
        N = self.shape[0]
        for lo in range(0, N, self.block_size):
            sl = slice(lo, min(N, lo + self.block_size))
            u = self._src[sl]
            if sp.issparse(u):
                u = sp.csr_array(u)
                vals = _numeric(np.asarray(u.data), self.what)
                _check_values(vals.astype(np.float64, copy=False), self.what)
                u = sp.csr_array((vals.astype(np.float64), u.indices, u.indptr), shape=u.shape)
            else:
                u = _numeric(np.asarray(u), self.what)
                _check_values(u.astype(np.float64, copy=False), self.what)
                u = np.asarray(u, dtype=np.float64)
            yield sl, u

    def block(self, lo: int, hi: int) -> np.ndarray:
        """Dense float64 copy of rows lo:hi (values were checked at construction)."""
        u = self._src[lo:hi]
        if sp.issparse(u):
            return np.asarray(u.toarray(), dtype=np.float64)
        return np.array(u, dtype=np.float64, copy=True, order="C")

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Dense float64 rows ``idx`` (sorted or not), e.g. a minibatch."""
        idx = np.asarray(idx, dtype=np.intp)
        if self.storage == "disk":  # h5py / backed datasets want increasing indices
            order = np.argsort(idx)
            out = np.empty((idx.size, self.shape[1]))
            src = self._src[np.sort(idx)]
            out[order] = src.toarray() if sp.issparse(src) else np.asarray(src, dtype=np.float64)
            return out
        u = self._src[idx]
        return np.asarray(u.toarray() if sp.issparse(u) else u, dtype=np.float64)

    def take(self, idx: np.ndarray) -> np.ndarray | sp.csr_array:
        """Rows ``idx`` (increasing cell indices) as a standalone matrix in storage form: a CSR
        array (float64 values) for CSR storage or sparse on-disk storage, a dense float64 array
        otherwise (e.g. a fold's cells shipped to a worker; only these rows are read)."""
        idx = np.asarray(idx, dtype=np.intp)
        if idx.ndim != 1 or (idx.size > 1 and np.any(np.diff(idx) <= 0)) \
                or (idx.size and (idx[0] < 0 or idx[-1] >= self.shape[0])):
            raise ValueError(f"take needs increasing cell indices in [0, {self.shape[0]}), got {idx.size} indices")
        if self.storage == "dense":
            return self.rows(idx)
        u = self._src[idx]
        if sp.issparse(u):
            u = sp.csr_array(u)
            return sp.csr_array((np.asarray(u.data, dtype=np.float64), u.indices, u.indptr), shape=u.shape)
        return np.asarray(u, dtype=np.float64)

    def subset(self, idx: np.ndarray) -> "CountMatrix":
        """The rows ``idx`` (increasing cell indices) as a CountMatrix in the same storage, without a
        copy of the counts: its blocks and rows are read from this matrix on demand (a sample of
        cells for ``pln_ref.outer.sampled``). The per-cell sums are taken from this matrix."""
        idx = np.asarray(idx, dtype=np.intp)
        if idx.ndim != 1 or idx.size == 0 or (idx.size > 1 and np.any(np.diff(idx) <= 0)) \
                or idx[0] < 0 or idx[-1] >= self.shape[0]:
            raise ValueError(f"subset needs increasing cell indices in [0, {self.shape[0]}), "
                             f"got {idx.size} indices")
        sub = object.__new__(CountMatrix)
        sub.__dict__.update(self.__dict__)
        sub._src = _Rows(self._src, idx)
        sub.shape = (int(idx.size), self.shape[1])
        sub._total, sub._lgamma = self._total[idx], self._lgamma[idx]
        return sub

    def blocks(self, block_size: int | None = None) -> Iterator[tuple[slice, np.ndarray]]:
        """(slice, dense block) over all cells in order; ``block_size`` cells each (default:
        about ``DEFAULT_BLOCK_ENTRIES`` entries per block)."""
        bs = self.block_size if block_size is None else max(1, int(block_size))
        N = self.shape[0]
        for lo in range(0, N, bs):
            hi = min(N, lo + bs)
            yield slice(lo, hi), self.block(lo, hi)

    # ------------------------------------------------------------------ per-cell sums
    def total_counts(self) -> np.ndarray:
        """sum_g u_cg per cell, shape (N,)."""
        return self._total.copy()

    def lgamma_sums(self) -> np.ndarray:
        """sum_g log(u_cg!) per cell, shape (N,): the constant of the Poisson log-likelihood."""
        return self._lgamma.copy()

    def saturated_loglik(self) -> np.ndarray:
        """sum_g (u_cg log u_cg - u_cg - log u_cg!) per cell, shape (N,): the Poisson log-likelihood
        of the saturated fit (rate = count), by blocks (on the nonzeros for CSR storage)."""
        from scipy.special import xlogy

        N, out = self.shape[0], np.empty(self.shape[0])
        for lo in range(0, N, self.block_size):
            hi = min(N, lo + self.block_size)
            u = self._src[lo:hi]
            u = sp.csr_array(u, dtype=np.float64) if sp.issparse(u) else np.asarray(u, dtype=np.float64)
            out[lo:hi] = _row_sums(u, lambda v: xlogy(v, v) - v - _log_factorial(v))
        return out

    def column_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-gene sample mean and variance (ddof=1; 0 for a single cell), shapes (G,), by blocks
        of cells (shifted by the first block's means, so no cancellation for large counts)."""
        N = self.shape[0]
        shift = self.block(0, min(N, self.block_size)).mean(axis=0)
        s1, s2 = shifted_sums((u for _, u in self.blocks()), shift)
        mean = s1 / N
        var = (s2 - N * mean * mean) / (N - 1) if N > 1 else np.zeros(self.shape[1])
        return mean + shift, var

    def centred_gram(self, mean: np.ndarray) -> np.ndarray:
        """(u - 1 mean^T)^T (u - 1 mean^T), shape (G, G), summed over dense blocks of cells (each
        block's product is one BLAS call; only one block of cells is dense at a time)."""
        return centred_gram_sum((u for _, u in self.blocks()), mean)

    def matmul(self, V: np.ndarray) -> np.ndarray:
        """u @ V for V (G, r) -> (N, r), without a dense copy of u (CSR product, or by blocks)."""
        V = np.asarray(V, dtype=np.float64)
        if self.storage == "csr":
            return np.asarray(self._src @ V)
        out = np.empty((self.shape[0],) + V.shape[1:])
        for sl, u in self.blocks():
            out[sl] = u @ V
        return out

    def rmatmul(self, Y: np.ndarray) -> np.ndarray:
        """u^T @ Y for Y (N, r) -> (G, r), without a dense copy of u (CSR product, or by blocks)."""
        Y = np.asarray(Y, dtype=np.float64)
        if self.storage == "csr":
            return np.asarray(self._src.T @ Y)
        out = np.zeros((self.shape[1],) + Y.shape[1:])
        for sl, u in self.blocks():
            out += u.T @ Y[sl]
        return out

    def toarray(self) -> np.ndarray:
        """The whole matrix dense (N x G float64): for small data and tests only."""
        return self.block(0, self.shape[0])

    @property
    def nnz_fraction(self) -> float:
        """Share of nonzero entries (1.0 for dense storage, where it is not tracked)."""
        if self.storage == "csr":
            return self._src.nnz / float(self.shape[0] * self.shape[1])
        return 1.0

    def __repr__(self) -> str:
        return f"CountMatrix({self.shape[0]} cells x {self.shape[1]} genes, {self.storage})"
