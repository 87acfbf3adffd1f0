"""Safety of concurrent calls into Numba's parallel kernels.

Numba's ``omp`` and ``tbb`` threading layers accept parallel regions launched
from several Python threads at once; its ``workqueue`` layer aborts the
process. nblstm never chooses the layer (that is the application's global
setting, ``NUMBA_THREADING_LAYER``): it serialises its parallel calls while
the layer is ``workqueue`` or not yet known, and lets them overlap otherwise.
"""
import threading
from contextlib import contextmanager

import numba

_LOCK = threading.Lock()
_THREAD_SAFE_LAYERS = ("omp", "tbb")


def _layer_is_thread_safe():
    try:
        return numba.threading_layer() in _THREAD_SAFE_LAYERS
    except ValueError:
        return False


@contextmanager
def parallel_section():
    """Context in which one parallel kernel call runs safely."""
    if _layer_is_thread_safe():
        yield
    else:
        with _LOCK:
            yield
