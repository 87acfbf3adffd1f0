"""The reference against finite differences, and the seed's per-gate equations."""
import numpy as np
import pytest

import nblstm
from nblstm import reference
from helpers import random_problem, relative_error

FD_STEP = 1e-6
FD_TOLERANCE = 1e-7


def _loss(problem, x, w_x, w_h, b, h0, c0):
    y, _, hidden_states, cell_states = reference.forward(x, w_x, w_h, b, h0, c0)
    return (np.sum(y * problem["dy"]) + np.sum(hidden_states[-1] * problem["dh_n"])
            + np.sum(cell_states[-1] * problem["dc_n"]))


@pytest.mark.parametrize("shape", [(3, 2, 3, 4), (1, 1, 2, 3), (4, 3, 5, 2)])
def test_reference_gradients_match_central_differences(shape):
    rng = np.random.default_rng(1234)
    problem = random_problem(*shape, np.float64, rng)
    params = problem["params"]
    inputs = {"x": problem["x"], "w_x": params.W_x, "w_h": params.W_h, "b": params.b,
              "h0": problem["h0"], "c0": problem["c0"]}
    inputs = {name: array.copy() for name, array in inputs.items()}
    _, gates, hidden_states, cell_states = reference.forward(**inputs)
    analytic = dict(zip(["x", "h0", "c0", "w_x", "w_h", "b"], reference.backward(
        inputs["x"], inputs["w_x"], inputs["w_h"], gates, hidden_states, cell_states,
        problem["dy"], problem["dh_n"], problem["dc_n"])))
    for name, array in inputs.items():
        numeric = np.empty_like(array)
        for index in np.ndindex(array.shape):
            saved = array[index]
            array[index] = saved + FD_STEP
            plus = _loss(problem, **inputs)
            array[index] = saved - FD_STEP
            minus = _loss(problem, **inputs)
            array[index] = saved
            numeric[index] = (plus - minus) / (2 * FD_STEP)
        error = relative_error(analytic[name], numeric)
        assert error < FD_TOLERANCE, f"d{name}: relative error {error:.2e}"


def test_from_gates_reproduces_the_seed_equations_literally():
    rng = np.random.default_rng(7)
    hidden, inputs, batch = 5, 3, 4
    weights = {k: rng.standard_normal((hidden, hidden + inputs)) for k in "fiCo"}
    biases = {k: rng.standard_normal(hidden) for k in "fiCo"}
    params = nblstm.LSTMParams.from_gates(
        weights["f"], weights["i"], weights["C"], weights["o"],
        biases["f"], biases["i"], biases["C"], biases["o"])
    x = rng.standard_normal((1, batch, inputs))
    h_prev = rng.standard_normal((batch, hidden))
    c_prev = rng.standard_normal((batch, hidden))

    def sigma(z):
        return 1 / (1 + np.exp(-z))

    expected_h = np.empty((batch, hidden))
    expected_c = np.empty((batch, hidden))
    for n in range(batch):
        hx = np.concatenate([h_prev[n], x[0, n]])
        f_t = sigma(weights["f"] @ hx + biases["f"])
        i_t = sigma(weights["i"] @ hx + biases["i"])
        candidate = np.tanh(weights["C"] @ hx + biases["C"])
        o_t = sigma(weights["o"] @ hx + biases["o"])
        expected_c[n] = f_t * c_prev[n] + i_t * candidate
        expected_h[n] = o_t * np.tanh(expected_c[n])

    for backend in ("numpy", "cpu"):
        y, (h_n, c_n), _ = nblstm.forward(x, params, h_prev, c_prev, backend=backend)
        np.testing.assert_allclose(h_n, expected_h, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(c_n, expected_c, rtol=1e-13, atol=1e-14)
        np.testing.assert_array_equal(y[0], h_n)


def test_init_is_seeded_and_bounded():
    first = nblstm.LSTMParams.init(3, 16, dtype=np.float64, rng=5)
    second = nblstm.LSTMParams.init(3, 16, dtype=np.float64, rng=5)
    np.testing.assert_array_equal(first.W_h, second.W_h)
    assert first.W_x.shape == (3, 64) and first.W_h.shape == (16, 64) and first.b.shape == (64,)
    for array in (first.W_x, first.W_h, first.b):
        assert np.all(np.abs(array) <= 0.25) and np.std(array) > 0.1
