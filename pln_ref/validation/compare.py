"""Method-agnostic comparison of approximate posterior draws against NUTS ground truth.

For every scalar quantity q (a latent x_g^(c), eta^(c), a Sigma entry, ...), with method draws
a_1..a_S and NUTS draws b_1..b_T:

    standardised mean error   z_q  = (mean(a) - mean(b)) / sd(b)
    SD ratio                  r_q  = sd(a) / sd(b)
    coverage at level p       c_q  = (1/T) #{ t : Q_a((1-p)/2) <= b_t <= Q_a((1+p)/2) }
                              (fraction of NUTS draws inside the method's central p interval;
                               0.5 and 0.9 for identical distributions)
    scaled 1-Wasserstein      w_q  = W1(a, b) / sd(b),  W1 = int_0^1 |Q_a(p) - Q_b(p)| dp

W1 is exact for the two empirical distributions: the quantile functions are step functions
with breaks on the union of {i/S} and {j/T}, shared by every quantity, so the integral is
one vectorised sum (no loop over quantities).

Any approximate-posterior method that exposes ``.sample(rng, n_draws) -> (x (S,N,G), eta (S,N))``
plugs into :func:`compare_cells`; plain arrays go to :func:`compare_draws`.
NUTS ground truth is accepted only with a passed :class:`pln_ref.validation.gate.GateResult` (or
``force``, which labels the result as a diagnostic comparison and warns).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .gate import GateResult, require_gate

__all__ = [
    "DrawComparison",
    "compare_draws",
    "compare_cells",
    "nuts_cell_draws",
    "wasserstein1",
    "central_interval_coverage",
    "interval_coverage_of_point",
    "summarise",
    "corr_x_eta",
    "plot_means",
    "plot_sd_ratio_hist",
    "plot_khat",
]

def _as_2d(draws: np.ndarray, name: str) -> tuple[np.ndarray, tuple]:
    a = np.asarray(draws, dtype=float)
    if a.ndim < 1 or a.shape[0] < 2:
        raise ValueError(f"{name} must have shape (n_draws >= 2, ...), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a.reshape(a.shape[0], -1), a.shape[1:]


def wasserstein1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact 1-Wasserstein distance between the empirical marginals of a (S, Q) and b (T, Q).

    W1 = int_0^1 |Q_a(p) - Q_b(p)| dp with step quantile functions Q_a(p) = a_(ceil(pS)).
    Returns (Q,). Agrees with scipy.stats.wasserstein_distance column by column.
    """
    a2, _ = _as_2d(a, "a")
    b2, _ = _as_2d(b, "b")
    if a2.shape[1] != b2.shape[1]:
        raise ValueError(f"a and b have different numbers of quantities: {a2.shape[1]} vs {b2.shape[1]}")
    S, T = a2.shape[0], b2.shape[0]
    sa, sb = np.sort(a2, axis=0), np.sort(b2, axis=0)
    p = np.union1d(np.arange(S + 1) / S, np.arange(T + 1) / T)
    mid = 0.5 * (p[1:] + p[:-1])
    dp = np.diff(p)
    ia = np.minimum((mid * S).astype(int), S - 1)
    ib = np.minimum((mid * T).astype(int), T - 1)
    return np.einsum("p,pq->q", dp, np.abs(sa[ia] - sb[ib]))


