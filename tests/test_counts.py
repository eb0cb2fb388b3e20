"""pln_ref.counts.CountMatrix: one count matrix in dense, CSR or on-disk storage, read by blocks."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import gammaln

from pln_ref.counts import CountMatrix


def _counts(N=53, G=7, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.poisson(rng.gamma(0.5, 2.0, size=(N, G))).astype(float)
    u[3] = 0.0
    return u


@pytest.fixture(params=["dense", "int", "csr", "csc", "adata", "backed_sparse", "backed_dense"])
def stored(request, tmp_path):
    u = _counts()
    kind = request.param
    if kind == "dense":
        return u, CountMatrix(u, block_entries=40)
    if kind == "int":
        return u, CountMatrix(u.astype(np.int32), block_entries=40)
    if kind == "csr":
        return u, CountMatrix(sp.csr_matrix(u), block_entries=40)
    if kind == "csc":
        return u, CountMatrix(sp.csc_array(u), block_entries=40)
    if kind == "adata":
        return u, CountMatrix(ad.AnnData(np.zeros_like(u), layers={"counts": sp.csr_matrix(u)}), layer="counts",
                              block_entries=40)
    path = tmp_path / "u.h5ad"
    X = sp.csr_matrix(u) if kind == "backed_sparse" else u
    ad.AnnData(X).write_h5ad(path)
    return u, CountMatrix(ad.read_h5ad(path, backed="r"), block_entries=40)


def test_blocks_sums_rows_equal_dense(stored):
    u, cm = stored
    assert cm.shape == u.shape
    assert cm.block_size == 40 // u.shape[1]
    got = np.vstack([b for _, b in cm.blocks()])
    np.testing.assert_array_equal(got, u)
    np.testing.assert_array_equal(cm.block(10, 20), u[10:20])
    idx = np.array([40, 2, 17, 2 + 1])
    np.testing.assert_array_equal(cm.rows(idx), u[idx])
    np.testing.assert_allclose(cm.total_counts(), u.sum(axis=1))
    np.testing.assert_allclose(cm.lgamma_sums(), gammaln(u + 1.0).sum(axis=1), rtol=1e-13)
    assert cm.lgamma_sums()[3] == 0.0


def test_sparse_input_stays_sparse():
    u = _counts(N=200, G=50)
    cm = CountMatrix(sp.csr_matrix(u))
    assert cm.storage == "csr" and sp.issparse(cm._src)
    assert 0 < cm.nnz_fraction < 1


@pytest.mark.parametrize("bad, msg", [(np.nan, "NaN"), (-1.0, "negative"), (0.5, "non-integer"), (np.inf, "inf")])
@pytest.mark.parametrize("kind", ["dense", "csr", "backed"])
def test_bad_values_in_a_late_block_named(bad, msg, kind, tmp_path):
    u = _counts()
    u[50, 2] = bad
    src = {"dense": u, "csr": sp.csr_matrix(u)}.get(kind)
    if kind == "backed":
        path = tmp_path / "bad.h5ad"
        ad.AnnData(sp.csr_matrix(u)).write_h5ad(path)
        src = ad.read_h5ad(path, backed="r")
    with pytest.raises(ValueError, match=msg):
        CountMatrix(src, block_entries=40)


def test_shape_and_layer_errors():
    with pytest.raises(ValueError, match="2-D"):
        CountMatrix(np.zeros(5))
    with pytest.raises(ValueError, match="empty"):
        CountMatrix(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="unknown layer 'raw'"):
        CountMatrix(ad.AnnData(np.ones((2, 2))), layer="raw")
    with pytest.raises(ValueError, match="only meaningful for AnnData"):
        CountMatrix(np.ones((2, 2)), layer="counts")
    with pytest.raises(ValueError, match="numeric"):
        CountMatrix(np.array([["a", "b"]]))


def test_block_reductions_equal_dense(stored):
    """Column moments, centred Gram, products with u and u^T, saturated log-likelihood: by blocks
    (or on the CSR values) equal to the dense formulas, in every storage."""
    from scipy.special import xlogy

    u, cm = stored
    mean, var = cm.column_moments()
    np.testing.assert_allclose(mean, u.mean(0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(var, u.var(0, ddof=1), rtol=1e-11, atol=1e-13)
    D = u - u.mean(0)
    np.testing.assert_allclose(cm.centred_gram(u.mean(0)), D.T @ D, rtol=1e-11, atol=1e-10)
    V = np.random.default_rng(1).standard_normal((u.shape[1], 3))
    Y = np.random.default_rng(2).standard_normal((u.shape[0], 3))
    np.testing.assert_allclose(cm.matmul(V), u @ V, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cm.rmatmul(Y), u.T @ Y, rtol=1e-12, atol=1e-11)
    sat = (xlogy(u, u) - u - gammaln(u + 1.0)).sum(1)
    np.testing.assert_allclose(cm.saturated_loglik(), sat, rtol=1e-12, atol=1e-12)


def test_take_rows_in_storage_form(stored):
    """take(idx): the rows as a standalone float64 matrix, CSR for sparse storage, dense otherwise."""
    u, cm = stored
    idx = np.array([0, 3, 17, 40])
    got = cm.take(idx)
    assert got.dtype == np.float64
    assert sp.issparse(got) == (cm.storage == "csr" or (cm.storage == "disk" and sp.issparse(cm._src[0:1])))
    np.testing.assert_array_equal(got.toarray() if sp.issparse(got) else got, u[idx])
    with pytest.raises(ValueError, match="increasing cell indices"):
        cm.take(np.array([3, 0]))
    with pytest.raises(ValueError, match="increasing cell indices"):
        cm.take(np.array([u.shape[0]]))


def test_log_factorial_table_matches_gammaln():
    """log v! by table lookup: the same bits as gammaln(v + 1), through table growth and beyond it."""
    from scipy.special import gammaln

    from pln_ref.counts import _LOG_FACTORIAL_MAX, _log_factorial

    rng = np.random.default_rng(3)
    for top in (5, 3000, 70000):
        v = rng.integers(0, top, size=(40, 30)).astype(float)
        assert np.array_equal(_log_factorial(v), gammaln(v + 1.0))
    v = np.array([0.0, 1.0, float(_LOG_FACTORIAL_MAX), 2.0 * _LOG_FACTORIAL_MAX])
    assert np.array_equal(_log_factorial(v), gammaln(v + 1.0))
    assert _log_factorial(np.zeros((0, 3))).shape == (0, 3)
