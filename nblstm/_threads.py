"""Safety of concurrent calls into Numba's parallel kernels.

Numba's ``omp`` and ``tbb`` threading layers accept parallel regions launched
from several Python threads at once; its ``workqueue`` layer aborts the
process. nblstm never chooses the layer (that is the application's global
setting, ``NUMBA_THREADING_LAYER``): it serialises its parallel calls while
the layer is ``workqueue`` or not yet known, and lets them overlap otherwise.
"""
import threading

import numba

_LOCK = threading.Lock()
_THREAD_SAFE_LAYERS = ("omp", "tbb")
#: Set once a parallel region has run on a thread-safe layer. Numba picks the
#: layer at the first region and never changes it, so from then on a call
#: needs neither the lock nor the question: Python run right after a parallel
#: kernel runs several times slower than usual (the kernel has evicted it
#: from the caches), so every step saved on this path counts at small sizes.
_known_safe = False


def _layer_is_thread_safe():
    try:
        return numba.threading_layer() in _THREAD_SAFE_LAYERS
    except ValueError:
        return False


def run_parallel(kernel, *args):
    """``kernel(*args)``, a call into Numba parallel code, made safely: under a
    lock unless the threading layer is known to allow concurrent regions."""
    global _known_safe
    if _known_safe:
        return kernel(*args)
    with _LOCK:
        result = kernel(*args)
    _known_safe = _layer_is_thread_safe()
    return result
