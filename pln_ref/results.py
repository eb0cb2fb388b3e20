"""The fitted Laplace result: globals, per-cell posteriors, diagnostics, exports, save/load.

Factor scores (``factor_scores``) are the posterior mean of z given the MAP log-rates under
x = mu + W z + sqrt(d) eps, z ~ N(0, I):  E[z | x] = K^{-1} W^T D (x - mu), K = I + W^T D W.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .io import atomic_savez
from .laplace import CellPosteriors
from .lowrank import LowRankCov
from .model import eta_schur, neg_hessian
from .params import Capture, PLNParams

__all__ = ["LaplaceResult", "FittedGlobals"]


class FittedGlobals:
    """Accessors shared by every fitted result (needs ``params`` and ``eta_map``)."""

    params: PLNParams

    @property
    def mu(self) -> np.ndarray:
        return self.params.mu

    @property
    def W(self) -> np.ndarray:
        return self.params.W

    @property
    def d(self) -> np.ndarray:
        return self.params.d

    @property
    def k(self) -> int:
        return self.params.k

    @property
    def sigma(self) -> LowRankCov:
        """Sigma = W W^T + diag(d) as a low-rank object (``.dense()`` only on request)."""
        return LowRankCov(self.params.W, self.params.d)

    def sigma_dense(self) -> np.ndarray:
        return self.params.sigma_dense()

    def correlation(self) -> np.ndarray:
        """Dense G x G gene-gene correlation of the log-rates (on request)."""
        return self.params.correlation_dense()

    @property
    def capture_probability(self) -> np.ndarray:
        """e^{-eta}: the capture efficiency of each cell at its point estimate."""
        return np.exp(-self.eta_map)


@dataclass
class LaplaceResult(FittedGlobals):
    """Result of ``pln_ref.fit(..., inference_method="laplace")``.

    Attributes
    ----------
    params : fitted PLNParams (mu, W, d, capture).
    cells : CellPosteriors at the fitted globals (x_map, eta_map, precision, diagnostics).
    history : (n_steps, 3) array of (step, objective, smoothed objective); the objective is the
        per-cell mean Laplace log evidence (see ``fit_laplace``).
    settings : dict of the fit's settings; diagnostics : dict of convergence diagnostics.
    init : the method-of-moments start.
    """

    params: PLNParams
    cells: CellPosteriors
    history: np.ndarray
    settings: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    init: PLNParams | None = None
    gene_names: list | None = None
    cell_names: list | None = None

    inference_method = "laplace"

    # --- per cell -----------------------------------------------------------------------------
    @property
    def x_map(self) -> np.ndarray:
        return self.cells.x_map

    @property
    def eta_map(self) -> np.ndarray:
        return self.cells.eta_map

    def sd_x(self, eta: str = "free") -> np.ndarray:
        """Per-cell posterior SD of x: sqrt(diag A^{-1} [+ b^2 Var eta]), O(N G k^2)."""
        return self.cells.sd_x(eta)

    def factor_scores(self) -> np.ndarray:
        """E[z | x_map] = K^{-1} W^T D (x_map - mu), shape (N, k)."""
        cov = self.sigma
        return ((self.x_map - self.mu) @ cov.V) @ cov.K_inv

    def sample_x(self, rng: np.random.Generator | int, n_draws: int, eta: str = "free"):
        """Draws (x (S,N,G), eta (S,N)) from the Laplace posterior (square-root factor, no G x G)."""
        rng = np.random.default_rng(rng)
        return self.cells.sample(rng, n_draws, eta=eta)

    def denoised(self, eta: str = "free") -> np.ndarray:
        """Denoised expression E[e^{x}] under the Laplace posterior, shape (N, G)."""
        return self.cells.expected_exp_x(eta)

    # --- exports ------------------------------------------------------------------------------
    def to_arviz(self, n_draws: int = 500, seed: int = 0):
        """InferenceData with Laplace draws of x and eta (one 'chain') and the fitted globals
        as constant_data."""
        import arviz as az

        x, e = self.sample_x(seed, n_draws)
        N, G = self.x_map.shape
        cells = self.cell_names or list(range(N))
        genes = self.gene_names or list(range(G))
        return az.from_dict(
            posterior={"x": x[None], "eta": e[None]},
            coords={"cell": cells, "gene": genes, "factor": list(range(self.params.k))},
            dims={"x": ["cell", "gene"], "eta": ["cell"], "mu": ["gene"], "W": ["gene", "factor"],
                  "d": ["gene"]},
            constant_data={"mu": self.mu, "W": self.W, "d": self.d},
            attrs={"inference": "laplace", "source": "pln_ref"},
        )

    def to_anndata(self, adata=None, *, key: str = "pln"):
        """Write the fit into an AnnData (created from x_map's shape if not given).

        obsm[X_{key}_z] factor scores, obsm[X_{key}_map] MAP log-rates, obsm[X_{key}_sd] posterior
        SDs, obs[{key}_eta_map], obs[{key}_capture_prob], varm[{key}_W], var[{key}_mu, {key}_d],
        layers[{key}_denoised] E[e^x], uns[key] settings + diagnostics + history.
        """
        import anndata as ad

        N, G = self.x_map.shape
        if adata is None:
            adata = ad.AnnData(X=np.zeros((N, G), dtype=np.float32))
        if adata.shape != (N, G):
            raise ValueError(f"AnnData has shape {adata.shape} but the fit has (cells, genes) = {(N, G)}")
        adata.obsm[f"X_{key}_z"] = self.factor_scores()
        adata.obsm[f"X_{key}_map"] = self.x_map
        adata.obsm[f"X_{key}_sd"] = self.sd_x()
        adata.obs[f"{key}_eta_map"] = self.eta_map
        adata.obs[f"{key}_capture_prob"] = self.capture_probability
        adata.obs[f"{key}_converged"] = self.cells.converged
        adata.varm[f"{key}_W"] = self.W
        adata.var[f"{key}_mu"] = self.mu
        adata.var[f"{key}_d"] = self.d
        adata.layers[f"{key}_denoised"] = self.denoised()
        adata.uns[key] = {
            "inference_method": "laplace",
            "settings": json.dumps(self.settings),
            "diagnostics": json.dumps(self.diagnostics),
            "history": np.asarray(self.history, dtype=float),
        }
        return adata

    def summary(self) -> str:
        dg = self.diagnostics
        lines = [
            f"PLN Laplace fit: {self.x_map.shape[0]} cells x {self.params.G} genes, k={self.params.k}",
            f"  objective (mean Laplace log evidence per cell): {dg.get('objective', float('nan')):.4f}",
            f"  outer steps: {dg.get('steps')}  ({dg.get('stopped')})  wall time {dg.get('wall_time_s', float('nan')):.1f} s",
            f"  cells converged: {dg.get('cells_converged')}/{self.x_map.shape[0]}"
            f"  (max projected-gradient norm {dg.get('max_grad_norm', float('nan')):.2e}, tol {self.settings.get('gtol')})",
            f"  cells with eta on its bound 0: {dg.get('cells_on_bound')}",
        ]
        if self.params.capture is not None:
            c = self.params.capture
            lines.append(f"  capture: M0={c.M0:.4g}, sigma_M={c.sigma_M:g};"
                         f" median capture probability {np.median(self.capture_probability):.3f}")
        else:
            lines.append("  capture: off (eta = 0)")
        return "\n".join(lines)

    # --- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Save to a single .npz (atomic write)."""
        c = self.cells
        arrays = {
            "mu": self.mu, "W": self.W, "d": self.d,
            "x_map": c.x_map, "eta_map": c.eta_map, "on_bound": c.on_bound,
            "converged": c.converged, "grad_norm": c.grad_norm, "n_iter": c.n_iter,
            "objective": c.objective, "history": np.asarray(self.history, dtype=float),
        }
        if c.delta is not None:
            arrays["delta"] = c.delta
        if c.log_anchor is not None:
            arrays["log_anchor"] = c.log_anchor
        if self.init is not None:
            arrays.update(init_mu=self.init.mu, init_W=self.init.W, init_d=self.init.d)
        meta = {
            "settings": self.settings, "diagnostics": self.diagnostics,
            "capture": None if self.params.capture is None
            else {"M0": self.params.capture.M0, "sigma_M": self.params.capture.sigma_M},
            "gene_names": self.gene_names, "cell_names": self.cell_names,
            "format": "pln_ref.LaplaceResult/1",
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta, default=str).encode(), dtype=np.uint8)
        return atomic_savez(path, arrays, compressed=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LaplaceResult":
        z = np.load(path, allow_pickle=False)
        meta = json.loads(bytes(z["meta"]).decode())
        if meta.get("format") != "pln_ref.LaplaceResult/1":
            raise ValueError(f"{path} is not a saved pln_ref LaplaceResult")
        cap = meta["capture"]
        params = PLNParams(z["mu"], z["W"], z["d"], None if cap is None else Capture(**cap))
        H = neg_hessian(z["x_map"], z["eta_map"] if cap else None, params)
        bbar = s = None
        if cap is not None:
            _, bbar, lam_bbar, _ = eta_schur(H.A)
            s = H.prec_eta + lam_bbar
        cells = CellPosteriors(
            params=params, x_map=z["x_map"], eta_map=z["eta_map"], on_bound=z["on_bound"],
            converged=z["converged"], grad_norm=z["grad_norm"], n_iter=z["n_iter"],
            objective=z["objective"], precision=H.A, bbar=bbar, s=s,
            delta=z["delta"] if "delta" in z.files else None,
            log_anchor=z["log_anchor"] if "log_anchor" in z.files else None,
        )
        init = None
        if "init_mu" in z.files:
            init = PLNParams(z["init_mu"], z["init_W"], z["init_d"], params.capture)
        return cls(params=params, cells=cells, history=z["history"], settings=meta["settings"],
                   diagnostics=meta["diagnostics"], init=init, gene_names=meta["gene_names"],
                   cell_names=meta["cell_names"])
