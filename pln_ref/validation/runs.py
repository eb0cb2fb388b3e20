"""Validation runs: Laplace and VAE vs gated per-cell NUTS (with PSIS), gated joint NUTS with the
Laplace Sigma coverage, moment identities, agreement of two NUTS engines. Each run writes its PNG
figures and a JSON file into the output directory and returns its metrics, which
:func:`pln_ref.validation.report.write_report` collects into ``report.md`` + ``metrics.json``.

Simulation design (explicit, per ``laplace-math.md``): the capture anchor is exogenous, see
:mod:`pln_ref.validation.design`.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np

from ..io import atomic_write_json
from .compare import DrawComparison, compare_cells, corr_x_eta, summarise
from .design import simulate_cells
from .gate import check_gate, combine_gates
from .nuts_cells import fit_cells_nuts, load_nuts_cache, nuts_cache_key, save_nuts_cache

__all__ = [
    "VAE_METHODS",
    "run_cell_comparison",
    "run_real_cell_comparison",
    "run_joint",
    "run_moments",
    "run_engine_agreement",
]


# --------------------------------------------------------------------------- cell comparison

#: VAE method names of the cell comparison and their variational family (``VAEConfig`` options):
#: "vae" the default structured family (full q(z | eta) covariance), "vae_diag" the structured family
#: with the diagonal q(z) and e independent of z (before 2026-12-06), "vae_meanfield" the mean field
VAE_METHODS = {"vae": {"family": "structured"}, "vae_diag": {"family": "structured", "z_cov": "diag"},
               "vae_meanfield": {"family": "meanfield"}}

def _by_tercile(lib: np.ndarray, row) -> list[dict]:
    """``row(mask)`` for each library-size tercile, with its library range."""
    bins = np.digitize(lib, np.quantile(lib, [1 / 3, 2 / 3]))
    return [{"library_range": [float(lib[bins == b].min()), float(lib[bins == b].max())], **row(bins == b)}
            for b in range(3)]


def _draw_metrics(cmp: dict[str, DrawComparison], method, nuts_x, nuts_eta, *, n_draws: int, seed: int,
                  lib: np.ndarray) -> dict:
    """Summaries of the draw comparison, overall and by library-size tercile, and the posterior
    corr(x_g, eta) under NUTS and the method by tercile.

    The counts fix x_g - eta, so the common shift along (1, ..., 1, 1) dominates the posterior of
    well-sequenced cells; a family without that correlation must shrink both SDs."""
    res: dict = {"x": summarise(cmp["x"])}
    if "eta" in cmp:
        res["eta"] = summarise(cmp["eta"])
    for q in ("x", "eta"):  # share of quantities with SD ratio in the 0.9-1.1 band (issue 16's goal)
        if q in cmp:
            r = np.asarray(cmp[q].sd_ratio)
            res[q]["sd_ratio_share_0.9_1.1"] = float(np.mean((r >= 0.9) & (r <= 1.1)))
    shape = cmp["x"].sd_ratio.shape
    res["x_by_library_tercile"] = _by_tercile(lib, lambda sel: {
        m: summarise(cmp["x"], select=np.broadcast_to(sel[:, None], shape))[m]
        for m in ("std_mean_error", "sd_ratio", "cover90")})
    xm, em = method.sample(np.random.default_rng(seed + 2), min(n_draws, 1000), eta="free")
    c_n, c_m = corr_x_eta(nuts_x, nuts_eta), corr_x_eta(xm, em)
    res["corr_x_eta_by_library_tercile"] = _by_tercile(lib, lambda sel: {
        "nuts_median": float(np.median(c_n[sel])), "method_median": float(np.median(c_m[sel]))})
    return res


def _reweighted_vs_nuts(mean: np.ndarray, sd: np.ndarray, nuts: np.ndarray, *, quantiles: bool) -> dict:
    """Standardised mean error and SD ratio of PSIS-reweighted moments against NUTS draws."""
    sd_n = nuts.std(0, ddof=1)
    z, r = (mean - nuts.mean(0)) / sd_n, sd / sd_n
    out = {"median_abs_std_mean_error": float(np.median(np.abs(z))),
           "worst_abs_std_mean_error": float(np.max(np.abs(z))),
           "sd_ratio_min": float(r.min()), "sd_ratio_max": float(r.max())}
    if quantiles:
        out.update(sd_ratio_p05=float(np.quantile(r, 0.05)), sd_ratio_p95=float(np.quantile(r, 0.95)))
    return out


def _psis_metrics(name: str, method, cmp: dict[str, DrawComparison], nuts_x, nuts_eta, counts, params, la,
                  out: Path, *, n_draws: int, seed: int, lib: np.ndarray) -> tuple[dict, list[str]]:
    """PSIS k-hat of the joint (x, eta) approximation against the exact pln_cell density, and the
    PSIS-reweighted moments against NUTS. A method without ``logpdf`` gets the reason instead."""
    from .psis import cell_psis
    from .report import khat_figure

    try:
        ps = cell_psis(method, counts, params, la, n_draws=n_draws, seed=seed + 1,
                       sample_kwargs={"eta": "free"})
    except Exception as e:  # noqa: BLE001 - a method without logpdf still gets the draw metrics
        return {"psis": {"skipped": f"{type(e).__name__}: {e}"}}, []
    k = ps["result"].khat
    res = {"psis": ps["summary"],
           "psis_reweighted_x": _reweighted_vs_nuts(ps["mean_x"], ps["sd_x"], nuts_x, quantiles=True),
           "psis_reweighted_eta": _reweighted_vs_nuts(ps["mean_eta"], ps["sd_eta"], nuts_eta, quantiles=False),
           "eta_std_mean_error_mean": float(np.mean(cmp["eta"].std_mean_error)) if "eta" in cmp else None,
           "khat": k.tolist()}
    return res, [khat_figure(name, k, lib, out)]


def _method_block(name, method, nuts_x, nuts_eta, gate, counts, params, la, out: Path, *,
                  n_draws: int, seed: int, lib: np.ndarray, force: bool) -> tuple[dict, list[str]]:
    """Metrics and figures of one method against the gated NUTS draws of the same cells."""
    from .report import cell_method_figure

    cmp = compare_cells(method, (nuts_x, nuts_eta), gate=gate, n_draws=n_draws, seed=seed,
                        force=force, label=name, sample_kwargs={"eta": "free"})
    res = _draw_metrics(cmp, method, nuts_x, nuts_eta, n_draws=n_draws, seed=seed, lib=lib)
    figs = [cell_method_figure(name, cmp, out)]
    psis_res, psis_figs = _psis_metrics(name, method, cmp, nuts_x, nuts_eta, counts, params, la, out,
                                        n_draws=n_draws, seed=seed, lib=lib)
    res.update(psis_res)
    return res, figs + psis_figs


def _fit_method(name: str, u, la, idx, params, k: int, *, vae_steps: int, seed: int, progress: bool):
    """The per-cell posteriors of method ``name`` for the cells ``idx`` at the true globals, and
    facts about the fit. ImportError if the method's dependencies are missing."""
    if name == "laplace":
        from ..laplace import newton_map

        method = newton_map(u[idx], params, la[idx])
        return method, {"converged": int(np.sum(method.converged)), "on_bound": int(np.sum(method.on_bound))}
    if name in ("laplace_eta_marginal", "laplace_eta_marginal_skew"):
        # the same Gaussian Laplace posterior, with eta integrated by quadrature and x by
        # Laplace at each eta node (pln_ref.eta_marginal); "_skew": x | eta with the skew transform
        from ..eta_marginal import eta_marginal
        from ..laplace import newton_map

        method = eta_marginal(u[idx], newton_map(u[idx], params, la[idx]), la[idx],
                              skew=name == "laplace_eta_marginal_skew")
        return method, {"converged": int(np.sum(method.converged)),
                        "node_newton_iterations_mean": float(np.mean(method.node_iter)),
                        "cells_widened": int(np.sum(method.n_widen > 0))}
    if name in VAE_METHODS:
        from ..vae import fit_vae

        opts = VAE_METHODS[name]
        family = opts["family"]
        # encoder-only fit at the TRUE globals, so the VAE is compared on the same
        # conditional posterior p(x, eta | u, theta) as Laplace and NUTS; "vae" is the structured
        # family q(eta) q(z, e | eta), "vae_diag" the same with a diagonal q(z) and e independent
        # of z, "vae_meanfield" the mean-field family without refinement (the VAE before issue 16)
        vres = fit_vae(u, k, capture=params.capture, log_anchor=la, init=params,
                       train_decoder=False, n_steps=vae_steps, seed=seed, progress=progress,
                       refine_steps=0 if family == "meanfield" else None, **opts)
        return vres.encode(u[idx], la[idx]), {"n_steps": vae_steps, "train_decoder": False,
                                              "family": family, "z_cov": vres.config.z_cov,
                                              "refine_steps": vres.config.refine_steps}
    raise ValueError(f"unknown method {name!r}")


