#!/usr/bin/env bash
# Probe/mitigation overhead and peak GPU memory on an SD1.4-sized UNet with random fp16 weights
# (no hub access needed); falls back to a CPU smoke run without CUDA. Arguments go to gpu_check.py:
#   bash benchmarks/gpu_check.sh [--device auto|cuda|cpu] [--quick] [--json PATH] [--rounds N] [--calls N]
# Python: $PYTHON if set, else the repository's .venv/bin/python, else python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
else
    py=python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # memattn from this checkout, installed or not
exec "$py" benchmarks/gpu_check.py "$@"
