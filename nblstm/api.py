"""``forward`` and ``backward``: validation, layout, allocation and dispatch.

The layer-level functions :func:`forward_layer`/:func:`backward_layer` run one
layer with one or two directions on time-major arrays that a backend already
holds; :class:`nblstm.LSTM` stacks them. :func:`forward`/:func:`backward` are
the public single-layer, single-direction entry points.
"""
from dataclasses import dataclass

import numpy as np

from ._availability import cuda_status
from ._backends import get_backend
from ._device import is_device_array
from ._recycling import RESULT_POOL
from ._validation import check_array, check_float_dtype, check_tensor
from .params import N_GATES, LSTMParams

BACKEND_NAMES = ("auto", "numpy", "cpu", "cuda")


@dataclass(frozen=True)
class LSTMCache:
    """What a training-mode forward pass saves for backward.

    Attributes
    ----------
    backend : str
        The backend that ran the forward pass; backward runs on it too.
    params : tuple of LSTMParams
        One per direction, as the backend holds them.
    x : (T, B, I) array
        The input, time-major. Held by reference when the caller's array was
        already time-major and contiguous: do not modify it before backward.
    lengths : (B,) int64 array
        Valid steps per row.
    gates : (D, T, B, 4H) array
        Post-activation gates i, f, g, o by time (zero at padding).
    hidden_states, cell_states : (D, T+1, B, H) arrays
        Row t < T: the state entering time t (zero at padding); row T: the
        final state. For the forward direction row 0 is the initial state.
    batch_first : bool
        Layout of the caller's x/y, which dy and dx follow.
    host_outputs : bool
        Whether the forward input was a host array; backward then returns
        host (NumPy) arrays, else device arrays. For ``"cuda"`` every saved
        array (and ``params``) lives on the device either way.
    """

    backend: str
    params: tuple
    x: object
    lengths: object
    gates: object
    hidden_states: object
    cell_states: object
    batch_first: bool = False
    host_outputs: bool = True

    @property
    def steps(self):
        """T."""
        return self.x.shape[0]

    @property
    def batch(self):
        """B."""
        return self.x.shape[1]

    @property
    def directions(self):
        """D, 1 or 2."""
        return len(self.params)


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


