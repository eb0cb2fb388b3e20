"""``pln_ref.fit``: one entry point for the PLN with capture (Laplace or VAE inference).

Capture settings. The prior eta_c ~ TruncN(log M0 - log L_c, sigma_M^2, low=0) needs M0 (the
prior median total mRNA per cell) and sigma_M:

- ``capture="auto"`` (default): M0 = median library size / ``capture_efficiency`` (default 0.1,
  a typical droplet capture efficiency) and sigma_M = 0.5. M0 fixes the absolute level of mu
  only: shifting log M0 by c shifts mu by about c and eta by about c (exactly, while eta stays
  away from its bound), and leaves Sigma, correlations and relative expression unchanged.
- ``capture=Capture(M0, sigma_M)`` or ``M0=..., sigma_M=...``: explicit settings.
- ``capture=None``: no capture (eta = 0). Library-size variation is then absorbed by x and shows
  up as a common positive covariance of all genes in Sigma.

The anchor L_c (the library size) is the cell's realised total counts by default (empirical Bayes,
``pln_ref.anchor``); pass ``library_size``
to use an exogenous anchor (as in simulation and SBC, see the notes on the capture prior).
"""

from __future__ import annotations

import time

import numpy as np

from .config import LaplaceConfig, VAEConfig, method_config
from .anchor import resolve_log_anchor
from .counts import CountMatrix
from .data import check_genes_cells, is_anndata
from .params import Capture

__all__ = ["fit", "resolve_capture"]


def resolve_capture(
    counts: np.ndarray | CountMatrix,
    capture="auto",
    *,
    M0: float | None = None,
    sigma_M: float | None = None,
    capture_efficiency: float = 0.1,
) -> Capture | None:
    """Turn the user's capture arguments into a ``Capture`` (or None); see module docstring."""
    if capture is None:
        if M0 is not None:
            raise ValueError("M0 given but capture=None: pass capture='auto' or drop M0")
        return None
    if isinstance(capture, Capture):
        if M0 is not None or sigma_M is not None:
            raise ValueError("give either capture=Capture(...) or M0/sigma_M, not both")
        return capture
    if capture != "auto":
        raise ValueError(f"capture must be 'auto', a pln_ref.Capture or None, got {capture!r}")
    if M0 is None:
        if not (0 < capture_efficiency <= 1):
            raise ValueError(f"capture_efficiency must be in (0, 1], got {capture_efficiency}")
        totals = counts.total_counts() if isinstance(counts, CountMatrix) else np.asarray(counts.sum(axis=1))
        M0 = float(np.median(totals)) / capture_efficiency
    return Capture(M0=M0, sigma_M=0.5 if sigma_M is None else sigma_M)


