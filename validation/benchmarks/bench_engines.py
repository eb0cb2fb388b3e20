"""Benchmark of the Stan engines (issue 14): stanli against real Stan builds.

Usage (2 shared cores: one BLAS thread; the real engines need their builds, see the README,
"Using a real CmdStan")::

    CMDSTAN=... BRIDGESTAN=... PYTHONPATH=<dir with bridgestan 2.5.0>:. \\
        python validation/benchmarks/bench_engines.py                     # both sections
    python validation/benchmarks/bench_engines.py --sections gradient --quick   # smoke run

Outputs (``--out``, default ``validation/out/bench_engines[_quick]/``): ``results.json`` and
``results.md``, rewritten atomically after every measurement.

Sections
--------
gradient  Time per ``log_density_gradient`` call of the same program and data, stanli's in-process
          BridgeStan model vs the compiled BridgeStan library (``$BRIDGESTAN``), on pln_joint
          (N=100, G=10, k=2, non-centred, the validate design) and pln_cell (the same 100 cells,
          true globals). The two are timed back to back in alternating blocks of ``--calls``
          calls, ``--repeats`` times; the figure is the minimum over blocks of process CPU time
          per call (other users of the shared cores only add time); wall time alongside.
nuts      NUTS on pln_joint N=100, G=10, k=2 (data of ``pln-ref validate --parts joint``, library
          design: anchors 100-5000, mean log-rate 1.5, capture sigma_M 0.5), 4 chains x
          ``--warmup`` / ``--draws``, adapt_delta 0.9, diag metric, same seed, for every
          available engine (stanli, cmdstanpy, pystan), one after the other. Per engine: wall
          time of sampling, CPU time (this process plus its finished children: CmdStan runs
          its chains as child processes, stanli as threads), divergences, R-hat max and bulk /
          tail ESS min over the gate variables (mu, d, Sigma, x, eta), and ESS per second =
          min bulk ESS / time and median bulk ESS / time, per wall and per CPU second.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from pln_ref.io import atomic_write_json, atomic_write_text  # noqa: E402

VARS = ("mu", "d", "Sigma", "x", "eta")


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _cpu() -> float:
    """CPU seconds of this process and of its waited-for children."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def _data(N: int, G: int, k: int, seed: int):
    from pln_ref.validation.design import simulate_cells
    from pln_ref.validation.standata import pln_cell_data, pln_joint_data

    params, sim = simulate_cells(G, k, N, lib_range=(100.0, 5000.0), seed=seed, mean_log_rate=1.5)
    u, la = np.asarray(sim.counts), np.asarray(sim.log_anchor)
    return (pln_joint_data(u, k, capture=params.capture, log_anchor=la), pln_cell_data(u, params, la),
            params, sim)


def _time_block(model, theta: np.ndarray, calls: int) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(calls):
        model.log_density_gradient(theta)
    return (time.process_time() - c0) / calls, (time.perf_counter() - w0) / calls


