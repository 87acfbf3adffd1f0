"""CUDA kernels and their thin launchers.

Same shape of work as the CPU drivers: the input projection is one GEMM before
the time loop; each step is one recurrent GEMM plus one fused pointwise kernel
(the cell math from :mod:`.cell`, compiled for the GPU); the weight, bias and
input gradients are GEMMs and a two-pass column reduction after the loop. No
atomics anywhere: every output element is written by one thread summing in a
fixed order, so reruns are bit-identical.

Every launch goes to the caller's stream; nothing here synchronises with the
host. Launch sizes come from :class:`LaunchConfig`, derived from the device's
properties (with small fallbacks under the simulator). Each time loop
configures its per-step launches once, before the loop: launching from
Python costs tens of microseconds per kernel, which at small sizes is most
of a step.

All arrays are Numba device arrays (or the simulator's); the callers in
``nblstm`` validate and allocate.
"""
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numba import config, cuda, njit, types
from numba.np.numpy_support import from_dtype

from .cell import N_GATES, cell_backward, cell_forward, step_time

if config.ENABLE_CUDASIM:
    def grid_sync():
        """Wait for every thread of the grid. The simulator runs cooperative grids
        of one block only, where the block's barrier is the grid's."""
        cuda.syncthreads()
else:
    try:
        from numba.cuda.cg import _grid_group_sync, _this_grid
    except ImportError:  # a numba-cuda without them runs the stepwise loops
        _grid_group_sync = _this_grid = None

    @njit(inline="always")
    def grid_sync():
        """Wait for every thread of the grid (the kernel then launches cooperatively).

        Cooperative groups' ``this_grid().sync()`` through its intrinsics: the
        public overloads compile as device functions, which numba-cuda 0.30
        cannot build without a driver, so ``compile_ptx`` would fail on them.
        """
        _grid_group_sync(_this_grid())

#: Rows summed by one thread in the first pass of the column reduction.
REDUCE_ROWS = 64
#: Fallback launch sizes under the simulator, whose device has no properties
#: and which runs every thread as a Python thread.
SIMULATOR_TILE = 4
SIMULATOR_BLOCK = 32
SIMULATOR_LANES = 4
SIMULATOR_SLICES = 2
#: The persistent loops (:func:`make_recurrent_forward_kernel`,
#: :func:`make_recurrent_backward_kernel`): batch rows per work item (one pass
#: over W_h serves all of them) and slices of the recurrent product's depth per
#: block (one warp each on a GPU).
LOOP_ROWS = 4
LOOP_SLICES = 8
#: The persistent loops read all of W_h once per LOOP_ROWS rows and step, from
#: L2. Above this many bytes a step, the stepwise loops (a tiled GEMM per step)
#: are faster. Measured on an H100 (bench/RESULTS.md): 32-64 MiB a step, the
#: persistent loops are 1.3-4x faster; 256 MiB (H=1024, B=64), 0.74-0.99x.
PERSISTENT_MAX_STEP_BYTES = 128 * 2 ** 20
#: Blocks are sized to a quarter of the device's thread limit, so several
#: blocks can share a multiprocessor.
BLOCKS_PER_LIMIT = 4
#: Threads per block for elementwise kernels, in warps.
POINTWISE_WARPS = 8
#: numba-cuda's warning for grids of fewer than 128 blocks. The step kernels
#: run B*H threads, a few blocks at small B, by design; the warning would
#: come at every configured launch. The message may start with terminal
#: highlighting, hence the leading ``.*``.
SMALL_GRID_WARNING = r".*Grid size \d+ will likely result in GPU under-utilization"


@dataclass(frozen=True)
class LaunchConfig:
    """Launch sizes for one device.

    gemm_tile: edge of the square GEMM tile; GEMM blocks are (tile, tile).
    pointwise_block: threads per block of the elementwise kernels.
    loop_lanes, loop_slices: the persistent loop's blocks are (lanes * slices)
    threads: ``lanes`` consecutive hidden units, each summed over ``slices``
    interleaved slices of the depth (a warp per slice on a GPU).
    """

    gemm_tile: int
    pointwise_block: int
    loop_lanes: int
    loop_slices: int

    @property
    def loop_threads(self):
        """Threads per block of the persistent loops."""
        return self.loop_lanes * self.loop_slices


@lru_cache(maxsize=None)
def _config_for(device_id):
    if config.ENABLE_CUDASIM:
        return LaunchConfig(SIMULATOR_TILE, SIMULATOR_BLOCK, SIMULATOR_LANES, SIMULATOR_SLICES)
    device = cuda.get_current_device()
    max_threads = device.MAX_THREADS_PER_BLOCK
    shared_bytes = device.MAX_SHARED_MEMORY_PER_BLOCK
    tile = 1
    while ((2 * tile) ** 2 <= max_threads // BLOCKS_PER_LIMIT
           and 2 * (2 * tile) ** 2 * 8 <= shared_bytes):
        tile *= 2
    return LaunchConfig(tile, min(max_threads, POINTWISE_WARPS * device.WARP_SIZE),
                        device.WARP_SIZE, LOOP_SLICES)


