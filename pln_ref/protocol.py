"""The result protocol shared by every inference method (Laplace, VAE).

Two layers:

- ``CellPosterior`` (a ``typing.Protocol``): the per-cell approximate posterior over (x, eta)
  that every method returns (``laplace.CellPosteriors``, ``vae.VAEPosterior``; also
  ``eta_marginal.EtaMarginalPosterior``, the Laplace posterior with eta integrated by quadrature,
  selected by ``LaplaceResult.with_eta_marginal(counts)``). Point estimates
  ``x_map``/``eta_map`` (the MAP for Laplace, the posterior mean for the VAE), ``eta_mean_var()``,
  ``mean_x``/``sd_x``/``expected_exp_x`` (``eta="free"`` integrates eta out, ``eta="map"`` holds
  it at ``eta_map``), ``sample(rng, n_draws, eta=)``, ``logpdf(x, eta)`` and ``subset(idx)``.
- ``PLNResult``: the base class of every fitted result. It holds the shared accessors (globals,
  per-cell summaries through ``posterior``) and the shared exports (``summary``, ``to_anndata``,
  ``to_arviz``, atomic ``save``/``load``) and new cells (``transform``, ``score_samples``,
  ``pln_ref.newcells``). A subclass provides ``params``, ``posterior``,
  ``history``, ``settings``, ``diagnostics``, ``gene_names``, ``cell_names``, the class attribute
  ``inference_method`` and four hooks: ``factor_scores``, ``_summary_lines``, ``_state`` /
  ``_from_state`` (its arrays and metadata for ``save``/``load``).

``settings`` and ``diagnostics`` are plain dicts; ``history`` is a dict of equal-length 1-D arrays,
one entry per outer step, always with ``"step"`` and ``"objective"`` (the method's per-cell
training objective) plus method-specific traces.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

import numpy as np

from .io import atomic_savez
from .lowrank import LowRankCov
from .params import Capture, PLNParams

__all__ = ["CellPosterior", "PLNResult", "ANNDATA_WRITE_OPTIONS", "parse_write", "h5ad_safe"]

ANNDATA_WRITE_OPTIONS = ("map", "sd", "denoised", "correlation")
_FORMAT = "pln_ref.PLNResult/2"


@runtime_checkable
class CellPosterior(Protocol):
    """Approximate posterior q(x, eta | u) of N cells, as returned by every inference method."""

    params: PLNParams

    @property
    def N(self) -> int: ...

    @property
    def x_map(self) -> np.ndarray: ...

    @property
    def eta_map(self) -> np.ndarray: ...

    def eta_mean_var(self) -> tuple[np.ndarray, np.ndarray]: ...

    def mean_x(self, eta: str = "free") -> np.ndarray: ...

    def sd_x(self, eta: str = "free") -> np.ndarray: ...

    def expected_exp_x(self, eta: str = "free") -> np.ndarray: ...

    def sample(self, rng: np.random.Generator, n_draws: int, eta: str = "free"): ...

    def logpdf(self, x: np.ndarray, eta: np.ndarray) -> np.ndarray: ...

    def subset(self, idx) -> "CellPosterior": ...


def parse_write(write: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"map,sd"`` or ``("map", "sd")`` -> validated tuple of ``ANNDATA_WRITE_OPTIONS``."""
    if write is None:
        return ()
    items = write.split(",") if isinstance(write, str) else list(write)
    items = [str(w).strip() for w in items if str(w).strip()]
    bad = [w for w in items if w not in ANNDATA_WRITE_OPTIONS]
    if bad:
        raise ValueError(f"unknown write option(s) {', '.join(bad)}; choose from {', '.join(ANNDATA_WRITE_OPTIONS)}")
    return tuple(dict.fromkeys(items))


