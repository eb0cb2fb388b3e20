"""The Laplace L-BFGS fit in process and on a Dask cluster started from the command line (issue 13).

Usage (one BLAS thread everywhere)::

    python validation/benchmarks/bench_dask.py --cells 5000 --genes 1000 --k 5 --steps 10
    python validation/benchmarks/bench_dask.py --counts validation/out/bench_memory_data/sim_N20000_G14000_k5.npz \
        --k 5 --converged --dask-only --out validation/benchmarks/results/bench_dask_14k_converged.json

``--counts F``: a scipy CSR ``.npz`` (e.g. a ``bench_memory.py`` case) fitted as CSR instead of the
simulated counts (``--counts-dtype float32``: held as float32 CSR, as anndata stores counts);
``--converged``: no step cap (the default stopping rule); ``--dask-only``: skip the in-process fit;
``--map-dtype float32``: the fit's ``map_dtype`` (the result's MAPs in float32). The Dask fit runs one task per partition of whole blocks
(``dask_tasks_per_evaluation``). Memory: the resident set of the client, scheduler and worker
processes is sampled every 0.5 s during each fit (``peak_rss_sum_gb``, the largest sum seen), and each
process's kernel high-water mark (``VmHWM``) is reported after the fit (``hwm_gb``), with the 1-min
load average over the samples (``loadavg1_during``: mean and max). Processes: ``client`` (this one),
``proc0`` the scheduler, ``proc1``... the workers. Phases (``phase_peaks``): ``start`` (the
method-of-moments start, until the first evaluation), ``lbfgs`` (the evaluations), ``final`` (the
final pass, ``DaskEvaluator.final_posteriors``): per phase, the largest sampled sum and each
process's resident set at that sample (GB, in the order of ``processes``). One line is printed per
evaluation (elapsed, seconds of the evaluation, objective, summed resident set now and peak so far,
1-min load) and kept in ``evaluations``; ``timeline``: every 10th sample (5 s) as (seconds, phase,
RSS per process, GB).

Counts: ``random_params(genes, k, seed=0, capture=True)``, ``simulate(params, cells, seed=1)``
(dense int64). Both fits are ``pln_ref.fit(counts, k=k, n_steps=steps, progress=False)`` (L-BFGS,
default block size ``fit_laplace.evaluation_block_cells(G)``); the second passes
``scheduler_address`` of a cluster started here as a user would, one process per command::

    dask scheduler --port 0 --dashboard-address :0 --scheduler-file F
    dask worker ADDR --nthreads 1 --nworkers 1 --no-nanny      (twice, OMP_NUM_THREADS=1)

Reported per fit: wall seconds, the client's process CPU seconds, the CPU seconds of the worker
and scheduler processes over the fit (psutil), steps, the objective; and the difference of mu, W, d
between the two fits, per entry relative (``max_rel_diff``) and relative to the largest entry
(``max_diff_rel_to_max``). Both fits include the final in-process ``newton_map``
of ``pln_ref.fit`` (every cell's posterior at the fitted globals). The 1/5/15-min load averages
are recorded before and after (the machine is shared). Output: JSON (``--out``).
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import pln_ref  # noqa: E402


def _cpu(procs: list) -> float:
    """User + system CPU seconds of processes (and their children)."""
    tot = 0.0
    for p in procs:
        for q in [p] + p.children(recursive=True):
            try:
                t = q.cpu_times()
                tot += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return tot


def start_cluster(n_workers: int, tmp: Path) -> tuple[str, list[subprocess.Popen]]:
    """``dask scheduler`` + ``n_workers`` ``dask worker`` processes; (address, processes)."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    sfile = tmp / "scheduler.json"
    log = open(tmp / "cluster.log", "w")  # noqa: SIM115 - closed with the processes
    procs = [subprocess.Popen(["dask", "scheduler", "--port", "0", "--dashboard-address", ":0",
                               "--scheduler-file", str(sfile)], env=env, stdout=log, stderr=log)]
    t0 = time.time()
    while not sfile.exists():
        if time.time() - t0 > 60:
            raise RuntimeError(f"dask scheduler did not start; see {tmp / 'cluster.log'}")
        time.sleep(0.2)
    time.sleep(0.5)
    addr = json.loads(sfile.read_text())["address"]
    for _ in range(n_workers):
        procs.append(subprocess.Popen(["dask", "worker", addr, "--nthreads", "1", "--nworkers", "1",
                                       "--no-nanny", "--dashboard-address", ":0",
                                       "--death-timeout", "60"],  # exit if the scheduler is gone
                                      env=env, stdout=log, stderr=log))
    from dask.distributed import Client

    with Client(addr) as c:
        c.wait_for_workers(n_workers, timeout=120)
    return addr, procs


