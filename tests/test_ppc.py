"""Posterior predictive checks (pln_ref.ppc): the modes draw what they say, the streamed
statistics equal the direct ones, calibration on data simulated from the model, findings."""

import numpy as np
import pytest

import pln_ref
from pln_ref.laplace import newton_map
from pln_ref.ppc import (CHECKS, PPC_MODES, PPCSummary, _stats, plot_zero_fraction, posterior_predictive,
                         ppc_summary)

G, N, K = 30, 600, 2


@pytest.fixture(scope="module")
def sim():
    p = pln_ref.random_params(G, K, seed=45, capture=True, mean_log_rate=1.0)
    s = pln_ref.simulate(p, N, seed=46)
    keep = s.counts.sum(1) > 0
    return p, s.counts[keep], s.log_anchor[keep]


@pytest.fixture(scope="module")
def post(sim):
    p, u, la = sim
    return newton_map(u, p, la)  # Laplace posteriors at the true globals


def test_streamed_statistics_equal_the_replicates(sim, post):
    _, u, _ = sim
    for mode in PPC_MODES:
        reps = posterior_predictive(post, 4, mode=mode, seed=7, counts=u)
        s = ppc_summary(u, post, n_samples=4, mode=mode, seed=7)
        for r in range(4):
            direct = _stats(reps[r])
            for k in direct:
                np.testing.assert_allclose(s.replicated[k][r], direct[k], rtol=1e-10, atol=1e-12, err_msg=(mode, k))


def test_joint_draws_eta_with_x(sim, post):
    """mode "joint_gaussian" draws eta from its posterior jointly with x (the old "laplace" mode held eta
    at its MAP): with eta free, x - eta varies by the eta spread along the direction (1 - b)."""
    from pln_ref.ppc import _block_log_rates

    _, u, la = sim
    idx = np.arange(50)
    rng = np.random.default_rng(0)
    zj = _block_log_rates("joint_gaussian", post, idx, u, la, rng, 400, 0)
    zf = _block_log_rates("fixed_eta", post, idx, u, la, rng, 400, 0)
    assert np.mean(zj.var(0)) > 1.02 * np.mean(zf.var(0))
    assert pln_ref.ppc._mode("laplace") == "joint" and pln_ref.ppc._mode("posterior") == "joint"


def test_joint_draws_from_the_eta_marginal_posterior(sim, post):
    """mode "joint" on a Gaussian Laplace posterior draws from its eta-marginal posterior
    (``eta_marginal``, the posterior of ``LaplaceResult.with_eta_marginal``): the same replicates as
    drawing from that posterior directly, and eta sits above the joint mode's Gaussian (the
    log-determinant shift), so the replicated totals are lower than "joint_gaussian"'s."""
    from pln_ref.eta_marginal import eta_marginal

    _, u, la = sim
    em = eta_marginal(u, post, la)
    a = posterior_predictive(post, 3, mode="joint", seed=5, counts=u)
    b = posterior_predictive(em, 3, mode="joint", seed=5, counts=u)
    np.testing.assert_array_equal(a, b)
    assert np.median(em.eta_mean_var()[0] - post.eta_mean_var()[0]) > 0.02
    g = posterior_predictive(post, 3, mode="joint_gaussian", seed=5)
    assert a.sum() < g.sum()


def test_joint_skew_draws_from_the_skew_corrected_eta_marginal_posterior(sim, post):
    """skew=True in mode "joint": the replicates of ``eta_marginal(..., skew=True)`` drawn directly,
    not those of the default (Gaussian x | eta) posterior."""
    from pln_ref.eta_marginal import eta_marginal

    _, u, la = sim
    es = eta_marginal(u, post, la, skew=True)
    a = posterior_predictive(post, 3, mode="joint", seed=5, counts=u, skew=True)
    np.testing.assert_array_equal(a, posterior_predictive(es, 3, mode="joint", seed=5, counts=u))
    assert not np.array_equal(a, posterior_predictive(post, 3, mode="joint", seed=5, counts=u))
    s = ppc_summary(u, post, n_samples=3, mode="joint", seed=5, skew=True)
    np.testing.assert_array_equal(s.replicated["total_counts"], np.sort(a.sum(2), axis=1))
    with pytest.raises(ValueError, match='mode "joint" only'):
        ppc_summary(u, post, n_samples=2, mode="joint_is", skew=True)
    with pytest.raises(ValueError, match="skew must be True or False"):
        posterior_predictive(post, 2, mode="joint", counts=u, skew="yes")


def test_calibrated_modes_cover_on_simulated_data(sim, post):
    """On data simulated from the model, the joint draws from the eta-marginal Laplace posterior
    ("joint") and the PSIS-corrected joint draws cover >= 90% of every statistic; the model
    predictive at the true globals is exactly calibrated (its expected share is 95%, lumpy over 30
    correlated genes: 83-100% measured over three seeds); the Gaussian Laplace joint draws
    ("joint_gaussian") replicate too many counts (its eta marginal sits below the exact posterior's,
    see the ppc module docstring)."""
    _, u, _ = sim
    j = ppc_summary(u, post, n_samples=100, mode="joint", seed=1)
    assert min(j.coverage95.values()) >= 0.9, j.coverage95
    jis = ppc_summary(u, post, n_samples=100, mode="joint_is", seed=1, n_proposals=200)
    assert min(jis.coverage95.values()) >= 0.9, jis.coverage95
    s = ppc_summary(u, post, n_samples=100, mode="predictive", seed=1)
    assert min(s.coverage95.values()) >= 0.8, s.coverage95
    jg = ppc_summary(u, post, n_samples=100, mode="joint_gaussian", seed=1)
    assert min(jg.coverage95.values()) < 0.9, jg.coverage95
    assert np.median(jg.replicated["total_counts"]) > np.median(jis.replicated["total_counts"])