def fit(
    data,
    model: str = "pln",
    inference_method: str = "laplace",
    *,
    k: int = 10,
    layer: str | None = None,
    capture="auto",
    M0: float | None = None,
    sigma_M: float | None = None,
    capture_efficiency: float = 0.1,
    library_size=None,
    seed: int | None = None,
    progress: bool = True,
    config: LaplaceConfig | VAEConfig | None = None,
    vae_latent_dim: int | None = None,
    scheduler_address=None,
    **options,
):
    """Fit the PLN with capture to a count matrix.

    Parameters
    ----------
    data : (cells x genes) counts: numpy array, scipy.sparse matrix or AnnData (``layer``).
    model : only "pln".
    inference_method : "laplace" (per-cell Newton + outer optimisation of mu, W, d on the
        Laplace evidence, ``pln_ref.fit_laplace``) or "vae" (``pln_ref.vae``).
    k : rank of W (``vae_latent_dim`` is an alias).
    capture, M0, sigma_M, capture_efficiency, library_size : see module docstring.
    seed : the method's seed (default 0).
    config : the method's options as a ``pln_ref.LaplaceConfig`` / ``pln_ref.VAEConfig``.
    **options : fields of that config as keywords, e.g. ``n_steps``, ``batch_size``, ``lr``;
        Laplace also ``optimizer`` ("lbfgs" | "adam"), ``ift``, ``gtol``, ``checkpoint`` (an .npz
        written atomically during the fit), ``checkpoint_every``, ``resume`` (such a path to
        continue from; refused if written for other data), ``gap_tol``, ``raise_d``, ``map_dtype``
        ("float32" stores the result's N x G MAPs in half the memory); VAE
        ``hidden``, ``patience``, ... An option the method does not have raises ValueError;
        None means the method's default.
    scheduler_address : Laplace with L-BFGS only: the address of a running Dask scheduler (a
        ``distributed.Client`` is accepted too). The full-batch evaluations then run as one task per
        block of cells on its workers, which hold the blocks of counts and their MAPs
        (``pln_ref.outer.dask_eval``); the result equals the in-process fit. An address that cannot
        be reached raises ``pln_ref.dask_client.SchedulerUnreachableError`` (a ValueError).

    Returns a ``LaplaceResult`` or a ``VAEResult``; both follow ``pln_ref.PLNResult``.
    """
    if model != "pln":
        raise ValueError(f"model must be 'pln', got {model!r}")
    if inference_method not in ("laplace", "vae"):
        raise ValueError(f"inference_method must be 'laplace' or 'vae', got {inference_method!r}")
    cfg = method_config(inference_method, config, seed=seed, **options)
    if scheduler_address is not None and (inference_method != "laplace" or cfg.optimizer != "lbfgs"
                                          or cfg.em_cycles or cfg.batch_size is not None):
        raise ValueError("scheduler_address needs inference_method='laplace' with optimizer='lbfgs' "
                         "and no em_cycles or batch_size (the blocked full-batch evaluation)")
    if vae_latent_dim is not None:
        k = vae_latent_dim
    u, cap, log_anchor, names = _prepare(data, k, layer, capture, M0, sigma_M, capture_efficiency,
                                         library_size)
    anchor = "library_size argument" if library_size is not None else "realised total counts"
    if inference_method == "vae":
        from .vae import fit_vae

        res = fit_vae(u, k, capture=cap, log_anchor=log_anchor, progress=progress, config=cfg, **names)
        res.settings["anchor"] = anchor
        return res
    if scheduler_address is None:
        return _fit_laplace(u, k, cap, log_anchor, cfg, anchor=anchor, progress=progress, **names)
    from .dask_client import connect

    client, owned = connect(scheduler_address)  # before any work: an unreachable address fails fast
    try:
        return _fit_laplace(u, k, cap, log_anchor, cfg, anchor=anchor, progress=progress, client=client,
                            **names)
    finally:
        if owned:
            client.close()


def _names(data) -> dict:
    """gene_names / cell_names of an AnnData input (None otherwise; ``data.is_anndata``)."""
    if is_anndata(data):
        return {"gene_names": [str(g) for g in data.var_names], "cell_names": [str(c) for c in data.obs_names]}
    return {"gene_names": None, "cell_names": None}


def _prepare(data, k, layer, capture, M0, sigma_M, capture_efficiency, library_size):
    """Checked counts (a ``CountMatrix``: dense input stays as given, sparse input stays CSR, values
    checked block by block), the capture setting, log anchors and the names of the input."""
    names = _names(data)
    u = CountMatrix(data, layer=layer)
    N, G = u.shape
    if not (isinstance(k, (int, np.integer)) and 1 <= k < G):
        raise ValueError(f"k must be an integer with 1 <= k < G = {G} genes, got {k!r}")
    rep = check_genes_cells(u)
    if rep.n_zero_genes:
        mat = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
        raise ValueError(
            f"{rep.message()}: an all-zero gene has no identified mean (mu -> -inf); "
            f"remove such genes first, e.g. adata[:, np.asarray({mat}.sum(0)).ravel() > 0]"
        )
    cap = resolve_capture(u, capture, M0=M0, sigma_M=sigma_M, capture_efficiency=capture_efficiency)
    log_anchor = None
    if cap is not None or library_size is not None:
        if library_size is None and rep.n_zero_cells:
            raise ValueError(
                f"{rep.message()}: the capture prior is anchored on each cell's library size, "
                "which is 0 for these cells; remove them or pass library_size (CLI: --library-size OBS_COLUMN)"
            )
        log_anchor = resolve_log_anchor(u, library_size=library_size)
    return u, cap, log_anchor, names


