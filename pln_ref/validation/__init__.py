"""The validation harness of pln-ref: approximate inference (Laplace, VAE) checked against gated
NUTS ground truth in Stan. Nothing in the fitting code imports this package.

Modules (one idea each):

    engines      Stan program lookup, BridgeStan models, NUTS (stanli / cmdstanpy / PyStan) as
                 ArviZ InferenceData, the BridgeStan gradient for ``newton_map``
    stancache    compiled CmdStan / BridgeStan products in a per-user cache (built once, locked)
    standata     data dicts and inits of stan/pln_cell.stan and stan/pln_joint.stan
    gate         the NUTS ground-truth gate (R-hat, ESS, divergences, E-BFMI)
    compare      method draws vs NUTS draws: mean error, SD ratio, coverage, W1
    psis         PSIS k-hat and reweighted moments of per-cell posteriors
    design       the simulation design (exogenous anchor)
    nuts_cells   per-cell NUTS ground truth and its cache
    runs         the validation runs: cells, joint, moments, engine agreement
    sbc_stats    SBC ranks, thinning, ECDF bands and test, the SBC table
    sbc_runner   the resumable Dask runner (seeds, atomic per-simulation files, manifest)
    sbc_tasks    the PLN SBC tasks and their prior draws
    sbc_runs     the Laplace and joint SBC runs
    sbc_plots    rank histograms and ECDF-difference plots
    report       figures and report.md / metrics.json
    cli          ``pln-ref validate`` and ``pln-ref sbc``

Importing the package loads neither matplotlib nor torch.
"""

from .compare import DrawComparison, compare_cells, compare_draws, corr_x_eta, summarise
from .design import simulate_cells
from .engines import (BridgeStanCellGradient, available_engines, bridgestan_model, default_engine,
                      real_stan_engine, sample_nuts, set_verbose, stan_program)
from .gate import (ForcedComparisonWarning, GateFailedError, GateResult, GateThresholds, check_gate,
                   combine_gates, require_gate)
from .nuts_cells import fit_cells_nuts
from .psis import cell_psis, psis, psis_moments
from .report import write_report
from .runs import run_cell_comparison, run_engine_agreement, run_joint, run_moments
from .sbc_runner import load_sims, run_sbc, sim_seed
from .sbc_runs import run_sbc_joint, run_sbc_laplace
from .sbc_stats import ecdf_band, ecdf_test, sbc_ranks, sbc_table, thin_draws
from .standata import pln_cell_data, pln_cell_unconstrain, pln_joint_data, pln_joint_inits

__all__ = [
    # NUTS and BridgeStan
    "sample_nuts", "bridgestan_model", "BridgeStanCellGradient", "stan_program", "default_engine",
    "available_engines", "real_stan_engine", "set_verbose",
    "pln_cell_data", "pln_cell_unconstrain", "pln_joint_data", "pln_joint_inits",
    # gate and comparisons
    "check_gate", "require_gate", "combine_gates", "GateResult", "GateThresholds", "GateFailedError",
    "ForcedComparisonWarning", "compare_cells", "compare_draws", "DrawComparison", "summarise",
    "corr_x_eta", "cell_psis", "psis", "psis_moments",
    # SBC
    "run_sbc", "load_sims", "sim_seed", "sbc_ranks", "thin_draws", "ecdf_band", "ecdf_test", "sbc_table",
    # validation runs and report
    "simulate_cells", "fit_cells_nuts", "run_cell_comparison", "run_joint", "run_moments",
    "run_engine_agreement", "run_sbc_laplace", "run_sbc_joint", "write_report",
]