def test_predictive_uses_the_anchors(sim, post):
    p, u, la = sim
    s = ppc_summary(u, post, n_samples=50, mode="predictive", seed=2)
    # cells with a larger anchor (smaller capture loss) get larger replicated totals
    reps = posterior_predictive(post, 20, mode="predictive", seed=3).sum(2).mean(0)
    assert np.corrcoef(reps, la)[0, 1] > 0.3
    assert s.coverage95["total_counts"] >= 0.9


def test_findings_and_report_in_plain_words(tmp_path):
    rng = np.random.default_rng(0)
    Gs, R = 40, 50
    obs = {"mean": np.full(Gs, 2.0), "var": np.full(Gs, 4.0), "zero_frac": np.full(Gs, 0.5),
           "total_counts": np.arange(100.0)}
    rep = {"mean": 2.0 + 0.01 * rng.standard_normal((R, Gs)), "var": 4.0 + 0.1 * rng.standard_normal((R, Gs)),
           "zero_frac": np.full((R, Gs), 0.4) + 0.001 * rng.standard_normal((R, Gs)),
           "total_counts": np.sort(rng.uniform(0, 100, (R, 100)), axis=1)}
    rep["zero_frac"][:, :2] = 0.6  # 2 of 40 genes have fewer zeros than replicated
    cov = {k: 0.0 for k in obs}
    s = PPCSummary("joint", obs, rep, {k: np.zeros(Gs) for k in ("mean", "var", "zero_frac")}, cov)
    f = s.findings()
    assert f["zero_frac"].startswith("95% of genes show more zeros than replicated")
    assert "+25.0%" in f["zero_frac"]
    text = s.report()
    for what in CHECKS.values():
        assert what in text
    path = tmp_path / "zf.png"
    plot_zero_fraction(s, path)
    assert path.stat().st_size > 5000


def test_bad_mode_and_shapes(sim, post):
    _, u, _ = sim
    with pytest.raises(ValueError, match="mode"):
        ppc_summary(u, post, n_samples=2, mode="bogus")
    with pytest.raises(ValueError, match="shape"):
        ppc_summary(u[:, :5], post, n_samples=2)
    with pytest.raises(ValueError, match="counts"):
        posterior_predictive(post, 2, mode="joint_is")
    with pytest.raises(ValueError, match="joint_gaussian"):
        posterior_predictive(post, 2, mode="joint")  # the eta-marginal posterior needs the counts


def test_every_mode_on_a_vae_result(sim):
    torch = pytest.importorskip("torch")
    import warnings

    torch.set_num_threads(1)
    p, u, la = sim
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pln_ref.ConvergenceWarning)
        vae = pln_ref.fit(u[:300], inference_method="vae", k=K, n_steps=30, eval_every=10, progress=False)
    for mode in PPC_MODES:
        s = ppc_summary(u[:300], vae, n_samples=5, mode=mode, seed=0, n_proposals=50)
        assert s.replicated["mean"].shape == (5, G) and np.all(np.isfinite(s.replicated["var"])), mode


def test_sparse_counts_read_by_blocks_give_the_dense_summary(sim, post, monkeypatch):
    """ppc_summary of CSR counts read in blocks of 7 cells: the observed statistics equal the former
    all-cell dense formulas bit for bit, and replicates and p-values equal the dense input's; no
    count matrix is densified whole."""
    import scipy.sparse as sp

    from pln_ref.counts import CountMatrix

    _, u, _ = sim
    ud = np.asarray(u, dtype=float)
    old = {"mean": ud.mean(axis=0), "var": ud.var(axis=0, ddof=1), "zero_frac": (ud == 0).mean(axis=0),
           "total_counts": np.sort(ud.sum(axis=1))}
    ref = ppc_summary(u, post, n_samples=5, mode="joint_is", seed=3, n_proposals=30)
    monkeypatch.setattr(CountMatrix, "toarray", lambda self: pytest.fail("counts densified whole"))
    cm = CountMatrix(sp.csr_array(u), block_entries=7 * u.shape[1])
    assert cm.block_size == 7 < u.shape[0]
    s = ppc_summary(cm, post, n_samples=5, mode="joint_is", seed=3, n_proposals=30)
    for k, v in old.items():
        np.testing.assert_array_equal(s.observed[k], v, err_msg=k)
        np.testing.assert_array_equal(s.replicated[k], ref.replicated[k], err_msg=k)
        np.testing.assert_array_equal(s.p_values[k], ref.p_values[k], err_msg=k)
    # modes that do not read the counts need none (no N x G placeholder); "joint_is" does
    np.testing.assert_array_equal(posterior_predictive(post, 2, mode="map", seed=1),
                                  posterior_predictive(post, 2, mode="map", seed=1, counts=cm))
    with pytest.raises(ValueError, match="needs the observed counts"):
        posterior_predictive(post, 2, mode="joint_is")
