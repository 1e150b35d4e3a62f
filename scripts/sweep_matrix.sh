#!/usr/bin/env bash
# The methods matrix on digits-C: methods x settings x source models, several seeds, one report.
#
#   scripts/sweep_matrix.sh                 # every classifier method + the cross combinations, 5 settings,
#                                           # {digits_cnn, digits_gn} x 3 seeds, 15 corruptions
#   METHODS=norm,tent,eata CORRUPTIONS=gaussian_noise,defocus_blur,snow,contrast COMBOS= scripts/sweep_matrix.sh
#
# One Hydra multirun per setting and group (the basic launcher runs its jobs one after the other in
# one process); every run uses its data config's protocol (digits-C: cifar) and records it in run.json.
# Groups: the METHODS list, then each cross combination of COMBOS (';'-separated override sets,
# e.g. "method=tent policies.extra=[rotta_memory]": a method with another method's selection rule).
# Batch size 1 costs one optimizer step per image, so bs1 adapts on BS1_SUBSET images of every
# corruption (data.subset, the same images for every seed; data.subset_seed=0). Two pseudo-settings
# add a column each: `stream_rate` (reset_each_shift under a stream rate, eval.stream_rate=$STREAM_RATE,
# the relative cost measured per batch) and `ccc` (the CCC-style stream, setting=ccc with its defaults).
# Then
#   python -m tta.report $OUT --pivot setting,eval.stream_rate
# writes $OUT/report.md (mean ± std over seeds; kept % / precision of the samples each method
# learned from), report.png and selection.png.
#
# Knobs (environment): OUT, METHODS, COMBOS, MODELS, SEEDS, SETTINGS, CORRUPTIONS (comma-separated;
# empty: all 15), BS1_SUBSET, STREAM_RATE, TAG (appended to the METHODS group's folder name: a second
# METHODS list for a setting already run), REPORT (0: no report at the end), PYTHON. Several
# invocations with different SETTINGS (or METHODS) may share one OUT, in parallel: each group
# writes its own folder. Nothing here tunes a hyperparameter: every value is the protocol's.
set -euo pipefail

OUT=${OUT:-multirun/matrix}
METHODS=${METHODS-source,norm,tent,eta,eata,sar,deyo,crowds,eata_c,rdumb,lame,cotta,rotta,sotta,roid}
COMBOS=${COMBOS-method=tent policies.extra=[rotta_memory];method=eta policies.extra=[sotta_memory];method=tent policies.extra=[roid_weight]}
MODELS=${MODELS:-digits_cnn,digits_gn}
SEEDS=${SEEDS:-0,1,2}
SETTINGS=${SETTINGS:-reset_each_shift continual label_shift bs1 mixed_domains stream_rate ccc}
CORRUPTIONS=${CORRUPTIONS:-}
BS1_SUBSET=${BS1_SUBSET:-100}
STREAM_RATE=${STREAM_RATE:-1}
REPORT=${REPORT:-1}
PYTHON=${PYTHON:-python}

mkdir -p "$OUT"
start=$(date +%s)
groups=()
[[ -n $METHODS ]] && groups+=("method=$METHODS")  # empty METHODS: only the combinations
IFS=';' read -r -a combos <<< "$COMBOS"
for combo in ${combos[@]+"${combos[@]}"}; do [[ -n ${combo// } ]] && groups+=("$combo"); done
for setting in $SETTINGS; do
    extra=()
    case $setting in
        stream_rate) extra+=("setting=reset_each_shift" "eval.stream_rate=$STREAM_RATE") ;;
        ccc) extra+=("setting=ccc") ;;
        *) extra+=("setting=$setting") ;;
    esac
    if [[ -n $CORRUPTIONS && $setting != ccc ]]; then extra+=("data.corruptions=[$CORRUPTIONS]"); fi
    if [[ $setting == bs1 ]]; then extra+=("data.subset=$BS1_SUBSET" "data.subset_seed=0"); fi
    for group in "${groups[@]}"; do
        # a folder name from the group's overrides: method=tent policies.extra=[rotta_memory] -> tent+rotta_memory
        name=$(sed -e 's/method=//; s/policies\.extra=//; s/[][]//g; s/ /+/g; s/,/-/g; s/[^A-Za-z0-9_+.=-]//g' <<< "$group")
        [[ $group == "method=$METHODS" ]] && name="methods${TAG:-}"
        dir="$OUT/$setting/$name"
        mkdir -p "$OUT/$setting"
        read -r -a overrides <<< "$group"
        echo "== $setting / $name: ${overrides[*]} model=$MODELS seed=$SEEDS ${extra[*]}"
        "$PYTHON" -m tta.run -m "${overrides[@]}" "model=$MODELS" "seed=$SEEDS" "${extra[@]}" \
            progress=false "hydra.sweep.dir=$dir" > "$dir.log" 2>&1 \
            || { echo "$setting / $name failed: see $dir.log"; exit 1; }
        echo "   done after $(( $(date +%s) - start )) s"
    done
done
if [[ $REPORT != 0 ]]; then
    pivot=setting
    [[ " $SETTINGS " == *" stream_rate "* || -d $OUT/stream_rate ]] && pivot=setting,eval.stream_rate
    "$PYTHON" -m tta.report "$OUT" --pivot "$pivot"
fi
echo "matrix: $(( $(date +%s) - start )) s in all"
