"""The fitted Laplace result: globals, per-cell posteriors, diagnostics; exports and save/load
come from the shared result protocol (``pln_ref.protocol.PLNResult``).

Factor scores (``factor_scores``) are the posterior mean of z given the MAP log-rates under
x = mu + W z + sqrt(d) eps, z ~ N(0, I):  E[z | x] = K^{-1} W^T D (x - mu), K = I + W^T D W.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .eta_marginal import EtaMarginalPosterior, eta_marginal
from .laplace import CellPosteriors
from .model import eta_schur, neg_hessian
from .params import PLNParams
from .protocol import CellPosterior, PLNResult

__all__ = ["LaplaceResult", "PLNResult", "CellPosterior", "laplace_history"]


def laplace_history(steps) -> dict:
    """The optimiser's (step, objective, smoothed objective) rows as the protocol's history dict."""
    h = np.asarray(steps, dtype=float).reshape(-1, 3)
    return {"step": h[:, 0].astype(int), "objective": h[:, 1], "objective_smoothed": h[:, 2]}


@dataclass
class LaplaceResult(PLNResult):
    """Result of ``pln_ref.fit(..., inference_method="laplace")``.

    Attributes
    ----------
    params : fitted PLNParams (mu, W, d, capture).
    cells : CellPosteriors at the fitted globals (x_map, eta_map, precision, diagnostics).
    history : dict of per-step arrays "step", "objective" (the per-cell mean Laplace log
        evidence, see ``fit_laplace``) and "objective_smoothed".
    settings : dict of the fit's settings; diagnostics : dict of convergence diagnostics.
    init : the method-of-moments start.
    eta_marginal : None (default: ``posterior`` is the Gaussian Laplace posterior ``cells``) or the
        eta-marginal posterior of the same cells (``pln_ref.eta_marginal``), set by
        ``with_eta_marginal(counts)``; then ``posterior`` and every accessor and export built on it
        (draws, sd_x, denoised, PPCs, to_anndata, to_arviz, save/load) use it.
    """

    params: PLNParams
    cells: CellPosteriors
    history: dict
    settings: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    init: PLNParams | None = None
    gene_names: list | None = None
    cell_names: list | None = None
    eta_marginal: EtaMarginalPosterior | None = field(default=None, repr=False)

    inference_method = "laplace"
    _label = "Laplace"

    def __post_init__(self) -> None:
        if not isinstance(self.history, dict):  # the optimiser's (n, 3) rows
            self.history = laplace_history(self.history)

    @property
    def posterior(self) -> CellPosteriors | EtaMarginalPosterior:
        """The posteriors of the training cells: ``cells`` (Gaussian Laplace, the default) or,
        after ``with_eta_marginal``, the eta-marginal posterior."""
        return self.cells if self.eta_marginal is None else self.eta_marginal

    def posterior_eta_marginal(self, counts, **options) -> EtaMarginalPosterior:
        """The eta-marginal posterior of the training cells (``pln_ref.eta_marginal.eta_marginal``):
        q(eta) proportional to p(u, x*(eta), eta) |A(eta)|^{-1/2} integrated by quadrature, x | eta
        Gaussian at each node. ``counts``: the (N, G) training counts (the result does not keep
        them); ``options``: those of ``eta_marginal`` (n_nodes, tail_tol, ...)."""
        u = np.asarray(counts.toarray() if hasattr(counts, "toarray") else counts, dtype=float)
        return eta_marginal(u, self.cells, self.cells.log_anchor, **options)

    def with_eta_marginal(self, counts, **options) -> "LaplaceResult":
        """A copy of this result whose ``posterior`` is the eta-marginal posterior
        (``posterior_eta_marginal``); globals, ``cells`` and diagnostics are shared."""
        em = self.posterior_eta_marginal(counts, **options)
        return replace(self, eta_marginal=em, settings=dict(self.settings, posterior="eta_marginal"))

    def factor_scores(self) -> np.ndarray:
        """E[z | x_map] = K^{-1} W^T D (x_map - mu), shape (N, k)."""
        cov = self.sigma
        return ((self.x_map - self.mu) @ cov.V) @ cov.K_inv

    def _summary_lines(self) -> list[str]:
        dg = self.diagnostics
        return [
            f"  objective (mean Laplace log evidence per cell): {dg.get('objective', float('nan')):.4f}",
            f"  outer steps: {dg.get('steps')}  ({dg.get('stopped')})  wall time {dg.get('wall_time_s', float('nan')):.1f} s",
            f"  cells converged: {dg.get('cells_converged')}/{self.x_map.shape[0]}"
            f"  (max projected-gradient norm {dg.get('max_grad_norm', float('nan')):.2e}, tol {self.settings.get('gtol')})",
            f"  cells with eta on its bound 0: {dg.get('cells_on_bound')}",
        ]

    def _obs_extra(self) -> dict:
        return {"converged": self.cells.converged, "on_bound": self.cells.on_bound}

    # --- persistence (``PLNResult.save`` / ``load``) -------------------------------------------
    def _state(self) -> tuple[dict, dict]:
        c = self.cells
        arrays = {
            "x_map": c.x_map, "eta_map": c.eta_map, "on_bound": c.on_bound,
            "converged": c.converged, "grad_norm": c.grad_norm, "n_iter": c.n_iter,
            "objective": c.objective,
        }
        if c.delta is not None:
            arrays["delta"] = c.delta
        if c.log_anchor is not None:
            arrays["log_anchor"] = c.log_anchor
        if self.init is not None:
            arrays.update(init_mu=self.init.mu, init_W=self.init.W, init_d=self.init.d)
        if self.eta_marginal is not None:
            arrays.update({f"eta_marginal.{k}": v for k, v in self.eta_marginal.arrays().items()})
        return arrays, {}

    @classmethod
    def _from_state(cls, z, meta: dict, params: PLNParams, common: dict) -> "LaplaceResult":
        cap = params.capture
        H = neg_hessian(z["x_map"], z["eta_map"] if cap else None, params)
        bbar = s = None
        if cap is not None:
            _, bbar, s, _ = eta_schur(H.A, H.prec_eta)
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
        if "history" in z.files:  # format pln_ref.LaplaceResult/1
            common = dict(common, history=z["history"])
        em = None
        if any(f.startswith("eta_marginal.") for f in z.files):
            em = EtaMarginalPosterior(gaussian=cells, **{f.split(".", 1)[1]: z[f] for f in z.files
                                                         if f.startswith("eta_marginal.")})
        return cls(cells=cells, init=init, eta_marginal=em, **common)
