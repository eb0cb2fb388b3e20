"""Choosing the rank k of W by held-out log-likelihood (``select_rank``, ``pln-ref select``).

For every candidate k and every fold f the model is fitted (Laplace, ``pln_ref.fit``) on the
training cells and each held-out cell c is scored under the fitted globals by
``score_samples`` (default: its Laplace evidence; ``score="is"``: importance sampling), giving
l_c(k) ~ log p(u_c | theta_k). Splits: ``holdout=0.2`` (one random 80/20 split of the cells) or
``folds=5`` (K-fold cross-validation: every cell is held out exactly once). Per k the table has

* ``heldout_mean`` = mean_c l_c(k) over all held-out cells, with its between-cell SE;
* ``diff_vs_best`` = mean_c [l_c(k) - l_c(k*)] and ``paired_se`` = sd_c(l_c(k) - l_c(k*)) / sqrt(n)
  (k* the best k; the same cells score every k, so the paired SE is the right yardstick);
* ``train_evidence``: the fit's objective (mean Laplace log evidence per training cell, averaged
  over folds); ``bic`` = -2 sum_c(train evidence) + p log n_train (averaged over folds), with
  p = 2G + Gk - k(k-1)/2 free parameters (mu, d, and W up to rotation);
* CPU and wall time of the fits.

The chosen k is the *smallest* k whose held-out mean is within one paired SE of the best
(``diff_vs_best >= -paired_se``): the one-standard-error rule.

``sigma_M`` (the SD of the capture prior, ``Capture``) can be chosen the same way: given a list of
values, every (k, sigma_M) is fitted and scored on the same held-out cells, the table has one row
per pair, and the choice is the smallest k with some sigma_M within one paired SE of the best pair,
with the best sigma_M at that k (``chosen_sigma_M``). The anchor L_c is the cell's realised total
count by default, so the prior of eta is centred on the data (an empirical-Bayes plug-in, see the
seed notes) and its SD is a modelling choice the held-out likelihood can judge: measured on real
scRNA counts (2000 x 200, k = 20, 400 held-out cells, importance sampling), sigma_M = 0.05 scores
+0.99 (top 200 genes) and +1.01 nats/cell (200 random genes) above the default 0.5
(``validation/benchmarks/bench_heldout.py --sigma-M``).

With ``out`` every (k, fold) writes its scores atomically to ``out/fits/k{k}_fold{f}.npz`` (and
the fitted result to ``k{k}_fold{f}_result.npz``, ``PLNResult.load``) as soon as it is done, and the Laplace optimiser checkpoints inside each fit
(``k{k}_fold{f}.ckpt.npz``), so a killed run resumes where it stopped; a manifest pins the data
and the split, and a rerun with other data or settings is refused. With ``scheduler`` (a Dask
scheduler address or a ``distributed.Client``) the (k, fold) fits run in parallel on Dask.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .anchor import resolve_log_anchor
from .io import atomic_savez, atomic_write_json, atomic_write_text

__all__ = ["select_rank", "RankSelection", "n_free_params", "result_file", "holdout_splits"]

_MANIFEST = "select_manifest.json"


def n_free_params(G: int, k: int) -> int:
    """Free parameters of (mu, W, d): 2G + Gk - k(k-1)/2 (W is identified up to a k x k rotation)."""
    return 2 * G + G * k - k * (k - 1) // 2


@dataclass
class RankSelection:
    """Result of ``select_rank``: the table (one dict per k), the chosen and best k, and the
    per-cell held-out scores (k -> (n_heldout,) in the order of ``heldout_cells``)."""

    table: list
    chosen_k: int
    best_k: int
    scores: dict
    heldout_cells: np.ndarray
    settings: dict = field(default_factory=dict)
    chosen_sigma_M: float | None = None
    best_sigma_M: float | None = None

    @property
    def grid(self) -> bool:
        """Whether sigma_M was chosen too (then ``scores`` is keyed by (k, sigma_M), else by k)."""
        return self.settings.get("sigma_M_grid") is not None

    def _is_chosen(self, row) -> bool:
        return row["k"] == self.chosen_k and (not self.grid or row["sigma_M"] == self.chosen_sigma_M)

    def to_markdown(self) -> str:
        cols = (("k", "sigma_M") if self.grid else ("k",)) + (
            "heldout_mean", "heldout_se", "diff_vs_best", "paired_se", "train_evidence", "bic", "cpu_s", "wall_s")
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in self.table:
            cells = []
            for c in cols:
                v = row[c]
                cells.append(str(v) if isinstance(v, (int, np.integer)) else f"{v:g}" if c == "sigma_M"
                             else f"{v:.4g}" if c == "bic" else f"{v:.3f}")
            mark = " **chosen**" if self._is_chosen(row) else ""
            lines.append("| " + " | ".join(cells) + " |" + mark)
        s = self.settings
        split = f"{s.get('folds')}-fold cross-validation" if s.get("folds") else f"holdout {s.get('holdout')}"
        lines.append("")
        if self.grid:
            lines.append(f"Held-out log-likelihood per cell ({s.get('score')}), {split}, "
                         f"{len(self.heldout_cells)} held-out cells. Best (k, sigma_M) = ({self.best_k}, "
                         f"{self.best_sigma_M:g}); chosen ({self.chosen_k}, {self.chosen_sigma_M:g}) (smallest k "
                         "with a sigma_M within one paired SE of the best, and the best sigma_M at that k).")
        else:
            lines.append(f"Held-out log-likelihood per cell ({s.get('score')}), {split}, "
                         f"{len(self.heldout_cells)} held-out cells. Best k = {self.best_k}; chosen k = "
                         f"{self.chosen_k} (smallest k within one paired SE of the best).")
        return "\n".join(lines)

    def plot(self, path=None):
        """Held-out log-likelihood per cell vs k (error bars: paired SE against the best k)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        sigmas = sorted({r["sigma_M"] for r in self.table}) if self.grid else [None]
        for sig in sigmas:
            rows = [r for r in self.table if not self.grid or r["sigma_M"] == sig]
            label = "held-out mean (paired SE vs best)" if sig is None else f"sigma_M = {sig:g}"
            ax.errorbar([r["k"] for r in rows], [r["heldout_mean"] for r in rows],
                        yerr=[r["paired_se"] for r in rows], fmt="o-", capsize=3, label=label)
        ks = np.array(sorted({r["k"] for r in self.table}))
        ax.axhline(max(r["heldout_mean"] for r in self.table), color="grey", lw=0.8, ls="--")
        chosen = [r["heldout_mean"] for r in self.table if self._is_chosen(r)]
        what = f"k = {self.chosen_k}" + (f", sigma_M = {self.chosen_sigma_M:g}" if self.grid else "")
        ax.plot([self.chosen_k], chosen, "r*", ms=14, label=f"chosen {what}")
        ax.set_xscale("log" if ks.max() / max(ks.min(), 1) >= 8 else "linear")
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no 6 x 10^0 labels
        ax.set_xlabel("rank k")
        ax.set_ylabel("held-out log p(u_c) per cell")
        ax.set_title(f"Rank selection ({self.settings.get('score')} score" +
                     ("; error bars: paired SE vs the best)" if self.grid else ")"))
        ax.legend(fontsize="small")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=110)
        return fig

    def to_dict(self) -> dict:
        out = {"chosen_k": self.chosen_k, "best_k": self.best_k, "table": self.table,
               "settings": self.settings}
        if self.grid:
            out.update(chosen_sigma_M=self.chosen_sigma_M, best_sigma_M=self.best_sigma_M)
        return out