def central_interval_coverage(method: np.ndarray, reference: np.ndarray, level: float) -> np.ndarray:
    """Fraction of reference draws (T, Q) inside the method's (S, Q) central ``level`` interval."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    m2, _ = _as_2d(method, "method draws")
    r2, _ = _as_2d(reference, "reference draws")
    lo, hi = np.quantile(m2, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return np.mean((r2 >= lo) & (r2 <= hi), axis=0)


def interval_coverage_of_point(draws: np.ndarray, point: np.ndarray, level: float) -> np.ndarray:
    """Whether a point estimate (Q,) lies in the central ``level`` interval of draws (S, Q)."""
    d2, shape = _as_2d(draws, "draws")
    pt = np.asarray(point, dtype=float).reshape(-1)
    if pt.shape[0] != d2.shape[1]:
        raise ValueError(f"point has {pt.shape[0]} entries, draws have {d2.shape[1]} quantities")
    lo, hi = np.quantile(d2, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return ((pt >= lo) & (pt <= hi)).reshape(shape)


@dataclass
class DrawComparison:
    """Per-quantity comparison metrics (each an array of the quantity shape) and summaries."""

    std_mean_error: np.ndarray
    sd_ratio: np.ndarray
    cover50: np.ndarray
    cover90: np.ndarray
    w1_scaled: np.ndarray
    mean_method: np.ndarray
    sd_method: np.ndarray
    mean_nuts: np.ndarray
    sd_nuts: np.ndarray
    forced: bool = False
    label: str = "method"
    extra: dict = field(default_factory=dict)

    def metric(self, name: str) -> np.ndarray:
        return getattr(self, name)

    def summary(self) -> dict:
        """Median, 90th percentile and worst of each metric (JSON-ready)."""
        return summarise(self)


def compare_draws(method_draws: np.ndarray, nuts_draws: np.ndarray, *, gate: GateResult | None = None,
                  force: bool = False, label: str = "method") -> DrawComparison:
    """Compare method draws (S, ...) with NUTS draws (T, ...) quantity by quantity.

    ``gate`` is the NUTS fit's gate result: a failed or missing gate raises GateFailedError
    unless ``force=True`` (then the result is labelled ``forced``). Pass ``gate=GateResult(True,..)``
    explicitly for reference draws that are exact by construction (tests).
    """
    forced = require_gate(gate, force=force, what=f"NUTS ground truth for {label}")
    a, shape = _as_2d(method_draws, "method draws")
    b, shape_b = _as_2d(nuts_draws, "NUTS draws")
    if shape != shape_b:
        raise ValueError(f"method draws have quantity shape {shape}, NUTS draws {shape_b}")
    ma, mb = a.mean(0), b.mean(0)
    sa, sb = a.std(0, ddof=1), b.std(0, ddof=1)
    if np.any(sb <= 0):
        raise ValueError(f"{int(np.sum(sb <= 0))} quantities have zero NUTS standard deviation")
    out = DrawComparison(
        std_mean_error=((ma - mb) / sb).reshape(shape),
        sd_ratio=(sa / sb).reshape(shape),
        cover50=central_interval_coverage(a, b, 0.5).reshape(shape),
        cover90=central_interval_coverage(a, b, 0.9).reshape(shape),
        w1_scaled=(wasserstein1(a, b) / sb).reshape(shape),
        mean_method=ma.reshape(shape), sd_method=sa.reshape(shape),
        mean_nuts=mb.reshape(shape), sd_nuts=sb.reshape(shape),
        forced=forced, label=label,
    )
    return out


def _stats(v: np.ndarray, worst: str) -> dict:
    v = np.asarray(v, dtype=float).reshape(-1)
    if worst == "abs":
        a = np.abs(v)
        return {"median_abs": float(np.median(a)), "p90_abs": float(np.quantile(a, 0.9)),
                "worst": float(v[np.argmax(a)]), "mean": float(v.mean())}
    if worst == "ratio":  # farthest from 1 on the log scale
        lv = np.abs(np.log(v))
        return {"median": float(np.median(v)), "p90_abs_log_dev": float(np.quantile(lv, 0.9)),
                "min": float(v.min()), "max": float(v.max()), "p05": float(np.quantile(v, 0.05)),
                "p95": float(np.quantile(v, 0.95)), "worst": float(v[np.argmax(lv)])}
    if worst.startswith("cover"):
        nominal = float(worst[5:]) / 100
        dev = np.abs(v - nominal)
        return {"median": float(np.median(v)), "mean": float(v.mean()),
                "p90_abs_dev": float(np.quantile(dev, 0.9)), "min": float(v.min()),
                "max": float(v.max()), "worst": float(v[np.argmax(dev)])}
    return {"median": float(np.median(v)), "p90": float(np.quantile(v, 0.9)), "worst": float(v.max())}


def summarise(cmp: DrawComparison, select: np.ndarray | None = None) -> dict:
    """Summaries of a comparison: for each metric median, 90th percentile and worst.

    ``select`` is an optional boolean mask (quantity shape) restricting the summary.
    """
    kinds = {"std_mean_error": "abs", "sd_ratio": "ratio", "cover50": "cover50",
             "cover90": "cover90", "w1_scaled": "plain"}
    out: dict[str, Any] = {"label": cmp.label, "forced": bool(cmp.forced)}
    for m, kind in kinds.items():
        v = np.asarray(cmp.metric(m))
        if select is not None:
            v = v[np.asarray(select, dtype=bool)]
        out[m] = _stats(v, kind)
    out["n_quantities"] = int(np.size(v))
    return out


# --------------------------------------------------------------------------- per-cell API

def nuts_cell_draws(idata, N: int | None = None, G: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """NUTS draws of a ``pln_cell`` fit as (x (T, N, G), eta (T, N)), chains stacked."""
    post = idata.posterior
    if "x" not in post or "eta" not in post:
        raise ValueError("pln_cell posterior must contain variables 'x' and 'eta'")
    x = np.asarray(post["x"].values, dtype=float)
    eta = np.asarray(post["eta"].values, dtype=float)
    T = x.shape[0] * x.shape[1]
    x = x.reshape(T, *x.shape[2:])
    eta = eta.reshape(T, -1)
    if x.ndim == 2:  # flattened x (N*G) -> (N, G)
        if N is None or G is None:
            raise ValueError("x is flattened in the posterior; pass N and G")
        x = x.reshape(T, N, G)
    if N is not None and x.shape[1:] != (N, G):
        raise ValueError(f"NUTS x has shape {x.shape[1:]}, expected {(N, G)}")
    return x, eta


def compare_cells(method, nuts: tuple[np.ndarray, np.ndarray] | Any, *, gate: GateResult | None,
                  n_draws: int = 4000, seed: int = 0, force: bool = False, label: str = "method",
                  sample_kwargs: dict | None = None) -> dict[str, DrawComparison]:
    """Compare a per-cell posterior method against NUTS for x (N, G) and eta (N,).

    method : object with ``.sample(rng, n_draws, **sample_kwargs) -> (x (S,N,G), eta (S,N))``
        (Laplace CellPosteriors, VAE posteriors, ...).
    nuts : ``pln_cell`` InferenceData or a tuple (x (T,N,G), eta (T,N)).
    Returns {"x": DrawComparison (N,G), "eta": DrawComparison (N,)}.
    """
    if isinstance(nuts, tuple):
        xn, en = (np.asarray(v, dtype=float) for v in nuts)
    else:
        xn, en = nuts_cell_draws(nuts)
    rng = np.random.default_rng(seed)
    xm, em = method.sample(rng, n_draws, **(sample_kwargs or {}))
    xm, em = np.asarray(xm, dtype=float), np.asarray(em, dtype=float)
    if xm.shape[1:] != xn.shape[1:]:
        raise ValueError(f"method x draws have shape {xm.shape[1:]}, NUTS {xn.shape[1:]}")
    out = {"x": compare_draws(xm, xn, gate=gate, force=force, label=f"{label}: x")}
    if np.all(np.std(em, axis=0) > 0):
        out["eta"] = compare_draws(em, en, gate=gate, force=force, label=f"{label}: eta")
    return out


# --------------------------------------------------------------------------- plots

def plot_means(cmp: DrawComparison, ax=None, max_points: int = 2000, title: str | None = None):
    """Method vs NUTS posterior means, with +-1 posterior SD error bars on both axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    mm, mn = cmp.mean_method.reshape(-1), cmp.mean_nuts.reshape(-1)
    sm, sn = cmp.sd_method.reshape(-1), cmp.sd_nuts.reshape(-1)
    idx = np.arange(mm.size)
    if mm.size > max_points:
        idx = np.random.default_rng(0).choice(mm.size, max_points, replace=False)
    ax.errorbar(mn[idx], mm[idx], xerr=sn[idx], yerr=sm[idx], fmt="o", ms=2, lw=0.4, alpha=0.5)
    lo, hi = min(mn.min(), mm.min()), max(mn.max(), mm.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlabel("NUTS posterior mean (± sd)")
    ax.set_ylabel(f"{cmp.label} posterior mean (± sd)")
    ax.set_title(title or f"{cmp.label}{' [FORCED: gate failed]' if cmp.forced else ''}")
    return ax


def plot_sd_ratio_hist(cmp: DrawComparison, ax=None, title: str | None = None):
    """Histogram of sd_method / sd_NUTS with the 0.9-1.1 goal band."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(cmp.sd_ratio.reshape(-1), bins=50, color="C0", alpha=0.8)
    for v in (0.9, 1.0, 1.1):
        ax.axvline(v, color="k", ls="--" if v != 1 else "-", lw=0.8)
    ax.set_xlabel("SD ratio sd_method / sd_NUTS")
    ax.set_ylabel("count")
    ax.set_title(title or f"{cmp.label}{' [FORCED]' if cmp.forced else ''}")
    return ax


def plot_khat(khat: np.ndarray, ax=None, title: str = "PSIS k-hat by cell"):
    """PSIS k-hat per cell with the 0.5 and 0.7 thresholds."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    k = np.asarray(khat).reshape(-1)
    ax.scatter(np.arange(k.size), k, s=6, c=np.where(k < 0.5, "C0", np.where(k < 0.7, "C1", "C3")))
    ax.axhline(0.5, color="C1", ls="--", lw=0.8)
    ax.axhline(0.7, color="C3", ls="--", lw=0.8)
    ax.set_xlabel("cell")
    ax.set_ylabel("k-hat")
    ax.set_title(title)
    return ax


def corr_x_eta(x: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """Posterior correlation corr(x_cg, eta_c) over draws, shape (N, G).

    x: draws (S, N, G); eta: draws (S, N). In the PLN posterior the counts pin x_g - eta, so this
    correlation grows with library size; a mean-field family over (x, eta) sets it to 0.
    """
    x, eta = np.asarray(x, float), np.asarray(eta, float)
    if x.ndim != 3 or eta.shape != x.shape[:2]:
        raise ValueError(f"need x (S, N, G) and eta (S, N); got {x.shape} and {eta.shape}")
    xc = x - x.mean(0)
    ec = (eta - eta.mean(0))[..., None]
    return np.mean(xc * ec, 0) / np.sqrt(np.mean(xc ** 2, 0) * np.mean(ec ** 2, 0))
