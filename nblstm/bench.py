"""Timing nblstm against its peers: the code behind ``python -m nblstm bench`` and ``bench/``.

Every comparison is side by side in one process: the two contenders run
alternately (interleaved pairs) and the reported speedup is the median of the
per-pair ratios, so drifts in clock speed or background load hit both alike.
"""
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numba
import numpy as np

from . import api
from .kernels import cpu as cpu_kernels
from .kernels import gemm
from .kernels.gemm import use_full_vector_width
from .layer import LSTM
from .params import N_GATES, LSTMParams

STEPS = 100
HIDDEN_SIZES = (128, 256, 512, 1024)
BATCH_SIZES = (1, 8, 32, 128)
QUICK_HIDDEN_SIZES = (128, 512)
QUICK_BATCH_SIZES = (1, 32)
#: The GPU grid (``--backend cuda``): cuDNN's small-batch regime and beyond.
GPU_HIDDEN_SIZES = (256, 1024)
GPU_BATCH_SIZES = (1, 8, 64, 256)
#: Edge of the square matrices whose product measures this machine's GEMM rate.
GEMM_EDGE = 2048
#: Interleaved (ours, peer) pairs per point; the median ratio is reported.
PAIRS = 5
#: The forward-and-backward flop count is this multiple of the forward's.
BACKWARD_FACTOR = 3
MODES = ("fwd", "fwdbwd")
#: Pause before each timed sample, so that the thread pool of the contender
#: that ran before (OpenMP, OpenBLAS) has stopped spinning.
SETTLE_SECONDS = 0.05
#: Shortest timed sample: calls shorter than this are repeated within one
#: sample and averaged, so that a sample measures steady-state calls and not
#: the millisecond it takes an idle machine (a VM's halted vCPU, parked pool
#: threads) to wake up after the pause.
MIN_SAMPLE_SECONDS = 0.1
DTYPE_TAGS = {"f32": np.float32, "f64": np.float64}


@dataclass(frozen=True)
class Point:
    """One benchmark configuration: sizes, dtype tag and mode (``fwd``/``fwdbwd``)."""

    steps: int
    batch: int
    hidden: int
    dtype: str
    mode: str

    @property
    def inputs(self):
        """I = H, as in the issue's grid."""
        return self.hidden

    @property
    def flops(self):
        """2*T*B*(I+H)*4H for the forward pass, three times that with backward."""
        forward = 2 * self.steps * self.batch * (self.inputs + self.hidden) * N_GATES * self.hidden
        return forward * (BACKWARD_FACTOR if self.mode == "fwdbwd" else 1)

    @property
    def passes(self):
        """Passes through the recurrence: 1 forward, 2 with backward."""
        return 2 if self.mode == "fwdbwd" else 1

    @property
    def step_flops(self):
        """Flops of one step's recurrent product, B x H by H x 4H: h_{t-1} @ W_h
        forward, dgates @ W_h^T backward. The rest of :attr:`flops` (the
        input projection; backward's dx and weight gradients) depends on no
        step's result."""
        return 2 * self.batch * self.hidden * N_GATES * self.hidden

    def name(self, backend):
        """An id such as ``cpu-fwd-f32-H512-B32``."""
        return f"{backend}-{self.mode}-{self.dtype}-H{self.hidden}-B{self.batch}"


def grid(quick=False, steps=STEPS, hidden_sizes=None, batch_sizes=None, dtypes=None, gpu=False):
    """Every :class:`Point` of the (quick, full or ``gpu``) grid, in both modes, for
    ``dtypes`` (tags, default both)."""
    if gpu:
        hidden_sizes = hidden_sizes or GPU_HIDDEN_SIZES
        batch_sizes = batch_sizes or GPU_BATCH_SIZES
    hidden_sizes = hidden_sizes or (QUICK_HIDDEN_SIZES if quick else HIDDEN_SIZES)
    batch_sizes = batch_sizes or (QUICK_BATCH_SIZES if quick else BATCH_SIZES)
    return [Point(steps, batch, hidden, dtype, mode) for dtype in (dtypes or DTYPE_TAGS)
            for hidden in hidden_sizes for batch in batch_sizes for mode in MODES]


def make_inputs(point, seed=0):
    """Parameters, x (T, B, I) and dy (T, B, H) for one point, seeded."""
    rng = np.random.default_rng(seed)
    dtype = DTYPE_TAGS[point.dtype]
    params = LSTMParams.init(point.inputs, point.hidden, dtype=dtype, rng=rng)
    x = rng.standard_normal((point.steps, point.batch, point.inputs)).astype(dtype)
    dy = rng.standard_normal((point.steps, point.batch, point.hidden)).astype(dtype)
    return params, x, dy


