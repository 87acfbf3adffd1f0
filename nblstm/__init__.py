"""nblstm: LSTM forward and backward kernels compiled with Numba, checked against NumPy.

Quick use::

    import numpy as np, nblstm
    params = nblstm.LSTMParams.init(input_size=16, hidden_size=32, dtype=np.float32, rng=0)
    y, (h_n, c_n), cache = nblstm.forward(x, params)      # x: (T, B, 16)
    grads = nblstm.backward(cache, dy)                     # dy: (T, B, 32)
"""
from ._availability import available_backends
from .api import Grads, LSTMCache, backward, clear_workspace, forward
from .layer import LSTM
from .params import LSTMParams
from .verify import VerifyReport, verify

__all__ = ["LSTM", "LSTMParams", "LSTMCache", "Grads", "forward", "backward", "verify",
           "VerifyReport", "available_backends", "clear_workspace"]
__version__ = "0.1.0"
