#!/usr/bin/env bash
# Every GPU table the issues ask for, in one run (about 4-6 minutes on one H100).
#
#   bash scripts/gpu_check.sh [OUT_DIR]
#
# Needs torch with CUDA, timm, open_clip_torch and diffusers importable (add them with
# `pip install -e .` or, on a machine without a registry, from wheels on PYTHONPATH). Random weights
# throughout: these are speed tables, not accuracy tables.
set -uo pipefail
out=$(realpath -m "${1:-gpu_check_out}")
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the scripts import tta from this checkout
run() {  # name, command...
  local name=$1; shift
  echo "=== $name: $*"
  timeout 240 "$@" 2>&1 | tee "$out/$name.md"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
run methods_resnet50 python scripts/bench_methods.py --device cuda --model resnet50 --batch-size 64 --iters 20 --image-size 224
run methods_resnet50_fast python scripts/bench_methods.py --device cuda --model resnet50 --batch-size 64 --iters 20 --image-size 224 --amp --channels-last
run methods_vit_b16 python scripts/bench_methods.py --device cuda --model vit_base_patch16_224 --batch-size 64 --iters 20 --image-size 224 --amp
run corruptions python scripts/bench_corruptions.py --device cuda --n 64 --ref-n 2
run streams python scripts/bench_streams.py --device cuda --images 2048 --batch-size 64
run clip python scripts/bench_clip.py --arch ViT-B-16 --device cuda --images 10
run difftpt python scripts/bench_difftpt.py --device cuda --full-size --images 2
