"""LSTM parameters in nblstm's layout."""
from dataclasses import dataclass

import numpy as np

from ._device import as_device_array, is_device_array
from ._validation import check_array, check_float_dtype

from .kernels.cell import N_GATES  # noqa: F401  (re-exported for the API modules)


@dataclass(frozen=True)
class LSTMParams:
    """Weights and bias of one LSTM layer, gates stacked in the order i, f, g, o.

    Parameters
    ----------
    W_x : (I, 4H) array
        Input-to-gates weights.
    W_h : (H, 4H) array
        Hidden-to-gates (recurrent) weights.
    b : (4H,) array
        Bias (the sum of PyTorch's ``bias_ih`` and ``bias_hh``).

    All three share one floating dtype (float32 or float64). They may be
    NumPy arrays or CUDA device arrays (any library's, held as Numba device
    arrays); host parameters are uploaded on every ``"cuda"`` call, so keep a
    :meth:`to_device` copy for repeated GPU calls. The arrays are held by
    reference and never written by nblstm.
    """

    W_x: np.ndarray
    W_h: np.ndarray
    b: np.ndarray

    def __post_init__(self):
        for name in ("W_x", "W_h", "b"):
            check_array(getattr(self, name), name, ndim=2 if name != "b" else 1)
            if is_device_array(getattr(self, name)):
                object.__setattr__(self, name, as_device_array(getattr(self, name)))
        dtype = check_float_dtype(self.W_x, "W_x")
        hidden = self.W_h.shape[0]
        expected = {"W_x": (self.W_x.shape[0], N_GATES * hidden),
                    "W_h": (hidden, N_GATES * hidden),
                    "b": (N_GATES * hidden,)}
        for name, shape in expected.items():
            array = getattr(self, name)
            if tuple(array.shape) != shape:
                raise ValueError(f"{name} must have shape {shape} (I={self.W_x.shape[0]}, "
                                 f"H={hidden} from W_h), got {array.shape}")
            if np.dtype(array.dtype) != dtype:
                raise TypeError(f"{name} has dtype {array.dtype}, but W_x has {dtype}: "
                                "all parameters must share one dtype")

    @property
    def input_size(self):
        """I, the number of input features."""
        return self.W_x.shape[0]

    @property
    def hidden_size(self):
        """H, the number of hidden units."""
        return self.W_h.shape[0]

    @property
    def dtype(self):
        """The parameters' dtype (float32 or float64)."""
        return self.W_x.dtype

    @property
    def on_device(self):
        """True when the arrays are CUDA device arrays."""
        return is_device_array(self.W_x)

    def astype(self, dtype):
        """A host copy of the parameters in ``dtype``."""
        host = self.to_host()
        return LSTMParams(W_x=host.W_x.astype(dtype), W_h=host.W_h.astype(dtype),
                          b=host.b.astype(dtype))

    def to_device(self):
        """The parameters as contiguous CUDA device arrays (uploaded once).

        Needs numba-cuda (``pip install "nblstm[cuda13]"``) and a GPU or the simulator.
        """
        from numba import cuda

        return LSTMParams(*(array if is_device_array(array)
                            else cuda.to_device(np.ascontiguousarray(array))
                            for array in (self.W_x, self.W_h, self.b)))

    def to_host(self):
        """The parameters as NumPy arrays (device arrays are copied back)."""
        return LSTMParams(*(array.copy_to_host() if is_device_array(array) else array
                            for array in (self.W_x, self.W_h, self.b)))

    @classmethod
    def from_gates(cls, W_f, W_i, W_C, W_o, b_f, b_i, b_C, b_o):
        """Build parameters from the per-gate form of the equations.

        Each ``W_*`` acts on the concatenation ``[h_{t-1}, x_t]``:
        ``f_t = sigma(W_f @ [h_{t-1}, x_t] + b_f)`` and so on, with ``C`` the
        candidate (nblstm's gate ``g``).

        Parameters
        ----------
        W_f, W_i, W_C, W_o : (H, H+I) arrays
        b_f, b_i, b_C, b_o : (H,) arrays

        Returns
        -------
        LSTMParams
        """
        weights = {"W_f": W_f, "W_i": W_i, "W_C": W_C, "W_o": W_o}
        biases = {"b_f": b_f, "b_i": b_i, "b_C": b_C, "b_o": b_o}
        for name, array in weights.items():
            check_array(array, name, ndim=2)
        hidden = W_f.shape[0]
        if W_f.shape[1] <= hidden:
            raise ValueError(f"W_f must have shape (H, H+I) with I >= 1, got {W_f.shape}")
        for name, array in weights.items():
            if array.shape != W_f.shape:
                raise ValueError(f"{name} must have shape {W_f.shape} like W_f, got {array.shape}")
        for name, array in biases.items():
            check_array(array, name, ndim=1)
            if array.shape != (hidden,):
                raise ValueError(f"{name} must have shape ({hidden},), got {array.shape}")
        ordered = (W_i, W_f, W_C, W_o)
        w_h = np.concatenate([w[:, :hidden].T for w in ordered], axis=1)
        w_x = np.concatenate([w[:, hidden:].T for w in ordered], axis=1)
        b = np.concatenate([b_i, b_f, b_C, b_o])
        return cls(W_x=np.ascontiguousarray(w_x), W_h=np.ascontiguousarray(w_h), b=b)

    @classmethod
    def init(cls, input_size, hidden_size, dtype=np.float32, rng=None):
        """Random parameters, every entry drawn from U(-1/sqrt(H), 1/sqrt(H)) as PyTorch does.

        Parameters
        ----------
        input_size : int
            I.
        hidden_size : int
            H.
        dtype : float32 or float64
        rng : numpy.random.Generator, int seed or None
            Source of randomness; None draws fresh entropy.

        Returns
        -------
        LSTMParams
        """
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        dtype = check_float_dtype(np.empty(0, dtype), "dtype")
        rng = np.random.default_rng(rng)
        bound = 1 / np.sqrt(hidden_size)
        four_h = N_GATES * hidden_size

        def uniform(shape):
            return rng.uniform(-bound, bound, shape).astype(dtype)

        return cls(W_x=uniform((input_size, four_h)), W_h=uniform((hidden_size, four_h)),
                   b=uniform((four_h,)))
