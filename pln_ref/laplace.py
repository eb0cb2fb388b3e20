"""Per-cell joint Newton on (x, eta) and the Laplace posterior it defines.

Objective of cell c (``model.log_joint`` up to constants, seed notation)::

    f(x, eta) = u^T (x - eta 1) - 1^T lambda - 1/2 (x - mu)^T Sigma^{-1} (x - mu)
                - (eta - m)^2 / (2 sigma_M^2),              lambda = e^{x - eta},  eta >= 0

Newton step (one factorisation of A = diag(lambda) + Sigma^{-1} serves both right-hand sides)::

    a = A^{-1} g_x,  b = A^{-1} lambda,  s = 1^T lambda + 1/sigma_M^2 - lambda^T b   (> 0)
    delta_eta = (g_eta + lambda^T a) / s,   delta_x = a + b delta_eta

(s and the numerator of delta_eta are evaluated in cancellation-free forms through
bbar = 1 - b = A^{-1} Sigma^{-1} 1, as in ``model.eta_schur``, from k-vectors of each cell;
see ``_newton_direction``.)

Globalisation: backtracking (Armijo) line search along the projected path
(x + t dx, max(0, eta + t deta)), full steps once the squared Newton decrement is <= 1e-6
(``QUAD_DEC2``: the step is 1e-3 in the Hessian norm, well inside Newton's quadratic region, and
the predicted gain of 5e-7 nats is near the round-off of f for cells with large counts or tiny
d); a cell whose line search finds no acceptable step (f cannot resolve the gain) stops there
as "roundoff"; active set for the bound
eta >= 0 (Bertsekas' projected Newton): a cell whose eta is (epsilon-)at 0 and whose joint step points outward keeps eta = 0 and
takes the x-only Newton step a = A^{-1} g_x. Convergence per cell: the infinity norm of the
projected gradient <= ``gtol`` ("gradient"), or, when ``dec_tol`` is given, its squared
(projected) Newton decrement <= ``dec_tol`` ("decrement", converged; the outer optimiser's loose
early evaluations). A cell whose Newton decrement falls to round-off level before
that stops too, is reported in ``converged_by`` as "roundoff" and counts as not converged. So does
a cell whose gradient has reached its own rounding noise: in the quadratic region each Newton step
shrinks the gradient by far more than half, so a step after which the projected gradient's norm
is still >= half the previous one, with dec^2 <= ``STALL_DEC2`` max(1, |f|), is noise (e.g. a gene
with d at its floor: Sigma^{-1} ~ 1 / d amplifies the rounding of x - mu; on simulated 2000 x 200
counts with such a gene, gtol 1e-9 left 1180 of 2000 cells at max_iter = 200 with gradients of
2-4e-8, 147 iterations per cell).

Laplace posterior (``CellPosteriors``): the quadratic expansion of f at the MAP, restricted to
the support eta >= 0 and normalised exactly there::

    eta ~ TruncN(eta_hat + delta, 1/s, low=0),   x | eta ~ N(x_hat + b (eta - eta_hat), A^{-1})

Interior cells (eta_hat > 0) have delta = 0: eta ~ N(eta_hat, 1/s) cut at 0, which is the plain
Gaussian whenever eta_hat sqrt(s) is more than a few units. Cells on the bound (eta_hat = 0,
g_eta <= 0) have delta = g_eta / s <= 0. This is the same restricted integral as the evidence's
truncation term in ``fit_laplace``, so the posterior never puts mass on eta < 0. Its "Laplace
covariance" is therefore that of a truncated Gaussian in eta (not (-H)^{-1}); with ``eta="map"``
(the seed's PPC mode) eta is held at its MAP and x ~ N(x_hat, A^{-1}) for every cell alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from . import truncnorm
from .allocator import tune_allocator
from .constants import LOG_2PI
from .lowrank import LowRankCov, PosteriorPrecision
from .anchor import resolve_log_anchor
from .model import cell_gradient
from .params import PLNParams

__all__ = ["newton_map", "CellPosteriors", "PER_CELL_FIELDS", "cell_objective", "LineSearchProblem",
           "backtracking_line_search"]

#: the per-cell (N,) fields of ``CellPosteriors`` (besides the (N, G) x_map and bbar and the precision)
PER_CELL_FIELDS = ("eta_map", "on_bound", "converged", "grad_norm", "n_iter", "objective", "s", "delta",
                   "log_anchor", "converged_by")

_EPS_BOUND = 1e-10  # epsilon-active set for eta >= 0

#: squared Newton decrement below which the full step is taken without the Armijo test. Measured
#: on real counts (2000 x 1000): with 1e-8 a cell at dec2 1.1e-8 whose f is only resolved to 2e-8
#: (d_g = 1e-6 makes Sigma^{-1}(x - mu) cancel) rejected every t down to 2^-60, 200 times per
#: evaluation, and those 12,000 one-cell backtracking rounds were 15% of the fit's CPU.
QUAD_DEC2 = 1e-6
#: a cell whose gradient norm does not halve in a step while dec^2 <= STALL_DEC2 max(1, |f|) stops
#: as "roundoff" (module docstring): its remaining gain is below 1e-12 of |f|
STALL_DEC2 = 1e-12


def cell_objective(
    u: np.ndarray, x: np.ndarray, eta: np.ndarray, mu: np.ndarray, cov: LowRankCov,
    m: np.ndarray | None, sigma_M: float | None,
) -> np.ndarray:
    """f(x, eta) per cell (module docstring): log_joint without its (x, eta)-free constants."""
    z = x - eta[:, None]
    with np.errstate(over="ignore", invalid="ignore"):
        f = np.sum(u * z - np.exp(z), axis=1) - 0.5 * cov.quad(x - mu)
    if m is not None:
        f = f - 0.5 * ((eta - m) / sigma_M) ** 2
    return np.where(np.isfinite(f), f, -np.inf)


@dataclass
class CellPosteriors:
    """MAPs and Laplace posteriors of N cells (see module docstring for the approximation).

    Attributes: x_map (N,G), eta_map (N,), on_bound (N,) bool, converged (N,) bool,
    grad_norm (N,) projected-gradient infinity norm, n_iter (N,), objective (N,) f at the MAP,
    precision (PosteriorPrecision of A at the MAP), bbar (N,G) = 1 - b = A^{-1} Sigma^{-1} 1
    with b = A^{-1} lambda (``.b``), s (N,) Schur
    complement, delta (N,) Newton eta offset (0 inside, <= 0 on the bound), log_det_neg_H (N,).
    """

    params: PLNParams
    x_map: np.ndarray
    eta_map: np.ndarray
    on_bound: np.ndarray
    converged: np.ndarray
    grad_norm: np.ndarray
    n_iter: np.ndarray
    objective: np.ndarray
    precision: PosteriorPrecision
    bbar: np.ndarray | None
    s: np.ndarray | None
    delta: np.ndarray | None
    log_anchor: np.ndarray | None
    converged_by: np.ndarray = field(default=None)

    @property
    def capture(self) -> bool:
        return self.params.capture is not None

    @property
    def N(self) -> int:
        return self.x_map.shape[0]

    @property
    def b(self) -> np.ndarray | None:
        """b = A^{-1} lambda: the shift of x per unit of eta in the Laplace posterior."""
        return None if self.bbar is None else 1.0 - self.bbar

    def log_det_neg_H(self) -> np.ndarray:
        """log det(-H) = log det A + log s (the joint (x, eta) precision at the MAP)."""
        ld = self.precision.logdet()
        return ld + np.log(self.s) if self.capture else ld

    # --- eta marginal -------------------------------------------------------------------
    def _eta_loc_scale(self):
        sd = 1.0 / np.sqrt(self.s)
        loc = self.eta_map + self.delta  # delta = 0 for interior cells
        return loc, sd

    def eta_mean_var(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance of eta under the Laplace posterior (truncated normal, ``truncnorm``)."""
        if not self.capture:
            return np.zeros(self.N), np.zeros(self.N)
        return truncnorm.mean_var(*self._eta_loc_scale())

    def sd_x(self, eta: str = "free") -> np.ndarray:
        """Posterior SD of x per cell and gene: sqrt(diag A^{-1} [+ b^2 Var(eta)]), O(N G k^2)."""
        v = self.precision.inv_diag()
        if eta == "free" and self.capture:
            v = v + self.b**2 * self.eta_mean_var()[1][:, None]
        elif eta not in ("free", "map"):
            raise ValueError('eta must be "free" or "map"')
        return np.sqrt(v)

    def mean_x(self, eta: str = "free") -> np.ndarray:
        """E[x] under the approximation (x_hat + b (E eta - eta_hat) when eta is free)."""
        if eta == "free" and self.capture:
            return self.x_map + self.b * (self.eta_mean_var()[0] - self.eta_map)[:, None]
        return self.x_map.copy()

    def expected_exp_x(self, eta: str = "free") -> np.ndarray:
        """Denoised expression E[e^{x_g}] = e^{x_hat_g + diag(A^{-1})_g / 2} E[e^{b_g (eta - eta_hat)}]."""
        base = self.x_map + 0.5 * self.precision.inv_diag()
        if eta == "map" or not self.capture:
            return np.exp(base)
        loc, sd = self._eta_loc_scale()
        # E e^{b_g (eta - eta_hat)} = e^{-b_g eta_hat} MGF_eta(b_g), eta ~ TruncN(loc, sd^2, 0)
        t = self.b
        lmgf = truncnorm.log_mgf(t, loc[:, None], sd[:, None]) - t * self.eta_map[:, None]
        return np.exp(base + lmgf)

    # --- draws and density ----------------------------------------------------------------
    def sample(self, rng: np.random.Generator, n_draws: int, eta: str = "free"):
        """Draws (x (S,N,G), eta (S,N)) from the Laplace posterior; eta="map" holds eta at its MAP."""
        if eta not in ("free", "map"):
            raise ValueError('eta must be "free" or "map"')
        x = self.x_map[None] + self.precision.sample(rng, n_draws)
        e = np.broadcast_to(self.eta_map, (n_draws, self.N)).copy()
        if eta == "free" and self.capture:
            loc, sd = self._eta_loc_scale()
            e = truncnorm.sample(loc, sd, rng, size=(n_draws, self.N))
            x = x + self.b[None] * (e - self.eta_map)[..., None]
        return x, e

    def logpdf(self, x: np.ndarray, eta: np.ndarray) -> np.ndarray:
        """log q(x, eta) of the approximation with eta free (module docstring), shape (S, N)."""
        x = np.asarray(x, dtype=float)
        eta = np.asarray(eta, dtype=float)
        G = x.shape[-1]
        mean_x = self.x_map
        out = 0.0
        if self.capture:
            loc, sd = self._eta_loc_scale()
            le = truncnorm.logpdf(eta, loc, sd)
            out = le
            mean_x = self.x_map + self.b * (eta - self.eta_map)[..., None]
        r = x - mean_x
        lx = -0.5 * (G * LOG_2PI - self.precision.logdet() + self.precision.quad(r))
        return out + lx

    @classmethod
    def concatenate(cls, parts: list["CellPosteriors"]) -> "CellPosteriors":
        """Join the posteriors of disjoint blocks of cells (same params), in order."""
        first = parts[0]

        def cat(name):
            vals = [getattr(p, name) for p in parts]
            return None if vals[0] is None else np.concatenate(vals)

        P = PosteriorPrecision.from_factor(
            first.precision.cov, np.concatenate([p.precision.lam for p in parts]),
            np.concatenate([p.precision.S for p in parts]),
            None,  # the Cholesky factor on first access (``PosteriorPrecision.L_S``)
            np.concatenate([p.precision.r for p in parts]),
            np.concatenate([p.precision.S_inv() for p in parts]),
            np.concatenate([p.precision.logdet_S() for p in parts]))
        return cls(params=first.params, precision=P,
                   **{n: cat(n) for n in ("x_map", "bbar", *PER_CELL_FIELDS)})

    def subset(self, idx) -> "CellPosteriors":
        """The posteriors of a subset of cells (index or boolean mask)."""
        P = PosteriorPrecision(self.precision.cov, self.precision.lam[idx])
        return CellPosteriors(params=self.params, precision=P, **self._sliced(idx, ("x_map", "bbar")))

    def _sliced(self, idx, names: tuple) -> dict:
        """{name: rows ``idx`` of the field (None stays None)} for ``names`` and ``PER_CELL_FIELDS``."""
        out = {}
        for n in (*names, *PER_CELL_FIELDS):
            a = getattr(self, n)
            out[n] = None if a is None else a[idx]
        return out


