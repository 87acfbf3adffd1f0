"""One place that decides whether an object is a CUDA device array."""
import numpy as np


def is_device_array(value):
    """True for anything that lives on a CUDA device.

    Recognises objects exposing ``__cuda_array_interface__`` (Numba device
    arrays, CuPy arrays, PyTorch CUDA tensors) and the simulator's device
    arrays, which have no such attribute but, like Numba's own device arrays,
    carry ``__cuda_ndarray__``. PyTorch raises from the attribute
    for tensors that require grad: such a tensor is still a device array.
    """
    if isinstance(value, (np.ndarray, type)):
        return False
    try:
        value.__cuda_array_interface__  # noqa: B018  (the property may raise)
    except AttributeError:
        return bool(getattr(value, "__cuda_ndarray__", False))
    except Exception:
        return True
    return True


def as_device_array(value):
    """A Numba device array viewing ``value``, a device array of any library.

    Numba's (and the simulator's) own device arrays are returned as they are;
    others are wrapped through the CUDA Array Interface, without a copy.
    """
    if getattr(value, "__cuda_ndarray__", False):
        return value
    from numba import cuda

    return cuda.as_cuda_array(value)
