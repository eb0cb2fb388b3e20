"""Where the outer L-BFGS's remaining error lives (issue 12): the curvature of the exact evidence
along chosen directions, relative to what the L-BFGS initial inverse Hessian H0 assumes, and the
per-gene couplings between the blocks (mu | W | s) that H0 leaves out.

The fit's tail converges linearly (real 2000 x 1000 counts, k = 10: the gap shrinks by about 0.75
per step from 5 nats/cell down to 5e-5). For L-BFGS on a near-quadratic objective that rate is set
by how the Hessian H of F = -L (z = (mu, vec W, s) coordinates of ``outer.lbfgs``) compares with
H0^{-1} (``outer.precondition.FisherPreconditioner``). ``outer_hessian.py`` forms H densely, for
small G only; this script works at any G with Hessian-vector products, by central differences
of the exact IFT gradient at the cached reference optimum z* (``results/reference_<case>.npz``,
Newton gtol 1e-9, step ``--h`` / max|v|). For a direction v it reports the generalised Rayleigh
quotient

    rho(v) = v^T H v / v^T H0^{-1} v        (H0^{-1} v by conjugate gradients on H0)

(only ratios between directions matter: L-BFGS rescales H0 by a scalar). Directions:
- structured ones: a uniform shift of mu, mu along the principal columns of W, W moved within its
  own column space (W -> W + W B, B symmetric or skew in W's principal basis; skew is the
  rotation null space, rho = 0);
- random directions in each block and in all of z (the bulk of the spectrum);
- the fit's own error z_i - z* at some of its evaluations i (the default fit of the case, its
  evaluation calls recorded as in ``bench_evals.py``), after aligning its W to the reference's by
  orthogonal Procrustes (the rotation is a null direction of H but not of H0), whole and split into
  its blocks and pairs of blocks. Where rho of the whole error is below rho of each of its block
  parts, H couples the blocks in the error's directions and H0, block-diagonal in (mu | W | s),
  does not model it.

Then, for a few genes g, the column of H for mu_g (one Hessian-vector product, scaled to sums
over cells): its own entry against ``LaplaceTerms.info_mu`` (what H0's diagonal curvature uses),
and the norms of the W and s entries of the same gene and of all other genes.

Usage (one BLAS thread; about a minute at 2000 x 1000, k = 10, plus the recorded fit)::

    python validation/benchmarks/outer_probe.py --case real1000 --out outer_probe_real1000.json
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESULTS = HERE / "results"


def make_hvp(fg, z: np.ndarray, ev, h: float, tol: float = 1e-9):
    """v -> H v, H the Hessian of F at z, by central differences of the exact gradient ``fg(z, tol)``
    (``lbfgs._negated_objective``) at z +- (h / max|v|) v, each side warm-started from the MAPs
    of ``ev``'s evaluation at z (kept here), so the two sides solve the same way."""
    fg(z, tol)
    x_ref, e_ref = ev.x_map.copy(), ev.eta_map.copy()

    def hvp(v: np.ndarray) -> np.ndarray:
        step = h / float(np.max(np.abs(v)))
        out = []
        for sgn in (1.0, -1.0):
            ev.set_warm_start(x_ref.copy(), e_ref.copy())
            out.append(fg(z + sgn * step * v, tol)[1])
        ev.set_warm_start(x_ref.copy(), e_ref.copy())
        return (out[0] - out[1]) / (2.0 * step)

    return hvp


