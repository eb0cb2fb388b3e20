"""Gaussian vs eta-marginal Laplace posterior against gated per-cell NUTS on 6 cells of the
simulated design at G=200, k=5 (4 chains x 500/500): the log-determinant term moves the eta
marginal's mode by about 1 SD at this G. Writes runs/nuts_g200.json (issue 16, one-off).

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python validation/benchmarks/nuts_g200_eta_marginal.py
"""
import os
import numpy as np, json, time
from pln_ref.validation.design import simulate_cells
from pln_ref.validation.nuts_cells import fit_cells_nuts
from pln_ref.laplace import newton_map
from pln_ref.eta_marginal import eta_marginal
params, sim = simulate_cells(200, 5, 6, seed=0)
u, la = np.asarray(sim.counts, float), np.asarray(sim.log_anchor)
t=time.time()
nuts = fit_cells_nuts(u, params, la, chains=4, warmup=500, draws=500, progress=False)
g = newton_map(u, params, la); em = eta_marginal(u, g, la)
ne = nuts["eta"]; sd = ne.std(0, ddof=1)
out = {"passed": nuts["passed"].tolist(), "seconds": time.time()-t, "lib": np.exp(la).round().tolist(),
       "gauss_eta_z": ((g.eta_mean_var()[0]-ne.mean(0))/sd).round(3).tolist(),
       "em_eta_z": ((em.eta_mean_var()[0]-ne.mean(0))/sd).round(3).tolist(),
       "gauss_eta_sdratio": (np.sqrt(g.eta_mean_var()[1])/sd).round(3).tolist(),
       "em_eta_sdratio": (np.sqrt(em.eta_mean_var()[1])/sd).round(3).tolist(),
       "gauss_x_med_abs_z": float(np.median(np.abs((g.mean_x()-nuts["x"].mean(0))/nuts["x"].std(0, ddof=1)))),
       "em_x_med_abs_z": float(np.median(np.abs((em.mean_x()-nuts["x"].mean(0))/nuts["x"].std(0, ddof=1)))),
       "gauss_x_sdratio_range": [float(np.min(g.sd_x()/nuts["x"].std(0, ddof=1))), float(np.max(g.sd_x()/nuts["x"].std(0, ddof=1)))],
       "em_x_sdratio_range": [float(np.min(em.sd_x()/nuts["x"].std(0, ddof=1))), float(np.max(em.sd_x()/nuts["x"].std(0, ddof=1)))],
       "reasons": [gg.reasons for gg in nuts["gates"]]}
print(json.dumps(out, indent=1))
json.dump(out, open(os.environ.get("OUT", "nuts_g200.json"), "w"), indent=1)
