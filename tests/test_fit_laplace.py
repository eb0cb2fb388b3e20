"""Outer optimisation: exact gradient vs finite differences, recovery, resume."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

import pln_ref
from pln_ref import Capture, PLNParams
from pln_ref.fit_laplace import LaplaceFitState, laplace_objective, optimize_globals
from pln_ref.laplace import newton_map


def _data(capture, seed=2, G=7, k=2, N=25):
    rng = np.random.default_rng(seed)
    p = PLNParams(rng.normal(1.5, 0.7, G), rng.normal(size=(G, k)) * 0.5, rng.uniform(0.1, 0.5, G),
                  capture)
    la = np.log(rng.uniform(50, 500, N))
    x = p.mu + rng.normal(size=(N, k)) @ p.W.T + np.sqrt(p.d) * rng.normal(size=(N, G))
    eta = np.abs(rng.normal(np.log(300) - la, 0.5)) if capture else np.zeros(N)
    u = rng.poisson(np.exp(x - eta[:, None])).astype(float)
    return p, u, (la if capture else None)


def _fd_check(p, u, la, ift, truncation=True):
    def L(q):
        post = newton_map(u, q, la, gtol=1e-12)
        return laplace_objective(u, q, la, post, with_grad=False, truncation=truncation)[0].sum()

    post = newton_map(u, p, la, gtol=1e-12)
    _, g = laplace_objective(u, p, la, post, ift=ift, truncation=truncation)
    h = 1e-5
    worst = 0.0
    for name in ("mu", "W", "d"):
        base = getattr(p, name)
        fd = np.zeros_like(base)
        for i in np.ndindex(base.shape):
            vals = []
            for sgn in (1, -1):
                arr = base.copy()
                arr[i] += sgn * h
                vals.append(L(PLNParams(**{**{"mu": p.mu, "W": p.W, "d": p.d}, name: arr}, capture=p.capture)))
            fd[i] = (vals[0] - vals[1]) / (2 * h)
        worst = max(worst, np.abs(fd - g[name]).max() / np.abs(fd).max())
    return worst, post


@pytest.mark.parametrize("capture", [Capture(300.0, 0.5), Capture(60.0, 0.5), None],
                         ids=["capture", "capture-many-on-bound", "no-capture"])
def test_outer_gradient_is_exact(capture):
    """The IFT total gradient equals central finite differences of the re-solved objective."""
    p, u, la = _data(capture)
    err, post = _fd_check(p, u, la, ift=True)
    print(f"outer gradient max rel error vs FD ({capture}): {err:.2e}; cells on bound {post.on_bound.sum()}")
    assert err < 1e-6
    if capture is not None and capture.M0 == 60.0:
        assert post.on_bound.sum() >= 5
    err_sg, _ = _fd_check(p, u, la, ift=False)
    assert err_sg > 1e-2  # dropping the implicit term is measurably wrong


def test_truncation_term_gradient_and_size():
    """Without the eta >= 0 truncation term the gradient is exact for its own (plain Gaussian)
    objective, and the truncation term changes the gradient by far more than the FD error."""
    p, u, la = _data(Capture(60.0, 0.5))
    err, post = _fd_check(p, u, la, ift=True, truncation=False)
    assert err < 1e-6
    g1 = laplace_objective(u, p, la, post)[1]
    g0 = laplace_objective(u, p, la, post, truncation=False)[1]
    rel = max(np.abs(g1[k] - g0[k]).max() / np.abs(g1[k]).max() for k in g1)
    print(f"plain-Gaussian gradient rel error vs FD {err:.2e}; truncation changes the gradient by {rel:.2f}")
    assert rel > 0.05


def test_truncation_removes_sigma_bias_on_the_bound():
    """Cells pressed on eta = 0 (library sizes 100-5000 against M0 = 68): with the truncation
    term Laplace recovers Sigma; with the plain Gaussian formula every entry is biased upward
    (measured at N=2000: mean entry error +0.004 vs +0.107)."""
    from pln_ref.validation.design import simulate_cells

    p, sim = simulate_cells(10, 2, 2000, seed=0, mean_log_rate=1.5)
    u, la = np.asarray(sim.counts, dtype=float), np.asarray(sim.log_anchor)
    init = pln_ref.method_of_moments(u, 2, capture=p.capture, log_anchor=la)
    iu = np.triu_indices(10)
    err = {}
    for trunc in (True, False):
        st, q = optimize_globals(u, init, la, optimizer="lbfgs", n_steps=500, progress=False,
                                 truncation=trunc)
        err[trunc] = (q.sigma_dense() - p.sigma_dense())[iu]
    on_bound = newton_map(u, q, la).on_bound.mean()
    print(f"on bound {on_bound:.2f}; mean Sigma entry error: truncation {err[True].mean():+.3f} "
          f"(RMS {np.sqrt(np.mean(err[True]**2)):.3f}), plain {err[False].mean():+.3f} "
          f"(RMS {np.sqrt(np.mean(err[False]**2)):.3f})")
    assert on_bound > 0.8
    assert abs(err[True].mean()) < 0.03 and np.sqrt(np.mean(err[True] ** 2)) < 0.05
    assert err[False].mean() > 0.06


def test_small_fit_recovers_mu_and_sigma():
    """Simulated N=3000, G=12, k=2 with capture: Laplace recovers mu and Sigma entries and
    beats the method-of-moments start on the correlations (tolerances measured, seed fixed)."""
    p = pln_ref.random_params(12, 2, seed=11, capture=True, mean_log_rate=2.5)
    sim = pln_ref.simulate(p, 3000, seed=12)
    res = pln_ref.fit(sim.counts, k=2, M0=p.capture.M0, sigma_M=p.capture.sigma_M,
                      library_size=np.exp(sim.log_anchor), progress=False, n_steps=1500)
    S_hat, S = res.params.sigma_dense(), p.sigma_dense()
    mu_err = np.abs(res.mu - p.mu).max()
    sig_err = np.abs(S_hat - S).max()
    iu = np.triu_indices(12, 1)
    c_fit = np.abs(res.correlation()[iu] - p.correlation_dense()[iu]).max()
    c_mom = np.abs(res.init.correlation_dense()[iu] - p.correlation_dense()[iu]).max()
    print(f"recovery: max|mu err| {mu_err:.3f}, max|Sigma err| {sig_err:.3f}, "
          f"max|corr err| Laplace {c_fit:.3f} vs MoM {c_mom:.3f}")
    assert res.diagnostics["cells_converged"] == 3000
    assert mu_err < 0.08
    assert sig_err < 0.12
    assert c_fit < 0.08
    # eta is recovered to within its Laplace posterior SD: mean squared z-score near 1
    m, v = res.cells.eta_mean_var()
    z2 = np.mean((sim.eta - m) ** 2 / v)
    print(f"eta: RMSE {np.sqrt(np.mean((sim.eta - res.eta_map) ** 2)):.3f}, mean z^2 {z2:.3f}")
    assert 0.8 < z2 < 1.25


def test_resume_continues(tmp_path):
    """A fit stopped after n steps and resumed from its checkpoint continues from step n and ends
    where an uninterrupted fit ends."""
    p = pln_ref.random_params(8, 2, seed=3, capture=True, mean_log_rate=2.0)
    sim = pln_ref.simulate(p, 300, seed=4)
    u, la = sim.counts.astype(float), sim.log_anchor
    init = pln_ref.method_of_moments(u, 2, capture=p.capture, log_anchor=la)
    kw = dict(optimizer="adam", lr=0.05, patience=10**6, progress=False)
    full, p_full = optimize_globals(u, init, la, n_steps=40, **kw)
    ck = tmp_path / "ck.npz"
    part, _ = optimize_globals(u, init, la, n_steps=15, checkpoint=str(ck), checkpoint_every=5, **kw)
    st = LaplaceFitState.load(ck)
    assert st.step == 15
    st.stopped = ""
    st2, p_res = optimize_globals(u, init, la, n_steps=40, resume=st, **kw)
    assert st2.step == 40
    np.testing.assert_allclose(p_res.W, p_full.W, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.array(st2.history)[:, 1], np.array(full.history)[:, 1], rtol=1e-8)


def test_adam_and_lbfgs_agree():
    p = pln_ref.random_params(10, 2, seed=5, capture=True, mean_log_rate=2.0)
    sim = pln_ref.simulate(p, 600, seed=6)
    u, la = sim.counts.astype(float), sim.log_anchor
    init = pln_ref.method_of_moments(u, 2, capture=p.capture, log_anchor=la)
    a, pa = optimize_globals(u, init, la, n_steps=3000, optimizer="adam", lr=0.05, progress=False,
                             rtol=1e-7, patience=100)
    b, pb = optimize_globals(u, init, la, n_steps=3000, optimizer="lbfgs", progress=False)
    assert abs(a.best_value - b.best_value) < 2e-4 * abs(b.best_value)
    assert np.abs(pa.correlation_dense() - pb.correlation_dense()).max() < 0.03


def test_minibatch_adam_reaches_full_batch_optimum():
    p = pln_ref.random_params(10, 2, seed=7, capture=True, mean_log_rate=2.0)
    sim = pln_ref.simulate(p, 800, seed=8)
    u, la = sim.counts.astype(float), sim.log_anchor
    init = pln_ref.method_of_moments(u, 2, capture=p.capture, log_anchor=la)
    full, pf = optimize_globals(u, init, la, n_steps=3000, optimizer="lbfgs", progress=False)
    mb, pm = optimize_globals(u, init, la, n_steps=1200, optimizer="adam", lr=0.01, batch_size=200,
                              patience=10**6,
                              progress=False, seed=1)
    post = newton_map(u, pm, la)
    value = laplace_objective(u, pm, la, post, with_grad=False)[0].mean()
    print(f"minibatch objective {value:.5f} vs full-batch optimum {full.best_value:.5f}")
    assert full.best_value - value < 5e-3
    assert np.abs(pm.correlation_dense() - pf.correlation_dense()).max() < 0.05


def test_divergence_guard_restores_best():
    """An absurd learning rate makes the objective collapse; the guard restores the best state
    and halves the learning rate instead of returning garbage."""
    p = pln_ref.random_params(8, 2, seed=9, capture=True, mean_log_rate=2.0)
    sim = pln_ref.simulate(p, 200, seed=10)
    u, la = sim.counts.astype(float), sim.log_anchor
    init = pln_ref.method_of_moments(u, 2, capture=p.capture, log_anchor=la)
    post0 = newton_map(u, init, la)
    v0 = laplace_objective(u, init, la, post0, with_grad=False)[0].mean()
    st, fitted = optimize_globals(u, init, la, n_steps=12, optimizer="adam", lr=50.0, progress=False,
                                  patience=10**6)
    assert st.lr < 50.0  # the guard fired at least once
    post = newton_map(u, fitted, la)
    assert laplace_objective(u, fitted, la, post, with_grad=False)[0].mean() >= v0 - 1e-9


def test_lbfgs_heywood_case_stops_at_the_d_floor():
    """N=100, G=10: the marginal likelihood rises as d_g -> 0 for a gene (a Heywood case). Without
    the floor L-BFGS drove d below 1e-9 and crashed on a singular Sigma; with it the fit ends
    finite, with such genes at the floor and the fact reported."""
    from pln_ref.fit_laplace import D_FLOOR
    from pln_ref.validation.design import simulate_cells

    p, sim = simulate_cells(10, 2, 100, lib_range=None, seed=0, mean_log_rate=2.7)
    u, la = np.asarray(sim.counts, dtype=float), np.asarray(sim.log_anchor)
    init = pln_ref.method_of_moments(u, 2, capture=p.capture, log_anchor=la)
    st, q = optimize_globals(u, init, la, optimizer="lbfgs", n_steps=500, progress=False)
    assert np.isfinite(st.best_value)
    assert q.d.min() >= D_FLOOR * (1 - 1e-12)
    assert "Heywood" in st.stopped
    assert np.sum(q.d > 0.01) >= 8  # the floor touches only the degenerate genes


def test_final_posteriors_by_blocks_equal_one_pass():
    """pln_ref.outer.final: Newton + evidence by blocks of cells equal newton_map + laplace_objective
    on all cells at once; the lazily recomputed precision equals the stored one."""
    import pln_ref
    from pln_ref.fit_laplace import laplace_objective
    from pln_ref.laplace import newton_map
    from pln_ref.outer.final import final_posteriors

    p = pln_ref.random_params(30, 2, seed=3, capture=True)
    sim = pln_ref.simulate(p, 70, seed=4)
    la = sim.log_anchor
    ref = newton_map(sim.counts, p, la)
    ev_ref = laplace_objective(sim.counts, p, la, ref, with_grad=False)[0]
    x0 = ref.x_map + 0.0
    out = final_posteriors(sp.csr_matrix(sim.counts), p, la, x0=x0, eta0=ref.eta_map, block_cells=16,
                           reuse_x0=True)
    assert out.cells.x_map is x0  # written into the warm start's array
    np.testing.assert_allclose(out.evidence, ev_ref, rtol=1e-9, atol=1e-8)
    np.testing.assert_allclose(out.cells.x_map, ref.x_map, atol=1e-7)
    np.testing.assert_allclose(out.cells.precision.lam, ref.precision.lam, rtol=1e-6)
    np.testing.assert_allclose(out.cells.precision.inv_diag(), ref.precision.inv_diag(), rtol=1e-6)
    np.testing.assert_allclose(out.cells.log_det_neg_H(), ref.log_det_neg_H(), rtol=1e-8)
    np.testing.assert_allclose(out.cells.bbar, ref.bbar, atol=1e-7)
    assert "bbar" not in vars(out.cells)  # recomputed from the MAPs, not stored
    with pytest.raises(ValueError, match="block_cells"):
        final_posteriors(sim.counts, p, la, block_cells=0)


def test_map_posteriors_from_stored_maps_and_a_float32_warm_start():
    """pln_ref.outer.final.map_posteriors (a saved result's posteriors, by blocks) equals the
    posteriors newton_map returns at those MAPs; final_posteriors from a float32 warm start (the
    blocked fit's) reaches the float64 start's MAPs and evidence."""
    import pln_ref
    from pln_ref.fit_laplace import laplace_objective
    from pln_ref.laplace import newton_map
    from pln_ref.outer.final import final_posteriors, map_posteriors

    for cap in (True, False):
        p = pln_ref.random_params(25, 3, seed=5, capture=cap)
        sim = pln_ref.simulate(p, 60, seed=6)
        la = sim.log_anchor if cap else None
        ref = newton_map(sim.counts, p, la, gtol=1e-10)
        got = map_posteriors(p, ref.x_map, ref.eta_map if cap else None, block_cells=17,
                             on_bound=ref.on_bound, converged=ref.converged, grad_norm=ref.grad_norm,
                             n_iter=ref.n_iter, objective=ref.objective, delta=ref.delta, log_anchor=la)
        np.testing.assert_allclose(got.precision.S, ref.precision.S, rtol=1e-12)
        np.testing.assert_allclose(got.log_det_neg_H(), ref.log_det_neg_H(), rtol=1e-12)
        if cap:
            np.testing.assert_allclose(got.s, ref.s, rtol=1e-12)
            np.testing.assert_allclose(got.bbar, ref.bbar, rtol=1e-10, atol=1e-14)
        else:
            assert got.bbar is None and got.s is None
        x32 = ref.x_map.astype(np.float32)
        out = final_posteriors(sim.counts, p, la, x0=x32, eta0=ref.eta_map if cap else None,
                               block_cells=16, gtol=1e-10)
        assert out.cells.x_map.dtype == np.float64 and out.cells.x_map is not x32
        np.testing.assert_allclose(out.cells.x_map, ref.x_map, atol=1e-8)
        ev_ref = laplace_objective(sim.counts, p, la, ref, with_grad=False)[0]
        np.testing.assert_allclose(out.evidence, ev_ref, rtol=1e-12)


def test_final_posteriors_store_float32_maps_in_place(tmp_path):
    """map_dtype="float32": each block is solved in float64 and stored rounded, so the stored MAPs
    are the float64 pass's rounded to float32 (bit for bit, from the same warm start) and the
    evidence is unchanged; a float32 warm start is overwritten in place (one N x G array). Through
    pln_ref.fit the result keeps float32 MAPs and its save / load / AnnData export work."""
    import pln_ref
    from pln_ref.laplace import newton_map
    from pln_ref.outer.final import final_posteriors

    p = pln_ref.random_params(30, 2, seed=3, capture=True)
    sim = pln_ref.simulate(p, 70, seed=4)
    la = sim.log_anchor
    ref = newton_map(sim.counts, p, la, gtol=1e-3)
    x32 = ref.x_map.astype(np.float32)
    f64 = final_posteriors(sim.counts, p, la, x0=x32, eta0=ref.eta_map, block_cells=16)
    out = final_posteriors(sim.counts, p, la, x0=x32.copy(), eta0=ref.eta_map, block_cells=16,
                           map_dtype="float32")
    assert out.cells.x_map.dtype == np.float32
    np.testing.assert_array_equal(out.cells.x_map, f64.cells.x_map.astype(np.float32))
    np.testing.assert_array_equal(out.evidence, f64.evidence)
    x0 = x32.copy()
    again = final_posteriors(sim.counts, p, la, x0=x0, eta0=ref.eta_map, block_cells=16,
                             map_dtype="float32", reuse_x0=True)
    assert again.cells.x_map is x0
    np.testing.assert_array_equal(x0, out.cells.x_map)
    with pytest.raises(ValueError, match="reuse_x0 needs x0 as a writeable float64"):
        final_posteriors(sim.counts, p, la, x0=x32, block_cells=16, reuse_x0=True)
    with pytest.raises(ValueError, match="map_dtype"):
        final_posteriors(sim.counts, p, la, block_cells=16, map_dtype="float16")
    with pytest.raises(ValueError, match="map_dtype must be 'float64' or 'float32'"):
        pln_ref.LaplaceConfig(map_dtype="half")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the step cap's ConvergenceWarning
        r64 = pln_ref.fit(sim.counts, k=2, n_steps=3, progress=False, library_size=np.exp(la))
        r32 = pln_ref.fit(sim.counts, k=2, n_steps=3, progress=False, library_size=np.exp(la),
                          map_dtype="float32")
    assert r32.cells.x_map.dtype == np.float32 and r32.settings["map_dtype"] == "float32"
    np.testing.assert_allclose(r32.cells.x_map, r64.cells.x_map, rtol=1e-6, atol=1e-6)
    assert r32.diagnostics["objective"] == r64.diagnostics["objective"]
    r32.save(tmp_path / "r32.npz")
    back = pln_ref.PLNResult.load(tmp_path / "r32.npz")
    np.testing.assert_array_equal(back.cells.x_map, r32.cells.x_map)
    ad = r32.to_anndata(write="map,sd,denoised")
    np.testing.assert_array_equal(ad.layers["pln_map"], r32.cells.x_map)
    for name in ("sd", "denoised"):
        np.testing.assert_allclose(ad.layers[f"pln_{name}"], r64.to_anndata(write=name).layers[f"pln_{name}"],
                                   rtol=1e-5, atol=1e-6)


def test_map_posteriors_subset_reads_only_its_rows(monkeypatch):
    """MapCellPosteriors.subset (a block of cells in eta_marginal, PPC, importance sampling) is again
    a MapCellPosteriors that derives lambda and bbar for its own rows only, and equals the rows of
    the full posterior's derived quantities (the former subset) to 1e-12."""
    import pln_ref
    from pln_ref.laplace import newton_map
    from pln_ref.outer import final as F

    p = pln_ref.random_params(25, 3, seed=5, capture=True)
    sim = pln_ref.simulate(p, 60, seed=6)
    ref = newton_map(sim.counts, p, sim.log_anchor, gtol=1e-10)
    full = F.map_posteriors(p, ref.x_map, ref.eta_map, block_cells=17, on_bound=ref.on_bound,
                            converged=ref.converged, grad_norm=ref.grad_norm, n_iter=ref.n_iter,
                            objective=ref.objective, delta=ref.delta, log_anchor=sim.log_anchor)
    rows = []
    bbar = F.eta_bbar
    monkeypatch.setattr(F, "eta_bbar", lambda A: rows.append(A.S.shape[0]) or bbar(A))
    for idx in (slice(10, 20), np.arange(5, 15), np.arange(60) % 7 == 0):
        sub = full.subset(idx)
        n = sub.x_map.shape[0]
        assert isinstance(sub, F.MapCellPosteriors) and sub.precision.lam.shape == (n, 25)
        rows.clear()
        np.testing.assert_allclose(sub.bbar, ref.bbar[idx], rtol=1e-12, atol=1e-14)
        assert rows == [n]  # only the subset's rows are solved
        np.testing.assert_allclose(sub.sd_x(), ref.sd_x()[idx], rtol=1e-12)
        np.testing.assert_allclose(sub.eta_mean_var(), np.asarray(ref.eta_mean_var())[:, idx], rtol=1e-12)
        np.testing.assert_array_equal(sub.converged, ref.converged[idx])
        np.testing.assert_array_equal(sub.log_anchor, sim.log_anchor[idx])


def test_fit_sparse_equals_dense_input():
    """fit on CSR counts (kept sparse end to end) gives the dense input's fit."""
    import pln_ref

    p = pln_ref.random_params(25, 2, seed=5, capture=True)
    u = pln_ref.simulate(p, 120, seed=6).counts
    u = u[u.sum(1) > 0][:, u.sum(0) > 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = pln_ref.fit(u, k=2, n_steps=4, progress=False)
        b = pln_ref.fit(sp.csr_matrix(u), k=2, n_steps=4, progress=False)
    np.testing.assert_allclose(b.mu, a.mu, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(b.x_map, a.x_map, rtol=1e-9, atol=1e-9)
    assert b.diagnostics["objective"] == pytest.approx(a.diagnostics["objective"], rel=1e-12)
