"""Recycled memory for the large arrays the ``"cpu"`` backend returns.

A fresh array of many MB costs the operating system a page fault and a
zeroed page per 4 KiB (or 2 MiB) on first touch: a training forward at f32
H=512 B=128 T=100 returns 160 MB (y, the saved gates and states), and their
first touch took about 13 ms of its 196 (measured on a 2-core machine). In a
training loop the arrays of one step die a step or two later, so the pool
keeps their memory when they die and hands it to the next call of a similar
size, already mapped, as PyTorch's CUDA caching allocator does for device
memory. Measured there, forward and backward through the public API,
interleaved against fresh memory: f32 H=256-1024 B=32-128 1.024-1.032x, f64
H=512-1024 B=8-128 1.025-1.060x; inference, whose only large result is y,
0.995-1.004x.

An array from the pool is an ordinary NumPy array whose ``base`` is a lease:
every view of it keeps the lease alive, so memory returns to the pool only
once no array over it is left, and a result never shares memory with one the
caller still holds. :func:`nblstm.clear_workspace` releases what the pool
keeps.
"""
import collections
import math
import threading
import weakref

import numpy as np

#: Smaller arrays come from fresh allocations: the C library's allocator
#: already reuses small blocks, and their first touch is cheap.
MIN_POOLED_BYTES = 4 * 2 ** 20
#: The pool keeps at most this many bytes of dead arrays' memory; the oldest
#: buffers go first.
MAX_KEPT_BYTES = 2 ** 30
#: A kept buffer serves a request for n bytes only up to this many times n,
#: so that small requests do not pin large buffers.
MAX_SIZE_RATIO = 1.5


class _Lease:
    """Owner of a pooled buffer while arrays over it live: their ``base``."""

    def __init__(self, buffer, n_bytes):
        self.buffer = buffer
        self.__array_interface__ = {"shape": (n_bytes,), "typestr": "|u1", "version": 3,
                                    "data": (buffer.__array_interface__["data"][0], False)}


class RecyclingPool:
    """Memory of dead output arrays, kept for the next ones (see the module docstring).

    Parameters
    ----------
    allocate : callable
        ``allocate(shape, dtype)``: a fresh uninitialized C-contiguous array,
        for requests the pool cannot serve.
    min_bytes, max_kept_bytes, max_size_ratio : int, int, float
        :data:`MIN_POOLED_BYTES`, :data:`MAX_KEPT_BYTES`, :data:`MAX_SIZE_RATIO`.
    """

    def __init__(self, allocate, min_bytes=MIN_POOLED_BYTES, max_kept_bytes=MAX_KEPT_BYTES,
                 max_size_ratio=MAX_SIZE_RATIO):
        self._allocate = allocate
        self._min_bytes = min_bytes
        self._max_kept_bytes = max_kept_bytes
        self._max_size_ratio = max_size_ratio
        self._lock = threading.Lock()
        #: id -> kept (n,) uint8 buffer, oldest first; changed under the lock only
        self._kept = {}
        #: Buffers of dead leases not yet in ``_kept``. A lease's finalizer runs
        #: on whichever thread drops the last array, at any moment, even
        #: inside this class's own methods (when the garbage collector runs
        #: there): it only appends here, which needs no lock.
        self._returned = collections.deque()

    def allocator_for(self, n_bytes):
        """:meth:`empty` for a call whose largest result has ``n_bytes``, or
        None where every result is too small to recycle (then the kernels
        allocate them in compiled code: a Python allocation per result would
        cost a small call more than it saves)."""
        return self.empty if n_bytes >= self._min_bytes else None

    def empty(self, shape, dtype):
        """An uninitialized C-contiguous array of ``shape`` and ``dtype``, in a
        kept buffer when one of a fitting size is free."""
        dtype = np.dtype(dtype)
        n_bytes = math.prod(shape) * dtype.itemsize
        if n_bytes < self._min_bytes:
            return self._allocate(shape, dtype)
        buffer = self._take(n_bytes)
        if buffer is None:
            buffer = self._allocate((n_bytes,), np.uint8)
        lease = _Lease(buffer, n_bytes)
        weakref.finalize(lease, self._give_back, buffer).atexit = False
        return np.asarray(lease).view(dtype).reshape(shape)

    def _take(self, n_bytes):
        """The smallest kept buffer of n_bytes to max_size_ratio * n_bytes, removed; or None."""
        with self._lock:
            self._sort_in()
            best = None
            for key, buffer in self._kept.items():
                if (n_bytes <= buffer.nbytes <= self._max_size_ratio * n_bytes
                        and (best is None or buffer.nbytes < self._kept[best].nbytes)):
                    best = key
            return None if best is None else self._kept.pop(best)

    def _give_back(self, buffer):
        """A lease's finalizer: its buffer returns, and is sorted in now unless
        the pool is busy (then at its next call)."""
        self._returned.append(buffer)
        if self._lock.acquire(blocking=False):
            try:
                self._sort_in()
            finally:
                self._lock.release()

    def _sort_in(self):
        """Move returned buffers into the kept ones, dropping the oldest past
        max_kept_bytes. Under the lock."""
        while self._returned:
            buffer = self._returned.popleft()
            if buffer.nbytes <= self._max_kept_bytes:
                self._kept[id(buffer)] = buffer
        while self._kept_bytes() > self._max_kept_bytes:
            del self._kept[next(iter(self._kept))]

    def _kept_bytes(self):
        """Bytes of the kept buffers. Under the lock."""
        return sum(buffer.nbytes for buffer in self._kept.values())

    def clear(self):
        """Drop every kept buffer; return the bytes they held."""
        with self._lock:
            self._sort_in()
            released = self._kept_bytes()
            self._kept.clear()
        return released

    @property
    def n_bytes(self):
        """Bytes of the buffers kept now."""
        with self._lock:
            self._sort_in()
            return self._kept_bytes()


def _fresh(shape, dtype):
    """Fresh memory as the CPU kernels allocate it (imported at first use, so
    that importing nblstm does not load the kernels)."""
    from .kernels.gemm import aligned_empty

    return aligned_empty(shape, dtype)


#: The pool of the ``"cpu"`` backend's results.
RESULT_POOL = RecyclingPool(_fresh)
