"""Adam on (mu, W, log d): the first-order outer optimiser, full batch or minibatches of cells.

Kept as an option (``optimizer="adam"``) and for minibatch fits (``batch_size``): each step solves
the MAPs of the step's cells (warm-started from their last visit, ``evaluate.Evaluator``), takes
the exact gradient of the mean evidence over those cells, and an Adam ascent step (b1 = 0.9,
b2 = 0.999, eps = 1e-8) on (mu, W, rho = log d).

Stopping (reported as rule "patience"): the best tracked objective gained less than
``rtol (1 + |best|)`` over the last ``patience`` steps; the tracked objective is the full-batch
value, or with minibatches that of a fixed evaluation set of up to 1024 cells re-evaluated once
per epoch. This rule does not certify convergence (see ``stopping.py``); the step cap stops with a
``ConvergenceWarning``. Returned globals: those with the best tracked objective. Divergence guard:
a non-finite or sharply worse objective restores the best state, halves the learning rate and
resets the moments.
"""

from __future__ import annotations


import numpy as np
from tqdm.auto import tqdm

from .evaluate import Evaluator
from .state import LaplaceFitState
from .stopping import warn_uncertified

__all__ = ["run_adam"]


def run_adam(ev: Evaluator, st: LaplaceFitState, *, n_steps: int, gtol: float, batch_size: int | None,
             patience: int, rtol: float, seed: int, checkpoint: str | None, checkpoint_every: int,
             progress: bool) -> LaplaceFitState:
    """Adam steps from the state (module docstring) until the patience rule or ``n_steps``."""
    N = ev.u.shape[0]
    rng = np.random.default_rng(seed)
    if not st.m1:
        st.m1 = {k: np.zeros_like(v) for k, v in (("mu", st.mu), ("W", st.W), ("rho", st.rho))}
        st.m2 = {k: np.zeros_like(v) for k, v in st.m1.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    full = batch_size is None or batch_size >= N
    eval_idx = None if full else np.sort(rng.choice(N, size=min(N, 1024), replace=False))
    eval_every = 1 if full else max(1, N // batch_size)
    track = None if not st.history else st.history[-1][2]
    bar = tqdm(total=n_steps, initial=min(st.step, n_steps), desc="Laplace fit", disable=not progress)
    while st.step < n_steps and not st.stopped:
        idx = None if full else rng.choice(N, size=batch_size, replace=False)
        err = None
        try:
            d = np.exp(st.rho)
            ev.ensure_maps(st.mu, st.W, d, gtol=gtol)  # cold start once, warm starts afterwards
            e = ev(st.mu, st.W, d, gtol=gtol, cells=idx)
            value = e.value
            if full:
                track = value
            elif track is None or st.step % eval_every == 0:
                track = ev(st.mu, st.W, d, gtol=gtol, with_grad=False, cells=eval_idx).value
        except (np.linalg.LinAlgError, ValueError) as ex:
            # numerically singular Sigma or d underflowing to 0 at this iterate: treated like a
            # non-finite objective (the guard below restores the best state)
            err, value, track = ex, np.nan, np.nan
        if not np.isfinite(value) or not np.isfinite(track) or (
                st.best is not None and track < st.best_value - 10 * (1 + abs(st.best_value))):
            if st.best is None:
                raise FloatingPointError("Laplace objective is not finite at the initial point"
                                         + (f" ({err})" if err else "")) from err
            st.mu, st.W, st.rho = st.best["mu"].copy(), st.best["W"].copy(), st.best["rho"].copy()
            st.lr *= 0.5
            st.m1 = {k: np.zeros_like(v) for k, v in st.m1.items()}
            st.m2 = {k: np.zeros_like(v) for k, v in st.m2.items()}
            ev.x_map = ev.eta_map = None
            track = st.best_value
            continue
        if track > st.best_value:
            st.best_value = track
            st.best = {"mu": st.mu.copy(), "W": st.W.copy(), "rho": st.rho.copy()}
        st.history.append((st.step, value, track))
        grads = {"mu": e.grad["mu"], "W": e.grad["W"], "rho": e.grad["d"] * d}
        st.step += 1
        for k, gk in grads.items():  # Adam ascent step on L
            st.m1[k] = b1 * st.m1[k] + (1 - b1) * gk
            st.m2[k] = b2 * st.m2[k] + (1 - b2) * gk**2
            mh = st.m1[k] / (1 - b1**st.step)
            vh = st.m2[k] / (1 - b2**st.step)
            setattr(st, k, getattr(st, k) + st.lr * mh / (np.sqrt(vh) + eps))
        st.x_map, st.eta_map = ev.x_map, ev.eta_map
        bar.update(1)
        bar.set_postfix(objective=f"{track:.4f}", cells_on_bound=e.n_on_bound)
        if len(st.history) > patience:
            past = max(h[2] for h in st.history[:-patience])
            if st.best_value - past < rtol * (1 + abs(st.best_value)):
                st.stop_rule = "patience"
                st.stopped = f"converged: no improvement > rtol={rtol:g} in {patience} steps"
        if checkpoint and (st.step % checkpoint_every == 0 or st.stopped):
            st.save(checkpoint)
    bar.close()
    if not st.stopped:
        st.stop_rule = "step_cap"
        st.stopped = f"n_steps={n_steps} reached before the patience rule"
        warn_uncertified(f"Laplace fit (Adam): {st.stopped}")
    st.x_map, st.eta_map = ev.x_map, ev.eta_map
    return st