def rayleigh_quotient(hvp, H0, v: np.ndarray) -> float:
    """rho(v) = v^T H v / v^T H0^{-1} v, H0^{-1} v by conjugate gradients on the operator H0
    (a callable on vectors, symmetric positive definite)."""
    from scipy.sparse.linalg import LinearOperator, cg

    P = len(v)
    op = LinearOperator((P, P), matvec=lambda q: H0(np.asarray(q, dtype=float).ravel()), dtype=float)
    w, info = cg(op, v, rtol=1e-8, maxiter=1000)
    if info != 0:
        raise RuntimeError(f"conjugate gradients on H0 did not reach rtol 1e-8 in 1000 iterations (info {info})")
    return float(v @ hvp(v)) / float(v @ w)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="real1000", help="a bench_speed case with a cached reference")
    ap.add_argument("--h", type=float, default=1e-4, help="finite-difference step, as max |h v|")
    ap.add_argument("--evals", default="0.4,0.6,0.8",
                    help="the fit's evaluations whose error is probed, as fractions of its evaluations")
    ap.add_argument("--genes", type=int, default=3, help="genes in the coupling table")
    ap.add_argument("--out", default=None, help="results file name under results/")
    args = ap.parse_args(argv)
    if not (np.isfinite(args.h) and args.h > 0):
        raise SystemExit(f"--h must be a positive finite step, got {args.h}")
    sys.path.insert(0, str(ROOT))
    sys.path.insert(1, str(HERE))
    import bench_evals
    import bench_speed as bs

    fracs = bs.float_list(args.evals, "--evals")
    if not all(0.0 <= f < 1.0 for f in fracs):
        raise SystemExit(f"--evals must be fractions in [0, 1), got {args.evals!r}")
    if args.genes < 1:
        raise SystemExit(f"--genes must be >= 1, got {args.genes}")
    from scipy.linalg import orthogonal_procrustes

    from pln_ref.fit_laplace import evaluation_block_cells
    from pln_ref.io import atomic_write_json
    from pln_ref.outer import lbfgs, precondition
    from pln_ref.outer.evaluate import Evaluator

    ref_path = bs.cached_reference_path(args.case)
    warnings.simplefilter("ignore")
    t_start = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:  # the default fit's evaluation calls (its iterates)
        rec_path = str(Path(tmp) / "calls.pkl")
        n_calls = bench_evals.record(args.case, rec_path)
        with open(rec_path, "rb") as fh:
            rec = pickle.load(fh)
    u, k, _ = bs.case_data(args.case)
    N, G = u.shape
    Gk, P = G * k, G * (k + 2)
    cap, la = rec["capture"], rec["log_anchor"]
    ref = np.load(ref_path)
    mu, W, d = ref["mu"], ref["W"], ref["d"]
    zs = lbfgs.to_z(mu, W, d)
    ev = Evaluator(u, la, cap, block_cells=evaluation_block_cells(G))
    fg = lbfgs._negated_objective(ev, G, k, {"failed": 0}, 1e-9)
    tol = 1e-9
    F_star = fg(zs, tol)[0]
    info_mu = ev.last_evaluation.terms.info_mu.copy()
    H0 = precondition.preconditioner(ev, zs, G, k, lbfgs.from_z, precondition.eta_prior_variance(cap, la))
    hvp = make_hvp(fg, zs, ev, args.h, tol)

    def rho(v):
        return rayleigh_quotient(hvp, H0, v)

    def vec(dmu=None, dW=None, ds=None):
        v = np.zeros(P)
        if dmu is not None:
            v[:G] = dmu
        if dW is not None:
            v[G:G + Gk] = np.asarray(dW).ravel()
        if ds is not None:
            v[G + Gk:] = ds
        return v

    rng = np.random.default_rng(0)
    _, sv, Vt = np.linalg.svd(W, full_matrices=False)
    Wp = W @ Vt.T  # the columns of W in its principal basis (strongest first)
    res: dict = {}
    res["mu: uniform shift"] = rho(vec(dmu=np.ones(G)))
    for a in sorted({0, k // 2, k - 1}):
        res[f"mu along principal column {a} of W"] = rho(vec(dmu=Wp[:, a]))
    for a, b in sorted({(0, 0), (k - 1, k - 1), (0, 1), (k - 2, k - 1), (0, k - 1)}):
        for kind in ("symmetric", "skew") if a != b else ("symmetric",):
            B = np.zeros((k, k))
            B[a, b], B[b, a] = 1.0, (1.0 if kind == "symmetric" else -1.0)
            res[f"W within its column space, {kind} ({a},{b})"] = rho(vec(dW=Wp @ B @ Vt))
    for i in range(2):
        res[f"random mu {i}"] = rho(vec(dmu=rng.normal(size=G)))
        res[f"random W {i}"] = rho(vec(dW=rng.normal(size=(G, k))))
        res[f"random s {i}"] = rho(vec(ds=rng.normal(size=G)))
        res[f"random z {i}"] = rho(rng.normal(size=P))
    errors = {}
    masks = {"mu": vec(dmu=np.ones(G)), "W": vec(dW=np.ones((G, k))), "s": vec(ds=np.ones(G))}
    for f in fracs:
        i = min(int(f * n_calls), n_calls - 1)
        mu_i, W_i, d_i, _ = rec["calls"][i]
        Q, _ = orthogonal_procrustes(W_i, W)
        e = lbfgs.to_z(mu_i, W_i @ Q, d_i) - zs
        eW = e[G:G + Gk].reshape(G, k)
        A = np.linalg.lstsq(W, eW, rcond=None)[0]
        row = {"evaluation": i, "objective_gap": float(fg(lbfgs.to_z(mu_i, W_i, d_i), tol)[0] - F_star),
               "rotation_to_reference": float(np.linalg.norm(Q - np.eye(k))), "whole": rho(e)}
        for name, m in (("mu", masks["mu"]), ("W", masks["W"]), ("s", masks["s"]),
                        ("mu+W", masks["mu"] + masks["W"]), ("W+s", masks["W"] + masks["s"]),
                        ("mu+s", masks["mu"] + masks["s"])):
            row[name] = rho(e * m)
        row["W in its column space"] = rho(vec(dW=W @ A))
        row["W outside it"] = rho(vec(dW=eW - W @ A))
        errors[f"evaluation {i}"] = row
        print(f"[{args.case}] error at evaluation {i}: " + ", ".join(f"{kk} {vv:.3g}" for kk, vv in row.items()),
              flush=True)
    order = np.argsort(-u.mean(axis=0), kind="stable")
    genes = [int(order[0]), int(order[G // 2]), int(order[-1])][:args.genes]
    genes += [int(g) for g in rng.choice(G, size=max(0, args.genes - len(genes)), replace=False)]
    coupling = {}
    for g in genes:
        Hc = hvp(vec(dmu=np.eye(G)[g])) * N  # column of H (sum over cells) for mu_g
        HW, Hs = Hc[G:G + Gk].reshape(G, k), Hc[G + Gk:]
        coupling[f"gene {g}"] = {
            "mean_count": float(u[:, g].mean()), "H_mu_mu_own": float(Hc[g]), "info_mu": float(info_mu[g]),
            "H_mu_mu_other_genes_norm": float(np.linalg.norm(np.delete(Hc[:G], g))),
            "H_W_mu_own_row_norm": float(np.linalg.norm(HW[g])),
            "H_W_mu_other_rows_norm": float(np.linalg.norm(np.delete(HW, g, axis=0))),
            "H_s_mu_own": float(Hs[g]), "H_s_mu_other_genes_norm": float(np.linalg.norm(np.delete(Hs, g)))}
        print(f"[{args.case}] gene {g}: " + ", ".join(f"{kk} {vv:.4g}" for kk, vv in coupling[f'gene {g}'].items()),
              flush=True)
    for kk, vv in res.items():
        print(f"  {kk:46s} {vv:10.4g}")
    commit = bs.short_commit()
    out = {"case": args.case, "N": N, "G": G, "k": k, "n_params": P, "fd_step": args.h, "commit": commit,
           "command": " ".join(["python"] + sys.argv), "loadavg": list(os.getloadavg()),
           "fit_evaluations": n_calls, "singular_values_W": [float(x) for x in sv],
           "rayleigh_quotients": res, "fit_errors": errors, "mu_columns": coupling,
           "cpu_s": time.process_time() - t_start}
    if args.out:
        atomic_write_json(RESULTS / args.out, out)
    else:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
