"""pln_ref.validation.engines: program lookup, BridgeStan models, NUTS through one interface -> ArviZ."""

from __future__ import annotations

import importlib.util
import time

import arviz as az
import numpy as np
import pytest

from pln_ref.validation.engines import bridgestan_model, default_engine, sample_nuts, stan_program
from pln_ref.validation.standata import pln_cell_data, pln_cell_unconstrain, pln_joint_data, pln_joint_inits
from pln_ref.params import Capture, PLNParams
from pln_ref.simulation import random_params, simulate

FUNNEL = """
parameters { real y; vector[9] z; }
model { y ~ normal(0, 3); z ~ normal(0, exp(y / 2)); }
"""


def test_stan_program_finds_repo_programs_and_rejects_unknown():
    for name in ("pln_cell", "pln_joint", "pln_cell.stan"):
        path = stan_program(name)
        assert path.is_file() and path.suffix == ".stan"
    with pytest.raises(ValueError, match="unknown Stan program 'nope'.*available: .*pln_cell"):
        stan_program("nope")
    with pytest.raises(ValueError, match="bare name"):
        stan_program("../stan/pln_cell")


def test_pln_cell_helpers_validate_and_order():
    params = PLNParams(mu=np.zeros(4), W=np.ones((4, 1)) * 0.3, d=np.full(4, 0.5))
    u = np.array([[1, 2, 0, 5], [0, 0, 3, 1]])
    with pytest.raises(ValueError, match="capture is None"):
        pln_cell_data(u, params, np.log([100.0, 200.0]))
    p = params.with_capture(Capture(M0=1e4))
    with pytest.raises(ValueError, match="one entry per cell"):
        pln_cell_data(u, p, np.log([100.0]))
    with pytest.raises(ValueError, match="non-integer"):
        pln_cell_data(u + 0.5, p, np.log([100.0, 200.0]))
    with pytest.raises(ValueError, match="eta must be > 0"):
        pln_cell_unconstrain(np.zeros((2, 4)), np.array([1.0, 0.0]))
    data = pln_cell_data(u, p, np.log([100.0, 200.0]))
    model = bridgestan_model("pln_cell", data)
    x = np.arange(8.0).reshape(2, 4) / 10
    eta = np.array([0.5, 2.0])
    theta = pln_cell_unconstrain(x, eta)
    assert theta.shape == (10,) and model.param_unc_num() == 10
    np.testing.assert_allclose(model.param_constrain(theta), np.concatenate([x.T.ravel(), eta]), rtol=1e-14)


