"""Count-matrix input: validation and conversion to a dense (N cells x G genes) float64 array.

Accepted inputs: numpy arrays / array-likes, scipy.sparse matrices and arrays (values are checked on
``.data`` before densifying), AnnData (``.X`` or ``.layers[layer]``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

__all__ = ["as_counts", "total_counts", "check_genes_cells", "GeneCellReport", "is_anndata"]


def is_anndata(data) -> bool:
    """Whether ``data`` is an AnnData object, without importing anndata (an AnnData input means the
    package is loaded already; importing it costs about 1 s of CPU, more than a small fit)."""
    ad = sys.modules.get("anndata")
    return ad is not None and isinstance(data, ad.AnnData)


def _check_values(values: np.ndarray, what: str) -> None:
    """Raise ValueError naming the first problem among NaN, inf, negative, non-integer values."""
    if values.size == 0:
        return
    n_nan = int(np.count_nonzero(np.isnan(values)))
    if n_nan:
        raise ValueError(f"{what} contain NaN ({n_nan} entries)")
    n_inf = int(np.count_nonzero(np.isinf(values)))
    if n_inf:
        raise ValueError(f"{what} contain inf ({n_inf} entries)")
    n_neg = int(np.count_nonzero(values < 0))
    if n_neg:
        raise ValueError(f"{what} contain negative values ({n_neg} entries, min {values.min():g})")
    frac = values != np.floor(values)
    n_frac = int(np.count_nonzero(frac))
    if n_frac:
        example = float(values[frac].flat[0])
        raise ValueError(f"{what} contain non-integer values ({n_frac} entries, e.g. {example:g})")


def _numeric(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype == bool:
        return arr.astype(np.float64)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{what} must be numeric (integer or float), got dtype {arr.dtype}")
    return arr


def as_counts(data, layer: str | None = None) -> np.ndarray:
    """Validate a count matrix and return it as a dense C-contiguous (N, G) float64 array.

    ``data``: np.ndarray / array-like, scipy.sparse matrix or array, or AnnData (``layer=None`` ->
    ``.X``, else ``.layers[layer]``). Raises ValueError naming the problem for: unknown layer (lists
    the available layers), layer given for a non-AnnData input, non-2-D input, empty matrix
    (no cells or no genes), non-numeric dtype, NaN, inf, negative or non-integer values.
    """
    what = "counts"
    from .counts import CountMatrix

    if isinstance(data, CountMatrix):  # already checked
        if layer is not None:
            raise ValueError("layer is only meaningful for AnnData input")
        return data.toarray()
    is_adata = is_anndata(data)
    layers: list = []
    if is_adata:
        layers = sorted(data.layers.keys())
        if layer is None:
            if data.X is None:
                raise ValueError(f"AnnData .X is None; pass layer=<name> (available layers: "
                                 f"{sorted(data.layers.keys())})")
            data = data.X
            what = "counts (AnnData .X)"
        else:
            available = sorted(data.layers.keys())
            if layer not in data.layers:
                raise ValueError(f"unknown layer {layer!r}; available layers: {available}")
            data = data.layers[layer]
            what = f"counts (AnnData layer {layer!r})"
    elif layer is not None:
        raise ValueError("layer is only meaningful for AnnData input")
    try:
        return _dense_counts(data, what)
    except ValueError as e:
        if what == "counts (AnnData .X)" and ("non-integer" in str(e) or "negative" in str(e)):
            raise ValueError(f"{e}; .X looks normalised: {_raw_counts_hint(layers)}") from None
        raise


def _raw_counts_hint(layers: list) -> str:
    """Where the raw counts of a normalised AnnData may be: its layers (``layer=`` / ``--layer``)."""
    name = "counts" if not layers or "counts" in layers else layers[0]
    where = f"available layers: {layers}" if layers else "this file has no layers; use adata.raw or the unnormalised file"
    return f"give the raw counts with layer={name!r} (CLI: --layer {name}); {where}"


def _dense_counts(data, what: str) -> np.ndarray:
    """The checked dense float64 copy of a sparse or array-like count matrix."""
    if sp.issparse(data):
        if len(data.shape) != 2:
            raise ValueError(f"{what} must be 2-D (cells x genes), got shape {data.shape}")
        if data.shape[0] == 0 or data.shape[1] == 0:
            raise ValueError(f"{what} are empty: shape {data.shape}")
        csr = sp.csr_array(data)
        csr.sum_duplicates()
        vals = _numeric(np.asarray(csr.data), what)
        _check_values(vals, what)
        out = np.asarray(csr.toarray(), dtype=np.float64)
        return np.ascontiguousarray(out)

    if hasattr(data, "toarray") and not isinstance(data, np.ndarray):  # e.g. dask / backed objects
        data = data.toarray()
    arr = np.asarray(data)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D (cells x genes), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what} are empty: shape {arr.shape}")
    arr = _numeric(arr, what)
    if np.issubdtype(arr.dtype, np.floating):
        _check_values(arr, what)
    elif np.any(arr < 0):
        _check_values(arr.astype(np.float64), what)
    return np.ascontiguousarray(arr, dtype=np.float64)


def total_counts(counts) -> np.ndarray:
    """Realised total counts sum_g u_cg of each cell, shape (N,), float64 (input validated by
    ``as_counts``). The default anchor of the capture prior (``pln_ref.anchor``), not a synonym of it."""
    from .counts import CountMatrix

    return CountMatrix(counts).total_counts()


@dataclass(frozen=True)
class GeneCellReport:
    """All-zero genes/cells of a count matrix. Masks are True where the row/column is all zero."""

    zero_genes: np.ndarray  # (G,) bool
    zero_cells: np.ndarray  # (N,) bool

    @property
    def n_zero_genes(self) -> int:
        return int(self.zero_genes.sum())

    @property
    def n_zero_cells(self) -> int:
        return int(self.zero_cells.sum())

    @property
    def ok(self) -> bool:
        return self.n_zero_genes == 0 and self.n_zero_cells == 0

    def message(self, max_list: int = 20) -> str:
        parts = []
        for name, mask in (("genes", self.zero_genes), ("cells", self.zero_cells)):
            idx = np.flatnonzero(mask)
            if idx.size:
                shown = ", ".join(str(i) for i in idx[:max_list])
                more = f", ... ({idx.size - max_list} more)" if idx.size > max_list else ""
                parts.append(f"{idx.size} all-zero {name} (indices {shown}{more})")
        return "; ".join(parts) if parts else "no all-zero genes or cells"


def check_genes_cells(counts, *, raise_on_zero: bool = False) -> GeneCellReport:
    """Report all-zero genes (columns) and cells (rows); the caller decides to drop or error.

    With ``raise_on_zero=True`` a ValueError lists how many and which indices are all zero.
    """
    from .counts import CountMatrix

    u = CountMatrix(counts)  # checked by blocks; no dense copy of sparse counts
    # counts are non-negative: a row / column is all zero iff its sum is 0
    rep = GeneCellReport(zero_genes=u.column_moments()[0] <= 0, zero_cells=u.total_counts() <= 0)
    if raise_on_zero and not rep.ok:
        raise ValueError(rep.message())
    return rep
