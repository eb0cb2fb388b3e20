"""Validation orchestration: NUTS ground truth (gated), method-vs-NUTS comparisons, PSIS,
moment identities, SBC runs, engine agreement; each writes PNG figures and a JSON block and
the report collects them into ``report.md`` + ``metrics.json``.

Entry points (also wired as ``pln-ref validate`` / ``pln-ref sbc`` by :func:`build_validate_parser`
and :func:`build_sbc_parser`):

    run_cell_comparison(out_dir, ...)   Laplace (and VAE) vs gated per-cell NUTS of pln_cell
    run_joint(out_dir, ...)             gated NUTS of pln_joint + Laplace Sigma coverage
    run_moments(out_dir, ...)           closed-form moments vs Monte Carlo of the simulator
    run_engine_agreement(out_dir, ...)  stanli vs PyStan NUTS (skipped if pystan is missing)
    run_sbc_laplace(out_dir, ...)       conditional Laplace SBC (thousands of cells, Dask)
    run_sbc_joint(out_dir, ...)         joint NUTS SBC of pln_joint (Dask, resumable)

Simulation design (explicit, per ``laplace-math.md``): the capture anchor is exogenous. Library
sizes L_c are drawn first (log-uniform on [100, 5000] by default), eta_c from its prior given
L_c, then x_c and u_c; inference receives the same L_c, never the realised sum.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .compare import compare_cells, corr_x_eta, plot_khat, plot_means, plot_sd_ratio_hist, summarise
from .gate import GateResult, check_gate

__all__ = [
    "simulate_cells",
    "fit_cells_nuts",
    "run_cell_comparison",
    "run_joint",
    "run_moments",
    "run_engine_agreement",
    "run_sbc_laplace",
    "run_sbc_joint",
    "write_report",
    "merge_outputs",
    "build_validate_parser",
    "build_sbc_parser",
    "validate_main",
    "sbc_main",
]


# --------------------------------------------------------------------------- helpers

def _jsonable(o: Any):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if isinstance(o, (np.floating, float)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.bool_,)):
        return bool(o)
    return o


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=1))
    os.replace(tmp, path)


def _savefig(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _mpl():
    import matplotlib

    matplotlib.use("Agg")


def combine_gates(gates: list[GateResult]) -> GateResult:
    """One gate for several independent fits: passes iff all pass; reasons prefixed by fit id."""
    reasons = [f"fit {i}: {r}" for i, g in enumerate(gates) for r in g.reasons]
    return GateResult(
        passed=all(g.passed for g in gates), reasons=reasons, table=[],
        divergences=sum(g.divergences for g in gates),
        n_chains=min(g.n_chains for g in gates), n_draws=min(g.n_draws for g in gates),
        bfmi=[min(b for g in gates for b in g.bfmi)] if gates and all(g.bfmi for g in gates) else [],
        rhat_max=float(np.max([g.rhat_max for g in gates])),
        ess_bulk_min=float(np.min([g.ess_bulk_min for g in gates])),
        ess_tail_min=float(np.min([g.ess_tail_min for g in gates])),
    )


def simulate_cells(G: int = 20, k: int = 3, n_cells: int = 200, *, lib_range=(100.0, 5000.0),
                   seed: int = 0, mean_log_rate: float = 7.5, sigma_M: float = 0.5):
    """Simulated data with realistic library sizes and an exogenous anchor.

    Globals from ``random_params(G, k, mean_log_rate, capture=True)`` (M0 = expected total mRNA,
    about 5e4 for the defaults); anchors L_c log-uniform on ``lib_range`` drawn first, so the
    expected total count of cell c is about L_c. ``lib_range=None``: the simulator's default anchor
    L_c = M0 kappa_c (capture efficiency kappa_c log-uniform on [0.05, 0.5], so eta is away from
    its bound). Returns (params, Simulation).
    """
    from .simulation import random_params, simulate

    params = random_params(G, k, seed=seed, mean_log_rate=mean_log_rate, capture=True, sigma_M=sigma_M)
    if lib_range is None:  # the simulator's default exogenous anchor: L_c = M0 kappa_c, kappa_c in [0.05, 0.5]
        return params, simulate(params, n_cells, seed=np.random.SeedSequence(seed, spawn_key=(2,)))
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    L = np.exp(rng.uniform(np.log(lib_range[0]), np.log(lib_range[1]), n_cells))
    sim = simulate(params, n_cells, seed=np.random.SeedSequence(seed, spawn_key=(2,)), library_size=L)
    return params, sim


def fit_cells_nuts(counts, params, log_anchor, *, chains: int = 4, warmup: int = 1000, draws: int = 1000,
                   seed: int = 0, engine: str | None = None, dense_metric: bool = True,
                   retry: bool = True, progress: bool = True) -> dict:
    """NUTS ground truth of every cell's conditional posterior p(x_c, eta_c | u_c, theta).

    Cells are independent given theta, so each cell is its own ``pln_cell`` fit (N=1) with its
    own gate (a joint fit of all cells shares one step size and mixes worse: measured 62 bulk
    ESS for 200 cells in one program vs > 2000 per cell). Dense metric: x and eta are strongly
    correlated in deep cells. A cell that fails the gate is refitted once with adapt_delta 0.95
    and twice the warmup (a better run, not a looser gate); if it fails again it is excluded
    from every comparison and listed.
    Returns {"x" (T,N,G), "eta" (T,N), "gates" [GateResult], "passed" (N,), "attempts" (N,),
    "seconds"}.
    """
    from .engines import pln_cell_data, sample_nuts

    u = np.asarray(counts)
    N, G = u.shape
    T = chains * draws
    xs = np.full((T, N, G), np.nan)
    es = np.full((T, N), np.nan)
    gates, passed, attempts = [], np.zeros(N, bool), np.zeros(N, int)
    t0 = time.perf_counter()
    it = range(N)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="NUTS per cell", unit="cell")
    for c in it:
        data = pln_cell_data(u[c:c + 1], params, np.asarray(log_anchor)[c:c + 1])
        settings = [dict(adapt_delta=0.8, warmup=warmup)]
        if retry:
            settings.append(dict(adapt_delta=0.95, warmup=2 * warmup))
        for a, s in enumerate(settings):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                idata = sample_nuts("pln_cell", data, chains=chains, draws=draws, seed=seed + 7919 * c + a,
                                    engine=engine, dense_metric=dense_metric, **s)
            g = check_gate(idata)
            attempts[c] = a + 1
            if g.passed:
                break
        gates.append(g)
        passed[c] = g.passed
        xs[:, c] = idata.posterior["x"].values.reshape(T, G)
        es[:, c] = idata.posterior["eta"].values.reshape(T)
    return {"x": xs, "eta": es, "gates": gates, "passed": passed, "attempts": attempts,
            "seconds": time.perf_counter() - t0}


def _fmt(v, nd=3):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


# --------------------------------------------------------------------------- cell comparison

def _method_block(name, method, nuts_x, nuts_eta, gate, counts, params, la, out: Path, *,
                  n_draws: int, seed: int, lib: np.ndarray, force: bool) -> tuple[dict, list[str]]:
    from .psis import cell_psis

    _mpl()
    cmp = compare_cells(method, (nuts_x, nuts_eta), gate=gate, n_draws=n_draws, seed=seed,
                        force=force, label=name, sample_kwargs={"eta": "free"})
    res: dict = {"x": summarise(cmp["x"])}
    if "eta" in cmp:
        res["eta"] = summarise(cmp["eta"])
    # coverage / error by library-size tercile
    q = np.quantile(lib, [1 / 3, 2 / 3])
    bins = np.digitize(lib, q)
    res["x_by_library_tercile"] = [
        {"library_range": [float(lib[bins == b].min()), float(lib[bins == b].max())],
         **{m: summarise(cmp["x"], select=np.broadcast_to((bins == b)[:, None], cmp["x"].sd_ratio.shape))[m]
            for m in ("std_mean_error", "sd_ratio", "cover90")}}
        for b in range(3)]
    # posterior correlation of (x_g, eta), median over genes and cells per tercile: counts fix
    # x_g - eta, so the common shift along (1, ..., 1, 1) dominates the posterior of
    # well-sequenced cells; a family without that correlation must shrink both SDs
    xm, em = method.sample(np.random.default_rng(seed + 2), min(n_draws, 1000), eta="free")
    c_n, c_m = corr_x_eta(nuts_x, nuts_eta), corr_x_eta(xm, em)
    res["corr_x_eta_by_library_tercile"] = [
        {"library_range": [float(lib[bins == b].min()), float(lib[bins == b].max())],
         "nuts_median": float(np.median(c_n[bins == b])), "method_median": float(np.median(c_m[bins == b]))}
        for b in range(3)]
    figs = []
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    plot_means(cmp["x"], ax=axes[0], title=f"{name}: x means")
    if "eta" in cmp:
        plot_means(cmp["eta"], ax=axes[1], title=f"{name}: eta means")
    plot_sd_ratio_hist(cmp["x"], ax=axes[2], title=f"{name}: SD ratio of x")
    figs.append(_savefig(fig, out / f"cell_{name}_means_sdratio.png"))
    # PSIS k-hat of the joint (x, eta) approximation against the exact pln_cell density
    try:
        ps = cell_psis(method, counts, params, la, n_draws=n_draws, seed=seed + 1,
                       sample_kwargs={"eta": "free"})
        res["psis"] = ps["summary"]
        k = ps["result"].khat
        fig, ax = plt.subplots(figsize=(7, 3.5))
        plot_khat(k[np.argsort(lib)], ax=ax, title=f"{name}: PSIS k-hat by cell (sorted by library size)")
        figs.append(_savefig(fig, out / f"cell_{name}_khat.png"))
        # PSIS-reweighted estimate vs NUTS
        sd_n = nuts_x.std(0, ddof=1)
        z_rw = (ps["mean_x"] - nuts_x.mean(0)) / sd_n
        r_rw = ps["sd_x"] / sd_n
        res["psis_reweighted_x"] = {
            "median_abs_std_mean_error": float(np.median(np.abs(z_rw))),
            "worst_abs_std_mean_error": float(np.max(np.abs(z_rw))),
            "sd_ratio_min": float(r_rw.min()), "sd_ratio_max": float(r_rw.max()),
            "sd_ratio_p05": float(np.quantile(r_rw, 0.05)), "sd_ratio_p95": float(np.quantile(r_rw, 0.95))}
        sd_e = nuts_eta.std(0, ddof=1)
        z_e = (ps["mean_eta"] - nuts_eta.mean(0)) / sd_e
        r_e = ps["sd_eta"] / sd_e
        res["psis_reweighted_eta"] = {
            "median_abs_std_mean_error": float(np.median(np.abs(z_e))),
            "worst_abs_std_mean_error": float(np.max(np.abs(z_e))),
            "sd_ratio_min": float(r_e.min()), "sd_ratio_max": float(r_e.max())}
        res["eta_std_mean_error_mean"] = float(np.mean(cmp["eta"].std_mean_error)) if "eta" in cmp else None
        res["khat"] = k.tolist()
    except Exception as e:  # noqa: BLE001 - a method without logpdf still gets the draw metrics
        res["psis"] = {"skipped": f"{type(e).__name__}: {e}"}
    return res, figs


def run_cell_comparison(out_dir, *, G: int = 20, k: int = 3, n_cells: int = 200, lib_range=(100.0, 5000.0),
                        seed: int = 0, chains: int = 4, warmup: int = 1000, draws: int = 1000,
                        n_method_draws: int = 4000, methods=("laplace", "vae"), engine: str | None = None,
                        vae_steps: int = 3000, force: bool = False, progress: bool = True) -> dict:
    """Laplace (and VAE) vs gated per-cell NUTS on simulated pln_cell data; writes figures and
    ``cell_comparison.json`` into out_dir and returns the metrics."""
    from .laplace import newton_map

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    params, sim = simulate_cells(G, k, n_cells, lib_range=lib_range, seed=seed)
    u, la = np.asarray(sim.counts), np.asarray(sim.log_anchor)
    lib = np.exp(la)
    # NUTS ground truth is cached in out_dir (keyed by the design) so reruns only redo the methods
    key = json.dumps({"G": G, "k": k, "n": n_cells, "lib": list(lib_range), "seed": seed, "chains": chains,
                      "warmup": warmup, "draws": draws, "engine": engine,
                      "counts_sum": int(u.sum()), "counts_hash": int(np.sum(u * np.arange(1, u.size + 1).reshape(u.shape)) % 2**61)},
                     sort_keys=True)
    cache = out / "nuts_cells_cache.npz"
    nuts = None
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                gates = [GateResult(passed=bool(p_), reasons=json.loads(str(r_)), table=[])
                         for p_, r_ in zip(z["passed"], z["reasons"])]
                nuts = {"x": z["x"], "eta": z["eta"], "passed": z["passed"], "attempts": z["attempts"],
                        "seconds": float(z["seconds"]), "gates": gates, "cached": True}
                summ = json.loads(str(z["gate_summaries"]))
                for g, sm in zip(gates, summ):
                    for f in ("divergences", "n_chains", "n_draws", "bfmi", "rhat_max", "ess_bulk_min", "ess_tail_min"):
                        setattr(g, f, sm[f])
    if nuts is None:
        nuts = fit_cells_nuts(u, params, la, chains=chains, warmup=warmup, draws=draws, seed=seed,
                              engine=engine, progress=progress)
        tmp = out / "nuts_cells_cache.tmp.npz"
        np.savez(tmp, key=np.asarray(key), x=nuts["x"], eta=nuts["eta"], passed=nuts["passed"],
                 attempts=nuts["attempts"], seconds=np.asarray(nuts["seconds"]),
                 reasons=np.asarray([json.dumps(g.reasons) for g in nuts["gates"]]),
                 gate_summaries=np.asarray(json.dumps(_jsonable([g.summary() for g in nuts["gates"]]))))
        os.replace(tmp, cache)
    ok = nuts["passed"]
    idx = np.flatnonzero(ok)
    failed = [{"cell": int(c), "reasons": nuts["gates"][c].reasons} for c in np.flatnonzero(~ok)]
    gate_ok = combine_gates([nuts["gates"][c] for c in idx]) if idx.size else None
    metrics: dict = {
        "design": {"G": G, "k": k, "n_cells": n_cells, "library_range": list(lib_range), "seed": seed,
                   "M0": params.capture.M0, "sigma_M": params.capture.sigma_M,
                   "total_count_quantiles": np.quantile(u.sum(1), [0, 0.5, 1]).tolist(),
                   "zero_fraction": float(np.mean(u == 0)),
                   "nuts": {"chains": chains, "warmup": warmup, "draws": draws, "dense_metric": True,
                            "per_cell_fits": True}},
        "nuts": {"cells_passed": int(ok.sum()), "cells_failed": failed, "from_cache": bool(nuts.get("cached", False)),
                 "refits": int(np.sum(nuts["attempts"] > 1)), "seconds": nuts["seconds"],
                 "gate_of_compared": gate_ok.summary() if gate_ok else None},
        "methods": {}, "figures": [],
    }
    if not idx.size and not force:
        metrics["error"] = "no cell passed the NUTS gate: nothing compared"
        _write_json(out / "cell_comparison.json", metrics)
        return metrics
    sel_u, sel_la = u[idx], la[idx]
    nx, ne = nuts["x"][:, idx], nuts["eta"][:, idx]
    for name in methods:
        t0 = time.perf_counter()
        try:
            if name == "laplace":
                method = newton_map(sel_u, params, sel_la)
                extra = {"converged": int(np.sum(method.converged)), "on_bound": int(np.sum(method.on_bound))}
            elif name == "vae":
                from .vae import fit_vae
                # encoder-only fit at the TRUE globals, so the VAE is compared on the same
                # conditional posterior p(x, eta | u, theta) as Laplace and NUTS
                vres = fit_vae(u, k, capture=params.capture, log_anchor=la, init=params,
                               train_decoder=False, n_steps=vae_steps, seed=seed, progress=progress)
                method = vres.encode(sel_u, sel_la)  # posteriors of the gated cells
                extra = {"n_steps": vae_steps, "train_decoder": False}
            else:
                raise ValueError(f"unknown method {name!r}")
        except ImportError as e:
            metrics["methods"][name] = {"skipped": f"{e}"}
            continue
        fit_s = time.perf_counter() - t0
        res, figs = _method_block(name, method, nx, ne, gate_ok, sel_u, params, sel_la, out,
                                  n_draws=n_method_draws, seed=seed, lib=lib[idx], force=force)
        res.update(extra, fit_seconds=fit_s, seconds=time.perf_counter() - t0)
        metrics["methods"][name] = res
        metrics["figures"] += figs
    metrics["seconds"] = time.perf_counter() - t_all
    _write_json(out / "cell_comparison.json", metrics)
    return metrics


# --------------------------------------------------------------------------- joint

def run_joint(out_dir, *, N: int = 100, G: int = 10, k: int = 2, seed: int = 0, chains: int = 4,
              warmup: int = 1000, draws: int = 1000, engine: str | None = None, dense_metric: bool = False,
              adapt_delta: float = 0.9, mean_log_rate: float = 1.5, lib_range=(100.0, 5000.0),
              laplace_steps: int = 500, progress: bool = True, name: str = "joint") -> dict:
    """Gated NUTS of ``pln_joint`` on simulated N x G data, and whether each Laplace-fitted Sigma
    entry lies in the NUTS 90% interval. Gate variables: identified quantities only
    (mu, d, Sigma, x, eta), never the rotation-dependent W. Writes ``{name}.json`` and
    ``{name}_sigma.png`` in out_dir."""
    from .engines import pln_joint_data, sample_nuts
    from .compare import interval_coverage_of_point

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    params, sim = simulate_cells(G, k, N, lib_range=lib_range, seed=seed, mean_log_rate=mean_log_rate)
    u, la = np.asarray(sim.counts), np.asarray(sim.log_anchor)
    data = pln_joint_data(u, k, capture=params.capture, log_anchor=la)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = sample_nuts("pln_joint", data, chains=chains, warmup=warmup, draws=draws, seed=seed,
                            engine=engine, adapt_delta=adapt_delta, dense_metric=dense_metric)
    nuts_s = time.perf_counter() - t0
    var_names = [v for v in ("mu", "d", "Sigma", "x", "eta") if v in idata.posterior]
    # Sigma is symmetric: its diagonal and upper triangle carry all the information
    gate = check_gate(idata, var_names=var_names)
    metrics: dict = {"design": {"N": N, "G": G, "k": k, "seed": seed, "chains": chains, "warmup": warmup,
                                "lib_range": None if lib_range is None else list(lib_range),
                                "mean_log_rate": mean_log_rate, "eta_mean": float(np.mean(sim.eta)),
                                "draws": draws, "adapt_delta": adapt_delta, "dense_metric": dense_metric,
                                "mean_count": float(u.mean()), "zero_fraction": float(np.mean(u == 0))},
                     "gate": gate.summary(), "gate_table": gate.table, "nuts_seconds": nuts_s}
    # Laplace fit of the globals
    try:
        from .fit_laplace import optimize_globals
        from .moments import method_of_moments

        t0 = time.perf_counter()
        init = method_of_moments(u, k, capture=params.capture, log_anchor=la)
        _, lp = optimize_globals(u, init, la, n_steps=laplace_steps, optimizer="lbfgs", progress=False)
        S_lap = lp.sigma_dense()
        Sig = idata.posterior["Sigma"].values.reshape(-1, G, G)
        iu = np.triu_indices(G)
        if gate.passed:
            cov = interval_coverage_of_point(Sig[:, iu[0], iu[1]], S_lap[iu], 0.9)
            metrics["laplace_sigma_coverage90"] = float(np.mean(cov))
            metrics["laplace_sigma_entries_covered"] = f"{int(cov.sum())}/{cov.size}"
        else:
            cov = interval_coverage_of_point(Sig[:, iu[0], iu[1]], S_lap[iu], 0.9)
            metrics["laplace_sigma_coverage90_FORCED_gate_failed"] = float(np.mean(cov))
        metrics["true_sigma_coverage90"] = float(np.mean(interval_coverage_of_point(
            Sig[:, iu[0], iu[1]], params.sigma_dense()[iu], 0.9)))
        metrics["laplace_seconds"] = time.perf_counter() - t0
        _mpl()
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 5))
        lo, hi = np.quantile(Sig[:, iu[0], iu[1]], [0.05, 0.95], axis=0)
        med = np.median(Sig[:, iu[0], iu[1]], axis=0)
        ax.errorbar(med, S_lap[iu], xerr=[med - lo, hi - med], fmt="o", ms=3, lw=0.6,
                    color="C0" if gate.passed else "C3")
        m0, m1 = min(lo.min(), S_lap.min()), max(hi.max(), S_lap.max())
        ax.plot([m0, m1], [m0, m1], "k--", lw=0.8)
        ax.set_xlabel("NUTS Sigma (median, 90% interval)")
        ax.set_ylabel("Laplace Sigma")
        ax.set_title("joint: Sigma entries" + ("" if gate.passed else " [gate FAILED]"))
        metrics["figures"] = [_savefig(fig, out / f"{name}_sigma.png")]
    except ImportError as e:
        metrics["laplace"] = {"skipped": str(e)}
    metrics["seconds"] = time.perf_counter() - t_all
    _write_json(out / f"{name}.json", metrics)
    return metrics


# --------------------------------------------------------------------------- moments

def run_moments(out_dir, *, G: int = 10, k: int = 2, n_cells: int = 200_000, seed: int = 0,
                mean_log_rate: float = 2.0, fit_cells: int = 2000, fit_steps: int = 300) -> dict:
    """Closed-form mean, variance and covariance vs a Monte Carlo of the simulator (z-scores by
    Monte Carlo standard error for every gene and pair), with and without capture."""
    from .moments import moment_zscores
    from .simulation import simulate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = {}
    t0 = time.perf_counter()
    from .simulation import random_params

    for label, cap in (("no_capture", False), ("capture", True)):
        # simulator's default exogenous anchor with capture: L_c = M0 kappa_c, kappa_c log-uniform
        # on [0.05, 0.5] (capture efficiencies 5-50%, so eta is away from its bound)
        params = random_params(G, k, seed=seed, mean_log_rate=mean_log_rate, capture=cap)
        sim = simulate(params, n_cells, seed=np.random.SeedSequence(seed, spawn_key=(3, int(cap))))
        z = moment_zscores(sim.counts, params, np.asarray(sim.log_anchor) if cap else None)
        res[label] = {"max_abs_z": float(z["max_abs_z"]), "worst": z["worst"],
                      "n_tests": int(z["z_mean"].size + z["z_var"].size + z["z_cov"].size),
                      "max_abs_z_mean": float(np.max(np.abs(z["z_mean"]))),
                      "max_abs_z_var": float(np.max(np.abs(z["z_var"]))),
                      "max_abs_z_cov": float(np.max(np.abs(z["z_cov"]))),
                      "mean_count": float(np.mean(sim.counts)),
                      "eta_range": [float(np.min(sim.eta)), float(np.max(sim.eta))]}
    res["design"] = {"G": G, "k": k, "n_cells": n_cells, "seed": seed, "mean_log_rate": mean_log_rate}
    if fit_cells:
        # data moments vs the closed-form moments of a Laplace-FITTED model (plug-in posterior
        # predictive). In-sample: the globals were fitted to these counts, so |z| is not N(0,1)-
        # calibrated (smaller for moments the fit matches directly); a large |z| flags misfit.
        from .fit_laplace import optimize_globals
        from .moments import method_of_moments

        t1 = time.perf_counter()
        params = random_params(G, k, seed=seed, mean_log_rate=mean_log_rate, capture=True)
        sim = simulate(params, fit_cells, seed=np.random.SeedSequence(seed, spawn_key=(4,)))
        la = np.asarray(sim.log_anchor)
        init = method_of_moments(sim.counts, k, capture=params.capture, log_anchor=la)
        _, fitted = optimize_globals(sim.counts, init, la, n_steps=fit_steps, optimizer="lbfgs", progress=False)
        z = moment_zscores(sim.counts, fitted, la)
        res["fitted_model"] = {"n_cells": fit_cells, "max_abs_z": float(z["max_abs_z"]), "worst": z["worst"],
                               "max_abs_z_mean": float(np.max(np.abs(z["z_mean"]))),
                               "max_abs_z_var": float(np.max(np.abs(z["z_var"]))),
                               "max_abs_z_cov": float(np.max(np.abs(z["z_cov"]))),
                               "seconds": time.perf_counter() - t1}
    res["worst_abs_z"] = max(res["no_capture"]["max_abs_z"], res["capture"]["max_abs_z"])
    res["seconds"] = time.perf_counter() - t0
    _write_json(out / "moments.json", res)
    return res


# --------------------------------------------------------------------------- engine agreement

def run_engine_agreement(out_dir, *, n_cells: int = 5, G: int = 10, k: int = 2, seed: int = 0,
                         chains: int = 4, warmup: int = 1000, draws: int = 2500) -> dict:
    """stanli vs PyStan NUTS on one pln_cell data set: z = (mean_a - mean_b) / sqrt(mcse_a^2 + mcse_b^2)
    per quantity; goal worst |z| <= 4. Skipped (with the reason) if pystan is not installed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import stan  # noqa: F401  (pystan 3)
    except ImportError as e:
        res = {"skipped": f"pystan not installed ({e}); install the 'pystan' extra to run it"}
        _write_json(out / "engine_agreement.json", res)
        return res
    import arviz as az
    from .engines import pln_cell_data, sample_nuts

    params, sim = simulate_cells(G, k, n_cells, seed=seed)
    data = pln_cell_data(sim.counts, params, sim.log_anchor)
    fits, secs = {}, {}
    for eng in ("stanli", "pystan"):
        t0 = time.perf_counter()
        fits[eng] = sample_nuts("pln_cell", data, engine=eng, chains=chains, warmup=warmup, draws=draws,
                                seed=seed + 1)
        secs[eng] = time.perf_counter() - t0
    zs = []
    for v in ("x", "eta"):
        m = [fits[e].posterior[v].mean(("chain", "draw")).values for e in fits]
        se = [az.mcse(fits[e].posterior[[v]], method="mean")[v].values for e in fits]
        zs.append(((m[0] - m[1]) / np.sqrt(se[0] ** 2 + se[1] ** 2)).reshape(-1))
    z = np.concatenate(zs)
    res = {"worst_abs_z": float(np.max(np.abs(z))), "n_quantities": int(z.size),
           "gates": {e: check_gate(f).summary() for e, f in fits.items()}, "seconds": secs,
           "design": {"n_cells": n_cells, "G": G, "k": k, "chains": chains, "draws": draws}}
    _write_json(out / "engine_agreement.json", res)
    return res


