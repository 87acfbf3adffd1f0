"""Command line: ``python -m nblstm [verify] [--backend NAME] [--seed N]``."""
import argparse

from ._availability import available_backends
from .verify import verify


def _verify(args):
    backends = args.backend or [name for name, status in available_backends().items()
                                if status.available and name != "numpy"]
    ok = True
    for name, status in available_backends().items():
        print(f"{name:<6} {status}")
    print()
    for backend in backends:
        report = verify(backend=backend, seed=args.seed)
        print(report)
        print()
        ok = ok and report.ok
    return 0 if ok else 1


def main(argv=None):
    """Parse ``argv`` and run the subcommand; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m nblstm",
                                     description="LSTM kernels compiled with Numba.")
    commands = parser.add_subparsers(dest="command")
    check = commands.add_parser("verify", help="compare every available backend with the "
                                               "float64 NumPy reference (the default)")
    check.add_argument("--backend", action="append",
                       help="backend to check (repeatable); default: every available one")
    check.add_argument("--seed", type=int, default=None, help="seed for the random inputs")
    args = parser.parse_args(argv)
    if args.command is None:
        args = check.parse_args([])
    return _verify(args)
