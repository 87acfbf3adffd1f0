"""CPU drivers: Numba ``parallel=True`` time loops plus the GEMMs around them.

Shape of the work (DESIGN.md): the input projection ``x @ W_x + b`` is one
product per direction before the time loop; inside the loop each step is a
set of tiles of (direction, active batch rows, hidden units), each computing
the recurrent product for its units (all four gates) and applying the cell
math right there, with no BLAS call; both directions of a bidirectional layer
share a step. One parallel region runs all the steps: its workers claim a
step's tiles and wait on a counter for the step to finish (:mod:`.sync`),
which costs far less than a thread-pool launch and join per step. The
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
import numba
import numpy as np
from numba import njit, prange

from .cell import N_GATES, cell_backward, cell_forward, step_time
from .gemm import (
    BLOCK_ROWS,
    WORKSPACE,
    aligned_copy,
    aligned_empty,
    block_columns,
    empty_panels,
    matmul,
    pack_gate_panels,
    pack_panels,
    packed,
    panel_shape,
    product_tile,
    transposed,
    use_full_vector_width,
)
from .sync import claim, counters, finish, wait_until_done

#: Hidden units per tile: a tile's slice of W_h is (4 * UNITS_PER_TILE, H).
#: A multiple of the products' block width, so tiles start on panel edges.
UNITS_PER_TILE = 64
#: Batch rows per tile: a multiple of the products' block height.
ROWS_PER_TILE = 24
#: Divisions in the cell math go unchecked (IEEE results instead of a
#: ZeroDivisionError branch), which is what lets the loop over units vectorize.
CELL_ERROR_MODEL = "numpy"
#: The only fast-math liberty the loops take: a multiply and an add may fuse
#: into one FMA (one rounding instead of two), which halves the instructions
#: of the polynomials in the cell math. Results stay deterministic.
CELL_FASTMATH = {"contract"}
assert UNITS_PER_TILE % block_columns(np.dtype(np.float32)) == 0, "tiles start on panel edges"
assert ROWS_PER_TILE % BLOCK_ROWS == 0, "tiles hold whole register blocks"


@njit(inline="always")
def _list_running(step, lengths, batch, running, gate_rows, next_rows):
    """List the rows with ``step < lengths[row]``; return their count.

    For the n-th of them: ``running[n]`` is its batch row, ``gate_rows[d, n]``
    its row ``t * B + b`` in the (T * B, ...) per-direction arrays at this step
    (time ``step_time``), and ``next_rows[d, n]`` the same at ``step + 1``, or,
    where the row ends at this step, the padding row at time ``step + 1`` (all
    zero and untouched: backward reads it and discards the result).
    """
    count = 0
    for row in range(lengths.shape[0]):
        length = lengths[row]
        if step < length:
            running[count] = row
            for d in range(gate_rows.shape[0]):
                gate_rows[d, count] = step_time(step, length, d == 1) * batch + row
                next_time = step_time(step + 1, length, d == 1) if step + 1 < length else step + 1
                next_rows[d, count] = next_time * batch + row
            count += 1
    return count


@njit(inline="always")
def _tile_bounds(tile, n_row_tiles, n_unit_tiles, n_rows, hidden):
    """(direction, first/last running-row position, first/last unit) of a tile.

    Row tiles vary fastest, so the contiguous run of tiles a thread gets
    covers few units (few columns of W_h) across all rows.
    """
    per_direction = n_row_tiles * n_unit_tiles
    direction = tile // per_direction
    rest = tile % per_direction
    row_lo = (rest % n_row_tiles) * ROWS_PER_TILE
    unit_lo = (rest // n_row_tiles) * UNITS_PER_TILE
    return (direction, row_lo, min(row_lo + ROWS_PER_TILE, n_rows),
            unit_lo, min(unit_lo + UNITS_PER_TILE, hidden))


# The cell math of a tile runs on a per-tile scratch row, one segment of
# UNITS_PER_TILE values per quantity at a constant offset. LLVM can then prove
# the loop over units free of cross-iteration dependences and vectorize it;
# on the arrays themselves the gates sit H apart, H unknown at compile time.
_C_PREV, _DH, _DC = N_GATES, N_GATES + 1, N_GATES + 2
#: Segments of a scratch row: 4 gates, c_{t-1} (then c_t), h_t or dh, dc.
SCRATCH_SEGMENTS = N_GATES + 3


@njit(inline="always")
def _copy(source, destination):
    """``destination[:] = source`` as a plain loop: Numba's slice assignment
    checks for overlap and may allocate a temporary, too slow per tile row."""
    for j in range(source.shape[0]):
        destination[j] = source[j]


@njit(inline="always")
def _add(source, destination):
    """``destination += source`` as a plain loop (see :func:`_copy`)."""
    for j in range(source.shape[0]):
        destination[j] += source[j]


@njit(inline="always")
def _load_gates(scratch, gates, hidden, unit_lo, unit_hi):
    """Copy units [unit_lo, unit_hi) of each gate of a (4H,) row into the scratch."""
    n_units = unit_hi - unit_lo
    for gate in range(N_GATES):
        _copy(gates[gate * hidden + unit_lo:gate * hidden + unit_hi],
              scratch[gate * UNITS_PER_TILE:gate * UNITS_PER_TILE + n_units])


@njit(inline="always")
def _store_gates(scratch, gates, hidden, unit_lo, unit_hi):
    """The inverse of :func:`_load_gates`."""
    n_units = unit_hi - unit_lo
    for gate in range(N_GATES):
        _copy(scratch[gate * UNITS_PER_TILE:gate * UNITS_PER_TILE + n_units],
              gates[gate * hidden + unit_lo:gate * hidden + unit_hi])


@njit(inline="always")
def _segment(scratch, index, n_units):
    """Segment ``index`` of a scratch row, its first ``n_units`` values."""
    return scratch[index * UNITS_PER_TILE:index * UNITS_PER_TILE + n_units]


@njit(inline="always")
def _forward_units(scratch, n_units):
    """The cell on a scratch row: pre-activations and c_{t-1} in; gates, c_t, h_t out.

    In: segments 0-3 the gate pre-activations, segment 4 c_{t-1}. Out: 0-3
    the post-activation gates, 4 c_t, 5 h_t.
    """
    u = UNITS_PER_TILE
    for j in range(n_units):
        i, f, g, o, c, h = cell_forward(scratch[j], scratch[u + j], scratch[2 * u + j],
                                        scratch[3 * u + j], scratch[_C_PREV * u + j])
        scratch[j] = i
        scratch[u + j] = f
        scratch[2 * u + j] = g
        scratch[3 * u + j] = o
        scratch[_C_PREV * u + j] = c
        scratch[_DH * u + j] = h


@njit(inline="always")
def _backward_units(scratch, n_units):
    """Backward through the cell on a scratch row.

    In: segments 0-3 the saved gates, 4 c_{t-1}, 5 dh (total gradient
    reaching h_t), 6 the gradient reaching c_t. Out: 0-3 the gate gradients,
    6 the gradient reaching c_{t-1}.
    """
    u = UNITS_PER_TILE
    for j in range(n_units):
        dz_i, dz_f, dz_g, dz_o, dc_prev = cell_backward(
            scratch[j], scratch[u + j], scratch[2 * u + j], scratch[3 * u + j],
            scratch[_C_PREV * u + j], scratch[_DH * u + j], scratch[_DC * u + j])
        scratch[j] = dz_i
        scratch[u + j] = dz_f
        scratch[2 * u + j] = dz_g
        scratch[3 * u + j] = dz_o
        scratch[_DC * u + j] = dc_prev


def _most_tiles(n_dirs, batch, hidden):
    """Tiles of a step with every row running: D * row tiles * unit tiles."""
    return n_dirs * -(-batch // ROWS_PER_TILE) * -(-hidden // UNITS_PER_TILE)


def _scratch(n_dirs, batch, hidden, dtype):
    """One scratch row per tile of a step: (most tiles, SCRATCH_SEGMENTS * U)."""
    return aligned_empty((_most_tiles(n_dirs, batch, hidden), SCRATCH_SEGMENTS * UNITS_PER_TILE),
                         dtype)


@njit(inline="always")
def _step_tiles(n_rows, n_dirs, n_unit_tiles):
    """(row tiles, tiles) of a step with ``n_rows`` running rows."""
    n_row_tiles = (n_rows + ROWS_PER_TILE - 1) // ROWS_PER_TILE
    return n_row_tiles, n_dirs * n_row_tiles * n_unit_tiles


@njit(inline="always")
def _claim_in_order(claims, step, worker, n_workers, n_tiles, offset):
    """The ``offset``-th tile in ``worker``'s order if it claims that tile for
    ``step``, else -1.

    The order starts at the worker's own share (the same units every step, so
    their W_h stays in its core's cache) and wraps around into the next
    worker's, from the start that worker is busy with, so it mostly finds
    those taken.
    """
    tile = (worker * n_tiles // n_workers + offset) % n_tiles
    return tile if claim(claims, tile, step) else -1


@njit(parallel=True, cache=True, error_model=CELL_ERROR_MODEL, fastmath=CELL_FASTMATH)
def forward_loop(gates, w_h_panels, h_ring, c_ring, lengths, running, gate_rows, next_rows,
                 claims, done, scratch, y, hidden_states, cell_states):
    """Run the recurrence of every direction over all steps.

    gates:         (D, T * B, 4H) in: ``x_t @ W_x + b`` at row ``t * B + b``;
                   out, when saving: post-activation gates at valid times (padding
                   untouched); inference leaves it as it is
    w_h_panels:    (D, 4, ceil(H / W), H, W) each direction's W_h, gate by gate
                   (columns g*H ...), packed by :func:`.gemm.pack_gate_panels`
    h_ring, c_ring:(D, 2, B, H) slot 0 holds h0/c0 on entry; row b's final state
                   is in slot ``lengths[b] % 2`` on exit
    lengths:       (B,) int64, 0 <= lengths[b] <= T
    running, gate_rows, next_rows: (workers, B), (workers, D, B), (workers, D, B)
                   int64 scratch, one set per worker; claims, done: from :func:`_schedule`
    scratch:       (tiles, SCRATCH_SEGMENTS * UNITS_PER_TILE) from :func:`_scratch`
    y:             (T, B, D*H) out at valid times (direction d in columns d*H..)
    hidden_states, cell_states: (D, T, B, H) out: the state entering each valid
                   time; or (D, 0, B, H) to save nothing (inference)
    Direction 1, when present, runs in reverse. One parallel region runs all
    steps: the workers claim a step's tiles (:mod:`.sync`) and wait for the
    step to finish before the next.
    """
    n_dirs = gates.shape[0]
    batch, hidden = h_ring.shape[2], h_ring.shape[3]
    steps = y.shape[0]
    save = hidden_states.shape[1] > 0
    n_unit_tiles = (hidden + UNITS_PER_TILE - 1) // UNITS_PER_TILE
    n_workers = running.shape[0]
    for worker in prange(n_workers):
        # Numba compiles a prange body as a function of its own: the hint
        # goes here, in the function that holds the cell loops.
        use_full_vector_width()
        rows_running, rows_gate, rows_next = running[worker], gate_rows[worker], next_rows[worker]
        for step in range(steps):
            n_rows = _list_running(step, lengths, batch, rows_running, rows_gate, rows_next)
            n_row_tiles, n_tiles = _step_tiles(n_rows, n_dirs, n_unit_tiles)
            prev = step % 2
            for offset in range(n_tiles):
                tile = _claim_in_order(claims, step, worker, n_workers, n_tiles, offset)
                if tile < 0:
                    continue
                d, row_lo, row_hi, unit_lo, unit_hi = _tile_bounds(
                    tile, n_row_tiles, n_unit_tiles, n_rows, hidden)
                h_prev = h_ring[d, prev]
                for gate in range(N_GATES):
                    product_tile(h_prev, rows_running, rows_gate[d], row_lo, row_hi,
                                 w_h_panels[d, gate], 0, hidden, unit_lo, unit_hi, gates[d],
                                 gate * hidden, True)
                row_scratch = scratch[tile]
                n_units = unit_hi - unit_lo
                for n in range(row_lo, row_hi):
                    r, gate_row = rows_running[n], rows_gate[d, n]
                    t = gate_row // batch
                    c_prev = c_ring[d, prev, r, unit_lo:unit_hi]
                    _load_gates(row_scratch, gates[d, gate_row], hidden, unit_lo, unit_hi)
                    _copy(c_prev, _segment(row_scratch, _C_PREV, n_units))
                    _forward_units(row_scratch, n_units)
                    if save:
                        _store_gates(row_scratch, gates[d, gate_row], hidden, unit_lo, unit_hi)
                    c_t = _segment(row_scratch, _C_PREV, n_units)
                    h_t = _segment(row_scratch, _DH, n_units)
                    _copy(c_t, c_ring[d, 1 - prev, r, unit_lo:unit_hi])
                    _copy(h_t, h_ring[d, 1 - prev, r, unit_lo:unit_hi])
                    _copy(h_t, y[t, r, d * hidden + unit_lo:d * hidden + unit_hi])
                    if save:
                        _copy(h_prev[r, unit_lo:unit_hi], hidden_states[d, t, r, unit_lo:unit_hi])
                        _copy(c_prev, cell_states[d, t, r, unit_lo:unit_hi])
                finish(done, step)
            wait_until_done(done, step, n_tiles)


@njit(parallel=True, cache=True, error_model=CELL_ERROR_MODEL, fastmath=CELL_FASTMATH)
def backward_loop(gates, cell_states, w_h_t_panels, lengths, running, gate_rows, next_rows,
                  claims, done, scratch, dy, dh_n, dc_carry, dh_step, dh0, d_gates):
    """Backpropagate through time for every direction, last step first.

    gates:       (D, T * B, 4H) saved post-activation gates, row ``t * B + b``
    cell_states: (D, T, B, H) saved cell state entering each time
    w_h_t_panels:(D, ceil(H / W), 4H, W) each direction's W_h transposed, packed
    lengths:     (B,) int64
    running, gate_rows, next_rows: (workers, B), (workers, D, B), (workers, D, B)
                 int64 scratch, one set per worker; claims, done: from :func:`_schedule`
    scratch:     (tiles, SCRATCH_SEGMENTS * UNITS_PER_TILE) from :func:`_scratch`
    dy:          (T, B, D*H) upstream gradient of y, or (0, B, D*H) for none
    dh_n:        (D, B, H) reaches h at each row's last valid step
    dc_carry:    (D, B, H) in: dc_n; out: dc0
    dh_step:     (D, B, H) scratch: gradient reaching h at the current step
    dh0:         (D, B, H) in: dh_n (kept for rows of length 0); out: dh0
    d_gates:     (D, T * B, 4H) out at valid times; padding rows zero on entry
    One parallel region runs all steps, as in :func:`forward_loop`.
    """
    n_dirs, _, four_hidden = gates.shape
    batch, hidden = dh_n.shape[1], dh_n.shape[2]
    steps = cell_states.shape[1]
    has_dy = dy.shape[0] > 0
    n_unit_tiles = (hidden + UNITS_PER_TILE - 1) // UNITS_PER_TILE
    n_workers = running.shape[0]
    for worker in prange(n_workers):
        use_full_vector_width()
        rows_running, rows_gate, rows_next = running[worker], gate_rows[worker], next_rows[worker]
        for step in range(steps - 1, -2, -1):
            # Step -1 only turns the gate gradients of step 0 into dh0. Steps
            # are claimed as ``steps - 1 - step``, which grows as the loop runs.
            order = steps - 1 - step
            n_rows = _list_running(max(step, 0), lengths, batch, rows_running, rows_gate,
                                   rows_next)
            n_row_tiles, n_tiles = _step_tiles(n_rows, n_dirs, n_unit_tiles)
            for offset in range(n_tiles):
                tile = _claim_in_order(claims, order, worker, n_workers, n_tiles, offset)
                if tile < 0:
                    continue
                d, row_lo, row_hi, unit_lo, unit_hi = _tile_bounds(
                    tile, n_row_tiles, n_unit_tiles, n_rows, hidden)
                if step + 1 < steps:
                    product_tile(d_gates[d], rows_gate[d] if step < 0 else rows_next[d],
                                 rows_running, row_lo, row_hi, w_h_t_panels[d], 0, four_hidden,
                                 unit_lo, unit_hi, dh0[d] if step < 0 else dh_step[d], 0, False)
                if step >= 0:
                    row_scratch = scratch[tile]
                    n_units = unit_hi - unit_lo
                    dh = _segment(row_scratch, _DH, n_units)
                    for n in range(row_lo, row_hi):
                        r, gate_row = rows_running[n], rows_gate[d, n]
                        t = gate_row // batch
                        _copy(dh_step[d, r, unit_lo:unit_hi] if step + 1 < lengths[r]
                              else dh_n[d, r, unit_lo:unit_hi], dh)
                        if has_dy:
                            _add(dy[t, r, d * hidden + unit_lo:d * hidden + unit_hi], dh)
                        _load_gates(row_scratch, gates[d, gate_row], hidden, unit_lo, unit_hi)
                        dc = dc_carry[d, r, unit_lo:unit_hi]
                        c_prev = cell_states[d, t, r, unit_lo:unit_hi]
                        _copy(c_prev, _segment(row_scratch, _C_PREV, n_units))
                        _copy(dc, _segment(row_scratch, _DC, n_units))
                        _backward_units(row_scratch, n_units)
                        _store_gates(row_scratch, d_gates[d, gate_row], hidden, unit_lo, unit_hi)
                        _copy(_segment(row_scratch, _DC, n_units), dc)
                finish(done, order)
            wait_until_done(done, order, n_tiles)


def forward(x, w_x, w_h, b, h0, c0, lengths, y, saved):
    """Input projections, then the recurrence of every direction.

    x: (T, B, I) contiguous; w_x: (D, I, 4H); w_h: (D, H, 4H); b: (D, 4H)
    h0, c0: (D, B, H); lengths: (B,) int64
    y: (T, B, D*H) out, every element (zero at padded times)
    saved: (gates (D, T, B, 4H), hidden_states (D, T+1, B, H),
    cell_states (D, T+1, B, H)) to fill for backward, or None (inference).
    Returns (h_n, c_n), each (D, B, H).
    """
    steps, batch, inputs = x.shape
    n_dirs, hidden = w_h.shape[0], w_h.shape[1]
    if saved is None:
        gates = WORKSPACE.empty("gates", (n_dirs, steps, batch, N_GATES * hidden), x.dtype)
        hidden_states = cell_states = np.empty((n_dirs, 0, batch, hidden), x.dtype)
    else:
        gates, hidden_states, cell_states = saved
    flat_x = x.reshape(steps * batch, inputs)
    flat_gates = gates.reshape(n_dirs, steps * batch, -1)
    padded = padding(lengths, steps)
    if padded is not None:
        y[padded] = 0
    rows = valid_rows(padded, steps * batch)
    for d in range(n_dirs):
        matmul(flat_x, packed(w_x[d], "w_x"), rows, flat_gates[d], False, b[d])
    h_ring = aligned_empty((n_dirs, 2, batch, hidden), x.dtype)
    c_ring = aligned_empty((n_dirs, 2, batch, hidden), x.dtype)
    h_ring[:, 0], c_ring[:, 0] = h0, c0
    w_h_panels = empty_panels((n_dirs, N_GATES) + panel_shape((hidden, hidden), x.dtype),
                              x.dtype, "w_h")
    pack_gate_panels(np.ascontiguousarray(w_h), w_h_panels)
    forward_loop(flat_gates, w_h_panels, h_ring, c_ring, lengths, *_row_lists(n_dirs, batch),
                 *_schedule(n_dirs, batch, hidden, steps), _scratch(n_dirs, batch, hidden, x.dtype),
                 y, hidden_states[:, :steps], cell_states[:, :steps])
    h_n = _final_states(h_ring, lengths, padded)
    c_n = _final_states(c_ring, lengths, padded)
    if saved is not None:
        _clear_padding(gates, hidden_states, cell_states, padded)
        hidden_states[:, steps], cell_states[:, steps] = h_n, c_n
    return h_n, c_n


def _row_lists(n_dirs, batch):
    """Scratch for :func:`_list_running`, one set per worker: running
    (workers, B), gate_rows and next_rows (workers, D, B)."""
    n_workers = numba.get_num_threads()
    return (np.empty((n_workers, batch), np.int64),
            np.empty((n_workers, n_dirs, batch), np.int64),
            np.empty((n_workers, n_dirs, batch), np.int64))


def _schedule(n_dirs, batch, hidden, steps):
    """The time loops' claims and counters (:func:`.sync.counters`), for the
    most tiles a step can have; ``steps`` counts the loop's steps."""
    return counters(_most_tiles(n_dirs, batch, hidden), max(steps, 1))


