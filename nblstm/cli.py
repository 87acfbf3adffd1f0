"""Command line: ``python -m nblstm [verify | bench] ...`` (``verify`` is the default)."""
import argparse

from . import bench
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
    timing = commands.add_parser("bench", help="time nblstm against torch.nn.LSTM (when "
                                                "installed) and the NumPy reference")
    timing.add_argument("--quick", action="store_true", help="a small grid (H 128/512, B 1/32)")
    timing.add_argument("--json", action="store_true", help="machine-readable output")
    timing.add_argument("--sequences", action="store_true",
                        help="instead of the grid: variable lengths vs full length and vs "
                             "torch's packed path, bidirectional vs unidirectional")
    timing.add_argument("--plot", metavar="FILE.png", help="draw speedup vs batch size "
                                                           "(needs matplotlib)")
    timing.add_argument("--backend", default="cpu", choices=("cpu", "cuda"),
                        help="backend to time (default: cpu); cuda times device-resident "
                             "inputs against torch.nn.LSTM on the GPU (cuDNN) over "
                             "H 256/1024, B 1/8/64/256")
    timing.add_argument("--tf32", action="store_true",
                        help="with --backend cuda: let cuDNN use TF32 (torch's default); "
                             "without it, cuDNN computes in full fp32 as nblstm does")
    timing.add_argument("--pairs", type=int, default=bench.PAIRS,
                        help=f"interleaved timing pairs per point (default: {bench.PAIRS})")
    timing.add_argument("--steps", type=int, default=bench.STEPS,
                        help=f"sequence length T (default: {bench.STEPS})")
    timing.add_argument("--dtype", choices=tuple(bench.DTYPE_TAGS), nargs="+",
                        help="dtypes to time (default: both)")
    timing.add_argument("--no-numpy", dest="numpy", action="store_false",
                        help="skip the comparison with the NumPy reference (slow at large sizes)")
    timing.add_argument("--hidden", type=int, nargs="+", help="hidden sizes (I = H)")
    timing.add_argument("--batch", type=int, nargs="+", help="batch sizes")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.run(args)
    if args.command is None:
        args = check.parse_args([])
    return _verify(args)
