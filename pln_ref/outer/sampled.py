"""Sampled L-BFGS: the stochastic path for large N, a dynamic sample size (Byrd, Chin, Nocedal & Wu
2012, "Sample size selection in optimization methods for machine learning").

The evidence is a mean over cells, L(theta) = (1/N) sum_c l_c(theta), so the mean over a random
sample of n cells, L_n, is an unbiased estimate of it whose optimum is within about P / (2 n)
nats/cell of the full optimum (P = G (k + 2) globals). The fit runs full L-BFGS (``lbfgs.run_lbfgs``,
exact IFT gradient, Newton tolerance schedule) on a nested sequence of random samples

    n_j = ceil(N / 2^(m - j)),  j = 0 .. m,  m = floor(log2(N / n0))     (n_0 in [n0, 2 n0), n_m = N)

(each sample the first n_j cells of one random permutation, fixed by ``seed``; ``sample_sizes``;
n0 the first sample size, ``batch_size`` raised by ``first_sample_size``: "The first sample" below).
Phase j stops when its certified evidence gap on its own sample is below the sample's statistical
resolution ``stopping.resolution_tol`` (rule "resolution": tol_n = max(gap_tol, fraction P / (2 n_j)));
its certificate is checked on the values at the Newton schedule's tolerance (``run_lbfgs``'s
``certify_final=False``: the loose solves' error, dec^2 / 2 <= 5e-7 nats per cell, is far below
tol_n), and only the last phase re-solves at the final tolerance to certify. The next phase
warm-starts from

- the globals of the last phase,
- its L-BFGS curvature pairs (the per-cell mean curvature of a sample estimates the full one),
  except for the last phase, which starts its pairs afresh (below),
- the MAPs of the cells already seen (the new cells are cold-solved once at the current globals,
  to the next phase's first Newton tolerance), and
- its first evaluation: the phase's last evaluation (its cells at these globals) joined with the new
  cells' (``evaluate.join_evaluations``: the evidence and gradient are sums over cells), so the
  next phase does not solve the cells it has already solved there again.

So a switch costs the new cells' solve only. Before, it also re-solved the sample at the final
tolerance and then evaluated the whole next sample at unchanged globals (0.00 Newton iterations
per cell). At 20,000 x 2,000, k = 5, n0 = 1000, the four sampled phases took 4.75 epochs instead
of 6.56 (plus 0.97 for the cold solves), with the same steps (5 each).

The last phase does not inherit the samples' pairs. Its certificate needs the full objective's
curvature, and pairs measured on samples slowed it. Measured with
``validation/benchmarks/bench_minibatch.py``'s counts, k = 5, pairs carried -> not carried into
the last phase:

- 20,000 x 2,000, n0 = 1000: last phase 19 -> 12 steps, whole fit 257.8 -> 194.9 s CPU;
- 10,000 x 1,000, n0 = 500: 16 -> 13 steps, 60.0 -> 52.1 s;
- 20,000 x 500, n0 = 1000: 10 -> 10 steps (14 -> 13 epochs), 37.7 -> 34.8 s.

(These with phases stopped at 1% of their resolution; ``stopping.RESOLUTION_FRACTION`` is now
10%.) Starting every phase's pairs afresh was worse on the first case (223.5 s: the 10,000-cell
phase took 8 steps instead of 16, the last one 22).

The last phase is the whole data set: the full-batch L-BFGS with its certificate (``gap_tol``), so
the fit ends at a maximum of the full-batch objective; only the path to it is cheaper, because the
early, large steps are taken on samples of 1/2^m .. 1/2 of the cells. Where the objective has more
than one maximum the path decides which: on the 10,000 x 1,000 counts above (n0 = 500, before the
first-sample rule below), the sampled fit ended 1.5e-3 nats/cell below the full batch, with one
sparse gene (mean count 0.11) at the d floor, a maximum on the boundary (dL/dd < 0 there), where
the full batch has d = 1.4.

**The last phase's certificate can be wrong after the samples.** The samples move sparse genes
along the valley where mu_g and d_g trade against each other (exp(mu_g + d_g / 2) is what the
counts pin), and the full-batch phase can stop where L is not concave along such a valley.
Measured on 40,000 x 500 (k = 5, n0 = 1000): the sampled fit stopped 3.2e-3 nats/cell below the
full batch with an estimated gap of 8.6e-5; one gene (mean count 0.11) had d = 0.099 where the
full batch has 1.76. There L is convex along that gene's valley: for a step along it in
(mu_g, s_g) (d = D_FLOOR + s^2; largest coordinate 1e-2), g^T step = +7.7e-6 and
step^T (nabla^2 L) step = +3.8e-7 (throwaway probe, the exact gradient at both ends). The fit is not at a
maximum, and a gap estimate from a concave model (the gains' tail, the L-BFGS curvature) cannot
see what is left. L-BFGS continued from the sampled fit (pairs afresh, gap_tol 1e-7) gained
4.9e-5, 6.3e-5, 2.3e-4, 3.1e-4, ... per step and ended 2.5e-5 above the full batch, with
d = 1.77 for that gene. On the 10,000 x 1,000 counts the same continuation gained 3.3e-4
(estimated 2.1e-5) and stayed 1.15e-3 below the full batch, at the boundary maximum above.
Applying the start's ``start.raise_d`` to the globals at the switch to the full batch removed
both gaps (-3e-6 and 6.9e-5 nats/cell) but made the last phase nearly a fit from the start
(17 steps instead of 9 at 40,000 x 500; 93.4 s against 80.2 s for the full batch), so it is
not done. A larger first sample avoids it, since it gives sparse genes more counts from the
start (throwaway runs, process CPU against the full batch's 80.2 s and 32.9 s):

- 40,000 x 500: n0 = 1000 / 2500 / 5000 end 3.2e-3 / 5.4e-4 / 1.4e-6 nats/cell below the full
  batch, in 64.6 / 62.2 / 75.8 s;
- 10,000 x 1,000: n0 = 500 / 1000 / 2500 end 1.47e-3 / 1.7e-4 / 7.7e-5 below, in
  35-39 / 43.3 / 37.6 s.

**The first sample** (``first_sample_size``) is therefore at least ``batch_size`` = n0 cells and
large enough to hold ``min_sample_counts`` (``constants.MIN_SAMPLE_COUNTS`` = 500) counts of the
sparsest expressed gene in expectation:

    n_first = min(N, max(n0, ceil(500 N / T_min))),   T_min = min over genes with counts of sum_c u_cg

First samples with 68 and 135-136 counts of the sparsest gene left the gaps above (1.47e-3 with
68; 3.2e-3 and 1.7e-4 with 135-136; 1.25e-5 at 20,000 x 2,000 with 153); with 270-273 they were
5.4e-4 and 7.7e-5, with 545 1.4e-6. The fit is the full batch when n_first > N / 2, which is
what data with a gene of fewer than 1,000 counts get: no sample resolves that gene better than
all cells do. ``validation/benchmarks/bench_minibatch.py`` with
this rule (``results/bench_minibatch_stop36.json``; n0 = 1000 asked, k = 5; every case has a gene
with mean count 0.11-0.12, so the first sample is 5,000 cells), sampled against full batch, back
to back:

    case               full batch              sampled                 CPU ratio  gap full - sampled
    40,000 x 500       75.5 s, 19 steps        77.4 s, 32 steps        1.03       1.9e-6
    10,000 x 1,000     35.5 s, 18 steps        36.5 s, 22 steps        1.03       6.9e-5
    20,000 x 500       39.4 s, 19 steps        29.2 s, 22 steps        0.74       2.8e-5
    20,000 x 2,000     136.8 s, 17 steps       130.0 s, 25 steps       0.95       3.4e-5

(correlation RMSE ratio sampled / full 0.99-1.00 throughout). The rule makes stops in a sparse
gene's valley rarer and smaller; it does not exclude them: over two more permutation seeds of
each case the largest gap was 4.2e-4 (40,000 x 500, a gene of mean count 0.16, 815 counts in the
first sample, at d = 0.16 where the full batch has 8e-4; certificate estimate 5.2e-5), the
others -5.7e-5 to 1.05e-4 (before the last phase's window below). A larger constant does not
remove it: with 1000 (first sample 10,000 cells) the three seeds at 40,000 x 500 ended 7.4e-6,
5.6e-4 and 1.3e-4 below the full batch. Against n0 = 1000 as given, the 20,000 x 2,000 fit
drops the samples of 1,250 and 2,500 cells, and its last phase took 13 steps instead of 15 (stop
35: ratio 1.18). It now costs about what the full batch costs: the same fit measured 0.95, 0.97
and 1.08 in three back-to-back runs (20.2 epochs against 20.0), and two other permutation seeds
took 14 and 16 steps in the last phase, 1.06 and 1.25 times the full batch's CPU (throwaway
runs, back to back with a full-batch fit). The last phase takes 9-16 steps (11-16 with the window
below), nearly as many as a full-batch fit from the start (17-19): it has to cover the
difference between the optimum of half the cells and that of all, which no sample can remove,
so at these sizes the sampled path saves at most a quarter of the CPU. Starting it closer does
not shorten it: from the average of the optima of two disjoint halves (36 times closer to the
optimum, 0.010 against 0.367 nats/cell) the full-batch L-BFGS took 14 steps at 20,000 x 2,000,
against 13 from one half's optimum, and without the half-sample phase the last phase took 16
steps instead of 13 (throwaway runs, stop 37). ``min_sample_counts=0`` keeps n0 as given.

**The last phase's window.** Its certificate needs 2 ``LAST_PHASE_MIN_WINDOW`` = 10 gains of its
own, against 8 for the full-batch fit from the start (``stopping.StopRule.min_window`` = 4). The
last phase starts near the optimum, so its first gains are already small, and a crawl along a
sparse gene's valley can look like convergence over 8 of them. Measured on the three runs whose
last phase stopped after the 9 steps that 8 gains allow (throwaway, ``pln_ref.fit(u, k=5,
batch_size=1000, seed=s)``; gap = full batch - sampled, nats/cell):

- 40,000 x 500, seed 1: 4.2e-4 below the full batch in 9 steps (55.2 s) -> -1e-6 in 15 steps
  (76.7 s); the valley above was climbed;
- 40,000 x 500, seed 2: 1.05e-4 in 9 steps (59.3 s) -> 6.7e-5 in 11 (59.2 s);
- 20,000 x 500, seed 0: 2.8e-5 in 9 steps (29.2 s) -> -2.0e-5 in 11 (28.8 s).

A last phase that took 11 steps or more is unchanged: from 10 gains on, both windows give the
same estimate. A window of 6 gave the same 15 steps on the first run. ``bench_minibatch.py`` with
the window (``results/bench_minibatch_stop36b.json``, the four cases of the table above, seed 0):
CPU ratios 0.98, 1.02, 0.81 and 1.08, gaps 1.9e-6, 6.9e-5, -2.0e-5 and 3.4e-5; only the
20,000 x 500 fit changed (last phase 11 steps instead of 9), the other ratios moved with the
machine's load.

Cost in **epochs** (cells whose MAP was solved, summed over evaluations, divided by N; cold
solves of new cells count too): ``state.epochs``; the cap ``max_epochs`` stops the fit with a
``ConvergenceWarning`` (rule "epoch_cap"), as does the step cap ``n_steps`` (rule "step_cap",
steps of all phases). ``state.phases`` records each finished phase (cells, steps, epochs, rule,
objective on its sample; a phase stopped by a cap and then resumed keeps one record, whose steps
and epochs sum both runs); ``state.phase_cells`` the current phase's sample size, whose MAPs (in
increasing cell order) ``state.x_map`` holds, so a checkpoint written in any phase resumes in it.

Memory: the MAPs of the current sample (at most N x G, the warm start of the full-batch fit) plus
the evaluator's blocks; the counts of a sample are read from the data on demand
(``CountMatrix.subset``), never copied.
"""

