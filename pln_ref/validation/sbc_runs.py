"""The two SBC runs of the validation: the conditional Laplace SBC (thousands of cells at fixed
globals, batched) and the joint NUTS SBC of ``pln_joint``; both resumable on Dask, each writing
its ECDF figures and a JSON file into the output directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import atomic_write_json
from .design import simulate_cells
from .sbc_runner import load_sims, run_sbc
from .sbc_stats import rank_columns, sbc_table, sbc_verdict
from .sbc_tasks import joint_nuts_task, laplace_conditional_task

__all__ = ["run_sbc_laplace", "run_sbc_joint", "power_caveat", "MIN_SIMS_FOR_POWER"]

MIN_SIMS_FOR_POWER = 100


def power_caveat(n_sims: int, n_quantities: int, alpha: float = 0.05) -> str | None:
    """The caveat printed with an SBC of fewer than ``MIN_SIMS_FOR_POWER`` simulations (None
    otherwise): with so few ranks the ECDF test has little power, so a pass says little, and under
    exact calibration about alpha * n_quantities quantities still fail by chance."""
    if n_sims >= MIN_SIMS_FOR_POWER:
        return None
    return (f"only {n_sims} simulations: too few for the ECDF test to be reliable either way (a pass "
            f"says little; about {alpha * n_quantities:.1f} of {n_quantities} quantities are expected to fail "
            "by chance even when calibrated); rerun with --sims of at least "
            f"{MIN_SIMS_FOR_POWER} (the validation uses 2000 Laplace / 200 joint) before reading the failures "
            "as miscalibration")


def _sbc_outputs(out: Path, sims: dict, L: int, title: str, alpha: float = 0.05) -> dict:
    """ECDF test table and figures of the stored simulations."""
    from .report import sbc_figures

    tab = sbc_table(sims, L, alpha)
    figs = sbc_figures(rank_columns(sims), L, alpha, out, title)
    n_fail = sum(not r["passed"] for r in tab)
    verdict = sbc_verdict(tab, alpha)
    return {"n_sims": int(len(sims["_index"])), "L": L, "alpha": alpha, "n_quantities": len(tab),
            "n_failed": n_fail, "failed": [r["quantity"] for r in tab if not r["passed"]],
            "family_wise": verdict, "passed_family_wise": {f: v["passed"] for f, v in verdict.items()},
            "expected_false_failures": alpha * len(tab), "table": tab, "figures": figs,
            "power_caveat": power_caveat(int(len(sims["_index"])), len(tab), alpha)}


def _psis_split(sims: dict, table: list[dict]) -> dict:
    """PSIS k-hat summary and the failed quantities of the Laplace draws and of the
    PSIS-reweighted draws (``psis_*``), separately."""
    kh = np.asarray(sims["khat"])
    res = {"psis_khat": {"share_lt_0.5": float(np.mean(kh < 0.5)), "share_lt_0.7": float(np.mean(kh < 0.7)),
                         "median": float(np.median(kh)), "worst": float(np.max(kh))}}
    for name, rows in (("laplace", [r for r in table if not r["quantity"].startswith("psis_")]),
                       ("psis", [r for r in table if r["quantity"].startswith("psis_")])):
        res[f"{name}_failed"] = [r["quantity"] for r in rows if not r["passed"]]
        res[f"{name}_n_quantities"] = len(rows)
    return res


def run_sbc_laplace(out_dir, *, n_sims: int = 2000, G: int = 20, k: int = 3, L: int = 99, seed: int = 0,
                    batch_size: int = 500, psis_draws: int = 1000, scheduler: str = "distributed",
                    scheduler_address=None, n_workers: int = 2, progress: bool = True,
                    posterior: str = "gaussian") -> dict:
    """Conditional SBC of the Laplace approximation at fixed globals (one simulation = one cell),
    resumable in out_dir/sbc_laplace. ``posterior="eta_marginal"`` ranks the eta-marginal
    posterior (``pln_ref.eta_marginal``) instead of the Gaussian one, ``"eta_marginal_skew"`` the
    eta-marginal posterior with the skew transform of x | eta. With ``psis_draws`` > 0 the same simulations also rank the
    PSIS-reweighted posterior (``psis_*`` quantities; see
    :func:`pln_ref.validation.sbc_tasks.laplace_conditional_task`)."""
    out = Path(out_dir)
    sub = out / "sbc_laplace"
    params, _ = simulate_cells(G, k, 1, seed=seed)
    cfg = {"mu": params.mu, "W": params.W, "d": params.d, "M0": params.capture.M0,
           "sigma_M": params.capture.sigma_M, "L": L, "psis_draws": psis_draws}
    if posterior != "gaussian":
        cfg["posterior"] = posterior
    run = run_sbc(laplace_conditional_task, n_sims, sub, base_seed=seed, config=cfg, batch_size=batch_size,
                  scheduler=scheduler, scheduler_address=scheduler_address, n_workers=n_workers,
                  progress=progress)
    sims = load_sims(sub, n_sims)
    res = _sbc_outputs(out, sims, L, "sbc_laplace")
    if "khat" in sims:
        res.update(_psis_split(sims, res["table"]))
    res.update(run=run, converged=int(np.sum(sims["converged"])),
               design={"G": G, "k": k, "L": L, "seed": seed, "batch_size": batch_size,
                       "psis_draws": psis_draws, "posterior": posterior},
               seconds_per_sim=float(np.mean(sims["_seconds"])))
    atomic_write_json(out / "sbc_laplace.json", res)
    return res


def run_sbc_joint(out_dir, *, n_sims: int = 200, N: int = 20, G: int = 4, k: int = 1, L: int = 99,
                  seed: int = 0, chains: int = 4, warmup: int = 1000, draws: int = 1000,
                  adapt_delta: float = 0.99, scheduler: str = "distributed", scheduler_address=None,
                  n_workers: int = 2, progress: bool = True) -> dict:
    """Joint NUTS SBC of pln_joint (see :func:`pln_ref.validation.sbc_tasks.joint_nuts_task`),
    resumable in out_dir/sbc_joint.

    Defaults measured: with warmup 500 and adapt_delta 0.9, 9.8% of 400 fits had 1-25 divergent
    transitions (11% failed the gate); rerunning 12 of those fits with warmup 1000 and
    adapt_delta 0.99 gave 0 divergences and a passed gate in all 12 (0.95: 3 still diverged)."""
    out = Path(out_dir)
    sub = out / "sbc_joint"
    cfg = {"N": N, "G": G, "k": k, "L": L, "chains": chains, "warmup": warmup, "draws": draws,
           "adapt_delta": adapt_delta}
    run = run_sbc(joint_nuts_task, n_sims, sub, base_seed=seed, config=cfg, batch_size=1,
                  scheduler=scheduler, scheduler_address=scheduler_address, n_workers=n_workers,
                  progress=progress)
    sims = load_sims(sub, n_sims)
    res = _sbc_outputs(out, sims, L, "sbc_joint")
    res.update(run=run, design=cfg, seed=seed,
               gate_pass_share=float(np.mean(sims["gate_passed"])),
               ess_ok_share=float(np.mean(sims["ess_ok"])),
               divergent_share=float(np.mean(sims["divergences"] > 0)),
               program_versions=sorted({str(v) for v in sims["program_sha"]}),
               seconds_per_sim=float(np.mean(sims["_seconds"])))
    atomic_write_json(out / "sbc_joint.json", res)
    return res
