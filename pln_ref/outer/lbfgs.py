"""Full-batch L-BFGS on the exact Laplace evidence: the certified default outer optimiser.

Coordinates: z = (mu, vec W, s) with d = D_FLOOR + s^2 (unconstrained; d >= D_FLOOR always, and
a gene whose likelihood rises as d -> 0 (a Heywood case) converges to s = 0, d = D_FLOOR). The
objective is F(z) = -L(theta(z)), L = mean_c l_c (``evaluate.Evaluator``), with the exact IFT
gradient dF/ds = -2 s dL/dd.

Iteration: p = -H g by the two-loop recursion over the last ``memory`` pairs (default 50; H0 =
gamma D, gamma = s^T y / y^T D y, D the preconditioner, by default the Fisher operator of
``precondition.FisherPreconditioner``). Measured with ``validation/benchmarks/bench_speed.py``
(steps to the certificate, diagonal D -> Fisher D): real 2000 x 1000 counts, k = 10: 172 -> 80;
real 2000 x 200, k = 5: 67 -> 29; simulated 2000 x 1000, k = 10: 82 -> 21. With the Fisher D's
per-gene noise from ``precondition.effective_rate`` and the certificate at 1e-4 instead of 3e-4
(``bench_speed_stop26.json``): 58, 40 and 15 steps, each fit closer to its reference (gaps
1.7e-5, 3.1e-6, 5.3e-4 nats/cell against 4.5e-4, 2.7e-4, 3.0e-4). With the Fisher D,
100 pairs instead of 50, a damping of 1e-2 instead of 1e-3 or a step cap of 3 or 10 instead of
1 did not reduce the steps on the real 2000 x 1000 counts (80, 80, 89, 95); at stop 32, 20 or 100
pairs gave the same 54 and 31 steps as 50 on the real cases, and a cap of 0.5 fewer
(``_cap_step``). A line search for
the weak Wolfe conditions (Armijo c1 = 1e-4, curvature c2 = 0.9; backtracking by safeguarded
quadratic interpolation, doubling while the slope is still steep at t = 1); the pair is kept when
s^T y > 1e-10 |s| |y|.

Newton tolerance schedule: the per-cell Newton runs to gtol_k = clip(0.1 ||g_k||_inf, final, 1e-3)
rounded down to a power of ten (``newton_schedule``), fixed within an iteration so that every
value the line search compares is solved to the same tolerance; the current iterate is
re-solved (warm, usually one Newton iteration) only when the tolerance tightens. Early steps,
where the outer gradient is large, need neither a tight MAP nor many Newton iterations. While
gtol_k is looser than the final tolerance, a cell also stops when its squared Newton decrement is
<= 1e-3 gtol_k (``newton_decrement_tol``; its evidence term is then within 5e-4 gtol_k of its
maximum): the gradient's infinity norm is set by the genes with the most counts (lambda = 1000
turns an x error of 1e-6 into a gradient of 1e-3), so it held about 95% of the cells for a second
iteration whose gain is below 1e-6 nats. Measured on the real 2000 x 1000 counts, k = 10 (the
same 80-82 steps, final evidence -1162.44987 vs -1162.44981): Newton iterations per cell and
evaluation 1.88 -> 1.50, fit CPU -5 to -12%. At the final tolerance the gradient criterion alone holds.

Stopping: ``stopping.StopRule`` (certificate on the evidence gap, gradient norm, step cap with a
``ConvergenceWarning``). The certificate is given on values at the final Newton tolerance only
(except in the sampled path's phases before the last, ``certify_final=False``).
When it holds at a looser one, the iterate is re-solved at the final tolerance and the certificate
needs one more check there (the quasi-Newton gap from the re-solved gradient, the same gains), not
two more steps; and once the gap estimate is within ``gap_tol``, a tightening of the schedule goes
straight to the final tolerance instead of through 1e-5. Measured (``bench_speed.py`` cases, fits
to the certificate): one or two evaluations fewer per fit (real 2000 x 1000: 61 -> 59; real
2000 x 200: 37 -> 36; simulated 2000 x 1000: 19 -> 17; 2000 x 200: 17 -> 15), among them the
costliest, a step at the final tolerance (about two Newton iterations per cell), with the same
gaps to the reference fits (3.5e-5, 1.5e-5, 8.6e-4, 9.0e-6 nats/cell).
"""

from __future__ import annotations

import math
import time

import numpy as np
from tqdm.auto import tqdm

