"""pln_ref.outer: stopping certificate, start, L-BFGS to the reference, evaluator cache,
checkpoint fingerprint and resume, injectable line search."""

import warnings

import numpy as np
import pytest

import pln_ref
from pln_ref.constants import D_FLOOR
from pln_ref.exceptions import ConvergenceWarning
from pln_ref.fit_laplace import LaplaceFitState, optimize_globals
from pln_ref.laplace import backtracking_line_search, newton_map
from pln_ref.outer.evaluate import WARM_START_DTYPE, Evaluator
from pln_ref.outer.lbfgs import _cap_step, from_z, newton_decrement_tol, newton_schedule, to_z
from pln_ref.outer.start import initial_globals, raise_d
from pln_ref.outer.state import check_fingerprint, data_fingerprint
from pln_ref.outer.stopping import StopRule


def _sim(G=10, k=2, N=600, seed=5, mean_log_rate=2.0):
    p = pln_ref.random_params(G, k, seed=seed, capture=True, mean_log_rate=mean_log_rate)
    sim = pln_ref.simulate(p, N, seed=seed + 1)
    return p, sim.counts.astype(float), sim.log_anchor


def test_certificate_refuses_a_slow_linear_creep_and_accepts_a_converging_tail():
    """Gains of ~8e-5 per step with a small quasi-Newton gap (measured: such a fit was still 4e-3
    nats/cell short) are not certified; gains shrinking 10x per step are; the window estimate of a
    geometric tail is its exact remaining sum."""
    rule = StopRule(gap_tol=1e-4)
    creep = [4e-4] + [8e-5, 7e-5, 7.5e-5, 8e-5, 7.9e-5] * 4
    assert all(rule.check(5e-5, creep[:i], 1e-3) is None for i in range(1, len(creep) + 1))
    assert rule.estimate(5e-5, creep) > 1e-3
    rule = StopRule(gap_tol=1e-4)
    fast = [10.0 ** -j for j in range(2, 12)]
    out = [rule.check(1e-7, fast[:i], 1e-3) for i in range(1, len(fast) + 1)]
    assert out[-1] is not None and out[-1][0] == "certificate"
    assert all(o is None for o in out[:7])  # not before 2 min_window gains exist
    q = 0.9
    geo = [q**j for j in range(40)]
    assert rule.tail(geo) == pytest.approx(sum(q**j for j in range(40, 4000)), rel=1e-9)
    assert StopRule(grad_tol=1e-9).check(1.0, [], 1e-10)[0] == "gradient"


def test_certificate_completes_with_one_check_after_the_final_tolerance_resolve():
    """After the certificate held at a loose Newton tolerance, ``run_lbfgs`` re-solves the iterate at
    the final tolerance and sets the streak to n_confirm - 1: one more check that holds (from the
    re-solved gradient) certifies, one that fails starts the count over; ``reset()`` starts over."""
    fast = [10.0 ** -j for j in range(2, 12)]
    rule = StopRule(gap_tol=1e-4)
    rule.reset(rule.n_confirm - 1)
    assert rule.check(1e-7, fast, 1e-3)[0] == "certificate"
    rule.reset(rule.n_confirm - 1)
    assert rule.check(1.0, fast, 1e-3) is None  # the re-solved quasi-Newton gap is too large
    assert rule.check(1e-7, fast, 1e-3) is None  # ... so two consecutive checks are needed again
    assert rule.check(1e-7, fast, 1e-3)[0] == "certificate"
    rule.reset()
    assert rule.check(1e-7, fast, 1e-3) is None


def test_newton_schedule_and_coordinates():
    assert newton_schedule(10.0, 1e-6) == 1e-3
    assert newton_schedule(3e-3, 1e-6) == 1e-4
    assert newton_schedule(1e-9, 1e-6) == 1e-6
    rng = np.random.default_rng(0)
    mu, W, d = rng.normal(size=4), rng.normal(size=(4, 2)), rng.uniform(0.01, 1, 4)
    m2, W2, d2 = from_z(to_z(mu, W, d), 4, 2)
    np.testing.assert_allclose(d2, d)
    np.testing.assert_array_equal(W2, W)
    assert from_z(np.zeros(4 + 8 + 4), 4, 2)[2].min() == D_FLOOR


