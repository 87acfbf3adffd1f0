"""CUDA kernels and their thin launchers.

Same shape of work as the CPU drivers: the input projection is one GEMM before
the time loop; each step is one recurrent GEMM plus one fused pointwise kernel
(the cell math from :mod:`.cell`, compiled for the GPU); the weight, bias and
input gradients are GEMMs and a two-pass column reduction after the loop. No
atomics anywhere: every output element is written by one thread summing in a
fixed order, so reruns are bit-identical.

Every launch goes to the caller's stream; nothing here synchronises with the
host. Launch sizes come from :class:`LaunchConfig`, derived from the device's
properties (with small fallbacks under the simulator).

All arrays are Numba device arrays (or the simulator's); the callers in
``nblstm`` validate and allocate.
"""
from dataclasses import dataclass
from functools import lru_cache

from numba import config, cuda, types
from numba.np.numpy_support import from_dtype

from .cell import cell_backward, cell_forward

#: Number of gates along the 4H axis (i, f, g, o).
N_GATES = 4
#: Rows summed by one thread in the first pass of the column reduction.
REDUCE_ROWS = 64
#: Fallback launch sizes under the simulator, whose device has no properties
#: and which runs every thread as a Python thread.
SIMULATOR_TILE = 4
SIMULATOR_BLOCK = 32
#: Blocks are sized to a quarter of the device's thread limit, so several
#: blocks can share a multiprocessor.
BLOCKS_PER_LIMIT = 4
#: Threads per block for elementwise kernels, in warps.
POINTWISE_WARPS = 8


@dataclass(frozen=True)
class LaunchConfig:
    """Launch sizes for one device.

    gemm_tile: edge of the square GEMM tile; GEMM blocks are (tile, tile).
    pointwise_block: threads per block of the elementwise kernels.
    """

    gemm_tile: int
    pointwise_block: int


@lru_cache(maxsize=None)
def _config_for(device_id):
    if config.ENABLE_CUDASIM:
        return LaunchConfig(SIMULATOR_TILE, SIMULATOR_BLOCK)
    device = cuda.get_current_device()
    max_threads = device.MAX_THREADS_PER_BLOCK
    shared_bytes = device.MAX_SHARED_MEMORY_PER_BLOCK
    tile = 1
    while ((2 * tile) ** 2 <= max_threads // BLOCKS_PER_LIMIT
           and 2 * (2 * tile) ** 2 * 8 <= shared_bytes):
        tile *= 2
    return LaunchConfig(tile, min(max_threads, POINTWISE_WARPS * device.WARP_SIZE))


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


def cell_forward_kernel(z, c_prev, h_next, c_next, y_t):
    """One step's cell math for every (row, unit).

    z: (B, 4H) in: pre-activations; out: post-activation gates i, f, g, o
    c_prev: (B, H); h_next, c_next: (B, H) out; y_t: (B, H) out
    """
    index = cuda.grid(1)
    batch, hidden = c_prev.shape
    if index < batch * hidden:
        r = index // hidden
        u = index % hidden
        i, f, g, o, c, h = cell_forward(z[r, u], z[r, hidden + u], z[r, 2 * hidden + u],
                                        z[r, 3 * hidden + u], c_prev[r, u])
        z[r, u] = i
        z[r, hidden + u] = f
        z[r, 2 * hidden + u] = g
        z[r, 3 * hidden + u] = o
        c_next[r, u] = c
        h_next[r, u] = h
        y_t[r, u] = h


def cell_backward_kernel(gates, c_prev, c_t, dh, dy_t, has_dy, dc, dz):
    """One step of backpropagation through the cell math for every (row, unit).

    gates: (B, 4H) saved post-activation gates; c_prev, c_t: (B, H)
    dh: (B, H) gradient reaching h_t from step t+1 (or dh_n)
    dy_t: (B, H) upstream gradient of y_t, read only when has_dy
    dc: (B, H) in: gradient reaching c_t; out: gradient of c_{t-1}
    dz: (B, 4H) out: gradients of the pre-activations
    """
    index = cuda.grid(1)
    batch, hidden = c_t.shape
    if index < batch * hidden:
        r = index // hidden
        u = index % hidden
        dh_total = dh[r, u] + dy_t[r, u] if has_dy else dh[r, u]
        dz_i, dz_f, dz_g, dz_o, dc_prev = cell_backward(
            gates[r, u], gates[r, hidden + u], gates[r, 2 * hidden + u],
            gates[r, 3 * hidden + u], c_prev[r, u], c_t[r, u], dh_total, dc[r, u])
        dz[r, u] = dz_i
        dz[r, hidden + u] = dz_f
        dz[r, 2 * hidden + u] = dz_g
        dz[r, 3 * hidden + u] = dz_o
        dc[r, u] = dc_prev


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


