"""The blocked full-batch Laplace evaluation as a map over partitions of cells on a Dask cluster.

``DaskCounts`` scatters the counts once, directly to the workers (not through the scheduler), in
partitions of whole evaluation blocks: about two partitions per worker by default
(``task_cells`` to set the size), each holding its counts (CSR rows if the ``CountMatrix``
holds CSR, dense float64 rows otherwise), its slice of the log anchors and its sums
sum_g log u_cg!. The method-of-moments start (``moments.moments_fit(partitions=...)``) runs its
passes over the counts there as map-reduces (column moments; the Gram matrix, or the products
of the truncated SVD), and the streamed factor analysis' operator by rows of genes split over
the workers; the client holds no N x G array.

``DaskEvaluator`` is an ``evaluate.Evaluator`` whose full-batch evaluation (``Evaluator._blocked``)
runs on those partitions. Each evaluation scatters the globals once (broadcast, O(G k)) and
submits one task per partition, which loops over the partition's blocks of ``block_cells``
cells with the in-process code (``Evaluator._solve``: ``laplace.newton_map`` warm-started from
the block's MAPs, then ``laplace_terms``; each block densified on its own) and returns

- a small result to the client: l of the partition's cells, its gradient sums, info_mu and
  rate_info (summed over its blocks), Newton iterations, cells on the bound and the worker's
  CPU seconds;
- the partition's new MAPs (x*, eta*), which stay on the worker as a future: the warm start of
  the next evaluation. As in process, the warm start is replaced only when the evaluation is
  finite (an evaluation that fails keeps the previous MAPs).

The client sums the partitions' results (``evaluate._sum_terms``: the gradient and info_mu are
sums over cells, so the sums are exact up to rounding; the blocks are the in-process ones, so the
numbers equal the in-process fit's up to the order of the sums). Large tasks keep the per-task
overhead and the scheduler's bookkeeping small: at G = 14,000 the blocks are 18 cells, 1,112 of
them for 20,000 cells, against 4 tasks per evaluation on 2 workers.
``x_map`` / ``eta_map`` gather the MAPs partition by partition only when read
(``remote_maps`` tells ``lbfgs.run_lbfgs`` to read them at checkpoints and at the end, not at
every accepted step). Assigning them (e.g. a resumed fit's MAPs, or None for a cold start)
scatters them before the next evaluation.

The final pass (``DaskEvaluator.final_posteriors``, ``fit_laplace.optimize_globals(final=True)``)
is a map over the same partitions: each worker solves its blocks' final posteriors at the fitted
globals from the MAPs it holds (``outer.final.final_block``) and returns only what the result
keeps (the partition's MAPs, k x k factors, per-cell fields and evidence); the client copies
each partition into the result as it completes, and the counts, warm starts and results of a
partition are released on the cluster as soon as they are used. The warm starts are never
gathered to the client.

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

from ..counts import centred_gram_sum, shifted_sums
from ..lowrank import LowRankCov
from ..params import PLNParams
from .evaluate import WARM_START_DTYPE, Evaluation, Evaluator, TermsSum, _blocked_evaluation

__all__ = ["DaskEvaluator", "DaskCounts"]

_UNSET = object()


def _packed_dtype(values: np.ndarray) -> np.dtype:
    """The smallest unsigned integer type that holds the (checked: non-negative integer) count
    values exactly; float64 beyond 2^32 - 1."""
    vmax = float(values.max()) if values.size else 0.0
    for dt in (np.uint8, np.uint16, np.uint32):
        if vmax <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.float64)


class PackedCounts:
    """The counts of a partition as a worker keeps them: exactly the checked counts (non-negative
    integers, ``counts.CountMatrix``) in the smallest unsigned integer type that holds them
    (``_packed_dtype``: uint16 for counts up to 65,535), as CSR when the fit's counts are sparse
    (column indices uint16 when G <= 65,536) or as dense rows otherwise. At 41% nonzeros, 4 bytes
    per nonzero instead of the 12 of int64 / float64 CSR (8 bytes per entry of dense float64 rows).
    ``dense(lo, hi)``: rows lo:hi as a new float64 array (the values the in-process fit reads);
    ``csr(lo, hi)``: as a float64 CSR matrix."""

    def __init__(self, rows) -> None:
        if sp.issparse(rows):
            rows = sp.csr_array(rows, copy=True)
            rows.sum_duplicates()
            vals = np.asarray(rows.data, dtype=np.float64)
            self.data = vals.astype(_packed_dtype(vals))
            G = rows.shape[1]
            self.indices = rows.indices.astype(np.uint16 if G <= 1 << 16 else np.int64 if G > 2**31 - 1 else np.int32)
            self.indptr = rows.indptr.astype(np.int64)
            self.sparse = True
        else:
            vals = np.asarray(rows, dtype=np.float64)
            self.data = np.ascontiguousarray(vals.astype(_packed_dtype(vals)))
            self.indices = self.indptr = None
            self.sparse = False
        self.shape = tuple(int(n) for n in rows.shape)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.data, self.indices, self.indptr) if a is not None)

    def dense(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Rows lo:hi as a new dense float64 array."""
        hi = self.shape[0] if hi is None else min(hi, self.shape[0])
        if not self.sparse:
            return self.data[lo:hi].astype(np.float64)
        return self.csr(lo, hi).toarray()

    def csr(self, lo: int = 0, hi: int | None = None) -> sp.csr_array:
        """Rows lo:hi (CSR storage only) as a float64 CSR matrix (int32 / int64 indices)."""
        hi = self.shape[0] if hi is None else min(hi, self.shape[0])
        a, b = int(self.indptr[lo]), int(self.indptr[hi])
        idx = np.int32 if self.shape[1] <= 2**31 - 1 and b - a <= 2**31 - 1 else np.int64
        return sp.csr_array((self.data[a:b].astype(np.float64), self.indices[a:b].astype(idx),
                             (self.indptr[lo:hi + 1] - a).astype(idx)), shape=(hi - lo, self.shape[1]))