def resolve_backend(backend, x):
    """The backend object for ``backend`` ("auto" decides by where ``x`` lives)."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if backend == "auto":
        backend = "cuda" if is_device_array(x) else "cpu"
    if backend == "cuda" and not cuda_status().available:
        raise ValueError(f"backend 'cuda' cannot run here: {cuda_status()}")
    return get_backend(backend)


def check_input(impl, x, input_size, dtype, batch_first):
    """Validate x (T, B, I) or (B, T, I); return it time-major and contiguous for ``impl``."""
    check_array(x, "x", ndim=3)
    x = impl.adopt(x, "x")
    check_float_dtype(x, "x")
    if np.dtype(x.dtype) != dtype:
        raise TypeError(f"params have dtype {dtype} but x has {np.dtype(x.dtype)}: "
                        "nblstm never casts, convert one of them")
    layout = "(B, T, I)" if batch_first else "(T, B, I)"
    if x.shape[2] != input_size:
        raise ValueError(f"x must have shape {layout} with I = input size = {input_size}, "
                         f"got {tuple(x.shape)}")
    if min(x.shape[:2]) < 1:
        raise ValueError(f"x must have shape {layout} with T >= 1 and B >= 1, got {tuple(x.shape)}")
    return impl.time_major(x, batch_first)


def check_state(impl, value, name, shape, dtype, what):
    """Validate an optional state (or state gradient) of ``shape``; zeros when None."""
    if value is not None:
        check_array(value, name, ndim=len(shape))
        value = impl.adopt(value, name)
        check_tensor(value, name, shape, dtype, what)
    return value


def check_output_gradient(impl, dy, steps, batch, features, dtype, batch_first, feature_name):
    """Validate an optional dy of y's shape; return it time-major and contiguous for ``impl``.

    ``feature_name`` spells the last axis in the error message ("H" or "D*H").
    """
    if dy is None:
        return None
    if batch_first:
        shape, what = (batch, steps, features), f"(B, T, {feature_name})"
    else:
        shape, what = (steps, batch, features), f"(T, B, {feature_name})"
    check_array(dy, "dy", ndim=3)
    dy = impl.adopt(dy, "dy")
    check_tensor(dy, "dy", shape, dtype, what)
    return impl.time_major(dy, batch_first)


def check_lengths(lengths, batch, steps):
    """Validate ``lengths`` (B,) integers in [0, T]; return them as a host int64 array.

    None (every row runs all T steps) stays None. Device lengths are copied to
    the host for this check (B integers).
    """
    if lengths is None:
        return None
    host = lengths.copy_to_host() if is_device_array(lengths) else lengths
    if not isinstance(host, (np.ndarray, list, tuple)):
        raise TypeError(f"lengths must be a (B,) integer array, got {type(lengths).__name__}")
    host = np.asarray(host)
    if host.shape != (batch,):
        raise ValueError(f"lengths must have shape (B,) = ({batch},), got {host.shape}")
    if host.dtype.kind not in "iu":
        raise TypeError(f"lengths must hold integers, got dtype {host.dtype}")
    if host.size and (host.min() < 0 or host.max() > steps):
        raise ValueError(f"lengths must satisfy 0 <= lengths[b] <= T = {steps}, got values in "
                         f"[{host.min()}, {host.max()}]")
    return host.astype(np.int64)


def forward_layer(impl, x, params, h0, c0, lengths, training):
    """Run one layer (one or two directions) on time-major arrays held by ``impl``.

    x: (T, B, I); params: list of LSTMParams (second one reverse); h0, c0:
    (D, B, H) or None; lengths: (B,) host int64 or None (all T).

    Returns ``(y (T, B, D*H), h_n (D, B, H), c_n (D, B, H), cache or None)``.
    """
    steps, batch = x.shape[:2]
    shape = (len(params), batch, params[0].hidden_size)
    h0 = impl.state(h0, shape, x.dtype)
    c0 = impl.state(c0, shape, x.dtype)
    kernel_lengths = impl.lengths(lengths, batch, steps)
    y, h_n, c_n, saved = impl.forward(x, params, h0, c0, kernel_lengths, training)
    cache = None
    if training:
        cache = LSTMCache(impl.name, tuple(params), x, kernel_lengths, *saved)
    return y, h_n, c_n, cache


def backward_layer(impl, cache, dy, dh_n, dc_n):
    """Backpropagate one layer; dy: (T, B, D*H) time-major or None; dh_n, dc_n: (D, B, H) or None.

    Returns ``(dx (T, B, I), dh0, dc0 (D, B, H), dW_x (D, I, 4H), dW_h (D, H, 4H), db (D, 4H))``.
    """
    shape = (cache.directions, cache.batch, cache.params[0].hidden_size)
    dtype = cache.params[0].dtype
    dh_n = impl.state(dh_n, shape, dtype)
    dc_n = impl.state(dc_n, shape, dtype)
    saved = (cache.gates, cache.hidden_states, cache.cell_states)
    return impl.backward(cache.x, list(cache.params), saved, cache.lengths, dy, dh_n, dc_n)


def forward(x, params, h0=None, c0=None, *, backend="auto", training=True, batch_first=False,
            lengths=None):
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
    lengths : (B,) integer array, optional
        Valid steps of each sequence, 0 <= lengths[b] <= T, in any order.
        Past its length a row outputs zeros and keeps its state; h_n/c_n are
        the state after its last valid step (PyTorch's packed sequences, plus
        length 0, which passes the initial state through).

    Returns
    -------
    y : (T, B, H) array, or (B, T, H) with ``batch_first=True``
        The hidden state of every step.
    (h_n, c_n) : two (B, H) arrays
        The final states.
    cache : LSTMCache or None
        What :func:`backward` needs; None when ``training=False``.
    """
    impl = resolve_backend(backend, x)
    if not isinstance(params, LSTMParams):
        raise TypeError(f"params must be an nblstm.LSTMParams, got {type(params).__name__}")
    to_host = not is_device_array(x)
    x_tm = check_input(impl, x, params.input_size, params.dtype, batch_first)
    steps, batch = x_tm.shape[:2]
    state_shape = (batch, params.hidden_size)
    h0 = check_state(impl, h0, "h0", state_shape, params.dtype, "(B, H)")
    c0 = check_state(impl, c0, "c0", state_shape, params.dtype, "(B, H)")
    lengths = check_lengths(lengths, batch, steps)
    y, h_n, c_n, cache = forward_layer(impl, x_tm, impl.params([params]), h0, c0, lengths,
                                       training)
    if batch_first:
        y = impl.batch_major(y)
    y, h_n, c_n = impl.hand_back([y, h_n[0], c_n[0]], to_host)
    if cache is not None:
        cache = LSTMCache(**{**vars(cache), "batch_first": batch_first, "host_outputs": to_host})
    return y, (h_n, c_n), cache


