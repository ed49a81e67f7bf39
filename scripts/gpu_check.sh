#!/usr/bin/env bash
# Issue 5's GPU checks in one run, for a session lent a CUDA machine through the device tool. Here first:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       --dest .whl pydantic
# then, through the device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540).
# The device image has PyTorch, torchvision, typer, rich, PyYAML and the rest, but not pydantic: it and
# its needs come from .whl/, unpacked into /tmp/site (the image's own environment is left as it is).
# Runs tests/training/test_cuda.py and tests/training/test_engine.py, then `scripts/bench.py --device cuda` (resnet50
# training against a synthetic-data ceiling), each output also written to $OUT for docs/performance.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
SITE=/tmp/site
if ! "$PY" -c "import pydantic" 2>/dev/null; then
    compgen -G ".whl/pydantic-*.whl" >/dev/null || { echo "gpu_check: pydantic is missing and not in .whl/ (see the top of this script)"; exit 1; }
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"; fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'capability', torch.cuda.is_available() and torch.cuda.get_device_capability())" | tee -a "$OUT/gpu.txt"
status=0
"$PY" -m pytest -rA tests/training/test_cuda.py tests/training/test_engine.py 2>&1 | tee "$OUT/tests.txt" || status=1
"$PY" scripts/bench.py --device cuda 2>&1 | tee "$OUT/bench.txt" || status=1
exit $status
