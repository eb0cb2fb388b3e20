"""The blocked full-batch Laplace evaluation as a map over blocks of cells on a Dask cluster.

``DaskEvaluator`` is an ``evaluate.Evaluator`` whose full-batch evaluation (``Evaluator._blocked``)
runs on Dask workers. At construction each block of ``block_cells`` cells is scattered once to the
workers: its counts (CSR rows if the ``CountMatrix`` holds CSR, dense float64 rows otherwise), its
slice of the log anchors and its sums sum_g log u_cg!. Each evaluation scatters the globals once
(broadcast, O(G k)) and submits one task per block, which runs the same code path as in process
(``Evaluator._solve``: ``laplace.newton_map`` warm-started from the block's MAPs, then
``laplace_terms``) and returns

- a small result to the client: l of the block's cells, the block's gradient sums, info_mu and
  lambda_sum, Newton iterations, cells on the bound and the worker's CPU seconds;
- the block's new MAPs (x*, eta*), which stay on the worker as a future: the warm start of the next
  evaluation of that block. As in process, the warm start is replaced only when the evaluation
  is finite (an evaluation that fails keeps the previous MAPs).

The client sums the small results (``evaluate._sum_terms``: the gradient and info_mu are sums over
cells, so the block sums are exact; identical blocks give the same numbers as in process).
``x_map`` / ``eta_map`` gather every block's MAPs only when read (``remote_maps`` tells
``lbfgs.run_lbfgs`` to read them at checkpoints and at the end, not at every accepted step).
Assigning them (e.g. a resumed fit's MAPs, or None for a cold start) scatters them before the
next evaluation.

The final pass (``DaskEvaluator.final_posteriors``, ``fit_laplace.optimize_globals(final=True)``)
is a map over the same blocks: each worker solves its blocks' final posteriors at the fitted globals
from the MAPs it holds (``outer.final.final_block``) and returns only what the result keeps (the
block's float64 MAPs, k x k factors, per-cell fields and evidence); the client copies the blocks
into the result one at a time. The warm starts are never gathered to the client.

Workers started by a Dask nanny (``dask worker`` without ``--no-nanny``, ``LocalCluster``) run with
``MALLOC_TRIM_THRESHOLD_=65536``, which disables glibc's dynamic mmap threshold: every large NumPy
temporary of ``newton_map`` is then a fresh mmap, measured 3x slower per block
(``validation/benchmarks/results/README.md``). Prefer ``dask worker ADDRESS --no-nanny``.
"""

from __future__ import annotations

import operator
from types import SimpleNamespace

import numpy as np
import scipy.sparse as sp

from ..lowrank import LowRankCov
from ..params import PLNParams
from .evaluate import WARM_START_DTYPE, Evaluation, Evaluator, LaplaceTerms, _blocked_evaluation

__all__ = ["DaskEvaluator"]

_UNSET = object()


def _block_task(data: tuple, maps: tuple | None, glob: tuple, capture, gtol: float, with_grad: bool,
                ift: bool, truncation: bool) -> tuple:
    """Worker side, one block: ((x_map, eta_map), (terms without adjoint pieces, cpu newton,
    cpu terms, Newton iterations, cells on the bound))."""
    u, la, lgam = data
    u = np.asarray(u.toarray(), dtype=np.float64) if sp.issparse(u) else u
    x0, e0 = (None, None) if maps is None else maps
    params = PLNParams(*glob, capture)
    cov = LowRankCov.from_params(params)
    # the in-process code path: Evaluator._solve reads only ift and truncation from its instance
    post, terms, cn, co = Evaluator._solve(SimpleNamespace(ift=ift, truncation=truncation), u, params,
                                           cov, la, x0, e0, gtol, with_grad, lgam)
    small = LaplaceTerms(terms.l, terms.grad, None, None, terms.info_mu, terms.lambda_sum)
    return (post.x_map.astype(WARM_START_DTYPE), post.eta_map), (small, cn, co, int(post.n_iter.sum()), int(post.on_bound.sum()))