def test_bridgestan_cell_gradient_matches_numpy_gradient():
    """The BridgeStan gradient adapter for newton_map equals model.grad_log_joint on any subset
    of rows, in any order, including cells with eta at or below 1e-8 (analytic eta component)."""
    from pln_ref.model import grad_log_joint
    from pln_ref.validation.engines import BridgeStanCellGradient

    p = random_params(7, 2, seed=3, capture=True, mean_log_rate=2.0)
    sim = simulate(p, 6, seed=4)
    u, la = np.asarray(sim.counts, float), np.asarray(sim.log_anchor)
    grad = BridgeStanCellGradient(u, p, la)
    rng = np.random.default_rng(5)
    x = sim.x + rng.normal(0, 0.3, sim.x.shape)
    eta = np.array([0.7, 1e-9, 2.0, 0.0, 0.05, 3.0])
    g_x, g_eta = grad_log_joint(u, x, eta, p, la)
    for rows in (np.arange(6), np.array([4, 1, 3]), np.array([5])):
        gx, ge = grad(rows, x[rows], eta[rows])
        assert gx.shape == (rows.size, 7) and ge.shape == (rows.size,)
        np.testing.assert_allclose(gx, g_x[rows], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(ge, g_eta[rows], rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="rows"):
        grad(np.array([0, 1]), x[:1], eta[:1])
    with pytest.raises(ValueError, match="capture"):
        BridgeStanCellGradient(u, PLNParams(p.mu, p.W, p.d), la)


def test_unknown_engine_and_missing_engines_say_how_to_get_them():
    data = {}
    with pytest.raises(ValueError, match="unknown engine 'nuts9'.*stanli"):
        sample_nuts("pln_cell", data, engine="nuts9")
    if importlib.util.find_spec("stan") is None:
        with pytest.raises(ImportError, match="pip install pystan"):
            sample_nuts("pln_cell", data, engine="pystan")
    if default_engine() == "stanli":
        with pytest.raises(ImportError, match="install_cmdstan"):
            sample_nuts("pln_cell", data, engine="cmdstanpy")
    with pytest.raises(ValueError, match="chains"):
        sample_nuts("pln_cell", data, engine="stanli", chains=0)


def test_nuts_smoke_pln_joint_returns_inference_data():
    params = random_params(5, 1, seed=3, mean_log_rate=2.5, capture=True)
    sim = simulate(params, 20, seed=4)
    data = pln_joint_data(sim.counts, 1, capture=params.capture, log_anchor=sim.log_anchor)
    t0 = time.perf_counter()
    idata = sample_nuts("pln_joint", data, engine="stanli", chains=2, warmup=200, draws=200, seed=1)
    wall = time.perf_counter() - t0
    print(f"\n[engines] pln_joint N=20 G=5 k=1 2x200/200 stanli: {wall:.1f} s")
    post = idata.posterior
    assert post.sizes["chain"] == 2 and post.sizes["draw"] == 200
    assert post["x"].dims == ("chain", "draw", "cell", "gene") and post.sizes["cell"] == 20
    assert post["W"].dims == ("chain", "draw", "gene", "factor") and post.sizes["gene"] == 5
    assert post["Sigma"].dims == ("chain", "draw", "gene", "gene_b")
    ss = idata.sample_stats
    for name in ("diverging", "tree_depth", "acceptance_rate", "n_steps", "step_size", "lp", "energy"):
        assert name in ss, name
    assert ss["diverging"].dtype == bool
    rhat = az.rhat(idata, var_names=["mu", "d", "Sigma"])
    ess = az.ess(idata, var_names=["mu", "d", "Sigma"])
    for ds in (rhat, ess):
        for v in ds.data_vars.values():
            assert np.all(np.isfinite(v.values))
    assert float(rhat["mu"].max()) < 1.2
    print(f"[engines] NUTS smoke: max R-hat (mu, d, Sigma) "
          f"{max(float(v.max()) for v in rhat.data_vars.values()):.3f}, min bulk ESS "
          f"{min(float(v.min()) for v in ess.data_vars.values()):.0f}, divergences "
          f"{int(ss['diverging'].sum())}")
    # inits on the constrained scale are accepted and every chain starts there
    for centred in (False, True):
        d2 = dict(data, centred=int(centred))
        inits = pln_joint_inits(d2, params, sim.x, sim.eta)
        idata2 = sample_nuts("pln_joint", d2, engine="stanli", chains=2, warmup=20, draws=5, seed=2, inits=inits)
        assert idata2.posterior["x"].shape == (2, 5, 20, 5)


def test_pln_joint_inits_reproduce_x_in_both_parameterisations():
    params = random_params(4, 1, seed=1, capture=True)
    sim = simulate(params, 3, seed=2)
    for centred in (False, True):
        data = pln_joint_data(sim.counts, 1, capture=params.capture, log_anchor=sim.log_anchor, centred=centred)
        model = bridgestan_model("pln_joint", data)
        inits = pln_joint_inits(data, params, sim.x, sim.eta)
        flat = np.concatenate([np.asarray(inits[n], float).ravel(order="F") for n in ("mu", "W", "d", "x_c", "z", "e", "eta")])
        theta = model.param_unconstrain(flat)
        cons = model.param_constrain(theta, include_tp=True)
        names = model.param_names(include_tp=True)
        x_cols = [i for i, n in enumerate(names) if n.startswith("x.")]
        np.testing.assert_allclose(cons[x_cols], sim.x.T.ravel(), rtol=1e-12, atol=1e-12)


LAYOUT = """
parameters { real y; }
model { y ~ normal(0, 1); }
generated quantities {
  matrix[2, 3] A;
  array[2] vector[3] B;
  for (i in 1:2) for (j in 1:3) { A[i, j] = 10 * i + j; B[i][j] = 100 * i + j; }
}
"""


def test_posterior_arrays_keep_stan_index_layout(tmp_path):
    prog = tmp_path / "layout.stan"
    prog.write_text(LAYOUT)
    idata = sample_nuts(prog, {}, engine="stanli", chains=1, warmup=10, draws=3, seed=0)
    A = idata.posterior["A"].values[0, 0]
    B = idata.posterior["B"].values[0, 0]
    np.testing.assert_array_equal(A, [[11, 12, 13], [21, 22, 23]])
    np.testing.assert_array_equal(B, [[101, 102, 103], [201, 202, 203]])
    assert idata.posterior["A"].dims == ("chain", "draw", "A_dim_0", "A_dim_1")


def test_divergent_fit_is_reported_as_divergent(tmp_path):
    funnel = tmp_path / "funnel.stan"
    funnel.write_text(FUNNEL)
    idata = sample_nuts(funnel, {}, engine="stanli", chains=2, warmup=100, draws=200, seed=5, adapt_delta=0.6)
    div = idata.sample_stats["diverging"]
    assert div.dtype == bool
    assert int(div.sum()) > 0
    # ArviZ's own accessors (used by its divergence plots) see them under the ArviZ name
    assert int(az.extract(idata, group="sample_stats")["diverging"].sum()) == int(div.sum())
    print(f"\n[engines] funnel divergences: {int(div.sum())} of {div.size}")


def test_pln_joint_generated_quantities_are_the_identified_ones():
    """Sigma = W W^T + diag(d), Omega its correlation, W_id = W Q lower-triangular (top k x k)
    with positive diagonal and W_id W_id^T = W W^T, log_lik = sum of Poisson log pmf."""
    from scipy import stats

    params = random_params(6, 2, seed=7, capture=True)
    sim = simulate(params, 4, seed=8)
    data = pln_joint_data(sim.counts, 2, capture=params.capture, log_anchor=sim.log_anchor, centred=True)
    model = bridgestan_model("pln_joint", data)
    rng = np.random.default_rng(0)
    W = rng.normal(size=(6, 2))
    inits = pln_joint_inits(data, params, sim.x, sim.eta)
    inits["W"] = W
    flat = np.concatenate([np.asarray(inits[n], float).ravel(order="F") for n in ("mu", "W", "d", "x_c", "z", "e", "eta")])
    theta = model.param_unconstrain(flat)
    out = model.param_constrain(theta, include_tp=True, include_gq=True, rng=model.new_rng(seed=1))
    names = model.param_names(include_tp=True, include_gq=True)

    def block(prefix, shape):
        idx = [i for i, n in enumerate(names) if n.split(".")[0] == prefix]
        return out[idx].reshape(shape, order="F")

    Sigma = W @ W.T + np.diag(params.d)
    np.testing.assert_allclose(block("Sigma", (6, 6)), Sigma, rtol=1e-12)
    s = np.sqrt(np.diag(Sigma))
    np.testing.assert_allclose(block("Omega", (6, 6)), Sigma / np.outer(s, s), rtol=1e-12)
    W_id = block("W_id", (6, 2))
    np.testing.assert_allclose(W_id @ W_id.T, W @ W.T, rtol=1e-10, atol=1e-12)
    assert abs(W_id[0, 1]) < 1e-12 and W_id[0, 0] > 0 and W_id[1, 1] > 0
    loglik = stats.poisson.logpmf(sim.counts, np.exp(sim.x - sim.eta[:, None])).sum()
    np.testing.assert_allclose(block("log_lik", ()), loglik, rtol=1e-10)
    assert block("u_rep", (4, 6)).min() >= 0
