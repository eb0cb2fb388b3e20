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
from .params import PLNParams
from .protocol import CellPosterior, PLNResult

__all__ = ["LaplaceResult", "PLNResult", "CellPosterior", "laplace_history", "evidence_outliers"]

EVIDENCE_Z_THRESHOLD = 5.0
_MAX_LISTED = 20


def evidence_outliers(evidence: np.ndarray, counts, cell_names: list | None = None, *,
                      threshold: float = EVIDENCE_Z_THRESHOLD, warn: bool = False) -> dict:
    """Cells whose per-cell Laplace evidence is an outlier among the cells'.

    Statistic: the evidence relative to the saturated Poisson fit of the cell,
    e_c = l_c - sum_g [u_cg log u_cg - u_cg - log u_cg!]  (<= 0 up to the prior terms; the
    saturated term removes the part of l_c that only reflects how many counts the cell has), and
    its robust z-score z_c = (e_c - median e) / (1.4826 MAD e). A cell with |z_c| > ``threshold``
    needs latents far out in the fitted prior to explain its counts (e.g. a few extreme entries);
    such cells can move the fitted mu and Sigma of every gene. Measured: two entries of 1e7 in a
    200 x 30 simulation give z = -7.7 / -7.9 (mean log-rate 3); clean simulations (200 x 30 and the
    demo's 1500 x 100) have max |z| < 3.

    ``counts``: (N, G) array, scipy.sparse matrix or ``pln_ref.counts.CountMatrix`` (read by blocks).

    Returns {"threshold", "statistic", "n_cells", "cells" (indices, by |z|, at most 20),
    "cell_names", "robust_z" (theirs), "max_abs_robust_z"}; ``warn=True`` also issues a
    ``pln_ref.exceptions.OutlierCellsWarning`` naming the cells when there are any.
    """
    from .counts import CountMatrix

    e = np.asarray(evidence, dtype=float) - CountMatrix(counts).saturated_loglik()
    med = np.median(e)
    mad = 1.4826 * np.median(np.abs(e - med))
    z = (e - med) / mad if mad > 0 else np.zeros_like(e)
    flagged = np.flatnonzero(np.abs(z) > threshold)
    order = flagged[np.argsort(-np.abs(z[flagged]))][:_MAX_LISTED]
    out = {
        "threshold": float(threshold),
        "statistic": "robust z of the per-cell evidence minus the saturated Poisson log-likelihood",
        "n_cells": int(flagged.size), "cells": [int(c) for c in order],
        "cell_names": None if cell_names is None else [str(cell_names[c]) for c in order],
        "robust_z": [float(z[c]) for c in order],
        "max_abs_robust_z": float(np.max(np.abs(z))) if z.size else 0.0,
    }
    if warn and flagged.size:
        import warnings

        from .exceptions import OutlierCellsWarning

        names = out["cell_names"] or out["cells"]
        warnings.warn(f"{flagged.size} cell(s) with outlying Laplace evidence (robust |z| > {threshold:g}): "
                      f"{', '.join(map(str, names[:10]))}; a few extreme cells can move every gene's mu and "
                      "Sigma: check them (diagnostics['evidence_outliers'])", OutlierCellsWarning, stacklevel=4)
    return out


def laplace_history(steps) -> dict:
    """The optimiser's (step, objective, smoothed objective) rows as the protocol's history dict."""
    h = np.asarray(steps, dtype=float).reshape(-1, 3)
    return {"step": h[:, 0].astype(int), "objective": h[:, 1], "objective_smoothed": h[:, 2]}


def _outlier_lines(out: dict | None) -> list[str]:
    """The summary line of ``evidence_outliers`` (none for results saved before it existed)."""
    if not out:
        return []
    line = f"  cells with outlying evidence (robust |z| > {out['threshold']:g}): {out['n_cells']}"
    if out["n_cells"]:
        names = out.get("cell_names") or out["cells"]
        shown = ", ".join(f"{n} (z={z:.1f})" for n, z in zip(names[:5], out["robust_z"][:5]))
        line += f": {shown}{', ...' if out['n_cells'] > 5 else ''}; they can move every gene's mu and Sigma"
    return [line]


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
        Gaussian at each node. ``counts``: the (N, G) training counts (array, scipy.sparse matrix,
        AnnData or ``CountMatrix``; the result does not keep them; read by blocks of cells, CSR
        stays CSR); ``options``: those of ``eta_marginal`` (n_nodes, tail_tol, ...)."""
        return eta_marginal(counts, self.cells, self.cells.log_anchor, **options)

    def with_eta_marginal(self, counts, **options) -> "LaplaceResult":
        """A copy of this result whose ``posterior`` is the eta-marginal posterior
        (``posterior_eta_marginal``); globals, ``cells`` and diagnostics are shared."""
        em = self.posterior_eta_marginal(counts, **options)
        return replace(self, eta_marginal=em, settings=dict(self.settings, posterior="eta_marginal"))

    def factor_scores(self) -> np.ndarray:
        """E[z | x_map] = K^{-1} W^T D (x_map - mu) = W^T Sigma^{-1} (x_map - mu), shape (N, k)."""
        return self.sigma.inv_mv_W(self.x_map - self.mu)[1]

    def _summary_lines(self) -> list[str]:
        dg = self.diagnostics
        return [
            f"  objective (mean Laplace log evidence per cell): {dg.get('objective', float('nan')):.4f}",
            f"  outer steps: {dg.get('steps')}  ({dg.get('stopped')})  wall time {dg.get('wall_time_s', float('nan')):.1f} s"
            + (f" (over all runs; resumed at step {dg['resumed_from_step']})"
               if dg.get("resumed_from_step") is not None else ""),
            f"  cells converged: {dg.get('cells_converged')}/{self.x_map.shape[0]}"
            f"  (max projected-gradient norm {dg.get('max_grad_norm', float('nan')):.2e}, tol {self.settings.get('gtol')})",
            f"  cells with eta on its bound 0: {dg.get('cells_on_bound')}",
        ] + _outlier_lines(dg.get("evidence_outliers"))

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
        from .fit_laplace import evaluation_block_cells
        from .outer.final import map_posteriors

        x_map = z["x_map"]
        cells = map_posteriors(  # built by blocks of cells: no all-cell N x G temporaries
            params, x_map, z["eta_map"] if params.capture is not None else None,
            block_cells=evaluation_block_cells(x_map.shape[1]), on_bound=z["on_bound"],
            converged=z["converged"], grad_norm=z["grad_norm"], n_iter=z["n_iter"],
            objective=z["objective"], delta=z["delta"] if "delta" in z.files else None,
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