def copy_2d_kernel(src, dst):
    """dst[i, j] = src[i, j]; src any strides."""
    index = cuda.grid(1)
    cols = dst.shape[1]
    if index < dst.shape[0] * cols:
        dst[index // cols, index % cols] = src[index // cols, index % cols]


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
    flag = types.boolean
    return {
        "gemm": (matrix, matrix, matrix, flag, flag, flag),
        "add_bias": (matrix, vector),
        "cell_forward": (matrix, matrix, matrix, matrix, matrix),
        "cell_backward": (matrix, matrix, matrix, matrix, matrix, flag, matrix, matrix),
        "column_partial_sums": (matrix, matrix),
        "column_sums": (matrix, vector),
        "copy_3d": (cube, cube, flag),
        "copy_2d": (matrix, matrix),
        "fill": (matrix, element),
    }


_PLAIN_KERNELS = {
    "add_bias": add_bias_kernel,
    "cell_forward": cell_forward_kernel,
    "cell_backward": cell_backward_kernel,
    "column_partial_sums": column_partial_sums_kernel,
    "column_sums": column_sums_kernel,
    "copy_3d": copy_3d_kernel,
    "copy_2d": copy_2d_kernel,
    "fill": fill_kernel,
}


def python_kernel(name, dtype, tile):
    """The plain Python function of kernel ``name`` (``tile`` matters for ``"gemm"``)."""
    return make_gemm_kernel(dtype, tile) if name == "gemm" else _PLAIN_KERNELS[name]


@lru_cache(maxsize=None)
def _compiled(name, dtype, tile):
    return cuda.jit(types.void(*signatures(dtype)[name]))(python_kernel(name, dtype, tile))


def kernel(name, dtype):
    """Kernel ``name`` compiled for ``dtype`` on the current device (once per process)."""
    return _compiled(name, dtype, launch_config().gemm_tile)


def gemm(a, b, c, stream, trans_a=False, trans_b=False, accumulate=False):
    """Launch ``c = [c +] op(a) @ op(b)`` on ``stream`` (see :func:`make_gemm_kernel`)."""
    tile = launch_config().gemm_tile
    rows, cols = c.shape
    kernel("gemm", c.dtype)[(_blocks(cols, tile), _blocks(rows, tile)), (tile, tile), stream](
        a, b, c, trans_a, trans_b, accumulate)


def _pointwise(name, count, stream, *args):
    block = launch_config().pointwise_block
    kernel(name, args[0].dtype)[_blocks(count, block), block, stream](*args)


def copy_3d(src, dst, stream, swap_leading=False):
    """Copy ``src`` into contiguous ``dst``, swapping the two leading axes if asked."""
    _pointwise("copy_3d", dst.size, stream, src, dst, swap_leading)


def copy_2d(src, dst, stream):
    """Copy ``src`` (any strides) into ``dst``."""
    _pointwise("copy_2d", dst.size, stream, src, dst)


def fill(dst, value, stream):
    """Set every element of the 2-D ``dst`` to ``value``."""
    _pointwise("fill", dst.size, stream, dst, dst.dtype.type(value))


def column_sums(values, out, stream):
    """out (N,) = values (R, N) summed over rows, in a fixed order (two passes)."""
    rows, cols = values.shape
    partial = cuda.device_array((_blocks(rows, REDUCE_ROWS), cols), values.dtype, stream=stream)
    _pointwise("column_partial_sums", partial.size, stream, values, partial)
    _pointwise("column_sums", cols, stream, partial, out)


def forward(x, w_x, w_h, b, gates, hidden_states, cell_states, y, stream):
    """Input projection GEMM, then per step one recurrent GEMM and one cell kernel.

    x: (T, B, I) contiguous; w_x: (I, 4H); w_h: (H, 4H); b: (4H,)
    gates: (T, B, 4H) out, contiguous
    hidden_states, cell_states: (S, B, H) row 0 holds h0/c0; S = T+1 or 2 (a ring)
    y: (T, B, H) out
    """
    steps, batch, inputs = x.shape
    four_hidden = gates.shape[2]
    flat_gates = gates.reshape(steps * batch, four_hidden)
    gemm(x.reshape(steps * batch, inputs), w_x, flat_gates, stream)
    _pointwise("add_bias", flat_gates.size, stream, flat_gates, b)
    slots = hidden_states.shape[0]
    for t in range(steps):
        gemm(hidden_states[t % slots], w_h, gates[t], stream, accumulate=True)
        _pointwise("cell_forward", batch * (four_hidden // N_GATES), stream,
                   gates[t], cell_states[t % slots], hidden_states[(t + 1) % slots],
                   cell_states[(t + 1) % slots], y[t])


def backward(x, w_x, w_h, gates, hidden_states, cell_states, dy, dh, dc, d_gates, grads, stream):
    """Backpropagation through time, then the gradient GEMMs and the bias reduction.

    x: (T, B, I) contiguous; gates, d_gates: (T, B, 4H) (d_gates out)
    hidden_states, cell_states: (T+1, B, H)
    dy: (T, B, H) or None
    dh: (B, H) in: dh_n; out: dh0.   dc: (B, H) in: dc_n; out: dc0
    grads: (dx (T, B, I), dW_x (I, 4H), dW_h (H, 4H), db (4H,)) out
    """
    dx, dw_x, dw_h, db = grads
    steps, batch, inputs = x.shape
    hidden = w_h.shape[0]
    has_dy = dy is not None
    for t in range(steps - 1, -1, -1):
        if t < steps - 1:
            gemm(d_gates[t + 1], w_h, dh, stream, trans_b=True)
        _pointwise("cell_backward", batch * hidden, stream, gates[t], cell_states[t],
                   cell_states[t + 1], dh, dy[t] if has_dy else dh, has_dy, dc, d_gates[t])
    gemm(d_gates[0], w_h, dh, stream, trans_b=True)
    flat_dz = d_gates.reshape(steps * batch, N_GATES * hidden)
    gemm(flat_dz, w_x, dx.reshape(steps * batch, inputs), stream, trans_b=True)
    gemm(x.reshape(steps * batch, inputs), flat_dz, dw_x, stream, trans_a=True)
    gemm(hidden_states[:steps].reshape(steps * batch, hidden), flat_dz, dw_h, stream,
         trans_a=True)
    column_sums(flat_dz, db, stream)
