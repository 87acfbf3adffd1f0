"""The benchmark suite and ``python -m nblstm bench`` run (tiny shapes; no timing asserted)."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from nblstm import bench
from nblstm.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_bench_command_reports_every_point(capsys):
    assert main(["bench", "--steps", "3", "--hidden", "8", "--batch", "1", "2", "--pairs", "1",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [row["point"] for row in report["rows"]]
    assert names == [f"cpu-{mode}-{dtype}-H8-B{batch}" for dtype in ("f32", "f64")
                     for batch in (1, 2) for mode in ("fwd", "fwdbwd")]
    assert all(row["ms"] > 0 and row["speedup_vs_numpy"] > 0 for row in report["rows"])
    assert report["gemm_gflops"]["f32"] > 0
    # Each row's share is read against the GEMM rate measured next to it.
    for row in report["rows"]:
        assert row["gemm_gflops"] > 0
        assert row["percent_of_gemm"] == pytest.approx(100 * row["gflops"] / row["gemm_gflops"])
    assert list(report["read_gbps"]) == [f"{size}MiB" for size in bench.READ_SIZES_MIB]
    assert all(rate > 0 for rate in report["read_gbps"].values())


def test_benchmark_suite_runs():
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench", "--smoke",
         "--benchmark-disable"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-2000:]


def test_bench_sequences_report(capsys):
    assert main(["bench", "--sequences", "--steps", "8", "--pairs", "1"]) == 0
    out = capsys.readouterr().out
    for mode in ("fwd", "fwdbwd"):
        assert f"{mode}: bidirectional / unidirectional" in out
        assert f"{mode}: lengths U[0,T]" in out


def test_bench_command_selects_dtypes_and_skips_the_reference(capsys):
    assert main(["bench", "--steps", "2", "--hidden", "8", "--batch", "1", "--pairs", "1",
                 "--dtype", "f64", "--no-numpy", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [row["point"] for row in rows] == ["cpu-fwd-f64-H8-B1", "cpu-fwdbwd-f64-H8-B1"]
    assert all(row["ms"] > 0 and math.isnan(row["speedup_vs_numpy"]) for row in rows)


def test_timed_samples_repeat_short_calls():
    calls = []
    assert bench.median_time(lambda: calls.append(1), repeats=2) < bench.MIN_SAMPLE_SECONDS
    # One warm-up, one calibration call, then per sample a wake-up call and many timed calls.
    assert len(calls) > 2 * 100


class _FakeTorch:
    def __init__(self, threads):
        self.threads, self.calls = threads, []

    def get_num_threads(self):
        return self.threads

    def set_num_threads(self, count):
        self.calls.append(count)


def test_torch_threads_are_set_only_when_they_differ(monkeypatch):
    import numba

    same = _FakeTorch(numba.get_num_threads())
    monkeypatch.setitem(sys.modules, "torch", same)
    bench.match_torch_threads()
    assert same.calls == []
    other = _FakeTorch(numba.get_num_threads() + 1)
    monkeypatch.setitem(sys.modules, "torch", other)
    bench.match_torch_threads()
    assert other.calls == [numba.get_num_threads()]


def test_gpu_bench_without_a_gpu_says_why(capsys, monkeypatch):
    from nblstm import _availability

    monkeypatch.setattr(_availability, "cuda_status",
                        lambda: _availability.BackendStatus(False, "unavailable: no GPU here"))
    assert main(["bench", "--backend", "cuda", "--steps", "2", "--hidden", "4"]) == 2
    assert "--backend cuda: the cuda backend is unavailable: no GPU here" in capsys.readouterr().err


def test_ab_tool_imports_a_revision_and_this_checkout_side_by_side(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("bench/ab.py reads revisions from git")
    spec = importlib.util.spec_from_file_location("bench_ab", ROOT / "bench" / "ab.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    checkout = sorted(path.name for path in (ROOT / "kernels").glob("*.py"))
    versions = []
    for name, revision in (("ab_test_base", "HEAD"), ("ab_test_new", None)):
        copy = tmp_path / name
        copy.mkdir()
        ab.write_kernels(revision, copy)
        if revision is None:
            assert sorted(path.name for path in copy.glob("*.py")) == checkout
        versions.append(ab.import_kernels(name, copy))
    base, new = versions
    assert base is not new and base.forward is not new.forward
    assert Path(base.__file__).parent == tmp_path / "ab_test_base"
