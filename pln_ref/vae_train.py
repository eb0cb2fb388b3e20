"""Training loop of the PLN VAE: minibatches, warm-started local sweeps, early stopping.

``train`` runs AdamW on -mean ELBO over minibatches of the training cells and evaluates the
held-out ELBO per cell every ``eval_every`` steps (and at the last step); once KL annealing has
finished, ``EarlyStopping`` stops when it has not improved by more than ``tol`` for ``patience``
evaluations and keeps the best state. See ``pln_ref.vae`` for the model and the stopping policy.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import VAEConfig
from .counts import CountMatrix
from .exceptions import TrainingDivergedError

__all__ = ["TrainData", "EarlyStopping", "TrainLog", "train"]

_EVAL_BATCH = 256


@dataclass
class TrainData:
    """Counts (N, G) as a ``CountMatrix`` (a minibatch is read as dense rows when drawn: no dense
    N x G copy), log1p library sizes, capture prior means PM (or None) and the split."""

    counts: CountMatrix
    loglib: torch.Tensor
    PM: torch.Tensor | None
    tr_idx: torch.Tensor
    val_idx: torch.Tensor

    def rows(self, j):
        """(counts, log library size, prior mean) of the cells ``j``."""
        u = torch.from_numpy(self.counts.rows(np.asarray(j, dtype=np.intp)))
        return u, self.loglib[j], None if self.PM is None else self.PM[j]

    def held_out_elbo(self, model) -> float:
        """Mean ELBO per cell of the validation cells (the training cells when there are none)."""
        idx = self.val_idx if len(self.val_idx) > 0 else self.tr_idx
        tot = 0.0
        with torch.no_grad():
            for i in range(0, len(idx), _EVAL_BATCH):
                e, _, _ = model(*self.rows(idx[i:i + _EVAL_BATCH]))
                tot += float(e.sum())
        return tot / len(idx)


@dataclass
class EarlyStopping:
    """Stop when the held-out ELBO has not improved by more than ``tol`` for ``patience``
    evaluations; keeps a copy of the best model state."""

    tol: float
    patience: int
    best: float = -math.inf
    best_state: dict | None = None
    bad: int = 0

    def update(self, value: float, model) -> bool:
        """Record one evaluation; True when training should stop."""
        if value > self.best + self.tol:
            self.best, self.bad = value, 0
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.bad += 1
        return self.bad >= self.patience


@dataclass
class TrainLog:
    """Training ELBO per step, (step, held-out ELBO) per evaluation, where and why it stopped."""

    elbo: list = field(default_factory=list)
    val_elbo: list = field(default_factory=list)
    stopped_step: int = 0
    stopped_early: bool = False
    stopping: EarlyStopping | None = None


class _LocalCache:
    """Per-cell warm start of the closed-form (r, v) sweeps during training (N x G memory)."""

    def __init__(self, N: int, G: int):
        self.w_r = torch.zeros(N, G, dtype=torch.float64)
        self.visited = torch.zeros(N, dtype=torch.bool)

    def get(self, j):
        return self.w_r[j] if bool(self.visited[j].all()) else None

    def put(self, j, st) -> None:
        if st.w_r is not None:
            self.w_r[j] = st.w_r
            self.visited[j] = True


def _batches(tr_idx: torch.Tensor, batch_size: int, gen: torch.Generator):
    """Endless minibatches: a fresh permutation of the training cells whenever one runs out."""
    n = len(tr_idx)
    order, pos = tr_idx[torch.randperm(n, generator=gen)], 0
    while True:
        if pos + batch_size > n:
            order, pos = tr_idx[torch.randperm(n, generator=gen)], 0
        yield order[pos:pos + batch_size]
        pos += batch_size


def _optimizer(model, cfg: VAEConfig):
    """AdamW with weight decay on the encoder only (never on the decoder mu, W, rho)."""
    dec = {id(model.mu), id(model.W), id(model.rho)}
    groups = [{"params": [q for q in model.parameters() if q.requires_grad and id(q) not in dec],
               "weight_decay": float(cfg.encoder_weight_decay)},
              {"params": [q for q in model.parameters() if q.requires_grad and id(q) in dec],
               "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)


def _progress_bar(total: int, progress: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, disable=not progress, desc="VAE", leave=False)


def _step(model, opt, data: TrainData, j, beta: float, cache: _LocalCache | None, warm_rounds: int) -> float:
    """One AdamW step on the minibatch ``j``; returns its mean full (beta = 1) ELBO per cell."""
    warm = None if cache is None else cache.get(j)
    elbo, terms, st = model(*data.rows(j), beta=beta, w_r=warm,
                            n_rounds=None if warm is None else warm_rounds)
    if cache is not None:
        cache.put(j, st)
    opt.zero_grad()
    (-elbo.mean()).backward()
    opt.step()
    return float((terms["rec"] - terms["kl_z"] - terms["kl_e"] + terms["eta"]).mean().detach())


def _count_extremes(counts: CountMatrix) -> tuple[float, int, int, float]:
    """(largest count, its cell, its gene (first in row-major order), median nonzero count), by
    blocks of cells."""
    top, c, g, nonzero = -1.0, 0, 0, []
    for sl, ub in counts.blocks():
        f = int(np.argmax(ub))
        if ub.flat[f] > top:
            top, (c, g) = float(ub.flat[f]), divmod(sl.start * ub.shape[1] + f, ub.shape[1])
        nonzero.append(ub[ub > 0])
    vals = np.concatenate(nonzero)
    return top, c, g, float(np.median(vals)) if vals.size else 0.0


def _diverged(step: int, cfg: VAEConfig, data: TrainData, what: str) -> TrainingDivergedError:
    """The error of a training run that became non-finite at ``step`` (1-based): where, the
    largest count of the data (extreme counts are the usual cause) and what to try."""
    top, c, g, med = _count_extremes(data.counts)
    return TrainingDivergedError(
        f"VAE training diverged at step {step} of n_steps={cfg.n_steps}: {what}. The largest count is "
        f"{top:.3g} (cell {c}, gene {g}; median nonzero count {med:.3g}). Try "
        "inference_method='laplace' (CLI --method laplace; its per-cell Newton steps stay finite on "
        "such counts), remove or cap outlier entries, or a smaller learning rate "
        f"(lr={cfg.lr / 10:.2g}, CLI --lr {cfg.lr / 10:.2g}; it may only delay the divergence)")


def _finite_parameters(model) -> bool:
    return all(bool(torch.isfinite(q).all()) for q in model.parameters())


def train(model, data: TrainData, cfg: VAEConfig, gen: torch.Generator, *, progress: bool = True) -> TrainLog:
    """Train ``model`` in place for at most ``cfg.n_steps`` steps (early stopping: module docstring).

    Raises ``pln_ref.exceptions.TrainingDivergedError`` (saying at which step, and what to try)
    as soon as the training ELBO, the held-out ELBO or a parameter becomes NaN or infinite."""
    n_steps = cfg.n_steps
    opt = _optimizer(model, cfg)
    cache = (_LocalCache(*data.counts.shape)
             if (cfg.cache_local and model.residual == "laplace" and model.family == "meanfield") else None)
    stopping = EarlyStopping(cfg.tol, cfg.patience)
    batches = _batches(data.tr_idx, min(cfg.batch_size, len(data.tr_idx)), gen)
    log = TrainLog(stopped_step=n_steps, stopping=stopping)
    bar = _progress_bar(n_steps, progress)
    for step in range(n_steps):
        beta = 1.0 if cfg.kl_anneal_steps <= 0 else min(1.0, (step + 1) / cfg.kl_anneal_steps)
        full = _step(model, opt, data, next(batches), beta, cache, cfg.warm_rounds)
        if not math.isfinite(full) or not _finite_parameters(model):
            if bar is not None:
                bar.close()
            raise _diverged(step + 1, cfg, data, f"the training ELBO is {full:.4g}" if not math.isfinite(full)
                            else "a parameter became NaN or infinite")
        log.elbo.append(full)
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(elbo=f"{full:.2f}", best_val=f"{stopping.best:.2f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == n_steps:
            ve = data.held_out_elbo(model)
            if not math.isfinite(ve):
                if bar is not None:
                    bar.close()
                raise _diverged(step + 1, cfg, data, f"the held-out ELBO is {ve:.4g}")
            log.val_elbo.append((step + 1, ve))
            if beta >= 1.0 and stopping.update(ve, model):
                log.stopped_step, log.stopped_early = step + 1, True
                break
    if bar is not None:
        bar.close()
    return log
