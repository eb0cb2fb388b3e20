"""Torch core of the PLN VAE: encoder, closed-form local updates and the exact ELBO.

Generative model (seed notation), one cell with counts u (G,), anchor L, capture prior mean
m_c = log M0 - log L::

    z ~ N(0, I_k),  e ~ N(0, diag(d)),  x = mu + W z + e        (e = sqrt(d) * eps)
    eta ~ TruncN(m_c, sigma_M^2, low=0)                          (eta = 0 when capture is None)
    u_g | x, eta ~ Poisson(exp(x_g - eta))

Variational family (mean field over the three blocks)::

    q(z, e, eta | u) = N(z | m, diag(s^2)) * prod_g N(e_g | r_g, v_g) * TruncN(eta | a, b^2, low=0)

* (m, log s^2) come from the encoder MLP (2k numbers per cell); log s^2 is clamped to
  [LOGVAR_MIN, LOGVAR_MAX] = [-10, 2] (s in [0.0067, 2.7]; the prior has s = 1).
* (r, v) and (a, b) are NOT learned: they are closed-form functions of (u, m, s, theta) computed by
  ``local_updates`` (a Lambert-W solve; no per-cell optimiser, a fixed number of iterations):
    - r, v: the exact coordinate-ascent optimum of the ELBO for q(e_g) given q(z), q(eta)
      (stationarity u_g - A_g e^{r_g + v_g/2} - r_g/d_g = 0, 1/v_g = A_g e^{r_g + v_g/2} + 1/d_g,
      A_g = E_q[e^{-eta}] exp(mu_g + W_g m + sum_a W_ga^2 s_a^2 / 2), solved by a fixed point on v
      with an exact Lambert-W step for r).
    - a, b: Laplace approximation, truncated at 0, of the concave eta-objective
      f(eta) = -U eta - R e^{-eta} - (eta - m_c)^2 / (2 sigma_M^2), with U = sum_g u_g and
      R = sum_g exp(mu_g + W_g m + sum_a W_ga^2 s_a^2/2 + r_g + v_g/2) = E_q[sum_g e^{x_g}]:
      a = unconstrained argmax of f (closed form via Lambert W), b^2 = 1 / (-f''(a)).
  Why closed form rather than extra encoder heads for eta (and a G-dimensional residual): the
  updates are the exact (r, v) / near-exact (a, b) coordinate optimum for each cell, so there is
  no amortisation gap in these blocks; they add no parameters; eta depends on the anchor L and on
  the counts exactly as the model says (an MLP head would have to learn the log-library-size
  relation and could drift on new cells). Cost per cell is O(G) per sweep, no optimiser.
  They are held fixed (stop-gradient) when the ELBO is differentiated w.r.t. (theta, encoder):
  since (r, v) is the exact optimum given the rest, the envelope theorem makes that gradient
  exact in (r, v); for (a, b) it is exact up to the Laplace-vs-optimal-TruncN gap.
  ``residual="prior"`` instead fixes q(e) = p(e) (r = 0, v = d): the literal "marginalise eps
  under its prior" ELBO. Its only d-dependence is -E[e^{x-eta}], so it drives d to its floor;
  it is kept for comparison only.

ELBO (per cell), every term in closed form -- NOTHING is sampled, zero Monte Carlo variance::

    ELBO = sum_g [ u_g (mu_g + W_g m + r_g - E_q eta)
                   - E_q[e^{-eta}] exp(mu_g + W_g m + sum_a W_ga^2 s_a^2 / 2 + r_g + v_g / 2)
                   - lgamma(u_g + 1) ]                                   (exact Gaussian MGF)
           - KL(N(m, s^2) || N(0, I))  = 1/2 sum_a (s_a^2 + m_a^2 - 1 - log s_a^2)
           - KL(q(e) || N(0, diag d))  = 1/2 sum_g ((v_g + r_g^2)/d_g - 1 - log(v_g/d_g))
           + E_q[log TruncN(eta | m_c, sigma_M, 0)] + H[TruncN(a, b, 0)]   (capture only)

with E_q eta, E_q[e^{-eta}] (the truncated-normal MGF at -1), E_q (eta - m_c)^2 and the entropy of
a truncated normal all in closed form (``truncnorm_moments``). With KL annealing the z-KL is
multiplied by beta in [0, 1] during training only.

Decoder parameters: mu (G,), W (G, k), d = D_FLOOR + softplus(rho) (G,), D_FLOOR = 1e-4.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

__all__ = [
    "LOGVAR_MIN",
    "LOGVAR_MAX",
    "D_FLOOR",
    "lambert_log_solve",
    "truncnorm_moments",
    "PLNVAE",
    "LocalState",
]

LOGVAR_MIN = -10.0
LOGVAR_MAX = 2.0
D_FLOOR = 1e-4
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def lambert_log_solve(L: torch.Tensor, n_iter: int = 4, w0: torch.Tensor | None = None) -> torch.Tensor:
    """Solve y + log y = L for y > 0 (i.e. y = W0(e^L)), returned as w = log y, elementwise.

    Start: Winitzki's approximation W0(x) ~ l (1 - log(1 + l)/(2 + l)), l = log(1 + x) = softplus(L)
    (w0 = L for L < -30, where y ~ e^L); then Newton on h(w) = e^w + w - L (convex, increasing:
    globally convergent). Max |error| over L in [-700, 1e8]: 2e-2 at start, 9e-5 / 2e-9 / 4e-15
    after 1 / 2 / 3 steps (measured); 4 steps are used. Log space: e^L never overflows.
    ``w0``: a warm start (e.g. the previous sweep's solution) replacing the Winitzki start.
    """
    if w0 is None:
        lp = F.softplus(L)
        y0 = lp * (1.0 - torch.log1p(lp) / (2.0 + lp))
        w = torch.where(L > -30.0, torch.log(torch.clamp(y0, min=1e-300)), L)
    else:
        w = w0
    for _ in range(n_iter):
        ew = torch.exp(w)
        num = (ew + w).sub_(L)
        w = w - num.div_(ew.add_(1.0))
    return w


def truncnorm_moments(a: torch.Tensor, b: torch.Tensor, m: torch.Tensor, sigma: float):
    """Closed-form expectations under q = TruncN(a, b^2, low=0) (alpha = -a/b, Z = Phi(a/b)).

    Returns (E eta, E e^{-eta}, E log TruncN(eta | m, sigma, 0), entropy H[q]):
      E eta      = a + b lam,                      lam = phi(alpha)/Z
      Var eta    = b^2 (1 + alpha lam - lam^2)
      E e^{-eta} = exp(-a + b^2/2) Phi(a/b - b) / Phi(a/b)
      E log p    = -log(sigma sqrt(2 pi)) - log Phi(m/sigma) - (Var + (E eta - m)^2) / (2 sigma^2)
      H[q]       = log(sqrt(2 pi e) b Z) + alpha lam / 2
    """
    t = a / b
    log_Z = torch.special.log_ndtr(t)
    alpha = -t
    lam = torch.exp(-0.5 * alpha**2 - _LOG_SQRT_2PI - log_Z)
    mean = a + b * lam
    var = b**2 * torch.clamp(1.0 + alpha * lam - lam**2, min=1e-12)
    e_exp = torch.exp(-a + 0.5 * b**2 + torch.special.log_ndtr(t - b) - log_Z)
    log_norm = -math.log(sigma) - _LOG_SQRT_2PI - torch.special.log_ndtr(m / sigma)
    e_logp = log_norm - (var + (mean - m) ** 2) / (2.0 * sigma**2)
    entropy = _LOG_SQRT_2PI + 0.5 + torch.log(b) + log_Z + 0.5 * alpha * lam
    return mean, e_exp, e_logp, entropy


class LocalState:
    """Per-cell variational quantities of a batch (all tensors, first axis = cells)."""

    def __init__(self, m, logvar, r, v, a, b):
        self.m, self.logvar, self.r, self.v, self.a, self.b = m, logvar, r, v, a, b

    def detach(self) -> "LocalState":
        f = lambda t: None if t is None else t.detach()  # noqa: E731
        return LocalState(f(self.m), f(self.logvar), f(self.r), f(self.v), f(self.a), f(self.b))


class PLNVAE(nn.Module):
    """Encoder MLP + linear PLN decoder (mu, W, d). All computations in float64.

    Encoder input: [(log1p(u) - gene_mean) / gene_sd, (log L - ll_mean) / ll_sd] where the
    statistics are buffers set once at fit time from the training data (``set_input_stats``).
    """

    def __init__(self, G: int, k: int, hidden=(128, 64), capture=None, residual: str = "laplace",
                 n_local_rounds: int = 4):
        super().__init__()
        if residual not in ("laplace", "prior"):
            raise ValueError(f"residual must be 'laplace' or 'prior', got {residual!r}")
        self.G, self.k = int(G), int(k)
        self.hidden = tuple(int(h) for h in hidden)
        self.residual = residual
        self.n_local_rounds = int(n_local_rounds)
        self.capture = capture  # pln_ref.params.Capture or None (plain python object)
        layers, width = [], G + 1
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.SiLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2 * k)
        self.mu = nn.Parameter(torch.zeros(G))
        self.W = nn.Parameter(torch.zeros(G, k))
        self.rho = nn.Parameter(torch.zeros(G))
        self.register_buffer("gene_mean", torch.zeros(G))
        self.register_buffer("gene_sd", torch.ones(G))
        self.register_buffer("ll_stats", torch.tensor([0.0, 1.0]))
        self.double()
        with torch.no_grad():  # start with small encoder outputs: q(z) close to the prior
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()

    # --- parameters -------------------------------------------------------------------------
    @property
    def d(self) -> torch.Tensor:
        return D_FLOOR + F.softplus(self.rho)

    def set_decoder(self, mu, W, d) -> None:
        with torch.no_grad():
            self.mu.copy_(torch.tensor(np.array(mu, dtype=float)))
            self.W.copy_(torch.tensor(np.array(W, dtype=float)))
            dd = torch.clamp(torch.tensor(np.array(d, dtype=float)) - D_FLOOR, min=1e-6)
            self.rho.copy_(dd + torch.log(-torch.expm1(-dd)))  # inverse softplus

    def set_input_stats(self, log1p_u: torch.Tensor, log_lib: torch.Tensor) -> None:
        with torch.no_grad():
            self.gene_mean.copy_(log1p_u.mean(0))
            sd = log1p_u.std(0)
            self.gene_sd.copy_(torch.where(sd > 1e-8, sd, torch.ones_like(sd)))
            lsd = log_lib.std() if log_lib.numel() > 1 else torch.tensor(1.0, dtype=torch.float64)
            self.ll_stats.copy_(torch.stack([log_lib.mean(), torch.clamp(lsd, min=1e-8)]))

    # --- encoder ----------------------------------------------------------------------------
    def encode_z(self, u: torch.Tensor, log_lib: torch.Tensor):
        """(m, log s^2) of q(z | u), log s^2 clamped to [LOGVAR_MIN, LOGVAR_MAX]."""
        xin = (torch.log1p(u) - self.gene_mean) / self.gene_sd
        lin = ((log_lib - self.ll_stats[0]) / self.ll_stats[1])[:, None]
        out = self.head(self.body(torch.cat([xin, lin], dim=1)))
        m, logvar = out[:, : self.k], out[:, self.k:]
        return m, torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def _o(self, m, logvar):
        """o_g = mu_g + W_g m + 1/2 sum_a W_ga^2 s_a^2  (= log E_q(z) e^{mu_g + W_g z}), and W_g m."""
        Wm = m @ self.W.T
        return self.mu + Wm + 0.5 * (torch.exp(logvar) @ (self.W**2).T), Wm

    # --- closed-form local updates ------------------------------------------------------------
    @torch.no_grad()
    def local_updates(self, u, m, logvar, prior_m=None, w_r=None, n_rounds=None) -> LocalState:
        """(r, v) of q(e) and (a, b) of q(eta) in closed form (see module docstring); no grad.

        ``n_rounds`` (default ``self.n_local_rounds`` = 4) sweeps eta -> (r, v). Sweep 1 solves
        eta's location exactly given (r, v) (Lambert W); later sweeps take a Newton step on the
        profile ELBO in eta (r's response dr_g/da = y_g/(1+y_g) included), which removes the slow
        eta/r "translation" mode of plain alternation. Measured at G=1000, k=10, 256 cells, mean
        ELBO gap to the fixed point after 2/3/4/6 sweeps: plain alternation 0.44 / 0.085 / 0.019 /
        0.0012 nats per cell, profile Newton 0.74 / 0.014 / 6e-6 / 1e-6 (max over cells 3e-3 at 4).
        Without capture the (r, v) fixed point alone is iterated (at most 3 sweeps).
        ``w_r``: warm start log y = log(u d - r) from an earlier call (training caches it per cell).
        """
        d = self.d
        o, _ = self._o(m, logvar)
        N = u.shape[0]
        log_d = torch.log(d)
        if w_r is None:
            r = torch.zeros_like(u)
            v = d.expand_as(u).clone()
        else:
            y = torch.exp(w_r)
            r, v = u * d - y, d / (1.0 + y)
        a = b = None
        log_e_exp = torch.zeros(N, dtype=u.dtype)
        cap = self.capture
        U = u.sum(1)
        n_rounds = self.n_local_rounds if n_rounds is None else int(n_rounds)
        if cap is None:
            n_rounds = min(n_rounds, 3)
        for it in range(max(1, n_rounds)):
            if cap is not None:
                s2 = cap.sigma_M**2
                logR = torch.logsumexp(o + r + 0.5 * v, dim=1)
                if it == 0 or self.residual == "prior":
                    # exact argmax of f(eta) given (r, v): Lambert W
                    Lz = logR + math.log(s2) + U * s2 - prior_m
                    ye = torch.exp(lambert_log_solve(Lz))
                    a = ye - U * s2 + prior_m
                else:
                    # Newton step on the profile F(a) = max_{r,v} ELBO: r responds to a through
                    # dr_g/da = kappa_g = y_g / (1 + y_g)  (y_g = lambda_g d_g), so
                    # F'(a) = -U + R e^{-a} - (a - m)/s2,  -F''(a) = e^{-a} sum_g lam_g / (1 + y_g) + 1/s2
                    y_r = torch.exp(w_r)
                    lam0 = torch.exp(o + r + 0.5 * v - logR[:, None])  # lam_g / R
                    R_a = torch.exp(logR - a)
                    grad = -U + R_a - (a - prior_m) / s2
                    hess = R_a * (lam0 / (1.0 + y_r)).sum(1) + 1.0 / s2
                    a = a + torch.clamp(grad / hess, -2.0, 2.0)
                b = torch.sqrt(1.0 / (torch.exp(logR - a) + 1.0 / s2))  # conditional curvature
                _, e_exp, _, _ = truncnorm_moments(a, b, prior_m, cap.sigma_M)
                log_e_exp = torch.log(e_exp)
            if self.residual == "prior":
                continue
            # one joint fixed-point sweep for (r, v): exact Lambert-W step for r given v, then v
            Lr = o + log_e_exp[:, None] + 0.5 * v + log_d + u * d
            w_r = lambert_log_solve(Lr, n_iter=4 if w_r is None else 2, w0=w_r)
            y = torch.exp(w_r)
            r = u * d - y
            v = d / (1.0 + y)
        st = LocalState(m, logvar, r, v, a, b)
        st.w_r = w_r
        return st

    # --- ELBO ---------------------------------------------------------------------------------
    def elbo_terms(self, u, st: LocalState, prior_m=None):
        """Per-cell closed-form ELBO pieces (dict of (N,) tensors): rec, kl_z, kl_e, eta."""
        m, logvar, r, v = st.m, st.logvar, st.r, st.v
        d = self.d
        o, Wm = self._o(m, logvar)
        cap = self.capture
        if cap is not None:
            e_eta, e_exp, e_logp, ent = truncnorm_moments(st.a, st.b, prior_m, cap.sigma_M)
            eta_term = e_logp + ent
        else:
            e_eta = torch.zeros(u.shape[0], dtype=u.dtype)
            e_exp = torch.ones_like(e_eta)
            eta_term = torch.zeros_like(e_eta)
        rec = (u * (self.mu + Wm + r - e_eta[:, None])
               - e_exp[:, None] * torch.exp(o + r + 0.5 * v)
               - torch.lgamma(u + 1.0)).sum(1)
        kl_z = 0.5 * (torch.exp(logvar) + m**2 - 1.0 - logvar).sum(1)
        kl_e = 0.5 * ((v + r**2) / d - 1.0 - torch.log(v / d)).sum(1)
        return {"rec": rec, "kl_z": kl_z, "kl_e": kl_e, "eta": eta_term}

    def forward(self, u, log_lib, prior_m=None, beta: float = 1.0, w_r=None, n_rounds=None):
        """Per-cell ELBO (beta-weighted z-KL) and its pieces, local updates held fixed."""
        m, logvar = self.encode_z(u, log_lib)
        st0 = self.local_updates(u, m.detach(), logvar.detach(), prior_m, w_r=w_r, n_rounds=n_rounds)
        st = LocalState(m, logvar, st0.r, st0.v, st0.a, st0.b)
        st.w_r = st0.w_r
        t = self.elbo_terms(u, st, prior_m)
        elbo = t["rec"] - beta * t["kl_z"] - t["kl_e"] + t["eta"]
        return elbo, t, st
