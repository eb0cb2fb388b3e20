"""Posterior predictive checks of a fitted PLN (the seed's two modes).

- ``mode="map"``: u_rep ~ Poisson(e^{x_hat - eta_hat}) - one Poisson draw per (sample, cell, gene);
  tests whether the likelihood shape matches the data given point estimates.
- ``mode="posterior"`` (alias ``"laplace"``): x drawn from the method's posterior with eta held
  at its point estimate (``sample(rng, 1, eta="map")``; for Laplace x ~ N(x_hat, A^{-1}) by the
  square-root factor, no G x G; this projects out the rigid mu/eta translation), then
  u_rep ~ Poisson(e^{x - eta_hat}).

Works on any result of the protocol (``pln_ref.protocol``) through its per-cell posterior.

Statistics per replicate: per-gene mean, variance and zero fraction, and the total counts of the cells.
Per-gene posterior predictive p-values p = P(T_rep >= T_obs) (+ half the ties) and the share of
genes whose observed statistic lies in the central 95% predictive interval summarise the check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .protocol import CellPosterior

__all__ = ["posterior_predictive", "PPCSummary", "ppc_summary", "plot_ppc"]


def _posterior(result) -> CellPosterior:
    """The per-cell posterior of a fitted result (``result.posterior``) or the posterior itself."""
    post = result if isinstance(result, CellPosterior) else getattr(result, "posterior", None)
    if not isinstance(post, CellPosterior):
        raise ValueError(f"expected a pln_ref result or a per-cell posterior, got {type(result).__name__}")
    return post


def _rates(post: CellPosterior, rng, mode: str) -> np.ndarray:
    if mode == "map":
        x, eta = post.x_map, post.eta_map
    elif mode in ("laplace", "posterior"):
        xs, es = post.sample(rng, 1, eta="map")
        x, eta = xs[0], es[0]
    else:
        raise ValueError(f'mode must be "map", "posterior" or "laplace", got {mode!r}')
    with np.errstate(over="ignore"):
        return np.exp(x - eta[:, None])


def posterior_predictive(result, n_samples: int, *, mode: str = "laplace", seed=0) -> np.ndarray:
    """Replicated counts (n_samples, N, G) in the given mode (module docstring)."""
    rng = np.random.default_rng(seed)
    post = _posterior(result)
    return np.stack([rng.poisson(_rates(post, rng, mode)) for _ in range(n_samples)])


def _stats(u: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "mean": u.mean(axis=0),
        "var": u.var(axis=0, ddof=1),
        "zero_frac": (u == 0).mean(axis=0),
        "total_counts": np.sort(u.sum(axis=1)),
    }


@dataclass
class PPCSummary:
    """Observed statistics, replicated statistics (leading axis = replicate) and p-values."""

    mode: str
    observed: dict
    replicated: dict
    p_values: dict
    coverage95: dict

    def table(self) -> dict:
        out = {"mode": self.mode}
        for k in ("mean", "var", "zero_frac"):
            p = self.p_values[k]
            out[k] = {
                "share_in_95pct_interval": float(self.coverage95[k]),
                "share_p_below_0.025_or_above_0.975": float(np.mean((p < 0.025) | (p > 0.975))),
            }
        lo, hi = np.quantile(self.replicated["total_counts"], [0.025, 0.975], axis=0)
        obs = self.observed["total_counts"]
        out["total_counts"] = {
            "share_of_order_statistics_in_95pct_band": float(np.mean((obs >= lo) & (obs <= hi))),
            "observed_median": float(np.median(obs)),
            "replicated_median": float(np.median(self.replicated["total_counts"])),
        }
        return out


def ppc_summary(counts, result, *, n_samples: int = 100, mode: str = "laplace", seed=0) -> PPCSummary:
    """Compare the data with ``n_samples`` posterior predictive replicates (streamed, O(N G) memory)."""
    post = _posterior(result)
    u = np.asarray(counts)
    if u.shape != post.x_map.shape:
        raise ValueError(f"counts have shape {u.shape} but the fit has {post.x_map.shape}")
    rng = np.random.default_rng(seed)
    obs = _stats(u)
    reps = {k: [] for k in obs}
    for _ in range(n_samples):
        s = _stats(rng.poisson(_rates(post, rng, mode)))
        for k in reps:
            reps[k].append(s[k])
    reps = {k: np.stack(v) for k, v in reps.items()}
    pv, cov = {}, {}
    for k in ("mean", "var", "zero_frac"):
        r, o = reps[k], obs[k]
        pv[k] = np.mean(r > o, axis=0) + 0.5 * np.mean(r == o, axis=0)
        lo, hi = np.quantile(r, [0.025, 0.975], axis=0)
        cov[k] = np.mean((o >= lo) & (o <= hi))
    return PPCSummary(mode=mode, observed=obs, replicated=reps, p_values=pv, coverage95=cov)


def plot_ppc(summary: PPCSummary, path=None):
    """Four panels: observed vs replicated gene means, variances, zero fractions (with 95%
    predictive intervals) and the library-size distribution (observed vs replicate band)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    for ax, k, log in zip(axes.flat[:3], ("mean", "var", "zero_frac"), (True, True, False)):
        o = summary.observed[k]
        r = summary.replicated[k]
        med = np.median(r, axis=0)
        lo, hi = np.quantile(r, [0.025, 0.975], axis=0)
        ax.errorbar(o, med, yerr=[med - lo, hi - med], fmt="o", ms=3, alpha=0.6, elinewidth=0.8)
        lim = [max(min(o.min(), lo.min()), 1e-4) if log else 0, max(o.max(), hi.max())]
        ax.plot(lim, lim, "k--", lw=1)
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel(f"observed gene {k}")
        ax.set_ylabel(f"replicated gene {k} (median, 95%)")
        ax.set_title(f"{k}: {100 * summary.coverage95[k]:.0f}% of genes inside 95% interval")
    ax = axes.flat[3]
    libs = summary.replicated["total_counts"]
    q = np.linspace(0, 1, libs.shape[1])
    lo, hi = np.quantile(libs, [0.025, 0.975], axis=0)
    ax.fill_betweenx(q, lo, hi, alpha=0.3, label="replicates 95% band")
    ax.plot(summary.observed["total_counts"], q, "k-", lw=1.2, label="observed")
    ax.set_xscale("log")
    ax.set_xlabel("total counts per cell")
    ax.set_ylabel("ECDF")
    ax.legend()
    fig.suptitle(f"Posterior predictive check ({summary.mode} mode)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
