#!/usr/bin/env bash
# One level or two at 128 px on one GPU: the 1-level and the 2-level model over several seeds and training
# settings, several runs side by side (the model is small, so one GPU runs several at once), then the table of the
# 2-level model's unseen-photo PSNR minus the 1-level model's, per setting (mean over the seeds, standard error).
# A screen for choosing what to measure on the CPU, where bench_levels.py measures the comparison: GPU runs are not
# bit-comparable with CPU runs (and in the default AMP=auto they train in bf16 autocast; AMP=off: float32, TF32 convs).
#
#     bash benchmarks/gpu_levels_screen.sh OUT_FOLDER [JOBS] [STEPS] [PLAN_FILE]     # DEVICE=cpu to try it without a GPU
#
# A plan has one line per setting, `name|levels|seeds|train.py flags` (levels "1 2" or "2": a 2-level-only setting is
# compared with the 1-level runs of the setting `clip1`); without a plan file, the plan below. Runs start in the plan's
# order; whatever has finished when the script is stopped (timeout) is still tabled by
# `python3 benchmarks/gpu_levels_screen.py OUT_FOLDER`. On an H200 with AMP=off, 16 jobs at a time, 24 such runs took 200 s.
set -u
cd "$(dirname "$0")/.."   # the repository root
out=${1:?usage: bash benchmarks/gpu_levels_screen.sh OUT_FOLDER [JOBS] [STEPS] [PLAN_FILE]}
jobs=${2:-16}
steps=${3:-2842}
plan="clip1|1 2|0 1 2 3|--clip-grad-norm 1
clip1-top512|2|0 1 2 3|--clip-grad-norm 1 --top-num-embeddings 512
clip1-warm300|1 2|0 1 2 3|--clip-grad-norm 1 --warmup-steps 300
clip1-warm600|1 2|0 1 2 3|--clip-grad-norm 1 --warmup-steps 600
clip1-warm300-lr5e-4|1 2|0 1 2 3|--clip-grad-norm 1 --warmup-steps 300 --lr 5e-4
clip1-warm300-lr2e-3|1 2|0 1 2 3|--clip-grad-norm 1 --warmup-steps 300 --lr 2e-3"
if [ -n "${4:-}" ]; then plan=$(grep -v '^[[:space:]]*\(#\|$\)' "$4") || exit 1; fi
mkdir -p "$out"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 DEVICE=${DEVICE:-cuda} AMP=${AMP:-auto}
python3 -c "from image_data import build_data; build_data('sample', 128)" || exit 1   # prepared once, not raced
while IFS='|' read -r name levels seeds flags; do
    for level in 2 1; do                # the 2-level runs first: they take about twice as long
        [[ " $levels " == *" $level "* ]] || continue
        for seed in $seeds; do echo "$name-seed$seed-$level $level $seed $flags"; done
    done
done <<< "$plan" |
xargs -P "$jobs" -L 1 bash -c 'run=$0 levels=$1 seed=$2; shift 2
    python3 train.py --device "$DEVICE" --amp "$AMP" --image-size 128 --levels "$levels" --seed "$seed" \
        --steps '"$steps"' --eval-every '"$steps"' --log-every '"$((steps >= 10 ? steps / 10 : 1))"' --no-progress \
        --overwrite --out '"$out"'/"$run" "$@" > '"$out"'/"$run".log 2>&1; echo "$run: exit $?"'
python3 benchmarks/gpu_levels_screen.py "$out"
