"""Fit speed (issue 12): pln-ref ``fit`` with defaults vs pyPLNmodels PlnPCA, back to back in one
process, on real and simulated counts, with the evidence gap to a tight reference fit.

Usage (one BLAS thread; run one case at a time on the shared machine)::

    python validation/benchmarks/bench_speed.py --cases real200
    python validation/benchmarks/bench_speed.py --cases real1000,sim1000
    python validation/benchmarks/bench_speed.py --cases real200 --profile   # cProfile of 10 steps

Cases
-----
real1000  real scRNA counts (pyPLNmodels ``load_scrna``, scMARK), 2000 cells x the 1000 genes with
          the largest mean count among the 3000 it ships, k = rank = 10;
real200   the same cells, the 200 most expressed genes, k = rank = 5;
sim1000   the repository's simulated benchmark (``random_params(1000, 10, seed=0, capture=True,
          mean_log_rate=1.75, sigma_M=0.5)``, ``simulate(p, 2000, seed=1)``), k = 10; pln-ref gets
          the true capture settings, both methods only the realised library sizes;
sim200    the same generator with 200 genes and k = 5 (small enough for ``outer_hessian.py``).

Per case: ``pln_ref.fit(u, k=k)`` with its defaults (capture "auto" on the real counts), process CPU
time (``time.process_time``), outer steps, CPU per outer step (whole fit, and the outer optimisation
alone: ``diagnostics["optimizer_cpu_s"]`` / steps), the stop rule and message, Newton
iterations; then PlnPCA(rank=k) with offsets = log library size, ``fit(maxiter=5000, tol=1e-6)``
(its own tolerance), CPU time and iterations; the CPU ratio. The **reference** of each data set is
the pln-ref fit continued by L-BFGS to a tight tolerance (gap_tol 1e-7 nats/cell, Newton gtol 1e-8),
cached in ``results/reference_<case>.npz`` (rerun with ``--refresh-reference``); the **gap** is
reference evidence - fit evidence in nats/cell, both evaluated at Newton gtol 1e-9. "patience share":
the share of outer steps taken after the objective first came within 1e-3 nats/cell of the
reference (0 means the rule stopped the first step it could). Simulated case: RMSE of the
off-diagonal gene-gene correlations vs the truth (pln-ref and PlnPCA). Load average printed before
and after each measurement. Results: ``results/bench_speed.json`` (rewritten atomically after
every case).
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import pln_ref  # noqa: E402
from pln_ref.fit_laplace import optimize_globals  # noqa: E402
from pln_ref.io import atomic_savez, atomic_write_json  # noqa: E402
from pln_ref.outer.evaluate import Evaluator  # noqa: E402
from pln_ref.params import PLNParams  # noqa: E402

RESULTS = ROOT / "validation" / "benchmarks" / "results"
CASES = {"real1000": ("real", 1000, 10), "real200": ("real", 200, 5), "sim1000": ("sim", 1000, 10),
         "sim200": ("sim", 200, 5)}


def load() -> list:
    return [round(x, 2) for x in os.getloadavg()]


def _pyplnmodels():
    """pyPLNmodels 1.0.10 imports ``pkg_resources`` for its bundled data, which setuptools >= 81
    no longer ships: a minimal shim resolving a module's data files (the environment is untouched)."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")

        def resource_stream(pkg, name):
            mod = importlib.import_module(pkg)
            return open(os.path.join(os.path.dirname(mod.__file__), name), "rb")

        shim.resource_stream = resource_stream
        sys.modules["pkg_resources"] = shim
    import pyPLNmodels
    import torch

    torch.set_num_threads(1)
    return pyPLNmodels


def case_data(name):
    kind, G, k = CASES[name]
    if kind == "real":
        pp = _pyplnmodels()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            u = pp.load_scrna(n_samples=2000, dim=3000)["endog"].to_numpy().astype(float)
        order = np.argsort(-u.mean(axis=0), kind="stable")[:G]
        return u[:, np.sort(order)], k, None
    p = pln_ref.random_params(G, k, seed=0, capture=True, mean_log_rate=1.75, sigma_M=0.5)
    sim = pln_ref.simulate(p, 2000, seed=1)
    return np.asarray(sim.counts, dtype=float), k, p


