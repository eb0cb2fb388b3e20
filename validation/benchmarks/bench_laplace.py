"""Benchmark of the Laplace path (issue 3, section "Benchmark"): pln-ref vs pyPLNmodels PlnPCA,
Newton-sweep scaling, peak memory, Sigma recovery.

Usage (2 shared cores: keep one BLAS thread; the thread count is fixed before numpy is imported)::

    python validation/benchmarks/bench_laplace.py --quick                  # smoke run, a few min
    python validation/benchmarks/bench_laplace.py --threads 1              # full run
    python validation/benchmarks/bench_laplace.py --sections scaling,memory --threads 1

Outputs (``--out``, default ``validation/out/bench_laplace[_quick]/``): ``results.json`` and
``results.md``, both rewritten atomically after every finished measurement, so a crash loses
nothing already measured.

Sections
--------
compare   Simulated N=2000, G=1000, k=10 with capture (``random_params(..., capture=True,
          mean_log_rate=1.75)``: mean count ~1.9, ~42% zeros). pln-ref ``fit`` (Laplace, to its own
          stopping rule) with ``optimizer="adam"`` (lr 0.05) and ``"lbfgs"``, vs pyPLNmodels
          ``PlnPCA(rank=10)`` with offsets = log(realised library size), in the same process.
          Per method: wall and CPU time, and the error of the gene-gene correlation matrix vs the
          true one: RMSE and max |.| over the G(G-1)/2 off-diagonal pairs (dense G x G, benchmark
          only). Also the method-of-moments start, the off-diagonal *covariance* error, and whether
          every cell converged (cells_converged == N and max_grad_norm < gtol).
          pln-ref gets the true capture settings (M0, sigma_M = 0.5) and, like PlnPCA, only the
          realised library size (the capture prior's default anchor), not the simulator's anchor.
          PlnPCA's Sigma = C C^T (``model.covariance``, rank 10, no diagonal) is the covariance of
          Z = log-rate - log(library size): the per-cell shift -eta_c - log L_c is (nearly) common
          to all genes, so off-diagonal covariances are comparable to Sigma_gh up to that shift, and
          correlations are comparable as correlations of the latent log-rates; PlnPCA's
          correlations come from a pure rank-10 matrix (no diagonal d), which inflates them.
scaling   One Newton sweep (definition below) for G in {500,1000,2000,4000} at N=2000 and N in
          {1000,2000,4000,8000} at G=1000 (k=10), at the true parameters; ratios time(2G)/time(G),
          time(2N)/time(N) (target <= 2.2). Also the cold-start newton_map to convergence.
memory    Peak memory of one sweep (``newton_map(max_iter=1)`` from the cold start) at G=20000,
          N=1000, k=10, in a fresh subprocess with the data already loaded: tracemalloc peak (numpy
          buffers are traced) minus the traced memory before the call, and the peak RSS (VmHWM,
          reset through /proc/self/clear_refs just before the call) minus the RSS before it.
sigma     Sigma recovery at N=2000, G=200, k=5: correlation error (RMSE, max) of the Laplace fits and
          of the method-of-moments start.
profile   cProfile of ``pln_ref.fit`` (adam) for a few outer steps on the ``compare`` data.

Variants (``--variants``, compare / sigma / profile; default ``asis``): ``asis`` runs pln_ref
exactly as in the repository; ``lsfix`` injects (``newton_map(line_search=...)``, inside this
process only) an Armijo line search that evaluates f(x + t p) - f(x) in difference form (no
cancellation between O(|f|) terms, no Sigma^{-1} product per trial step); pln_ref/ files are not edited. It was written against
the round-off stall of laplace.py before commit 87e9858 (cells whose remaining gain was below the
round-off of f failed all 60 halvings and ran to max_iter=200); the repository has fixed that
since (full steps once the Newton decrement^2 <= 1e-8), so ``lsfix`` is now an A/B of the two line
searches. ``--asis-n-steps`` / ``--asis-lbfgs-steps`` cap the asis fits separately if needed.
Scaling and memory always measure the repository version.

Sweep definition: from a fixed warm start (the converged MAP perturbed by N(0, 0.05^2) in every x
and |N(0, 0.05^2)| in eta), T1 = time of ``newton_map(max_iter=1)`` and T0 = that of
``newton_map(max_iter=0)`` (both include the input checks and the final-state gradient +
factorisation + Schur solves that newton_map always does at the end). One sweep = T1 - T0 = one
Newton iteration over all cells: the Armijo line search of the step from the start, then gradient,
one factorisation of A for every cell and the joint (x, eta) step at the new point. T0 and T1 are
measured back to back ``--repeats`` times; the sweep is min(T1) - min(T0) (other users of the shared
cores only ever add time), in wall and in process CPU time. The median of the paired differences
T1_i - T0_i, min(T1) and min(T0) are also reported; min(T1) alone (one full newton_map call) is the
least noisy scaling measure.
"""

from __future__ import annotations

import sys

# ---- thread settings: must happen before numpy / torch are imported ------------------------
def _early_threads(argv) -> int:
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return 1


import os  # noqa: E402

_THREADS = _early_threads(sys.argv)
for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
           "VECLIB_MAXIMUM_THREADS"):
    os.environ[_v] = str(_THREADS)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import pln_ref  # noqa: E402
from pln_ref.io import atomic_write_json, atomic_write_text  # noqa: E402
from pln_ref.laplace import newton_map  # noqa: E402
from pln_ref.simulation import random_params, simulate  # noqa: E402


