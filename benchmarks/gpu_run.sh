#!/usr/bin/env bash
# Every GPU figure BENCHMARKS.md asks for, in one call on the device machine (~10 min on an
# H100/H200). Prepare here first: `bash benchmarks/gpu_wheels.sh`; then, with the device tool:
#   run(command="bash benchmarks/gpu_run.sh", carry=["wheels"], timeout_s=600)
# Logs go to $OUT (default ./gpu-out). `QUICK=1 bash benchmarks/gpu_run.sh` runs the same
# steps at tiny size on CPU, to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ -d wheels ] && ! python3 -c "import pydantic, pycocotools, segment_anything" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps wheels/*.whl
fi
export PYTHONPATH=.
py=${PYTHON:-python3}
step() { echo "== $*" | tee -a "$OUT/summary.txt"; timeout "${STEP_TIMEOUT:-170}" "$@" 2>&1 | tee "$OUT/step-$(date +%s%N).log" | tail -25 | tee -a "$OUT/summary.txt"; }
if [ "${QUICK:-0}" = 1 ]; then
    step $py benchmarks/depth_throughput.py --device cpu --tiny
    step $py benchmarks/segment_throughput.py --device cpu --tiny --n-images 2 --modes exact,fast
    step $py benchmarks/train_throughput.py --device cpu --tiny --steps 2
    step $py benchmarks/eval_throughput.py --device cpu --tiny -n 16 --batch-size 8 -q
else
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$OUT/summary.txt"
    step $py benchmarks/depth_throughput.py --device cuda --models small,large --n-images 1024 \
        --pipeline-images 64 --batch-size 32 --json "$OUT/depth.json"
    # Both precision modes beside the reference, agreement printed per mode; then fast + compile.
    step $py benchmarks/segment_throughput.py --device cuda --models vit_b,vit_h --n-images 48 \
        --ref-images 8 --batch-size 8 --modes exact,fast --profile
    step $py benchmarks/segment_throughput.py --device cuda --models vit_h --n-images 48 \
        --ref-images 4 --batch-size 8 --modes fast --compile
    step $py benchmarks/train_throughput.py
    step $py benchmarks/eval_throughput.py -q --json "$OUT/eval.json"
    step $py -m pytest -q -m gpu tests/pipeline tests/trainer -p no:cacheprovider
fi
