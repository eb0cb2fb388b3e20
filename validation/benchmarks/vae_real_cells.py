"""Issue 16's scRNA cell design for the VAE, cached, with per-cell diagnostics.

The design is ``bench_vae.py --real``'s (pyPLNmodels ``load_scrna(n_samples=600)``, the 30 most
expressed genes, k=3, capture as ``pln_ref.fit``'s "auto", globals from a 300-step L-BFGS Laplace
fit started at the method of moments; ``--cells`` cells drawn by ``default_rng(seed).choice``
(with 60 and seed 0 the same cells as ``bench_vae.py --real``), gated per-cell NUTS, 4 x 1000
draws). The Laplace globals, the NUTS draws and the trained VAE (encoder trained at the fixed
Laplace globals, 3000 steps, as in ``bench_vae.py --real``) are cached in ``--cache`` so that
reruns only redo the posteriors.

Figures per method (Laplace, the VAE as delivered by ``encode``, and variants): the issue 16 goals
(median |std. mean error| x / eta, share of SD ratios in 0.9-1.1 x / eta, mean 90% coverage x,
share of cells with PSIS k-hat < 0.7 over ``--psis-seeds`` seeds, corr(x_g, eta) by library
tercile vs NUTS), and per cell: library size, k-hat.

Usage::

    OMP_NUM_THREADS=1 python validation/benchmarks/vae_real_cells.py --cells 200 \
        --cache /work/vae16out/cache --out /work/vae16out/real200.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def design(cache: Path):
    """(u (600, 30), log anchor, Laplace-fitted params), params cached in ``cache``."""
    from pyPLNmodels import load_scrna

    from pln_ref.anchor import resolve_log_anchor
    from pln_ref.params import Capture, PLNParams

    X = np.asarray(load_scrna(n_samples=600)["endog"], dtype=float)
    top = np.argsort(X.sum(0))[::-1][:30]
    u = X[:, top]
    cap = Capture(M0=float(np.median(u.sum(1))) / 0.1, sigma_M=0.5)
    la = resolve_log_anchor(u, None)
    f = cache / "params.npz"
    if f.exists():
        z = np.load(f)
        params = PLNParams(mu=z["mu"], W=z["W"], d=z["d"], capture=cap)
    else:
        from pln_ref.fit_laplace import optimize_globals
        from pln_ref.moments import method_of_moments

        init = method_of_moments(u, 3, capture=cap, log_anchor=la)
        _, params = optimize_globals(u, init, la, n_steps=300, optimizer="lbfgs", progress=False)
        np.savez(f, mu=params.mu, W=params.W, d=params.d)
    return u, la, params


def nuts_truth(cache: Path, u, la, params, idx, seed: int):
    from pln_ref.validation.nuts_cells import fit_cells_nuts, load_nuts_cache, nuts_cache_key, save_nuts_cache

    key = nuts_cache_key(u[idx], mu_sum=float(params.mu.sum()), d_sum=float(params.d.sum()), seed=seed,
                         chains=4, warmup=1000, draws=1000)
    f = cache / f"nuts_{len(idx)}_{seed}.npz"
    nuts = load_nuts_cache(f, key)
    if nuts is None:
        nuts = fit_cells_nuts(u[idx], params, la[idx], chains=4, warmup=1000, draws=1000, seed=seed,
                              progress=False)
        save_nuts_cache(f, key, nuts)
    return nuts


def trained_vae(cache: Path, u, la, params, seed: int, **options):
    """The VAE trained as in ``bench_vae.py --real`` (decoder fixed at the Laplace globals), cached
    per option set (``VAEResult.save``)."""
    from pln_ref.protocol import PLNResult
    from pln_ref.vae import fit_vae

    tag = "_".join(f"{k}{v}" for k, v in sorted(options.items())) or "default"
    f = cache / f"vae_{seed}_{tag}.npz"
    if f.exists():
        return PLNResult.load(f)
    t0 = time.process_time()
    fit = fit_vae(u, 3, capture=params.capture, log_anchor=la, init=params, train_decoder=False,
                  n_steps=3000, seed=seed, progress=False, **options)
    fit.diagnostics["train_cpu_s"] = time.process_time() - t0
    fit.save(f)
    return fit


def evaluate(post, cu, cla, params, nx, ne, lib, *, seed: int = 0, psis_seeds=(1,), n_draws: int = 4000,
             label: str = "method") -> dict:
    """The issue 16 figures of a per-cell posterior against NUTS draws (nx (T,N,G), ne (T,N))."""
    from pln_ref.validation.compare import compare_cells, corr_x_eta, summarise
    from pln_ref.validation.gate import GateResult
    from pln_ref.validation.psis import cell_psis

    ok = GateResult(True, [], [])
    cmp = compare_cells(post, (nx, ne), gate=ok, n_draws=n_draws, seed=seed, label=label,
                        sample_kwargs={"eta": "free"})
    r = {q: summarise(cmp[q]) for q in ("x", "eta") if q in cmp}
    for q in r:
        sr = np.asarray(cmp[q].sd_ratio)
        r[q]["sd_ratio_share_0.9_1.1"] = float(np.mean((sr >= 0.9) & (sr <= 1.1)))
    khats = []
    for s in psis_seeds:
        ps = cell_psis(post, cu, params, cla, n_draws=n_draws, seed=seed + s, sample_kwargs={"eta": "free"})
        khats.append(np.asarray(ps["result"].khat))
    kh = np.array(khats)
    r["khat"] = {"share_lt_0.7_by_seed": [float(np.mean(k < 0.7)) for k in kh],
                 "share_lt_0.7_mean": float(np.mean(kh < 0.7)),
                 "share_lt_0.5_mean": float(np.mean(kh < 0.5)),
                 "median": float(np.median(kh)), "per_cell_mean": kh.mean(0).tolist()}
    xm, em = post.sample(np.random.default_rng(seed + 2), 1000, eta="free")
    cn, cm = corr_x_eta(nx, ne), corr_x_eta(xm, em)
    bins = np.digitize(lib, np.quantile(lib, [1 / 3, 2 / 3]))
    r["corr_x_eta_by_library_tercile"] = [
        {"nuts_median": float(np.median(cn[bins == b])), "method_median": float(np.median(cm[bins == b]))}
        for b in range(3)]
    r["per_cell_x_sd_ratio_share"] = np.mean((cmp["x"].sd_ratio >= 0.9) & (cmp["x"].sd_ratio <= 1.1), 1).tolist()
    r["x_sd_ratio"] = np.asarray(cmp["x"].sd_ratio).tolist()
    r["x_std_mean_error"] = np.asarray(cmp["x"].std_mean_error).tolist()
    return r


def line(name: str, r: dict) -> str:
    x, e = r["x"], r["eta"]
    corr = " ".join(f"{t['method_median']:.2f}/{t['nuts_median']:.2f}" for t in r["corr_x_eta_by_library_tercile"])
    return (f"{name:28s} |z| x {x['std_mean_error']['median_abs']:.3f} eta {e['std_mean_error']['median_abs']:.3f}"
            f"  SD-share x {x['sd_ratio_share_0.9_1.1']:.3f} eta {e['sd_ratio_share_0.9_1.1']:.3f}"
            f"  SD x {x['sd_ratio']['min']:.2f}-{x['sd_ratio']['max']:.2f}"
            f"  cov90 x {x['cover90']['mean']:.3f} eta {e['cover90']['mean']:.3f}"
            f"  khat<0.7 {r['khat']['share_lt_0.7_mean']:.3f} {r['khat']['share_lt_0.7_by_seed']}"
            f" med {r['khat']['median']:.2f}  corr {corr}")


def setup(cells: int, seed: int, cache: Path):
    cache.mkdir(parents=True, exist_ok=True)
    u, la, params = design(cache)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(u.shape[0], cells, replace=False))
    nuts = nuts_truth(cache, u, la, params, idx, seed)
    ok = nuts["passed"]
    cu, cla = u[idx][ok], la[idx][ok]
    return dict(u=u, la=la, params=params, idx=idx, ok=ok, cu=cu, cla=cla, nx=nuts["x"][:, ok],
                ne=nuts["eta"][:, ok], lib=cu.sum(1), nuts=nuts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default="validation/out/vae_real_cache")
    ap.add_argument("--out", default="validation/out/vae_real_cells.json")
    ap.add_argument("--psis-seeds", type=int, default=3)
    ap.add_argument("--variants", nargs="*", default=[],
                    help="extra VAE rows: z_cov:refine_steps (e.g. full:2 diag:0; the trained encoder and "
                         "decoder are the same, only the posterior's local updates differ; the ELBO per cell "
                         "of each is reported), or 'plugin' (the diag posterior with the plug-in full "
                         "covariance, a diagnostic)")
    ap.add_argument("--no-laplace", action="store_true")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from pln_ref.laplace import newton_map

    D = setup(args.cells, args.seed, Path(args.cache))
    out = {"args": vars(args), "n_cells": int(len(D["idx"])), "nuts_passed": int(D["ok"].sum()),
           "nuts_seconds": float(D["nuts"]["seconds"]), "lib": D["lib"].tolist(),
           "cells": D["idx"][D["ok"]].tolist(), "loadavg_start": os.getloadavg(), "methods": {}}
    ps = tuple(range(1, args.psis_seeds + 1))
    kw = dict(seed=args.seed, psis_seeds=ps)
    methods = {}
    if not args.no_laplace:
        methods["laplace"] = lambda: newton_map(D["cu"], D["params"], D["cla"])
    fit = trained_vae(Path(args.cache), D["u"], D["la"], D["params"], args.seed)
    methods["vae"] = lambda: fit.encode(D["cu"], D["cla"])

    elbo = {}

    def variant(zc, rs, name):
        fit.model.z_cov = zc
        elbo[name] = float(fit.elbo(D["cu"], D["cla"], refine_steps=rs).mean())
        return fit.encode(D["cu"], D["cla"], refine_steps=rs)

    def plugin():
        """The diag posterior (refine 2) with only its x | eta covariance replaced by the plug-in
        full one: S = (I + W^T diag(lam/(1 + lam d)) W)^-1, kappa = lam d/(1 + lam d), v = d/(1 + lam d),
        lam = E_q e^{x - eta} (3 fixed-point passes); means and q(eta) unchanged (diagnostic)."""
        from dataclasses import replace

        from pln_ref import truncnorm

        fit.model.z_cov = "diag"
        q = fit.encode(D["cu"], D["cla"], refine_steps=2)
        W, d = q.params.W, q.params.d
        q2 = q
        for _ in range(3):
            b = q2.x_slope
            lam = np.exp(q2.x_mean - b * q2.eta_mean[:, None] + 0.5 * q2._cond_var_x()
                         + truncnorm.log_mgf(b - 1.0, q2.eta_loc[:, None], q2.eta_scale[:, None]))
            S = np.linalg.inv(np.eye(W.shape[1]) + np.einsum("ga,ng,gb->nab", W, lam / (1 + lam * d), W))
            q2 = replace(q, z_cov=S, kappa=lam * d / (1 + lam * d), z_var=np.diagonal(S, axis1=1, axis2=2).copy(),
                         v=d / (1 + lam * d))
        return q2

    for spec in args.variants:
        if spec == "plugin":
            methods["vae_diag_plugin_fullcov"] = plugin
            continue
        zc, rs = spec.split(":")
        name = f"vae_{zc}_refine{rs}"
        methods[name] = lambda zc=zc, rs=int(rs), name=name: variant(zc, rs, name)
    z_cov0 = fit.model.z_cov
    for name, make in methods.items():
        fit.model.z_cov = z_cov0
        t0 = time.process_time()
        post = make()
        cpu = time.process_time() - t0
        r = evaluate(post, D["cu"], D["cla"], D["params"], D["nx"], D["ne"], D["lib"], label=name, **kw)
        r["posterior_cpu_s"] = cpu
        if name == "vae":
            r["elbo_per_cell"] = float(fit.elbo(D["cu"], D["cla"], refine_steps=fit.config.refine_steps).mean())
        if name in elbo:
            r["elbo_per_cell"] = elbo[name]
        out["methods"][name] = r
        print(line(name, r) + (f"  ELBO/cell {r['elbo_per_cell']:.4f}" if "elbo_per_cell" in r else ""), flush=True)
    out["loadavg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
