"""The "cuda" backend against the reference, and its device-array contract.

Runs in its own process (tests/test_cuda_suite.py): on a real GPU when there
is one, else under Numba's simulator with tiny shapes.
"""
import re
import warnings

import numpy as np
import pytest
from numba import config, cuda

import nblstm
from helpers import (TOLERANCE, as_float64, assert_matches_reference, random_problem,
                     relative_error, run)
from nblstm._device import is_device_array

DTYPES = [np.float32, np.float64]
ON_GPU = not config.ENABLE_CUDASIM
# (T, B, I, H): B=1, T=1, I != H, H and 4H not multiples of the simulator's tile (4).
SHAPES = [(1, 1, 1, 1), (3, 2, 3, 5), (2, 3, 6, 3), (4, 1, 2, 7)]
# On a GPU also shapes spanning several GEMM tiles (16 wide there) with ragged edges,
# and T*B over the column reduction's REDUCE_ROWS (64), so it sums several parts.
if ON_GPU:
    SHAPES += [(5, 33, 70, 37), (3, 130, 17, 129)]

pytestmark = pytest.mark.skipif(not nblstm.available_backends()["cuda"].available,
                                reason="no GPU and not under the simulator")


def to_device_problem(problem):
    moved = {k: cuda.to_device(v) for k, v in problem.items() if k != "params"}
    moved["params"] = problem["params"].to_device()
    return moved


def host(value):
    return value.copy_to_host() if is_device_array(value) else value


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype):
    problem = random_problem(*shape, dtype, np.random.default_rng(sum(shape)))
    actual = run(problem, "cuda")
    for name, value in actual.items():
        assert isinstance(value, np.ndarray), f"host inputs must give host {name}"
    assert_matches_reference(actual, problem)


#: PERSISTENT_MAX_STEP_BYTES values that send every time loop down one kind or the other.
TIME_LOOPS = {"stepwise": 0, "persistent": 1 << 62}


