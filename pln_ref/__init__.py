"""pln-ref: reference implementation of the Poisson log-normal model with capture.

    x ~ N(mu, W W^T + diag(d)),  eta ~ TruncN(log M0 - log L, sigma_M^2, low=0),
    u_g | x, eta ~ Poisson(exp(x_g - eta)).

Entry point: ``pln_ref.fit(data, model="pln", inference_method="laplace" | "vae", k=...)``.
"""

from .api import fit, resolve_capture
from .config import LaplaceConfig, VAEConfig
from .data import as_counts, check_genes_cells, library_size
from .laplace import CellPosteriors, newton_map
from .lowrank import LowRankCov, PosteriorPrecision
from .moments import method_of_moments, moment_zscores, pln_covariance, pln_mean, pln_variance
from .exceptions import ConvergenceWarning
from .params import Capture, PLNParams
from .protocol import CellPosterior, PLNResult
from .results import LaplaceResult
from .simulate import Simulation, random_params, simulate

__all__ = [
    "fit", "resolve_capture", "as_counts", "check_genes_cells", "library_size",
    "CellPosteriors", "newton_map", "LowRankCov", "PosteriorPrecision",
    "method_of_moments", "moment_zscores", "pln_covariance", "pln_mean", "pln_variance",
    "Capture", "PLNParams", "LaplaceResult", "Simulation", "random_params", "simulate",
    "LaplaceConfig", "VAEConfig", "PLNResult", "CellPosterior", "ConvergenceWarning",
]
__version__ = "0.1.0"


def __getattr__(name):  # torch is imported only when the VAE is used
    if name in ("fit_vae", "VAEResult", "VAEPosterior"):
        from . import vae

        return getattr(vae, name)
    raise AttributeError(f"module 'pln_ref' has no attribute {name!r}")