def nblstm_runner(point, backend, seed=0, lengths=None, bidirectional=False):
    """A zero-argument callable running one nblstm pass of ``point`` on ``backend``.

    For ``"cuda"`` the inputs and weights are uploaded first, so a call times
    the kernels and their launches, not transfers; each call returns once
    the device has finished (the backend waits for its stream).
    """
    params, x, dy = make_inputs(point, seed)
    if bidirectional:
        dy = np.concatenate([dy, dy], axis=2)
    if backend == "cuda":
        from numba import cuda

        params, x, dy = params.to_device(), cuda.to_device(x), cuda.to_device(dy)
    if bidirectional:
        lstm = LSTM(point.inputs, point.hidden, bidirectional=True,
                    dtype=DTYPE_TAGS[point.dtype], backend=backend, rng=seed)
        if backend == "cuda":
            lstm.to_device()
        if point.mode == "fwd":
            return lambda: lstm.forward(x, lengths=lengths, training=False)
        return lambda: (lstm.forward(x, lengths=lengths), lstm.backward(dy))
    if point.mode == "fwd":
        return lambda: api.forward(x, params, backend=backend, training=False, lengths=lengths)

    def forward_backward():
        _, _, cache = api.forward(x, params, backend=backend, lengths=lengths)
        return api.backward(cache, dy)

    return forward_backward


def torch_runner(point, seed=0, lengths=None, device="cpu"):
    """The same pass with ``torch.nn.LSTM`` on ``device`` (packed when ``lengths``), or
    None when torch (or, for ``"cuda"``, its CUDA build and a GPU) is missing.

    Timed the way the issue asks: forward under ``torch.inference_mode()``;
    forward+backward with ``x.requires_grad_(True)`` and gradients reset to
    None between runs; as many torch threads as Numba threads. On ``"cuda"``
    (cuDNN) each call waits for the device before it returns, as nblstm's do.
    """
    try:
        import torch
    except ImportError:
        return None
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    if device == "cuda" and not torch.cuda.is_available():
        return None
    match_torch_threads()
    params, x, dy = make_inputs(point, seed)
    module = LSTM.from_keras_weights(params.W_x, params.W_h, params.b).to_torch().to(device)
    x_torch, dy_torch = torch.from_numpy(x).to(device), torch.from_numpy(dy).to(device)
    lengths_torch = None if lengths is None else torch.from_numpy(np.asarray(lengths))
    finish = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(inputs):
        if lengths_torch is None:
            return module(inputs)[0]
        packed = pack_padded_sequence(inputs, lengths_torch, enforce_sorted=False)
        return pad_packed_sequence(module(packed)[0], total_length=point.steps)[0]

    if point.mode == "fwd":
        def forward():
            with torch.inference_mode():
                y = run(x_torch)
            finish()
            return y
        return forward

    def forward_backward():
        for parameter in module.parameters():
            parameter.grad = None
        inputs = x_torch.clone().requires_grad_(True)
        run(inputs).backward(dy_torch)
        finish()
        return inputs.grad

    return forward_backward


def match_torch_threads():
    """Give torch as many threads as Numba has (when torch is installed).

    Calls ``torch.set_num_threads`` only when the counts differ: measured here
    (torch 2.13, both on the GNU OpenMP runtime), calling it after a Numba
    parallel region has run, even with the count torch already has, left
    torch's float64 LSTM 100x slower (H=128, B=32: 17 ms -> 1.7 s) for the
    rest of the process. :func:`run` calls this before anything parallel runs.
    """
    try:
        import torch
    except ImportError:
        return
    if torch.get_num_threads() != numba.get_num_threads():
        torch.set_num_threads(numba.get_num_threads())


def numpy_runner(point, seed=0):
    """The same pass on the NumPy reference."""
    return nblstm_runner(point, "numpy", seed)


def _calls_per_sample(function):
    """Calls per timed sample of ``function``: enough to fill MIN_SAMPLE_SECONDS,
    at least one. Calls it twice: a warm-up (which may compile), then a timed call."""
    function()
    start = time.perf_counter()
    function()
    seconds = time.perf_counter() - start
    return max(1, math.ceil(MIN_SAMPLE_SECONDS / max(seconds, 1e-9)))


def _timed(function, calls):
    """Mean seconds per call over ``calls`` timed calls, after a pause and one
    untimed call that wakes the machine and the thread pools up."""
    time.sleep(SETTLE_SECONDS)
    function()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls


