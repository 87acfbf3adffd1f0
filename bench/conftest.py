"""Options of the benchmark suite: ``--full-grid`` for every point, ``--smoke`` for a CI check."""


def pytest_addoption(parser):
    parser.addoption("--full-grid", action="store_true",
                     help="benchmark the whole grid (H 128..1024, B 1..128); default: quick subset")
    parser.addoption("--smoke", action="store_true",
                     help="tiny shapes, only to check that every benchmark runs")


def pytest_sessionstart(session):
    """Match torch's thread count to Numba's before anything parallel runs (see
    :func:`nblstm.bench.match_torch_threads`)."""
    from nblstm import bench

    bench.match_torch_threads()
