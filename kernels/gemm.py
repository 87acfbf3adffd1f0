"""Matrix products for the CPU drivers: a register-blocked SIMD micro-kernel.

``out[r, :] (+)= a[r, :] @ b`` for a list of rows ``r``, written the way BLAS
kernels are (BLIS's "micro-kernel" formulation): a block of
:data:`BLOCK_ROWS` rows by :data:`BLOCK_VECTORS` SIMD vectors of columns
accumulates in registers while ``k`` runs, each step broadcasting one element
of ``a`` per row and loading one vector of ``b`` per column group, so each
loaded value feeds several fused multiply-adds and nothing is reduced across
lanes. The block is emitted as LLVM IR (a Numba ``@intrinsic``) because
Numba's loop vectorizer only vectorizes innermost loops and would keep the
accumulators in memory. The vector width follows the host CPU
(AVX-512, AVX or SSE); LLVM lowers it on any target.

``b`` is first packed into panels (one contiguous (K, W) slab per block of W
columns), as BLAS kernels do, so the block streams it sequentially; ``a`` is
read in place (fastest along its rows) and ``out`` must be contiguous along
its last axis. Packed panels and other large temporaries come from a
per-thread :class:`Workspace`. Tiling, threads and the time loops are ordinary
Numba code here and in :mod:`.cpu`. Every output element is one register's
lane, summed in an order fixed by the shapes (never by the thread count), so
results are bit-identical across reruns and thread counts.
"""
import math
import sys
import threading

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

#: Rounds of k per iteration of the main loop over k (fewer branches and
#: index updates per multiply-add; the sums are the same).
K_UNROLL = 4
#: Cache lines of the following panel that a block prefetches per value of
#: k, when asked to (:func:`product_tile`): a quarter of a panel over the
#: block's k loop (a panel row is BLOCK_VECTORS = 4 lines). Measured on a
#: 2-core AVX-512 machine, forward time loops alone at B=8 (a 6-row and a
#: 2-row block), against no prefetch: 1 line f64 H=1024 1.040-1.052x in
#: three runs, f32 H=1024 1.03x; 2 lines f64 H=1024 1.04x; 4 lines 0.92x.
PREFETCH_LINES_PER_K = 1
CACHE_LINE_BYTES = 64
#: ``llvm.prefetch`` locality 2: into L2 and the caches below it (``prefetcht1``).
PREFETCH_LOCALITY = 2


def _host_vector_bytes():
    """Width of the host's widest SIMD registers, in bytes."""
    features = llvm.get_host_cpu_features()
    if features.get("avx512f"):
        return 64
    if features.get("avx"):
        return 32
    return 16


#: Bytes per SIMD vector on this machine.
VECTOR_BYTES = _host_vector_bytes()
BITS_PER_BYTE = 8
#: Vector registers of the ISA with 64-byte vectors (AVX-512: 32) and of the others (16).
WIDE_REGISTERS = 32
NARROW_REGISTERS = 16
#: Rows of ``a`` (and ``out``) per register block: each is one broadcast per
#: k, from its own row pointer. Six row pointers, the panel pointer and the
#: loop's indices fit the 15 general registers of x86-64; twelve did not, and
#: the spilled pointers cost a stack load per broadcast.
BLOCK_ROWS = 6
#: SIMD vectors of columns per register block: each is one load of ``b`` per
#: k. The block's BLOCK_ROWS * BLOCK_VECTORS accumulators, the loaded vectors
#: of ``b`` and one broadcast must fit the vector registers: 4 vectors (29 of
#: 32 registers) with AVX-512, 2 (15 of 16) with AVX/SSE. Measured on a 2-core
#: AVX-512 machine, 6 x 4 blocks ran the 2048^3 f32 product at 285-294 GFLOP/s
#: where 12 x 2 blocks (pointers spilled) ran it at 250-270.
BLOCK_VECTORS = 4 if VECTOR_BYTES == 64 else 2
#: Shares of PREFETCH_LINES_PER_K lines per k that make up a whole panel:
#: the blocks after a panel's first prefetch one share of the following
#: panel each, until it is covered.
PREFETCH_SHARES = BLOCK_VECTORS * VECTOR_BYTES // (PREFETCH_LINES_PER_K * CACHE_LINE_BYTES)
assert BLOCK_ROWS * BLOCK_VECTORS + BLOCK_VECTORS + 1 <= (
    WIDE_REGISTERS if VECTOR_BYTES == 64 else NARROW_REGISTERS), "the block fits the registers"


@intrinsic
def use_full_vector_width(typingctx):
    """Let LLVM's loop vectorizer use the host's full vector width in the
    function that calls this (a no-op at run time).

    On AVX-512 machines LLVM prefers 256-bit vectors for loops it vectorizes
    itself (its "prefer-256-bit" tuning), so the cell math ran 8 float32
    lanes at a time. This sets the calling function's ``prefer-vector-width``
    attribute, which only that function's code generation reads: no global
    setting changes. The register blocks above are explicit vectors and
    need no hint. Measured on a 2-core AVX-512 machine, the forward cell loop
    went from 2.34 to 1.70 ns per unit in float32 and 7.3 to 5.9 in float64.
    Other targets ignore the attribute.
    """
    def codegen(context, builder, signature, args):
        # llvmlite's FunctionAttributes accepts only flag attributes by name;
        # a "key"="value" attribute is written verbatim into the definition.
        set.add(builder.function.attributes,
                f'"prefer-vector-width"="{VECTOR_BYTES * BITS_PER_BYTE}"')
        return context.get_dummy_value()

    return types.none(), codegen


@njit(inline="always")
def panel_width(itemsize):
    """W: columns one register block (and one packed panel) covers for
    elements of ``itemsize`` bytes; for compiled code, which has no dtypes."""
    return BLOCK_VECTORS * VECTOR_BYTES // itemsize


def block_columns(dtype):
    """Columns one register block covers for ``dtype`` (a NumPy dtype)."""
    return panel_width.py_func(dtype.itemsize)


_LLVM_TYPE_TAG = {32: "f32", 64: "f64"}


class _Emitter:
    """LLVM IR helpers for one register block of one float type."""

    def __init__(self, context, builder, dtype):
        self.builder = builder
        self.element = context.get_value_type(dtype)
        self.itemsize = dtype.bitwidth // 8
        self.lanes = VECTOR_BYTES // self.itemsize
        self.vector = ir.VectorType(self.element, self.lanes)
        self.mask_type = ir.VectorType(ir.IntType(1), self.lanes)
        self.i64 = ir.IntType(64)
        self.i32 = ir.IntType(32)
        self.byte_ptr = ir.IntType(8).as_pointer()
        module = builder.module
        tag = f"v{self.lanes}{_LLVM_TYPE_TAG[dtype.bitwidth]}"
        vector_ptr = self.vector.as_pointer()
        self.fmuladd = cgutils.get_or_insert_function(
            module, ir.FunctionType(self.vector, [self.vector] * 3), f"llvm.fmuladd.{tag}")
        self.masked_load = cgutils.get_or_insert_function(
            module, ir.FunctionType(self.vector, [vector_ptr, self.i32, self.mask_type,
                                                  self.vector]),
            f"llvm.masked.load.{tag}.p0")
        self.masked_store = cgutils.get_or_insert_function(
            module, ir.FunctionType(ir.VoidType(), [self.vector, vector_ptr, self.i32,
                                                    self.mask_type]),
            f"llvm.masked.store.{tag}.p0")
        self.zero = ir.Constant(self.vector, [ir.Constant(self.element, 0.0)] * self.lanes)

    def offset(self, base, byte_offset, pointee):
        """Pointer to ``pointee`` at ``base + byte_offset`` bytes."""
        raw = self.builder.gep(self.builder.bitcast(base, self.byte_ptr), [byte_offset])
        return self.builder.bitcast(raw, pointee.as_pointer())

    def prefetch(self, pointer):
        """Hint that the cache line at ``pointer`` will be read soon (:data:`PREFETCH_LOCALITY`)."""
        _emit_prefetch(self.builder, pointer, False, PREFETCH_LOCALITY)

    def splat(self, scalar):
        """A vector with ``scalar`` in every lane."""
        undef = ir.Constant(self.vector, ir.Undefined)
        one = self.builder.insert_element(undef, scalar, ir.Constant(self.i32, 0))
        lanes_zero = ir.Constant(ir.VectorType(self.i32, self.lanes), [0] * self.lanes)
        return self.builder.shuffle_vector(one, undef, lanes_zero)

    def lane_mask(self, n_valid, first_lane):
        """Mask of lanes whose column ``first_lane + lane`` is below ``n_valid``."""
        lane_type = ir.VectorType(self.i64, self.lanes)
        lane_index = ir.Constant(lane_type, [first_lane + lane for lane in range(self.lanes)])
        limit = self.builder.insert_element(ir.Constant(lane_type, ir.Undefined), n_valid,
                                            ir.Constant(self.i32, 0))
        limit = self.builder.shuffle_vector(
            limit, ir.Constant(lane_type, ir.Undefined),
            ir.Constant(ir.VectorType(self.i32, self.lanes), [0] * self.lanes))
        return self.builder.icmp_signed("<", lane_index, limit)

    def load_vector(self, pointer, mask):
        """Load a vector, only the lanes in ``mask`` when it is given."""
        if mask is None:
            return self.builder.load(pointer, align=self.itemsize)
        return self.builder.call(self.masked_load, [pointer, ir.Constant(self.i32, self.itemsize),
                                                    mask, self.zero])

    def store_vector(self, value, pointer, mask):
        """Store a vector, only the lanes in ``mask`` when it is given."""
        if mask is None:
            self.builder.store(value, pointer, align=self.itemsize)
        else:
            self.builder.call(self.masked_store, [value, pointer,
                                                  ir.Constant(self.i32, self.itemsize), mask])


