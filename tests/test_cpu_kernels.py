"""The CPU building blocks on their own: the SIMD products and the vectorizable cell math."""
import math

import numpy as np
import pytest
from numba import njit

import nblstm
from nblstm import clear_workspace
from nblstm.kernels import cell, gemm, sync

DTYPES = [np.float32, np.float64]
#: Allowed error of the exp/sigmoid/tanh in units of the dtype's epsilon.
ULPS = 8


def product_case(rng, n_rows, depth, n_cols, dtype):
    a = rng.standard_normal((n_rows, depth)).astype(dtype)
    b = rng.standard_normal((depth, n_cols)).astype(dtype)
    return a, b


def packed(matrix, transposed=False):
    """b = ``matrix`` (or its transpose) packed into fresh panels, NaN before
    packing, so every element the packing leaves unwritten shows."""
    shape = matrix.shape[::-1] if transposed else matrix.shape
    panels = np.full(gemm.panel_shape(shape, matrix.dtype), np.nan, matrix.dtype)
    gemm.pack_panels(matrix, transposed, 0, shape[1], panels)
    return panels


def assert_product_close(actual, expected, depth, dtype):
    """Sums of ``depth`` products of unit normals, each rounding at most eps-relative."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=8 * depth * np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 13, 5), (6, 16, 16), (13, 300, 37),
                                   (100, gemm.TILE_DEPTH + 1, 130), (100, 64, 600), (200, 64, 1),
                                   (200, 1100, 70)])
def test_matmul_matches_numpy(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    a, b = product_case(rng, *shape, dtype)
    bias = rng.standard_normal(shape[2]).astype(dtype)
    out = rng.standard_normal((shape[0], shape[2])).astype(dtype)
    before = out.copy()
    rows = np.arange(shape[0])
    gemm.matmul(a, packed(b), rows, out, False, np.empty(0, dtype))
    assert_product_close(out, a.astype(np.float64) @ b, shape[1], dtype)
    gemm.matmul(a, packed(b), rows, out, True, bias)
    assert_product_close(out, 2 * (a.astype(np.float64) @ b) + bias, shape[1], dtype)
    assert not np.array_equal(out, before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_touches_only_listed_rows_and_reads_a_transposed_panel(dtype):
    rng = np.random.default_rng(3)
    a, b = product_case(rng, 11, 9, 21, dtype)
    out = rng.standard_normal((11, 21)).astype(dtype)
    before = out.copy()
    rows = np.array([9, 0, 4, 5, 6, 2, 10])
    b_t = np.ascontiguousarray(b.T)
    gemm.matmul(a, packed(b_t, transposed=True), rows, out, False,
                np.empty(0, dtype))
    assert_product_close(out[rows], (a.astype(np.float64) @ b)[rows], 9, dtype)
    untouched = np.setdiff1d(np.arange(11), rows)
    np.testing.assert_array_equal(out[untouched], before[untouched])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 13, 5), (13, 300, 37), (100, 600, 1030),
                                   (24, gemm.TILE_DEPTH + 1, 2 * gemm.TILE_COLS + 8)])
@pytest.mark.parametrize("n_workers", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
def test_packing_product_equals_the_product_of_packed_b(shape, dtype, n_workers, transposed):
    # Each element sums over k in matmul's order, whatever the column tiles
    # (which follow the worker count): equal to the last bit.
    rng = np.random.default_rng(sum(shape) + n_workers)
    a, b = product_case(rng, *shape, dtype)
    matrix = np.ascontiguousarray(b.T) if transposed else b
    bias = rng.standard_normal(shape[2]).astype(dtype)
    rows = np.arange(shape[0])[::-2].copy()
    start = rng.standard_normal((shape[0], shape[2])).astype(dtype)
    for accumulate, tile_bias in ((False, bias), (True, np.empty(0, dtype))):
        expected, out = start.copy(), start.copy()
        gemm.matmul(a, packed(matrix, transposed), rows, expected, accumulate, tile_bias)
        scratch = np.full(gemm.packing_scratch_shape(n_workers, dtype), np.nan, dtype)
        gemm.matmul_packing(a, matrix, transposed, rows, out, accumulate, tile_bias, scratch)
        np.testing.assert_array_equal(out, expected)
    product = a[rows].astype(np.float64) @ b
    assert_product_close(out[rows], start[rows] + product, shape[1], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_packing_lays_b_out_in_zero_padded_panels(dtype, transposed):
    # Several panels (the last one ragged) and several PACK_ROWS chunks of k:
    # the plain pack runs in parallel over k, the transposed one over panels.
    b = np.random.default_rng(6).standard_normal((3 * gemm.PACK_ROWS - 5, 140)).astype(dtype)
    depth, n_cols = b.shape
    n_panels, _, width = gemm.panel_shape(b.shape, b.dtype)
    assert n_panels >= 3 and n_cols % width
    padded = np.zeros((depth, n_panels * width), dtype)
    padded[:, :n_cols] = b
    expected = padded.reshape(depth, n_panels, width).transpose(1, 0, 2)
    source = np.ascontiguousarray(b.T) if transposed else b
    np.testing.assert_array_equal(packed(source, transposed), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_product_tile_reads_and_writes_different_row_lists(dtype, contiguous):
    # Not contiguous: a and the panels are strided views (Numba layout "A"),
    # whose strides the register block reads at run time, not as constants.
    rng = np.random.default_rng(4)
    width = gemm.block_columns(np.dtype(dtype))
    n_cols = 2 * width + 8
    a, b = product_case(rng, 8, 10, n_cols, dtype)
    out = np.zeros((20, n_cols + 10), dtype)
    a_rows, out_rows = np.array([7, 1, 3]), np.array([0, 19, 5])
    panels = packed(b)
    if not contiguous:
        a = np.repeat(a, 2, axis=1)[:, ::2]
        panels = np.repeat(panels, 2, axis=1)[:, ::2]

    @njit
    def tile(a, a_rows, out_rows, panels, out):
        # Columns width.. of b (starting on a panel edge) into columns 3 + width.. of out.
        gemm.product_tile(a, a_rows, out_rows, 0, 3, panels, 0, 10, width, n_cols, out, 3,
                          False)

    tile(a, a_rows, out_rows, panels, out)
    expected = np.zeros_like(out, dtype=np.float64)
    expected[out_rows, 3 + width:3 + n_cols] = (a.astype(np.float64) @ b)[a_rows, width:]
    assert_product_close(out, expected, 10, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_rows", [gemm.BLOCK_ROWS + 1, 2 * gemm.BLOCK_ROWS - 1,
                                    3 * gemm.BLOCK_ROWS + 2, 4 * gemm.BLOCK_ROWS])
def test_product_tile_prefetching_changes_no_value(dtype, n_rows):
    """Prefetching the next panel (a share of it in each block after a
    panel's first, full or short, over several panels, the last a ragged
    one) sums exactly as without it."""
    rng = np.random.default_rng(n_rows)
    width = gemm.block_columns(np.dtype(dtype))
    n_cols = 2 * width + 5
    a, b = product_case(rng, n_rows, 33, n_cols, dtype)
    panels = packed(b)
    rows = np.arange(n_rows)

    @njit
    def tile(prefetch, out):
        # After the last panel, the first again.
        gemm.product_tile(a, rows, rows, 0, n_rows, panels, 0, 33, 0, n_cols, out, 0, False, 0,
                          prefetch, gemm.row_address(panels[0], 0))

    plain, prefetching = (np.full((n_rows, n_cols), np.nan, dtype) for _ in range(2))
    tile(False, plain)
    tile(True, prefetching)
    np.testing.assert_array_equal(prefetching, plain)
    assert_product_close(prefetching, a.astype(np.float64) @ b, 33, dtype)


@pytest.mark.parametrize("n_rows, blocks", [
    (8, [4, 4]), (7, [4, 3]), (20, [6, 6, 4, 4]), (9, [6, 3]), (24, [6, 6, 6, 6]), (2, [2])])
def test_a_short_last_block_shares_the_rows_of_the_full_one_before_it(n_rows, blocks):
    assert gemm.BLOCK_ROWS == 6 and gemm.SHORT_BLOCK_ROWS == 3, "the cases below assume these"
    counts = []
    while sum(counts) < n_rows:
        counts.append(gemm._block_rows(n_rows - sum(counts)))
    assert counts == blocks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_groups", [1, 4])
def test_gate_packing_packs_each_group_of_columns_of_each_direction(dtype, n_groups):
    # W_h packs gate by gate (4 groups of H columns), W_x whole (1 group of 4H).
    weights = np.random.default_rng(7).standard_normal((2, 70, 4 * 37)).astype(dtype)
    group_width = weights.shape[2] // n_groups
    panels = np.full((2, n_groups) + gemm.panel_shape((70, group_width), weights.dtype), np.nan,
                     dtype)
    gemm.pack_gate_panels(weights, panels)
    for d in range(2):
        for group in range(n_groups):
            columns = weights[d, :, group * group_width:(group + 1) * group_width]
            np.testing.assert_array_equal(panels[d, group], packed(np.ascontiguousarray(columns)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_column_sums_add_every_row_of_each_matrix(dtype):
    # More columns than one task's slice, the last slice ragged.
    matrices = np.random.default_rng(9).standard_normal((2, 301, gemm.SUM_COLUMNS + 70))
    matrices = matrices.astype(dtype)
    out = np.full((2, matrices.shape[2]), np.nan, dtype)
    gemm.column_sums(matrices, out)
    exact = matrices.astype(np.float64).sum(axis=1)
    # The bound of recursive summation: n eps times the sum of the magnitudes.
    magnitudes = np.abs(matrices).astype(np.float64).sum(axis=1)
    bound = matrices.shape[1] * np.finfo(dtype).eps * magnitudes
    assert np.all(np.abs(out - exact) <= bound)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_rows", [0, 1, gemm.PACK_ROWS, 3 * gemm.PACK_ROWS + 5])
def test_packing_with_sums_packs_as_pack_panels_and_sums_each_chunk(n_rows, dtype):
    # Columns ragged past the last panel; rows ragged past the last chunk.
    matrix = np.random.default_rng(n_rows).standard_normal((n_rows, 37)).astype(dtype)
    panels = np.full(gemm.panel_shape(matrix.shape, dtype), np.nan, dtype)
    chunk_sums = np.full(gemm.chunk_sums_shape(*matrix.shape), np.nan, dtype)
    gemm.pack_panels_summing(matrix, panels, chunk_sums)
    np.testing.assert_array_equal(panels, packed(matrix))
    assert chunk_sums.shape == (math.ceil(n_rows / gemm.PACK_ROWS), matrix.shape[1])
    for chunk, sums in enumerate(chunk_sums):
        rows = matrix[chunk * gemm.PACK_ROWS:(chunk + 1) * gemm.PACK_ROWS]
        expected = rows[0].copy()
        for row in rows[1:]:
            expected += row
        np.testing.assert_array_equal(sums, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_transpose_copies_exactly(dtype):
    # Whole blocks (transposed in registers) and ragged ones (value by value).
    matrix = np.random.default_rng(5).standard_normal((70, 33)).astype(dtype)
    out = np.full((33, 70), np.nan, dtype)
    gemm.transpose_into(matrix, out)
    np.testing.assert_array_equal(out, matrix.T)


@njit
def _stream(source, destination):
    gemm.stream_into(source, destination)
    sync.store_fence()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first", [0, 1], ids=["on-a-line", "off-a-line"])
@pytest.mark.parametrize("n_lines, extra", [(0, 0), (1, 0), (3, 0), (2, 3)])
@pytest.mark.parametrize("source_step", [1, 2])
def test_streaming_copies_exactly_and_nothing_more(dtype, first, n_lines, extra, source_step):
    """Whole lines from a line boundary take the non-temporal stores; a
    destination off a line, a partial line or a strided source is copied
    value by value. Either way the values land, and only the n asked for."""
    per_line = gemm.CACHE_LINE_BYTES // np.dtype(dtype).itemsize
    n_values = n_lines * per_line + extra
    values = np.random.default_rng(n_values + first).standard_normal(2 * n_values).astype(dtype)
    source = values[::source_step][:n_values]
    destination = gemm.aligned_empty((n_values + 2 * per_line,), dtype)
    destination[:] = np.nan
    _stream(source, destination[first:first + n_values])
    np.testing.assert_array_equal(destination[first:first + n_values], source)
    assert np.isnan(destination[:first]).all() and np.isnan(destination[first + n_values:]).all()


def test_streaming_compiles_to_non_temporal_stores_and_a_fence():
    source = np.arange(2.0 * gemm.CACHE_LINE_BYTES)
    _stream(source, gemm.aligned_empty(source.shape, source.dtype))
    for signature in _stream.signatures:
        assert "!nontemporal" in _stream.inspect_llvm(signature)
        if sync._X86:
            asm = _stream.inspect_asm(signature)
            assert "movnt" in asm and "sfence" in asm


def test_workspace_is_reused_and_released():
    clear_workspace()
    first = gemm.WORKSPACE.empty("test", (10, 10), np.float64)
    assert first.ctypes.data % gemm.ALIGNMENT == 0
    again = gemm.WORKSPACE.empty("test", (5, 3), np.float32)
    assert np.shares_memory(first, again)
    assert again.shape == (5, 3) and again.dtype == np.float32
    assert gemm.WORKSPACE.empty("test", (5, 3), np.float32) is again
    larger = gemm.WORKSPACE.empty("test", (20, 20), np.float64)
    assert larger.shape == (20, 20) and larger.ctypes.data % gemm.ALIGNMENT == 0
    assert clear_workspace() > 0 and clear_workspace() == 0
    assert gemm.WORKSPACE.empty("test", (20, 20), np.float64) is not larger


@njit
def _advise(array, offset, advice):
    return gemm._madvise(array.ctypes.data + offset, array.nbytes - gemm.PAGE_BYTES, advice)


@pytest.mark.skipif(not gemm._CAN_ADVISE_HUGE_PAGES, reason="madvise is Linux's")
def test_madvise_reaches_the_c_library():
    """The call passes its address, length and advice through: a page-aligned
    range of a live array is accepted (MADV_NORMAL), an unaligned one refused."""
    array = np.zeros(4 * gemm.PAGE_BYTES, np.uint8)
    aligned = -array.ctypes.data % gemm.PAGE_BYTES
    madv_normal = 0
    assert _advise(array, aligned, madv_normal) == 0
    assert _advise(array, aligned + 1, madv_normal) == -1


@njit
def _filled_aligned(like, n_rows, n_cols):
    array = gemm.aligned_like(like, (n_rows, n_cols))
    for row in range(n_rows):
        for col in range(n_cols):
            array[row, col] = row - col
    return array


@pytest.mark.parametrize("n_rows", [3, 2049, 33000],
                         ids=["small", "huge-page-advised", "past-the-advice"])
def test_compiled_allocations_are_aligned_and_whole(n_rows):
    """Large arrays allocated in compiled code, up to a limit, are advised
    into huge pages (``madvise``); the advice must leave them whole and
    aligned, as must its absence."""
    like = np.zeros(1, np.float32)
    array = _filled_aligned(like, n_rows, 1024)
    advised = gemm.HUGE_PAGE_MIN_BYTES <= array.nbytes <= gemm.HUGE_PAGE_MAX_BYTES
    assert advised == (n_rows == 2049)
    assert (array.nbytes > gemm.HUGE_PAGE_MAX_BYTES) == (n_rows == 33000)
    assert array.ctypes.data % gemm.ALIGNMENT == 0 and array.flags.c_contiguous
    expected = np.arange(n_rows, dtype=np.float32)[:, None] - np.arange(1024, dtype=np.float32)
    np.testing.assert_array_equal(array, expected)


@njit(error_model="numpy")
def _activations(z, exp_out, sigmoid_out, tanh_out):
    gemm.use_full_vector_width()  # vectorized as the time loops vectorize them
    for i in range(z.shape[0]):
        exp_out[i] = cell.exp_nonpositive(-abs(z[i]))
        sigmoid_out[i] = cell.sigmoid(z[i])
        tanh_out[i] = cell.tanh(z[i])


@pytest.mark.parametrize("dtype", DTYPES)
def test_vectorizable_activations_are_accurate(dtype):
    z = np.concatenate([np.linspace(-87, 87, 100_001), np.linspace(-1e-3, 1e-3, 10_001),
                        np.random.default_rng(6).standard_normal(10_000),
                        [0.0, -0.0, 1e-30, -1e-30, 1e-45]]).astype(dtype)
    outputs = [np.empty_like(z) for _ in range(3)]
    _activations(z, *outputs)
    exact = z.astype(np.float64)
    expected = [np.exp(-np.abs(exact)), 1 / (1 + np.exp(-exact)), np.tanh(exact)]
    for name, actual, wanted in zip(["exp", "sigmoid", "tanh"], outputs, expected):
        wanted = wanted.astype(dtype).astype(np.float64)
        relative = np.abs(actual - wanted) / np.maximum(np.abs(wanted), np.finfo(dtype).tiny)
        assert relative.max() <= ULPS * np.finfo(dtype).eps, name


def test_vector_width_hint_reaches_the_compiled_loop():
    z = np.random.default_rng(7).standard_normal(64)
    _activations(z, *(np.empty_like(z) for _ in range(3)))
    bits = gemm.VECTOR_BYTES * gemm.BITS_PER_BYTE
    for signature in _activations.signatures:
        assert f'"prefer-vector-width"="{bits}"' in _activations.inspect_llvm(signature)
        if gemm.VECTOR_BYTES == 64:
            assert "zmm" in _activations.inspect_asm(signature)


@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_saturate_and_propagate_nan(dtype):
    z = np.array([np.inf, -np.inf, np.nan, 1e4, -1e4, 800, -800], dtype)
    exp_out, sigmoid_out, tanh_out = (np.empty_like(z) for _ in range(3))
    _activations(z, exp_out, sigmoid_out, tanh_out)
    np.testing.assert_array_equal(sigmoid_out, [1, 0, np.nan, 1, 0, 1, 0])
    np.testing.assert_array_equal(tanh_out, [1, -1, np.nan, 1, -1, 1, -1])
    np.testing.assert_array_equal(exp_out, [0, 0, np.nan, 0, 0, 0, 0])


def test_results_never_alias_the_workspace():
    rng = np.random.default_rng(7)
    params = nblstm.LSTMParams.init(6, 5, dtype=np.float32, rng=rng)
    x = rng.standard_normal((4, 3, 6)).astype(np.float32)
    dy = rng.standard_normal((4, 3, 5)).astype(np.float32)
    y, _, cache = nblstm.forward(x, params, backend="cpu")
    grads = nblstm.backward(cache, dy)
    fields = ["dx", "dh0", "dc0", "dW_x", "dW_h", "db"]
    results = [y] + [getattr(grads, name) for name in fields]
    kept = [array.copy() for array in results]
    nblstm.forward(2 * x, params, backend="cpu", training=False)
    nblstm.backward(nblstm.forward(-x, params, backend="cpu")[2], 3 * dy)
    for before, after in zip(kept, results):
        np.testing.assert_array_equal(before, after)


def test_arrays_the_threads_write_start_on_a_cache_line():
    """Threads write neighbouring tiles of y, the saved states and the gradients:
    misaligned, two of them would write into one cache line."""
    rng = np.random.default_rng(8)
    params = nblstm.LSTMParams.init(16, 32, dtype=np.float32, rng=rng)
    x = rng.standard_normal((5, 3, 16)).astype(np.float32)
    y, _, cache = nblstm.forward(x, params, backend="cpu")
    grads = nblstm.backward(cache, np.ones_like(y))
    written = [y, cache.gates, cache.hidden_states, cache.cell_states, grads.dx, grads.dW_x,
               grads.dW_h]
    assert all(array.ctypes.data % gemm.ALIGNMENT == 0 for array in written)


def test_padding_stays_zero_in_y_and_dx():
    """y and dx are filled only where valid: padded rows must still read zero."""
    rng = np.random.default_rng(9)
    params = nblstm.LSTMParams.init(4, 6, dtype=np.float64, rng=rng)
    x = rng.standard_normal((5, 3, 4))
    lengths = np.array([5, 0, 2])
    y, _, cache = nblstm.forward(x, params, backend="cpu", lengths=lengths)
    grads = nblstm.backward(cache, np.ones_like(y))
    padded = np.arange(5)[:, None] >= lengths[None, :]
    assert np.all(y[padded] == 0) and np.all(grads.dx[padded] == 0)
    assert np.all(y[~padded] != 0) and np.all(grads.dx[~padded] != 0)
