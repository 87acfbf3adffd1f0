"""Runs tests/cuda in a process of its own: on the GPU when there is one, else simulated."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CUDA_SUITE_ENV
from nblstm._availability import cuda_status

TESTS = Path(__file__).parent


def test_cuda_suite_passes():
    env = dict(os.environ, **{CUDA_SUITE_ENV: "1"})
    if not cuda_status().available:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "cuda")],
        env=env, capture_output=True, text=True, check=False, cwd=TESTS.parent)
    if completed.returncode != 0:
        pytest.fail(f"tests/cuda failed (exit {completed.returncode}):\n"
                    f"{completed.stdout[-20000:]}\n{completed.stderr[-5000:]}")
    print(completed.stdout.splitlines()[-1])