def _emit_prefetch(builder, pointer, write, locality):
    """IR of ``llvm.prefetch`` of the data cache line at ``pointer``, for reading
    or, where ``write``, for writing, with ``locality`` 0-3."""
    byte_ptr, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    function = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32]),
        "llvm.prefetch.p0")
    data_cache = ir.Constant(i32, 1)
    builder.call(function, [builder.bitcast(pointer, byte_ptr), ir.Constant(i32, int(write)),
                            ir.Constant(i32, locality), data_cache])


def _array_parts(context, builder, array_type, value):
    """(data pointer, byte strides) of a Numba array value."""
    array = context.make_array(array_type)(context, builder, value)
    return array.data, cgutils.unpack_tuple(builder, array.strides, array_type.ndim)


def _emit_k_loop(emit, a_rows, a_k_stride, b_start, b_k_stride, k_lo, k_hi, masks,
                 prefetch_start=None):
    """The loop over k; returns the accumulators, [row][vector].

    a_rows: pointers to ``a[r, 0]`` of each row; b_start: pointer to the
    panel's first row (row k at ``b_start + k * b_k_stride`` bytes).
    prefetch_start: None, or a byte pointer from which the loop prefetches
    PREFETCH_LINES_PER_K cache lines per value of k, in order.
    One accumulator per row and vector takes every k in increasing order, in
    a block of any height: a row's sums then do not depend on which block it
    runs in, so products that cut their rows into blocks differently (tiles
    that depend on the thread count) agree bit for bit. Blocks of one row
    used to split k into two interleaved sets of sums, for eight FMA chains
    instead of four; a row then summed differently in a one-row tile (one
    thread, B = ROWS_PER_TILE + 1) than in a taller one (two teams). One
    zmm FMA a cycle at a latency of 4 needs only four: measured on a 2-core
    Zen 4, forward time loops at B=1 within noise of the two sets (f32 H=128
    to 1024 0.97-1.04x, f64 H=64 to 256 0.98-1.03x). A loop unrolled
    K_UNROLL times runs first, then one value of k per iteration: the
    unrolling changes no sum.
    """
    builder = emit.builder
    n_vectors = len(masks)
    vector_bytes = emit.lanes * emit.itemsize
    prefetch_bytes = ir.Constant(emit.i64, PREFETCH_LINES_PER_K * CACHE_LINE_BYTES)

    def update(accumulators, k_index):
        b_row = emit.offset(b_start, builder.mul(k_index, b_k_stride), emit.element)
        if prefetch_start is not None:
            lines = emit.offset(prefetch_start, builder.mul(builder.sub(k_index, k_lo),
                                                            prefetch_bytes), ir.IntType(8))
            for line in range(PREFETCH_LINES_PER_K):
                emit.prefetch(emit.offset(lines, ir.Constant(emit.i64, line * CACHE_LINE_BYTES),
                                          ir.IntType(8)))
        b_vectors = [emit.load_vector(emit.offset(b_row, ir.Constant(emit.i64, v * vector_bytes),
                                                  emit.vector), masks[v])
                     for v in range(n_vectors)]
        updated = []
        for row_pointer, row_accumulators in zip(a_rows, accumulators):
            a_value = builder.load(emit.offset(row_pointer, builder.mul(k_index, a_k_stride),
                                               emit.element))
            broadcast = emit.splat(a_value)
            updated.append([builder.call(emit.fmuladd, [broadcast, b_vector, accumulator])
                            for b_vector, accumulator in zip(b_vectors, row_accumulators)])
        return updated

    def unrolled_loop(k_start, accumulators_in, rounds):
        """A loop taking ``rounds`` values of k per iteration while they all
        exist; returns (k, accumulators) where it stops."""
        entry = builder.block
        header = builder.append_basic_block("k_loop")
        body = builder.append_basic_block("k_body")
        done = builder.append_basic_block("k_done")
        builder.branch(header)
        builder.position_at_end(header)
        k = _phi(builder, emit.i64, k_start, entry)
        accumulators = [[_phi(builder, emit.vector, value, entry) for value in row]
                        for row in accumulators_in]
        step = ir.Constant(emit.i64, rounds)
        builder.cbranch(builder.icmp_signed("<=", builder.add(k, step), k_hi), body, done)
        builder.position_at_end(body)
        updated = accumulators
        for round_ in range(rounds):
            updated = update(updated, builder.add(k, ir.Constant(emit.i64, round_)))
        k.add_incoming(builder.add(k, step), builder.block)
        for row, updated_row in zip(accumulators, updated):
            for phi, value in zip(row, updated_row):
                phi.add_incoming(value, builder.block)
        builder.branch(header)
        builder.position_at_end(done)
        return k, accumulators

    zeros = [[emit.zero] * n_vectors for _ in a_rows]
    k, accumulators = unrolled_loop(k_lo, zeros, K_UNROLL)
    _, accumulators = unrolled_loop(k, accumulators, 1)
    return accumulators


def _phi(builder, llvm_type, value, block):
    """A phi node at the builder's position with one incoming (value, block)."""
    phi = builder.phi(llvm_type)
    phi.add_incoming(value, block)
    return phi


def _emit_register_block(context, builder, signature, args):
    """IR of :func:`register_block`: a switch over the block height, one case per height."""
    count = context.cast(builder, args[0], signature.args[0], types.int64)
    done = builder.append_basic_block("block_done")
    switch = builder.switch(count, done)
    for n_rows in range(1, BLOCK_ROWS + 1):
        case = builder.append_basic_block(f"block_{n_rows}_rows")
        switch.add_case(ir.Constant(count.type, n_rows), case)
        builder.position_at_end(case)
        _emit_block(n_rows, context, builder, signature.args[1:], args[1:])
        builder.branch(done)
    builder.position_at_end(done)
    return context.get_dummy_value()