from ..constants import D_FLOOR
from .evaluate import Evaluator
from .precondition import eta_prior_variance, preconditioner
from .state import LaplaceFitState
from .stopping import StopRule, quasi_newton_gap, warn_uncertified

__all__ = ["run_lbfgs", "newton_schedule", "newton_decrement_tol", "to_z", "from_z"]


def newton_schedule(grad_inf: float, final: float, loose: float = 1e-3) -> float:
    """gtol of the per-cell Newton for an outer gradient of infinity norm ``grad_inf``:
    10^floor(log10(clip(0.1 grad_inf, final, loose))), never below ``final``."""
    g = min(max(0.1 * grad_inf, final), loose)
    return max(final, 10.0 ** math.floor(math.log10(g)))


def newton_decrement_tol(gtol: float, final: float, rel: float = 1e-3) -> float | None:
    """Decrement tolerance of the per-cell Newton at schedule tolerance ``gtol``: rel * gtol while
    gtol > ``final`` (a cell stops at dec^2 <= rel gtol, ``laplace.newton_map``), None at the final
    tolerance (the gradient criterion alone)."""
    return None if gtol <= final else rel * gtol


def to_z(mu, W, d) -> np.ndarray:
    """(mu, W, d) -> z = (mu, vec W, s), s = sqrt(d - D_FLOOR) (d at the floor maps to s = 0)."""
    return np.concatenate([mu, W.ravel(), np.sqrt(np.maximum(d - D_FLOOR, 0.0))])


def from_z(z: np.ndarray, G: int, k: int):
    """z -> (mu, W, d) with d = D_FLOOR + s^2."""
    s = z[G + G * k:]
    return z[:G], z[G:G + G * k].reshape(G, k), D_FLOOR + s * s


def _two_loop(g, S, Y, D=None):
    """p = -H g, H the L-BFGS inverse-Hessian approximation from pairs (S, Y) (oldest first),
    with initial matrix H0 = gamma D (D a diagonal preconditioner given as an array, or a
    symmetric positive definite operator given as a callable, ``precondition``; default I;
    gamma = s^T y / y^T D y of the newest pair)."""
    q = g.copy()
    if D is None:
        D = np.ones_like(g)
    apply = D if callable(D) else (lambda v: D * v)
    if not S:
        return -apply(q)
    rho = [1.0 / float(np.dot(y, s)) for s, y in zip(S, Y)]
    alpha = []
    for s, y, r in zip(reversed(S), reversed(Y), reversed(rho)):
        a = r * float(np.dot(s, q))
        alpha.append(a)
        q -= a * y
    gamma = float(np.dot(S[-1], Y[-1]) / np.dot(Y[-1], apply(Y[-1])))
    q = gamma * apply(q)
    for (s, y, r), a in zip(zip(S, Y, rho), reversed(alpha)):
        b = r * float(np.dot(y, q))
        q += (a - b) * s
    return -q


