"""CPU drivers: Numba ``parallel=True`` time loops plus the GEMMs around them.

Shape of the work (DESIGN.md): the input projection ``x @ W_x + b`` is one
product per direction before the time loop; inside the loop each step is one
parallel pass over tiles of (direction, active batch rows, hidden units) that
computes the recurrent product for the tile's units (all four gates) and
applies the cell math right there, so a step costs one thread-pool barrier and
no BLAS call, and both directions of a bidirectional layer share it. The
weight, bias and input gradients are products/reductions over the saved
``d_gates`` after the loop. Every product, large or per step, runs on
Numba's thread pool (:func:`matmul_nt`): a BLAS call would wake a second
pool whose threads keep spinning for milliseconds after it returns, and on a
small machine that costs more than the faster BLAS kernel saves.

Variable lengths: before each step the rows still running are listed, and only
they are tiled, so the work per step follows the number of running sequences.
At step s the forward direction reads time s and the reverse direction time
``lengths[b] - 1 - s``; times past a row's length are padding (zero output,
zero gates, zero gradients).

Every output element is produced by exactly one tile, summing in a fixed
order, so results are bit-identical across reruns and thread counts.

The callers (``nblstm``) validate and allocate; these functions only compute
into the buffers they are given.
"""
import numpy as np
from numba import njit, prange

from .cell import N_GATES, cell_backward, cell_forward, step_time

#: Hidden units per tile: a tile's slice of W_h is (4 * UNITS_PER_TILE, H).
UNITS_PER_TILE = 32
#: Batch rows per tile.
ROWS_PER_TILE = 16
#: Rows sharing each load of a weight row in the recurrent product.
ROW_BLOCK = 4
#: Tile of the large products (input projection, gradients): rows x columns.
PRODUCT_ROWS = 64
PRODUCT_COLS = 64
#: Floating-point freedoms of the recurrent product only: reassociation lets
#: the dot products vectorize (in a fixed, thread-independent order) and
#: contraction fuses multiply-adds. NaN and Inf keep their IEEE meaning.
PRODUCT_MATH = {"reassoc", "contract"}


@njit(fastmath=PRODUCT_MATH, cache=True)
def _dot_rows(a, m_t, rows, row_lo, row_hi, col_lo, col_hi, out, accumulate):
    """``out[r, j] (+)= a[r, :] @ m_t[j, :]`` for r in ``rows[row_lo:row_hi]``, j in [col_lo, col_hi).

    a: (R, K); m_t: (N, K); rows: row indices into a and out; out: (R, N).
    Register-blocked over ROW_BLOCK rows and two columns: each loaded element
    of ``a`` and ``m_t`` feeds several multiply-adds. Adds to ``out`` when
    ``accumulate``, else overwrites it.
    """
    depth = a.shape[1]
    zero = out.dtype.type(0)
    j = col_lo
    while j < col_hi:
        pair = j + 1 < col_hi
        n = row_lo
        while n < row_hi:
            block = min(ROW_BLOCK, row_hi - n)
            r0 = rows[n]
            r1 = rows[n + min(1, block - 1)]
            r2 = rows[n + min(2, block - 1)]
            r3 = rows[n + min(3, block - 1)]
            j1 = j + 1 if pair else j
            acc00 = acc10 = acc20 = acc30 = zero
            acc01 = acc11 = acc21 = acc31 = zero
            for k in range(depth):
                w0 = m_t[j, k]
                w1 = m_t[j1, k]
                a0 = a[r0, k]
                a1 = a[r1, k]
                a2 = a[r2, k]
                a3 = a[r3, k]
                acc00 += a0 * w0
                acc10 += a1 * w0
                acc20 += a2 * w0
                acc30 += a3 * w0
                acc01 += a0 * w1
                acc11 += a1 * w1
                acc21 += a2 * w1
                acc31 += a3 * w1
            _store(out, r0, j, acc00, accumulate)
            if block > 1:
                _store(out, r1, j, acc10, accumulate)
            if block > 2:
                _store(out, r2, j, acc20, accumulate)
            if block > 3:
                _store(out, r3, j, acc30, accumulate)
            if pair:
                _store(out, r0, j1, acc01, accumulate)
                if block > 1:
                    _store(out, r1, j1, acc11, accumulate)
                if block > 2:
                    _store(out, r2, j1, acc21, accumulate)
                if block > 3:
                    _store(out, r3, j1, acc31, accumulate)
            n += block
        j += 2


@njit(inline="always")
def _store(out, row, col, value, accumulate):
    out[row, col] = out[row, col] + value if accumulate else value