def test_raise_d_keeps_mean_counts_and_lifts_small_lambda_d():
    p, u, la = _sim()
    mom = pln_ref.method_of_moments(u, 2, capture=p.capture, log_anchor=la)
    lam = u.mean(axis=0)
    q = raise_d(mom, lam)
    np.testing.assert_allclose(q.mu + 0.5 * q.sigma_diag(), mom.mu + 0.5 * mom.sigma_diag())
    assert np.all(q.d >= mom.d)
    assert np.all(lam * q.d >= np.minimum(1.0, 0.5 * lam) * (1 - 1e-12))
    st = initial_globals(u, 2, p.capture, la)
    assert st.info["n_d_raised"] == int(np.sum(st.params.d > st.moments.d))


def test_raised_start_reaches_the_same_optimum():
    """Weakly expressed genes (mean count ~0.5), where the moments put d at its floor: L-BFGS from
    the raised start and from the plain moments reach the same evidence (within 2e-4 nats/cell;
    the certificate's tolerance is 1e-4 each). (Measured on real counts 2000 x 200: 83 vs 89 steps,
    7.7 vs 11.9 s CPU with the preconditioned L-BFGS; 129 vs 938 steps without it.)"""
    p, u, la = _sim(G=12, k=2, N=800, seed=21, mean_log_rate=0.0)
    st = initial_globals(u, 2, p.capture, la)
    a, _ = optimize_globals(u, st.moments, la, progress=False)
    b, _ = optimize_globals(u, st.params, la, progress=False)
    print(f"steps: moments start {a.step}, raised start {b.step}; values {a.best_value:.6f} {b.best_value:.6f}"
          f"; d at the moment floor {st.info['n_d_at_moment_floor']}")
    assert abs(a.best_value - b.best_value) < 2e-4
    assert a.stop_rule == b.stop_rule == "certificate"


def test_lbfgs_default_reaches_the_reference_and_reports_its_rule():
    p, u, la = _sim()
    init = initial_globals(u, 2, p.capture, la).params
    st, q = optimize_globals(u, init, la, progress=False)
    ref, qr = optimize_globals(u, q, la, gtol=1e-9, gap_tol=1e-10, progress=False)
    ev = Evaluator(u, la, p.capture)
    gap = ev(qr.mu, qr.W, qr.d, gtol=1e-9, with_grad=False).value - ev(q.mu, q.W, q.d, gtol=1e-9,
                                                                      with_grad=False).value
    print(f"default fit: {st.step} steps, {st.stopped}; gap to the reference {gap:.2e} nats/cell")
    assert st.stop_rule in ("certificate", "gradient")
    assert -1e-9 < gap < 1e-4
    assert st.gap_estimate <= 1e-4


def test_step_cap_warns_and_says_so():
    p, u, la = _sim(N=200)
    init = initial_globals(u, 2, p.capture, la).params
    with pytest.warns(ConvergenceWarning, match="n_steps=2 reached"):
        st, _ = optimize_globals(u, init, la, n_steps=2, progress=False)
    assert st.stop_rule == "step_cap" and st.step == 2


def test_a_stall_above_the_tolerance_warns_unless_asked_not_to(monkeypatch):
    """A stalled fit is not certified when its gap estimate is above gap_tol: a ConvergenceWarning
    says so (the line search is made to find no decrease, so the fit stalls with no gains and an
    infinite estimate); a sampled phase before the last passes warn_stall=False and goes on."""
    from pln_ref.outer import lbfgs

    p, u, la = _sim(N=200)
    init = initial_globals(u, 2, p.capture, la).params
    monkeypatch.setattr(lbfgs, "_line_search", lambda *a, **k: None)
    with pytest.warns(ConvergenceWarning, match="stalled.*not certified"):
        st, _ = optimize_globals(u, init, la, progress=False)
    assert st.stop_rule == "stalled" and st.step == 0
    ev = Evaluator(u, la, p.capture)
    st2 = LaplaceFitState(mu=init.mu.copy(), W=init.W.copy(), rho=np.log(init.d))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        lbfgs.run_lbfgs(ev, st2, n_steps=10, gtol=1e-6, rule=StopRule(), progress=False, warn_stall=False)
    assert st2.stop_rule == "stalled"


