"""How well candidate models of the outer Hessian precondition the L-BFGS fit (issue 12): the exact
Hessian of the Laplace evidence at the optimum against each model, by generalised eigenvalues.

The outer L-BFGS converges at a rate set by the spectrum of H0^{1/2} H H0^{1/2}, H the Hessian of
F = -L (L the mean Laplace evidence per cell) in the optimiser's coordinates z = (mu, vec W, s),
d = D_FLOOR + s^2 (``outer.lbfgs``), and H0 its initial inverse Hessian. This script forms H by
central differences of the exact IFT gradient (Newton gtol 1e-9, step ``--h``) at the cached
reference optimum of a ``bench_speed`` case (``results/reference_<case>.npz``; run ``bench_speed.py``
first), and compares these models M of H (H0 = M^{-1}):

- ``fisher``: the default H0 (``outer.precondition.FisherPreconditioner``);
- ``diagonal``: ``outer.precondition.diagonal_curvature``;
- ``exact_mu_W_s_blocks``: H itself, block-diagonal in (mu | W | s), its W block plus
  1e-3 tr(K)/k Sigma^{-1} (x) I (K = W^T Sigma^{-1} W), since that block carries the rotation null space;
- ``exact_gene_blocks``: H itself, block-diagonal over genes, one (k + 2) x (k + 2) block
  (mu_g, W_g, s_g) per gene;
- ``working_gene_blocks``, ``working_full``: the observed information of the Gaussian working
  model, per gene and whole. Each cell's counts, read at its MAP as Gaussian observations of x_c
  with precision Lambda_c (the IRLS working response y_c = x_c* + (u_c - lambda_c) / lambda_c), give
  y_c ~ N(mu, C_c) with P_c = C_c^{-1} = Sigma^{-1} - Sigma^{-1} Cov_c Sigma^{-1} (Cov_c the
  Laplace posterior covariance of x_c, eta included) and P_c (y_c - mu) = Sigma^{-1}(x_c* - mu) =
  alpha_c. The model is -d^2/dtheta^2 of sum_c log N(y_c | mu, C_c) at fixed y_c and Lambda_c:

      M_ij = -1/2 tr(P C_i P C_j) + alpha^T C_i P C_j alpha - 1/2 alpha^T C_ij alpha + 1/2 tr(P C_ij),
      M_mu,mu = P,   M_mu,j = P C_j alpha    (summed over cells / N),

  C_i = dC/dtheta_i (W_ga: e_g w_a^T + w_a e_g^T; s_g: 2 s_g e_g e_g^T). Formed densely here
  (O(N G^2 k^2), small G only); its indefinite directions are replaced by |eigenvalue| floored at
  1e-3 x the median positive eigenvalue.

Reported per model: the generalised eigenvalues of (H, M) without the k(k-1)/2 smallest (the
rotation null space W -> W Q of H): kappa (largest / smallest), the 5-95% spread, and the number
of outliers below 0.3 and above 3 times the median; for the working model, the relative Frobenius
error against H. The finite-difference Hessian (the costly part) is kept in
``validation/out/outer_hessian/H_<case>.npz`` with the point and step it was taken at, and reused
when both match, so a run that fails afterwards loses nothing. Usage (one BLAS thread; about 5 min
at 2000 x 200, k = 5)::

    python validation/benchmarks/outer_hessian.py --case real200 --out outer_hessian_real200.json

Measured on real 2000 x 200 counts, k = 5 (``results/outer_hessian_real200.json``): see that file and
the closing note of stop 27. In short, at the optimum the working model's full observed information
is within 7.6% of H (relative Frobenius) and clusters the spectrum best (5-95% spread 1.5 against 5.9
for the default H0); per-gene blocks alone cluster the bulk as well but leave about 30 cross-gene
directions (moves of mu along W and of W along its own column space) with 0.005-0.14 of the median.
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
import scipy.linalg as sla  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = ROOT / "validation" / "out" / "outer_hessian"
MAX_PARAMS = 4000  # dense P x P matrices: this diagnostic is for small G only


def fd_hessian(fg, z: np.ndarray, h: float, tol: float = 1e-9) -> tuple[np.ndarray, float]:
    """Central differences of the exact gradient, column by column; (symmetrised H, relative
    asymmetry of the raw differences)."""
    P = len(z)
    H = np.empty((P, P))
    for i in range(P):
        e = np.zeros(P)
        e[i] = h
        H[:, i] = (fg(z + e, tol)[1] - fg(z - e, tol)[1]) / (2 * h)
    asym = float(np.linalg.norm(H - H.T) / np.linalg.norm(H))
    return 0.5 * (H + H.T), asym


def working_information(params, post) -> np.ndarray:
    """The working model's observed information (module docstring), dense (G (k + 2))^2, in z =
    (mu, vec W, s) coordinates, averaged over the cells of ``post``."""
    from pln_ref.constants import D_FLOOR

    mu, W, d = params.mu, params.W, params.d
    G, k = W.shape
    P = G * (k + 2)
    s = np.sqrt(np.maximum(d - D_FLOOR, 0.0))
    lam = post.precision.lam
    Si = np.linalg.inv(W @ W.T + np.diag(d))
    alpha = (post.x_map - mu) @ Si
    M = np.zeros((P, P))
    iW, iS = slice(G, G + G * k), slice(G + G * k, P)
    Ik = np.eye(k)
    for c in range(lam.shape[0]):
        Ai = np.linalg.inv(np.diag(lam[c]) + Si)
        Cov = Ai
        if post.s is not None:  # eta: Cov = A^{-1} + b b^T / s, b = A^{-1} lambda
            b = Ai @ lam[c]
            Cov = Ai + np.outer(b, b) / post.s[c]
        Pc = Si - Si @ Cov @ Si
        B, z = Pc @ W, alpha[c]
        K, t = W.T @ B, W.T @ z
        R = Pc - np.outer(z, z)
        M[:G, :G] += Pc
        M[:G, iW] += (Pc[:, :, None] * t + B[:, None, :] * z[None, :, None]).reshape(G, G * k)
        M[:G, iS] += Pc * (2 * s * z)
        WW = (-np.einsum("gh,ab->gahb", R, K) - np.einsum("ha,gb->gahb", B, B)
              + np.einsum("gh,a,b->gahb", Pc, t, t) + np.einsum("a,h,gb->gahb", t, z, B)
              + np.einsum("g,b,ha->gahb", z, t, B) + np.einsum("gh,ab->gahb", R, Ik))
        M[iW, iW] += WW.reshape(G * k, G * k)
        Ws = (-2 * s * Pc[:, None, :] * B.T[None, :, :]
              + 2 * (s * z) * (Pc[:, None, :] * t[None, :, None] + z[:, None, None] * B.T[None, :, :]))
        M[iW, iS] += Ws.reshape(G * k, G)
        M[iS, iS] += -2 * np.outer(s, s) * Pc**2 + 4 * np.outer(s * z, s * z) * Pc + np.diag(np.diag(R))
    M /= lam.shape[0]
    return np.triu(M) + np.triu(M, 1).T


def spectrum(H: np.ndarray, M: np.ndarray, n_null: int) -> dict:
    """Generalised eigenvalues of (H, M) without the n_null smallest: kappa, spreads, outliers."""
    w = np.sort(sla.eigh(H, M, eigvals_only=True))[n_null:]
    med = float(np.median(w))
    return {"kappa": float(w[-1] / w[0]), "spread_5_95": float(np.percentile(w, 95) / np.percentile(w, 5)),
            "spread_10_90": float(np.percentile(w, 90) / np.percentile(w, 10)),
            "n_below_0.3_median": int(np.sum(w < 0.3 * med)), "n_above_3_median": int(np.sum(w > 3 * med)),
            "smallest": [float(x) for x in w[:5]], "largest": [float(x) for x in w[-5:]], "median": med}


def gene_blocks(M: np.ndarray, G: int, k: int) -> np.ndarray:
    """M restricted to its per-gene (mu_g, W_g, s_g) blocks."""
    out = np.zeros_like(M)
    for g in range(G):
        ii = np.array([g, *range(G + g * k, G + (g + 1) * k), G + G * k + g])
        out[np.ix_(ii, ii)] = M[np.ix_(ii, ii)]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="real200", help="a bench_speed case with a cached reference")
    ap.add_argument("--h", type=float, default=1e-4, help="finite-difference step in z")
    ap.add_argument("--out", default=None, help="results file name under results/")
    args = ap.parse_args(argv)
    if not (np.isfinite(args.h) and args.h > 0):
        raise SystemExit(f"--h must be a positive finite step, got {args.h}")
    sys.path.insert(0, str(ROOT))
    sys.path.insert(1, str(Path(__file__).resolve().parent))
    import bench_speed as bs

    import pln_ref
    from pln_ref.io import atomic_savez, atomic_write_json
    from pln_ref.laplace import newton_map
    from pln_ref.lowrank import LowRankCov
    from pln_ref.outer import lbfgs, precondition
    from pln_ref.outer.evaluate import Evaluator

    ref_path = bs.cached_reference_path(args.case)
    warnings.simplefilter("ignore")
    u, k, truth = bs.case_data(args.case)
    N, G = u.shape
    P = G * (k + 2)
    if P > MAX_PARAMS:
        raise SystemExit(f"G (k + 2) = {P} > {MAX_PARAMS}: this dense diagnostic is for small G")
    kw = {} if truth is None else {"M0": truth.capture.M0, "sigma_M": truth.capture.sigma_M}
    cap = pln_ref.fit(u, k=k, progress=False, n_steps=1, **kw).params.capture  # the fit's capture prior
    la = pln_ref.resolve_log_anchor(u) if cap is not None else None
    ref = np.load(ref_path)
    params = pln_ref.PLNParams(ref["mu"], ref["W"], ref["d"], cap)
    z = lbfgs.to_z(params.mu, params.W, params.d)
    ev = Evaluator(u, la, cap)
    fg = lbfgs._negated_objective(ev, G, k, {"failed": 0}, 1e-9)
    t0 = time.process_time()
    F0, g0 = fg(z, 1e-9)
    cache = CACHE / f"H_{args.case}.npz"
    hit = None
    if cache.exists():
        c = np.load(cache)
        if c["z"].shape == z.shape and np.array_equal(c["z"], z) and float(c["h"]) == args.h:
            hit = c
    if hit is not None:
        H, asym, cpu_h = hit["H"], float(hit["asym"]), float(hit["cpu_s"])
    else:
        H, asym = fd_hessian(fg, z, args.h)
        cpu_h = time.process_time() - t0
        atomic_savez(cache, {"H": H, "z": z, "h": np.array(args.h), "asym": np.array(asym),
                             "cpu_s": np.array(cpu_h)})
    fg(z, 1e-9)  # the preconditioner reads the evaluator's last evaluation (at z)
    n_null = k * (k - 1) // 2
    models = {}
    for kind in ("fisher", "diagonal"):
        D = precondition.preconditioner(ev, z, G, k, lbfgs.from_z, precondition.eta_prior_variance(cap, la), kind)
        H0 = np.column_stack([D(e) for e in np.eye(P)]) if callable(D) else np.diag(D)
        models[kind] = np.linalg.inv(0.5 * (H0 + H0.T))
    damp = np.zeros_like(H)  # a damping of the exact W block (the rotation null space), as in the docstring
    Wb = slice(G, G + G * k)
    C = LowRankCov(params.W, params.d).dense()
    Kf = params.W.T @ np.linalg.solve(C, params.W)
    damp[Wb, Wb] = precondition.DAMPING * np.trace(Kf) / k * np.kron(np.linalg.inv(C), np.eye(k))
    blocks = np.zeros_like(H)
    for a, b in ((0, G), (G, G + G * k), (G + G * k, P)):
        blocks[a:b, a:b] = H[a:b, a:b]
    models["exact_mu_W_s_blocks"] = blocks + damp
    models["exact_gene_blocks"] = gene_blocks(H, G, k)
    post = newton_map(u, params, la, gtol=1e-9)
    Mw = working_information(params, post)
    err = float(np.linalg.norm(Mw - H) / np.linalg.norm(H))
    w, V = np.linalg.eigh(Mw)
    Mw_psd = (V * np.maximum(np.abs(w), 1e-3 * np.median(w[w > 0]))) @ V.T
    models["working_full"] = Mw_psd
    wb = gene_blocks(Mw, G, k)
    wv, Vv = np.linalg.eigh(wb)
    models["working_gene_blocks"] = (Vv * np.maximum(wv, 1e-3 * np.median(wv[wv > 0]))) @ Vv.T
    out = {"case": args.case, "N": N, "G": G, "k": k, "n_params": P, "fd_step": args.h,
           "grad_inf_at_reference": float(np.abs(g0).max()), "fd_asymmetry": asym, "cpu_hessian_s": cpu_h,
           "working_rel_frobenius_error": err, "models": {}}
    print(f"{args.case}: N={N} G={G} k={k}, |g|_inf at the reference {out['grad_inf_at_reference']:.1e}, "
          f"FD asymmetry {asym:.1e}; working model vs H: relative Frobenius error {err:.3f}")
    for name, M in models.items():
        r = spectrum(H, M, n_null)
        out["models"][name] = r
        print(f"  {name:22s} kappa {r['kappa']:9.1f}  5-95% spread {r['spread_5_95']:6.2f}  "
              f"outliers <0.3 med {r['n_below_0.3_median']:3d} >3 med {r['n_above_3_median']:3d}")
    if args.out:
        atomic_write_json(RESULTS / args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
