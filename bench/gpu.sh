#!/usr/bin/env bash
# The checks only a GPU can make, as run on a lent H100/H200 for bench/RESULTS.md:
# `verify`, the CUDA tests unsimulated, and the GPU benchmark against torch.nn.LSTM
# on the same GPU (cuDNN) in full fp32 and with cuDNN's TF32 (torch's default).
#
#     bash bench/gpu.sh [LOG_DIR]
#
# Needs nblstm installed with numba-cuda, and torch's CUDA build for the peer.
# `python -P` keeps the checkout's nblstm/ folder (whose kernels live in ../kernels)
# from shadowing the installed package.
set -uo pipefail
cd "$(dirname "$0")/.."
logs="${1:-.}"
mkdir -p "$logs"
status=0
nvidia-smi -L 2>&1 | tee "$logs/device.txt"
python3 -P -m nblstm verify --backend cuda 2>&1 | tee "$logs/verify.txt" || status=1
NBLSTM_CUDA_SUITE=1 python3 -P -m pytest -q -p no:cacheprovider tests/cuda 2>&1 \
    | tee "$logs/cuda-tests.txt" || status=1
for precision in fp32 tf32; do
    flag=$([ "$precision" = tf32 ] && echo --tf32)
    python3 -P -m nblstm bench --backend cuda --dtype f32 --no-numpy --pairs 3 $flag \
        2>/dev/null | tee "$logs/bench-$precision.txt" || status=1
done
exit $status