def compare(ours, peer, pairs=PAIRS):
    """Median seconds per call of ``ours`` and ``peer`` and the median per-pair speedup
    peer/ours.

    Both are warmed up, then timed alternately ``pairs`` times (see :func:`_timed`).
    """
    ours_calls, peer_calls = _calls_per_sample(ours), _calls_per_sample(peer)
    ours_times, peer_times = [], []
    for _ in range(pairs):
        ours_times.append(_timed(ours, ours_calls))
        peer_times.append(_timed(peer, peer_calls))
    ratios = [p / o for o, p in zip(ours_times, peer_times)]
    return statistics.median(ours_times), statistics.median(peer_times), statistics.median(ratios)


def median_time(function, repeats=PAIRS):
    """Median seconds per call of ``function`` over ``repeats`` samples (see :func:`_timed`)."""
    calls = _calls_per_sample(function)
    return statistics.median(_timed(function, calls) for _ in range(repeats))


def gemm_rates_by_source(dtype, edge=GEMM_EDGE):
    """GFLOP/s of each GEMM this process can call, on two ``edge`` x ``edge``
    matrices: ``"numpy"`` (NumPy's BLAS), ``"nblstm"`` (nblstm's own product,
    :func:`.kernels.gemm.matmul`, its packing of b included, as a BLAS call
    includes its own) and ``"torch"`` (``torch.matmul``, when torch is
    installed). Each is the best of three calls."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((edge, edge)).astype(dtype)
    b = rng.standard_normal((edge, edge)).astype(dtype)
    products = {"numpy": lambda: a @ b, "nblstm": _own_product(a, b)}
    try:
        import torch
    except ImportError:
        pass
    else:
        a_torch, b_torch = torch.from_numpy(a), torch.from_numpy(b)
        products["torch"] = lambda: torch.matmul(a_torch, b_torch)
    rates = {}
    for source, product in products.items():
        product()
        seconds = min(_timed(product, 1) for _ in range(3))
        rates[source] = 2 * edge ** 3 / seconds / 1e9
    return rates


def _own_product(a, b):
    """A function of no arguments returning ``a @ b`` (in a buffer it reuses),
    computed with nblstm's own kernels: b packed into panels, then the
    parallel register-blocked product."""
    panels = np.empty(gemm.panel_shape(b.shape, b.dtype), b.dtype)
    out = np.empty((a.shape[0], b.shape[1]), a.dtype)
    rows = np.arange(a.shape[0], dtype=np.int64)
    no_bias = np.empty(0, a.dtype)

    def product():
        gemm.pack_panels(b, False, 0, b.shape[1], panels)
        gemm.matmul(a, panels, rows, out, False, no_bias)
        return out

    return product


def gemm_rate(dtype, edge=GEMM_EDGE):
    """This machine's measured GEMM rate in GFLOP/s at ``edge``^3: the fastest
    of :func:`gemm_rates_by_source`. NumPy's BLAS alone is not the machine's
    rate everywhere: on a Zen 5 host its OpenBLAS (Haswell kernels) ran 2048^3
    float32 at 249 GFLOP/s, where nblstm's AVX-512 product ran 444 and
    torch's LSTM itself 434, so bounds read against it were no bounds."""
    return max(gemm_rates_by_source(dtype, edge).values())


#: Edge of the square matrices whose product measures the GPU's GEMM rate (cuBLAS
#: through torch): large enough to fill an H100.
GPU_GEMM_EDGE = 8192


def gpu_gemm_rate(dtype, edge=GPU_GEMM_EDGE):
    """The GPU's GEMM rate in GFLOP/s (cuBLAS through torch, with torch's default
    matmul precision), or NaN without torch's CUDA build."""
    try:
        import torch
    except ImportError:
        return float("nan")
    if not torch.cuda.is_available():
        return float("nan")
    generator = torch.Generator(device="cuda").manual_seed(0)
    a, b = (torch.randn((edge, edge), dtype=getattr(torch, np.dtype(dtype).name),
                        device="cuda", generator=generator) for _ in range(2))

    def product():
        torch.mm(a, b)
        torch.cuda.synchronize()

    product()
    seconds = min(_timed(product, 1) for _ in range(3))
    return 2 * edge ** 3 / seconds / 1e9


def backend_gemm_rate(backend, dtype):
    """The GEMM rate in GFLOP/s that ``backend``'s rows are read against, measured
    now: the GPU's for ``"cuda"``, else the CPU's (:func:`gemm_rate`)."""
    return gpu_gemm_rate(dtype) if backend == "cuda" else gemm_rate(dtype)


#: Launches timed by :func:`kernel_launch_seconds`.
LAUNCHES = 1000


