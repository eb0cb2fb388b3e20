"""Validation report (methods vs gated NUTS, PSIS, joint, moments, engine agreement):

    python validation/run_validate.py --out validation/out/validate            # everything
    python validation/run_validate.py --out validation/out/validate --parts cell --methods laplace

Same options as ``pln-ref validate`` (pln_ref.validate.build_validate_parser).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pln_ref.validate import build_validate_parser  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="run_validate")
    sub = ap.add_subparsers(dest="command")
    build_validate_parser(sub)
    args = ap.parse_args(["validate", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
