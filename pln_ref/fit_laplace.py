"""Outer optimisation of the globals theta = (mu, W, d) on the Laplace-approximated evidence.

The objective, its exact IFT gradient and the truncation term are documented in
``pln_ref.outer.evaluate`` (``laplace_objective``); the optimisers, the start, the stopping rules
and the checkpointed state live in ``pln_ref.outer`` (one idea per module). ``optimize_globals``
dispatches:

- ``optimizer="lbfgs"`` (default): full-batch L-BFGS with a Newton tolerance scheduled by the
  outer progress, stopped by a certificate on the evidence gap (``pln_ref.outer.lbfgs``,
  ``pln_ref.outer.stopping``);
- ``optimizer="lbfgs"`` with ``batch_size=n0``: the stochastic path for large N, L-BFGS on
  nested random samples of cells doubling from n0 to N (n0 raised so that the first sample holds
  ``min_sample_counts`` = 500 counts of the sparsest gene, ``outer.sampled.first_sample_size``;
  the full batch when it exceeds N / 2), each sample's phase stopped at its
  statistical resolution and the last phase the full-batch L-BFGS with its certificate, so the
  fit ends at a maximum of the full-batch objective (``pln_ref.outer.sampled``; cost and cap in
  epochs);
- ``optimizer="adam"``: Adam on (mu, W, log d), full batch or minibatches of ``batch_size`` cells,
  stopped by its patience rule (``pln_ref.outer.adam``; it does not certify convergence).

Both stop with a ``pln_ref.exceptions.ConvergenceWarning`` when the step cap stops them, and report
which rule stopped the fit in ``state.stop_rule`` / ``state.stopped``.
"""

from __future__ import annotations

import time

import numpy as np

from .constants import D_FLOOR, GAP_TOL, MIN_SAMPLE_COUNTS
from .counts import CountMatrix
from .laplace import default_block_size
from .outer.adam import run_adam
from .outer.evaluate import Evaluator, laplace_objective, laplace_terms
from .outer.final import FinalPosteriors, final_posteriors
from .outer.lbfgs import run_lbfgs
from .outer.sampled import first_sample_size, run_sampled, sample_sizes
from .outer.state import LaplaceFitState, check_fingerprint, data_fingerprint
from .outer.stopping import StopRule
from .params import PLNParams

__all__ = ["laplace_objective", "laplace_terms", "LaplaceFitState", "optimize_globals", "D_FLOOR",
           "data_fingerprint"]


def evaluation_block_cells(G: int) -> int:
    """Cells per block of a blocked full-batch evaluation: one of ``newton_map``'s default blocks
    (``laplace.default_block_size``: max(16, 2^18 // G) cells, about 2^18 entries (2 MB) per N x G
    work array), so each evaluation block is one Newton block and its posterior needs no
    concatenation. Measured on the real 2000 x 1000 counts (k = 10; replay of a fit's 61
    evaluations, ``validation/benchmarks/bench_evals.py``): against two Newton blocks per
    evaluation block (as before), ~3% less CPU; the same on the real 2000 x 200 counts."""
    return default_block_size(G)


