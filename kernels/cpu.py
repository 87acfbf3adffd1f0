"""CPU drivers: Numba ``parallel=True`` time loops plus the GEMMs around them.

Shape of the work (DESIGN.md): the input projection ``x @ W_x + b`` is one
product per direction before the time loop; inside the loop each step is one
parallel pass over tiles of (direction, active batch rows, hidden units) that
computes the recurrent product for the tile's units (all four gates) and
applies the cell math right there, so a step costs one thread-pool barrier and
no BLAS call, and both directions of a bidirectional layer share it. The
weight, bias and input gradients are products/reductions over the saved
``d_gates`` after the loop. Every product, large or per step, runs on
Numba's thread pool (:mod:`.gemm`): a BLAS call would wake a second
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
from .gemm import block_columns, matmul, pack_panels, packed, panel_shape, product_tile

#: Hidden units per tile: a tile's slice of W_h is (4 * UNITS_PER_TILE, H).
#: A multiple of the products' block width, so tiles start on panel edges.
UNITS_PER_TILE = 32
#: Batch rows per tile.
ROWS_PER_TILE = 16
assert UNITS_PER_TILE % block_columns(np.dtype(np.float32)) == 0, "tiles start on panel edges"

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
def forward_loop(gates, w_h_panels, h_ring, c_ring, z, lengths, running, y, hidden_states,
                 cell_states):
    """Run the recurrence of every direction over all steps.

    gates:         (D, T, B, 4H) in: ``x_t @ W_x + b`` by time; out: post-activation
                   gates at valid times (padding untouched)
    w_h_panels:    (D, 4, ceil(H / W), H, W) each direction's W_h, gate by gate
                   (columns g*H ...), packed by :func:`.gemm.pack_panels`
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
                product_tile(h_prev, running, row_lo, row_hi, w_h_panels[d, gate], 0, hidden,
                             unit_lo, unit_hi, z[d], gate * hidden, False)
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
def backward_loop(gates, cell_states, w_h_t_panels, lengths, running, dy, dh_n, dc_carry,
                  dz_ring, dh_step, dh0, d_gates):
    """Backpropagate through time for every direction, last step first.

    gates:       (D, T, B, 4H) saved post-activation gates
    cell_states: (D, T, B, H) saved cell state entering each time
    w_h_t_panels:(D, ceil(H / W), 4H, W) each direction's W_h transposed, packed
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
                product_tile(dz_ring[(step + 1) % 2, d], running, row_lo, row_hi,
                             w_h_t_panels[d], 0, four_hidden, unit_lo, unit_hi,
                             dh0[d] if step < 0 else dh_step[d], 0, False)
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
        matmul(flat_x, packed(w_x[d]), rows, flat_gates, False)
        flat_gates[rows] += b[d]
    h_ring = np.empty((n_dirs, 2, batch, hidden), x.dtype)
    c_ring = np.empty_like(h_ring)
    h_ring[:, 0], c_ring[:, 0] = h0, c0
    w_h_panels = np.empty((n_dirs, N_GATES) + panel_shape((hidden, hidden), x.dtype), x.dtype)
    for d in range(n_dirs):
        for gate in range(N_GATES):
            pack_panels(w_h[d, :, gate * hidden:(gate + 1) * hidden], w_h_panels[d, gate])
    z = np.empty((n_dirs, batch, N_GATES * hidden), x.dtype)
    running = np.empty(batch, np.int64)
    forward_loop(gates, w_h_panels, h_ring, c_ring, z, lengths, running, y,
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
    w_h_t_panels = np.stack([packed(w_h[d].T) for d in range(n_dirs)])
    backward_loop(gates, cell_states[:, :steps], w_h_t_panels, lengths, np.empty(batch, np.int64), dy,
                  dh_n, dc, np.empty((2, n_dirs, batch, four_hidden), x.dtype),
                  np.empty_like(dh0), dh0, d_gates)
    rows = valid_rows(lengths, steps)
    # The weight gradients sum over the valid (time, row) pairs only.
    x_t = np.ascontiguousarray(x.reshape(steps * batch, inputs)[rows].T)
    dx = np.zeros((steps * batch, inputs), x.dtype)
    dw_x = np.empty((n_dirs, inputs, four_hidden), x.dtype)
    dw_h = np.empty((n_dirs, hidden, four_hidden), x.dtype)
    all_rows = rows.size == steps * batch
    for d in range(n_dirs):
        dz = d_gates[d].reshape(steps * batch, four_hidden)
        matmul(dz, packed(w_x[d].T), rows, dx, d > 0)
        dz_panels = packed(dz if all_rows else dz[rows])
        matmul(x_t, dz_panels, np.arange(inputs), dw_x[d], False)
        h_t = np.ascontiguousarray(
            hidden_states[d, :steps].reshape(steps * batch, hidden)[rows].T)
        matmul(h_t, dz_panels, np.arange(hidden), dw_h[d], False)
    db = d_gates.sum(axis=(1, 2))
    return dx.reshape(steps, batch, inputs), dh0, dc, dw_x, dw_h, db
