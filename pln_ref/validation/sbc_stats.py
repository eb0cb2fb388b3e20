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
plot shows F_j - z_j with the band minus z_j. The p-value of a rank set is the share of simulated
null statistics at or below its gamma_s.

Family-wise decision. An SBC tests many quantities (20 x_g, eta and the log-likelihood in the
Laplace SBC); each at level alpha, an exact posterior fails some quantity most of the time.
:func:`sbc_verdict` is the one decision of the harness: Holm's step-down test over the
per-quantity p-values of each family (one posterior's quantities), family-wise level alpha.
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
    "holm",
    "sbc_family",
    "sbc_verdict",
    "N_NULL_SIM",
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


def _gamma_table(n: int, z: np.ndarray) -> np.ndarray:
    """(J, n + 1) table of 2 min(P(X_j <= c), P(X_j >= c)), X_j ~ Bin(n, z_j), c = 0..n: the
    statistic of :func:`_gamma_stat` for all counts at once (one binomial CDF per cell of the table)."""
    c = np.arange(n + 1)
    lo = stats.binom.cdf(c[None], n, z[:, None])
    hi = stats.binom.sf(c[None] - 1, n, z[:, None])
    return 2 * np.minimum(lo, hi)


@dataclass(frozen=True)
class EcdfBand:
    """Simultaneous band for n ranks on {0..L}: at thresholds t (J,), null cdf z (J,),
    bounds lower/upper (J,) as ECDF values; gamma is the adjusted pointwise level; gamma_null
    the simulated null statistics, sorted (for p-values; their number n_sim sets the smallest
    p-value, 1 / (n_sim + 1))."""

    n: int
    L: int
    alpha: float
    t: np.ndarray
    z: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    gamma: float
    gamma_null: np.ndarray


# Null rank sets per band. The p-values are Monte Carlo estimates (k + 1) / (n_sim + 1) from them;
# a family-wise (Holm) decision over m quantities needs them resolved well below alpha / m
# (0.05 / 22 = 0.0023 for the Laplace SBC): 20000 sets put about 45 null statistics below that.
N_NULL_SIM = 20000


@lru_cache(maxsize=64)
def ecdf_band(n: int, L: int, alpha: float = 0.05, K: int | None = 100, n_sim: int = N_NULL_SIM,
              seed: int = 20220101) -> EcdfBand:
    """Simultaneous 1 - alpha ECDF band for n discrete-uniform ranks on {0..L}, by simulation.

    A null rank set enters only through its counts per rank value, Multinomial(n, 1/(L+1), ...),
    so the n_sim sets are drawn as multinomial histograms (O(n_sim L), not O(n_sim n))."""
    if n < 1:
        raise ValueError("need at least one rank")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    t = _eval_points(L, K)
    z = t / (L + 1)
    tab = _gamma_table(n, z)
    rng = np.random.default_rng(seed)
    gam = np.empty(n_sim)
    chunk = 4096
    J = np.arange(t.size)[None]
    for s0 in range(0, n_sim, chunk):
        m = min(chunk, n_sim - s0)
        hist = rng.multinomial(n, np.full(L + 1, 1.0 / (L + 1)), size=m)
        cum = np.concatenate([np.zeros((m, 1), dtype=np.int64), np.cumsum(hist, axis=1)], axis=1)
        gam[s0:s0 + m] = tab[J, cum[:, t]].min(axis=1)  # cum[:, t] = #(r < t)
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
              n_sim: int = N_NULL_SIM) -> EcdfTest:
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


def holm(p_values: dict[str, float], alpha: float = 0.05) -> dict:
    """Holm's step-down test of the family of hypotheses "quantity q is calibrated" from their
    p-values: with p_(1) <= ... <= p_(m), reject H_(1..i) while p_(j) <= alpha / (m - j + 1) for all
    j <= i. Family-wise error <= alpha under any dependence between the p-values (the ranks of x_g,
    eta and the log-likelihood of one simulation are dependent), and at least as powerful as
    Bonferroni. Adjusted p-values p~_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)); H_q is rejected
    iff p~_q <= alpha.

    Returns {"method", "alpha", "m", "passed" (no rejection), "rejected" (labels, smallest p
    first), "adjusted_p" {label: p~}, "min_adjusted_p"}."""
    labels = list(p_values)
    p = np.asarray([p_values[k] for k in labels], dtype=float)
    m = p.size
    if m == 0:
        raise ValueError("no p-values")
    if np.any((p < 0) | (p > 1)) or np.any(~np.isfinite(p)):
        raise ValueError("p-values must be in [0, 1]")
    order = np.argsort(p, kind="stable")
    adj_sorted = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    adj = np.empty(m)
    adj[order] = adj_sorted
    rejected = [labels[i] for i in order if adj[i] <= alpha]
    return {"method": "holm", "alpha": float(alpha), "m": int(m), "passed": not rejected,
            "rejected": rejected, "adjusted_p": {k: float(a) for k, a in zip(labels, adj)},
            "min_adjusted_p": float(adj.min())}


