#!/usr/bin/env bash
# The real-weights check of every supported family, for a CUDA machine with the weights on disk or hub
# access (benchmarks/real_model_check.py: traced = untraced, record size, D/E, the family's edit, the
# probe's cost). Each line writes /tmp/memattn-real/<name>.json; a family memattn refuses prints its one
# line and the script goes on. Override a model with e.g. SD14=/models/sd-v1-4; PYTHON as gpu_check.sh.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out=/tmp/memattn-real
mkdir -p "$out"
check() {  # name, model, extra arguments
    local name=$1 model=$2
    shift 2
    echo "== $name: $model"
    "$py" benchmarks/real_model_check.py --model "$model" --json "$out/$name.json" "$@" || echo "($name: exit $?)"
}
check sd14 "${SD14:-CompVis/stable-diffusion-v1-4}" --steps 50
check pixart-alpha "${PIXART_ALPHA:-PixArt-alpha/PixArt-XL-2-512x512}" --steps 20
check pixart-sigma "${PIXART_SIGMA:-PixArt-alpha/PixArt-Sigma-XL-2-1024-MS}" --steps 20
check sd3-medium "${SD3:-stabilityai/stable-diffusion-3-medium-diffusers}" --steps 28
check sd3.5-large "${SD35:-stabilityai/stable-diffusion-3.5-large}" --steps 28 --dtype bf16
# Not supported yet: each prints UnsupportedModelError's line (what memattn looked for and why).
check flux-schnell "${FLUX:-black-forest-labs/FLUX.1-schnell}" --steps 4
check if-stage1 "${IF_I:-DeepFloyd/IF-I-XL-v1.0}" --steps 20