def holdout_splits(N: int, holdout: float | None, folds: int | None, seed: int) -> list[np.ndarray]:
    """The held-out cells of ``select_k`` (sorted indices into 0 .. N-1): ``folds`` disjoint folds of
    one random permutation (``seed``), or one test set of round(holdout N) cells when ``folds`` is
    None; the training cells of a split are the others."""
    perm = np.random.default_rng(seed).permutation(N)
    if folds is not None:
        return [np.sort(t) for t in np.array_split(perm, folds)]
    n_test = int(round(holdout * N))
    if not (1 <= n_test < N):
        raise ValueError(f"holdout={holdout} leaves {n_test} held-out cells of {N}")
    return [np.sort(perm[:n_test])]


def _check(ks, holdout, folds, score, G) -> tuple[list[int], float | None, int | None]:
    try:
        ks = sorted({int(k) for k in ks})
    except (TypeError, ValueError):
        raise ValueError(f"ks must be integers, got {ks!r}") from None
    if not ks or ks[0] < 1 or ks[-1] >= G:
        raise ValueError(f"every k must satisfy 1 <= k < G = {G} genes, got {ks}")
    if folds is not None:
        if isinstance(folds, bool) or int(folds) != folds or folds < 2:
            raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
        folds, holdout = int(folds), None
    elif not (0 < float(holdout) < 1):
        raise ValueError(f"holdout must be a fraction in (0, 1), got {holdout!r}")
    if score not in ("laplace", "is"):
        raise ValueError(f'score must be "laplace" or "is", got {score!r}')
    return ks, (None if holdout is None else float(holdout)), folds


