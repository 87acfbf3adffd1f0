"""Interleaved A/B timing of the CPU kernels: this checkout's against a git revision's.

    python bench/ab.py --base HEAD --points 256x1 512x32 --dtype f32 --mode fwdbwd

Both versions of the ``kernels`` package are imported into one process (each
from a copy in a temporary directory, so the first run of each compiles), and their
``cpu.forward`` (and, with ``--mode fwdbwd``, ``cpu.backward``) are called in
turn on the same inputs at T=100, I=H, timed as ``python -m nblstm bench``
times its peers (:func:`nblstm.bench.compare`): the figure is the median over
PAIRS pairs of samples of base time / new time, so above 1 means this checkout
is faster. With ``--api`` the whole ``nblstm`` package is copied instead, and
its public ``forward`` (and ``backward``) are timed as the benchmark calls
them, so that changes to the Python layers count too. This is how
the "interleaved" figures in RESULTS.md are measured: two versions timed side
by side drift together with the machine, where two separate runs on a shared
machine differ by several percent. Run it with nothing else running, and
compare a revision with itself (``--base HEAD`` on a clean checkout) to see
the noise floor at a point: the two copies' buffers land at different
addresses, which at B=1 H=512 alone moved the ratio to 0.95.
"""
import argparse
import importlib
import importlib.util
import inspect
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parent.parent
STEPS = 100
PAIRS = 7


def import_package(name, parent):
    """The package under ``parent``, imported as ``name``."""
    spec = importlib.util.spec_from_file_location(
        name, parent / "__init__.py", submodule_search_locations=[str(parent)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package


def import_kernels(name, parent):
    """The ``kernels`` package under ``parent``, imported as ``name``: its ``cpu`` module."""
    import_package(name, parent)
    return importlib.import_module(f"{name}.cpu")


def write_kernels(revision, directory, folder="kernels"):
    """Write ``folder/*.py`` as of ``revision`` into ``directory``, or as they
    are in this checkout for ``revision=None``. Each version runs from a copy
    of its own, so that Numba's on-disk caches of the two never meet."""
    if revision is None:
        for path in (REPOSITORY / folder).glob("*.py"):
            shutil.copy(path, directory / path.name)
        return
    listing = subprocess.run(["git", "-C", str(REPOSITORY), "ls-tree", "--name-only", revision,
                              f"{folder}/"], check=True, capture_output=True, text=True).stdout
    for path in listing.split():
        if path.endswith(".py"):
            source = subprocess.run(["git", "-C", str(REPOSITORY), "show", f"{revision}:{path}"],
                                    check=True, capture_output=True).stdout
            (directory / Path(path).name).write_bytes(source)


def write_package(revision, directory):
    """Write the whole ``nblstm`` package as of ``revision`` (None: this
    checkout) into ``directory``, its kernels in ``directory/kernels`` as an
    installed copy has them."""
    write_kernels(revision, directory, "nblstm")
    (directory / "kernels").mkdir()
    write_kernels(revision, directory / "kernels")


class ApiCalls:
    """Calls of one copy of the public API on one point's inputs."""

    def __init__(self, package, p):
        self.package = package
        self.params = package.LSTMParams(W_x=p["w_x"][0], W_h=p["w_h"][0], b=p["b"][0])

    def call(self, p, mode):
        """As :func:`call`, through ``nblstm.forward``/``backward``; returns y."""
        api = self.package
        if mode == "fwd":
            return api.forward(p["x"], self.params, backend="cpu", training=False)[0]
        y, _, cache = api.forward(p["x"], self.params, backend="cpu")
        api.backward(cache, p["dy"])
        return y


def problem(hidden, batch, dtype):
    """Inputs and buffers of one point, for ``cpu.forward``/``cpu.backward``."""
    from nblstm.bench import Point, make_inputs

    params, x, dy = make_inputs(Point(STEPS, batch, hidden, dtype, "fwd"))
    real = x.dtype
    state = np.zeros((1, batch, hidden), real)
    return {
        "x": x, "w_x": np.ascontiguousarray(params.W_x[None]),
        "w_h": np.ascontiguousarray(params.W_h[None]), "b": params.b[None].copy(),
        "h0": state, "c0": state.copy(), "lengths": np.full(batch, STEPS, np.int64), "dy": dy,
        "y": np.empty((STEPS, batch, hidden), real),
        "saved": (np.empty((1, STEPS, batch, 4 * hidden), real),
                  np.empty((1, STEPS + 1, batch, hidden), real),
                  np.empty((1, STEPS + 1, batch, hidden), real)),
    }


def call(cpu, p, mode):
    """One forward (inference) or forward + backward call of ``cpu``; returns y."""
    if isinstance(cpu, ApiCalls):
        return cpu.call(p, mode)
    training = mode != "fwd"
    if "training" in inspect.signature(cpu.forward).parameters:
        y, _, _, saved = cpu.forward(p["x"], p["w_x"], p["w_h"], p["b"], p["h0"], p["c0"],
                                     p["lengths"], training)
    else:
        # Revisions before the outputs were allocated in compiled code.
        y, saved = p["y"], p["saved"] if training else None
        cpu.forward(p["x"], p["w_x"], p["w_h"], p["b"], p["h0"], p["c0"], p["lengths"], y, saved)
    if training:
        cpu.backward(p["x"], p["w_x"], p["w_h"], saved, p["lengths"], p["dy"], p["h0"], p["c0"])
    return y.copy()


def compare(base, new, p, mode):
    """(base ms, new ms, median base/new, largest |y_base - y_new|) at one point,
    timed as ``python -m nblstm bench`` times its peers (:func:`nblstm.bench.compare`)."""
    from nblstm import bench

    difference = float(np.abs(call(base, p, mode) - call(new, p, mode)).max())
    new_s, base_s, ratio = bench.compare(lambda: call(new, p, mode), lambda: call(base, p, mode),
                                         PAIRS)
    return base_s * 1e3, new_s * 1e3, ratio, difference


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare against")
    parser.add_argument("--points", nargs="+", default=["256x1"], help="HxB, e.g. 512x32")
    parser.add_argument("--dtype", choices=["f32", "f64"], default="f32")
    parser.add_argument("--mode", choices=["fwd", "fwdbwd"], default="fwd")
    parser.add_argument("--api", action="store_true",
                        help="time the public API of the whole package, not the kernels alone")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPOSITORY))
    with tempfile.TemporaryDirectory() as directory:
        versions = []
        for name, revision in (("base_kernels", args.base), ("new_kernels", None)):
            copy = Path(directory) / name
            copy.mkdir()
            if args.api:
                write_package(revision, copy)
                versions.append(import_package(name, copy))
            else:
                write_kernels(revision, copy)
                versions.append(import_kernels(name, copy))
        for point in args.points:
            hidden, batch = (int(value) for value in point.split("x"))
            p = problem(hidden, batch, args.dtype)
            base, new = (ApiCalls(v, p) if args.api else v for v in versions)
            base_ms, new_ms, ratio, difference = compare(base, new, p, args.mode)
            print(f"{args.mode} {args.dtype} H={hidden} B={batch}: {args.base} {base_ms:.3f} ms, "
                  f"this checkout {new_ms:.3f} ms, {args.base}/this {ratio:.3f}, "
                  f"largest |y difference| {difference:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