from __future__ import annotations

import math

import numpy as np

from ..constants import MIN_SAMPLE_COUNTS
from ..params import PLNParams
from .evaluate import WARM_START_DTYPE, Evaluator, join_evaluations
from .lbfgs import from_z, newton_decrement_tol, newton_schedule, run_lbfgs, to_z
from .state import LaplaceFitState
from .stopping import RESOLUTION_FRACTION, StopRule, resolution_tol

__all__ = ["run_sampled", "sample_sizes", "nested_sample", "first_sample_size", "LAST_PHASE_MIN_WINDOW"]

#: gains the last (all-cells) phase's certificate needs, halved: ``StopRule.min_window`` (module
#: docstring, "The last phase's window"; the full-batch fit from the start keeps 4)
LAST_PHASE_MIN_WINDOW = 5


def first_sample_size(gene_totals: np.ndarray, N: int, n0: int,
                      min_counts: float = MIN_SAMPLE_COUNTS) -> int:
    """n_first = min(N, max(n0, ceil(min_counts N / T_min))): the first sample holds at least
    ``min_counts`` counts of every gene in expectation (T_g = sum_c u_cg the gene totals, T_min the
    smallest positive one; module docstring, "The first sample"; 0 keeps n0). ``sample_sizes`` of
    it is [N], the full batch, when it exceeds N / 2."""
    t = np.asarray(gene_totals, dtype=float)
    t = t[t > 0]
    if t.size == 0 or min_counts <= 0:
        return int(min(N, n0))
    return int(min(N, max(int(n0), math.ceil(min_counts * N / float(t.min())))))