def _plain(obj):
    """Numpy scalars -> Python scalars, tuples -> lists, recursively (JSON-able)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def h5ad_safe(obj):
    """A nested dict that ``anndata.write_h5ad`` stores and reads back as dicts: numpy scalars
    become Python scalars, None becomes the string "None", lists become arrays when uniform."""
    obj = _plain(obj)
    if obj is None:
        return "None"
    if isinstance(obj, dict):
        return {k: h5ad_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        vals = [h5ad_safe(v) for v in obj]
        if all(isinstance(v, (bool, int, float)) for v in vals) or all(isinstance(v, str) for v in vals):
            return np.asarray(vals)
        return {str(i): v for i, v in enumerate(vals)}
    return obj


class PLNResult:
    """Base class of every fitted PLN result (see the module docstring for the protocol)."""

    params: PLNParams
    history: dict
    settings: dict
    diagnostics: dict
    gene_names: list | None
    cell_names: list | None
    inference_method: str = ""
    _label: str = ""
    _registry: dict = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__dict__.get("inference_method"):
            PLNResult._registry[cls.inference_method] = cls

    posterior: CellPosterior  # the per-cell posterior of the training cells (field or property)

    # --- hooks ----------------------------------------------------------------------------
    def factor_scores(self) -> np.ndarray:
        """Per-cell factor scores (N, k): the embedding written to ``obsm["X_pln"]``."""
        raise NotImplementedError

    def _summary_lines(self) -> list[str]:
        raise NotImplementedError

    def _state(self) -> tuple[dict, dict]:
        """Method-specific (arrays, metadata) for ``save``."""
        raise NotImplementedError

    @classmethod
    def _from_state(cls, z, meta: dict, params: PLNParams, common: dict) -> "PLNResult":
        raise NotImplementedError

    def _obs_extra(self) -> dict:
        """Method-specific per-cell columns for ``to_anndata`` (name -> (N,) array)."""
        return {}

    def _arviz_draws(self, post: CellPosterior, rng: np.random.Generator, n_draws: int) -> dict:
        x, eta = post.sample(rng, n_draws)
        return {"x": x, "eta": eta}

    # --- globals --------------------------------------------------------------------------
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

    # --- per cell ---------------------------------------------------------------------------
    @property
    def x_map(self) -> np.ndarray:
        """Point estimate of the log-rates (N, G): the MAP (Laplace) or posterior mean (VAE)."""
        return self.posterior.x_map

    @property
    def eta_map(self) -> np.ndarray:
        """Point estimate of the capture loss (N,)."""
        return self.posterior.eta_map

    @property
    def capture_probability(self) -> np.ndarray:
        """e^{-eta}: the capture efficiency of each cell at its point estimate."""
        return np.exp(-self.eta_map)

    def sd_x(self, eta: str = "free") -> np.ndarray:
        """Per-cell posterior SD of x (N, G); ``eta="map"`` holds eta at its point estimate."""
        return self.posterior.sd_x(eta)

    def denoised(self, eta: str = "free") -> np.ndarray:
        """Denoised expression E[e^{x}] under the method's posterior, shape (N, G)."""
        return self.posterior.expected_exp_x(eta)

    def sample_x(self, rng: np.random.Generator | int, n_draws: int, eta: str = "free"):
        """Draws (x (S,N,G), eta (S,N)) from the method's posterior."""
        return self.posterior.sample(np.random.default_rng(rng), n_draws, eta=eta)

    # --- new cells (``pln_ref.newcells``) ------------------------------------------------------------
    def transform(self, counts, library_size=None, *, log_anchor=None) -> CellPosterior:
        """Per-cell posteriors of new cells under the fitted globals (the same type as
        ``posterior``); anchors L_c = ``library_size`` or each cell's total counts."""
        from .newcells import transform

        return transform(self, counts, library_size, log_anchor=log_anchor)

    def score_samples(self, counts, method: str | None = None, *, n_draws: int = 2000,
                      library_size=None, log_anchor=None, seed=0):
        """Per-cell log p(u_c | theta) of (new) cells: "laplace" evidence, "elbo" (VAE) or "is"
        (importance sampling with the method's posterior as proposal; estimate, Monte Carlo SE,
        PSIS k-hat, cells with k-hat > 0.7 flagged). Returns a ``pln_ref.newcells.CellScores``."""
        from .newcells import score_samples

        return score_samples(self, counts, method, n_draws=n_draws, library_size=library_size,
                             log_anchor=log_anchor, seed=seed)

    # --- reports and exports ---------------------------------------------------------------------
    def summary(self) -> str:
        N, G = self.x_map.shape
        lines = [f"PLN {self._label} fit: {N} cells x {G} genes, k={self.k}", *self._summary_lines()]
        if self.params.capture is not None:
            c = self.params.capture
            lines.append(f"  capture: M0={c.M0:.4g}, sigma_M={c.sigma_M:g};"
                         f" median capture probability {np.median(self.capture_probability):.3f}")
        else:
            lines.append("  capture: off (eta = 0)")
        return "\n".join(lines)

    def to_anndata(self, adata=None, *, key: str = "pln", write: str | Iterable[str] = (),
                   dtype=np.float32):
        """Write the fit into an AnnData (created from the fit's shape if not given), scanpy style.

        Always: obsm[X_{key}] factor scores (N, k); varm[{key}_W]; var[{key}_mu, {key}_d];
        obs[{key}_eta, {key}_eta_sd, {key}_capture_probability] and method-specific per-cell
        columns; uns[key] = {inference_method, settings, diagnostics, history} as nested dicts.
        On request (``write``, e.g. ``"map,sd"``): layers[{key}_map] point estimate of x,
        layers[{key}_sd] posterior SD of x, layers[{key}_denoised] E[e^x] (N x G each) and
        varp[{key}_correlation] (G x G), all in ``dtype`` (float32 by default).
        """
        import anndata as ad

        wanted = parse_write(write)
        N, G = self.x_map.shape
        if adata is None:
            adata = ad.AnnData(X=np.zeros((N, G), dtype=np.float32))
        if adata.shape != (N, G):
            raise ValueError(f"AnnData has shape {adata.shape} but the fit has (cells, genes) = {(N, G)}")
        adata.obsm[f"X_{key}"] = np.asarray(self.factor_scores())
        adata.varm[f"{key}_W"] = np.asarray(self.W)
        adata.var[f"{key}_mu"] = np.asarray(self.mu)
        adata.var[f"{key}_d"] = np.asarray(self.d)
        adata.obs[f"{key}_eta"] = np.asarray(self.eta_map)
        adata.obs[f"{key}_eta_sd"] = np.sqrt(self.posterior.eta_mean_var()[1])
        adata.obs[f"{key}_capture_probability"] = self.capture_probability
        for name, col in self._obs_extra().items():
            adata.obs[f"{key}_{name}"] = np.asarray(col)
        layers = {"map": lambda: self.x_map, "sd": self.sd_x, "denoised": self.denoised}
        for name in wanted:
            if name == "correlation":
                adata.varp[f"{key}_correlation"] = self.correlation().astype(dtype)
            else:
                adata.layers[f"{key}_{name}"] = np.asarray(layers[name](), dtype=dtype)
        adata.uns[key] = {
            "inference_method": self.inference_method,
            "settings": h5ad_safe(self.settings),
            "diagnostics": h5ad_safe(self.diagnostics),
            "history": {k: np.asarray(v) for k, v in self.history.items()},
        }
        return adata

    def to_arviz(self, n_draws: int = 500, seed: int = 0, cells=None):
        """InferenceData with posterior draws of (some) training cells (one 'chain'), and the
        fitted globals as constant_data. ``cells``: index array (default all; keep
        n_draws * N * G moderate)."""
        import arviz as az

        post = self.posterior
        N, G = self.x_map.shape
        idx = np.arange(N) if cells is None else np.asarray(cells)
        if cells is not None:
            post = post.subset(idx)
        draws = self._arviz_draws(post, np.random.default_rng(seed), int(n_draws))
        names = self.cell_names
        dims = {"x": ["cell", "gene"], "eta": ["cell"], "z": ["cell", "factor"], "mu": ["gene"],
                "W": ["gene", "factor"], "d": ["gene"]}
        return az.from_dict(
            posterior={k: v[None] for k, v in draws.items()},
            coords={"cell": list(idx) if names is None else [names[i] for i in idx],
                    "gene": self.gene_names or list(range(G)), "factor": list(range(self.k))},
            dims={k: v for k, v in dims.items() if k in draws or k in ("mu", "W", "d")},
            constant_data={"mu": self.mu, "W": self.W, "d": self.d},
            attrs={"inference_method": self.inference_method, "source": "pln_ref"},
        )

    # --- persistence ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Save to one .npz file, written atomically (temporary file + rename)."""
        arrays, extra = self._state()
        arrays = dict(arrays, mu=self.mu, W=self.W, d=self.d)
        for name, val in self.history.items():
            arrays[f"history.{name}"] = np.asarray(val)
        cap = self.params.capture
        meta = {
            "format": _FORMAT, "inference_method": self.inference_method,
            "settings": _plain(self.settings), "diagnostics": _plain(self.diagnostics),
            "capture": None if cap is None else {"M0": cap.M0, "sigma_M": cap.sigma_M},
            "gene_names": self.gene_names, "cell_names": self.cell_names, **_plain(extra),
        }
        arrays["meta"] = np.frombuffer(json.dumps(meta, default=str).encode(), dtype=np.uint8)
        return atomic_savez(path, arrays, compressed=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PLNResult":
        """Load a result written by ``save`` (``PLNResult.load`` returns the right subclass)."""
        try:
            z = np.load(path, allow_pickle=False)
            meta = json.loads(bytes(z["meta"]).decode())
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path} is not a saved pln_ref result ({e})") from None
        if meta.get("format") == "pln_ref.LaplaceResult/1":  # files written before the protocol
            meta["inference_method"] = "laplace"
        elif meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a saved pln_ref result (format {meta.get('format')!r})")
        method = meta["inference_method"]
        target = PLNResult._registry.get(method)
        if target is None or not issubclass(target, cls):
            raise ValueError(f"{path} holds a {method!r} result, not a {cls.__name__}")
        cap = meta["capture"]
        params = PLNParams(z["mu"], z["W"], z["d"], None if cap is None else Capture(**cap))
        history = {k.split(".", 1)[1]: z[k] for k in z.files if k.startswith("history.")}
        common = dict(params=params, history=history, settings=meta["settings"],
                      diagnostics=meta["diagnostics"], gene_names=meta["gene_names"],
                      cell_names=meta["cell_names"])
        return target._from_state(z, meta, params, common)