def _cap_step(p: np.ndarray, cap: float, g: np.ndarray | None = None) -> np.ndarray:
    """The step p limited to |p_i| <= cap (trial points far from the iterate cost many Newton
    iterations and are mostly rejected). With the gradient g: each coordinate clipped to
    [-cap, cap] (a box trust region), if that keeps a descent direction (g^T p < 0); else, and
    without g, p scaled by min(1, cap / max|p_i|).

    Clipping instead of scaling: the quasi-Newton step of a poorly determined d_g (a gene with few
    counts) can be several units of s_g while every other coordinate moves by 0.01-0.1, and scaling
    shrank the whole step to that gene's cap, step after step. Measured (in-process fits to the
    certificate, throwaway ``trace_var.py``): the first 2,000 cells of the issue-13 counts
    (G = 14,000, k = 5) 73 -> 44 evaluations, 1190 -> 906 s CPU (both runs side by side on the
    two cores); real 2000 x 1000 counts, k = 10: 64 -> 52 evaluations, 24.7 -> 20.3 s; real
    2000 x 200, k = 5: 46 -> 44; the simulated benchmark cases unchanged (the cap never binds).
    (Those runs took the certificate's gap from the capped step; from the full step, as now, the
    four ``bench_speed.py`` cases take the same evaluations.) All 20,000 cells of the issue-13
    counts on the 2-worker cluster: 62 -> 43 evaluations (``bench_dask_14k_stop30.json``).

    The first step (no pairs yet: p = -H0 g) is scaled to ``max_step`` like the later ones, not
    to 0.1 as before: from the pair of a step that short, the second direction extrapolated along
    it and shrank every row of W through W = 0 (about -2.3 W on the issue-13 counts), a trial
    point that was rejected and backtracked into the same trough. Evaluations to the certificate
    (0.1 -> max_step; in-process fits, throwaway traces): first 2,000 cells of the issue-13
    counts with mean count 1.47, 34 -> 25; real 2000 x 1000, k = 10, 52 -> 61; real 2000 x 200,
    k = 5, 44 -> 37; simulated 2000 x 1000 and 2000 x 200, 21 -> 18 and 19 -> 17. All 20,000
    cells of those counts on the cluster: 47 -> 26 evaluations, 1269 -> 699 s
    (``bench_dask_14k_m15_stop31*.json``); of the original issue-13 counts (mean count 0.89):
    43 -> 48 evaluations, 1098-1135 -> 1314 s (``bench_dask_14k_stop31*.json``).

    The cap (``run_lbfgs``'s ``max_step``) is 0.5 since stop 32, was 1. Steps to the certificate,
    1 -> 0.5 (in-process default fits, throwaway scripts): real 2000 x 1000, k = 10, 54 -> 48;
    real 2000 x 200, k = 5, 31 -> 29; real 2000 x genes 1000-2000 by mean count, k = 10, 66 -> 64;
    real 2000 x 500, k = 8, 78 -> 78; real 2000 x genes 200-700, k = 5, 53 -> 50; simulated
    2000 x 1000 and 2000 x 200, 14 -> 13 and 11 -> 11; first 2,000 cells of the issue-13 counts
    (G = 14,000, k = 5), 23 -> 24 evaluations at mean count 1.47 and 34 -> 34 on the original
    counts. Caps of 0.3 / 0.7 gave 51 / 51, 34 / 28, 14 / 14 and 11 / 11 steps on the four
    ``bench_speed.py`` cases; 3 gave 57 and 38 on the real ones."""
    if g is not None:
        q = np.clip(p, -cap, cap)
        if float(np.dot(g, q)) < 0.0:
            return q
    return p * min(1.0, cap / max(float(np.max(np.abs(p))), 1e-300))


def _line_search(fg, z, F0, g0, p, t0=1.0, c1=1e-4, c2=0.9, max_evals=30):
    """Weak Wolfe line search along p from z (F0, g0); returns (t, F, g) or None if no decrease."""
    slope0 = float(np.dot(g0, p))
    if not slope0 < 0:
        return None
    lo, hi = 0.0, math.inf
    t = t0
    for _ in range(max_evals):
        F, g = fg(z + t * p)
        if not np.isfinite(F) or F > F0 + c1 * t * slope0:
            hi = t
            if np.isfinite(F):  # safeguarded quadratic interpolation of F along p
                denom = 2.0 * (F - F0 - slope0 * t)
                tq = -slope0 * t * t / denom if denom > 0 else 0.5 * t
                t = min(max(tq, lo + 0.1 * (t - lo)), lo + 0.5 * (t - lo))
            else:
                t = lo + 0.25 * (t - lo)
            continue
        slope = float(np.dot(g, p))
        if slope < c2 * slope0 and math.isinf(hi):
            lo = t  # still steep: extrapolate
            t *= 2.0
            continue
        if slope < c2 * slope0:
            lo = t
            t = 0.5 * (lo + hi)
            continue
        return t, F, g
    # evaluation budget spent: accept the last Armijo point if there was one
    if lo > 0:
        F, g = fg(z + lo * p)
        return lo, F, g
    return None


