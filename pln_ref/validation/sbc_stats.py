"""SBC statistics (Talts et al. 2018) and the ECDF-difference test of Säilynoja, Bürkner & Vehtari
(2022): ranks, thinning, simultaneous ECDF bands, the per-quantity SBC table.

Ranks. For a simulation with true value q* and L posterior draws q_1..q_L (independent, or
thinned so that their ESS is about L), the rank is r = #{l : q_l < q*} in {0, ..., L}
(ties broken uniformly at random). Under a calibrated posterior r is discrete-uniform.

ECDF test. For n ranks and evaluation points j = 1..K-1 on the rank grid, let
z_j = P(r < t_j) under uniformity (exactly t_j / (L+1)) and F_j the empirical CDF. Each
n F_j ~ Binomial(n, z_j). A simultaneous 1 - alpha band is the set of binomial central
intervals at an adjusted level gamma, chosen (by simulating uniform rank sets of the same n
and L) so that ALL F_j lie inside their intervals with probability 1 - alpha:

    gamma_s = 2 min_j min( P(X <= n F_j),  P(X >= n F_j) ),   X ~ Binomial(n, z_j)
    gamma   = alpha-quantile of gamma_s over simulated uniform rank sets.

A rank set passes iff every F_j is inside [q_{gamma/2}, q_{1-gamma/2}] / n. The ECDF-difference
plot shows F_j - z_j with the band minus z_j.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import numpy as np
from scipy import stats

__all__ = [
    "sbc_ranks",
    "thin_draws",
    "EcdfBand",
    "ecdf_band",
    "EcdfTest",
    "ecdf_test",
    "rank_columns",
    "sbc_table",
]


# --------------------------------------------------------------------------- ranks

def sbc_ranks(truth: np.ndarray, draws: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Rank of each true value among L draws: r = #{draws < truth} + U{0..#ties}.

    truth (...,) and draws (L, ...) -> int ranks (...) in {0, ..., L}.
    """
    t = np.asarray(truth, dtype=float)
    d = np.asarray(draws, dtype=float)
    if d.shape[1:] != t.shape:
        raise ValueError(f"draws have shape {d.shape}, expected (L,) + {t.shape}")
    lt = np.sum(d < t, axis=0)
    eq = np.sum(d == t, axis=0)
    if np.any(eq):
        rng = rng or np.random.default_rng(0)
        lt = lt + rng.integers(0, eq + 1)
    return lt.astype(np.int64)