def _partition_task(data: tuple, maps: tuple | None, glob: tuple, capture, gtol: float, with_grad: bool,
                    ift: bool, truncation: bool, block_cells: int, dec_tol: float | None = None) -> tuple:
    """Worker side, one partition of cells: the in-process blocked evaluation
    (``Evaluator._blocked``) of its blocks of ``block_cells`` cells in order, each densified on its
    own. Returns ((x_map float32, eta_map) of the partition, (terms with l and the gradient,
    info_mu, rate_info summed over the partition's blocks, cpu newton, cpu terms, Newton
    iterations, cells on the bound))."""
    u_p, la, lgam = data
    n, G = u_p.shape
    x0, e0 = (None, None) if maps is None else maps
    params = PLNParams(*glob, capture)
    cov = LowRankCov.from_params(params)
    solver = SimpleNamespace(ift=ift, truncation=truncation)  # Evaluator._solve reads only these
    x_new, e_new = np.empty((n, G), dtype=WARM_START_DTYPE), np.empty(n)
    acc, cn, co, iters, nb = TermsSum(), 0.0, 0.0, 0, 0
    for lo in range(0, n, block_cells):
        sl = slice(lo, min(n, lo + block_cells))
        pick = lambda a: None if a is None else a[sl]  # noqa: E731
        post, terms, a, b = Evaluator._solve(solver, u_p.dense(sl.start, sl.stop), params, cov, pick(la), pick(x0),
                                             pick(e0), gtol, with_grad, lgam[sl], dec_tol)
        x_new[sl], e_new[sl] = post.x_map, post.eta_map
        cn, co = cn + a, co + b
        iters += int(post.n_iter.sum())
        nb += int(post.on_bound.sum())
        acc.add(terms)  # summed as it comes (``evaluate.TermsSum``)
        del post, terms
    return (x_new, e_new), (acc.terms(), cn, co, iters, nb)