def launch_config():
    """The :class:`LaunchConfig` of the current device."""
    device_id = 0 if config.ENABLE_CUDASIM else cuda.get_current_device().id
    return _config_for(device_id)


def _blocks(count, per_block):
    return (count + per_block - 1) // per_block


def make_gemm_kernel(dtype, tile):
    """The tiled GEMM kernel (plain Python) for one NumPy dtype and tile edge.

    ``gemm(a, b, c, trans_a, trans_b, accumulate)`` computes
    ``c (M, N) = [c +] op(a) (M, K) @ op(b) (K, N)`` where ``op`` transposes
    when the flag is set (a: (K, M) or b: (N, K) then). Launch with blocks of
    (tile, tile) threads over a grid of (ceil(N / tile), ceil(M / tile)).
    Loads are coalesced in both orientations; each thread sums its element
    over k in increasing order.
    """
    element = from_dtype(dtype)

    def gemm(a, b, c, trans_a, trans_b, accumulate):
        a_tile = cuda.shared.array((tile, tile), element)
        b_tile = cuda.shared.array((tile, tile), element)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        row_base = cuda.blockIdx.y * tile
        col_base = cuda.blockIdx.x * tile
        rows, cols = c.shape
        depth = a.shape[0] if trans_a else a.shape[1]
        zero = element(0)
        total = zero
        for k_base in range(0, depth, tile):
            # a_tile[i, kk] = op(a)[row_base + i, k_base + kk]
            if trans_a:
                k, row = k_base + ty, row_base + tx
                a_tile[tx, ty] = a[k, row] if k < depth and row < rows else zero
            else:
                k, row = k_base + tx, row_base + ty
                a_tile[ty, tx] = a[row, k] if k < depth and row < rows else zero
            # b_tile[kk, j] = op(b)[k_base + kk, col_base + j]
            if trans_b:
                k, col = k_base + tx, col_base + ty
                b_tile[tx, ty] = b[col, k] if k < depth and col < cols else zero
            else:
                k, col = k_base + ty, col_base + tx
                b_tile[ty, tx] = b[k, col] if k < depth and col < cols else zero
            cuda.syncthreads()
            for kk in range(tile):
                total += a_tile[ty, kk] * b_tile[kk, tx]
            cuda.syncthreads()
        row = row_base + ty
        col = col_base + tx
        if row < rows and col < cols:
            c[row, col] = c[row, col] + total if accumulate else total

    return gemm