def test_evaluator_does_not_resolve_at_unchanged_globals():
    p, u, la = _sim(N=100)
    ev = Evaluator(u, la, p.capture)
    e1 = ev(p.mu, p.W, p.d, gtol=1e-6)
    e2 = ev(p.mu.copy(), p.W.copy(), p.d.copy(), gtol=1e-4)  # looser: the cached solve serves
    assert e2 is e1 and ev.n_evals == 1 and ev.n_cached == 1
    ev(p.mu, p.W, p.d, gtol=1e-8)  # tighter: re-solved (warm)
    assert ev.n_evals == 2


def test_evaluator_cache_respects_the_decrement_tolerance():
    """A solve stopped by the Newton decrement serves only requests at least as loose; the
    schedule uses the decrement only above the final tolerance."""
    assert newton_decrement_tol(1e-3, 1e-6) == pytest.approx(1e-6)
    assert newton_decrement_tol(1e-6, 1e-6) is None
    p, u, la = _sim(N=100)
    ev = Evaluator(u, la, p.capture)
    e1 = ev(p.mu, p.W, p.d, gtol=1e-4, dec_tol=1e-7)
    assert e1.dec_tol == 1e-7
    assert ev(p.mu, p.W, p.d, gtol=1e-4, dec_tol=1e-6) is e1  # looser: cached
    e2 = ev(p.mu, p.W, p.d, gtol=1e-4)  # gradient criterion alone: re-solved
    assert e2 is not e1 and ev.n_evals == 2 and e2.dec_tol is None
    assert ev(p.mu, p.W, p.d, gtol=1e-4, dec_tol=1e-7) is e2  # a gradient-only solve serves any
    # the early, loose evaluations' evidence: within 1e-4 nats/cell of a tight solve (here 1.4e-5;
    # the log-determinant is first order in the MAP's error, f only second order)
    tight = Evaluator(u, la, p.capture)(p.mu, p.W, p.d, gtol=1e-10).value
    assert abs(e1.value - tight) < 1e-4 and abs(e2.value - tight) < 1e-4


def test_lbfgs_resume_continues_to_the_same_fit(tmp_path):
    p, u, la = _sim(N=300)
    init = initial_globals(u, 2, p.capture, la).params
    full, q_full = optimize_globals(u, init, la, progress=False)
    ck = tmp_path / "ck.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        optimize_globals(u, init, la, n_steps=4, checkpoint=str(ck), checkpoint_every=2, progress=False)
    st = LaplaceFitState.load(ck)
    assert st.step == 4 and st.lbfgs_s is not None and st.elapsed_cpu_s > 0
    cpu_before = st.elapsed_cpu_s
    st2, q_res = optimize_globals(u, init, la, resume=st, progress=False)
    assert st2.stop_rule in ("certificate", "gradient")
    assert abs(st2.best_value - full.best_value) < 1e-4
    assert st2.elapsed_cpu_s > cpu_before  # time accumulates over the resume


def test_fingerprint_names_what_differs():
    rng = np.random.default_rng(0)
    u = rng.poisson(3.0, (20, 5)).astype(float)
    cap = pln_ref.Capture(100.0, 0.5)
    a = data_fingerprint(u, np.log(u.sum(1)), cap, 2, {"optimizer": "lbfgs"})
    check_fingerprint(a, dict(a))
    u2 = u.copy()
    u2[0, 0] += 1
    b = data_fingerprint(u2, np.log(u.sum(1)), pln_ref.Capture(120.0, 0.5), 3, {"optimizer": "lbfgs"})
    with pytest.raises(ValueError) as e:
        check_fingerprint(a, b, "checkpoint ck.npz")
    msg = str(e.value)
    assert "\n" not in msg
    assert "counts (different values)" in msg and "capture" in msg and "k (2 in the checkpoint vs 3 now)" in msg
    assert "log_anchor" not in msg
    with pytest.raises(ValueError, match="no data fingerprint"):
        check_fingerprint({}, b)