def _final_partition_task(data: tuple, maps: tuple | None, glob: tuple, capture, gtol: float,
                          with_evidence: bool, block_cells: int, dtype) -> dict:
    """Worker side, one partition of the final pass: ``outer.final.final_block`` of each of its
    blocks from the warm start, joined into one dict (x_map in ``dtype``)."""
    from .final import final_block

    u_p, la, lgam = data
    n, G = u_p.shape
    x0, e0 = (None, None) if maps is None else maps
    params = PLNParams(*glob, capture)
    cov = LowRankCov.from_params(params)
    x_map, out = np.empty((n, G), dtype=dtype), {}
    for lo in range(0, n, block_cells):
        sl = slice(lo, min(n, lo + block_cells))
        pick = lambda a: None if a is None else a[sl]  # noqa: E731
        part = final_block(u_p.dense(sl.start, sl.stop), params, pick(la), pick(x0), pick(e0), gtol=gtol, cov=cov,
                           lgamma_sum=lgam[sl], with_evidence=with_evidence)
        x_map[sl] = part.pop("x_map")
        for key, val in part.items():
            out.setdefault(key, []).append(val)
        del part
    out = {key: None if any(v is None for v in vals) else np.concatenate(vals) for key, vals in out.items()}
    out["x_map"] = x_map
    return out


# ---------------------------------------------------------------- the method of moments' passes
def _dense_blocks(u_p: PackedCounts, block_size: int):
    """Dense float64 copies of a partition's rows, ``block_size`` cells at a time."""
    for lo in range(0, u_p.shape[0], block_size):
        yield u_p.dense(lo, lo + block_size)


def _moments_task(data: tuple, shift: np.ndarray, block_size: int) -> tuple:
    """Worker side: ``counts.shifted_sums`` of a partition by dense blocks of ``block_size`` cells
    (the sums of ``CountMatrix.column_moments``)."""
    return shifted_sums(_dense_blocks(data[0], block_size), shift)


def _gram_task(data: tuple, mean: np.ndarray, block_size: int) -> np.ndarray:
    """Worker side: ``counts.centred_gram_sum`` of a partition by dense blocks
    (``CountMatrix.centred_gram``)."""
    return centred_gram_sum(_dense_blocks(data[0], block_size), mean)


def _gather(client, futures):
    """``client.gather(futures, direct=True)``: results come from the workers straight to the client.
    Dask's default for a client outside the cluster is to gather through the scheduler, which then
    holds each result in flight (at 20,000 x 14,000 a final-pass partition's MAPs, 0.56 GB: the
    scheduler's 0.75 GB high-water mark). The counts are scattered directly too, so the client
    must reach the workers in any case."""
    return client.gather(futures, direct=True)


_ROWS = 1024  # rows of a partition made float64 at a time by the start's products


def _matmul_task(data: tuple, V: np.ndarray) -> np.ndarray:
    """Worker side: u_p @ V (CSR products, or dense float64 rows), ``_ROWS`` rows at a time (each
    row's product is computed as over the whole partition)."""
    u_p = data[0]
    out = np.empty((u_p.shape[0], V.shape[1]))
    for lo in range(0, u_p.shape[0], _ROWS):
        blk = u_p.csr(lo, lo + _ROWS) if u_p.sparse else u_p.dense(lo, lo + _ROWS)
        out[lo:lo + _ROWS] = np.asarray(blk @ V)
    return out


def _rmatmul_task(data: tuple, Y: np.ndarray) -> np.ndarray:
    """Worker side: u_p^T @ Y_p (CSR: one float64 CSR product over the partition; dense: summed
    over ``_ROWS`` rows at a time)."""
    u_p = data[0]
    if u_p.sparse:
        return np.asarray(u_p.csr().T @ Y)
    out = np.zeros((u_p.shape[1], Y.shape[1]))
    for lo in range(0, u_p.shape[0], _ROWS):
        out += u_p.dense(lo, lo + _ROWS).T @ Y[lo:lo + _ROWS]
    return out


def _fa_rows_task(Qr: np.ndarray, X: np.ndarray, lo: int, hi: int, block: int, inv: tuple,
                  count: bool) -> tuple:
    """Worker side, gene rows lo:hi of the streamed factor analysis' operator: (rows of
    Sigma_hat X, clamped entries) by ``moments.fa_rows``, the same row blocks as in process."""
    from ..moments import _offdiag_inverter, fa_rows

    return fa_rows(Qr, X, lo, hi, block, _offdiag_inverter(*inv), count)