def bench_gradient(args, res: dict, save) -> None:
    import stanli

    from pln_ref.validation.engines import _stan_json, bridgestan_model, stan_program

    if not os.environ.get("BRIDGESTAN"):
        res["gradient"] = {"skipped": "BRIDGESTAN is not set: no compiled BridgeStan to compare with"}
        save()
        return
    jdata, cdata, params, sim = _data(args.N, args.G, args.k, args.seed)
    out = {}
    for prog, data in (("pln_joint", jdata), ("pln_cell", cdata)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models = {"stanli": stanli.bridgestan_model(stan_file=str(stan_program(prog)), data=_stan_json(data)),
                      "bridgestan_compiled": bridgestan_model(prog, data)}
        n = models["stanli"].param_unc_num()
        theta = np.random.default_rng(args.seed).normal(0, 0.3, n)
        v = {k: m.log_density_gradient(theta) for k, m in models.items()}
        rel_v = abs(v["stanli"][0] - v["bridgestan_compiled"][0]) / max(abs(v["bridgestan_compiled"][0]), 1)
        rel_g = float(np.linalg.norm(v["stanli"][1] - v["bridgestan_compiled"][1])
                      / max(np.linalg.norm(v["bridgestan_compiled"][1]), 1))
        for m in models.values():  # warm up
            _time_block(m, theta, max(args.calls // 10, 10))
        cpu = {k: [] for k in models}
        wall = {k: [] for k in models}
        for _ in range(args.repeats):
            for name, m in models.items():
                c, w = _time_block(m, theta, args.calls)
                cpu[name].append(c)
                wall[name].append(w)
        row = {"n_unconstrained": int(n), "calls_per_block": args.calls, "blocks": args.repeats,
               "rel_diff_value": float(rel_v), "rel_diff_gradient": rel_g, "load": _load()}
        for name in models:
            row[name] = {"cpu_us_per_call_min": 1e6 * min(cpu[name]), "cpu_us_per_call_median": 1e6 * float(np.median(cpu[name])),
                         "wall_us_per_call_min": 1e6 * min(wall[name])}
        row["ratio_stanli_over_compiled_cpu_min"] = min(cpu["stanli"]) / min(cpu["bridgestan_compiled"])
        out[prog] = row
        res["gradient"] = out
        save()
        print(f"[gradient] {prog} n={n}: stanli {row['stanli']['cpu_us_per_call_min']:.1f} us, compiled "
              f"{row['bridgestan_compiled']['cpu_us_per_call_min']:.1f} us per call (CPU, min); "
              f"ratio {row['ratio_stanli_over_compiled_cpu_min']:.2f}; load {row['load']}", flush=True)


def bench_nuts(args, res: dict, save) -> None:
    import arviz as az

    from pln_ref.validation.engines import available_engines, engine_version, sample_nuts
    from pln_ref.validation.gate import check_gate

    jdata, _, _, _ = _data(args.N, args.G, args.k, args.seed)
    engines = args.engines or available_engines()
    res.setdefault("nuts", {})
    for eng in engines:
        load0 = _load()
        c0, w0 = _cpu(), time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            idata = sample_nuts("pln_joint", jdata, engine=eng, chains=4, warmup=args.warmup, draws=args.draws,
                                seed=args.seed + 1, adapt_delta=0.9)
        cpu, wall = _cpu() - c0, time.perf_counter() - w0
        samp = float(idata.posterior.attrs["sampling_time"])
        ess = az.ess(idata, var_names=list(VARS))
        bulk = np.concatenate([ess[v].values.ravel() for v in VARS])
        gate = check_gate(idata, var_names=list(VARS))
        row = {"engine_version": engine_version(eng), "sampling_wall_s": samp, "call_wall_s": wall,
               "call_cpu_s": cpu, "divergences": int(idata.sample_stats["diverging"].sum()),
               "rhat_max": gate.rhat_max, "ess_bulk_min": float(np.min(bulk)), "ess_bulk_median": float(np.median(bulk)),
               "ess_tail_min": gate.ess_tail_min, "gate_passed": gate.passed,
               "ess_bulk_min_per_wall_s": float(np.min(bulk)) / samp,
               "ess_bulk_median_per_wall_s": float(np.median(bulk)) / samp,
               "ess_bulk_min_per_cpu_s": float(np.min(bulk)) / cpu,
               "ess_bulk_median_per_cpu_s": float(np.median(bulk)) / cpu,
               "load_before": load0, "load_after": _load()}
        res["nuts"][eng] = row
        save()
        print(f"[nuts] {eng}: sampling {samp:.1f} s wall, {cpu:.1f} s CPU; min bulk ESS {row['ess_bulk_min']:.0f} "
              f"-> {row['ess_bulk_min_per_wall_s']:.2f}/s wall, {row['ess_bulk_min_per_cpu_s']:.2f}/s CPU; "
              f"divergences {row['divergences']}, R-hat max {row['rhat_max']:.4f}; load {row['load_after']}",
              flush=True)


def _markdown(res: dict) -> str:
    lines = ["# Stan engines benchmark", ""] + [f"- {k}: {v}" for k, v in res["meta"].items()] + [""]
    g = res.get("gradient")
    if g:
        lines += ["## Gradient time per call (log_density_gradient, process CPU, min over blocks)", ""]
        if "skipped" in g:
            lines += [g["skipped"], ""]
        else:
            lines += ["| program | n unconstrained | stanli us | compiled BridgeStan us | stanli / compiled | "
                      "rel. diff value | rel. diff gradient | load |", "|---|---|---|---|---|---|---|---|"]
            for prog, r in g.items():
                lines.append(f"| {prog} | {r['n_unconstrained']} | {r['stanli']['cpu_us_per_call_min']:.1f} | "
                             f"{r['bridgestan_compiled']['cpu_us_per_call_min']:.1f} | "
                             f"{r['ratio_stanli_over_compiled_cpu_min']:.2f} | {r['rel_diff_value']:.1e} | "
                             f"{r['rel_diff_gradient']:.1e} | {r['load']} |")
            lines.append("")
    n = res.get("nuts")
    if n:
        lines += ["## NUTS on pln_joint (ESS per second: min / median bulk ESS over mu, d, Sigma, x, eta)", "",
                  "| engine | version | sampling wall s | CPU s | div | R-hat max | bulk ESS min | tail ESS min | "
                  "min ESS/s wall | min ESS/s CPU | median ESS/s wall | median ESS/s CPU | load after |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for eng, r in n.items():
            lines.append(f"| {eng} | {r['engine_version']} | {r['sampling_wall_s']:.1f} | {r['call_cpu_s']:.1f} | "
                         f"{r['divergences']} | {r['rhat_max']:.4f} | {r['ess_bulk_min']:.0f} | {r['ess_tail_min']:.0f} | "
                         f"{r['ess_bulk_min_per_wall_s']:.2f} | {r['ess_bulk_min_per_cpu_s']:.2f} | "
                         f"{r['ess_bulk_median_per_wall_s']:.2f} | {r['ess_bulk_median_per_cpu_s']:.2f} | "
                         f"{r['load_after']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default="gradient,nuts")
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not for figures")
    p.add_argument("--N", type=int, default=100)
    p.add_argument("--G", type=int, default=10)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calls", type=int, default=2000, help="gradient calls per timed block")
    p.add_argument("--repeats", type=int, default=7, help="timed blocks per engine")
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--engines", nargs="+", default=None, help="NUTS engines (default: every available one)")
    args = p.parse_args(argv)
    if args.quick:
        args.N, args.calls, args.repeats, args.warmup, args.draws = 20, 200, 2, 100, 100
    out = Path(args.out or f"validation/out/bench_engines{'_quick' if args.quick else ''}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = "unknown"
    import bridgestan

    res: dict = {"meta": {"commit": commit, "python": platform.python_version(), "cpus": os.cpu_count(),
                          "bridgestan_client": bridgestan.__version__, "BRIDGESTAN": os.environ.get("BRIDGESTAN"),
                          "CMDSTAN": os.environ.get("CMDSTAN"), "args": vars(args), "load_start": _load(),
                          "started": time.strftime("%Y-%m-%d %H:%M:%S")}}

    def save() -> None:
        atomic_write_json(out / "results.json", res)
        atomic_write_text(out / "results.md", _markdown(res))

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for s in sections:
        if s not in ("gradient", "nuts"):
            p.error(f"unknown section {s!r}: choose from gradient, nuts")
    if "gradient" in sections:
        bench_gradient(args, res, save)
    if "nuts" in sections:
        bench_nuts(args, res, save)
    res["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    print(json.dumps({"out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