def _fit_laplace(u, k, cap, log_anchor, cfg: LaplaceConfig, *, anchor, progress, gene_names, cell_names,
                 client=None):
    """Start (``pln_ref.outer.start``), outer optimisation (``optimize_globals``), final posteriors.

    A resumed fit keeps the wall and CPU time of its earlier runs (``wall_time_s``, ``cpu_time_s``
    count every run of the fit) and is refused if its checkpoint's data fingerprint differs."""
    from .fit_laplace import LaplaceFitState, data_fingerprint, optimize_globals
    from .outer.start import initial_globals
    from .results import LaplaceResult, evidence_outliers

    w0, c0 = time.time(), time.process_time()
    partitions = None
    if client is not None:  # the counts go to the workers once, for the start and every evaluation
        from .fit_laplace import evaluation_block_cells
        from .outer.dask_eval import DaskCounts

        partitions = DaskCounts(u, log_anchor, client, block_cells=evaluation_block_cells(u.shape[1]))
    try:
        start = initial_globals(u, k, cap, log_anchor, raise_d_start=cfg.raise_d, seed=cfg.seed,
                                partitions=partitions)
    except BaseException:
        if partitions is not None:
            partitions.close()
        raise
    init = start.params
    options = {"optimizer": cfg.optimizer, "ift": cfg.ift, "batch_size": cfg.batch_size,
               "raise_d": cfg.raise_d, "em_cycles": cfg.em_cycles}
    if cfg.batch_size is not None:
        options["seed"] = cfg.seed  # the minibatches / samples of cells
        if cfg.optimizer == "lbfgs":  # the first sample of the sampled L-BFGS
            options["min_sample_counts"] = cfg.min_sample_counts
    fingerprint = data_fingerprint(u, log_anchor, cap, k, options)
    state = None
    if cfg.resume is not None:
        state = LaplaceFitState.load(cfg.resume)
        from .outer.state import check_fingerprint

        check_fingerprint(state.fingerprint, fingerprint, path=f"checkpoint {cfg.resume}")
    resumed_at = None if state is None else int(state.step)
    earlier_wall = 0.0 if state is None else state.elapsed_s
    earlier_cpu = 0.0 if state is None else state.elapsed_cpu_s
    # with final=True: the final posteriors and evidence by blocks of cells, warm-started from the
    # optimiser's MAPs (in process, or on the Dask workers that hold them)
    st, params, (cells, evidence) = optimize_globals(
        u, init, log_anchor, n_steps=cfg.n_steps, lr=cfg.lr, batch_size=cfg.batch_size, ift=cfg.ift,
        seed=cfg.seed, gtol=cfg.gtol, checkpoint=cfg.checkpoint, checkpoint_every=cfg.checkpoint_every,
        resume=state, progress=progress, optimizer=cfg.optimizer, gap_tol=cfg.gap_tol,
        fingerprint=fingerprint, em_cycles=cfg.em_cycles, client=client, max_epochs=cfg.max_epochs,
        final=True, partitions=partitions, map_dtype=cfg.map_dtype,
        min_sample_counts=cfg.min_sample_counts,
    )
    history = np.asarray(st.history, dtype=float).reshape(-1, 3)
    objective = float(np.mean(evidence))
    outliers = evidence_outliers(evidence, u, cell_names, warn=True)
    settings = {
        "inference_method": "laplace", "k": k, **cfg.to_dict(),
        "capture": None if cap is None else {"M0": cap.M0, "sigma_M": cap.sigma_M},
        "anchor": anchor,
    }
    diagnostics = {
        "objective": objective, "steps": st.step, "stopped": st.stopped, "stop_rule": st.stop_rule,
        "epochs": float(st.epochs),  # L-BFGS: cells solved / N over all evaluations
        "phases": list(st.phases),  # sampled L-BFGS: cells, steps, epochs, rule of each phase
        # sampled L-BFGS: its first sample (batch_size raised to resolve the sparsest gene); no
        # phases with a first_sample means it exceeded N / 2 and the fit ran the full batch
        "first_sample": st.first_sample or None,
        "gap_estimate": float(st.gap_estimate),
        "wall_time_s": earlier_wall + (time.time() - w0),
        "cpu_time_s": earlier_cpu + (time.process_time() - c0),
        "optimizer_cpu_s": float(st.elapsed_cpu_s),  # the outer optimisation alone (all runs)
        "cells_converged": int(cells.converged.sum()), "max_grad_norm": float(cells.grad_norm.max()),
        "max_newton_iter": int(cells.n_iter.max()), "cells_on_bound": int(cells.on_bound.sum()),
        "resumed_from_step": resumed_at,
        "evidence_outliers": outliers,
        "start": start.info,
    }
    if client is not None:
        diagnostics["scheduler_address"] = str(client.scheduler.address)
    return LaplaceResult(params=params, cells=cells, history=history, settings=settings,
                         diagnostics=diagnostics, init=start.moments, gene_names=gene_names,
                         cell_names=cell_names)