def kernel_launch_seconds(launches=LAUNCHES):
    """Seconds per launch of a trivial nblstm CUDA kernel (one element), launched
    ``launches`` times back to back: the fixed cost every step's launches pay."""
    from numba import cuda

    from .kernels import cuda as kernels

    stream = cuda.stream()
    target = cuda.device_array((1, 1), np.float32, stream=stream)

    def launch_all():
        for _ in range(launches):
            kernels.fill(target, 0, stream)
        stream.synchronize()

    launch_all()
    return min(_timed(launch_all, 1) for _ in range(3)) / launches


#: Buffer sizes whose read rate bounds the time loop at B=1, where every step
#: reads all of W_h and little else: 2 MiB (each core's half stays in its L2
#: here), 16 MiB (W_h at H=1024 in float32: the last-level cache) and 256 MiB
#: (main memory).
READ_SIZES_MIB = (2, 16, 256)
#: Bytes read per measurement of :func:`read_rate`, whatever the buffer size.
READ_VOLUME = 256 * 2 ** 20


#: uint64 words per row of :func:`_read_sweep`'s buffer: eight cache lines,
#: summed lane by lane into as many accumulators, so the loop vectorizes into
#: eight independent vector adds per row (fewer lanes measured L2 at a third
#: of its rate: the adds, not the reads, set the pace).
READ_LANES = 64


@numba.njit(parallel=True, cache=True)
def _read_sweep(words, rounds, n_threads):
    """Read ``words`` (n, READ_LANES) uint64 ``rounds`` times, ``n_threads``
    threads taking equal contiguous shares (as the time loop's workers take
    their slices of W_h); returns the sum, so the reads cannot be optimised
    away. Benchmark tooling, not one of the library's kernels."""
    share = (words.shape[0] + n_threads - 1) // n_threads
    partial = np.zeros((n_threads, READ_LANES), np.uint64)
    for thread in numba.prange(n_threads):
        totals = np.zeros(READ_LANES, np.uint64)
        for _ in range(rounds):
            for row in range(thread * share, min(words.shape[0], (thread + 1) * share)):
                for lane in range(READ_LANES):
                    totals[lane] += words[row, lane]
        partial[thread] = totals
    return partial.sum()


