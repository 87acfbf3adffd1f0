"""The scalar LSTM cell math, written once for every target.

Each function is plain Python decorated ``@njit(inline="always")``: the CPU
drivers inline it, and numba-cuda compiles the same definition for the GPU when
a ``@cuda.jit`` kernel calls it. Constants are typed to the argument
(``type(z)(1)``) so that float32 stays float32 on both targets.

Gate order along the 4H axis is ``i, f, g, o``.
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

#: Number of gates stacked along the 4H axis, in the order i, f, g, o.
N_GATES = 4


#: exp(x) is taken as 0 below this: exp(-87.3) ~ 1.2e-38 is the smallest
#: normal float32; float64 values below it are lost (absolute error < 1e-38).
EXP_FLOOR = -87.3
LOG2_E = 1.4426950408889634
#: ln 2 split in two (Cody and Waite): n * LN2_HIGH is exact for n < 2**8 in
#: float32 and float64; LN2_LOW carries the rest.
LN2_HIGH = 0.693145751953125
LN2_LOW = 1.4286068203094172e-06
#: Taylor terms of exp(r) - 1 on |r| <= ln(2) / 2 that bring the truncation
#: error below rounding: r**13 / 13! < 2e-16, r**8 / 8! < 6e-9.
EXPM1_TERMS_DOUBLE = 12
EXPM1_TERMS_SINGLE = 7
#: 1 + this is 1 in float32 but not in float64: tells the two apart in code
#: that is generic over the float type (the test folds at compile time).
SINGLE_PRECISION_PROBE = 1e-10


@njit(inline="always")
def _expm1_terms(x):
    """How many Taylor terms of exp(r) - 1 the float type of ``x`` needs."""
    one = type(x)(1)
    single = one + type(x)(SINGLE_PRECISION_PROBE) == one
    return EXPM1_TERMS_SINGLE if single else EXPM1_TERMS_DOUBLE


#: IEEE 754 layout per float width: (mantissa bits, exponent bias).
_FLOAT_LAYOUT = {32: (23, 127), 64: (52, 1023)}


@intrinsic
def power_of_two(typingctx, exponent, like):
    """``2.0 ** exponent`` in the float type of ``like``, for an integer exponent
    in that type's normal range (-126..127 for float32, -1022..1023 for float64).

    Writes the exponent field directly (one add, one shift, one bitcast): plain
    LLVM IR, so it vectorizes on the CPU and compiles for CUDA alike.
    """
    if not isinstance(exponent, types.Integer) or not isinstance(like, types.Float):
        return None

    def codegen(context, builder, signature, args):
        width = like.bitwidth
        mantissa_bits, bias = _FLOAT_LAYOUT[width]
        integer = ir.IntType(width)
        value = context.cast(builder, args[0], signature.args[0], types.int64)
        if width < 64:
            value = builder.trunc(value, integer)
        biased = builder.add(value, ir.Constant(integer, bias))
        bits = builder.shl(biased, ir.Constant(integer, mantissa_bits))
        return builder.bitcast(bits, context.get_value_type(like))

    return like(exponent, like), codegen


@njit(inline="always")
def _exp_parts(x):
    """``(q, scale)`` with ``exp(x) = (1 + q) * scale``, for x <= 0.

    Range reduction x = r - n ln 2 with |r| <= ln(2) / 2, q = exp(r) - 1 by
    its Taylor series (no cancellation near 0), scale = 2**-n written into
    the exponent bits (0 below EXP_FLOOR, so exp(-inf) = 0). Only arithmetic,
    comparisons, one float-to-int conversion and one bitcast: no library call
    and no branch, so a loop over units vectorizes on the CPU (under
    ``error_model="numpy"``, which lets divisions go unchecked), and the same
    code compiles for CUDA. Accurate to a few units in the last place.
    """
    one = type(x)(1)
    half = type(x)(0.5)
    below_floor = x < type(x)(EXP_FLOOR)
    x = type(x)(EXP_FLOOR) if below_floor else x
    n_whole = np.int32(half - x * type(x)(LOG2_E))
    n = type(x)(n_whole)
    r = (x + n * type(x)(LN2_HIGH)) + n * type(x)(LN2_LOW)
    n_terms = _expm1_terms(x)
    coefficient = one
    for term in range(2, n_terms + 1):
        coefficient /= type(x)(term)
    # Horner from the highest term down; coefficient runs 1/n!, ..., 1/1!.
    q = coefficient
    for term in range(n_terms, 1, -1):
        coefficient *= type(x)(term)
        q = q * r + coefficient
    q *= r
    scale = power_of_two(-n_whole, x)
    return q, type(x)(0) if below_floor else scale


@njit(inline="always")
def exp_nonpositive(x):
    """``exp(x)`` for x <= 0 (and NaN), vectorizable; see :func:`_exp_parts`."""
    q, scale = _exp_parts(x)
    return (type(x)(1) + q) * scale


@njit(inline="always")
def sigmoid(z):
    """Logistic function, stable for any |z| and NaN-propagating.

    ``exp`` only ever sees ``-|z|``, so it cannot overflow.
    """
    one = type(z)(1)
    e = exp_nonpositive(-abs(z))
    s = one / (one + e)
    return s if z >= type(z)(0) else e * s


@njit(inline="always")
def tanh(z):
    """Hyperbolic tangent, accurate near 0, saturating cleanly, NaN-propagating.

    tanh|z| = -m / (2 + m) with m = expm1(-2|z|), sign restored.
    """
    q, scale = _exp_parts(type(z)(-2) * abs(z))
    expm1 = q * scale + (scale - type(z)(1))
    magnitude = -expm1 / (type(z)(2) + expm1)
    return magnitude if z >= type(z)(0) else -magnitude


@njit(inline="always")
def step_time(step, length, reverse):
    """The time index a row reads at ``step`` of its direction.

    Forward: ``step``; reverse: ``length - 1 - step``, so each sequence runs
    backwards within its own length. Only meaningful when ``step < length``.
    """
    return length - 1 - step if reverse else step


@njit(inline="always")
def gate_activations(z_i, z_f, z_g, z_o):
    """The four gates of one unit from their pre-activations: ``(i, f, g, o)``."""
    return sigmoid(z_i), sigmoid(z_f), tanh(z_g), sigmoid(z_o)


@njit(inline="always")
def cell_state(i, f, g, o, c_prev):
    """The new cell and hidden state of one unit from its gates: ``(c, h)``."""
    c = f * c_prev + i * g
    return c, o * tanh(c)


@njit(inline="always")
def cell_forward(z_i, z_f, z_g, z_o, c_prev):
    """One unit of one step, from pre-activations to the new state:
    :func:`gate_activations`, then :func:`cell_state`.

    Returns ``(i, f, g, o, c, h)``: the post-activation gates, the new cell
    state and the new hidden state.
    """
    i, f, g, o = gate_activations(z_i, z_f, z_g, z_o)
    c, h = cell_state(i, f, g, o, c_prev)
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
    tanh_c = tanh(f * c_prev + i * g)
    dc = dc_next + dh * o * (one - tanh_c * tanh_c)
    dz_i = dc * g * i * (one - i)
    dz_f = dc * c_prev * f * (one - f)
    dz_g = dc * i * (one - g * g)
    dz_o = dh * tanh_c * o * (one - o)
    return dz_i, dz_f, dz_g, dz_o, dc * f