def thin_draws(draws: np.ndarray, L: int) -> tuple[np.ndarray, float]:
    """Pick L draws evenly spaced within chains from MCMC draws (chains, n_draws, ...).

    The spacing (total draws / L) is at least the autocorrelation time whenever the run's
    bulk ESS >= L, i.e. the thinned draws have ESS about L. Returns (draws (L, ...), min bulk
    ESS of the full run over all quantities); callers record ``ess_min >= L``.
    """
    import arviz as az
    import warnings

    d = np.asarray(draws, dtype=float)
    if d.ndim < 2:
        raise ValueError("draws must be (chains, n_draws, ...)")
    C, S = d.shape[:2]
    if C * S < L:
        raise ValueError(f"only {C * S} draws, cannot thin to L={L}")
    flat = d.reshape(C, S, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ess = np.array([az.ess(flat[:, :, q], method="bulk") for q in range(flat.shape[2])])
    per_chain = [L // C + (1 if c < L % C else 0) for c in range(C)]
    picked = []
    for c, m in enumerate(per_chain):
        if m == 0:
            continue
        idx = np.floor((np.arange(m) + 0.5) * S / m).astype(int)
        picked.append(d[c, idx])
    return np.concatenate(picked, axis=0), float(np.nanmin(ess))


# --------------------------------------------------------------------------- ECDF test

def _eval_points(L: int, K: int | None) -> np.ndarray:
    """Thresholds t_j (rank < t_j) on the grid {1..L}; K-1 of them, about evenly spaced."""
    n_vals = L + 1
    K = n_vals if K is None else int(min(K, n_vals))
    if K < 2:
        raise ValueError("need at least 2 rank values (L >= 1)")
    t = np.unique(np.round(np.arange(1, K) * n_vals / K).astype(int))
    return t[(t >= 1) & (t <= L)]


def _gamma_stat(counts_le: np.ndarray, n: int, z: np.ndarray) -> np.ndarray:
    """2 min_j min(P(X <= c_j), P(X >= c_j)) for counts c (..., J), X ~ Bin(n, z_j)."""
    lo = stats.binom.cdf(counts_le, n, z)
    hi = stats.binom.sf(counts_le - 1, n, z)
    return 2 * np.min(np.minimum(lo, hi), axis=-1)


@dataclass(frozen=True)
class EcdfBand:
    """Simultaneous band for n ranks on {0..L}: at thresholds t (J,), null cdf z (J,),
    bounds lower/upper (J,) as ECDF values; gamma is the adjusted pointwise level; gamma_null
    the simulated null statistics (for p-values)."""

    n: int
    L: int
    alpha: float
    t: np.ndarray
    z: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    gamma: float
    gamma_null: np.ndarray


@lru_cache(maxsize=64)
def ecdf_band(n: int, L: int, alpha: float = 0.05, K: int | None = 100, n_sim: int = 2000,
              seed: int = 20220101) -> EcdfBand:
    """Simultaneous 1 - alpha ECDF band for n discrete-uniform ranks on {0..L}, by simulation."""
    if n < 1:
        raise ValueError("need at least one rank")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    t = _eval_points(L, K)
    z = t / (L + 1)
    rng = np.random.default_rng(seed)
    gam = np.empty(n_sim)
    chunk = max(1, int(2e7 // max(n, 1)))
    for s0 in range(0, n_sim, chunk):
        m = min(chunk, n_sim - s0)
        r = rng.integers(0, L + 1, size=(m, n))
        # counts of ranks < t_j: histogram then cumulative sum
        hist = np.zeros((m, L + 2), dtype=np.int64)
        np.add.at(hist, (np.repeat(np.arange(m), n), r.reshape(-1) + 1), 1)
        cum = np.cumsum(hist, axis=1)  # cum[:, t] = #(r < t)
        gam[s0:s0 + m] = _gamma_stat(cum[:, t], n, z)
    gamma = float(np.quantile(gam, alpha))
    lower = stats.binom.ppf(gamma / 2, n, z) / n
    upper = stats.binom.ppf(1 - gamma / 2, n, z) / n
    return EcdfBand(n=n, L=L, alpha=alpha, t=t, z=z, lower=lower, upper=upper, gamma=gamma,
                    gamma_null=np.sort(gam))


@dataclass
class EcdfTest:
    """Outcome of :func:`ecdf_test` for one quantity."""

    passed: bool
    p_value: float
    gamma_obs: float
    ecdf: np.ndarray
    band: EcdfBand
    n: int

    def summary(self) -> dict:
        return {"passed": bool(self.passed), "p_value": float(self.p_value),
                "gamma_obs": float(self.gamma_obs), "gamma_crit": float(self.band.gamma),
                "n": int(self.n), "max_abs_ecdf_diff": float(np.max(np.abs(self.ecdf - self.band.z)))}


def ecdf_test(ranks: np.ndarray, L: int, alpha: float = 0.05, K: int | None = 100,
              n_sim: int = 2000) -> EcdfTest:
    """ECDF-difference test of uniformity of ranks (n,) on {0..L} with a simultaneous band."""
    r = np.asarray(ranks).reshape(-1)
    if r.size == 0:
        raise ValueError("no ranks")
    if np.any((r < 0) | (r > L)) or np.any(r != np.round(r)):
        raise ValueError(f"ranks must be integers in [0, {L}]")
    n = int(r.size)
    band = ecdf_band(n, int(L), float(alpha), K, n_sim)
    counts = np.searchsorted(np.sort(r), band.t, side="left")  # #(r < t_j)
    F = counts / n
    g = float(_gamma_stat(counts[None], n, band.z)[0])
    passed = bool(np.all((F >= band.lower - 1e-12) & (F <= band.upper + 1e-12)))
    p = float((np.searchsorted(band.gamma_null, g, side="right") + 1) / (band.gamma_null.size + 1))
    return EcdfTest(passed=passed, p_value=min(p, 1.0), gamma_obs=g, ecdf=F, band=band, n=n)


# --------------------------------------------------------------------------- tables

def _labels(name: str, shape: tuple) -> list[str]:
    """Labels of the scalar quantities of a rank array; Sigma stored as its upper triangle
    (np.triu_indices order) is labelled Sigma[g,h]."""
    if name == "Sigma" and len(shape) == 1:
        G = int(round((np.sqrt(8 * shape[0] + 1) - 1) / 2))
        if G * (G + 1) // 2 == shape[0]:
            return [f"Sigma[{g},{h}]" for g, h in zip(*np.triu_indices(G))]
    if not shape:
        return [name]
    return [f"{name}[{','.join(map(str, idx))}]" for idx in np.ndindex(*shape)]


def rank_columns(sims: dict[str, np.ndarray], keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """{label: ranks (n_sims,)} for every scalar quantity of every ``rank_*`` array."""
    keys = [k for k in sims if k.startswith("rank_")] if keys is None else list(keys)
    out = {}
    for k in keys:
        r = np.asarray(sims[k])
        flat = r.reshape(r.shape[0], -1)
        for j, lab in enumerate(_labels(k[5:], r.shape[1:])):
            out[lab] = flat[:, j]
    return out


def sbc_table(sims: dict[str, np.ndarray], L: int, alpha: float = 0.05,
              names: Iterable[str] | None = None) -> list[dict]:
    """ECDF test for every scalar element of every rank array ``rank_<name>`` in ``sims``.

    Returns rows {quantity, n, passed, p_value, ..., passed_bonferroni, p_value_halves}; the
    Bonferroni column tests each quantity at alpha / (number of quantities) (family-wise level
    alpha). ``p_value_halves`` are the p-values of the first and second half of the simulations
    (in simulation order): two independent replicates. A miscalibration shows in both; a chance
    failure of the whole usually rests on one half.
    """
    keys = [k for k in sims if k.startswith("rank_")]
    if names is not None:
        keys = [f"rank_{n}" for n in names]
    rows = list(rank_columns(sims, keys).items())
    m = len(rows)
    table = []
    for label, rr in rows:
        t = ecdf_test(rr, L, alpha)
        row = {"quantity": label, **t.summary()}
        tb = ecdf_test(rr, L, alpha / m) if m > 1 else t
        row["passed_bonferroni"] = bool(tb.passed)
        h = len(rr) // 2
        row["p_value_halves"] = ([float(ecdf_test(rr[:h], L, alpha).p_value),
                                  float(ecdf_test(rr[h:], L, alpha).p_value)] if h >= 20 else None)
        table.append(row)
    return table