@njit(parallel=True, cache=True)
def matmul_nt(a, m_t, rows, out, accumulate):
    """``out[r] (+)= a[r] @ m_t.T`` for r in ``rows``, in parallel tiles, each element in a fixed order.

    a: (R, K); m_t: (N, K); rows: row indices; out: (R, N), other rows untouched.
    The large products run on Numba's thread pool too, so no second (BLAS)
    pool wakes up and spins beside it.
    """
    n_rows, n_cols = rows.shape[0], out.shape[1]
    n_col_tiles = (n_cols + PRODUCT_COLS - 1) // PRODUCT_COLS
    n_tiles = ((n_rows + PRODUCT_ROWS - 1) // PRODUCT_ROWS) * n_col_tiles
    for tile in prange(n_tiles):
        row_lo = (tile // n_col_tiles) * PRODUCT_ROWS
        col_lo = (tile % n_col_tiles) * PRODUCT_COLS
        _dot_rows(a, m_t, rows, row_lo, min(row_lo + PRODUCT_ROWS, n_rows), col_lo,
                  min(col_lo + PRODUCT_COLS, n_cols), out, accumulate)


@njit(inline="always")
def _list_running(step, lengths, running):
    """Write the rows with ``step < lengths[row]`` into ``running``; return their count."""
    count = 0
    for row in range(lengths.shape[0]):
        if step < lengths[row]:
            running[count] = row
            count += 1
    return count


@njit(inline="always")
def _tile_bounds(tile, n_row_tiles, n_unit_tiles, n_rows, hidden):
    """(direction, first/last running-row position, first/last unit) of a tile."""
    per_direction = n_row_tiles * n_unit_tiles
    direction = tile // per_direction
    rest = tile % per_direction
    row_lo = (rest // n_unit_tiles) * ROWS_PER_TILE
    unit_lo = (rest % n_unit_tiles) * UNITS_PER_TILE
    return (direction, row_lo, min(row_lo + ROWS_PER_TILE, n_rows),
            unit_lo, min(unit_lo + UNITS_PER_TILE, hidden))


@njit(parallel=True, cache=True)
def forward_loop(gates, w_h_t, h_ring, c_ring, z, lengths, running, y, hidden_states,
                 cell_states):
    """Run the recurrence of every direction over all steps.

    gates:         (D, T, B, 4H) in: ``x_t @ W_x + b`` by time; out: post-activation
                   gates at valid times (padding untouched)
    w_h_t:         (D, 4H, H) the transpose of each direction's W_h, contiguous
    h_ring, c_ring:(D, 2, B, H) slot 0 holds h0/c0 on entry; row b's final state
                   is in slot ``lengths[b] % 2`` on exit
    z:             (D, B, 4H) scratch for the recurrent products
    lengths:       (B,) int64, 0 <= lengths[b] <= T
    running:       (B,) int64 scratch
    y:             (T, B, D*H) out at valid times (direction d in columns d*H..)
    hidden_states, cell_states: (D, T, B, H) out: the state entering each valid
                   time; or (D, 0, B, H) to save nothing (inference)
    Direction 1, when present, runs in reverse.
    """
    n_dirs, steps, batch, four_hidden = gates.shape
    hidden = four_hidden // N_GATES
    save = hidden_states.shape[1] > 0
    n_unit_tiles = (hidden + UNITS_PER_TILE - 1) // UNITS_PER_TILE
    for step in range(steps):
        n_rows = _list_running(step, lengths, running)
        n_row_tiles = (n_rows + ROWS_PER_TILE - 1) // ROWS_PER_TILE
        prev = step % 2
        for tile in prange(n_dirs * n_row_tiles * n_unit_tiles):
            d, row_lo, row_hi, unit_lo, unit_hi = _tile_bounds(tile, n_row_tiles, n_unit_tiles,
                                                               n_rows, hidden)
            h_prev = h_ring[d, prev]
            c_prev = c_ring[d, prev]
            for gate in range(N_GATES):
                _dot_rows(h_prev, w_h_t[d], running, row_lo, row_hi,
                          gate * hidden + unit_lo, gate * hidden + unit_hi, z[d], False)
            for n in range(row_lo, row_hi):
                r = running[n]
                t = step_time(step, lengths[r], d == 1)
                g_t = gates[d, t, r]
                z_r = z[d, r]
                for u in range(unit_lo, unit_hi):
                    i, f, g, o, c, h = cell_forward(
                        g_t[u] + z_r[u], g_t[hidden + u] + z_r[hidden + u],
                        g_t[2 * hidden + u] + z_r[2 * hidden + u],
                        g_t[3 * hidden + u] + z_r[3 * hidden + u], c_prev[r, u])
                    if save:
                        hidden_states[d, t, r, u] = h_prev[r, u]
                        cell_states[d, t, r, u] = c_prev[r, u]
                    g_t[u] = i
                    g_t[hidden + u] = f
                    g_t[2 * hidden + u] = g
                    g_t[3 * hidden + u] = o
                    c_ring[d, 1 - prev, r, u] = c
                    h_ring[d, 1 - prev, r, u] = h
                    y[t, r, d * hidden + u] = h


@njit(parallel=True, cache=True)
def backward_loop(gates, cell_states, w_h, lengths, running, dy, dh_n, dc_carry, dz_ring,
                  dh_step, dh0, d_gates):
    """Backpropagate through time for every direction, last step first.

    gates:       (D, T, B, 4H) saved post-activation gates
    cell_states: (D, T, B, H) saved cell state entering each time
    w_h:         (D, H, 4H)
    lengths:     (B,) int64; running: (B,) int64 scratch
    dy:          (T, B, D*H) upstream gradient of y, or (0, B, D*H) for none
    dh_n:        (D, B, H) reaches h at each row's last valid step
    dc_carry:    (D, B, H) in: dc_n; out: dc0
    dz_ring:     (2, D, B, 4H) scratch: each row's gate gradients of the last two steps
    dh_step:     (D, B, H) scratch: gradient reaching h from the step after
    dh0:         (D, B, H) in: dh_n (kept for rows of length 0); out: dh0
    d_gates:     (D, T, B, 4H) out at valid times (zero it first for padding)
    """
    n_dirs, steps, batch, four_hidden = gates.shape
    hidden = four_hidden // N_GATES
    has_dy = dy.shape[0] > 0
    n_unit_tiles = (hidden + UNITS_PER_TILE - 1) // UNITS_PER_TILE
    for step in range(steps - 1, -2, -1):
        # Step -1 only turns the gate gradients of step 0 into dh0.
        n_rows = _list_running(max(step, 0), lengths, running)
        n_row_tiles = (n_rows + ROWS_PER_TILE - 1) // ROWS_PER_TILE
        for tile in prange(n_dirs * n_row_tiles * n_unit_tiles):
            d, row_lo, row_hi, unit_lo, unit_hi = _tile_bounds(tile, n_row_tiles, n_unit_tiles,
                                                               n_rows, hidden)
            if step + 1 < steps:
                _dot_rows(dz_ring[(step + 1) % 2, d], w_h[d], running, row_lo, row_hi,
                          unit_lo, unit_hi, dh0[d] if step < 0 else dh_step[d], False)
            if step < 0:
                continue
            for n in range(row_lo, row_hi):
                r = running[n]
                dh_in = dh_step[d, r] if step + 1 < lengths[r] else dh_n[d, r]
                t = step_time(step, lengths[r], d == 1)
                g_t = gates[d, t, r]
                dz_t = d_gates[d, t, r]
                dz_r = dz_ring[step % 2, d, r]
                for u in range(unit_lo, unit_hi):
                    dh = dh_in[u]
                    if has_dy:
                        dh += dy[t, r, d * hidden + u]
                    dz_i, dz_f, dz_g, dz_o, dc_prev = cell_backward(
                        g_t[u], g_t[hidden + u], g_t[2 * hidden + u], g_t[3 * hidden + u],
                        cell_states[d, t, r, u], dh, dc_carry[d, r, u])
                    dz_t[u] = dz_r[u] = dz_i
                    dz_t[hidden + u] = dz_r[hidden + u] = dz_f
                    dz_t[2 * hidden + u] = dz_r[2 * hidden + u] = dz_g
                    dz_t[3 * hidden + u] = dz_r[3 * hidden + u] = dz_o
                    dc_carry[d, r, u] = dc_prev


def forward(x, w_x, w_h, b, h0, c0, lengths, y, saved):
    """Input projections, then the recurrence of every direction.

    x: (T, B, I) contiguous; w_x: (D, I, 4H); w_h: (D, H, 4H); b: (D, 4H)
    h0, c0: (D, B, H); lengths: (B,) int64
    y: (T, B, D*H) out, zero-filled (padding stays zero)
    saved: (gates (D, T, B, 4H), hidden_states (D, T+1, B, H),
    cell_states (D, T+1, B, H)) to fill for backward, or None (inference).
    Returns (h_n, c_n), each (D, B, H).
    """
    steps, batch, inputs = x.shape
    n_dirs, hidden = w_h.shape[0], w_h.shape[1]
    if saved is None:
        gates = np.empty((n_dirs, steps, batch, N_GATES * hidden), x.dtype)
        hidden_states = cell_states = np.empty((n_dirs, 0, batch, hidden), x.dtype)
    else:
        gates, hidden_states, cell_states = saved
    flat_x = x.reshape(steps * batch, inputs)
    rows = valid_rows(lengths, steps)
    for d in range(n_dirs):
        flat_gates = gates[d].reshape(steps * batch, -1)
        matmul_nt(flat_x, np.ascontiguousarray(w_x[d].T), rows, flat_gates, False)
        flat_gates[rows] += b[d]
    h_ring = np.empty((n_dirs, 2, batch, hidden), x.dtype)
    c_ring = np.empty_like(h_ring)
    h_ring[:, 0], c_ring[:, 0] = h0, c0
    w_h_t = np.ascontiguousarray(w_h.transpose(0, 2, 1))
    z = np.empty((n_dirs, batch, N_GATES * hidden), x.dtype)
    running = np.empty(batch, np.int64)
    forward_loop(gates, w_h_t, h_ring, c_ring, z, lengths, running, y,
                 hidden_states[:, :steps], cell_states[:, :steps])
    h_n = h_ring[:, lengths % 2, np.arange(batch)]
    c_n = c_ring[:, lengths % 2, np.arange(batch)]
    if saved is not None:
        _clear_padding(gates, hidden_states, cell_states, lengths)
        hidden_states[:, steps], cell_states[:, steps] = h_n, c_n
    return h_n, c_n


def valid_rows(lengths, steps):
    """Indices ``t * B + b`` of the valid (time, row) pairs, ``t < lengths[b]``, in order."""
    return np.flatnonzero(np.arange(steps)[:, None] < lengths[None, :])


def _clear_padding(gates, hidden_states, cell_states, lengths):
    """Zero the saved arrays at padded times, so they hold no stale values."""
    steps = gates.shape[1]
    padded = np.arange(steps)[:, None] >= lengths[None, :]
    if padded.any():
        gates[:, padded] = 0
        hidden_states[:, :steps][:, padded] = 0
        cell_states[:, :steps][:, padded] = 0


def backward(x, w_x, w_h, saved, lengths, dy, dh_n, dc_n):
    """The backward loop, then the gradient GEMMs over all steps at once.

    x: (T, B, I) contiguous; w_x: (D, I, 4H); w_h: (D, H, 4H) contiguous
    saved: (gates, hidden_states, cell_states) from :func:`forward`
    lengths: (B,) int64; dy: (T, B, D*H) or None; dh_n, dc_n: (D, B, H)

    Returns ``(dx (T, B, I), dh0 (D, B, H), dc0 (D, B, H), dW_x (D, I, 4H),
    dW_h (D, H, 4H), db (D, 4H))``.
    """
    gates, hidden_states, cell_states = saved
    n_dirs, steps, batch, four_hidden = gates.shape
    inputs = x.shape[2]
    hidden = four_hidden // N_GATES
    if dy is None:
        dy = np.empty((0, batch, n_dirs * hidden), x.dtype)
    d_gates = np.zeros_like(gates)
    dc = dc_n.copy()
    dh0 = dh_n.copy()
    backward_loop(gates, cell_states[:, :steps], w_h, lengths, np.empty(batch, np.int64), dy,
                  dh_n, dc, np.empty((2, n_dirs, batch, four_hidden), x.dtype),
                  np.empty_like(dh0), dh0, d_gates)
    rows = valid_rows(lengths, steps)
    # The weight gradients sum over the valid (time, row) pairs only.
    x_t = np.ascontiguousarray(x.reshape(steps * batch, inputs)[rows].T)
    dx = np.zeros((steps * batch, inputs), x.dtype)
    dw_x = np.empty((n_dirs, inputs, four_hidden), x.dtype)
    dw_h = np.empty((n_dirs, hidden, four_hidden), x.dtype)
    for d in range(n_dirs):
        dz = d_gates[d].reshape(steps * batch, four_hidden)
        dz_t = np.ascontiguousarray(dz[rows].T)
        matmul_nt(dz, np.ascontiguousarray(w_x[d]), rows, dx, d > 0)
        matmul_nt(x_t, dz_t, np.arange(inputs), dw_x[d], False)
        h_t = np.ascontiguousarray(
            hidden_states[d, :steps].reshape(steps * batch, hidden)[rows].T)
        matmul_nt(h_t, dz_t, np.arange(hidden), dw_h[d], False)
    db = d_gates.sum(axis=(1, 2))
    return dx.reshape(steps, batch, inputs), dh0, dc, dw_x, dw_h, db