def _fit_and_score(task: dict) -> dict:
    """One (k, fold): fit on the training cells, score the held-out cells; written atomically to
    ``task["record"]`` when given (module-level so that Dask can ship it to a worker)."""
    from .api import fit

    t0, c0 = time.time(), time.process_time()
    opts = dict(task["fit_options"])
    ckpt = task.get("checkpoint")
    if ckpt:
        opts["checkpoint"] = ckpt
        if os.path.exists(ckpt):
            opts["resume"] = ckpt
    if task.get("sigma_M") is not None:
        opts["sigma_M"] = task["sigma_M"]
    lib_tr, lib_te = task["library_train"], task["library_test"]
    res = fit(task["train"], k=task["k"], capture=task["capture"], library_size=lib_tr,
              progress=False, **opts)
    fit_cpu = time.process_time() - c0
    sc = res.score_samples(task["test"], task["score"], n_draws=task["n_draws"], library_size=lib_te,
                           seed=task["seed"])
    rec = {"k": task["k"], "sigma_M": task.get("sigma_M"), "fold": task["fold"], "heldout": sc.estimate,
           "mc_se": sc.mc_se,
           "khat": sc.khat, "train_evidence": float(res.diagnostics["objective"]),
           "n_train": int(task["train"].shape[0]), "fit_cpu_s": fit_cpu,
           "cpu_s": time.process_time() - c0, "wall_s": time.time() - t0,
           "stopped": str(res.diagnostics.get("stopped"))}
    if task.get("record"):
        res.save(str(task["record"]).replace(".npz", "_result.npz"))  # the fit, for later scoring
        arrays = {k: np.asarray(v) for k, v in rec.items() if isinstance(v, np.ndarray)}
        meta = {k: v for k, v in rec.items() if not isinstance(v, np.ndarray)}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        atomic_savez(task["record"], arrays)
        if ckpt and os.path.exists(ckpt):
            os.remove(ckpt)
    return rec


def _load_record(path: Path) -> dict:
    z = np.load(path)
    rec = json.loads(bytes(z["meta"]).decode())
    rec.update({k: z[k] for k in z.files if k != "meta"})
    return rec


def _manifest(out: Path, info: dict) -> None:
    path = out / _MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in info if k not in ("ks", "sigma_M") and old.get(k) != info[k]]
        if diff:
            raise ValueError(f"{out} holds a rank selection with other {', '.join(diff)}; "
                             "use another --out directory")
    atomic_write_json(path, info)


