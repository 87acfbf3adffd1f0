"""Compiled code of nblstm: the cell math once, and the CPU and CUDA drivers.

Installed as ``nblstm.kernels``. Nothing here checks arguments or decides
allocation policy: the public API in :mod:`nblstm` does both.
"""
