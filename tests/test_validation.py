"""Bad input is refused clearly; the caller's arrays are never written."""
import warnings

import numpy as np
import pytest

import nblstm
from helpers import assert_matches_reference, compiled_backends, random_problem, run

T, B, I, H = 4, 3, 5, 6


@pytest.fixture
def problem():
    return random_problem(T, B, I, H, np.float64, np.random.default_rng(99))


def _forward_args(problem, **changes):
    args = {"x": problem["x"], "params": problem["params"], "h0": problem["h0"],
            "c0": problem["c0"]}
    args.update(changes)
    return args


F32 = np.float32
BAD_FORWARD = [
    ("x", lambda p: {"x": p["x"].tolist()}, TypeError, "x must be a NumPy"),
    ("x", lambda p: {"x": p["x"][0]}, ValueError, "x must have 3 dimension"),
    ("x", lambda p: {"x": p["x"].astype(np.int64)}, TypeError, "x must be float32 or float64"),
    ("x", lambda p: {"x": p["x"][:, :, :2]}, ValueError, r"I = input size = 5"),
    ("x", lambda p: {"x": p["x"][:0]}, ValueError, "T >= 1"),
    ("params", lambda p: {"params": (p["params"].W_x,)}, TypeError, "params must be"),
    ("params", lambda p: {"params": p["params"].astype(F32)}, TypeError, "params have dtype"),
    ("h0", lambda p: {"h0": p["h0"][:1]}, ValueError, r"h0 must have shape \(B, H\) = \(3, 6\)"),
    ("c0", lambda p: {"c0": p["c0"].T}, ValueError, r"c0 must have shape \(B, H\)"),
    ("c0", lambda p: {"c0": p["c0"][None]}, ValueError, "c0 must have 2 dimension"),
    ("h0", lambda p: {"h0": p["h0"].astype(F32)}, TypeError, "h0 has dtype float32"),
]


@pytest.mark.parametrize("backend", ["numpy"] + compiled_backends())
@pytest.mark.parametrize("argument,change,error,message", BAD_FORWARD,
                         ids=[f"{case[0]}-{n}" for n, case in enumerate(BAD_FORWARD)])
def test_forward_rejects(problem, backend, argument, change, error, message):
    with pytest.raises(error, match=message):
        nblstm.forward(**_forward_args(problem, **change(problem)), backend=backend)


def test_unknown_backend_is_rejected(problem):
    with pytest.raises(ValueError, match="backend must be one of"):
        nblstm.forward(**_forward_args(problem), backend="gpu")


BAD_BACKWARD = [
    ("dy", lambda p: {"dy": p["dy"][:, :1]}, ValueError, r"dy must have shape \(T, B, H\)"),
    ("dy", lambda p: {"dy": p["dy"].astype(F32)}, TypeError, "dy has dtype float32"),
    ("dy", lambda p: {"dy": 1.0}, TypeError, "dy must be a NumPy"),
    ("dh_n", lambda p: {"dh_n": p["dh_n"][:, :2]}, ValueError, r"dh_n must have shape \(B, H\)"),
    ("dc_n", lambda p: {"dc_n": p["dc_n"].astype(F32)}, TypeError, "dc_n has dtype"),
]


@pytest.mark.parametrize("argument,change,error,message", BAD_BACKWARD,
                         ids=[f"{case[0]}-{n}" for n, case in enumerate(BAD_BACKWARD)])
def test_backward_rejects(problem, argument, change, error, message):
    _, _, cache = nblstm.forward(problem["x"], problem["params"])
    upstream = {"dy": problem["dy"], "dh_n": problem["dh_n"], "dc_n": problem["dc_n"]}
    upstream.update(change(problem))
    with pytest.raises(error, match=message):
        nblstm.backward(cache, **upstream)


def test_backward_rejects_a_foreign_or_corrupt_cache(problem):
    with pytest.raises(TypeError, match="cache must be the LSTMCache"):
        nblstm.backward({"gates": None}, problem["dy"])
    _, _, cache = nblstm.forward(problem["x"], problem["params"], training=True)
    _, _, other = nblstm.forward(problem["x"][:2], problem["params"])
    with pytest.raises(ValueError, match=r"dy must have shape \(T, B, H\) = \(2, 3, 6\)"):
        nblstm.backward(other, problem["dy"])
    corrupt = type(cache)(**{**vars(cache), "gates": other.gates})
    with pytest.raises(ValueError, match="cache.gates has shape"):
        nblstm.backward(corrupt, problem["dy"])


@pytest.mark.parametrize("make", [
    lambda p: {"W_x": p.W_x[:, :-1]}, lambda p: {"W_h": p.W_h[:-1]},
    lambda p: {"b": p.b[:-2]}, lambda p: {"b": p.b.astype(np.float32)},
    lambda p: {"W_h": p.W_h.tolist()}])
