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
        """Each direction's parameters on the device (uploaded when they are host arrays)."""
        return [LSTMParams(*(array if is_device_array(array) else self._upload(array)
                             for array in (p.W_x, p.W_h, p.b))) for p in params]

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

    def batch_major(self, array):
        """A contiguous (B, T, F) device copy of a time-major (T, B, F) array."""
        steps, batch, features = array.shape
        out = self._empty((batch, steps, features), array.dtype)
        kernels.copy_3d(array, out, self.stream, swap_leading=True)
        return out

    def state(self, value, shape, dtype):
        """A contiguous device state of ``shape``; zeros when None. Never written by the kernels."""
        if value is None:
            zeros = self._empty(shape, dtype)
            kernels.fill(zeros.reshape(-1, shape[-1]), 0, self.stream)
            return zeros
        if not is_device_array(value):
            return self._upload(value).reshape(shape)
        if not value.is_c_contiguous():
            contiguous = self._empty(tuple(value.shape), value.dtype)
            kernels.copy_2d(value, contiguous, self.stream)
            value = contiguous
        return value.reshape(shape)

    def lengths(self, lengths, batch, steps):
        """(B,) int64 device lengths: the host ones uploaded, or all ``steps`` when None."""
        if lengths is None:
            return kernels.full_lengths(batch, steps, self.stream)
        return self._upload(lengths)

    def forward(self, x, params, h0, c0, lengths, training):
        """As :meth:`nblstm._backends.NumpyBackend.forward`, on device arrays."""
        steps, batch, _ = x.shape
        n_dirs, hidden = len(params), params[0].hidden_size
        y = self.state(None, (steps, batch, n_dirs * hidden), x.dtype)
        saved = None
        if training:
            saved = (self._empty((n_dirs, steps, batch, N_GATES * hidden), x.dtype),
                     self._empty((n_dirs, steps + 1, batch, hidden), x.dtype),
                     self._empty((n_dirs, steps + 1, batch, hidden), x.dtype))
        h_n = self._empty((n_dirs, batch, hidden), x.dtype)
        c_n = self._empty((n_dirs, batch, hidden), x.dtype)
        kernels.forward(x, [(p.W_x, p.W_h, p.b) for p in params], h0, c0, lengths, y, saved,
                        h_n, c_n, self.stream)
        return y, h_n, c_n, saved

    def backward(self, x, params, saved, lengths, dy, dh_n, dc_n):
        """As :meth:`nblstm._backends.NumpyBackend.backward`, on device arrays."""
        steps, batch, inputs = x.shape
        n_dirs, hidden = len(params), params[0].hidden_size
        grads = (self._empty((steps, batch, inputs), x.dtype),
                 self._empty((n_dirs, batch, hidden), x.dtype),
                 self._empty((n_dirs, batch, hidden), x.dtype),
                 self._empty((n_dirs, inputs, N_GATES * hidden), x.dtype),
                 self._empty((n_dirs, hidden, N_GATES * hidden), x.dtype),
                 self._empty((n_dirs, N_GATES * hidden), x.dtype))
        kernels.backward(x, [(p.W_x, p.W_h, p.b) for p in params], saved, lengths, dy, dh_n,
                         dc_n, grads, self.stream)
        return grads

    def scale(self, values, factors):
        """values (T, B, F) *= factors (host or device, same shape), in place."""
        factors = factors if is_device_array(factors) else self._upload(factors)
        shape = (values.shape[0] * values.shape[1], values.shape[2])
        kernels.multiply(values.reshape(shape), factors.reshape(shape), self.stream)

    def stack(self, arrays):
        """Concatenate (n_i, B, H) device arrays along axis 0."""
        rest = tuple(arrays[0].shape[1:])
        out = self._empty((sum(a.shape[0] for a in arrays),) + rest, arrays[0].dtype)
        offset = 0
        for array in arrays:
            kernels.copy_3d(array, out[offset:offset + array.shape[0]], self.stream)
            offset += array.shape[0]
        return out

    def hand_back(self, arrays, to_host):
        """Wait for the stream once; copy to NumPy arrays when ``to_host``."""
        if to_host:
            arrays = [array.copy_to_host(stream=self.stream) for array in arrays]
        self.stream.synchronize()
        return list(arrays)