def corr_rmse(S_est, S_true) -> float:
    def corr(S):
        sd = np.sqrt(np.diag(S))
        return S / np.outer(sd, sd)
    iu = np.triu_indices(S_true.shape[0], 1)
    return float(np.sqrt(np.mean((corr(S_est)[iu] - corr(S_true)[iu]) ** 2)))


def evidence(u, la, params, tol=1e-9) -> float:
    ev = Evaluator(u, la, params.capture)
    return ev(params.mu, params.W, params.d, gtol=tol, with_grad=False).value


def float_list(text: str, option: str) -> list[float]:
    """The numbers of a comma-separated command-line value; SystemExit naming ``option`` when one
    of them is not a finite number or there is none."""
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{option} must be comma-separated numbers, got {text!r}") from None
    if not vals or not all(np.isfinite(vals)):
        raise SystemExit(f"{option} must be comma-separated finite numbers, got {text!r}")
    return vals


def short_commit() -> str:
    """The repository's HEAD as a short hash, for the provenance of a results file ("" outside git
    or without a git executable)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


def cached_reference_path(name: str) -> Path:
    """results/reference_<name>.npz of a case, for the diagnostics that start from it
    (``outer_hessian.py``, ``outer_probe.py``); SystemExit naming the problem when the case is
    unknown or its reference has not been computed."""
    if name not in CASES:
        raise SystemExit(f"unknown case {name!r}: expected one of {', '.join(CASES)}")
    path = RESULTS / f"reference_{name}.npz"
    if not path.exists():
        raise SystemExit(f"no cached reference {path.name}: run bench_speed.py --cases {name} first")
    return path


def reference(name, u, la, fitted: PLNParams, refresh: bool) -> dict:
    """Tight L-BFGS continuation of the fit (cached): value and globals."""
    path = RESULTS / f"reference_{name}.npz"
    if path.exists() and not refresh:
        z = np.load(path)
        return {"value": float(z["value"]), "cpu_s": float(z["cpu_s"]), "steps": int(z["steps"]),
                "cached": True, "stopped": str(z["stopped"]),
                "params": PLNParams(z["mu"], z["W"], z["d"], fitted.capture)}
    c0 = time.process_time()
    st, q = optimize_globals(u, fitted, la, n_steps=5000, gtol=1e-8, gap_tol=1e-7, progress=False)
    cpu = time.process_time() - c0
    value = evidence(u, la, q)
    atomic_savez(path, {"value": np.array(value), "cpu_s": np.array(cpu), "steps": np.array(st.step),
                        "stopped": np.array(st.stopped), "mu": q.mu, "W": q.W, "d": q.d})
    return {"value": value, "cpu_s": cpu, "steps": st.step, "cached": False, "stopped": st.stopped,
            "params": q}


def run_case(name, args, out):
    import anndata  # noqa: F401  (imported by pln_ref.fit on first use: an import, not fit cost)

    u, k, truth = case_data(name)
    N, G = u.shape
    res = {"N": N, "G": G, "k": k, "mean_count": float(u.mean()), "frac_zero": float(np.mean(u == 0))}
    kw = {} if truth is None else {"M0": truth.capture.M0, "sigma_M": truth.capture.sigma_M}
    res["load_before_plnref"] = load()
    c0, w0 = time.process_time(), time.perf_counter()
    with warnings.catch_warnings(record=True) as wl:
        warnings.simplefilter("always")
        fit = pln_ref.fit(u, k=k, progress=False, **kw)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    dg = fit.diagnostics
    la = pln_ref.resolve_log_anchor(u) if fit.params.capture is not None else None
    steps = max(int(dg["steps"]), 1)
    res["plnref"] = {"cpu_s": cpu, "wall_s": wall, "steps": dg["steps"], "cpu_per_step_s": cpu / steps,
                     "optimizer_cpu_per_step_s": dg["optimizer_cpu_s"] / steps,
                     "stop_rule": dg.get("stop_rule"), "stopped": dg["stopped"],
                     "gap_estimate": dg.get("gap_estimate"), "objective": dg["objective"],
                     "cells_converged": dg["cells_converged"], "warnings": [str(w.message) for w in wl],
                     "start": dg.get("start"), "load_after": load()}
    print(f"[{name}] pln-ref: {cpu:.1f} s CPU, {dg['steps']} steps, {cpu / steps:.3f} s/step, "
          f"{dg['stopped']}", flush=True)
    out["cases"][name] = res
    atomic_write_json(RESULTS / args.out, out)

    pp = _pyplnmodels()
    lib = u.sum(axis=1)
    off = np.repeat(np.log(lib)[:, None], G, axis=1)
    res["load_before_plnpca"] = load()
    c0, w0 = time.process_time(), time.perf_counter()
    model = pp.PlnPCA(u, offsets=off, rank=k)
    model.fit(maxiter=5000, tol=1e-6)
    pcpu, pwall = time.process_time() - c0, time.perf_counter() - w0
    mon = model._elbo_criterion_monitor
    res["plnpca"] = {"cpu_s": pcpu, "wall_s": pwall, "iterations": len(mon.elbo_list),
                     "criterion_final": float(mon.criterion), "load_after": load()}
    res["cpu_ratio_plnref_over_plnpca"] = cpu / pcpu
    print(f"[{name}] PlnPCA: {pcpu:.1f} s CPU, {len(mon.elbo_list)} iterations; ratio {cpu / pcpu:.2f}",
          flush=True)
    if truth is not None:
        S_true = truth.sigma_dense()
        res["corr_rmse_plnref"] = corr_rmse(fit.params.sigma_dense(), S_true)
        res["corr_rmse_plnpca"] = corr_rmse(model.covariance.numpy().astype(float), S_true)
    atomic_write_json(RESULTS / args.out, out)

    ref = reference(name, u, la, fit.params, args.refresh_reference)
    v_fit = evidence(u, la, fit.params)
    hist = np.asarray(fit.history["objective"], dtype=float)
    within = np.flatnonzero(hist >= ref["value"] - 1e-3)
    first = int(within[0]) + 1 if within.size else None
    res["reference"] = {k2: v for k2, v in ref.items() if k2 != "params"}
    res["evidence_fit"] = v_fit
    res["gap_nats_per_cell"] = ref["value"] - v_fit
    res["steps_to_within_1e-3"] = first
    res["patience_share"] = None if first is None else (len(hist) - first) / max(len(hist), 1)
    if truth is not None:
        res["corr_rmse_reference"] = corr_rmse(ref["params"].sigma_dense(), truth.sigma_dense())
    print(f"[{name}] reference {ref['value']:.6f} ({'cached' if ref['cached'] else 'computed'}), "
          f"fit {v_fit:.6f}, gap {ref['value'] - v_fit:.2e} nats/cell, patience share "
          f"{res['patience_share']}", flush=True)
    atomic_write_json(RESULTS / args.out, out)


def profile_case(name, n_steps=10):
    import cProfile
    import pstats

    u, k, truth = case_data(name)
    kw = {} if truth is None else {"M0": truth.capture.M0, "sigma_M": truth.capture.sigma_M}
    pr = cProfile.Profile()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c0 = time.process_time()
        pr.enable()
        r = pln_ref.fit(u, k=k, progress=False, n_steps=n_steps, **kw)
        pr.disable()
    cpu = time.process_time() - c0
    print(f"[{name}] {r.diagnostics['steps']} steps, {cpu:.1f} s CPU")
    pstats.Stats(pr).sort_stats("cumulative").print_stats(30)
    pstats.Stats(pr).sort_stats("tottime").print_stats(20)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="real200")
    ap.add_argument("--out", default="bench_speed.json")
    ap.add_argument("--refresh-reference", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    names = [c for c in args.cases.split(",") if c]
    for c in names:
        if c not in CASES:
            raise SystemExit(f"unknown case {c!r}; choose from {', '.join(CASES)}")
    if args.profile:
        for c in names:
            profile_case(c)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / args.out
    out = json.loads(path.read_text()) if path.exists() else {"cases": {}}
    out["meta"] = {"command": " ".join(["python"] + sys.argv), "commit": short_commit(), "threads": 1,
                   "loadavg_start": load(), "cpu_count": os.cpu_count()}
    for c in names:
        run_case(c, args, out)
    out["meta"]["loadavg_end"] = load()
    atomic_write_json(path, out)


if __name__ == "__main__":
    main()