def _default_start(u: np.ndarray, m: np.ndarray | None):
    eta0 = np.zeros(u.shape[0]) if m is None else np.maximum(m, 0.0)
    x0 = np.log(u + 0.5) + eta0[:, None]
    return x0, eta0


class LineSearchProblem(NamedTuple):
    """One backtracking problem for the cells still moving (arrays over those n cells).

    From (x, eta) with objective f0, Newton direction (dx, deta), gradient (gx, ge), lambda at the
    start ``lam``, squared Newton decrement ``dec2``; the objective is ``cell_objective`` with
    (mu, cov, m, sigma_M). A line search returns the accepted (x_new, eta_new, f_new); f_new may
    be NaN where it was not evaluated (``newton_map`` then recomputes it when needed)."""

    u: np.ndarray
    x: np.ndarray
    eta: np.ndarray
    dx: np.ndarray
    deta: np.ndarray
    gx: np.ndarray
    ge: np.ndarray
    lam: np.ndarray
    f0: np.ndarray
    dec2: np.ndarray
    mu: np.ndarray
    cov: LowRankCov
    m: np.ndarray | None
    sigma_M: float | None
    armijo: float


LineSearch = Callable[[LineSearchProblem], tuple]


def backtracking_line_search(p: LineSearchProblem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Armijo backtracking along the projected path (x + t dx, max(0, eta + t deta)), t = 1, 1/2, ...

    Accept t when f(t) >= f0 + armijo * (g_x^T (x_t - x) + g_eta (eta_t - eta)) - 16 eps max(1, |f0|).
    In the quadratic region (decrement^2 <= ``QUAD_DEC2`` = 1e-6: the step is tiny in the Hessian
    norm) the full step is taken directly, since there the Armijo test compares changes near
    round-off. Returns (x_new, eta_new, f_new): ``_fused_line_search`` without the gradient
    pieces (a cell with no acceptable step stays put)."""
    return _fused_line_search(p, p.u.sum(axis=1))[:3]


def newton_map(
    counts: np.ndarray,
    params: PLNParams,
    log_anchor: np.ndarray | None = None,
    *,
    x0: np.ndarray | None = None,
    eta0: np.ndarray | None = None,
    gtol: float = 1e-6,
    max_iter: int = 200,
    gradient: str | Callable = "numpy",
    armijo: float = 1e-4,
    progress: bool = False,
    cov: LowRankCov | None = None,
    block_size: int | None = None,
    line_search: LineSearch | None = None,
    dec_tol: float | None = None,
) -> CellPosteriors:
    """MAP of every cell's (x, eta) by globally convergent projected Newton (module docstring).

    Parameters
    ----------
    counts : (N, G) non-negative counts u.
    params : globals (mu, W, d) and capture settings; capture None fixes eta = 0.
    log_anchor : (N,) log L_c of the capture prior (default: log of the realised library size).
    x0, eta0 : warm starts (default x0 = log(u + 1/2) + eta0, eta0 = max(m, 0)).
    gtol : tolerance on the infinity norm of the projected gradient.
    gradient : "numpy" (``model.cell_gradient``) or a callable ``grad(rows, x, eta) -> (g_x, g_eta)``
        evaluating the gradient of cells ``rows`` (indices into ``counts``) at (x, eta), e.g.
        ``pln_ref.validation.engines.BridgeStanCellGradient`` (the gradient of stan/pln_cell.stan).
    block_size : cells per block (cells are independent, so blocks are exact); the default
        keeps a block's N x G work arrays near 2^18 entries (2 MB each, cache-friendly: measured
        25% faster than 32 MB blocks at G=1000), which also bounds the working memory.
    line_search : a callable ``line_search(LineSearchProblem) -> (x_new, eta_new, f_new)``
        (default ``backtracking_line_search``), e.g. a benchmark variant.
    dec_tol : a cell also stops when its squared Newton decrement dec^2 = g^T (-H)^{-1} g (the
        projected one on the bound) is <= dec_tol: its objective is then within about dec_tol / 2
        of its maximum, and the MAP within sqrt(dec_tol) in the norm of -H (``converged_by``
        "decrement"). Unlike the gradient's infinity norm this is invariant to the scale of
        each gene (a gene with lambda = 1000 turns an x error of 1e-6 into a gradient of 1e-3),
        so one Newton step from a close warm start usually meets it. None: gradient only.
    """
    tune_allocator()  # reuse freed work arrays instead of page-faulting them in again
    u = np.asarray(counts, dtype=float)
    if u.ndim != 2 or u.shape[1] != params.G:
        raise ValueError(f"counts must have shape (N, {params.G}), got {u.shape}")
    if not np.all(np.isfinite(u)) or np.any(u < 0):
        raise ValueError("counts must be finite and non-negative")
    N, G = u.shape
    cov = cov or LowRankCov.from_params(params)
    for name, a, shape in (("log_anchor", log_anchor, (N,)), ("x0", x0, (N, G)), ("eta0", eta0, (N,))):
        if a is not None and np.shape(a) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {np.shape(a)}")
    if not (gradient == "numpy" or callable(gradient)):
        raise ValueError(f'gradient must be "numpy" or a callable grad(rows, x, eta), got {gradient!r}')
    if line_search is not None and not callable(line_search):
        raise ValueError(f"line_search must be a callable, got {line_search!r}")
    if params.capture is not None:
        log_anchor = resolve_log_anchor(u, log_anchor)
    if block_size is None:
        block_size = default_block_size(G)
    ls = line_search
    blocks = []
    for lo in range(0, N, block_size):
        sl = slice(lo, min(N, lo + block_size))
        pick = lambda a: None if a is None else np.asarray(a)[sl]  # noqa: E731
        grad_fn = None if gradient == "numpy" else _offset_rows(gradient, lo)
        blocks.append(_newton_block(u[sl], params, pick(log_anchor), pick(x0), pick(eta0), gtol,
                                    max_iter, grad_fn, armijo, progress, cov, ls, dec_tol))
    return blocks[0] if len(blocks) == 1 else CellPosteriors.concatenate(blocks)


def default_block_size(G: int) -> int:
    """Cells per Newton block: max(16, 2^18 // G), so a block's N x G work arrays hold about 2^18
    entries (2 MB of float64 each; ``newton_map``'s default, and the cells of each block of a
    blocked full-batch evaluation, ``fit_laplace.evaluation_block_cells``)."""
    return max(16, (1 << 18) // int(G))


def _offset_rows(gradient: Callable, lo: int) -> Callable:
    """A block's gradient callback: block-local rows -> rows of the full counts."""
    return lambda rows, x, eta: gradient(rows + lo, x, eta)


class _Direction(NamedTuple):
    """Gradient, factorisation, squared Newton decrement and projected Newton step of the active
    cells. ``sb`` (n, k) = S^{-1} W^T diag(r) Sigma^{-1} 1 gives bbar = r (W sb + d Sigma^{-1} 1) of
    any rows on demand (``bbar_rows``; capture only, else None). The x-part of the step is formed
    on demand too (``step``), for the cells that take it: a cell that stops at this iterate needs
    only its decrement. ``x_step``: the step itself (without capture), else None; ``s_a``, ``c``,
    ``rgd``: its pieces (with capture: S^{-1} t_a, delta_eta, r d g_x). ``num_x`` (capture):
    1^T g_x - bbar^T g_x, the x part of the eta step's numerator (kept for the final posterior)."""

    gx: np.ndarray
    ge: np.ndarray
    lam: np.ndarray
    A: PosteriorPrecision
    sb: np.ndarray | None
    s: np.ndarray | None
    deta: np.ndarray
    gnorm: np.ndarray
    dec2: np.ndarray
    x_step: np.ndarray | None = None
    s_a: np.ndarray | None = None
    c: np.ndarray | None = None
    rgd: np.ndarray | None = None
    num_x: np.ndarray | None = None

    def bbar_rows(self, sel) -> np.ndarray:
        """bbar = A^{-1} Sigma^{-1} 1 of rows ``sel`` (one (n, k) @ (k, G) product)."""
        cov = self.A.cov
        _, _, dsig, _ = cov.eta_tables()
        out = self.sb[sel] @ cov.W.T
        out += dsig
        out *= self.A.r[sel]
        return out

    def step(self, rows=None) -> np.ndarray:
        """delta_x of rows ``rows`` (a boolean mask, or None: all): r (W (s_a - c s_b) - c d sigma1
        + d g_x) + c (``_newton_direction``), one (n, k + 1) @ (k + 1, G) product and three passes.
        Formed on the selected rows (which gathers r and r d g_x) unless they are more than 80% of
        the cells, where forming all rows and gathering the result is cheaper (measured at
        524 x 1000, k = 10: equal at 80%, 1.74 against 1.50 ms at 95%, 0.55 against 1.33 ms at 30%)."""
        if rows is not None and np.count_nonzero(rows) > 0.8 * len(rows):
            return self.step()[rows]
        if self.x_step is not None:
            return self.x_step if rows is None else self.x_step[rows]
        pick = (lambda a: a) if rows is None else (lambda a: a[rows])  # noqa: E731
        c, sb = pick(self.c), pick(self.sb)
        _, _, _, WtE = self.A.cov.eta_tables()
        coef = np.empty((len(c), sb.shape[1] + 1))
        coef[:, :-1] = pick(self.s_a) - c[:, None] * sb
        coef[:, -1] = -c
        dx = coef @ WtE  # W (s_a - c s_b) - c d sigma1
        dx *= pick(self.A.r)
        dx += pick(self.rgd)
        dx += c[:, None]
        return dx


def _block_start(u, params, log_anchor, x0, eta0):
    """(x, eta, m, sigma_M): the starting iterate of a block (copies) and the capture prior."""
    N, G = u.shape
    if params.capture is not None:
        m_all = params.capture.prior_mean(log_anchor)
        sigma_M = params.capture.sigma_M
    else:
        m_all, sigma_M = None, None
    if x0 is None or eta0 is None:
        xs, es = _default_start(u, m_all)
    x = xs if x0 is None else np.array(x0, dtype=float, copy=True)
    eta = es if eta0 is None else np.maximum(np.array(eta0, dtype=float, copy=True), 0.0)
    if params.capture is None:
        eta = np.zeros(N)
    if x.shape != (N, G) or eta.shape != (N,):
        raise ValueError("x0 / eta0 have the wrong shape")
    return x, eta, m_all, sigma_M


def _newton_direction(ua, xa, ea, ma, mu, cov, sigma_M, grad_fn, active, point=None) -> _Direction:
    """Gradient at (xa, ea), one factorisation of A, and the projected joint Newton step:
    a = A^{-1} g_x, b = A^{-1} lambda = 1 - bbar, delta_eta = (g_eta + lambda^T a)/s,
    delta_x = a + b delta_eta; cells on the bound whose free step points outward take the x-only
    step a (active set). ``point``: the (g_x, g_eta, lambda) already computed at (xa, ea) by
    ``_point`` (else computed).

    With capture, every eta quantity comes from k-vectors (no (n, G) solve besides the step
    itself), with r = 1/(1 + lambda d), sigma1 = Sigma^{-1} 1, t_a = W^T (r g_x),
    t_b = W^T (r sigma1), s_a = S^{-1} t_a, s_b = S^{-1} t_b (``lowrank_solve``'s algebra):

        a    = r (W s_a + d g_x),            bbar = r (W s_b + d sigma1)
        s    = 1/sigma_M^2 + lambda^T bbar = 1/sigma_M^2 + (W^T lambda r)^T s_b + (lambda r)^T d sigma1
        bbar^T g_x = t_a^T s_b + (r g_x)^T d sigma1
        delta_x = a + c (1 - bbar) = r (W (s_a - c s_b) - c d sigma1 + d g_x) + c,
                  c = delta_eta (0 for cells held on the bound)

    (W^T lambda r and (lambda r)^T d sigma1 come with S from one product, ``LowRankCov.eta_tables``.)
    bbar itself is formed only for cells whose factorisation is kept (``_Direction.bbar_rows``), and
    delta_x only for the cells that take the step (``_Direction.step``): the squared decrement that
    decides it comes from k-vectors and one pass,

        g^T (-H)^{-1} g = g_x^T a + c num = t_a^T s_a + (r d g_x)^T g_x + c num,
                  num = g_eta + g_x^T (1 - bbar)   (c num = num^2 / s for free cells)

    plus g_eta delta_eta = -g_eta eta for cells held on the bound."""
    gx, ge, lam = point if point is not None else cell_gradient(ua, xa, ea, mu, cov, ma, sigma_M)
    if grad_fn is not None:
        gx, ge = grad_fn(active, xa, ea)
    if ma is None:
        A = PosteriorPrecision(cov, lam)
        sb = s = None
        dx = A.solve(gx)
        deta = np.zeros(len(ea))
    else:
        ext, sW, dsig, WtE = cov.eta_tables()
        k, n_pairs = cov.k, cov.pair_table.shape[1]
        r = np.add(lam, cov.dinv)
        np.divide(cov.dinv, r, out=r)  # r = 1 / (1 + lambda d) = (1/d) / (lambda + 1/d)
        P = (lam * r) @ ext
        S = cov.unpack_pairs(P[:, :n_pairs])
        S[..., np.arange(k), np.arange(k)] += 1.0
        A = PosteriorPrecision.from_factor(cov, lam, S, None, r)
        S_inv = A.S_inv()
        rg = r * gx
        t_a = rg @ cov.W
        s_a = np.einsum("nab,nb->na", S_inv, t_a)
        sb = np.einsum("nab,nb->na", S_inv, r @ sW)
        s = 1.0 / sigma_M**2 + np.einsum("na,na->n", P[:, n_pairs:n_pairs + k], sb) + P[:, -1]
        # numerator of delta_eta: g_eta + lambda^T a = g_eta + 1^T g_x - bbar^T g_x (b = 1 - bbar),
        # with bbar^T g_x from k-vectors; g is small near the MAP, so the only difference of large
        # sums is g_eta's 1^T lambda - 1^T u (rounded to about eps 1^T u)
        num_x = gx.sum(axis=1) - (np.einsum("na,na->n", t_a, sb) + rg @ dsig)
        num = ge + num_x
        deta_free = num / s
        bound = (ea <= _EPS_BOUND) & (deta_free <= 0)
        c = np.where(bound, 0.0, deta_free)
        deta = np.where(bound, -ea, deta_free)
        rg *= cov.d  # r d g_x (rg is this call's own array)
        # g^T (-H)^{-1} g without the step: g_x^T a = t_a^T s_a + (r d g_x)^T g_x (both >= 0), plus
        # delta_eta num = num^2 / s (free) or g_eta delta_eta (held on the bound, c = 0)
        dec2 = np.einsum("na,na->n", t_a, s_a) + np.einsum("ng,ng->n", rg, gx)
        dec2 += np.where(bound, ge * deta, c * num)
        g_eta_proj = np.where((ea <= _EPS_BOUND) & (ge <= 0), 0.0, ge)
        gnorm = np.maximum(np.maximum(gx.max(axis=1), -gx.min(axis=1)), np.abs(g_eta_proj))
        return _Direction(gx, ge, lam, A, sb, s, deta, gnorm, dec2, None, s_a, c, rg, num_x)
    gnorm = np.maximum(gx.max(axis=1), -gx.min(axis=1))
    return _Direction(gx, ge, lam, A, sb, s, deta, gnorm, np.einsum("ng,ng->n", gx, dx), dx)


def _point(u, usum, x, eta, mu, cov, m, sigma_M):
    """f, g_x, g_eta and lambda at (x, eta) from one exponential and one Sigma^{-1} product
    (``cell_objective`` and ``model.cell_gradient`` share them)::

        lambda = e^{x - eta},  alpha = Sigma^{-1}(x - mu)
        f      = u^T x - eta sum(u) - 1^T lambda - 1/2 (x - mu)^T alpha - (eta - m)^2 / (2 sigma_M^2)
        g_x    = u - lambda - alpha,   g_eta = 1^T lambda - sum(u) - (eta - m) / sigma_M^2
    """
    with np.errstate(over="ignore", invalid="ignore"):
        lam = np.subtract(x, eta[:, None])
        np.exp(lam, out=lam)
        r = x - mu
        alpha, quad = cov.inv_mv_quad(r)
        lsum = lam.sum(axis=1)
        f = np.einsum("ng,ng->n", u, x) - eta * usum - lsum - 0.5 * quad
        gx = u - lam
        gx -= alpha
    if m is None:
        ge = np.zeros(len(eta))
    else:
        pe = (eta - m) / sigma_M**2
        f = f - 0.5 * (eta - m) * pe
        ge = lsum - usum - pe
    return np.where(np.isfinite(f), f, -np.inf), gx, ge, lam


def _fused_line_search(p: LineSearchProblem, usum):
    """``backtracking_line_search`` that also returns (g_x, g_eta, lambda) at the accepted points
    (``_point`` evaluates f and the gradient together, so the next Newton direction needs no new
    exponential or Sigma^{-1} product) and the mask of cells that found no acceptable step (they
    stay put). Same acceptance rule: full steps in the quadratic region (decrement^2 <=
    ``QUAD_DEC2``), else Armijo backtracking t = 1, 1/2, ... The first round takes every cell's
    full step on whole arrays (no row gathers); only rejected cells are gathered and retried.
    The Armijo gain g_x^T (x_t - x) + g_eta (eta_t - eta) is t g_x^T dx + g_eta (eta_t - eta),
    with g_x^T dx = dec2 - g_eta deta."""
    n, G = p.x.shape
    gdx = p.dec2 - p.ge * p.deta
    quad = p.dec2 <= QUAD_DEC2
    tol_round = 16 * np.finfo(float).eps * np.maximum(1.0, np.abs(p.f0))
    # round 1, t = 1, all cells on whole arrays
    x_new = p.x + p.dx
    e_new = np.maximum(p.eta + p.deta, 0.0)
    f_new, gx_new, ge_new, lam_new = _point(p.u, usum, x_new, e_new, p.mu, p.cov, p.m, p.sigma_M)
    gain = gdx + p.ge * (e_new - p.eta)
    pending = ~(quad | (f_new >= p.f0 + p.armijo * gain - tol_round))
    if not pending.any():
        return x_new, e_new, f_new, (gx_new, ge_new, lam_new), pending
    q = np.flatnonzero(pending)  # rejected: back to the start point until a smaller t is accepted
    x_new[q], e_new[q], f_new[q] = p.x[q], p.eta[q], p.f0[q]
    t = np.full(n, 0.5)
    for _ in range(59):
        q = np.flatnonzero(pending)
        if q.size == 0:
            break
        xt = p.x[q] + t[q, None] * p.dx[q]
        et = np.maximum(p.eta[q] + t[q] * p.deta[q], 0.0)
        ft, gxt, get, lamt = _point(p.u[q], usum[q], xt, et, p.mu, p.cov,
                                    None if p.m is None else p.m[q], p.sigma_M)
        gain = t[q] * gdx[q] + p.ge[q] * (et - p.eta[q])
        ok = ft >= p.f0[q] + p.armijo * gain - tol_round[q]
        acc = q[ok]
        x_new[acc], e_new[acc], f_new[acc] = xt[ok], et[ok], ft[ok]
        gx_new[acc], ge_new[acc], lam_new[acc] = gxt[ok], get[ok], lamt[ok]
        pending[acc] = False
        t[q[~ok]] *= 0.5
    if pending.any():  # never accepted: the cell stays put (its old f); its gradient is recomputed
        q = np.flatnonzero(pending)
        _, gx_new[q], ge_new[q], lam_new[q] = _point(
            p.u[q], usum[q], x_new[q], e_new[q], p.mu, p.cov, None if p.m is None else p.m[q], p.sigma_M)
    return x_new, e_new, f_new, (gx_new, ge_new, lam_new), pending


class _BlockStore:
    """Per-cell state kept from each cell's last check, so the final posterior reuses the
    factorisation of the converged iterate instead of recomputing it."""

    def __init__(self, N, G, k, capture):
        self.lam, self.r = np.empty((N, G)), np.empty((N, G))
        self.ge, self.num_x = np.zeros(N), np.zeros(N)
        self.S, self.S_inv, self.logdet_S = np.empty((N, k, k)), np.empty((N, k, k)), np.empty(N)
        self.bbar = np.empty((N, G)) if capture else None
        self.s = np.empty(N) if capture else None
        # (allocated lazily by the OS: a block whose cells all finish together adopts the
        # direction's arrays in ``put`` and never touches these pages)

    def put(self, cells, sel, d: _Direction) -> None:
        if cells.size == self.ge.size and sel.all():  # every cell of the block at once: adopt
            self.lam, self.ge, self.r = d.lam, d.ge, d.A.r
            if d.num_x is not None:
                self.num_x = d.num_x
            self.S, self.S_inv, self.logdet_S = d.A.S, d.A.S_inv(), d.A.logdet_S()
            if self.bbar is not None:
                self.bbar, self.s = d.bbar_rows(slice(None)), d.s
            return
        self.lam[cells], self.ge[cells] = d.lam[sel], d.ge[sel]
        if d.num_x is not None:
            self.num_x[cells] = d.num_x[sel]
        self.r[cells], self.S[cells], self.S_inv[cells] = d.A.r[sel], d.A.S[sel], d.A.S_inv()[sel]
        self.logdet_S[cells] = d.A.logdet_S()[sel]  # from the inversion (no Cholesky factor)
        if self.bbar is not None:
            self.bbar[cells], self.s[cells] = d.bbar_rows(sel), d.s[sel]


def _newton_block(u, params, log_anchor, x0, eta0, gtol, max_iter, grad_fn, armijo, progress, cov,
                  line_search=None, dec_tol=None):
    """``newton_map`` on one block of cells (the algorithm of the module docstring);
    ``log_anchor`` already resolved, ``grad_fn`` None (NumPy) or a block-local gradient callback."""
    N, G = u.shape
    mu = params.mu
    x, eta, m_all, sigma_M = _block_start(u, params, log_anchor, x0, eta0)
    store = _BlockStore(N, G, params.k, m_all is not None)
    f_all = np.full(N, np.nan)  # f at the current iterate (NaN: not evaluated yet)
    n_iter = np.zeros(N, dtype=int)
    done = np.zeros(N, dtype=bool)
    conv_by = np.full(N, "max_iter", dtype="<U9")
    gnorm_all = np.full(N, np.inf)
    active = np.arange(N)
    # default line search: fused with the next gradient (``_fused_line_search``); an injected one
    # returns (x, eta, f) only and the gradient is recomputed
    fused = line_search is None
    line_search = line_search or backtracking_line_search
    usum = u.sum(axis=1)
    point = None  # (g_x, g_eta, lambda) at the active iterates, when already known
    bar = tqdm(total=N, desc="Newton", disable=not progress, leave=False)
    for it in range(max_iter + 1):
        if active.size == 0:
            break
        full = active.size == N  # no cell has finished: whole arrays, no row gathers
        pick = (lambda a: a) if full else (lambda a: a[active])  # noqa: E731
        ua, xa, ea = pick(u), pick(x), pick(eta)
        ma = None if m_all is None else pick(m_all)
        if fused and point is None:  # first iteration: f and the gradient pieces together
            f_all[active], *point = _point(ua, usum[active], xa, ea, mu, cov, ma, sigma_M)
        dr = _newton_direction(ua, xa, ea, ma, mu, cov, sigma_M, grad_fn, active, point)
        f0 = f_all[active]
        need = np.isnan(f0)
        if need.any():
            f0[need] = cell_objective(ua[need], xa[need], ea[need], mu, cov,
                                      None if ma is None else ma[need], sigma_M)
            f_all[active[need]] = f0[need]
        dec2 = dr.dec2  # Newton decrement^2 g^T (-H)^{-1} g (>= 0)
        conv_g = dr.gnorm <= gtol
        conv_dec = None
        if dec_tol is not None:
            conv_dec = (~conv_g) & (dec2 <= dec_tol)
            conv_g = conv_g | conv_dec
        # round-off floor: the Newton step no longer changes the iterate in floating point
        scale = np.maximum(1.0, np.abs(f0))
        conv_d = (~conv_g) & ((dec2 <= (4 * np.finfo(float).eps) ** 2 * scale)
                              | ((dr.gnorm >= 0.5 * gnorm_all[active]) & (dec2 <= STALL_DEC2 * scale)))
        fin = conv_g | conv_d
        gnorm_all[active] = dr.gnorm
        conv_by[active[conv_g]] = "gradient"
        if conv_dec is not None:
            conv_by[active[conv_dec]] = "decrement"
        conv_by[active[conv_d]] = "roundoff"
        done[active[conv_g]] = True
        bar.update(int(fin.sum()))
        sel = fin if it < max_iter else np.ones(active.size, dtype=bool)
        if sel.any():
            store.put(active[sel], sel, dr)
        if it == max_iter:
            break
        keep = ~fin
        active = active[keep]
        if active.size == 0:
            break
        sub = None if keep.all() else keep
        kept = (lambda a: a) if sub is None else (lambda a: a[sub])  # noqa: E731
        prob = LineSearchProblem(
            u=kept(ua), x=kept(xa), eta=kept(ea), dx=dr.step(sub), deta=kept(dr.deta),
            gx=kept(dr.gx), ge=kept(dr.ge), lam=kept(dr.lam), f0=kept(f0), dec2=kept(dec2), mu=mu,
            cov=cov, m=None if ma is None else kept(ma), sigma_M=sigma_M, armijo=armijo)
        if fused:
            xn, en, fn, point, failed = _fused_line_search(prob, usum[active])
        else:
            (xn, en, fn), failed = line_search(prob), None
        if active.size == N:  # every cell moved: the new iterates replace the old arrays
            x, eta, f_all = xn, en, fn
        else:
            x[active], eta[active], f_all[active] = xn, en, fn
        n_iter[active] += 1
        if failed is not None and failed.any():
            # no acceptable step: f cannot resolve the gain, so the cell stays at this iterate,
            # whose factorisation dr already holds; retrying would repeat the same search
            rows = np.zeros(keep.size, dtype=bool)
            rows[np.flatnonzero(keep)[failed]] = True
            store.put(active[failed], rows, dr)
            conv_by[active[failed]] = "roundoff"
            bar.update(int(failed.sum()))
            active = active[~failed]
            point = tuple(a[~failed] for a in point)
    bar.close()
    return _final_posterior(u, params, log_anchor, cov, x, eta, m_all, sigma_M, store, f_all, done,
                            gnorm_all, n_iter, conv_by)


def _final_posterior(u, params, log_anchor, cov, x, eta, m_all, sigma_M, store: _BlockStore, f_all,
                     done, gnorm_all, n_iter, conv_by) -> CellPosteriors:
    """The posterior of the block from the factorisation and Schur pieces stored at each cell's
    last check; delta = g_eta / s (<= 0) for cells on the bound."""
    N = u.shape[0]
    A = PosteriorPrecision.from_factor(cov, store.lam, store.S, None, store.r, store.S_inv, store.logdet_S)
    s, delta = store.s, None
    on_bound = np.zeros(N, dtype=bool)
    if m_all is not None:
        on_bound = eta <= _EPS_BOUND
        # g_eta at eta = 0 for cells on the bound (stored at their eta <= _EPS_BOUND)
        ge = store.ge + np.where(on_bound, eta, 0.0) / sigma_M**2
        eta = np.where(on_bound, 0.0, eta)
        num = ge + store.num_x  # g_eta + 1^T g_x - bbar^T g_x (``_newton_direction``)
        delta = np.where(on_bound, num / s, 0.0)
    need = np.isnan(f_all)
    if need.any():
        f_all[need] = cell_objective(u[need], x[need], eta[need], params.mu, cov,
                                     None if m_all is None else m_all[need], sigma_M)
    return CellPosteriors(
        params=params, x_map=x, eta_map=eta, on_bound=on_bound, converged=done,
        grad_norm=gnorm_all, n_iter=n_iter, objective=f_all,
        precision=A, bbar=store.bbar, s=s, delta=delta, log_anchor=log_anchor, converged_by=conv_by,
    )