# --------------------------------------------------------------------------- SBC runs

def _sbc_outputs(out: Path, sims: dict, L: int, title: str, alpha: float = 0.05) -> dict:
    from .sbc import plot_ecdf_diff, plot_rank_hist, sbc_table

    _mpl()
    tab = sbc_table(sims, L, alpha)
    from .sbc import rank_columns

    ranks = rank_columns(sims)
    figs = [_savefig(plot_rank_hist(ranks, L), out / f"{title}_rank_hist.png"),
            _savefig(plot_ecdf_diff(ranks, L, alpha), out / f"{title}_ecdf_diff.png")]
    n_fail = sum(not r["passed"] for r in tab)
    return {"n_sims": int(len(sims["_index"])), "L": L, "alpha": alpha, "n_quantities": len(tab),
            "n_failed": n_fail, "failed": [r["quantity"] for r in tab if not r["passed"]],
            "n_failed_bonferroni": sum(not r["passed_bonferroni"] for r in tab),
            "expected_false_failures": alpha * len(tab), "table": tab, "figures": figs}


def run_sbc_laplace(out_dir, *, n_sims: int = 2000, G: int = 20, k: int = 3, L: int = 99, seed: int = 0,
                    batch_size: int = 500, psis_draws: int = 1000, scheduler: str = "distributed",
                    scheduler_address=None, n_workers: int = 2, progress: bool = True) -> dict:
    """Conditional SBC of the Laplace approximation at fixed globals (one simulation = one cell),
    resumable in out_dir/sbc_laplace. With ``psis_draws`` > 0 the same simulations also rank the
    PSIS-reweighted posterior (``psis_*`` quantities; see :func:`pln_ref.sbc.laplace_conditional_task`)."""
    from .sbc import laplace_conditional_task, load_sims, run_sbc

    out = Path(out_dir)
    sub = out / "sbc_laplace"
    params, _ = simulate_cells(G, k, 1, seed=seed)
    cfg = {"mu": params.mu, "W": params.W, "d": params.d, "M0": params.capture.M0,
           "sigma_M": params.capture.sigma_M, "L": L, "psis_draws": psis_draws}
    run = run_sbc(laplace_conditional_task, n_sims, sub, base_seed=seed, config=cfg, batch_size=batch_size,
                  scheduler=scheduler, scheduler_address=scheduler_address, n_workers=n_workers,
                  progress=progress)
    sims = load_sims(sub, n_sims)
    res = _sbc_outputs(out, sims, L, "sbc_laplace")
    if "khat" in sims:
        kh = np.asarray(sims["khat"])
        res["psis_khat"] = {"share_lt_0.5": float(np.mean(kh < 0.5)), "share_lt_0.7": float(np.mean(kh < 0.7)),
                            "median": float(np.median(kh)), "worst": float(np.max(kh))}
        for name, rows in (("laplace", [r for r in res["table"] if not r["quantity"].startswith("psis_")]),
                           ("psis", [r for r in res["table"] if r["quantity"].startswith("psis_")])):
            res[f"{name}_failed"] = [r["quantity"] for r in rows if not r["passed"]]
            res[f"{name}_n_quantities"] = len(rows)
    res.update(run=run, converged=int(np.sum(sims["converged"])),
               design={"G": G, "k": k, "L": L, "seed": seed, "batch_size": batch_size,
                       "psis_draws": psis_draws},
               seconds_per_sim=float(np.mean(sims["_seconds"])))
    _write_json(out / "sbc_laplace.json", res)
    return res


