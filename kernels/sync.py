"""Atomics for the CPU time loops: tiles claimed by compare-and-swap, steps
finished by a counter that the workers spin on.

A time loop runs as one parallel region for all its steps (see
:mod:`.cpu`): each worker claims the tiles of a step one by one, counts each
finished tile, and waits until the step's count is complete before it starts
the next step. That costs a few atomic operations per tile instead of a
thread-pool launch and join per step. Nothing assumes the workers run at the
same time: a worker that runs alone claims every tile itself, so the loop
finishes under any threading layer.

The operations are emitted as LLVM IR (Numba has no CPU atomics): sequentially
consistent read-modify-writes and acquire loads, so a worker that sees a step
complete also sees everything the step's tiles wrote.
"""
import os
import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

#: int64 slots per counter: each counter on a cache line of its own (two
#: lines, for the adjacent-line prefetcher), so spinning on one does not
#: slow the writes to another.
SLOT_STRIDE = 16
#: ``pause`` tells an x86 core it is spinning (less power, no memory-order
#: flush when the wait ends); other CPUs spin without a hint.
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
#: Spins a waiting worker makes before it also yields its core on each further
#: spin: a step takes microseconds, so a wait longer than this means the
#: worker it waits for has lost its core (more threads than cores), and
#: spinning on would only keep that worker off it.
SPINS_BEFORE_YIELD = 2000
#: POSIX systems yield a core with ``sched_yield`` from the C library, which
#: the JIT-compiled code calls by name; elsewhere a long wait keeps spinning.
_CAN_YIELD = os.name == "posix"


#: A claim slot's value before its task is first claimed: below every step.
UNCLAIMED = -1


@njit(cache=True)
def counters(n_tasks, n_steps):
    """Fresh ``(claims, done)`` for ``n_tasks`` tasks a step over ``n_steps``
    steps: claims (n_tasks * SLOT_STRIDE,) int64, every slot UNCLAIMED; done
    (n_steps * SLOT_STRIDE,) int64, zero. Compiled, so that the CPU drivers
    can call it."""
    return (np.full(n_tasks * SLOT_STRIDE, UNCLAIMED, np.int64),
            np.zeros(n_steps * SLOT_STRIDE, np.int64))


def _slot_pointer(context, builder, array_type, array, index):
    """Pointer to ``array[index]`` of a 1-D int64 array."""
    array_struct = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer(context, builder, array_type, array_struct, [index])


def _is_counter_array(array):
    return (isinstance(array, types.Array) and array.ndim == 1
            and array.dtype == types.int64)


@intrinsic
def atomic_load(typingctx, array, index):
    """``array[index]`` read atomically with acquire ordering. array: 1-D int64."""
    if not _is_counter_array(array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        pointer = _slot_pointer(context, builder, array, args[0], args[1])
        return builder.load_atomic(pointer, "acquire", 8)

    return types.int64(array, index), codegen


@intrinsic
def atomic_add(typingctx, array, index, value):
    """``array[index] += value`` atomically (sequentially consistent)."""
    if not _is_counter_array(array) or not isinstance(index, types.Integer) or not isinstance(
            value, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        pointer = _slot_pointer(context, builder, array, args[0], args[1])
        amount = context.cast(builder, args[2], signature.args[2], types.int64)
        builder.atomic_rmw("add", pointer, amount, "seq_cst")
        return context.get_dummy_value()

    return types.void(array, index, value), codegen


@intrinsic
def compare_and_swap(typingctx, array, index, expected, new):
    """Set ``array[index] = new`` if it holds ``expected``, atomically; True if it did."""
    if not _is_counter_array(array) or not all(
            isinstance(arg, types.Integer) for arg in (index, expected, new)):
        return None

    def codegen(context, builder, signature, args):
        pointer = _slot_pointer(context, builder, array, args[0], args[1])
        old, new_value = (context.cast(builder, value, value_type, types.int64)
                          for value, value_type in zip(args[2:], signature.args[2:]))
        result = builder.cmpxchg(pointer, old, new_value, "seq_cst", "seq_cst")
        return builder.extract_value(result, 1)

    return types.boolean(array, index, expected, new), codegen


@intrinsic
def spin_pause(typingctx):
    """A hint to the core that this thread is spinning (x86 ``pause``; nothing elsewhere)."""

    def codegen(context, builder, signature, args):
        if _X86:
            pause = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
            builder.call(pause, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def yield_core(typingctx):
    """Give this thread's core to another runnable thread (POSIX ``sched_yield``)."""

    def codegen(context, builder, signature, args):
        if _CAN_YIELD:
            sched_yield = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
            builder.call(sched_yield, [])
        return context.get_dummy_value()

    return types.void(), codegen


@njit(inline="always")
def claim(claims, task, step):
    """Claim ``task`` for ``step``; True if this worker got it.

    claims: (n_tasks * SLOT_STRIDE,) int64 from :func:`counters`, each task's
    slot holding the last step it was claimed for. Steps only grow, so a
    slot at or past ``step`` means another worker has the task.
    """
    slot = task * SLOT_STRIDE
    seen = atomic_load(claims, slot)
    while seen < step:
        if compare_and_swap(claims, slot, seen, step):
            return True
        seen = atomic_load(claims, slot)
    return False


@intrinsic
def store_fence(typingctx):
    """Make this thread's earlier non-temporal stores (:func:`.gemm.stream_into`)
    visible before any of its later stores: x86 ``sfence`` (x86 orders
    ordinary stores without it, but not non-temporal ones); elsewhere a
    sequentially consistent fence."""

    def codegen(context, builder, signature, args):
        if _X86:
            sfence = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse.sfence")
            builder.call(sfence, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@njit(inline="always")
def finish(done, step_slot):
    """Count one finished task of a step. done: from :func:`counters`. A
    task that made non-temporal stores fences (:func:`store_fence`) first."""
    atomic_add(done, step_slot * SLOT_STRIDE, 1)


@njit(inline="always")
def wait_until_done(done, step_slot, n_tasks):
    """Spin until ``n_tasks`` tasks of the step have been counted by
    :func:`finish`, yielding the core between spins once the wait is long."""
    spins = 0
    while atomic_load(done, step_slot * SLOT_STRIDE) < n_tasks:
        spin_pause()
        spins += 1
        if spins > SPINS_BEFORE_YIELD:
            yield_core()
