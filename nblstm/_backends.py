"""The host backends: ``"numpy"`` (the reference) and ``"cpu"`` (Numba).

Every backend offers the same methods (see :class:`HostBackend` and
:class:`NumpyBackend`); the public API validates arguments, then hands them
to one of these. Backends run one layer at a time, every direction of it at
once, on time-major data: ``x (T, B, I)``, ``y (T, B, D*H)``, states
``(D, B, H)``, where direction 1 (when D = 2) runs in reverse.
"""
import numpy as np

from . import reference
from ._device import is_device_array
from ._recycling import RESULT_POOL
from ._threads import run_parallel
from .params import N_GATES


class HostBackend:
    """Shared host-memory handling; subclasses implement ``forward``/``backward``."""

    name = None

    def adopt(self, value, argument):
        """``value`` as this backend accepts it; device arrays are refused."""
        if is_device_array(value):
            raise TypeError(f"{argument} is a CUDA device array, but backend {self.name!r} runs "
                            "on the host: use backend='cuda' or copy it to the host")
        return value

    def params(self, params):
        """Each direction's parameters as this backend computes with them (host: as they are)."""
        for p in params:
            for name in ("W_x", "W_h", "b"):
                self.adopt(getattr(p, name), f"params.{name}")
        return list(params)

    def hand_back(self, arrays, to_host):
        """Results as the caller receives them (host arrays already)."""
        return list(arrays)

    def time_major(self, array, batch_first):
        """One contiguous time-major copy when needed, the array itself otherwise."""
        return np.ascontiguousarray(array.transpose(1, 0, 2) if batch_first else array)

    def batch_major(self, array):
        """A contiguous (B, T, F) copy of a time-major (T, B, F) array."""
        return np.ascontiguousarray(array.transpose(1, 0, 2))

    def state(self, value, shape, dtype):
        """A state or its gradient, contiguous, of ``shape``; zeros when None.

        Never written by the kernels.
        """
        if value is None:
            return np.zeros(shape, dtype)
        return np.ascontiguousarray(value).reshape(shape)

    def scale(self, values, factors):
        """values *= factors, in place."""
        values *= factors

    def stack(self, arrays):
        """Concatenate (n_i, B, H) arrays along axis 0."""
        return np.concatenate(arrays)

    def lengths(self, lengths, batch, steps):
        """Per-row valid steps, (B,) int64, as the kernels read them (all ``steps`` when None)."""
        return np.full(batch, steps, np.int64) if lengths is None else lengths


class NumpyBackend(HostBackend):
    """The reference, in the inputs' dtype, one direction at a time."""

    name = "numpy"

    def forward(self, x, params, h0, c0, lengths, training):
        """Run one layer (every direction) over time-major ``x``.

        x: (T, B, I) contiguous; params: one LSTMParams per direction (the
        second runs in reverse); h0, c0: (D, B, H); lengths: (B,) int64.

        Returns ``(y (T, B, D*H), h_n (D, B, H), c_n (D, B, H), saved)``;
        ``saved`` is ``(gates (D, T, B, 4H), hidden_states (D, T+1, B, H),
        cell_states (D, T+1, B, H))`` when training, else None.
        """
        results = [reference.forward(x, p.W_x, p.W_h, p.b, h0[d], c0[d], lengths, reverse=d == 1)
                   for d, p in enumerate(params)]
        y = np.concatenate([r[0] for r in results], axis=2)
        gates, hidden_states, cell_states = (np.stack([r[k] for r in results]) for k in (1, 2, 3))
        saved = (gates, hidden_states, cell_states) if training else None
        return y, hidden_states[:, -1].copy(), cell_states[:, -1].copy(), saved

    def backward(self, x, params, saved, lengths, dy, dh_n, dc_n):
        """Backpropagate one layer; dy: (T, B, D*H) or None; dh_n, dc_n: (D, B, H).

        Returns ``(dx (T, B, I), dh0, dc0 (D, B, H), dW_x (D, I, 4H),
        dW_h (D, H, 4H), db (D, 4H))``.
        """
        gates, hidden_states, cell_states = saved
        hidden = params[0].hidden_size
        results = []
        for d, p in enumerate(params):
            dy_d = None if dy is None else dy[:, :, d * hidden:(d + 1) * hidden]
            results.append(reference.backward(x, p.W_x, p.W_h, gates[d], hidden_states[d],
                                              cell_states[d], dy_d, dh_n[d], dc_n[d], lengths,
                                              reverse=d == 1))
        dx = sum(r[0] for r in results)
        return (dx,) + tuple(np.stack([r[k] for r in results]) for k in range(1, 6))


class CPUBackend(HostBackend):
    """Numba ``parallel=True`` kernels from :mod:`nblstm.kernels.cpu`; their
    results come from the recycling pool (:mod:`nblstm._recycling`)."""

    name = "cpu"

    def __init__(self):
        # Imported here, not with the package: loading the kernels costs a
        # fraction of a second that the "numpy" backend never needs. One
        # instance serves every call (get_backend).
        from .kernels import cpu

        self._kernels = cpu

    @staticmethod
    def _stacked(params, field, contiguous=False):
        arrays = [getattr(p, field) for p in params]
        if len(arrays) == 1:
            stacked = arrays[0][None]
            return np.ascontiguousarray(stacked) if contiguous else stacked
        return np.stack(arrays)

    @staticmethod
    def _results_from(x, params):
        """Where a call's results come from (:meth:`.RecyclingPool.allocator_for`),
        by its largest array, the (D, T, B, 4H) gates."""
        steps, batch = x.shape[:2]
        gates_bytes = len(params) * steps * batch * N_GATES * params[0].hidden_size
        return RESULT_POOL.allocator_for(gates_bytes * x.itemsize)

    def forward(self, x, params, h0, c0, lengths, training):
        """As :meth:`NumpyBackend.forward`."""
        return run_parallel(self._kernels.forward, x, self._stacked(params, "W_x"),
                            self._stacked(params, "W_h"), self._stacked(params, "b"), h0, c0,
                            lengths, training, self._results_from(x, params))

    def backward(self, x, params, saved, lengths, dy, dh_n, dc_n):
        """As :meth:`NumpyBackend.backward`."""
        return run_parallel(self._kernels.backward, x, self._stacked(params, "W_x"),
                            self._stacked(params, "W_h", contiguous=True), saved, lengths, dy,
                            dh_n, dc_n, self._results_from(x, params))


#: name -> the one object of each host backend (they hold no per-call state).
_HOST_BACKENDS = {}


def get_backend(name):
    """The backend object for ``name`` ("numpy", "cpu" or "cuda"). A "cuda"
    backend is new at each call: it holds the call's stream."""
    if name == "cuda":
        from ._cuda_backend import CUDABackend
        return CUDABackend()
    backend = _HOST_BACKENDS.get(name)
    if backend is None:
        backend = _HOST_BACKENDS[name] = {"numpy": NumpyBackend, "cpu": CPUBackend}[name]()
    return backend
