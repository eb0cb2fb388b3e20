"""pln_ref.validation.engines: program lookup, BridgeStan models, NUTS through one interface -> ArviZ."""

from __future__ import annotations

import importlib.util
import time

import arviz as az
import numpy as np
import pytest

from pln_ref.validation.engines import (
    bridgestan_model,
    default_engine,
    pystan_available,
    resolve_engine,
    sample_nuts,
    stan_program,
)
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
    if not pystan_available():
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


# --------------------------------------------------------------------------- issue 14: engines without real Stan

def test_pystan_detection_is_not_fooled_by_the_repository_stan_folder():
    """With the repository root importable, `import stan` finds the stan/ folder of programs (a
    namespace package without `build`): that is not PyStan."""
    import importlib

    spec = importlib.util.find_spec("stan")
    if spec is not None and importlib.util.find_spec("httpstan") is None:
        stan = importlib.import_module("stan")
        assert not hasattr(stan, "build")          # the repository's folder, not PyStan
        assert not pystan_available()
        with pytest.raises(ImportError, match="pip install pystan"):
            sample_nuts("pln_cell", {}, engine="pystan")
    assert pystan_available() == (importlib.util.find_spec("httpstan") is not None
                                  and hasattr(importlib.import_module("stan"), "build"))


def test_cmdstan_inits_leave_out_zero_size_arrays():
    from pln_ref.validation.engines import _stan_inits_json

    params = random_params(4, 1, seed=1, capture=True)
    sim = simulate(params, 3, seed=2)
    for centred, absent, present in ((False, {"x_c"}, {"z", "e", "eta"}), (True, {"z", "e"}, {"x_c", "eta"})):
        data = pln_joint_data(sim.counts, 1, capture=params.capture, log_anchor=sim.log_anchor, centred=centred)
        js = _stan_inits_json(pln_joint_inits(data, params, sim.x, sim.eta))
        assert absent.isdisjoint(js) and present <= set(js)
        assert all(np.asarray(v).size > 0 for v in js.values())
    data = pln_joint_data(sim.counts, 1, log_anchor=sim.log_anchor)  # no capture: eta is (0,)
    assert "eta" not in _stan_inits_json(pln_joint_inits(data, params.with_capture(None), sim.x))


class _Recorded(Exception):
    pass


def test_cmdstanpy_gets_adapt_engaged_false_for_warmup_0_and_clean_inits(monkeypatch):
    """Without a CmdStan: the arguments handed to CmdStanModel.sample are checked on a stand-in."""
    from pln_ref.validation import engines

    seen = {}

    class FakeModel:
        def sample(self, **kw):
            seen.update(kw)
            raise _Recorded

    monkeypatch.setattr(engines, "_cmdstan_model", lambda path, verbose: (FakeModel(), "x"))
    params = random_params(4, 1, seed=1, capture=True)
    sim = simulate(params, 3, seed=2)
    data = pln_joint_data(sim.counts, 1, capture=params.capture, log_anchor=sim.log_anchor)
    inits = pln_joint_inits(data, params, sim.x, sim.eta)
    with pytest.raises(_Recorded):
        sample_nuts("pln_joint", data, engine="cmdstanpy", chains=2, warmup=0, draws=5, inits=inits)
    assert seen["iter_warmup"] == 0 and seen["adapt_engaged"] is False and seen["adapt_delta"] is None
    assert len(seen["inits"]) == 2 and all("x_c" not in i for i in seen["inits"])
    assert seen["show_progress"] is False
    with pytest.raises(_Recorded):
        sample_nuts("pln_joint", data, engine="cmdstanpy", chains=2, warmup=10, draws=5, verbose=True)
    assert seen["adapt_engaged"] is True and seen["adapt_delta"] == 0.8 and seen["inits"] is None and seen["show_progress"] is True


def test_stanli_warmup_0_samples_without_adaptation():
    p = random_params(4, 1, seed=1, capture=True)
    sim = simulate(p, 2, seed=2)
    data = pln_cell_data(sim.counts, p, sim.log_anchor)
    idata = sample_nuts("pln_cell", data, engine="stanli", chains=2, warmup=0, draws=20, seed=3)
    assert idata.posterior.sizes["draw"] == 20 and idata.posterior.attrs["num_warmup"] == 0
    # no adaptation at all, as CmdStan with adapt_engaged=False: the initial step size 1 throughout
    # (stanli's adaptive sampler would still run its step-size search: 0.125 here)
    np.testing.assert_array_equal(idata.sample_stats["step_size"].values, 1.0)


def test_log_lik_lands_in_the_log_likelihood_group():
    p = random_params(4, 1, seed=3, capture=True)
    sim = simulate(p, 5, seed=4)
    data = pln_joint_data(sim.counts, 1, capture=p.capture, log_anchor=sim.log_anchor)
    idata = sample_nuts("pln_joint", data, engine="stanli", chains=2, warmup=30, draws=10, seed=1)
    assert "log_lik" not in idata.posterior
    assert idata.log_likelihood["log_lik"].shape == (2, 10)
    assert idata.posterior.attrs["engine"] == "stanli"
    # the moved values are the program's log_lik of each draw
    from scipy import stats

    x, eta = idata.posterior["x"].values[1, 3], idata.posterior["eta"].values[1, 3]
    ref = stats.poisson.logpmf(sim.counts, np.exp(x - eta[:, None])).sum()
    np.testing.assert_allclose(float(idata.log_likelihood["log_lik"].values[1, 3]), ref, rtol=1e-10)


