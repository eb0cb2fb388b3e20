"""Peak memory of ``pln_ref.fit`` (issue 13): peak RSS and CPU per case, one fresh subprocess each.

Usage (one BLAS thread; one case at a time on the shared machine)::

    python validation/benchmarks/bench_memory.py --cases dense5k,csr5k
    python validation/benchmarks/bench_memory.py --cases dense20k,csr20k --out bench_memory_scale2.json
    python validation/benchmarks/bench_memory.py --cases csr20k --converged --out bench_memory_scale2.json
    python validation/benchmarks/bench_memory.py --cases csr5kx1k,csr5k,csr5kx4k,csr10k,csr20k --steps 5
    python validation/benchmarks/bench_memory.py --cases h5ad100k --converged

Cases: ``<storage><N>[x<G>]`` with storage ``dense`` (int64 numpy), ``csr`` (scipy CSR of the same
counts) or ``h5ad`` (the same CSR counts in an .h5ad file opened backed,
``anndata.read_h5ad(path, backed="r")``: the counts are read by blocks of cells and never held in
memory), N and G in cells and genes with a ``k`` suffix for thousands (``csr20k`` = 20,000 x 2,000,
the default G; ``csr20kx14k`` = 20,000 x 14,000; ``h5ad100k``). Counts are simulated with
``random_params(G, 5, seed=0, capture=True, mean_log_rate=R)`` (R = ``--mean-log-rate``, default
1.0) and ``simulate(params, N, seed=1)`` (in blocks of max(1000, 4e7 / G) cells with seeds 1, 2,
...; one block up to 20,000 x 2,000) in a separate process and cached under
``validation/out/bench_memory_data/`` (CSR .npz and, up to 5e7 entries, dense int64 .npy; an .h5ad
for ``h5ad`` cases), so the simulation's own arrays do not count in the fit's high-water mark. With
G = 2000 and R = 1 this gives mean count ~1.1 and 59% zeros (G = 14,000: 0.89 and 59%; R = 1.5:
1.47 and 47%); a file name carries ``_m<R>`` when R is not 1. ``--data-only`` caches the counts and
prints their path, mean count and share of zeros, without a fit. The fit is
``pln_ref.fit(counts, k=5, n_steps=3, progress=False)`` (``--steps S``: S steps; ``--converged``: no
step cap, the default stopping rule). Each case runs in a fresh Python process (``subprocess``) that
loads the counts and reports the kernel's high-water mark ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` after loading
(``rss_data``) and after the fit (``rss_peak``), the fit's process CPU time (``time.process_time``)
and the outer optimisation's CPU per step (``optimizer_cpu_s / steps``; it includes the cold start
of the first evaluation, so compare sizes at the same ``--steps``). ``B/cell/gene`` is
``rss_peak / (N * G)``; ``fit B/cell/gene`` is ``(rss_peak - rss_data) / (N * G)``, the fit's own
part. Load average printed before each case. Results appended to ``results/<--out>`` (default
``bench_memory.json``, rewritten atomically).

Secondary paths (``--task``, default ``fit``): the same fresh-process peak RSS of one call on the
case's counts, after loading them and a Laplace result fitted to them (``pln_ref.fit(counts, k=5,
n_steps=1)`` on the CSR counts, fitted once in a separate process and cached as
``fit_N<N>_G<G>_k5_steps1.npz`` next to the counts, then loaded with ``LaplaceResult.load``):

- ``eta_marginal``: ``res.posterior_eta_marginal(counts)`` (defaults: 5 nodes per cell; its output
  alone holds five N x 5 x G float64 arrays);
- ``transform``: ``res.transform(counts)`` (the counts as new cells);
- ``score``: ``res.score_samples(counts)`` (Laplace evidence of the counts as new cells);
- ``vae``: ``pln_ref.fit(counts, inference_method="vae", k=5, n_steps=S)`` (S = ``--steps``;
  no result is loaded).

``--package DIR``: import ``pln_ref`` from the repository at DIR instead of this one (e.g. the main
branch's worktree, to measure before and after a change with the same script and data)::

    python validation/benchmarks/bench_memory.py --cases csr20k --task score --package /work/main
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
G_DEFAULT = 2000
K = 5
DATA = ROOT / "validation" / "out" / "bench_memory_data"
DENSE_MAX = 50_000_000  # entries: larger cases are cached as CSR only

SIMULATE = r"""
import sys
import numpy as np
import scipy.sparse as sp
import pln_ref
N, G, K, path, dense_max = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
p = pln_ref.random_params(G, K, seed=0, capture=True, mean_log_rate=float(sys.argv[6]))
B = max(1000, 40_000_000 // G)  # cells per simulated block (bounded memory); G = 2000, N <= 20000: one block
blocks = []
for i, lo in enumerate(range(0, N, B)):
    blocks.append(sp.csr_matrix(pln_ref.simulate(p, min(N, lo + B) - lo, seed=1 + i).counts))
u = sp.vstack(blocks, format="csr")
if N * G <= dense_max:
    np.save(path + ".dense.npy", np.asarray(u.toarray(), dtype=np.int64))
sp.save_npz(path, u)
"""

TO_H5AD = r"""
import sys
import anndata as ad
import scipy.sparse as sp
src, dst = sys.argv[1], sys.argv[2]
ad.AnnData(X=sp.load_npz(src).tocsr().astype("float32")).write_h5ad(dst)
"""

FIT_ONCE = r"""
import sys
import scipy.sparse as sp
import pln_ref
res = pln_ref.fit(sp.load_npz(sys.argv[1]).tocsr(), k=int(sys.argv[2]), n_steps=1, progress=False)
res.save(sys.argv[3])
"""

# the counts of a case as the measured child process reads them (defines load_counts)
LOAD = r"""
def load_counts(storage, path):
    import numpy as np
    import scipy.sparse as sp
    if storage == "dense":
        return np.load(path + ".dense.npy")
    if storage == "csr":
        return sp.load_npz(path).tocsr()
    from pln_ref.readers import read_anndata
    return read_anndata(path, backed=True)
"""

TASK_CHILD = LOAD + r"""
import json, resource, sys, time, warnings
import numpy as np
import scipy.sparse as sp
import pln_ref
task, storage, path, K, steps, result = sys.argv[1:7]
K, steps = int(K), int(steps)
u = load_counts(storage, path)
res = None
if task != "vae":
    from pln_ref.results import LaplaceResult
    res = LaplaceResult.load(result)
rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
c0, w0 = time.process_time(), time.time()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # convergence warnings of the short runs
    if task == "eta_marginal":
        out = res.posterior_eta_marginal(u)
        value = float(np.mean(out.log_evidence))
    elif task == "transform":
        out = res.transform(u)
        value = float(np.mean(out.eta_map))
    elif task == "score":
        value = float(res.score_samples(u).mean())
    elif task == "vae":
        out = pln_ref.fit(u, inference_method="vae", k=K, n_steps=steps, progress=False)
        value = float(out.diagnostics["objective"])
    else:
        raise SystemExit(f"unknown task {task}")
cpu, wall = time.process_time() - c0, time.time() - w0
rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"rss_data": rss_data, "rss_peak": rss_peak, "cpu_s": cpu, "wall_s": wall, "value": value,
                  "module": pln_ref.__file__}))