def sample_sizes(N: int, n0: int) -> list[int]:
    """[ceil(N / 2^m), ..., ceil(N / 2), N] with m = floor(log2(N / n0)) (>= 0): doubling sample
    sizes from between n0 and 2 n0 cells up to all N ([N] when n0 > N / 2)."""
    if n0 > N / 2:
        return [N]
    m = int(math.floor(math.log2(N / n0)))
    return [int(math.ceil(N / 2**j)) for j in range(m, 0, -1)] + [N]


def nested_sample(N: int, n: int, seed: int) -> np.ndarray:
    """The first n cells of the random permutation of range(N) fixed by ``seed``, increasing: the
    samples of increasing n are nested."""
    return np.sort(np.random.default_rng(seed).permutation(N)[:n])


def _pick(a: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
    return None if a is None else a[idx]


def run_sampled(ev_full: Evaluator, st: LaplaceFitState, *, n0: int, seed: int, n_steps: int, gtol: float,
                gap_tol: float, fraction: float = RESOLUTION_FRACTION, max_epochs: float | None = None,
                checkpoint: str | None = None, checkpoint_every: int = 50,
                progress: bool = True) -> LaplaceFitState:
    """Sampled L-BFGS (module docstring) from the state (fresh, or resumed in any phase) until the
    full-batch certificate, the step cap or the epoch cap; ``ev_full`` evaluates all cells (its
    warm start is set from the last sample's MAPs). Updates and returns ``st``."""
    u = ev_full.u
    N, G = u.shape
    k = st.W.shape[1]
    n_params = G * (k + 2)
    sizes = sample_sizes(N, n0)
    if st.phase_cells == 0:  # a fresh fit: the first sample, cold MAPs
        st.phase_cells = sizes[0]
        st.x_map = st.eta_map = None
    if st.phase_cells not in sizes:
        raise ValueError(f"the checkpoint is in a phase of {st.phase_cells} cells, not one of the "
                         f"sample sizes {sizes} of this fit")
    la = ev_full.log_anchor
    first = None  # (globals, evaluation): the next phase's first evaluation, joined at the switch
    while True:
        n = st.phase_cells
        idx = nested_sample(N, n, seed)
        if n == N:
            ev = ev_full
            ev.set_warm_start(st.x_map, st.eta_map)
            rule = StopRule(gap_tol=gap_tol, min_window=LAST_PHASE_MIN_WINDOW)
            desc = "Laplace fit (L-BFGS, all cells)"
        else:
            ev = Evaluator(u.subset(idx), _pick(la, idx), ev_full.capture, ift=ev_full.ift,
                           truncation=ev_full.truncation, x_map=st.x_map, eta_map=st.eta_map,
                           block_cells=ev_full.block_cells)
            rule = StopRule(gap_tol=resolution_tol(n, n_params, gap_tol, fraction), min_window=2)
            desc = f"Laplace fit (L-BFGS, {n} of {N} cells)"
        if first is not None:
            ev.seed(*first)
            first = None
        # objectives of different samples are not comparable: the best is tracked per phase
        st.best, st.best_value = None, -np.inf
        steps0, epochs0 = st.step, st.epochs
        last_rec = st.phases[-1] if st.phases else None
        if last_rec and last_rec["cells"] == n and last_rec["rule"] in ("step_cap", "epoch_cap"):
            cut = st.phases.pop()  # a resumed phase: one record for the runs before and after the cap
            steps0, epochs0 = steps0 - cut["steps"], epochs0 - cut["epochs"]
        run_lbfgs(ev, st, n_steps=n_steps, gtol=gtol, rule=rule, checkpoint=checkpoint,
                  checkpoint_every=checkpoint_every, progress=progress, max_epochs=max_epochs,
                  n_total=N, desc=desc, warn_stall=n == N, certify_final=n == N)
        last = n == N or st.stop_rule in ("step_cap", "epoch_cap")
        st.phases.append({"cells": n, "steps": st.step - steps0, "epochs": st.epochs - epochs0,
                          "rule": st.stop_rule if (last or st.stop_rule != "certificate") else "resolution",
                          "tol": rule.gap_tol, "objective": float(st.best_value)})
        if last:
            return st
        # next sample: the cells seen keep their MAPs, the new ones are cold-solved at the globals
        # the next phase starts from (``run_lbfgs``'s z of the state), to its first Newton
        # tolerance and with their evidence terms, which join this phase's last evaluation there
        n_next = sizes[sizes.index(n) + 1]
        idx_next = nested_sample(N, n_next, seed)
        new = np.setdiff1d(idx_next, idx, assume_unique=True)
        params = PLNParams(*from_z(to_z(st.mu, st.W, np.exp(st.rho)), G, k), ev_full.capture)
        tol0 = newton_schedule(1.0, gtol)
        cold = Evaluator(u.subset(new), _pick(la, new), ev_full.capture, ift=ev_full.ift,
                         truncation=ev_full.truncation, block_cells=ev_full.block_cells)
        e_new = cold(params.mu, params.W, params.d, gtol=tol0, dec_tol=newton_decrement_tol(tol0, gtol))
        st.epochs += new.size / N
        x, e = np.empty((n_next, G), dtype=WARM_START_DTYPE), np.empty(n_next)  # as the evaluator keeps them
        old_at, new_at = np.searchsorted(idx_next, idx), np.searchsorted(idx_next, new)
        x[old_at], e[old_at] = st.x_map, st.eta_map
        x[new_at], e[new_at] = cold.x_map, cold.eta_map
        if _at_same_globals(ev, params) and np.isfinite(e_new.value):
            first = (params, join_evaluations([(ev.last_evaluation, old_at), (e_new, new_at)], n_next))
        del cold, ev
        st.x_map, st.eta_map, st.phase_cells = x, e, n_next
        if n_next == N:  # the full-batch phase starts its L-BFGS pairs afresh (module docstring)
            st.lbfgs_s = st.lbfgs_y = None
        st.stopped = st.stop_rule = ""
        if checkpoint:
            st.save(checkpoint)


def _at_same_globals(ev: Evaluator, params: PLNParams) -> bool:
    """Whether ``ev``'s last evaluation (all its cells, with a gradient) is at ``params``: mu and W
    equal, d to 1e-12 relative (the state keeps log d, so d comes back rounded)."""
    last = ev.last_params
    if last is None or ev.last_evaluation is None or ev.last_evaluation.grad is None:
        return False
    return (np.array_equal(last.mu, params.mu) and np.array_equal(last.W, params.W)
            and np.allclose(last.d, params.d, rtol=1e-12, atol=0.0))