def _fingerprint(u) -> str:
    """sha1 of the float64 bytes of an array, or of a ``CountMatrix`` read by blocks of cells in
    order (the same digest as its dense copy's)."""
    import hashlib

    from .counts import CountMatrix

    h = hashlib.sha1()
    if isinstance(u, CountMatrix):
        for _, ub in u.blocks():
            h.update(ub.tobytes())
    else:
        h.update(np.ascontiguousarray(u, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


def _run(tasks: list[dict], scheduler) -> list[dict]:
    if not tasks:
        return []
    if scheduler is None:
        return [_fit_and_score(t) for t in tasks]
    from .dask_client import connect

    client, owned = connect(scheduler)
    try:
        futures = client.map(_fit_and_score, tasks, pure=False)
        return client.gather(futures)
    finally:
        if owned:
            client.close()


def _sigma_grid(sigma_M, capture) -> list:
    """[None] (the fit's default) or the checked, sorted distinct sigma_M values."""
    if sigma_M is None:
        return [None]
    try:
        vals = None if isinstance(sigma_M, str) else np.atleast_1d(np.asarray(sigma_M, dtype=float))
    except (TypeError, ValueError):
        vals = None
    if vals is None or vals.ndim != 1 or vals.size == 0 or not np.all(np.isfinite(vals) & (vals > 0)):
        raise ValueError(f"sigma_M must be a positive number or a list of them, got {sigma_M!r}")
    if capture is None:
        raise ValueError("sigma_M is the capture prior's SD: it needs capture (drop capture=None)")
    if not isinstance(capture, str):
        raise ValueError("give sigma_M either inside capture=Capture(M0, sigma_M) or as select_rank's "
                         "sigma_M with capture='auto', not both")
    return sorted({float(v) for v in vals})


def _record_name(k: int, sig, f: int, suffix: str = ".npz") -> str:
    """The file name of the (k, sigma_M, fold) record (``suffix`` "_result.npz": its fitted result,
    ".ckpt.npz": its checkpoint)."""
    return f"k{k}_fold{f}{suffix}" if sig is None else f"k{k}_s{sig:g}_fold{f}{suffix}"


def result_file(out, k: int, sigma_M: float | None = None, fold: int = 0) -> Path:
    """The fitted result (``PLNResult.load``) that ``select_rank(..., out=out)`` wrote for rank k,
    capture SD ``sigma_M`` (None: not given to select_rank) and fold ``fold``."""
    return Path(out) / "fits" / _record_name(k, sigma_M, fold, "_result.npz")


def select_rank(data, ks=(1, 2, 5, 10, 20), *, holdout: float = 0.2, folds: int | None = None,
                score: str = "laplace", n_draws: int = 1000, seed: int = 0, out=None,
                scheduler=None, layer: str | None = None, library_size=None, capture="auto",
                sigma_M=None, progress: bool = True, **fit_options) -> RankSelection:
    """Held-out log-likelihood for every k in ``ks`` and the chosen k (module docstring).

    data : (cells x genes) counts (array, sparse, AnnData with ``layer``); kept in its storage (a
        fold's cells are shipped as CSR for sparse input, never a dense N x G copy).
    holdout : fraction of cells held out (one split); folds : K-fold CV instead (overrides holdout).
    score : "laplace" (Laplace evidence of the held-out cells) or "is" (importance sampling,
        ``n_draws`` draws per cell). seed : the split (and the IS draws).
    out : directory for per-(k, fold) records, checkpoints, selection.json / .md and the plot
        heldout_vs_k.png (resumable). scheduler : Dask scheduler address or Client.
    library_size : anchors L_c of all cells (default: total counts); capture : as in ``fit``.
    sigma_M : None (the fit's default, 0.5), a value (fixed), or a list of values chosen jointly
        with k (module docstring; ``scores`` is then keyed by (k, sigma_M)). The records of a given
        sigma_M are ``fits/k{k}_s{sigma_M}_fold{f}.npz``.
    **fit_options : options of the Laplace fit (``n_steps``, ``optimizer``, ...).
    """
    from .counts import CountMatrix

    u = CountMatrix(data, layer=layer)
    N, G = u.shape
    ks, holdout, folds = _check(ks, holdout, folds, score, G)
    sigmas = _sigma_grid(sigma_M, capture)
    grid = sigma_M is not None and np.ndim(sigma_M) > 0  # a list: chosen with k; a value: fixed
    for bad in ("checkpoint", "resume", "k", "library_size"):
        if bad in fit_options:
            raise ValueError(f"{bad} is set by select_rank itself; use out= for checkpoints")
    lib = None if library_size is None else np.exp(resolve_log_anchor(u, library_size=library_size))
    if lib is None and capture is not None:
        resolve_log_anchor(u)  # the default anchor (total counts) must be positive: checked up front
    tests = holdout_splits(N, holdout, folds, seed)
    out = None if out is None else Path(out)
    if out is not None:
        (out / "fits").mkdir(parents=True, exist_ok=True)
        _manifest(out, {"N": N, "G": G, "data": _fingerprint(u), "holdout": holdout, "folds": folds,
                        "seed": seed, "score": score, "n_draws": int(n_draws) if score == "is" else None,
                        "capture": str(capture), "library_size": None if lib is None else _fingerprint(lib[None]),
                        "fit_options": {k: str(v) for k, v in sorted(fit_options.items())}, "ks": ks,
                        "sigma_M": sigmas})
    records, tasks = {}, []
    for k, sig in ((k, sig) for k in ks for sig in sigmas):
        for f, te in enumerate(tests):
            rec_path = None if out is None else out / "fits" / _record_name(k, sig, f)
            if rec_path is not None and rec_path.exists():
                records[(k, sig, f)] = _load_record(rec_path)
                continue
            tr = np.setdiff1d(np.arange(N), te)
            in_train = np.zeros(N)
            in_train[tr] = 1.0
            n_empty = int(np.sum(u.rmatmul(in_train) == 0))  # genes without counts in the training cells
            if n_empty:
                raise ValueError(f"fold {f}: {n_empty} genes have no counts in "
                                 "the training cells; remove rare genes first")
            tasks.append({"k": k, "sigma_M": sig, "fold": f, "train": u.take(tr), "test": u.take(te),
                          "capture": capture,
                          "library_train": None if lib is None else lib[tr],
                          "library_test": None if lib is None else lib[te],
                          "score": score, "n_draws": int(n_draws), "seed": seed,
                          "fit_options": fit_options,
                          "record": None if rec_path is None else str(rec_path),
                          "checkpoint": None if out is None else
                          str(out / "fits" / _record_name(k, sig, f, ".ckpt.npz"))})
    if progress and tasks:
        print(f"select_rank: {len(tasks)} fits to run ({len(records)} already done)", flush=True)
    for rec in _run(tasks, scheduler):
        records[(rec["k"], rec.get("sigma_M"), rec["fold"])] = rec
    sel = _summarise(records, ks, tests, G, score, holdout, folds, seed, n_draws, sigmas, grid)
    if out is not None:
        atomic_write_json(out / "selection.json", sel.to_dict())
        atomic_write_text(out / "selection.md", sel.to_markdown() + "\n")
        atomic_write_text(out / "chosen_k.txt", f"{sel.chosen_k}\n")
        if sel.grid:
            atomic_write_text(out / "chosen_sigma_M.txt", f"{sel.chosen_sigma_M:g}\n")
        import matplotlib.pyplot as plt

        plt.close(sel.plot(out / "heldout_vs_k.png"))
    return sel


def _summarise(records, ks, tests, G, score, holdout, folds, seed, n_draws, sigmas=(None,),
               grid: bool = False) -> RankSelection:
    """The table and the choice from ``records`` keyed (k, sigma_M, fold) (sigma_M None: the fit's
    default): one row per (k, sigma_M), the one-SE rule over k (module docstring); ``grid``: sigma_M
    is chosen too (rows and ``scores`` keyed by (k, sigma_M))."""
    cells = np.concatenate(tests)
    sigmas = list(sigmas)
    models = [(k, sig) for k in ks for sig in sigmas]
    sc = {m: np.concatenate([np.asarray(records[m + (f,)]["heldout"], float) for f in range(len(tests))])
          for m in models}
    n = cells.size
    means = {m: float(np.mean(v)) for m, v in sc.items()}
    best = max(models, key=lambda m: means[m])
    table = []
    for m in models:
        k, sig = m
        d = sc[m] - sc[best]
        recs = [records[m + (f,)] for f in range(len(tests))]
        n_tr = [int(r["n_train"]) for r in recs]
        ev = [float(r["train_evidence"]) for r in recs]
        p = n_free_params(G, k)
        khat = np.concatenate([np.asarray(r["khat"], float) for r in recs])
        row = {"k": int(k)}
        if grid:
            row["sigma_M"] = sig
        row.update({
            "heldout_mean": means[m],
            "heldout_se": float(np.std(sc[m], ddof=1) / np.sqrt(n)),
            "diff_vs_best": float(np.mean(d)), "paired_se": float(np.std(d, ddof=1) / np.sqrt(n)),
            "train_evidence": float(np.mean(ev)),
            "bic": float(np.mean([-2 * e * mm + p * np.log(mm) for e, mm in zip(ev, n_tr)])),
            "n_params": p, "cpu_s": float(sum(r["cpu_s"] for r in recs)),
            "wall_s": float(sum(r["wall_s"] for r in recs)),
            "n_flagged_khat_gt_0.7": int(np.sum(np.nan_to_num(khat) > 0.7)),
            "stopped": "; ".join(sorted({str(r["stopped"]) for r in recs})),
        })
        table.append(row)
    ok = [m for m, r in zip(models, table) if r["diff_vs_best"] >= -r["paired_se"]]
    chosen_k = min(k for k, _ in ok)
    chosen = max((m for m in ok if m[0] == chosen_k), key=lambda m: means[m])
    settings = {"score": score, "holdout": holdout, "folds": folds, "seed": seed,
                "n_draws": int(n_draws) if score == "is" else None, "n_heldout": int(n),
                "sigma_M": sigmas[0] if not grid else None, "sigma_M_grid": sigmas if grid else None}
    scores = sc if grid else {k: v for (k, _), v in sc.items()}
    return RankSelection(table=table, chosen_k=int(chosen_k), best_k=int(best[0]), scores=scores,
                         heldout_cells=cells, settings=settings,
                         chosen_sigma_M=chosen[1] if grid else None, best_sigma_M=best[1] if grid else None)
