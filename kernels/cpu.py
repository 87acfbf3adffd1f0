"""CPU drivers: Numba ``parallel=True`` time loops plus the GEMMs around them.

Shape of the work (DESIGN.md): the input projection ``x @ W_x + b`` is one
GEMM before the time loop; inside the loop each step is one parallel pass over
tiles of (batch rows x hidden units) that computes the recurrent product for
the tile's units (all four gates) and applies the cell math right there, so a
step costs one thread-pool barrier and no BLAS call. The weight, bias and input
gradients are GEMMs/reductions over the saved ``d_gates`` after the loop.

Every output element is produced by exactly one tile, summing in a fixed order,
so results are bit-identical across reruns and thread counts.

The callers (``nblstm``) validate and allocate; these functions only compute
into the buffers they are given.
"""
import numpy as np
from numba import njit, prange

from .cell import cell_backward, cell_forward

#: Hidden units per tile: a tile's slice of W_h is (H, 4 * UNITS_PER_TILE).
UNITS_PER_TILE = 32
#: Batch rows per tile: each W_h row segment is reused this many times from L1.
ROWS_PER_TILE = 8
#: Number of gates along the 4H axis (i, f, g, o).
N_GATES = 4


@njit(cache=True)
def _add_products(a, row_lo, row_hi, m, col_lo, col_hi, out):
    """``out[r, col_lo:col_hi] += a[r, :] @ m[:, col_lo:col_hi]`` for r in rows.

    a: (R, K), m: (K, N), out: (R, N). Sums over k in increasing order.
    """
    for k in range(a.shape[1]):
        for r in range(row_lo, row_hi):
            a_rk = a[r, k]
            for col in range(col_lo, col_hi):
                out[r, col] += a_rk * m[k, col]


