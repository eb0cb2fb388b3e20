"""pln_ref.outer.sampled: the sampled (dynamic-sample-size) L-BFGS reaches the full-batch optimum,
records its phases and epochs, resumes from a checkpoint in a sampled phase, and refuses bad
combinations; CountMatrix.subset reads rows without a copy."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

import pln_ref
from pln_ref.counts import CountMatrix
from pln_ref.exceptions import ConvergenceWarning
from pln_ref.fit_laplace import LaplaceFitState, optimize_globals
from pln_ref.outer.evaluate import Evaluator
from pln_ref.outer.sampled import first_sample_size, nested_sample, sample_sizes
from pln_ref.outer.start import initial_globals
from pln_ref.outer.stopping import resolution_tol


@pytest.fixture(scope="module")
def data():
    p = pln_ref.random_params(12, 2, seed=11, capture=True, mean_log_rate=2.0)
    sim = pln_ref.simulate(p, 800, seed=12)
    u = sp.csr_matrix(sim.counts)
    init = initial_globals(u, 2, p.capture, sim.log_anchor).params
    full, q_full = optimize_globals(u, init, sim.log_anchor, progress=False)
    return p, u, sim.log_anchor, init, full, q_full


def _evidence(u, la, q):
    """Mean Laplace evidence of globals q on all cells, solved tight (the same evaluator for all)."""
    return Evaluator(u, la, q.capture)(q.mu, q.W, q.d, gtol=1e-8, with_grad=False).value


def test_sample_sizes_double_to_all_cells_and_samples_are_nested():
    assert sample_sizes(20000, 1000) == [1250, 2500, 5000, 10000, 20000]
    assert sample_sizes(1000, 300) == [500, 1000]
    assert sample_sizes(1000, 501) == [1000] and sample_sizes(1000, 5000) == [1000]
    a, b = nested_sample(1000, 250, seed=3), nested_sample(1000, 500, seed=3)
    assert np.all(np.diff(a) > 0) and set(a) <= set(b) and len(set(b)) == 500
    assert not np.array_equal(a, nested_sample(1000, 250, seed=4))
    assert resolution_tol(1000, 14000, 3e-4, 0.25) == pytest.approx(1.75)
    assert resolution_tol(1000, 14000, 3e-4) == pytest.approx(0.7)  # RESOLUTION_FRACTION = 0.1
    assert resolution_tol(10**9, 14000, 3e-4) == 3e-4


def test_first_sample_holds_the_sparsest_genes_counts():
    """n_first = min(N, max(n0, ceil(min_counts N / T_min))) over the expressed genes."""
    totals = np.array([0.0, 4400.0, 9000.0, 1e5])  # an all-zero gene is not counted
    assert first_sample_size(totals, 40000, 1000) == 4546  # 500 * 40000 / 4400, rounded up
    assert first_sample_size(totals, 40000, 6000) == 6000
    assert first_sample_size(totals, 40000, 1000, min_counts=0) == 1000
    assert first_sample_size(np.array([300.0, 5000.0]), 2000, 100) == 2000  # never more than N
    assert first_sample_size(np.zeros(3), 500, 100) == 100
    assert sample_sizes(40000, first_sample_size(totals, 40000, 1000)) == [5000, 10000, 20000, 40000]


def test_sampled_fit_raises_its_first_sample_or_runs_the_full_batch(data):
    """The fixture's sparsest gene has 634 counts in 800 cells: the default rule (500 counts in the
    first sample) asks for 631 cells, more than half, so batch_size=100 runs the full batch; with
    min_sample_counts=100 the first sample is 127 cells, so the samples are 200 and 400 cells."""
    p, u, la, init, full, q_full = data
    assert int(np.asarray(u.sum(axis=0)).min()) == 634
    st, q = optimize_globals(u, init, la, batch_size=100, seed=1, progress=False)
    assert st.phases == [] and st.step == full.step
    assert st.first_sample == first_sample_size(np.asarray(u.sum(axis=0)).ravel(), 800, 100) == 631
    assert full.first_sample == 0
    np.testing.assert_allclose(q.mu, q_full.mu, rtol=0, atol=1e-12)
    st, _ = optimize_globals(u, init, la, batch_size=100, min_sample_counts=100, seed=1, progress=False)
    assert [ph["cells"] for ph in st.phases] == [200, 400, 800] and st.first_sample == 127


def test_count_matrix_subset_reads_the_rows():
    rng = np.random.default_rng(0)
    dense = rng.poisson(1.0, (50, 7))
    idx = np.array([1, 4, 5, 20, 49])
    for m in (CountMatrix(dense), CountMatrix(sp.csr_matrix(dense))):
        s = m.subset(idx)
        assert s.shape == (5, 7) and s.storage == m.storage
        np.testing.assert_array_equal(s.toarray(), dense[idx])
        np.testing.assert_array_equal(s.rows(np.array([3, 0])), dense[idx[[3, 0]]])
        np.testing.assert_allclose(s.lgamma_sums(), m.lgamma_sums()[idx])
        np.testing.assert_allclose(s.rmatmul(np.ones((5, 2))), dense[idx].T @ np.ones((5, 2)))
    with pytest.raises(ValueError, match="increasing cell indices"):
        CountMatrix(dense).subset(np.array([4, 1]))


def test_sampled_lbfgs_reaches_the_full_batch_optimum(data):
    p, u, la, init, full, q_full = data
    st, q = optimize_globals(u, init, la, batch_size=100, min_sample_counts=0, seed=1, progress=False)
    assert st.stop_rule == "certificate"
    assert [ph["cells"] for ph in st.phases] == [100, 200, 400, 800]
    assert [ph["rule"] for ph in st.phases[:-1]] == ["resolution"] * 3
    assert sum(ph["steps"] for ph in st.phases) == st.step
    assert st.epochs == pytest.approx(sum(ph["epochs"] for ph in st.phases) + (800 - 100) / 800)
    assert st.x_map.shape == (800, 12)  # the last phase is all cells, in their order
    gap = _evidence(u, la, q_full) - _evidence(u, la, q)
    print(f"sampled: {st.step} steps, {st.epochs:.1f} epochs (full batch {full.step} steps, "
          f"{full.epochs:.1f} epochs); evidence gap to the full batch {gap:.2e} nats/cell")
    assert abs(gap) < 1e-3
    assert np.abs(q.correlation_dense() - q_full.correlation_dense()).max() < 0.02


def test_sampled_resume_from_a_sampled_phase_ends_at_the_same_fit(data, tmp_path):
    p, u, la, init, full, q_full = data
    fp = {"shape": [800, 12], "optimizer": "lbfgs", "batch_size": 100, "seed": 1}
    ck = tmp_path / "ck.npz"
    with pytest.warns(ConvergenceWarning, match="n_steps=6 reached"):
        st1, _ = optimize_globals(u, init, la, batch_size=100, min_sample_counts=0, seed=1, n_steps=6,
                                  checkpoint=str(ck), checkpoint_every=2, progress=False, fingerprint=fp)
    saved = LaplaceFitState.load(ck)
    assert saved.step == 6 and saved.stop_rule == "step_cap" and saved.phase_cells < 800
    assert saved.x_map.shape == (saved.phase_cells, 12) and saved.epochs > 0
    epochs_before = saved.epochs  # the resumed fit continues this state in place
    st2, q2 = optimize_globals(u, init, la, batch_size=100, min_sample_counts=0, seed=1, resume=saved,
                               progress=False, fingerprint=fp)
    assert st2.stop_rule == "certificate" and st2.phases[-1]["cells"] == 800
    assert st2.epochs > epochs_before
    # the phase cut by the step cap keeps one record, summing its steps before and after the resume
    cells = [ph["cells"] for ph in st2.phases]
    assert cells == sorted(set(cells)) and saved.phase_cells in cells
    assert sum(ph["steps"] for ph in st2.phases) == st2.step
    assert abs(_evidence(u, la, q2) - _evidence(u, la, q_full)) < 1e-3
    with pytest.raises(ValueError, match="seed"):  # another sample of cells: refused
        optimize_globals(u, init, la, batch_size=100, min_sample_counts=0, seed=2,
                         resume=LaplaceFitState.load(ck), progress=False, fingerprint={**fp, "seed": 2})


def test_epoch_cap_warns_and_final_posteriors_start_cold(data):
    p, u, la, *_ = data
    with pytest.warns(ConvergenceWarning, match="max_epochs=0.5 reached"):
        res = pln_ref.fit(u, k=2, library_size=np.exp(la), batch_size=100, min_sample_counts=0,
                          max_epochs=0.5, progress=False)
    d = res.diagnostics
    assert d["stop_rule"] == "epoch_cap" and 0.5 <= d["epochs"] < 1.5 and d["first_sample"] == 100
    assert d["phases"][-1]["rule"] == "epoch_cap" and d["phases"][-1]["cells"] < 800
    assert res.x_map.shape == (800, 12) and np.isfinite(d["objective"])


@pytest.mark.parametrize("options,match", [
    ({"batch_size": 100, "em_cycles": 2}, "cannot be combined with em_cycles"),
    ({"optimizer": "adam", "max_epochs": 5.0}, "max_epochs needs optimizer='lbfgs'"),
    ({"max_epochs": 0.0}, "max_epochs must be a positive finite number"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"batch_size": 100, "min_sample_counts": -1.0}, "min_sample_counts must be a finite number >= 0"),
    ({"batch_size": 100, "scheduler_address": "tcp://127.0.0.1:1"}, "no em_cycles or batch_size"),
])
def test_bad_combinations_are_one_line_errors(data, options, match):
    p, u, la, *_ = data
    with pytest.raises(ValueError, match=match) as e:
        pln_ref.fit(u, k=2, progress=False, **options)
    assert "\n" not in str(e.value)


def test_cli_fit_with_batch_size_runs_the_sampled_path(data, tmp_path, capsys):
    """`pln-ref fit --batch-size n0` (default optimizer) is the sampled L-BFGS; its phases and epochs
    reach uns["pln"] of the written .h5ad."""
    import anndata as ad

    from pln_ref.cli import main

    p, u, la, *_ = data
    a = ad.AnnData(u.astype(np.float32))
    a.obs["lib"] = np.exp(la)
    a.write_h5ad(tmp_path / "in.h5ad")
    rc = main(["fit", str(tmp_path / "in.h5ad"), "--k", "2", "--batch-size", "200",
               "--min-sample-counts", "0", "--quiet", "--library-size", "lib",
               "--out", str(tmp_path / "out.h5ad")])
    assert rc == 0, capsys.readouterr().err
    diag = ad.read_h5ad(tmp_path / "out.h5ad").uns["pln"]["diagnostics"]
    assert diag["stop_rule"] == "certificate" and diag["epochs"] > 0 and int(diag["first_sample"]) == 200
    assert [int(diag["phases"][i]["cells"]) for i in sorted(diag["phases"])] == [200, 400, 800]


def test_sample_phases_carry_their_pairs_and_the_last_phase_starts_afresh(data, monkeypatch):
    """Each sampled phase after the first inherits the L-BFGS pairs of the phase before it; the
    full-batch phase starts without them, and its certificate needs 2 LAST_PHASE_MIN_WINDOW gains
    (the samples' 2 x 2; ``sampled`` module docstring)."""
    import pln_ref.outer.sampled as sampled

    p, u, la, init, full, q_full = data
    seen = []
    real = sampled.run_lbfgs

    def spy(ev, st, **kw):
        seen.append((ev.N, None if st.lbfgs_s is None else len(st.lbfgs_s), kw["rule"].min_window,
                     st.step))
        return real(ev, st, **kw)

    monkeypatch.setattr(sampled, "run_lbfgs", spy)
    st, _ = optimize_globals(u, init, la, batch_size=100, min_sample_counts=0, seed=1, progress=False)
    assert [s[0] for s in seen] == [100, 200, 400, 800]
    assert seen[0][1] is None and all(s[1] is not None and s[1] > 0 for s in seen[1:3])
    assert seen[3][1] is None
    assert [s[2] for s in seen] == [2, 2, 2, sampled.LAST_PHASE_MIN_WINDOW] == [2, 2, 2, 5]
    assert st.stop_rule == "certificate" and st.step - seen[3][3] >= 2 * 5 + 1


def test_joined_evaluations_equal_the_evaluation_of_all_cells(data):
    """join_evaluations of disjoint subsets (interleaved cells) at the same globals is the
    evaluation of their union: l per cell, value, gradient, info_mu, rate_info, cells on the bound."""
    from pln_ref.outer.evaluate import join_evaluations

    p, u, la, init, full, q_full = data
    n = u.shape[0]
    a, b = np.arange(0, n, 3), np.setdiff1d(np.arange(n), np.arange(0, n, 3))
    kw = dict(gtol=1e-8)
    whole = Evaluator(u, la, p.capture, block_cells=64)(init.mu, init.W, init.d, **kw)
    parts = [(Evaluator(u[idx], la[idx], p.capture, block_cells=64)(init.mu, init.W, init.d, **kw), idx)
             for idx in (a, b)]
    j = join_evaluations(parts, n)
    np.testing.assert_allclose(j.terms.l, whole.terms.l, rtol=1e-11, atol=1e-9)
    assert j.value == pytest.approx(whole.value, rel=1e-12)
    for key in ("mu", "W", "d"):
        np.testing.assert_allclose(j.grad[key], whole.grad[key], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(j.terms.info_mu, whole.terms.info_mu, rtol=1e-10)
    np.testing.assert_allclose(j.terms.rate_info, whole.terms.rate_info, rtol=1e-10)
    assert j.n_on_bound == whole.n_on_bound and j.post is None and j.gtol == 1e-8
    with pytest.raises(ValueError, match="do not cover"):
        join_evaluations(parts[:1], n)


def test_later_phases_start_from_the_joined_evaluation_and_samples_stay_at_the_loose_tolerance(
        data, monkeypatch):
    """At a switch the next phase's first evaluation is joined from the phase's last one and the
    new cells' cold solve (``sampled`` module docstring): it is not recomputed, and it equals a
    fresh evaluation at the same globals; the phases on samples never re-solve at the final
    Newton tolerance (only the full batch certifies there)."""
    import pln_ref.outer.sampled as sampled

    p, u, la, init, full, q_full = data
    seen, finals = [], []
    real = sampled.run_lbfgs

    def spy(ev, st, **kw):
        cached = ev.last_evaluation
        if cached is not None:
            q = ev.last_params
            fresh = Evaluator(ev.u.toarray(), ev.log_anchor, p.capture, x_map=ev.x_map.astype(float),
                              eta_map=ev.eta_map)(q.mu, q.W, q.d, gtol=cached.gtol,
                                                  dec_tol=cached.dec_tol)
        out = real(ev, st, **kw)
        if cached is not None:  # the phase's first evaluation came from the cache, not a new solve
            seen.append((ev.N, cached, fresh, ev.n_cached))
        return out

    orig_call = Evaluator.__call__

    def call(self, mu, W, d, **kw):
        if self.N < u.shape[0] and kw.get("gtol") == 1e-6 and kw.get("with_grad", True):
            finals.append(self.N)
        return orig_call(self, mu, W, d, **kw)

    monkeypatch.setattr(sampled, "run_lbfgs", spy)
    monkeypatch.setattr(Evaluator, "__call__", call)
    st, _ = optimize_globals(u, init, la, batch_size=100, min_sample_counts=0, seed=1, progress=False)
    assert [n for n, _, _, _ in seen] == [200, 400, 800]
    for n, joined, fresh, n_cached in seen:
        assert n_cached >= 1
        assert joined.value == pytest.approx(fresh.value, abs=1e-6)
        np.testing.assert_allclose(joined.grad["mu"], fresh.grad["mu"], rtol=1e-4, atol=1e-6)
    assert finals == []
    assert st.stop_rule == "certificate" and [ph["cells"] for ph in st.phases] == [100, 200, 400, 800]