# ---- optional benchmark-only variant: the difference-form line search ------------------------
# (pln_ref/ is not edited: the variant is a line search injected through
# ``newton_map(line_search=...)``, swapped in only inside ``variant("lsfix")``.)
def difference_line_search(p):
    """Armijo backtracking in difference form: f(x + t dx) - f(x) computed without cancellation
    between O(|f|) terms and without a Sigma^{-1} product per trial step (the two quadratic terms
    dx^T Sigma^{-1}(x - mu) and dx^T Sigma^{-1} dx are computed once per Newton iteration)."""
    q1 = np.einsum("ng,ng->n", p.dx, p.u - p.lam - p.gx)  # dx^T Sigma^{-1}(x - mu)
    q2 = np.einsum("ng,ng->n", p.dx, p.cov.inv_mv(p.dx))  # dx^T Sigma^{-1} dx
    gdx = np.einsum("ng,ng->n", p.gx, p.dx)
    n = p.x.shape[0]
    t = np.ones(n)
    pending = np.ones(n, dtype=bool)
    x_new, e_new = p.x.copy(), p.eta.copy()
    f_new = np.full(n, np.nan)  # NaN: newton_map recomputes f where it needs it
    for _ in range(60):
        q = np.flatnonzero(pending)
        if q.size == 0:
            break
        tp = t[q]
        et = np.maximum(p.eta[q] + tp * p.deta[q], 0.0)
        de = et - p.eta[q]
        dz = tp[:, None] * p.dx[q] - de[:, None]  # change of x - eta
        with np.errstate(over="ignore", invalid="ignore"):
            df = (np.einsum("ng,ng->n", p.u[q], dz) - np.einsum("ng,ng->n", p.lam[q], np.expm1(dz))
                  - tp * q1[q] - 0.5 * tp**2 * q2[q])
        if p.m is not None:
            df = df - de * (2.0 * (p.eta[q] - p.m[q]) + de) / (2.0 * p.sigma_M**2)
        gain = tp * gdx[q] + p.ge[q] * de
        ok = np.isfinite(df) & (df >= p.armijo * gain)
        acc = q[ok]
        x_new[acc] = p.x[acc] + tp[ok, None] * p.dx[acc]
        e_new[acc] = et[ok]
        pending[acc] = False
        t[q[~ok]] *= 0.5
    return x_new, e_new, f_new


