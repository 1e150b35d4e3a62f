#!/usr/bin/env bash
# The GPU tables, in one run (budget: the section limits add up to 515 s, under 9 minutes on one
# H100/H200, so that a 15-minute device session keeps room for a partial rerun; every section has
# its own timeout and prints its rows as they finish, so a slow section costs only its own rows).
#
#   bash scripts/gpu_check.sh [OUT_DIR]          # on a CUDA machine
#   bash scripts/gpu_check.sh --smoke [OUT_DIR]  # tiny CPU settings: checks that every section starts and runs
#
# Prints, and writes one markdown file per section to OUT_DIR (default gpu_check_out):
#   1. every batch method (source, norm, tent, eta, eata, sar, deyo, crowds, eata_c) on ResNet-50
#      and on ViT-B/16 at batch 64: ours default (fp32 eager), ours fast (bf16 + channels_last for
#      the CNN + compiled step) and the plain official-style loop; img/s, peak memory, the compile
#      time of the fast step, and synchronising CUDA calls per step (torch.cuda sync debug mode);
#   1b. ours against the official-style loop on a digits-C stream at batch 1, 4, 16 and 64, with
#      skip_empty="never" (the sync-free step) and "always" (a host read that skips empty batches);
#   1c. rdumb, lame, roid, rotta, sotta and cotta next to tent on ResNet-50 (fp32 eager, no plain loop);
#   2. the on-the-fly ImageNet-C stream end to end (JPEG decode + resize/crop + corruption + copy)
#      with ResNet-50 EATA: the stream alone, default and fast;
#   3. TPT and ADTE per image on CLIP ViT-B/16 (ours and official-style), then ZERO, C-TPT and TDA (ours).
# Random weights throughout and nothing is downloaded (HF_HUB_OFFLINE=1): speed tables, not
# accuracy tables. Needs torch with CUDA, timm and open_clip_torch importable. The compile caches
# (TORCHINDUCTOR_CACHE_DIR, under OUT_DIR) are shared by the sections: the stream section reuses
# the ResNet-50 EATA graphs compiled by section 1.
set -uo pipefail
smoke=0
if [[ "${1:-}" == "--smoke" ]]; then smoke=1; shift; fi
out=$(realpath -m "${1:-gpu_check_out}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the scripts import tta from this checkout
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$out/inductor_cache}"
started=$SECONDS
run() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(( SECONDS - started )) s elapsed; limit ${limit} s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.md"
  local rc=${PIPESTATUS[0]}
  [[ $rc -eq 124 ]] && echo "($name: stopped at its ${limit} s limit; the rows above are complete)" | tee -a "$out/$name.md"
  return 0
}

if (( smoke )); then
  python - <<'EOF' | tee "$out/device.txt"
import torch; print(f"smoke run on CPU, torch {torch.__version__}")
EOF
  run methods_smoke 300 python scripts/bench_methods.py --device cpu --model test_resnet --batch-size 8 \
      --image-size 32 --iters 1 --warmup 1 --methods tent,deyo --fast --threads 1
  run methods_digits_smoke 300 python scripts/bench_methods.py --device cpu --data digits-c --batch-sizes 4 \
      --repeats 1 --iters 3 --methods tent,eta --threads 1
  run stream_smoke 300 python scripts/bench_stream_e2e.py --smoke --device cpu --method eata
  run clip_smoke 300 python scripts/bench_clip.py --arch tiny --device cpu --images 1 --warmup 0 --views 8 \
      --methods tpt,adte,zero,ctpt,tda
  echo "smoke run done in $(( SECONDS - started )) s; outputs in $out"
  exit 0
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python -c "import torch, timm; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, timm {timm.__version__}')" \
  | tee -a "$out/device.txt"
# 1. every batch method, ResNet-50 then ViT-B/16 (the fast column compiles each network once per
#    parameter preset; the other methods reuse its graphs); the most asked-for methods first
order=tent,eata,sar,deyo,eta,crowds,eata_c,norm,source
run methods_resnet50 170 python scripts/bench_methods.py --device cuda --model resnet50 --batch-size 64 \
    --image-size 224 --iters 20 --warmup 3 --fast --methods $order
run methods_vit_b16 100 python scripts/bench_methods.py --device cuda --model vit_base_patch16_224 --batch-size 64 \
    --image-size 224 --iters 20 --warmup 3 --fast --methods $order
# 1b. a real stream at small batches: the empty-selection skip, sync-free ("never") against read ("always")
for mode in never always; do
  run methods_digits_$mode 40 python scripts/bench_methods.py --device cuda --data digits-c --batch-sizes 1,4,16,64 \
      --repeats 2 --skip-empty $mode --methods tent,eta,eata,sar,deyo,crowds
done
# 1c. the baselines beyond the seed methods next to Tent, ResNet-50, eager fp32 only (their steps
#     stay eager around compiled networks; cotta last: 3 forwards, 35 when its gate opens)
run methods_new_resnet50 80 python scripts/bench_methods.py --device cuda --model resnet50 --batch-size 64 \
    --image-size 224 --iters 10 --warmup 2 --methods tent,rdumb,lame,roid,rotta,sotta,cotta
# 2. the on-the-fly ImageNet-C stream end to end, ResNet-50 EATA (default and fast)
run stream_resnet50_eata 45 python scripts/bench_stream_e2e.py --device cuda --model resnet50 --method eata \
    --batch-size 64 --batches 20 --warmup 3 --images 1472
# 3. TPT and ADTE per image on CLIP ViT-B/16 (64 views per image), then ZERO, C-TPT, TDA (ours only;
#    rows print as they finish, so the limit costs only the last rows)
run clip_vit_b16 40 python scripts/bench_clip.py --arch ViT-B-16 --device cuda --images 10 --warmup 2 \
    --methods tpt,adte,zero,ctpt,tda
echo "done in $(( SECONDS - started )) s; outputs in $out"
