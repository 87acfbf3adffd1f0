"""The scalar LSTM cell math, written once for every target.

Each function is plain Python decorated ``@njit(inline="always")``: the CPU
drivers inline it, and numba-cuda compiles the same definition for the GPU when
a ``@cuda.jit`` kernel calls it. Constants are typed to the argument
(``type(z)(1)``) so that float32 stays float32 on both targets.

Gate order along the 4H axis is ``i, f, g, o``.
"""
import math

from numba import njit

#: Number of gates stacked along the 4H axis, in the order i, f, g, o.
N_GATES = 4


@njit(inline="always")
def sigmoid(z):
    """Logistic function, stable for any |z| and NaN-propagating.

    ``exp`` only ever sees ``-|z|``, so it cannot overflow.
    """
    one = type(z)(1)
    e = math.exp(-abs(z))
    s = one / (one + e)
    return s if z >= type(z)(0) else e * s


@njit(inline="always")
def step_time(step, length, reverse):
    """The time index a row reads at ``step`` of its direction.

    Forward: ``step``; reverse: ``length - 1 - step``, so each sequence runs
    backwards within its own length. Only meaningful when ``step < length``.
    """
    return length - 1 - step if reverse else step


@njit(inline="always")
def cell_forward(z_i, z_f, z_g, z_o, c_prev):
    """One unit of one step, from pre-activations to the new state.

    Returns ``(i, f, g, o, c, h)``: the post-activation gates, the new cell
    state and the new hidden state.
    """
    i = sigmoid(z_i)
    f = sigmoid(z_f)
    g = math.tanh(z_g)
    o = sigmoid(z_o)
    c = f * c_prev + i * g
    h = o * math.tanh(c)
    return i, f, g, o, c, h


@njit(inline="always")
def cell_backward(i, f, g, o, c_prev, dh, dc_next):
    """Backward through one unit of one step, from the saved gates and c_{t-1}.

    ``dh`` is the total gradient reaching ``h_t`` and ``dc_next`` the gradient
    reaching ``c_t`` from step t+1. ``c_t`` is recomputed exactly as the
    forward pass computed it. Derivatives use the saved outputs:
    d sigma = y (1 - y), d tanh = 1 - y^2.

    Returns ``(dz_i, dz_f, dz_g, dz_o, dc_prev)``: gradients of the four
    pre-activations and of ``c_{t-1}``.
    """
    one = type(c_prev)(1)
    tanh_c = math.tanh(f * c_prev + i * g)
    dc = dc_next + dh * o * (one - tanh_c * tanh_c)
    dz_i = dc * g * i * (one - i)
    dz_f = dc * c_prev * f * (one - f)
    dz_g = dc * i * (one - g * g)
    dz_o = dh * tanh_c * o * (one - o)
    return dz_i, dz_f, dz_g, dz_o, dc * f