def test_fit_refuses_a_checkpoint_of_other_counts(tmp_path):
    """Issue 11 item 2: resuming from another data set's checkpoint (same shape) is refused."""
    p, u, la = _sim(N=150)
    ck = tmp_path / "ckA.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        r1 = pln_ref.fit(u, k=2, n_steps=3, checkpoint=str(ck), progress=False)
        other = np.random.default_rng(1).permutation(u, axis=0)[:, ::-1].copy()
        with pytest.raises(ValueError, match=r"written for another fit: .*counts \(different values\)"):
            pln_ref.fit(other, k=2, n_steps=10, resume=str(ck), progress=False)
        r2 = pln_ref.fit(u, k=2, n_steps=6, resume=str(ck), progress=False)
    assert r2.diagnostics["steps"] == 6
    # wall/CPU time count the first run too
    assert r2.diagnostics["cpu_time_s"] > LaplaceFitState.load(ck).elapsed_cpu_s - 1e-9
    assert LaplaceFitState.load(ck).elapsed_s >= r1.diagnostics["wall_time_s"] - r1.diagnostics["wall_time_s"]


def test_newton_map_uses_the_injected_line_search():
    p, u, la = _sim(N=50)
    calls = []

    def ls(prob):
        calls.append(prob.x.shape[0])
        return backtracking_line_search(prob)

    a = newton_map(u, p, la, gtol=1e-10, line_search=ls)
    b = newton_map(u, p, la, gtol=1e-10)
    assert calls and calls[0] == 50
    np.testing.assert_allclose(a.x_map, b.x_map)
    with pytest.raises(ValueError, match="line_search must be a callable"):
        newton_map(u, p, la, line_search="armijo")


def test_s_inverse_is_cached():
    p, u, la = _sim(N=20)
    post = newton_map(u, p, la)
    A = post.precision
    assert A.S_inv() is A.S_inv()
    np.testing.assert_allclose(A.S_inv() @ A.S, np.broadcast_to(np.eye(2), A.S.shape), atol=1e-10)


def test_corrected_em_has_the_laplace_optimum_as_fixed_point():
    """The corrected EM map (adjoint w and truncation kappa) leaves the optimum of the evidence in
    place (to 1e-5); the plain Laplace-EM map (w = 0, kappa = 0) moves it (by > 1e-3). The fit's
    certificate bounds the evidence gap, not the distance to the optimum: its gradient is still
    about 1e-5, and the EM map's displacement follows the gradient (2.8e-6 at the fit the Fisher
    preconditioner with ``effective_rate`` reaches, 5e-7 with the earlier mean rate; the two
    evidences differ by 2.5e-9 nats/cell)."""
    from pln_ref.outer.em import em_update
    from pln_ref.outer.evaluate import Evaluation

    p, u, la = _sim()
    init = initial_globals(u, 2, p.capture, la).params
    _, q = optimize_globals(u, init, la, gtol=1e-9, gap_tol=1e-11, progress=False)
    ev = Evaluator(u, la, p.capture)
    e = ev(q.mu, q.W, q.d, gtol=1e-10)
    mu2, W2, d2 = em_update(ev, e, q.mu, q.W, q.d)
    S = q.sigma_dense()
    moved = max(np.abs(mu2 - q.mu).max(), np.abs(W2 @ W2.T + np.diag(d2) - S).max())
    plain_terms = e.terms._replace(wx=np.zeros_like(e.terms.wx), kappa=np.zeros_like(e.terms.kappa))
    mu3, W3, d3 = em_update(ev, Evaluation(e.value, e.grad, e.post, e.gtol, plain_terms), q.mu, q.W, q.d)
    moved_plain = max(np.abs(mu3 - q.mu).max(), np.abs(W3 @ W3.T + np.diag(d3) - S).max())
    print(f"corrected EM moves the optimum by {moved:.1e}, plain EM by {moved_plain:.1e}")
    assert moved < 1e-5
    assert moved_plain > 1e-3


