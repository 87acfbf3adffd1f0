"""The host backends: ``"numpy"`` (the reference) and ``"cpu"`` (Numba).

Each backend exposes the same two functions, on time-major contiguous data:

``forward(x, params, h0, c0, training, y) -> (h_n, c_n, saved)``
    x: (T, B, I); h0, c0: (B, H); y: (T, B, H) out (any strides).
    ``saved`` is ``(gates (T, B, 4H), hidden_states (T+1, B, H),
    cell_states (T+1, B, H))`` when training, else None.

``backward(x, params, saved, dy, dh_n, dc_n) -> (dx, dh0, dc0, dW_x, dW_h, db)``
    dy: (T, B, H) or None; dh_n, dc_n: (B, H).
"""
import numpy as np

from . import reference
from ._threads import parallel_section
from .params import N_GATES


class NumpyBackend:
    """The reference, in the inputs' dtype."""

    name = "numpy"

    @staticmethod
    def forward(x, params, h0, c0, training, y):
        y_ref, gates, hidden_states, cell_states = reference.forward(
            x, params.W_x, params.W_h, params.b, h0, c0)
        y[...] = y_ref
        saved = (gates, hidden_states, cell_states) if training else None
        return hidden_states[-1].copy(), cell_states[-1].copy(), saved

    @staticmethod
    def backward(x, params, saved, dy, dh_n, dc_n):
        gates, hidden_states, cell_states = saved
        return reference.backward(x, params.W_x, params.W_h, gates, hidden_states,
                                  cell_states, dy, dh_n, dc_n)


class CPUBackend:
    """Numba ``parallel=True`` kernels from :mod:`nblstm.kernels.cpu`."""

    name = "cpu"

    @staticmethod
    def forward(x, params, h0, c0, training, y):
        from .kernels import cpu

        steps, batch, _ = x.shape
        hidden = params.hidden_size
        slots = steps + 1 if training else 2
        gates = np.empty((steps, batch, N_GATES * hidden), x.dtype)
        hidden_states = np.empty((slots, batch, hidden), x.dtype)
        cell_states = np.empty_like(hidden_states)
        hidden_states[0] = h0
        cell_states[0] = c0
        with np.errstate(all="ignore"), parallel_section():
            cpu.forward(x, params.W_x, np.ascontiguousarray(params.W_h), params.b,
                        gates, hidden_states, cell_states, y)
        last = steps % slots
        saved = (gates, hidden_states, cell_states) if training else None
        return hidden_states[last].copy(), cell_states[last].copy(), saved

    @staticmethod
    def backward(x, params, saved, dy, dh_n, dc_n):
        from .kernels import cpu

        gates, hidden_states, cell_states = saved
        if dy is None:
            dy = np.empty((0,) + dh_n.shape, x.dtype)
        d_gates = np.empty_like(gates)
        with np.errstate(all="ignore"), parallel_section():
            return cpu.backward(x, params.W_x, params.W_h, gates, hidden_states, cell_states,
                                dy, dh_n.copy(), dc_n.copy(), d_gates)


HOST_BACKENDS = {"numpy": NumpyBackend, "cpu": CPUBackend}