class DaskCounts:
    """The counts of a fit scattered once to the workers of a Dask ``client``, in partitions of
    whole evaluation blocks (``block_cells`` cells each), about ``tasks_per_worker`` partitions per
    worker unless ``task_cells`` is given. Each partition holds its counts (CSR rows if the
    ``CountMatrix`` holds CSR, dense float64 rows otherwise), its slice of the log anchors and its
    sums sum_g log u_cg!, scattered directly to its worker (not through the scheduler), one
    partition at a time. The partitions serve the method-of-moments start
    (``column_moments``, ``operator``, ``fa_apply``) and every evaluation of ``DaskEvaluator``.
    """

    def __init__(self, counts, log_anchor: np.ndarray | None, client, *, block_cells: int,
                 task_cells: int | None = None, tasks_per_worker: int = 2) -> None:
        from ..counts import CountMatrix
        from ..dask_client import require_workers

        self.u = CountMatrix(counts)
        self.client = client
        N, G = self.N, self.G = self.u.shape
        self.block_cells = int(block_cells)
        require_workers(client)
        workers = sorted(client.scheduler_info().get("workers", {}))
        n_blocks = -(-N // self.block_cells)
        if task_cells is None:
            per = -(-n_blocks // max(1, tasks_per_worker * len(workers)))
        else:
            per = max(1, -(-int(task_cells) // self.block_cells))
        self.task_cells = per * self.block_cells
        self.bounds = [(lo, min(N, lo + self.task_cells)) for lo in range(0, N, self.task_cells)]
        lgam = self.u.lgamma_sums()
        self.data, self.homes = [], []
        for i, (lo, hi) in enumerate(self.bounds):
            w = workers[(i * len(workers)) // len(self.bounds)]
            u = PackedCounts(self.u._src[lo:hi] if self.u.storage == "csr" else self.u.block(lo, hi))
            la = None if log_anchor is None else np.array(log_anchor[lo:hi], dtype=float)
            fut = client.scatter([(u, la, lgam[lo:hi].copy())], workers=[w], direct=True, hash=False)[0]
            del u
            self.data.append(fut)
            self.homes.append([w])

    def submit(self, fn, i: int, *args):
        """``fn(data of partition i, *args)`` on partition i's worker (no stealing: the data stay)."""
        return self.client.submit(fn, self.data[i], *args, pure=False, workers=self.homes[i],
                                  allow_other_workers=False)

    def column_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-gene sample mean and variance (ddof=1), as ``CountMatrix.column_moments`` (same
        shift, sums by partitions)."""
        u, N = self.u, self.N
        shift = u.block(0, min(N, u.block_size)).mean(axis=0)
        parts = _gather(self.client, [self.submit(_moments_task, i, shift, u.block_size)
                                    for i in range(len(self.bounds))])
        s1, s2 = sum(p[0] for p in parts), sum(p[1] for p in parts)
        mean = s1 / N
        var = (s2 - N * mean * mean) / (N - 1) if N > 1 else np.zeros(self.G)
        return mean + shift, var

    @property
    def shape(self) -> tuple[int, int]:
        return self.u.shape

    def centred_gram(self, mean: np.ndarray) -> np.ndarray:
        """(u - 1 mean^T)^T (u - 1 mean^T) (G, G), summed over the partitions on the workers."""
        futs = [self.submit(_gram_task, i, mean, self.u.block_size) for i in range(len(self.bounds))]
        out = None
        for f in futs:  # one G x G partial at a time in the client
            part = _gather(self.client, f)
            out = part if out is None else out.__iadd__(part)
            del part
        return out

    def matmul(self, V: np.ndarray) -> np.ndarray:
        """u @ V (N, r) on the workers (each row's product as in process)."""
        V = np.asarray(V, dtype=np.float64)
        out = _gather(self.client, [self.submit(_matmul_task, i, V) for i in range(len(self.bounds))])
        return np.concatenate(out, axis=0)

    def rmatmul(self, Y: np.ndarray) -> np.ndarray:
        """u^T @ Y (G, r) on the workers (summed over partitions)."""
        Y = np.asarray(Y, dtype=np.float64)
        futs = [self.submit(_rmatmul_task, i, Y[lo:hi]) for i, (lo, hi) in enumerate(self.bounds)]
        return sum(_gather(self.client, futs))

    def fa_apply(self, Qr: np.ndarray, block: int, inv: tuple):
        """``apply(X, count)`` -> (Sigma_hat X, clamped entries) of ``moments._fa_streamed`` with its
        gene rows split over the workers (one task per worker per call; ``count``: count the
        clamped entries, else 0)."""
        c = self.client
        workers = sorted({w for h in self.homes for w in h})
        G = Qr.shape[0]
        nb = -(-G // block)
        cuts = [min(G, ((j * nb) // len(workers)) * block) for j in range(len(workers) + 1)]
        fut_Q = c.scatter(Qr, broadcast=True, hash=False, direct=True)
        fut_inv = c.scatter([inv], broadcast=True, hash=False, direct=True)[0]

        def apply(X, count=True):
            X = np.asarray(X)
            futs = [c.submit(_fa_rows_task, fut_Q, X, cuts[j], cuts[j + 1], block, fut_inv, count, pure=False,
                             workers=[w], allow_other_workers=True)
                    for j, w in enumerate(workers) if cuts[j + 1] > cuts[j]]
            parts = _gather(c, futs)
            return np.concatenate([p[0] for p in parts], axis=0), sum(p[1] for p in parts)

        return apply

    def close(self) -> None:
        """Release the partitions on the cluster."""
        self.data, self.homes, self.bounds = [], [], []


class DaskEvaluator(Evaluator):
    """``Evaluator`` (same call interface, cache and counters) whose full-batch evaluations run
    on the workers of a Dask ``client``, one task per partition of cells (module docstring).

    counts, log_anchor, capture, ift, truncation, x_map, eta_map: as ``Evaluator``.
    client : a ``distributed.Client`` with at least one worker.
    block_cells : cells per Newton block (default ``fit_laplace.evaluation_block_cells(G)``, the
        in-process block size, so the blocks and hence the numbers match the in-process fit).
    task_cells : cells per task (a partition of whole blocks; default about two tasks per worker).
    partitions : a ``DaskCounts`` of these counts already on the cluster (e.g. the one the start
        used; its ``block_cells`` is then used), else one is made here.
    Only full-batch evaluations (``cells=None``) are supported (L-BFGS); minibatches and the
    unblocked evaluation of the EM are refused. ``cpu_newton`` / ``cpu_objective`` sum the
    workers' process CPU seconds. Call ``close()`` to release the partitions on the cluster.
    """

    remote_maps = True  # x_map / eta_map are gathered from the workers when read

    def __init__(self, counts, log_anchor: np.ndarray | None, capture, *, client, ift: bool = True,
                 truncation: bool = True, x_map: np.ndarray | None = None,
                 eta_map: np.ndarray | None = None, block_cells: int | None = None,
                 task_cells: int | None = None, partitions: DaskCounts | None = None) -> None:
        self.client = client
        self._maps: list | None = None  # per partition: future of (x_map, eta_map), or None (cold)
        self._pending = [_UNSET, _UNSET]  # assigned x_map / eta_map not yet scattered
        self._gathered: tuple | None = None
        if partitions is not None:
            block_cells = partitions.block_cells
        super().__init__(counts, log_anchor, capture, ift=ift, truncation=truncation, x_map=x_map,
                         eta_map=eta_map, block_cells=block_cells)
        N, G = self.u.shape
        if self.block_cells is None:
            from ..fit_laplace import evaluation_block_cells

            self.block_cells = evaluation_block_cells(G)
        if partitions is None:
            partitions = DaskCounts(self.u, log_anchor, client, block_cells=self.block_cells,
                                    task_cells=task_cells)
        elif partitions.u.shape != (N, G):
            raise ValueError(f"partitions hold {partitions.u.shape} counts, the evaluator {(N, G)}")
        self.parts = partitions
        self.bounds = partitions.bounds
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
            N, G = self.u.shape
            x, e = np.empty((N, G), dtype=WARM_START_DTYPE), np.empty(N)
            for (lo, hi), f in zip(self.bounds, self._maps):  # one partition at a time
                x[lo:hi], e[lo:hi] = _gather(self.client, f)
            self._gathered = (x, e)
        return self._gathered

    def _sync_maps(self) -> None:
        """Scatter assigned MAPs (both arrays, or None for a cold start) to the partitions."""
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
        self._maps = [self.client.scatter([(x[lo:hi].copy(), e[lo:hi].copy())], hash=False, direct=True,
                                          workers=home)[0]
                      for (lo, hi), home in zip(self.bounds, self.parts.homes)]

    def _glob(self, params: PLNParams):
        return self.client.scatter([(np.asarray(params.mu), np.asarray(params.W), np.asarray(params.d))],
                                   broadcast=True, hash=False, direct=True)[0]

    # ------------------------------------------------------------------ evaluation
    def __call__(self, mu: np.ndarray, W: np.ndarray, d: np.ndarray, *, gtol: float = 1e-6,
                 with_grad: bool = True, cells: np.ndarray | None = None,
                 dec_tol: float | None = None) -> Evaluation:
        if cells is not None:
            raise ValueError("DaskEvaluator evaluates all cells only (full batch; use optimizer='lbfgs')")
        return super().__call__(mu, W, d, gtol=gtol, with_grad=with_grad, dec_tol=dec_tol)

    def _blocked(self, key, params, cov, gtol, with_grad, dec_tol=None) -> Evaluation:
        """All cells as one task per partition on the workers; the new MAPs stay there and replace
        the warm start only if the evaluation is finite."""
        self._sync_maps()
        c = self.client
        glob = self._glob(params)
        futs = [self.parts.submit(_partition_task, i, maps, glob, self.capture, gtol, with_grad, self.ift,
                                  self.truncation, self.block_cells, dec_tol)
                for i, maps in enumerate(self._maps)]
        new_maps = [c.submit(operator.getitem, f, 0, pure=False, workers=h, allow_other_workers=False)
                    for f, h in zip(futs, self.parts.homes)]
        smalls = [c.submit(operator.getitem, f, 1, pure=False, workers=h, allow_other_workers=False)
                  for f, h in zip(futs, self.parts.homes)]
        del futs
        results = _gather(c, smalls)  # re-raises a worker's exception (e.g. LinAlgError) here
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
        ev = _blocked_evaluation(parts, self.N, gtol, n_bound, dec_tol)
        if np.isfinite(ev.value):
            self._maps, self._gathered = new_maps, None
            self._remember(key, ev, params)
        return ev

    def final_posteriors(self, params: PLNParams, *, gtol: float = 1e-6, with_evidence: bool = True,
                         dtype=np.float64):
        """Every cell's final posterior and Laplace evidence at ``params`` (``outer.final.FinalPosteriors``,
        equal to ``outer.final.final_posteriors`` in process from the same warm start and blocks): one
        task per partition on the worker holding its counts and MAPs. The results are copied into
        the result as they complete (x_map in ``dtype``, float64 by default), and each partition's
        counts, warm start and result are released on the cluster once used: the client never
        holds the warm starts, and the workers' memory falls as the pass proceeds. The evaluator
        is unusable afterwards (``close``)."""
        from distributed import as_completed

        from .final import assemble_final

        self._sync_maps()
        c = self.client
        glob = self._glob(params)
        futs = [self.parts.submit(_final_partition_task, i, maps, glob, params.capture, gtol, with_evidence,
                                  self.block_cells, dtype)
                for i, maps in enumerate(self._maps)]
        index = {f.key: i for i, f in enumerate(futs)}
        # the counts and warm starts are released as soon as their partition's task has run
        self._maps, self._gathered = [None] * len(self.bounds), None
        self.parts.close()
        del glob

        def blocks():
            for f in as_completed(futs):
                i = index[f.key]
                part = _gather(c, f)  # re-raises a worker's exception here
                futs[i] = None  # release the partition's result on the cluster
                del f
                yield slice(*self.bounds[i]), part

        N, G = self.u.shape
        return assemble_final(params, blocks(), N, x_map=np.empty((N, G), dtype=dtype),
                              with_evidence=with_evidence)

    def ensure_maps(self, mu, W, d, gtol: float = 1e-6) -> None:
        """Cold-start every cell's MAP at these globals if no warm start exists yet (no gather)."""
        self._sync_maps()
        if any(m is None for m in self._maps):
            self(mu, W, d, gtol=gtol, with_grad=False)

    def close(self) -> None:
        """Release the partitions and MAPs held on the cluster (the evaluator is unusable afterwards)."""
        self._maps, self._gathered = None, None
        self.parts.close()
        self.bounds = []