def _emit_block(n_rows, context, builder, arg_types, args):
    """IR of one register block of ``n_rows`` rows (see :func:`register_block`)."""
    a_type, a_rows_type, out_rows_type, _, panel_type, _, _, _, _, _, out_type, _, _ = arg_types
    (a, a_rows_array, out_rows_array, first, panel, panel_first_k, k_lo, k_hi, col, n_cols, out,
     _, prefetch_address) = [context.cast(builder, value, value_type, types.int64)
                             if isinstance(value_type, types.Integer) else value
                             for value, value_type in zip(args, arg_types)]
    accumulate = context.cast(builder, args[-2], arg_types[-2], types.boolean)
    emit = _Emitter(context, builder, a_type.dtype)
    i64 = emit.i64
    itemsize = ir.Constant(i64, emit.itemsize)
    a_data, (a_row_stride, a_k_stride) = _array_parts(context, builder, a_type, a)
    panel_data, (panel_k_stride, _) = _array_parts(context, builder, panel_type, panel)
    # Strides the layout fixes are constants (a C-contiguous panel's rows are
    # W = block_columns wide, as the contract says), so that each load of the
    # unrolled loop is one base register plus a displacement; as run-time
    # values, 24 offsets of a 6-row block were kept on the stack and
    # reloaded at every iteration.
    if a_type.layout == "C":
        a_k_stride = itemsize
    if panel_type.layout == "C":
        panel_k_stride = ir.Constant(i64, BLOCK_VECTORS * VECTOR_BYTES)
    # Row k of b sits at panel row k - panel_first_k.
    b_start = emit.offset(panel_data, builder.mul(builder.neg(panel_first_k), panel_k_stride),
                          emit.element)
    out_data, (out_row_stride, _) = _array_parts(context, builder, out_type, out)

    def row_indices(array, array_type):
        data, (stride,) = _array_parts(context, builder, array_type, array)
        element = context.get_value_type(array_type.dtype)
        return [context.cast(builder, builder.load(emit.offset(
            data, builder.mul(builder.add(first, ir.Constant(i64, i)), stride), element)),
            array_type.dtype, types.int64) for i in range(n_rows)]

    a_rows = [emit.offset(a_data, builder.mul(row, a_row_stride), emit.element)
              for row in row_indices(a_rows_array, a_rows_type)]
    col_bytes = builder.mul(col, itemsize)
    out_rows = [emit.offset(out_data, builder.add(builder.mul(row, out_row_stride), col_bytes),
                            emit.element) for row in row_indices(out_rows_array, out_rows_type)]

    def block(masks, prefetch_start=None):
        sums = _emit_k_loop(emit, a_rows, a_k_stride, b_start, panel_k_stride, k_lo, k_hi,
                            masks, prefetch_start)
        _emit_store(emit, sums, out_rows, masks, accumulate)

    # Full blocks load and store whole vectors; the last block of a row may be
    # narrower and masks its lanes. Full-width blocks have a second loop that
    # prefetches, run when given an address.
    full = builder.icmp_signed("==", n_cols, ir.Constant(i64, BLOCK_VECTORS * emit.lanes))
    with builder.if_else(full) as (full_block, partial_block):
        with full_block:
            prefetching = builder.icmp_signed("!=", prefetch_address, ir.Constant(i64, 0))
            with builder.if_else(prefetching) as (prefetching_block, plain_block):
                with prefetching_block:
                    block([None] * BLOCK_VECTORS,
                          builder.inttoptr(prefetch_address, emit.byte_ptr))
                with plain_block:
                    block([None] * BLOCK_VECTORS)
        with partial_block:
            block([emit.lane_mask(n_cols, v * emit.lanes) for v in range(BLOCK_VECTORS)])


def _emit_store(emit, sums, out_rows, masks, accumulate):
    """``out (+)= sums`` for each row and vector, masked where a mask is given.

    ``out`` is read only when accumulating: a block's output rows are often
    not in cache yet, and a load would wait for memory where a store does not.
    """
    builder = emit.builder
    vector_bytes = emit.lanes * emit.itemsize
    pointers = [[emit.offset(row_pointer, ir.Constant(emit.i64, v * vector_bytes), emit.vector)
                 for v in range(len(masks))] for row_pointer in out_rows]
    with builder.if_else(accumulate) as (add, overwrite):
        for adding, branch in ((True, add), (False, overwrite)):
            with branch:
                for row_pointers, row_sums in zip(pointers, sums):
                    for pointer, value, mask in zip(row_pointers, row_sums, masks):
                        if adding:
                            value = builder.fadd(value, emit.load_vector(pointer, mask))
                        emit.store_vector(value, pointer, mask)


@intrinsic
def register_block(typingctx, count, a, a_rows, out_rows, first, panel, panel_first_k, k_lo, k_hi,
                   col, n_cols, out, accumulate, prefetch_address):
    """One register block of ``count`` (1..BLOCK_ROWS) rows.

    ``register_block(count, a, a_rows, out_rows, first, panel, panel_first_k, k_lo, k_hi, col,
    n_cols, out, accumulate, prefetch_address)``: for each n in ``[first, first + count)`` and
    j < n_cols, with ``r, s = a_rows[n], out_rows[n]`` and ``p = panel_first_k``:
    ``out[s, col + j] (+)= sum(a[r, k] * panel[k - p, j] for k in range(k_lo, k_hi))``.
    a: (R, K) float; a_rows, out_rows: (M,) int; panel: (K', W) float, its row
    k - p holding row k of b for k in [k_lo, k_hi), W = block_columns; out:
    (S, N) float; n_cols <= W. prefetch_address: 0, or the byte address from
    which a block of W columns prefetches PREFETCH_LINES_PER_K cache lines per
    value of k (narrower blocks ignore it).
    """
    arrays = (a, panel, out)
    if not all(isinstance(array, types.Array) and array.ndim == 2
               and array.dtype == a.dtype for array in arrays):
        return None
    if not isinstance(a.dtype, types.Float) or not all(
            isinstance(rows, types.Array) and rows.ndim == 1 and isinstance(
                rows.dtype, types.Integer) for rows in (a_rows, out_rows)):
        return None
    signature = types.void(count, a, a_rows, out_rows, first, panel, panel_first_k, k_lo, k_hi,
                           col, n_cols, out, accumulate, prefetch_address)
    return signature, _emit_register_block


def _emit_transpose_square(context, builder, signature, args):
    """IR of :func:`transpose_square`: L row loads, log2(L) rounds of shuffles, L stores."""
    matrix_type, _, _, out_type, _, _ = signature.args
    matrix, out = args[0], args[3]
    row, col, out_row, out_col = [context.cast(builder, args[i], signature.args[i], types.int64)
                                  for i in (1, 2, 4, 5)]
    emit = _Emitter(context, builder, matrix_type.dtype)
    lanes, i64 = emit.lanes, emit.i64
    itemsize = ir.Constant(i64, emit.itemsize)
    matrix_data, (matrix_row_stride, _) = _array_parts(context, builder, matrix_type, matrix)
    out_data, (out_row_stride, _) = _array_parts(context, builder, out_type, out)

    def row_pointer(data, row_stride, first_row, i, first_col):
        byte = builder.add(builder.mul(builder.add(first_row, ir.Constant(i64, i)), row_stride),
                           builder.mul(first_col, itemsize))
        return emit.offset(data, byte, emit.vector)

    rows = [builder.load(row_pointer(matrix_data, matrix_row_stride, row, i, col),
                         align=emit.itemsize) for i in range(lanes)]
    # Round ``bit`` swaps that bit of the row and column index of every
    # element: rows i and i + bit (bit clear in i) trade the lanes whose
    # column has the bit set in row i for those that have it clear in row
    # i + bit. After every round, element (r, c) sits at (c, r).
    mask_type = ir.VectorType(ir.IntType(32), lanes)
    bit = 1
    while bit < lanes:
        low = ir.Constant(mask_type, [k if not k & bit else lanes + k - bit for k in range(lanes)])
        high = ir.Constant(mask_type, [k + bit if not k & bit else lanes + k
                                       for k in range(lanes)])
        swapped = list(rows)
        for i in range(lanes):
            if not i & bit:
                swapped[i] = builder.shuffle_vector(rows[i], rows[i + bit], low)
                swapped[i + bit] = builder.shuffle_vector(rows[i], rows[i + bit], high)
        rows = swapped
        bit *= 2
    for i, value in enumerate(rows):
        builder.store(value, row_pointer(out_data, out_row_stride, out_row, i, out_col),
                      align=emit.itemsize)
    return context.get_dummy_value()


@intrinsic
def transpose_square(typingctx, matrix, row, col, out, out_row, out_col):
    """``out[out_row + i, out_col + j] = matrix[row + j, col + i]`` for i, j < L,
    L = VECTOR_BYTES // itemsize: one L x L square transposed in vector registers.

    matrix, out: C-contiguous 2-D float arrays of one dtype. For the
    transposed packing and :func:`transpose_into`, which copied one value at
    a time before: transposed W_h (H, 4H) packs 1.4-1.8x faster (2 threads,
    f32 H=256/512/1024: 74/425/1601 -> 42/241/901 us).
    """
    if not all(isinstance(array, types.Array) and array.ndim == 2 and array.layout == "C"
               and array.dtype == matrix.dtype for array in (matrix, out)) or not isinstance(
                   matrix.dtype, types.Float):
        return None
    return types.void(matrix, row, col, out, out_row, out_col), _emit_transpose_square


