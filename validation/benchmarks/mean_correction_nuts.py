"""x mean of the eta-marginal posterior with and without the mean correction of x | eta, against the
gated NUTS draws cached by ``pln-ref validate --parts cell`` (cell design G=20, k=3, 200 cells,
seed 0, library sizes 100-5000). Exact posterior means (``mean_x``), not draws, so no Monte Carlo
noise on the method's side; z = (method mean - NUTS mean) / NUTS SD per cell and gene.

    python -m pln_ref.cli validate --out runs/val_cell200 --parts cell --methods laplace --cells 200 --quiet
    OMP_NUM_THREADS=1 python validation/benchmarks/mean_correction_nuts.py runs/val_cell200/nuts_cells_cache.npz
"""

import json
import sys

import numpy as np

from pln_ref.eta_marginal import eta_marginal
from pln_ref.laplace import newton_map
from pln_ref.validation.design import simulate_cells


def main() -> None:
    params, sim = simulate_cells(20, 3, 200, lib_range=(100.0, 5000.0), seed=0)
    u, la = np.asarray(sim.counts, float), np.asarray(sim.log_anchor)
    with np.load(sys.argv[1]) as z:
        nx, passed = z["x"], z["passed"]
    idx = np.flatnonzero(passed)
    mn, sd = nx[:, idx].mean(0), nx[:, idx].std(0)
    g = newton_map(u[idx], params, la[idx])
    out = {"cells": int(idx.size)}
    for name, post in (("gaussian", g), ("eta_marginal", eta_marginal(u[idx], g, la[idx])),
                       ("eta_marginal_no_mean_correction", eta_marginal(u[idx], g, la[idx], mean_correction=False))):
        zz = (post.mean_x() - mn) / sd
        out[name] = {"median_abs_z": float(np.median(np.abs(zz))), "p90_abs_z": float(np.quantile(np.abs(zz), 0.9)),
                     "mean_z": float(zz.mean())}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