def padding(lengths, steps):
    """(T, B) bool mask of the padded (time, row) pairs, ``t >= lengths[b]``, or
    None when every row runs all ``steps`` (the common case, which then skips
    the masking and gathering altogether)."""
    if lengths.min() >= steps:
        return None
    return np.arange(steps)[:, None] >= lengths[None, :]


def valid_rows(padded, n_pairs):
    """Indices ``t * B + b`` of the valid (time, row) pairs, in order; ``padded``
    from :func:`padding`, ``n_pairs`` = T * B."""
    return np.arange(n_pairs) if padded is None else np.flatnonzero(~padded)


def _valid_pairs(flat, rows):
    """The rows of a (T * B, n) array at the valid pairs ``rows``: the array
    itself when every pair is valid, else a gathered copy."""
    return flat if rows.size == flat.shape[0] else flat[rows]


def _final_states(ring, lengths, padded):
    """(D, B, H) copy of each row's final state from a (D, 2, B, H) ring: slot
    ``lengths[b] % 2`` (every row in the same slot when nothing is padded)."""
    if padded is None:
        return ring[:, lengths[0] % 2].copy()
    return ring[:, lengths % 2, np.arange(lengths.shape[0])]


def _clear_padding(gates, hidden_states, cell_states, padded):
    """Zero the saved arrays at the ``padded`` times, so they hold no stale values."""
    if padded is not None:
        steps = gates.shape[1]
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
    d_gates = WORKSPACE.empty("d_gates", gates.shape, x.dtype)
    padded = padding(lengths, steps)
    if padded is not None:
        d_gates[:, padded] = 0
    dc = aligned_copy(dc_n)
    dh0 = aligned_copy(dh_n)
    w_h_t_panels = empty_panels((n_dirs,) + panel_shape((four_hidden, hidden), x.dtype),
                                x.dtype, "w_h_t")
    for d in range(n_dirs):
        pack_panels(w_h[d], True, 0, four_hidden, w_h_t_panels[d])
    flat_shape = (n_dirs, steps * batch, four_hidden)
    backward_loop(gates.reshape(flat_shape), cell_states[:, :steps], w_h_t_panels, lengths,
                  *_row_lists(n_dirs, batch), *_schedule(n_dirs, batch, hidden, steps + 1),
                  _scratch(n_dirs, batch, hidden, x.dtype), dy, dh_n,
                  dc, aligned_empty(dh0.shape, x.dtype), dh0, d_gates.reshape(flat_shape))
    rows = valid_rows(padded, steps * batch)
    # The weight gradients sum over the valid (time, row) pairs only.
    x_valid_t = transposed(_valid_pairs(x.reshape(steps * batch, inputs), rows), "x_t")
    dx = aligned_empty((steps * batch, inputs), x.dtype)
    if padded is not None:
        dx[...] = 0
    dw_x = aligned_empty((n_dirs, inputs, four_hidden), x.dtype)
    dw_h = aligned_empty((n_dirs, hidden, four_hidden), x.dtype)
    no_bias = np.empty(0, x.dtype)
    for d in range(n_dirs):
        dz = d_gates[d].reshape(steps * batch, four_hidden)
        matmul(dz, packed(w_x[d], "w_x_t", transposed=True), rows, dx, d > 0, no_bias)
        dz_panels = packed(_valid_pairs(dz, rows), "dz")
        matmul(x_valid_t, dz_panels, np.arange(inputs), dw_x[d], False, no_bias)
        h_valid_t = transposed(
            _valid_pairs(hidden_states[d, :steps].reshape(steps * batch, hidden), rows), "h_t")
        matmul(h_valid_t, dz_panels, np.arange(hidden), dw_h[d], False, no_bias)
    db = d_gates.sum(axis=(1, 2))
    return dx.reshape(steps, batch, inputs), dh0, dc, dw_x, dw_h, db
