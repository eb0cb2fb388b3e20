"""Peak memory of ``pln_ref.fit`` (issue 13): peak RSS and CPU per case, one fresh subprocess each.

Usage (one BLAS thread; one case at a time on the shared machine)::

    python validation/benchmarks/bench_memory.py --cases dense5k,csr5k
    python validation/benchmarks/bench_memory.py --cases dense20k,csr20k --out bench_memory_scale2.json
    python validation/benchmarks/bench_memory.py --cases csr20k --converged --out bench_memory_scale2.json

Cases: ``<storage><N>`` with storage ``dense`` (int64 numpy) or ``csr`` (scipy CSR of the same
counts), N in ``5k`` / ``10k`` / ``20k`` cells, G = 2000 genes. Counts are simulated with
``random_params(2000, 5, seed=0, capture=True)`` and ``simulate(params, N, seed=1)`` in a separate
process and cached under ``validation/out/bench_memory_data/`` (CSR .npz and dense int64 .npy, so
the simulation's own arrays do not count in the fit's high-water mark); the fit is ``pln_ref.fit(counts, k=5, n_steps=3,
progress=False)`` (``--converged``: no step cap, the default stopping rule). Each case runs in a
fresh Python process (``subprocess``) that loads the counts and reports the kernel's high-water
mark ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after loading (``rss_data``) and after the fit
(``rss_peak``), and the fit's process CPU time (``time.process_time``). ``B/cell/gene`` is
``rss_peak / (N * G)``; ``fit B/cell/gene`` is ``(rss_peak - rss_data) / (N * G)``, the fit's own
part. Load average printed before each case. Results appended to ``results/<--out>`` (default
``bench_memory.json``, rewritten atomically).
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

ROOT = Path(__file__).resolve().parents[2]
G = 2000
K = 5
SIZES = {"5k": 5000, "10k": 10000, "20k": 20000}
DATA = ROOT / "validation" / "out" / "bench_memory_data"

SIMULATE = r"""
import sys
import numpy as np
import scipy.sparse as sp
import pln_ref
N, G, K, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
p = pln_ref.random_params(G, K, seed=0, capture=True)
u = pln_ref.simulate(p, N, seed=1).counts
np.save(path + ".dense.npy", np.asarray(u, dtype=np.int64))
sp.save_npz(path, sp.csr_matrix(u))
"""

CHILD = r"""
import json, resource, sys, time
import numpy as np
import scipy.sparse as sp
import pln_ref
storage, path, K, converged = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
u = np.load(path + ".dense.npy") if storage == "dense" else sp.load_npz(path).tocsr()
rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
c0, w0 = time.process_time(), time.time()
opts = {} if converged else {"n_steps": 3}
res = pln_ref.fit(u, k=K, progress=False, **opts)
cpu, wall = time.process_time() - c0, time.time() - w0
rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"rss_data": rss_data, "rss_peak": rss_peak, "cpu_s": cpu, "wall_s": wall,
                  "objective": res.diagnostics["objective"], "steps": res.diagnostics["steps"],
                  "stop_rule": res.diagnostics["stop_rule"], "nnz_fraction": float(np.mean(u != 0)) if storage == "dense" else u.nnz / (u.shape[0] * u.shape[1])}))
"""


def _data(N: int, env: dict) -> Path:
    """The cached simulated counts of N cells (CSR .npz), simulated in a separate process."""
    path = DATA / f"sim_N{N}_G{G}_k{K}.npz"
    if not (path.exists() and Path(str(path) + ".dense.npy").exists()):
        DATA.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        subprocess.run([sys.executable, "-c", SIMULATE, str(N), str(G), str(K), str(tmp)], env=env, check=True)
        Path(str(tmp) + ".dense.npy").replace(str(path) + ".dense.npy")
        tmp.replace(path)
    return path


def run_case(name: str, converged: bool = False) -> dict:
    """Run one case (``<dense|csr><5k|10k|20k>``) in a fresh process; the measured dict."""
    storage, size = name[:-len(name.lstrip("densecr"))], name.lstrip("densecr")
    if storage not in ("dense", "csr") or size not in SIZES:
        raise ValueError(f"unknown case {name!r}: expected <dense|csr><{'|'.join(SIZES)}>")
    N = SIZES[size]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    path = _data(N, env)
    load = os.getloadavg()
    out = subprocess.run([sys.executable, "-c", CHILD, storage, str(path), str(K), "1" if converged else "0"],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"case {name} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r.update(case=name, N=N, G=G, k=K, loadavg=load, converged_run=converged,
             bytes_per_cell_gene=r["rss_peak"] / (N * G),
             fit_bytes_per_cell_gene=(r["rss_peak"] - r["rss_data"]) / (N * G))
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="dense5k,csr5k")
    ap.add_argument("--label", default="", help="a tag stored with the results (e.g. a commit)")
    ap.add_argument("--out", default="bench_memory.json", help="results file name under results/")
    ap.add_argument("--converged", action="store_true", help="no step cap: the default stopping rule")
    args = ap.parse_args()
    from pln_ref.io import atomic_write_json

    path = ROOT / "validation" / "benchmarks" / "results" / args.out
    rows = json.loads(path.read_text()) if path.exists() else []
    print(f"{'case':>9} {'peak GB':>8} {'B/cell/gene':>11} {'fit B/c/g':>9} {'CPU s':>7} "
          f"{'steps':>5} {'objective':>12}  load avg")
    for name in args.cases.split(","):
        r = run_case(name.strip(), converged=args.converged)
        r["label"] = args.label
        rows.append(r)
        atomic_write_json(path, rows)
        print(f"{r['case']:>9} {r['rss_peak'] / 1e9:8.2f} {r['bytes_per_cell_gene']:11.1f} "
              f"{r['fit_bytes_per_cell_gene']:9.1f} {r['cpu_s']:7.1f} {r['steps']:5d} {r['objective']:12.6f}  "
              f"{' '.join(f'{x:.2f}' for x in r['loadavg'])}", flush=True)


if __name__ == "__main__":
    main()