"""

TASKS = ("fit", "eta_marginal", "transform", "score", "vae")
# -P: the working directory is not put on sys.path, so PYTHONPATH (--package) decides which pln_ref
# the measured process imports
PYTHON = (sys.executable, "-P")

CHILD = LOAD + r"""
import json, resource, sys, time
import numpy as np
import scipy.sparse as sp
import pln_ref
storage, path, K, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
u = load_counts(storage, path)
N, G = u.shape
rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
c0, w0 = time.process_time(), time.time()
opts = {} if steps <= 0 else {"n_steps": steps}
res = pln_ref.fit(u, k=K, progress=False, **opts)
cpu, wall = time.process_time() - c0, time.time() - w0
rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
dg = res.diagnostics
print(json.dumps({"rss_data": rss_data, "rss_peak": rss_peak, "cpu_s": cpu, "wall_s": wall,
                  "objective": dg["objective"], "steps": dg["steps"], "stop_rule": dg["stop_rule"],
                  "gap_estimate": dg["gap_estimate"], "optimizer_cpu_s": dg["optimizer_cpu_s"],
                  "cpu_per_step_s": dg["optimizer_cpu_s"] / max(dg["steps"], 1)}))
"""


def _size(text: str) -> int:
    """'20k' -> 20000, '500' -> 500."""
    return int(text[:-1]) * 1000 if text.endswith("k") else int(text)


def parse_case(name: str) -> tuple[str, int, int]:
    """``<dense|csr|h5ad><N>[x<G>]`` -> (storage, N, G)."""
    for storage in ("dense", "csr", "h5ad"):
        if name.startswith(storage):
            rest = name[len(storage):]
            try:
                n_txt, _, g_txt = rest.partition("x")
                return storage, _size(n_txt), _size(g_txt) if g_txt else G_DEFAULT
            except ValueError:
                break
    raise ValueError(f"unknown case {name!r}: expected <dense|csr|h5ad><N>[x<G>], e.g. csr20k or h5ad100kx2k")


def data_path(N: int, G: int, mean_log_rate: float = 1.0) -> Path:
    """The cached CSR counts of a case: ``sim_N<N>_G<G>_k5.npz``, with ``_m<rate>`` before the
    suffix when ``mean_log_rate`` is not the default 1.0."""
    tag = "" if mean_log_rate == 1.0 else f"_m{mean_log_rate:g}"
    return DATA / f"sim_N{N}_G{G}_k{K}{tag}.npz"


def _data(N: int, G: int, storage: str, env: dict, mean_log_rate: float = 1.0) -> Path:
    """The cached simulated counts (CSR .npz, dense .npy up to ``DENSE_MAX`` entries, .h5ad when
    asked), simulated in a separate process; the path to pass to the fit's process."""
    path = data_path(N, G, mean_log_rate)
    dense = Path(str(path) + ".dense.npy")
    if not path.exists() or (storage == "dense" and not dense.exists()):
        if storage == "dense" and N * G > DENSE_MAX:
            raise ValueError(f"dense case with {N} x {G} > {DENSE_MAX} entries: use csr or h5ad")
        DATA.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        subprocess.run([*PYTHON, "-c", SIMULATE, str(N), str(G), str(K), str(tmp), str(DENSE_MAX),
                        repr(float(mean_log_rate))],
                       env=env, check=True)
        if Path(str(tmp) + ".dense.npy").exists():
            Path(str(tmp) + ".dense.npy").replace(dense)
        tmp.replace(path)
    if storage != "h5ad":
        return path
    h5 = path.with_suffix(".h5ad")
    if not h5.exists():
        tmp = h5.with_name(h5.stem + ".tmp.h5ad")
        subprocess.run([*PYTHON, "-c", TO_H5AD, str(path), str(tmp)], env=env, check=True)
        tmp.replace(h5)
    return h5


