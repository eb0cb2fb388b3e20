"""Amortised variational inference (VAE) for the PLN model with capture: fit, posterior, result.

The model, variational family and the closed-form ELBO are documented in ``pln_ref.vae_model``
(read that docstring first). Summary of the ELBO (every term exact, no Monte Carlo)::

    ELBO_c = sum_g [u_g (mu_g + W_g m + r_g - E eta) - E[e^{-eta}] e^{mu_g + W_g m + |W_g s|^2/2 + r_g + v_g/2}
                    - log u_g!]
             - KL(N(m, s^2) || N(0, I_k)) - KL(N(r, v) || N(0, diag d))
             + E_q log TruncN(eta | log M0 - log L_c, sigma_M, 0) + H[q(eta)]

Implied posterior over the latents of the seed model (what ``VAEPosterior`` exposes)::

    q(x, eta | u) = q(x | u) q(eta | u)                      (x and eta independent under q)
    q(x | u)   = N(mu + W m + r,  W diag(s^2) W^T + diag(v))  (pushforward of q(z) q(e) through
                                                              x = mu + W z + e; low rank + diagonal)
    q(eta | u) = TruncN(a, b^2, low = 0)                      (capture; eta = 0 without capture)

With ``residual="prior"`` (r = 0, v = d) the residual part of q(x | u) is the PRIOR of e, not a
posterior: the per-gene deviations from the factor model are then not informed by the cell's own
counts at all. The default ``residual="laplace"`` informs them by the closed-form per-gene update.
What q cannot represent: the posterior correlation between z and e and between x and eta (the
"rigid translation" direction x + c, eta + c that the Laplace/NUTS posteriors show), and any
non-Gaussian shape of p(x | u).

Training: minibatch Adam(W) on -mean ELBO over (encoder, mu, W, rho) with d = 1e-4 + softplus(rho);
decoder initialised from ``pln_ref.moments.method_of_moments`` (log1p + SVD only if that fails).
Optional linear KL annealing of the z-KL (beta from 0 to 1 over ``kl_anneal_steps``). During
training each cell's closed-form (r, v) sweep is warm-started from its previous visit and only
``warm_rounds`` (2) sweeps are run (held-out evaluation and ``encode`` always run the full cold
sweeps). Early stopping on the HELD-OUT ELBO per cell (a random ``val_fraction`` of the cells,
default 10%, never used for gradients; with N < 20 or val_fraction = 0 the training cells' ELBO
is used instead), evaluated every ``eval_every`` (100) steps once annealing
has finished: stop when it has not improved by more than ``tol`` (0.01) nats per cell for
``patience`` (5) evaluations; the best state is restored (``restore_best``). Measured: the held-out
ELBO peaks after ~200 steps and then falls slowly (~1 nat/cell over 1000 steps at N=2000, G=1000)
even with the true decoder held fixed -- the encoder over-fits the training cells (weight decay
did not cure it); the decoder's Sigma barely changes after the peak (correlation error 0.303 at
the peak vs 0.300 after 1500 steps). Deterministic on CPU for a given seed (``torch.manual_seed``,
a seeded ``torch.Generator`` for the split and batches, deterministic algorithms, float64).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import truncnorm
from .anchor import resolve_log_anchor
from .constants import LOG_2PI
from .params import Capture, PLNParams
from .results import FittedGlobals

__all__ = ["fit_vae", "VAEResult", "VAEPosterior", "VAEConfig"]

def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover
        raise ImportError("inference_method='vae' needs PyTorch: pip install torch==2.13.0") from exc
    return torch


# ------------------------------------------------------------------------------------------------
# input handling
# ------------------------------------------------------------------------------------------------
def _counts(data, layer=None) -> np.ndarray:
    from .data import as_counts

    return as_counts(data, layer=layer)


def _log_anchor(u: np.ndarray, log_anchor, capture) -> np.ndarray | None:
    """log L_c by the one anchor policy (``anchor.resolve_log_anchor``); None without capture."""
    return None if capture is None else resolve_log_anchor(u, log_anchor)


def _init_decoder(u: np.ndarray, k: int, capture, log_anchor) -> tuple[PLNParams, str]:
    """Method of moments when available, else log1p + SVD (mu = column mean, W from the top-k
    SVD of the centred log1p matrix / sqrt(N), d = residual variance floored at 0.05)."""
    try:
        from .moments import method_of_moments
    except ImportError:
        method_of_moments = None
    if method_of_moments is not None:
        try:
            p = method_of_moments(u, k, capture=capture, log_anchor=log_anchor)
            if np.all(np.isfinite(p.W)) and np.all(p.d > 0):
                return p, "method_of_moments"
        except ValueError:
            pass
    y = np.log1p(u)
    if capture is not None:  # put the mean capture loss back on the log scale
        m = capture.prior_mean(log_anchor)
        y = y + np.maximum(m, 0.0)[:, None]
    mu = y.mean(0)
    yc = y - mu
    N = u.shape[0]
    _, sv, Vt = np.linalg.svd(yc, full_matrices=False)
    W = Vt[:k].T * (sv[:k] / math.sqrt(N))
    d = np.maximum(yc.var(0) - np.sum(W**2, 1), 0.05)
    return PLNParams(mu=mu, W=W, d=d, capture=capture), "log1p_svd"


# ------------------------------------------------------------------------------------------------
# posterior object
# ------------------------------------------------------------------------------------------------
@dataclass
class VAEPosterior:
    """The VAE's implied posterior over (x, eta) for N cells (see module docstring).

    q(x | u) = N(x_mean, B B^T + diag(v)), B = W diag(s) (per cell, k columns);
    q(eta | u) = TruncN(eta_loc, eta_scale^2, low=0), independent of x (eta = 0 without capture).
    Attributes: z_mean (N,k), z_var (N,k), r (N,G), v (N,G), eta_loc, eta_scale (N,) or None.
    """

    params: PLNParams
    z_mean: np.ndarray
    z_var: np.ndarray
    r: np.ndarray
    v: np.ndarray
    eta_loc: np.ndarray | None
    eta_scale: np.ndarray | None

    @property
    def N(self) -> int:
        return self.z_mean.shape[0]

    @property
    def x_mean(self) -> np.ndarray:
        """E_q x = mu + W m + r, (N, G)."""
        return self.params.mu + self.z_mean @ self.params.W.T + self.r

    def sd_x(self) -> np.ndarray:
        """Marginal SDs of q(x | u): sqrt(sum_a W_ga^2 s_a^2 + v_g), (N, G)."""
        return np.sqrt(self.z_var @ (self.params.W**2).T + self.v)

    def _eta_stats(self):
        return truncnorm.mean_var(self.eta_loc, self.eta_scale)

    @property
    def eta_mean(self) -> np.ndarray:
        """E_q eta = a + b phi(a/b)/Phi(a/b) (zeros without capture)."""
        if self.eta_loc is None:
            return np.zeros(self.N)
        return self._eta_stats()[0]

    def eta_sd(self) -> np.ndarray:
        if self.eta_loc is None:
            return np.zeros(self.N)
        return np.sqrt(self._eta_stats()[1])

    @property
    def x_map(self) -> np.ndarray:  # alias: the VAE reports the posterior mean
        return self.x_mean

    @property
    def eta_map(self) -> np.ndarray:
        return self.eta_mean

    def sample(self, rng: np.random.Generator, n_draws: int, eta: str = "free"):
        """Draws (x (S,N,G), eta (S,N)) from q. eta="map" puts every eta draw at E_q eta."""
        if eta not in ("free", "map"):
            raise ValueError(f"eta must be 'free' or 'map', got {eta!r}")
        S, N, G = int(n_draws), self.N, self.params.G
        z = self.z_mean + np.sqrt(self.z_var) * rng.standard_normal((S, N, self.params.k))
        x = self.params.mu + self.r + z @ self.params.W.T + np.sqrt(self.v) * rng.standard_normal((S, N, G))
        if self.eta_loc is None:
            return x, np.zeros((S, N))
        if eta == "map":
            return x, np.broadcast_to(self.eta_mean, (S, N)).copy()
        return x, truncnorm.sample(self.eta_loc, self.eta_scale, rng, size=(S, N))

    def logpdf_x(self, x: np.ndarray) -> np.ndarray:
        """log q(x | u), x (S,N,G) -> (S,N), Woodbury per cell: C = B B^T + diag(v), B = W diag(s),
        K_c = I + B^T diag(1/v) B, log det C = sum log v + log det K_c."""
        x = np.asarray(x, dtype=float)
        W, s = self.params.W, np.sqrt(self.z_var)
        res = x - self.x_mean  # (S,N,G)
        vinv = 1.0 / self.v
        # K_c = I + diag(s) W^T diag(1/v_c) W diag(s)
        WtVW = np.einsum("ga,ng,gb->nab", W, vinv, W)
        K = np.eye(self.params.k) + s[:, :, None] * WtVW * s[:, None, :]
        Lk = np.linalg.cholesky(K)
        logdet = np.sum(np.log(self.v), 1) + 2.0 * np.sum(np.log(np.diagonal(Lk, axis1=1, axis2=2)), 1)
        rv = res * vinv  # (S,N,G)
        t = np.einsum("sng,ga->sna", rv, W) * s  # B^T V^{-1} res  (S,N,k)
        y = np.linalg.solve(Lk[None], t[..., None])[..., 0]  # L^{-1} t
        quad = np.einsum("sng,sng->sn", res, rv) - np.sum(y**2, -1)
        G = self.params.G
        return -0.5 * (G * LOG_2PI + logdet + quad)

    def logpdf_eta(self, eta: np.ndarray) -> np.ndarray:
        """log TruncN(eta | a, b, 0), (S,N) (0 without capture)."""
        eta = np.asarray(eta, dtype=float)
        if self.eta_loc is None:
            return np.zeros(eta.shape)
        return truncnorm.logpdf(eta, self.eta_loc, self.eta_scale)

    def logpdf(self, x: np.ndarray, eta: np.ndarray) -> np.ndarray:
        """log q(x, eta | u) = log q(x | u) + log q(eta | u), shapes (S,N,G), (S,N) -> (S,N)."""
        return self.logpdf_x(x) + self.logpdf_eta(eta)


# ------------------------------------------------------------------------------------------------
# result object
# ------------------------------------------------------------------------------------------------
@dataclass
class VAEConfig:
    k: int
    hidden: tuple = (128, 64)
    n_steps: int = 5000
    batch_size: int = 256
    lr: float = 3e-3
    seed: int = 0
    kl_anneal_steps: int = 0
    residual: str = "laplace"
    n_local_rounds: int = 4
    warm_rounds: int = 2
    encoder_weight_decay: float = 0.0
    val_fraction: float = 0.1
    eval_every: int = 100
    patience: int = 5
    tol: float = 0.01
    train_decoder: bool = True

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        out["hidden"] = list(self.hidden)
        return out


@dataclass
class VAEResult(FittedGlobals):
    """Fitted VAE: globals (mu, W, d), the encoder, and the posteriors of the training cells.

    Same attribute names as the Laplace result: mu, W, d, params, correlation(), x_map
    (= posterior mean E_q x), eta_map (= E_q eta), capture_probability = exp(-eta_map), history.
    """

    params: PLNParams
    model: object  # PLNVAE (torch module)
    config: VAEConfig
    posterior: VAEPosterior
    history: dict = field(default_factory=dict)
    log_anchor: np.ndarray | None = None
    init_method: str = ""
    wall_time: float = 0.0

    # --- training cells ---------------------------------------------------------------------
    @property
    def x_map(self) -> np.ndarray:
        return self.posterior.x_mean

    @property
    def eta_map(self) -> np.ndarray:
        return self.posterior.eta_mean

    @property
    def z_mean(self) -> np.ndarray:
        return self.posterior.z_mean

    def sd_x(self) -> np.ndarray:
        """Per-cell posterior SD of x under q (same meaning as ``LaplaceResult.sd_x``)."""
        return self.posterior.sd_x()

    def factor_scores(self) -> np.ndarray:
        """Encoder means of z, shape (N, k)."""
        return self.posterior.z_mean

    def summary(self) -> str:
        N, G = self.x_map.shape
        h = self.history or {}
        lines = [f"PLN VAE fit: {N} cells x {G} genes, k={self.k}",
                 f"  wall time {self.wall_time:.1f} s; init {self.init_method}"]
        if "elbo" in h and len(h["elbo"]):
            lines.append(f"  training ELBO per cell (last): {float(np.asarray(h['elbo'])[-1]):.4f}")
        for key in ("stopped_step", "best_val_elbo"):
            if key in h and h[key] is not None:
                lines.append(f"  {key}: {h[key]}")
        if self.params.capture is not None:
            c = self.params.capture
            lines.append(f"  capture: M0={c.M0:.4g}, sigma_M={c.sigma_M:g};"
                         f" median capture probability {np.median(self.capture_probability):.3f}")
        else:
            lines.append("  capture: off (eta = 0)")
        return "\n".join(lines)

    # --- new cells --------------------------------------------------------------------------
    def encode(self, new_counts, log_anchor=None, *, batch_size: int = 256) -> VAEPosterior:
        """Posterior of new cells (no optimisation; deterministic; batched, row-independent).

        ``batch_size`` 256 is the measured optimum on CPU (G=2000: 128-512 cells per batch run
        ~1.6-1.9k cells/s on one thread, 4096 only ~0.8k/s: the N x G temporaries leave cache).
        """
        u = _counts(new_counts)
        if u.shape[1] != self.params.G:
            raise ValueError(f"new counts have {u.shape[1]} genes, the model has G={self.params.G}")
        la = _log_anchor(u, log_anchor, self.params.capture)
        return _encode(self.model, u, la, self.params, batch_size)

    def elbo(self, counts, log_anchor=None, *, batch_size: int = 256) -> np.ndarray:
        """Closed-form ELBO per cell (N,) of (new or training) cells under the encoder's q."""
        torch = _torch()
        u = _counts(counts)
        la = _log_anchor(u, log_anchor, self.params.capture)
        out = []
        with torch.no_grad():
            for i in range(0, u.shape[0], batch_size):
                ub = torch.as_tensor(u[i:i + batch_size], dtype=torch.float64)
                pm = _prior_m(self.params.capture, None if la is None else la[i:i + batch_size], torch)
                e, _, _ = self.model(ub, torch.log1p(ub.sum(1)), pm)
                out.append(e.numpy())
        return np.concatenate(out)

    def amortisation_gap(self, counts, log_anchor=None, *, n_iter: int = 200, lr: float = 0.05) -> dict:
        """ELBO gain from optimising each cell's q(z) = N(m, s^2) directly (decoder fixed; the
        closed-form (r, v, a, b) recomputed at every step), started at the encoder's output.

        Returns per-cell-mean ELBO at the encoder output and after ``n_iter`` Adam steps, and the
        mean / max gap (nats per cell): the amortisation gap of the encoder (a lower bound on it).
        """
        torch = _torch()
        u = _counts(counts)
        la = _log_anchor(u, log_anchor, self.params.capture)
        U = torch.as_tensor(u, dtype=torch.float64)
        pm = _prior_m(self.params.capture, la, torch)
        model = self.model
        with torch.no_grad():
            m0, lv0 = model.encode_z(U, torch.log1p(U.sum(1)))
        m = m0.clone().requires_grad_(True)
        lv = lv0.clone().requires_grad_(True)
        opt = torch.optim.Adam([m, lv], lr=lr)
        from .vae_model import LOGVAR_MAX, LOGVAR_MIN, LocalState

        def per_cell():
            lvc = torch.clamp(lv, LOGVAR_MIN, LOGVAR_MAX)
            st = model.local_updates(U, m.detach(), lvc.detach(), pm)
            t = model.elbo_terms(U, LocalState(m, lvc, st.r, st.v, st.a, st.b), pm)
            return t["rec"] - t["kl_z"] - t["kl_e"] + t["eta"]

        e0 = per_cell().detach().numpy()
        best = e0.copy()
        for _ in range(int(n_iter)):
            e = per_cell()
            best = np.maximum(best, e.detach().numpy())
            opt.zero_grad()
            (-e.sum()).backward()
            opt.step()
        best = np.maximum(best, per_cell().detach().numpy())
        gap = best - e0
        return {"elbo_encoder": float(e0.mean()), "elbo_optimised": float(best.mean()),
                "gap_mean": float(gap.mean()), "gap_max": float(gap.max()), "n_cells": int(u.shape[0]),
                "n_iter": int(n_iter)}

    # --- drift ------------------------------------------------------------------------------
    def aggregate_posterior_drift(self, posterior: VAEPosterior | None = None) -> dict:
        """Encoder z means and aggregate q(z) = (1/N) sum_c N(m_c, diag s_c^2) vs the prior N(0, I).

        Reports for the means m_c (mean, covariance cov(m)) and for the aggregate posterior
        (mean = avg m, cov = avg diag(s^2) + cov(m)): ||mean||_2, ||cov - I||_F, eigenvalue range.
        """
        post = posterior or self.posterior
        M, S2 = post.z_mean, post.z_var
        k = M.shape[1]
        mean = M.mean(0)
        cov_m = np.cov(M, rowvar=False, bias=True).reshape(k, k)
        cov_agg = cov_m + np.diag(S2.mean(0))

        def summ(c):
            ev = np.linalg.eigvalsh(c)
            return {"cov_minus_I_fro": float(np.linalg.norm(c - np.eye(k))),
                    "eig_min": float(ev.min()), "eig_max": float(ev.max())}

        return {
            "mean_norm": float(np.linalg.norm(mean)),
            "means": summ(cov_m),
            "aggregate": summ(cov_agg),
            "mean_posterior_var": float(S2.mean()),
            "k": int(k),
            "n_cells": int(M.shape[0]),
        }

    # --- export -----------------------------------------------------------------------------
    def settings(self) -> dict:
        out = {"inference_method": "vae", **self.config.to_dict(), "init_method": self.init_method,
               "wall_time_s": float(self.wall_time)}
        cap = self.params.capture
        out["capture"] = None if cap is None else {"M0": cap.M0, "sigma_M": cap.sigma_M}
        out["stopped_step"] = int(self.history.get("stopped_step", -1))
        return out

    def to_anndata(self, adata):
        """Write obsm X_pln_vae_z (E_q z), X_pln_vae_x (E_q x), obs pln_vae_eta, varm PLN_W,
        var PLN_mu/PLN_d and uns['pln_vae'] (settings). Returns the same AnnData."""
        if adata.n_obs != self.posterior.N or adata.n_vars != self.params.G:
            raise ValueError(f"AnnData shape {adata.shape} != fitted ({self.posterior.N}, {self.params.G})")
        adata.obsm["X_pln_vae_z"] = np.asarray(self.posterior.z_mean)
        adata.obsm["X_pln_vae_x"] = np.asarray(self.posterior.x_mean)
        adata.obs["pln_vae_eta"] = np.asarray(self.eta_map)
        adata.varm["PLN_W"] = np.asarray(self.params.W)
        adata.var["PLN_mu"] = np.asarray(self.params.mu)
        adata.var["PLN_d"] = np.asarray(self.params.d)
        s = self.settings()
        s["capture"] = json.dumps(s["capture"])
        adata.uns["pln_vae"] = s
        return adata

    def to_arviz(self, n_draws: int = 200, cells=None, seed: int = 0):
        """``arviz.InferenceData`` with draws of the VAE posterior of (some) training cells.

        posterior: x (1 chain, n_draws, cell, gene), eta (cell), z (cell, factor) drawn from q
        (z is drawn jointly with x: x = mu + W z + e); constant_data: mu, W, d. ``cells``: index
        array (default all cells; keep n_draws * N * G moderate).
        """
        import arviz as az

        q = self.posterior
        idx = np.arange(q.N) if cells is None else np.asarray(cells)
        rng = np.random.default_rng(seed)
        S, p = int(n_draws), self.params
        zm, zv = q.z_mean[idx], q.z_var[idx]
        z = zm + np.sqrt(zv) * rng.standard_normal((S, len(idx), p.k))
        x = p.mu + q.r[idx] + z @ p.W.T + np.sqrt(q.v[idx]) * rng.standard_normal((S, len(idx), p.G))
        sub = VAEPosterior(p, zm, zv, q.r[idx], q.v[idx],
                           None if q.eta_loc is None else q.eta_loc[idx],
                           None if q.eta_scale is None else q.eta_scale[idx])
        _, eta = sub.sample(rng, S)
        return az.from_dict(
            posterior={"x": x[None], "eta": eta[None], "z": z[None]},
            constant_data={"mu": p.mu, "W": p.W, "d": p.d},
            dims={"x": ["cell", "gene"], "eta": ["cell"], "z": ["cell", "factor"],
                  "mu": ["gene"], "W": ["gene", "factor"], "d": ["gene"]},
            coords={"cell": idx, "gene": np.arange(p.G), "factor": np.arange(p.k)},
            attrs={"inference_method": "vae"},
        )

    def save(self, path) -> Path:
        """Directory with model.pt (torch state dict), params.npz (mu, W, d, training-cell
        posterior, anchor, history) and config.json."""
        torch = _torch()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), path / "model.pt")
        p, q = self.params, self.posterior
        arrays = dict(mu=p.mu, W=p.W, d=p.d, z_mean=q.z_mean, z_var=q.z_var, r=q.r, v=q.v,
                      history_elbo=np.asarray(self.history.get("elbo", []), float),
                      history_val=np.asarray(self.history.get("val_elbo", []), float).reshape(-1, 2))
        if q.eta_loc is not None:
            arrays.update(eta_loc=q.eta_loc, eta_scale=q.eta_scale)
        if self.log_anchor is not None:
            arrays["log_anchor"] = self.log_anchor
        np.savez(path / "params.npz", **arrays)
        (path / "config.json").write_text(json.dumps(
            {"config": self.config.to_dict(), "settings": self.settings(),
             "stopped_step": int(self.history.get("stopped_step", -1))}, indent=1))
        return path

    @classmethod
    def load(cls, path) -> "VAEResult":
        torch = _torch()
        from .vae_model import PLNVAE

        path = Path(path)
        meta = json.loads((path / "config.json").read_text())
        cfg = dict(meta["config"])
        cfg["hidden"] = tuple(cfg["hidden"])
        config = VAEConfig(**cfg)
        cap = meta["settings"]["capture"]
        capture = None if cap is None else Capture(M0=cap["M0"], sigma_M=cap["sigma_M"])
        z = np.load(path / "params.npz")
        params = PLNParams(mu=z["mu"], W=z["W"], d=z["d"], capture=capture)
        model = PLNVAE(params.G, params.k, hidden=config.hidden, capture=capture,
                       residual=config.residual, n_local_rounds=config.n_local_rounds)
        model.load_state_dict(torch.load(path / "model.pt", weights_only=True))
        model.eval()
        post = VAEPosterior(params, z["z_mean"], z["z_var"], z["r"], z["v"],
                            z["eta_loc"] if "eta_loc" in z else None,
                            z["eta_scale"] if "eta_scale" in z else None)
        hist = {"elbo": list(z["history_elbo"]), "val_elbo": [tuple(r) for r in z["history_val"]],
                "stopped_step": meta.get("stopped_step", -1)}
        return cls(params=params, model=model, config=config, posterior=post, history=hist,
                   log_anchor=z["log_anchor"] if "log_anchor" in z else None,
                   init_method=meta["settings"].get("init_method", ""),
                   wall_time=meta["settings"].get("wall_time_s", 0.0))


