"""pln_ref.fit entry point, results, PPCs, CLI and bad input."""

import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import pln_ref
from pln_ref import Capture
from pln_ref.ppc import plot_ppc, posterior_predictive, ppc_summary


@pytest.fixture(scope="module")
def sim():
    p = pln_ref.random_params(15, 2, seed=21, capture=True, mean_log_rate=2.0)
    return pln_ref.simulate(p, 400, seed=22)


@pytest.fixture(scope="module")
def res(sim):
    return pln_ref.fit(sim.counts, k=2, progress=False, n_steps=300)


def test_fit_accepts_anndata_layers_and_sparse(sim, res):
    a = ad.AnnData(X=np.zeros(sim.counts.shape, dtype=np.float32))
    a.layers["counts"] = sp.csr_matrix(sim.counts)
    r2 = pln_ref.fit(a, layer="counts", k=2, progress=False, n_steps=300)
    np.testing.assert_allclose(r2.mu, res.mu, rtol=1e-10)
    assert r2.gene_names == list(a.var_names)


def test_result_attributes(sim, res):
    N, G = sim.counts.shape
    assert res.x_map.shape == (N, G) and res.eta_map.shape == (N,)
    assert np.all((res.capture_probability > 0) & (res.capture_probability <= 1))
    sd = res.sd_x()
    assert sd.shape == (N, G) and np.all(sd > 0)
    # SDs equal the square root of the dense (-H)^{-1} x-block diagonal for a few cells
    from pln_ref.model import neg_hessian

    H = neg_hessian(res.x_map[:3], res.eta_map[:3], res.params).dense()
    np.testing.assert_allclose(res.cells.subset(slice(0, 3)).sd_x(),
                               np.sqrt(np.diagonal(np.linalg.inv(H), 0, 1, 2)[:, :G]), rtol=1e-9)
    assert res.sigma.dense().shape == (G, G)
    den = res.denoised(eta="map")
    np.testing.assert_allclose(den, np.exp(res.x_map + 0.5 * res.sd_x("map") ** 2), rtol=1e-10)
    assert res.factor_scores().shape == (N, 2)
    assert res.diagnostics["cells_converged"] == N


def test_save_load_roundtrip(tmp_path, res):
    path = res.save(tmp_path / "fit.npz")
    r2 = pln_ref.LaplaceResult.load(path)
    np.testing.assert_array_equal(r2.W, res.W)
    np.testing.assert_allclose(r2.sd_x(), res.sd_x(), rtol=1e-12)
    np.testing.assert_allclose(r2.denoised(), res.denoised(), rtol=1e-12)
    assert r2.diagnostics == res.diagnostics


def test_exports(sim, res):
    a = res.to_anndata(sim.to_anndata(), write="map,denoised")
    assert a.layers["pln_map"].shape == sim.counts.shape
    assert a.varm["pln_W"].shape == (15, 2)
    assert "pln_denoised" in a.layers and "pln" in a.uns
    idata = res.to_arviz(n_draws=20)
    assert idata.posterior["x"].shape == (1, 20, 400, 15)


def test_ppc_modes(sim, res, tmp_path):
    reps = posterior_predictive(res, 3, mode="map", seed=1)
    assert reps.shape == (3, 400, 15)
    s_map = ppc_summary(sim.counts, res, n_samples=40, mode="map")
    s_lap = ppc_summary(sim.counts, res, n_samples=40, mode="laplace")
    # MAP replicates reproduce gene means (Poisson noise only); the Laplace mode adds the
    # e^{var/2} inflation of a symmetric Gaussian in log space, so its means are larger.
    assert s_map.coverage95["mean"] >= 0.8
    assert np.all(s_lap.replicated["mean"].mean(0) >= s_map.replicated["mean"].mean(0) * 0.97)
    fig = plot_ppc(s_map, tmp_path / "ppc.png")
    assert (tmp_path / "ppc.png").stat().st_size > 10_000
    del fig