def _fitted(path: Path, N: int, G: int, env: dict) -> Path:
    """The cached Laplace result of ``fit(counts, k=K, n_steps=1)`` on the case's CSR counts (fitted
    in a separate process with this repository's pln_ref)."""
    res = path.with_name(path.stem.replace("sim_", "fit_", 1) + "_steps1.npz")
    if not res.exists():
        tmp = res.with_name(res.stem + ".tmp.npz")
        own = dict(env, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run([*PYTHON, "-c", FIT_ONCE, str(path.with_suffix(".npz")), str(K), str(tmp)],
                       env=own, check=True)
        tmp.replace(res)
    return res


def run_case(name: str, steps: int = 3, task: str = "fit", package: Path = ROOT,
             mean_log_rate: float = 1.0) -> dict:
    """Run one case (``parse_case``) in a fresh process: the fit with ``steps`` outer steps (<= 0:
    the default stopping rule), or the secondary path ``task`` (module docstring), importing
    ``pln_ref`` from ``package``; the measured dict."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    storage, N, G = parse_case(name)
    env = dict(os.environ, PYTHONPATH=str(package) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    path = _data(N, G, storage, env, mean_log_rate)
    load = os.getloadavg()
    if task == "fit":
        cmd = [*PYTHON, "-c", CHILD, storage, str(path), str(K), str(steps)]
    else:
        result = "-" if task == "vae" else str(_fitted(path, N, G, env))
        cmd = [*PYTHON, "-c", TASK_CHILD, task, storage, str(path), str(K), str(steps), result]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"case {name} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r.update(task=task, package=str(package), case=name, N=N, G=G, k=K, loadavg=load,
             converged_run=steps <= 0, n_steps=steps, mean_log_rate=mean_log_rate,
             bytes_per_cell_gene=r["rss_peak"] / (N * G),
             fit_bytes_per_cell_gene=(r["rss_peak"] - r["rss_data"]) / (N * G),
             nnz_fraction=_nnz_fraction(path))
    return r


def _nnz_fraction(path: Path) -> float:
    import scipy.sparse as sp

    u = sp.load_npz(path.with_suffix(".npz"))
    return u.nnz / (u.shape[0] * u.shape[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="dense5k,csr5k")
    ap.add_argument("--label", default="", help="a tag stored with the results (e.g. a commit)")
    ap.add_argument("--out", default="bench_memory.json", help="results file name under results/")
    ap.add_argument("--steps", type=int, default=3, help="outer steps per fit (default 3)")
    ap.add_argument("--converged", action="store_true", help="no step cap: the default stopping rule")
    ap.add_argument("--task", default="fit", choices=TASKS,
                    help="what to measure: the fit (default) or a secondary path (module docstring)")
    ap.add_argument("--package", default=str(ROOT),
                    help="repository whose pln_ref is imported by the measured process (default: this one)")
    ap.add_argument("--mean-log-rate", type=float, default=1.0,
                    help="random_params' mean_log_rate of the simulated counts (default 1.0; 1.5 gives "
                         "mean count ~1.5 and 47%% zeros at G = 14,000)")
    ap.add_argument("--data-only", action="store_true",
                    help="simulate and cache the cases' counts, print their path and sparsity, no fit")
    args = ap.parse_args()
    steps = 0 if args.converged else args.steps
    if args.data_only:
        import scipy.sparse as sp

        for name in args.cases.split(","):
            storage, N, G = parse_case(name.strip())
            path = _data(N, G, storage, dict(os.environ), args.mean_log_rate)
            u = sp.load_npz(data_path(N, G, args.mean_log_rate))
            print(f"{path}: {N} x {G}, mean count {u.sum() / (N * G):.3f}, "
                  f"{1 - u.nnz / (N * G):.1%} zeros", flush=True)
        return
    from pln_ref.io import atomic_write_json

    path = ROOT / "validation" / "benchmarks" / "results" / args.out
    rows = json.loads(path.read_text()) if path.exists() else []
    print(f"{'case':>11} {'peak GB':>8} {'B/cell/gene':>11} {'fit B/c/g':>9} {'CPU s':>7} {'wall s':>7} "
          f"{'steps':>5} {'CPU/step':>8} {'objective':>12} {'stop':>12}  load avg", flush=True)
    for name in args.cases.split(","):
        r = run_case(name.strip(), steps=steps, task=args.task, package=Path(args.package).resolve(),
                     mean_log_rate=args.mean_log_rate)
        r["label"] = args.label
        rows.append(r)
        atomic_write_json(path, rows)
        if args.task != "fit":
            print(f"{r['case']:>11} {args.task}: peak {r['rss_peak'] / 1e9:.2f} GB, after loading "
                  f"{r['rss_data'] / 1e9:.2f} GB, {r['bytes_per_cell_gene']:.1f} B/cell/gene, "
                  f"call {r['fit_bytes_per_cell_gene']:.1f} B/cell/gene, CPU {r['cpu_s']:.1f} s, "
                  f"wall {r['wall_s']:.1f} s, value {r['value']:.6f}, load avg "
                  f"{' '.join(f'{x:.2f}' for x in r['loadavg'])}", flush=True)
            continue
        print(f"{r['case']:>11} {r['rss_peak'] / 1e9:8.2f} {r['bytes_per_cell_gene']:11.1f} "
              f"{r['fit_bytes_per_cell_gene']:9.1f} {r['cpu_s']:7.1f} {r['wall_s']:7.1f} {r['steps']:5d} "
              f"{r['cpu_per_step_s']:8.2f} {r['objective']:12.6f} {r['stop_rule']:>12}  "
              f"{' '.join(f'{x:.2f}' for x in r['loadavg'])}", flush=True)


if __name__ == "__main__":
    main()