def _cell_truth(out: Path, u, params, la, *, design: dict, chains: int, warmup: int, draws: int, seed: int,
                engine: str | None, progress: bool) -> dict:
    """Per-cell NUTS ground truth, from out/nuts_cells_cache.npz when it holds this design."""
    cache = out / "nuts_cells_cache.npz"
    key = nuts_cache_key(u, **design)
    nuts = load_nuts_cache(cache, key)
    if nuts is None:
        nuts = fit_cells_nuts(u, params, la, chains=chains, warmup=warmup, draws=draws, seed=seed,
                              engine=engine, progress=progress)
        save_nuts_cache(cache, key, nuts)
    return nuts


def run_cell_comparison(out_dir, *, G: int = 20, k: int = 3, n_cells: int = 200, lib_range=(100.0, 5000.0),
                        seed: int = 0, chains: int = 4, warmup: int = 1000, draws: int = 1000,
                        n_method_draws: int = 4000, methods=("laplace", "vae"), engine: str | None = None,
                        vae_steps: int = 3000, force: bool = False, progress: bool = True) -> dict:
    """Laplace (and VAE) vs gated per-cell NUTS on simulated pln_cell data; writes figures and
    ``cell_comparison.json`` into out_dir and returns the metrics. "laplace" brings the
    eta-marginal Laplace family ("laplace_eta_marginal", ``pln_ref.eta_marginal``) along, so the
    report shows the old and the new Laplace posterior side by side."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    params, sim = simulate_cells(G, k, n_cells, lib_range=lib_range, seed=seed)
    u, la = np.asarray(sim.counts), np.asarray(sim.log_anchor)
    lib = np.exp(la)
    # the cache key records the engine actually used (None resolves to the default) and its version
    design = {"G": G, "k": k, "n": n_cells, "lib": list(lib_range), "seed": seed, "chains": chains,
              "warmup": warmup, "draws": draws, **_engine_record(engine)}
    nuts = _cell_truth(out, u, params, la, design=design, chains=chains, warmup=warmup, draws=draws,
                       seed=seed, engine=engine, progress=progress)
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
                            "per_cell_fits": True, **_engine_record(engine)}},
        "nuts": {"cells_passed": int(ok.sum()), "cells_failed": failed, "from_cache": bool(nuts.get("cached", False)),
                 "refits": int(np.sum(nuts["attempts"] > 1)), "seconds": nuts["seconds"],
                 "gate_of_compared": gate_ok.summary() if gate_ok else None},
        "methods": {}, "figures": [],
    }
    if not idx.size and not force:
        metrics["error"] = "no cell passed the NUTS gate: nothing compared"
        atomic_write_json(out / "cell_comparison.json", metrics)
        return metrics
    nx, ne = nuts["x"][:, idx], nuts["eta"][:, idx]
    methods = list(methods)
    if "laplace" in methods and "laplace_eta_marginal" not in methods:  # old and new side by side
        methods.insert(methods.index("laplace") + 1, "laplace_eta_marginal")
    for name in methods:
        t0 = time.perf_counter()
        try:
            method, extra = _fit_method(name, u, la, idx, params, k, vae_steps=vae_steps, seed=seed,
                                        progress=progress)
        except ImportError as e:
            metrics["methods"][name] = {"skipped": f"{e}"}
            continue
        fit_s = time.perf_counter() - t0
        res, figs = _method_block(name, method, nx, ne, gate_ok, u[idx], params, la[idx], out,
                                  n_draws=n_method_draws, seed=seed, lib=lib[idx], force=force)
        res.update(extra, fit_seconds=fit_s, seconds=time.perf_counter() - t0)
        metrics["methods"][name] = res
        metrics["figures"] += figs
    metrics["seconds"] = time.perf_counter() - t_all
    atomic_write_json(out / "cell_comparison.json", metrics)
    return metrics


def run_real_cell_comparison(out_dir, counts, *, k: int = 3, n_cells: int = 60, seed: int = 0, chains: int = 4,
                             warmup: int = 1000, draws: int = 1000, n_method_draws: int = 4000,
                             methods=("laplace", "laplace_eta_marginal"), engine: str | None = None,
                             force: bool = False, progress: bool = True, label: str = "real") -> dict:
    """The cell comparison on real counts (issue 16's second design): globals from the default
    Laplace fit (``pln_ref.fit``, capture "auto", anchor = realised library size) to all cells of
    ``counts`` (N x G), then the first ``n_cells`` cells against gated per-cell NUTS at those
    globals. Writes ``{label}_cell_comparison.json`` into out_dir and returns the metrics, in the
    layout of :func:`run_cell_comparison` (``report._cell_section`` renders it)."""
    from ..api import fit

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    u_all = np.asarray(counts, dtype=float)
    res_fit = fit(u_all, k=k, progress=False)
    params = res_fit.params
    u = u_all[:n_cells]
    la = np.log(u.sum(axis=1))
    lib = np.exp(la)
    design = {"real": label, "G": u.shape[1], "k": k, "n": n_cells, "seed": seed, "chains": chains,
              "warmup": warmup, "draws": draws, "engine": engine, "mu_sum": float(params.mu.sum())}
    nuts = _cell_truth(out, u, params, la, design=design, chains=chains, warmup=warmup, draws=draws,
                       seed=seed, engine=engine, progress=progress)
    ok = nuts["passed"]
    idx = np.flatnonzero(ok)
    gate_ok = combine_gates([nuts["gates"][c] for c in idx]) if idx.size else None
    metrics: dict = {
        "design": {"G": u.shape[1], "k": k, "n_cells": n_cells, "library_range": [float(lib.min()), float(lib.max())],
                   "seed": seed, "M0": params.capture.M0, "sigma_M": params.capture.sigma_M, "real": label,
                   "fit_cells": int(u_all.shape[0]),
                   "total_count_quantiles": np.quantile(u.sum(1), [0, 0.5, 1]).tolist(),
                   "zero_fraction": float(np.mean(u == 0)),
                   "nuts": {"chains": chains, "warmup": warmup, "draws": draws, "dense_metric": True,
                            "per_cell_fits": True}},
        "nuts": {"cells_passed": int(ok.sum()),
                 "cells_failed": [{"cell": int(c), "reasons": nuts["gates"][c].reasons} for c in np.flatnonzero(~ok)],
                 "from_cache": bool(nuts.get("cached", False)), "refits": int(np.sum(nuts["attempts"] > 1)),
                 "seconds": nuts["seconds"], "gate_of_compared": gate_ok.summary() if gate_ok else None},
        "methods": {}, "figures": [],
    }
    nx, ne = nuts["x"][:, idx], nuts["eta"][:, idx]
    for name in methods:
        t0 = time.perf_counter()
        method, extra = _fit_method(name, u, la, idx, params, k, vae_steps=0, seed=seed, progress=progress)
        fit_s = time.perf_counter() - t0
        res, figs = _method_block(f"{label}_{name}", method, nx, ne, gate_ok, u[idx], params, la[idx], out,
                                  n_draws=n_method_draws, seed=seed, lib=lib[idx], force=force)
        res.update(extra, fit_seconds=fit_s, seconds=time.perf_counter() - t0)
        metrics["methods"][name] = res
        metrics["figures"] += figs
    metrics["seconds"] = time.perf_counter() - t_all
    atomic_write_json(out / f"{label}_cell_comparison.json", metrics)
    return metrics


# --------------------------------------------------------------------------- joint

def _laplace_sigma_coverage(u, la, params, k: int, Sig_draws: np.ndarray, gate_passed: bool, *,
                            laplace_steps: int) -> tuple[dict, np.ndarray]:
    """Laplace fit of the globals (method of moments, then L-BFGS) and whether each entry of its
    Sigma (upper triangle) lies in the NUTS 90% interval; labelled FORCED if the gate failed.
    Returns the metrics and the Laplace Sigma (G, G)."""
    from ..fit_laplace import optimize_globals
    from ..moments import method_of_moments
    from .compare import interval_coverage_of_point

    t0 = time.perf_counter()
    init = method_of_moments(u, k, capture=params.capture, log_anchor=la)
    _, lp = optimize_globals(u, init, la, n_steps=laplace_steps, optimizer="lbfgs", progress=False)
    S_lap = lp.sigma_dense()
    iu = np.triu_indices(S_lap.shape[0])
    cov = interval_coverage_of_point(Sig_draws, S_lap[iu], 0.9)
    if gate_passed:
        res = {"laplace_sigma_coverage90": float(np.mean(cov)),
               "laplace_sigma_entries_covered": f"{int(cov.sum())}/{cov.size}"}
    else:
        res = {"laplace_sigma_coverage90_FORCED_gate_failed": float(np.mean(cov))}
    res["true_sigma_coverage90"] = float(np.mean(interval_coverage_of_point(
        Sig_draws, params.sigma_dense()[iu], 0.9)))
    res["laplace_seconds"] = time.perf_counter() - t0
    return res, S_lap


def run_joint(out_dir, *, N: int = 100, G: int = 10, k: int = 2, seed: int = 0, chains: int = 4,
              warmup: int = 1000, draws: int = 1000, engine: str | None = None, dense_metric: bool = False,
              adapt_delta: float = 0.9, mean_log_rate: float = 1.5, lib_range=(100.0, 5000.0),
              laplace_steps: int = 500, progress: bool = True, name: str = "joint") -> dict:
    """Gated NUTS of ``pln_joint`` on simulated N x G data, and whether each Laplace-fitted Sigma
    entry lies in the NUTS 90% interval. Gate variables: identified quantities only
    (mu, d, Sigma, x, eta), never the rotation-dependent W. Writes ``{name}.json`` and
    ``{name}_sigma.png`` in out_dir."""
    from .engines import sample_nuts
    from .report import joint_sigma_figure
    from .standata import pln_joint_data

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
                                "mean_count": float(u.mean()), "zero_fraction": float(np.mean(u == 0)),
                                **_engine_record(engine)},
                     "gate": gate.summary(), "gate_table": gate.table, "nuts_seconds": nuts_s}
    iu = np.triu_indices(G)
    Sig = idata.posterior["Sigma"].values.reshape(-1, G, G)[:, iu[0], iu[1]]
    try:
        res, S_lap = _laplace_sigma_coverage(u, la, params, k, Sig, gate.passed, laplace_steps=laplace_steps)
        metrics.update(res)
        metrics["figures"] = [joint_sigma_figure(Sig, S_lap[iu], gate.passed, out / f"{name}_sigma.png")]
    except ImportError as e:
        metrics["laplace"] = {"skipped": str(e)}
    metrics["seconds"] = time.perf_counter() - t_all
    atomic_write_json(out / f"{name}.json", metrics)
    return metrics


# --------------------------------------------------------------------------- moments

def _zscore_summary(z: dict) -> dict:
    """Worst |z| overall (with its label) and per kind of moment."""
    return {"max_abs_z": float(z["max_abs_z"]), "worst": z["worst"],
            "max_abs_z_mean": float(np.max(np.abs(z["z_mean"]))),
            "max_abs_z_var": float(np.max(np.abs(z["z_var"]))),
            "max_abs_z_cov": float(np.max(np.abs(z["z_cov"])))}


def _fitted_model_moments(G: int, k: int, *, seed: int, mean_log_rate: float, fit_cells: int,
                          fit_steps: int) -> dict:
    """Data moments vs the closed-form moments of a Laplace-FITTED model (plug-in posterior
    predictive). In-sample: the globals were fitted to these counts, so |z| is not N(0,1)-
    calibrated (smaller for moments the fit matches directly); a large |z| flags misfit."""
    from ..fit_laplace import optimize_globals
    from ..moments import method_of_moments, moment_zscores
    from ..simulation import random_params, simulate

    t1 = time.perf_counter()
    params = random_params(G, k, seed=seed, mean_log_rate=mean_log_rate, capture=True)
    sim = simulate(params, fit_cells, seed=np.random.SeedSequence(seed, spawn_key=(4,)))
    la = np.asarray(sim.log_anchor)
    init = method_of_moments(sim.counts, k, capture=params.capture, log_anchor=la)
    _, fitted = optimize_globals(sim.counts, init, la, n_steps=fit_steps, optimizer="lbfgs", progress=False)
    z = moment_zscores(sim.counts, fitted, la)
    return {"n_cells": fit_cells, **_zscore_summary(z), "seconds": time.perf_counter() - t1}


def run_moments(out_dir, *, G: int = 10, k: int = 2, n_cells: int = 200_000, seed: int = 0,
                mean_log_rate: float = 2.0, fit_cells: int = 2000, fit_steps: int = 300) -> dict:
    """Closed-form mean, variance and covariance vs a Monte Carlo of the simulator (z-scores by
    Monte Carlo standard error for every gene and pair), with and without capture."""
    from ..moments import moment_zscores
    from ..simulation import random_params, simulate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = {}
    t0 = time.perf_counter()
    for label, cap in (("no_capture", False), ("capture", True)):
        # simulator's default exogenous anchor with capture: L_c = M0 kappa_c, kappa_c log-uniform
        # on [0.05, 0.5] (capture efficiencies 5-50%, so eta is away from its bound)
        params = random_params(G, k, seed=seed, mean_log_rate=mean_log_rate, capture=cap)
        sim = simulate(params, n_cells, seed=np.random.SeedSequence(seed, spawn_key=(3, int(cap))))
        z = moment_zscores(sim.counts, params, np.asarray(sim.log_anchor) if cap else None)
        s = _zscore_summary(z)
        res[label] = {"max_abs_z": s["max_abs_z"], "worst": s["worst"],
                      "n_tests": int(z["z_mean"].size + z["z_var"].size + z["z_cov"].size),
                      **{m: s[m] for m in ("max_abs_z_mean", "max_abs_z_var", "max_abs_z_cov")},
                      "mean_count": float(np.mean(sim.counts)),
                      "eta_range": [float(np.min(sim.eta)), float(np.max(sim.eta))]}
    res["design"] = {"G": G, "k": k, "n_cells": n_cells, "seed": seed, "mean_log_rate": mean_log_rate}
    if fit_cells:
        res["fitted_model"] = _fitted_model_moments(G, k, seed=seed, mean_log_rate=mean_log_rate,
                                                    fit_cells=fit_cells, fit_steps=fit_steps)
    res["worst_abs_z"] = max(res["no_capture"]["max_abs_z"], res["capture"]["max_abs_z"])
    res["seconds"] = time.perf_counter() - t0
    atomic_write_json(out / "moments.json", res)
    return res


# --------------------------------------------------------------------------- engine agreement

def _engine_pair(engines) -> tuple[tuple[str, str] | None, str | None]:
    """The two engines to compare (canonical names) or None and the reason they cannot be run.
    engines=None: stanli against the first real Stan found (CmdStan through cmdstanpy, then PyStan)."""
    from .engines import available_engines, real_stan_engine, resolve_engine

    if engines is None:
        real = real_stan_engine()
        if real is None:
            return None, ("no real Stan engine found (CmdStan for cmdstanpy: set $CMDSTAN; or "
                          "`pip install pystan`): nothing to compare stanli with")
        return ("stanli", real), None
    engines = tuple(engines)
    if len(engines) != 2:
        raise ValueError(f"engines must name two engines, got {engines!r}")
    pair = tuple(resolve_engine(e) for e in engines)
    if pair[0] == pair[1]:
        raise ValueError(f"engines must be two different engines, got {engines!r}")
    missing = [e for e in pair if e not in available_engines()]
    if missing:
        how = {"cmdstanpy": "CmdStan not found (set $CMDSTAN to a built CmdStan)",
               "pystan": "pystan not installed (install the 'pystan' extra)"}
        return None, "; ".join(how[e] for e in missing)
    return pair, None


def _engine_record(engine: str | None) -> dict:
    """The engine a run actually used (None resolved to the default) and its version."""
    from .engines import engine_version, resolve_engine

    name = resolve_engine(engine)
    return {"engine": name, "engine_version": engine_version(name)}


def run_engine_agreement(out_dir, *, engines=None, n_cells: int = 5, G: int = 10, k: int = 2, seed: int = 0,
                         chains: int = 4, warmup: int = 1000, draws: int = 2500) -> dict:
    """Two NUTS engines on one pln_cell data set (default: stanli against the first real Stan
    found, see :func:`pln_ref.validation.engines.real_stan_engine`):
    z = (mean_a - mean_b) / sqrt(mcse_a^2 + mcse_b^2) per quantity (x and eta of every cell);
    goal worst |z| <= 4. Skipped (with the reason) if an engine is not available."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pair, reason = _engine_pair(engines)
    if pair is None:
        res = {"skipped": reason, "engines": list(engines) if engines is not None else None}
        atomic_write_json(out / "engine_agreement.json", res)
        return res
    import arviz as az

    from .engines import engine_version, sample_nuts
    from .standata import pln_cell_data

    params, sim = simulate_cells(G, k, n_cells, seed=seed)
    data = pln_cell_data(sim.counts, params, sim.log_anchor)
    fits, secs = {}, {}
    for eng in pair:
        t0 = time.perf_counter()
        fits[eng] = sample_nuts("pln_cell", data, engine=eng, chains=chains, warmup=warmup, draws=draws,
                                seed=seed + 1)
        secs[eng] = time.perf_counter() - t0
    zs = []
    for v in ("x", "eta"):
        m = [fits[e].posterior[v].mean(("chain", "draw")).values for e in pair]
        se = [az.mcse(fits[e].posterior[[v]], method="mean")[v].values for e in pair]
        zs.append(((m[0] - m[1]) / np.sqrt(se[0] ** 2 + se[1] ** 2)).reshape(-1))
    z = np.concatenate(zs)
    res = {"engines": list(pair), "engine_versions": {e: engine_version(e) for e in pair},
           "worst_abs_z": float(np.max(np.abs(z))), "n_quantities": int(z.size),
           "gates": {e: check_gate(f).summary() for e, f in fits.items()}, "seconds": secs,
           "sampling_seconds": {e: float(f.posterior.attrs["sampling_time"]) for e, f in fits.items()},
           "design": {"n_cells": n_cells, "G": G, "k": k, "chains": chains, "warmup": warmup, "draws": draws}}
    atomic_write_json(out / "engine_agreement.json", res)
    return res