def _hwm_gb(pid: int) -> float:
    """The kernel's high-water mark of a process's resident set (VmHWM), GB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


class _RssSampler(threading.Thread):
    """Largest sum of the resident sets of ``pids`` seen, sampled every ``dt`` seconds; also the
    1-min load average at each sample (``load``). ``phase`` (set by the fit's hooks, ``_hooks``) labels
    each sample: per phase, the largest sum and each process's resident set at that sample
    (``phases``); ``timeline``: every ``keep``-th sample as (seconds, phase, RSS per process in GB)."""

    def __init__(self, pids: list, dt: float = 0.5, keep: int = 10) -> None:
        super().__init__(daemon=True)
        self.procs = [psutil.Process(p) for p in pids]
        self.dt, self.peak, self._stop_ev = dt, 0, threading.Event()
        self.load: list[float] = []
        self.phase, self.phases, self.timeline, self.keep = "start", {}, [], keep
        self.t0, self.current = time.perf_counter(), 0

    def run(self) -> None:
        n = 0
        while not self._stop_ev.is_set():
            rss = []
            for p in self.procs:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.NoSuchProcess:
                    rss.append(0)
            tot, phase = sum(rss), self.phase
            self.peak, self.current = max(self.peak, tot), tot
            self.load.append(os.getloadavg()[0])
            t = time.perf_counter() - self.t0
            best = self.phases.get(phase)
            if best is None or tot > best["sum_gb"] * 1e9:
                self.phases[phase] = {"sum_gb": tot / 1e9, "t_s": round(t, 1),
                                      "rss_gb": [round(r / 1e9, 3) for r in rss]}
            if n % self.keep == 0:
                self.timeline.append([round(t, 1), phase, [round(r / 1e9, 3) for r in rss]])
            n += 1
            self._stop_ev.wait(self.dt)

    def stop(self) -> float:
        self._stop_ev.set()
        self.join()
        return self.peak / 1e9


def _hooks(sampler: _RssSampler, log: list):
    """Wrap ``DaskEvaluator._blocked`` / ``final_posteriors`` and the in-process ``Evaluator._blocked``
    to label the sampler's phases ("start" until the first evaluation, "lbfgs", "final") and print
    one line per evaluation (wall, objective, summed resident set now and its peak so far, 1-min
    load); ``log`` collects the lines' numbers. Returns a function that removes the wrappers."""
    from pln_ref.outer import dask_eval, evaluate

    saved = []
    t0 = time.perf_counter()

    def wrap(cls, name, fn):
        real = getattr(cls, name)
        saved.append((cls, name, real))
        setattr(cls, name, lambda self, *a, **kw: fn(real, self, *a, **kw))

    def blocked(real, self, *a, **kw):
        sampler.phase = "lbfgs"
        w = time.perf_counter()
        ev = real(self, *a, **kw)
        rec = {"eval": len(log) + 1, "t_s": round(time.perf_counter() - t0, 1),
               "eval_s": round(time.perf_counter() - w, 1), "value": float(ev.value),
               "rss_sum_gb": round(sampler.current / 1e9, 2), "rss_peak_gb": round(sampler.peak / 1e9, 2),
               "load1": os.getloadavg()[0]}
        log.append(rec)
        print(f"  eval {rec['eval']:3d}  t {rec['t_s']:7.1f} s  ({rec['eval_s']:5.1f} s)  value {rec['value']:.6f}"
              f"  RSS sum {rec['rss_sum_gb']:.2f} GB (peak {rec['rss_peak_gb']:.2f})  load {rec['load1']:.2f}",
              flush=True)
        return ev

    def final(real, self, *a, **kw):
        sampler.phase = "final"
        w = time.perf_counter()
        out = real(self, *a, **kw)
        print(f"  final pass {time.perf_counter() - w:.1f} s (t {time.perf_counter() - t0:.1f} s)", flush=True)
        return out

    wrap(dask_eval.DaskEvaluator, "_blocked", blocked)
    wrap(dask_eval.DaskEvaluator, "final_posteriors", final)
    wrap(evaluate.Evaluator, "_blocked", blocked)

    def undo():
        for cls, name, real in reversed(saved):
            setattr(cls, name, real)

    return undo


def timed_fit(u, k: int, steps: int, scheduler_address: str | None, procs: list,
              map_dtype: str = "float64") -> tuple[dict, object]:
    ps = [psutil.Process(p.pid) for p in procs]
    c_other = _cpu(ps)
    sampler = _RssSampler([os.getpid()] + [p.pid for p in procs])
    sampler.start()
    evals: list = []
    undo = _hooks(sampler, evals)
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the step cap's ConvergenceWarning
            res = pln_ref.fit(u, k=k, n_steps=steps, progress=False, scheduler_address=scheduler_address,
                              map_dtype=map_dtype)
    finally:
        undo()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    rec = {"wall_s": wall, "client_cpu_s": cpu, "cluster_cpu_s": _cpu(ps) - c_other,
           "steps": int(res.diagnostics["steps"]), "objective": float(res.diagnostics["objective"]),
           "stop_rule": res.diagnostics.get("stop_rule"), "peak_rss_sum_gb": sampler.stop(),
           "loadavg1_during": {"mean": float(np.mean(sampler.load)), "max": float(np.max(sampler.load))},
           "hwm_gb": {"client": _hwm_gb(os.getpid()), **{f"proc{i}": _hwm_gb(p.pid) for i, p in enumerate(procs)}},
           "processes": ["client"] + [f"proc{i}" for i in range(len(procs))],
           "phase_peaks": sampler.phases, "evaluations": evals, "timeline": sampler.timeline}
    rec["total_cpu_s"] = rec["client_cpu_s"] + rec["cluster_cpu_s"]
    return rec, res


def _brief(rec: dict) -> dict:
    """A fit's record without its timeline and per-evaluation lines (for printing)."""
    return {key: v for key, v in rec.items() if key not in ("timeline", "evaluations")}


def _dask_tasks(N: int, block: int, workers: int) -> int:
    """Tasks per evaluation of ``DaskCounts``' default partitions (whole blocks, about 2 per worker)."""
    n_blocks = -(-N // block)
    per = -(-n_blocks // (2 * workers))
    return -(-N // (per * block))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=5000)
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON file (default: print only)")
    ap.add_argument("--counts", default=None, help="CSR .npz of counts (default: simulate)")
    ap.add_argument("--converged", action="store_true", help="no step cap: the default stopping rule")
    ap.add_argument("--dask-only", action="store_true", help="skip the in-process fit")
    ap.add_argument("--map-dtype", choices=["float64", "float32"], default="float64",
                    help="the fit's map_dtype: storage of the result's N x G MAPs")
    ap.add_argument("--counts-dtype", choices=["as-stored", "float32"], default="as-stored",
                    help="--counts: keep the file's value dtype, or float32 (an h5ad written by "
                         "scanpy / anndata holds counts as float32)")
    args = ap.parse_args(argv)
    if args.converged:
        args.steps = 2000

    if args.counts:
        import scipy.sparse as sp

        u = sp.load_npz(args.counts).tocsr()
        if args.counts_dtype == "float32":
            u = u.astype(np.float32)
        args.cells, args.genes = u.shape
    else:
        p = pln_ref.random_params(args.genes, args.k, seed=0, capture=True)
        u = pln_ref.simulate(p, args.cells, seed=1).counts
    from pln_ref.fit_laplace import evaluation_block_cells

    out = {"cells": args.cells, "genes": args.genes, "k": args.k, "n_steps": args.steps,
           "workers": args.workers, "block_cells": evaluation_block_cells(args.genes),
           "n_blocks": -(-args.cells // evaluation_block_cells(args.genes)),
           "dask_tasks_per_evaluation": _dask_tasks(args.cells, evaluation_block_cells(args.genes), args.workers),
           "nproc": os.cpu_count(), "loadavg_before": list(os.getloadavg()),
           "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    from bench_speed import short_commit

    out["commit"] = short_commit()
    out["counts"] = args.counts
    out["counts_dtype"], out["map_dtype"] = str(u.dtype), args.map_dtype
    r0 = None
    if not args.dask_only:
        print(f"in-process fit: {args.cells} x {args.genes}, k={args.k}, {args.steps} steps ...", flush=True)
        out["in_process"], r0 = timed_fit(u, args.k, args.steps, None, [], args.map_dtype)
        print(json.dumps(_brief(out["in_process"])), flush=True)
    # a SIGTERM (kill, a job limit) unwinds through the finally below, which stops the cluster
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory() as tmp:
        addr, procs = start_cluster(args.workers, Path(tmp))
        try:
            out["loadavg_before_dask"] = list(os.getloadavg())
            print(f"Dask fit on {addr} ({args.workers} workers) ...", flush=True)
            out["dask"], r1 = timed_fit(u, args.k, args.steps, addr, procs, args.map_dtype)
            print(json.dumps(_brief(out["dask"])), flush=True)
        finally:
            for pr in reversed(procs):
                pr.terminate()
            for pr in procs:
                try:
                    pr.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pr.kill()
    if r0 is not None:
        rel, rel_norm = {}, {}
        for name in ("mu", "W", "d"):
            a, b = getattr(r1.params, name), getattr(r0.params, name)
            rel[name] = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))
            rel_norm[name] = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))
        out["max_rel_diff"] = rel  # per entry: max |a - b| / |b|
        out["max_diff_rel_to_max"] = rel_norm  # max |a - b| / max |b| (entries near 0 do not dominate)
        out["speedup_wall"] = out["in_process"]["wall_s"] / out["dask"]["wall_s"]
    out["loadavg_after"] = list(os.getloadavg())
    print(json.dumps({key: _brief(v) if isinstance(v, dict) else v for key, v in out.items()}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
