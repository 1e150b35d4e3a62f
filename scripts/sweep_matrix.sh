#!/usr/bin/env bash
# The methods matrix on digits-C: methods x settings x source models, several seeds, one report.
#
#   scripts/sweep_matrix.sh                 # 9 methods x 5 settings x {digits_cnn, digits_gn} x 3 seeds, 15 corruptions
#   METHODS=norm,tent,eata,sar,deyo CORRUPTIONS=gaussian_noise,defocus_blur,snow,contrast scripts/sweep_matrix.sh
#
# One Hydra multirun per setting (the basic launcher runs its jobs one after the other in one
# process); every run uses its data config's protocol (digits-C: cifar) and records it in run.json.
# Batch size 1 costs one optimizer step per image, so bs1 adapts on BS1_SUBSET images of every
# corruption (data.subset, the same images for every seed; data.subset_seed=0). Then
#   python -m tta.report $OUT --pivot setting
# writes $OUT/report.md (mean ± std over seeds; kept % / precision of the samples each method
# learned from), report.png and selection.png.
#
# Knobs (environment): OUT, METHODS, MODELS, SEEDS, SETTINGS, CORRUPTIONS (comma-separated; empty:
# all 15), BS1_SUBSET, PYTHON. Nothing here tunes a hyperparameter: every value is the protocol's.
set -euo pipefail

OUT=${OUT:-multirun/matrix}
METHODS=${METHODS:-source,norm,tent,eta,eata,sar,deyo,crowds,eata_c}
MODELS=${MODELS:-digits_cnn,digits_gn}
SEEDS=${SEEDS:-0,1,2}
SETTINGS=${SETTINGS:-reset_each_shift continual label_shift bs1 mixed_domains}
CORRUPTIONS=${CORRUPTIONS:-}
BS1_SUBSET=${BS1_SUBSET:-100}
PYTHON=${PYTHON:-python}

mkdir -p "$(dirname "$OUT")"
start=$(date +%s)
i=0
for setting in $SETTINGS; do
    i=$((i + 1))
    extra=()
    if [[ -n $CORRUPTIONS ]]; then extra+=("data.corruptions=[$CORRUPTIONS]"); fi
    if [[ $setting == bs1 ]]; then extra+=("data.subset=$BS1_SUBSET" "data.subset_seed=0"); fi
    echo "== $setting: method=$METHODS model=$MODELS seed=$SEEDS ${extra[*]-}"
    "$PYTHON" -m tta.run -m "method=$METHODS" "model=$MODELS" "seed=$SEEDS" "setting=$setting" \
        ${extra[@]+"${extra[@]}"} progress=false "hydra.sweep.dir=$OUT/${i}_$setting" > "$OUT.${setting}.log" 2>&1 \
        || { echo "setting $setting failed: see $OUT.${setting}.log"; exit 1; }
    echo "   done after $(( $(date +%s) - start )) s"
done
"$PYTHON" -m tta.report "$OUT" --pivot setting
echo "matrix: $(( $(date +%s) - start )) s in all"