@njit(inline="always")
def _tile_bounds(tile, n_unit_tiles, batch, hidden):
    row_lo = (tile // n_unit_tiles) * ROWS_PER_TILE
    unit_lo = (tile % n_unit_tiles) * UNITS_PER_TILE
    return (row_lo, min(row_lo + ROWS_PER_TILE, batch),
            unit_lo, min(unit_lo + UNITS_PER_TILE, hidden))


@njit(inline="always")
def _tile_count(batch, hidden):
    n_unit_tiles = (hidden + UNITS_PER_TILE - 1) // UNITS_PER_TILE
    n_row_tiles = (batch + ROWS_PER_TILE - 1) // ROWS_PER_TILE
    return n_row_tiles * n_unit_tiles, n_unit_tiles


@njit(parallel=True, cache=True)
def forward_loop(gates, w_h, hidden_states, cell_states, y):
    """Run the recurrence over all steps.

    gates:         (T, B, 4H) in: ``x_t @ W_x + b``; out: post-activation gates
    w_h:           (H, 4H)
    hidden_states: (S, B, H) row 0 holds h0 on entry; S = T+1 keeps every state,
                   S = 2 keeps a ring of two (inference)
    cell_states:   (S, B, H) likewise for c
    y:             (T, B, H) out: h_1..h_T (any strides)
    """
    steps, batch, four_hidden = gates.shape
    hidden = four_hidden // N_GATES
    n_slots = hidden_states.shape[0]
    n_tiles, n_unit_tiles = _tile_count(batch, hidden)
    for t in range(steps):
        h_prev = hidden_states[t % n_slots]
        c_prev = cell_states[t % n_slots]
        h_next = hidden_states[(t + 1) % n_slots]
        c_next = cell_states[(t + 1) % n_slots]
        z = gates[t]
        y_t = y[t]
        for tile in prange(n_tiles):
            row_lo, row_hi, unit_lo, unit_hi = _tile_bounds(tile, n_unit_tiles, batch, hidden)
            for gate in range(N_GATES):
                _add_products(h_prev, row_lo, row_hi, w_h,
                              gate * hidden + unit_lo, gate * hidden + unit_hi, z)
            for r in range(row_lo, row_hi):
                for u in range(unit_lo, unit_hi):
                    i, f, g, o, c, h = cell_forward(
                        z[r, u], z[r, hidden + u], z[r, 2 * hidden + u],
                        z[r, 3 * hidden + u], c_prev[r, u])
                    z[r, u] = i
                    z[r, hidden + u] = f
                    z[r, 2 * hidden + u] = g
                    z[r, 3 * hidden + u] = o
                    c_next[r, u] = c
                    h_next[r, u] = h
                    y_t[r, u] = h


@njit(parallel=True, cache=True)
def backward_loop(gates, cell_states, w_h_t, dy, dh_carry, dc_carry, d_gates):
    """Backpropagate through time, newest step first.

    gates:       (T, B, 4H) saved post-activation gates
    cell_states: (T+1, B, H) saved cell states, row 0 = c0
    w_h_t:       (4H, H) the transpose of W_h, contiguous
    dy:          (T, B, H) upstream gradient of y, or (0, B, H) for none
    dh_carry:    (B, H) in: dh_n; scratch afterwards
    dc_carry:    (B, H) in: dc_n; out: dc0
    d_gates:     (T, B, 4H) out: gradients of the gate pre-activations
    """
    steps, batch, four_hidden = gates.shape
    hidden = four_hidden // N_GATES
    has_dy = dy.shape[0] > 0
    n_tiles, n_unit_tiles = _tile_count(batch, hidden)
    for t in range(steps - 1, -1, -1):
        g_t = gates[t]
        dz_t = d_gates[t]
        dz_next = d_gates[min(t + 1, steps - 1)]
        c_t = cell_states[t + 1]
        c_prev = cell_states[t]
        for tile in prange(n_tiles):
            row_lo, row_hi, unit_lo, unit_hi = _tile_bounds(tile, n_unit_tiles, batch, hidden)
            if t < steps - 1:
                for r in range(row_lo, row_hi):
                    for u in range(unit_lo, unit_hi):
                        dh_carry[r, u] = 0
                _add_products(dz_next, row_lo, row_hi, w_h_t, unit_lo, unit_hi, dh_carry)
            for r in range(row_lo, row_hi):
                for u in range(unit_lo, unit_hi):
                    dh = dh_carry[r, u]
                    if has_dy:
                        dh += dy[t, r, u]
                    dz_i, dz_f, dz_g, dz_o, dc_prev = cell_backward(
                        g_t[r, u], g_t[r, hidden + u], g_t[r, 2 * hidden + u],
                        g_t[r, 3 * hidden + u], c_prev[r, u], c_t[r, u], dh, dc_carry[r, u])
                    dz_t[r, u] = dz_i
                    dz_t[r, hidden + u] = dz_f
                    dz_t[r, 2 * hidden + u] = dz_g
                    dz_t[r, 3 * hidden + u] = dz_o
                    dc_carry[r, u] = dc_prev


def forward(x, w_x, w_h, b, gates, hidden_states, cell_states, y):
    """Input projection GEMM, then the recurrence.

    x: (T, B, I) contiguous; w_x: (I, 4H); w_h: (H, 4H); b: (4H,)
    gates: (T, B, 4H) out; hidden_states, cell_states: (S, B, H) with row 0
    set to h0/c0; y: (T, B, H) out.
    """
    steps, batch, inputs = x.shape
    np.matmul(x.reshape(steps * batch, inputs), w_x, out=gates.reshape(steps * batch, -1))
    gates += b
    forward_loop(gates, w_h, hidden_states, cell_states, y)


def backward(x, w_x, w_h, gates, hidden_states, cell_states, dy, dh_carry, dc_carry, d_gates):
    """The backward loop, then the gradient GEMMs over all steps at once.

    Shapes as in :func:`backward_loop`; x: (T, B, I) contiguous, hidden_states:
    (T+1, B, H). ``dh_carry``/``dc_carry`` hold dh_n/dc_n on entry.

    Returns ``(dx (T, B, I), dh0 (B, H), dc0 (B, H), dW_x (I, 4H), dW_h (H, 4H), db (4H,))``;
    dc0 is ``dc_carry``.
    """
    steps, batch, inputs = x.shape
    hidden = w_h.shape[0]
    backward_loop(gates, cell_states, np.ascontiguousarray(w_h.T), dy, dh_carry, dc_carry, d_gates)
    dz = d_gates.reshape(steps * batch, N_GATES * hidden)
    dx = (dz @ w_x.T).reshape(steps, batch, inputs)
    dh0 = d_gates[0] @ w_h.T
    dw_x = x.reshape(steps * batch, inputs).T @ dz
    dw_h = hidden_states[:-1].reshape(steps * batch, hidden).T @ dz
    db = dz.sum(axis=0)
    return dx, dh0, dc_carry, dw_x, dw_h, db
