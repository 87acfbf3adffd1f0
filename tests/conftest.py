import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

#: tests/cuda runs in its own process (see test_cuda_suite.py): under the
#: simulator, NUMBA_ENABLE_CUDASIM must be set before numba is imported.
CUDA_SUITE_ENV = "NBLSTM_CUDA_SUITE"

if os.environ.get(CUDA_SUITE_ENV) != "1":
    collect_ignore = ["cuda"]