def run_sbc_joint(out_dir, *, n_sims: int = 200, N: int = 20, G: int = 4, k: int = 1, L: int = 99,
                  seed: int = 0, chains: int = 4, warmup: int = 1000, draws: int = 1000,
                  adapt_delta: float = 0.99, scheduler: str = "distributed", scheduler_address=None,
                  n_workers: int = 2, progress: bool = True) -> dict:
    """Joint NUTS SBC of pln_joint (see :func:`pln_ref.sbc.joint_nuts_task`), resumable in
    out_dir/sbc_joint.

    Defaults measured: with warmup 500 and adapt_delta 0.9, 9.8% of 400 fits had 1-25 divergent
    transitions (11% failed the gate); rerunning 12 of those fits with warmup 1000 and
    adapt_delta 0.99 gave 0 divergences and a passed gate in all 12 (0.95: 3 still diverged)."""
    from .sbc import joint_nuts_task, load_sims, run_sbc

    out = Path(out_dir)
    sub = out / "sbc_joint"
    cfg = {"N": N, "G": G, "k": k, "L": L, "chains": chains, "warmup": warmup, "draws": draws,
           "adapt_delta": adapt_delta}
    run = run_sbc(joint_nuts_task, n_sims, sub, base_seed=seed, config=cfg, batch_size=1,
                  scheduler=scheduler, scheduler_address=scheduler_address, n_workers=n_workers,
                  progress=progress)
    sims = load_sims(sub, n_sims)
    res = _sbc_outputs(out, sims, L, "sbc_joint")
    res.update(run=run, design=cfg, seed=seed,
               gate_pass_share=float(np.mean(sims["gate_passed"])),
               ess_ok_share=float(np.mean(sims["ess_ok"])),
               divergent_share=float(np.mean(sims["divergences"] > 0)),
               program_versions=sorted({str(v) for v in sims["program_sha"]}),
               seconds_per_sim=float(np.mean(sims["_seconds"])))
    _write_json(out / "sbc_joint.json", res)
    return res