def read_rate(n_mib):
    """GB/s at which all threads together read a buffer of ``n_mib`` MiB over and over."""
    words = np.ones((n_mib * 2 ** 20 // (8 * READ_LANES), READ_LANES), np.uint64)
    rounds = max(1, READ_VOLUME // words.nbytes)
    n_threads = numba.get_num_threads()
    _read_sweep(words, 1, n_threads)
    seconds = min(_timed(lambda: _read_sweep(words, rounds, n_threads), 1) for _ in range(3))
    return rounds * words.nbytes / seconds / 1e9


#: Keys of :func:`read_rate`'s results that :func:`w_h_read_seconds` reads: the
#: smallest buffer's (each thread's share in its core's L2) and the next one's
#: (the last-level cache).
L2_READ, BEYOND_L2_READ = (f"{size}MiB" for size in READ_SIZES_MIB[:2])


def w_h_read_seconds(point, read_gbps, l2_bytes):
    """The shortest time in which the threads can read W_h (4H x H) once: at
    most ``l2_bytes`` of it (the L2 caches of all the threads' cores) at the
    rate ``read_gbps[L2_READ]`` (GB/s) and the rest at
    ``read_gbps[BEYOND_L2_READ]``, the fastest rates these parts can be read at."""
    itemsize = np.dtype(DTYPE_TAGS[point.dtype]).itemsize
    weight_bytes = N_GATES * point.hidden * point.hidden * itemsize
    cached_bytes = min(weight_bytes, l2_bytes)
    return (cached_bytes / (read_gbps[L2_READ] * 1e9)
            + (weight_bytes - cached_bytes) / (read_gbps[BEYOND_L2_READ] * 1e9))


def lower_bound_seconds(point, gemm_gflops, read_gbps, l2_bytes):
    """A lower bound on the time of any implementation of ``point`` on this machine.

    The larger of two measured limits: the point's flops (:attr:`Point.flops`)
    at the GEMM rate ``gemm_gflops`` (GFLOP/s), and the reads of W_h that the
    recurrence cannot avoid: every step's h_t needs all of W_h, so each step
    reads it once (twice with backward, which reads it again, transposed), in
    :func:`w_h_read_seconds` at the least. The cell math and every other
    pass come on top of either limit.
    """
    flop_seconds = point.flops / (gemm_gflops * 1e9)
    read_seconds = w_h_read_seconds(point, read_gbps, l2_bytes)
    return max(flop_seconds, point.passes * point.steps * read_seconds)


def threads_l2_bytes():
    """Bytes of L2 cache in the cores of Numba's threads (one core each)."""
    return numba.get_num_threads() * cpu_kernels.core_cache_bytes()


#: Rounds of the cell math on one scratch row per timing of :func:`cell_seconds_per_unit`.
CELL_ROUNDS = 100_000


@numba.njit(cache=True, error_model=cpu_kernels.CELL_ERROR_MODEL,
            fastmath=cpu_kernels.CELL_FASTMATH)
def _cell_sweep(scratch, rounds):
    """Run the forward cell math on the scratch row ``scratch`` (SCRATCH_SEGMENTS *
    UNITS_PER_TILE,) ``rounds`` times in place, compiled as the time loop compiles it;
    returns a value of the result, so that the work cannot be optimised away.
    Benchmark tooling, not one of the library's kernels."""
    use_full_vector_width()
    for _ in range(rounds):
        cpu_kernels.forward_units(scratch, cpu_kernels.UNITS_PER_TILE)
    return scratch[0]


def cell_seconds_per_unit(dtype):
    """Seconds per hidden unit of nblstm's forward cell math (five activations and
    the new states, :func:`.kernels.cpu.forward_units`) in one thread, on data
    in L1: the part of the time loop's cell phase that no copy or cache miss adds
    to. Each round feeds the last one's results back in (gates become
    activations of activations); the branch-free vector code takes the same
    time on any finite values."""
    rng = np.random.default_rng(0)
    row = rng.standard_normal(cpu_kernels.SCRATCH_SEGMENTS * cpu_kernels.UNITS_PER_TILE)
    row = row.astype(dtype)
    _cell_sweep(row.copy(), 1)
    seconds = min(_timed(lambda: _cell_sweep(row.copy(), CELL_ROUNDS), 1) for _ in range(3))
    return seconds / (CELL_ROUNDS * cpu_kernels.UNITS_PER_TILE)


def recurrence_seconds(point, gemm_gflops, read_gbps, l2_bytes, cell_seconds, n_threads):
    """A lower bound on nblstm's own time for ``point``, the issue's kind of
    bound: the products outside the recurrence at the GEMM rate
    ``gemm_gflops`` (GFLOP/s), then each step's recurrent product
    (:attr:`Point.step_flops`, once a pass) no faster than the GEMM rate and
    no faster than W_h can be read (:func:`w_h_read_seconds`), plus the
    forward cell math (T * B * H units at ``cell_seconds`` each,
    :func:`cell_seconds_per_unit`) shared by ``n_threads``.

    nblstm runs the input projection before the time loop and backward's
    other products after it, as cuDNN and haste do, so none of them hides
    under the steps' reads. Where the batch is large the steps' flops take
    longer than their reads, and this is the flops at the GEMM rate plus the
    cell; at B=1 the reads take longer and the input projection comes on top
    of them. Never below :func:`lower_bound_seconds`. The backward pass's
    cell math, the copies and the waits come on top.
    """
    rate = gemm_gflops * 1e9
    step_seconds = max(point.step_flops / rate, w_h_read_seconds(point, read_gbps, l2_bytes))
    n_steps = point.passes * point.steps
    other_seconds = (point.flops - n_steps * point.step_flops) / rate
    units = point.steps * point.batch * point.hidden
    return other_seconds + n_steps * step_seconds + units * cell_seconds / n_threads


@dataclass(frozen=True)
class Row:
    """One measured point of ``python -m nblstm bench``.

    ``bound_ms`` is :func:`lower_bound_seconds` (NaN on the GPU; see
    :func:`measure` for the GEMM rate it takes), and ``ceiling`` torch's time
    over it: the largest speedup over torch that any implementation could
    show here.
    ``cell_ceiling`` is torch's time over :func:`recurrence_seconds`: the
    largest speedup nblstm's own formulation (products outside the time loop,
    the steps' products, its cell math) leaves room for.
    """

    point: str
    ms: float
    gflops: float
    percent_of_gemm: float
    speedup_vs_numpy: float
    speedup_vs_torch: float
    torch_ms: float
    gemm_gflops: float
    bound_ms: float = float("nan")
    ceiling: float = float("nan")
    cell_ceiling: float = float("nan")


def measure(point, backend="cpu", pairs=PAIRS, with_numpy=True, facts=None):
    """Time one point against the NumPy reference and torch (when installed; on the
    GPU for ``"cuda"``).

    The row's percentage is read against the GEMM rate measured right before
    the point (:func:`backend_gemm_rate`): this machine's rate moves by 15-20 %
    within a run (turbo, neighbours on the host), and one rate taken at the
    start of a run made the percentages of later points swing with it. With
    the CPU's ``facts`` (:func:`machine_facts`) the row also gets its lower
    bound and ceilings, taken at the faster of the GEMM rates, and of the cell
    timings (:func:`cell_seconds_per_unit`), measured at the start and next to
    the point: a bound read against a rate measured in a slow moment would not
    be one.
    """
    rate = backend_gemm_rate(backend, DTYPE_TAGS[point.dtype])
    ours = nblstm_runner(point, backend)
    peer = torch_runner(point, device="cuda" if backend == "cuda" else "cpu")
    if peer is not None:
        ours_s, torch_s, vs_torch = compare(ours, peer, pairs)
    else:
        ours_s, torch_s, vs_torch = median_time(ours, pairs), float("nan"), float("nan")
    vs_numpy = compare(ours, numpy_runner(point), pairs)[2] if with_numpy else float("nan")
    gflops = point.flops / ours_s / 1e9
    bound_s = cell_bound_s = float("nan")
    if facts is not None and "cell_ns" in facts:
        fastest = max(rate, facts["gemm_gflops"][point.dtype])
        l2_bytes = threads_l2_bytes()
        bound_s = lower_bound_seconds(point, fastest, facts["read_gbps"], l2_bytes)
        cell_s = min(facts["cell_ns"][point.dtype] * 1e-9,
                     cell_seconds_per_unit(DTYPE_TAGS[point.dtype]))
        cell_bound_s = recurrence_seconds(point, fastest, facts["read_gbps"], l2_bytes, cell_s,
                                          numba.get_num_threads())
    return Row(point.name(backend), ours_s * 1e3, gflops, 100 * gflops / rate, vs_numpy,
               vs_torch, torch_s * 1e3, rate, bound_s * 1e3, _over(torch_s, bound_s),
               _over(torch_s, cell_bound_s))


def _over(seconds, bound_seconds):
    """``seconds / bound_seconds``, NaN for a bound that is not positive."""
    return seconds / bound_seconds if bound_seconds > 0 else float("nan")


@dataclass(frozen=True)
class Target:
    """One CPU speed target of the benchmark issue: the :class:`Row` field
    ``quantity`` at least ``threshold`` at every point of dtype tag ``dtype``
    (of batch size ``batch`` only, when given, and H >= ``min_hidden``)."""

    label: str
    quantity: str
    threshold: float
    dtype: str
    batch: int | None = None
    min_hidden: int = 0

    def applies(self, point):
        """Whether the target covers ``point``."""
        return (point.dtype == self.dtype and self.batch in (None, point.batch)
                and point.hidden >= self.min_hidden)


TARGETS = (
    Target("fp32 at least as fast as torch.nn.LSTM", "speedup_vs_torch", 1.0, "f32"),
    Target("fp32 B=1 at least 1.5x torch", "speedup_vs_torch", 1.5, "f32", batch=1),
    Target("fp64 at least 1.5x torch", "speedup_vs_torch", 1.5, "f64"),
    Target("fp32 B=128 H>=512 at least 85 % of the GEMM rate", "percent_of_gemm", 85.0, "f32",
           batch=128, min_hidden=512),
)


def check_targets(points, rows, targets=TARGETS):
    """How the measured ``rows`` (one per point of ``points``) meet ``targets``.

    Returns one dict per target that covers a measured point (a NaN, such as a
    speedup without torch, is not measured): ``target``, ``points`` (how many
    it covers), ``met``, and ``misses``, each a dict of ``point``, ``value``,
    ``ceiling``, ``cell_ceiling``, ``bound`` and ``bound_with_cell``: for
    speedup targets, the row's ceilings (:class:`Row`) and whether each is below
    the target (no implementation could meet it here; nblstm could not without
    a faster cell math, products beyond the GEMM rate or reads of W_h beyond the
    measured rates); None for the others.
    """
    results = []
    for target in targets:
        covered = [row for point, row in zip(points, rows) if target.applies(point)
                   and not math.isnan(getattr(row, target.quantity))]
        if not covered:
            continue
        speedup = target.quantity.startswith("speedup")
        misses = [{"point": row.point, "value": getattr(row, target.quantity),
                   "ceiling": row.ceiling if speedup else None,
                   "cell_ceiling": row.cell_ceiling if speedup else None,
                   "bound": bool(row.ceiling < target.threshold) if speedup else None,
                   "bound_with_cell": (bool(row.cell_ceiling < target.threshold)
                                       if speedup else None)}
                  for row in covered if getattr(row, target.quantity) < target.threshold]
        results.append({"target": target.label, "points": len(covered),
                        "met": len(covered) - len(misses), "misses": misses})
    return results


def format_targets(results):
    """Lines that say how :func:`check_targets`' results stand."""
    lines = ["Targets (ceiling: torch's time over a lower bound on any implementation's "
             "time here; with the cell: over the products outside the time loop at the GEMM "
             "rate, each step's product no faster than the GEMM rate or than W_h can be read, "
             "and nblstm's forward cell math; bound: a ceiling below the target):"]
    for result in results:
        line = f"  {result['target']}: {result['met']} of {result['points']}"
        described = []
        for miss in result["misses"]:
            if miss["ceiling"] is None:
                described.append(f"{miss['point']} {miss['value']:.1f} %")
                continue
            bound = ", bound" if miss["bound"] or miss["bound_with_cell"] else ""
            described.append(f"{miss['point']} {miss['value']:.2f}x (ceiling "
                             f"{miss['ceiling']:.2f}, {miss['cell_ceiling']:.2f} with the "
                             f"cell{bound})")
        if described:
            line += "; misses " + ", ".join(described)
        lines.append(line)
    return lines


def _progress(done, total, label):
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<28}")
    sys.stderr.flush()


def format_table(rows):
    """The rows as a fixed-width text table."""
    lines = [f"{'point':<26} {'ms':>9} {'GFLOP/s':>8} {'%GEMM':>6} {'x numpy':>8} "
             f"{'x torch':>8} {'torch ms':>9} {'GEMM GF/s':>9} {'ceiling':>7} {'w/ cell':>7}"]
    for row in rows:
        lines.append(f"{row.point:<26} {row.ms:9.2f} {row.gflops:8.1f} {row.percent_of_gemm:6.1f}"
                     f" {row.speedup_vs_numpy:8.2f} {row.speedup_vs_torch:8.2f} "
                     f"{row.torch_ms:9.2f} {row.gemm_gflops:9.0f} {row.ceiling:7.2f}"
                     f" {row.cell_ceiling:7.2f}")
    return "\n".join(lines)


def plot(rows, path):
    """Speedup vs torch against batch size, one line per H and dtype/mode (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    series = {}
    for row in rows:
        _, mode, dtype, hidden, batch = row.point.split("-")
        series.setdefault(f"{mode} {dtype} {hidden}", []).append((int(batch[1:]),
                                                                   row.speedup_vs_torch))
    for label, values in sorted(series.items()):
        values.sort()
        axis.plot([b for b, _ in values], [s for _, s in values], marker="o", label=label)
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("batch size")
    axis.set_ylabel("speedup vs torch.nn.LSTM")
    axis.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    figure.savefig(path)


#: The variable-length point: B=32, I=H=256, lengths uniform in [T/4, T] (seed 0).
SEQUENCE_BATCH = 32
SEQUENCE_HIDDEN = 256


def sequence_report(pairs=PAIRS, steps=STEPS):
    """Lines comparing variable lengths with full length and with torch's packed path,
    and bidirectional with unidirectional, at B=32, I=H=256, float32."""
    rng = np.random.default_rng(0)
    quarter_to_full = rng.integers(steps // 4, steps + 1, SEQUENCE_BATCH)
    up_to_full = rng.integers(0, steps + 1, SEQUENCE_BATCH)
    full = np.full(SEQUENCE_BATCH, steps)
    lines = []
    for mode in MODES:
        point = Point(steps, SEQUENCE_BATCH, SEQUENCE_HIDDEN, "f32", mode)
        ours_full = nblstm_runner(point, "cpu", lengths=full)
        ours_quarter = nblstm_runner(point, "cpu", lengths=quarter_to_full)
        full_s, half_s, _ = compare(ours_full, nblstm_runner(point, "cpu", lengths=up_to_full),
                                    pairs)
        lines.append(f"{mode}: lengths U[0,T] (mean {up_to_full.mean():.1f}) / full length: "
                     f"{half_s / full_s:.2f}")
        packed = torch_runner(point, lengths=quarter_to_full)
        if packed is not None:
            ours_s, torch_s, ratio = compare(ours_quarter, packed, pairs)
            lines.append(f"{mode}: lengths U[T/4,T]: nblstm {ours_s * 1e3:.1f} ms, torch packed "
                         f"{torch_s * 1e3:.1f} ms, speedup {ratio:.2f}")
            unpacked_s = median_time(torch_runner(point), pairs)
            lines.append(f"{mode}: torch packed / torch full-length unpacked: "
                         f"{torch_s / unpacked_s:.2f}")
        uni_s, bi_s, _ = compare(nblstm_runner(point, "cpu"),
                                 nblstm_runner(point, "cpu", bidirectional=True), pairs)
        lines.append(f"{mode}: bidirectional / unidirectional: {bi_s / uni_s:.2f}")
    return lines


def allow_cudnn_tf32(allowed):
    """Let cuDNN run torch's fp32 LSTM on TF32 tensor cores (torch's default) or not
    (full fp32, as nblstm computes). A setting of torch's, changed only by the
    GPU benchmark."""
    try:
        import torch
    except ImportError:
        return
    torch.backends.cudnn.allow_tf32 = allowed


def machine_facts(backend):
    """What the table is read against: the GEMM rate per dtype tag and, on the CPU,
    each GEMM's rate (:func:`gemm_rates_by_source`), read rates and the cell's
    time, or on the GPU, the device and the cost of one kernel launch."""
    if backend == "cuda":
        from ._availability import cuda_status

        return {"device": str(cuda_status()), "gemm_gflops": _gemm_rates(backend),
                "launch_us": kernel_launch_seconds() * 1e6}
    by_source = {tag: gemm_rates_by_source(dtype) for tag, dtype in DTYPE_TAGS.items()}
    return {"gemm_gflops": {tag: max(rates.values()) for tag, rates in by_source.items()},
            "gemm_gflops_by_source": by_source,
            "read_gbps": {f"{size}MiB": read_rate(size) for size in READ_SIZES_MIB},
            "cell_ns": {tag: 1e9 * cell_seconds_per_unit(dtype)
                        for tag, dtype in DTYPE_TAGS.items()}}


def _gemm_rates(backend):
    """dtype tag -> :func:`backend_gemm_rate`, measured now."""
    return {tag: backend_gemm_rate(backend, dtype) for tag, dtype in DTYPE_TAGS.items()}


def _describe(facts):
    lines = []
    if "device" in facts:
        lines.append(f"Device: {facts['device']}; one kernel launch: "
                     f"{facts['launch_us']:.1f} us")
    edge = GPU_GEMM_EDGE if "device" in facts else GEMM_EDGE
    lines.append(f"GEMM rate at {edge}^3 at the start: " + ", ".join(
        f"{tag} {rate:.0f} GFLOP/s" for tag, rate in facts["gemm_gflops"].items())
        + " (each row's %GEMM is read against the rate measured just before it, its last column)")
    if "gemm_gflops_by_source" in facts:
        lines.append("GEMM rate by source, the fastest taken: " + "; ".join(
            f"{tag} " + ", ".join(f"{source} {rate:.0f}" for source, rate in rates.items())
            for tag, rates in facts["gemm_gflops_by_source"].items()))
    if "read_gbps" in facts:
        lines.append("Read rate: " + ", ".join(f"{size} {rate:.0f} GB/s"
                                               for size, rate in facts["read_gbps"].items()))
    if "cell_ns" in facts:
        lines.append("Forward cell math, one thread, data in L1: " + ", ".join(
            f"{tag} {ns:.2f} ns a unit" for tag, ns in facts["cell_ns"].items()))
    return lines


def run(args):
    """``python -m nblstm bench``: measure the grid and print (or dump) the table."""
    match_torch_threads()
    if args.sequences:
        print("\n".join(sequence_report(args.pairs, args.steps)))
        return 0
    on_gpu = args.backend == "cuda"
    if on_gpu:
        from ._availability import cuda_status

        if not cuda_status().available:
            sys.stderr.write(f"--backend cuda: the cuda backend is {cuda_status()}\n")
            return 2
        allow_cudnn_tf32(args.tf32)
    points = grid(quick=args.quick, steps=args.steps, hidden_sizes=args.hidden,
                  batch_sizes=args.batch, dtypes=args.dtype, gpu=on_gpu)
    facts = machine_facts(args.backend)
    rows = []
    for done, point in enumerate(points):
        _progress(done, len(points), point.name(args.backend))
        rows.append(measure(point, args.backend, args.pairs, with_numpy=args.numpy,
                            facts=facts))
    _progress(len(points), len(points), "done")
    sys.stderr.write("\n")
    targets = [] if on_gpu else check_targets(points, rows)
    if args.json:
        print(json.dumps({**facts, "threads": numba.get_num_threads(),
                          "rows": [asdict(row) for row in rows], "targets": targets}, indent=1))
    else:
        print("\n".join(_describe(facts)))
        print(format_table(rows))
        if targets:
            print("\n".join(format_targets(targets)))
    if args.plot:
        plot(rows, args.plot)
    return 0
