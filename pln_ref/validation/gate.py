"""The NUTS ground-truth gate: a fit counts as ground truth only if it passes every check.

Checks (Vehtari et al. 2021 rank-normalised diagnostics, arviz 0.23):

    max over quantities of rank-normalised split R-hat  <  1.01
    min over quantities of bulk ESS                     >= 400
    min over quantities of tail ESS                     >= 400
    number of divergent transitions                     == 0
    E-BFMI of every chain                               >  0.3

A fit that fails is reported with the reasons and is never silently compared: comparison
functions call :func:`require_gate`, which raises :class:`GateFailedError` unless the caller
forces it for diagnostics (and then the result is labelled ``forced`` and a
:class:`ForcedComparisonWarning` is issued).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = [
    "GateThresholds",
    "GateResult",
    "GateFailedError",
    "ForcedComparisonWarning",
    "check_gate",
    "require_gate",
    "combine_gates",
]


@dataclass(frozen=True)
class GateThresholds:
    """Gate thresholds; the defaults are the project's contract and must not be loosened."""

    rhat_max: float = 1.01
    ess_bulk_min: float = 400.0
    ess_tail_min: float = 400.0
    max_divergences: int = 0
    bfmi_min: float = 0.3


@dataclass
class GateResult:
    """Outcome of :func:`check_gate`.

    passed : bool, True only if every check passed.
    reasons : list of human-readable failure reasons (empty if passed).
    table : list of per-variable rows (dicts: var, n, rhat_max, ess_bulk_min, ess_tail_min,
        worst_rhat_index, ...) for reports.
    divergences, n_draws, n_chains, bfmi (per chain), rhat_max, ess_bulk_min, ess_tail_min:
        the overall figures.
    """

    passed: bool
    reasons: list[str]
    table: list[dict]
    divergences: int = 0
    n_chains: int = 0
    n_draws: int = 0
    bfmi: list[float] = field(default_factory=list)
    rhat_max: float = float("nan")
    ess_bulk_min: float = float("nan")
    ess_tail_min: float = float("nan")

    def summary(self) -> dict:
        """JSON-ready summary."""
        return {
            "passed": bool(self.passed),
            "reasons": list(self.reasons),
            "divergences": int(self.divergences),
            "n_chains": int(self.n_chains),
            "n_draws": int(self.n_draws),
            "bfmi": [float(b) for b in self.bfmi],
            "rhat_max": float(self.rhat_max),
            "ess_bulk_min": float(self.ess_bulk_min),
            "ess_tail_min": float(self.ess_tail_min),
        }

    def __str__(self) -> str:  # pragma: no cover - formatting
        head = "PASSED" if self.passed else "FAILED"
        s = (f"gate {head}: R-hat max {self.rhat_max:.4f}, bulk ESS min {self.ess_bulk_min:.0f}, "
             f"tail ESS min {self.ess_tail_min:.0f}, divergences {self.divergences}, "
             f"E-BFMI {', '.join(f'{b:.2f}' for b in self.bfmi)}")
        if self.reasons:
            s += "\n  - " + "\n  - ".join(self.reasons)
        return s


class GateFailedError(RuntimeError):
    """Raised when a failed NUTS fit would be used as ground truth without ``force=True``."""


class ForcedComparisonWarning(UserWarning):
    """Issued when a comparison is forced against a NUTS fit that failed (or skipped) its gate."""


def _worst(values: np.ndarray, how: str) -> tuple[float, tuple]:
    flat = np.asarray(values, dtype=float)
    if flat.size == 0:
        return float("nan"), ()
    if np.any(~np.isfinite(flat)):
        idx = np.unravel_index(int(np.argmax(~np.isfinite(flat))), flat.shape) if flat.ndim else ()
        return float("nan"), tuple(int(i) for i in idx)
    j = int(np.argmax(flat) if how == "max" else np.argmin(flat))
    idx = np.unravel_index(j, flat.shape) if flat.ndim else ()
    return float(flat.reshape(-1)[j]), tuple(int(i) for i in idx)