def run_lbfgs(ev: Evaluator, st: LaplaceFitState, *, n_steps: int, gtol: float, rule: StopRule,
              memory: int = 50, checkpoint: str | None = None, checkpoint_every: int = 50,
              progress: bool = True, precondition: str | None = "fisher", max_step: float = 0.5,
              max_epochs: float | None = None, n_total: int | None = None,
              desc: str = "Laplace fit (L-BFGS)", warn_stall: bool = True,
              certify_final: bool = True) -> LaplaceFitState:
    """L-BFGS from the state's globals (module docstring) until ``rule``, ``n_steps`` (total steps
    of the state) or ``max_epochs`` (total epochs of the state); updates and returns ``st``
    (globals, pairs, MAPs, history, best, epochs, stop rule and message).

    Epochs: ``st.epochs`` grows by the cells each evaluation solves over ``n_total`` (default: the
    evaluator's cells; a sampled phase passes the whole data set's N).

    ``precondition``: H0 of the two-loop recursion, "fisher" (``precondition.FisherPreconditioner``,
    the default), "diagonal" (``precondition.diagonal_curvature``) or None (identity).
    ``warn_stall``: a ``ConvergenceWarning`` when the fit stalls with its gap estimate above the
    rule's tolerance (False for the sampled path's phases before the last, which go on).
    ``certify_final``: the certificate holds only on values solved to the final Newton tolerance
    ``gtol`` (module docstring). False (the sampled path's phases before the last, whose rule's
    tolerance is at least 10% of the sample's resolution, >= 1e-4 nats/cell, far above the
    dec^2 / 2 <= 5e-7 nats per cell that the loose schedule leaves): the rule is checked on the
    values at the schedule's tolerance, with no re-solve and no jump to the final tolerance."""
    if precondition not in ("fisher", "diagonal", None):
        raise ValueError(f"precondition must be 'fisher', 'diagonal' or None, got {precondition!r}")
    G, k = st.W.shape
    final = gtol
    n_total = ev.N if n_total is None else int(n_total)
    solved0, epochs0 = ev.cells_solved, st.epochs

    def count_epochs() -> float:
        st.epochs = epochs0 + (ev.cells_solved - solved0) / n_total
        return st.epochs

    z = to_z(st.mu, st.W, np.exp(st.rho))
    eta_var = eta_prior_variance(ev.capture, ev.log_anchor) if precondition == "fisher" else 0.0
    S = [] if st.lbfgs_s is None else list(st.lbfgs_s)
    Y = [] if st.lbfgs_y is None else list(st.lbfgs_y)
    counters = {"failed": 0}
    fg = _negated_objective(ev, G, k, counters, final)

    tol = newton_schedule(1.0, final)
    F, g = fg(z, tol)
    if not np.isfinite(F):
        raise FloatingPointError("Laplace objective is not finite at the initial point")
    bar = tqdm(total=n_steps, initial=min(st.step, n_steps), desc=desc,
               disable=not progress)
    gains: list = []
    est = math.inf  # this run's gap estimate (not a previous run's or sampled phase's, in ``st``)
    while True:
        # the Newton tolerance for this iteration; re-solve the iterate only if it tightened
        new_tol = newton_schedule(float(np.max(np.abs(g))), final)
        if new_tol < tol:
            # once the gap estimate is within the certificate's tolerance, the fit is about to be
            # certified, which happens on values at the final tolerance: go there directly
            tol = final if (certify_final and est <= rule.gap_tol) else new_tol
            F, g = fg(z, tol)
        _record_best(st, z, F, G, k)
        D = preconditioner(ev, z, G, k, from_z, eta_var, precondition) if precondition else None
        p = _two_loop(g, S, Y, D)
        gap_qn = quasi_newton_gap(g, p)  # from the full quasi-Newton step, before its cap
        # every step limited to max_step per coordinate (trial points far from the iterate cost
        # many Newton iterations and are mostly rejected): the first, without pairs, scaled as a
        # whole, the later ones clipped per coordinate (``_cap_step``)
        p = _cap_step(p, max_step) if not S else _cap_step(p, max_step, g)
        st.gap_estimate = est = rule.estimate(gap_qn, gains)
        stop = rule.check(gap_qn, gains, float(np.max(np.abs(g))))
        if stop is not None:
            if certify_final and tol > final:  # certify only on values at the final tolerance:
                tol = final  # re-solve the iterate there; the next check (same gains, the
                F, g = fg(z, tol)  # quasi-Newton gap from this gradient) completes the certificate
                rule.reset(rule.n_confirm - 1)  # if it still holds, else it starts over
                continue
            st.stop_rule, st.stopped = stop
            break
        if max_epochs is not None and count_epochs() >= max_epochs:
            st.stop_rule = "epoch_cap"
            st.stopped = (f"max_epochs={max_epochs:g} reached before the stopping rule "
                          f"(estimated evidence gap {st.gap_estimate:.1e} nats/cell)")
            warn_uncertified(f"Laplace fit: {st.stopped}")
            break
        if st.step >= n_steps:
            st.stop_rule = "step_cap"
            st.stopped = (f"n_steps={n_steps} reached before the stopping rule "
                          f"(estimated evidence gap {st.gap_estimate:.1e} nats/cell)")
            warn_uncertified(f"Laplace fit: {st.stopped}")
            break
        res = _line_search(lambda zz: fg(zz, tol), z, F, g, p)
        if res is None:
            if tol > final:  # tighten the inner tolerance first: the stall may be inner noise
                tol = final
                F, g = fg(z, tol)
                continue
            st.stop_rule = "stalled"
            st.stopped = (f"stalled: no decrease along the L-BFGS direction (estimated evidence "
                          f"gap {st.gap_estimate:.1e} nats/cell)")
            if warn_stall and not st.gap_estimate <= rule.gap_tol:
                warn_uncertified(f"Laplace fit: {st.stopped}, above gap_tol={rule.gap_tol:g}: not certified")
            break
        t, F_new, g_new = res
        _push_pair(S, Y, t * p, g_new - g, memory)
        gains.append(F - F_new)
        z, F, g = z + t * p, F_new, g_new
        _accept(st, ev, z, F, S, Y, G, k)
        count_epochs()
        bar.update(1)
        bar.set_postfix(objective=f"{-F:.5f}", gap=f"{st.gap_estimate:.1e}", newton_gtol=f"{tol:.0e}")
        if checkpoint and st.step % checkpoint_every == 0:
            if getattr(ev, "remote_maps", False):  # MAPs on Dask workers: gathered for the file only
                st.x_map, st.eta_map = ev.x_map, ev.eta_map
            st.save(checkpoint)
    bar.close()
    count_epochs()
    _record_best(st, z, F, G, k)
    if not getattr(ev, "remote_maps", False):  # MAPs on Dask workers: the caller gathers them if needed
        st.x_map, st.eta_map = ev.x_map, ev.eta_map
    n_floor = int(np.sum(np.exp(st.best["rho"]) <= 10 * D_FLOOR))
    if n_floor:
        st.stopped += f"; {n_floor} gene(s) with d at the floor {D_FLOOR:g} (Heywood case)"
    if counters["failed"]:
        st.stopped += f"; {counters['failed']} trial point(s) rejected as numerically singular"
    return st


