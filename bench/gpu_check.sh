#!/usr/bin/env bash
# The GPU checklist on a lent device machine (see bench/gpu_check.py). Prepared here with:
#   echo /.gpu/ >> .git/info/exclude; echo /.whl/ >> .git/info/exclude
#   .venv/bin/python -m bench.gpu_check prepare
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform any -d .whl $(cat bench/gpu_wheels.txt)
# and run with the device tool: command "bash bench/gpu_check.sh", carry [".gpu", ".whl"], timeout ~540 s.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT="${OUT:-gpu-check}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed" | tee "$OUT/log"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -m bench.gpu_check check --out "$OUT" ${GPU_CHECK_BENCH:+--bench} 2>&1 | tee "$OUT/log"
