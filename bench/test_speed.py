"""pytest-benchmark suite: nblstm vs torch.nn.LSTM and the NumPy reference.

Contenders: nblstm's ``cpu`` and ``cuda`` backends, torch on the CPU and, with
a GPU, on it (cuDNN), and the NumPy reference; those that cannot run here skip.

    python -m pytest bench                      # quick subset
    python -m pytest bench --full-grid          # T=100, H 128..1024, B 1..128, f32/f64
    python -m pytest bench --benchmark-save=NAME / --benchmark-compare

Ids name the point (``cpu-fwd-f32-H512-B32``) and each point is its own
group, so the peers sit side by side in the report.
"""
import numba
import numpy as np
import pytest

from nblstm import available_backends, bench

SMOKE = dict(steps=4, hidden_sizes=(8,), batch_sizes=(2,))
CONTENDERS = ("cpu", "cuda", "torch", "torch-cuda", "numpy")
#: The variable-length point of the issue: B=32, lengths uniform in [T/4, T].
LENGTHS_BATCH = 32
LENGTHS_HIDDEN = 256


def _points(config):
    if config.getoption("--smoke"):
        return bench.grid(**SMOKE)
    return bench.grid(quick=not config.getoption("--full-grid"))


def pytest_generate_tests(metafunc):
    if "point" in metafunc.fixturenames:
        points = _points(metafunc.config)
        metafunc.parametrize("point", points, ids=[p.name("x")[2:] for p in points])


def _runner(contender, point, **options):
    if contender == "torch":
        runner = bench.torch_runner(point, **options)
        if runner is None:
            pytest.skip("torch is not installed (pip install torch)")
        return runner
    if contender == "torch-cuda":
        runner = bench.torch_runner(point, device="cuda", **options)
        if runner is None:
            pytest.skip("torch with CUDA and a GPU are not available")
        return runner
    if contender == "cuda":
        status = available_backends()["cuda"]
        if not status.available or numba.config.ENABLE_CUDASIM:
            pytest.skip(f"no GPU to time the cuda backend on ({status})")
    return bench.nblstm_runner(point, contender, **options)


@pytest.mark.parametrize("contender", CONTENDERS)
def test_grid(benchmark, contender, point):
    benchmark.group = point.name("grid")
    benchmark.name = point.name(contender)
    benchmark(_runner(contender, point))


def _lengths_point(config, mode):
    if config.getoption("--smoke"):
        return bench.Point(4, 4, 8, "f32", mode)
    return bench.Point(bench.STEPS, LENGTHS_BATCH, LENGTHS_HIDDEN, "f32", mode)


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("contender", ["cpu", "torch"])
@pytest.mark.parametrize("lengths_kind", ["full", "variable"])
def test_variable_lengths(benchmark, request, contender, mode, lengths_kind):
    point = _lengths_point(request.config, mode)
    lengths = np.full(point.batch, point.steps)
    if lengths_kind == "variable":
        lengths = np.random.default_rng(0).integers(point.steps // 4, point.steps + 1,
                                                    point.batch)
    benchmark.group = f"lengths-{mode}"
    benchmark.name = f"{contender}-{lengths_kind}"
    benchmark(_runner(contender, point, lengths=lengths))


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_bidirectional_cost(benchmark, request, mode, bidirectional):
    point = _lengths_point(request.config, mode)
    benchmark.group = f"directions-{mode}"
    benchmark.name = f"cpu-{'bi' if bidirectional else 'uni'}"
    benchmark(bench.nblstm_runner(point, "cpu", bidirectional=bidirectional))
