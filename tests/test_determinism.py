"""Bit-identical reruns, thread-count independence, concurrent callers."""
import threading

import numpy as np
import pytest

from helpers import (assert_matches_reference, compiled_backends, numba_threads, random_problem,
                     run)

SHAPE = (6, 10, 7, 37)


@pytest.fixture(params=compiled_backends())
def backend(request):
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reruns_are_bit_identical(backend, dtype):
    problem = random_problem(*SHAPE, dtype, np.random.default_rng(31))
    first = run(problem, backend)
    second = run(problem, backend)
    for name, value in first.items():
        np.testing.assert_array_equal(second[name], value, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_and_two_threads_agree(backend, dtype):
    problem = random_problem(*SHAPE, dtype, np.random.default_rng(32))
    with numba_threads(1):
        single = run(problem, backend)
    with numba_threads(2):
        double = run(problem, backend)
    for name, value in single.items():
        np.testing.assert_allclose(double[name], value, rtol=0,
                                   atol=1e-6 * max(1.0, np.max(np.abs(value))), err_msg=name)


def test_two_python_threads_at_once(backend):
    problems = [random_problem(*SHAPE, np.float64, np.random.default_rng(40 + n))
                for n in range(2)]
    results = [None, None]
    errors = []
    start = threading.Barrier(2)

    def work(index):
        try:
            start.wait()
            for _ in range(5):
                results[index] = run(problems[index], backend)
        except Exception as error:  # reported in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for problem, result in zip(problems, results):
        assert_matches_reference(result, problem)