@pytest.mark.parametrize("loop", TIME_LOOPS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_both_time_loops_match_the_reference(loop, dtype, monkeypatch):
    from nblstm.kernels import cuda as kernels

    monkeypatch.setattr(kernels, "PERSISTENT_MAX_STEP_BYTES", TIME_LOOPS[loop])
    for shape in SHAPES[-2:]:
        problem = random_problem(*shape, dtype, np.random.default_rng(sum(shape)))
        assert_matches_reference(run(problem, "cuda"), problem)
    rng = np.random.default_rng(12)
    lengths = np.array([3, 0, 2])
    model = nblstm.LSTM(3, 5, bidirectional=True, dtype=dtype, backend="cuda", rng=1)
    reference = nblstm.LSTM(3, 5, bidirectional=True, dtype=np.float64, backend="numpy")
    reference.params = [[p.astype(np.float64) for p in layer] for layer in model.params]
    x, dy = rng.standard_normal((3, 3, 3)), rng.standard_normal((3, 3, 10))
    y_infer, _ = model.forward(x.astype(dtype), lengths=lengths, training=False)
    results = []
    for lstm, cast in ((model, dtype), (reference, np.float64)):
        y, (h_n, c_n) = lstm.forward(x.astype(cast), lengths=lengths)
        dx, (dh0, dc0) = lstm.backward(dy.astype(cast))
        results.append([y, h_n, c_n, dx, dh0, dc0, lstm.grads[0][1].W_h, lstm.grads[0][1].b])
    np.testing.assert_array_equal(y_infer, results[0][0])
    for actual, expected in zip(*results):
        assert relative_error(actual, expected) <= TOLERANCE[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_device_inputs_give_device_outputs_without_host_copies(dtype, monkeypatch):
    problem = random_problem(3, 2, 3, 5, dtype, np.random.default_rng(2))
    on_device = to_device_problem(problem)

    def forbidden(*args, **kwargs):
        raise AssertionError("a host copy happened on the device-in/device-out path")

    array_type = type(on_device["x"])
    monkeypatch.setattr(array_type, "copy_to_host", forbidden)
    monkeypatch.setattr(cuda, "to_device", forbidden)
    actual = run(on_device, "auto")
    monkeypatch.undo()
    for name, value in actual.items():
        assert is_device_array(value), f"{name} came back on the host"
    assert_matches_reference({k: host(v) for k, v in actual.items()}, problem)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_host_and_device_arguments(dtype):
    problem = random_problem(2, 3, 4, 3, dtype, np.random.default_rng(3))
    mixed = dict(problem)
    mixed["x"] = cuda.to_device(problem["x"])
    mixed["dh_n"] = cuda.to_device(problem["dh_n"])
    actual = run(mixed, "cuda")
    assert is_device_array(actual["y"]) and is_device_array(actual["dW_h"])
    assert_matches_reference({k: host(v) for k, v in actual.items()}, problem)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("with_dy", [True, False])
def test_optional_states_and_dy(dtype, with_state, with_dy):
    problem = random_problem(3, 2, 2, 3, dtype, np.random.default_rng(4))

    def call(arrays, backend):
        states = (arrays["h0"], arrays["c0"]) if with_state else (None, None)
        y, (h_n, c_n), cache = nblstm.forward(arrays["x"], arrays["params"], *states,
                                              backend=backend)
        grads = nblstm.backward(cache, arrays["dy"] if with_dy else None, arrays["dh_n"])
        return {"y": y, "h_n": h_n, "c_n": c_n, **vars(grads)}

    actual = call(problem, "cuda")
    expected = call(as_float64(problem), "numpy")
    for name, value in expected.items():
        assert relative_error(actual[name], value) <= TOLERANCE[np.dtype(dtype)], name


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_first_and_strided_device_input(dtype):
    problem = random_problem(3, 2, 4, 5, dtype, np.random.default_rng(5))
    x_bf = np.ascontiguousarray(problem["x"].transpose(1, 0, 2))
    padded = np.zeros(x_bf.shape[:2] + (2 * x_bf.shape[2],), dtype)
    padded[..., ::2] = x_bf
    strided = cuda.to_device(padded)[:, :, ::2]
    assert not strided.is_c_contiguous()
    y, (h_n, _), cache = nblstm.forward(strided, problem["params"], backend="cuda",
                                        batch_first=True)
    grads = nblstm.backward(cache, cuda.to_device(
        np.ascontiguousarray(problem["dy"].transpose(1, 0, 2))))
    reference = as_float64(problem)
    expected_y, _, expected_cache = nblstm.forward(reference["x"], reference["params"],
                                                   backend="numpy")
    expected = nblstm.backward(expected_cache, reference["dy"])
    assert y.shape == (2, 3, 5) and grads.dx.shape == (2, 3, 4)
    tolerance = TOLERANCE[np.dtype(dtype)]
    assert relative_error(host(y).transpose(1, 0, 2), expected_y) <= tolerance
    assert relative_error(host(grads.dx).transpose(1, 0, 2), expected.dx) <= tolerance
    assert relative_error(host(grads.dW_x), expected.dW_x) <= tolerance


def test_inference_matches_training():
    problem = random_problem(4, 2, 3, 5, np.float64, np.random.default_rng(6))
    y_train, (h_train, _), cache = nblstm.forward(problem["x"], problem["params"], backend="cuda")
    y_infer, (h_infer, _), none = nblstm.forward(problem["x"], problem["params"], backend="cuda",
                                                 training=False)
    assert cache is not None and none is None
    np.testing.assert_array_equal(y_infer, y_train)
    np.testing.assert_array_equal(h_infer, h_train)


def test_reruns_are_bit_identical():
    problem = random_problem(3, 3, 4, 6, np.float32, np.random.default_rng(7))
    first, second = run(problem, "cuda"), run(problem, "cuda")
    for name, value in first.items():
        np.testing.assert_array_equal(second[name], value, err_msg=name)


def test_host_backends_refuse_device_arrays():
    problem = random_problem(2, 2, 3, 4, np.float64, np.random.default_rng(8))
    with pytest.raises(TypeError, match="x is a CUDA device array, but backend 'cpu'"):
        nblstm.forward(cuda.to_device(problem["x"]), problem["params"], backend="cpu")
    with pytest.raises(TypeError, match="params.W_x is a CUDA device array"):
        nblstm.forward(problem["x"], problem["params"].to_device(), backend="numpy")
    _, _, cache = nblstm.forward(problem["x"], problem["params"], backend="cpu")
    with pytest.raises(TypeError, match="dy is a CUDA device array"):
        nblstm.backward(cache, cuda.to_device(problem["dy"]))


def test_device_inputs_are_validated_and_never_written():
    problem = random_problem(2, 2, 3, 4, np.float32, np.random.default_rng(9))
    on_device = to_device_problem(problem)
    with pytest.raises(ValueError, match=r"h0 must have shape \(B, H\)"):
        nblstm.forward(on_device["x"], on_device["params"], cuda.to_device(problem["h0"][:1]))
    with pytest.raises(TypeError, match="h0 has dtype float64"):
        nblstm.forward(on_device["x"], on_device["params"],
                       cuda.to_device(problem["h0"].astype(np.float64)))
    run(on_device, "cuda")
    for name in ("x", "h0", "c0", "dy", "dh_n", "dc_n"):
        np.testing.assert_array_equal(on_device[name].copy_to_host(), problem[name], err_msg=name)
    np.testing.assert_array_equal(on_device["params"].W_h.copy_to_host(), problem["params"].W_h)


def test_availability_says_how_cuda_runs():
    status = nblstm.available_backends()["cuda"]
    assert status.available
    assert ("simulator" in status) == bool(config.ENABLE_CUDASIM)


def test_launch_config_fits_the_device():
    from nblstm.kernels import cuda as kernels
    from nblstm.kernels.cuda import launch_config

    launch = launch_config()
    assert launch.gemm_tile >= 1 and launch.pointwise_block >= 1
    for name in ("recurrent_forward", "recurrent_backward"):
        assert kernels.persistent_blocks(name, 8, 64, np.float32) >= 1, name
    if ON_GPU:
        device = cuda.get_current_device()
        assert launch.gemm_tile ** 2 <= device.MAX_THREADS_PER_BLOCK
        assert launch.pointwise_block % device.WARP_SIZE == 0


# (T, I, H, lengths): tiny under the simulator; on a GPU also one spanning several tiles.
LAYER_SHAPES = [(4, 2, 3, (4, 0, 2))]
if ON_GPU:
    LAYER_SHAPES.append((9, 19, 45, tuple(np.random.default_rng(11).integers(0, 10, 70))))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps, inputs, hidden, lengths", LAYER_SHAPES,
                         ids=[f"T{s[0]}-B{len(s[3])}-H{s[2]}" for s in LAYER_SHAPES])
def test_bidirectional_stack_with_lengths_and_dropout(dtype, steps, inputs, hidden, lengths):
    rng = np.random.default_rng(10)
    options = dict(num_layers=2, bidirectional=True, dropout=0.3)
    lstm = nblstm.LSTM(inputs, hidden, dtype=dtype, backend="cuda", rng=np.random.default_rng(1),
                       **options)
    reference = nblstm.LSTM(inputs, hidden, dtype=np.float64, backend="numpy",
                            rng=np.random.default_rng(1), **options)
    reference.params = [[p.astype(np.float64) for p in layer] for layer in lstm.params]
    lengths = np.array(lengths)
    x = rng.standard_normal((steps, len(lengths), inputs)).astype(dtype)
    dy = rng.standard_normal((steps, len(lengths), 2 * hidden)).astype(dtype)
    results = []
    for model in (lstm, reference):
        y, (h_n, c_n) = model.forward(x.astype(model.dtype), lengths=lengths)
        dx, (dh0, _) = model.backward(dy.astype(model.dtype))
        results.append({"y": y, "h_n": h_n, "c_n": c_n, "dx": dx, "dh0": dh0,
                        "dW_h": model.grads[1][1].W_h, "db": model.grads[0][0].b})
    for name, value in results[1].items():
        assert relative_error(results[0][name], value) <= TOLERANCE[np.dtype(dtype)], name


def test_layer_on_device_arrays_stays_on_device():
    lstm = nblstm.LSTM(3, 4, bidirectional=True, dtype=np.float32, rng=2).to_device()
    x = np.random.default_rng(3).standard_normal((3, 2, 3)).astype(np.float32)
    y, (h_n, _) = lstm.forward(cuda.to_device(x), lengths=np.array([3, 1]))
    assert is_device_array(y) and is_device_array(h_n)
    dx, _ = lstm.backward(cuda.to_device(np.ones((3, 2, 8), np.float32)))
    assert is_device_array(dx) and is_device_array(lstm.grads[0][1].W_h)
    host = nblstm.LSTM(3, 4, bidirectional=True, dtype=np.float32, backend="numpy")
    host.params = [[p.to_host() for p in layer] for layer in lstm.params]
    expected, _ = host.forward(x, lengths=np.array([3, 1]))
    assert relative_error(y.copy_to_host(), expected) < 1e-5


def test_gpu_benchmark_runs():
    from nblstm import bench

    assert bench.kernel_launch_seconds(launches=2) > 0
    for mode in bench.MODES:
        row = bench.measure(bench.Point(2, 1, 4, "f32", mode), "cuda", pairs=1, with_numpy=False)
        assert row.point == f"cuda-{mode}-f32-H4-B1" and row.ms > 0


def test_small_launches_do_not_warn():
    from nblstm.kernels import cuda as kernels

    highlighted = ("\x1b[1mGrid size 1 will likely result in GPU under-utilization due to low "
                   "occupancy.\x1b[0m")
    assert re.match(kernels.SMALL_GRID_WARNING, highlighted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.pointwise_launcher("fill", 1, np.float32, cuda.default_stream())
