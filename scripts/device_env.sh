#!/usr/bin/env bash
# Source on the GPU machine (from the repo root) after the sglang bundle is installed in
# /tmp/site: makes `lragent_sglang.kernels` / `.radix` importable without pip (the machine
# is offline) and puts the bundle first on the path.
#   source scripts/device_env.sh
mkdir -p /tmp/pkg/lragent_sglang
cp lragent_sglang/*.py /tmp/pkg/lragent_sglang/
ln -sfn "$PWD/kernels" /tmp/pkg/lragent_sglang/kernels
ln -sfn "$PWD/radix" /tmp/pkg/lragent_sglang/radix
# PYTHONSAFEPATH: `python -m pytest` must not put the repo root (whose lragent_sglang/ has
# no kernels/ inside) ahead of /tmp/pkg.
export PYTHONPATH=/tmp/site:/tmp/pkg CUDA_HOME=/usr/local/cuda PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
