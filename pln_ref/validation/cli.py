"""Command-line parsers and entry points of the harness: ``pln-ref validate`` and ``pln-ref sbc``
(registered on the main parser by :mod:`pln_ref.cli`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .report import write_report
from .runs import run_cell_comparison, run_engine_agreement, run_joint, run_moments
from .sbc_runs import run_sbc_joint, run_sbc_laplace

__all__ = ["VALIDATE_PARTS", "validate_main", "sbc_main", "sbc_summary_line", "build_validate_parser",
           "build_sbc_parser"]


VALIDATE_PARTS = ("cell", "joint", "moments", "engines")


def _run_part(part: str, out: Path, args: argparse.Namespace) -> tuple[str, dict]:
    """Run one part of ``pln-ref validate``; returns its key in metrics.json and its metrics."""
    q = args.quick
    if part == "cell":
        return "cell", run_cell_comparison(
            out, n_cells=20 if q else args.cells, seed=args.seed, draws=500 if q else 1000,
            warmup=500 if q else 1000, methods=tuple(args.methods), engine=args.engine,
            force=args.force, progress=not args.quiet, vae_steps=300 if q else 3000)
    if part == "joint":
        jname = f"joint_{args.joint_design}"
        return jname, run_joint(out, N=30 if q else 100, seed=args.seed, engine=args.engine,
                                warmup=300 if q else args.joint_warmup,
                                draws=300 if q else args.joint_draws,
                                adapt_delta=args.joint_adapt_delta,
                                **({} if args.joint_design == "library" else
                                   {"lib_range": None, "mean_log_rate": 2.7}),
                                name=jname)
    if part == "moments":
        return "moments", run_moments(out, n_cells=20_000 if q else 200_000, seed=args.seed,
                                      fit_cells=300 if q else 2000)
    if part == "engines":
        return "engine_agreement", run_engine_agreement(out, engines=args.engines, seed=args.seed)
    raise ValueError(f"unknown part {part!r}: choose from {VALIDATE_PARTS}")


def validate_main(args: argparse.Namespace) -> int:
    """``pln-ref validate``: run the chosen parts, rewriting the report after each one."""
    from .engines import set_verbose

    set_verbose(getattr(args, "verbose", False))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / "metrics.json"
    metrics = json.loads(mpath.read_text()) if mpath.exists() else {}
    for part in args.parts or list(VALIDATE_PARTS):
        print(f"[pln-ref validate] {part} ...", flush=True)
        key, metrics[key] = _run_part(part, out, args)
        write_report(out, metrics)  # after every part: progress is visible and kept
    print(f"[pln-ref validate] wrote {out / 'report.md'}")
    return 0


def sbc_summary_line(name: str, r: dict) -> str:
    """One line per SBC flavour for the terminal: the family-wise (Holm) verdict, the quantities
    outside their own band and, with few simulations, the power caveat."""
    line = f"[pln-ref sbc] {name}: {r['n_sims']} simulations, "
    fw = r.get("family_wise")
    if fw:
        line += "family-wise (Holm): " + ", ".join(
            f"{f} {'pass' if v['passed'] else 'FAIL'}" + (f" ({', '.join(v['rejected'])})" if v["rejected"] else "")
            for f, v in fw.items()) + "; "
    line += f"{r['n_quantities'] - r['n_failed']}/{r['n_quantities']} quantities inside their own ECDF band"
    if r.get("power_caveat"):
        return line + f"; caveat: {r['power_caveat']}"
    return line + (f" (outside: {', '.join(r['failed'])}; expected by chance: "
                   f"{r['expected_false_failures']:.1f})" if r["failed"] else "")


def sbc_main(args: argparse.Namespace) -> int:
    """``pln-ref sbc``: run (or resume) the chosen SBC flavours and rewrite the report."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / "metrics.json"
    metrics = json.loads(mpath.read_text()) if mpath.exists() else {}
    common = dict(seed=args.seed, scheduler="synchronous" if args.synchronous else "distributed",
                  scheduler_address=args.scheduler_address, n_workers=args.workers, progress=not args.quiet,
                  L=args.L)
    if args.flavour in ("laplace", "both"):
        metrics["sbc_laplace"] = run_sbc_laplace(out, n_sims=args.sims or 2000, **common)
        write_report(out, metrics)
        print(sbc_summary_line("laplace", metrics["sbc_laplace"]))
    if args.flavour in ("joint", "both"):
        metrics["sbc_joint"] = run_sbc_joint(out, n_sims=args.sims or 200, warmup=args.warmup,
                                             draws=args.draws, adapt_delta=args.adapt_delta, **common)
        write_report(out, metrics)
        print(sbc_summary_line("joint", metrics["sbc_joint"]))
    print(f"[pln-ref sbc] wrote {out / 'report.md'}")
    return 0


