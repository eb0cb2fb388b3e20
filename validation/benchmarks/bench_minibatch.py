"""The stochastic path for large N against the full-batch default (issue 12): the sampled L-BFGS
(``pln_ref.fit(..., batch_size=n0)``, ``pln_ref.outer.sampled``) and the full-batch L-BFGS, back to
back on the same simulated CSR counts.

Usage (one BLAS thread; one fit at a time on the shared machine)::

    python validation/benchmarks/bench_minibatch.py --cases 20k --n0 1000 --out bench_minibatch.json
    python validation/benchmarks/bench_minibatch.py --cases 10k1k --n0 500 --out bench_minibatch.json

Cases: ``20k`` = 20,000 cells x 2,000 genes, ``10k1k`` = 10,000 x 1,000, ``5k1k`` = 5,000 x 1,000,
``20k500`` = 20,000 x 500 and ``40k500`` = 40,000 x 500 (more cells per global: N / P = 5.7 and 11.4
against 1.4 for ``20k``, P = G (k + 2)), k = 5 throughout. Counts:
``random_params(G, 5, seed=0, capture=True)`` and
``simulate(params, N, seed=1)`` (the generator of ``bench_memory.py``, run in a separate process and
cached as CSR under ``validation/out/bench_memory_data/``), fitted with the default capture and the
realised library sizes. Each fit runs in a fresh Python process (``subprocess``) so that its peak RSS
is its own: the kernel high-water mark ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after the fit;
CPU is the fit's process CPU time (``time.process_time``), wall its ``time.time``. After the fit
(outside the timings and the peak) the process evaluates the Laplace evidence of the returned
globals on all cells with one evaluator (``Evaluator``, blocked, warm-started at the fit's MAPs,
Newton gtol 1e-8), the same for both fits, and the correlation RMSE of Sigma against the true
Sigma (off-diagonal entries, ``bench_speed.corr_rmse``). Reported per fit: CPU, wall, steps,
epochs (cells solved / N), stop rule, phases, evidence (nats/cell), corr RMSE, peak RSS; per case:
the evidence gap full - sampled, the CPU ratio sampled / full, the correlation-RMSE ratio. The
load average is printed before each fit. Results appended to ``results/<--out>`` (rewritten
atomically after each case).
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import bench_memory as bm  # noqa: E402  (the data generator and its cache)

ROOT = Path(__file__).resolve().parents[2]
K = 5
CASES = {"20k": (20000, 2000), "10k1k": (10000, 1000), "5k1k": (5000, 1000), "20k500": (20000, 500),
         "40k500": (40000, 500)}

CHILD = r"""
import json, resource, sys, time, warnings
import numpy as np
import scipy.sparse as sp
sys.path.insert(0, sys.argv[5])
import pln_ref
from bench_speed import corr_rmse
from pln_ref.fit_laplace import evaluation_block_cells
from pln_ref.outer.evaluate import Evaluator
path, G, K, n0 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
u = sp.load_npz(path).tocsr()
opts = {} if n0 == 0 else {"batch_size": n0}
c0, w0 = time.process_time(), time.time()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    res = pln_ref.fit(u, k=K, progress=False, **opts)
cpu, wall = time.process_time() - c0, time.time() - w0
rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
q = res.params
ev = Evaluator(u, np.log(np.asarray(u.sum(axis=1)).ravel()), q.capture, x_map=np.asarray(res.x_map, dtype=float),
               eta_map=np.asarray(res.eta_map, dtype=float), block_cells=evaluation_block_cells(G))
evidence = ev(q.mu, q.W, q.d, gtol=1e-8, with_grad=False).value
truth = pln_ref.random_params(G, K, seed=0, capture=True)
d = res.diagnostics
print(json.dumps({"cpu_s": cpu, "wall_s": wall, "rss_peak": rss_peak, "evidence": evidence,
                  "objective_fit": d["objective"], "corr_rmse": corr_rmse(q.sigma_dense(), truth.sigma_dense()),
                  "steps": d["steps"], "epochs": d["epochs"], "stop_rule": d["stop_rule"],
                  "stopped": d["stopped"], "phases": d["phases"], "optimizer_cpu_s": d["optimizer_cpu_s"],
                  "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}))
"""


def run_fit(path: Path, G: int, n0: int, env: dict) -> dict:
    """One fit (n0 = 0: full batch; else the sampled L-BFGS from n0 cells) in a fresh process."""
    here = str(Path(__file__).resolve().parent)
    load = os.getloadavg()
    print(f"  load average before the {'full-batch' if n0 == 0 else f'sampled (n0={n0})'} fit: "
          f"{' '.join(f'{x:.2f}' for x in load)}", flush=True)
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(G), str(K), str(n0), here],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"fit failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r.update(n0=n0, loadavg_before=load, loadavg_after=os.getloadavg())
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="20k", help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--n0", type=int, default=1000, help="first sample size of the sampled L-BFGS")
    ap.add_argument("--label", default="", help="a tag stored with the results (e.g. a commit)")
    ap.add_argument("--out", default="bench_minibatch.json", help="results file name under results/")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from pln_ref.io import atomic_write_json

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    path_out = ROOT / "validation" / "benchmarks" / "results" / args.out
    rows = json.loads(path_out.read_text()) if path_out.exists() else []
    for case in args.cases.split(","):
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}: expected one of {', '.join(CASES)}")
        N, G = CASES[case]
        data = bm._data(N, G, "csr", env)  # bench_memory's generator and cache (one copy)
        print(f"{case}: {N} cells x {G} genes, k = {K} (CSR)", flush=True)
        full = run_fit(data, G, 0, env)
        sampled = run_fit(data, G, args.n0, env)
        row = {"case": case, "N": N, "G": G, "k": K, "label": args.label, "full": full, "sampled": sampled,
               "evidence_gap": full["evidence"] - sampled["evidence"],
               "cpu_ratio": sampled["cpu_s"] / full["cpu_s"],
               "corr_rmse_ratio": sampled["corr_rmse"] / full["corr_rmse"]}
        rows.append(row)
        atomic_write_json(path_out, rows)
        for name, r in (("full batch", full), (f"sampled n0={args.n0}", sampled)):
            print(f"  {name:>16}: CPU {r['cpu_s']:7.1f} s, wall {r['wall_s']:7.1f} s, {r['steps']:3d} steps, "
                  f"{r['epochs']:6.1f} epochs, {r['stop_rule']}, evidence {r['evidence']:.6f} nats/cell, "
                  f"corr RMSE {r['corr_rmse']:.4f}, peak RSS {r['rss_peak'] / 1e9:.2f} GB", flush=True)
            for ph in r["phases"]:
                print(f"{'':>20}phase {ph['cells']:6d} cells: {ph['steps']:3d} steps, {ph['epochs']:5.2f} epochs, "
                      f"{ph['rule']} (tol {ph['tol']:.1e})")
        print(f"  evidence gap (full - sampled) {row['evidence_gap']:.2e} nats/cell; CPU ratio "
              f"{row['cpu_ratio']:.3f}; corr RMSE ratio {row['corr_rmse_ratio']:.3f}", flush=True)


if __name__ == "__main__":
    main()