# --------------------------------------------------------------------------- report

def _cell_section(m: dict) -> list[str]:
    s = ["## Per-cell posterior: methods vs NUTS (`pln_cell`)", ""]
    d = m["design"]
    s.append(f"Simulated G={d['G']}, k={d['k']}, {d['n_cells']} cells, library sizes "
             f"{d['library_range'][0]:.0f}-{d['library_range'][1]:.0f} (exogenous anchor), total counts "
             f"{d['total_count_quantiles'][0]:.0f}/{d['total_count_quantiles'][1]:.0f}/"
             f"{d['total_count_quantiles'][2]:.0f} (min/median/max), {100 * d['zero_fraction']:.1f}% zeros.")
    n = m["nuts"]
    s.append(f"NUTS ground truth: one gated fit per cell ({d['nuts']['chains']} chains x {d['nuts']['draws']} "
             f"draws, dense metric); {n['cells_passed']}/{d['n_cells']} cells passed the gate "
             f"({n['refits']} needed a refit), {n['seconds']:.0f} s.")
    if n["cells_failed"]:
        s.append("Cells failing the gate (excluded, never compared): "
                 + "; ".join(f"cell {f['cell']}: {', '.join(f['reasons'])}" for f in n["cells_failed"]))
    s += ["", "| method | median abs std. mean error x [<0.05] | SD ratio x min-max (p05-p95) [0.9-1.1] | "
          "90% coverage x mean (min-max) [0.88-0.92] | 50% coverage x mean | W1/sd median (worst) | "
          "eta median abs std. err | eta SD ratio min-max | k-hat<0.5 | k-hat<0.7 [>=99%] | seconds |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in m["methods"].items():
        if "skipped" in r:
            s.append(f"| {name} | skipped: {r['skipped']} |")
            continue
        x, e, p = r["x"], r.get("eta"), r.get("psis", {})
        s.append(
            f"| {name}{' (FORCED)' if x['forced'] else ''} | {x['std_mean_error']['median_abs']:.3f} | "
            f"{x['sd_ratio']['min']:.3f}-{x['sd_ratio']['max']:.3f} ({x['sd_ratio']['p05']:.3f}-{x['sd_ratio']['p95']:.3f}) | "
            f"{x['cover90']['mean']:.3f} ({x['cover90']['min']:.3f}-{x['cover90']['max']:.3f}) | "
            f"{x['cover50']['mean']:.3f} | {x['w1_scaled']['median']:.3f} ({x['w1_scaled']['worst']:.3f}) | "
            f"{e['std_mean_error']['median_abs']:.3f} | {e['sd_ratio']['min']:.3f}-{e['sd_ratio']['max']:.3f} | "
            f"{_fmt(p.get('share_khat_lt_0.5'))} | {_fmt(p.get('share_khat_lt_0.7'))} | {r['seconds']:.1f} |"
            if e else f"| {name} | {x['std_mean_error']['median_abs']:.3f} | ... |")
    for name, r in m["methods"].items():
        if "psis_reweighted_x" in r:
            w = r["psis_reweighted_x"]
            s.append(f"\nPSIS-reweighted {name}: median |std. mean error| {w['median_abs_std_mean_error']:.3f} "
                     f"(worst {w['worst_abs_std_mean_error']:.3f}), SD ratio {w['sd_ratio_min']:.3f}-{w['sd_ratio_max']:.3f}.")
        if "psis_reweighted_eta" in r:
            w = r["psis_reweighted_eta"]
            s.append(f"PSIS-reweighted {name} eta: median |std. mean error| {w['median_abs_std_mean_error']:.3f} "
                     f"(worst {w['worst_abs_std_mean_error']:.3f}), SD ratio {w['sd_ratio_min']:.3f}-{w['sd_ratio_max']:.3f}; "
                     f"mean signed eta error before reweighting {_fmt(r.get('eta_std_mean_error_mean'))}.")
        if "x_by_library_tercile" in r:
            s.append(f"\n{name} by library-size tercile (x): " + "; ".join(
                f"L {t['library_range'][0]:.0f}-{t['library_range'][1]:.0f}: median |z| "
                f"{t['std_mean_error']['median_abs']:.3f}, SD ratio {t['sd_ratio']['min']:.2f}-{t['sd_ratio']['max']:.2f}, "
                f"cov90 {t['cover90']['mean']:.3f}" for t in r["x_by_library_tercile"]))
        if "corr_x_eta_by_library_tercile" in r:
            s.append(f"\n{name}: posterior corr(x_g, eta), median over cells and genes, NUTS vs {name}: " + "; ".join(
                f"L {t['library_range'][0]:.0f}-{t['library_range'][1]:.0f}: {t['nuts_median']:.2f} vs "
                f"{t['method_median']:.2f}" for t in r["corr_x_eta_by_library_tercile"]))
    s += [""] + [f"![{f}]({f})" for f in m.get("figures", [])] + [""]
    return s


def _sbc_section(title: str, r: dict) -> list[str]:
    s = [f"## {title}", "",
         f"{r['n_sims']} simulations, L={r['L']} draws per rank; ECDF-difference test with simultaneous "
         f"{100 * (1 - r['alpha']):.0f}% bands per quantity: {r['n_quantities'] - r['n_failed']}/{r['n_quantities']} pass "
         f"(expected false failures under calibration: {r['expected_false_failures']:.1f}); with a Bonferroni "
         f"family-wise band {r['n_quantities'] - r['n_failed_bonferroni']}/{r['n_quantities']} pass.",
         f"Failed: {', '.join(r['failed']) or 'none'}.", ""]
    for k in ("gate_pass_share", "ess_ok_share", "divergent_share", "seconds_per_sim", "converged"):
        if k in r:
            s.append(f"- {k}: {_fmt(r[k])}")
    if "program_versions" in r:
        s.append(f"- pln_joint program versions (hash of code without comments): {', '.join(r['program_versions'])}")
    if "psis_khat" in r:
        kh = r["psis_khat"]
        s.append(f"- PSIS k-hat of the Laplace draws: median {kh['median']:.2f}, worst {kh['worst']:.2f}, "
                 f"share < 0.5 {kh['share_lt_0.5']:.3f}, share < 0.7 {kh['share_lt_0.7']:.3f}")
        for name, lab in (("laplace", "Laplace draws"), ("psis", "PSIS-reweighted (resampled) draws")):
            s.append(f"- {lab}: failed {', '.join(r[f'{name}_failed']) or 'none'} "
                     f"of {r[f'{name}_n_quantities']}")
    s += ["", "| quantity | pass | p-value | p-value 1st / 2nd half of sims | max abs ECDF diff |",
          "|---|---|---|---|---|"]
    for row in r["table"]:
        ph = row.get("p_value_halves")
        s.append(f"| {row['quantity']} | {'yes' if row['passed'] else 'NO'} | {row['p_value']:.3f} | "
                 f"{f'{ph[0]:.3f} / {ph[1]:.3f}' if ph else '-'} | {row['max_abs_ecdf_diff']:.3f} |")
    s += [""] + [f"![{f}]({f})" for f in r["figures"]] + [""]
    return s


def _headline(metrics: dict) -> list[str]:
    """Figures vs goals (issue 5) in one table."""
    rows = []

    def add(name, value, goal, ok):
        rows.append(f"| {name} | {value} | {goal} | {'yes' if ok else 'NO'} |")

    c = metrics.get("cell", {}).get("methods", {})
    for name, r in c.items():
        if "x" not in r:
            continue
        x, p = r["x"], r.get("psis", {})
        add(f"{name}: median abs std. mean error (x)", f"{x['std_mean_error']['median_abs']:.3f}", "< 0.05",
            x["std_mean_error"]["median_abs"] < 0.05)
        add(f"{name}: SD ratio range (x)", f"{x['sd_ratio']['min']:.3f}-{x['sd_ratio']['max']:.3f}", "0.9-1.1",
            x["sd_ratio"]["min"] >= 0.9 and x["sd_ratio"]["max"] <= 1.1)
        add(f"{name}: 90% coverage (x) mean (range)",
            f"{x['cover90']['mean']:.3f} ({x['cover90']['min']:.3f}-{x['cover90']['max']:.3f})", "0.88-0.92",
            0.88 <= x["cover90"]["mean"] <= 0.92)
        if "share_khat_lt_0.7" in p:
            add(f"{name}: share of cells k-hat < 0.7", f"{100 * p['share_khat_lt_0.7']:.1f}%", ">= 99%",
                p["share_khat_lt_0.7"] >= 0.99)
    for jkey in sorted(k for k in metrics if k.startswith("joint")):
        j = metrics[jkey]
        add(f"[{jkey}] joint NUTS gate (N=%d, G=%d, k=%d)" % (j["design"]["N"], j["design"]["G"], j["design"]["k"]),
            "passed" if j["gate"]["passed"] else "failed: " + "; ".join(j["gate"]["reasons"]), "pass",
            j["gate"]["passed"])
        if "laplace_sigma_coverage90" in j:
            add(f"[{jkey}] Laplace Sigma entries in NUTS 90% interval", f"{100 * j['laplace_sigma_coverage90']:.0f}%",
                ">= 90%", j["laplace_sigma_coverage90"] >= 0.9)
    m = metrics.get("moments")
    if m:
        add("moment identities worst abs z", f"{m['worst_abs_z']:.2f}", "< 4.5", m["worst_abs_z"] < 4.5)
    e = metrics.get("engine_agreement")
    if e:
        if "skipped" in e:
            add("engine agreement worst abs z", "skipped", "<= 4", False)
        else:
            add("engine agreement worst abs z", f"{e['worst_abs_z']:.2f}", "<= 4", e["worst_abs_z"] <= 4)
    for key, label in (("sbc_joint", "joint NUTS SBC"), ("sbc_laplace", "Laplace conditional SBC")):
        r = metrics.get(key)
        if r:
            add(f"{label}: simulations", str(r["n_sims"]), ">= 200" if key == "sbc_joint" else ">= 2000",
                r["n_sims"] >= (200 if key == "sbc_joint" else 2000))
            if "psis_n_quantities" in r:  # Laplace draws and PSIS-reweighted draws, separately
                for name, lab in (("laplace", "Laplace draws"), ("psis", "PSIS-reweighted draws")):
                    n, f = r[f"{name}_n_quantities"], r[f"{name}_failed"]
                    add(f"{label}, {lab}: quantities passing the ECDF test",
                        f"{n - len(f)}/{n} (failed: {', '.join(f) or 'none'})", "all", not f)
            else:
                add(f"{label}: quantities passing the ECDF test",
                    f"{r['n_quantities'] - r['n_failed']}/{r['n_quantities']} (failed: {', '.join(r['failed']) or 'none'})",
                    "all", r["n_failed"] == 0)
    if not rows:
        return []
    return ["## Figures vs goals", "", "| figure | measured | goal | met |", "|---|---|---|---|", *rows, ""]


def write_report(out_dir, metrics: dict) -> Path:
    """report.md + metrics.json from the sections present in ``metrics``."""
    out = Path(out_dir)
    lines = ["# pln-ref validation report", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.node()} "
             f"({os.cpu_count()} CPUs, Python {platform.python_version()}).", ""]
    lines += _headline(metrics)
    if "cell" in metrics:
        lines += _cell_section(metrics["cell"])
    for jkey in sorted(k for k in metrics if k.startswith("joint")):
        j = metrics[jkey]
        g = j["gate"]
        lines += [f"## Joint NUTS (`pln_joint`) [{jkey}]", "",
                  f"Design: anchors {'library sizes %s' % j['design'].get('lib_range') if j['design'].get('lib_range') else 'capture efficiencies 5-50%'}, "
                  f"mean log-rate {j['design'].get('mean_log_rate')}, mean eta {_fmt(j['design'].get('eta_mean'), 2)}.",
                  f"N={j['design']['N']}, G={j['design']['G']}, k={j['design']['k']}, mean count "
                  f"{j['design']['mean_count']:.1f}, {100 * j['design']['zero_fraction']:.0f}% zeros; "
                  f"{j['design']['chains']} chains x {j['design']['warmup']}/{j['design']['draws']}, "
                  f"adapt_delta {j['design']['adapt_delta']}, dense metric {j['design']['dense_metric']}: "
                  f"{j['nuts_seconds']:.0f} s.",
                  f"Gate on mu, d, Sigma, x, eta: **{'PASSED' if g['passed'] else 'FAILED'}** (R-hat max "
                  f"{_fmt(g['rhat_max'], 4)}, bulk ESS min {_fmt(g['ess_bulk_min'], 0)}, tail ESS min "
                  f"{_fmt(g['ess_tail_min'], 0)}, divergences {g['divergences']}, E-BFMI min "
                  f"{_fmt(min(g['bfmi']) if g['bfmi'] else None, 2)}).", ""]
        lines += [f"- {r}" for r in g["reasons"]]
        for key in ("laplace_sigma_coverage90", "laplace_sigma_entries_covered",
                    "laplace_sigma_coverage90_FORCED_gate_failed", "true_sigma_coverage90"):
            if key in j:
                lines.append(f"- {key}: {_fmt(j[key])}")
        lines += [""] + [f"![{f}]({f})" for f in j.get("figures", [])] + [""]
    if "moments" in metrics:
        m = metrics["moments"]
        lines += ["## Moment identities", "",
                  f"Monte Carlo of the simulator, {m['design']['n_cells']} cells, G={m['design']['G']}, "
                  f"k={m['design']['k']}: worst |z| over every gene mean, variance and pair covariance = "
                  f"**{m['worst_abs_z']:.2f}** [< 4.5] (no capture {m['no_capture']['max_abs_z']:.2f}, "
                  f"{m['no_capture']['n_tests']} tests; capture {m['capture']['max_abs_z']:.2f}: "
                  f"{m['capture']['worst']}). {m['seconds']:.0f} s.", ""]
        if "fitted_model" in m:
            f = m["fitted_model"]
            lines += [f"Against a Laplace-fitted model ({f['n_cells']} cells, in-sample plug-in posterior predictive "
                      f"moments): worst |z| {f['max_abs_z']:.2f} ({f['worst']}); mean {f['max_abs_z_mean']:.2f}, "
                      f"variance {f['max_abs_z_var']:.2f}, covariance {f['max_abs_z_cov']:.2f}.", ""]
    if "engine_agreement" in metrics:
        e = metrics["engine_agreement"]
        lines += ["## Engine agreement (stanli vs PyStan)", ""]
        lines += [f"Skipped: {e['skipped']}", ""] if "skipped" in e else [
            f"Worst |z| over {e['n_quantities']} posterior means: **{e['worst_abs_z']:.2f}** [<= 4]; "
            "NUTS wall time " + ", ".join(f"{k} {v:.1f} s" for k, v in e["seconds"].items())
            + "; gates " + ", ".join(f"{k} {'passed' if g['passed'] else 'FAILED'}" for k, g in e["gates"].items())
            + ".", ""]
    if "sbc_laplace" in metrics:
        lines += _sbc_section("SBC: Laplace conditional posterior", metrics["sbc_laplace"])
    if "sbc_joint" in metrics:
        lines += _sbc_section("SBC: joint NUTS of pln_joint", metrics["sbc_joint"])
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _write_json(out / "metrics.json", metrics)
    return out / "report.md"


