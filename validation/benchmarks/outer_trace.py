"""Trace of an outer fit against its reference (issue 12): per L-BFGS step the true evidence gap
(cached reference of ``bench_speed.py`` minus the objective) and the stopping certificate's two
estimates (quasi-Newton gap and the windowed geometric tail, ``pln_ref.outer.stopping``).

Usage (one BLAS thread)::

    python validation/benchmarks/outer_trace.py --case real1000 --memory 50 --gap-tol 1e-7
    python validation/benchmarks/outer_trace.py --case sim1000 --memory 20

Prints the gap at selected steps, the first step within 1e-3 nats/cell, the stop, and writes
``results/outer_trace_<case>_m<memory>.json`` (gap per step; (gains, gap_qn, gap_tail) per check).
Used to choose the certificate's estimate and gap_tol and the L-BFGS memory.
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import functools  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import bench_speed as bs  # noqa: E402
import pln_ref  # noqa: E402
import pln_ref.fit_laplace as fit_laplace  # noqa: E402
import pln_ref.outer.lbfgs as lbfgs  # noqa: E402
from pln_ref.io import atomic_write_json  # noqa: E402


class TracedRule(lbfgs.StopRule):
    """The default certificate, recording (number of gains, gap_qn, gap_tail) at every check."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.trace: list = []

    def check(self, gap_qn, gains, grad_inf):
        self.trace.append((len(gains), float(gap_qn), float(self.tail(gains))))
        return super().check(gap_qn, gains, grad_inf)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="real1000", choices=sorted(bs.CASES))
    ap.add_argument("--memory", type=int, default=50)
    ap.add_argument("--gap-tol", type=float, default=None, help="default: the fit's default")
    args = ap.parse_args()
    rules = []

    def rule_factory(**kw):
        r = TracedRule(**kw)
        rules.append(r)
        return r

    fit_laplace.run_lbfgs = functools.partial(lbfgs.run_lbfgs, memory=args.memory)
    fit_laplace.StopRule = rule_factory
    u, k, truth = bs.case_data(args.case)
    kw = {} if truth is None else {"M0": truth.capture.M0, "sigma_M": truth.capture.sigma_M}
    if args.gap_tol is not None:
        kw["gap_tol"] = args.gap_tol
    load0 = bs.load()
    c0 = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = pln_ref.fit(u, k=k, progress=False, **kw)
    cpu = time.process_time() - c0
    ref = float(np.load(bs.RESULTS / f"reference_{args.case}.npz")["value"])
    gap = ref - np.asarray(fit.history["objective"], dtype=float)
    within = np.flatnonzero(gap <= 1e-3)
    first = int(within[0]) + 1 if within.size else None
    steps = int(fit.diagnostics["steps"])
    print(f"{args.case} memory={args.memory}: {cpu:.1f} s CPU, {steps} steps, {fit.diagnostics['stopped']}")
    print(f"final gap {gap[-1]:.2e} nats/cell; first within 1e-3 at step {first}; load {load0} -> {bs.load()}")
    print(" ".join(f"{s}:{gap[s - 1]:.3g}" for s in (1, 5, 10, 20, 40, 60, 80, 100, 125, 150, 175, 200, 250, 300)
                   if s <= len(gap)))
    atomic_write_json(bs.RESULTS / f"outer_trace_{args.case}_m{args.memory}.json", {
        "command": " ".join(["python"] + sys.argv), "cpu_s": cpu, "steps": steps,
        "stopped": fit.diagnostics["stopped"], "first_within_1e-3": first, "gap": gap.tolist(),
        "checks": rules[-1].trace if rules else [], "load": load0})


if __name__ == "__main__":
    main()