def _label(var: str, idx: tuple) -> str:
    """``y`` for a scalar parameter, ``x[2, 0]`` for an element of an array parameter."""
    return f"{var}[{', '.join(str(i) for i in idx)}]" if idx else var


def _posterior_checks(post, var_names: list[str], thresholds: GateThresholds, reasons: list[str]):
    """Rank-normalised R-hat and bulk / tail ESS of every variable: the per-variable table and
    the overall worst figures (NaN if any is NaN); failures are appended to ``reasons``."""
    import arviz as az

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rhat = az.rhat(post, var_names=var_names, method="rank")
        ess_b = az.ess(post, var_names=var_names, method="bulk")
        ess_t = az.ess(post, var_names=var_names, method="tail")
    table: list[dict] = []
    rmax_all, eb_all, et_all = -np.inf, np.inf, np.inf
    for v in var_names:
        r, ri = _worst(rhat[v].values, "max")
        b, bi = _worst(ess_b[v].values, "min")
        t, ti = _worst(ess_t[v].values, "min")
        row = {"var": v, "n": int(np.size(rhat[v].values)), "rhat_max": r, "rhat_argmax": ri,
               "ess_bulk_min": b, "ess_bulk_argmin": bi, "ess_tail_min": t, "ess_tail_argmin": ti}
        table.append(row)
        if not np.isfinite(r) or r >= thresholds.rhat_max:
            reasons.append(f"R-hat of {_label(v, ri)} = {r:.4f} (needs < {thresholds.rhat_max})")
        if not np.isfinite(b) or b < thresholds.ess_bulk_min:
            reasons.append(f"bulk ESS of {_label(v, bi)} = {b:.1f} (needs >= {thresholds.ess_bulk_min:.0f})")
        if not np.isfinite(t) or t < thresholds.ess_tail_min:
            reasons.append(f"tail ESS of {_label(v, ti)} = {t:.1f} (needs >= {thresholds.ess_tail_min:.0f})")
        # a NaN anywhere makes the overall figure NaN (cannot be certified)
        rmax_all = np.nan if np.isnan(r) else max(rmax_all, r)
        eb_all = np.nan if np.isnan(b) else min(eb_all, b)
        et_all = np.nan if np.isnan(t) else min(et_all, t)
    return table, float(rmax_all), float(eb_all), float(et_all)


def _sampler_checks(idata, n_chains: int, n_draws: int, thresholds: GateThresholds,
                    reasons: list[str]) -> tuple[int, list[float]]:
    """Divergent transitions and E-BFMI per chain from ``sample_stats``; failures (and missing
    statistics) are appended to ``reasons``."""
    import arviz as az

    divergences = 0
    bfmi: list[float] = []
    ss = getattr(idata, "sample_stats", None)
    if ss is None:
        reasons.append("no sample_stats group: divergences and E-BFMI cannot be checked")
        return divergences, bfmi
    if "diverging" in ss:
        divergences = int(np.asarray(ss["diverging"].values).astype(bool).sum())
        if divergences > thresholds.max_divergences:
            n_tot = n_chains * n_draws
            reasons.append(f"{divergences} divergent transitions of {n_tot} "
                           f"({100 * divergences / n_tot:.2f}%) (needs <= {thresholds.max_divergences})")
    else:
        reasons.append("sample_stats has no 'diverging' (CmdStan name 'divergent' not renamed?)")
    if "energy" in ss:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bfmi = [float(b) for b in np.atleast_1d(az.bfmi(idata))]
        for c, b in enumerate(bfmi):
            if not np.isfinite(b) or b <= thresholds.bfmi_min:
                reasons.append(f"E-BFMI of chain {c} = {b:.3f} (needs > {thresholds.bfmi_min})")
    else:
        reasons.append("sample_stats has no 'energy': E-BFMI cannot be checked")
    return divergences, bfmi