def optimize_globals(
    counts,
    init: PLNParams,
    log_anchor: np.ndarray | None,
    *,
    n_steps: int = 2000,
    lr: float = 0.05,
    batch_size: int | None = None,
    ift: bool = True,
    patience: int = 50,
    rtol: float = 1e-5,
    seed: int = 0,
    gtol: float = 1e-6,
    checkpoint: str | None = None,
    checkpoint_every: int = 50,
    resume: LaplaceFitState | None = None,
    progress: bool = True,
    optimizer: str = "lbfgs",
    truncation: bool = True,
    gap_tol: float = GAP_TOL,
    fingerprint: dict | None = None,
    em_cycles: int = 0,
    client=None,
    max_epochs: float | None = None,
    final: bool = False,
    partitions=None,
    map_dtype: str = "float64",
    min_sample_counts: float = MIN_SAMPLE_COUNTS,
) -> tuple[LaplaceFitState, PLNParams] | tuple[LaplaceFitState, PLNParams, FinalPosteriors]:
    """Maximise L(theta) = mean_c l_c(theta) from ``init`` (or ``resume``); returns the final state
    and the best globals, and with ``final=True`` also every cell's final posterior and Laplace
    evidence at those globals (``outer.final.FinalPosteriors``, by blocks of cells warm-started from
    the optimiser's MAPs; with a Dask client on the workers that hold the blocks and their MAPs,
    ``DaskEvaluator.final_posteriors``). The state's MAPs are then consumed (``state.x_map`` None).
    ``map_dtype``: "float64" | "float32", the storage of the final posteriors' x_map (solved in
    float64 block by block, then stored).

    ``optimizer``: "lbfgs" (``gap_tol`` nats/cell for its certificate; with ``batch_size`` = n0 the
    sampled L-BFGS from n0 cells or more, so that the first sample holds ``min_sample_counts`` counts
    of the sparsest gene (``outer.sampled.first_sample_size``; 0: n0 as given), its samples drawn
    with ``seed``, full batch when that first sample exceeds N / 2) or
    "adam" (``lr``, ``batch_size`` cells per step, ``patience``, ``rtol``, ``seed``).
    ``max_epochs``: L-BFGS only, cap on the cells solved / N (``state.epochs``, every run), a
    ``ConvergenceWarning`` when it stops the fit; None: no cap.
    ``gtol``: final per-cell Newton tolerance. ``truncation``: include the eta >= 0 truncation
    term. ``checkpoint``: written atomically every ``checkpoint_every`` steps and at the end;
    ``resume=LaplaceFitState.load(path)`` continues it. ``fingerprint`` (``data_fingerprint``): stored
    in the checkpoint; when resuming, a checkpoint whose fingerprint differs is refused (ValueError
    naming what differs). Wall and CPU time accumulate over resumes (``state.elapsed_s``,
    ``state.elapsed_cpu_s``). ``em_cycles``: SQUAREM cycles of the corrected EM
    (``pln_ref.outer.em``) before L-BFGS on a fresh fit (each cycle costs about three evaluations).
    ``client``: a ``distributed.Client`` or a Dask scheduler address: the full-batch evaluations run
    as one task per partition of cells on its workers (each looping over its blocks of cells),
    which keep the partitions of counts and their MAPs (``pln_ref.outer.dask_eval``; L-BFGS without
    EM cycles only). None: in this process. The MAPs held on the workers are gathered into
    ``state.x_map`` only for a checkpoint or when ``final=False``. ``partitions``: with ``client``,
    a ``dask_eval.DaskCounts`` of ``counts`` already on the cluster (e.g. the start's) to reuse;
    it is released when the fit ends.
    """
    if optimizer not in ("adam", "lbfgs"):
        raise ValueError(f'optimizer must be "adam" or "lbfgs", got {optimizer!r}')
    u = CountMatrix(counts)  # kept in its storage: no dense float64 copy of the counts
    N, G = u.shape
    asked = optimizer == "lbfgs" and batch_size is not None  # the sampled L-BFGS: its first sample
    # has at least batch_size cells, raised so that it resolves the sparsest gene
    n_first = first_sample_size(u.rmatmul(np.ones(N)), N, batch_size, min_sample_counts) if asked else 0
    sampled = asked and len(sample_sizes(N, n_first)) > 1
    if sampled and (client is not None or em_cycles):
        raise ValueError("batch_size with optimizer='lbfgs' (the sampled L-BFGS) runs in this process "
                         "without EM cycles: drop batch_size, em_cycles or the Dask client")
    if max_epochs is not None and optimizer != "lbfgs":
        raise ValueError("max_epochs needs optimizer='lbfgs' (Adam stops on its step cap n_steps)")
    if resume is not None:
        if fingerprint is not None:
            check_fingerprint(resume.fingerprint, fingerprint)
        st = resume
        st.stopped, st.stop_rule = "", ""
    else:
        st = LaplaceFitState(mu=init.mu.copy(), W=init.W.copy(), rho=np.log(init.d), lr=lr)
    if fingerprint is not None:
        st.fingerprint = fingerprint
    st.optimizer = optimizer
    st.first_sample = int(n_first)
    if client is not None and (optimizer != "lbfgs" or em_cycles):
        raise ValueError("a Dask client / scheduler address needs optimizer='lbfgs' without EM cycles "
                         "(the blocked full-batch evaluation)")
    w0, c0 = time.perf_counter(), time.process_time()
    own_client = None
    if client is None:
        # full-batch evaluations by blocks of cells (memory bounded by a block beyond the warm
        # start); the EM needs every cell's posterior at once, so it evaluates unblocked
        ev = Evaluator(u, log_anchor, init.capture, ift=ift, truncation=truncation,
                       x_map=None if sampled else st.x_map, eta_map=None if sampled else st.eta_map,
                       block_cells=None if em_cycles else evaluation_block_cells(G))
    else:
        from .dask_client import connect
        from .outer.dask_eval import DaskEvaluator

        client, owned = connect(client)
        own_client = client if owned else None
        try:
            ev = DaskEvaluator(u, log_anchor, init.capture, client=client, ift=ift,
                               truncation=truncation, x_map=st.x_map, eta_map=st.eta_map,
                               block_cells=evaluation_block_cells(G), partitions=partitions)
        except BaseException:
            if own_client is not None:
                own_client.close()
            raise
    keep_client = False  # True: the Dask evaluator stays open for the final pass on the workers
    try:
        if em_cycles and resume is None and optimizer == "lbfgs":
            from .outer.em import squarem

            mu, W, d, _, _ = squarem(ev, st.mu, st.W, np.exp(st.rho), n_cycles=em_cycles)
            st.mu, st.W, st.rho = mu, W, np.log(d)
        if sampled:
            run_sampled(ev, st, n0=n_first, seed=seed, n_steps=n_steps, gtol=gtol, gap_tol=gap_tol,
                        max_epochs=max_epochs, checkpoint=checkpoint,
                        checkpoint_every=checkpoint_every, progress=progress)
        elif optimizer == "lbfgs":
            desc = "Laplace fit (L-BFGS)"
            if asked:  # the sampled path was asked for; its first sample is > N / 2
                desc = f"Laplace fit (L-BFGS, all cells: first sample {n_first} > N / 2)"
            run_lbfgs(ev, st, n_steps=n_steps, gtol=gtol, rule=StopRule(gap_tol=gap_tol),
                      checkpoint=checkpoint, checkpoint_every=checkpoint_every, progress=progress,
                      max_epochs=max_epochs, desc=desc)
        else:
            run_adam(ev, st, n_steps=n_steps, gtol=gtol, batch_size=batch_size, patience=patience,
                     rtol=rtol, seed=seed, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                     progress=progress)
        if client is not None and (checkpoint or not final):  # gathered from the workers
            st.x_map, st.eta_map = ev.x_map, ev.eta_map
        keep_client = client is not None and final
    finally:
        st.elapsed_s += time.perf_counter() - w0
        st.elapsed_cpu_s += time.process_time() - c0
        if client is not None and not keep_client:
            _close(ev, own_client)
    if checkpoint:  # the current iterate (with the optimiser's memory): a resume continues exactly
        st.save(checkpoint)
    if st.x_map is not None and st.x_map.shape[0] != N:  # stopped by a cap in a sampled phase: the
        st.x_map = st.eta_map = None  # MAPs are the sample's; the final posteriors start cold
    params = st.best_params(init.capture)
    if not final:
        return st, params
    if client is not None:
        try:
            fin = ev.final_posteriors(params, gtol=gtol, dtype=np.dtype(map_dtype))
        finally:
            _close(ev, own_client)
    else:
        # a warm start stored in map_dtype is overwritten in place (each block is read before it is
        # written); one of another dtype is read by blocks into a new array
        x0 = st.x_map
        reuse = x0 is not None and x0.dtype == np.dtype(map_dtype) and x0.flags.writeable
        fin = final_posteriors(u, params, log_anchor, x0=x0, eta0=st.eta_map, gtol=gtol,
                               block_cells=evaluation_block_cells(G), reuse_x0=reuse, map_dtype=map_dtype)
    st.x_map = st.eta_map = None  # consumed: the result's x_map holds the final MAPs
    return st, params, fin


def _close(ev, own_client) -> None:
    """Release the blocks held on the cluster, and the client if this fit opened it."""
    ev.close()
    if own_client is not None:
        own_client.close()
