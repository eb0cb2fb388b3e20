"""SBC runs (resumable; rerun the same command to continue):

    python validation/run_sbc.py --out validation/out/sbc --flavour laplace --sims 2000
    python validation/run_sbc.py --out validation/out/sbc_joint --flavour joint --sims 200 --workers 2

Same options as ``pln-ref sbc`` (pln_ref.validate.build_sbc_parser).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pln_ref.validate import build_sbc_parser  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="run_sbc")
    sub = ap.add_subparsers(dest="command")
    build_sbc_parser(sub)
    args = ap.parse_args(["sbc", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
