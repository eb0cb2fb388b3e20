"""Posterior predictive check coverage of every PPC mode, on simulated and on real counts.

Simulated: a PLN with capture (``--genes`` x ``--cells``, rank ``--k``), fitted by pln-ref at the
true rank with the simulation's capture prior and anchors; the checks run (a) at the fitted
globals and (b) at the true globals (the per-cell Laplace posteriors by ``newton_map``), so the
effect of the posterior approximation is separated from that of the fit.
Real (``--real-select-dir``): the pln-ref fit at the selected k written by ``bench_heldout.py``
or ``pln_ref.select_rank`` (its training cells) on ``pyPLNmodels.load_scrna`` counts.

For every mode (``pln_ref.ppc.PPC_MODES``): the share of genes whose observed mean, variance and
zero fraction lie inside the central 95% interval of ``--replicates`` replicates, the share of
library-size order statistics inside their band, CPU seconds, and the plain-language findings;
plus the per-gene zero-fraction-vs-mean plot for the "joint" and "joint_is" modes. Row
"joint_skew": mode "joint" with ``skew=True`` (x | eta skew-corrected, ``pln_ref.eta_marginal``).

Also measured: the bias of the Laplace posterior's eta marginal, E_p[eta | u] - E_q[eta | u] by
importance sampling (PSIS weights), against the first-order log-determinant (Occam) term
1/2 sum_g diag(A^{-1})_g lambda_g bbar_g / s that the joint-mode Laplace approximation omits.

    OMP_NUM_THREADS=1 python validation/benchmarks/ppc_report.py --out validation/benchmarks/results/ppc
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

MODES = ("map", "fixed_eta", "joint_gaussian", "joint", "joint_skew", "joint_is", "predictive")
# "joint_skew": mode "joint" with ppc_summary(..., skew=True) (x | eta with the Laplace third cumulants)


def coverage_rows(label, counts, obj, args, outdir: Path, plots: bool) -> list[dict]:
    import matplotlib.pyplot as plt

    from pln_ref.ppc import plot_ppc, plot_zero_fraction, ppc_summary

    rows = []
    for mode in MODES:
        c0 = time.process_time()
        s = ppc_summary(counts, obj, n_samples=args.replicates, mode=mode.replace("_skew", ""), seed=args.seed,
                        skew=mode == "joint_skew")
        cpu = time.process_time() - c0
        row = {"data": label, "mode": mode, **{k: float(v) for k, v in s.coverage95.items()},
               "cpu_s": cpu, "findings": s.findings()}
        rows.append(row)
        print(f"{label:34s} {mode:10s} mean {row['mean']:.3f} var {row['var']:.3f} zero {row['zero_frac']:.3f} "
              f"total {row['total_counts']:.3f}  ({cpu:.1f} s CPU)", flush=True)
        if plots and mode in ("joint_gaussian", "joint", "joint_is", "predictive"):
            tag = label.replace(" ", "_").replace(",", "").replace("=", "")
            plt.close(plot_zero_fraction(s, outdir / f"zero_fraction_{tag}_{mode}.png"))
            plt.close(plot_ppc(s, outdir / f"ppc_{tag}_{mode}.png"))
            print(s.report(), flush=True)
    return rows


def eta_bias(post, counts, params, log_anchor, n_draws=1000, seed=0) -> dict:
    """E_p eta - E_q eta by PSIS-weighted Laplace draws vs the first-order Occam term."""
    from pln_ref.importance import exact_log_joint_draws, psis

    idx = np.arange(min(300, post.N))
    q = post.subset(idx)
    x, eta = q.sample(np.random.default_rng(seed), n_draws)
    lr = exact_log_joint_draws(counts[idx], x, eta, params, log_anchor[idx]) - q.logpdf(x, eta)
    w = np.exp(psis(lr).lw)
    w /= w.sum(0)
    shift = (w * eta).sum(0) - eta.mean(0)
    occam = 0.5 * np.sum(q.precision.inv_diag() * q.precision.lam * q.bbar, 1) / q.s
    return {"n_cells": int(idx.size), "median_shift_is": float(np.median(shift)),
            "median_occam_term": float(np.median(occam)), "corr": float(np.corrcoef(shift, occam)[0, 1]),
            "median_eta_sd": float(np.median(1 / np.sqrt(q.s)))}


def rate_excess(post, counts, params, log_anchor, n_draws=200, block=100, seed=0) -> dict:
    """Where mode "joint" over-replicates: per cell and gene the expected replicated count
    E_q e^{x - eta} under the eta-marginal posterior q (skew off) against E_p by PSIS-reweighting
    the same draws to the exact posterior; every cell, by blocks. Reports the per-cell expected
    total against the observed library size L_c, the share of the excess E_q - E_p carried by
    zero counts, the genes carrying most of it (with their d_g) and the PSIS k-hat of q."""
    from pln_ref.eta_marginal import eta_marginal
    from pln_ref.importance import exact_log_joint_draws, psis

    rng = np.random.default_rng(seed)
    N, G = counts.shape
    eq, ep, khat = np.zeros((N, G)), np.zeros((N, G)), np.zeros(N)
    for lo in range(0, N, block):
        idx = np.arange(lo, min(N, lo + block))
        q = eta_marginal(counts[idx], post.subset(idx), log_anchor[idx])
        x, eta = q.sample(rng, n_draws)
        lr = exact_log_joint_draws(counts[idx], x, eta, params, log_anchor[idx]) - q.logpdf(x, eta)
        ps = psis(lr)
        w = np.exp(ps.lw)
        w /= w.sum(0)
        rate = np.exp(x - eta[..., None])
        eq[idx], ep[idx], khat[idx] = rate.mean(0), (w[..., None] * rate).sum(0), ps.khat
    L = counts.sum(1)
    rq, rp = np.log(eq.sum(1) / L), np.log(ep.sum(1) / L)
    exc = eq - ep
    zero = counts == 0
    by_gene = exc.sum(0)
    top = np.argsort(-by_gene)[:3]
    return {"n_cells": int(N), "n_draws": n_draws,
            "median_log_Eq_total_over_L": float(np.median(rq)), "q99_log_Eq_total_over_L": float(np.quantile(rq, 0.99)),
            "median_log_Ep_total_over_L": float(np.median(rp)), "q99_log_Ep_total_over_L": float(np.quantile(rp, 0.99)),
            "sum_Eq_total_over_sum_L": float(eq.sum() / L.sum()), "sum_Ep_total_over_sum_L": float(ep.sum() / L.sum()),
            "excess_share_zero_counts": float(exc[zero].sum() / exc.sum()),
            "top_genes": top.tolist(), "top_genes_excess_share": (by_gene[top] / exc.sum()).round(3).tolist(),
            "top_genes_d": np.asarray(params.d)[top].round(2).tolist(),
            "top_genes_zero_fraction": zero[:, top].mean(0).round(3).tolist(),
            "median_d_all_genes": float(np.median(params.d)),
            "share_cells_khat_gt_0.7": float(np.mean(khat > 0.7))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genes", type=int, default=200)
    ap.add_argument("--cells", type=int, default=2000)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--mean-log-rate", type=float, default=0.0)
    ap.add_argument("--replicates", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-steps", type=int, default=2000)
    ap.add_argument("--real-select-dir", default=None,
                    help="bench_heldout's scrna_top<G>/select directory (uses its chosen-k fit, and its "
                         "chosen sigma_M when select_rank chose one)")
    ap.add_argument("--skip-sim", action="store_true")
    ap.add_argument("--out", default="validation/benchmarks/results/ppc")
    args = ap.parse_args(argv)

    import pln_ref
    from pln_ref.io import atomic_write_json, atomic_write_text
    from pln_ref.laplace import newton_map

    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    print(f"load average {os.getloadavg()}", flush=True)
    rows, extra = [], {}
    if not args.skip_sim:
        p = pln_ref.random_params(args.genes, args.k, seed=2026, capture=True, mean_log_rate=args.mean_log_rate)
        sim = pln_ref.simulate(p, args.cells, seed=2027)
        keep = sim.counts.sum(1) > 0
        u, la = sim.counts[keep], sim.log_anchor[keep]
        print(f"simulated: {u.shape[0]} cells x {u.shape[1]} genes, zeros {100 * np.mean(u == 0):.0f}%", flush=True)
        c0 = time.process_time()
        res = pln_ref.fit(u, k=args.k, M0=p.capture.M0, sigma_M=p.capture.sigma_M, library_size=np.exp(la),
                          progress=False, n_steps=args.n_steps)
        extra["sim_fit_cpu_s"] = time.process_time() - c0
        post_true = newton_map(u, p, la)
        rows += coverage_rows("simulated, fitted globals", u, res, args, outdir, plots=True)
        rows += coverage_rows("simulated, true globals", u, post_true, args, outdir, plots=False)
        extra["eta_bias_simulated_true_globals"] = eta_bias(post_true, u, p, la)
        print("eta bias (simulated, true globals):", extra["eta_bias_simulated_true_globals"], flush=True)
        extra["rate_excess_simulated_fitted"] = rate_excess(res.posterior, u, res.params, res.posterior.log_anchor)
        print("rate excess of mode joint (simulated, fitted):", extra["rate_excess_simulated_fitted"], flush=True)
        atomic_write_json(outdir / "ppc_report.json", {"args": vars(args), "rows": rows, **extra})
    if args.real_select_dir:
        sys.path.insert(0, str(Path(__file__).parent))
        import json

        from bench_heldout import datasets
        from pln_ref.select import holdout_splits, result_file

        d = Path(args.real_select_dir)
        sel = json.loads((d / "selection.json").read_text())
        chosen, sig = sel["chosen_k"], sel.get("chosen_sigma_M")  # sigma_M: chosen with k, if it was
        res = pln_ref.PLNResult.load(result_file(d, chosen, sig))
        ns = argparse.Namespace(subsets=["top"], cells=args.cells, genes=args.genes, sim=False)
        u = next(iter(datasets(ns).values()))
        te = holdout_splits(u.shape[0], 0.2, None, 0)[0]
        tr = np.setdiff1d(np.arange(u.shape[0]), te)
        label = f"real scRNA {tr.size}x{u.shape[1]}, k={chosen}" + ("" if sig is None else f", sigma_M={sig:g}")
        print(label, flush=True)
        rows += coverage_rows(label, u[tr], res, args, outdir, plots=True)
        extra["eta_bias_real"] = eta_bias(res.posterior, u[tr], res.params, res.posterior.log_anchor)
        print("eta bias (real):", extra["eta_bias_real"], flush=True)
        extra["rate_excess_real"] = rate_excess(res.posterior, u[tr], res.params, res.posterior.log_anchor)
        print("rate excess of mode joint (real):", extra["rate_excess_real"], flush=True)
    atomic_write_json(outdir / "ppc_report.json", {"args": vars(args), "rows": rows, **extra})
    lines = ["| data | mode | gene means | variances | zero fractions | library-size order stats | CPU s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['mode']} | {100 * r['mean']:.1f}% | {100 * r['var']:.1f}% | "
                     f"{100 * r['zero_frac']:.1f}% | {100 * r['total_counts']:.1f}% | {r['cpu_s']:.1f} |")
    lines.append("")
    lines.append("Share inside the central 95% interval of the replicates "
                 f"({args.replicates} replicates per mode).")
    for key, val in extra.items():
        lines.append(f"- {key}: {val}")
    text = "\n".join(lines)
    print("\n" + text)
    atomic_write_text(outdir / "ppc_report.md", text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