# --------------------------------------------------------------------------- CLI

VALIDATE_PARTS = ("cell", "joint", "moments", "engines")


def validate_main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts or list(VALIDATE_PARTS)
    mpath = out / "metrics.json"
    metrics = json.loads(mpath.read_text()) if mpath.exists() else {}
    q = args.quick
    for part in parts:
        print(f"[pln-ref validate] {part} ...", flush=True)
        if part == "cell":
            metrics["cell"] = run_cell_comparison(
                out, n_cells=20 if q else args.cells, seed=args.seed, draws=500 if q else 1000,
                warmup=500 if q else 1000, methods=tuple(args.methods), engine=args.engine,
                force=args.force, progress=not args.quiet, vae_steps=300 if q else 3000)
        elif part == "joint":
            jname = f"joint_{args.joint_design}"
            metrics[jname] = run_joint(out, N=30 if q else 100, seed=args.seed, engine=args.engine,
                                       warmup=300 if q else args.joint_warmup,
                                       draws=300 if q else args.joint_draws,
                                       adapt_delta=args.joint_adapt_delta,
                                       **({} if args.joint_design == "library" else
                                          {"lib_range": None, "mean_log_rate": 2.7}),
                                       name=jname)
        elif part == "moments":
            metrics["moments"] = run_moments(out, n_cells=20_000 if q else 200_000, seed=args.seed,
                                             fit_cells=300 if q else 2000)
        elif part == "engines":
            metrics["engine_agreement"] = run_engine_agreement(out, seed=args.seed)
        write_report(out, metrics)  # after every part: progress is visible and kept
    print(f"[pln-ref validate] wrote {out / 'report.md'}")
    return 0