def test_params_reject_inconsistent_arrays(problem, make):
    params = problem["params"]
    fields = {"W_x": params.W_x, "W_h": params.W_h, "b": params.b}
    fields.update(make(params))
    with pytest.raises((ValueError, TypeError), match=r"W_x|W_h|b"):
        nblstm.LSTMParams(**fields)


def test_from_gates_rejects_mismatched_shapes():
    weights = [np.ones((3, 5))] * 4
    biases = [np.ones(3)] * 4
    with pytest.raises(ValueError, match="W_o must have shape"):
        nblstm.LSTMParams.from_gates(*weights[:3], np.ones((3, 6)), *biases)
    with pytest.raises(ValueError, match="b_C must have shape"):
        nblstm.LSTMParams.from_gates(*weights, *biases[:2], np.ones(4), biases[3])


@pytest.mark.parametrize("backend", compiled_backends())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inputs_are_never_written(backend, dtype):
    problem = random_problem(T, B, I, H, dtype, np.random.default_rng(5))
    originals = {k: v.copy() for k, v in problem.items() if k != "params"}
    param_copies = {k: getattr(problem["params"], k).copy() for k in ("W_x", "W_h", "b")}
    run(problem, backend)
    for name, value in originals.items():
        np.testing.assert_array_equal(problem[name], value, err_msg=name)
    for name, value in param_copies.items():
        np.testing.assert_array_equal(getattr(problem["params"], name), value, err_msg=name)


@pytest.mark.parametrize("backend", compiled_backends())
def test_non_contiguous_inputs(backend):
    rng = np.random.default_rng(6)
    problem = random_problem(T, B, I, H, np.float64, rng)

    def strided(array):
        padded = np.zeros(array.shape[:-1] + (2 * array.shape[-1],), array.dtype)
        padded[..., ::2] = array
        return padded[..., ::2]

    def fortran(array):
        return np.asfortranarray(array)

    params = problem["params"]
    odd = dict(problem)
    odd["params"] = nblstm.LSTMParams(W_x=fortran(params.W_x), W_h=strided(params.W_h),
                                      b=strided(params.b))
    for name in ("x", "dy"):
        odd[name] = strided(problem[name])
    odd["h0"] = fortran(problem["h0"])
    odd["dc_n"] = strided(problem["dc_n"])
    assert not odd["x"].flags.c_contiguous and not odd["params"].W_h.flags.c_contiguous
    assert_matches_reference(run(odd, backend), problem)


@pytest.mark.parametrize("backend", ["numpy"] + compiled_backends())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_inputs_follow_ieee_without_warnings(backend, dtype):
    problem = random_problem(3, 2, 4, 5, dtype, np.random.default_rng(12))
    x = problem["x"].copy()
    x[1, 0, 2] = np.nan
    x[0, 1, :] = np.inf
    params = problem["params"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, (h_n, c_n), cache = nblstm.forward(x, params, backend=backend)
        grads = nblstm.backward(cache, problem["dy"])
    reference_y, (ref_h, _), ref_cache = nblstm.forward(x.astype(np.float64),
                                                        params.astype(np.float64),
                                                        backend="numpy")
    np.testing.assert_array_equal(np.isnan(y), np.isnan(reference_y))
    assert np.isnan(y[1, 0]).all() and np.isnan(h_n[0]).all()
    finite = np.isfinite(reference_y)
    np.testing.assert_allclose(y[finite], reference_y[finite], rtol=1e-5, atol=1e-6)
    assert np.isnan(grads.dW_x).any()


@pytest.mark.parametrize("backend", ["numpy"] + compiled_backends())
def test_saturated_pre_activations_give_exact_gate_limits(backend):
    hidden = 3
    params = nblstm.LSTMParams(W_x=np.zeros((1, 4 * hidden)), W_h=np.zeros((hidden, 4 * hidden)),
                               b=np.array([1e4] * hidden + [-np.inf] * hidden
                                          + [np.inf] * hidden + [800.0] * hidden))
    x = np.ones((2, 1, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, (h_n, c_n), cache = nblstm.forward(x, params, backend=backend)
    # i = 1, f = 0, g = 1, o = 1: c_t = 1 at every step, h_t = tanh(1).
    np.testing.assert_array_equal(c_n, np.ones((1, hidden)))
    np.testing.assert_array_equal(y, np.full((2, 1, hidden), np.tanh(1.0)))
    np.testing.assert_array_equal(cache.gates[0, 0, 0], np.repeat([1.0, 0.0, 1.0, 1.0], hidden))
