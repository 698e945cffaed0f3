#!/usr/bin/env bash
# Download, for Python 3.12 on x86_64, the few wheels the GPU image lacks into ./wheels/
# (git-ignored, a few MB), so a device run can carry them:
#   bash benchmarks/gpu_wheels.sh
#   (on the GPU machine) pip install --no-index --no-deps wheels/*.whl
#                        PYTHONPATH=. python benchmarks/depth_throughput.py --device cuda ...
set -euo pipefail
cd "$(dirname "$0")/.."
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d wheels -r benchmarks/gpu_requirements.txt
ls -la wheels
