"""Every compiled backend against the float64 reference: every output and gradient."""
import numpy as np
import pytest

import nblstm
from helpers import (TOLERANCE, as_float64, assert_matches_reference, compiled_backends,
                     random_problem, relative_error, run)

# (T, B, I, H): B=1, T=1, H not a multiple of 8, I != H, more units than one
# tile, and several tiles a worker (which odd steps visit in reverse); H=16
# makes each row of y whole cache lines, which the CPU loop streams out with
# non-temporal stores instead of copying.
SHAPES = [(1, 1, 1, 1), (1, 3, 4, 5), (6, 1, 7, 3), (5, 4, 3, 9), (4, 3, 6, 16),
          (3, 10, 17, 33), (9, 2, 6, 70), (7, 3, 5, 330)]
DTYPES = [np.float32, np.float64]


@pytest.fixture(params=compiled_backends())
def backend(request):
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, shape, dtype):
    problem = random_problem(*shape, dtype, np.random.default_rng(hash(shape) % 2**32))
    assert_matches_reference(run(problem, backend), problem)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("gradients", ["all", "no_dy", "only_dy", "none"])
def test_optional_states_and_gradients(backend, dtype, with_state, gradients):
    rng = np.random.default_rng(11)
    problem = random_problem(4, 3, 5, 6, dtype, rng)
    state = (problem["h0"], problem["c0"]) if with_state else (None, None)
    upstream = {"dy": problem["dy"], "dh_n": problem["dh_n"], "dc_n": problem["dc_n"]}
    if gradients in ("no_dy", "none"):
        upstream["dy"] = None
    if gradients in ("only_dy", "none"):
        upstream["dh_n"] = upstream["dc_n"] = None

    def call(arrays, name):
        y, (h_n, c_n), cache = nblstm.forward(arrays["x"], arrays["params"],
                                              *(None if s is None else arrays[k] for s, k in
                                                zip(state, ("h0", "c0"))), backend=name)
        grads = nblstm.backward(cache, *(None if upstream[k] is None else arrays[k]
                                         for k in ("dy", "dh_n", "dc_n")))
        return {"y": y, "h_n": h_n, "c_n": c_n, **vars(grads)}

    actual = call(problem, backend)
    expected = call(as_float64(problem), "numpy")
    for name, value in expected.items():
        error = relative_error(actual[name], value)
        assert actual[name].dtype == dtype and actual[name].shape == value.shape, name
        assert error <= TOLERANCE[np.dtype(dtype)] or np.max(np.abs(value)) == 0, name
    if gradients == "none":
        for name in ("dx", "dh0", "dc0", "dW_x", "dW_h", "db"):
            assert not np.any(actual[name]), f"{name} must be zero without upstream gradients"


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_first(backend, dtype):
    problem = random_problem(5, 3, 4, 6, dtype, np.random.default_rng(3))
    y_tm, (h_n, c_n), cache_tm = nblstm.forward(problem["x"], problem["params"], backend=backend)
    grads_tm = nblstm.backward(cache_tm, problem["dy"])
    x_bf = np.ascontiguousarray(problem["x"].transpose(1, 0, 2))
    y_bf, (h_bf, c_bf), cache_bf = nblstm.forward(x_bf, problem["params"], backend=backend,
                                                  batch_first=True)
    grads_bf = nblstm.backward(cache_bf, np.ascontiguousarray(problem["dy"].transpose(1, 0, 2)))
    assert y_bf.shape == (3, 5, 6) and grads_bf.dx.shape == (3, 5, 4)
    np.testing.assert_array_equal(y_bf, y_tm.transpose(1, 0, 2))
    np.testing.assert_array_equal(h_bf, h_n)
    np.testing.assert_array_equal(grads_bf.dx, grads_tm.dx.transpose(1, 0, 2))
    np.testing.assert_array_equal(grads_bf.dW_h, grads_tm.dW_h)


@pytest.mark.parametrize("dtype", DTYPES)
def test_inference_matches_training(backend, dtype):
    problem = random_problem(7, 2, 3, 5, dtype, np.random.default_rng(8))
    args = (problem["x"], problem["params"], problem["h0"], problem["c0"])
    y_train, state_train, cache = nblstm.forward(*args, backend=backend)
    y_infer, state_infer, no_cache = nblstm.forward(*args, backend=backend, training=False)
    assert cache is not None and no_cache is None
    np.testing.assert_array_equal(y_infer, y_train)
    np.testing.assert_array_equal(state_infer[0], state_train[0])
    np.testing.assert_array_equal(state_infer[1], state_train[1])


def test_backward_does_not_consume_the_cache(backend):
    problem = random_problem(4, 2, 3, 5, np.float64, np.random.default_rng(4))
    _, _, cache = nblstm.forward(problem["x"], problem["params"], backend=backend)
    first = nblstm.backward(cache, problem["dy"], problem["dh_n"])
    second = nblstm.backward(cache, problem["dy"], problem["dh_n"])
    for name, value in vars(first).items():
        np.testing.assert_array_equal(getattr(second, name), value, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks", [[3, 3], [1, 4, 1], [2, 1, 2, 1]])
def test_chunked_calls_equal_one_call(backend, dtype, chunks):
    problem = random_problem(sum(chunks), 3, 4, 5, dtype, np.random.default_rng(21))
    params, x, dy = problem["params"], problem["x"], problem["dy"]
    y, (h_n, c_n), cache = nblstm.forward(x, params, problem["h0"], problem["c0"], backend=backend)
    whole = nblstm.backward(cache, dy, problem["dh_n"], problem["dc_n"])

    bounds = np.cumsum([0] + chunks)
    state = (problem["h0"], problem["c0"])
    pieces, caches = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        y_chunk, state, chunk_cache = nblstm.forward(x[lo:hi], params, *state, backend=backend)
        pieces.append(y_chunk)
        caches.append(chunk_cache)
    tolerance = TOLERANCE[np.dtype(dtype)]
    np.testing.assert_allclose(np.concatenate(pieces), y, rtol=0, atol=tolerance)
    np.testing.assert_allclose(state[0], h_n, rtol=0, atol=tolerance)

    d_state = (problem["dh_n"], problem["dc_n"])
    dx_pieces = []
    dw_h = np.zeros_like(params.W_h)
    for (lo, hi), chunk_cache in reversed(list(zip(zip(bounds[:-1], bounds[1:]), caches))):
        grads = nblstm.backward(chunk_cache, dy[lo:hi], *d_state)
        d_state = (grads.dh0, grads.dc0)
        dx_pieces.insert(0, grads.dx)
        dw_h += grads.dW_h
    scale = np.max(np.abs(whole.dW_h))
    np.testing.assert_allclose(np.concatenate(dx_pieces), whole.dx, rtol=0, atol=tolerance)
    np.testing.assert_allclose(d_state[0], whole.dh0, rtol=0, atol=tolerance)
    np.testing.assert_allclose(d_state[1], whole.dc0, rtol=0, atol=tolerance)
    np.testing.assert_allclose(dw_h, whole.dW_h, rtol=0, atol=tolerance * scale)