def build_validate_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``validate`` on an argparse subparsers object (func=validate_main)."""
    p = subparsers.add_parser("validate", help="NUTS-gated validation: methods vs NUTS, PSIS, joint, "
                              "moments, engine agreement -> report.md, PNGs, metrics.json")
    p.add_argument("--out", required=True, help="output directory (report.md, metrics.json, *.png)")
    p.add_argument("--parts", nargs="+", choices=VALIDATE_PARTS, default=None,
                   help="which parts to run (default: all); results of earlier runs in --out are kept")
    p.add_argument("--methods", nargs="+",
                   choices=["laplace", "laplace_eta_marginal_skew", "vae", "vae_diag", "vae_meanfield"],
                   default=["laplace", "vae", "vae_diag", "vae_meanfield"],
                   help="laplace: the Gaussian and the eta-marginal Laplace posteriors; laplace_eta_marginal_skew: "
                        "the eta-marginal one with the skew transform of x | eta; vae: structured family "
                        "q(eta) q(z, e | eta) (full q(z | eta) covariance, e depending on z); vae_diag: the "
                        "structured family with diagonal q(z), e independent of z (before 2026-12-06); "
                        "vae_meanfield: the mean-field family")
    p.add_argument("--cells", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", default=None, help="NUTS engine of the cell and joint parts: stanli | cmdstanpy | "
                   "pystan (default: cmdstanpy if CmdStan is found, else stanli)")
    p.add_argument("--engines", nargs=2, metavar=("A", "B"), default=None,
                   choices=["stanli", "cmdstanpy", "cmdstan", "pystan"],
                   help="engines part: the two NUTS engines to compare (default: stanli against the first "
                        "real Stan found, CmdStan then PyStan)")
    p.add_argument("--force", action="store_true",
                   help="compare even against NUTS fits that failed the gate (labelled FORCED)")
    p.add_argument("--joint-warmup", type=int, default=2000)
    p.add_argument("--joint-draws", type=int, default=2000)
    p.add_argument("--joint-adapt-delta", type=float, default=0.9)
    p.add_argument("--joint-design", choices=["library", "efficiency"], default="library",
                   help="joint data: anchors = library sizes 100-5000 with mean log-rate 1.5 (eta mostly "
                        "near its bound 0) or the simulator's capture efficiencies 5-50%% (mean log-rate 2.7)")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test, not for figures)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true",
                   help="show the Stan engines' own log lines (cmdstanpy INFO, BridgeStan warnings)")
    p.set_defaults(func=validate_main)
    return p


def build_sbc_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``sbc`` on an argparse subparsers object (func=sbc_main)."""
    p = subparsers.add_parser("sbc", help="simulation-based calibration on Dask (resumable): "
                              "Laplace conditional and/or joint NUTS")
    p.add_argument("--out", required=True, help="output directory; rerun with the same --out to resume")
    p.add_argument("--flavour", choices=["laplace", "joint", "both"], default="laplace")
    p.add_argument("--sims", type=int, default=None, help="number of simulations (default 2000 laplace, 200 joint)")
    p.add_argument("--L", type=int, default=99, help="posterior draws per rank (ranks in 0..L)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1000, help="joint: NUTS warmup iterations per chain")
    p.add_argument("--draws", type=int, default=1000, help="joint: NUTS draws per chain (thinned to L)")
    p.add_argument("--adapt-delta", type=float, default=0.99, help="joint: NUTS target acceptance rate")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (1 thread each)")
    p.add_argument("--scheduler-address", default=None, help="address of a running Dask scheduler")
    p.add_argument("--synchronous", action="store_true", help="no Dask: run in this process")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=sbc_main)
    return p
