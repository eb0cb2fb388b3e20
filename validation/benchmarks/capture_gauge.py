"""Where a capture fit's evidence gap to its reference lives: the capture gauge (issue 12).

With capture, the likelihood depends on x and eta only through x - eta, so the family of globals

    mu -> mu + a 1,   W -> W + 1 b^T      (a scalar, b in R^k; d unchanged)

is matched cell by cell by eta -> eta + a + b^T z (z the cell's factor scores): the counts cannot
tell its members apart, and only eta's prior, TruncNormal(log M0 - log L_c, sigma_M, low = 0),
does. Along it the evidence is soft for a cell whose eta is far from the bound (curvature about
1 / sigma_M^2 per unit of a) and stiff for a cell whose eta posterior presses on the bound: the
truncation term log Phi(eta_hat sqrt(s)) of the Laplace evidence (``outer.evaluate``, s the
Schur precision of eta) changes on the scale 1 / sqrt(s), a few hundredths when a cell has
thousands of counts.

The script splits the difference between the default fit of a ``bench_speed`` case and the
case's cached reference (``results/reference_<case>.npz``) into its gauge part (a, b) and the
rest (``gauge_components``, after aligning the fit's W to the reference's by orthogonal
Procrustes), and reports:

- the evidence gap to the reference along the segment fit -> fit - t (a, b), t in ``--grid``,
  moving both, only a, and only b (t = 1 removes the fit's whole gauge part);
- the cells whose evidence changes most between t = 0 and t = 1, with eta_hat sqrt(s) (the
  distance of eta's mode from the bound in posterior SDs) at both ends;
- for the two cells that change most, their evidence and its terms (log p(u, xi*), -1/2 log det(-H),
  log Phi, s delta^2 / 2) on a grid of step 0.0125 in t, and the slope of l_c on both sides of the
  point where eta_hat reaches the bound;
- with ``--eta-marginal``, the same segment under the eta-integrated evidence
  (``eta_marginal.eta_marginal``, x by Laplace at each eta and eta by quadrature), which has no
  Gaussian truncation term: whether the shape of the segment comes from that term.

Usage (one BLAS thread; about a minute at 2000 x 1000, k = 10; a few more with --eta-marginal)::

    python validation/benchmarks/capture_gauge.py --case sim1000 --eta-marginal --out capture_gauge_sim1000.json
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = HERE / "results"


def gauge_components(mu_fit: np.ndarray, W_fit: np.ndarray, mu_ref: np.ndarray, W_ref: np.ndarray) -> dict:
    """The capture-gauge part of (mu_fit, W_fit) - (mu_ref, W_ref): W_fit is first rotated onto
    W_ref (orthogonal Procrustes, Q = argmin ||W_fit Q - W_ref||_F; W -> W Q leaves the model
    unchanged), then

        a = mean_g (mu_fit - mu_ref)_g,    b = mean_g (W_fit Q - W_ref)_g.     (least squares)

    Returns {"a", "b" (k,), "Q" (k, k), "W_fit_aligned", and the RMS of the differences before and
    after removing (a, b): "mu_rms", "mu_rms_rest", "W_rms", "W_rms_rest"}."""
    from scipy.linalg import orthogonal_procrustes

    Q, _ = orthogonal_procrustes(W_fit, W_ref)
    Wq = W_fit @ Q
    dmu, dW = mu_fit - mu_ref, Wq - W_ref
    a, b = float(dmu.mean()), dW.mean(axis=0)

    def rms(x):
        return float(np.sqrt(np.mean(x * x)))

    return {"a": a, "b": b, "Q": Q, "W_fit_aligned": Wq, "mu_rms": rms(dmu), "mu_rms_rest": rms(dmu - a),
            "W_rms": rms(dW), "W_rms_rest": rms(dW - b)}


def cell_evidence(u: np.ndarray, la: np.ndarray, capture, mu: np.ndarray, W: np.ndarray, d: np.ndarray) -> dict:
    """Per-cell Laplace evidence l_c (``evaluate.laplace_terms``, mean over cells: the fit's
    objective) at the globals (mu, W, d), from a cold ``laplace.newton_map`` at gtol 1e-9, with the
    posterior: {"value", "l" (N,), "eta" (N,) eta_hat, "s" (N,) its Schur precision, "post"}."""
    from pln_ref.laplace import newton_map
    from pln_ref.outer.evaluate import laplace_terms
    from pln_ref.params import PLNParams

    params = PLNParams(mu, W, d, capture)
    post = newton_map(u, params, la, gtol=1e-9)
    l = np.asarray(laplace_terms(u, params, la, post, with_grad=False).l)
    return {"value": float(np.mean(l)), "l": l, "eta": np.asarray(post.eta_map), "s": np.asarray(post.s),
            "post": post}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="sim1000", help="a bench_speed case with a cached reference")
    ap.add_argument("--grid", default="-0.5,-0.25,0,0.25,0.5,0.75,1,1.25,1.5",
                    help="comma-separated t of the segment fit - t (a, b)")
    ap.add_argument("--cells", type=int, default=8, help="cells in the attribution table")
    ap.add_argument("--eta-marginal", action="store_true", help="also the eta-integrated evidence on the segment")
    ap.add_argument("--out", default=None, help="results file name under results/")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(1, str(HERE))
    import bench_speed as bs

    grid = bs.float_list(args.grid, "--grid")
    if 0.0 not in grid or 1.0 not in grid:
        raise SystemExit(f"--grid must include 0 and 1, got {args.grid!r}")
    if args.cells < 1:
        raise SystemExit(f"--cells must be >= 1, got {args.cells}")

    from scipy.special import log_ndtr

    import pln_ref
    from pln_ref.io import atomic_write_json

    ref_path = bs.cached_reference_path(args.case)
    u, k, truth = bs.case_data(args.case)
    warnings.simplefilter("ignore")
    t_start = time.process_time()
    # the case's default fit as bench_speed runs it: the simulation's capture, or capture="auto"
    kw = {} if truth is None else {"M0": truth.capture.M0, "sigma_M": truth.capture.sigma_M}
    fit = pln_ref.fit(u, k=k, progress=False, **kw)
    cap = fit.params.capture
    if cap is None:
        raise SystemExit(f"the fit of case {args.case!r} has no capture: the capture gauge does not exist there")
    la = pln_ref.resolve_log_anchor(u)
    ref = np.load(ref_path)
    mu_r, W_r, L_ref = ref["mu"], ref["W"], float(ref["value"])
    mu_f, d_f = fit.params.mu, fit.params.d
    gc = gauge_components(mu_f, fit.params.W, mu_r, W_r)
    a, b, Wq = gc["a"], gc["b"], gc["W_fit_aligned"]
    seg = {"both": [], "a_only": [], "b_only": []}
    ends = {}
    for t in grid:
        for name, (ta, tb) in (("both", (t, t)), ("a_only", (t, 0.0)), ("b_only", (0.0, t))):
            if name != "both" and t == 0.0:
                seg[name].append(seg["both"][-1])
                continue
            r = cell_evidence(u, la, cap, mu_f - ta * a, Wq - tb * b[None, :], d_f)
            seg[name].append(L_ref - r["value"])
            if name == "both" and t in (0.0, 1.0):
                ends[t] = r
        print(f"[{args.case}] t {t:6.2f}: gap both {seg['both'][-1]:.3e}, a only {seg['a_only'][-1]:.3e}, "
              f"b only {seg['b_only'][-1]:.3e}", flush=True)
    dl = ends[1.0]["l"] - ends[0.0]["l"]
    dist0 = ends[0.0]["eta"] * np.sqrt(ends[0.0]["s"])
    dist1 = ends[1.0]["eta"] * np.sqrt(ends[1.0]["s"])
    top = np.argsort(-np.abs(dl))[:args.cells]
    near = dist0 < 3.0
    attribution = {
        "total_change_nats": float(dl.sum()),
        "cells_within_3_sd_of_bound_at_fit": int(near.sum()),
        # a share of a total that is round-off is not one
        "their_share_of_the_change": float(dl[near].sum() / dl.sum()) if abs(dl.sum()) > 1e-3 else None,
        "top_cells": [{"cell": int(c), "change_nats": float(dl[c]), "eta_hat_sqrt_s_fit": float(dist0[c]),
                       "eta_hat_sqrt_s_moved": float(dist1[c]), "s": float(ends[0.0]["s"][c])} for c in top]}
    share = attribution["their_share_of_the_change"]
    print(f"[{args.case}] change of sum_c l_c from t = 0 to 1: {dl.sum():.4g} nats; {int(near.sum())} cells "
          f"within 3 SD of the bound" + ("" if share is None else f" carry {share:.3g} of it"), flush=True)
    # the evidence terms of the two cells that change most, on a fine grid of the segment: the
    # slope of l_c flips where eta_hat reaches the bound (the interior formula keeps
    # -1/2 log det(-H) fixed along the gauge, the boundary formula evaluates it at eta = 0)
    fine = np.linspace(min(grid), max(grid), int(round((max(grid) - min(grid)) / 0.0125)) + 1)
    cells = top[:2]
    paths = {int(c): [] for c in cells}
    for t in fine:
        r = cell_evidence(u[cells], la[cells], cap, mu_f - t * a, Wq - t * b[None, :], d_f)
        post, sq = r["post"], np.sqrt(r["s"])
        arg = np.where(post.on_bound, post.delta * sq, r["eta"] * sq)
        for j, c in enumerate(cells):
            paths[int(c)].append({
                "t": float(t), "l": float(r["l"][j]), "on_bound": bool(post.on_bound[j]),
                "eta_hat": float(r["eta"][j]), "delta": float(post.delta[j]),
                "log_joint_at_map": float(post.objective[j]),
                "minus_half_logdet_negH": float(-0.5 * post.log_det_neg_H()[j]),
                "log_Phi": float(log_ndtr(arg[j])),
                "half_s_delta2": float(0.5 * r["s"][j] * post.delta[j] ** 2 if post.on_bound[j] else 0.0)})
    for c, rows in paths.items():
        l = np.array([row["l"] for row in rows])
        ob = np.array([row["on_bound"] for row in rows])
        if ob.any() and not ob.all():
            i = int(np.argmax(ob != ob[0]))  # first grid point on the other side of the bound
            h = fine[1] - fine[0]
            before = (l[i - 1] - l[i - 2]) / h if i >= 2 else float("nan")
            after = (l[i + 1] - l[i]) / h if i + 1 < len(l) else float("nan")
            print(f"[{args.case}] cell {c}: dl/dt {before:.3g} before and {after:.3g} after eta_hat reaches "
                  f"the bound at t = {fine[i]:.3g}", flush=True)
    marginal = None
    if args.eta_marginal:
        from pln_ref.eta_marginal import eta_marginal

        marginal = []
        for t in grid:
            r = cell_evidence(u, la, cap, mu_f - t * a, Wq - t * b[None, :], d_f)
            em = eta_marginal(u, r["post"], la)
            marginal.append(float(np.mean(em.log_evidence)))
            print(f"[{args.case}] t {t:6.2f}: eta-integrated evidence {marginal[-1]:.6f}", flush=True)
        m0 = marginal[grid.index(0.0)]
        marginal = {"value": marginal, "change_from_t0": [v - m0 for v in marginal]}
    commit = bs.short_commit()
    out = {"case": args.case, "N": int(u.shape[0]), "G": int(u.shape[1]), "k": k, "commit": commit,
           "command": " ".join(["python"] + sys.argv), "loadavg": list(os.getloadavg()),
           "capture": {"M0": cap.M0, "sigma_M": cap.sigma_M},
           "fit_steps": int(fit.diagnostics["steps"]), "fit_stopped": fit.diagnostics["stopped"],
           "reference_value": L_ref, "reference_stopped": str(ref["stopped"]),
           "gauge": {"a": a, "b": [float(x) for x in b], "b_norm": float(np.linalg.norm(b)),
                     **{kk: gc[kk] for kk in ("mu_rms", "mu_rms_rest", "W_rms", "W_rms_rest")}},
           "grid": grid, "gap_to_reference": seg, "attribution": attribution, "cell_paths": paths,
           "eta_integrated_evidence": marginal, "cpu_s": time.process_time() - t_start}
    if args.out:
        atomic_write_json(RESULTS / args.out, out)
    else:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