def sbc_family(label: str) -> str:
    """The family of an SBC quantity: "psis" for the PSIS-reweighted draws (``psis_*``), else
    "draws" (the posterior's own draws). Each family is one posterior, tested family-wise."""
    return "psis" if label.startswith("psis_") else "draws"


def sbc_verdict(table: list[dict], alpha: float = 0.05) -> dict:
    """THE family-wise SBC decision (the only one; reports and summaries read it from here):
    per family of quantities (:func:`sbc_family`), Holm's test (:func:`holm`) of the per-quantity
    ECDF p-values at family-wise level alpha. A family passes iff Holm rejects nothing.

    The per-quantity ``passed`` of :func:`sbc_table` (each quantity's own simultaneous band at
    level alpha) is kept for reading the plots; it is not a decision about the posterior: with
    m quantities an exact posterior fails at least one of them with probability up to
    1 - (1 - alpha)^m (0.68 for m = 22 independent quantities at alpha = 0.05).

    Returns {family: holm(...) + {"p_floor": smallest attainable p-value, "n_failed_per_quantity"}}."""
    fams: dict[str, dict[str, float]] = {}
    floor: dict[str, float] = {}
    nfail: dict[str, int] = {}
    for row in table:
        f = row.get("family") or sbc_family(row["quantity"])
        fams.setdefault(f, {})[row["quantity"]] = row["p_value"]
        floor[f] = max(floor.get(f, 0.0), float(row.get("p_floor", 0.0)))
        nfail[f] = nfail.get(f, 0) + (not row["passed"])
    out = {}
    for f, pv in fams.items():
        v = holm(pv, alpha)
        v["p_floor"] = floor[f]
        v["n_failed_per_quantity"] = nfail[f]
        if floor[f] > alpha / v["m"]:
            raise ValueError(f"p-values of family {f!r} cannot go below {floor[f]:.2g} > alpha / m = "
                             f"{alpha / v['m']:.2g}: simulate more null rank sets (n_sim)")
        out[f] = v
    return out


def sbc_table(sims: dict[str, np.ndarray], L: int, alpha: float = 0.05,
              names: Iterable[str] | None = None) -> list[dict]:
    """ECDF test for every scalar element of every rank array ``rank_<name>`` in ``sims``.

    Returns rows {quantity, family, n, passed, p_value, ..., p_floor, p_holm, rejected_holm,
    p_value_halves}. ``passed`` is the quantity's own simultaneous band at level alpha;
    ``p_holm`` / ``rejected_holm`` are the family-wise decision of :func:`sbc_verdict` (Holm within
    the quantity's family). ``p_value_halves`` are the p-values of the first and second half of
    the simulations (in simulation order): two independent replicates. A miscalibration shows in
    both; a chance failure of the whole usually rests on one half.
    """
    keys = [k for k in sims if k.startswith("rank_")]
    if names is not None:
        keys = [f"rank_{n}" for n in names]
    rows = list(rank_columns(sims, keys).items())
    table = []
    for label, rr in rows:
        t = ecdf_test(rr, L, alpha)
        row = {"quantity": label, "family": sbc_family(label), **t.summary(),
               "p_floor": 1.0 / (t.band.gamma_null.size + 1)}
        h = len(rr) // 2
        row["p_value_halves"] = ([float(ecdf_test(rr[:h], L, alpha).p_value),
                                  float(ecdf_test(rr[h:], L, alpha).p_value)] if h >= 20 else None)
        table.append(row)
    verdict = sbc_verdict(table, alpha)
    for row in table:
        row["p_holm"] = verdict[row["family"]]["adjusted_p"][row["quantity"]]
        row["rejected_holm"] = row["p_holm"] <= alpha
    return table
