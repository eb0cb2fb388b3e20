"""Laplace conditional SBC (pln_ref.validation.sbc_runs.run_sbc_laplace) of the Gaussian and the
eta-marginal Laplace posteriors on the same simulations (same seed, fixed globals of the cell
design G=20, k=3), in this process (no Dask workers). Issue 16. The summary holds, per posterior,
the family-wise (Holm) verdict of each family of quantities (posterior draws, PSIS-reweighted
draws; ``sbc_stats.sbc_verdict``) and every quantity's p-value. A rerun on the same --out only
re-analyses the stored simulations.

    OMP_NUM_THREADS=1 python validation/benchmarks/sbc_eta_marginal.py --out DIR [--sims 2000]
"""

import argparse
import json
import os
import time
from pathlib import Path

from pln_ref.validation.report import write_report
from pln_ref.validation.sbc_runs import run_sbc_laplace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sims", type=int, default=2000)
    ap.add_argument("--psis-draws", type=int, default=1000)
    ap.add_argument("--posteriors", nargs="+", default=["eta_marginal", "gaussian"],
                    help="gaussian, eta_marginal, or eta_marginal_skew (x | eta with the skew correction)")
    a = ap.parse_args()
    summary = {}
    for post in a.posteriors:
        out = Path(a.out) / post
        t0, c0 = time.perf_counter(), time.process_time()
        r = run_sbc_laplace(out, n_sims=a.sims, psis_draws=a.psis_draws, scheduler="synchronous",
                            progress=False, posterior=post)
        write_report(out, {"sbc_laplace": r})
        summary[post] = {"n_sims": r["n_sims"],
                         "family_wise": {f: {k: v[k] for k in ("passed", "m", "alpha", "rejected", "min_adjusted_p",
                                                               "n_failed_per_quantity", "p_floor")}
                                         for f, v in r["family_wise"].items()},
                         "outside_own_band": r["failed"],
                         "p_values": {row["quantity"]: row["p_value"] for row in r["table"]},
                         "p_holm": {row["quantity"]: row["p_holm"] for row in r["table"]},
                         "p_value_halves": {row["quantity"]: row["p_value_halves"] for row in r["table"]},
                         "psis_khat": r.get("psis_khat"), "wall_s": time.perf_counter() - t0,
                         "cpu_s": time.process_time() - c0, "loadavg": os.getloadavg()}
        print(post, json.dumps(summary[post], indent=1), flush=True)
    Path(a.out, "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
