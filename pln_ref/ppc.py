"""Posterior predictive checks of a fitted PLN that mean what they say.

Each replicate data set u_rep has one row per observed cell; the modes differ in which uncertainty
the replicate's rates carry (``PPC_MODES``):

- ``"map"``: u_rep ~ Poisson(e^{x_hat - eta_hat}): Poisson noise around the point estimates only.
  Tests the likelihood shape given point estimates; its intervals are too narrow for a model check.
- ``"joint"`` (aliases ``"posterior"``, ``"laplace"``): per replicate and cell one joint draw
  (x, eta) ~ q(x, eta | u_c), then u_rep ~ Poisson(e^{x - eta}). For a Gaussian Laplace posterior
  with capture, q is its eta-marginal posterior (``pln_ref.eta_marginal``, the posterior of
  ``LaplaceResult.with_eta_marginal(counts)``: eta integrated by quadrature, x by Laplace at each
  node), computed per block from the observed counts; any other posterior (VAE, eta-marginal, no
  capture) is drawn as is. Measured (``validation/benchmarks/ppc_report.py``, 200 genes x 2000
  simulated cells): >= 96% of every statistic covered at the fitted and at the true globals.
  Known failure (real scRNA, k = 20): a zero count of a gene with a huge fitted d_g (97% zeros, d_g
  ~ 35) gives x | eta a Gaussian upper tail the exact posterior does not have, and the replicated
  totals come out too high (67% of library-size order statistics covered, 99% without the two such
  genes; ``validation/benchmarks/results/ppc/README.md``). ``skew=True`` halves that excess;
  ``"joint_is"`` removes it.
- ``"joint_gaussian"``: joint draws from the Gaussian Laplace posterior itself (eta from its
  truncated normal, then x | eta ~ N(x_hat + b (eta - eta_hat), A^{-1})); under-covers, below.
- ``"joint_is"``: as ``"joint_gaussian"`` (the proposal is the Gaussian Laplace posterior, not the
  eta-marginal one), with the draws resampled by their PSIS importance weights
  p(u, x, eta) / q(x, eta) (``pln_ref.importance``; ``n_proposals`` draws per cell), i.e. draws
  from a corrected posterior where the Gaussian (Laplace) approximation is off.

Why ``"joint_gaussian"`` under-covers on data simulated from the model itself (measured): the
replicate carries the right uncertainties (posterior draw + Poisson noise; with the exact
posterior a posterior predictive check is conservative, and ``"joint_is"`` covers 93-100% of every
statistic), but the Laplace posterior is centred at the *joint* mode of (x, eta), and the eta
marginal of the exact posterior sits higher: integrating x out adds the log-determinant (Occam)
term -1/2 log det A(eta), whose slope 1/2 sum_g diag(A^{-1})_g lambda_g bbar_g shifts E[eta | u]
by ~+0.1 (IS: 0.106 at G=200, about one posterior SD of eta; the first-order term predicts 0.104,
correlation 0.95 across cells). The Laplace q therefore replicates E e^{x - eta} ~10% too high
(G=50, N=1000: every gene's replicated mean is above the observed, 20% coverage of gene means),
and statistics averaged over many cells resolve a bias far smaller than that. Shifting eta by the
first-order term alone halves the bias (10% -> 4%); the importance correction removes it.
- ``"fixed_eta"``: x from the posterior with eta held at its point estimate (the seed's
  "Laplace-uncertainty" mode). Kept for comparison: with the counts pinning x - eta, a draw of x
  around its mode with eta fixed inflates E e^{x - eta} (a Jensen bias: +2.2% in total counts
  on real counts), so its replicates are biased upwards.
- ``"predictive"``: the fitted model's predictive for *new* cells at the observed anchors:
  eta_c ~ TruncN(log M0 - log L_c, sigma_M^2, low=0) with cell c's anchor, x ~ N(mu, Sigma),
  u_rep ~ Poisson(e^{x - eta}). Does not use the cells' posteriors at all: it checks whether the
  fitted globals generate data like the observed (the strictest check, no double use of data).

Statistics (``CHECKS``, each with one line saying what it tests): per-gene mean, variance and
zero fraction, and the sorted total counts of the cells (library-size distribution). Per-gene
posterior predictive p-values p = P(T_rep > T_obs) + P(T_rep = T_obs)/2 and the share of genes
whose observed statistic lies in the central 95% interval of its replicates summarise a check;
``PPCSummary.findings()`` states the systematic deviations in plain words (e.g. "95% of genes show
more zeros than replicated"). Everything is streamed over blocks of cells (memory
O(n_samples (G + N) + block)), for any result of the protocol (``pln_ref.protocol``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .counts import CountMatrix
from .protocol import CellPosterior

__all__ = ["posterior_predictive", "PPCSummary", "ppc_summary", "plot_ppc", "plot_zero_fraction",
           "PPC_MODES", "CHECKS"]

PPC_MODES = ("map", "joint", "joint_gaussian", "joint_is", "fixed_eta", "predictive")
_ALIASES = {"posterior": "joint", "laplace": "joint"}
_BLOCK_ENTRIES = 1 << 21

#: one line per statistic saying what it tests
CHECKS = {
    "mean": "per-gene mean count: does the model reproduce each gene's expression level?",
    "var": "per-gene variance: does it reproduce the spread (over-dispersion) of each gene across cells?",
    "zero_frac": "per-gene zero fraction: does it produce as many zeros as observed (no excess zeros)?",
    "total_counts": "sorted total counts per cell: does it reproduce the library-size distribution?",
}
_NOUNS = {"mean": ("higher means", "lower means"), "var": ("more variance", "less variance"),
          "zero_frac": ("more zeros", "fewer zeros")}


def _posterior(result) -> CellPosterior:
    """The per-cell posterior of a fitted result (``result.posterior``) or the posterior itself."""
    post = result if isinstance(result, CellPosterior) else getattr(result, "posterior", None)
    if not isinstance(post, CellPosterior):
        raise ValueError(f"expected a pln_ref result or a per-cell posterior, got {type(result).__name__}")
    return post


def _mode(mode: str) -> str:
    m = _ALIASES.get(mode, mode)
    if m not in PPC_MODES:
        raise ValueError(f"mode must be one of {', '.join(PPC_MODES)} (or posterior/laplace = joint), "
                         f"got {mode!r}")
    return m


def _log_anchor(result, post, counts) -> np.ndarray | None:
    """The anchors log L_c the fit used (stored on the result / posterior), else the total counts."""
    if post.params.capture is None:
        return None
    for obj in (post, result):
        la = getattr(obj, "log_anchor", None)
        if la is not None:
            return np.asarray(la, dtype=float)
    if counts is None:
        raise ValueError("this mode needs the cells' anchors: pass the observed counts (counts=...)")
    from .anchor import resolve_log_anchor

    return resolve_log_anchor(counts)


def _needs_eta_marginal(post) -> bool:
    """True for a Gaussian Laplace posterior with capture: mode "joint" then draws from its
    eta-marginal posterior (``pln_ref.eta_marginal``) instead."""
    from .laplace import CellPosteriors

    return isinstance(post, CellPosteriors) and post.params.capture is not None


def _eta_marginal_block(q, u: np.ndarray, la, skew: bool = False):
    """The eta-marginal posterior of a block of cells whose posterior ``q`` is Gaussian Laplace
    (the same as ``LaplaceResult.with_eta_marginal(counts).posterior`` on those cells; ``skew``:
    ``eta_marginal(..., skew=True)``, x | eta with the Laplace third cumulants); any other
    posterior (VAE, already eta-marginal, no capture) unchanged."""
    if not _needs_eta_marginal(q):
        return q
    from .eta_marginal import eta_marginal

    return eta_marginal(u, q, la, skew=skew)


def _block_log_rates(mode, post, idx, ub, la, rng, R, n_proposals, skew: bool = False) -> np.ndarray:
    """log rates x - eta of R replicates for the cells ``idx`` (consecutive), whose dense counts
    are ``ub`` (None where the mode does not read them): (R, len(idx), G)."""
    p = post.params
    n = idx.size
    if mode == "map":
        z = post.x_map[idx] - post.eta_map[idx][:, None]
        return np.broadcast_to(z, (R, n, p.G))
    if mode == "predictive":
        from . import truncnorm
        from .lowrank import LowRankCov

        x = p.mu + LowRankCov.from_params(p).sample(rng, R * n).reshape(R, n, p.G)
        if p.capture is None:
            return x
        eta = truncnorm.sample(p.capture.prior_mean(la[idx]), p.capture.sigma_M, rng, size=(R, n))
        return x - eta[..., None]
    q = post.subset(idx)
    if mode == "joint":
        q = _eta_marginal_block(q, ub, None if la is None else la[idx], skew)
    if mode in ("joint", "joint_gaussian", "fixed_eta"):
        mode = "joint" if mode == "joint_gaussian" else mode
        x, eta = q.sample(rng, R, eta="free" if mode == "joint" else "map")
        return x - eta[..., None]
    # joint_is: PSIS weights of n_proposals joint draws, R draws resampled per cell
    from .importance import exact_log_joint_draws, psis

    x, eta = q.sample(rng, n_proposals)
    lr = exact_log_joint_draws(ub, x, eta, p, None if la is None else la[idx]) - q.logpdf(x, eta)
    w = np.exp(psis(lr).lw)  # (M, n), normalised per cell
    cdf = np.cumsum(w, axis=0)
    target = (cdf[-1][None, :] * rng.random((R, n)))[..., None]  # (R, n, 1)
    pick = np.minimum((target > cdf.T[None]).sum(-1), n_proposals - 1)  # inverse-CDF resampling
    cols = np.arange(n)[None, :]
    return x[pick, cols] - eta[pick, cols][..., None]


def _check_skew(skew, mode: str) -> bool:
    """``skew`` as a bool; True only with mode "joint" (the only mode that builds an eta-marginal
    posterior)."""
    if not isinstance(skew, (bool, np.bool_)):
        raise ValueError(f"skew must be True or False, got {skew!r}")
    if skew and mode != "joint":
        raise ValueError(f'skew=True applies to mode "joint" only (its eta-marginal posterior), not "{mode}"')
    return bool(skew)


def _replicate_blocks(result, counts, n_samples, mode, seed, n_proposals, skew: bool = False):
    """Yield (idx, u_rep (R, n, G)) over blocks of cells; ``counts`` (a ``CountMatrix`` or anything
    it accepts, or None for the modes that do not read them) are read one block at a time."""
    post = _posterior(result)
    mode = _mode(mode)
    skew = _check_skew(skew, mode)
    u = None if counts is None else CountMatrix(counts)
    if u is not None and u.shape != post.x_map.shape:
        raise ValueError(f"counts have shape {u.shape} but the fit has {post.x_map.shape}")
    rng = np.random.default_rng(seed)
    la = _log_anchor(result, post, u) if mode in ("predictive", "joint_is", "joint") else None
    reads = mode == "joint_is" or (mode == "joint" and _needs_eta_marginal(post))
    N, G = post.x_map.shape
    per_cell = max(n_samples, n_proposals if mode == "joint_is" else 0) * G
    block = max(1, _BLOCK_ENTRIES // max(per_cell, 1))
    for lo in range(0, N, block):
        hi = min(N, lo + block)
        idx = np.arange(lo, hi)
        ub = u.block(lo, hi) if reads else None
        z = _block_log_rates(mode, post, idx, ub, la, rng, n_samples, n_proposals, skew)
        with np.errstate(over="ignore"):
            yield idx, rng.poisson(np.exp(z))


def posterior_predictive(result, n_samples: int, *, mode: str = "joint", seed=0, counts=None,
                         n_proposals: int = 200, skew: bool = False) -> np.ndarray:
    """Replicated counts (n_samples, N, G) in the given mode (module docstring); mode "joint_is"
    needs the observed ``counts`` (its importance weights), and so does mode "joint" on a Gaussian
    Laplace posterior with capture (its eta-marginal posterior is computed from them). ``skew``
    (mode "joint" only): that eta-marginal posterior with ``skew=True``, x | eta drawn as
    x = m + e - 1/6 A^{-1} (lambda o (e^2 - diag A^{-1})), e ~ N(0, A^{-1}) (``pln_ref.eta_marginal``,
    "Skew"); no effect on a posterior that is not Gaussian Laplace with capture."""
    post = _posterior(result)
    if counts is None:
        m = _mode(mode)
        if m == "joint_is" or (m == "joint" and _needs_eta_marginal(post)):
            raise ValueError(f'mode "{m}" needs the observed counts (counts=...)'
                             + ('; mode "joint_gaussian" draws without them' if m == "joint" else ""))
    out = np.empty((n_samples,) + post.x_map.shape, dtype=np.int64)
    for idx, rep in _replicate_blocks(result, counts, n_samples, mode, seed, n_proposals, skew):
        out[:, idx] = rep
    return out


def _add_rows(acc: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """acc + rows[0] + rows[1] + ... in this order (NumPy's axis-0 reduction adds the rows of a
    C-contiguous array one after the other), so sums by blocks of cells round exactly as the sum
    over all cells at once."""
    return np.add.reduce(np.concatenate([acc[None], rows]), axis=0)


def _stats(u) -> dict[str, np.ndarray]:
    """Per-gene mean, variance (ddof=1) and zero fraction and the sorted total counts of the
    counts ``u`` (a ``CountMatrix`` or anything it accepts), by blocks of cells (two passes; the
    same rounding as over all cells at once)."""
    u = CountMatrix(u)
    N, G = u.shape
    s1, zeros = np.zeros(G), np.zeros(G, dtype=np.int64)
    for _, ub in u.blocks():
        s1 = _add_rows(s1, ub)
        zeros += np.count_nonzero(ub == 0, axis=0)
    mean = s1 / N
    ss = np.zeros(G)
    for _, ub in u.blocks():
        ub -= mean
        np.multiply(ub, ub, out=ub)
        ss = _add_rows(ss, ub)
    return {"mean": mean, "var": ss / max(N - 1, 0), "zero_frac": zeros / N,
            "total_counts": np.sort(u.total_counts())}


@dataclass
class PPCSummary:
    """Observed statistics, replicated statistics (leading axis = replicate), p-values and the
    share of genes (or library-size order statistics) inside the central 95% interval."""

    mode: str
    observed: dict
    replicated: dict
    p_values: dict
    coverage95: dict

    def findings(self) -> dict[str, str]:
        """One plain-language sentence per statistic on the direction and size of the deviations."""
        out = {}
        for k in ("mean", "var", "zero_frac"):
            o, r = self.observed[k], self.replicated[k]
            med = np.median(r, axis=0)
            lo, hi = np.quantile(r, [0.025, 0.975], axis=0)
            more, fewer = _NOUNS[k]
            share_more = float(np.mean(o > med))
            ok = med > 0
            rel = float(np.median((o[ok] - med[ok]) / med[ok])) if ok.any() else float("nan")
            above, below = float(np.mean(o > hi)), float(np.mean(o < lo))
            word, share = (more, share_more) if share_more >= 0.5 else (fewer, 1.0 - share_more)
            out[k] = (f"{100 * share:.0f}% of genes show {word} than replicated (median relative "
                      f"difference {100 * rel:+.1f}%); {100 * above:.0f}% lie above and {100 * below:.0f}% "
                      f"below their 95% interval")
        o = self.observed["total_counts"]
        r = self.replicated["total_counts"]
        om, rm = float(np.median(o)), float(np.median(r))
        lo, hi = np.quantile(r, [0.025, 0.975], axis=0)
        out["total_counts"] = (f"median total counts {om:.4g} observed vs {rm:.4g} replicated "
                               f"({100 * (om / rm - 1):+.1f}%); {100 * np.mean(o > hi):.0f}% of the "
                               f"library-size order statistics lie above and {100 * np.mean(o < lo):.0f}% "
                               "below their 95% band")
        return out

    def table(self) -> dict:
        out = {"mode": self.mode}
        find = self.findings()
        for k in ("mean", "var", "zero_frac"):
            p = self.p_values[k]
            out[k] = {
                "tests": CHECKS[k],
                "share_in_95pct_interval": float(self.coverage95[k]),
                "share_p_below_0.025_or_above_0.975": float(np.mean((p < 0.025) | (p > 0.975))),
                "finding": find[k],
            }
        out["total_counts"] = {
            "tests": CHECKS["total_counts"],
            "share_of_order_statistics_in_95pct_band": float(self.coverage95["total_counts"]),
            "observed_median": float(np.median(self.observed["total_counts"])),
            "replicated_median": float(np.median(self.replicated["total_counts"])),
            "finding": find["total_counts"],
        }
        return out

    def report(self) -> str:
        """Each check on two lines: what it tests, then its coverage and finding."""
        find = self.findings()
        lines = [f"Posterior predictive checks (mode {self.mode!r}, {len(self.replicated['mean'])} replicates):"]
        for k, what in CHECKS.items():
            lines.append(f"  {k}: tests {what}")
            unit = "genes" if k != "total_counts" else "library-size order statistics"
            lines.append(f"    {100 * self.coverage95[k]:.1f}% of {unit} inside their 95% interval; {find[k]}")
        return "\n".join(lines)


def ppc_summary(counts, result, *, n_samples: int = 100, mode: str = "joint", seed=0,
                n_proposals: int = 200, skew: bool = False) -> PPCSummary:
    """Compare the data with ``n_samples`` replicates in ``mode`` (module docstring), streamed over
    blocks of cells (``counts``: array, scipy.sparse matrix, AnnData or ``CountMatrix``, read one
    block of cells at a time, CSR stays CSR). ``n_proposals``: importance draws per cell of mode
    "joint_is"; ``skew``: mode "joint" with the skew-corrected x | eta (``posterior_predictive``)."""
    mode = _mode(mode)
    u = CountMatrix(counts)
    N, G = u.shape
    R = int(n_samples)
    s1, s2, nz = np.zeros((R, G)), np.zeros((R, G)), np.zeros((R, G))
    tot = np.zeros((R, N))
    for idx, rep in _replicate_blocks(result, u, R, mode, seed, n_proposals, skew):
        rep = rep.astype(float)
        s1 += rep.sum(axis=1)
        s2 += (rep**2).sum(axis=1)
        nz += (rep == 0).sum(axis=1)
        tot[:, idx] = rep.sum(axis=2)
    reps = {"mean": s1 / N, "var": (s2 - s1**2 / N) / (N - 1), "zero_frac": nz / N,
            "total_counts": np.sort(tot, axis=1)}
    obs = _stats(u)
    pv, cov = {}, {}
    for k in ("mean", "var", "zero_frac", "total_counts"):
        r, o = reps[k], obs[k]
        pv[k] = np.mean(r > o, axis=0) + 0.5 * np.mean(r == o, axis=0)
        lo, hi = np.quantile(r, [0.025, 0.975], axis=0)
        cov[k] = float(np.mean((o >= lo) & (o <= hi)))
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
    ax.set_title(f"{100 * summary.coverage95['total_counts']:.0f}% of order statistics inside band")
    ax.legend()
    fig.suptitle(f"Posterior predictive check ({summary.mode} mode)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def plot_zero_fraction(summary: PPCSummary, path=None):
    """The standard scRNA diagnostic: per-gene zero fraction vs mean count, observed (black)
    against replicated (median and 95% interval of the replicates, blue), with the Poisson curve
    e^{-mean} (no variation of the rate between cells) for reference."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    om, oz = summary.observed["mean"], summary.observed["zero_frac"]
    rm, rz = summary.replicated["mean"], summary.replicated["zero_frac"]
    mm, mz = np.median(rm, axis=0), np.median(rz, axis=0)
    lo, hi = np.quantile(rz, [0.025, 0.975], axis=0)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.errorbar(mm, mz, yerr=[mz - lo, hi - mz], fmt="o", ms=3, color="tab:blue", alpha=0.5,
                elinewidth=0.7, label="replicated (median, 95%)")
    ax.plot(om, oz, "k.", ms=4, label="observed")
    grid = np.geomspace(max(min(om.min(), mm.min()), 1e-3), max(om.max(), mm.max()), 200)
    ax.plot(grid, np.exp(-grid), "r--", lw=1, label="Poisson e^{-mean}")
    ax.set_xscale("log")
    ax.set_xlabel("gene mean count")
    ax.set_ylabel("zero fraction")
    ax.set_title(f"Zero fraction vs mean ({summary.mode} mode)\n{summary.findings()['zero_frac'].split(';')[0]}",
                 fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
