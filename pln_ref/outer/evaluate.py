"""The Laplace evidence of the globals theta = (mu, W, d) and its exact gradient, and its
evaluation with warm-started per-cell Newton (``Evaluator``).

Per cell, with xi* = (x*, eta*) the MAP from ``laplace.newton_map`` (seed notation)::

    l_c(theta) = log p(u_c, xi*(theta) | theta) - 1/2 log det(-H(xi*; theta)) + (G+1)/2 log 2 pi

(``model.log_joint`` at the MAP, which contains -1/2 log det Sigma, minus half the log
determinant of the joint precision, computed by the matrix-determinant lemma as
log det A + log s). The objective is L(theta) = (1/N) sum_c l_c(theta); no prior on theta
(maximum marginal likelihood). For a cell whose MAP sits on eta = 0 the same Gaussian formula is
used at the boundary point.

Truncation of eta (``truncation=True``, the default): eta lives on [0, inf), so the Gaussian
integral over eta is taken over that half-line only. With s the Schur precision of eta, the
exact integral of the quadratic expansion adds, per cell,

    c = log Phi(eta* sqrt s)                              interior MAP (eta* > 0)
    c = log Phi(delta sqrt s) + s delta^2 / 2             MAP on the bound (eta* = 0, delta = g_eta / s <= 0)

(continuous at eta* = delta = 0, where both are log 1/2). Without it the objective rewards
globals under which cells press on the bound: on simulated data with 98% of cells there
(N=3000, G=10, k=2, library sizes 100-5000 against M0 = 68) it biased every Sigma entry by
about +0.1, while the corrected objective peaks at the true globals. Its gradient uses
ds = (b, 1)^T d(-H) (b, 1): partial dSigma -> -q^T dSigma q, d s / d x_g = lambda_g bbar_g^2,
d s / d eta = -sum_g lambda_g bbar_g^2, and d g_eta / d x_g = lambda_g on the bound (where eta is
held at 0, so only x* moves); its implicit part shares the adjoint solve below.

The two branches meet in value but not in slope. Along globals that move x and eta together
(mu + a 1, W + 1 b^T), an interior cell keeps lambda, A and log det(-H) fixed; a cell on the bound
keeps eta at 0, so x* alone follows the move, and lambda and log det A change with it. A cell that
crosses the bound thus puts a kink in L, and L can have a local maximum on each side of it. On the
simulated 2000 x 1000 benchmark two cells that cross the bound separate two maxima (their l_c
falls before they reach the bound and rises after): the default fit stops at one, 8.5e-4
nats/cell below its reference at the other, while the eta-integrated evidence of
``eta_marginal`` has a single maximum on the same segment
(``validation/benchmarks/capture_gauge.py``).

Exact total gradient (``ift=True``), alpha = Sigma^{-1}(x* - mu), C = [(-H)^{-1}]_xx
= A^{-1} + b b^T / s::

    dl/dtheta = d/dtheta log p(u, xi | theta)|_xi*            (partial; grad_xi f = 0 at the MAP)
              - 1/2 d/dtheta log det(-H)|_xi*                 (partial)
              - 1/2 r^T dxi*/dtheta,   r_g = lambda_g v_g^T (-H)^{-1} v_g,  r_eta = -sum_g r_g
    dxi*/dtheta = (-H)^{-1} d(grad_xi f)/dtheta               (implicit-function theorem)

With Sigma^{-1} C Sigma^{-1} = Sigma^{-1} - Lambda + Lambda A^{-1} Lambda + q q^T / s,
q = lambda (1 - b), every term is O(N G k^2); the adjoint w = (-H)^{-1} r turns the implicit
term into the theta-gradient of 1/2 w_x^T Sigma^{-1} (x* - mu). ``ift=False`` drops that term
(stop-gradient on the MAP). d = exp(rho) keeps d > 0 (Adam works on rho = log d).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
from scipy.special import gammaln, log_ndtr

from .. import laplace as _laplace
from .. import truncnorm
from ..laplace import CellPosteriors, newton_map
from ..lowrank import LowRankCov
from ..params import PLNParams

__all__ = ["laplace_objective", "laplace_terms", "LaplaceTerms", "Evaluator", "Evaluation",
           "WARM_START_DTYPE", "join_evaluations"]

#: dtype of the warm-start MAPs a blocked (full-batch) evaluation keeps between calls, the only N x G
#: array that persists through a fit: float32 halves it. Newton copies its start into float64, and
#: the rounding (relative 6e-8) is far below the move of the MAPs between outer steps; the MAPs
#: returned and the evidence are float64.
WARM_START_DTYPE = np.float32


class LaplaceTerms(NamedTuple):
    """l (N,) per-cell evidence; grad {"mu", "W", "d"} of sum_c l_c (None without gradient);
    wx (N, G) x-part of the adjoint w = (-H)^{-1} r (with the truncation term's r; None when
    ift=False); kappa (N,) truncation coefficient d c / d s (None without truncation); info_mu (G,)
    sum_c diag(Sigma^{-1} - Sigma^{-1} C_c Sigma^{-1}) = sum_c (lambda - lambda^2 diag A^{-1} - q^2/s),
    the observed information of each mu_g at fixed MAPs, and rate_info (G,)
    sum_c lambda_cg / (1 + lambda_cg Sigma_gg) at the MAPs, the information about x_g of counts
    read as Gaussian observations with variance 1 / lambda_cg (both for the L-BFGS
    preconditioner, ``outer.precondition``)."""

    l: np.ndarray
    grad: dict | None
    wx: np.ndarray | None
    kappa: np.ndarray | None
    info_mu: np.ndarray | None = None
    rate_info: np.ndarray | None = None


def _tmul(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """X^T Y (G, m) for X (n, G), Y (n, m) with m small, computed as (Y^T X)^T: BLAS runs the
    product with the long G axis contiguous, 1.5-2.3x faster than X^T Y at the block shapes here."""
    return (Y.T @ X).T


def laplace_terms(
    counts: np.ndarray,
    params: PLNParams,
    log_anchor: np.ndarray | None,
    post: CellPosteriors,
    *,
    ift: bool = True,
    with_grad: bool = True,
    lgamma_sum: np.ndarray | None = None,
    truncation: bool = True,
) -> LaplaceTerms:
    """Per-cell Laplace evidence l_c (N,), the gradient of sum_c l_c w.r.t. mu, W, d, and the
    adjoint pieces (w_x, kappa) of the implicit term (``LaplaceTerms``).

    ``post`` must hold the MAPs of ``counts`` under ``params`` (from ``newton_map``); its
    ``objective`` f (log_joint without constants) gives log p(u, xi* | theta) =
    f - sum_g log u_g! - G/2 log 2 pi - 1/2 log det Sigma [+ log TruncN normaliser].
    ``lgamma_sum`` (N,) = sum_g log u_g! may be passed to avoid recomputing it.
    ``truncation``: add the eta >= 0 truncation term c (module docstring); False gives the plain
    Gaussian formula (kept for comparison).
    """
    u = np.asarray(counts, dtype=float)
    N, G = u.shape
    cap = params.capture is not None
    cov = post.precision.cov
    if lgamma_sum is None:
        lgamma_sum = gammaln(u + 1.0).sum(axis=1)
    # l = log p(u, xi*) - 1/2 log det(-H) + (G + cap)/2 log 2 pi; the G/2 log 2 pi terms cancel
    l = post.objective - lgamma_sum - 0.5 * cov.logdet() - 0.5 * post.log_det_neg_H()
    if cap:
        sM = params.capture.sigma_M
        m = params.capture.prior_mean(post.log_anchor)
        l = l - np.log(sM) - log_ndtr(m / sM)  # TruncN normaliser (its -1/2 log 2 pi cancels)
    trunc = cap and truncation
    if trunc:
        ob, s_ = post.on_bound, post.s
        sq = np.sqrt(s_)
        t = np.where(ob, post.delta * sq, post.eta_map * sq)
        log_phi_cdf = log_ndtr(t)
        l = l + log_phi_cdf + np.where(ob, 0.5 * s_ * post.delta**2, 0.0)
    if not with_grad:
        return LaplaceTerms(l, None, None, None)
    W = params.W
    A = post.precision
    lam, r = A.lam, A.r
    alpha, aW = cov.inv_mv_W(post.x_map - params.mu)  # Sigma^{-1}(x* - mu) and W^T of it (N, k)
    Sinv = A.S_inv()  # cached on A: inv_diag reuses it
    lam_inv = A.inv_diag()  # this call's own array: lambda diag(A^{-1}) formed in place below
    lam_inv *= lam
    eye = np.eye(params.k)

    # (1) partial of log p(u, xi | theta):  G_Sigma = 1/2 (alpha alpha^T - Sigma^{-1})
    # (2) partial of -1/2 log det(-H):      G_Sigma = 1/2 Sigma^{-1} C Sigma^{-1}
    #     = 1/2 (Sigma^{-1} - Lambda + Lambda A^{-1} Lambda + q q^T/s); the Sigma^{-1} terms cancel.
    # Column sums weighted per cell are GEMVs: sum_c w_c X_cg = (w @ X)_g.
    lr = lam * r
    g_W = -lr.sum(axis=0)[:, None] * W  # (-Lambda + Lambda M^{-1} Lambda) W = -diag(lambda r) W
    # ... low-rank part: sum_c (lam r)_c W (I - S_c^{-1}), over the k(k+1)/2 pairs a <= b only
    # (each W_g times its own k x k matrix: one stacked matmul)
    g_W += np.matmul(W[:, None, :], cov.unpack_pairs(_tmul(lr, cov.pack_pairs(eye - Sinv))))[:, 0, :]
    # sum_c (-lambda + lambda^2 diag A^{-1}), as two column reductions (no (n, G) temporary)
    diag2_sum = np.einsum("ng,ng->g", lam_inv, lam) - lam.sum(axis=0)
    g_d_acc = diag2_sum.copy()  # becomes sum_c [alpha^2 + diag2 (+ truncation)] below
    info_mu = -diag2_sum
    if cap:
        q = lam * post.bbar  # Sigma^{-1} b = lambda (1 - b)
        inv_s = 1.0 / post.s
    if trunc:
        # (4) truncation term c(t, s, delta): dc = kappa ds + (direct terms), mills = phi(t)/Phi(t);
        # partial ds at fixed xi: -q^T dSigma q with dSigma = dW W^T + W dW^T + diag(dd)
        mills = truncnorm.inv_mills(-t)  # phi(t) / Phi(t)
        kappa = mills * t / (2.0 * s_)
        kappa = np.where(ob, -(kappa + 0.5 * post.delta**2), kappa)
        coef = inv_s - 2.0 * kappa  # q q^T / s from (2) and -2 kappa q q^T from (4)
    elif cap:
        coef = inv_s
    if cap:
        # sum_c w_c q_c q_c^T W with w = coef (the k-columns scaled, not q), and the column sums
        # sum_c w_c q_c^2 for w = 1/s (info_mu) and w = coef (g_d) from one product with q^2
        g_W += _tmul(q, coef[:, None] * (q @ W))
        q2_sums = np.stack([inv_s, coef]) @ (q * q)
        info_mu -= q2_sums[0]
        g_d_acc += q2_sums[1]

    if ift:
        # (3) implicit term: r = d log det(-H) / d xi, adjoint w = (-H)^{-1} r; the truncation
        # term's r_tr = kappa lambda bbar^2 + [on bound] (mills / sqrt s + delta) lambda enters as
        # r - 2 r_tr (the result is scaled by -1/2 below)
        if cap:
            lb2 = q * post.bbar  # lambda bbar^2 = d s / d x
            lb2_sum = lb2.sum(axis=1)
            rx = lb2  # rx = lambda diag(A^{-1}) + coef lambda bbar^2, in lb2's array
            rx *= coef[:, None]
            rx += lam_inv
            r_eta = -lam_inv.sum(axis=1) - lb2_sum * inv_s
            if trunc:
                if ob.any():  # rows of the cells on the bound only (no (n, G) temporary otherwise)
                    rx[ob] -= (2.0 * (mills[ob] / sq[ob] + post.delta[ob]))[:, None] * lam[ob]
                r_eta -= 2.0 * np.where(ob, 0.0, mills * sq - kappa * lb2_sum)
            a2 = A.solve(rx)
            la2 = lam * a2
            w_eta = (r_eta + la2.sum(axis=1)) / post.s
            w_eta = np.where(post.on_bound, 0.0, w_eta)  # eta held at its bound
            # beta = Sigma^{-1} w_x without a Sigma^{-1} product: (Sigma^{-1} + Lambda) a2 = rx and
            # Sigma^{-1} b = lambda - Lambda b = q give Sigma^{-1} (a2 + b w_eta) = rx - lambda a2 + w_eta q
            beta = rx  # in rx's array (rx is not used again)
            beta -= la2
            del la2
            beta += w_eta[:, None] * q
            wx = a2  # a2 + b w_eta with b = 1 - bbar, in a2's array
            wx += w_eta[:, None]
            wx -= post.bbar * w_eta[:, None]
        else:
            wx = A.solve(lam_inv)
            beta = lam_inv  # Sigma^{-1} w_x = lambda diag(A^{-1}) - lambda w_x, (Sigma^{-1} + Lambda) w_x = it
            beta -= lam * wx
        bW = beta @ W  # W^T Sigma^{-1} w_x
        # column sums of alpha (alpha - beta) as two reductions, then ab = alpha - beta / 2 in
        # beta's array (no other (n, G) temporary)
        g_d_acc += np.einsum("ng,ng->g", alpha, alpha) - np.einsum("ng,ng->g", alpha, beta)
        ab = beta
        ab *= -0.5
        ab += alpha
        g_mu = ab.sum(axis=0)
        g_W += _tmul(ab, aW) - 0.5 * _tmul(alpha, bW)
    else:
        wx = None
        g_mu = alpha.sum(axis=0)
        g_W += _tmul(alpha, aW)  # sum_c alpha_c (alpha_c^T W)
        g_d_acc += np.einsum("ng,ng->g", alpha, alpha)
    g_d = 0.5 * g_d_acc
    rate = lam * cov.diag()
    rate += 1.0
    np.divide(lam, rate, out=rate)  # lambda / (1 + lambda Sigma_gg)
    return LaplaceTerms(l, {"mu": g_mu, "W": g_W, "d": g_d}, wx, kappa if trunc else None, info_mu,
                        rate.sum(axis=0))


def laplace_objective(
    counts: np.ndarray,
    params: PLNParams,
    log_anchor: np.ndarray | None,
    post: CellPosteriors,
    *,
    ift: bool = True,
    with_grad: bool = True,
    lgamma_sum: np.ndarray | None = None,
    truncation: bool = True,
) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
    """(l_c (N,), gradient of sum_c l_c w.r.t. mu, W, d or None): ``laplace_terms`` without the
    adjoint pieces (module docstring for the formulas)."""
    t = laplace_terms(counts, params, log_anchor, post, ift=ift, with_grad=with_grad,
                      lgamma_sum=lgamma_sum, truncation=truncation)
    return t.l, t.grad


class Evaluation(NamedTuple):
    """L = mean_c l_c at given globals, its gradient (mean over cells; None if not asked), the
    posteriors (MAPs) it was computed from, the Newton tolerance used and the adjoint pieces.

    A blocked evaluation (``Evaluator(block_cells=...)``, all cells) keeps no N x G posterior:
    ``post`` is None and ``terms`` holds l, the summed gradient and info_mu only (wx, kappa None).
    ``n_on_bound``: cells whose eta MAP sits on its bound. ``dec_tol``: the Newton decrement
    tolerance used (``laplace.newton_map``; None: the gradient criterion only)."""

    value: float
    grad: dict | None
    post: CellPosteriors | None
    gtol: float
    terms: LaplaceTerms
    n_on_bound: int = 0
    dec_tol: float | None = None


class TermsSum:
    """Running sum of the ``laplace_terms`` of disjoint blocks of cells, added as each block is done:
    l kept per block (concatenated by ``terms``), the gradient, info_mu and rate_info summed in
    place, so no block's G-sized arrays outlive it (with blocks of 18 cells at G = 14,000, keeping
    every block's terms until the end held about 1 MB per block, 0.28 GB per 5,000 cells). The
    one place where terms are summed (``_sum_terms`` of a list uses it too)."""

    def __init__(self) -> None:
        self._l: list = []
        self._acc: LaplaceTerms | None = None

    def add(self, t: LaplaceTerms) -> None:
        self._l.append(t.l)
        if t.grad is None:
            return
        if self._acc is None:
            self._acc = LaplaceTerms(None, {k: v.copy() for k, v in t.grad.items()}, None, None,
                                     t.info_mu.copy(), t.rate_info.copy())
            return
        for k, v in t.grad.items():
            self._acc.grad[k] += v
        self._acc.info_mu[...] += t.info_mu
        self._acc.rate_info[...] += t.rate_info

    def terms(self) -> LaplaceTerms:
        l = np.concatenate(self._l)
        if self._acc is None:
            return LaplaceTerms(l, None, None, None)
        return self._acc._replace(l=l)


def _sum_terms(parts: list[LaplaceTerms]) -> LaplaceTerms:
    """Join the ``laplace_terms`` of disjoint blocks of cells: l concatenated, the gradient and
    info_mu and rate_info summed (sums over cells, so the block sums are exact); ``TermsSum`` over
    the list."""
    acc = TermsSum()
    for t in parts:
        acc.add(t)
    return acc.terms()


def _blocked_evaluation(parts: list[LaplaceTerms], N: int, gtol: float, n_bound: int,
                        dec_tol: float | None = None) -> Evaluation:
    """The ``Evaluation`` of all N cells from the terms of its blocks (``_sum_terms``): L = mean_c l_c
    and the gradient divided by N; no per-cell posterior is kept."""
    terms = _sum_terms(parts)
    value = float(np.mean(terms.l))
    grad = None if terms.grad is None else {k: v / N for k, v in terms.grad.items()}
    return Evaluation(value, grad, None, gtol, terms, n_bound, dec_tol)


def join_evaluations(parts: list[tuple[Evaluation, np.ndarray]], n: int) -> Evaluation:
    """The evaluation of n cells from evaluations of disjoint subsets of them at the same globals,
    each given with the positions of its cells among the n: the terms summed by ``TermsSum`` (the
    gradient, info_mu and rate_info are sums over cells, so the join is exact), l put back at the
    positions, the cells on the bound summed, the gradient divided by n; its tolerance is the
    loosest of the parts'. The parts must carry gradients; no per-cell posterior is kept (``post``
    None, as for a blocked evaluation). Used by ``sampled`` to start a phase from the previous
    phase's last evaluation and the new cells' first one."""
    if any(e.terms.grad is None for e, _ in parts):
        raise ValueError("join_evaluations needs evaluations with gradients")
    at = np.concatenate([np.asarray(a) for _, a in parts])
    if at.size != n or not np.array_equal(np.sort(at), np.arange(n)):
        raise ValueError("join_evaluations: the parts do not cover the n cells")
    acc = TermsSum()
    for e, _ in parts:
        acc.add(e.terms)
    terms = acc.terms()
    l = np.empty(n)
    l[at] = terms.l  # TermsSum concatenates l in the order of the parts
    terms = terms._replace(l=l)
    dec = [e.dec_tol for e, _ in parts]
    dec_tol = None if all(x is None for x in dec) else max(x for x in dec if x is not None)
    return Evaluation(float(np.mean(l)), {k: v / n for k, v in terms.grad.items()}, None,
                      max(e.gtol for e, _ in parts), terms, sum(e.n_on_bound for e, _ in parts), dec_tol)


def _at_least_as_tight(done: float | None, asked: float | None) -> bool:
    """Whether a solve with decrement tolerance ``done`` meets a request for ``asked`` (None: the
    gradient criterion alone, the tightest)."""
    return done is None or (asked is not None and done <= asked)


class Evaluator:
    """The Laplace evidence and its exact gradient at given globals, by warm-started Newton.

    Each call solves every cell's MAP from the MAPs of the previous successful call (cold start
    the first time, or ``x_map``/``eta_map``), to the Newton tolerance ``gtol`` asked for, then
    evaluates ``laplace_terms``. The last evaluation is cached: asking again at the same globals
    with a tolerance no tighter (and no gradient where it had one) returns it without a re-solve.
    ``cells`` (indices) evaluates on a subset (minibatch); its MAPs are updated in place.
    ``counts``: an array, scipy.sparse matrix or ``pln_ref.counts.CountMatrix`` (kept in its
    storage; dense float64 rows are read one block or minibatch at a time).
    ``block_cells``: when set, a full-batch evaluation runs Newton and ``laplace_terms`` on blocks
    of that many cells and keeps only l (N,), the summed gradient and the MAPs (x_map (N, G) in
    ``WARM_START_DTYPE``, eta_map (N,)): memory beyond the warm start is bounded by one block
    (``Evaluation.post`` is then None). None: one unblocked evaluation holding every cell's
    posterior (needed by the EM).
    Counters: ``n_evals``, ``n_cached``, ``newton_iters`` (sum over cells), ``cells_solved`` (cells
    whose MAP was solved, summed over evaluations: epochs = cells_solved / N), ``cpu_newton``,
    ``cpu_objective`` (process CPU seconds).
    """

    def __init__(self, counts, log_anchor: np.ndarray | None, capture, *, ift: bool = True,
                 truncation: bool = True, x_map: np.ndarray | None = None,
                 eta_map: np.ndarray | None = None, block_cells: int | None = None) -> None:
        from ..counts import CountMatrix

        self.u = CountMatrix(counts)
        self.N = self.u.shape[0]
        self.log_anchor = log_anchor
        self.capture = capture
        self.ift, self.truncation = ift, truncation
        self.lgam = self.u.lgamma_sums()  # sum_g log u_g!, constant
        self.x_map, self.eta_map = x_map, eta_map
        if block_cells is not None and (isinstance(block_cells, bool) or int(block_cells) < 1):
            raise ValueError(f"block_cells must be a positive integer or None, got {block_cells!r}")
        self.block_cells = None if block_cells is None else int(block_cells)
        self._last: tuple | None = None
        self.last_params: PLNParams | None = None  # the globals of ``_last``
        self.n_evals = self.n_cached = self.newton_iters = self.cells_solved = 0
        self.cpu_newton = self.cpu_objective = 0.0

    @staticmethod
    def _key(mu, W, d, cells) -> bytes:
        parts = [np.ascontiguousarray(a).tobytes() for a in (mu, W, d)]
        parts.append(b"all" if cells is None else np.asarray(cells).tobytes())
        return b"|".join(parts)

    def _solve(self, u, params, cov, la, x0, e0, gtol, with_grad, lgam, dec_tol=None):
        """Newton then ``laplace_terms`` on one set of cells: (post, terms, cpu newton, cpu terms)."""
        c0 = time.process_time()
        post = _laplace.newton_map(u, params, la, x0=x0, eta0=e0, gtol=gtol, cov=cov, dec_tol=dec_tol)
        c1 = time.process_time()
        terms = laplace_terms(u, params, la, post, ift=self.ift, with_grad=with_grad,
                              lgamma_sum=lgam, truncation=self.truncation)
        return post, terms, c1 - c0, time.process_time() - c1

    def __call__(self, mu: np.ndarray, W: np.ndarray, d: np.ndarray, *, gtol: float = 1e-6,
                 with_grad: bool = True, cells: np.ndarray | None = None,
                 dec_tol: float | None = None) -> Evaluation:
        """L and dL at (mu, W, d), every cell's Newton stopped at gradient inf-norm <= ``gtol`` or,
        when ``dec_tol`` is given, at squared Newton decrement <= ``dec_tol``
        (``laplace.newton_map``)."""
        key = self._key(mu, W, d, cells)
        if self._last is not None:
            k0, ev = self._last
            if (k0 == key and ev.gtol <= gtol and _at_least_as_tight(ev.dec_tol, dec_tol)
                    and (ev.grad is not None or not with_grad)):
                self.n_cached += 1
                return ev
        params = PLNParams(mu, W, d, self.capture)
        cov = LowRankCov.from_params(params)
        if cells is None and self.block_cells is not None:
            return self._blocked(key, params, cov, gtol, with_grad, dec_tol)
        u = self.u.toarray() if cells is None else self.u.rows(cells)
        la = self.log_anchor if self.log_anchor is None or cells is None else self.log_anchor[cells]
        x0 = None if self.x_map is None else (self.x_map if cells is None else self.x_map[cells])
        e0 = None if self.eta_map is None else (self.eta_map if cells is None else self.eta_map[cells])
        post, terms, cn, co = self._solve(u, params, cov, la, x0, e0, gtol, with_grad,
                                          self.lgam if cells is None else self.lgam[cells], dec_tol)
        self.cpu_newton += cn
        self.cpu_objective += co
        self.n_evals += 1
        self.newton_iters += int(post.n_iter.sum())
        n = u.shape[0]
        self.cells_solved += n
        value = float(np.mean(terms.l))
        grad = None if terms.grad is None else {k: v / n for k, v in terms.grad.items()}
        ev = Evaluation(value, grad, post, gtol, terms, int(post.on_bound.sum()), dec_tol)
        if np.isfinite(value):
            if cells is None:
                self.x_map, self.eta_map = post.x_map, post.eta_map
            elif self.x_map is not None:
                self.x_map[cells], self.eta_map[cells] = post.x_map, post.eta_map
            self._remember(key, ev, params)
        return ev

    @property
    def last_evaluation(self) -> Evaluation | None:
        """The cached last evaluation (at ``last_params``), None before the first."""
        return None if self._last is None else self._last[1]

    def _remember(self, key: bytes, ev: Evaluation, params: PLNParams) -> None:
        """Cache ``ev`` as the evaluation at ``params`` (``key``: ``_key`` of them, all cells or a
        subset)."""
        self._last, self.last_params = (key, ev), params

    def set_warm_start(self, x_map: np.ndarray, eta_map: np.ndarray) -> None:
        """Warm-start the next evaluation from these MAPs (every cell's, (N, G) and (N,); kept, not
        copied) and forget the cached last evaluation, so that the next call solves again even at
        the same globals (a finite-difference Hessian-vector product solves both sides from one
        point, ``validation/benchmarks/outer_probe.py``)."""
        self.x_map, self.eta_map = x_map, eta_map
        self._last, self.last_params = None, None

    def seed(self, params: PLNParams, ev: Evaluation) -> None:
        """Take ``ev``, an evaluation of all this evaluator's cells at ``params`` computed elsewhere
        (``join_evaluations``), as if this evaluator had made it: a call at these globals with a
        tolerance no tighter returns it (the warm start is not changed)."""
        self._remember(self._key(params.mu, params.W, params.d, None), ev, params)

    def _blocked(self, key, params, cov, gtol, with_grad, dec_tol=None) -> Evaluation:
        """All cells, block by block: the MAPs go into new (N, G) / (N,) arrays (the warm start is
        replaced only if the evaluation is finite), l and the gradient sums are kept."""
        N, G = self.u.shape
        x_new, e_new = np.empty((N, G), dtype=WARM_START_DTYPE), np.empty(N)
        acc, n_bound = TermsSum(), 0
        for lo in range(0, N, self.block_cells):
            hi = min(N, lo + self.block_cells)
            sl = slice(lo, hi)
            pick = lambda a: None if a is None else a[sl]  # noqa: E731
            post, terms, cn, co = self._solve(self.u.block(lo, hi), params, cov, pick(self.log_anchor),
                                              pick(self.x_map), pick(self.eta_map), gtol, with_grad,
                                              self.lgam[sl], dec_tol)
            self.cpu_newton += cn
            self.cpu_objective += co
            self.newton_iters += int(post.n_iter.sum())
            x_new[sl], e_new[sl] = post.x_map, post.eta_map
            n_bound += int(post.on_bound.sum())
            acc.add(terms)  # summed as it comes; the block's adjoint and posterior are not kept
            del post, terms
        self.n_evals += 1
        self.cells_solved += N
        ev = _blocked_evaluation([acc.terms()], N, gtol, n_bound, dec_tol)
        if np.isfinite(ev.value):
            self.x_map, self.eta_map = x_new, e_new
            self._remember(key, ev, params)
        return ev

    def ensure_maps(self, mu, W, d, gtol: float = 1e-6) -> None:
        """Cold-start every cell's MAP at these globals if no warm start exists yet."""
        if self.x_map is None:
            self(mu, W, d, gtol=gtol, with_grad=False)
