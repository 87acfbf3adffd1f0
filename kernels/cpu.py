"""CPU drivers: Numba ``parallel=True`` time loops plus the GEMMs around them.

Shape of the work (DESIGN.md): the input projection ``x @ W_x + b`` is one
product per direction before the time loop, or, where each worker owns its
batch rows and they produce more gates than its cache holds, the same
product cut into chunks of steps that each worker runs for its own rows
inside the loop just before it needs them, summed alike
(:func:`_projection_steps`); inside the loop each step is a
set of tiles of (direction, active batch rows, hidden units), each computing
the recurrent product for its units (all four gates) and applying the cell
math right there, with no BLAS call; what a tile writes for after the loop
(backward's gate gradients, forward's y and saved h and c) goes out with
non-temporal stores (:func:`.gemm.stream_into`), fenced before the tile
counts as finished, or, for y alone, before the loop returns. One parallel
region runs all the steps.
Its workers form teams (:func:`_teams`): each direction, and each group of
batch rows, is a recurrence of its own, so a team that owns one never waits
for another; within a team the workers claim a step's tiles and wait on a
counter for the step to finish (:mod:`.sync`), which costs far less than a
thread-pool launch and join per step. The
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

The callers (``nblstm``) validate the arguments; these functions trust them.

Compiled drivers: :func:`forward` and :func:`backward` only fetch their
workspace buffers in Python (and the outputs, where the caller passes an
allocator of its own); everything else (allocations, the outputs included,
the work plan, the padding, the kernel calls) runs in one compiled function
each (:func:`_forward_driver`, :func:`_backward_driver`). Python between parallel
kernels is slow twice over: each compiled call pays the dispatcher's
argument checks, and Python run right after a parallel kernel runs several
times slower than the same code run after more Python, because the kernel
has evicted the interpreter's code and data from the cores' caches
(measured on a 2-core machine: two aligned allocations and the work plan
took 5 + 10 us on their own and 24 + 41 us right after the input
projection, H=256, B=1).
"""
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange, types

from .cell import N_GATES, cell_backward, cell_state, gate_activations, step_time
from .gemm import (
    BLOCK_ROWS,
    TILE_DEPTH,
    TILE_ROWS,
    WORKSPACE,
    add_into,
    aligned_like,
    block_columns,
    chunk_sums_shape,
    column_sums,
    copy_into,
    empty_panels,
    matmul,
    matmul_packing,
    pack_gate_panels,
    pack_panels,
    pack_panels_summing,
    packing_scratch_shape,
    packs_as_it_goes,
    panel_shape,
    panel_width,
    product_in_depth_passes,
    product_tile,
    row_address,
    stream_into,
    transpose_into,
    use_full_vector_width,
)
from .sync import claim, counters, finish, store_fence, wait_until_done

