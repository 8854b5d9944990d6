#!/usr/bin/env bash
# Source on the GPU machine (from the repo root) after the sglang bundle is installed in
# /tmp/site: makes `lragent_sglang` (with `.kernels` / `.radix`) importable without pip
# (the machine is offline) and puts the bundle first on the path. The plugin's entry point
# needs our wheel instead (`pip wheel --no-deps .`, installed with --target /tmp/site).
#   source scripts/device_env.sh
rm -rf /tmp/pkg/lragent_sglang && mkdir -p /tmp/pkg
cp -r lragent_sglang /tmp/pkg/
ln -sfn "$PWD/kernels" /tmp/pkg/lragent_sglang/kernels
ln -sfn "$PWD/radix" /tmp/pkg/lragent_sglang/radix
# PYTHONSAFEPATH: `python -m pytest` must not put the repo root (whose lragent_sglang/ has
# no kernels/ inside) ahead of /tmp/pkg.
export PYTHONPATH=/tmp/site:/tmp/pkg CUDA_HOME=/usr/local/cuda PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
