"""The result protocol (pln_ref.protocol): every method of PLNResult and CellPosterior, on both
inference methods; the AnnData output schema; per-method config objects; the VAE step-cap warning."""

import math
import os
import subprocess
import sys
import warnings

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import pln_ref
from pln_ref import CellPosterior, ConvergenceWarning, LaplaceConfig, PLNResult, VAEConfig
from pln_ref.ppc import posterior_predictive, ppc_summary

N, G, K = 300, 12, 2


@pytest.fixture(scope="module")
def sim():
    p = pln_ref.random_params(G, K, seed=31, capture=True, mean_log_rate=2.0)
    return pln_ref.simulate(p, N, seed=32)


def _adata(sim):
    a = ad.AnnData(X=sp.csr_matrix(sim.counts.astype(np.float32)))
    a.obs_names = [f"c{i}" for i in range(N)]
    a.var_names = [f"g{j}" for j in range(G)]
    return a


@pytest.fixture(scope="module", params=["laplace", "vae"])
def res(request, sim):
    if request.param == "vae":
        torch = pytest.importorskip("torch")
        torch.set_num_threads(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return pln_ref.fit(_adata(sim), inference_method="vae", k=K, n_steps=60, eval_every=20,
                               progress=False)
    return pln_ref.fit(_adata(sim), k=K, n_steps=40, progress=False)


def test_types_settings_diagnostics_history(res):
    assert isinstance(res, PLNResult) and isinstance(res.posterior, CellPosterior)
    assert res.inference_method in ("laplace", "vae")
    assert isinstance(res.settings, dict) and isinstance(res.diagnostics, dict)
    assert res.settings["inference_method"] == res.inference_method and res.settings["k"] == K
    for key in ("objective", "steps", "stopped", "wall_time_s"):
        assert key in res.diagnostics, key
    h = res.history
    assert isinstance(h, dict) and {"step", "objective"} <= set(h)
    n = len(h["step"])
    assert n >= 1 and all(np.asarray(v).shape == (n,) for v in h.values())
    assert np.all(np.diff(h["step"]) > 0) and np.all(np.isfinite(h["objective"]))
    assert res.gene_names == [f"g{j}" for j in range(G)] and res.cell_names[0] == "c0"


def test_globals(res):
    assert res.mu.shape == (G,) and res.W.shape == (G, K) and res.d.shape == (G,) and res.k == K
    S = res.sigma_dense()
    np.testing.assert_allclose(S, res.W @ res.W.T + np.diag(res.d), rtol=1e-12)
    np.testing.assert_allclose(res.sigma.dense(), S, rtol=1e-12)
    C = res.correlation()
    np.testing.assert_allclose(C, S / np.sqrt(np.outer(np.diag(S), np.diag(S))), rtol=1e-10)


def test_per_cell_summaries(res):
    q = res.posterior
    assert res.x_map.shape == (N, G) and res.eta_map.shape == (N,) and q.N == N
    np.testing.assert_array_equal(res.x_map, q.x_map)
    np.testing.assert_allclose(res.capture_probability, np.exp(-res.eta_map))
    assert np.all((res.capture_probability > 0) & (res.capture_probability <= 1))
    for eta in ("free", "map"):
        sd = res.sd_x(eta)
        assert sd.shape == (N, G) and np.all(sd > 0)
        np.testing.assert_array_equal(res.denoised(eta), q.expected_exp_x(eta))
        assert q.mean_x(eta).shape == (N, G)
    with pytest.raises(ValueError, match="eta"):
        res.sd_x("bogus")
    m, v = q.eta_mean_var()
    assert m.shape == (N,) and np.all(m >= 0) and np.all(v >= 0)
    f = res.factor_scores()
    assert f.shape == (N, K) and np.all(np.isfinite(f))


def test_draws_match_moments_density_and_subset(res):
    """Monte Carlo over sample_x reproduces mean_x, sd_x, eta_mean_var and denoised (eta free)."""
    idx = np.arange(6)
    q = res.posterior.subset(idx)
    assert isinstance(q, CellPosterior) and q.N == len(idx)
    np.testing.assert_allclose(q.sd_x(), res.sd_x()[idx], rtol=1e-12)
    S = 20000
    x, eta = q.sample(np.random.default_rng(3), S)
    assert x.shape == (S, len(idx), G) and eta.shape == (S, len(idx)) and np.all(eta >= 0)
    sd = q.sd_x()
    assert np.all(np.abs(x.mean(0) - q.mean_x()) < 5 * sd / math.sqrt(S))
    np.testing.assert_allclose(x.std(0), sd, rtol=0.05)
    em, ev = q.eta_mean_var()
    assert np.all(np.abs(eta.mean(0) - em) < 5 * np.sqrt(ev) / math.sqrt(S) + 1e-12)
    np.testing.assert_allclose(np.exp(x).mean(0), q.expected_exp_x(), rtol=0.05)
    lp = q.logpdf(x[:7], eta[:7])
    assert lp.shape == (7, len(idx)) and np.all(np.isfinite(lp))
    x2, e2 = res.sample_x(0, 3, eta="map")
    assert x2.shape == (3, N, G) and np.allclose(e2, res.eta_map)


def test_summary(res):
    s = res.summary()
    assert s.startswith(f"PLN {'Laplace' if res.inference_method == 'laplace' else 'VAE'} fit: {N} cells")
    assert "capture: M0=" in s


def test_to_anndata_schema_and_h5ad_roundtrip(res, sim, tmp_path):
    a = res.to_anndata(_adata(sim))
    assert a.obsm["X_pln"].shape == (N, K) and a.varm["pln_W"].shape == (G, K)
    assert {"pln_mu", "pln_d"} <= set(a.var) and {"pln_eta", "pln_eta_sd", "pln_capture_probability"} <= set(a.obs)
    assert len(a.layers) == 0 and len(a.varp) == 0  # nothing N x G unless asked
    np.testing.assert_allclose(a.obs["pln_capture_probability"], res.capture_probability)
    a.write_h5ad(tmp_path / "a.h5ad")
    b = ad.read_h5ad(tmp_path / "a.h5ad")
    assert sp.issparse(b.X)
    u = b.uns["pln"]
    assert u["inference_method"] == res.inference_method
    assert isinstance(u["settings"], dict) and isinstance(u["diagnostics"], dict)
    assert isinstance(u["settings"]["capture"], dict) and u["settings"]["capture"]["sigma_M"] > 0
    assert u["settings"]["k"] == K
    np.testing.assert_allclose(u["history"]["objective"], res.history["objective"])
    full = res.to_anndata(_adata(sim), write="map,sd,denoised,correlation")
    for name, ref in (("map", res.x_map), ("sd", res.sd_x()), ("denoised", res.denoised())):
        assert full.layers[f"pln_{name}"].dtype == np.float32
        np.testing.assert_allclose(full.layers[f"pln_{name}"], ref, rtol=1e-6)
    assert full.varp["pln_correlation"].shape == (G, G)
    f64 = res.to_anndata(_adata(sim), write=["sd"], dtype=np.float64)
    assert f64.layers["pln_sd"].dtype == np.float64
    with pytest.raises(ValueError, match="unknown write option"):
        res.to_anndata(_adata(sim), write="map,everything")
    with pytest.raises(ValueError, match="shape"):
        res.to_anndata(ad.AnnData(X=np.zeros((N, G + 1))))


def test_to_arviz(res):
    idata = res.to_arviz(n_draws=10, cells=[0, 5])
    assert idata.posterior["x"].shape == (1, 10, 2, G) and idata.posterior["eta"].shape == (1, 10, 2)
    assert list(idata.posterior["cell"].values) == ["c0", "c5"]
    assert idata.attrs["inference_method"] == res.inference_method
    np.testing.assert_array_equal(idata.constant_data["W"].values, res.W)


def test_save_load_atomic_roundtrip(res, tmp_path):
    path = tmp_path / "fit.npz"
    path.write_bytes(b"an older file")
    assert res.save(path) == path
    assert os.listdir(tmp_path) == ["fit.npz"]  # no temporary file left behind
    back = PLNResult.load(path)
    assert type(back) is type(res)
    assert type(res).load(path).inference_method == res.inference_method
    np.testing.assert_array_equal(back.W, res.W)
    np.testing.assert_allclose(back.sd_x(), res.sd_x(), rtol=1e-12)
    np.testing.assert_allclose(back.denoised(), res.denoised(), rtol=1e-12)
    np.testing.assert_array_equal(back.factor_scores(), res.factor_scores())
    assert back.settings == res.settings
    assert back.diagnostics == res.diagnostics
    for key, val in res.history.items():
        np.testing.assert_array_equal(back.history[key], val)
    assert back.summary() == res.summary()
    other = pln_ref.LaplaceResult if res.inference_method == "vae" else pytest.importorskip("pln_ref.vae").VAEResult
    with pytest.raises(ValueError, match="not a"):
        other.load(path)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a saved pln_ref result"):
        PLNResult.load(tmp_path / "junk.npz")


def test_ppc_through_the_posterior(res, sim):
    reps = posterior_predictive(res, 2, mode="posterior", seed=1, counts=sim.counts)
    assert reps.shape == (2, N, G)
    for mode in ("map", "laplace"):
        s = ppc_summary(sim.counts, res, n_samples=20, mode=mode)
        assert s.coverage95["mean"] >= 0.5, (mode, s.coverage95)
    s = ppc_summary(sim.counts, res.posterior, n_samples=5, mode="map")  # a posterior works too
    assert s.replicated["mean"].shape == (5, G)
    with pytest.raises(ValueError, match="mode"):
        ppc_summary(sim.counts, res, n_samples=2, mode="bogus")


# ------------------------------------------------------------------------------------------------
# output size: nothing dense N x G unless asked, float32 when asked
# ------------------------------------------------------------------------------------------------
def test_h5ad_has_no_dense_cell_by_gene_arrays_unless_asked(tmp_path):
    p = pln_ref.random_params(40, 2, seed=5, capture=True, mean_log_rate=-0.5)
    u = pln_ref.simulate(p, 3000, seed=6).counts
    keep = u.sum(1) > 0
    a = ad.AnnData(X=sp.csr_matrix(u[keep].astype(np.float32)))
    n, g = a.shape
    res = pln_ref.fit(a, k=2, n_steps=3, progress=False)
    a.write_h5ad(tmp_path / "in.h5ad")
    res.to_anndata(a.copy()).write_h5ad(tmp_path / "default.h5ad")
    res.to_anndata(a.copy(), write="map,sd,denoised").write_h5ad(tmp_path / "all.h5ad")
    size = {k: (tmp_path / f"{k}.h5ad").stat().st_size for k in ("in", "default", "all")}
    dense64 = n * g * 8
    assert size["default"] - size["in"] < 0.25 * dense64, size
    assert size["all"] - size["default"] > 3 * n * g * 4 * 0.9, size  # three float32 layers
    assert size["all"] - size["default"] < 3 * dense64 * 0.6, size  # ... not float64


def test_cli_write_option(tmp_path, sim):
    inp, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    _adata(sim).write_h5ad(inp)
    base = [sys.executable, "-m", "pln_ref.cli", "fit", str(inp), "--k", "2", "--out", str(out),
            "--n-steps", "5", "--quiet"]
    r = subprocess.run(base + ["--write", "sd,correlation"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    a = ad.read_h5ad(out)
    assert list(a.layers) == ["pln_sd"] and a.layers["pln_sd"].dtype == np.float32
    assert a.varp["pln_correlation"].dtype == np.float32 and isinstance(a.uns["pln"]["settings"], dict)
    r = subprocess.run(base + ["--write", "sd,bogus"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "bogus" in r.stderr and r.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------------------
# config objects
# ------------------------------------------------------------------------------------------------
def test_config_object_equals_keywords(sim):
    r1 = pln_ref.fit(sim.counts, k=2, n_steps=15, lr=0.03, progress=False)
    r2 = pln_ref.fit(sim.counts, k=2, config=LaplaceConfig(n_steps=15, lr=0.03), progress=False)
    np.testing.assert_array_equal(r1.mu, r2.mu)
    assert r1.settings == r2.settings
    r3 = pln_ref.fit(sim.counts, k=2, config=LaplaceConfig(n_steps=15), lr=0.03, progress=False)
    np.testing.assert_array_equal(r1.mu, r3.mu)  # keywords override the config's fields


def test_unknown_or_inapplicable_options_raise(sim):
    u = sim.counts
    with pytest.raises(ValueError, match=r"inference_method='laplace': hidden, patience"):
        pln_ref.fit(u, k=2, hidden=(8,), patience=3)
    with pytest.raises(ValueError, match=r"inference_method='vae': checkpoint, ift, optimizer"):
        pln_ref.fit(u, k=2, inference_method="vae", checkpoint="c.npz", optimizer="lbfgs", ift=False)
    with pytest.raises(ValueError, match="must be a VAEConfig"):
        pln_ref.fit(u, k=2, inference_method="vae", config=LaplaceConfig())
    with pytest.raises(ValueError, match="n_steps must be an integer >= 1"):
        pln_ref.fit(u, k=2, n_steps=0)
    with pytest.raises(ValueError, match="optimizer must be"):
        LaplaceConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="val_fraction"):
        VAEConfig(val_fraction=0.7)
    assert LaplaceConfig(n_steps=np.int64(5)).n_steps == 5


def test_vae_warns_at_the_step_cap_only(sim):
    pytest.importorskip("torch")
    from pln_ref.vae import fit_vae

    kw = dict(n_steps=30, eval_every=10, batch_size=64, progress=False)
    with pytest.warns(ConvergenceWarning, match="step cap n_steps=30"):
        r = fit_vae(sim.counts, 2, patience=5, **kw)
    assert r.diagnostics["stopped"].startswith("step cap") and r.diagnostics["stopped_step"] == 30
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        r = fit_vae(sim.counts, 2, patience=1, tol=1e9, **kw)  # never improves by 1e9: stops early
    assert r.diagnostics["stopped_step"] == 20 and r.diagnostics["stopped"].startswith("early")
    assert np.isnan(r.history["validation_objective"][0]) and np.isfinite(r.history["validation_objective"][9])
