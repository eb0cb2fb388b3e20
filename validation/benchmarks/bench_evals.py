"""Cost of the outer evaluations alone (issue 12): the evaluations of one fit replayed under two
checkouts of pln-ref, so that a change to the per-cell Newton or to the evidence gradient is
measured on identical work (same globals, same tolerances, same warm starts).

Usage (one BLAS thread; from the repository root)::

    python validation/benchmarks/bench_evals.py --case real1000 --repos /path/to/old,. --reps 3

Records the sequence of ``Evaluator`` calls (mu, W, d, Newton tolerances) of ``pln_ref.fit(u, k=k)``
on a ``bench_speed.py`` case with the code of the first repository, then replays that sequence on a
fresh blocked ``Evaluator`` (``fit_laplace.evaluation_block_cells``) under each repository in turn,
``--reps`` times, alternating, each replay in its own process. Per replay: process CPU of the
evaluations, the Newton and evidence-gradient parts (``Evaluator.cpu_newton``, ``cpu_objective``),
Newton iterations and the sum of the evaluated objectives (equal across repositories when a change
keeps the arithmetic). The minimum CPU over the repetitions of each repository is the figure (the
machine is shared: other jobs only add time). Load average printed before each replay. Results:
``results/<--out>`` (JSON, rewritten after every replay); the recorded sequence goes to a temporary
file.
"""

from __future__ import annotations

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _import_from(repo: str):
    """Put ``repo`` (a checkout of pln-ref) first on the path and this directory after it."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(Path(repo).resolve()))
    import pln_ref  # noqa: F401  (imported now, from ``repo``: bench_speed puts its own tree first)

    if not pln_ref.__file__.startswith(str(Path(repo).resolve())):
        raise SystemExit(f"pln_ref was imported from {pln_ref.__file__}, not from {repo}")


def record(case: str, path: str) -> int:
    """Run the default fit of ``case`` and pickle its evaluation calls to ``path``."""
    import bench_speed as bs
    import pln_ref
    from pln_ref.outer import evaluate

    u, k, truth = bs.case_data(case)
    kw = {} if truth is None else {"M0": truth.capture.M0, "sigma_M": truth.capture.sigma_M}
    calls = []
    orig = evaluate.Evaluator.__call__

    def recorded(self, mu, W, d, **options):
        calls.append((mu.copy(), W.copy(), d.copy(), options))
        return orig(self, mu, W, d, **options)

    evaluate.Evaluator.__call__ = recorded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = pln_ref.fit(u, k=k, progress=False, **kw)
    evaluate.Evaluator.__call__ = orig
    cap = fit.params.capture
    la = pln_ref.resolve_log_anchor(u) if cap is not None else None
    with open(path, "wb") as fh:
        pickle.dump({"calls": calls, "capture": cap, "log_anchor": la, "case": case}, fh)
    return len(calls)


def replay(path: str) -> dict:
    """Replay the recorded calls on a fresh blocked Evaluator; CPU and counters."""
    import bench_speed as bs
    from pln_ref.fit_laplace import evaluation_block_cells
    from pln_ref.outer.evaluate import Evaluator

    with open(path, "rb") as fh:
        rec = pickle.load(fh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        u, _, _ = bs.case_data(rec["case"])
    ev = Evaluator(u, rec["log_anchor"], rec["capture"], block_cells=evaluation_block_cells(u.shape[1]))
    total = 0.0
    c0 = time.process_time()
    for mu, W, d, options in rec["calls"]:
        total += ev(mu, W, d, **options).value
    cpu = time.process_time() - c0
    return {"cpu_s": cpu, "cpu_newton_s": ev.cpu_newton, "cpu_gradient_s": ev.cpu_objective,
            "evaluations": ev.n_evals, "newton_iters": ev.newton_iters, "sum_objective": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", default="real200", help="a bench_speed.py case")
    ap.add_argument("--repos", default=".", help="comma-separated checkouts; the first records")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON file name in results/ (default: none)")
    ap.add_argument("--_record", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_replay", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_repo", default=".", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._record or args._replay:  # a child process: one checkout on the path
        _import_from(args._repo)
        if args._record:
            print(json.dumps({"calls": record(args.case, args._record)}))
        else:
            print(json.dumps(replay(args._replay)))
        return
    repos = [str(Path(r).resolve()) for r in args.repos.split(",") if r]
    for repo in repos:
        if not (Path(repo) / "pln_ref" / "__init__.py").is_file():
            raise SystemExit(f"--repos: {repo} is not a checkout of pln-ref (no pln_ref/__init__.py)")
    sys.path.insert(0, str(HERE))
    from bench_speed import CASES

    if args.case not in CASES:
        raise SystemExit(f"unknown case {args.case!r}; choose from {', '.join(CASES)}")
    me = [sys.executable, str(Path(__file__).resolve()), "--case", args.case]

    def child(flag: str, value: str, repo: str) -> dict:
        res = subprocess.run(me + [flag, value, "--_repo", repo], capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"child failed under {repo}:\n{res.stderr[-2000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    out = {"case": args.case, "repos": repos, "reps": args.reps, "replays": []}

    def save() -> None:  # after every replay: a crash keeps the replays already measured
        if args.out:
            RESULTS.mkdir(parents=True, exist_ok=True)
            sys.path.insert(0, str(HERE.parents[1]))
            from pln_ref.io import atomic_write_json

            atomic_write_json(RESULTS / args.out, out)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "calls.pkl")
        out["calls"] = child("--_record", path, repos[0])["calls"]
        print(f"[{args.case}] recorded {out['calls']} evaluation calls under {repos[0]}", flush=True)
        for rep in range(args.reps):
            for repo in repos:
                load = [round(x, 2) for x in os.getloadavg()]
                r = child("--_replay", path, repo)
                r.update(repo=repo, rep=rep, load_before=load)
                out["replays"].append(r)
                save()
                print(f"  {repo}: {r['cpu_s']:.2f} s CPU (Newton {r['cpu_newton_s']:.2f}, gradient "
                      f"{r['cpu_gradient_s']:.2f}), {r['evaluations']} evaluations, "
                      f"{r['newton_iters']} Newton iterations, sum {r['sum_objective']:.9f}, load {load}",
                      flush=True)
    out["min_cpu_s"] = {repo: min(r["cpu_s"] for r in out["replays"] if r["repo"] == repo) for repo in repos}
    for repo in repos:
        print(f"[{args.case}] min CPU {out['min_cpu_s'][repo]:.2f} s  {repo}")
    save()


if __name__ == "__main__":
    main()
