"""Amortised variational inference (VAE) for the PLN model with capture: fit, posterior, result.

The model, variational family and the closed-form ELBO are documented in ``pln_ref.vae_model``
(read that docstring first). Summary of the ELBO (every term exact, no Monte Carlo)::

    ELBO_c = sum_g [u_g (mu_g + W_g m + r_g - E eta) - E[e^{-eta}] e^{mu_g + W_g m + |W_g s|^2/2 + r_g + v_g/2}
                    - log u_g!]
             - KL(N(m, s^2) || N(0, I_k)) - KL(N(r, v) || N(0, diag d))
             + E_q log TruncN(eta | log M0 - log L_c, sigma_M, 0) + H[q(eta)]

Implied posterior over the latents of the seed model (what ``VAEPosterior`` exposes), by
``VAEConfig.family``:

* "structured" (default, issue 16): q(eta) q(z, e | eta) with x shifting linearly in eta::

      q(eta | u)     = TruncN(a, b^2, low = 0)
      q(x | eta, u)  = N(x_mean + beta (eta - E eta),  C)
      C = diag(1 - kappa) W S W^T diag(1 - kappa) + diag(v)      (z_cov="full", default)
      C = W diag(s^2) W^T + diag(v)                              (z_cov="diag", before 2026-12-06)

  With ``z_cov="full"`` q(z | eta) has a full k x k covariance S and e | z, eta has the slope
  -kappa_g W_g on z's deviation, so at the fixed point C = (Sigma^-1 + diag(lam))^-1, lam =
  E_q e^{x - eta}: the covariance of the Gaussian VI optimum, of the same form as Laplace's. The
  diagonal family cannot represent it: on issue 16's scRNA design (``vae_real_cells.py``, 199 cells
  vs gated NUTS) it under-disperses genes with large loadings (|W_g| 2.2, 46% zeros: median SD
  ratio 0.77) and over-disperses high-d genes (z independent of e ignores their negative posterior
  correlation): x SD ratios 0.61-1.33, 87.9% in 0.9-1.1, k-hat < 0.7 in 90.8% of cells (mean of 3
  PSIS seeds); with z_cov="full" 0.91-1.07, 100%, 99.7%, and the ELBO is 1.85 nats/cell higher.

  so corr_q(x_g, eta) = beta_g sd(eta) / sd(x_g) follows the x_g - eta coupling the counts impose
  (beta_g -> 1 in well-sequenced cells); the ELBO stays closed form through the truncated-normal
  MGF (``pln_ref.vae_model``). Measured on the validation cell design (G=20, k=3, 200 cells,
  library sizes 100-5000, true globals, vs gated NUTS; ``pln-ref validate --parts cell``), with
  z_cov="full": median |std. mean error| x 0.014, eta 0.014; x SD ratios 0.914-1.069, 100% of x and
  eta SD ratios in 0.9-1.1; 90% coverage 0.898; k-hat < 0.7 in 100% of cells; corr(x_g, eta) by
  library tercile 0.40 / 0.55 / 0.78 vs NUTS 0.39 / 0.55 / 0.78 (z_cov="diag": 0.017, 0.018, x SD
  ratios 0.814-1.203, 95.5% / 100%, 0.906, 99.5%; the mean-field family: 0.096, 0.154, 34.9%, 0%,
  0.790, 14%, 0 / 0 / 0). Details: validation/reports/vae-fullcov-2026-12-06/README.md.
* "meanfield" (the family before issue 16)::

      q(x, eta | u) = q(x | u) q(eta | u),  q(x | u) = N(mu + W m + r, W diag(s^2) W^T + diag(v))

With ``residual="prior"`` (mean-field only; r = 0, v = d) the residual part of q(x | u) is the
PRIOR of e, not a posterior. What the mean-field and the z_cov="diag" families do not represent:
the posterior correlation between z and e given eta (z_cov="full" does: e | z has the slope
-kappa W); what no family represents: any non-Gaussian shape of p(x | eta, u).

Transform time (``encode``, and the training cells' posterior): the encoder's q(z), the family's
closed-form local updates, then ``refine_steps`` (default 2) rounds of per-cell refinement of q(z)
(a Newton step on its mean and the exact fixed point of its variances, ``PLNVAE.refine_z``; with
z_cov="full" the Newton step is on the profile ELBO max_r ELBO(m, r), Hessian
I + W^T diag(lam / (1 + lam d)) W, and S, kappa come from their closed-form fixed point): this
closes most of the amortisation gap of the encoder on cells it was not trained on. Measured by
``amortisation_gap`` (200 Adam steps on each cell's q(z) from the delivered q) on simulated
N=2000, G=1000, k=10 (300 held-out and 300 training cells; ``bench_vae.py --gap --gap-G 1000
--gap-k 10``), nats/cell before -> after 2 refinement rounds: mean-field family held-out
4.19 -> 0.08, training 0.91 -> 0.02; structured family held-out 3.27 -> 0.20, training 0.71 -> 0.04
(z_cov="diag"). At N=2000, G=200, k=5 (``bench_vae.py --gap --families structured``) the held-out
gap after 2 rounds is 0.028 (diag) -> 0.004 nats/cell (full), training 0.003 -> 0.000; encode
throughput at G=2000, k=10 318 (full) vs 394 (diag) cells per CPU second, both ~0.1-0.2x Laplace
on a loaded machine (validation/reports/vae-fullcov-2026-12-06/README.md). Older figures:
Cost (CPU s per 256 cells, G=2000, k=10): mean field 0.11 / 0.18 without / with refinement,
structured 0.41 / 0.58; Laplace (``newton_map``) ~0.16. Throughput (``bench_vae.py``): structured
with refinement 465 cells per CPU second, mean field without 3675, Laplace 1652 -- the structured
family is ~3.5x slower than Laplace per cell (the per-gene truncated-normal MGF and its tilted
moments, O(G) per sweep, and 3 sweeps + 2 refinement rounds).
Training uses ``train_family``'s ELBO (default "meanfield", see ``VAEConfig``).

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
The loop itself is ``pln_ref.vae_train``; a fit that reaches ``n_steps`` without meeting the
stopping rule issues a ``pln_ref.exceptions.ConvergenceWarning``. Options: ``pln_ref.VAEConfig``.
Training stops with ``pln_ref.exceptions.TrainingDivergedError`` at the first non-finite ELBO or
parameter; ``fit_vae`` then retrains once with cold local sweeps (``cache_local=False``): on extreme
counts (two entries of 1e7) the warm-started sweeps lag behind their optimum, the envelope gradient
is then wrong and the encoder runs away, while cold sweeps stayed finite in every case measured.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np

from . import truncnorm
from .anchor import resolve_log_anchor
from .config import VAEConfig, method_config
from .constants import LOG_2PI
from .counts import CountMatrix
from .exceptions import ConvergenceWarning, TrainingDivergedError
from .params import Capture, PLNParams
from .protocol import PLNResult

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
def _counts(data, layer=None) -> CountMatrix:
    """The checked counts as a ``CountMatrix`` (kept in their storage, CSR stays CSR; read by blocks
    or minibatches of cells, never densified whole)."""
    return CountMatrix(data, layer=layer)


def _log_anchor(u: CountMatrix, log_anchor, capture) -> np.ndarray | None:
    """log L_c by the one anchor policy (``anchor.resolve_log_anchor``); None without capture."""
    return None if capture is None else resolve_log_anchor(u, log_anchor)


def _init_decoder(u: CountMatrix, k: int, capture, log_anchor) -> tuple[PLNParams, str]:
    """Method of moments when available (by blocks of cells), else log1p + SVD (mu = column mean,
    W from the top-k SVD of the centred log1p matrix / sqrt(N), d = residual variance floored at
    0.05; this fallback needs the whole log1p matrix dense)."""
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
    y = np.log1p(u.toarray())
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


def _check_eta(eta: str) -> None:
    if eta not in ("free", "map"):
        raise ValueError(f"eta must be 'free' or 'map', got {eta!r}")


# ------------------------------------------------------------------------------------------------
# posterior object
# ------------------------------------------------------------------------------------------------
@dataclass
class VAEPosterior:
    """The VAE's implied posterior over (x, eta) for N cells (see module docstring).

    q(eta | u) = TruncN(eta_loc, eta_scale^2, low=0) (eta = 0 without capture) and
    q(x | eta, u) = N(x_mean + beta (eta - E eta), C),  C = B B^T + diag(v),  B = W diag(s),
    with beta = ``x_slope`` (N, G) in the structured family and beta = 0 (x independent of eta) in
    the mean-field family (``x_slope`` None). Marginally E x = x_mean,
    Var x_g = C_gg + beta_g^2 Var eta, corr(x_g, eta) = beta_g sd(eta) / sd(x_g).
    z | eta = z_mean + ``z_slope`` (eta - E eta) + N(0, diag z_var); e | eta = r + (beta - W z_slope)
    (eta - E eta) + N(0, diag v). Attributes: z_mean (N,k), z_var (N,k), r (N,G), v (N,G) (marginal
    means / conditional variances), eta_loc, eta_scale (N,) or None, x_slope (N,G), z_slope (N,k)
    or None.
    """

    params: PLNParams
    z_mean: np.ndarray
    z_var: np.ndarray
    r: np.ndarray
    v: np.ndarray
    eta_loc: np.ndarray | None
    eta_scale: np.ndarray | None
    x_slope: np.ndarray | None = None
    z_slope: np.ndarray | None = None
    z_cov: np.ndarray | None = None
    kappa: np.ndarray | None = None

    @property
    def N(self) -> int:
        return self.z_mean.shape[0]

    @property
    def family(self) -> str:
        return "meanfield" if self.x_slope is None else "structured"

    @property
    def _coupled(self) -> bool:
        return self.x_slope is not None and self.eta_loc is not None

    @property
    def x_mean(self) -> np.ndarray:
        """E_q x = mu + W m + r, (N, G)."""
        return self.params.mu + self.z_mean @ self.params.W.T + self.r

    def mean_x(self, eta: str = "free") -> np.ndarray:
        """E_q x (N, G); with eta="map" (eta fixed at E_q eta) the conditional mean is the same."""
        _check_eta(eta)
        return self.x_mean

    @property
    def _full(self) -> bool:
        return self.z_cov is not None

    def _z_chol(self) -> np.ndarray:
        """Cholesky factor L (N, k, k) of Cov(z | eta): of ``z_cov``, else diag(sqrt(z_var))."""
        if self._full:
            return np.linalg.cholesky(self.z_cov)
        return np.sqrt(self.z_var)[:, :, None] * np.eye(self.params.k)

    def _one_minus_kappa(self) -> np.ndarray:
        return np.ones_like(self.v) if self.kappa is None else 1.0 - self.kappa

    def _cond_var_x(self) -> np.ndarray:
        """C_gg, the variance of x_g given eta, (N, G): sum_a W_ga^2 s_a^2 + v_g, or with the full
        q(z) covariance S and the e-on-z slope -kappa_g W_g: (1 - kappa_g)^2 W_g S W_g^T + v_g."""
        W = self.params.W
        if not self._full:
            return self.z_var @ (W**2).T + self.v
        k = self.params.k
        wsw = self.z_cov.reshape(-1, k * k) @ (W[:, :, None] * W[:, None, :]).reshape(-1, k * k).T
        return self._one_minus_kappa() ** 2 * wsw + self.v

    def sd_x(self, eta: str = "free") -> np.ndarray:
        """Marginal SDs of q(x | u): sqrt(C_gg + beta_g^2 Var eta), (N, G); eta="map": sqrt(C_gg)."""
        _check_eta(eta)
        var = self._cond_var_x()
        if self._coupled and eta == "free":
            var = var + self.x_slope**2 * self.eta_mean_var()[1][:, None]
        return np.sqrt(var)

    def corr_x_eta(self) -> np.ndarray:
        """corr_q(x_g, eta) = beta_g sd(eta) / sd(x_g), (N, G) (0 in the mean-field family)."""
        if not self._coupled:
            return np.zeros((self.N, self.params.G))
        return self.x_slope * self.eta_sd()[:, None] / self.sd_x()

    def expected_exp_x(self, eta: str = "free") -> np.ndarray:
        """Denoised expression E_q[e^{x_g}] (N, G): exp(E x_g - beta_g E eta + C_gg/2) M(beta_g),
        M the truncated-normal MGF of q(eta) (``truncnorm.log_mgf``); eta="map": exp(E x_g + C_gg/2)."""
        _check_eta(eta)
        out = self.x_mean + 0.5 * self._cond_var_x()
        if self._coupled and eta == "free":
            b = self.x_slope
            out = out - b * self.eta_mean[:, None] + truncnorm.log_mgf(b, self.eta_loc[:, None],
                                                                        self.eta_scale[:, None])
        return np.exp(out)

    def eta_mean_var(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance of eta under q (zeros without capture)."""
        if self.eta_loc is None:
            return np.zeros(self.N), np.zeros(self.N)
        return self._eta_stats()

    def subset(self, idx) -> "VAEPosterior":
        """The posterior of a subset of cells (index or boolean mask)."""
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return VAEPosterior(self.params, self.z_mean[idx], self.z_var[idx], self.r[idx], self.v[idx],
                            pick(self.eta_loc), pick(self.eta_scale), pick(self.x_slope), pick(self.z_slope),
                            pick(self.z_cov), pick(self.kappa))

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

    def sample_latents(self, rng: np.random.Generator, n_draws: int, eta: str = "free"):
        """Draws (z (S,N,k), e (S,N,G), eta (S,N)) from q: eta first, then z, e given eta."""
        _check_eta(eta)
        S, N, G, p = int(n_draws), self.N, self.params.G, self.params
        if self.eta_loc is None:
            et = np.zeros((S, N))
        elif eta == "map":
            et = np.broadcast_to(self.eta_mean, (S, N)).copy()
        else:
            et = truncnorm.sample(self.eta_loc, self.eta_scale, rng, size=(S, N))
        if self._full:
            dz = np.einsum("nab,snb->sna", self._z_chol(), rng.standard_normal((S, N, p.k)))
        else:
            dz = np.sqrt(self.z_var) * rng.standard_normal((S, N, p.k))
        z = self.z_mean + dz
        e = self.r + np.sqrt(self.v) * rng.standard_normal((S, N, G))
        if self.kappa is not None:  # e | z: slope -kappa_g W_g on z's deviation from E[z | eta]
            e = e - self.kappa * (dz @ p.W.T)
        if self._coupled:
            dlt = (et - self.eta_mean)[..., None]
            z = z + self.z_slope * dlt
            e = e + (self.x_slope - self.z_slope @ p.W.T) * dlt
        return z, e, et

    def sample(self, rng: np.random.Generator, n_draws: int, eta: str = "free"):
        """Draws (x (S,N,G), eta (S,N)) from q. eta="map" puts every eta draw at E_q eta (and x
        is drawn from q(x | eta = E_q eta))."""
        z, e, et = self.sample_latents(rng, n_draws, eta=eta)
        return self.params.mu + z @ self.params.W.T + e, et

    def _gauss_parts(self):
        """Per-cell Woodbury pieces of C = B B^T + diag(v), B_n = diag(1 - kappa_n) W L_n (L_n the
        Cholesky factor of Cov(z | eta); diag(s) and kappa = 0 without ``z_cov`` / ``kappa``):
        (V^-1 diag(1 - kappa) (N, G), W, L (N,k,k), Cholesky of K = I + B^T V^-1 B, log det C)."""
        W, L = self.params.W, self._z_chol()
        vinv = 1.0 / self.v
        wk = vinv * self._one_minus_kappa()  # V^-1 diag(1 - kappa)
        WtVW = np.einsum("ga,ng,gb->nab", W, wk * self._one_minus_kappa(), W)
        K = np.eye(self.params.k) + np.swapaxes(L, -1, -2) @ WtVW @ L
        Lk = np.linalg.cholesky(K)
        logdet = np.sum(np.log(self.v), 1) + 2.0 * np.sum(np.log(np.diagonal(Lk, axis1=1, axis2=2)), 1)
        return vinv, wk, W, L, Lk, logdet

    def _cinv(self, res: np.ndarray, parts) -> np.ndarray:
        """C^{-1} res for res (N, G) by Woodbury: V^-1 res - V^-1 B K^-1 B^T V^-1 res."""
        vinv, wk, W, L, Lk, _ = parts
        t = np.einsum("nab,na->nb", L, (res * wk) @ W)  # B^T V^-1 res
        K = Lk @ np.swapaxes(Lk, -1, -2)
        y = np.linalg.solve(K, t[..., None])[..., 0]
        return res * vinv - (np.einsum("nab,nb->na", L, y) @ W.T) * wk

    def _logpdf_gauss(self, res: np.ndarray, parts) -> np.ndarray:
        """log N(res | 0, C), res (S, N, G) -> (S, N)."""
        vinv, wk, W, L, Lk, logdet = parts
        t = np.einsum("nab,sna->snb", L, np.einsum("sng,ga->sna", res * wk, W))  # B^T V^{-1} res
        y = np.linalg.solve(Lk[None], t[..., None])[..., 0]
        quad = np.einsum("sng,sng->sn", res, res * vinv) - np.sum(y**2, -1)
        return -0.5 * (self.params.G * LOG_2PI + logdet + quad)

    def logpdf_x(self, x: np.ndarray) -> np.ndarray:
        """log q(x | u), x (S,N,G) -> (S,N). Mean field: the Gaussian N(x_mean, C) (Woodbury per
        cell). Structured: the exact 1-D mixture integral over eta, in closed form: with
        y = x - x_mean + beta E eta (so y | eta ~ N(beta eta, C)), P = beta^T C^-1 beta + 1/b^2 and
        h = beta^T C^-1 y + a/b^2,
        log q = log N(y | 0, C) - a^2/(2 b^2) - log b - log Phi(a/b) + h^2/(2P) - log(P)/2 + log Phi(h/sqrt P)."""
        x = np.asarray(x, dtype=float)
        parts = self._gauss_parts()
        if not self._coupled:
            return self._logpdf_gauss(x - self.x_mean, parts)
        a, b = self.eta_loc, self.eta_scale
        y = x - self.x_mean + self.x_slope * self.eta_mean[:, None]
        cb = self._cinv(self.x_slope, parts)  # (N, G)
        P = np.sum(self.x_slope * cb, -1) + 1.0 / b**2
        h = np.einsum("sng,ng->sn", y, cb) + a / b**2
        from scipy.special import log_ndtr
        return (self._logpdf_gauss(y, parts) - a**2 / (2 * b**2) - np.log(b) - truncnorm.log_normaliser(a, b)
                + h**2 / (2 * P) - 0.5 * np.log(P) + log_ndtr(h / np.sqrt(P)))

    def logpdf_eta(self, eta: np.ndarray) -> np.ndarray:
        """log TruncN(eta | a, b, 0), (S,N) (0 without capture)."""
        eta = np.asarray(eta, dtype=float)
        if self.eta_loc is None:
            return np.zeros(eta.shape)
        return truncnorm.logpdf(eta, self.eta_loc, self.eta_scale)

    def logpdf(self, x: np.ndarray, eta: np.ndarray) -> np.ndarray:
        """log q(x, eta | u) = log q(eta | u) + log N(x | x_mean + beta (eta - E eta), C),
        shapes (S,N,G), (S,N) -> (S,N) (beta = 0 in the mean-field family)."""
        x = np.asarray(x, dtype=float)
        eta = np.asarray(eta, dtype=float)
        res = x - self.x_mean
        if self._coupled:
            res = res - self.x_slope * (eta - self.eta_mean)[..., None]
        return self._logpdf_gauss(res, self._gauss_parts()) + self.logpdf_eta(eta)