def test_bad_inputs(sim):
    u = sim.counts.astype(float)
    with pytest.raises(ValueError, match="all-zero genes"):
        z = u.copy()
        z[:, 3] = 0
        pln_ref.fit(z, k=2, progress=False)
    with pytest.raises(ValueError, match="all-zero cells"):
        z = u.copy()
        z[5] = 0
        pln_ref.fit(z, k=2, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        z = u.copy()
        z[0, 0] = np.nan
        pln_ref.fit(z, k=2, progress=False)
    with pytest.raises(ValueError, match="negative"):
        z = u.copy()
        z[0, 0] = -1
        pln_ref.fit(z, k=2, progress=False)
    with pytest.raises(ValueError, match="1 <= k < G"):
        pln_ref.fit(u, k=15, progress=False)
    a = ad.AnnData(X=u)
    with pytest.raises(ValueError, match="layer"):
        pln_ref.fit(a, layer="spliced", k=2, progress=False)
    with pytest.raises(ValueError, match="inference_method"):
        pln_ref.fit(u, inference_method="mcmc", k=2)
    with pytest.raises(ValueError, match="either capture"):
        pln_ref.fit(u, k=2, capture=Capture(100.0), M0=10.0)


def test_no_capture_fit_runs(sim):
    r = pln_ref.fit(sim.counts, k=2, capture=None, progress=False, n_steps=100)
    assert np.all(r.eta_map == 0) and r.params.capture is None


def test_cli_fit(tmp_path, sim):
    inp = tmp_path / "in.h5ad"
    sim.to_anndata().write_h5ad(inp)
    out = tmp_path / "out.h5ad"
    cmd = [sys.executable, "-m", "pln_ref.cli", "fit", str(inp), "--k", "2", "--out", str(out),
           "--n-steps", "50", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "cells converged: 400/400" in r.stdout
    a = ad.read_h5ad(out)
    assert a.obsm["X_pln"].shape == (400, 2)
    bad = subprocess.run([sys.executable, "-m", "pln_ref.cli", "fit", str(inp), "--k", "20",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "1 <= k < G" in bad.stderr


def test_fit_vae_entry_point_and_cli(tmp_path, sim):
    """pln_ref.fit(..., inference_method="vae") and `pln-ref fit --method vae` give a result
    with the Laplace result's attribute names."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    r = pln_ref.fit(sim.counts, inference_method="vae", vae_latent_dim=2, n_steps=100,
                    progress=False, seed=0)
    for name in ("mu", "W", "d", "x_map", "eta_map", "capture_probability"):
        assert np.all(np.isfinite(getattr(r, name)))
    assert r.sd_x().shape == sim.counts.shape and "VAE fit" in r.summary()
    inp = tmp_path / "in.h5ad"
    sim.to_anndata().write_h5ad(inp)
    out = tmp_path / "out.h5ad"
    cmd = [sys.executable, "-m", "pln_ref.cli", "fit", str(inp), "--k", "2", "--out", str(out),
           "--method", "vae", "--n-steps", "50", "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "PLN VAE fit" in res.stdout
    assert "X_pln" in ad.read_h5ad(out).obsm


def test_outlier_cells_are_reported():
    """Issue 11 item 5: two extreme entries moved other genes' mu with no warning. Cells whose
    evidence (relative to the saturated Poisson fit) has robust |z| > 5 are now named in a
    warning, the summary and uns; a clean simulation flags none."""
    import warnings

    from pln_ref.exceptions import OutlierCellsWarning

    p = pln_ref.random_params(30, 3, seed=1, capture=True, mean_log_rate=3.0)
    u = pln_ref.simulate(p, 200, seed=2).counts.astype(float)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutlierCellsWarning)
        clean = pln_ref.fit(u, k=3, progress=False, n_steps=100)
    assert clean.diagnostics["evidence_outliers"]["n_cells"] == 0
    assert clean.diagnostics["evidence_outliers"]["max_abs_robust_z"] < 4
    u[5, 3] = u[17, 10] = 1e7
    with pytest.warns(OutlierCellsWarning, match=r"2 cell\(s\) with outlying Laplace evidence.*: 5, 17"):
        r = pln_ref.fit(u, k=3, progress=False, n_steps=300)
    out = r.diagnostics["evidence_outliers"]
    assert out["n_cells"] == 2 and sorted(out["cells"]) == [5, 17] and min(out["robust_z"]) < -5
    assert "cells with outlying evidence (robust |z| > 5): 2: " in r.summary()
    uns = r.to_anndata().uns["pln"]["diagnostics"]["evidence_outliers"]
    assert sorted(np.asarray(uns["cells"]).tolist()) == [5, 17]


def test_fit_of_an_array_does_not_import_anndata():
    """anndata is needed only for AnnData input and export; importing it costs about 1 s of CPU,
    more than a whole small fit (``data.is_anndata``)."""
    code = ("import sys, numpy as np, pln_ref\n"
            "u = np.random.default_rng(0).poisson(2.0, (60, 12))\n"
            "pln_ref.fit(u, k=2, n_steps=3, progress=False)\n"
            "assert 'anndata' not in sys.modules, 'pln_ref.fit imported anndata for an array input'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