def check_gate(
    idata,
    var_names: Sequence[str] | None = None,
    thresholds: GateThresholds = GateThresholds(),
) -> GateResult:
    """Apply the ground-truth gate to a NUTS fit (``arviz.InferenceData``).

    R-hat: arviz.rhat(method="rank") (rank-normalised split R-hat, max over every element of
    every variable in ``var_names``); ESS: arviz.ess(method="bulk"/"tail") (min over elements);
    divergences: sum of ``sample_stats.diverging``; E-BFMI: arviz.bfmi per chain.
    A NaN diagnostic (e.g. a constant quantity) counts as a failure: it cannot be certified.
    Missing ``sample_stats`` (no divergence / energy information) is a failure too.
    """
    if not hasattr(idata, "posterior"):
        raise ValueError("check_gate needs an InferenceData with a posterior group")
    post = idata.posterior
    if var_names is None:
        var_names = list(post.data_vars)
    else:
        var_names = list(var_names)
        missing = [v for v in var_names if v not in post.data_vars]
        if missing:
            raise ValueError(f"variables not in the posterior: {missing}")
    if not var_names:
        raise ValueError("no posterior variables to check")
    n_chains = int(post.sizes["chain"])
    n_draws = int(post.sizes["draw"])
    reasons: list[str] = []
    if n_chains < 2:
        reasons.append(f"only {n_chains} chain: rank-normalised split R-hat needs >= 2 chains "
                       "to detect non-convergence between chains")
    table, rhat_max, ess_bulk_min, ess_tail_min = _posterior_checks(post, var_names, thresholds, reasons)
    divergences, bfmi = _sampler_checks(idata, n_chains, n_draws, thresholds, reasons)
    return GateResult(
        passed=not reasons, reasons=reasons, table=table, divergences=divergences,
        n_chains=n_chains, n_draws=n_draws, bfmi=bfmi,
        rhat_max=rhat_max, ess_bulk_min=ess_bulk_min, ess_tail_min=ess_tail_min,
    )


def require_gate(gate: GateResult | None, *, force: bool = False, what: str = "NUTS fit") -> bool:
    """Refuse to use a failed (or unchecked) fit as ground truth.

    Returns True if the comparison is *forced* (the gate failed or was not run but
    ``force=True``): a :class:`ForcedComparisonWarning` is issued and callers must label their
    output accordingly. Raises GateFailedError otherwise.
    """
    if gate is not None and gate.passed:
        return False
    if force:
        why = "was not gated" if gate is None else "failed its gate: " + "; ".join(gate.reasons)
        warnings.warn(f"{what}: FORCED comparison against NUTS that {why}; the result is a diagnostic, "
                      "not a validation", ForcedComparisonWarning, stacklevel=3)
        return True
    if gate is None:
        raise GateFailedError(f"{what}: no gate result given; run check_gate first (or force=True "
                              "for a labelled diagnostic comparison)")
    raise GateFailedError(f"{what} failed the ground-truth gate and is not compared:\n  - "
                          + "\n  - ".join(gate.reasons))


def combine_gates(gates: list[GateResult]) -> GateResult:
    """One gate for several independent fits: passes iff all pass; reasons prefixed by fit id."""
    reasons = [f"fit {i}: {r}" for i, g in enumerate(gates) for r in g.reasons]
    return GateResult(
        passed=all(g.passed for g in gates), reasons=reasons, table=[],
        divergences=sum(g.divergences for g in gates),
        n_chains=min(g.n_chains for g in gates), n_draws=min(g.n_draws for g in gates),
        bfmi=[min(b for g in gates for b in g.bfmi)] if gates and all(g.bfmi for g in gates) else [],
        rhat_max=float(np.max([g.rhat_max for g in gates])),
        ess_bulk_min=float(np.min([g.ess_bulk_min for g in gates])),
        ess_tail_min=float(np.min([g.ess_tail_min for g in gates])),
    )