def test_compiled_bridgestan_with_a_mismatched_client_says_what_to_install(tmp_path, monkeypatch):
    import bridgestan

    tree = tmp_path / "bridgestan"
    (tree / "src").mkdir(parents=True)
    (tree / "Makefile").write_text("# fake\n")
    (tree / "src" / "version.hpp").write_text(
        "#define BRIDGESTAN_MAJOR 1\n#define BRIDGESTAN_MINOR 7\n#define BRIDGESTAN_PATCH 3\n")
    monkeypatch.setenv("BRIDGESTAN", str(tree))
    monkeypatch.setenv("PLN_REF_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ImportError, match=r"BridgeStan 1\.7\.3 but the Python client is bridgestan "
                       + bridgestan.__version__.replace(".", r"\.") + r".*pip install bridgestan==1\.7\.3"):
        bridgestan_model("pln_cell", {})
    assert not (tmp_path / "cache").exists()  # nothing was built
    monkeypatch.setenv("BRIDGESTAN", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="not a BridgeStan source tree"):
        bridgestan_model("pln_cell", {})


def test_engine_resolution_and_pairs():
    from pln_ref.validation.engines import available_engines, engine_version, real_stan_engine
    from pln_ref.validation.runs import _engine_pair, _engine_record

    assert resolve_engine("CmdStan") == "cmdstanpy" and resolve_engine(None) == default_engine()
    assert available_engines()[0] == "stanli"
    import stanli

    assert _engine_record("stanli") == {"engine": "stanli", "engine_version": stanli.__version__}
    rec = _engine_record(None)   # the validate cache key: never engine=None
    assert rec["engine"] == default_engine() and rec["engine_version"] == engine_version(default_engine())
    with pytest.raises(ValueError, match="two different"):
        _engine_pair(["stanli", "stanli"])
    with pytest.raises(ValueError, match="unknown engine"):
        _engine_pair(["stanli", "nuts9"])
    pair, reason = _engine_pair(None)
    if real_stan_engine() is None:
        assert pair is None and "no real Stan engine" in reason
    else:
        assert pair == ("stanli", real_stan_engine())


def test_validate_engines_part_skips_with_the_reason_when_an_engine_is_missing(tmp_path, monkeypatch):
    from pln_ref.validation import engines as eng
    from pln_ref.validation.runs import run_engine_agreement

    monkeypatch.setattr(eng, "_cmdstan_found", lambda: False)
    monkeypatch.setattr(eng, "pystan_available", lambda: False)
    res = run_engine_agreement(tmp_path, engines=["stanli", "cmdstanpy"])
    assert "CmdStan not found" in res["skipped"]
    res = run_engine_agreement(tmp_path)
    assert "no real Stan engine" in res["skipped"]


def test_validate_parser_takes_two_engines_and_verbose():
    import argparse

    from pln_ref.validation.cli import build_validate_parser

    sub = argparse.ArgumentParser().add_subparsers()
    p = build_validate_parser(sub)
    a = p.parse_args(["--out", "o", "--parts", "engines", "--engines", "stanli", "cmdstanpy", "--verbose"])
    assert a.engines == ["stanli", "cmdstanpy"] and a.verbose
    assert p.parse_args(["--out", "o"]).engines is None and not p.parse_args(["--out", "o"]).verbose
    with pytest.raises(SystemExit):
        p.parse_args(["--out", "o", "--engines", "stanli"])


def test_cmdstanpy_logging_is_quiet_unless_verbose():
    import logging

    from pln_ref.validation.engines import _cmdstanpy_logging

    logger = logging.getLogger("cmdstanpy")
    before = logger.level
    with _cmdstanpy_logging(False):
        assert not logger.isEnabledFor(logging.INFO)
    with _cmdstanpy_logging(True):
        assert logger.isEnabledFor(logging.INFO)
    assert logger.level == before


def test_report_names_the_compared_engines(tmp_path):
    from pln_ref.validation.report import write_report

    gate = {"passed": True, "reasons": [], "divergences": 0, "n_chains": 4, "n_draws": 100, "bfmi": [0.9, 0.8],
            "rhat_max": 1.002, "ess_bulk_min": 1800.0, "ess_tail_min": 2600.0}
    e = {"engines": ["stanli", "cmdstanpy"], "engine_versions": {"stanli": "0.24.0", "cmdstanpy": "2.35"},
         "worst_abs_z": 1.5, "n_quantities": 55, "gates": {"stanli": gate, "cmdstanpy": gate},
         "seconds": {"stanli": 12.0, "cmdstanpy": 21.0}}
    text = write_report(tmp_path, {"engine_agreement": e}).read_text()
    assert "## Engine agreement (stanli vs cmdstanpy)" in text
    assert "| cmdstanpy | 2.35 | 1.0020 | 1800 | 2600 | 0 | 0.80 | 21.0 |" in text
    skipped = write_report(tmp_path, {"engine_agreement": {"skipped": "no real Stan engine found", "engines": None}})
    assert "Skipped: no real Stan engine found" in skipped.read_text()
