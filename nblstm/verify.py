"""Run a backend and the float64 reference on the same random inputs, and compare."""
from dataclasses import dataclass

import numpy as np

from . import api
from .params import LSTMParams

#: Largest accepted relative error, max|a - b| / max|b|, against the float64 reference.
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
#: (T, B, I, H) points checked by default: odd sizes, B=1, T=1, I != H.
DEFAULT_SHAPES = ((5, 3, 4, 7), (1, 1, 3, 5), (7, 2, 9, 16), (4, 9, 33, 35))
OUTPUTS = ("y", "h_n", "c_n", "dx", "dh0", "dc0", "dW_x", "dW_h", "db")


def relative_error(actual, expected):
    """max|actual - expected| / max|expected|, in float64 (0 when both are all zero)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = np.max(np.abs(expected))
    diff = np.max(np.abs(actual - expected))
    return float(diff / scale) if scale > 0 else float(diff)


def random_problem(steps, batch, inputs, hidden, dtype, rng):
    """Fresh random inputs and upstream gradients for one forward/backward.

    Returns a dict with params, x (T, B, I), h0, c0 (B, H), dy (T, B, H), dh_n, dc_n (B, H).
    """
    params = LSTMParams.init(inputs, hidden, dtype=dtype, rng=rng)

    def normal(*shape):
        return rng.standard_normal(shape).astype(dtype)

    return {"params": params, "x": normal(steps, batch, inputs), "h0": normal(batch, hidden),
            "c0": normal(batch, hidden), "dy": normal(steps, batch, hidden),
            "dh_n": normal(batch, hidden), "dc_n": normal(batch, hidden)}


def run(problem, backend):
    """Forward and backward on one problem; returns {output name: array}."""
    y, (h_n, c_n), cache = api.forward(problem["x"], problem["params"], problem["h0"],
                                       problem["c0"], backend=backend)
    grads = api.backward(cache, problem["dy"], problem["dh_n"], problem["dc_n"])
    return {"y": y, "h_n": h_n, "c_n": c_n, "dx": grads.dx, "dh0": grads.dh0,
            "dc0": grads.dc0, "dW_x": grads.dW_x, "dW_h": grads.dW_h, "db": grads.db}


def as_float64(problem):
    """The same problem with every array upcast to float64 (for the oracle)."""
    upcast = {k: v.astype(np.float64) for k, v in problem.items() if k != "params"}
    upcast["params"] = problem["params"].astype(np.float64)
    return upcast


@dataclass(frozen=True)
class Check:
    """One compared quantity."""

    backend: str
    dtype: str
    shape: tuple
    output: str
    error: float
    tolerance: float

    @property
    def ok(self):
        """True when the error is within tolerance (NaN fails)."""
        return bool(self.error <= self.tolerance)


@dataclass(frozen=True)
class VerifyReport:
    """Every check of one :func:`verify` call; ``str(report)`` is the table."""

    checks: tuple

    @property
    def ok(self):
        """True when every check passed."""
        return all(check.ok for check in self.checks)

    def __str__(self):
        header = f"{'backend':<8} {'dtype':<8} {'T,B,I,H':<14} " + " ".join(
            f"{name:>8}" for name in OUTPUTS) + "  result"
        rows = [header]
        groups = {}
        for check in self.checks:
            groups.setdefault((check.backend, check.dtype, check.shape), []).append(check)
        for (backend, dtype, shape), checks in groups.items():
            errors = " ".join(f"{check.error:8.1e}" for check in checks)
            verdict = "pass" if all(c.ok for c in checks) else "FAIL"
            rows.append(f"{backend:<8} {dtype:<8} {','.join(map(str, shape)):<14} {errors}  "
                        f"{verdict} (tol {checks[0].tolerance:.0e})")
        rows.append("all passed" if self.ok else "FAILED")
        return "\n".join(rows)


def verify(backend="cpu", shapes=DEFAULT_SHAPES, dtypes=(np.float32, np.float64), seed=None):
    """Compare a backend with the float64 reference on fresh random inputs.

    Parameters
    ----------
    backend : str
        Backend to check, e.g. ``"cpu"``.
    shapes : sequence of (T, B, I, H)
    dtypes : sequence of float32/float64
        Each backend run is in this dtype; the reference always runs in
        float64 on the same (upcast) inputs.
    seed : int or None
        Seed for the inputs; None draws fresh entropy.

    Returns
    -------
    VerifyReport
        ``report.ok`` and, as ``str(report)``, the largest relative error of
        every output and gradient.
    """
    rng = np.random.default_rng(seed)
    checks = []
    for dtype in map(np.dtype, dtypes):
        for shape in shapes:
            problem = random_problem(*shape, dtype, rng)
            actual = run(problem, backend)
            expected = run(as_float64(problem), "numpy")
            for name in OUTPUTS:
                checks.append(Check(backend, dtype.name, tuple(shape), name,
                                    relative_error(actual[name], expected[name]),
                                    TOLERANCE[dtype]))
    return VerifyReport(tuple(checks))
