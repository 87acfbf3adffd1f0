"""Which backends run on this machine, and why not otherwise."""
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
    }