def _negated_objective(ev: Evaluator, G: int, k: int, counters: dict, final: float):
    """fg(z, tol) -> (-L, -dL/dz) on z = (mu, W, s) with d = D_FLOOR + s^2 (dL/ds = 2 s dL/dd),
    the cells solved to gtol = tol and the decrement tolerance ``newton_decrement_tol(tol, final)``;
    (inf, 0) where the evidence cannot be evaluated (e.g. Sigma numerically singular), so the
    line search backs off; such points are counted in ``counters["failed"]``."""

    def fg(zz, tol):
        mu, W, d = from_z(zz, G, k)
        try:
            e = ev(mu, W, d, gtol=tol, dec_tol=newton_decrement_tol(tol, final))
        except (np.linalg.LinAlgError, ValueError, FloatingPointError):
            counters["failed"] += 1
            return math.inf, np.zeros_like(zz)
        if not np.isfinite(e.value):
            return math.inf, np.zeros_like(zz)
        s = zz[G + G * k:]
        g = np.concatenate([e.grad["mu"], e.grad["W"].ravel(), 2.0 * s * e.grad["d"]])
        return -e.value, -g

    return fg


def _record_best(st: LaplaceFitState, z: np.ndarray, F: float, G: int, k: int) -> None:
    """Keep the globals at z as the state's best if L = -F beats it."""
    if -F > st.best_value:
        st.best_value = -F
        mu, W, d = from_z(z, G, k)
        st.best = {"mu": mu.copy(), "W": W.copy(), "rho": np.log(d)}


def _push_pair(S: list, Y: list, s_vec: np.ndarray, y_vec: np.ndarray, memory: int) -> None:
    """Append the curvature pair (s, y) if s^T y > 0 (relative 1e-10), keeping the last ``memory``."""
    if float(np.dot(s_vec, y_vec)) > 1e-10 * np.linalg.norm(s_vec) * np.linalg.norm(y_vec):
        S.append(s_vec)
        Y.append(y_vec)
        if len(S) > memory:
            S.pop(0)
            Y.pop(0)


def _accept(st: LaplaceFitState, ev: Evaluator, z: np.ndarray, F: float, S: list, Y: list,
            G: int, k: int) -> None:
    """One accepted step: the state's globals, MAPs, history and L-BFGS pairs."""
    st.step += 1
    mu, W, d = from_z(z, G, k)
    st.mu, st.W, st.rho = mu.copy(), W.copy(), np.log(d)
    if not getattr(ev, "remote_maps", False):  # MAPs on Dask workers: read at checkpoints and the end
        st.x_map, st.eta_map = ev.x_map, ev.eta_map
    st.history.append((st.step, -F, -F))
    st.lbfgs_s, st.lbfgs_y = np.array(S), np.array(Y)
