"""CPU and evaluator counters of one ``pln_ref.fit`` on a ``bench_speed.py`` case (issue 12): CPU
time, steps, evaluations, Newton iterations per cell per evaluation, Newton and evidence CPU.

Usage (one BLAS thread)::

    python validation/benchmarks/fit_counters.py real1000 15        # the first 15 L-BFGS steps
    PLN_REF_MALLOC_TUNE=0 python validation/benchmarks/fit_counters.py real1000 2000  # full fit,
                                                                      # glibc default thresholds
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import bench_speed as bs  # noqa: E402
import pln_ref  # noqa: E402
from pln_ref.outer import evaluate  # noqa: E402


def main():
    case, n_steps = sys.argv[1], int(sys.argv[2])
    u, k, truth = bs.case_data(case)
    kw = {} if truth is None else {"M0": truth.capture.M0, "sigma_M": truth.capture.sigma_M}
    seen = {}
    call = evaluate.Evaluator.__call__

    def counted(self, *a, **kw2):  # remember the fit's evaluator to read its counters
        seen["ev"] = self
        return call(self, *a, **kw2)

    evaluate.Evaluator.__call__ = counted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pln_ref.fit(u, k=k, progress=False, n_steps=2, **kw)  # imports and first-use costs
        c0 = time.process_time()
        fit = pln_ref.fit(u, k=k, progress=False, n_steps=n_steps, **kw)
    cpu = time.process_time() - c0
    ev = seen["ev"]
    print(f"{case}: {cpu:.2f} s CPU, {fit.diagnostics['steps']} steps, {ev.n_evals} evaluations, "
          f"{ev.newton_iters / ev.n_evals / ev.N:.2f} Newton iterations per cell per evaluation, "
          f"Newton {ev.cpu_newton:.2f} s, evidence {ev.cpu_objective:.2f} s, objective "
          f"{fit.diagnostics['objective']:.6f}, load {bs.load()}, "
          f"PLN_REF_MALLOC_TUNE={os.environ.get('PLN_REF_MALLOC_TUNE', '1')}")


if __name__ == "__main__":
    main()
