"""The host backends: ``"numpy"`` (the reference) and ``"cpu"`` (Numba).

Every backend offers the same methods (see :class:`HostBackend`); the public
API validates arguments, then hands them to one of these. Backends work on
time-major data: ``x (T, B, I)``, ``y (T, B, H)``, states ``(B, H)``.
"""
import numpy as np

from . import reference
from ._device import is_device_array
from ._threads import parallel_section
from .params import N_GATES


class HostBackend:
    """Shared host-memory handling; subclasses implement ``_forward``/``_backward``."""

    name = None

    def adopt(self, value, argument):
        """``value`` as this backend accepts it; device arrays are refused."""
        if is_device_array(value):
            raise TypeError(f"{argument} is a CUDA device array, but backend {self.name!r} runs "
                            "on the host: use backend='cuda' or copy it to the host")
        return value

    def params(self, params):
        """The parameters as this backend computes with them (host arrays: as they are)."""
        for name in ("W_x", "W_h", "b"):
            self.adopt(getattr(params, name), f"params.{name}")
        return params

    def hand_back(self, arrays, to_host):
        """Results as the caller receives them (host arrays already)."""
        return arrays

    def time_major(self, array, batch_first):
        """One contiguous time-major copy when needed, the array itself otherwise."""
        return np.ascontiguousarray(array.transpose(1, 0, 2) if batch_first else array)

    def state(self, value, shape, dtype):
        """A (B, H) state or its gradient; zeros when None. Never written by the kernels."""
        return np.zeros(shape, dtype) if value is None else value

    def forward(self, x, params, h0, c0, training, batch_first):
        """Run the layer.

        x: (T, B, I) contiguous; h0, c0: (B, H).

        Returns ``(y, h_n, c_n, saved)`` with y (T, B, H), or (B, T, H) when
        ``batch_first``; ``saved`` is ``(gates (T, B, 4H), hidden_states
        (T+1, B, H), cell_states (T+1, B, H))`` when training, else None.
        """
        steps, batch, _ = x.shape
        if batch_first:
            y = np.empty((batch, steps, params.hidden_size), x.dtype)
            y_time_major = y.transpose(1, 0, 2)
        else:
            y = y_time_major = np.empty((steps, batch, params.hidden_size), x.dtype)
        h_n, c_n, saved = self._forward(x, params, h0, c0, training, y_time_major)
        return y, h_n, c_n, saved

    def backward(self, x, params, saved, dy, dh_n, dc_n, batch_first):
        """Backpropagate; dy (T, B, H) contiguous or None; dh_n, dc_n (B, H).

        Returns ``(dx, dh0, dc0, dW_x, dW_h, db)``; dx is (B, T, I) when ``batch_first``.
        """
        dx, dh0, dc0, dw_x, dw_h, db = self._backward(x, params, saved, dy, dh_n, dc_n)
        if batch_first:
            dx = np.ascontiguousarray(dx.transpose(1, 0, 2))
        return dx, dh0, dc0, dw_x, dw_h, db


class NumpyBackend(HostBackend):
    """The reference, in the inputs' dtype."""

    name = "numpy"

    def _forward(self, x, params, h0, c0, training, y):
        y[...], gates, hidden_states, cell_states = reference.forward(
            x, params.W_x, params.W_h, params.b, h0, c0)
        saved = (gates, hidden_states, cell_states) if training else None
        return hidden_states[-1].copy(), cell_states[-1].copy(), saved

    def _backward(self, x, params, saved, dy, dh_n, dc_n):
        gates, hidden_states, cell_states = saved
        return reference.backward(x, params.W_x, params.W_h, gates, hidden_states,
                                  cell_states, dy, dh_n, dc_n)


class CPUBackend(HostBackend):
    """Numba ``parallel=True`` kernels from :mod:`nblstm.kernels.cpu`."""

    name = "cpu"

    def _forward(self, x, params, h0, c0, training, y):
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

    def _backward(self, x, params, saved, dy, dh_n, dc_n):
        from .kernels import cpu

        gates, hidden_states, cell_states = saved
        if dy is None:
            dy = np.empty((0,) + dh_n.shape, x.dtype)
        d_gates = np.empty_like(gates)
        with np.errstate(all="ignore"), parallel_section():
            return cpu.backward(x, params.W_x, params.W_h, gates, hidden_states, cell_states,
                                dy, dh_n.copy(), dc_n.copy(), d_gates)


def get_backend(name):
    """The backend object for ``name`` ("numpy", "cpu" or "cuda")."""
    if name == "cuda":
        from ._cuda_backend import CUDABackend
        return CUDABackend()
    return {"numpy": NumpyBackend, "cpu": CPUBackend}[name]()