#: ``llvm.prefetch`` locality 3 with rw 1: into L1, owned for writing (``prefetchw``).
WRITE_PREFETCH_LOCALITY = 3


@intrinsic
def prefetch_for_write(typingctx, address):
    """Hint that the cache line at byte ``address`` (an integer) will be written
    soon: the core fetches it, owned, while it computes, instead of when the
    store comes."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        address = context.cast(builder, args[0], signature.args[0], types.int64)
        _emit_prefetch(builder, builder.inttoptr(address, ir.IntType(8).as_pointer()), True,
                       WRITE_PREFETCH_LOCALITY)
        return context.get_dummy_value()

    return types.void(address), codegen


@njit(inline="always")
def _prefetch_out_block(out, out_rows, first, count, col, n_cols):
    """Prefetch for writing (:func:`prefetch_for_write`) the cache lines of
    columns [col, col + n_cols) of ``out``'s rows ``out_rows[first:first + count]``:
    those a register block stores its sums into."""
    for n in range(first, first + count):
        start = row_address(out, out_rows[n]) + col * out.itemsize
        for offset in range(0, n_cols * out.itemsize, CACHE_LINE_BYTES):
            prefetch_for_write(start + offset)


#: Rows left over after the full blocks that are too few for a block of their
#: own: below this many, the last full block and they run as two blocks of
#: about half the rows (8 rows as 4 + 4, 7 as 4 + 3, not 6 + 2 or 6 + 1). A
#: block of 1 or 2 rows does a sixth or a third of a full block's FMAs per
#: panel row it loads, and so waits on L2 when it reads the panel from
#: there; two half blocks do not. Rows are summed alike in any block, so the
#: sums are unchanged. Measured on a 2-core AVX-512 machine, time loops alone
#: against 6 + 2, at B=32 (a 24-row and an 8-row tile): f32 H=512 forward
#: 1.016x, backward 1.036x; f64 H=512 1.012x / 1.017x; f64 H=256 1.054x /
#: 1.046x; at B=8, f32 H=512 1.06x / 1.05x.
SHORT_BLOCK_ROWS = 3
assert SHORT_BLOCK_ROWS <= BLOCK_ROWS, (
    "a balanced split makes two blocks of at most BLOCK_ROWS rows, so a tile still runs "
    "ceil(rows / BLOCK_ROWS) blocks (product_tile counts them so)")


@njit(inline="always")
def _block_rows(remaining):
    """Rows of the next register block when ``remaining`` rows are left: the
    last two blocks split their rows evenly when the last would be short
    (:data:`SHORT_BLOCK_ROWS`)."""
    if BLOCK_ROWS < remaining < BLOCK_ROWS + SHORT_BLOCK_ROWS:
        return (remaining + 1) // 2
    return min(BLOCK_ROWS, remaining)


@njit(inline="always")
def product_tile(a, a_rows, out_rows, row_lo, row_hi, panels, k_lo, k_hi, col_lo, col_hi, out,
                 out_col, accumulate, panels_first_k=0, prefetch=False, following=0):
    """``out[s, out_col + j] (+)= a[r, k_lo:k_hi] @ b[k_lo:k_hi, j]`` for j in [col_lo, col_hi).

    For ``(r, s)`` in ``zip(a_rows, out_rows)[row_lo:row_hi]``. a: (R, K);
    a_rows, out_rows: (M,) int64; panels: (ceil(N / W), K', W), the matrix
    b (K, N) as packed by :func:`pack_panels`, or rows [panels_first_k,
    panels_first_k + K') of it; out: (S, N'), rows contiguous. col_lo must be
    a multiple of W.

    prefetch: the panels come from beyond L2 (they do not stay in the core's
    caches). More rows than a block then run a panel as a first block that
    streams it in and further blocks that read it again from L2, while
    memory would sit idle; each of these prefetches a share of the panel
    read next instead (:data:`PREFETCH_LINES_PER_K` lines per k, the i-th
    block after the first the i-th share, up to :data:`PREFETCH_SHARES`): the
    next panel here, after the last one ``following``, the byte address of
    the caller's next panel (its first row to be read), or 0 for none.

    Each block prefetches for writing the lines of ``out`` that the next block
    stores its sums into (the last block of a panel, those of the next
    panel's first block), so they arrive owned while the block computes. A
    product's results mostly land in rows no cache holds (the projection's
    gates, dx, the weight gradients), and each store waited for its line to
    be read from memory first. Measured on a 2-core Zen 4 machine (1 MiB L2
    a core), against no such prefetch: the product (12800 x 128) @ (128 x
    512), f32, 185.7 -> 203.7 GFLOP/s (212 with the results' rows kept in
    cache); whole forward calls (``bench/ab.py``) f32 H=128 B=128 1.037x,
    H=256 B=32 1.018x, H=512 B=32 1.020x, H=512 B=8 1.006x; f64 H=256 B=32
    1.034x, H=512 B=128 1.013x, H=1024 B=8 1.008x; fwd+bwd f32 H=128 B=128
    1.025x, H=512 B=32 1.011x, f64 H=256 B=32 1.011x, H=512 B=128 1.004x;
    B=1 0.97-1.01x.
    """
    width = panels.shape[2]
    n_rows = row_hi - row_lo
    share_bytes = (k_hi - k_lo) * PREFETCH_LINES_PER_K * CACHE_LINE_BYTES
    for col in range(col_lo, col_hi, width):
        n_cols = min(width, col_hi - col)
        panel = panels[col // width]
        prefetch_address = 0
        if prefetch and n_rows > BLOCK_ROWS:
            if col + width < col_hi:
                prefetch_address = row_address(panels[col // width + 1], k_lo - panels_first_k)
            else:
                prefetch_address = following
        first = row_lo
        for block in range(-(-n_rows // BLOCK_ROWS)):
            count = _block_rows(row_hi - first)
            share = block - 1
            block_prefetch = 0
            if prefetch_address != 0 and 0 <= share < PREFETCH_SHARES:
                block_prefetch = prefetch_address + share * share_bytes
            if first + count < row_hi:
                next_count = _block_rows(row_hi - first - count)
                _prefetch_out_block(out, out_rows, first + count, next_count, out_col + col, n_cols)
            elif col + width < col_hi:
                _prefetch_out_block(out, out_rows, row_lo, _block_rows(n_rows),
                                    out_col + col + width, min(width, col_hi - col - width))
            register_block(count, a, a_rows, out_rows, first, panel, panels_first_k, k_lo, k_hi,
                           out_col + col, n_cols, out, accumulate, block_prefetch)
            first += count


@njit(inline="always")
def row_address(matrix, row):
    """Byte address of ``matrix[row, 0]``, as an int64."""
    return np.int64(matrix.ctypes.data) + row * matrix.strides[0]


def panel_shape(b_shape, dtype):
    """Shape of the packed form of a (K, N) matrix of ``dtype``: (ceil(N / W), K, W)."""
    depth, n_cols = b_shape
    width = block_columns(np.dtype(dtype))
    return ((n_cols + width - 1) // width, depth, width)


#: Panels one task of :func:`pack_gate_panels` packs: a run of columns, whose
#: pieces of each row of b are long enough to read well (512 bytes in f32).
PACK_RUN_PANELS = 2
#: Rows of b one packing task copies: its slice of b stays in cache while
#: each panel's part of it is written.
PACK_ROWS = 64


@njit(inline="always")
def copy_into(source, destination):
    """``destination[:n] = source`` for 1-D arrays, n = len(source), as a loop
    from 0 that LLVM vectorizes (see :func:`add_into`); Numba's slice
    assignment also checks for overlap and may allocate a temporary."""
    for j in range(source.shape[0]):
        destination[j] = source[j]


@intrinsic
def _stream_line(typingctx, source, destination):
    """Copy the CACHE_LINE_BYTES bytes at byte address ``source`` to
    ``destination``, a line boundary, with a non-temporal store: the line is
    written to memory without first being read into the cache."""
    if not all(isinstance(arg, types.Integer) for arg in (source, destination)):
        return None

    def codegen(context, builder, signature, args):
        word = ir.IntType(64)
        line = ir.VectorType(word, CACHE_LINE_BYTES // (word.width // BITS_PER_BYTE))
        source_pointer, destination_pointer = (
            builder.inttoptr(context.cast(builder, value, value_type, types.int64),
                             line.as_pointer())
            for value, value_type in zip(args, signature.args))
        value = builder.load(source_pointer, align=1)
        store = builder.store(value, destination_pointer, align=CACHE_LINE_BYTES)
        store.set_metadata("nontemporal",
                           builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.void(source, destination), codegen


@njit(inline="always")
def stream_into(source, destination):
    """``destination[:n] = source`` for 1-D arrays, n = len(source): with
    non-temporal stores where ``destination`` is whole cache lines (its
    first byte on a line boundary, n values a whole number of lines) and
    both are contiguous; with :func:`copy_into` otherwise.

    For outputs that nothing reads again soon: an ordinary store first reads
    its line into the cache, a non-temporal one does not. The writing thread
    must fence (:func:`.sync.store_fence`) before another thread may rely on
    seeing the values. Measured on a 2-core AVX-512 machine, backward time
    loops alone, the gate gradients streamed against stored: f64 H=256 B=8
    1.19x, B=128 1.11x, H=512 B=128 1.07x, H=1024 B=128 1.045x; f32 H=512
    B=8 1.14x, B=128 1.026x, H=128 B=128 1.025x; f64 H=1024 B=1 1.00x.
    A version that also streamed the whole lines after a partial first one
    kept a third of the gain at f64 H=512 B=128 (1.02x).
    """
    itemsize = destination.itemsize
    start = np.int64(destination.ctypes.data)
    n_bytes = source.shape[0] * itemsize
    if (start % CACHE_LINE_BYTES != 0 or n_bytes % CACHE_LINE_BYTES != 0
            or source.strides[0] != itemsize or destination.strides[0] != itemsize):
        copy_into(source, destination)
        return
    source_start = np.int64(source.ctypes.data)
    for offset in range(0, n_bytes, CACHE_LINE_BYTES):
        _stream_line(source_start + offset, start + offset)


@njit(inline="always")
def _pack_block(matrix, transposed, col_offset, n_cols, panels, block, k_lo, k_hi,
                panel_first_k):
    """Rows [k_lo, k_hi) of panel ``block`` of :func:`pack_panels`'s panels,
    written from panel row ``k_lo - panel_first_k`` on (0 packs them in place)."""
    width = panels.shape[2]
    col = col_offset + block * width
    n_valid = min(width, col_offset + n_cols - col)
    panel = panels[block]
    if transposed:
        # Whole squares in registers; the columns and rows they leave, one by one.
        edge = VECTOR_BYTES // panel.itemsize
        k_squared = k_lo + (k_hi - k_lo) // edge * edge
        j_squared = n_valid // edge * edge
        for k in range(k_lo, k_squared, edge):
            for j in range(0, j_squared, edge):
                transpose_square(matrix, col + j, k, panel, k - panel_first_k, j)
        for j in range(n_valid):
            k_first = k_squared if j < j_squared else k_lo
            copy_into(matrix[col + j, k_first:k_hi],
                      panel[k_first - panel_first_k:k_hi - panel_first_k, j])
    else:
        for k in range(k_lo, k_hi):
            copy_into(matrix[k, col:col + n_valid], panel[k - panel_first_k])
    _clear_columns_past(panel, n_valid, k_lo - panel_first_k, k_hi - panel_first_k)


@njit(inline="always")
def _clear_columns_past(panel, n_valid, row_lo, row_hi):
    """Zero columns [n_valid, W) of rows [row_lo, row_hi) of a (K, W) panel:
    those past the matrix's last column."""
    for k in range(row_lo, row_hi):
        for j in range(n_valid, panel.shape[1]):
            panel[k, j] = 0


@njit(inline="always")
def _pack_rows(matrix, col_offset, n_cols, panels, block_lo, block_hi, k_lo, k_hi):
    """Rows [k_lo, k_hi) of :func:`pack_panels`'s panels [block_lo, block_hi), not transposed."""
    for block in range(block_lo, block_hi):
        _pack_block(matrix, False, col_offset, n_cols, panels, block, k_lo, k_hi, 0)


@njit(parallel=True, cache=True)
def pack_panels(matrix, transposed, col_offset, n_cols, panels):
    """Pack columns [col_offset, col_offset + n_cols) of b into panels.

    b is ``matrix`` (K, N), or its transpose when ``transposed`` (matrix then
    (N, K)); matrix is C-contiguous either way, so the copy reads it along
    its rows. panels: (ceil(n_cols / W), K, W) out: column block j is
    ``panels[j]``, each row of it contiguous; columns past n_cols are zero.
    Parallel over chunks of PACK_ROWS values of k; when transposed, over the
    panels, so that each task reads whole rows of ``matrix`` (a few pages)
    rather than a strip of every row (every page of it, each chunk):
    transposed W_h packs 1.2-1.6x faster at H >= 512 (measured, 2 threads).
    """
    n_panels, depth, _ = panels.shape
    if transposed:
        for block in prange(n_panels):
            for k_lo in range(0, depth, PACK_ROWS):
                _pack_block(matrix, True, col_offset, n_cols, panels, block, k_lo,
                            min(k_lo + PACK_ROWS, depth), 0)
    else:
        for chunk in prange((depth + PACK_ROWS - 1) // PACK_ROWS):
            k_lo = chunk * PACK_ROWS
            _pack_rows(matrix, col_offset, n_cols, panels, 0, n_panels, k_lo,
                       min(k_lo + PACK_ROWS, depth))


@njit(inline="always")
def _copy_adding(source, destination, sums):
    """``destination[:n] = source`` and ``sums += source``, n = len(source), in
    one vectorizable loop: each value is added while it is in a register."""
    for j in range(source.shape[0]):
        value = source[j]
        destination[j] = value
        sums[j] += value


def chunk_sums_shape(n_rows, n_cols):
    """Shape of :func:`pack_panels_summing`'s ``chunk_sums`` for a (n_rows,
    n_cols) matrix: (ceil(n_rows / PACK_ROWS), n_cols)."""
    return (-(-n_rows // PACK_ROWS), n_cols)


@njit(parallel=True, cache=True)
def pack_panels_summing(matrix, panels, chunk_sums):
    """:func:`pack_panels` of all of ``matrix`` (not transposed), summing its
    columns on the way.

    matrix: (K, N) C-contiguous; panels: (ceil(N / W), K, W) out, as
    pack_panels writes them; chunk_sums: (ceil(K / PACK_ROWS), N) out
    (:func:`chunk_sums_shape`): row c the sum of rows [c * PACK_ROWS, (c + 1)
    * PACK_ROWS) of ``matrix``, added in order. Their column sums (in order,
    :func:`column_sums`) are the matrix's: the bias gradient comes from the
    pass that packs the gate gradients, each value added as it is copied,
    instead of from a pass of its own over all of them. Either way the order
    of the additions is fixed by the shapes, not by the thread count.
    Measured on a 2-core AVX-512 machine, packing and bias gradient together,
    against packing and then summing every row: f64 (12800 x 1024) 1.15x,
    (3200 x 2048) 1.06x, (12800 x 4096) 1.06x; f32 (12800 x 2048) 1.19x
    (0.3-3 ms a call; whole fwd+bwd calls gain less than their noise).
    """
    n_panels, depth, width = panels.shape
    n_cols = matrix.shape[1]
    for chunk in prange((depth + PACK_ROWS - 1) // PACK_ROWS):
        k_lo = chunk * PACK_ROWS
        k_hi = min(k_lo + PACK_ROWS, depth)
        sums = chunk_sums[chunk]
        for j in range(n_cols):
            sums[j] = 0
        for block in range(n_panels):
            col = block * width
            n_valid = min(width, n_cols - col)
            panel, block_sums = panels[block], sums[col:col + n_valid]
            for k in range(k_lo, k_hi):
                _copy_adding(matrix[k, col:col + n_valid], panel[k], block_sums)
            _clear_columns_past(panel, n_valid, k_lo, k_hi)


@njit(parallel=True, cache=True)
def pack_gate_panels(weights, panels):
    """Pack each group of columns of each direction's weights, in one parallel pass.

    weights: (D, K, G * N), C-contiguous; panels: (D, G, ceil(N / W), K, W)
    out: ``panels[d, g]`` is columns [g * N, (g + 1) * N) of weights[d] as
    packed by :func:`pack_panels`. W_h (D, H, 4H) packs gate by gate (G = 4,
    N = H) for the time loops; W_x (D, I, 4H) whole (G = 1, N = 4H) for the
    input projection. One call instead of D * G: at small sizes each
    parallel call's dispatch costs as much as its copying.

    A task copies PACK_ROWS rows of PACK_RUN_PANELS panels of one group, and
    the tasks run columns first: ``prange`` hands each thread a contiguous
    run of tasks, so a thread packs a run of columns of every group, the
    columns it reads first afterwards (its tiles of the projection, see
    :func:`matmul`; its units of the time loop). They are then in its own
    cache. Measured against tasks of whole rows (2 threads, interleaved
    forward calls): f32 B=1 H=256 1.03/1.04x, H=512 1.03/1.03x, H=256 B=8
    1.03x; f64 H=256 B=1 1.04x; 0.98-1.01x at larger B. One panel a task
    (256-byte pieces of each row) lost at H=512 B=1 (0.96x).
    """
    n_dirs, n_groups, n_panels, depth, _ = panels.shape
    group_width = weights.shape[2] // n_groups
    n_chunks = (depth + PACK_ROWS - 1) // PACK_ROWS
    n_runs = (n_panels + PACK_RUN_PANELS - 1) // PACK_RUN_PANELS
    per_dir = n_runs * n_groups * n_chunks
    for task in prange(n_dirs * per_dir):
        d, rest = task // per_dir, task % per_dir
        run, rest = rest // (n_groups * n_chunks), rest % (n_groups * n_chunks)
        group, k_lo = rest // n_chunks, (rest % n_chunks) * PACK_ROWS
        _pack_rows(weights[d], group * group_width, group_width, panels[d, group],
                   run * PACK_RUN_PANELS, min((run + 1) * PACK_RUN_PANELS, n_panels), k_lo,
                   min(k_lo + PACK_ROWS, depth))


#: Edge of the square blocks of :func:`transpose_into`: a block of the source
#: and of the destination both stay in L1 while it is copied. Whole blocks
#: are cut into :func:`transpose_square`'s squares.
TRANSPOSE_BLOCK = 32
assert TRANSPOSE_BLOCK % (VECTOR_BYTES // np.dtype(np.float32).itemsize) == 0, (
    "whole blocks hold whole squares")


@njit(parallel=True, cache=True)
def transpose_into(matrix, out):
    """``out[:] = matrix.T`` in cache-sized blocks, in parallel. matrix: (M, N); out: (N, M)."""
    n_rows, n_cols = matrix.shape
    n_col_blocks = (n_cols + TRANSPOSE_BLOCK - 1) // TRANSPOSE_BLOCK
    n_blocks = ((n_rows + TRANSPOSE_BLOCK - 1) // TRANSPOSE_BLOCK) * n_col_blocks
    for block in prange(n_blocks):
        row_lo = (block // n_col_blocks) * TRANSPOSE_BLOCK
        col_lo = (block % n_col_blocks) * TRANSPOSE_BLOCK
        row_hi = min(row_lo + TRANSPOSE_BLOCK, n_rows)
        col_hi = min(col_lo + TRANSPOSE_BLOCK, n_cols)
        if row_hi - row_lo == TRANSPOSE_BLOCK and col_hi - col_lo == TRANSPOSE_BLOCK:
            edge = VECTOR_BYTES // out.itemsize
            for row in range(row_lo, row_hi, edge):
                for col in range(col_lo, col_hi, edge):
                    transpose_square(matrix, row, col, out, col, row)
        else:
            for col in range(col_lo, col_hi):
                for row in range(row_lo, row_hi):
                    out[col, row] = matrix[row, col]


#: Alignment of every array the kernels write: a cache line, so no vector load
#: straddles two, and threads writing neighbouring tiles (of a row of y, of
#: the states, of the gates) never write into the same line. A 16-byte aligned
#: y and state ring cost the H=128, B=32 forward loop 13 % (measured).
ALIGNMENT = 64


def _aligned_buffer(n_bytes):
    """``(buffer, start)``: a uint8 buffer with room for ``n_bytes`` from
    ``start``, its first cache-line boundary."""
    buffer = np.empty(n_bytes + ALIGNMENT, np.uint8)
    return buffer, -buffer.__array_interface__["data"][0] % ALIGNMENT


def _carve(buffer, start, shape, dtype):
    """The C-contiguous ``shape`` array of ``dtype`` over ``buffer`` from ``start``."""
    n_bytes = math.prod(shape) * dtype.itemsize
    return buffer[start:start + n_bytes].view(dtype).reshape(shape)


#: Linux's ``madvise`` advice asking for transparent huge pages in a range.
MADV_HUGEPAGE = 14
#: Arrays from this size up are advised to use huge pages, as NumPy advises
#: its own allocations (its threshold too).
HUGE_PAGE_MIN_BYTES = 4 * 2 ** 20
#: ...and only up to this size. The largest arrays the drivers return, the
#: saved gates of a training pass (T * B * 4H values), ran slower in huge
#: pages: their first touch is faster, but the time loop that then reads and
#: writes them was slower by more (f32 H=1024 B=128: loop 573 ms against 460
#: ms in 4 KiB pages, projection 347 against 368 ms). Measured on a 2-core
#: AVX-512 KVM guest, whole fwd+bwd calls interleaved, without the advice
#: against with it: gates of 210 MB (f32 H=1024 B=128, f64 H=512 B=128)
#: 1.10-1.17x, 420 MB (f64 H=1024 B=128) 1.13x; of 52 MB 0.95-1.00x (f32
#: H=256 B=128, f64 H=512 B=32, H=256 B=128), 26 MB (f64 H=1024 B=8)
#: 0.94-0.98x. The cause was not found; the cap sits between the sizes
#: measured on either side.
HUGE_PAGE_MAX_BYTES = 128 * 2 ** 20
#: Bytes of a base page, the granularity ``madvise`` takes.
PAGE_BYTES = 4096
#: Only Linux knows MADV_HUGEPAGE; elsewhere large arrays stay as allocated.
_CAN_ADVISE_HUGE_PAGES = sys.platform.startswith("linux")


@intrinsic
def _madvise(typingctx, address, length, advice):
    """``madvise(address, length, advice)`` from the C library; returns its int32
    status. Where the C library has no ``madvise`` (not Linux), it is never
    declared: the call is 0."""
    if not all(isinstance(arg, types.Integer) for arg in (address, length, advice)):
        return None

    def codegen(context, builder, signature, args):
        if not _CAN_ADVISE_HUGE_PAGES:
            return ir.Constant(ir.IntType(32), 0)
        byte_ptr = ir.IntType(8).as_pointer()
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.IntType(32), [byte_ptr, ir.IntType(64),
                                                             ir.IntType(32)]), "madvise")
        pointer = builder.inttoptr(context.cast(builder, args[0], signature.args[0], types.int64),
                                   byte_ptr)
        size = context.cast(builder, args[1], signature.args[1], types.int64)
        flag = context.cast(builder, args[2], signature.args[2], types.int32)
        return builder.call(function, [pointer, size, flag])

    return types.int32(address, length, advice), codegen


@njit(inline="always")
def _advise_huge_pages(address, n_bytes):
    """Ask Linux to back the whole pages of [address, address + n_bytes) with
    huge pages, before they are first touched.

    A large array allocated in compiled code comes from ``malloc``, so each
    4 KiB page costs a page fault on first touch; NumPy advises huge pages for
    its own large arrays, and compiled code did not. Measured on a 2-core
    machine: touching a fresh 210 MB array took 88 ms from compiled code and
    28 ms from NumPy. Only arrays of HUGE_PAGE_MIN_BYTES to
    HUGE_PAGE_MAX_BYTES are advised (see there). A failed advice (huge pages
    off) changes nothing, and off Linux :func:`_madvise` is no call at all.
    """
    if HUGE_PAGE_MIN_BYTES <= n_bytes <= HUGE_PAGE_MAX_BYTES:
        first = (address + PAGE_BYTES - 1) // PAGE_BYTES * PAGE_BYTES
        last = (address + n_bytes) // PAGE_BYTES * PAGE_BYTES
        _madvise(first, last - first, MADV_HUGEPAGE)


@njit(inline="always")
def aligned_like(like, shape):
    """An uninitialized C-contiguous array of ``shape`` (a tuple of one
    integer type) and of ``like``'s dtype, starting on a cache line, in huge
    pages when it is large, up to a limit (:func:`_advise_huge_pages`); for
    compiled code, which allocates every array the CPU drivers return."""
    n_items = 1
    for extent in shape:
        n_items *= extent
    buffer = np.empty(n_items + ALIGNMENT // like.itemsize, like.dtype)
    _advise_huge_pages(buffer.ctypes.data, buffer.nbytes)
    start = (-buffer.ctypes.data % ALIGNMENT) // like.itemsize
    return buffer[start:start + n_items].reshape(shape)


@njit(cache=True)
def _aligned_bytes(n_bytes):
    """(n_bytes,) uint8 from :func:`aligned_like`."""
    return aligned_like(np.empty(0, np.uint8), (n_bytes,))


def aligned_empty(shape, dtype):
    """An uninitialized C-contiguous array of ``shape`` and ``dtype``, allocated
    as :func:`aligned_like` allocates in compiled code (a cache-line start,
    huge pages within limits), for allocators in Python: the fresh memory of
    the API's recycling pool, whose arrays the CPU drivers write."""
    dtype = np.dtype(dtype)
    return _aligned_bytes(math.prod(shape) * dtype.itemsize).view(dtype).reshape(shape)


class Workspace(threading.local):
    """Cache-line aligned buffers for the CPU drivers' temporaries, kept per thread.

    A fresh buffer of several MB costs a page fault per 4 KiB on first touch,
    which on small machines and VMs can take longer than the product that
    fills it; so packed weights, transposes and gradient scratch are carved
    from buffers that live from one call to the next, one per name, grown to
    the largest size asked. Nothing carved from it ever reaches a caller.

    A name asked again with the same shape and dtype gets the same array
    object back: repeated calls of one size then cost a dictionary lookup,
    not a carving, which matters because the Python between two calls runs
    slowly, right after a parallel kernel has evicted it from the caches.
    """

    def __init__(self):
        #: name -> (uint8 buffer, offset of its first cache-line boundary)
        self._buffers = {}
        #: name -> (shape, dtype, the array last carved under that name)
        self._last = {}

    def empty(self, name, shape, dtype):
        """An uninitialized aligned array of ``shape``, valid until ``name`` is asked again."""
        last = self._last.get(name)
        if last is not None and last[0] == shape and last[1] == dtype:
            return last[2]
        dtype = np.dtype(dtype)
        n_bytes = math.prod(shape) * dtype.itemsize
        entry = self._buffers.get(name)
        if entry is None or entry[0].nbytes < n_bytes + ALIGNMENT:
            entry = self._buffers[name] = _aligned_buffer(n_bytes)
        array = _carve(*entry, shape, dtype)
        self._last[name] = (shape, dtype, array)
        return array

    def clear(self):
        """Release this thread's buffers."""
        self._buffers.clear()
        self._last.clear()

    @property
    def n_bytes(self):
        """Bytes this thread's buffers hold."""
        return sum(buffer.nbytes for buffer, _ in self._buffers.values())


#: The CPU drivers' temporaries (see :class:`Workspace`).
WORKSPACE = Workspace()


def empty_panels(shape, dtype, name):
    """Aligned room for packed panels of ``shape``, from the workspace under ``name``."""
    return WORKSPACE.empty(name, shape, dtype)


#: Largest tile of the parallel product, in rows of ``out`` by columns; each
#: tile is one task, and its slice of ``a`` stays in the core's cache while the
#: columns run. Tiles are evened out below these sizes (:func:`_even_tile`).
TILE_ROWS = 96
TILE_COLS = 256
#: Depth of one pass over a tile: each register block runs this many values
#: of k between a load and a store of its sums in ``out``, over a (depth x
#: block columns) panel chunk of ``b`` that the tile's row blocks read from
#: L2 (64 KiB at 256, past a 48 KiB L1 already). Measured on a 2-core
#: AVX-512 machine, products alone, 512 against 256: f64 (12800 x 1024) @
#: (1024 x 4096) 1.042x twice, (12800 x 4096) @ (4096 x 1024) 1.043x /
#: 1.056x, (512 x 12800) @ (12800 x 2048) 1.049x / 1.042x, (3200 x 512) @
#: (512 x 2048) 1.026x; f32 1.014x / 1.022x, 1.069x / 1.073x, 1.054x /
#: 1.068x, 0.995x. 768 and 1024 gained no more (0.96-1.00x of 512 in f64,
#: 0.99-1.02x in f32).
TILE_DEPTH = 512
#: Tile height when a tile's columns of ``b`` over all of k (depth x
#: TILE_COLS) exceed TALL_TILE_B_BYTES, as in the weight gradients (k = T*B):
#: they stream from memory once per row tile, so taller tiles stream them
#: fewer times. Measured (f32, 2 threads, H=512 B=128): the (512 x 12800) @
#: (12800 x 2048) products went from 292-309 to 331-338 GFLOP/s; the
#: projection, whose b fits the cache, lost 5 % with tall tiles.
TALL_TILE_ROWS = 192
TALL_TILE_B_BYTES = 2 ** 20


@njit(inline="always")
def _even_tile(extent, largest, multiple):
    """Edge of the tiles that cut ``extent`` into as few pieces of at most
    ``largest`` as possible, all about equal, rounded up to ``multiple``: 100
    rows in tiles of at most 96 are two tiles of 54 and 46, not 96 and 4, so
    the threads get equal work."""
    n_pieces = max(1, (extent + largest - 1) // largest)
    even = (extent + n_pieces - 1) // n_pieces
    return max(multiple, (even + multiple - 1) // multiple * multiple)


@njit(inline="always")
def add_into(source, destination):
    """``destination += source`` for 1-D arrays of one length, as a loop from 0
    that LLVM vectorizes. The slice expression ``out[r, a:b] += bias[a:b]``
    and a loop over ``j`` in [a, b) both compile to scalar code (an index
    that may be negative keeps its wraparound branch): a fifth of the time
    of a K=128 product (measured)."""
    for j in range(source.shape[0]):
        destination[j] += source[j]


@njit(inline="always")
def product_in_depth_passes(a, rows, row_lo, row_hi, panels, col_lo, col_hi, out, accumulate,
                            bias, prefetch):
    """``out[r, col_lo:col_hi] (+)= a[r] @ b[:, col_lo:col_hi] (+ bias[col_lo:col_hi])``
    for r in ``rows[row_lo:row_hi]``: one tile of :func:`matmul`, whose
    shapes it takes, over all of k in passes of TILE_DEPTH (each pass's sum
    added onto the last), the bias added once the product is complete.
    Every caller that sums this way gets the bits :func:`matmul` gets.
    prefetch: :func:`product_tile`'s; the last panel of a pass prefetches
    the first panel's rows of the next pass."""
    depth = a.shape[1]
    for k_lo in range(0, max(depth, 1), TILE_DEPTH):
        k_hi = min(k_lo + TILE_DEPTH, depth)
        following = row_address(panels[col_lo // panels.shape[2]], k_hi) if k_hi < depth else 0
        product_tile(a, rows, rows, row_lo, row_hi, panels, k_lo, k_hi, col_lo, col_hi, out, 0,
                     accumulate or k_lo > 0, 0, prefetch, following)
    if bias.shape[0] > 0:
        tile_bias = bias[col_lo:col_hi]
        for n in range(row_lo, row_hi):
            add_into(tile_bias, out[rows[n], col_lo:col_hi])


@njit(parallel=True, cache=True)
def matmul(a, panels, rows, out, accumulate, bias):
    """``out[r] (+)= a[r] @ b (+ bias)`` for r in ``rows``, in parallel tiles.

    a: (R, K); panels: b (K, N) packed by :func:`pack_panels`; rows: (M,) int64;
    out: (R, N), rows contiguous, other rows untouched; bias: (N,), or (0,)
    for none, added to each row once its product is complete. Each element
    sums over k in increasing order, whatever the tiling or thread count.

    The row blocks after a panel's first prefetch the next panel's depth
    chunk (:func:`product_tile`'s ``prefetch``), and those of the tile's last
    panel the first one's next chunk, so that each panel chunk is in L2
    before its first block runs. Measured on a 2-core AVX-512 machine,
    products alone, against no prefetch: f32 (12800 x 1024) @ (1024 x 4096)
    1.065x, (12800 x 4096) @ (4096 x 1024) 1.085x, (1024 x 12800) @ (12800 x
    4096) 1.107x, 800 and 3200 rows 1.02-1.05x; f64 1.05-1.07x on the same
    shapes; f32 at H=256 (W_x 1 MiB, in L2) 0.99-1.01x.
    """
    n_rows, n_cols, depth = rows.shape[0], out.shape[1], a.shape[1]
    tall = depth * TILE_COLS * out.itemsize > TALL_TILE_B_BYTES
    tile_rows = _even_tile(n_rows, TALL_TILE_ROWS if tall else TILE_ROWS, BLOCK_ROWS)
    tile_cols = _even_tile(n_cols, TILE_COLS, panels.shape[2])
    n_row_tiles = (n_rows + tile_rows - 1) // tile_rows
    n_col_tiles = (n_cols + tile_cols - 1) // tile_cols
    # prange hands each thread a contiguous run of tiles. Where b is the
    # larger operand, the run goes down columns (row tiles vary fastest):
    # each thread then reads only its columns' panels instead of every
    # panel. Measured (f32, 2 threads, interleaved forward calls): the
    # projection's W_x at B=1 H=256/512 1.02-1.07x, H=512 B=8 1.03-1.07x,
    # H=1024 B=8 1.10x. Also where a column strip of b over all of k is
    # larger than the cache ("tall"), although the strip is then read again
    # for each row tile: products alone, f64 I=H=1024, the projection at
    # B=8/32 1.06-1.10x, dx at B=8 1.09x, the weight gradients 1.02-1.16x
    # (f32 1.00-1.05x, but 0.91x at H=256 B=32); whole calls f64 forward
    # H=1024 B=8/32 1.025/1.031x, fwd+bwd H=512 B=32 1.021x, H=1024 B=8
    # 0.989x; f32 fwd+bwd 1.00-1.015x.
    rows_fastest = n_rows < n_cols
    for tile in prange(n_row_tiles * n_col_tiles):
        if rows_fastest:
            row_lo = (tile % n_row_tiles) * tile_rows
            col_lo = (tile // n_row_tiles) * tile_cols
        else:
            row_lo = (tile // n_col_tiles) * tile_rows
            col_lo = (tile % n_col_tiles) * tile_cols
        row_hi, col_hi = min(row_lo + tile_rows, n_rows), min(col_lo + tile_cols, n_cols)
        product_in_depth_passes(a, rows, row_lo, row_hi, panels, col_lo, col_hi, out, accumulate,
                                bias, True)


#: Most bytes of a's rows per value of k (rows x itemsize) for which a
#: product packs b as it goes (:func:`matmul_packing`): all the rows run over
#: each packed chunk of b, so the chunk of a they read (TILE_DEPTH times
#: this, 512 KiB) must stay in the core's cache while the worker's column
#: tiles run. Up to 256 rows in float32 and 128 in float64: the input
#: projection at T=100, B=1 (and B=2 in float32). Measured on a 2-core
#: AVX-512 machine, the projection with its packing, T=100, I=H=1024:
#: 1.17-1.59x at B=1 and 1.66x at B=2 (noisy host), 0.98x at B=8 (float32,
#: 800 rows, above this limit). The packing product over 100 rows at depth
#: 512 against 256: f32 0.99-1.02x, f64 0.97-1.01x.
PACKING_MAX_ROW_BYTES = 2 ** 10


@njit(inline="always")
def packs_as_it_goes(n_rows, itemsize):
    """Whether a product over ``n_rows`` rows of a packs b as it goes
    (:func:`matmul_packing`) rather than reading b packed beforehand."""
    return n_rows * itemsize <= PACKING_MAX_ROW_BYTES


def packing_scratch_shape(n_workers, dtype):
    """Shape of :func:`matmul_packing`'s scratch for ``n_workers`` workers:
    (workers, TILE_COLS / W, TILE_DEPTH, W), one tile's chunk of packed b each."""
    width = block_columns(np.dtype(dtype))
    return (n_workers, -(-TILE_COLS // width), TILE_DEPTH, width)


@njit(parallel=True, cache=True)
def matmul_packing(a, matrix, transposed, rows, out, accumulate, bias, scratch):
    """``out[r] (+)= a[r] @ b (+ bias)`` for r in ``rows``, packing b as it goes.

    a: (R, K); b: ``matrix`` (K, N), or its transpose when ``transposed``
    (matrix then (N, K)), C-contiguous either way and not packed; rows: (M,)
    int64; out: (R, N), rows contiguous, other rows untouched; bias: (N,), or
    (0,) for none; scratch: (workers, P, TILE_DEPTH, W), P * W >= TILE_COLS
    (:func:`packing_scratch_shape`).

    Each worker takes a contiguous run of column tiles and, for each, packs
    TILE_DEPTH rows of the tile's columns of b at a time into its own
    scratch, in its core's cache, and runs all the rows of a over them; b is
    read once, and never written packed to memory and read back, as packing
    it for :func:`matmul` does. For products of few rows (the input
    projection and dx at small batches, :func:`packs_as_it_goes`), whose
    time that traffic dominates. Each element sums over k in the order :func:`matmul`
    uses, whatever the thread count.
    """
    n_rows, n_cols, depth = rows.shape[0], out.shape[1], a.shape[1]
    n_workers, max_panels, _, width = scratch.shape
    tile_cols = _even_tile(n_cols, min(max_panels * width, -(-n_cols // n_workers)), width)
    n_tiles = (n_cols + tile_cols - 1) // tile_cols
    for worker in prange(n_workers):
        panels = scratch[worker]
        for tile in range(worker * n_tiles // n_workers, (worker + 1) * n_tiles // n_workers):
            col_lo = tile * tile_cols
            col_hi = min(col_lo + tile_cols, n_cols)
            n_panels = (col_hi - col_lo + width - 1) // width
            for k_lo in range(0, max(depth, 1), TILE_DEPTH):
                k_hi = min(k_lo + TILE_DEPTH, depth)
                for block in range(n_panels):
                    _pack_block(matrix, transposed, col_lo, col_hi - col_lo, panels, block, k_lo,
                                k_hi, k_lo)
                product_tile(a, rows, rows, 0, n_rows, panels, k_lo, k_hi, 0, col_hi - col_lo,
                             out, col_lo, accumulate or k_lo > 0, k_lo)
            if bias.shape[0] > 0:
                tile_bias = bias[col_lo:col_hi]
                for n in range(n_rows):
                    add_into(tile_bias, out[rows[n], col_lo:col_hi])


#: Columns one task of :func:`column_sums` adds up: its slice of the sums stays
#: in L1 while the rows stream past.
SUM_COLUMNS = 256


@njit(parallel=True, cache=True)
def column_sums(matrices, out):
    """``out[d] = matrices[d].sum(axis=0)``, in parallel over slices of columns.

    matrices: (D, R, N), rows contiguous; out: (D, N). Each sum adds the rows
    in order, so the result does not depend on the thread count (NumPy's sum
    of the bias gradient ran on one thread: 15 ms of a 2 s fwd+bwd at H=1024,
    B=128).
    """
    n_dirs, n_rows, n_cols = matrices.shape
    n_slices = (n_cols + SUM_COLUMNS - 1) // SUM_COLUMNS
    for task in prange(n_dirs * n_slices):
        d, col_lo = task // n_slices, (task % n_slices) * SUM_COLUMNS
        col_hi = min(col_lo + SUM_COLUMNS, n_cols)
        sums = out[d, col_lo:col_hi]
        for j in range(col_hi - col_lo):
            sums[j] = 0
        for row in range(n_rows):
            add_into(matrices[d, row, col_lo:col_hi], sums)
