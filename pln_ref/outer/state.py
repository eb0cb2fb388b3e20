"""The state of an outer optimisation: what a checkpoint holds, and the fingerprint that ties it to
its data.

A checkpoint (.npz, written atomically) holds the globals, the optimiser's memory (Adam moments or
the L-BFGS pairs), every cell's MAP (warm starts), the history, the best globals, the stop reason,
the accumulated wall and CPU time, and a **fingerprint**: a hash of the counts, of the anchors, the
capture settings, k and the options that change the objective or the path. Resuming compares the
fingerprints entry by entry and refuses a mismatch with one line naming what differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from ..io import atomic_savez
from ..params import PLNParams

__all__ = ["LaplaceFitState", "data_fingerprint", "check_fingerprint"]


def _digest(a) -> str:
    if a is None:
        return "none"
    h = hashlib.blake2b(digest_size=16)
    if hasattr(a, "blocks"):  # a pln_ref.counts.CountMatrix: the same bytes, one dense block at a time
        h.update(str(tuple(a.shape)).encode())
        for _, block in a.blocks():
            h.update(block.tobytes())
        return h.hexdigest()
    arr = np.ascontiguousarray(np.asarray(a, dtype=float))
    h.update(str(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def data_fingerprint(counts, log_anchor, capture, k: int, options: dict | None = None) -> dict:
    """{"shape", "counts", "log_anchor" (hashes), "capture" (M0, sigma_M or None), "k", options...}.

    ``options``: settings that change the objective or the optimiser's path (e.g. optimizer, ift,
    truncation, batch_size); values must be JSON-serialisable. The step cap is not part of it
    (resuming with a larger cap is the point of a checkpoint)."""
    u = counts if hasattr(counts, "blocks") else np.asarray(counts)  # a CountMatrix stays as it is
    fp = {"shape": list(u.shape), "counts": _digest(u), "log_anchor": _digest(log_anchor),
          "capture": None if capture is None else [float(capture.M0), float(capture.sigma_M)],
          "k": int(k)}
    for key, val in sorted((options or {}).items()):
        fp[key] = val
    return fp


def check_fingerprint(saved: dict | None, current: dict, path: str = "checkpoint") -> None:
    """ValueError (one line) naming every entry that differs between the checkpoint's fingerprint
    and the current one; a checkpoint without a fingerprint (older format) is refused too."""
    if not saved:
        raise ValueError(f"{path} has no data fingerprint (written by an older pln-ref): cannot check "
                         "that it belongs to this data; start a new fit")
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            if key in ("counts", "log_anchor"):
                diffs.append(f"{key} (different values)")
            else:
                diffs.append(f"{key} ({a} in the checkpoint vs {b} now)")
    if diffs:
        raise ValueError(f"{path} was written for another fit: {'; '.join(diffs)} differ; "
                         "resume only with the same data, anchors, capture, k and options")


@dataclass
class LaplaceFitState:
    """Everything needed to continue an outer optimisation (saved atomically as .npz).

    mu, W, rho = log d: the current globals; m1, m2: Adam moments; lbfgs_s, lbfgs_y: L-BFGS pairs
    (rows, oldest first) in the optimiser's coordinates; step; lr; x_map, eta_map: every cell's MAP;
    history: rows (step, objective, tracked objective); best / best_value: the best globals seen;
    stopped: the stop message; stop_rule: "certificate" | "gradient" | "patience" | "step_cap" |
    "epoch_cap" | "stalled" | ""; gap_estimate: the last certified bound on the evidence gap (nats/cell);
    elapsed_s / elapsed_cpu_s: wall / process CPU seconds over every run of this fit (resumes
    included); fingerprint: ``data_fingerprint`` of the data it belongs to; optimizer; epochs: cells
    whose MAP was solved over all evaluations / N (every run); phase_cells: the sample size of the
    current phase of the sampled L-BFGS (``pln_ref.outer.sampled``; 0 for a full-batch fit), whose
    cells' MAPs (in increasing cell order) x_map / eta_map then hold; phases: one dict per finished
    phase of the sampled L-BFGS (cells, steps, epochs, rule, objective); first_sample: the first
    sample size n_first the sampled L-BFGS was asked for (``batch_size`` raised by
    ``sampled.first_sample_size``; the fit ran the full batch when n_first > N / 2), 0 without
    ``batch_size``.
    """

    mu: np.ndarray
    W: np.ndarray
    rho: np.ndarray  # log d
    m1: dict = field(default_factory=dict)
    m2: dict = field(default_factory=dict)
    step: int = 0
    lr: float = 0.01
    x_map: np.ndarray | None = None
    eta_map: np.ndarray | None = None
    history: list = field(default_factory=list)
    best: dict | None = None
    best_value: float = -np.inf
    stopped: str = ""
    stop_rule: str = ""
    gap_estimate: float = float("nan")
    elapsed_s: float = 0.0
    elapsed_cpu_s: float = 0.0
    fingerprint: dict = field(default_factory=dict)
    optimizer: str = ""
    lbfgs_s: np.ndarray | None = None
    lbfgs_y: np.ndarray | None = None
    epochs: float = 0.0
    phase_cells: int = 0
    phases: list = field(default_factory=list)
    first_sample: int = 0

    def params(self, capture) -> PLNParams:
        return PLNParams(self.mu, self.W, np.exp(self.rho), capture)

    def best_params(self, capture) -> PLNParams:
        """The globals with the best objective seen (the returned fit)."""
        if self.best is None:
            return self.params(capture)
        return PLNParams(self.best["mu"], self.best["W"], np.exp(self.best["rho"]), capture)

    def save(self, path: str) -> None:
        """Atomic write (temporary file + os.replace): a crash never leaves a torn checkpoint."""
        arrays = {"mu": self.mu, "W": self.W, "rho": self.rho,
                  "history": np.asarray(self.history, dtype=float).reshape(-1, 3)}
        for k, v in self.m1.items():
            arrays[f"m1_{k}"] = v
        for k, v in self.m2.items():
            arrays[f"m2_{k}"] = v
        if self.x_map is not None:
            arrays["x_map"] = self.x_map
            arrays["eta_map"] = self.eta_map
        if self.lbfgs_s is not None:
            arrays["lbfgs_s"], arrays["lbfgs_y"] = self.lbfgs_s, self.lbfgs_y
        if self.best is not None:
            for k, v in self.best.items():
                arrays[f"best_{k}"] = v
        meta = {"step": self.step, "lr": self.lr, "best_value": self.best_value,
                "stopped": self.stopped, "stop_rule": self.stop_rule,
                "gap_estimate": self.gap_estimate, "elapsed_s": self.elapsed_s,
                "elapsed_cpu_s": self.elapsed_cpu_s, "fingerprint": self.fingerprint,
                "optimizer": self.optimizer, "epochs": self.epochs, "phase_cells": self.phase_cells,
                "phases": self.phases, "first_sample": self.first_sample}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        atomic_savez(path, arrays)

    @classmethod
    def load(cls, path: str) -> "LaplaceFitState":
        z = np.load(path)
        meta = json.loads(bytes(z["meta"]).decode())
        st = cls(mu=z["mu"], W=z["W"], rho=z["rho"], step=meta["step"], lr=meta["lr"],
                 best_value=meta["best_value"], stopped=meta["stopped"],
                 stop_rule=meta.get("stop_rule", ""), gap_estimate=meta.get("gap_estimate", float("nan")),
                 elapsed_s=meta.get("elapsed_s", 0.0), elapsed_cpu_s=meta.get("elapsed_cpu_s", 0.0),
                 fingerprint=meta.get("fingerprint", {}), optimizer=meta.get("optimizer", ""),
                 epochs=meta.get("epochs", 0.0), phase_cells=meta.get("phase_cells", 0),
                 phases=meta.get("phases", []), first_sample=meta.get("first_sample", 0))
        st.m1 = {k[3:]: z[k] for k in z.files if k.startswith("m1_")}
        st.m2 = {k[3:]: z[k] for k in z.files if k.startswith("m2_")}
        st.history = [tuple(r) for r in z["history"]]
        if "x_map" in z.files:
            st.x_map, st.eta_map = z["x_map"], z["eta_map"]
        if "lbfgs_s" in z.files:
            st.lbfgs_s, st.lbfgs_y = z["lbfgs_s"], z["lbfgs_y"]
        best = {k[5:]: z[k] for k in z.files if k.startswith("best_")}
        st.best = best or None
        return st
