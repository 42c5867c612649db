#!/usr/bin/env bash
# Exercise every CUDA path of the project on one GPU in about 6-8 minutes; writes <out>/gpu_check.json and
# <out>/gpu_check.log. `--cpu-smoke` runs the same checks at tiny sizes on a CPU (the test suite does).
#   bash benchmarks/gpu_check.sh <out folder> [--cpu-smoke] [--data-dir <folder with cifar-10-batches-py>]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" -m src.bench.gpu_check "$@"