# ------------------------------------------------------------------------------------------------
# encoding and fitting
# ------------------------------------------------------------------------------------------------
def _prior_m(capture, la, torch):
    if capture is None:
        return None
    return torch.as_tensor(capture.prior_mean(la), dtype=torch.float64)


def _encode(model, u: np.ndarray, la, params: PLNParams, batch_size: int) -> VAEPosterior:
    torch = _torch()
    cap = params.capture
    out = {k: [] for k in ("m", "s2", "r", "v", "a", "b")}
    with torch.no_grad():
        for i in range(0, u.shape[0], batch_size):
            ub = torch.as_tensor(u[i:i + batch_size], dtype=torch.float64)
            pm = None if cap is None else _prior_m(cap, la[i:i + batch_size], torch)
            m, lv = model.encode_z(ub, torch.log1p(ub.sum(1)))
            st = model.local_updates(ub, m, lv, pm)
            out["m"].append(m.numpy()); out["s2"].append(torch.exp(lv).numpy())  # noqa: E702
            out["r"].append(st.r.numpy()); out["v"].append(st.v.numpy())  # noqa: E702
            if cap is not None:
                out["a"].append(st.a.numpy()); out["b"].append(st.b.numpy())  # noqa: E702
    cat = lambda key: np.concatenate(out[key]) if out[key] else None  # noqa: E731
    return VAEPosterior(params, cat("m"), cat("s2"), cat("r"), cat("v"), cat("a"), cat("b"))


