"""Command line: ``pln-ref demo | fit | simulate | select | validate | sbc``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "demo"]

DEMO = {"G": 100, "k": 5, "N": 1500, "seed": 20261125, "mean_log_rate": 1.5}


def _corr_errors(fit_params, true_params) -> dict:
    """RMSE and max abs error of the off-diagonal gene-gene correlations (dense: demo-size G)."""
    C, T = fit_params.correlation_dense(), true_params.correlation_dense()
    iu = np.triu_indices(C.shape[0], 1)
    e = C[iu] - T[iu]
    return {"corr_rmse": float(np.sqrt(np.mean(e**2))), "corr_max_abs": float(np.max(np.abs(e)))}


def ppc_lines(ppc_map: dict) -> list[str]:
    """The demo's MAP plug-in predictive check, explained: for each statistic the share of genes
    whose observed value lies inside the replicates' central 95% interval, what it tests, and what
    a MAP-only check can and cannot show (``ppc_map`` = ``ppc_summary(..., mode="map").table()``)."""
    rows = [("mean", "gene means", "the fitted mean level of each gene"),
            ("var", "gene variances", "the over-dispersion beyond Poisson (Sigma)"),
            ("zero_frac", "zero fractions", "the zero mass of each gene")]
    lines = ["  MAP plug-in predictive check, u_rep ~ Poisson(exp(x_map - eta_map)); share of genes whose "
             "observed statistic lies inside the 95% interval of the replicates:"]
    for key, name, tests in rows:
        share = f"{100 * ppc_map[key]['share_in_95pct_interval']:.0f}%"
        lines.append(f"    {name + ':':16s}{share:>5s}  (tests {tests})")
    lines += [
        "    What this MAP-only check can show: a gross misfit of the likelihood shape (a statistic far",
        "    outside the plug-in range). What it cannot show: calibration. x_map is a point estimate (the",
        "    posterior mode, shrunk toward the prior), so the replicates ignore the posterior uncertainty",
        "    of x: their intervals are too narrow and shifted, and low shares, above all for zero",
        "    fractions, are expected even on data simulated from the model itself, as here.",
    ]
    return lines


def demo(out: str | None = None, progress: bool = True) -> dict:
    """Fit the embedded default data set (a seeded PLN simulation with capture, ``DEMO``) and
    report recovery of the simulated truth by the method-of-moments start and the Laplace fit."""
    from . import fit, random_params, simulate
    from .ppc import ppc_summary

    p = random_params(DEMO["G"], DEMO["k"], seed=DEMO["seed"], capture=True,
                      mean_log_rate=DEMO["mean_log_rate"])
    sim = simulate(p, DEMO["N"], seed=DEMO["seed"] + 1)
    adata = sim.to_anndata()
    print(f"Embedded data set: simulated PLN with capture, {DEMO['N']} cells x {DEMO['G']} genes, "
          f"k={DEMO['k']}, mean count {sim.counts.mean():.2f}, zeros {100 * np.mean(sim.counts == 0):.0f}%")
    t0 = time.time()
    # the simulation's capture prior (M0, sigma_M) and anchors are known: give them to the fit
    res = fit(adata, k=DEMO["k"], M0=p.capture.M0, sigma_M=p.capture.sigma_M,
              library_size=np.exp(sim.log_anchor), progress=progress)
    wall = time.time() - t0
    if progress:
        print(stop_line(res))
    print(res.summary())
    mom, lap = _corr_errors(res.init, p), _corr_errors(res.params, p)
    report = {
        "wall_time_s": wall,
        "method_of_moments": {**mom, "mu_max_abs": float(np.max(np.abs(res.init.mu - p.mu)))},
        "laplace": {**lap, "mu_max_abs": float(np.max(np.abs(res.mu - p.mu))),
                    "sigma_diag_max_abs": float(np.max(np.abs(res.params.sigma_diag() - p.sigma_diag()))),
                    "eta_rmse": float(np.sqrt(np.mean((res.eta_map - sim.eta) ** 2))),
                    "x_rmse": float(np.sqrt(np.mean((res.x_map - sim.x) ** 2)))},
        "cells_converged": res.diagnostics["cells_converged"],
        "ppc_map": ppc_summary(sim.counts, res, n_samples=50, mode="map").table(),
    }
    print("Recovery of the simulated truth (off-diagonal correlation errors):")
    print(f"  method of moments: RMSE {mom['corr_rmse']:.4f}, max {mom['corr_max_abs']:.4f}")
    print(f"  Laplace fit:       RMSE {lap['corr_rmse']:.4f}, max {lap['corr_max_abs']:.4f};"
          f" max |mu error| {report['laplace']['mu_max_abs']:.3f};"
          f" RMSE of eta_map vs true eta {report['laplace']['eta_rmse']:.3f}")
    for line in ppc_lines(report["ppc_map"]):
        print(line)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        res.save(Path(out) / "demo_fit.npz")
        (Path(out) / "demo_report.json").write_text(json.dumps(report, indent=2))
        print(f"wrote {out}/demo_fit.npz and {out}/demo_report.json")
    return report


def _cmd_demo(args) -> int:
    demo(args.out, progress=not args.quiet)
    return 0


def _library_size(adata, column: str | None):
    """The per-cell anchor from ``adata.obs[column]`` (None without a column)."""
    if column is None:
        return None
    if column not in adata.obs.columns:
        raise ValueError(f"--library-size: no obs column {column!r}; obs columns: {list(adata.obs.columns)}")
    col = adata.obs[column]
    try:
        return np.asarray(col, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"--library-size: obs column {column!r} is not numeric (dtype {col.dtype})") from None


def stop_line(res) -> str:
    """One line saying where and why the fit stopped (printed after its progress bar)."""
    dg, st = res.diagnostics, res.settings
    steps = dg.get("stopped_step", dg.get("steps"))
    return f"fit stopped at step {steps} of n_steps={st.get('n_steps')}: {dg.get('stopped')}"


def _fallback_save(res, out: Path) -> Path | None:
    """Save ``res`` (.npz) next to ``out``, else in the working directory, else in the temporary
    directory; the path written, or None if every place failed."""
    import tempfile

    name = out.stem + ".pln_result.npz"
    for d in (out.parent, Path.cwd(), Path(tempfile.gettempdir())):
        try:
            return res.save(d / name)
        except Exception:  # noqa: BLE001 - try the next place
            continue
    return None


def _cmd_fit(args) -> int:
    from . import fit
    from .protocol import parse_write
    from .readers import check_checkpoint, check_output_path, read_anndata

    # everything that can be checked is checked before the fit: no work is lost to a bad path
    write = parse_write(args.write)
    out = check_output_path(args.out, (".h5ad",), "--out")
    if args.save_result:
        check_output_path(args.save_result, (".npz",), "--save-result")
    if args.checkpoint:
        check_output_path(args.checkpoint, (".npz",), "--checkpoint")
    if args.resume:
        check_checkpoint(args.resume)
    adata = read_anndata(args.data)
    library_size = _library_size(adata, args.library_size)
    capture = None if args.no_capture else "auto"
    options = {"n_steps": args.n_steps, "batch_size": args.batch_size, "optimizer": args.optimizer,
               "lr": args.lr, "checkpoint": args.checkpoint, "resume": args.resume,
               "checkpoint_every": args.checkpoint_every, "max_epochs": args.max_epochs}
    if args.method == "laplace":
        options["map_dtype"] = args.map_dtype
        options["min_sample_counts"] = args.min_sample_counts
    res = fit(adata, inference_method=args.method, k=args.k, layer=args.layer, capture=capture,
              M0=args.M0, sigma_M=args.sigma_M, library_size=library_size, seed=args.seed,
              progress=not args.quiet, scheduler_address=args.scheduler_address, **options)
    if not args.quiet:
        print(stop_line(res))
    print(res.summary())
    try:
        res.to_anndata(adata, write=write)
        adata.write_h5ad(out)
        if args.save_result:
            res.save(args.save_result)
    except Exception as exc:  # noqa: BLE001 - the fit is done: keep it whatever went wrong
        msg = str(exc).strip().splitlines()
        fb = _fallback_save(res, out)
        where = (f"the fit result was saved to {fb} (load it with pln_ref.PLNResult.load)" if fb
                 else "saving the fit result elsewhere failed too")
        print(f"error: writing {out} failed after the fit ({type(exc).__name__}: {msg[0] if msg else ''}); "
              f"{where}", file=sys.stderr)
        return 1
    print(f"wrote {out}" + (f" and {args.save_result}" if args.save_result else ""))
    return 0


# --- pln-ref select (rank selection by held-out log-likelihood, pln_ref.select) -------------------
def _cmd_select(args) -> int:
    import anndata as ad

    from .select import select_rank

    path = Path(args.data)
    if not path.exists():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    adata = ad.read_h5ad(path)
    options = {"n_steps": args.n_steps, "optimizer": args.optimizer}
    sel = select_rank(adata, ks=args.k, holdout=args.holdout, folds=args.folds, score=args.score,
                      n_draws=args.n_draws, seed=args.seed, out=args.out, scheduler=args.scheduler,
                      layer=args.layer, capture=None if args.no_capture else "auto",
                      sigma_M=args.sigma_M, progress=not args.quiet,
                      **{k: v for k, v in options.items() if v is not None})
    print(sel.to_markdown())
    if sel.grid:
        print(f"chosen k = {sel.chosen_k}, sigma_M = {sel.chosen_sigma_M:g}; wrote {args.out}/selection.json, "
              "selection.md, chosen_k.txt, chosen_sigma_M.txt, heldout_vs_k.png")
    else:
        print(f"chosen k = {sel.chosen_k}; wrote {args.out}/selection.json, selection.md, chosen_k.txt, "
              "heldout_vs_k.png")
    return 0


def _add_select_parser(sub) -> None:
    p = sub.add_parser("select", help="choose the rank k by held-out log-likelihood")
    p.add_argument("data", help="input .h5ad (cells x genes counts)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 5, 10, 20], help="candidate ranks")
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of cells held out")
    p.add_argument("--folds", type=int, default=None, help="K-fold cross-validation instead")
    p.add_argument("--score", choices=["laplace", "is"], default="laplace")
    p.add_argument("--n-draws", type=int, default=1000, help="importance draws per cell (--score is)")
    p.add_argument("--scheduler", default=None, help="Dask scheduler address for parallel fits")
    p.add_argument("--layer", default=None)
    p.add_argument("--no-capture", action="store_true")
    p.add_argument("--sigma-M", type=float, nargs="+", default=None,
                   help="capture prior SDs to choose from together with k (default: 0.5, not chosen)")
    p.add_argument("--n-steps", type=int, default=None)
    p.add_argument("--optimizer", choices=["adam", "lbfgs"], default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_select)


def _cmd_simulate(args) -> int:
    from . import random_params, simulate

    p = random_params(args.genes, args.k, seed=args.seed, capture=not args.no_capture,
                      mean_log_rate=args.mean_log_rate)
    sim = simulate(p, args.cells, seed=args.seed + 1)
    sim.to_anndata().write_h5ad(args.out)
    print(f"wrote {args.out}: {args.cells} cells x {args.genes} genes, k={args.k}")
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None / False (those say their default in words)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="pln-ref", description="Poisson log-normal model with capture")
    ap.add_argument("--version", action="version", version=f"pln-ref {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="fit the embedded simulated data set and report recovery",
                       formatter_class=_HelpFormatter)
    p.add_argument("--out", default=None, help="directory for the fitted result and a JSON report "
                   "(default: nothing written)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("fit", help="fit an .h5ad file", formatter_class=_HelpFormatter,
                       description="Fit the PLN with capture to the counts of an AnnData file and write "
                                   "the fit into a copy of it (obsm['X_pln'], varm, uns['pln']).")
    p.add_argument("data", help="input AnnData .h5ad or .zarr (cells x genes raw counts)")
    p.add_argument("--k", type=int, default=10, help="number of latent factors (rank of W), 1 <= k < genes")
    p.add_argument("--out", required=True, help="output .h5ad: the input with the fit written in")
    p.add_argument("--method", choices=["laplace", "vae"], default="laplace", help="inference method")
    p.add_argument("--layer", default=None,
                   help="AnnData layer holding the raw counts (default: .X), e.g. --layer counts")
    p.add_argument("--library-size", default=None, metavar="OBS_COLUMN",
                   help="obs column with each cell's library size (the capture anchor L_c; "
                        "default: the cell's total counts)")
    p.add_argument("--M0", type=float, default=None,
                   help="capture prior median total mRNA per cell (default: median library size / 0.1)")
    p.add_argument("--sigma-M", dest="sigma_M", type=float, default=None,
                   help="capture prior log-scale SD (default: 0.5)")
    p.add_argument("--no-capture", action="store_true", help="fit without capture (eta = 0)")
    p.add_argument("--scheduler-address", default=None, metavar="ADDR",
                   help="address of a running Dask scheduler (e.g. tcp://host:8786): the Laplace "
                        "L-BFGS evaluations run block by block on its workers")
    p.add_argument("--n-steps", type=int, default=2000, help="step cap of the optimiser (it stops earlier "
                   "when converged)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="laplace: the first sample of the sampled L-BFGS for large N (samples of cells "
                        "doubling to all cells, the last phase the full-batch fit), with --optimizer "
                        "adam the cells per step (default: full batch); vae: cells per step (256)")
    p.add_argument("--min-sample-counts", type=float, default=None,
                   help="laplace L-BFGS with --batch-size: raise the first sample until it holds this "
                        "many counts of the sparsest gene (default 500; 0 keeps --batch-size)")
    p.add_argument("--max-epochs", type=float, default=None,
                   help="laplace L-BFGS: stop after this many epochs (cells solved / cells) with a "
                        "warning (default: no cap)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: laplace 0.05, vae 0.003)")
    p.add_argument("--optimizer", choices=["adam", "lbfgs"], default=None,
                   help="Laplace outer optimiser (default: lbfgs)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the method")
    p.add_argument("--checkpoint", default=None, metavar="PATH.npz",
                   help="Laplace: write the optimiser state to this .npz during the fit (atomically)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="Laplace: write the checkpoint every N steps (default: 50)")
    p.add_argument("--resume", default=None, metavar="PATH.npz",
                   help="Laplace: continue from a checkpoint written by --checkpoint")
    p.add_argument("--map-dtype", choices=["float64", "float32"], default="float64",
                   help="laplace: storage of the per-cell MAPs x_map, the result's N x G array "
                        "(float32 halves the fit's final memory; solved in float64)")
    p.add_argument("--save-result", default=None, metavar="PATH.npz",
                   help="also save the result object (.npz; pln_ref.PLNResult.load reads it)")
    p.add_argument("--write", default="", metavar="LIST",
                   help="per-cell x per-gene layers (map, sd, denoised) and the gene-gene "
                        "correlation (varp) to write, comma-separated, as float32 (default: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("simulate", help="write a simulated PLN data set to .h5ad", formatter_class=_HelpFormatter)
    p.add_argument("--cells", type=int, default=1000, help="number of cells")
    p.add_argument("--genes", type=int, default=200, help="number of genes")
    p.add_argument("--k", type=int, default=5, help="number of latent factors")
    p.add_argument("--mean-log-rate", type=float, default=1.0, help="mean of mu (log scale)")
    p.add_argument("--no-capture", action="store_true", help="simulate without capture (eta = 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.set_defaults(func=_cmd_simulate)

    try:
        from .validation.cli import build_sbc_parser, build_validate_parser
    except ImportError:  # pragma: no cover - validation layer not importable
        pass
    else:
        build_validate_parser(sub)
        build_sbc_parser(sub)
    _add_select_parser(sub)
    return ap


def main(argv=None) -> int:
    from .exceptions import TrainingDivergedError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad input (includes readers.InputFileError): one line, rc 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDivergedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
