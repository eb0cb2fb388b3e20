"""New cells (pln_ref.newcells: transform, score_samples), the importance sampler behind them
(pln_ref.importance) and rank selection (pln_ref.select, pln-ref select)."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.special import logsumexp

import pln_ref
from pln_ref import ConvergenceWarning
from pln_ref.laplace import CellPosteriors, newton_map
from pln_ref.newcells import CellScores, transform
from pln_ref.results import LaplaceResult

ROOT = Path(__file__).resolve().parents[1]


def _result_at(params, counts, log_anchor=None) -> LaplaceResult:
    """A LaplaceResult at given globals (no outer fit)."""
    cells = newton_map(counts, params, log_anchor)
    return LaplaceResult(params=params, cells=cells, history={"step": np.zeros(1, int), "objective": np.zeros(1)})


def _quadrature_log_evidence(u, params, log_anchor, post):
    """log p(u_c) of a G=2 model with capture by a 3-D grid (x1, x2, eta) around the posterior."""
    from pln_ref.model import log_joint

    out = []
    mx, sx = post.mean_x(), post.sd_x()
    me, ve = post.eta_mean_var()
    for c in range(u.shape[0]):
        n = 70
        g1 = np.linspace(mx[c, 0] - 9 * sx[c, 0], mx[c, 0] + 9 * sx[c, 0], n)
        g2 = np.linspace(mx[c, 1] - 9 * sx[c, 1], mx[c, 1] + 9 * sx[c, 1], n)
        se = np.sqrt(ve[c])
        ge = np.linspace(max(1e-9, me[c] - 10 * se), me[c] + 10 * se, n)
        X1, X2, E = np.meshgrid(g1, g2, ge, indexing="ij")
        x = np.stack([X1.ravel(), X2.ravel()], 1)
        uu = np.broadcast_to(u[c], x.shape)
        lp = log_joint(uu, x, E.ravel(), params, np.full(x.shape[0], log_anchor[c]))
        cell = (g1[1] - g1[0]) * (g2[1] - g2[0]) * (ge[1] - ge[0])
        out.append(logsumexp(lp) + np.log(cell))
    return np.array(out)


def test_is_and_laplace_evidence_match_quadrature():
    p = pln_ref.random_params(2, 1, seed=4, capture=True, mean_log_rate=1.0)
    sim = pln_ref.simulate(p, 4, seed=5)
    u = sim.counts.astype(float)
    res = _result_at(p, u, sim.log_anchor)
    exact = _quadrature_log_evidence(u, p, sim.log_anchor, res.cells)
    lib = sim.library_size
    sc = res.score_samples(u, "is", n_draws=4000, library_size=lib, seed=1)
    assert isinstance(sc, CellScores) and sc.estimate.shape == (4,)
    assert np.all(sc.mc_se > 0) and np.all(np.isfinite(sc.khat))
    assert np.all(np.abs(sc.estimate - exact) < 4 * sc.mc_se + 0.01), (sc.estimate, exact, sc.mc_se)
    lap = res.score_samples(u, library_size=lib)  # Laplace evidence (default for Laplace results)
    assert lap.method == "laplace" and np.all(lap.mc_se == 0) and np.all(np.isnan(lap.khat))
    assert np.all(np.abs(lap.estimate - exact) < 0.3), (lap.estimate, exact)
    # the anchor matters: scoring with the realised totals as anchors changes the evidence
    other = res.score_samples(u, library_size=lib * 5)
    assert np.all(np.abs(other.estimate - lap.estimate) > 1e-3)


def test_is_estimate_without_capture_and_flagging():
    p = pln_ref.random_params(6, 2, seed=8, capture=None, mean_log_rate=1.0)
    sim = pln_ref.simulate(p, 30, seed=9)
    res = _result_at(p, sim.counts)
    a = res.score_samples(sim.counts, "is", n_draws=500, seed=2)
    b = res.score_samples(sim.counts, "laplace")
    assert np.median(np.abs(a.estimate - b.estimate)) < 0.2
    # a flagged cell is reported, not averaged in silently
    a.khat[0] = 0.9
    s = a.summary()
    assert a.flagged.sum() == 1 and s["n_flagged_khat_gt_0.7"] == 1
    assert s["mean_unflagged"] == pytest.approx(a.estimate[1:].mean())


def test_importance_estimator_unbiased_on_known_ratio():
    from pln_ref.importance import is_log_evidence

    # q = N(0, 1), p = 2 N(0.3, 1): log E_q[p/q] = log 2 exactly
    rng = np.random.default_rng(0)
    z = rng.standard_normal((20000, 3))
    lr = np.log(2) - 0.5 * (z - 0.3) ** 2 + 0.5 * z**2
    est, se = is_log_evidence(lr)
    assert np.all(np.abs(est - np.log(2)) < 4 * se) and np.all(se < 0.01)


@pytest.fixture(scope="module")
def split():
    p = pln_ref.random_params(15, 2, seed=21, capture=True, mean_log_rate=1.5)
    sim = pln_ref.simulate(p, 400, seed=22)
    u = sim.counts[sim.counts.sum(1) > 0]
    return u[:320], u[320:]


@pytest.fixture(scope="module")
def lap(split):
    return pln_ref.fit(split[0], k=2, n_steps=60, progress=False)


def test_transform_training_cells_reproduces_the_fit(lap, split):
    post = lap.transform(split[0])
    assert isinstance(post, CellPosteriors)
    np.testing.assert_allclose(post.x_map, lap.x_map, atol=1e-5)
    np.testing.assert_allclose(post.eta_map, lap.eta_map, atol=1e-5)
    new = transform(lap, split[1])
    assert new.x_map.shape == split[1].shape and new.converged.all()


def test_new_cells_bad_input(lap, split):
    with pytest.raises(ValueError, match="genes"):
        lap.score_samples(split[1][:, :5])
    with pytest.raises(ValueError, match="method"):
        lap.score_samples(split[1], "bogus")
    with pytest.raises(ValueError, match="VAE"):
        lap.score_samples(split[1], "elbo")
    z = split[1].copy()
    z[0] = 0
    with pytest.raises(ValueError, match="zero library size"):
        lap.transform(z)
    assert lap.transform(z, library_size=z.sum(1) + 50).N == z.shape[0]  # anchors given: fine


def test_held_out_laplace_close_to_is(lap, split):
    a = lap.score_samples(split[1])
    b = lap.score_samples(split[1], "is", n_draws=400, seed=3)
    assert abs(np.median(b.estimate - a.estimate)) < 0.1
    assert np.mean(b.khat < 0.7) > 0.8
    # held-out evidence is below the training cells' (same fit)
    assert a.mean() < lap.diagnostics["objective"] + 1.0


def test_vae_scores_and_transform(split):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        vae = pln_ref.fit(split[0], inference_method="vae", k=2, n_steps=60, eval_every=20, progress=False)
    q = vae.transform(split[0])
    assert type(q) is type(vae.posterior)
    np.testing.assert_allclose(q.z_mean, vae.posterior.z_mean, atol=1e-10)
    elbo = vae.score_samples(split[1])
    assert elbo.method == "elbo"
    isc = vae.score_samples(split[1], "is", n_draws=300, seed=1)
    # the ELBO is a lower bound on log p; IS is consistent for log p (noisy: compare means)
    assert isc.mean() > elbo.mean() - 0.05
    lap_ev = vae.score_samples(split[1], "laplace")  # Laplace evidence under the VAE's globals
    assert np.median(np.abs(lap_ev.estimate - isc.estimate)) < 1.0


# ------------------------------------------------------------------------------------------------
# rank selection
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rank3():
    p = pln_ref.random_params(20, 3, seed=1, capture=True, mean_log_rate=1.5)
    u = pln_ref.simulate(p, 500, seed=2).counts
    return u[u.sum(1) > 0]


def test_select_rank_chooses_true_rank_and_resumes(rank3, tmp_path, monkeypatch):
    from pln_ref import select as S

    out = tmp_path / "sel"
    sel = S.select_rank(rank3, ks=(1, 3, 6), out=out, n_steps=150, progress=False)
    assert sel.chosen_k == 3, sel.to_markdown()
    rows = {r["k"]: r for r in sel.table}
    assert rows[1]["diff_vs_best"] < -rows[1]["paired_se"]  # k=1 is clearly worse
    for name in ("selection.json", "selection.md", "chosen_k.txt", "heldout_vs_k.png",
                 "fits/k3_fold0.npz", "fits/k3_fold0_result.npz"):
        assert (out / name).exists(), name
    assert json.loads((out / "selection.json").read_text())["chosen_k"] == 3
    assert (out / "chosen_k.txt").read_text().strip() == "3"
    # a killed run resumes: remove one record, the rerun fits only that one
    (out / "fits" / "k6_fold0.npz").unlink()
    calls = []
    real = S._fit_and_score
    monkeypatch.setattr(S, "_fit_and_score", lambda t: calls.append(t["k"]) or real(t))
    sel2 = S.select_rank(rank3, ks=(1, 3, 6), out=out, n_steps=150, progress=False)
    assert calls == [6] and sel2.chosen_k == 3
    np.testing.assert_allclose(sel2.scores[1], sel.scores[1])
    with pytest.raises(ValueError, match="other"):
        S.select_rank(rank3[:300], ks=(1, 3), out=out, n_steps=150, progress=False)


def test_select_rank_one_se_rule_and_folds(rank3):
    from pln_ref.select import _summarise

    # synthetic records: k=2 is best, k=1 within one paired SE, k=4 worse
    rng = np.random.default_rng(0)
    base = rng.normal(-50, 5, 200)
    recs = {}
    for k, shift, noise in ((1, -0.01, 0.5), (2, 0.0, 0.0), (4, -2.0, 0.1)):
        z = rng.standard_normal(200)
        z -= z.mean()  # mean difference exactly `shift`, paired SE = noise sd / sqrt(200)
        recs[(k, None, 0)] = {"heldout": base + shift + noise * z, "train_evidence": -49.0,
                              "n_train": 800, "cpu_s": 1.0, "wall_s": 1.0, "khat": np.full(200, np.nan),
                              "stopped": "x"}
    sel = _summarise(recs, [1, 2, 4], [np.arange(200)], 20, "laplace", 0.2, None, 0, 0)
    assert sel.best_k == 2 and sel.chosen_k == 1
    cv = pln_ref.select_rank(rank3, ks=(1, 2), folds=2, n_steps=30, progress=False)
    assert np.array_equal(np.sort(cv.heldout_cells), np.arange(rank3.shape[0]))  # each cell once
    with pytest.raises(ValueError, match="1 <= k"):
        pln_ref.select_rank(rank3, ks=(0, 2))
    with pytest.raises(ValueError, match="holdout"):
        pln_ref.select_rank(rank3, ks=(1,), holdout=1.5)


def test_select_rank_chooses_sigma_M_with_k(rank3, tmp_path):
    """A list of sigma_M is chosen jointly with k: one row per (k, sigma_M), scores keyed by the
    pair, the smallest k with a pair within one paired SE of the best, the best sigma_M there."""
    from pln_ref.select import _summarise

    rng = np.random.default_rng(1)
    base = rng.normal(-50, 5, 200)
    recs = {}
    # best pair (4, 0.1); both pairs of k = 2 are within one paired SE of it, (2, 0.1) the higher
    for (k, sig), shift, noise in (((2, 0.5), -0.02, 0.5), ((2, 0.1), -0.01, 0.5), ((4, 0.5), -1.0, 0.2),
                                   ((4, 0.1), 0.0, 0.0)):
        z = rng.standard_normal(200)
        z -= z.mean()
        recs[(k, sig, 0)] = {"heldout": base + shift + noise * z, "train_evidence": -49.0, "n_train": 800,
                             "cpu_s": 1.0, "wall_s": 1.0, "khat": np.full(200, np.nan), "stopped": "x"}
    sel = _summarise(recs, [2, 4], [np.arange(200)], 20, "laplace", 0.2, None, 0, 0, [0.1, 0.5], True)
    assert (sel.best_k, sel.best_sigma_M) == (4, 0.1)
    assert (sel.chosen_k, sel.chosen_sigma_M) == (2, 0.1)
    assert set(sel.scores) == {(2, 0.1), (2, 0.5), (4, 0.1), (4, 0.5)}
    assert "sigma_M" in sel.to_markdown() and "**chosen**" in sel.to_markdown()
    # end to end: every pair is fitted with its own sigma_M and resumable by its own record
    out = tmp_path / "grid"
    sel = pln_ref.select_rank(rank3, ks=(1, 3), sigma_M=[0.5, 0.1], out=out, n_steps=60, progress=False)
    assert [(r["k"], r["sigma_M"]) for r in sel.table] == [(1, 0.1), (1, 0.5), (3, 0.1), (3, 0.5)]
    assert sel.chosen_k == 3 and sel.chosen_sigma_M in (0.1, 0.5)
    assert (out / "chosen_sigma_M.txt").read_text().strip() == f"{sel.chosen_sigma_M:g}"
    res = pln_ref.PLNResult.load(out / "fits" / "k3_s0.1_fold0_result.npz")
    from pln_ref.select import result_file
    assert result_file(out, 3, 0.1) == out / "fits" / "k3_s0.1_fold0_result.npz"
    assert res.params.capture.sigma_M == 0.1
    assert json.loads((out / "selection.json").read_text())["chosen_sigma_M"] == sel.chosen_sigma_M
    # a fixed value is not a grid: scores keyed by k
    fixed = pln_ref.select_rank(rank3, ks=(3,), sigma_M=0.1, n_steps=60, progress=False)
    assert not fixed.grid and list(fixed.scores) == [3]
    np.testing.assert_allclose(fixed.scores[3], sel.scores[(3, 0.1)])
    with pytest.raises(ValueError, match="positive"):
        pln_ref.select_rank(rank3, ks=(1,), sigma_M=[0.5, -1.0])
    with pytest.raises(ValueError, match="capture"):
        pln_ref.select_rank(rank3, ks=(1,), sigma_M=[0.5], capture=None)
    with pytest.raises(ValueError, match="not both"):
        pln_ref.select_rank(rank3, ks=(1,), sigma_M=[0.5], capture=pln_ref.Capture(M0=1e4))


def test_select_rank_on_dask(rank3, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        sel = pln_ref.select_rank(rank3, ks=(1, 3), out=tmp_path / "d", scheduler=client, n_steps=30,
                                  progress=False)
    assert (tmp_path / "d" / "fits" / "k1_fold0.npz").exists()
    local = pln_ref.select_rank(rank3, ks=(1, 3), n_steps=30, progress=False)
    np.testing.assert_allclose(sel.scores[3], local.scores[3])


def test_cli_select(rank3, tmp_path):
    import anndata as ad

    path = tmp_path / "d.h5ad"
    ad.AnnData(X=rank3.astype(np.float32)).write_h5ad(path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "pln_ref.cli", "select", str(path), "--k", "1", "2",
                        "--out", str(tmp_path / "sel"), "--n-steps", "30", "--quiet"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "chosen k =" in r.stdout and (tmp_path / "sel" / "heldout_vs_k.png").exists()
    r = subprocess.run([sys.executable, "-m", "pln_ref.cli", "select", str(path), "--k", "2",
                        "--sigma-M", "0.5", "0.2", "--out", str(tmp_path / "sel2"), "--n-steps", "30",
                        "--quiet"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "sigma_M =" in r.stdout and (tmp_path / "sel2" / "fits" / "k2_s0.2_fold0.npz").exists()
    r = subprocess.run([sys.executable, "-m", "pln_ref.cli", "select", str(tmp_path / "missing.h5ad"),
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_new_cells_read_by_blocks_equal_the_dense_all_cell_path(monkeypatch):
    """transform / score_samples of CSR counts solve the cells by blocks (never reading more than
    one block of dense counts, never densifying whole) and equal the former path (Newton and the
    Laplace evidence over all cells of the dense counts at once) to 1e-12."""
    import scipy.sparse as sp

    from pln_ref.counts import CountMatrix
    from pln_ref.fit_laplace import evaluation_block_cells, laplace_objective

    p = pln_ref.random_params(300, 3, seed=2, capture=True)  # 2 * 2^18 // 300 = 1746 cells a block
    u = np.asarray(pln_ref.simulate(p, 2000, seed=3).counts, dtype=float)
    res = _result_at(p, u[:50])
    la = np.log(u.sum(1))
    old = newton_map(u, p, la)  # the former path, all cells at once
    old_ev = laplace_objective(u, p, la, old, with_grad=False)[0]
    widest = []
    block = CountMatrix.block
    monkeypatch.setattr(CountMatrix, "block", lambda self, lo, hi: widest.append(hi - lo) or block(self, lo, hi))
    monkeypatch.setattr(CountMatrix, "toarray", lambda self: pytest.fail("counts densified whole"))
    post = transform(res, sp.csr_matrix(u))
    assert max(widest) == evaluation_block_cells(300) < u.shape[0]
    np.testing.assert_allclose(post.x_map, old.x_map, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(post.eta_map, old.eta_map, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(post.sd_x(), old.sd_x(), rtol=1e-12)
    np.testing.assert_allclose(post.eta_mean_var(), old.eta_mean_var(), rtol=1e-12)
    sc = res.score_samples(sp.csr_array(u))
    np.testing.assert_allclose(sc.estimate, old_ev, rtol=1e-12)
    is_new = res.score_samples(sp.csr_matrix(u[:20]), "is", n_draws=50, seed=4)
    from pln_ref.newcells import _importance

    is_old = _importance(newton_map(u[:20], p, la[:20]), CountMatrix(u[:20]), p, la[:20], 50,
                         np.random.default_rng(4))
    np.testing.assert_allclose(is_new.estimate, is_old[0], rtol=1e-10)


def test_select_rank_keeps_sparse_counts_sparse(rank3, tmp_path, monkeypatch):
    """CSR input: each fold's cells are shipped as CSR (no dense N x G copy), the data fingerprint
    (read by blocks) is the dense copy's, so an --out directory of the dense input resumes with
    the sparse one, and the held-out scores equal the dense input's (fits on CSR vs dense
    storage agree to rounding)."""
    import scipy.sparse as sp

    from pln_ref import select as S
    from pln_ref.counts import CountMatrix

    csr = sp.csr_matrix(rank3)
    assert S._fingerprint(CountMatrix(csr, block_entries=7 * rank3.shape[1])) == S._fingerprint(rank3)
    dense = S.select_rank(rank3, ks=(1, 2), out=tmp_path / "s", n_steps=30, progress=False)
    seen = []
    real = S._fit_and_score
    monkeypatch.setattr(S, "_fit_and_score", lambda t: seen.append((t["train"], t["test"])) or real(t))
    monkeypatch.setattr(CountMatrix, "toarray", lambda self: pytest.fail("counts densified whole"))
    sparse = S.select_rank(csr, ks=(1, 2), n_steps=30, progress=False)
    assert len(seen) == 2 and all(sp.issparse(a) and sp.issparse(b) for a, b in seen)
    for k in (1, 2):
        np.testing.assert_allclose(sparse.scores[k], dense.scores[k], rtol=1e-8)
    resumed = S.select_rank(csr, ks=(1, 2), out=tmp_path / "s", n_steps=30, progress=False)  # same manifest
    np.testing.assert_array_equal(resumed.scores[2], dense.scores[2])
    with pytest.raises(ValueError, match="genes have no counts"):
        bad = rank3.copy()
        bad[:, 0] = 0
        bad[0, 0] = 1
        S.select_rank(sp.csr_matrix(bad), ks=(1,), folds=2, seed=0, n_steps=5, progress=False)
