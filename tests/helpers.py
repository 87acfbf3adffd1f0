"""Shared test helpers: random problems, comparison, the backends under test."""
import contextlib

import numba

import nblstm
from nblstm.verify import TOLERANCE, as_float64, random_problem, relative_error, run

__all__ = ["TOLERANCE", "as_float64", "random_problem", "relative_error", "run",
           "assert_matches_reference", "compiled_backends", "numba_threads"]


def compiled_backends():
    """The compiled backends that run here ("cuda" only with a real GPU or the simulator)."""
    return [name for name, status in nblstm.available_backends().items()
            if status.available and name not in ("numpy",)]


@contextlib.contextmanager
def numba_threads(count):
    """Numba's thread count set to ``count`` (at most the threads it started
    with) inside the block, and back to what it was after."""
    default = numba.get_num_threads()
    numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(default)


def assert_matches_reference(actual, problem, names=None):
    """Every output in ``actual`` matches the float64 reference on ``problem``'s inputs."""
    dtype = problem["x"].dtype
    expected = run(as_float64(problem), "numpy")
    for name in names or actual:
        assert actual[name].dtype == dtype, f"{name} has dtype {actual[name].dtype}, not {dtype}"
        assert actual[name].shape == expected[name].shape, name
        error = relative_error(actual[name], expected[name])
        assert error <= TOLERANCE[dtype], (
            f"{name}: relative error {error:.2e} > {TOLERANCE[dtype]:.0e}")
