"""Variable lengths, bidirectional and multi-layer stacks, dropout, batch_first, the LSTM layer."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

import nblstm
from helpers import (TOLERANCE, as_float64, compiled_backends, numba_threads, random_problem,
                     relative_error)
from nblstm.kernels import cpu, gemm

DTYPES = [np.float32, np.float64]


@pytest.fixture(params=compiled_backends())
def backend(request):
    return request.param


def run_layer(lstm, x, lengths, state, dy, d_state):
    y, (h_n, c_n) = lstm.forward(x, state=state, lengths=lengths)
    dx, (dh0, dc0) = lstm.backward(dy, d_state)
    results = {"y": y, "h_n": h_n, "c_n": c_n, "dx": dx, "dh0": dh0, "dc0": dc0}
    for layer, directions in enumerate(lstm.grads):
        for d, grads in enumerate(directions):
            for field in ("W_x", "W_h", "b"):
                results[f"d{field}[{layer}][{d}]"] = getattr(grads, field)
    return results


def assert_random_run_matches_reference(lstm, reference, rng, steps, batch, lengths):
    """``lstm`` (forward with ``lengths``, backward with a random dy) against
    its float64 twin ``reference``, on a random (steps, batch, I) x."""
    dtype = lstm.dtype
    x = rng.standard_normal((steps, batch, lstm.input_size)).astype(dtype)
    dy = rng.standard_normal((steps, batch, lstm.directions * lstm.hidden_size)).astype(dtype)
    actual = run_layer(lstm, x, lengths, None, dy, None)
    expected = run_layer(reference, x.astype(np.float64), lengths, None, dy.astype(np.float64),
                         None)
    assert_results_close(actual, expected, dtype)


def assert_results_close(actual, exact, dtype, context=""):
    """Every result of :func:`run_layer` in ``actual`` within the ``dtype``
    tolerance of the float64 run ``exact``."""
    for name, value in exact.items():
        error = relative_error(actual[name], value)
        assert error <= TOLERANCE[np.dtype(dtype)], f"{name}{context}: {error:.2e}"


def twin_layers(backend, dtype, seed=0, **options):
    """The same random LSTM on ``backend`` in ``dtype`` and on the float64 reference."""
    lstm = nblstm.LSTM(backend=backend, dtype=dtype, rng=seed, **options)
    reference = nblstm.LSTM(backend="numpy", dtype=np.float64, rng=seed, **options)
    reference.params = [[p.astype(np.float64) for p in layer] for layer in lstm.params]
    return lstm, reference


CONFIGS = [
    dict(input_size=3, hidden_size=5, num_layers=1, bidirectional=True),
    dict(input_size=4, hidden_size=3, num_layers=2, bidirectional=False),
    dict(input_size=2, hidden_size=6, num_layers=3, bidirectional=True),
    dict(input_size=5, hidden_size=4, num_layers=2, bidirectional=True, batch_first=True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("with_lengths", [False, True])
def test_stacks_match_the_reference(backend, dtype, config, with_lengths):
    rng = np.random.default_rng(17)
    steps, batch = 6, 5
    lstm, reference = twin_layers(backend, dtype, **config)
    n_states = lstm.num_layers * lstm.directions
    features = lstm.directions * lstm.hidden_size
    x = rng.standard_normal((steps, batch, config["input_size"])).astype(dtype)
    dy = rng.standard_normal((steps, batch, features)).astype(dtype)
    if lstm.batch_first:
        x, dy = x.transpose(1, 0, 2).copy(), dy.transpose(1, 0, 2).copy()
    states = [rng.standard_normal((n_states, batch, lstm.hidden_size)).astype(dtype)
              for _ in range(4)]
    lengths = np.array([6, 2, 0, 5, 1]) if with_lengths else None
    actual = run_layer(lstm, x, lengths, states[:2], dy, states[2:])
    expected = run_layer(reference, x.astype(np.float64), lengths,
                         [s.astype(np.float64) for s in states[:2]], dy.astype(np.float64),
                         [s.astype(np.float64) for s in states[2:]])
    for name, value in expected.items():
        assert actual[name].dtype == dtype and actual[name].shape == value.shape, name
        error = relative_error(actual[name], value)
        assert error <= TOLERANCE[np.dtype(dtype)], f"{name}: {error:.2e}"


@pytest.mark.parametrize("bidirectional", [False, True])
def test_padding_semantics(backend, bidirectional):
    rng = np.random.default_rng(5)
    lstm = nblstm.LSTM(3, 4, bidirectional=bidirectional, dtype=np.float64, backend=backend,
                       rng=1)
    lengths = np.array([5, 0, 3, 1])
    x = rng.standard_normal((5, 4, 3))
    h0 = rng.standard_normal((lstm.directions, 4, 4))
    c0 = rng.standard_normal((lstm.directions, 4, 4))
    y, (h_n, c_n) = lstm.forward(x, state=(h0, c0), lengths=lengths)
    padded = np.arange(5)[:, None] >= lengths[None, :]
    assert not y[padded].any(), "outputs at padded steps must be zero"
    np.testing.assert_array_equal(h_n[:, 1], h0[:, 1])  # length 0: the state passes through
    np.testing.assert_array_equal(c_n[:, 1], c0[:, 1])
    # Each row equals that sequence run alone, unpadded.
    for row, length in enumerate(lengths):
        if length == 0:
            continue
        alone = nblstm.LSTM(3, 4, bidirectional=bidirectional, dtype=np.float64, backend=backend)
        alone.params = lstm.params
        y_row, (h_row, _) = alone.forward(x[:length, row:row + 1],
                                          state=(h0[:, row:row + 1], c0[:, row:row + 1]))
        np.testing.assert_allclose(y[:length, row], y_row[:, 0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(h_n[:, row], h_row[:, 0], rtol=1e-12, atol=1e-14)

    dy = rng.standard_normal(y.shape)
    dx, _ = lstm.backward(dy)
    garbage = dy.copy()
    garbage[padded] = np.nan
    dx_garbage, (dh0_garbage, _) = lstm.backward(garbage)
    np.testing.assert_array_equal(dx_garbage, dx)
    assert np.isfinite(dh0_garbage).all()
    assert not dx[padded].any(), "gradients at padded steps must be zero"


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_forward_with_lengths(backend, dtype):
    problem = random_problem(5, 4, 3, 6, dtype, np.random.default_rng(6))
    lengths = np.array([2, 5, 0, 3])
    results = []
    for name, arrays in ((backend, problem), ("numpy", as_float64(problem))):
        y, (h_n, c_n), cache = nblstm.forward(arrays["x"], arrays["params"], arrays["h0"],
                                              arrays["c0"], backend=name, lengths=lengths)
        grads = nblstm.backward(cache, arrays["dy"], arrays["dh_n"], arrays["dc_n"])
        results.append({"y": y, "h_n": h_n, "c_n": c_n, **vars(grads)})
    for name, value in results[1].items():
        assert relative_error(results[0][name], value) <= TOLERANCE[np.dtype(dtype)], name


@pytest.mark.parametrize("dtype", DTYPES)
def test_chunked_calls_carry_the_state(backend, dtype):
    rng = np.random.default_rng(9)
    lstm = nblstm.LSTM(3, 5, num_layers=2, dtype=dtype, backend=backend, rng=2)
    x = rng.standard_normal((7, 2, 3)).astype(dtype)
    whole, state = lstm.forward(x, training=False)
    first, carried = lstm.forward(x[:3], training=False)
    second, final = lstm.forward(x[3:], state=carried, training=False)
    tolerance = TOLERANCE[np.dtype(dtype)]
    np.testing.assert_allclose(np.concatenate([first, second]), whole, rtol=0, atol=tolerance)
    np.testing.assert_allclose(final[0], state[0], rtol=0, atol=tolerance)
    np.testing.assert_allclose(final[1], state[1], rtol=0, atol=tolerance)


def test_dropout_is_reproducible_and_backends_agree(backend):
    x = np.random.default_rng(3).standard_normal((5, 4, 3))
    dy = np.random.default_rng(4).standard_normal((5, 4, 10))
    results = []
    for name in (backend, "numpy"):
        lstm = nblstm.LSTM(3, 5, num_layers=3, bidirectional=True, dropout=0.4,
                           dtype=np.float64, backend=name, rng=np.random.default_rng(11))
        y, _ = lstm.forward(x)
        dx, _ = lstm.backward(dy)
        results.append((y, dx, lstm.grads[0][1].W_h))
        y_eval, _ = lstm.forward(x, training=False)
        no_dropout = nblstm.LSTM(3, 5, num_layers=3, bidirectional=True, dtype=np.float64,
                                 backend=name)
        no_dropout.params = lstm.params
        np.testing.assert_array_equal(y_eval, no_dropout.forward(x, training=False)[0])
    for ours, reference in zip(*results):
        assert relative_error(ours, reference) < 1e-12


def test_dropout_gradient_matches_finite_differences():
    rng = np.random.default_rng(8)
    lstm = nblstm.LSTM(2, 3, num_layers=2, bidirectional=True, dropout=0.5, dtype=np.float64,
                       backend="numpy", rng=3)
    x = rng.standard_normal((4, 2, 2))
    lengths = np.array([4, 2])
    dy = rng.standard_normal((4, 2, 6))

    def loss(values):
        lstm.rng = np.random.default_rng(99)
        y, _ = lstm.forward(values, lengths=lengths)
        return np.sum(y * dy)

    loss(x)
    dx, _ = lstm.backward(dy)
    numeric = np.empty_like(x)
    step = 1e-6
    for index in np.ndindex(x.shape):
        shifted = x.copy()
        shifted[index] += step
        plus = loss(shifted)
        shifted[index] -= 2 * step
        numeric[index] = (plus - loss(shifted)) / (2 * step)
    assert relative_error(dx, numeric) < 1e-7


def test_backward_is_repeatable_and_overwrites_grads(backend):
    lstm = nblstm.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=np.float64, backend=backend)
    x = np.random.default_rng(1).standard_normal((4, 3, 3))
    y, _ = lstm.forward(x)
    dy = np.ones_like(y)
    first, _ = lstm.backward(dy)
    grads = lstm.grads
    second, _ = lstm.backward(dy)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(grads[1][0].W_h, lstm.grads[1][0].W_h)
    assert lstm.grads is not grads


def test_state_dict_round_trip(tmp_path):
    lstm = nblstm.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=np.float32, rng=0)
    np.savez(tmp_path / "weights.npz", **lstm.state_dict())
    other = nblstm.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=np.float32, rng=1)
    with np.load(tmp_path / "weights.npz") as stored:
        other.load_state_dict(dict(stored))
    x = np.random.default_rng(2).standard_normal((3, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(other.forward(x)[0], lstm.forward(x)[0])
    broken = lstm.state_dict()
    broken["l1.d0.W_h"] = broken["l1.d0.W_h"][:, :-1]
    with pytest.raises(ValueError, match=r"l1.d0.W_h must have shape \(4, 16\)"):
        other.load_state_dict(broken)


def test_layer_rejects_bad_arguments():
    lstm = nblstm.LSTM(3, 4, num_layers=2, dtype=np.float64)
    x = np.zeros((5, 2, 3))
    with pytest.raises(ValueError, match=r"lengths must satisfy 0 <= lengths\[b\] <= T = 5"):
        lstm.forward(x, lengths=[6, 1])
    with pytest.raises(ValueError, match=r"lengths must have shape \(B,\) = \(2,\)"):
        lstm.forward(x, lengths=[1, 2, 3])
    with pytest.raises(TypeError, match="lengths must hold integers"):
        lstm.forward(x, lengths=np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match=r"state\[0\] must have shape"):
        lstm.forward(x, state=(np.zeros((1, 2, 4)), np.zeros((2, 2, 4))))
    with pytest.raises(RuntimeError, match="backward needs a preceding forward"):
        nblstm.LSTM(3, 4).backward(None)
    with pytest.raises(ValueError, match="dropout must be in"):
        nblstm.LSTM(3, 4, dropout=1.0)


def test_teams_own_directions_then_groups_of_rows(monkeypatch):
    """How :func:`kernels.cpu._teams` shares a time loop out among 2 workers
    (with the W_h budgets of a 2 MiB L2: 1 MiB from L2, 4 MiB from L3, 512
    KiB a tile), and how they read W_h (column 3, flags: STREAMS where a
    member's share is past 1 MiB, SLICES_FIT where two tiles' slices of W_h
    fit in 1 MiB)."""
    monkeypatch.setattr(cpu, "MAX_TEAM_WEIGHT_BYTES", 2 ** 20)
    monkeypatch.setattr(cpu, "MAX_TEAM_WEIGHT_BYTES_FROM_L3", 2 ** 22)
    monkeypatch.setattr(cpu, "MAX_TILE_WEIGHT_BYTES", 2 ** 19)
    f32_bytes = np.dtype(np.float32).itemsize

    def teams(n_dirs, lengths, hidden, n_workers):
        return cpu._teams(n_dirs, lengths, hidden, f32_bytes, n_workers, cpu._team_budgets())

    def fits(hidden):
        """The SLICES_FIT flag for ``hidden``: the tile's units depend on the
        panel width, which depends on the host's vectors."""
        units = _tile_units(hidden, f32_bytes, cpu._team_budgets())
        return cpu.SLICES_FIT if 2 * 4 * hidden * units * f32_bytes <= 2 ** 20 else 0

    # 64 units of H=512 are a 512 KiB slice: two fit in 1 MiB. H=1024 fits
    # only where the panels are narrower than 64 units (no AVX-512).
    assert fits(128) == fits(256) == fits(512) == cpu.SLICES_FIT
    streams, fit = cpu.STREAMS, cpu.SLICES_FIT
    full = np.full(32, 7)
    rows, bounds = teams(1, full, 128, 2)
    np.testing.assert_array_equal(bounds, [[0, 1, 16, fit], [0, 1, 16, fit]])
    np.testing.assert_array_equal(rows[1, :16], np.arange(16, 32))
    # A W_h of 4 MiB splits only with MIN_ROWS_PER_TEAM_FROM_L3 rows a worker,
    # each reading all of it.
    split = 2 * cpu.MIN_ROWS_PER_TEAM_FROM_L3
    _, bounds = teams(1, np.full(split, 7), 512, 2)
    np.testing.assert_array_equal(bounds, [[0, 1, split // 2, streams | fit]] * 2)
    # Too few rows a worker for the size of W_h, or W_h past every budget:
    # one team shares each step, each member reading half of W_h.
    for hidden, batch, reads in ((512, split - 1, streams), (1024, 1000, streams), (256, 6, 0),
                                 (128, 2 * cpu.MIN_ROWS_PER_TEAM - 1, 0)):
        _, bounds = teams(1, np.full(batch, 7), hidden, 2)
        np.testing.assert_array_equal(bounds, [[0, 1, batch, reads | fits(hidden)]])
    # Rows split where the steps they run balance, not where their count does.
    lengths = np.array([1] * 12 + [10] * 4)
    _, bounds = teams(1, lengths, 64, 2)
    assert bounds[0, 2] > bounds[1, 2] and bounds[:, 2].sum() == 16
    # Two directions, two workers: a direction each, whatever the sizes.
    _, bounds = teams(2, np.full(3, 7), 1024, 2)
    reads = streams | fits(1024)
    np.testing.assert_array_equal(bounds, [[0, 1, 3, reads], [1, 2, 3, reads]])
    _, bounds = teams(2, np.full(3, 7), 1024, 3)
    np.testing.assert_array_equal(bounds, [[0, 2, 3, reads]])
    _, bounds = teams(2, np.full(3, 7), 256, 2)
    np.testing.assert_array_equal(bounds, [[0, 1, 3, fit], [1, 2, 3, fit]])


@njit
def _tile_units(hidden, itemsize, budgets):
    return cpu._tile_units(hidden, itemsize, budgets)


def test_tiles_take_fewer_units_where_their_slice_of_w_h_is_large(monkeypatch):
    """With a 512 KiB tile budget (2 MiB L2): whole panels of W units, at most
    UNITS_PER_TILE, fewer where 4 * H * units * itemsize would pass the budget."""
    monkeypatch.setattr(cpu, "MAX_TILE_WEIGHT_BYTES", 2 ** 19)
    budgets = cpu._team_budgets()
    for hidden in (64, 256, 512, 1024, 4096):
        for dtype in DTYPES:
            itemsize = np.dtype(dtype).itemsize
            width = gemm.block_columns(np.dtype(dtype))
            fitting = [units for units in range(width, cpu.UNITS_PER_TILE + 1, width)
                       if 4 * hidden * units * itemsize <= 2 ** 19]
            expected = max(fitting) if fitting else width
            assert _tile_units(hidden, itemsize, budgets) == expected, (hidden, dtype)
    # f64 H=128 takes whole tiles (512 KiB at 128 units); f64 H=1024 fewer.
    assert _tile_units(128, 8, budgets) == cpu.UNITS_PER_TILE
    assert _tile_units(1024, 8, budgets) < cpu.UNITS_PER_TILE


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [9, cpu.ROWS_PER_TILE + 9])
def test_one_panel_tiles_that_prefetch_match_the_reference(backend, dtype, batch, monkeypatch):
    """The time loops with the fewest units a tile can take (one panel of W),
    over a hidden size of several such tiles, the last one ragged; with W_h
    taken to be too large for L2, so that the blocks after a panel's first
    prefetch the next gate's panel or the next unit tile's, in one row tile
    (9 rows: 6 + 3) or in the last of two."""
    _take_w_h_past_every_budget(monkeypatch)
    width = gemm.block_columns(np.dtype(dtype))
    rng = np.random.default_rng(29)
    steps = 4
    lstm, reference = twin_layers(backend, dtype, input_size=7, hidden_size=2 * width + 5,
                                  bidirectional=True)
    assert_random_run_matches_reference(lstm, reference, rng, steps, batch,
                                        rng.integers(1, steps + 1, batch))


def _take_w_h_past_every_budget(monkeypatch):
    """One-panel tiles; every W_h streams; rows never split into teams."""
    monkeypatch.setattr(cpu, "MAX_TILE_WEIGHT_BYTES", 1)
    monkeypatch.setattr(cpu, "MAX_TEAM_WEIGHT_BYTES", 0)
    monkeypatch.setattr(cpu, "MAX_TEAM_WEIGHT_BYTES_FROM_L3", 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_sum_alike_in_blocks_of_any_height(dtype):
    """A row's sums do not depend on the height of the register block it
    runs in. One thread takes ROWS_PER_TILE + 1 rows as one team, a full
    tile and a tile of one row; two threads split them into two teams of
    about half each, so the last row runs in a block of several."""
    assert_one_and_two_threads_agree(dtype, hidden=64, batch=cpu.ROWS_PER_TILE + 1, seed=34)


def assert_one_and_two_threads_agree(dtype, hidden, batch, seed):
    """A random cpu layer of ``hidden`` units, forward and backward over
    ``batch`` rows of ragged lengths, gives the same bits on 1 and 2 threads."""
    rng = np.random.default_rng(seed)
    steps = 4
    lstm = nblstm.LSTM(backend="cpu", dtype=dtype, rng=seed, input_size=7, hidden_size=hidden)
    x = rng.standard_normal((steps, batch, 7)).astype(dtype)
    dy = rng.standard_normal((steps, batch, hidden)).astype(dtype)
    lengths = rng.integers(1, steps + 1, batch)
    with numba_threads(1):
        single = run_layer(lstm, x, lengths, None, dy, None)
    with numba_threads(2):
        double = run_layer(lstm, x, lengths, None, dy, None)
    for name, value in single.items():
        np.testing.assert_array_equal(double[name], value, err_msg=name)


def _take_wide_tiles_from(monkeypatch, batch, rows, units, pass_depth):
    """Backward loops of ``batch`` rows or more take wide tiles of ``rows``
    by ``units``, their products in passes of ``pass_depth`` values of k."""
    monkeypatch.setattr(cpu, "WIDE_MIN_BATCH", batch)
    monkeypatch.setattr(cpu, "WIDE_TILE_ROWS", rows)
    monkeypatch.setattr(cpu, "WIDE_TILE_UNITS", units)
    monkeypatch.setattr(cpu, "WIDE_PASS_DEPTH", pass_depth)


@njit
def _tile_shape(batch, hidden, itemsize, team_bounds, n_workers, backward, budgets):
    return cpu._tile_shape(batch, hidden, itemsize, team_bounds, n_workers, backward, budgets)


def test_backward_tiles_widen_from_enough_rows_while_every_member_gets_one():
    """:func:`kernels.cpu._tile_shape` with the shipped sizes: forward and
    small batches keep small tiles over all of k; backward from
    WIDE_MIN_BATCH rows takes wide tiles in passes, or, where a team would
    get fewer wide tiles than members, small tiles in the same passes."""
    budgets = cpu._team_budgets()
    units = _tile_units(1024, 8, budgets)
    one_team_of_two = np.array([[0, 1, 128, 0]])
    small = (cpu.ROWS_PER_TILE, units, 4 * 1024)
    wide = (cpu.WIDE_TILE_ROWS, cpu.WIDE_TILE_UNITS, cpu.WIDE_PASS_DEPTH)
    assert _tile_shape(128, 1024, 8, one_team_of_two, 2, False, budgets) == small
    assert _tile_shape(cpu.WIDE_MIN_BATCH - 1, 1024, 8, one_team_of_two, 2, True,
                       budgets) == small
    assert _tile_shape(128, 1024, 8, one_team_of_two, 2, True, budgets) == wide
    # 1024 units make 4 wide tiles: too few for a team of 16.
    assert _tile_shape(128, 1024, 8, one_team_of_two, 16, True, budgets) == (
        cpu.ROWS_PER_TILE, units, cpu.WIDE_PASS_DEPTH)
    # Two teams of 64 rows, one worker each: a tile each is enough.
    two_teams = np.array([[0, 1, 64, 0], [0, 1, 64, 0]])
    assert _tile_shape(128, 256, 8, two_teams, 2, True, budgets) == wide


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_tiles_halve_until_every_member_gets_one(dtype, monkeypatch):
    """:func:`kernels.cpu._tile_shape` halves the units of small tiles (down to
    one panel) while a step would have fewer tiles than the team members."""
    monkeypatch.setattr(cpu, "MAX_TILE_WEIGHT_BYTES", 2 ** 40)
    budgets = cpu._team_budgets()
    itemsize, width = np.dtype(dtype).itemsize, gemm.block_columns(np.dtype(dtype))
    hidden, whole = cpu.UNITS_PER_TILE, cpu.UNITS_PER_TILE

    def units(team_bounds, n_workers, backward=False):
        return _tile_shape(1, hidden, itemsize, team_bounds, n_workers, backward, budgets)[1]

    one_row = np.array([[0, 1, 1, 0]])
    assert units(one_row, 1) == whole
    assert units(one_row, 2) == units(one_row, 2, backward=True) == max(width, whole // 2)
    assert units(one_row, 2 * whole) == width
    # Two directions, or two row tiles, already give two members a tile each.
    assert units(np.array([[0, 2, 1, 0]]), 2) == whole
    assert units(np.array([[0, 1, cpu.ROWS_PER_TILE + 1, 0]]), 2) == whole


def test_slices_fit_for_the_halved_tiles(monkeypatch):
    """The SLICES_FIT flag of :func:`kernels.cpu._teams` is read for the tiles
    the loop runs: at f64 H=128 (whole tiles of 128 units, a 512 KiB slice),
    two slices fit a 512 KiB budget only where a team of two halves them."""
    monkeypatch.setattr(cpu, "MAX_TEAM_WEIGHT_BYTES", 2 ** 19)
    monkeypatch.setattr(cpu, "MAX_TILE_WEIGHT_BYTES", 2 ** 19)
    budgets = cpu._team_budgets()
    f64_bytes = np.dtype(np.float64).itemsize

    def flags(n_workers):
        return cpu._teams(1, np.full(1, 7), 128, f64_bytes, n_workers, budgets)[1][0, 3]

    assert flags(1) & cpu.SLICES_FIT == 0
    assert flags(2) & cpu.SLICES_FIT == cpu.SLICES_FIT


@pytest.mark.parametrize("dtype", DTYPES)
def test_wide_backward_tiles_match_the_reference(dtype, monkeypatch):
    """Wide backward tiles over two row tiles (the last short) and three unit
    tiles (the last ragged), each wider than the cell's scratch segment, in
    passes that end inside a panel; both directions, ragged lengths."""
    width = gemm.block_columns(np.dtype(dtype))
    rows, units = 2 * gemm.BLOCK_ROWS, cpu.UNITS_PER_TILE + width
    _take_wide_tiles_from(monkeypatch, 10, rows, units, width + 3)
    rng = np.random.default_rng(33)
    steps, batch = 4, 2 * rows + 5
    lstm, reference = twin_layers("cpu", dtype, input_size=7, hidden_size=2 * units + 5,
                                  bidirectional=True)
    assert_random_run_matches_reference(lstm, reference, rng, steps, batch,
                                        rng.integers(0, steps + 1, batch))


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_passes_sum_the_same_at_every_thread_count(dtype, monkeypatch):
    """Passes of k round differently from one pass (each pass's sum is
    added onto the last), so whether they run must not depend on the thread
    count, though the tiles' shape does: one worker takes the one wide tile,
    two (one team, rows never split) small tiles in the same passes."""
    _take_w_h_past_every_budget(monkeypatch)
    width = gemm.block_columns(np.dtype(dtype))
    hidden, batch = width + 5, 13
    _take_wide_tiles_from(monkeypatch, 10, 2 * batch, 2 * hidden, 7)
    budgets = cpu._team_budgets()
    one_team = np.array([[0, 1, batch, 0]])
    itemsize = np.dtype(dtype).itemsize
    assert _tile_shape(batch, hidden, itemsize, one_team, 1, True, budgets)[:2] == (
        2 * batch, 2 * hidden)
    assert _tile_shape(batch, hidden, itemsize, one_team, 2, True, budgets)[0] == (
        cpu.ROWS_PER_TILE)
    assert_one_and_two_threads_agree(dtype, hidden, batch, seed=34)


@njit
def _row_cuts(lengths, n_groups):
    return cpu._row_cuts(lengths, n_groups)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(lengths=st.lists(st.integers(0, 12), min_size=1, max_size=40), n_groups=st.integers(1, 5))
def test_row_groups_cut_where_the_steps_balance(lengths, n_groups):
    """Group g of :func:`kernels.cpu._row_cuts` ends after the last row whose running sum of
    lengths (of rows, when all are 0) is at most g / n_groups of the total."""
    lengths = np.array(lengths, np.int64)
    cuts = _row_cuts(lengths, n_groups)
    work = np.cumsum(lengths) if lengths.sum() > 0 else np.arange(1, lengths.size + 1)
    assert cuts[0] == 0 and cuts[-1] == lengths.size and np.all(np.diff(cuts) >= 0)
    for group in range(1, n_groups):
        target = work[-1] * group / n_groups
        assert np.all(work[:cuts[group]] <= target) and np.all(work[cuts[group]:] > target)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_rows_in_teams_match_the_reference(backend, dtype, bidirectional):
    """Enough rows that two workers each run a group of them (teams), with lengths
    that put the group boundary mid-batch and end rows at different steps."""
    rng = np.random.default_rng(23)
    steps, batch = 7, 17
    lstm, reference = twin_layers(backend, dtype, input_size=6, hidden_size=19,
                                  bidirectional=bidirectional)
    assert_random_run_matches_reference(lstm, reference, rng, steps, batch,
                                        rng.integers(0, steps + 1, batch))


@njit
def _projection_steps(n_dirs, lengths, hidden, itemsize, steps, n_workers, budgets):
    _, team_bounds = cpu._teams(n_dirs, lengths, hidden, itemsize, n_workers, budgets)
    return cpu._projection_steps(team_bounds, n_workers, hidden, itemsize, steps, budgets)


def _project_a_step_at_a_time(monkeypatch):
    """The forward loop projects the inputs one step at a time wherever its
    teams have one worker each, however few rows or bytes that makes."""
    monkeypatch.setattr(cpu, "MAX_PROJECTION_CHUNK_BYTES", 1)
    monkeypatch.setattr(cpu, "MIN_PROJECTION_CHUNK_ROWS", 1)
    monkeypatch.setattr(cpu, "MAX_PROJECTED_BYTES_IN_CACHE", 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_projection_in_chunks_gives_the_bits_of_one_product(dtype, bidirectional, monkeypatch):
    """Each worker projecting its own rows a step at a time inside the
    forward loop gives the same bits as one product over all rows before
    it, forward and backward, at one and two threads (one team; two teams
    of rows or of directions), and matches the float64 reference: ragged
    lengths, I past one pass of k."""
    rng = np.random.default_rng(35)
    steps, batch, inputs, hidden = 5, 10, gemm.TILE_DEPTH + 5, 40
    lengths = rng.integers(0, steps + 1, batch)
    lstm, reference = twin_layers("cpu", dtype, seed=35, input_size=inputs, hidden_size=hidden,
                                  bidirectional=bidirectional)
    directions = 2 if bidirectional else 1
    x = rng.standard_normal((steps, batch, inputs)).astype(dtype)
    dy = rng.standard_normal((steps, batch, directions * hidden)).astype(dtype)
    expected = run_layer(lstm, x, lengths, None, dy, None)
    exact = run_layer(reference, x.astype(np.float64), lengths, None, dy.astype(np.float64), None)
    _project_a_step_at_a_time(monkeypatch)
    itemsize = np.dtype(dtype).itemsize
    for threads in (1, 2):
        with numba_threads(threads):
            assert _projection_steps(directions, lengths, hidden, itemsize, steps, threads,
                                     cpu._team_budgets()) == 1
            actual = run_layer(lstm, x, lengths, None, dy, None)
        for name, value in expected.items():
            np.testing.assert_array_equal(actual[name], value, err_msg=f"{name}, {threads}")
        assert_results_close(actual, exact, dtype, f", {threads} threads")
