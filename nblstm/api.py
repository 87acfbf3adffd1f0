"""``forward`` and ``backward``: validation, layout, allocation and dispatch."""
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ._availability import cuda_status
from ._backends import get_backend
from ._device import is_device_array
from ._validation import check_array, check_float_dtype, check_tensor
from .params import LSTMParams

BACKEND_NAMES = ("auto", "numpy", "cpu", "cuda")


@dataclass(frozen=True)
class LSTMCache:
    """What :func:`forward` saves for :func:`backward` (training mode only).

    Attributes
    ----------
    backend : str
        The backend that ran the forward pass; backward runs on it too.
    params : LSTMParams
    x : (T, B, I) array
        The input, time-major. Held by reference when the caller's array was
        already time-major and contiguous: do not modify it before backward.
    gates : (T, B, 4H) array
        Post-activation gates i, f, g, o.
    hidden_states, cell_states : (T+1, B, H) arrays
        States of every step; row 0 is the initial state.
    batch_first : bool
        Layout of the caller's x/y, which dy and dx follow.
    host_outputs : bool
        Whether the forward input was a host array; backward then returns
        host (NumPy) arrays, else device arrays. For ``"cuda"`` every saved
        array (and ``params``) lives on the device either way.
    """

    backend: str
    params: LSTMParams
    x: np.ndarray
    gates: np.ndarray
    hidden_states: np.ndarray
    cell_states: np.ndarray
    batch_first: bool
    host_outputs: bool = True

    @property
    def steps(self):
        """T."""
        return self.x.shape[0]

    @property
    def batch(self):
        """B."""
        return self.x.shape[1]


@dataclass(frozen=True)
class Grads:
    """Gradients of a scalar loss, from :func:`backward`.

    Attributes
    ----------
    dx : (T, B, I) array, or (B, T, I) when the forward call had ``batch_first=True``
    dh0, dc0 : (B, H) arrays
        Gradients with respect to the initial state (zeros' gradient when
        forward was called without h0/c0).
    dW_x : (I, 4H) array
    dW_h : (H, 4H) array
    db : (4H,) array
    """

    dx: np.ndarray
    dh0: np.ndarray
    dc0: np.ndarray
    dW_x: np.ndarray
    dW_h: np.ndarray
    db: np.ndarray

    @property
    def params(self):
        """The parameter gradients as an :class:`LSTMParams` (same layout as the weights)."""
        return LSTMParams(W_x=self.dW_x, W_h=self.dW_h, b=self.db)


def _resolve_backend(backend, x):
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if backend == "auto":
        backend = "cuda" if is_device_array(x) else "cpu"
    if backend == "cuda" and not cuda_status().available:
        raise ValueError(f"backend 'cuda' cannot run here: {cuda_status()}")
    return get_backend(backend)


def _state(impl, state, name, shape, dtype):
    if state is not None:
        check_array(state, name, ndim=2)
        state = impl.adopt(state, name)
        check_tensor(state, name, shape, dtype, "(B, H)")
    return impl.state(state, shape, dtype)


