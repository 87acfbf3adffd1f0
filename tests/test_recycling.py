"""The recycling pool of the CPU backend's results: memory returns only from dead arrays."""
import gc
import threading

import numpy as np
import pytest

import nblstm
from nblstm._recycling import MIN_POOLED_BYTES, RESULT_POOL, RecyclingPool
from nblstm.kernels import gemm

from helpers import TOLERANCE, as_float64, random_problem, relative_error

#: The pool's thresholds in these tests, in bytes: small enough for tiny arrays.
MIN_BYTES = 1024
MAX_KEPT_BYTES = 64 * 1024


def counting_pool(max_kept_bytes=MAX_KEPT_BYTES):
    """A pool over gemm.aligned_empty, and the list of shapes it allocated afresh."""
    fresh = []

    def allocate(shape, dtype):
        fresh.append(shape)
        return gemm.aligned_empty(shape, dtype)

    return RecyclingPool(allocate, MIN_BYTES, max_kept_bytes), fresh


def address(array):
    return array.__array_interface__["data"][0]


def test_an_array_from_the_pool_is_an_aligned_writable_c_array():
    pool, _ = counting_pool()
    array = pool.empty((3, 50, 7), np.float32)
    assert array.shape == (3, 50, 7) and array.dtype == np.float32
    assert array.flags.c_contiguous and array.flags.writeable
    assert address(array) % gemm.ALIGNMENT == 0
    array[...] = 1.5
    assert array.sum() == 1.5 * array.size


def test_memory_returns_only_when_every_view_is_gone():
    pool, fresh = counting_pool()
    array = pool.empty((40, 40), np.float64)
    start = address(array)
    views = [array[3:], array.reshape(-1)[::2], array.view(np.uint8), array.T]
    del array
    while views:
        gc.collect()
        assert pool.n_bytes == 0
        views.pop()
    assert pool.n_bytes == 40 * 40 * 8
    again = pool.empty((20, 80), np.float64)
    assert address(again) == start and len(fresh) == 1


def test_small_requests_are_fresh_and_never_kept():
    pool, fresh = counting_pool()
    small = pool.empty((8, 8), np.float64)
    assert fresh == [(8, 8)]
    del small
    assert pool.n_bytes == 0
    assert pool.allocator_for(MIN_BYTES - 1) is None
    assert pool.allocator_for(MIN_BYTES) == pool.empty


def test_a_kept_buffer_serves_only_requests_of_a_similar_size():
    pool, fresh = counting_pool()
    pool.empty((8 * 1024,), np.uint8)
    small = pool.empty((2 * 1024,), np.uint8)
    assert pool.n_bytes == 8 * 1024 and len(fresh) == 2
    larger = pool.empty((9 * 1024,), np.uint8)
    assert len(fresh) == 3
    fitting = pool.empty((6 * 1024,), np.uint8)
    assert len(fresh) == 3 and pool.n_bytes == 0
    del small, larger, fitting


def test_the_smallest_fitting_buffer_is_taken():
    pool, _ = counting_pool()
    arrays = [pool.empty((n * 1024,), np.uint8) for n in (6, 5, 4)]
    starts = [address(a) for a in arrays]
    arrays.clear()
    taken = [pool.empty((4 * 1024,), np.uint8) for _ in range(2)]
    assert [address(a) for a in taken] == starts[:0:-1]


def test_the_pool_keeps_at_most_its_cap_dropping_the_oldest():
    pool, _ = counting_pool(max_kept_bytes=20 * 1024)
    arrays = [pool.empty((8 * 1024,), np.uint8) for _ in range(3)]
    starts = [address(a) for a in arrays]
    while arrays:
        arrays.pop(0)
    assert pool.n_bytes == 2 * 8 * 1024
    taken = [pool.empty((8 * 1024,), np.uint8) for _ in range(2)]
    assert {address(a) for a in taken} == set(starts[1:])
    taken.clear()
    pool.empty((32 * 1024,), np.uint8)
    assert pool.n_bytes == 2 * 8 * 1024, "a buffer larger than the cap is not kept"


def test_clear_releases_what_is_kept():
    pool, _ = counting_pool()
    pool.empty((4 * 1024,), np.uint8)
    assert pool.clear() == 4 * 1024
    assert pool.n_bytes == 0 and pool.clear() == 0


def test_arrays_dropped_on_other_threads_return():
    pool, fresh = counting_pool()
    arrays = [pool.empty((2 * 1024,), np.uint8) for _ in range(8)]
    threads = [threading.Thread(target=arrays.pop) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert pool.n_bytes == 8 * 2 * 1024
    [pool.empty((2 * 1024,), np.uint8) for _ in range(8)]
    assert len(fresh) == 8


def large_problem(dtype, seed):
    """A problem with padding whose saved gates (T * B * 4H values) the CPU backend recycles."""
    rng = np.random.default_rng(seed)
    steps, batch, inputs, hidden = 24, 33, 40, 336
    assert steps * batch * 4 * hidden * np.dtype(dtype).itemsize >= MIN_POOLED_BYTES
    problem = random_problem(steps, batch, inputs, hidden, dtype, rng)
    problem["lengths"] = rng.integers(0, steps + 1, batch)
    return problem


def run_with_lengths(problem, backend):
    """{output name: array} and the cache of one forward and backward."""
    y, (h_n, c_n), cache = nblstm.forward(problem["x"], problem["params"], problem["h0"],
                                          problem["c0"], backend=backend,
                                          lengths=problem["lengths"])
    grads = nblstm.backward(cache, problem["dy"], problem["dh_n"], problem["dc_n"])
    return {"y": y, "h_n": h_n, "c_n": c_n, **vars(grads)}, cache


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_results_in_recycled_memory_are_right_and_leave_live_ones_alone(dtype):
    nblstm.clear_workspace()
    first, first_cache = run_with_lengths(large_problem(dtype, 1), "cpu")
    saved = {name: value.copy() for name, value in vars(first_cache).items()
             if isinstance(value, np.ndarray)}
    kept = {name: value.copy() for name, value in first.items()}
    # A call whose results die, then one in their recycled memory, on other inputs.
    problem = large_problem(dtype, 2)
    run_with_lengths(problem, "cpu")
    assert RESULT_POOL.n_bytes > 0
    second, _ = run_with_lengths(problem, "cpu")
    assert RESULT_POOL.n_bytes == 0
    expected, _ = run_with_lengths(as_float64(problem) | {"lengths": problem["lengths"]}, "numpy")
    for name, value in second.items():
        error = relative_error(value, expected[name])
        assert error <= TOLERANCE[np.dtype(dtype)], f"{name}: relative error {error:.1e}"
    # The first call's results and cache, alive throughout, are as they were.
    for name, value in kept.items():
        np.testing.assert_array_equal(first[name], value, err_msg=name)
    for name, value in saved.items():
        np.testing.assert_array_equal(getattr(first_cache, name), value, err_msg=name)
    assert nblstm.clear_workspace() > 0 and RESULT_POOL.n_bytes == 0
