"""Low-rank-plus-diagonal algebra: Sigma = W W^T + diag(d) and A_c = diag(lambda_c) + Sigma^{-1}.

Nothing here forms a G x G array (except ``dense()`` helpers that exist for tests).

Inner Woodbury (``LowRankCov``), D = diag(1/d), K = I_k + W^T D W::

    Sigma^{-1} v  = D v - D W K^{-1} W^T D v
    log det Sigma = sum_g log d_g + log det K

computed through the thin SVD D^{1/2} W = U diag(s) Q^T (K = Q diag(1 + s^2) Q^T), never through an
explicit K^{-1}: with genes at the d floor, cond(K) reaches 1e6 (``LowRankCov.__init__``).

Outer Woodbury (``PosteriorPrecision``), per cell c with lambda = lambda_c, M = diag(lambda + 1/d),
V = D W, S = K - V^T M^{-1} V. Written without cancellation as::

    S   = I_k + W^T diag(lambda / (1 + lambda d)) W                         (>= I_k)
    A^{-1} b   = b / m + r * (W S^{-1} W^T (r * b)),   m = lambda + 1/d,  r = 1 / (1 + lambda d)
    log det A  = sum_g log m_g + log det S - log det K
    diag(A^{-1})_g = 1/m_g + r_g^2 * W_g S^{-1} W_g^T

The k x k matrices S of all N cells come from one (N x G) @ (G x k(k+1)/2) product with the
table of loading products W_ga W_gb (a <= b); everything else is O(N G k).
"""

from __future__ import annotations

import numpy as np

from .constants import LOG_2PI

__all__ = ["LowRankCov", "PosteriorPrecision", "chol_inverse", "lowrank_solve", "sigma_dense", "sigma_diag",
           "spd_inverse"]

#: ``spd_inverse`` sweeps stacks of at least this many matrices of order at most SWEEP_MAX_K;
#: otherwise (few or large matrices) it calls ``np.linalg.inv``
SWEEP_MIN_STACK = 64
SWEEP_MAX_K = 12