def sbc_main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / "metrics.json"
    metrics = json.loads(mpath.read_text()) if mpath.exists() else {}
    common = dict(seed=args.seed, scheduler="synchronous" if args.synchronous else "distributed",
                  scheduler_address=args.scheduler_address, n_workers=args.workers, progress=not args.quiet,
                  L=args.L)
    if args.flavour in ("laplace", "both"):
        metrics["sbc_laplace"] = run_sbc_laplace(out, n_sims=args.sims or 2000, **common)
        write_report(out, metrics)
    if args.flavour in ("joint", "both"):
        metrics["sbc_joint"] = run_sbc_joint(out, n_sims=args.sims or 200, warmup=args.warmup,
                                             draws=args.draws, adapt_delta=args.adapt_delta, **common)
        write_report(out, metrics)
    print(f"[pln-ref sbc] wrote {out / 'report.md'}")
    return 0


def build_validate_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``validate`` on an argparse subparsers object (func=validate_main)."""
    p = subparsers.add_parser("validate", help="NUTS-gated validation: methods vs NUTS, PSIS, joint, "
                              "moments, engine agreement -> report.md, PNGs, metrics.json")
    p.add_argument("--out", required=True, help="output directory (report.md, metrics.json, *.png)")
    p.add_argument("--parts", nargs="+", choices=VALIDATE_PARTS, default=None,
                   help="which parts to run (default: all); results of earlier runs in --out are kept")
    p.add_argument("--methods", nargs="+", choices=["laplace", "vae"], default=["laplace", "vae"])
    p.add_argument("--cells", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", default=None, help="NUTS engine: stanli | cmdstanpy | pystan (default auto)")
    p.add_argument("--force", action="store_true",
                   help="compare even against NUTS fits that failed the gate (labelled FORCED)")
    p.add_argument("--joint-warmup", type=int, default=2000)
    p.add_argument("--joint-draws", type=int, default=2000)
    p.add_argument("--joint-adapt-delta", type=float, default=0.9)
    p.add_argument("--joint-design", choices=["library", "efficiency"], default="library",
                   help="joint data: anchors = library sizes 100-5000 with mean log-rate 1.5 (eta mostly "
                        "near its bound 0) or the simulator's capture efficiencies 5-50%% (mean log-rate 2.7)")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test, not for figures)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=validate_main)
    return p


def build_sbc_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``sbc`` on an argparse subparsers object (func=sbc_main)."""
    p = subparsers.add_parser("sbc", help="simulation-based calibration on Dask (resumable): "
                              "Laplace conditional and/or joint NUTS")
    p.add_argument("--out", required=True, help="output directory; rerun with the same --out to resume")
    p.add_argument("--flavour", choices=["laplace", "joint", "both"], default="laplace")
    p.add_argument("--sims", type=int, default=None, help="number of simulations (default 2000 laplace, 200 joint)")
    p.add_argument("--L", type=int, default=99, help="posterior draws per rank (ranks in 0..L)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1000, help="joint: NUTS warmup iterations per chain")
    p.add_argument("--draws", type=int, default=1000, help="joint: NUTS draws per chain (thinned to L)")
    p.add_argument("--adapt-delta", type=float, default=0.99, help="joint: NUTS target acceptance rate")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (1 thread each)")
    p.add_argument("--scheduler-address", default=None, help="address of a running Dask scheduler")
    p.add_argument("--synchronous", action="store_true", help="no Dask: run in this process")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=sbc_main)
    return p


def merge_outputs(dst, *srcs) -> Path:
    """Merge the metrics.json and figures of several validate/sbc output directories into dst
    (later sources win per section) and rewrite dst/report.md."""
    import shutil

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    metrics: dict = {}
    for src in (dst, *map(Path, srcs)):
        mp = src / "metrics.json"
        if mp.exists():
            metrics.update(json.loads(mp.read_text()))
        if src != dst:
            for png in src.glob("*.png"):
                shutil.copy2(png, dst / png.name)
    return write_report(dst, metrics)