# ------------------------------------------------------------------------------------------------
# result object
# ------------------------------------------------------------------------------------------------
@dataclass
class VAEResult(PLNResult):
    """Fitted VAE: globals (mu, W, d), the encoder, and the posteriors of the training cells.

    Follows the result protocol (``pln_ref.protocol.PLNResult``): x_map = E_q x, eta_map = E_q eta,
    capture_probability = exp(-eta_map), sd_x(), denoised(), factor_scores() (encoder means of z),
    summary(), to_anndata(), to_arviz(), save()/load(). ``history``: per-step "step",
    "objective" (training ELBO per cell) and "validation_objective" (held-out ELBO per cell at
    the evaluation steps, NaN elsewhere). ``config``: the ``VAEConfig`` of the fit.
    """

    params: PLNParams
    model: object  # PLNVAE (torch module)
    config: VAEConfig
    posterior: VAEPosterior
    history: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    log_anchor: np.ndarray | None = None
    gene_names: list | None = None
    cell_names: list | None = None

    inference_method = "vae"
    _label = "VAE"

    @property
    def z_mean(self) -> np.ndarray:
        return self.posterior.z_mean

    def factor_scores(self) -> np.ndarray:
        """Encoder means of z, shape (N, k)."""
        return self.posterior.z_mean

    def _summary_lines(self) -> list[str]:
        dg = self.diagnostics
        nan = float("nan")
        return [
            f"  training ELBO per cell (last): {dg.get('objective', nan):.4f};"
            f" best held-out ELBO per cell: {dg.get('best_validation_objective', nan):.4f}",
            f"  steps: {dg.get('steps')}  ({dg.get('stopped')})  wall time {dg.get('wall_time_s', nan):.1f} s;"
            f" init {dg.get('init_method')}",
            f"  posterior family {self.config.family} (trained with the "
            f"{self.config.train_family or self.config.family} ELBO), refine_steps {self.config.refine_steps}",
        ] + ([f"  {dg['retrained']}"] if dg.get("retrained") else [])

    # --- new cells --------------------------------------------------------------------------
    def _refine(self, refine_steps) -> int:
        return int(getattr(self.config, "refine_steps", 0) if refine_steps is None else refine_steps)

    def encode(self, new_counts, log_anchor=None, *, batch_size: int = 256,
               refine_steps: int | None = None) -> VAEPosterior:
        """Posterior of new cells: the encoder's q(z), the closed-form local updates of the
        family, then ``refine_steps`` (default ``config.refine_steps``) per-cell refinement rounds
        of q(z) (``PLNVAE.refine_z``: closed-form Newton / fixed point, no optimiser).
        Deterministic; batched, row-independent.

        ``batch_size`` 256 is the measured optimum on CPU (G=2000: 128-512 cells per batch run
        ~1.6-1.9k cells/s on one thread, 4096 only ~0.8k/s: the N x G temporaries leave cache).
        ``new_counts``: array, scipy.sparse matrix, AnnData or ``CountMatrix``, read one batch of
        cells at a time (CSR stays CSR).
        """
        u = _counts(new_counts)
        if u.shape[1] != self.params.G:
            raise ValueError(f"new counts have {u.shape[1]} genes, the model has G={self.params.G}")
        la = _log_anchor(u, log_anchor, self.params.capture)
        return _encode(self.model, u, la, self.params, batch_size, self._refine(refine_steps))

    def elbo(self, counts, log_anchor=None, *, batch_size: int = 256, refine_steps: int = 0) -> np.ndarray:
        """Closed-form ELBO per cell (N,) of (new or training) cells under the encoder's q
        (after ``refine_steps`` refinement rounds; default 0: the encoder output as is). ``counts``
        are read ``batch_size`` cells at a time (CSR stays CSR)."""
        torch = _torch()
        u = _counts(counts)
        la = _log_anchor(u, log_anchor, self.params.capture)
        out = []
        with torch.no_grad():
            for i in range(0, u.shape[0], batch_size):
                ub = torch.from_numpy(u.block(i, min(u.shape[0], i + batch_size)))
                pm = _prior_m(self.params.capture, None if la is None else la[i:i + batch_size], torch)
                st = _local_state(self.model, ub, pm, int(refine_steps))
                t = self.model.elbo_terms(ub, st, pm)
                out.append((t["rec"] - t["kl_z"] - t["kl_e"] + t["eta"]).numpy())
        return np.concatenate(out)

    def amortisation_gap(self, counts, log_anchor=None, *, n_iter: int = 200, lr: float = 0.05,
                         refine_steps: int | None = None) -> dict:
        """ELBO gain from optimising each cell's q(z) = N(m, s^2) directly (decoder fixed; the
        family's closed-form local quantities recomputed at every step), by ``n_iter`` Adam steps
        started at the delivered q (encoder + ``refine_steps`` refinement rounds, default
        ``config.refine_steps``).

        Returns the per-cell-mean ELBO of the raw encoder output ("elbo_encoder"), of the
        delivered q ("elbo_delivered") and after the optimisation ("elbo_optimised": the best
        seen per cell, including the raw and delivered ones), and the gaps in nats per cell:
        "gap_mean" / "gap_max" = optimised - delivered (the gap that remains), "gap_encoder_mean" =
        optimised - raw encoder (the gap without refinement). Lower bounds on the true gaps.
        """
        torch = _torch()
        from .vae_model import LOGVAR_MAX, LOGVAR_MIN

        n_ref = self._refine(refine_steps)
        u = _counts(counts)
        la = _log_anchor(u, log_anchor, self.params.capture)
        U = torch.from_numpy(u.toarray())  # every cell's q(z) is optimised jointly: dense on purpose
        pm = _prior_m(self.params.capture, la, torch)
        model = self.model

        def total(st):
            t = model.elbo_terms(U, st, pm)
            return t["rec"] - t["kl_z"] - t["kl_e"] + t["eta"]

        with torch.no_grad():
            st_raw = _local_state(model, U, pm, 0)
            e_raw = total(st_raw).numpy()
            st_del = model.refine_z(U, st_raw, pm, n_ref) if n_ref else st_raw
            e_del = total(st_del).numpy()
        m = st_del.m.clone().requires_grad_(True)
        lv = st_del.logvar.clone().requires_grad_(True)
        opt = torch.optim.Adam([m, lv], lr=lr)
        st = st_del

        def per_cell(st):
            lvc = torch.clamp(lv, LOGVAR_MIN, LOGVAR_MAX)
            if model.family == "structured":
                st = model.local_updates_structured(U, m.detach(), lvc.detach(), pm, n_rounds=2, init=st)
            else:
                st = model.local_updates(U, m.detach(), lvc.detach(), pm)
            return total(st.replace(m=m, logvar=lvc)), st

        best = np.maximum(e_raw, e_del)
        for _ in range(int(n_iter)):
            e, st = per_cell(st)
            best = np.maximum(best, e.detach().numpy())
            opt.zero_grad()
            (-e.sum()).backward()
            opt.step()
        best = np.maximum(best, per_cell(st)[0].detach().numpy())
        gap = best - e_del
        return {"elbo_encoder": float(e_raw.mean()), "elbo_delivered": float(e_del.mean()),
                "elbo_optimised": float(best.mean()), "gap_mean": float(gap.mean()),
                "gap_max": float(gap.max()), "gap_encoder_mean": float((best - e_raw).mean()),
                "refine_steps": n_ref, "family": model.family, "n_cells": int(u.shape[0]),
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

    # --- protocol hooks -----------------------------------------------------------------------
    def _arviz_draws(self, post: VAEPosterior, rng: np.random.Generator, n_draws: int) -> dict:
        """x drawn jointly with z and eta (x = mu + W z + e, z and e given eta) from q."""
        z, e, eta = post.sample_latents(rng, int(n_draws))
        return {"x": self.params.mu + z @ self.params.W.T + e, "eta": eta, "z": z}

    def _state(self) -> tuple[dict, dict]:
        q = self.posterior
        arrays = dict(z_mean=q.z_mean, z_var=q.z_var, r=q.r, v=q.v,
                      model_state=_state_bytes(self.model.state_dict()))
        if q.eta_loc is not None:
            arrays.update(eta_loc=q.eta_loc, eta_scale=q.eta_scale)
        if q.x_slope is not None:
            arrays.update(x_slope=q.x_slope, z_slope=q.z_slope)
        if q.z_cov is not None:
            arrays.update(z_cov=q.z_cov, kappa=q.kappa)
        if self.log_anchor is not None:
            arrays["log_anchor"] = self.log_anchor
        return arrays, {"config": self.config.to_dict()}

    @classmethod
    def _from_state(cls, z, meta: dict, params: PLNParams, common: dict) -> "VAEResult":

        cfg = dict(meta["config"])
        if "family" not in cfg:  # saved before issue 16: the mean-field family, no refinement
            cfg.update(family="meanfield", refine_steps=0)
        cfg.setdefault("z_cov", "diag")  # saved before the full q(z) covariance
        config = VAEConfig(**cfg)
        model = _new_model(params.G, params.k, params.capture, config)
        model.load_state_dict(_state_from_bytes(z["model_state"]))
        model.eval()
        post = VAEPosterior(params, z["z_mean"], z["z_var"], z["r"], z["v"],
                            z["eta_loc"] if "eta_loc" in z.files else None,
                            z["eta_scale"] if "eta_scale" in z.files else None,
                            z["x_slope"] if "x_slope" in z.files else None,
                            z["z_slope"] if "z_slope" in z.files else None,
                            z["z_cov"] if "z_cov" in z.files else None,
                            z["kappa"] if "kappa" in z.files else None)
        return cls(model=model, config=config, posterior=post,
                   log_anchor=z["log_anchor"] if "log_anchor" in z.files else None, **common)


def _state_bytes(state_dict) -> np.ndarray:
    """A torch state dict serialised into a uint8 array (stored inside the result's .npz)."""
    torch = _torch()
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def _state_from_bytes(arr: np.ndarray) -> dict:
    return _torch().load(io.BytesIO(arr.tobytes()), weights_only=True)


# ------------------------------------------------------------------------------------------------
# encoding and fitting
# ------------------------------------------------------------------------------------------------
def _prior_m(capture, la, torch):
    if capture is None:
        return None
    return torch.as_tensor(capture.prior_mean(la), dtype=torch.float64)


def _local_state(model, ub, pm, refine_steps: int):
    """The family's local state of a batch: encoder q(z), closed-form local updates, then
    ``refine_steps`` refinement rounds of q(z) (no grad)."""
    torch = _torch()
    with torch.no_grad():
        m, lv = model.encode_z(ub, torch.log1p(ub.sum(1)))
        st = model.local(ub, m, lv, pm)
        if refine_steps:
            st = model.refine_z(ub, st, pm, refine_steps)
    return st


def _encode(model, u: CountMatrix, la, params: PLNParams, batch_size: int, refine_steps: int = 0) -> VAEPosterior:
    """VAEPosterior of the cells u (read ``batch_size`` cells at a time): marginal means z_mean = m + c_z mu_d, r + c mu_d and the
    slopes (structured family with capture), else the mean-field quantities."""
    from .vae_model import eta_moments

    torch = _torch()
    cap = params.capture
    keys = ("m", "s2", "r", "v", "a", "b", "xs", "zs", "S", "kappa")
    N = u.shape[0]
    out: dict = {k: None for k in keys}  # (N, ...) arrays, allocated at the first batch

    def put(key, sl, val) -> None:  # copied: a batch's tensors (and what they view) are not kept
        arr = val.numpy()
        if out[key] is None:
            out[key] = np.empty((N,) + arr.shape[1:], dtype=arr.dtype)
        out[key][sl] = arr

    coupled = cap is not None and model.family == "structured"
    with torch.no_grad():
        for i in range(0, N, batch_size):
            sl = slice(i, min(N, i + batch_size))
            ub = torch.from_numpy(u.block(sl.start, sl.stop))
            pm = None if cap is None else _prior_m(cap, la[sl], torch)
            st = _local_state(model, ub, pm, refine_steps)
            m, r = st.m, st.r
            if coupled:
                mean, _ = eta_moments(st.a, st.b)
                mu_d = (mean - st.eta_r)[:, None]
                m = m + st.c_z * mu_d
                r = r + (st.beta - st.c_z @ model.W.T) * mu_d
                put("xs", sl, st.beta)
                put("zs", sl, st.c_z)
                if st.S is not None:
                    put("S", sl, st.S)
                    put("kappa", sl, st.kappa)
            put("m", sl, m)
            put("s2", sl, torch.exp(st.logvar))
            put("r", sl, r)
            put("v", sl, st.v)
            if cap is not None:
                put("a", sl, st.a)
                put("b", sl, st.b)
            del st, ub, m, r
    return VAEPosterior(params, *(out[k] for k in keys))


def _new_model(G: int, k: int, capture, cfg: VAEConfig):
    from .vae_model import PLNVAE

    return PLNVAE(G, k, hidden=cfg.hidden, capture=capture, residual=cfg.residual,
                  n_local_rounds=cfg.n_local_rounds, family=cfg.family,
                  structured_rounds=cfg.structured_rounds, z_cov=cfg.z_cov)


def _model_params(model, capture) -> PLNParams:
    with _torch().no_grad():
        return PLNParams(mu=model.mu.numpy().copy(), W=model.W.numpy().copy(),
                         d=model.d.numpy().copy(), capture=capture)


def _check_inputs(counts, k, capture, log_anchor, layer) -> tuple[CountMatrix, int, np.ndarray | None]:
    u = _counts(counts, layer=layer)
    G = u.shape[1]
    k = int(k)
    if not (1 <= k < G):
        raise ValueError(f"latent dimension k={k} must satisfy 1 <= k < G={G}")
    if capture is not None and not isinstance(capture, Capture):
        raise ValueError("capture must be a pln_ref.Capture or None")
    return u, k, _log_anchor(u, log_anchor, capture)


@contextmanager
def _deterministic(torch):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def _log1p_moments(u: CountMatrix, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and standard deviation (ddof=1) of log1p(u) over the rows ``cells``, by blocks
    of cells (two passes: the mean, then the centred squares), shapes (G,)."""
    take = np.zeros(u.shape[0], dtype=bool)
    take[cells] = True
    n = int(take.sum())
    s1 = np.zeros(u.shape[1])
    for sl, ub in u.blocks():
        s1 += np.log1p(ub[take[sl]]).sum(axis=0)
    mean = s1 / n
    s2 = np.zeros(u.shape[1])
    for sl, ub in u.blocks():
        y = np.log1p(ub[take[sl]])
        y -= mean
        s2 += np.einsum("cg,cg->g", y, y)
    return mean, np.sqrt(s2 / (n - 1)) if n > 1 else np.full(u.shape[1], np.nan)


def _setup(u: CountMatrix, la, capture, init: PLNParams, cfg: VAEConfig, gen):
    """The model (decoder at ``init``, encoder input statistics of the training cells) and the
    training data with its held-out split (a ``val_fraction`` of the cells when N >= 20). The counts
    stay a ``CountMatrix``: minibatches are read as dense rows when drawn."""
    torch = _torch()
    from .vae_train import TrainData

    u = CountMatrix(u)  # no copy for a CountMatrix
    N, G = u.shape
    model = _new_model(G, init.k, capture, cfg)
    model.set_decoder(init.mu, init.W, init.d)
    loglib = torch.log1p(torch.from_numpy(u.total_counts()))
    perm = torch.randperm(N, generator=gen)
    n_val = int(round(cfg.val_fraction * N)) if N >= 20 else 0
    data = TrainData(u, loglib, _prior_m(capture, la, torch), tr_idx=perm[n_val:], val_idx=perm[:n_val])
    mean, sd = _log1p_moments(u, data.tr_idx.numpy())
    model.set_input_moments(torch.from_numpy(mean), torch.from_numpy(sd), loglib[data.tr_idx])
    if not cfg.train_decoder:
        for p in (model.mu, model.W, model.rho):
            p.requires_grad_(False)
    return model, data


def _history(log) -> dict:
    """The training log as the protocol's per-step history dict."""
    n = len(log.elbo)
    val = np.full(n, np.nan)
    for step, value in log.val_elbo:
        val[step - 1] = value
    return {"step": np.arange(1, n + 1), "objective": np.asarray(log.elbo, dtype=float),
            "validation_objective": val}


def _warn_if_capped(log, cfg: VAEConfig) -> None:
    if not log.stopped_early:
        warnings.warn(
            f"VAE training stopped at the step cap n_steps={cfg.n_steps} without meeting its stopping "
            f"rule (held-out ELBO not improving by more than tol={cfg.tol} for patience={cfg.patience} "
            "evaluations); raise n_steps or check history['validation_objective']",
            ConvergenceWarning, stacklevel=3)


def fit_vae(
    counts,
    k: int,
    *,
    capture: Capture | None = None,
    log_anchor=None,
    init: PLNParams | None = None,
    layer: str | None = None,
    progress: bool = True,
    config: VAEConfig | None = None,
    gene_names: list | None = None,
    cell_names: list | None = None,
    **options,
) -> VAEResult:
    """Fit the PLN VAE (ELBO and family: module docstrings of ``pln_ref.vae`` / ``vae_model``).

    counts (N, G) (anything ``pln_ref.data.as_counts`` accepts, or a ``CountMatrix``; kept in its
    storage and read by minibatches / blocks of cells, CSR stays CSR); k = vae_latent_dim (1 <= k < G);
    capture: ``Capture`` or None (eta = 0); log_anchor (N,) defaults to log of the realised
    library size. ``init``: PLNParams to start the decoder from (default: method of moments /
    log1p+SVD). Training options: a ``VAEConfig`` (``config``) and/or its fields as keywords
    (``n_steps``, ``lr``, ``patience``, ``train_decoder``, ...; an unknown keyword is an error).
    Early stopping: held-out ELBO per cell, see module docstring; a fit that reaches
    ``n_steps`` without meeting it issues a ``pln_ref.exceptions.ConvergenceWarning``.
    Returns a ``VAEResult``.
    """
    torch = _torch()

    cfg = method_config("vae", config, **options)
    u, k, la = _check_inputs(counts, k, capture, log_anchor, layer)
    t0 = time.perf_counter()
    if init is None:
        init, init_method = _init_decoder(u, k, capture, la)
    else:
        if init.G != u.shape[1] or init.k != k:
            raise ValueError(f"init has (G, k)=({init.G}, {init.k}), expected ({u.shape[1]}, {k})")
        init_method = "given"
    with _deterministic(torch):
        retrained = None
        try:
            model, log = _train(u, la, capture, init, cfg, progress)
        except TrainingDivergedError as exc:
            if not (cfg.cache_local and cfg.residual == "laplace"):
                raise
            # the warm-started local sweeps can lag far behind the optimum on extreme counts, and
            # the envelope gradient then runs away; cold sweeps every step stay finite (measured:
            # two entries of 1e7 in 200 x 30 cells, 4 of 4 designs / seeds finite over 1000 steps)
            retrained = f"{str(exc).split('. ')[0]} with warm-started local sweeps; retrained with cold sweeps"
            warnings.warn(f"{retrained} (cache_local=False)", ConvergenceWarning, stacklevel=2)
            cfg = replace(cfg, cache_local=False)
            try:
                model, log = _train(u, la, capture, init, cfg, progress)
            except TrainingDivergedError as exc2:
                raise TrainingDivergedError(f"with cold local sweeps (cache_local=False) too: {exc2}") from None
        if log.stopping.best_state is not None and cfg.restore_best:
            model.load_state_dict(log.stopping.best_state)
        model.eval()
        params = _model_params(model, capture)
        post = _encode(model, u, la, params, 256, cfg.refine_steps)
    _warn_if_capped(log, cfg)
    res = _assemble(params, model, cfg, post, log, la, k=k, init_method=init_method,
                    wall_time=time.perf_counter() - t0, gene_names=gene_names, cell_names=cell_names,
                    anchor="realised library size" if log_anchor is None else "given log_anchor")
    if retrained:
        res.diagnostics["retrained"] = retrained
    return res


def _train(u, la, capture, init: PLNParams, cfg: VAEConfig, progress: bool):
    """The seeded model and data (``_setup``) trained by ``vae_train.train``: (model, log)."""
    torch = _torch()
    from .vae_train import train

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model, data = _setup(u, la, capture, init, cfg, gen)
    model.family = cfg.train_family or cfg.family
    log = train(model, data, cfg, gen, progress=progress)
    model.family = cfg.family
    return model, log


def _assemble(params, model, cfg, post, log, la, *, k, init_method, wall_time, gene_names, cell_names,
              anchor) -> VAEResult:
    """The ``VAEResult``: protocol settings, diagnostics and history from the training log."""
    cap = params.capture
    settings = {"inference_method": "vae", "k": k, **cfg.to_dict(),
                "capture": None if cap is None else {"M0": cap.M0, "sigma_M": cap.sigma_M},
                "anchor": anchor}
    stop = log.stopping
    diagnostics = {
        "objective": float(log.elbo[-1]) if log.elbo else float("nan"),
        "best_validation_objective": float(stop.best),
        "steps": len(log.elbo), "stopped_step": int(log.stopped_step),
        "stopped": "early stopping on the held-out ELBO" if log.stopped_early else "step cap (n_steps)",
        "wall_time_s": float(wall_time), "init_method": init_method,
    }
    return VAEResult(params=params, model=model, config=cfg, posterior=post, history=_history(log),
                     settings=settings, diagnostics=diagnostics, log_anchor=la,
                     gene_names=gene_names, cell_names=cell_names)
