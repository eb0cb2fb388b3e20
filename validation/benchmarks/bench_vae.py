"""Benchmark of the PLN VAE (issue 4): training time, Sigma recovery, scoring throughput, drift,
and (``--nuts``) the per-cell posterior vs NUTS with the validation-suite metrics.

Usage (2 shared cores: keep one thread)::

    OMP_NUM_THREADS=1 python validation/benchmarks/bench_vae.py --out validation/out/bench_vae.json
    OMP_NUM_THREADS=1 python validation/benchmarks/bench_vae.py --nuts --skip-main --out ...

Sections (each result is written to the JSON as soon as it exists):
  main        simulated N=2000, G=1000, k=10 with capture (``pln_ref.random_params``):
              VAE training wall time; off-diagonal correlation error of the fitted Sigma vs the
              truth (relative Frobenius ||C_hat - C||_F / ||C||_F over g != h, max |C_hat - C|,
              both for the method-of-moments start, the VAE, optionally the Laplace fit
              ``--laplace-steps`` and the VAE with the prior-residual ELBO ``--prior-variant``);
              aggregate-posterior drift.
  throughput  G=2000, k=10: cells/s of ``VAEResult.encode`` on new cells vs
              ``laplace.newton_map`` on the same cells with the same parameters.
  gap         (``--gap``) issue 16: amortisation gap in nats/cell (``VAEResult.amortisation_gap``:
              Adam on each cell's q(z) from the delivered q) on ``--gap-new`` held-out cells and as
              many training cells, for each family in ``--families``, before (refine_steps=0) and
              after per-cell refinement (``--refine-steps``); simulated N=``--gap-N``,
              G=``--gap-G``, k=``--gap-k`` with capture.
  real        (``--real``) issue 16's second cell design: pyPLNmodels scRNA counts (600 cells,
              30 most expressed genes, k=3, capture="auto"), Laplace-fitted globals, gated per-cell
              NUTS on ``--real-cells`` cells; Laplace and the VAE families vs NUTS.
  nuts        G=50, k=3 (N=2000 training cells): VAE posterior of ``--nuts-cells`` cells vs NUTS
              on ``pln_cell`` under the VAE's own globals (and the Laplace posterior under the same
              globals, for reference): standardised mean error, SD ratio, 50/90% coverage, PSIS k-hat.
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

import torch  # noqa: E402

from pln_ref.io import atomic_write_json  # noqa: E402
from pln_ref.simulation import random_params, simulate  # noqa: E402
from pln_ref.vae import fit_vae  # noqa: E402


def corr_error(P, truth) -> dict:
    C, Ch = truth.correlation_dense(), P.correlation_dense()
    off = ~np.eye(truth.G, dtype=bool)
    diff = (Ch - C)[off]
    return {"rel_fro_offdiag": float(np.linalg.norm(diff) / np.linalg.norm(C[off])),
            "max_abs_offdiag": float(np.abs(diff).max()),
            "mean_abs_offdiag": float(np.abs(diff).mean())}


def subspace_deg(P, truth) -> list:
    from scipy.linalg import subspace_angles
    return [float(a) for a in np.degrees(subspace_angles(P.W, truth.W))]


def dump(out: dict, path: Path) -> None:
    atomic_write_json(path, out)


def section_main(args, out, path):
    p = random_params(args.G, args.k, seed=args.seed, capture=True)
    sim = simulate(p, args.N, seed=args.seed + 1)
    u, la = np.asarray(sim.counts, float), sim.log_anchor
    res_main = {"N": args.N, "G": args.G, "k": args.k, "mean_count": float(u.mean()),
                "frac_zero": float(np.mean(u == 0)), "eta_true_mean": float(sim.eta.mean())}
    out["main"] = res_main
    from pln_ref.moments import method_of_moments
    t0 = time.perf_counter()
    mom = method_of_moments(u, args.k, capture=p.capture, log_anchor=la)
    res_main["mom"] = {"time_s": time.perf_counter() - t0, **corr_error(mom, p),
                       "angles_deg": subspace_deg(mom, p)}
    dump(out, path)

    if args.laplace_steps > 0:
        from pln_ref.fit_laplace import optimize_globals
        t0 = time.perf_counter()
        st, lp = optimize_globals(u, mom, la, n_steps=args.laplace_steps, progress=args.progress,
                                  seed=args.seed, batch_size=args.laplace_batch)
        res_main["laplace"] = {"train_wall_s": time.perf_counter() - t0, "n_steps": args.laplace_steps,
                               "steps_run": int(st.step), "batch_size": args.laplace_batch,
                               **corr_error(lp, p), "angles_deg": subspace_deg(lp, p),
                               "d_mean_fit": float(lp.d.mean())}
        dump(out, path)
        print(json.dumps(res_main["laplace"], indent=1), flush=True)
    if args.no_vae:
        return None
    t0 = time.perf_counter()
    fit = fit_vae(u, args.k, capture=p.capture, log_anchor=la, n_steps=args.steps, seed=args.seed,
                  batch_size=args.batch_size, lr=args.lr, progress=args.progress, init=mom)
    wall = time.perf_counter() - t0
    vae = {"train_wall_s": wall, "steps_run": fit.diagnostics["steps"],
           "stopped_step": fit.diagnostics["stopped_step"],
           "best_val_elbo": fit.diagnostics["best_validation_objective"],
           "s_per_step": wall / max(1, fit.diagnostics["steps"]),
           **corr_error(fit.params, p), "angles_deg": subspace_deg(fit.params, p),
           "d_mean_fit": float(fit.d.mean()), "d_mean_true": float(p.d.mean()),
           "mu_bias": float(np.mean(fit.mu - p.mu)),
           "eta_corr": float(np.corrcoef(fit.eta_map, sim.eta)[0, 1]),
           "eta_bias": float(np.mean(fit.eta_map - sim.eta)),
           "x_rmse_vs_true": float(np.sqrt(np.mean((fit.x_map - sim.x) ** 2))),
           "drift": fit.aggregate_posterior_drift(),
           "val_elbo_trace": [(int(s), float(v)) for s, v in zip(fit.history["step"],
                                                                  fit.history["validation_objective"])
                              if np.isfinite(v)]}
    res_main["vae"] = vae
    dump(out, path)
    # amortisation gap on new cells from the same model (per-cell optimised q(z) vs encoder)
    new = simulate(p, 300, seed=args.seed + 2)
    t0 = time.perf_counter()
    vae["amortisation_gap_new_cells"] = fit.amortisation_gap(np.asarray(new.counts, float), new.log_anchor,
                                                             n_iter=200)
    vae["amortisation_gap_new_cells"]["time_s"] = time.perf_counter() - t0
    dump(out, path)
    print(json.dumps({k: v for k, v in vae.items() if k != "val_elbo_trace"}, indent=1), flush=True)

    if args.prior_variant:
        t0 = time.perf_counter()
        fp = fit_vae(u, args.k, capture=p.capture, log_anchor=la, n_steps=args.steps, seed=args.seed,
                     batch_size=args.batch_size, lr=args.lr, progress=args.progress, init=mom,
                     residual="prior")
        res_main["vae_prior_residual"] = {"train_wall_s": time.perf_counter() - t0,
                                          "steps_run": fp.diagnostics["steps"],
                                          **corr_error(fp.params, p), "angles_deg": subspace_deg(fp.params, p),
                                          "d_mean_fit": float(fp.d.mean()), "d_min_fit": float(fp.d.min())}
        dump(out, path)

    return fit


def section_throughput(args, out, path):
    G = args.G_throughput
    p = random_params(G, args.k, seed=args.seed + 10, capture=True)
    sim = simulate(p, args.n_train_tp + args.n_new, seed=args.seed + 11)
    u, la = np.asarray(sim.counts, float), sim.log_anchor
    n_tr = args.n_train_tp
    new_u, new_la = u[n_tr:], la[n_tr:]
    tp = {"G": G, "k": args.k, "n_new_cells": int(new_u.shape[0]), "torch_threads": torch.get_num_threads(),
          "loadavg_start": os.getloadavg()}
    out["throughput"] = tp
    fits = {}
    for fam in args.families:
        fit = fit_vae(u[:n_tr], args.k, capture=p.capture, log_anchor=la[:n_tr], n_steps=args.tp_steps,
                      seed=args.seed, progress=args.progress, family=fam,
                      refine_steps=args.refine_steps if fam == "structured" else 0)
        fits[fam] = fit
        fit.encode(new_u[:256], new_la[:256])  # warm-up
        times, cpu = [], []
        for _ in range(3):
            t0, c0 = time.perf_counter(), time.process_time()
            q = fit.encode(new_u, new_la)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        tp[fam] = {"refine_steps": fit.config.refine_steps, "vae_encode_s": min(times),
                   "vae_encode_cpu_s": min(cpu), "vae_cells_per_s": new_u.shape[0] / min(times),
                   "vae_cells_per_cpu_s": new_u.shape[0] / min(cpu)}
        dump(out, path)
    fit = fits[args.families[0]]
    try:
        from pln_ref.laplace import newton_map
    except ImportError:
        newton_map = None
    if newton_map is not None:
        n_lap = min(args.n_laplace_tp, new_u.shape[0])
        t0, c0 = time.perf_counter(), time.process_time()
        post = newton_map(new_u[:n_lap], fit.params, new_la[:n_lap])
        tl, cl = time.perf_counter() - t0, time.process_time() - c0
        tp.update({"laplace_n_cells": n_lap, "laplace_s": tl, "laplace_cpu_s": cl,
                   "laplace_cells_per_s": n_lap / tl, "laplace_cells_per_cpu_s": n_lap / cl,
                   "laplace_converged_frac": float(np.mean(post.converged)), "loadavg_end": os.getloadavg()})
        for fam in args.families:
            tp[fam]["speedup_over_laplace_wall"] = tp[fam]["vae_cells_per_s"] / (n_lap / tl)
            tp[fam]["speedup_over_laplace_cpu"] = tp[fam]["vae_cells_per_cpu_s"] / (n_lap / cl)
        q = fit.encode(new_u, new_la)
        # how far the VAE posterior mean is from the Laplace MAP on the same cells / params
        dx = q.x_mean[:n_lap] - post.x_map
        tp["vae_vs_laplace_x_rmse"] = float(np.sqrt(np.mean(dx**2)))
        tp["vae_vs_laplace_eta_rmse"] = float(np.sqrt(np.mean((q.eta_mean[:n_lap] - post.eta_map) ** 2)))
        dump(out, path)
    print(json.dumps(tp, indent=1), flush=True)


def section_gap(args, out, path):
    """Amortisation gap (nats/cell) on held-out and training cells, before/after refinement."""
    p = random_params(args.gap_G, args.gap_k, seed=args.seed + 30, capture=True)
    n_new = args.gap_new
    sim = simulate(p, args.gap_N + n_new, seed=args.seed + 31)
    u, la = np.asarray(sim.counts, float), sim.log_anchor
    tr_u, tr_la, new_u, new_la = u[:args.gap_N], la[:args.gap_N], u[args.gap_N:], la[args.gap_N:]
    res = {"N": args.gap_N, "G": args.gap_G, "k": args.gap_k, "n_eval_cells": n_new,
           "n_iter": args.gap_iter, "mean_count": float(u.mean()), "loadavg_start": os.getloadavg()}
    out["gap"] = res
    # one fit: both families train with the mean-field ELBO (VAEConfig.train_family default), so
    # the trained encoder and decoder are the same; only the posterior family differs
    t0, c0 = time.perf_counter(), time.process_time()
    fit = fit_vae(tr_u, args.gap_k, capture=p.capture, log_anchor=tr_la, n_steps=args.steps,
                  seed=args.seed, progress=args.progress, refine_steps=0)
    res["fit"] = {"train_wall_s": time.perf_counter() - t0, "train_cpu_s": time.process_time() - c0,
                  "steps_run": fit.diagnostics["steps"], "train_family": fit.config.train_family,
                  "best_val_elbo": fit.diagnostics["best_validation_objective"]}
    for fam in args.families:
        fit.model.family = fam
        r = {}
        res[fam] = r
        for label, (cu, cla) in (("held_out", (new_u, new_la)), ("training", (tr_u[:n_new], tr_la[:n_new]))):
            for ref in sorted({0, args.refine_steps}):
                t0 = time.perf_counter()
                g = fit.amortisation_gap(cu, cla, n_iter=args.gap_iter, refine_steps=ref)
                g["time_s"] = time.perf_counter() - t0
                r[f"{label}_refine{ref}"] = g
                dump(out, path)
                print(fam, label, "refine", ref, {k: round(v, 3) for k, v in g.items()
                                                   if isinstance(v, float)}, flush=True)
    res["loadavg_end"] = os.getloadavg()
    dump(out, path)


def section_real(args, out, path):
    """Issue 16's second cell design: pyPLNmodels' scRNA counts (600 cells, the 30 most expressed
    genes, k=3, capture as pln_ref.fit's capture="auto"), globals from a Laplace fit, per-cell gated
    NUTS for ``--real-cells`` cells at those globals; Laplace and both VAE families (encoder trained
    at the fitted globals) compared with the validation metrics."""
    from pyPLNmodels import load_scrna

    from pln_ref.fit_laplace import optimize_globals
    from pln_ref.laplace import newton_map
    from pln_ref.moments import method_of_moments
    from pln_ref.params import Capture
    from pln_ref.anchor import resolve_log_anchor
    from pln_ref.validation.compare import compare_cells, corr_x_eta, summarise
    from pln_ref.validation.gate import combine_gates
    from pln_ref.validation.nuts_cells import fit_cells_nuts
    from pln_ref.validation.psis import cell_psis

    X = np.asarray(load_scrna(n_samples=600)["endog"], dtype=float)
    top = np.argsort(X.sum(0))[::-1][:30]
    u = X[:, top]
    # pln_ref.fit's capture="auto": M0 = median library size / 0.1, sigma_M = 0.5
    cap = Capture(M0=float(np.median(u.sum(1))) / 0.1, sigma_M=0.5)
    la = resolve_log_anchor(u, None)
    init = method_of_moments(u, 3, capture=cap, log_anchor=la)
    _, params = optimize_globals(u, init, la, n_steps=300, optimizer="lbfgs", progress=False)
    rng = np.random.default_rng(args.seed)
    idx = np.sort(rng.choice(u.shape[0], args.real_cells, replace=False))
    nuts = fit_cells_nuts(u[idx], params, la[idx], chains=4, warmup=1000, draws=1000, seed=args.seed,
                          progress=args.progress)
    ok = nuts["passed"]
    res = {"n_cells": int(len(idx)), "G": 30, "k": 3, "nuts_passed": int(ok.sum()),
           "nuts_seconds": nuts["seconds"], "loadavg_start": os.getloadavg()}
    out["real"] = res
    dump(out, path)
    gate = combine_gates([nuts["gates"][c] for c in np.flatnonzero(ok)])
    cu, cla = u[idx][ok], la[idx][ok]
    nx, ne = nuts["x"][:, ok], nuts["eta"][:, ok]
    lib = cu.sum(1)
    methods = {"laplace": newton_map(cu, params, cla)}
    for fam in args.families:
        f = fit_vae(u, 3, capture=cap, log_anchor=la, init=params, train_decoder=False, n_steps=3000,
                    seed=args.seed, progress=False, family=fam, refine_steps=0 if fam == "meanfield" else None)
        methods[f"vae_{fam}"] = f.encode(cu, cla)
    bins = np.digitize(lib, np.quantile(lib, [1 / 3, 2 / 3]))
    for name, m in methods.items():
        cmp = compare_cells(m, (nx, ne), gate=gate, n_draws=4000, seed=args.seed, label=name,
                            sample_kwargs={"eta": "free"})
        ps = cell_psis(m, cu, params, cla, n_draws=4000, seed=args.seed + 1, sample_kwargs={"eta": "free"})
        xm, em = m.sample(np.random.default_rng(args.seed + 2), 1000, eta="free")
        cn, cm = corr_x_eta(nx, ne), corr_x_eta(xm, em)
        r = {q: summarise(cmp[q]) for q in ("x", "eta") if q in cmp}
        for q in r:
            sr = np.asarray(cmp[q].sd_ratio)
            r[q]["sd_ratio_share_0.9_1.1"] = float(np.mean((sr >= 0.9) & (sr <= 1.1)))
        r["psis"] = ps["summary"]
        r["corr_x_eta_by_library_tercile"] = [
            {"nuts_median": float(np.median(cn[bins == b])), "method_median": float(np.median(cm[bins == b]))}
            for b in range(3)]
        res[name] = r
        dump(out, path)
        print(name, {q: (round(r[q]["std_mean_error"]["median_abs"], 3), round(r[q]["sd_ratio"]["min"], 3),
                         round(r[q]["sd_ratio"]["max"], 3), round(r[q]["sd_ratio_share_0.9_1.1"], 3),
                         round(r[q]["cover90"]["mean"], 3)) for q in ("x", "eta") if q in r},
              "khat<0.7", round(r["psis"]["share_khat_lt_0.7"], 3),
              "corr", [(round(t["method_median"], 2), round(t["nuts_median"], 2))
                       for t in r["corr_x_eta_by_library_tercile"]], flush=True)
    res["loadavg_end"] = os.getloadavg()
    dump(out, path)


def section_nuts(args, out, path):
    from pln_ref.validation.compare import compare_cells, summarise
    from pln_ref.validation.engines import sample_nuts
    from pln_ref.validation.standata import pln_cell_data
    from pln_ref.validation.gate import check_gate
    from pln_ref.laplace import newton_map
    from pln_ref.validation.psis import cell_psis

    p = random_params(50, 3, seed=args.seed + 20, capture=True)
    sim = simulate(p, 2000 + args.nuts_cells, seed=args.seed + 21)
    u, la = np.asarray(sim.counts, float), sim.log_anchor
    fit = fit_vae(u[:2000], 3, capture=p.capture, log_anchor=la[:2000], n_steps=1500, seed=args.seed,
                  progress=args.progress)
    cu, cla = u[2000:], la[2000:]
    params = fit.params
    q = fit.encode(cu, cla)
    lap = newton_map(cu, params, cla)
    t0 = time.perf_counter()
    idata = sample_nuts("pln_cell", pln_cell_data(cu.astype(np.int64), params, cla), chains=4,
                        warmup=1000, draws=1000, seed=args.seed)
    nuts_s = time.perf_counter() - t0
    gate = check_gate(idata, var_names=["x", "eta"])
    res = {"G": 50, "k": 3, "n_cells": int(cu.shape[0]), "nuts_s": nuts_s,
           "gate_passed": bool(gate.passed), "gate": gate.summary()}
    for label, method in (("vae", q), ("laplace", lap)):
        cmp = compare_cells(method, idata, gate=gate, force=not gate.passed, seed=args.seed, label=label)
        ps = cell_psis(method, cu, params, cla, n_draws=2000, seed=args.seed)
        khat = np.asarray(ps["result"].khat)
        res[label] = {"x": summarise(cmp["x"]),
                      "eta": summarise(cmp["eta"]) if "eta" in cmp else None,
                      "khat": [float(v) for v in khat],
                      "khat_share_gt_0.7": float(np.mean(khat > 0.7)),
                      "khat_share_gt_0.5": float(np.mean(khat > 0.5))}
        out["nuts"] = res
        dump(out, path)
    print(json.dumps({k: res[k] for k in ("nuts_s", "gate_passed")}, indent=1), flush=True)
    for label in ("vae", "laplace"):
        r = res[label]
        print(label, "x:", {m: r["x"][m] for m in ("std_mean_error", "sd_ratio", "cover90")},
              "eta:", None if r["eta"] is None else {m: r["eta"][m] for m in ("std_mean_error", "sd_ratio", "cover90")},
              "khat>0.7:", r["khat_share_gt_0.7"], flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="validation/out/bench_vae.json")
    ap.add_argument("--N", type=int, default=2000)
    ap.add_argument("--G", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--laplace-steps", type=int, default=0)
    ap.add_argument("--laplace-batch", type=int, default=None)
    ap.add_argument("--no-vae", action="store_true")
    ap.add_argument("--prior-variant", action="store_true")
    ap.add_argument("--G-throughput", type=int, default=2000)
    ap.add_argument("--n-train-tp", type=int, default=1000)
    ap.add_argument("--tp-steps", type=int, default=200)
    ap.add_argument("--n-new", type=int, default=4000)
    ap.add_argument("--n-laplace-tp", type=int, default=500)
    ap.add_argument("--skip-main", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--nuts", action="store_true")
    ap.add_argument("--nuts-cells", type=int, default=8)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--families", nargs="+", default=["structured", "meanfield"],
                    choices=["structured", "meanfield"])
    ap.add_argument("--refine-steps", type=int, default=2)
    ap.add_argument("--gap", action="store_true")
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--real-cells", type=int, default=60)
    ap.add_argument("--gap-N", type=int, default=2000)
    ap.add_argument("--gap-G", type=int, default=200)
    ap.add_argument("--gap-k", type=int, default=5)
    ap.add_argument("--gap-new", type=int, default=300)
    ap.add_argument("--gap-iter", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {"args": vars(args), "torch": torch.__version__}
    if path.exists():
        try:
            out = {**json.loads(path.read_text()), "args": vars(args)}
        except json.JSONDecodeError:
            pass
    if not args.skip_main:
        section_main(args, out, path)
    if not args.skip_throughput:
        section_throughput(args, out, path)
    if args.gap:
        section_gap(args, out, path)
    if args.real:
        section_real(args, out, path)
    if args.nuts:
        section_nuts(args, out, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