@pytest.mark.parametrize("storage", ["dense", "csr"])
def test_blocked_evaluation_equals_the_unblocked_one(storage):
    """Evidence, gradient, info_mu and MAPs by blocks of 37 cells (an uneven last block) equal one
    unblocked evaluation to 1e-10 relative, from counts given dense or as CSR; the blocked one keeps
    no posterior, and a warm-started second call (from the float32 warm start) matches too."""
    import scipy.sparse as sp

    p, u, la = _sim(N=200)
    q = pln_ref.PLNParams(p.mu + 0.1, p.W * 0.9, p.d * 1.2, p.capture)
    counts = sp.csr_matrix(u) if storage == "csr" else u
    full = Evaluator(u, la, p.capture)
    blk = Evaluator(counts, la, p.capture, block_cells=37)
    for prm in (p, q):
        ef = full(prm.mu, prm.W, prm.d, gtol=1e-9)
        eb = blk(prm.mu, prm.W, prm.d, gtol=1e-9)
        assert eb.post is None and eb.terms.wx is None
        assert eb.n_on_bound == int(ef.post.on_bound.sum())
        np.testing.assert_allclose(eb.terms.l, ef.terms.l, rtol=1e-10)
        assert abs(eb.value - ef.value) <= 1e-10 * abs(ef.value)
        for key in ("mu", "W", "d"):
            np.testing.assert_allclose(eb.grad[key], ef.grad[key], rtol=1e-10,
                                       atol=1e-10 * np.abs(ef.grad[key]).max())
        np.testing.assert_allclose(eb.terms.info_mu, ef.terms.info_mu, rtol=1e-10)
        np.testing.assert_allclose(eb.terms.rate_info, ef.terms.rate_info, rtol=1e-10)
        # the blocked warm start is kept in float32 (WARM_START_DTYPE): its rounding, no more
        assert blk.x_map.dtype == WARM_START_DTYPE
        np.testing.assert_array_equal(blk.x_map, full.x_map.astype(WARM_START_DTYPE))
        np.testing.assert_allclose(blk.eta_map, full.eta_map, rtol=1e-10, atol=1e-10)


def test_terms_sum_equals_the_sum_of_the_kept_blocks():
    """``TermsSum`` (blocks summed as they come, also behind ``_sum_terms``) gives l concatenated and
    the gradient, info_mu and rate_info summed in block order, to the last bit, without summing into
    the first block's arrays; without a gradient only l."""
    from pln_ref.outer.evaluate import LaplaceTerms, TermsSum, _sum_terms

    rng = np.random.default_rng(2)
    G, k = 7, 2

    def block(n):
        return LaplaceTerms(rng.normal(size=n), {"mu": rng.normal(size=G), "W": rng.normal(size=(G, k)),
                                                 "d": rng.normal(size=G)}, None, None,
                            rng.normal(size=G), rng.normal(size=G))

    parts = [block(n) for n in (5, 3, 4)]
    first_W = parts[0].grad["W"].copy()
    acc = TermsSum()
    for t in parts:
        acc.add(t)
    a, b, c = parts
    for got in (acc.terms(), _sum_terms(parts)):
        assert np.array_equal(got.l, np.concatenate([a.l, b.l, c.l]))
        for key in ("mu", "W", "d"):
            assert np.array_equal(got.grad[key], a.grad[key] + b.grad[key] + c.grad[key])
        assert np.array_equal(got.info_mu, a.info_mu + b.info_mu + c.info_mu)
        assert np.array_equal(got.rate_info, a.rate_info + b.rate_info + c.rate_info)
    assert np.array_equal(parts[0].grad["W"], first_W)  # the first block's arrays are not summed into
    acc = TermsSum()
    acc.add(LaplaceTerms(np.ones(2), None, None, None))
    assert acc.terms().grad is None and np.array_equal(acc.terms().l, np.ones(2))


def test_blocked_evaluator_refuses_a_bad_block_size():
    p, u, la = _sim(N=20)
    with pytest.raises(ValueError, match="block_cells must be a positive integer"):
        Evaluator(u, la, p.capture, block_cells=0)


def test_cap_step_clips_coordinates_and_keeps_descent():
    """Later L-BFGS steps are clipped per coordinate (a box trust region), so one large coordinate
    does not shrink the others; when clipping would lose descent (g^T p >= 0) the whole step is
    scaled instead, and without a gradient (the first step) it is always scaled."""
    g = np.array([-1.0, -0.2, 0.1])
    p = np.array([5.0, 0.3, -0.05])  # descent: g^T p < 0
    np.testing.assert_array_equal(_cap_step(p, 1.0, g), [1.0, 0.3, -0.05])
    np.testing.assert_allclose(_cap_step(p, 1.0), p / 5.0)
    np.testing.assert_array_equal(_cap_step(p, 10.0, g), p)  # within the cap: unchanged
    g2, p2 = np.array([-1.0, 19.0]), np.array([10.0, 0.5])  # g^T p = -0.5, clipped: +8.5
    q = _cap_step(p2, 1.0, g2)
    np.testing.assert_allclose(q, p2 / 10.0)
    assert float(g2 @ q) < 0
