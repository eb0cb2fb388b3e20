"""False-failure rate of the Laplace conditional SBC decision under an EXACT sampler (issue 16).

Rank sets with the dependence structure of the real SBC but exactly calibrated by construction:
the cells of the Laplace SBC (fixed globals of the cell design G=20, k=3, prior draws by
``sbc_tasks.draw_cell_prior``, posterior as in ``sbc_tasks.laplace_conditional_task``) get a
posterior q (the eta-marginal Laplace posterior); in each replicate the "true" (x, eta) of a
cell is one draw from q and the L ranked draws are L more draws from q. Truth and draws are then
i.i.d. from the same distribution, so every quantity's rank is exactly uniform, while the ranks of
x_1..x_G, eta and the log-likelihood of one simulation stay as dependent as in the real SBC.
Each replicate is scored by the harness's own code (``sbc_stats.sbc_table``: per-quantity ECDF
test; ``sbc_stats.sbc_verdict``: Holm family-wise verdict).

    OMP_NUM_THREADS=1 python validation/benchmarks/sbc_null_calibration.py --out FILE.json \
        [--sims 2000] [--replicates 200]
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pln_ref.eta_marginal import eta_marginal
from pln_ref.laplace import newton_map
from pln_ref.validation.design import simulate_cells
from pln_ref.validation.sbc_runner import sim_seed
from pln_ref.validation.sbc_stats import sbc_ranks, sbc_table, sbc_verdict
from pln_ref.validation.sbc_tasks import _loglik_draws, draw_cell_prior


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sims", type=int, default=2000)
    ap.add_argument("--replicates", type=int, default=200)
    ap.add_argument("--L", type=int, default=99)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    t0 = time.perf_counter()
    params, _ = simulate_cells(20, 3, 1, seed=0)  # the globals of run_sbc_laplace
    rows = [draw_cell_prior(params, sim_seed(a.seed, i)) for i in range(a.sims)]
    u = np.stack([r[0] for r in rows]).astype(float)
    log_L = np.array([r[3] for r in rows])
    post = eta_marginal(u, newton_map(u, params, log_L), log_L)
    rng = np.random.default_rng(a.seed)
    any_band_fail, holm_fail, n_band_fail, per_q = [], [], [], {}
    for rep in range(a.replicates):
        xs, es = post.sample(rng, a.L + 1)
        ll = _loglik_draws(u, xs, es)
        sims = {"rank_x": sbc_ranks(xs[0], xs[1:], rng), "rank_eta": sbc_ranks(es[0], es[1:], rng),
                "rank_loglik": sbc_ranks(ll[0], ll[1:], rng)}
        tab = sbc_table(sims, a.L, a.alpha)
        v = sbc_verdict(tab, a.alpha)["draws"]
        nf = sum(not r["passed"] for r in tab)
        n_band_fail.append(nf)
        any_band_fail.append(nf > 0)
        holm_fail.append(not v["passed"])
        for r in tab:
            per_q.setdefault(r["quantity"], []).append(not r["passed"])
        if (rep + 1) % 20 == 0:
            print(f"{rep + 1} replicates: any-band-fail {np.mean(any_band_fail):.3f}, "
                  f"Holm fail {np.mean(holm_fail):.3f}", flush=True)
    R = a.replicates
    m = len(per_q)
    res = {
        "design": {"sims": a.sims, "replicates": R, "L": a.L, "alpha": a.alpha, "seed": a.seed,
                   "posterior": "eta_marginal (truth and draws both from it: exact by construction)"},
        "m_quantities": m,
        "rate_any_quantity_outside_its_band": float(np.mean(any_band_fail)),
        "rate_holm_family_wise_fail": float(np.mean(holm_fail)),
        "mc_se_holm": float(np.sqrt(np.mean(holm_fail) * (1 - np.mean(holm_fail)) / R)),
        "mean_quantities_outside_band": float(np.mean(n_band_fail)),
        "independent_quantities_any_fail": 1 - (1 - a.alpha) ** m,
        "per_quantity_band_fail_rate": {q: float(np.mean(f)) for q, f in per_q.items()},
        "seconds": time.perf_counter() - t0,
    }
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "per_quantity_band_fail_rate"}, indent=1))


if __name__ == "__main__":
    main()
