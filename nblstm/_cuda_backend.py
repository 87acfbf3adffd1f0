"""The ``"cuda"`` backend: transfers, allocation and launches on one stream.

Host (NumPy) inputs are copied to the device once per call and results come
back as NumPy arrays. Device inputs (Numba device arrays, or anything with the
CUDA Array Interface) are used in place: outputs are Numba device arrays and
nothing crosses to the host. The cache always stays on the device. The host
waits for the stream only where results are handed back.
"""
import numpy as np
from numba import cuda

from ._device import as_device_array, is_device_array
from .kernels import cuda as kernels
from .params import N_GATES, LSTMParams


class CUDABackend:
    """Same interface as :class:`nblstm._backends.HostBackend`, on a CUDA device."""

    name = "cuda"

    def __init__(self):
        self.stream = cuda.stream()

    def _empty(self, shape, dtype):
        return cuda.device_array(shape, dtype, stream=self.stream)

    def _upload(self, array):
        return cuda.to_device(np.ascontiguousarray(array), stream=self.stream)

    def adopt(self, value, argument):
        """Device arrays as Numba device arrays; host arrays as they are (copied later)."""
        return as_device_array(value) if is_device_array(value) else value

    def params(self, params):
        """The parameters on the device (uploaded when they are host arrays)."""
        arrays = [array if is_device_array(array) else self._upload(array)
                  for array in (params.W_x, params.W_h, params.b)]
        return LSTMParams(*arrays)

    def time_major(self, array, batch_first):
        """A contiguous time-major device array (one device copy or upload when needed)."""
        if not is_device_array(array):
            return self._upload(array.transpose(1, 0, 2) if batch_first else array)
        if not batch_first and array.is_c_contiguous():
            return array
        shape = tuple(array.shape)
        if batch_first:
            shape = (shape[1], shape[0], shape[2])
        contiguous = self._empty(shape, array.dtype)
        kernels.copy_3d(array, contiguous, self.stream, swap_leading=batch_first)
        return contiguous

    def state(self, value, shape, dtype):
        """A (B, H) state on the device; zeros when None. Never written by the kernels."""
        if value is None:
            zeros = self._empty(shape, dtype)
            kernels.fill(zeros, 0, self.stream)
            return zeros
        return value if is_device_array(value) else self._upload(value)

    def _copy(self, src):
        dst = self._empty(tuple(src.shape), src.dtype)
        kernels.copy_2d(src, dst, self.stream)
        return dst

    def _batch_major(self, array):
        steps, batch, features = array.shape
        out = self._empty((batch, steps, features), array.dtype)
        kernels.copy_3d(array, out, self.stream, swap_leading=True)
        return out

    def forward(self, x, params, h0, c0, training, batch_first):
        """As :meth:`HostBackend.forward`, on device arrays (params from :meth:`params`)."""
        steps, batch, _ = x.shape
        hidden = params.hidden_size
        slots = steps + 1 if training else 2
        gates = self._empty((steps, batch, N_GATES * hidden), x.dtype)
        hidden_states = self._empty((slots, batch, hidden), x.dtype)
        cell_states = self._empty((slots, batch, hidden), x.dtype)
        kernels.copy_2d(h0, hidden_states[0], self.stream)
        kernels.copy_2d(c0, cell_states[0], self.stream)
        y = self._empty((steps, batch, hidden), x.dtype)
        kernels.forward(x, params.W_x, params.W_h, params.b, gates, hidden_states, cell_states,
                        y, self.stream)
        last = steps % slots
        h_n, c_n = self._copy(hidden_states[last]), self._copy(cell_states[last])
        if batch_first:
            y = self._batch_major(y)
        saved = (gates, hidden_states, cell_states) if training else None
        return y, h_n, c_n, saved

    def backward(self, x, params, saved, dy, dh_n, dc_n, batch_first):
        """As :meth:`HostBackend.backward`, on device arrays (params from :meth:`params`)."""
        gates, hidden_states, cell_states = saved
        steps, batch, inputs = x.shape
        hidden = params.hidden_size
        dh, dc = self._copy(dh_n), self._copy(dc_n)
        d_gates = self._empty(tuple(gates.shape), x.dtype)
        grads = (self._empty((steps, batch, inputs), x.dtype),
                 self._empty((inputs, N_GATES * hidden), x.dtype),
                 self._empty((hidden, N_GATES * hidden), x.dtype),
                 self._empty((N_GATES * hidden,), x.dtype))
        kernels.backward(x, params.W_x, params.W_h, gates, hidden_states, cell_states, dy, dh,
                         dc, d_gates, grads, self.stream)
        dx, dw_x, dw_h, db = grads
        if batch_first:
            dx = self._batch_major(dx)
        return dx, dh, dc, dw_x, dw_h, db

    def hand_back(self, arrays, to_host):
        """Wait for the stream once; copy to NumPy arrays when ``to_host``."""
        if to_host:
            arrays = [array.copy_to_host(stream=self.stream) for array in arrays]
        self.stream.synchronize()
        return arrays