def check_cache(cache):
    """Raise unless ``cache`` is an intact :class:`LSTMCache`."""
    if not isinstance(cache, LSTMCache):
        raise TypeError("cache must be the LSTMCache returned by forward(..., training=True), "
                        f"got {type(cache).__name__}")
    n_dirs, steps, batch = cache.directions, cache.steps, cache.batch
    hidden = cache.params[0].hidden_size
    expected = {"gates": (n_dirs, steps, batch, N_GATES * hidden),
                "hidden_states": (n_dirs, steps + 1, batch, hidden),
                "cell_states": (n_dirs, steps + 1, batch, hidden),
                "lengths": (batch,)}
    for field, shape in expected.items():
        if tuple(getattr(cache, field).shape) != shape:
            raise ValueError(f"cache.{field} has shape {tuple(getattr(cache, field).shape)}, "
                             f"but cache.x and cache.params imply {shape}: the cache is corrupt")


def backward(cache, dy, dh_n=None, dc_n=None):
    """Backpropagate through time.

    Parameters
    ----------
    cache : LSTMCache
        From ``forward(..., training=True)``; not consumed (backward may be
        called again with other upstream gradients).
    dy : (T, B, H) array (or (B, T, H) if forward had ``batch_first=True``) or None
        Gradient of the loss with respect to y; None when only the final
        states feed the loss. Ignored at padded steps.
    dh_n, dc_n : (B, H) arrays, optional
        Gradients with respect to the final states; zeros when omitted.

    Returns
    -------
    Grads
        ``dx, dh0, dc0, dW_x, dW_h, db``, in the dtype of the forward pass.
    """
    check_cache(cache)
    impl = get_backend(cache.backend)
    dtype = cache.params[0].dtype
    steps, batch, hidden = cache.steps, cache.batch, cache.params[0].hidden_size
    dy = check_output_gradient(impl, dy, steps, batch, hidden, dtype, cache.batch_first, "H")
    state_shape = (batch, hidden)
    dh_n = check_state(impl, dh_n, "dh_n", state_shape, dtype, "(B, H)")
    dc_n = check_state(impl, dc_n, "dc_n", state_shape, dtype, "(B, H)")
    dx, dh0, dc0, dw_x, dw_h, db = backward_layer(impl, cache, dy, dh_n, dc_n)
    if cache.batch_first:
        dx = impl.batch_major(dx)
    results = impl.hand_back([dx, dh0[0], dc0[0], dw_x[0], dw_h[0], db[0]], cache.host_outputs)
    return Grads(*results)


def clear_workspace():
    """Release the memory the ``"cpu"`` backend keeps between calls.

    The CPU backend carves its packed weights, transposes and gate gradients
    from per-thread buffers that live between calls and grow to the largest
    problem seen (roughly two (T, B, 4H) arrays plus the weights, per
    direction): allocating them afresh would cost a page fault per 4 KiB on
    every call. Results never alias these buffers. It also keeps the memory
    of its large results (y, the cache, the gradients) once no array over
    them is left, up to 1 GiB in all, for the next call's results. This
    releases the calling thread's buffers and every kept result's memory.

    Returns
    -------
    int
        The number of bytes released.
    """
    from .kernels.gemm import WORKSPACE

    released = WORKSPACE.n_bytes + RESULT_POOL.clear()
    WORKSPACE.clear()
    return released
