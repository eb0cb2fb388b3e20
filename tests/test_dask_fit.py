"""The Laplace L-BFGS fit with its full-batch evaluations on a Dask cluster (``outer.dask_eval``)
equals the in-process fit; an unreachable scheduler address fails with one line."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

distributed = pytest.importorskip("dask.distributed")

import pln_ref  # noqa: E402
from pln_ref import fit_laplace  # noqa: E402
from pln_ref.dask_client import SchedulerUnreachableError, connect  # noqa: E402
from pln_ref.fit_laplace import optimize_globals  # noqa: E402
from pln_ref.outer.dask_eval import DaskEvaluator  # noqa: E402
from pln_ref.outer.evaluate import Evaluator  # noqa: E402
from pln_ref.outer.start import initial_globals  # noqa: E402

BLOCK = 150  # 600 cells -> 4 blocks
UNREACHABLE = "tcp://127.0.0.1:9"  # the discard port: nothing listens there


@pytest.fixture(scope="module")
def data():
    p = pln_ref.random_params(30, 2, seed=3, capture=True)
    sim = pln_ref.simulate(p, 600, seed=4)
    init = initial_globals(sim.counts, 2, p.capture, sim.log_anchor, seed=0).params
    return sim.counts, sim.log_anchor, init


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as c:
        yield c


def _rel(a, b):
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


@pytest.mark.parametrize("sparse", [False, True])
def test_dask_fit_equals_in_process(data, client, monkeypatch, sparse):
    u, la, init = data
    counts = sp.csr_matrix(u) if sparse else u
    monkeypatch.setattr(fit_laplace, "evaluation_block_cells", lambda G: BLOCK)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the step cap's ConvergenceWarning
        st0, p0 = optimize_globals(counts, init, la, n_steps=8, progress=False)
        st1, p1 = optimize_globals(counts, init, la, n_steps=8, progress=False, client=client)
    assert st0.step == st1.step == 8  # (the fit converges in 10 steps: 8 keeps the cap binding)
    for a, b in ((p1.mu, p0.mu), (p1.W, p0.W), (p1.d, p0.d), (st1.x_map, st0.x_map),
                 (st1.eta_map, st0.eta_map)):
        assert _rel(a, b) < 1e-8
    assert st1.best_value == pytest.approx(st0.best_value, rel=1e-12)


def test_dask_checkpoint_resumes_like_the_in_process_fit(data, client, monkeypatch, tmp_path):
    """A Dask fit checkpointed at step 6 (its MAPs gathered from the workers into the file, float32)
    and resumed on the cluster to step 12 equals the in-process resume of the same checkpoint."""
    from pln_ref.fit_laplace import LaplaceFitState
    from pln_ref.outer.evaluate import WARM_START_DTYPE

    u, la, init = data
    monkeypatch.setattr(fit_laplace, "evaluation_block_cells", lambda G: BLOCK)
    ck = tmp_path / "ck.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the step cap's ConvergenceWarning
        optimize_globals(u, init, la, n_steps=6, progress=False, client=client, checkpoint=str(ck),
                         checkpoint_every=3)
        st = LaplaceFitState.load(ck)
        assert st.step == 6 and st.x_map.dtype == WARM_START_DTYPE and st.x_map.shape == u.shape
        st0, p0 = optimize_globals(u, init, la, n_steps=12, progress=False, resume=LaplaceFitState.load(ck))
        st1, p1 = optimize_globals(u, init, la, n_steps=12, progress=False, client=client, resume=st)
    assert st0.step == st1.step == 12
    for a, b in ((p1.mu, p0.mu), (p1.W, p0.W), (p1.d, p0.d)):
        assert _rel(a, b) < 1e-8
    assert st1.best_value == pytest.approx(st0.best_value, rel=1e-12)


@pytest.mark.parametrize("task_cells,n_tasks", [(None, 4), (300, 2), (450, 2)])
def test_dask_evaluator_matches_blocked_and_keeps_maps_on_failure(data, client, task_cells, n_tasks):
    """One task per partition of whole blocks (default about two per worker; 450 cells = 3 blocks
    + a last partition of 1 block), each looping over its blocks as the in-process evaluation does."""
    u, la, init = data
    ev0 = Evaluator(u, la, init.capture, block_cells=BLOCK)
    ev1 = DaskEvaluator(u, la, init.capture, client=client, block_cells=BLOCK, task_cells=task_cells)
    assert len(ev1.bounds) == n_tasks and ev1.x_map is None
    e0 = ev0(init.mu, init.W, init.d, gtol=1e-6)
    e1 = ev1(init.mu, init.W, init.d, gtol=1e-6)
    assert e1.value == pytest.approx(e0.value, rel=1e-12)
    for key in ("mu", "W", "d"):
        assert _rel(e1.grad[key], e0.grad[key]) < 1e-10
    assert ev1.newton_iters == ev0.newton_iters and e1.n_on_bound == e0.n_on_bound
    np.testing.assert_allclose(ev1.x_map, ev0.x_map, rtol=1e-12)
    x_before = ev1.x_map.copy()
    with pytest.raises(Exception):  # a non-finite / singular trial point raises on the client
        ev1(init.mu, init.W, -np.ones_like(init.d), gtol=1e-6)
    np.testing.assert_array_equal(ev1.x_map, x_before)  # warm start kept
    assert ev1(init.mu, init.W, init.d, gtol=1e-6) is e1  # cached
    with pytest.raises(ValueError, match="full batch"):
        ev1(init.mu, init.W, init.d, cells=np.arange(10))
    ev1.close()


def test_unreachable_scheduler_is_one_line(data, capsys, tmp_path):
    with pytest.raises(SchedulerUnreachableError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        connect(UNREACHABLE, timeout=1)
    import dask

    u, la, init = data
    import anndata as ad

    path = tmp_path / "d.h5ad"
    ad.AnnData(u.astype(np.float32)).write_h5ad(path)
    from pln_ref.cli import main

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        rc = main(["fit", str(path), "--k", "2", "--out", str(tmp_path / "o.h5ad"), "--quiet", "--no-capture",
                   "--scheduler-address", UNREACHABLE])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error: cannot reach the Dask scheduler at tcp://127.0.0.1:9")


@pytest.mark.parametrize("sparse", [False, True])
def test_fit_final_posteriors_on_the_workers_equal_in_process(data, client, monkeypatch, sparse):
    """pln_ref.fit with a scheduler: the final posteriors and evidence are a map over the blocks on
    the workers (from the MAPs they hold, never gathered to the client) and equal the in-process
    fit's: globals, MAPs, k x k factors, per-cell fields and evidence."""
    from pln_ref.outer.final import MapCellPosteriors

    u, la, init = data
    L = np.exp(la)  # the simulation's anchors (some simulated cells have no counts)
    counts = sp.csr_matrix(u) if sparse else u
    monkeypatch.setattr(fit_laplace, "evaluation_block_cells", lambda G: BLOCK)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the step cap's ConvergenceWarning
        r0 = pln_ref.fit(counts, k=2, n_steps=8, progress=False, library_size=L)
        monkeypatch.setattr(DaskEvaluator, "_local_maps",
                            lambda self: pytest.fail("the workers' MAPs were gathered to the client"))
        calls = []
        real = DaskEvaluator.final_posteriors
        monkeypatch.setattr(DaskEvaluator, "final_posteriors", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
        # the sparse case also stores the MAPs in float32 (each partition solved in float64)
        r1 = pln_ref.fit(counts, k=2, n_steps=8, progress=False, library_size=L, scheduler_address=client,
                         map_dtype="float32" if sparse else None)
    assert calls == [1] and isinstance(r1.cells, MapCellPosteriors)
    assert r1.cells.x_map.dtype == (np.float32 if sparse else np.float64)
    assert r0.diagnostics["steps"] == r1.diagnostics["steps"] == 8
    for a, b in ((r1.mu, r0.mu), (r1.W, r0.W), (r1.d, r0.d)):
        assert _rel(a, b) < 1e-8
    c0, c1 = r0.cells, r1.cells
    assert _rel(c1.x_map, c0.x_map) < (1e-7 if sparse else 1e-8)
    for a, b in ((c1.eta_map, c0.eta_map), (c1.precision.S, c0.precision.S), (c1.s, c0.s)):
        assert _rel(a, b) < 1e-8
    # the final Newton gradient norms are rounding noise (~1e-11): the start's sums over cells run
    # on the workers, so the globals agree to rounding, not bit for bit
    np.testing.assert_allclose(c1.grad_norm, c0.grad_norm, rtol=1e-6, atol=1e-9)
    assert _rel(np.asarray(r1.init.mu), np.asarray(r0.init.mu)) < 1e-10
    np.testing.assert_array_equal(c1.converged, c0.converged)
    assert r1.diagnostics["objective"] == pytest.approx(r0.diagnostics["objective"], rel=1e-10)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dense_max_genes", [2000, 10])
def test_moments_start_on_the_workers_equals_in_process(data, client, sparse, dense_max_genes):
    """The method of moments with its passes over the counts (column moments, Gram matrix or the
    truncated SVD's products) and the streamed factor analysis' operator on the workers
    (``DaskCounts``) equals the in-process one."""
    from pln_ref.moments import moments_fit
    from pln_ref.outer.dask_eval import DaskCounts

    u, la, init = data
    counts = sp.csr_matrix(u) if sparse else u
    dc = DaskCounts(counts, la, client, block_cells=BLOCK, task_cells=300)
    try:
        m0 = moments_fit(counts, 2, capture=init.capture, log_anchor=la, dense_max_genes=dense_max_genes)
        m1 = moments_fit(counts, 2, capture=init.capture, log_anchor=la, dense_max_genes=dense_max_genes,
                         partitions=dc)
    finally:
        dc.close()
    assert m1.info["path"] == m0.info["path"] == ("dense" if dense_max_genes > 30 else "streamed")
    for a, b in ((m1.params.mu, m0.params.mu), (m1.params.d, m0.params.d), (np.abs(m1.params.W), np.abs(m0.params.W))):
        assert _rel(a, b) < 1e-8
    for key in ("n_var_clamped", "n_cov_clamped", "fa_iterations"):
        assert m1.info[key] == m0.info[key]


@pytest.mark.parametrize("sparse", [False, True])
def test_partitions_hold_packed_exact_counts(data, client, sparse):
    """The workers keep each partition's counts packed (uint8/uint16 values, uint16 CSR indices),
    densified exactly to the float64 rows the in-process fit reads."""
    from pln_ref.counts import CountMatrix
    from pln_ref.outer.dask_eval import DaskCounts, PackedCounts

    u, la, init = data
    counts = sp.csr_matrix(u) if sparse else u
    dc = DaskCounts(counts, la, client, block_cells=BLOCK, task_cells=300)
    try:
        cm = CountMatrix(counts)
        for (lo, hi), fut in zip(dc.bounds, dc.data):
            packed = fut.result()[0]
            assert isinstance(packed, PackedCounts) and packed.data.dtype.itemsize <= 2
            np.testing.assert_array_equal(packed.dense(), cm.block(lo, hi))
            np.testing.assert_array_equal(packed.dense(7, 50), cm.block(lo + 7, lo + 50))
            if sparse:
                assert packed.indices.dtype == np.uint16
                np.testing.assert_array_equal(packed.csr(3, 40).toarray(), cm.block(lo + 3, lo + 40))
    finally:
        dc.close()
    big = PackedCounts(np.array([[0, 70000], [2**33, 1]]))
    assert big.data.dtype == np.float64 and big.dense()[1, 0] == 2**33
    assert PackedCounts(sp.csr_matrix(np.array([[0, 70000], [3, 1]]))).data.dtype == np.uint32


def test_final_pass_gathers_directly_from_the_workers(data, client, monkeypatch):
    """Every gather of the Dask fit (start, evaluations, final pass) comes from the workers
    directly, not through the scheduler (which held each final-pass partition in flight)."""
    u, la, init = data
    calls = []
    real = type(client)._gather

    def spy(self, futures, errors="raise", direct=None, local_worker=None):
        calls.append(direct)
        return real(self, futures, errors=errors, direct=direct, local_worker=local_worker)

    monkeypatch.setattr(type(client), "_gather", spy)
    monkeypatch.setattr(fit_laplace, "evaluation_block_cells", lambda G: BLOCK)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pln_ref.fit(u, k=2, n_steps=2, progress=False, library_size=np.exp(la), scheduler_address=client)
    assert calls and all(d is True for d in calls)
