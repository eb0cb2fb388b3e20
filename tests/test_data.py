"""Count validation and conversion (pln_ref.data)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pln_ref.data import as_counts, check_genes_cells, total_counts


def test_numpy_int_and_float():
    u = np.array([[0, 1, 2], [3, 0, 5]], dtype=np.int32)
    out = as_counts(u)
    assert out.dtype == np.float64 and out.shape == (2, 3) and out.flags.c_contiguous
    assert np.array_equal(out, u)
    assert np.array_equal(as_counts(u.astype(float).T.T), u)
    assert np.array_equal(as_counts([[1, 2], [3, 4]]), [[1, 2], [3, 4]])


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
def test_sparse(fmt):
    dense = np.array([[0, 1, 0], [2, 0, 7]], dtype=float)
    m = sp.random(2, 3, density=0).asformat(fmt)  # noqa: F841 - exercises empty-data sparse too
    assert np.array_equal(as_counts(sp.csr_matrix(dense).asformat(fmt)), dense)
    assert np.array_equal(as_counts(sp.csr_array(dense).asformat(fmt)), dense)
    assert np.array_equal(as_counts(sp.csr_matrix((2, 3))), np.zeros((2, 3)))


def test_sparse_bad_values_checked_before_densifying():
    m = sp.csr_matrix(np.array([[0, 1.5], [2, 0]]))
    with pytest.raises(ValueError, match="non-integer values"):
        as_counts(m)
    m = sp.csr_matrix(np.array([[0, -1.0], [2, 0]]))
    with pytest.raises(ValueError, match="negative values"):
        as_counts(m)
    m = sp.csr_matrix(np.array([[0, np.nan], [2, 0]]))
    with pytest.raises(ValueError, match="NaN"):
        as_counts(m)


def test_anndata_X_and_layers():
    X = np.array([[1, 0], [0, 4], [2, 2]], dtype=np.float32)
    a = ad.AnnData(X=X, layers={"counts": X * 2, "raw": sp.csr_matrix(X + 1)})
    assert np.array_equal(as_counts(a), X)
    assert np.array_equal(as_counts(a, layer="counts"), X * 2)
    assert np.array_equal(as_counts(a, layer="raw"), X + 1)
    with pytest.raises(ValueError, match=r"unknown layer 'spliced'; available layers: \['counts', 'raw'\]"):
        as_counts(a, layer="spliced")
    a.layers["bad"] = X + 0.25
    with pytest.raises(ValueError, match=r"AnnData layer 'bad'.*non-integer"):
        as_counts(a, layer="bad")
    with pytest.raises(ValueError, match="layer is only meaningful for AnnData"):
        as_counts(X, layer="counts")


@pytest.mark.parametrize(
    "bad,msg",
    [
        (np.array([[1.0, -2.0]]), r"negative values \(1 entries, min -2\)"),
        (np.array([[1.0, 0.5]]), r"non-integer values \(1 entries, e.g. 0.5\)"),
        (np.array([[1.0, np.nan]]), r"contain NaN \(1 entries\)"),
        (np.array([[1.0, np.inf]]), r"contain inf \(1 entries\)"),
        (np.array([[1.0, -np.inf]]), r"contain inf"),
        (np.array([1.0, 2.0]), r"must be 2-D \(cells x genes\), got shape \(2,\)"),
        (np.ones((2, 2, 2)), r"must be 2-D"),
        (np.zeros((0, 3)), r"empty: shape \(0, 3\)"),
        (np.zeros((3, 0)), r"empty: shape \(3, 0\)"),
        (np.array([["a", "b"]]), r"must be numeric"),
        (np.array([[1, -1]], dtype=np.int64), r"negative values"),
    ],
)
def test_bad_counts(bad, msg):
    with pytest.raises(ValueError, match=msg):
        as_counts(bad)


def test_empty_sparse():
    with pytest.raises(ValueError, match="empty"):
        as_counts(sp.csr_matrix((0, 5)))


def test_total_counts():
    u = np.array([[1, 2, 3], [0, 0, 0]])
    assert np.array_equal(total_counts(u), [6.0, 0.0])
    assert np.array_equal(total_counts(sp.csr_matrix(u)), [6.0, 0.0])


def test_check_genes_cells():
    u = np.array([[0, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 3, 1, 0]])
    rep = check_genes_cells(u)
    assert rep.zero_genes.tolist() == [True, False, False, True]
    assert rep.zero_cells.tolist() == [False, False, True, False]
    assert rep.n_zero_genes == 2 and rep.n_zero_cells == 1 and not rep.ok
    with pytest.raises(ValueError, match=r"2 all-zero genes \(indices 0, 3\); 1 all-zero cells \(indices 2\)"):
        check_genes_cells(u, raise_on_zero=True)
    assert check_genes_cells(np.ones((2, 2)), raise_on_zero=True).ok
    wide = np.zeros((2, 30))
    wide[:, :5] = 1
    with pytest.raises(ValueError, match=r"25 all-zero genes \(indices 5, 6,.*24, \.\.\. \(5 more\)\)"):
        check_genes_cells(wide, raise_on_zero=True)


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.int64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=8), elements=st.integers(0, 10**6)))
def test_roundtrip_nonnegative_integers(u):
    out = as_counts(u)
    assert np.array_equal(out, u)
    assert np.array_equal(as_counts(sp.csr_matrix(u)), u)
    assert np.array_equal(total_counts(u), u.sum(1))