def spd_inverse(S: np.ndarray, logdet: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """S^{-1} for a stack S (..., k, k) of symmetric positive definite matrices (the S_c >= I_k of
    ``PosteriorPrecision``), by the sweep operator vectorised over the stack (Goodnight 1979):
    with T = S, for each pivot p in turn,

        T_ij <- T_ij - T_ip T_pj / T_pp  (i, j != p),   T_ip, T_pi <- T_ip / T_pp,   T_pp <- -1 / T_pp,

    after which T = -S^{-1}. Without pivoting, which is stable for positive definite S. The stack
    is laid out last, so each of the k steps is a few whole-array operations instead of one LAPACK
    call per matrix: measured 2-6x faster than ``np.linalg.inv`` for k <= 12 and stacks of 100 or
    more (LAPACK wins on small stacks and for k > 12, where it is used). ``chol_inverse`` computes
    the Cholesky factor too, in the same stack-last layout (about twice the work for S^{-1}).

    ``logdet=True``: also log det S (...,) = sum_p log T_pp, each pivot T_pp taken before its sweep
    (the Schur complement of the leading block, L_pp^2 for L the Cholesky factor), so no Cholesky
    factorisation is needed for the log-determinant."""
    S = np.asarray(S, dtype=float)
    k = S.shape[-1]
    n = int(np.prod(S.shape[:-2], dtype=np.int64))
    if k > SWEEP_MAX_K or n < SWEEP_MIN_STACK:
        inv = np.linalg.inv(S)
        return (inv, np.linalg.slogdet(S)[1]) if logdet else inv
    T = np.moveaxis(S.reshape(n, k, k), 0, -1).copy()  # (k, k, n), a new C-ordered array
    ld = np.zeros(n) if logdet else None
    for p in range(k):
        if logdet:
            ld += np.log(T[p, p])
        piv = 1.0 / T[p, p]
        col = T[:, p] * piv  # T_ip / T_pp (k, n)
        T -= T[:, p][:, None, :] * col[None, :, :]
        T[:, p] = col
        T[p, :] = col
        T[p, p] = -piv
    out = np.empty((n, k, k))
    np.negative(np.moveaxis(T, -1, 0), out=out)
    out = out.reshape(S.shape)
    return (out, ld.reshape(S.shape[:-2])) if logdet else out


def chol_inverse(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L, S^{-1}) of a batch of symmetric positive definite k x k matrices S (n, k, k), L the lower
    Cholesky factor, S^{-1} = L^{-T} L^{-1}. Computed with the batch as the last (contiguous) axis:
    column j of L, row i of L^{-1} and all of S^{-1} are each one vectorised NumPy call over the n
    matrices (3k calls in all), instead of n LAPACK calls per batched ``np.linalg`` function (for
    the small k here, per-matrix call overhead dominates: 10000 3 x 3 matrices take 0.8 ms this way,
    4-9 ms by ``np.linalg.inv`` + ``np.linalg.cholesky``; 260 10 x 10 matrices 0.5 ms against
    1.2 ms). Agrees with LAPACK to round-off (S >= I_k here, so well conditioned). A row that is not
    positive definite gets NaN in its own L and S^{-1} only (no error). ``spd_inverse`` is the
    cheaper route when only S^{-1} is wanted."""
    n, k, _ = S.shape
    St = np.ascontiguousarray(np.moveaxis(S, 0, -1))  # (k, k, n)
    L = np.zeros_like(St)
    for j in range(k):
        Lj = L[j, :j]
        diag = St[j, j] - np.einsum("cn,cn->n", Lj, Lj) if j else St[j, j]
        ljj = np.sqrt(diag)
        L[j, j] = ljj
        if j + 1 < k:
            col = St[j + 1:, j] - np.einsum("icn,cn->in", L[j + 1:, :j], Lj) if j else St[j + 1:, j]
            np.divide(col, ljj, out=L[j + 1:, j])
    Li = np.zeros_like(St)  # L^{-1} by forward substitution, one row at a time
    dinv = 1.0 / np.einsum("iin->in", L)
    for i in range(k):
        row = -np.einsum("cn,cbn->bn", L[i, :i], Li[:i]) if i else np.zeros((k, n))
        row[i] += 1.0
        np.multiply(row, dinv[i], out=Li[i])
    S_inv = np.einsum("can,cbn->abn", Li, Li)
    return np.ascontiguousarray(np.moveaxis(L, -1, 0)), np.ascontiguousarray(np.moveaxis(S_inv, -1, 0))


def lowrank_solve(cov: "LowRankCov", r: np.ndarray, S_inv: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A^{-1} b for A = diag(lambda) + Sigma^{-1} given r = 1 / (1 + lambda d) (..., G) and
    S^{-1} (..., k, k) of each row (``PosteriorPrecision``): since 1/m = r d,

        A^{-1} b = r * (d b + W S^{-1} W^T (r b)),

    O(G k) per row. Leading batch dimensions of r, S^{-1} and b (..., G) broadcast against each
    other (e.g. draws (S, n, G) against per-row factors (n, G), (n, k, k)); returns the broadcast
    shape (..., G). A one-dimensional b (G,) is the same vector for every row: then
    (r b) W = r (diag(b) W), one product with no (..., G) temporary."""
    t = r @ (b[:, None] * cov.W) if b.ndim == 1 else (r * b) @ cov.W  # (..., k)
    s = np.einsum("...ab,...b->...a", S_inv, t)
    out = s @ cov.W.T
    out += cov.d * b
    out *= r
    return out


def sigma_diag(W: np.ndarray, d: np.ndarray) -> np.ndarray:
    """diag(Sigma)_g = sum_a W_ga^2 + d_g, O(G k): the one home of diag(Sigma) (``LowRankCov.diag``,
    ``PLNParams.sigma_diag``)."""
    return np.einsum("ga,ga->g", W, W) + d


def sigma_dense(W: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Dense G x G Sigma = W W^T + diag(d) (tests, small G, or explicit user request only)."""
    return W @ W.T + np.diag(d)


def _pair_index(k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(k)


class LowRankCov:
    """Sigma = W W^T + diag(d) with O(Gk) products, solves and log-determinant."""

    def __init__(self, W: np.ndarray, d: np.ndarray) -> None:
        W = np.asarray(W, dtype=float)
        d = np.asarray(d, dtype=float)
        if W.ndim != 2 or d.ndim != 1 or W.shape[0] != d.shape[0]:
            raise ValueError(f"shape mismatch: W {W.shape}, d {d.shape}")
        if np.any(d <= 0):
            raise ValueError("d must be strictly positive")
        self.W = W
        self.d = d
        self.G, self.k = W.shape
        self.dinv = 1.0 / d
        # Woodbury through the thin SVD B = D^{1/2} W = U diag(s) Q^T (D = diag(1/d), as above):
        # K = Q diag(1 + s^2) Q^T, so with Ut = D^{1/2} U (G x k)
        #     Sigma^{-1} = D - Ut diag(s^2 / (1 + s^2)) Ut^T,   W^T Sigma^{-1} = Q diag(s / (1 + s^2)) Ut^T,
        # the same operators as D - V K^{-1} V^T and K^{-1} V^T, without the explicit K^{-1}: when
        # some d_g sits at its floor (a Heywood gene), cond(K) = 1 + s_max^2 reaches 1e6 and
        # Sigma^{-1} v through K^{-1} carried a relative error of about 1e-4 (real counts, k = 30,
        # six genes at d = 1e-6: |Sigma a - v| 1.3e-3 against 1.9e-7 this way), enough to stall
        # the per-cell Newton (``laplace``) and to make the evidence noisy at 1e-4 nats/cell.
        sq = np.sqrt(self.dinv)
        U, sv, Qt = np.linalg.svd(W * sq[:, None], full_matrices=False)
        s2 = sv * sv
        self._Ut = U * sq[:, None]
        self._c_inv = s2 / (1.0 + s2)
        self._c_w = sv / (1.0 + s2)
        self._Qt = Qt
        self._logdet_K = float(np.sum(np.log1p(s2)))
        iu, ju = _pair_index(self.k)
        self._iu, self._ju = iu, ju
        full = np.empty((self.k, self.k), dtype=np.intp)  # pair index of each entry (a, b)
        full[iu, ju] = full[ju, iu] = np.arange(len(iu))
        self._unpack_index = full.ravel()
        # table T[g, p] = W_{g a_p} W_{g b_p} for the k(k+1)/2 pairs a_p <= b_p
        self.pair_table = W[:, iu] * W[:, ju]

    @classmethod
    def from_params(cls, params) -> "LowRankCov":
        return cls(params.W, params.d)

    # ---- Sigma ---------------------------------------------------------------------------
    def mv(self, v: np.ndarray) -> np.ndarray:
        """Sigma v = W (W^T v) + d * v for v of shape (..., G)."""
        return (v @ self.W) @ self.W.T + self.d * v

    def inv_mv(self, v: np.ndarray) -> np.ndarray:
        """Sigma^{-1} v = D v - Ut diag(s^2 / (1 + s^2)) Ut^T v (= D v - V K^{-1} V^T v, computed
        through the SVD of D^{1/2} W: see ``__init__``) for v of shape (..., G)."""
        t = v @ self._Ut  # (..., k)
        return self.dinv * v - (t * self._c_inv) @ self._Ut.T

    def inv_mv_quad(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Sigma^{-1} v, v^T Sigma^{-1} v) for v of shape (..., G), the quadratic form from the same
        pieces: v^T Sigma^{-1} v = sum_g v_g^2 / d_g - sum_a c_a t_a^2, t = Ut^T v, c = s^2 / (1 + s^2)
        (``inv_mv``); one (..., G) temporary besides the result."""
        t = v @ self._Ut  # (..., k)
        out = v * self.dinv
        quad = np.einsum("...g,...g->...", v, out) - (t * t) @ self._c_inv
        out -= (t * self._c_inv) @ self._Ut.T
        return out, quad

    def inv_mv_W(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Sigma^{-1} v, W^T Sigma^{-1} v) for v of shape (..., G), the second for free from the
        same k-vector t = Ut^T v: W^T Sigma^{-1} v = K^{-1} V^T v = Q diag(s / (1 + s^2)) t."""
        t = v @ self._Ut  # (..., k)
        return self.dinv * v - (t * self._c_inv) @ self._Ut.T, (t * self._c_w) @ self._Qt

    def logdet(self) -> float:
        """log det Sigma = sum_g log d_g + log det K."""
        return float(np.sum(np.log(self.d))) + self._logdet_K

    def quad(self, v: np.ndarray) -> np.ndarray:
        """v^T Sigma^{-1} v for v of shape (..., G) (``inv_mv_quad``)."""
        return self.inv_mv_quad(v)[1]

    def logpdf(self, x: np.ndarray, mu: np.ndarray) -> np.ndarray:
        """log N(x | mu, Sigma) = -G/2 log 2pi - 1/2 log det Sigma - 1/2 (x-mu)^T Sigma^{-1} (x-mu)."""
        r = x - mu
        return -0.5 * (self.G * LOG_2PI + self.logdet() + self.quad(r))

    def diag(self) -> np.ndarray:
        """diag(Sigma) (``sigma_diag``)."""
        return sigma_diag(self.W, self.d)

    def dense(self) -> np.ndarray:
        """Dense G x G Sigma (``sigma_dense``; tests, small G, or explicit user request only)."""
        return sigma_dense(self.W, self.d)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n zero-mean draws W z + sqrt(d) eps with covariance Sigma, shape (n, G)."""
        z = rng.standard_normal((n, self.k))
        e = rng.standard_normal((n, self.G))
        return z @ self.W.T + np.sqrt(self.d) * e

    def eta_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Constant tables of the joint (x, eta) Newton step (``laplace._newton_direction``),
        computed once per covariance, with sigma1 = Sigma^{-1} 1 (G,):

            ext  (G, p + k + 1) = [pair_table | W | d * sigma1]   (one product gives S_c,
                                  W^T diag(lambda r) and lambda^T diag(r) d sigma1)
            sW   (G, k)         = diag(sigma1) W                  (r @ sW = W^T diag(r) sigma1)
            dsig (G,)           = d * sigma1
            WtE  (k + 1, G)     = [W^T ; d * sigma1^T]
        """
        cached = self.__dict__.get("_eta_tables")
        if cached is None:
            sigma1 = self.inv_mv(np.ones(self.G))
            dsig = self.d * sigma1
            ext = np.hstack([self.pair_table, self.W, dsig[:, None]])
            cached = self._eta_tables = (ext, sigma1[:, None] * self.W, dsig,
                                         np.vstack([self.W.T, dsig[None, :]]))
        return cached

    # ---- helpers shared with PosteriorPrecision ------------------------------------------
    def unpack_pairs(self, P: np.ndarray) -> np.ndarray:
        """(N, k(k+1)/2) packed symmetric entries (a <= b) -> (N, k, k)."""
        # one gather along the last axis (entry (a, b) reads pair (min, max)): 2-9x faster than
        # assigning the two triangles by fancy indexing
        return P[..., self._unpack_index].reshape(P.shape[:-1] + (self.k, self.k))

    def pack_pairs(self, S: np.ndarray) -> np.ndarray:
        """(N, k, k) symmetric -> packed (N, k(k+1)/2) upper-triangle entries (a <= b), the inverse
        of ``unpack_pairs``."""
        return S[..., self._iu, self._ju]

    def pack_pairs_weighted(self, S: np.ndarray) -> np.ndarray:
        """(N,k,k) symmetric -> packed (N, p) with off-diagonal entries doubled, so that
        sum_ab W_ga W_gb S_ab = (packed @ pair_table.T)_g."""
        P = S[..., self._iu, self._ju].copy()
        P[..., self._iu != self._ju] *= 2.0
        return P


class PosteriorPrecision:
    """A_c = diag(lambda_c) + Sigma^{-1} for N cells at once (outer Woodbury, no G x G).

    Parameters
    ----------
    cov : LowRankCov
    lam : (N, G) array of lambda_c = exp(x_c - eta_c) >= 0.
    """

    def __init__(self, cov: LowRankCov, lam: np.ndarray) -> None:
        lam = np.asarray(lam, dtype=float)
        if lam.ndim != 2 or lam.shape[1] != cov.G:
            raise ValueError(f"lam must have shape (N, {cov.G}), got {lam.shape}")
        self.cov = cov
        self.lam = lam
        r = lam * cov.d
        r += 1.0
        self.r = np.reciprocal(r, out=r)  # r = 1 / (1 + lambda d)
        # S_c = I + W^T diag(lambda/(1 + lambda d)) W: one (N x G) @ (G x p) product
        P = (lam * self.r) @ cov.pair_table
        S = cov.unpack_pairs(P)
        S[..., np.arange(cov.k), np.arange(cov.k)] += 1.0
        self.S = S
        self._L_S = None  # Cholesky factor of S, on first access (``L_S``)

    @classmethod
    def from_factor(cls, cov: LowRankCov, lam: np.ndarray, S: np.ndarray, L_S: np.ndarray | None,
                    r: np.ndarray | None = None, S_inv: np.ndarray | None = None,
                    logdet_S: np.ndarray | None = None) -> "PosteriorPrecision":
        """Rebuild from a stored S (no new O(N G k^2) product); its Cholesky factor L_S (None:
        computed on first access), r, S^{-1} and log det S, when stored too, are adopted instead of
        recomputed."""
        self = cls.__new__(cls)
        self.cov, self.lam, self.S, self.L_S = cov, lam, S, L_S
        self.r = 1.0 / (1.0 + lam * cov.d) if r is None else r
        if S_inv is not None:
            self._S_inv = S_inv
        if logdet_S is not None:
            self._logdet_S = logdet_S
        return self

    @property
    def L_S(self) -> np.ndarray:
        """Lower Cholesky factor of S_c (N, k, k), computed on first access and kept (log det A and
        sampling need it; the Newton directions use S^{-1} only)."""
        cached = self.__dict__.get("_L_S")
        if cached is None:
            cached = self._L_S = np.linalg.cholesky(self.S)
        return cached

    @L_S.setter
    def L_S(self, value: np.ndarray) -> None:
        self._L_S = value

    @property
    def m(self) -> np.ndarray:
        """m = lambda + 1/d (N, G), computed on first access and kept (the Newton iterations
        never need it; ``logdet`` and the evidence gradient do)."""
        cached = self.__dict__.get("_m")
        if cached is None:
            cached = self._m = self.lam + self.cov.dinv
        return cached

    @property
    def N(self) -> int:
        return self.lam.shape[0]

    def mv(self, v: np.ndarray) -> np.ndarray:
        """A v = lambda * v + Sigma^{-1} v, for v (N, G) or (S, N, G)."""
        return self.lam * v + self.cov.inv_mv(v)

    def solve(self, b: np.ndarray) -> np.ndarray:
        """A^{-1} b = b/m + r * W S^{-1} W^T (r * b); b of shape (N, G), (N, G, n_rhs) or (G,) (the
        same right-hand side for every cell)."""
        b = np.asarray(b, dtype=float)
        if b.ndim == 1 and b.shape[0] == self.cov.G:  # one vector shared by every cell (broadcast)
            return lowrank_solve(self.cov, self.r, self.S_inv(), b)
        if b.ndim == 2:
            # r read once: ``outer.final.MapPrecision`` derives it from the MAPs on access;
            # S^{-1} cached: one inversion per factorisation
            return lowrank_solve(self.cov, self.r, self.S_inv(), b)
        if b.ndim == 3:
            # one (N x G) @ (G x k) GEMM per right-hand side beats batched tiny GEMMs
            out = np.empty_like(b)
            for j in range(b.shape[2]):
                out[:, :, j] = self.solve(b[:, :, j])
            return out
        raise ValueError(f"b must be (N, G) or (N, G, n_rhs), got shape {b.shape}")

    def logdet(self) -> np.ndarray:
        """log det A_c = sum_g log m_g + log det S_c - log det K, shape (N,), with
        sum_g log m_g = -sum_g log r_g - sum_g log d_g (m = 1 / (r d): no m array is formed; the
        sum over genes as a product with ones, BLAS, rather than a row reduction)."""
        ld_S = self.logdet_S()
        sum_log_m = -(np.log(self.r) @ np.ones(self.r.shape[1])) - np.sum(np.log(self.cov.d))
        return sum_log_m + ld_S - self.cov._logdet_K

    def S_inv(self) -> np.ndarray:
        """S_c^{-1} (N, k, k), computed once per object and cached (``inv_diag``, the outer
        gradient and the EM step all need it; do not modify the returned array); log det S_c comes
        with it (``logdet_S``)."""
        cached = getattr(self, "_S_inv", None)
        if cached is None:  # S >= I_k is well conditioned: no pivoting needed
            cached, ld = spd_inverse(self.S, logdet=True)
            self._S_inv = cached
            if getattr(self, "_logdet_S", None) is None:
                self._logdet_S = ld
        return cached

    def logdet_S(self) -> np.ndarray:
        """log det S_c (N,): from the inversion's pivots when S^{-1} was computed here
        (``spd_inverse``), else from the Cholesky factor."""
        cached = getattr(self, "_logdet_S", None)
        if cached is None:
            cached = self._logdet_S = 2.0 * np.sum(np.log(np.diagonal(self.L_S, axis1=-2, axis2=-1)),
                                                   axis=-1)
        return cached

    def inv_diag(self, out: np.ndarray | None = None) -> np.ndarray:
        """diag(A_c^{-1})_g = 1/m_g + r_g^2 W_g S_c^{-1} W_g^T = r_g (d_g + r_g W_g S_c^{-1} W_g^T)
        (1/m = r d), shape (N, G), O(N G k^2): the quadratic forms from one product with the pair
        table, then three in-place passes (no other (N, G) temporary); written into ``out`` if given."""
        packed = self.cov.pack_pairs_weighted(self.S_inv())
        out = np.matmul(packed, self.cov.pair_table.T, out=out)
        out *= self.r
        out += self.cov.d
        out *= self.r
        return out

    def sample(self, rng: np.random.Generator, n_draws: int) -> np.ndarray:
        """Zero-mean draws with covariance A_c^{-1}, shape (n_draws, N, G).

        x = M^{-1/2} e1 + M^{-1} V L_S^{-T} e2 = e1 / sqrt(m) + r * (W L_S^{-T} e2),
        e1 ~ N(0, I_G), e2 ~ N(0, I_k); Cov = M^{-1} + M^{-1} V S^{-1} V^T M^{-1} = A^{-1}.
        """
        N, G, k = self.N, self.cov.G, self.cov.k
        e1 = rng.standard_normal((n_draws, N, G))
        e2 = rng.standard_normal((n_draws, N, k))
        # y = L_S^{-T} e2 for every draw and cell
        LT_inv = np.linalg.inv(np.swapaxes(self.L_S, -1, -2))  # (N, k, k)
        y = np.einsum("nab,snb->sna", LT_inv, e2)
        return e1 / np.sqrt(self.m) + self.r * (y @ self.cov.W.T)

    def quad(self, v: np.ndarray) -> np.ndarray:
        """v^T A v, v of shape (..., N, G) -> (..., N)."""
        return np.einsum("...g,...g->...", v, self.mv(v))

    def dense(self) -> np.ndarray:
        """Dense (N, G, G) A_c (tests only)."""
        Si = np.linalg.inv(self.cov.dense())
        return np.stack([np.diag(l) + Si for l in self.lam])