class variant:
    """Context manager: "asis" = pln_ref unchanged; "lsfix" = newton_map with
    ``line_search=difference_line_search`` (injected, every caller of newton_map sees it)."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        import functools

        import pln_ref.laplace as lap
        import pln_ref.outer.evaluate as ev

        self.saved = (lap.newton_map, ev.newton_map)
        if self.name == "lsfix":
            fn = functools.partial(self.saved[0], line_search=difference_line_search)
            lap.newton_map = ev.newton_map = fn
        elif self.name != "asis":
            raise ValueError(self.name)
        return self

    def __exit__(self, *a):
        import pln_ref.laplace as lap
        import pln_ref.outer.evaluate as ev

        lap.newton_map, ev.newton_map = self.saved


def _nm():
    """The newton_map currently in effect (respects ``variant``)."""
    import pln_ref.laplace as lap

    return lap.newton_map


MEAN_LOG_RATE = 1.75
SIGMA_M = 0.5


# ---- helpers --------------------------------------------------------------------------------
def load() -> dict:
    la = os.getloadavg()
    return {"loadavg_1_5_15": [round(x, 2) for x in la],
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}


def dump(out: dict, path: Path) -> None:
    """Atomic JSON + markdown rewrite."""
    atomic_write_json(path, out)
    atomic_write_text(path.with_suffix(".md"), markdown(out))


def corr_from_cov(S: np.ndarray) -> np.ndarray:
    sd = np.sqrt(np.diag(S))
    return S / np.outer(sd, sd)


def offdiag_errors(est: np.ndarray, truth: np.ndarray, prefix: str) -> dict:
    iu = np.triu_indices(truth.shape[0], 1)
    diff = est[iu] - truth[iu]
    return {f"{prefix}_rmse": float(np.sqrt(np.mean(diff**2))),
            f"{prefix}_max_abs": float(np.max(np.abs(diff))),
            f"{prefix}_mean_abs": float(np.mean(np.abs(diff)))}


def sigma_errors(S_est: np.ndarray, params) -> dict:
    """Correlation and off-diagonal covariance errors of a dense Sigma estimate vs the truth."""
    S_true = params.sigma_dense()
    return {**offdiag_errors(corr_from_cov(S_est), corr_from_cov(S_true), "corr"),
            **offdiag_errors(S_est, S_true, "cov")}


class Timer:
    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *a):
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def source_sha1() -> str:
    """sha1 of pln_ref/*.py as on disk now (the lead edits pln_ref while benchmarks run)."""
    import hashlib

    h = hashlib.sha1()
    for f in sorted((ROOT / "pln_ref").glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def git_state() -> dict:
    def run(*cmd):
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).stdout.rstrip("\n")
    dirty = run("git", "status", "--porcelain", "--", "pln_ref")
    diff = run("git", "diff", "HEAD", "--", "pln_ref")
    import hashlib
    return {"commit": run("git", "rev-parse", "HEAD"),
            "pln_ref_uncommitted_files": [l[3:] for l in dirty.splitlines()],
            "pln_ref_diff_sha1": hashlib.sha1(diff.encode()).hexdigest() if diff else None}


# ---- section 1: pln-ref vs PlnPCA ---------------------------------------------------------
def _import_pyplnmodels():
    """pyPLNmodels 1.0.10 imports ``pkg_resources`` (only for its bundled example data), which
    setuptools >= 81 no longer ships: provide a minimal shim instead of touching the environment."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")

        def resource_stream(pkg, name):
            import importlib.resources as ir
            return ir.files(pkg).joinpath(name).open("rb")

        shim.resource_stream = resource_stream
        sys.modules["pkg_resources"] = shim
    import pyPLNmodels
    import torch

    torch.set_num_threads(_THREADS)
    return pyPLNmodels, torch


def history_summary(fit) -> dict:
    """Steps until the objective first came within 1e-3 / 1e-4 nats per cell of its best value."""
    v = np.asarray(fit.history["objective"], dtype=float)
    if v.size == 0:
        return {}
    best = np.nanmax(v)
    first = lambda tol: int(np.argmax(v >= best - tol)) + 1  # noqa: E731  (1-based evaluation count)
    return {"objective_best": float(best), "objective_first": float(v[0]), "n_evals": int(len(v)),
            "steps_to_within_1e-3": first(1e-3), "steps_to_within_1e-4": first(1e-4)}


def _key(var, opt):
    return opt if var == "asis" else f"{opt}+{var}"


def _cap(args, var, opt):
    if var == "asis":
        return args.asis_n_steps if opt == "adam" else args.asis_lbfgs_steps
    return args.n_steps if opt == "adam" else args.lbfgs_steps


def _label(var, opt, args, n_steps):
    lab = f"pln-ref Laplace, optimizer={opt}" + (f", lr={args.lr}" if opt == "adam" else "")
    if opt == "adam" and args.batch_size:
        lab += f", batch_size={args.batch_size}"
    lab += f", step cap {n_steps}, gtol={args.gtol}"
    return lab + (", newton_map as in the repo" if var == "asis" else ", newton_map with the line-search patch")


def compare_data(cfg):
    p = random_params(cfg["G"], cfg["k"], seed=cfg["seed"], capture=True,
                      mean_log_rate=MEAN_LOG_RATE, sigma_M=SIGMA_M)
    sim = simulate(p, cfg["N"], seed=cfg["seed"] + 1)
    return p, sim


def _reached(dg: dict, cap: int) -> bool:
    """Did the outer optimiser stop by its own rule (not the step / iteration cap)?"""
    stopped = str(dg.get("stopped", ""))
    return not (stopped.startswith("n_steps") or "REACHED LIMIT" in stopped.upper() or dg.get("steps", 0) >= cap)


def compare_targets(res: dict) -> None:
    methods = res.get("methods", {})
    tg = {}
    pca = [k for k in methods if k.startswith("plnpca") and "iterations" in methods[k]]
    if pca:
        refk = max(pca, key=lambda k: methods[k]["iterations"])  # the longest (to-convergence) run
        ref = methods[refk]
        res["plnpca_reference_run"] = refk
        for key, m in methods.items():
            if key.startswith("plnpca") or key == "mom" or "error" in m:
                continue
            tg[key] = {"speedup_vs_plnpca": ref["wall_s"] / m["wall_s"],
                       "cpu_speedup_vs_plnpca": ref["cpu_s"] / m["cpu_s"],
                       "speedup_ge_3": ref["wall_s"] / m["wall_s"] >= 3,
                       "cpu_speedup_ge_3": ref["cpu_s"] / m["cpu_s"] >= 3,
                       "corr_rmse_no_worse": m["corr_rmse"] <= ref["corr_rmse"],
                       "corr_max_no_worse": m["corr_max_abs"] <= ref["corr_max_abs"],
                       "all_cells_converged": m["all_cells_converged"],
                       "reached_stopping_rule": m["reached_stopping_rule"]}
    res["targets"] = tg


def section_compare(args, cfg, out, path):
    res = out.setdefault("compare", {})
    res["config"] = {**cfg, "mean_log_rate": MEAN_LOG_RATE, "sigma_M": SIGMA_M}
    p, sim = compare_data(cfg)
    u = sim.counts
    N, G = u.shape
    lib = u.sum(axis=1).astype(float)
    res["data"] = {"mean_count": float(u.mean()), "frac_zero": float(np.mean(u == 0)),
                   "median_library": float(np.median(lib)), "M0_true": p.capture.M0,
                   "eta_true_mean": float(sim.eta.mean()), "frac_eta_true_zero": float(np.mean(sim.eta == 0)),
                   "capture_prob_true_median": float(np.median(np.exp(-sim.eta)))}
    res["load_start"] = load()
    dump(out, path)
    gtol = args.gtol
    methods = res.setdefault("methods", {})
    steps = [(v, o) for v in args.variants for o in args.optimizers]
    steps += [("plnpca", m) for m in args.pca_maxiter]
    for var, what in tqdm(steps, desc="compare", leave=True):
        if var == "plnpca":
            maxiter = int(what)
            pyplnm, torch = _import_pyplnmodels()
            off = np.repeat(np.log(lib)[:, None], G, axis=1)
            l0 = load()
            with Timer() as t:
                model = pyplnm.PlnPCA(u.astype(float), offsets=off, rank=cfg["k"])
                model.fit(maxiter=maxiter, tol=args.pca_tol)
            mon = model._elbo_criterion_monitor
            S = model.covariance.numpy().astype(float)
            r = {"method": f"pyPLNmodels {getattr(pyplnm, '__version__', '')} PlnPCA(rank={cfg['k']}), "
                           f"offsets=log library size, fit(maxiter={maxiter}, tol={args.pca_tol}, lr=0.01 "
                           "default, Rprop)",
                 "wall_s": t.wall, "cpu_s": t.cpu, "iterations": len(mon.elbo_list),
                 "criterion_final": float(mon.criterion),
                 "converged": bool(abs(mon.criterion) < args.pca_tol),
                 "torch_threads": torch.get_num_threads(), "load_before": l0, "load_after": load(),
                 **sigma_errors(S, p)}
            methods[f"plnpca_{maxiter}"] = r
            dump(out, path)
            continue
        opt = what
        n_steps = _cap(args, var, opt)
        l0 = load()
        try:
            with variant(var), Timer() as t:
                fit = pln_ref.fit(u, k=cfg["k"], M0=p.capture.M0, sigma_M=SIGMA_M, optimizer=opt,
                                  lr=args.lr, n_steps=n_steps, gtol=gtol, progress=args.progress,
                                  batch_size=args.batch_size if opt == "adam" else None)
        except RuntimeError as e:
            methods[_key(var, opt)] = {"method": f"{var} {opt}", "error": str(e)}
            dump(out, path)
            continue
        dg = dict(fit.diagnostics)
        if "mom" not in methods:
            methods["mom"] = {"method": "method-of-moments start (fit.init)",
                              **sigma_errors(fit.init.sigma_dense(), p)}
        r = {"method": _label(var, opt, args, n_steps),
             "variant": var, "optimizer": opt, "n_steps_cap": n_steps,
             "reached_stopping_rule": _reached(dg, n_steps),
             "wall_s": t.wall, "cpu_s": t.cpu, "wall_per_step_s": t.wall / max(dg["steps"], 1),
             "cpu_per_step_s": t.cpu / max(dg["steps"], 1), "diagnostics": dg,
             "history": history_summary(fit),
             "all_cells_converged": bool(dg["cells_converged"] == N and dg["max_grad_norm"] < gtol),
             "load_before": l0, "load_after": load(), **sigma_errors(fit.sigma_dense(), p)}
        methods[_key(var, opt)] = r
        dump(out, path)
    compare_targets(res)
    res["load_end"] = load()
    dump(out, path)


# ---- section 2: scaling ---------------------------------------------------------------------
def sweep_times(G, N, k, seed, repeats):
    p = random_params(G, k, seed=seed, capture=True, mean_log_rate=MEAN_LOG_RATE, sigma_M=SIGMA_M)
    sim = simulate(p, N, seed=seed + 1)
    u = sim.counts.astype(float)
    la = np.log(u.sum(axis=1))
    r = {"G": G, "N": N, "k": k, "load_before": load()}
    with Timer() as t:
        post = newton_map(u, p, la)
    r.update(cold_wall_s=t.wall, cold_cpu_s=t.cpu, cold_max_iter=int(post.n_iter.max()),
             cold_mean_iter=float(post.n_iter.mean()), cold_all_converged=bool(post.converged.all()),
             cold_max_grad_norm=float(post.grad_norm.max()))
    rng = np.random.default_rng(seed + 2)
    x0 = post.x_map + 0.05 * rng.standard_normal(post.x_map.shape)
    e0 = post.eta_map + 0.05 * np.abs(rng.standard_normal(N))
    del post
    # paired, interleaved repeats (T0 then T1 back to back) so that slow load drifts cancel
    w0, w1, c0, c1 = [], [], [], []
    for _ in range(repeats):
        for mi, (ws, cs) in ((0, (w0, c0)), (1, (w1, c1))):
            with Timer() as t:
                q = newton_map(u, p, la, x0=x0, eta0=e0, max_iter=mi)
            ws.append(t.wall)
            cs.append(t.cpu)
    r["after_one_iter_max_grad_norm"] = float(q.grad_norm.max())
    dw = np.subtract(w1, w0)
    dc = np.subtract(c1, c0)
    # contention only ever adds time, so the headline is best-of: min(T1) - min(T0)
    r.update(T0_wall_s=min(w0), T1_wall_s=min(w1), T0_cpu_s=min(c0), T1_cpu_s=min(c1),
             sweep_wall_s=min(w1) - min(w0), sweep_cpu_s=min(c1) - min(c0),
             sweep_wall_median_paired_s=float(np.median(dw)), sweep_cpu_median_paired_s=float(np.median(dc)),
             sweep_wall_all_s=dw.tolist(), sweep_cpu_all_s=dc.tolist(),
             sweep_cpu_ns_per_cell_gene=(min(c1) - min(c0)) / (N * G) * 1e9,
             repeats=repeats, load_after=load())
    return r


def _ratios(rows, key, var):
    out = []
    for a, b in zip(rows[:-1], rows[1:]):
        out.append({f"{var}": f"{a[var]}->{b[var]}",
                    **{f"ratio_{m}": b[m] / a[m] for m in ("sweep_wall_s", "sweep_cpu_s",
                                                          "sweep_cpu_median_paired_s", "T1_wall_s",
                                                          "T1_cpu_s", "cold_wall_s")}})
    return out


def section_scaling(args, cfg, out, path):
    res = out.setdefault("scaling", {"config": cfg})
    res["load_start"] = load()
    cache = {}
    jobs = [("G", G, cfg["N_fixed"]) for G in cfg["Gs"]] + [("N", cfg["G_fixed"], N) for N in cfg["Ns"]]
    for var, G, N in tqdm(jobs, desc="scaling", leave=True):
        if (G, N) not in cache:
            cache[(G, N)] = sweep_times(G, N, cfg["k"], cfg["seed"], args.repeats)
        res.setdefault(f"vary_{var}", []).append(cache[(G, N)])
        dump(out, path)
    for var in ("G", "N"):
        rows = res[f"vary_{var}"]
        res[f"ratios_{var}"] = _ratios(rows, None, var)
        res[f"target_{var}_linear"] = bool(all(r["ratio_sweep_wall_s"] <= 2.2 for r in res[f"ratios_{var}"]))
        res[f"target_{var}_linear_cpu"] = bool(all(r["ratio_sweep_cpu_s"] <= 2.2 for r in res[f"ratios_{var}"]))
        res[f"target_{var}_linear_T1"] = bool(all(r["ratio_T1_wall_s"] <= 2.2 for r in res[f"ratios_{var}"]))
    res["load_end"] = load()
    dump(out, path)


# ---- section 2b: memory ---------------------------------------------------------------------
_MEM_CHILD = r"""
import os, sys, json, resource, time, tracemalloc
import numpy as np
sys.path.insert(0, {root!r})
from pln_ref.params import PLNParams, Capture
from pln_ref.laplace import newton_map

def status():
    d = {{}}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS"):
            d[k] = int(v.split()[0]) * 1024 / 1e9  # GB
    return d

z = np.load({npz!r})
u = z["u"]; la = z["la"]
p = PLNParams(z["mu"], z["W"], z["d"], Capture(float(z["M0"]), float(z["sigma_M"])))
# reset the RSS high-water mark to the current RSS (Linux >= 4.0); ru_maxrss cannot be reset and
# survives fork + exec from the parent, so it is reported for reference only
try:
    open("/proc/self/clear_refs", "w").write("5")
    reset = True
except OSError:
    reset = False
s0 = status()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
base, _ = tracemalloc.get_traced_memory()
t = time.perf_counter()
post = newton_map(u, p, la, max_iter=1)
wall = time.perf_counter() - t
cur, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
s1 = status()
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"tracemalloc_peak_minus_base_GB": (peak - base) / 1e9,
                  "tracemalloc_result_retained_GB": (cur - base) / 1e9,
                  "hwm_reset": reset, "rss_before_GB": s0["VmRSS"], "hwm_before_GB": s0["VmHWM"],
                  "hwm_after_GB": s1["VmHWM"], "hwm_peak_minus_rss_before_GB": s1["VmHWM"] - s0["VmRSS"],
                  "ru_maxrss_before_GB": rss0 / 1e6, "ru_maxrss_after_GB": rss1 / 1e6,
                  "counts_GB": u.nbytes / 1e9, "wall_s_with_tracemalloc": wall}}))
"""


def section_memory(args, cfg, out, path):
    res = out.setdefault("memory", {"config": cfg})
    res["load_start"] = load()
    G, N, k = cfg["G"], cfg["N"], cfg["k"]
    p = random_params(G, k, seed=cfg["seed"], capture=True, mean_log_rate=MEAN_LOG_RATE, sigma_M=SIGMA_M)
    sim = simulate(p, N, seed=cfg["seed"] + 1)
    u = sim.counts.astype(float)
    npz = Path(args.out) / "memory_data.npz"
    np.savez(npz, u=u, la=np.log(u.sum(axis=1)), mu=p.mu, W=p.W, d=p.d, M0=p.capture.M0,
             sigma_M=p.capture.sigma_M)
    del sim, u
    code = _MEM_CHILD.format(root=str(ROOT), npz=str(npz))
    res["pln_ref_source_sha1_child"] = source_sha1()  # the child imports pln_ref as on disk now
    res["child_code_matches_run_start"] = res["pln_ref_source_sha1_child"] == out["meta"]["pln_ref_source_sha1_start"]
    pr = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    npz.unlink(missing_ok=True)
    if pr.returncode != 0:
        res["error"] = pr.stderr[-3000:]
    else:
        r = json.loads(pr.stdout.strip().splitlines()[-1])
        res.update(r)
        # the sweep's own peak (above the data already loaded) and the whole process's peak RSS
        res["target_under_4GB"] = bool(max(r["tracemalloc_peak_minus_base_GB"], r["hwm_peak_minus_rss_before_GB"]) < 4.0)
        res["process_peak_rss_under_4GB"] = bool(r["hwm_after_GB"] < 4.0)
    res["load_end"] = load()
    dump(out, path)


# ---- section 3: Sigma recovery --------------------------------------------------------------
def section_sigma(args, cfg, out, path):
    res = out.setdefault("sigma", {"config": {**cfg, "mean_log_rate": MEAN_LOG_RATE}})
    res["load_start"] = load()
    p = random_params(cfg["G"], cfg["k"], seed=cfg["seed"], capture=True, mean_log_rate=MEAN_LOG_RATE,
                      sigma_M=SIGMA_M)
    sim = simulate(p, cfg["N"], seed=cfg["seed"] + 1)
    u = sim.counts
    res["data"] = {"mean_count": float(u.mean()), "frac_zero": float(np.mean(u == 0))}
    methods = res.setdefault("methods", {})
    for var, opt in tqdm([(v, o) for v in args.variants for o in args.optimizers], desc="sigma", leave=True):
        n_steps = _cap(args, var, opt)
        try:
            with variant(var), Timer() as t:
                fit = pln_ref.fit(u, k=cfg["k"], M0=p.capture.M0, sigma_M=SIGMA_M, optimizer=opt,
                                  lr=args.lr, n_steps=n_steps, gtol=args.gtol, progress=args.progress,
                                  batch_size=args.batch_size if opt == "adam" else None)
        except RuntimeError as e:
            methods[_key(var, opt)] = {"method": f"{var} {opt}", "error": str(e)}
            dump(out, path)
            continue
        if "mom" not in methods:
            methods["mom"] = {"method": "method-of-moments start", **sigma_errors(fit.init.sigma_dense(), p)}
        dg = fit.diagnostics
        methods[_key(var, opt)] = {
            "method": _label(var, opt, args, n_steps), "variant": var, "optimizer": opt,
            "n_steps_cap": n_steps, "wall_s": t.wall, "cpu_s": t.cpu, "diagnostics": dict(dg),
            "history": history_summary(fit),
            "reached_stopping_rule": _reached(dg, n_steps),
            "all_cells_converged": bool(dg["cells_converged"] == cfg["N"] and dg["max_grad_norm"] < args.gtol),
            **sigma_errors(fit.sigma_dense(), p)}
        dump(out, path)
    res["load_end"] = load()
    dump(out, path)


# ---- profile --------------------------------------------------------------------------------
def section_profile(args, cfg, out, path):
    import cProfile
    import io
    import pstats

    res = out.setdefault("profile", {"config": {**cfg, "n_steps": args.profile_steps}})
    res["load_start"] = load()
    p, sim = compare_data(cfg)
    for var in args.variants:
        pr = cProfile.Profile()
        try:
            with variant(var), Timer() as t:
                pr.enable()
                fit = pln_ref.fit(sim.counts, k=cfg["k"], M0=p.capture.M0, sigma_M=SIGMA_M, optimizer="adam",
                                  lr=args.lr, n_steps=args.profile_steps, gtol=args.gtol, progress=args.progress)
                pr.disable()
        except RuntimeError as e:
            res[var] = {"error": str(e)}
            continue
        pr.dump_stats(str(Path(args.out) / f"profile_fit_adam_{var}.pstats"))
        rows = []
        for (fn, line, name), (cc, nc, tt, ct, _) in pstats.Stats(pr).stats.items():
            rows.append({"func": f"{Path(fn).name}:{line}({name})", "ncalls": nc, "tottime": tt, "cumtime": ct})
        calls = {r["func"].split("(")[-1].rstrip(")"): r["ncalls"] for r in rows
                 if r["func"].split("(")[-1].rstrip(")") in ("newton_map", "cell_objective", "eta_schur", "solve",
                                                             "laplace_objective")}
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(30)
        (Path(args.out) / f"profile_fit_adam_{var}.txt").write_text(s.getvalue())
        res[var] = {"wall_s": t.wall, "cpu_s": t.cpu, "diagnostics": dict(fit.diagnostics), "ncalls": calls,
                    "top_tottime": sorted(rows, key=lambda r: -r["tottime"])[:20],
                    "top_cumtime": sorted(rows, key=lambda r: -r["cumtime"])[:25], "load_after": load()}
        dump(out, path)
    res["load_end"] = load()
    dump(out, path)


# ---- markdown -------------------------------------------------------------------------------
def _f(x, nd=3):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.{nd}f}"
    return str(x)


def markdown(out: dict) -> str:
    L = ["# pln-ref Laplace benchmark", "",
         f"Command: `{out['meta']['command']}`  ",
         f"Threads: {out['meta']['threads']} (OPENBLAS/OMP/MKL_NUM_THREADS; torch.set_num_threads)  ",
         f"Machine: {out['meta']['machine']}  ",
         f"Git: {out['meta']['git']['commit'][:10]}, uncommitted pln_ref files: "
         f"{', '.join(out['meta']['git']['pln_ref_uncommitted_files']) or 'none'}  ",
         f"pln_ref source sha1 at start: {out['meta'].get('pln_ref_source_sha1_start', '-')[:12]}"
         + (f"; CHANGED during the run (end {out['meta']['pln_ref_source_sha1_end'][:12]})"
            if out['meta'].get('pln_ref_changed_during_run') else "") + "  ",
         f"Load at start: {out['meta']['load_start']['uptime']}", ""]
    c = out.get("compare")
    if c:
        cf, d = c["config"], c.get("data", {})
        L += [f"## 1. pln-ref vs PlnPCA (N={cf['N']}, G={cf['G']}, k={cf['k']}, capture, "
              f"mean_log_rate={cf['mean_log_rate']})", "",
              f"Data: mean count {_f(d.get('mean_count'))}, zeros {_f(d.get('frac_zero'))}, median library "
              f"{_f(d.get('median_library'))}, median true capture prob {_f(d.get('capture_prob_true_median'))}.", "",
              "| method | wall s | CPU s | iters/steps | corr RMSE | corr max | cov RMSE | cov max | cells converged |",
              "|---|---|---|---|---|---|---|---|---|"]
        for k, m in c.get("methods", {}).items():
            dg = m.get("diagnostics", {})
            it = dg.get("steps", m.get("iterations", "-"))
            conv = (f"{dg['cells_converged']} (max |g| {dg['max_grad_norm']:.2g}) {_f(m['all_cells_converged'])}"
                    if dg else (f"criterion {m['criterion_final']:.2g}, converged {_f(m['converged'])}"
                                if "criterion_final" in m else "-"))
            if "error" in m:
                L.append(f"| {k}: {m['method']} | ERROR: {m['error']} |")
                continue
            if dg:
                it = f"{it} ({'stopped by its rule' if m.get('reached_stopping_rule') else 'hit the step cap'})"
                if m.get("history"):
                    it += f"; within 1e-3 of best after {m['history']['steps_to_within_1e-3']}"
            L.append(f"| {k}: {m['method']} | {_f(m.get('wall_s'))} | {_f(m.get('cpu_s'))} | {it} | "
                     f"{_f(m['corr_rmse'])} | {_f(m['corr_max_abs'])} | {_f(m['cov_rmse'])} | "
                     f"{_f(m['cov_max_abs'])} | {conv} |")
        for opt, t in c.get("targets", {}).items():
            L.append(f"\nTarget ({opt} vs {c.get('plnpca_reference_run')}): speed-up {t['speedup_vs_plnpca']:.2f}x wall "
                     f"({t['cpu_speedup_vs_plnpca']:.2f}x CPU), >=3x: wall {_f(t['speedup_ge_3'])}, CPU "
                     f"{_f(t['cpu_speedup_ge_3'])}; fit reached its stopping rule: {_f(t['reached_stopping_rule'])}; corr RMSE no worse: "
                     f"{_f(t['corr_rmse_no_worse'])}; corr max no worse: {_f(t['corr_max_no_worse'])}; "
                     f"all cells converged: {_f(t['all_cells_converged'])}")
        L.append("")
    s = out.get("scaling")
    if s:
        L += ["## 2. Newton sweep scaling (sweep = min T(max_iter=1) - min T(max_iter=0) from a perturbed MAP)", "",
              "| G | N | sweep wall s | sweep CPU s | CPU ns/(cell*gene) | T1 wall s | T0 wall s | cold newton_map wall s (max iter) | load 1-min |",
              "|---|---|---|---|---|---|---|---|---|"]
        for var in ("G", "N"):
            for r in s.get(f"vary_{var}", []):
                L.append(f"| {r['G']} | {r['N']} | {_f(r['sweep_wall_s'])} | {_f(r['sweep_cpu_s'])} | "
                         f"{_f(r.get('sweep_cpu_ns_per_cell_gene'))} | {_f(r['T1_wall_s'])} | {_f(r['T0_wall_s'])} | {_f(r['cold_wall_s'])} "
                         f"({r['cold_max_iter']}) | {r['load_before']['loadavg_1_5_15'][0]} |")
        for var in ("G", "N"):
            if f"ratios_{var}" in s:
                rs = "; ".join(f"{r[var]}: {r['ratio_sweep_wall_s']:.2f} (CPU {r['ratio_sweep_cpu_s']:.2f}, "
                               f"CPU median-paired {r.get('ratio_sweep_cpu_median_paired_s', float('nan')):.2f}, "
                               f"T1 {r['ratio_T1_wall_s']:.2f})" for r in s[f"ratios_{var}"])
                L.append(f"\ntime(2{var})/time({var}): {rs}. Target <= 2.2 met (sweep wall): "
                         f"{_f(s[f'target_{var}_linear'])}, (sweep CPU): {_f(s[f'target_{var}_linear_cpu'])}, "
                         f"(T1 wall): {_f(s.get(f'target_{var}_linear_T1'))}")
        L.append("")
    m = out.get("memory")
    if m:
        cf = m["config"]
        L += [f"## 2b. Peak memory of one sweep (G={cf['G']}, N={cf['N']}, k={cf['k']})", ""]
        if "error" in m:
            L.append(f"ERROR: {m['error'][-500:]}")
        else:
            L.append(f"tracemalloc peak above baseline: {m['tracemalloc_peak_minus_base_GB']:.3f} GB; "
                     f"process RSS {m['rss_before_GB']:.3f} GB before the call (imports + data), peak RSS during "
                     f"the call (VmHWM, reset before it: {_f(m['hwm_reset'])}) {m['hwm_after_GB']:.3f} GB, i.e. "
                     f"{m['hwm_peak_minus_rss_before_GB']:.3f} GB above the baseline; counts alone {m['counts_GB']:.3f} GB. "
                     f"Whole process under 4 GB: {_f(m['process_peak_rss_under_4GB'])}. "
                     f"Sweep under 4 GB: {_f(m['target_under_4GB'])}")
        L.append("")
    g = out.get("sigma")
    if g:
        cf = g["config"]
        L += [f"## 3. Sigma recovery (N={cf['N']}, G={cf['G']}, k={cf['k']})", "",
              "| method | wall s | CPU s | steps | corr RMSE | corr max | cov RMSE | cells converged |",
              "|---|---|---|---|---|---|---|---|"]
        for k, r in g.get("methods", {}).items():
            if "error" in r:
                L.append(f"| {k} | ERROR: {r['error']} |")
                continue
            dg = r.get("diagnostics")
            st = (f"{dg['steps']} ({'stopped by its rule' if r.get('reached_stopping_rule') else 'hit the step cap'})"
                  if dg else "-")
            L.append(f"| {k}: {r['method']} | {_f(r.get('wall_s'))} | {_f(r.get('cpu_s'))} | {st} | "
                     f"{_f(r['corr_rmse'])} | {_f(r['corr_max_abs'])} | "
                     f"{_f(r['cov_rmse'])} | {_f(r['all_cells_converged']) if dg else '-'} |")
        L.append("")
    pf = out.get("profile")
    if pf:
        for var in ("asis", "lsfix"):
            q = pf.get(var)
            if not q or "top_tottime" not in q:
                continue
            L += [f"## Profile ({var}): pln_ref.fit adam, {pf['config']['n_steps']} steps, wall {q['wall_s']:.1f} s, "
                  f"CPU {q['cpu_s']:.1f} s; calls: {q['ncalls']}", "",
                  "| function | ncalls | tottime s | cumtime s |", "|---|---|---|---|"]
            for r in q["top_tottime"][:12]:
                L.append(f"| {r['func']} | {r['ncalls']} | {r['tottime']:.2f} | {r['cumtime']:.2f} |")
            L.append("")
    if "load_end" in out.get("meta", {}):
        L.append(f"Load at end: {out['meta']['load_end']['uptime']}")
    return "\n".join(L) + "\n"


# ---- main -----------------------------------------------------------------------------------
FULL = {
    "compare": {"N": 2000, "G": 1000, "k": 10, "seed": 0},
    "scaling": {"Gs": [500, 1000, 2000, 4000], "N_fixed": 2000, "Ns": [1000, 2000, 4000, 8000],
                "G_fixed": 1000, "k": 10, "seed": 10},
    "memory": {"G": 20000, "N": 1000, "k": 10, "seed": 20},
    "sigma": {"N": 2000, "G": 200, "k": 5, "seed": 30},
    "profile": {"N": 2000, "G": 1000, "k": 10, "seed": 0},
}
QUICK = {
    "compare": {"N": 300, "G": 100, "k": 3, "seed": 0},
    "scaling": {"Gs": [100, 200], "N_fixed": 200, "Ns": [200, 400], "G_fixed": 100, "k": 3, "seed": 10},
    "memory": {"G": 2000, "N": 100, "k": 3, "seed": 20},
    "sigma": {"N": 300, "G": 50, "k": 3, "seed": 30},
    "profile": {"N": 300, "G": 100, "k": 3, "seed": 0},
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1,
                    help="BLAS/OpenMP/torch threads (set before numpy import; default 1: shared CPU)")
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--out", default=None, help="output dir (default validation/out/bench_laplace[_quick])")
    ap.add_argument("--sections", default="compare,scaling,memory,sigma",
                    help="comma list of compare,scaling,memory,sigma,profile")
    ap.add_argument("--optimizers", default="adam,lbfgs")
    ap.add_argument("--variants", default="asis",
                    help="comma list: asis (pln_ref as in the repo), lsfix (newton_map with the proposed "
                         "difference-form line search, swapped in by this script only)")
    ap.add_argument("--asis-n-steps", type=int, default=None, help="Adam step cap for the asis variant (default: --n-steps)")
    ap.add_argument("--asis-lbfgs-steps", type=int, default=None,
                    help="L-BFGS iteration cap for the asis variant (default: --lbfgs-steps)")
    ap.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="Adam minibatch size (cells) for compare/sigma; default full batch")
    ap.add_argument("--n-steps", type=int, default=None, help="Adam step cap (default 2000; quick 40)")
    ap.add_argument("--lbfgs-steps", type=int, default=None, help="L-BFGS iteration cap (default 500; quick 30)")
    ap.add_argument("--gtol", type=float, default=1e-6, help="per-cell Newton gradient tolerance")
    ap.add_argument("--pca-maxiter", default=None,
                    help="comma list of PlnPCA maxiter runs (default '400,3000'; quick '50'; 'none' skips PlnPCA)")
    ap.add_argument("--pca-tol", type=float, default=1e-6, help="PlnPCA tol (its default 1e-6)")
    ap.add_argument("--repeats", type=int, default=None, help="paired timing repeats per sweep (default 5, quick 2)")
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--render", action="store_true",
                    help="only recompute derived fields (stopping flags, targets) of --out/results.json "
                         "and rewrite results.md")
    args = ap.parse_args(argv)
    cfgs = QUICK if args.quick else FULL
    args.n_steps = args.n_steps or (40 if args.quick else 2000)
    args.lbfgs_steps = args.lbfgs_steps or (30 if args.quick else 500)
    args.repeats = args.repeats or (2 if args.quick else 5)
    pm = args.pca_maxiter or ("50" if args.quick else "400,3000")
    args.pca_maxiter = [] if pm == "none" else [int(x) for x in pm.split(",") if x]
    args.optimizers = [o for o in args.optimizers.split(",") if o]
    args.variants = [v for v in args.variants.split(",") if v]
    args.asis_n_steps = args.asis_n_steps or args.n_steps
    args.asis_lbfgs_steps = args.asis_lbfgs_steps or args.lbfgs_steps
    args.out = args.out or str(ROOT / "validation" / "out" / ("bench_laplace_quick" if args.quick else "bench_laplace"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "results.json"
    if args.render:
        out = json.loads(path.read_text())
        for sec in ("compare", "sigma"):
            for m in out.get(sec, {}).get("methods", {}).values():
                if "diagnostics" in m and "n_steps_cap" not in m:  # older output: cap from the label
                    import re
                    hit = re.search(r"step cap (\d+)", m.get("method", ""))
                    if hit:
                        m["n_steps_cap"] = int(hit.group(1))
                if "diagnostics" in m and "n_steps_cap" in m:
                    m["reached_stopping_rule"] = _reached(m["diagnostics"], m["n_steps_cap"])
        if "compare" in out:
            compare_targets(out["compare"])
        dump(out, path)
        print(markdown(out))
        return
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(FULL)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")
    out = json.loads(path.read_text()) if path.exists() else {}
    out["meta"] = {"command": " ".join([Path(sys.executable).name] + sys.argv), "threads": _THREADS,
                   "env": {v: os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")},
                   "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, python "
                              f"{platform.python_version()}, numpy {np.__version__}",
                   "git": git_state(), "pln_ref_source_sha1_start": source_sha1(),
                   "quick": args.quick, "load_start": load(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for s in sections:
        out.pop(s, None)  # a re-run of a section replaces its old results
    dump(out, path)
    fns = {"compare": section_compare, "scaling": section_scaling, "memory": section_memory,
           "sigma": section_sigma, "profile": section_profile}
    for s in sections:
        fns[s](args, cfgs[s], out, path)
    out["meta"]["load_end"] = load()
    out["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out["meta"]["pln_ref_source_sha1_end"] = source_sha1()
    out["meta"]["pln_ref_changed_during_run"] = (out["meta"]["pln_ref_source_sha1_end"]
                                                 != out["meta"]["pln_ref_source_sha1_start"])
    dump(out, path)
    print(markdown(out))
    print(f"written: {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
