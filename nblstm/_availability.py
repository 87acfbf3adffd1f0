"""Which backends run on this machine, and why not otherwise."""
from functools import lru_cache

import numba


class BackendStatus(str):
    """A human-readable reason, with ``.available`` for programs."""

    available: bool

    def __new__(cls, available, reason):
        status = super().__new__(cls, reason)
        status.available = available
        return status


def _threading_layer():
    try:
        return numba.threading_layer()
    except ValueError:
        return f"{numba.config.THREADING_LAYER} (chosen at the first parallel call)"


def _cpu_status():
    layer = _threading_layer()
    return BackendStatus(True, f"available: Numba {numba.__version__}, "
                               f"{numba.config.NUMBA_NUM_THREADS} threads, "
                               f"threading layer {layer}")


@lru_cache(maxsize=None)
def cuda_status():
    """Whether ``"cuda"`` runs here (real GPU, simulator) or why not; probed once per process."""
    try:
        from numba import cuda
    except ImportError as error:
        return BackendStatus(False, f"unavailable: numba.cuda cannot be imported ({error}); "
                                    'install "nblstm[cuda13]" (or [cuda12])')
    if getattr(cuda, "implementation", None) != "NVIDIA":
        return BackendStatus(False, "unavailable: numba-cuda is not installed (numba's deprecated "
                                    'built-in CUDA target is not supported); install '
                                    '"nblstm[cuda13]" (drivers R580+) or "nblstm[cuda12]"')
    if numba.config.ENABLE_CUDASIM:
        return BackendStatus(True, "available: Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1), "
                                   "slow, for testing")
    try:
        available = cuda.is_available()
    except Exception as error:  # a broken driver install raises instead of answering
        return BackendStatus(False, f"unavailable: the CUDA driver failed ({error})")
    if not available:
        return BackendStatus(False, "unavailable: no CUDA driver or GPU found")
    device = cuda.get_current_device()
    name = device.name.decode() if isinstance(device.name, bytes) else device.name
    return BackendStatus(True, f"available: {name}, compute capability "
                               f"{'.'.join(map(str, device.compute_capability))}")


def available_backends():
    """Every backend nblstm knows, with whether it runs here and why.

    Returns
    -------
    dict of str to BackendStatus
        ``{name: reason}``; each reason is a string that also carries
        ``.available`` (bool).
    """
    return {
        "numpy": BackendStatus(True, "available: the NumPy reference"),
        "cpu": _cpu_status(),
        "cuda": cuda_status(),
    }