def _final_task(data: tuple, maps: tuple | None, glob: tuple, capture, gtol: float, with_evidence: bool) -> dict:
    """Worker side, one block of the final pass: ``outer.final.final_block`` from the block's warm start."""
    from .final import final_block

    u, la, lgam = data
    u = np.asarray(u.toarray(), dtype=np.float64) if sp.issparse(u) else u
    x0, e0 = (None, None) if maps is None else maps
    params = PLNParams(*glob, capture)
    return final_block(u, params, la, x0, e0, gtol=gtol, cov=LowRankCov.from_params(params), lgamma_sum=lgam,
                       with_evidence=with_evidence)


class DaskEvaluator(Evaluator):
    """``Evaluator`` (same call interface, cache and counters) whose full-batch evaluations run
    block by block on the workers of a Dask ``client`` (module docstring).

    counts, log_anchor, capture, ift, truncation, x_map, eta_map: as ``Evaluator``.
    client : a ``distributed.Client`` with at least one worker.
    block_cells : cells per block (default ``fit_laplace.evaluation_block_cells(G)``, the
        in-process block size, so the blocks and hence the numbers match the in-process fit).
    Only full-batch evaluations (``cells=None``) are supported (L-BFGS); minibatches and the
    unblocked evaluation of the EM are refused. ``cpu_newton`` / ``cpu_objective`` sum the
    workers' process CPU seconds. Call ``close()`` to release the blocks on the cluster.
    """

    remote_maps = True  # x_map / eta_map are gathered from the workers when read

    def __init__(self, counts, log_anchor: np.ndarray | None, capture, *, client, ift: bool = True,
                 truncation: bool = True, x_map: np.ndarray | None = None,
                 eta_map: np.ndarray | None = None, block_cells: int | None = None) -> None:
        from ..dask_client import require_workers

        self.client = client
        self._maps: list | None = None  # per block: future of (x_map, eta_map), or None (cold)
        self._pending = [_UNSET, _UNSET]  # assigned x_map / eta_map not yet scattered
        self._gathered: tuple | None = None
        super().__init__(counts, log_anchor, capture, ift=ift, truncation=truncation, x_map=x_map,
                         eta_map=eta_map, block_cells=block_cells)
        N, G = self.u.shape
        if self.block_cells is None:
            from ..fit_laplace import evaluation_block_cells

            self.block_cells = evaluation_block_cells(G)
        require_workers(client)
        self.bounds = [(lo, min(N, lo + self.block_cells)) for lo in range(0, N, self.block_cells)]
        blocks = []
        for lo, hi in self.bounds:
            u = self.u._src[lo:hi] if self.u.storage == "csr" else self.u.block(lo, hi)
            la = None if log_anchor is None else np.array(log_anchor[lo:hi], dtype=float)
            blocks.append((u, la, self.lgam[lo:hi].copy()))
        self._data = client.scatter(blocks, hash=False)
        # each block's tasks are pinned (loosely) to the worker holding its counts: the MAPs they
        # produce stay there, so an evaluation moves only the globals and the small results
        who = client.who_has(self._data)
        self._homes = [list(who.get(f.key, ())) or None for f in self._data]
        self._maps = [None] * len(self.bounds)

    # ------------------------------------------------------------------ the MAPs on the workers
    @property
    def x_map(self) -> np.ndarray | None:
        """Every cell's x MAP (N, G), gathered from the workers (None before the first evaluation)."""
        return self._local_maps()[0]

    @x_map.setter
    def x_map(self, value) -> None:
        self._pending[0] = value

    @property
    def eta_map(self) -> np.ndarray | None:
        """Every cell's eta MAP (N,), gathered from the workers (None before the first evaluation)."""
        return self._local_maps()[1]

    @eta_map.setter
    def eta_map(self, value) -> None:
        self._pending[1] = value

    def _local_maps(self) -> tuple:
        if self._pending[0] is not _UNSET or self._pending[1] is not _UNSET:
            x = None if self._pending[0] is _UNSET else self._pending[0]
            e = None if self._pending[1] is _UNSET else self._pending[1]
            return x, e
        if self._maps is None or any(m is None for m in self._maps):
            return None, None
        if self._gathered is None:
            parts = self.client.gather(self._maps)
            self._gathered = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        return self._gathered

    def _sync_maps(self) -> None:
        """Scatter assigned MAPs (both arrays, or None for a cold start) to the blocks."""
        if self._pending[0] is _UNSET and self._pending[1] is _UNSET:
            return
        x, e = (None if p is _UNSET else p for p in self._pending)
        self._pending = [_UNSET, _UNSET]
        self._gathered = None
        if x is None or e is None:
            self._maps = [None] * len(self.bounds)
            return
        # keep a float32 warm start float32 (the in-process evaluator reads it as given)
        x, e = np.asarray(x, dtype=np.result_type(x, WARM_START_DTYPE)), np.asarray(e, dtype=float)
        self._maps = [self.client.scatter([(x[lo:hi].copy(), e[lo:hi].copy())], hash=False,
                                          workers=home)[0]
                      for (lo, hi), home in zip(self.bounds, self._homes)]

    # ------------------------------------------------------------------ evaluation
    def __call__(self, mu: np.ndarray, W: np.ndarray, d: np.ndarray, *, gtol: float = 1e-6,
                 with_grad: bool = True, cells: np.ndarray | None = None) -> Evaluation:
        if cells is not None:
            raise ValueError("DaskEvaluator evaluates all cells only (full batch; use optimizer='lbfgs')")
        return super().__call__(mu, W, d, gtol=gtol, with_grad=with_grad)

    def _blocked(self, key, params, cov, gtol, with_grad) -> Evaluation:
        """All cells as one task per block on the workers; the new MAPs stay there and replace the
        warm start only if the evaluation is finite."""
        self._sync_maps()
        c = self.client
        glob = c.scatter([(np.asarray(params.mu), np.asarray(params.W), np.asarray(params.d))],
                         broadcast=True, hash=False)[0]
        futs = [c.submit(_block_task, data, maps, glob, self.capture, gtol, with_grad, self.ift,
                         self.truncation, pure=False, workers=home, allow_other_workers=True)
                for data, maps, home in zip(self._data, self._maps, self._homes)]
        new_maps = [c.submit(operator.getitem, f, 0, pure=False) for f in futs]
        smalls = [c.submit(operator.getitem, f, 1, pure=False) for f in futs]
        del futs
        results = c.gather(smalls)  # re-raises a worker's exception (e.g. LinAlgError) here
        del smalls, glob
        parts, n_bound = [], 0
        for terms, cn, co, iters, nb in results:
            self.cpu_newton += cn
            self.cpu_objective += co
            self.newton_iters += iters
            n_bound += nb
            parts.append(terms)
        self.n_evals += 1
        self.cells_solved += self.N
        ev = _blocked_evaluation(parts, self.N, gtol, n_bound)
        if np.isfinite(ev.value):
            self._maps, self._gathered = new_maps, None
            self._last = (key, ev)
        return ev

    def final_posteriors(self, params: PLNParams, *, gtol: float = 1e-6, with_evidence: bool = True):
        """Every cell's final posterior and Laplace evidence at ``params`` (``outer.final.FinalPosteriors``,
        equal to ``outer.final.final_posteriors`` in process from the same warm start and blocks): one
        task per block on the worker holding its counts and MAPs; the results are fetched and copied
        into the result one block at a time (the client never holds the warm starts)."""
        from .final import assemble_final

        self._sync_maps()
        c = self.client
        glob = c.scatter([(np.asarray(params.mu), np.asarray(params.W), np.asarray(params.d))],
                         broadcast=True, hash=False)[0]
        futs = [c.submit(_final_task, data, maps, glob, params.capture, gtol, with_evidence, pure=False,
                         workers=home, allow_other_workers=True)
                for data, maps, home in zip(self._data, self._maps, self._homes)]
        del glob

        def blocks():
            for i, (lo, hi) in enumerate(self.bounds):
                part = futs[i].result()  # re-raises a worker's exception here
                futs[i] = None  # release the block's result on the cluster
                yield slice(lo, hi), part

        return assemble_final(params, blocks(), self.N, with_evidence=with_evidence)

    def ensure_maps(self, mu, W, d, gtol: float = 1e-6) -> None:
        """Cold-start every cell's MAP at these globals if no warm start exists yet (no gather)."""
        self._sync_maps()
        if any(m is None for m in self._maps):
            self(mu, W, d, gtol=gtol, with_grad=False)

    def close(self) -> None:
        """Release the blocks and MAPs held on the cluster (the evaluator is unusable afterwards)."""
        self._data, self._maps, self._gathered = [], None, None
        self.bounds = []
