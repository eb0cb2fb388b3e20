"""pln-ref: reference implementation of the Poisson log-normal model with capture.

    x ~ N(mu, W W^T + diag(d)),  eta ~ TruncN(log M0 - log L, sigma_M^2, low=0),
    u_g | x, eta ~ Poisson(exp(x_g - eta)).

The user's API is what this module exports (``__all__``):

- fitting: ``fit`` (Laplace or VAE inference) with the method's options (``LaplaceConfig`` /
  ``VAEConfig``), its results ``LaplaceResult`` / ``VAEResult`` (one protocol, ``PLNResult``;
  per-cell posteriors follow ``CellPosterior``), ``ConvergenceWarning``, ``OutlierCellsWarning``,
  ``TrainingDivergedError``, and
  ``ppc_summary`` / ``posterior_predictive`` (posterior predictive checks);
- the model: ``PLNParams``, ``Capture``, ``simulate`` / ``Simulation`` / ``random_params``, the
  closed-form moments ``pln_mean`` / ``pln_variance`` / ``pln_covariance`` / ``moment_zscores``
  and the ``method_of_moments`` start;
- input handling: ``as_counts``, ``check_genes_cells``, ``total_counts``, ``resolve_log_anchor``;
- new cells and model choice: ``result.transform`` / ``result.score_samples`` (``pln_ref.newcells``)
  and ``select_rank`` (rank k by held-out log-likelihood, ``pln_ref.select``);
- the validation harness: the subpackage ``pln_ref.validation`` (imported on first use).

Solver internals (per-cell Newton, low-rank algebra, the outer optimiser) live in their modules:
``pln_ref.laplace``, ``pln_ref.lowrank``, ``pln_ref.fit_laplace``, ``pln_ref.model``.
"""

from __future__ import annotations

import importlib

from .anchor import resolve_log_anchor
from .api import fit, resolve_capture
from .config import LaplaceConfig, VAEConfig
from .data import as_counts, check_genes_cells, total_counts
from .exceptions import ConvergenceWarning, OutlierCellsWarning, TrainingDivergedError
from .moments import method_of_moments, moment_zscores, pln_covariance, pln_mean, pln_variance
from .params import Capture, PLNParams
from .ppc import posterior_predictive, ppc_summary
from .protocol import CellPosterior, PLNResult
from .results import LaplaceResult
from .select import select_rank
from .simulation import Simulation, random_params, simulate
from .vae import VAEResult, fit_vae

__all__ = [
    "fit", "LaplaceConfig", "VAEConfig", "PLNResult", "LaplaceResult", "VAEResult", "CellPosterior",
    "fit_vae", "ppc_summary", "posterior_predictive", "ConvergenceWarning",
    "OutlierCellsWarning", "TrainingDivergedError",
    "PLNParams", "Capture", "simulate", "Simulation", "random_params",
    "pln_mean", "pln_variance", "pln_covariance", "moment_zscores", "method_of_moments",
    "as_counts", "check_genes_cells", "total_counts", "resolve_log_anchor", "resolve_capture",
    "select_rank",
]
__version__ = "0.1.0"

_LAZY_SUBPACKAGES = ("validation",)  # the harness imports Stan engines: loaded on first use


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'pln_ref' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBPACKAGES))