def add_bias_kernel(z, b):
    """z: (R, 4H) += b: (4H,) broadcast over rows."""
    index = cuda.grid(1)
    cols = z.shape[1]
    if index < z.shape[0] * cols:
        z[index // cols, index % cols] += b[index % cols]


def cell_forward_kernel(gates, z, h_prev, c_prev, lengths, step, reverse, y, y_offset,
                        h_next, c_next, hidden_states, cell_states, save):
    """One step's cell math for every (row, unit) of one direction.

    gates: (T, B, 4H) in: input projections by time; out: post-activation gates
    z: (B, 4H) the step's recurrent products; h_prev, c_prev: (B, H)
    lengths: (B,) int64; rows with ``step >= lengths[b]`` are left alone
    y: (T, B, D*H) out, this direction's columns start at ``y_offset``
    h_next, c_next: (B, H) out
    hidden_states, cell_states: (T+1, B, H) out when ``save``: the state entering each time
    """
    index = cuda.grid(1)
    batch, hidden = c_prev.shape
    if index < batch * hidden:
        r = index // hidden
        u = index % hidden
        if step < lengths[r]:
            t = step_time(step, lengths[r], reverse)
            i, f, g, o, c, h = cell_forward(
                gates[t, r, u] + z[r, u], gates[t, r, hidden + u] + z[r, hidden + u],
                gates[t, r, 2 * hidden + u] + z[r, 2 * hidden + u],
                gates[t, r, 3 * hidden + u] + z[r, 3 * hidden + u], c_prev[r, u])
            if save:
                hidden_states[t, r, u] = h_prev[r, u]
                cell_states[t, r, u] = c_prev[r, u]
            gates[t, r, u] = i
            gates[t, r, hidden + u] = f
            gates[t, r, 2 * hidden + u] = g
            gates[t, r, 3 * hidden + u] = o
            c_next[r, u] = c
            h_next[r, u] = h
            y[t, r, y_offset + u] = h


@njit(inline="always")
def _work_items(hidden, batch, lanes):
    """``(groups, items)`` of a persistent loop: ``groups`` runs of ``lanes``
    consecutive units; an item is one group for LOOP_ROWS batch rows."""
    n_groups = (hidden + lanes - 1) // lanes
    return n_groups, n_groups * ((batch + LOOP_ROWS - 1) // LOOP_ROWS)


@njit(inline="always")
def _item_origin(item, n_groups, lanes, lane):
    """``(unit, first row)`` of work item ``item`` for lane ``lane``."""
    return (item % n_groups) * lanes + lane, (item // n_groups) * LOOP_ROWS


def make_recurrent_forward_kernel(dtype, lanes, slices):
    """The persistent forward time loop (plain Python) for one dtype and block shape.

    ``recurrent_forward(gates, w_h, h_ring, c_ring, lengths, reverse, y, y_offset,
    hidden_states, cell_states, save)`` runs every step of one direction in one
    cooperative launch, with a grid-wide barrier between steps; arguments as
    :func:`cell_forward_kernel`'s, with h_ring, c_ring: (2, B, H), slot 0 holding
    h0/c0, and row b's final state in slot ``lengths[b] % 2`` on exit.

    A work item is ``lanes`` consecutive units for LOOP_ROWS rows. Blocks are
    ``lanes * slices`` threads: thread (slice, lane) sums its unit's four gates
    over k = slice, slice + slices, ..., reading one row of W_h's gate columns
    for all the item's rows at once (the lanes read consecutive addresses). The
    slices' partial sums meet in shared memory, where the first slice adds them,
    in slice order, to the step's input projection, and applies the cell. Each
    output is summed by one thread in a fixed order: reruns are bit-identical.
    """
    element = from_dtype(dtype)
    rows = LOOP_ROWS

    def recurrent_forward(gates, w_h, h_ring, c_ring, lengths, reverse, y, y_offset,
                          hidden_states, cell_states, save):
        partial = cuda.shared.array((N_GATES, rows, slices, lanes), element)
        sums = cuda.local.array((N_GATES, rows), element)
        lane = cuda.threadIdx.x % lanes
        depth_slice = cuda.threadIdx.x // lanes
        steps, batch = gates.shape[0], gates.shape[1]
        hidden = w_h.shape[0]
        n_groups, n_items = _work_items(hidden, batch, lanes)
        zero = element(0)
        for step in range(steps):
            now = step % 2
            after = 1 - now
            for item in range(cuda.blockIdx.x, n_items, cuda.gridDim.x):
                unit, row_lo = _item_origin(item, n_groups, lanes, lane)
                for gate in range(N_GATES):
                    for row in range(rows):
                        sums[gate, row] = zero
                if unit < hidden:
                    for k in range(depth_slice, hidden, slices):
                        w_i = w_h[k, unit]
                        w_f = w_h[k, hidden + unit]
                        w_g = w_h[k, 2 * hidden + unit]
                        w_o = w_h[k, 3 * hidden + unit]
                        for row in range(rows):
                            h_k = h_ring[now, min(row_lo + row, batch - 1), k]
                            sums[0, row] += h_k * w_i
                            sums[1, row] += h_k * w_f
                            sums[2, row] += h_k * w_g
                            sums[3, row] += h_k * w_o
                for gate in range(N_GATES):
                    for row in range(rows):
                        partial[gate, row, depth_slice, lane] = sums[gate, row]
                cuda.syncthreads()
                if depth_slice == 0 and unit < hidden:
                    for row in range(rows):
                        r = row_lo + row
                        if r < batch and step < lengths[r]:
                            t = step_time(step, lengths[r], reverse)
                            for gate in range(N_GATES):
                                total = gates[t, r, gate * hidden + unit]
                                for part in range(slices):
                                    total += partial[gate, row, part, lane]
                                sums[gate, row] = total
                            i, f, g, o, c, h = cell_forward(sums[0, row], sums[1, row],
                                                            sums[2, row], sums[3, row],
                                                            c_ring[now, r, unit])
                            if save:
                                hidden_states[t, r, unit] = h_ring[now, r, unit]
                                cell_states[t, r, unit] = c_ring[now, r, unit]
                            gates[t, r, unit] = i
                            gates[t, r, hidden + unit] = f
                            gates[t, r, 2 * hidden + unit] = g
                            gates[t, r, 3 * hidden + unit] = o
                            c_ring[after, r, unit] = c
                            h_ring[after, r, unit] = h
                            y[t, r, y_offset + unit] = h
                cuda.syncthreads()
            grid_sync()

    return recurrent_forward


def make_recurrent_backward_kernel(dtype, lanes, slices):
    """The persistent backward time loop (plain Python) for one dtype and block shape.

    ``recurrent_backward(gates, cell_states, w_h_t, dz_ring, dh_n, dy, y_offset,
    has_dy, lengths, reverse, dc, d_gates)`` runs every step of one direction,
    last to first, in one cooperative launch with a grid-wide barrier between
    steps. Arguments as :func:`cell_backward_kernel`'s, and:

    w_h_t: (4H, H) W_h transposed, so that the lanes (consecutive units) read
    consecutive addresses
    dz_ring: (2, B, 4H) scratch: step s writes its pre-activation gradients to
    slot s % 2 and reads step s + 1's from the other; row b's at its first
    step (every row that runs at all) are in slot 0 on exit

    Work items and partial sums as in :func:`make_recurrent_forward_kernel`,
    over the 4H-deep product ``dz_{s+1} @ W_h.T`` that gives each unit's dh.
    """
    element = from_dtype(dtype)
    rows = LOOP_ROWS

    def recurrent_backward(gates, cell_states, w_h_t, dz_ring, dh_n, dy, y_offset, has_dy,
                           lengths, reverse, dc, d_gates):
        partial = cuda.shared.array((rows, slices, lanes), element)
        sums = cuda.local.array(rows, element)
        lane = cuda.threadIdx.x % lanes
        depth_slice = cuda.threadIdx.x // lanes
        steps, batch, four_hidden = gates.shape
        hidden = w_h_t.shape[1]
        n_groups, n_items = _work_items(hidden, batch, lanes)
        zero = element(0)
        for step in range(steps - 1, -1, -1):
            now = step % 2
            before = 1 - now
            for item in range(cuda.blockIdx.x, n_items, cuda.gridDim.x):
                unit, row_lo = _item_origin(item, n_groups, lanes, lane)
                for row in range(rows):
                    sums[row] = zero
                if unit < hidden and step + 1 < steps:
                    for j in range(depth_slice, four_hidden, slices):
                        w = w_h_t[j, unit]
                        for row in range(rows):
                            sums[row] += dz_ring[before, min(row_lo + row, batch - 1), j] * w
                for row in range(rows):
                    partial[row, depth_slice, lane] = sums[row]
                cuda.syncthreads()
                if depth_slice == 0 and unit < hidden:
                    for row in range(rows):
                        r = row_lo + row
                        if r < batch and step < lengths[r]:
                            t = step_time(step, lengths[r], reverse)
                            dh = dh_n[r, unit]
                            if step + 1 < lengths[r]:
                                dh = partial[row, 0, lane]
                                for part in range(1, slices):
                                    dh += partial[row, part, lane]
                            if has_dy:
                                dh += dy[t, r, y_offset + unit]
                            dz_i, dz_f, dz_g, dz_o, dc_prev = cell_backward(
                                gates[t, r, unit], gates[t, r, hidden + unit],
                                gates[t, r, 2 * hidden + unit], gates[t, r, 3 * hidden + unit],
                                cell_states[t, r, unit], dh, dc[r, unit])
                            d_gates[t, r, unit] = dz_i
                            d_gates[t, r, hidden + unit] = dz_f
                            d_gates[t, r, 2 * hidden + unit] = dz_g
                            d_gates[t, r, 3 * hidden + unit] = dz_o
                            dz_ring[now, r, unit] = dz_i
                            dz_ring[now, r, hidden + unit] = dz_f
                            dz_ring[now, r, 2 * hidden + unit] = dz_g
                            dz_ring[now, r, 3 * hidden + unit] = dz_o
                            dc[r, unit] = dc_prev
                cuda.syncthreads()
            grid_sync()

    return recurrent_backward


def final_state_kernel(ring, lengths, out):
    """out[b] = ring[lengths[b] % 2, b]: each row's state after its last valid step.

    ring: (2, B, H); lengths: (B,) int64; out: (B, H)
    """
    index = cuda.grid(1)
    batch, hidden = out.shape
    if index < batch * hidden:
        r = index // hidden
        out[r, index % hidden] = ring[lengths[r] % 2, r, index % hidden]


def clear_padding_kernel(values, lengths, steps):
    """values[t, b, :] = 0 for lengths[b] <= t < steps. values: (T', B, F)"""
    index = cuda.grid(1)
    _, batch, features = values.shape
    if index < steps * batch * features:
        t = index // (batch * features)
        r = (index // features) % batch
        if t >= lengths[r]:
            values[t, r, index % features] = 0


def cell_backward_kernel(gates, cell_states, dh_step, dh_n, dy, y_offset, has_dy, lengths, step,
                         reverse, dc, dz_step, d_gates):
    """One step of backpropagation through the cell math, one direction.

    gates: (T, B, 4H) saved post-activation gates; cell_states: (T+1, B, H) saved
    dh_step: (B, H) gradient reaching h from the step after (``dz_step @ W_h.T``)
    dh_n: (B, H) gradient reaching h at each row's last valid step
    dy: (T, B, D*H) upstream gradient of y (columns from ``y_offset``), read when has_dy
    dc: (B, H) in: gradient reaching c_t; out: gradient of c_{t-1}
    dz_step: (B, 4H) out: this step's pre-activation gradients by row
    d_gates: (T, B, 4H) out: the same by time
    """
    index = cuda.grid(1)
    batch, hidden = dc.shape
    if index < batch * hidden:
        r = index // hidden
        u = index % hidden
        if step < lengths[r]:
            t = step_time(step, lengths[r], reverse)
            dh = dh_step[r, u] if step + 1 < lengths[r] else dh_n[r, u]
            if has_dy:
                dh += dy[t, r, y_offset + u]
            dz_i, dz_f, dz_g, dz_o, dc_prev = cell_backward(
                gates[t, r, u], gates[t, r, hidden + u], gates[t, r, 2 * hidden + u],
                gates[t, r, 3 * hidden + u], cell_states[t, r, u], dh, dc[r, u])
            d_gates[t, r, u] = dz_step[r, u] = dz_i
            d_gates[t, r, hidden + u] = dz_step[r, hidden + u] = dz_f
            d_gates[t, r, 2 * hidden + u] = dz_step[r, 2 * hidden + u] = dz_g
            d_gates[t, r, 3 * hidden + u] = dz_step[r, 3 * hidden + u] = dz_o
            dc[r, u] = dc_prev


def multiply_kernel(values, factors):
    """values (R, N) *= factors (R, N)."""
    index = cuda.grid(1)
    cols = values.shape[1]
    if index < values.shape[0] * cols:
        values[index // cols, index % cols] *= factors[index // cols, index % cols]


def fill_lengths_kernel(lengths, value):
    """lengths (B,) = value."""
    index = cuda.grid(1)
    if index < lengths.shape[0]:
        lengths[index] = value


def select_rows_kernel(if_running, otherwise, lengths, out):
    """out[b] = if_running[b] when lengths[b] > 0, else otherwise[b]. All (B, H)."""
    index = cuda.grid(1)
    batch, hidden = out.shape
    if index < batch * hidden:
        r = index // hidden
        u = index % hidden
        out[r, u] = if_running[r, u] if lengths[r] > 0 else otherwise[r, u]


def column_partial_sums_kernel(values, partial):
    """partial[p, j] = sum of values[p*REDUCE_ROWS : (p+1)*REDUCE_ROWS, j], in row order.

    values: (R, N); partial: (ceil(R / REDUCE_ROWS), N)
    """
    index = cuda.grid(1)
    cols = values.shape[1]
    if index < partial.shape[0] * cols:
        part = index // cols
        col = index % cols
        total = values[part * REDUCE_ROWS, col]
        for row in range(part * REDUCE_ROWS + 1, min((part + 1) * REDUCE_ROWS, values.shape[0])):
            total += values[row, col]
        partial[part, col] = total


def column_sums_kernel(partial, out):
    """out[j] = sum over p of partial[p, j], in order. partial: (P, N); out: (N,)"""
    col = cuda.grid(1)
    if col < out.shape[0]:
        total = partial[0, col]
        for part in range(1, partial.shape[0]):
            total += partial[part, col]
        out[col] = total


def copy_3d_kernel(src, dst, swap_leading):
    """dst[i, j, k] = src[j, i, k] if swap_leading else src[i, j, k]; src any strides."""
    index = cuda.grid(1)
    n0, n1, n2 = dst.shape
    if index < n0 * n1 * n2:
        i = index // (n1 * n2)
        j = (index // n2) % n1
        k = index % n2
        dst[i, j, k] = src[j, i, k] if swap_leading else src[i, j, k]


def copy_2d_kernel(src, dst, transpose):
    """dst[i, j] = src[j, i] if transpose else src[i, j]; src any strides."""
    index = cuda.grid(1)
    cols = dst.shape[1]
    if index < dst.shape[0] * cols:
        i = index // cols
        j = index % cols
        dst[i, j] = src[j, i] if transpose else src[i, j]


def fill_kernel(dst, value):
    """dst (R, N) = value."""
    index = cuda.grid(1)
    cols = dst.shape[1]
    if index < dst.shape[0] * cols:
        dst[index // cols, index % cols] = value


def signatures(dtype):
    """``{kernel name: argument types}`` of every kernel for one dtype.

    Arrays are typed with layout ``"A"`` (any strides): each kernel is compiled
    for exactly these signatures, C-contiguous arguments included, so these
    are all the signatures ever launched, and the ones the compile tests build.
    """
    element = from_dtype(dtype)
    vector, matrix, cube = (types.Array(element, ndim, "A") for ndim in (1, 2, 3))
    flag, index = types.boolean, types.int64
    lengths = types.Array(index, 1, "A")
    return {
        "gemm": (matrix, matrix, matrix, flag, flag, flag),
        "add_bias": (matrix, vector),
        "cell_forward": (cube, matrix, matrix, matrix, lengths, index, flag, cube, index,
                         matrix, matrix, cube, cube, flag),
        "recurrent_forward": (cube, matrix, cube, cube, lengths, flag, cube, index, cube, cube,
                              flag),
        "recurrent_backward": (cube, cube, matrix, cube, matrix, cube, index, flag, lengths,
                               flag, matrix, cube),
        "final_state": (cube, lengths, matrix),
        "clear_padding": (cube, lengths, index),
        "cell_backward": (cube, cube, matrix, matrix, cube, index, flag, lengths, index, flag,
                          matrix, matrix, cube),
        "select_rows": (matrix, matrix, lengths, matrix),
        "fill_lengths": (lengths, index),
        "multiply": (matrix, matrix),
        "column_partial_sums": (matrix, matrix),
        "column_sums": (matrix, vector),
        "copy_3d": (cube, cube, flag),
        "copy_2d": (matrix, matrix, flag),
        "fill": (matrix, element),
    }


_PLAIN_KERNELS = {
    "add_bias": add_bias_kernel,
    "cell_forward": cell_forward_kernel,
    "final_state": final_state_kernel,
    "clear_padding": clear_padding_kernel,
    "cell_backward": cell_backward_kernel,
    "select_rows": select_rows_kernel,
    "fill_lengths": fill_lengths_kernel,
    "multiply": multiply_kernel,
    "column_partial_sums": column_partial_sums_kernel,
    "column_sums": column_sums_kernel,
    "copy_3d": copy_3d_kernel,
    "copy_2d": copy_2d_kernel,
    "fill": fill_kernel,
}


def python_kernel(name, dtype, launch):
    """The plain Python function of kernel ``name``; ``launch`` (a :class:`LaunchConfig`)
    shapes ``"gemm"`` and the persistent loops."""
    if name == "gemm":
        return make_gemm_kernel(dtype, launch.gemm_tile)
    if name == "recurrent_forward":
        return make_recurrent_forward_kernel(dtype, launch.loop_lanes, launch.loop_slices)
    if name == "recurrent_backward":
        return make_recurrent_backward_kernel(dtype, launch.loop_lanes, launch.loop_slices)
    return _PLAIN_KERNELS[name]


@lru_cache(maxsize=None)
def _compiled(name, dtype, launch):
    return cuda.jit(types.void(*signatures(dtype)[name]))(python_kernel(name, dtype, launch))


def kernel(name, dtype):
    """Kernel ``name`` compiled for ``dtype`` on the current device (once per process)."""
    return _compiled(name, dtype, launch_config())


def _configured(name, dtype, griddim, blockdim, stream):
    """Kernel ``name`` for ``dtype``, configured for one launch shape on ``stream``;
    call it with the kernel's arguments, as often as needed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SMALL_GRID_WARNING)
        return kernel(name, dtype)[griddim, blockdim, stream]


def gemm_launcher(rows, cols, dtype, stream):
    """The GEMM kernel configured for a (rows, cols) output; call it as
    ``launch(a, b, c, trans_a, trans_b, accumulate)`` (see :func:`make_gemm_kernel`)."""
    tile = launch_config().gemm_tile
    return _configured("gemm", dtype, (_blocks(cols, tile), _blocks(rows, tile)), (tile, tile),
                       stream)


def pointwise_launcher(name, count, dtype, stream):
    """Elementwise kernel ``name`` configured for ``count`` threads."""
    block = launch_config().pointwise_block
    return _configured(name, dtype, _blocks(count, block), block, stream)


def gemm(a, b, c, stream, trans_a=False, trans_b=False, accumulate=False):
    """Launch ``c = [c +] op(a) @ op(b)`` on ``stream`` (see :func:`make_gemm_kernel`)."""
    gemm_launcher(*c.shape, c.dtype, stream)(a, b, c, trans_a, trans_b, accumulate)


def _pointwise(name, count, stream, *args):
    pointwise_launcher(name, count, args[0].dtype, stream)(*args)


def copy_3d(src, dst, stream, swap_leading=False):
    """Copy ``src`` into contiguous ``dst``, swapping the two leading axes if asked."""
    _pointwise("copy_3d", dst.size, stream, src, dst, swap_leading)


def copy_2d(src, dst, stream, transpose=False):
    """Copy ``src`` (any strides) into ``dst``, transposed if asked."""
    _pointwise("copy_2d", dst.size, stream, src, dst, transpose)


def fill(dst, value, stream):
    """Set every element of the 2-D ``dst`` to ``value``."""
    _pointwise("fill", dst.size, stream, dst, dst.dtype.type(value))


def multiply(values, factors, stream):
    """values *= factors, elementwise, both (R, N) contiguous."""
    _pointwise("multiply", values.size, stream, values, factors)


def full_lengths(batch, steps, stream):
    """A (B,) int64 device array holding ``steps`` everywhere."""
    lengths = cuda.device_array(batch, "int64", stream=stream)
    _pointwise("fill_lengths", batch, stream, lengths, steps)
    return lengths


def column_sums(values, out, stream):
    """out (N,) = values (R, N) summed over rows, in a fixed order (two passes)."""
    rows, cols = values.shape
    partial = cuda.device_array((_blocks(rows, REDUCE_ROWS), cols), values.dtype, stream=stream)
    _pointwise("column_partial_sums", partial.size, stream, values, partial)
    _pointwise("column_sums", cols, stream, partial, out)


@lru_cache(maxsize=None)
def _cooperative_limit(name, dtype, launch):
    """Most blocks of persistent loop ``name`` that fit on the device at once (1 under
    the simulator, which runs cooperative grids of one block only; 0 on a device
    without cooperative launches, or with a numba-cuda without the grid barrier's
    intrinsics: the stepwise loops run then)."""
    if config.ENABLE_CUDASIM:
        return 1
    if _this_grid is None or not cuda.get_current_device().COOPERATIVE_LAUNCH:
        return 0
    compiled = next(iter(kernel(name, dtype).overloads.values()))
    return compiled.max_cooperative_grid_blocks(launch.loop_threads)


def persistent_blocks(name, batch, hidden, dtype):
    """Blocks for persistent loop ``name`` (``"recurrent_forward"`` or
    ``"recurrent_backward"``) of a (B, H) problem, or 0 when the loop takes two
    launches per step instead (W_h read more than PERSISTENT_MAX_STEP_BYTES a step)."""
    weight_reads = -(-batch // LOOP_ROWS) * N_GATES * hidden * hidden * np.dtype(dtype).itemsize
    if weight_reads > PERSISTENT_MAX_STEP_BYTES:
        return 0
    launch = launch_config()
    _, items = _work_items(hidden, batch, launch.loop_lanes)
    return min(items, _cooperative_limit(name, dtype, launch))


def _stepwise_forward(gates, w_hs, h_ring, c_ring, lengths, y, states, save, stream):
    """The forward time loop as one recurrent GEMM and one cell launch per step and
    direction. Arrays as in :func:`forward`; states: per direction the
    (hidden_states, cell_states) to fill, or the rings (then unused)."""
    n_dirs, _, batch, hidden = h_ring.shape
    z = cuda.device_array((n_dirs, batch, N_GATES * hidden), y.dtype, stream=stream)
    recurrent_product = gemm_launcher(batch, N_GATES * hidden, y.dtype, stream)
    cell = pointwise_launcher("cell_forward", batch * hidden, y.dtype, stream)
    # Each direction's arrays, sliced once: slicing a device array costs about
    # as much as a launch.
    directions = [(w_h, gates[d], z[d], (h_ring[d, 0], h_ring[d, 1]), (c_ring[d, 0], c_ring[d, 1]))
                  for d, w_h in enumerate(w_hs)]
    for step in range(y.shape[0]):
        now, after = step % 2, (step + 1) % 2
        for d, (w_h, gates_d, z_d, h, c) in enumerate(directions):
            recurrent_product(h[now], w_h, z_d, False, False, False)
            cell(gates_d, z_d, h[now], c[now], lengths, step, d == 1, y, d * hidden, h[after],
                 c[after], *states[d], save)


def forward(x, params, h0, c0, lengths, y, saved, h_n, c_n, stream):
    """Input projections, then the time loop: one persistent launch per direction
    (:func:`make_recurrent_forward_kernel`) or, for large B * H (see
    :func:`persistent_blocks`), one GEMM and one cell launch per step and direction.

    x: (T, B, I) contiguous; params: per direction (W_x (I, 4H), W_h (H, 4H), b (4H,));
    direction 1 runs in reverse
    h0, c0: (D, B, H); lengths: (B,) int64
    y: (T, B, D*H) out, zero-filled (padding stays zero)
    saved: (gates (D, T, B, 4H), hidden_states (D, T+1, B, H), cell_states
    (D, T+1, B, H)) out, or None (inference)
    h_n, c_n: (D, B, H) out
    """
    steps, batch, inputs = x.shape
    n_dirs = len(params)
    hidden = params[0][1].shape[0]
    four_hidden = N_GATES * hidden
    gates = saved[0] if saved is not None else cuda.device_array(
        (n_dirs, steps, batch, four_hidden), x.dtype, stream=stream)
    h_ring = cuda.device_array((n_dirs, 2, batch, hidden), x.dtype, stream=stream)
    c_ring = cuda.device_array((n_dirs, 2, batch, hidden), x.dtype, stream=stream)
    flat_x = x.reshape(steps * batch, inputs)
    for d, (w_x, _, b) in enumerate(params):
        flat_gates = gates[d].reshape(steps * batch, four_hidden)
        gemm(flat_x, w_x, flat_gates, stream)
        _pointwise("add_bias", flat_gates.size, stream, flat_gates, b)
        copy_2d(h0[d], h_ring[d, 0], stream)
        copy_2d(c0[d], c_ring[d, 0], stream)
    states = [(saved[1][d], saved[2][d]) if saved is not None else (h_ring[d], c_ring[d])
              for d in range(n_dirs)]
    blocks = persistent_blocks("recurrent_forward", batch, hidden, x.dtype)
    if blocks:
        loop = _configured("recurrent_forward", x.dtype, blocks, launch_config().loop_threads,
                           stream)
        for d, (_, w_h, _) in enumerate(params):
            loop(gates[d], w_h, h_ring[d], c_ring[d], lengths, d == 1, y, d * hidden, *states[d],
                 saved is not None)
    else:
        _stepwise_forward(gates, [w_h for _, w_h, _ in params], h_ring, c_ring, lengths, y,
                          states, saved is not None, stream)
    for d in range(n_dirs):
        _pointwise("final_state", batch * hidden, stream, h_ring[d], lengths, h_n[d])
        _pointwise("final_state", batch * hidden, stream, c_ring[d], lengths, c_n[d])
        if saved is not None:
            for array in (gates[d], saved[1][d], saved[2][d]):
                _pointwise("clear_padding", steps * batch * array.shape[2], stream, array,
                           lengths, steps)
            copy_2d(h_n[d], saved[1][d, steps], stream)
            copy_2d(c_n[d], saved[2][d, steps], stream)


def _stepwise_backward(gates, cell_states, w_hs, lengths, dys, has_dy, dh_n, dc, d_gates, stream):
    """The backward time loop as one recurrent GEMM and one cell launch per step and
    direction. Arrays as in :func:`backward`; dys: per direction dy, or a
    placeholder when not has_dy. Returns per direction the (B, 4H) pre-activation
    gradients of each row's first step."""
    n_dirs, steps, batch, four_hidden = gates.shape
    hidden = four_hidden // N_GATES
    dz_step = cuda.device_array((n_dirs, batch, four_hidden), gates.dtype, stream=stream)
    dh_step = cuda.device_array((n_dirs, batch, hidden), gates.dtype, stream=stream)
    recurrent_product = gemm_launcher(batch, hidden, gates.dtype, stream)
    cell = pointwise_launcher("cell_backward", batch * hidden, gates.dtype, stream)
    # Each direction's arrays, sliced once (see _stepwise_forward).
    directions = [(w_h, gates[d], cell_states[d], dh_step[d], dh_n[d], dys[d], dc[d],
                   dz_step[d], d_gates[d]) for d, w_h in enumerate(w_hs)]
    for step in range(steps - 1, -1, -1):
        for d, (w_h, *arrays) in enumerate(directions):
            gates_d, cells_d, dh_step_d, dh_n_d, dy_d, dc_d, dz_step_d, d_gates_d = arrays
            if step + 1 < steps:
                recurrent_product(dz_step_d, w_h, dh_step_d, False, True, False)
            cell(gates_d, cells_d, dh_step_d, dh_n_d, dy_d, d * hidden, has_dy, lengths, step,
                 d == 1, dc_d, dz_step_d, d_gates_d)
    return [dz_step[d] for d in range(n_dirs)]


def backward(x, params, saved, lengths, dy, dh_n, dc_n, grads, stream):
    """Backpropagation through time (one persistent launch per direction, or two
    launches per step as in :func:`forward`), then the gradient GEMMs and the bias
    reduction.

    x: (T, B, I) contiguous; params: per direction (W_x, W_h, b) as in :func:`forward`
    saved: (gates, hidden_states, cell_states) from :func:`forward`
    lengths: (B,) int64; dy: (T, B, D*H) or None; dh_n, dc_n: (D, B, H)
    grads: (dx (T, B, I), dh0 (D, B, H), dc0 (D, B, H), dW_x (D, I, 4H),
    dW_h (D, H, 4H), db (D, 4H)) out; dc0 is used as the running dc.
    """
    gates, hidden_states, cell_states = saved
    dx, dh0, dc, dw_x, dw_h, db = grads
    n_dirs, steps, batch, four_hidden = gates.shape
    inputs = x.shape[2]
    hidden = four_hidden // N_GATES
    d_gates = cuda.device_array(gates.shape, x.dtype, stream=stream)
    fill(d_gates.reshape(n_dirs * steps * batch, four_hidden), 0, stream)
    for d in range(n_dirs):
        copy_2d(dc_n[d], dc[d], stream)
    w_hs = [w_h for _, w_h, _ in params]
    # Without dy the kernels read d_gates in its place and never use it.
    dys = [dy if dy is not None else d_gates[d] for d in range(n_dirs)]
    blocks = persistent_blocks("recurrent_backward", batch, hidden, x.dtype)
    if blocks:
        dz_ring = cuda.device_array((n_dirs, 2, batch, four_hidden), x.dtype, stream=stream)
        w_h_t = cuda.device_array((four_hidden, hidden), x.dtype, stream=stream)
        loop = _configured("recurrent_backward", x.dtype, blocks, launch_config().loop_threads,
                           stream)
        for d, w_h in enumerate(w_hs):
            copy_2d(w_h, w_h_t, stream, transpose=True)
            loop(gates[d], cell_states[d], w_h_t, dz_ring[d], dh_n[d], dys[d], d * hidden,
                 dy is not None, lengths, d == 1, dc[d], d_gates[d])
        first_dz = [dz_ring[d, 0] for d in range(n_dirs)]
    else:
        first_dz = _stepwise_backward(gates, cell_states, w_hs, lengths, dys, dy is not None,
                                      dh_n, dc, d_gates, stream)
    dh_step = cuda.device_array((n_dirs, batch, hidden), x.dtype, stream=stream)
    flat_x = x.reshape(steps * batch, inputs)
    flat_dx = dx.reshape(steps * batch, inputs)
    for d, (w_x, w_h, _) in enumerate(params):
        gemm(first_dz[d], w_h, dh_step[d], stream, trans_b=True)
        _pointwise("select_rows", batch * hidden, stream, dh_step[d], dh_n[d], lengths, dh0[d])
        flat_dz = d_gates[d].reshape(steps * batch, four_hidden)
        gemm(flat_dz, w_x, flat_dx, stream, trans_b=True, accumulate=d > 0)
        gemm(flat_x, flat_dz, dw_x[d], stream, trans_a=True)
        gemm(hidden_states[d, :steps].reshape(steps * batch, hidden), flat_dz, dw_h[d], stream,
             trans_a=True)
        column_sums(flat_dz, db[d], stream)
