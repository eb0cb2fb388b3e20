"""Stopping rules of the outer optimisation that certify convergence, and the report of which rule
stopped a fit.

For the full-batch L-BFGS (``lbfgs.py``) on F(z) = -L(z) (L the mean Laplace evidence per cell, z
the unconstrained globals), near the optimum F is close to its quadratic model and the evidence
gap L* - L(z) equals 1/2 g^T (nabla^2 F)^{-1} g. Two estimates of it, both free of any step size:

    gap_qn   = 1/2 g^T H g       (H the L-BFGS inverse-Hessian approximation: the quasi-Newton
                                  decrement of the step the optimiser is about to take)
    gap_tail = G1 r / (1 - r)    (the geometric tail of the gains gain_k = L(z_k) - L(z_{k-1}):
                                  G1 the sum of the last m gains, G0 of the m before, r = G1 / G0
                                  (capped at 0.999), m = min(10, n/2); the remaining sum of a
                                  geometric sequence of windows. Summing windows averages out the
                                  step-to-step noise of the gains, so a fit still creeping linearly
                                  along a badly conditioned direction (r near 1) is not certified
                                  and a converging one is certified early. Measured on real
                                  2000 x 1000 counts, k = 10: gap_tail between 0.6 and 4 times
                                  the true gap from 1e-2 down to 1e-6 nats/cell, while gap_qn was
                                  10-50 times too small; with the previous estimate (the largest of
                                  the last two ratios of single gains) the fit ran 28% of its steps
                                  after it was already within 1e-3)

The **certificate** stops the fit when max(gap_qn, gap_tail, gain_k) <= ``gap_tol`` (default
``constants.GAP_TOL`` = 1e-4 nats/cell, a factor 10 below the 1e-3 nats/cell the project asks for)
on two consecutive steps. The factor covers the measured underestimation of the estimate: on real
2000 x 2000 counts, k = 10 (about 360 genes with d at its floor), the fit's gains fell geometrically
for 10 steps while the remaining gap was 5-6.5 times their tail sum (2.3e-4 estimated; 1.2e-3 below
a 165-evaluation fit, about 1.5e-3 below the optimum extrapolated from its gains), so 3e-4 stopped it
outside 1e-3; with 1e-4 it stopped 4.4e-4 below the 165-evaluation fit. The benchmark cases took
1-4 more steps at 1e-4 than at 3e-4. The certificate needs at least 2 ``min_window`` (8) gains.
The **gradient** rule stops when ||g||_inf <= ``grad_tol``. The **step cap** stops with a
``ConvergenceWarning``. "stalled": the line search found no decrease (the objective is flat to
round-off along the search direction); the message then reports the last gap estimate, and a
``ConvergenceWarning`` is raised when that estimate is above ``gap_tol`` (the fit is then not
certified: measured on real 2000 x 200 counts at k = 30 and 40, 1,600 cells, three of five and two
of three fits stalled with estimates of 1.1e-4 to 4.4e-3 nats/cell).
**Sampled phases** (``sampled.py``, L-BFGS on a nested random sample of n of the N cells): a phase
is stopped by the same certificate with the tolerance raised to the sample's statistical resolution,

    tol_n = max(gap_tol, fraction P / (2 n))      (``resolution_tol``; P = G (k + 2) globals)

P / (2 n) is the expected excess loss of the optimum of n cells on the population (the asymptotic
excess risk of an M-estimator with P parameters): optimising a sample beyond a fraction of it is
spent on its sampling noise, which the next, doubled sample moves away from anyway (its own optimum
differs by about P / (4 n)). ``RESOLUTION_FRACTION`` = 0.1 (it was 0.01): with the
samples' L-BFGS pairs not carried into the last phase (``sampled``), phases stopped at 1% of the
resolution cost more than they saved. ``bench_minibatch.py``'s counts, k = 5, fraction
0.01 -> 0.1, whole sampled fit: 20,000 x 2,000 (n0 = 1000) 194.9 -> 136.8 s CPU (full batch
128.0 s), 10,000 x 1,000 (n0 = 500) 52.1 -> 32.4 s (33.3 s), 20,000 x 500 (n0 = 1000) 34.8 ->
33.0 s (37.4 s); at 0.1 every sampled phase stops at its minimum of 5-6 steps, and 0.3 gave the
same phases. Reported as rule "resolution" in the phase log. The whole data set's phase uses the
certificate with ``gap_tol``.
Adam (``adam.py``) keeps its patience rule (no gain > rtol (1 + |L|) in ``patience`` steps),
reported as "patience".
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from ..constants import GAP_TOL
from ..exceptions import ConvergenceWarning

__all__ = ["StopRule", "quasi_newton_gap", "warn_uncertified", "resolution_tol", "RESOLUTION_FRACTION"]


def quasi_newton_gap(g: np.ndarray, p: np.ndarray) -> float:
    """1/2 g^T H g for the descent direction p = -H g of F = -L: the quasi-Newton estimate of the
    evidence gap (nats per cell when L is per cell)."""
    return 0.5 * float(-np.dot(g, p))


@dataclass
class StopRule:
    """The certified stopping rule of the module docstring.

    gap_tol : bound on the estimated evidence gap (nats/cell); grad_tol : gradient infinity norm;
    n_confirm : consecutive steps the certificate must hold."""

    gap_tol: float = GAP_TOL
    grad_tol: float = 1e-9
    n_confirm: int = 2
    window: int = 10
    min_window: int = 4
    _streak: int = 0

    def reset(self, streak: int = 0) -> None:
        """Set the count of consecutive certified checks (0: start over)."""
        self._streak = int(streak)

    def estimate(self, gap_qn: float, gains) -> float:
        """max(gap_qn, gap_tail, last gain) (module docstring); inf with fewer than
        2 ``min_window`` gains."""
        return max(gap_qn, self.tail(gains))

    def tail(self, gains) -> float:
        """gap_tail = max(G1 r / (1 - r), last gain): G1 the sum of the last m gains, G0 of the m
        before, r = min(G1 / G0, 0.999), m = min(window, n // 2); inf with n < 2 min_window."""
        g = np.maximum(np.asarray(gains[-2 * self.window:], dtype=float), 0.0)
        n = len(g)
        if n < 2 * self.min_window or not np.all(np.isfinite(g)):
            return math.inf
        m = min(self.window, n // 2)
        g1, g0 = float(g[n - m:].sum()), float(g[n - 2 * m:n - m].sum())
        if g1 == 0.0:
            return 0.0
        r = min(g1 / g0, 0.999) if g0 > 0 else 0.999
        return max(g1 * r / (1.0 - r), float(g[-1]))

    def check(self, gap_qn: float, gains, grad_inf: float) -> tuple[str, str] | None:
        """(rule, message) when the fit should stop, else None; call once per step with the
        quasi-Newton gap and the list of gains of the steps so far."""
        if grad_inf <= self.grad_tol:
            return "gradient", f"gradient: ||g||_inf = {grad_inf:.2e} <= {self.grad_tol:g}"
        est = self.estimate(gap_qn, gains)
        self._streak = self._streak + 1 if est <= self.gap_tol else 0
        if self._streak >= self.n_confirm:
            return "certificate", (f"certificate: estimated evidence gap {est:.1e} <= {self.gap_tol:g} "
                                   f"nats/cell on {self.n_confirm} consecutive steps")
        return None


def warn_uncertified(message: str) -> None:
    """ConvergenceWarning for a fit stopped before its certificate: by its step or epoch cap, or
    stalled with its last gap estimate above ``gap_tol``."""
    warnings.warn(message, ConvergenceWarning, stacklevel=3)


#: fraction of a sample's statistical resolution P / (2 n) at which a sampled phase stops
RESOLUTION_FRACTION = 0.1


def resolution_tol(n_cells: int, n_params: int, gap_tol: float,
                   fraction: float = RESOLUTION_FRACTION) -> float:
    """tol_n = max(gap_tol, fraction P / (2 n)): the stopping tolerance (nats/cell) of an L-BFGS phase
    on a sample of n cells with P globals (module docstring, "Sampled phases")."""
    return max(float(gap_tol), float(fraction) * n_params / (2.0 * n_cells))
