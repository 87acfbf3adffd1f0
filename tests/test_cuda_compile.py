"""Every CUDA kernel compiles to PTX for real GPUs, in every dtype it is launched with.

Runs in the main (unsimulated) test process: numba-cuda's NVVM compiles PTX on
a machine without a GPU. A kernel that passes the simulator but does not
compile fails here, and so does float32 PTX that computes in float64.
"""
import re

import numpy as np
import pytest
from numba import config, cuda

from nblstm.kernels import cuda as kernels

COMPUTE_CAPABILITIES = [(9, 0), (8, 0)]
DTYPES = [np.dtype(np.float32), np.dtype(np.float64)]
KERNELS = sorted(kernels.signatures(DTYPES[0]))
#: Launch shapes a device may be given (launch_config picks from its limits): GEMM
#: tile edges (the other kernels take one launch shape).
LAUNCHES = [kernels.LaunchConfig(tile, 256, 32, kernels.LOOP_SLICES) for tile in (8, 16, 32)]
FLOAT64_INSTRUCTION = re.compile(r"\.f64\b")

pytestmark = pytest.mark.skipif(config.ENABLE_CUDASIM, reason="compile_ptx needs the real "
                                                              "CUDA target, not the simulator")


@pytest.mark.parametrize("cc", COMPUTE_CAPABILITIES, ids=lambda cc: f"sm{cc[0]}{cc[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", KERNELS)
def test_kernel_compiles_to_ptx(name, dtype, cc):
    signature = kernels.signatures(dtype)[name]
    for launch in LAUNCHES if name == "gemm" else LAUNCHES[1:2]:
        ptx, _ = cuda.compile_ptx(kernels.python_kernel(name, dtype, launch), signature, cc=cc)
        assert ".entry" in ptx and f".target sm_{cc[0]}{cc[1]}" in ptx
        if dtype == np.float32:
            assert not FLOAT64_INSTRUCTION.search(ptx), f"{name} float32 PTX holds .f64"

