"""Property test: random shapes, dtypes and scales, every backend == the reference."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import nblstm
from helpers import TOLERANCE, as_float64, compiled_backends, random_problem, relative_error, run


@settings(max_examples=40, deadline=None, derandomize=True)
@given(steps=st.integers(1, 6), batch=st.integers(1, 9), inputs=st.integers(1, 12),
       hidden=st.integers(1, 40), dtype=st.sampled_from([np.float32, np.float64]),
       scale=st.sampled_from([0.1, 1.0, 4.0]), seed=st.integers(0, 2**32 - 1),
       backend=st.sampled_from(compiled_backends()))
def test_backend_matches_reference(steps, batch, inputs, hidden, dtype, scale, seed, backend):
    problem = random_problem(steps, batch, inputs, hidden, dtype, np.random.default_rng(seed))
    params = problem["params"]
    problem["params"] = nblstm.LSTMParams(W_x=params.W_x * dtype(scale),
                                          W_h=params.W_h * dtype(scale), b=params.b * dtype(scale))
    problem["x"] = problem["x"] * dtype(scale)
    actual = run(problem, backend)
    expected = run(as_float64(problem), "numpy")
    # Saturated gates amplify float32 rounding of pre-activations by the scale.
    tolerance = TOLERANCE[np.dtype(dtype)] * max(1.0, scale)
    for name, value in expected.items():
        assert actual[name].dtype == dtype
        assert relative_error(actual[name], value) <= tolerance, name