#: Hidden units per tile, at most (:func:`_tile_units`, :func:`_tile_shape`):
#: a tile's slice of W_h is (H, 4 * units). A multiple of the products'
#: block width, so tiles start on panel edges. Measured on a 2-core Zen 5
#: (1 MiB L2 a core), whole calls (``bench/ab.py --api``), 128 units with
#: MAX_TILE_WEIGHT_BYTES at half a core's L2, against 64 with a quarter:
#: f32 forward H=256 B=1 1.20x / 1.03x (two runs), B=8 1.04x, B=32 1.04x /
#: 1.02x, B=128 1.03x; H=128 B=1 1.04x, B=8 1.07x, B=32 1.035x, B=128 1.01x
#: / 1.03x; f32 fwd+bwd H=256 B=1 1.12x / 1.03x, H=128 B=8 1.11x / 1.10x,
#: H=256 B=8 1.04x, B=32 1.02x, H=128 B=128 1.02x; f64 forward H=256 B=8
#: 1.03x, B=32 1.06x, H=128 B=8-128 1.01-1.02x; f64 fwd+bwd H=256 B=8 1.05x,
#: B=32 1.01x, H=128 B=128 1.02x; f32 H=512, whose tiles stay at 64 units,
#: 0.999-1.008x.
UNITS_PER_TILE = 128
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
def _list_running(step, lengths, owned, batch, running, gate_rows, next_rows):
    """List the rows of ``owned`` with ``step < lengths[row]``; return their count.

    For the n-th of them: ``running[n]`` is its batch row, ``gate_rows[d, n]``
    its row ``t * B + b`` in the (T * B, ...) per-direction arrays at this step
    (time ``step_time``), and ``next_rows[d, n]`` the same at ``step + 1``, or,
    where the row ends at this step, the padding row at time ``step + 1`` (all
    zero and untouched: backward reads it and discards the result).
    """
    count = 0
    for row in owned:
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
def _tile_bounds(tile, n_row_tiles, n_unit_tiles, tile_rows, tile_units, n_rows, hidden, order):
    """(direction, first/last running-row position, first/last unit) of a tile
    of ``tile_rows`` rows by ``tile_units`` units at step ``order``.

    Row tiles vary fastest, so the contiguous run of tiles a thread gets
    covers few units (few columns of W_h) across all rows. On odd steps,
    whose tiles are claimed in falling order (:func:`_claim_in_order`), a
    unit tile's row tiles count from its last: in either order its full row
    tiles run first and the short last one (8 rows at B=32) last, so a step
    ends on short tiles and the worker that finishes first waits less for
    the other. Measured on a 2-core AVX-512 machine, time loops alone,
    against the same numbering every step: forward f32 H=1024 B=32 1.037x /
    1.047x (two runs), B=128 1.020x, H=512 B=32 1.007x; f64 H=512 B=32
    1.032x, H=1024 B=32 1.032x, H=256 B=32 1.006x; backward 0.974-1.042x
    over the same points, 1.00x on average.
    """
    per_direction = n_row_tiles * n_unit_tiles
    direction = tile // per_direction
    rest = tile % per_direction
    row_tile = rest % n_row_tiles
    if order % 2 == 1:
        row_tile = n_row_tiles - 1 - row_tile
    row_lo = row_tile * tile_rows
    unit_lo = (rest // n_row_tiles) * tile_units
    return (direction, row_lo, min(row_lo + tile_rows, n_rows),
            unit_lo, min(unit_lo + tile_units, hidden))


# The cell math of a tile runs on a per-tile scratch row, one segment of
# UNITS_PER_TILE values per quantity at a constant offset. LLVM can then prove
# the loop over units free of cross-iteration dependences and vectorize it;
# on the arrays themselves the gates sit H apart, H unknown at compile time.
_C_PREV, _DH, _DC = N_GATES, N_GATES + 1, N_GATES + 2
#: Segments of a scratch row: 4 gates, c_{t-1} (then c_t), h_t or dh, dc.
SCRATCH_SEGMENTS = N_GATES + 3


@njit(inline="always")
def _load_gates(scratch, gates, hidden, unit_lo, unit_hi):
    """Copy units [unit_lo, unit_hi) of each gate of a (4H,) row into the scratch."""
    n_units = unit_hi - unit_lo
    for gate in range(N_GATES):
        copy_into(gates[gate * hidden + unit_lo:gate * hidden + unit_hi],
                  scratch[gate * UNITS_PER_TILE:gate * UNITS_PER_TILE + n_units])


@njit(inline="always")
def _store_gates(scratch, gates, hidden, unit_lo, unit_hi, streaming):
    """The inverse of :func:`_load_gates`; with non-temporal stores
    (:func:`.gemm.stream_into`) where ``streaming``."""
    n_units = unit_hi - unit_lo
    for gate in range(N_GATES):
        source = scratch[gate * UNITS_PER_TILE:gate * UNITS_PER_TILE + n_units]
        destination = gates[gate * hidden + unit_lo:gate * hidden + unit_hi]
        if streaming:
            stream_into(source, destination)
        else:
            copy_into(source, destination)


@njit(inline="always")
def _segment(scratch, index, n_units):
    """Segment ``index`` of a scratch row, its first ``n_units`` values."""
    return scratch[index * UNITS_PER_TILE:index * UNITS_PER_TILE + n_units]


@njit(inline="always")
def forward_units(scratch, n_units):
    """The cell on a scratch row: pre-activations and c_{t-1} in; gates, c_t, h_t out.

    In: segments 0-3 the gate pre-activations, segment 4 c_{t-1}. Out: 0-3
    the post-activation gates, 4 c_t, 5 h_t.

    Two loops over the units, the gates first, then the states: an
    iteration's chain of dependent operations is then one activation deep
    instead of two (c_t waits for the gates, h_t for tanh(c_t)), so the core
    overlaps more iterations. Measured on a 2-core AVX-512 machine: the cell
    alone 1.99 -> 1.68 ns a unit in f32, 5.88 -> 4.92 in f64; whole forward
    calls, where the cell is a large share, 1.01-1.05x (f32 H=128 B=32/128,
    f64 H=128 B=128, H=256 B=32).
    """
    u = UNITS_PER_TILE
    for j in range(n_units):
        i, f, g, o = gate_activations(scratch[j], scratch[u + j], scratch[2 * u + j],
                                      scratch[3 * u + j])
        scratch[j] = i
        scratch[u + j] = f
        scratch[2 * u + j] = g
        scratch[3 * u + j] = o
    for j in range(n_units):
        c, h = cell_state(scratch[j], scratch[u + j], scratch[2 * u + j], scratch[3 * u + j],
                          scratch[_C_PREV * u + j])
        scratch[_C_PREV * u + j] = c
        scratch[_DH * u + j] = h


@njit(inline="always")
def backward_units(scratch, n_units):
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


@njit(inline="always")
def _most_tiles(n_dirs, batch, hidden, tile_rows, tile_units):
    """Tiles of a step with every row running: D * row tiles * unit tiles."""
    return n_dirs * -(-batch // tile_rows) * -(-hidden // tile_units)


@njit(inline="always")
def _step_tiles(n_rows, n_dirs, n_unit_tiles, tile_rows):
    """(row tiles, tiles) of a step with ``n_rows`` running rows."""
    n_row_tiles = (n_rows + tile_rows - 1) // tile_rows
    return n_row_tiles, n_dirs * n_row_tiles * n_unit_tiles


@njit(inline="always")
def _claim_in_order(claims, step, member, team_size, n_tiles, offset):
    """The ``offset``-th tile in the order of a team's ``member`` if it claims
    that tile for ``step``, else -1.

    The order starts at the member's own share (the same units every step, so
    their W_h stays in its core's cache) and wraps around into the next
    member's, from the start that member is busy with, so it mostly finds
    those taken.

    Odd steps run the same order backwards, from the end of the member's
    share. A share of W_h larger than the core's L2, read in the same order
    every step, misses on every line (each is evicted just before it is read
    again); read back and forth, the lines read last in one step are read
    first in the next, while still cached. Measured on a 2-core AVX-512
    machine (2 MiB L2 a core), T=100, interleaved against the same order every
    step: f32 B=1 H=512 1.21x forward and fwd+bwd, H=1024 1.12x / 1.11x; f64
    B=1 H=512 1.26x; H=512 B=8/32 1.02-1.05x; the same where the share fits.
    """
    if step % 2 == 0:
        tile = (member * n_tiles // team_size + offset) % n_tiles
    else:
        tile = ((member + 1) * n_tiles // team_size - 1 - offset + n_tiles) % n_tiles
    return tile if claim(claims, tile, step) else -1


@njit(inline="always")
def _team_of(worker, n_workers, team_rows, team_bounds):
    """(member index, team size, first direction, direction count, owned rows,
    team index, whether the members' W_h streams from memory, whether two
    tiles' slices of it fit beside each other in L2) of ``worker``'s team:
    workers [t * size, (t + 1) * size) form team t (see :func:`_teams`)."""
    team_size = n_workers // team_bounds.shape[0]
    team = worker // team_size
    d_lo, d_hi, n_owned = team_bounds[team, 0], team_bounds[team, 1], team_bounds[team, 2]
    reads = team_bounds[team, 3]
    return (worker % team_size, team_size, d_lo, d_hi - d_lo, team_rows[team, :n_owned], team,
            reads & STREAMS != 0, reads & SLICES_FIT != 0)


@njit(inline="always")
def _unit_panel(panels, unit):
    """Byte address of the first row of the panel holding hidden unit ``unit``.
    panels: (ceil(H / W), K, W), a gate's panels of W_h or those of W_h^T."""
    return row_address(panels[unit // panels.shape[2]], 0)


@njit(inline="always")
def _next_gate_panel(w_h_panels, gate, unit_lo, after_last):
    """Byte address of the panel of W_h that a forward tile starting at unit
    ``unit_lo`` reads after its last one of ``gate``: the next gate's first;
    ``after_last`` after the last gate (:func:`_next_unit_panel`).
    w_h_panels: (4, ceil(H / W), H, W) one direction's."""
    if gate + 1 == N_GATES:
        return after_last
    return _unit_panel(w_h_panels[gate + 1], unit_lo)


@njit(inline="always")
def _next_unit_panel(panels, unit_lo, tile_units, hidden, order, wanted):
    """Byte address of the first panel of the unit tile after the one at
    ``unit_lo`` in the claim order of step ``order`` (:func:`_claim_in_order`:
    rising units on even steps, falling on odd ones), which the worker most
    likely reads next; 0 past the last unit or the first, or where not
    ``wanted`` (:func:`_prefetches_next_unit`).
    panels: (ceil(H / W), K, W), a gate's panels of W_h or those of W_h^T.
    """
    unit = unit_lo + tile_units if order % 2 == 0 else unit_lo - tile_units
    if not wanted or unit < 0 or unit >= hidden:
        return 0
    return _unit_panel(panels, unit)


@njit(inline="always")
def _prefetches_next_unit(slices_fit, row_lo, n_row_tiles, tile_rows):
    """Whether a time-loop tile whose rows start at ``row_lo`` prefetches the
    next unit tile's W_h (:func:`_next_unit_panel`): where two tiles' slices
    of W_h fit beside each other in L2 (``slices_fit``), or where it is the
    last of its units' row tiles in the claim order (the highest on every
    step: :func:`_tile_bounds`), after which no tile reads the current slice
    again this step; otherwise the next slice would evict the current one
    before the other row tiles read it.

    Measured on a 2-core AVX-512 machine, time loops alone, against no
    prefetch of the next unit tile: where the slices fit, backward f64 H=512
    B=32 1.042x, B=128 1.039x, f32 H=512 B=32 1.032x, f64 H=1024 B=8 (one row
    tile) 1.014x; forward 1.015-1.030x there and f32 H=1024 B=8 1.077x. In
    every row tile where they do not (f32 H=1024, 1 MiB a slice): backward
    B=32 0.987x, B=128 0.952x; in the last row tile only, against no
    prefetch: f32 H=1024 B=128 1.025x backward, 1.027x forward, B=32 1.035x
    and 1.016x, f64 H=1024 B=32 1.003x and 1.021x.
    """
    return slices_fit or row_lo // tile_rows == n_row_tiles - 1


@njit(inline="always")
def _product_in_passes(a, a_rows, out_rows, row_lo, row_hi, panels, pass_depth, unit_lo, unit_hi,
                       out, streams, following):
    """``out[s, unit_lo:unit_hi] = a[r] @ b[:, unit_lo:unit_hi]`` for a time
    loop's tile (:func:`.gemm.product_tile`, all of k from 0): in passes over
    ``pass_depth`` values of k at a time, each over every panel of the tile
    and every row, so that the rows' slice of ``a`` for a pass stays in L2
    while the tile's panels stream through; one pass where ``pass_depth``
    covers k. The blocks of the last panel of a pass prefetch the first
    panel's rows of the next pass, those of the last pass ``following``.
    Each pass's sum is added onto those of the passes before it, so the
    rounding depends on the passes (on ``pass_depth``), not on the tile.
    """
    depth = panels.shape[1]
    width = panels.shape[2]
    for k_lo in range(0, depth, pass_depth):
        k_hi = min(k_lo + pass_depth, depth)
        after = following if k_hi == depth else row_address(panels[unit_lo // width], k_hi)
        product_tile(a, a_rows, out_rows, row_lo, row_hi, panels, k_lo, k_hi, unit_lo, unit_hi,
                     out, 0, k_lo > 0, 0, streams, after)


@njit(inline="always")
def _worker_rows(row_lists, worker, n_dirs):
    """``worker``'s (running (B,), gate_rows (D, B), next_rows (D, B)) for
    :func:`_list_running`, views of row_lists (workers, 1 + 2D, B)."""
    return (row_lists[worker, 0], row_lists[worker, 1:1 + n_dirs],
            row_lists[worker, 1 + n_dirs:])


@njit(inline="always")
def _project_chunk(x, w_x_panels, bias, gates, lengths, owned, d_lo, n_dirs, step_lo, step_hi,
                   row_lists, rows):
    """``gates[d, r] = x[r] @ W_x[d] + b[d]`` for the rows r that the rows
    ``owned`` read at steps [step_lo, step_hi) of directions [d_lo, d_lo +
    n_dirs): the input projection of a chunk of steps, by the one worker
    that then runs them (:func:`_projection_steps`).

    x: (T * B, I); w_x_panels: (D, 1, ceil(4H / W), I, W); bias: (D, 4H);
    gates: (D, T * B, 4H) out; row_lists: the worker's (running, gate_rows,
    next_rows) for :func:`_list_running`, which lists each step's rows; rows:
    (D, C * B) int64 scratch, C >= step_hi - step_lo. The rows run in groups
    of at most TILE_ROWS over all 4H columns, each a tile of
    :func:`.gemm.matmul` (:func:`.gemm.product_in_depth_passes`), so the
    gates are the same bits whichever way they were projected.
    """
    running, gate_rows, next_rows = row_lists
    n_cols = gates.shape[2]
    n_rows = 0
    for step in range(step_lo, step_hi):
        count = _list_running(step, lengths, owned, lengths.shape[0], running, gate_rows,
                              next_rows)
        for d in range(d_lo, d_lo + n_dirs):
            copy_into(gate_rows[d, :count], rows[d, n_rows:n_rows + count])
        n_rows += count
    n_groups = -(-n_rows // TILE_ROWS)
    for d in range(d_lo, d_lo + n_dirs):
        for group in range(n_groups):
            first, last = group * n_rows // n_groups, (group + 1) * n_rows // n_groups
            product_in_depth_passes(x, rows[d], first, last, w_x_panels[d, 0], 0, n_cols,
                                    gates[d], False, bias[d], False)


@njit(parallel=True, cache=True, error_model=CELL_ERROR_MODEL, fastmath=CELL_FASTMATH)
def forward_loop(gates, w_h_panels, h_ring, c_ring, lengths, team_rows, team_bounds, tiles,
                 row_lists, claims, done, scratch, y, hidden_states, cell_states, projection):
    """Run the recurrence of every direction over all steps.

    gates:         (D, T * B, 4H) in: ``x_t @ W_x + b`` at row ``t * B + b``
                   (unless ``projection`` says the loop projects them);
                   out, when saving: post-activation gates at valid times (padding
                   untouched); inference leaves it as it is
    w_h_panels:    (D, 4, ceil(H / W), H, W) each direction's W_h, gate by gate
                   (columns g*H ...), packed by :func:`.gemm.pack_gate_panels`
    h_ring, c_ring:(D, 2, B, H) slot 0 holds h0/c0 on entry; row b's final state
                   is in slot ``lengths[b] % 2`` on exit
    lengths:       (B,) int64, 0 <= lengths[b] <= T
    team_rows, team_bounds: (teams, B), (teams, 4) int64 from :func:`_teams`
    tiles:         (rows, units, pass depth) of a tile, from :func:`_tile_shape`;
                   at most UNITS_PER_TILE units, and the product in one pass
    row_lists:     (workers, 1 + 2D, B) int64 scratch (:func:`_worker_rows`)
    claims, done:  (teams, ...) int64 claim and step counters (:func:`.sync.counters`)
    scratch:       (workers, SCRATCH_SEGMENTS * UNITS_PER_TILE) from :func:`_work_plan`
    y:             (T, B, D*H) out at valid times (direction d in columns d*H..),
                   with non-temporal stores: nothing reads y in the loop, and an
                   ordinary store first reads its line, from memory where y is
                   large. Measured on a 2-core Zen 4 (1 MiB L2 a core, 32 MiB
                   L3), whole forward calls against ordinary stores: f64 H=256
                   B=32 1.035x, H=128 B=128 1.037x; f32 H=128 B=32 1.028x,
                   H=256 B=128 1.057x; B=1 to 8 1.00-1.02x; fwd+bwd 1.00x
    hidden_states, cell_states: (D, T + 1, B, H) out at t < T: the state
                   entering each valid time; or (D, 0, B, H) to save nothing
                   (inference)
    projection:    (x (T * B, I), W_x packed by :func:`.gemm.pack_gate_panels`
                   (D, 1, ceil(4H / W), I, W), b (D, 4H), rows (workers, D, C * B)
                   int64 scratch, C): where C > 0 (:func:`_projection_steps`),
                   ``gates`` holds nothing on entry and each worker projects
                   its own rows C steps at a time (:func:`_project_chunk`);
                   where C = 0 the caller projected them all
    Direction 1, when present, runs in reverse. One parallel region runs all
    steps. Each team of workers runs its own directions and batch rows, which
    depend on no other team's: its members claim a step's tiles (:mod:`.sync`)
    and wait for the team's step to finish before the next.
    """
    n_dirs = gates.shape[0]
    batch, hidden = h_ring.shape[2], h_ring.shape[3]
    steps = y.shape[0]
    save = hidden_states.shape[1] > 0
    tile_rows, tile_units, _ = tiles
    n_unit_tiles = (hidden + tile_units - 1) // tile_units
    n_workers = row_lists.shape[0]
    for worker in prange(n_workers):
        # Numba compiles a prange body as a function of its own: the hint
        # goes here, in the function that holds the cell loops.
        use_full_vector_width()
        member, team_size, d_lo, team_dirs, owned, team, streams, slices_fit = (
            _team_of(worker, n_workers, team_rows, team_bounds))
        rows_running, rows_gate, rows_next = _worker_rows(row_lists, worker, n_dirs)
        row_scratch = scratch[worker]
        x, w_x_panels, bias, projected_rows, chunk_steps = projection
        for step in range(steps):
            if chunk_steps > 0 and step % chunk_steps == 0:
                _project_chunk(x, w_x_panels, bias, gates, lengths, owned, d_lo, team_dirs, step,
                               min(step + chunk_steps, steps),
                               (rows_running, rows_gate, rows_next), projected_rows[worker])
            n_rows = _list_running(step, lengths, owned, batch, rows_running, rows_gate,
                                   rows_next)
            n_row_tiles, n_tiles = _step_tiles(n_rows, team_dirs, n_unit_tiles, tile_rows)
            prev = step % 2
            for offset in range(n_tiles):
                tile = _claim_in_order(claims[team], step, member, team_size, n_tiles, offset)
                if tile < 0:
                    continue
                d, row_lo, row_hi, unit_lo, unit_hi = _tile_bounds(
                    tile, n_row_tiles, n_unit_tiles, tile_rows, tile_units, n_rows, hidden, step)
                d += d_lo
                h_prev = h_ring[d, prev]
                next_unit = _next_unit_panel(
                    w_h_panels[d, 0], unit_lo, tile_units, hidden, step,
                    _prefetches_next_unit(slices_fit, row_lo, n_row_tiles, tile_rows))
                for gate in range(N_GATES):
                    product_tile(h_prev, rows_running, rows_gate[d], row_lo, row_hi,
                                 w_h_panels[d, gate], 0, hidden, unit_lo, unit_hi, gates[d],
                                 gate * hidden, True, 0, streams,
                                 _next_gate_panel(w_h_panels[d], gate, unit_lo, next_unit))
                n_units = unit_hi - unit_lo
                for n in range(row_lo, row_hi):
                    r, gate_row = rows_running[n], rows_gate[d, n]
                    t = gate_row // batch
                    c_prev = c_ring[d, prev, r, unit_lo:unit_hi]
                    _load_gates(row_scratch, gates[d, gate_row], hidden, unit_lo, unit_hi)
                    copy_into(c_prev, _segment(row_scratch, _C_PREV, n_units))
                    forward_units(row_scratch, n_units)
                    if save:
                        # In place, over the row just loaded, so still cached.
                        _store_gates(row_scratch, gates[d, gate_row], hidden, unit_lo, unit_hi,
                                     False)
                    c_t = _segment(row_scratch, _C_PREV, n_units)
                    h_t = _segment(row_scratch, _DH, n_units)
                    copy_into(c_t, c_ring[d, 1 - prev, r, unit_lo:unit_hi])
                    copy_into(h_t, h_ring[d, 1 - prev, r, unit_lo:unit_hi])
                    stream_into(h_t, y[t, r, d * hidden + unit_lo:d * hidden + unit_hi])
                    if save:
                        stream_into(h_prev[r, unit_lo:unit_hi],
                                    hidden_states[d, t, r, unit_lo:unit_hi])
                        stream_into(c_prev, cell_states[d, t, r, unit_lo:unit_hi])
                if save:
                    store_fence()
                finish(done[team], step)
            wait_until_done(done[team], step, n_tiles)
        # Makes this worker's streamed stores of y visible before the region
        # ends; when saving, each tile's fence above already has.
        store_fence()


@njit(parallel=True, cache=True, error_model=CELL_ERROR_MODEL, fastmath=CELL_FASTMATH)
def backward_loop(gates, cell_states, w_h_t_panels, lengths, team_rows, team_bounds, tiles,
                  row_lists, claims, done, scratch, dy, dh_n, dc_carry, dh_step, dh0, d_gates):
    """Backpropagate through time for every direction, last step first.

    gates:       (D, T * B, 4H) saved post-activation gates, row ``t * B + b``
    cell_states: (D, T + 1, B, H) saved cell state entering each time t < T
    w_h_t_panels:(D, ceil(H / W), 4H, W) each direction's W_h transposed, packed
    lengths:     (B,) int64
    team_rows, team_bounds, row_lists, claims, done, scratch: as in
                 :func:`forward_loop`
    tiles:       (rows, units, pass depth) of a tile, from :func:`_tile_shape`:
                 its product runs over k = 4H in passes of that depth
                 (:func:`_product_in_passes`), its cell math on UNITS_PER_TILE
                 units of a row at a time
    dy:          (T, B, D*H) upstream gradient of y, or (0, B, D*H) for none
    dh_n:        (D, B, H) reaches h at each row's last valid step
    dc_carry:    (D, B, H) in: dc_n; out: dc0
    dh_step:     (D, B, H) scratch: gradient reaching h at the current step
    dh0:         (D, B, H) in: dh_n (kept for rows of length 0); out: dh0
    d_gates:     (D, T * B, 4H) out at valid times; padding rows zero on entry
    One parallel region runs all steps, in teams, as in :func:`forward_loop`.
    """
    n_dirs = gates.shape[0]
    batch, hidden = dh_n.shape[1], dh_n.shape[2]
    steps = gates.shape[1] // batch
    has_dy = dy.shape[0] > 0
    tile_rows, tile_units, pass_depth = tiles
    n_unit_tiles = (hidden + tile_units - 1) // tile_units
    n_workers = row_lists.shape[0]
    for worker in prange(n_workers):
        use_full_vector_width()
        member, team_size, d_lo, team_dirs, owned, team, streams, slices_fit = (
            _team_of(worker, n_workers, team_rows, team_bounds))
        rows_running, rows_gate, rows_next = _worker_rows(row_lists, worker, n_dirs)
        row_scratch = scratch[worker]
        for step in range(steps - 1, -2, -1):
            # Step -1 only turns the gate gradients of step 0 into dh0. Steps
            # are claimed as ``steps - 1 - step``, which grows as the loop runs.
            order = steps - 1 - step
            n_rows = _list_running(max(step, 0), lengths, owned, batch, rows_running, rows_gate,
                                   rows_next)
            n_row_tiles, n_tiles = _step_tiles(n_rows, team_dirs, n_unit_tiles, tile_rows)
            for offset in range(n_tiles):
                tile = _claim_in_order(claims[team], order, member, team_size, n_tiles, offset)
                if tile < 0:
                    continue
                d, row_lo, row_hi, tile_lo, tile_hi = _tile_bounds(
                    tile, n_row_tiles, n_unit_tiles, tile_rows, tile_units, n_rows, hidden, order)
                d += d_lo
                if step + 1 < steps:
                    next_unit = _next_unit_panel(
                        w_h_t_panels[d], tile_lo, tile_units, hidden, order,
                        _prefetches_next_unit(slices_fit, row_lo, n_row_tiles, tile_rows))
                    _product_in_passes(d_gates[d], rows_gate[d] if step < 0 else rows_next[d],
                                       rows_running, row_lo, row_hi, w_h_t_panels[d], pass_depth,
                                       tile_lo, tile_hi, dh0[d] if step < 0 else dh_step[d],
                                       streams, next_unit)
                if step >= 0:
                    for n in range(row_lo, row_hi):
                        r, gate_row = rows_running[n], rows_gate[d, n]
                        t = gate_row // batch
                        carried = step + 1 < lengths[r]
                        for unit_lo in range(tile_lo, tile_hi, UNITS_PER_TILE):
                            unit_hi = min(unit_lo + UNITS_PER_TILE, tile_hi)
                            n_units = unit_hi - unit_lo
                            dh = _segment(row_scratch, _DH, n_units)
                            copy_into(dh_step[d, r, unit_lo:unit_hi] if carried
                                      else dh_n[d, r, unit_lo:unit_hi], dh)
                            if has_dy:
                                add_into(dy[t, r, d * hidden + unit_lo:d * hidden + unit_hi], dh)
                            _load_gates(row_scratch, gates[d, gate_row], hidden, unit_lo, unit_hi)
                            dc = dc_carry[d, r, unit_lo:unit_hi]
                            copy_into(cell_states[d, t, r, unit_lo:unit_hi],
                                      _segment(row_scratch, _C_PREV, n_units))
                            copy_into(dc, _segment(row_scratch, _DC, n_units))
                            backward_units(row_scratch, n_units)
                            _store_gates(row_scratch, d_gates[d, gate_row], hidden, unit_lo,
                                         unit_hi, True)
                            copy_into(_segment(row_scratch, _DC, n_units), dc)
                store_fence()
                finish(done[team], order)
            wait_until_done(done[team], order, n_tiles)


def forward(x, w_x, w_h, b, h0, c0, lengths, training, empty=None):
    """Input projections, then the recurrence of every direction.

    x: (T, B, I) contiguous; w_x: (D, I, 4H); w_h: (D, H, 4H); b: (D, 4H)
    h0, c0: (D, B, H) contiguous; lengths: (B,) int64
    training: whether to return what backward needs.
    empty: where y and the saved arrays come from: ``empty(shape, dtype)``,
    an uninitialized C-contiguous array starting on a cache line (the API
    passes its recycling pool for large calls); None for fresh memory
    allocated in compiled code, which costs a small call the least.

    Returns ``(y (T, B, D*H), h_n (D, B, H), c_n (D, B, H), saved)``: y zero at
    padded times; saved, when training, ``(gates (D, T, B, 4H), hidden_states
    (D, T+1, B, H), cell_states (D, T+1, B, H))`` for :func:`backward`, else None.
    """
    steps, batch, _ = x.shape
    n_dirs, hidden = w_h.shape[0], w_h.shape[1]
    dtype = x.dtype
    y_shape, gates_shape, states_shape = _forward_shapes.py_func(steps, batch, n_dirs, hidden)
    unallocated = _UNALLOCATED_FORWARD[dtype.num]
    if empty is None:
        outputs = unallocated
    elif training:
        outputs = (empty(y_shape, dtype), empty(gates_shape, dtype), empty(states_shape, dtype),
                   empty(states_shape, dtype))
    else:
        outputs = (empty(y_shape, dtype),) + unallocated[1:]
    if training:
        inference_gates = unallocated[1]
    else:
        inference_gates = WORKSPACE.empty("gates", gates_shape, dtype)
    w_x_panels = empty_panels((n_dirs, 1) + panel_shape(w_x.shape[1:], dtype), dtype, "w_x")
    w_h_panels = empty_panels((n_dirs, N_GATES) + panel_shape((hidden, hidden), dtype),
                              dtype, "w_h")
    n_workers = numba.get_num_threads()
    chunks = empty_panels(packing_scratch_shape(n_workers, dtype), dtype, "chunks")
    y, h_n, c_n, gates, hidden_states, cell_states = _forward_driver(
        x, np.ascontiguousarray(w_x), np.ascontiguousarray(w_h), np.ascontiguousarray(b), h0, c0,
        lengths, training, outputs, (inference_gates, w_x_panels, w_h_panels, chunks), n_workers,
        _team_budgets())
    return y, h_n, c_n, ((gates, hidden_states, cell_states) if training else None)


def _zero_size(n_dims, dtype):
    """Zero-size arrays of ``dtype``, one per number of dimensions in ``n_dims``."""
    return tuple(np.empty((0,) * n, dtype) for n in n_dims)


#: dtype number -> zero-size arrays in place of forward's (y, gates,
#: hidden_states, cell_states), where its driver allocates them itself.
_UNALLOCATED_FORWARD = {np.dtype(t).num: _zero_size((3, 4, 4, 4), t)
                        for t in (np.float32, np.float64)}
#: The same for backward's (dx, dh0, dc0, dW_x, dW_h, db).
_UNALLOCATED_BACKWARD = {np.dtype(t).num: _zero_size((3, 3, 3, 3, 3, 2), t)
                         for t in (np.float32, np.float64)}


@njit(inline="always")
def _forward_shapes(steps, batch, n_dirs, hidden):
    """Shapes of forward's y, saved gates and saved states (each of the two),
    for the allocations in Python (``.py_func``) and in compiled code."""
    return ((steps, batch, n_dirs * hidden), (n_dirs, steps, batch, N_GATES * hidden),
            (n_dirs, steps + 1, batch, hidden))


@njit(inline="always")
def _forward_outputs(x, n_dirs, hidden, training, outputs, gates_workspace):
    """(y, gates, hidden_states, cell_states) for :func:`_forward_driver`:
    those in ``outputs``, or fresh where they are zero-size; when not
    training the gates from the workspace, the states (D, 0, B, H)."""
    steps, batch = x.shape[0], x.shape[1]
    y_shape, gates_shape, states_shape = _forward_shapes(steps, batch, n_dirs, hidden)
    y, gates, hidden_states, cell_states = outputs
    if y.size == 0:
        y = aligned_like(x, y_shape)
    if not training:
        return (y, gates_workspace, np.empty((n_dirs, 0, batch, hidden), x.dtype),
                np.empty((n_dirs, 0, batch, hidden), x.dtype))
    if gates.size == 0:
        gates = aligned_like(x, gates_shape)
        hidden_states = aligned_like(x, states_shape)
        cell_states = aligned_like(x, states_shape)
    return y, gates, hidden_states, cell_states


@njit(cache=True)
def _forward_driver(x, w_x, w_h, b, h0, c0, lengths, training, outputs, workspace, n_workers,
                    budgets):
    """:func:`forward` after the workspace: everything else, compiled.

    outputs: (y (T, B, D*H), gates (D, T, B, 4H), hidden_states, cell_states
    (D, T+1, B, H)) to write, or zero-size arrays where this allocates them
    (:func:`_forward_outputs`); workspace: (room (D, T, B, 4H) for the gates
    of an inference pass, the packed W_x, the packed W_h, the scratch of
    :func:`.gemm.matmul_packing`, which the input projection uses instead of
    the packed W_x when it has few rows); n_workers: Numba's thread count;
    budgets: :func:`_team_budgets`. Returns (y, h_n, c_n, gates,
    hidden_states, cell_states), the last two (D, 0, B, H) when not training.
    """
    gates_workspace, w_x_panels, w_h_panels, chunks = workspace
    steps, batch, inputs = x.shape
    n_dirs, hidden = w_h.shape[0], w_h.shape[1]
    y, gates, hidden_states, cell_states = _forward_outputs(x, n_dirs, hidden, training, outputs,
                                                            gates_workspace)
    rows = valid_rows(lengths, steps)
    padded = rows.shape[0] < steps * batch
    if padded:
        _clear_padding(y, lengths)
    h_ring = aligned_like(x, (n_dirs, 2, batch, hidden))
    c_ring = aligned_like(x, (n_dirs, 2, batch, hidden))
    _copy_states(h0, h_ring[:, 0])
    _copy_states(c0, c_ring[:, 0])
    plan = _work_plan(n_dirs, lengths, hidden, x, steps, n_workers, budgets, _run_time(False))
    flat_x = x.reshape(steps * batch, inputs)
    flat_gates = gates.reshape(n_dirs, steps * batch, N_GATES * hidden)
    chunk_steps = _projection_steps(plan[1], n_workers, hidden, x.itemsize, steps, budgets)
    if chunk_steps > 0:
        pack_gate_panels(w_x, w_x_panels)
    elif packs_as_it_goes(rows.shape[0], x.itemsize):
        for d in range(n_dirs):
            matmul_packing(flat_x, w_x[d], _run_time(False), rows, flat_gates[d],
                           _run_time(False), b[d], chunks)
    else:
        pack_gate_panels(w_x, w_x_panels)
        for d in range(n_dirs):
            matmul(flat_x, w_x_panels[d, 0], rows, flat_gates[d], _run_time(False), b[d])
    pack_gate_panels(w_h, w_h_panels)
    projected_rows = np.empty((n_workers, n_dirs, chunk_steps * batch), np.int64)
    forward_loop(flat_gates, w_h_panels, h_ring, c_ring, lengths, *plan, y,
                 hidden_states, cell_states, (flat_x, w_x_panels, b, projected_rows, chunk_steps))
    h_n = _final_states(h_ring, lengths)
    c_n = _final_states(c_ring, lengths)
    if training:
        if padded:
            for d in range(n_dirs):
                _clear_padding(gates[d], lengths)
                _clear_padding(hidden_states[d, :steps], lengths)
                _clear_padding(cell_states[d, :steps], lengths)
        _copy_states(h_n, hidden_states[:, steps])
        _copy_states(c_n, cell_states[:, steps])
    return y, h_n, c_n, gates, hidden_states, cell_states


def backward(x, w_x, w_h, saved, lengths, dy, dh_n, dc_n, empty=None):
    """The backward loop, then the gradient GEMMs over all steps at once.

    x: (T, B, I) contiguous; w_x: (D, I, 4H); w_h: (D, H, 4H) contiguous
    saved: (gates, hidden_states, cell_states) from :func:`forward`
    lengths: (B,) int64; dy: (T, B, D*H) contiguous or None; dh_n, dc_n:
    (D, B, H) contiguous; empty: where the results come from, as in
    :func:`forward`

    Returns ``(dx (T, B, I), dh0 (D, B, H), dc0 (D, B, H), dW_x (D, I, 4H),
    dW_h (D, H, 4H), db (D, 4H))``.
    """
    gates, hidden_states, cell_states = saved
    n_dirs, steps, batch, four_hidden = gates.shape
    inputs = x.shape[2]
    hidden = four_hidden // N_GATES
    dtype = x.dtype
    n_valid = int(lengths.sum())
    if dy is None:
        dy = np.empty((0, batch, n_dirs * hidden), dtype)
    if empty is None:
        outputs = _UNALLOCATED_BACKWARD[dtype.num]
    else:
        dx_shape, state_shape, dw_x_shape, dw_h_shape, db_shape = _backward_shapes.py_func(
            steps, batch, inputs, n_dirs, hidden)
        outputs = (empty(dx_shape, dtype), empty(state_shape, dtype), empty(state_shape, dtype),
                   empty(dw_x_shape, dtype), empty(dw_h_shape, dtype), empty(db_shape, dtype))
    n_workers = numba.get_num_threads()
    workspace = (
        WORKSPACE.empty("d_gates", gates.shape, dtype),
        empty_panels((n_dirs,) + panel_shape((four_hidden, hidden), dtype), dtype, "w_h_t"),
        empty_panels((n_dirs,) + panel_shape((four_hidden, inputs), dtype), dtype, "w_x_t"),
        empty_panels(panel_shape((n_valid, four_hidden), dtype), dtype, "dz"),
        WORKSPACE.empty("dz_sums", chunk_sums_shape(n_valid, four_hidden), dtype),
        WORKSPACE.empty("x_t", (inputs, n_valid), dtype),
        WORKSPACE.empty("h_t", (hidden, n_valid), dtype),
        empty_panels(packing_scratch_shape(n_workers, dtype), dtype, "chunks"))
    return _backward_driver(x, np.ascontiguousarray(w_x), w_h, gates, hidden_states, cell_states,
                            lengths, dy, dh_n, dc_n, outputs, workspace, n_workers,
                            _team_budgets())


@njit(inline="always")
def _backward_shapes(steps, batch, inputs, n_dirs, hidden):
    """Shapes of backward's dx, dh0 and dc0 (each), dW_x, dW_h and db, for
    the allocations in Python (``.py_func``) and in compiled code."""
    return ((steps, batch, inputs), (n_dirs, batch, hidden), (n_dirs, inputs, N_GATES * hidden),
            (n_dirs, hidden, N_GATES * hidden), (n_dirs, N_GATES * hidden))


@njit(inline="always")
def _backward_outputs(x, n_dirs, hidden, outputs):
    """(dx (T, B, I), dh0, dc0 (D, B, H), dW_x (D, I, 4H), dW_h (D, H, 4H),
    db (D, 4H)) for :func:`_backward_driver`: those in ``outputs``, or fresh
    where they are zero-size."""
    steps, batch, inputs = x.shape
    dx_shape, state_shape, dw_x_shape, dw_h_shape, db_shape = _backward_shapes(
        steps, batch, inputs, n_dirs, hidden)
    dx, dh0, dc, dw_x, dw_h, db = outputs
    if dx.size == 0:
        dx = aligned_like(x, dx_shape)
        dh0 = aligned_like(x, state_shape)
        dc = aligned_like(x, state_shape)
        dw_x = aligned_like(x, dw_x_shape)
        dw_h = aligned_like(x, dw_h_shape)
        db = aligned_like(x, db_shape)
    return dx, dh0, dc, dw_x, dw_h, db


@njit(cache=True)
def _backward_driver(x, w_x, w_h, gates, hidden_states, cell_states, lengths, dy, dh_n, dc_n,
                     outputs, workspace, n_workers, budgets):
    """:func:`backward` after the workspace: everything else, compiled.

    dy: (T, B, D*H), or (0, B, D*H) for none; outputs: (dx (T, B, I), dh0,
    dc0 (D, B, H), dW_x (D, I, 4H), dW_h (D, H, 4H), db (D, 4H)) to write, or
    zero-size arrays where this allocates them (:func:`_backward_outputs`);
    workspace: (d_gates (D, T, B, 4H), W_h^T panels, W_x^T panels, d_gates
    panels, the d_gates' sums by chunk of rows (:func:`.gemm.chunk_sums_shape`),
    x^T (I, V), h^T (H, V), the scratch of
    :func:`.gemm.matmul_packing`, which dx uses instead of the W_x^T panels
    when it has few rows), V the valid (time, row) pairs; n_workers, budgets:
    as in :func:`_forward_driver`. Returns the results, as :func:`backward`.
    """
    (d_gates, w_h_t_panels, w_x_t_panels, dz_panels, dz_sums, x_valid_t, h_valid_t,
     chunks) = workspace
    n_dirs, steps, batch, four_hidden = gates.shape
    inputs = x.shape[2]
    hidden = four_hidden // N_GATES
    dx_steps, dh0, dc, dw_x, dw_h, db = _backward_outputs(x, n_dirs, hidden, outputs)
    rows = valid_rows(lengths, steps)
    padded = rows.shape[0] < steps * batch
    if padded:
        for d in range(n_dirs):
            _clear_padding(d_gates[d], lengths)
    dh_step = aligned_like(x, (n_dirs, batch, hidden))
    _copy_states(dc_n, dc)
    _copy_states(dh_n, dh0)
    plan = _work_plan(n_dirs, lengths, hidden, x, steps + 1, n_workers, budgets,
                      _run_time(True))
    flat_shape = (n_dirs, steps * batch, four_hidden)
    flat_gates, flat_d_gates = gates.reshape(flat_shape), d_gates.reshape(flat_shape)
    dx = dx_steps.reshape(steps * batch, inputs)
    if padded:
        dx[...] = 0
    no_bias = np.empty(0, x.dtype)
    input_rows, hidden_rows = np.arange(inputs), np.arange(hidden)
    for d in range(n_dirs):
        pack_panels(w_h[d], _run_time(True), _run_time(0), hidden, w_h_t_panels[d])
    backward_loop(flat_gates, cell_states, w_h_t_panels, lengths, *plan, dy, dh_n,
                  dc, dh_step, dh0, flat_d_gates)
    # The weight gradients sum over the valid (time, row) pairs only.
    transpose_into(_valid_pairs(x.reshape(steps * batch, inputs), rows), x_valid_t)
    for d in range(n_dirs):
        if packs_as_it_goes(rows.shape[0], x.itemsize):
            matmul_packing(flat_d_gates[d], w_x[d], _run_time(True), rows, dx, d > 0, no_bias,
                           chunks)
        else:
            pack_panels(w_x[d], _run_time(True), _run_time(0), inputs, w_x_t_panels[d])
            matmul(flat_d_gates[d], w_x_t_panels[d], rows, dx, d > 0, no_bias)
        pack_panels_summing(_valid_pairs(flat_d_gates[d], rows), dz_panels, dz_sums)
        column_sums(dz_sums.reshape(1, dz_sums.shape[0], four_hidden), db[d:d + 1])
        matmul(x_valid_t, dz_panels, input_rows, dw_x[d], _run_time(False), no_bias)
        states = hidden_states[d].reshape(-1, hidden)[:steps * batch]
        transpose_into(_valid_pairs(states, rows), h_valid_t)
        matmul(h_valid_t, dz_panels, hidden_rows, dw_h[d], _run_time(False), no_bias)
    return dx_steps, dh0, dc, dw_x, dw_h, db


@njit([types.boolean(types.boolean), types.int64(types.int64)], cache=True)
def _run_time(value):
    """``value`` as a run-time bool or int64. A constant passed straight to
    another compiled function is typed as a literal, and that function is then
    compiled once more for it (seconds for each product and packing kernel)
    instead of reusing the version compiled for the run-time type."""
    return value


@njit(cache=True)
def _work_plan(n_dirs, lengths, hidden, like, steps, n_workers, budgets, backward):
    """Everything a time loop needs to share its work out: (team_rows,
    team_bounds, tiles, row_lists, claims, done, scratch) for :func:`forward_loop`
    or, where ``backward``, :func:`backward_loop`, whose ``steps`` counts the
    loop's steps, run by ``n_workers`` workers; ``like`` gives the dtype of
    the scratch. (Numba's thread count comes from the caller: compiled code
    that asks for it cannot be cached.)"""
    batch = lengths.shape[0]
    team_rows, team_bounds = _teams(n_dirs, lengths, hidden, like.itemsize, n_workers, budgets)
    tiles = _tile_shape(batch, hidden, like.itemsize, team_bounds, n_workers, backward, budgets)
    row_lists = np.empty((n_workers, 1 + 2 * n_dirs, batch), np.int64)
    n_teams = team_bounds.shape[0]
    claims, done = counters(n_teams * _most_tiles(n_dirs, batch, hidden, tiles[0], tiles[1]),
                            n_teams * max(steps, 1))
    scratch = aligned_like(like, (n_workers, SCRATCH_SEGMENTS * UNITS_PER_TILE))
    return (team_rows, team_bounds, tiles, row_lists, claims.reshape(n_teams, -1),
            done.reshape(n_teams, -1), scratch)


@njit(inline="always")
def _projection_steps(team_bounds, n_workers, hidden, itemsize, steps, budgets):
    """Steps per chunk of the input projection inside the forward time loop
    (:func:`_project_chunk`), or 0 to project every row before it.

    Where every team has one worker, each worker owns its rows and runs all
    their units: it can project a chunk of its own steps just before it
    runs them, and the chunk's gates (C * rows * 4H values a direction) are
    then still in its L2 when its tiles add the recurrent product onto them,
    instead of coming back from memory, where a projection of all T * B rows
    before the loop left them (26 MiB at f32 H=128 B=128). C is the most
    steps whose gates fit ``budgets[9]`` (:data:`MAX_PROJECTION_CHUNK_BYTES`)
    for the team with the most rows; a chunk must also give the team with
    the fewest rows ``budgets[10]`` (:data:`MIN_PROJECTION_CHUNK_ROWS`) rows,
    over which each chunk reads W_x again. Where a worker's gates over all
    steps fit ``budgets[11]`` (a core's L2), projecting them before the loop
    leaves them in cache anyway: 0. Teams of several workers share each
    step's tiles, so no worker knows its rows in advance: 0.

    Measured on a 2-core Zen 4 (1 MiB L2 a core), whole forward calls
    against the projection before the loop (``bench/ab.py --api``): f32
    H=128 B=128 1.048x / 0.997x / 1.058x (three runs), H=256 B=32 1.017x /
    1.045x / 1.033x, H=256 B=128 1.032x, H=128 B=32 1.014x; f64 H=128 B=32
    1.020x, B=128 1.006x, H=256 B=128 1.002x; f32 H=128 B=8, whose gates fit
    the L2s, 0.980x.
    """
    if n_workers // team_bounds.shape[0] > 1:
        return 0
    team_dirs = team_bounds[0, 1] - team_bounds[0, 0]
    step_bytes = team_dirs * team_bounds[:, 2].max() * N_GATES * hidden * itemsize
    chunk_steps = max(1, budgets[9] // max(step_bytes, 1))
    if (chunk_steps >= steps or chunk_steps * team_bounds[:, 2].min() < budgets[10]
            or steps * step_bytes <= budgets[11]):
        return 0
    return chunk_steps


@njit(inline="always")
def _tile_shape(batch, hidden, itemsize, team_bounds, n_workers, backward, budgets):
    """(rows, units, pass depth) of a time loop's tiles (:func:`_tile_bounds`,
    :func:`_product_in_passes`), for teams ``team_bounds`` (:func:`_teams`)
    of ``n_workers`` workers and the thresholds ``budgets``.

    Forward, and backward below ``budgets[5]`` (:data:`WIDE_MIN_BATCH`) rows:
    ROWS_PER_TILE rows by :func:`_tile_units`, each product in one pass.
    Backward from that many rows, the product of a step (its rows by 4H, by
    4H by H) is compute-bound, and small tiles each read their rows' 4H
    gate gradients again, from L3 once those pass L2: the tiles take up to
    ``budgets[6]`` rows (:data:`WIDE_TILE_ROWS`, all of them at the
    benchmarks' sizes) by ``budgets[7]`` units (:data:`WIDE_TILE_UNITS`), in
    passes of ``budgets[8]`` values of k (:data:`WIDE_PASS_DEPTH`), so that
    each pass's rows are read from L2 for every panel. Where that would
    leave a team fewer such tiles than members (more workers than wide
    tiles), the tiles stay small but run in the same passes: passes round
    differently from one pass, so whether they run depends on the problem's
    sizes only, never on the thread count.

    Small tiles take :func:`_small_tile_units` units.
    """
    min_batch, wide_rows, wide_units, pass_depth = budgets[5:9]
    team_size = n_workers // team_bounds.shape[0]
    team_dirs = team_bounds[0, 1] - team_bounds[0, 0]
    fewest_rows = team_bounds[:, 2].min()
    wide = backward and batch >= min_batch
    if wide and team_dirs * -(-fewest_rows // wide_rows) * -(-hidden // wide_units) >= team_size:
        return wide_rows, wide_units, pass_depth
    units = _small_tile_units(hidden, itemsize, budgets, team_dirs, fewest_rows, team_size)
    return ROWS_PER_TILE, units, pass_depth if wide else N_GATES * hidden


@njit(inline="always")
def _small_tile_units(hidden, itemsize, budgets, team_dirs, fewest_rows, team_size):
    """Hidden units per small tile (ROWS_PER_TILE rows) of teams of
    ``team_size`` workers running ``team_dirs`` directions over at least
    ``fewest_rows`` rows: :func:`_tile_units`, halved (down to the panel
    width W) while a step would have fewer tiles than the team has members.
    At B=1, H=128, f32, one tile of 128 units would leave the second worker
    idle."""
    units = _tile_units(hidden, itemsize, budgets)
    width = panel_width(itemsize)
    row_tiles = team_dirs * -(-fewest_rows // ROWS_PER_TILE)
    while units > width and row_tiles * -(-hidden // units) < team_size:
        units = max(width, units // 2 // width * width)
    return units


@njit(inline="always")
def _tile_units(hidden, itemsize, budgets):
    """Hidden units per tile of the time loops: UNITS_PER_TILE, or fewer
    where a tile's slice of W_h (4 * H * units * itemsize bytes) would be
    larger than ``budgets[4]`` (:data:`MAX_TILE_WEIGHT_BYTES`); a multiple of
    the panel width W, and at least W.

    A step's row tiles over the same units each read that slice again; it
    must stay in the core's L2 beside the rows and the gates that pass
    through. Measured on a 2-core AVX-512 machine (2 MiB L2 a core), time
    loops alone, 32 units (W in f64) against 64: f64 H=1024 (a 2 MiB slice
    at 64 units) B=32 forward / backward 1.117x / 1.100x, B=128 1.076x /
    1.151x; H=512 (1 MiB) B=128 1.059x / 1.002x; H=256 (512 KiB) B=32 0.947x
    forward.
    """
    width = panel_width(itemsize)
    units = UNITS_PER_TILE
    while units > width and N_GATES * hidden * units * itemsize > budgets[4]:
        units -= width
    return units


def core_cache_bytes():
    """Bytes of one core's L2 cache, from Linux's sysfs; DEFAULT_CORE_CACHE_BYTES
    where that is not readable."""
    caches = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(caches.glob("index*")):
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip().upper()
                return int(size.rstrip("KMG")) * SIZE_SUFFIXES.get(size[-1], 1)
    except (OSError, ValueError):
        pass
    return DEFAULT_CORE_CACHE_BYTES


#: Multipliers of the size suffixes in sysfs cache sizes ("2048K").
SIZE_SUFFIXES = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}
#: A core's L2 where the system does not tell (a common size on current x86).
DEFAULT_CORE_CACHE_BYTES = 2 ** 20
#: One team per group of batch rows pays when each worker's rows are enough to
#: amortize reading all of W_h every step, where workers sharing a step read a
#: slice each but wait for each other every step and read the h rows the other
#: wrote. How many rows are enough depends on where W_h lives. Measured on a
#: 2-core AVX-512 machine (2 MiB L2 per core), whole calls, T=100, split over
#: shared:
#:
#: - W_h in half a core's L2: from 4 rows a worker. f32 H=128 B=8/32
#:   1.17/1.22x forward, 1.21/1.20x with backward; H=256 B=8/32 1.12/1.12x and
#:   1.14/1.05x; f64 H=128 B=32 1.18/1.12x. At 2 rows a worker (B=4)
#:   0.93-1.07x.
#: - W_h up to twice a core's L2 (read from L3 every step): from 16 rows a
#:   worker. Time loops alone (forward / backward), 16 rows: f64 H=256 B=32
#:   1.146x / 1.132x, f32 H=512 B=32 1.027x / 1.00x (1.056x / 1.02x in a
#:   first run), f32 H=384 B=32 1.10x / 1.02x; 32 rows: f64 H=256 B=64
#:   1.132x / 1.106x, f32 H=512 B=64 1.052x / 1.029x. Fewer rows: f32 H=512
#:   B=24 0.95x / 0.92x, B=16 0.87x / 0.86x. (The fifth session, before the
#:   back-and-forth claim order and the prefetches, measured whole calls and
#:   split only from 64 rows: f64 H=256 B=32 lost 0.98x forward then.)
#: - Larger W_h: never (f64 H=512 B=128 0.98x, f32 H=1024 B=128 0.95x; in the
#:   time loops alone, 16 rows a worker: f64 H=512 B=32 0.98x / 0.99x, f32
#:   H=1024 B=32 0.94x / 0.97x).
MIN_ROWS_PER_TEAM = 4
MAX_TEAM_WEIGHT_BYTES = core_cache_bytes() // 2
MIN_ROWS_PER_TEAM_FROM_L3 = 16
MAX_TEAM_WEIGHT_BYTES_FROM_L3 = 4 * MAX_TEAM_WEIGHT_BYTES
#: The largest slice of W_h one time-loop tile reads (:func:`_tile_units`):
#: half a core's L2 (measured against a quarter: see UNITS_PER_TILE).
MAX_TILE_WEIGHT_BYTES = core_cache_bytes() // 2
#: Flags of team_bounds[t, 3] (:func:`_teams`): the members' W_h streams from
#: memory; two tiles' slices of it fit beside each other in the budget of
#: W_h kept in L2.
STREAMS = 1
SLICES_FIT = 2
#: Backward time loops from this many batch rows take wide tiles
#: (:func:`_tile_shape`): WIDE_TILE_ROWS rows by WIDE_TILE_UNITS units, their
#: product in passes of WIDE_PASS_DEPTH values of k. Measured on a 2-core
#: AVX-512 machine (2 MiB L2 a core), backward time loops alone, T=100,
#: against tiles of 24 rows by 64 units (32 at f64 H >= 512) over all of k:
#: f64 H=1024 B=128 1.12-1.17x (four runs), B=32 1.28x; f64 H=512 B=128
#: 1.09x, B=32 1.05x; f32 H=1024 B=128 1.07x, B=32 1.12x; f32 H=512 B=128
#: 1.03x, B=32 1.02x; f64 H=256 B=128 1.07x; f32 and f64 H=128-256 B=32-128
#: 1.01-1.05x. At B=8 they lost (f64 H=512 0.84x, H=1024 0.92x, f32 H=1024
#: 0.87x; B=1 0.85x), where the loops are bound by reading W_h, the small
#: tiles share it out finer. Tiles of 128 units 1.12x, 512 units 1.17x at
#: f64 H=1024 B=128; 66 rows (two row tiles there) 1.12x; passes of 1024
#: 1.17x, 256 1.14x.
WIDE_MIN_BATCH = 32
WIDE_TILE_ROWS = 144
WIDE_TILE_UNITS = 256
WIDE_PASS_DEPTH = TILE_DEPTH
assert WIDE_TILE_ROWS % BLOCK_ROWS == 0, "tiles hold whole register blocks"


#: Bounds of the input projection's chunks inside the forward time loop
#: (:func:`_projection_steps`): a chunk's gates for one worker's rows take at
#: most MAX_PROJECTION_CHUNK_BYTES and give it at least
#: MIN_PROJECTION_CHUNK_ROWS rows; no chunks where one worker's gates over
#: all steps take at most MAX_PROJECTED_BYTES_IN_CACHE.
MAX_PROJECTION_CHUNK_BYTES = core_cache_bytes() // 4
MIN_PROJECTION_CHUNK_ROWS = 64
MAX_PROJECTED_BYTES_IN_CACHE = core_cache_bytes()


def _team_budgets():
    """The team-splitting thresholds above, the tile budget, the wide
    tiles' sizes and the projection chunks' bounds, as the compiled drivers
    take them (read at each call, so that a test may change them)."""
    return (MIN_ROWS_PER_TEAM, MAX_TEAM_WEIGHT_BYTES, MIN_ROWS_PER_TEAM_FROM_L3,
            MAX_TEAM_WEIGHT_BYTES_FROM_L3, MAX_TILE_WEIGHT_BYTES,
            WIDE_MIN_BATCH, WIDE_TILE_ROWS, WIDE_TILE_UNITS, WIDE_PASS_DEPTH,
            MAX_PROJECTION_CHUNK_BYTES, MIN_PROJECTION_CHUNK_ROWS, MAX_PROJECTED_BYTES_IN_CACHE)


@njit(inline="always")
def _rows_split_pays(rows_per_worker, weight_bytes, budgets):
    """Whether one worker per group of ``rows_per_worker`` rows beats sharing
    each step, for a W_h of ``weight_bytes`` (see :data:`MIN_ROWS_PER_TEAM`)."""
    min_rows, max_bytes, min_rows_from_l3, max_bytes_from_l3 = budgets[:4]
    if weight_bytes <= max_bytes:
        return rows_per_worker >= min_rows
    if weight_bytes <= max_bytes_from_l3:
        return rows_per_worker >= min_rows_from_l3
    return False


@njit(cache=True)
def _teams(n_dirs, lengths, hidden, itemsize, n_workers, budgets):
    """How the workers split a time loop's work: (team_rows (teams, B),
    team_bounds (teams, 4)) int64, for a dtype of ``itemsize`` bytes and the
    thresholds ``budgets`` (:func:`_team_budgets`).

    Team t runs directions [team_bounds[t, 0], team_bounds[t, 1]) for the
    batch rows ``team_rows[t, :team_bounds[t, 2]]``; its n_workers // teams
    workers share each step's tiles. Directions and batch rows depend on no
    other's, so teams never wait for each other. One team per direction when
    the workers divide evenly among them; within a direction, one worker per
    group of rows when each worker gets enough rows for the size of W_h
    (:func:`_rows_split_pays`), else one team of all the direction's workers.
    team_bounds[t, 3] holds flags: :data:`STREAMS` where each member's share
    of the team's W_h is larger than the budget of W_h kept in a core's L2
    (``budgets[1]``), so that it comes from memory every step and the time
    loops prefetch it (:func:`.gemm.product_tile`); :data:`SLICES_FIT` where
    two time-loop tiles' slices of W_h (:func:`_small_tile_units`) fit in
    ``budgets[1]``, so that every tile may prefetch the next one's
    (:func:`_prefetches_next_unit`).
    """
    batch = lengths.shape[0]
    if n_workers % n_dirs:
        n_direction_teams, workers_per_direction = 1, n_workers
    else:
        n_direction_teams, workers_per_direction = n_dirs, n_workers // n_dirs
    weight_bytes = N_GATES * hidden * hidden * itemsize
    split = _rows_split_pays(batch // workers_per_direction, weight_bytes, budgets)
    cuts = _row_cuts(lengths, workers_per_direction if split else 1)
    n_groups = cuts.shape[0] - 1
    team_rows = np.zeros((n_direction_teams * n_groups, batch), np.int64)
    team_bounds = np.zeros((n_direction_teams * n_groups, 4), np.int64)
    workers_per_team = n_workers // team_bounds.shape[0]
    team_dirs = 1 if n_direction_teams == n_dirs else n_dirs
    units = _small_tile_units(hidden, itemsize, budgets, team_dirs, np.diff(cuts).min(),
                              workers_per_team)
    slices_fit = 2 * N_GATES * hidden * units * itemsize <= budgets[1]
    for direction_team in range(n_direction_teams):
        d_lo = direction_team if n_direction_teams == n_dirs else 0
        d_hi = d_lo + 1 if n_direction_teams == n_dirs else n_dirs
        for group in range(n_groups):
            team = direction_team * n_groups + group
            n_rows = cuts[group + 1] - cuts[group]
            for n in range(n_rows):
                team_rows[team, n] = cuts[group] + n
            team_bounds[team, 0], team_bounds[team, 1], team_bounds[team, 2] = d_lo, d_hi, n_rows
            share_bytes = (d_hi - d_lo) * weight_bytes // workers_per_team
            team_bounds[team, 3] = ((STREAMS if share_bytes > budgets[1] else 0)
                                    | (SLICES_FIT if slices_fit else 0))
    return team_rows, team_bounds


@njit(inline="always")
def _row_cuts(lengths, n_groups):
    """Bounds (n_groups + 1,) of ``n_groups`` contiguous runs of batch rows
    with about equal sums of lengths (the steps each group runs), or of rows
    when every length is 0: group g is rows [cuts[g], cuts[g + 1]). Cut g is
    the number of rows whose running sum is at most g / n_groups of the total.
    Plain loops: NumPy's cumsum and searchsorted cost seconds of compile time."""
    batch = lengths.shape[0]
    total = lengths.sum()
    weighted = total > 0
    if not weighted:
        total = batch
    cuts = np.empty(n_groups + 1, np.int64)
    cuts[0], cuts[n_groups] = 0, batch
    for group in range(1, n_groups):
        target = total * group / n_groups
        running = 0
        count = 0
        for row in range(batch):
            running += lengths[row] if weighted else 1
            if running > target:
                break
            count += 1
        cuts[group] = count
    return cuts


@njit(cache=True)
def valid_rows(lengths, steps):
    """Indices ``t * B + b`` of the valid (time, row) pairs (``t < lengths[b]``),
    in order: all T * B of them when every row runs all ``steps``."""
    batch = lengths.shape[0]
    rows = np.empty(steps * batch, np.int64)
    count = 0
    for t in range(steps):
        for b in range(batch):
            if t < lengths[b]:
                rows[count] = t * batch + b
                count += 1
    return rows[:count]


@njit(cache=True)
def _valid_pairs(flat, rows):
    """The rows of a (T * B, n) array at the valid pairs ``rows``: the array
    itself when every pair is valid, else a gathered copy."""
    return flat if rows.shape[0] == flat.shape[0] else flat[rows]


@njit(cache=True)
def _final_states(ring, lengths):
    """(D, B, H) copy of each row's final state from a (D, 2, B, H) ring: slot
    ``lengths[b] % 2``."""
    n_dirs, _, batch, hidden = ring.shape
    final = np.empty((n_dirs, batch, hidden), ring.dtype)
    for d in range(n_dirs):
        for b in range(batch):
            copy_into(ring[d, lengths[b] % 2, b], final[d, b])
    return final


@njit(cache=True)
def _copy_states(source, destination):
    """``destination[...] = source`` for (D, B, H) arrays, as loops (an array
    assignment compiles its shape-mismatch error message, seconds of compile time)."""
    for d in range(source.shape[0]):
        for b in range(source.shape[1]):
            copy_into(source[d, b], destination[d, b])


@njit(cache=True)
def _clear_padding(values, lengths):
    """Zero ``values[t, b]`` at the padded times ``t >= lengths[b]``; values:
    (T, B, ...), so that no stale value is left there."""
    for t in range(values.shape[0]):
        for b in range(values.shape[1]):
            if t >= lengths[b]:
                values[t, b] = 0
