"""Argument checks shared by the public API: clear errors naming the argument."""
import numpy as np

from ._device import is_device_array

#: The dtypes nblstm computes in; nothing is ever cast between them.
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def is_array(value):
    """True for a NumPy array or a device array (CUDA Array Interface or simulator)."""
    return isinstance(value, np.ndarray) or is_device_array(value)


def check_array(value, name, ndim):
    """Raise unless ``value`` is an array (host or device) with ``ndim`` dimensions."""
    if not is_array(value):
        raise TypeError(f"{name} must be a NumPy or CUDA device array, got {type(value).__name__}")
    if len(value.shape) != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(value.shape)}")


def check_float_dtype(value, name):
    """Raise unless ``value`` is float32 or float64; return its dtype."""
    dtype = np.dtype(value.dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dtype}")
    return dtype


def check_tensor(value, name, shape, dtype, what):
    """Raise unless ``value`` is an array of exactly ``shape`` and ``dtype``.

    ``what`` spells the expected shape symbolically, e.g. ``"(B, H)"``.
    """
    check_array(value, name, ndim=len(shape))
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {what} = {tuple(shape)}, "
                         f"got {tuple(value.shape)}")
    if np.dtype(value.dtype) != dtype:
        raise TypeError(f"{name} has dtype {np.dtype(value.dtype)}, expected {dtype} like x "
                        "(nblstm never casts: convert it yourself)")