def _model_params(model, capture) -> PLNParams:
    with _torch().no_grad():
        return PLNParams(mu=model.mu.numpy().copy(), W=model.W.numpy().copy(),
                         d=model.d.numpy().copy(), capture=capture)


def fit_vae(
    counts,
    k: int,
    *,
    capture: Capture | None = None,
    log_anchor=None,
    n_steps: int = 5000,
    batch_size: int = 256,
    hidden=(128, 64),
    lr: float = 3e-3,
    seed: int = 0,
    kl_anneal_steps: int = 0,
    progress: bool = True,
    residual: str = "laplace",
    val_fraction: float = 0.1,
    eval_every: int = 100,
    patience: int = 5,
    tol: float = 0.01,
    init: PLNParams | None = None,
    train_decoder: bool = True,
    layer: str | None = None,
    cache_local: bool = True,
    warm_rounds: int = 2,
    encoder_weight_decay: float = 0.0,
    restore_best: bool = True,
) -> VAEResult:
    """Fit the PLN VAE (ELBO and family: module docstrings of ``pln_ref.vae`` / ``vae_model``).

    counts (N, G) (anything ``pln_ref.data.as_counts`` accepts); k = vae_latent_dim (1 <= k < G);
    capture: ``Capture`` or None (eta = 0); log_anchor (N,) defaults to log of the realised
    library size. ``init``: PLNParams to start the decoder from (default: method of moments /
    log1p+SVD). ``train_decoder=False`` keeps (mu, W, d) at ``init`` and trains only the encoder.
    Early stopping: held-out ELBO per cell, see module docstring. ``cache_local``: during training,
    warm-start each cell's closed-form (r, v) sweep from its previous visit and run only
    ``warm_rounds`` sweeps (a speed device; held-out evaluation and ``encode`` always run the
    full cold sweeps). Returns a ``VAEResult``.
    """
    torch = _torch()
    from .vae_model import PLNVAE

    u = _counts(counts, layer=layer)
    N, G = u.shape
    k = int(k)
    if not (1 <= k < G):
        raise ValueError(f"latent dimension k={k} must satisfy 1 <= k < G={G}")
    if capture is not None and not isinstance(capture, Capture):
        raise ValueError("capture must be a pln_ref.Capture or None")
    for name, val in (("n_steps", n_steps), ("batch_size", batch_size), ("eval_every", eval_every),
                      ("patience", patience)):
        if int(val) < 1:
            raise ValueError(f"{name} must be >= 1, got {val}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be positive, got {lr}")
    if not (0.0 <= val_fraction < 0.5):
        raise ValueError(f"val_fraction must be in [0, 0.5), got {val_fraction}")
    la = _log_anchor(u, log_anchor, capture)
    config = VAEConfig(k=k, hidden=tuple(int(h) for h in hidden), n_steps=int(n_steps),
                       batch_size=int(batch_size), lr=float(lr), seed=int(seed),
                       kl_anneal_steps=int(kl_anneal_steps), residual=residual,
                       val_fraction=float(val_fraction), eval_every=int(eval_every),
                       patience=int(patience), tol=float(tol), train_decoder=bool(train_decoder),
                       warm_rounds=int(warm_rounds), encoder_weight_decay=float(encoder_weight_decay))

    t0 = time.perf_counter()
    if init is None:
        init, init_method = _init_decoder(u, k, capture, la)
    else:
        if init.G != G or init.k != k:
            raise ValueError(f"init has (G, k)=({init.G}, {init.k}), expected ({G}, {k})")
        init_method = "given"

    det_prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = PLNVAE(G, k, hidden=config.hidden, capture=capture, residual=residual)
        model.set_decoder(init.mu, init.W, init.d)
        U = torch.as_tensor(u, dtype=torch.float64)
        loglib = torch.log1p(U.sum(1))
        PM = _prior_m(capture, la, torch) if capture is not None else None

        perm = torch.randperm(N, generator=gen)
        n_val = int(round(val_fraction * N)) if N >= 20 else 0
        val_idx, tr_idx = perm[:n_val], perm[n_val:]
        model.set_input_stats(torch.log1p(U[tr_idx]), loglib[tr_idx])
        if not train_decoder:
            for p in (model.mu, model.W, model.rho):
                p.requires_grad_(False)
        dec = {id(model.mu), id(model.W), id(model.rho)}
        groups = [{"params": [q for q in model.parameters() if q.requires_grad and id(q) not in dec],
                   "weight_decay": float(encoder_weight_decay)},
                  {"params": [q for q in model.parameters() if q.requires_grad and id(q) in dec],
                   "weight_decay": 0.0}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)

        def val_elbo():
            idx = val_idx if n_val > 0 else tr_idx
            tot = 0.0
            with torch.no_grad():
                for i in range(0, len(idx), 256):
                    j = idx[i:i + 256]
                    e, _, _ = model(U[j], loglib[j], None if PM is None else PM[j])
                    tot += float(e.sum())
            return tot / len(idx)

        hist = {"elbo": [], "val_elbo": []}
        # per-cell warm start of the local (r, v) sweeps: training only (N x G memory)
        cache = torch.zeros(N, G, dtype=torch.float64) if (cache_local and residual == "laplace") else None
        visited = torch.zeros(N, dtype=torch.bool)
        best, best_state, bad, stopped = -math.inf, None, 0, int(n_steps)
        n_tr = len(tr_idx)
        bs = min(int(batch_size), n_tr)
        order, pos = tr_idx[torch.randperm(n_tr, generator=gen)], 0
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=int(n_steps), disable=not progress, desc="VAE", leave=False)
        except ImportError:  # pragma: no cover
            bar = None
        for step in range(int(n_steps)):
            if pos + bs > n_tr:
                order, pos = tr_idx[torch.randperm(n_tr, generator=gen)], 0
            j = order[pos:pos + bs]
            pos += bs
            beta = 1.0 if kl_anneal_steps <= 0 else min(1.0, (step + 1) / kl_anneal_steps)
            warm = None
            if cache is not None and bool(visited[j].all()):
                warm = cache[j]
            elbo, terms, st = model(U[j], loglib[j], None if PM is None else PM[j], beta=beta,
                                    w_r=warm, n_rounds=None if warm is None else warm_rounds)
            if cache is not None and st.w_r is not None:
                cache[j] = st.w_r
                visited[j] = True
            loss = -elbo.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            full = float((terms["rec"] - terms["kl_z"] - terms["kl_e"] + terms["eta"]).mean().detach())
            hist["elbo"].append(full)
            if bar is not None:
                bar.update(1)
                if step % 20 == 0:
                    bar.set_postfix(elbo=f"{full:.2f}", best_val=f"{best:.2f}")
            if (step + 1) % eval_every == 0 or step + 1 == n_steps:
                ve = val_elbo()
                hist["val_elbo"].append((step + 1, ve))
                if beta >= 1.0:
                    if ve > best + tol:
                        best, bad = ve, 0
                        best_state = copy.deepcopy(model.state_dict())
                    else:
                        bad += 1
                        if bad >= patience:
                            stopped = step + 1
                            break
        if bar is not None:
            bar.close()
        if best_state is not None and restore_best:
            model.load_state_dict(best_state)
        hist["stopped_step"] = stopped
        hist["best_val_elbo"] = best
        model.eval()
        params = _model_params(model, capture)
        post = _encode(model, u, la, params, 256)
    finally:
        torch.use_deterministic_algorithms(det_prev)
    wall = time.perf_counter() - t0
    return VAEResult(params=params, model=model, config=config, posterior=post, history=hist,
                     log_anchor=la, init_method=init_method, wall_time=wall)
