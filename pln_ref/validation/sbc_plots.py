"""SBC figures: rank histograms and ECDF-difference plots with simultaneous bands."""

from __future__ import annotations

import numpy as np
from scipy import stats

from .sbc_stats import ecdf_test

__all__ = ["plot_rank_hist", "plot_ecdf_diff"]


def _grid(n: int, ncol: int = 6, size: float = 2.2):
    import matplotlib.pyplot as plt

    ncol = min(ncol, n)
    nrow = int(np.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(size * ncol, size * 0.85 * nrow), squeeze=False)
    for ax in axes.reshape(-1)[n:]:
        ax.set_visible(False)
    return fig, axes.reshape(-1)


def plot_rank_hist(ranks: dict[str, np.ndarray], L: int, n_bins: int = 20, max_panels: int = 48):
    """Rank histograms with the 99% band of a uniform histogram."""
    items = list(ranks.items())[:max_panels]
    fig, axes = _grid(len(items))
    for ax, (name, r) in zip(axes, items):
        n = r.size
        bins = np.linspace(-0.5, L + 0.5, n_bins + 1)
        ax.hist(r, bins=bins, color="C0")
        p = 1 / n_bins
        lo, hi = stats.binom.ppf([0.005, 0.995], n, p)
        ax.axhspan(lo, hi, color="0.8", zorder=0)
        ax.axhline(n * p, color="k", lw=0.6)
        ax.set_title(name, fontsize=8)
        ax.set_yticks([])
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    return fig


def plot_ecdf_diff(ranks: dict[str, np.ndarray], L: int, alpha: float = 0.05, max_panels: int = 48):
    """ECDF difference F(z) - z with the simultaneous 1 - alpha band; failures in red."""
    items = list(ranks.items())[:max_panels]
    fig, axes = _grid(len(items))
    for ax, (name, r) in zip(axes, items):
        t = ecdf_test(r, L, alpha)
        b = t.band
        ax.fill_between(b.z, b.lower - b.z, b.upper - b.z, step="mid", color="0.85")
        ax.step(b.z, t.ecdf - b.z, where="mid", color="C0" if t.passed else "C3", lw=1)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"{name} p={t.p_value:.2f}", fontsize=8, color="k" if t.passed else "C3")
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    return fig