def forward(x, params, h0=None, c0=None, *, backend="auto", training=True, batch_first=False):
    """Run a single-layer LSTM over a batch of sequences.

    Parameters
    ----------
    x : (T, B, I) array, or (B, T, I) with ``batch_first=True``
        float32 or float64; any strides.
    params : LSTMParams
        Weights of the same dtype as x, with ``params.input_size == I``.
    h0, c0 : (B, H) arrays, optional
        Initial states; zeros when omitted.
    backend : {"auto", "numpy", "cpu", "cuda"}
        ``"auto"`` picks ``"cuda"`` for device arrays (anything with the
        CUDA Array Interface) and ``"cpu"`` otherwise. With ``"cuda"``, host
        inputs give host outputs and device inputs give Numba device arrays.
    training : bool
        When False nothing is saved for backward (``cache`` is None) and the
        pass is cheaper.
    batch_first : bool
        Layout of x and y.

    Returns
    -------
    y : (T, B, H) array, or (B, T, H) with ``batch_first=True``
        The hidden state of every step.
    (h_n, c_n) : two (B, H) arrays
        The final states.
    cache : LSTMCache or None
        What :func:`backward` needs; None when ``training=False``.
    """
    impl = _resolve_backend(backend, x)
    check_array(x, "x", ndim=3)
    to_host = not is_device_array(x)
    x = impl.adopt(x, "x")
    dtype = check_float_dtype(x, "x")
    if not isinstance(params, LSTMParams):
        raise TypeError(f"params must be an nblstm.LSTMParams, got {type(params).__name__}")
    if params.dtype != dtype:
        raise TypeError(f"params have dtype {params.dtype} but x has {dtype}: "
                        "nblstm never casts, convert one of them")
    params = impl.params(params)
    x_tm = impl.time_major(x, batch_first)
    steps, batch, inputs = x_tm.shape
    layout = "(B, T, I)" if batch_first else "(T, B, I)"
    if inputs != params.input_size:
        raise ValueError(f"x must have shape {layout} with I = params.input_size = "
                         f"{params.input_size}, got {tuple(x.shape)}")
    if steps < 1 or batch < 1:
        raise ValueError(f"x must have shape {layout} with T >= 1 and B >= 1, got {tuple(x.shape)}")
    state_shape = (batch, params.hidden_size)
    h0 = _state(impl, h0, "h0", state_shape, dtype)
    c0 = _state(impl, c0, "c0", state_shape, dtype)
    y, h_n, c_n, saved = impl.forward(x_tm, params, h0, c0, training, batch_first)
    y, h_n, c_n = impl.hand_back([y, h_n, c_n], to_host)
    cache = None
    if training:
        cache = LSTMCache(impl.name, params, x_tm, *saved, batch_first=batch_first,
                          host_outputs=to_host)
    return y, (h_n, c_n), cache


def backward(cache, dy, dh_n=None, dc_n=None):
    """Backpropagate through time.

    Parameters
    ----------
    cache : LSTMCache
        From ``forward(..., training=True)``; not consumed (backward may be
        called again with other upstream gradients).
    dy : (T, B, H) array (or (B, T, H) if forward had ``batch_first=True``) or None
        Gradient of the loss with respect to y; None when only the final
        states feed the loss.
    dh_n, dc_n : (B, H) arrays, optional
        Gradients with respect to the final states; zeros when omitted.

    Returns
    -------
    Grads
        ``dx, dh0, dc0, dW_x, dW_h, db``, in the dtype of the forward pass.
    """
    if not isinstance(cache, LSTMCache):
        raise TypeError("cache must be the LSTMCache returned by forward(..., training=True), "
                        f"got {type(cache).__name__}")
    dtype = cache.params.dtype
    steps, batch, hidden = cache.steps, cache.batch, cache.params.hidden_size
    expected_saved = {"gates": (steps, batch, 4 * hidden),
                      "hidden_states": (steps + 1, batch, hidden),
                      "cell_states": (steps + 1, batch, hidden)}
    for field, shape in expected_saved.items():
        if tuple(getattr(cache, field).shape) != shape:
            raise ValueError(f"cache.{field} has shape {tuple(getattr(cache, field).shape)}, "
                             f"but cache.x and cache.params imply {shape}: the cache is corrupt")
    impl = get_backend(cache.backend)
    if dy is not None:
        y_shape = (batch, steps, hidden) if cache.batch_first else (steps, batch, hidden)
        check_array(dy, "dy", ndim=3)
        dy = impl.adopt(dy, "dy")
        check_tensor(dy, "dy", y_shape, dtype,
                     "(B, T, H)" if cache.batch_first else "(T, B, H)")
        dy = impl.time_major(dy, cache.batch_first)
    state_shape = (batch, hidden)
    dh_n = _state(impl, dh_n, "dh_n", state_shape, dtype)
    dc_n = _state(impl, dc_n, "dc_n", state_shape, dtype)
    saved = (cache.gates, cache.hidden_states, cache.cell_states)
    results = impl.backward(cache.x, cache.params, saved, dy, dh_n, dc_n, cache.batch_first)
    dx, dh0, dc0, dw_x, dw_h, db = impl.hand_back(results, cache.host_outputs)
    return Grads(dx=dx, dh0=dh0, dc0=dc0, dW_x=dw_x, dW_h=dw_h, db=db)
