#!/usr/bin/env bash
# One level or two (issue 14) at 128 px on one GPU: the 1-level and the 2-level model over several seeds and training
# settings, several runs side by side (the model is small, so one GPU runs several at once), then the table of the
# 2-level model's unseen-photo PSNR minus the 1-level model's, per setting (mean over the seeds, standard error).
# A screen for choosing what to measure on the CPU, where bench_levels.py measures issue 14's floor: on CUDA the runs
# train in bf16 autocast and are not bit-comparable with CPU runs.
#
#     bash gpu_levels_screen.sh OUT_FOLDER [JOBS] [STEPS] [SEEDS]      # DEVICE=cpu to try it without a GPU
#
# Runs are listed by priority (settings in the order below, then seeds); whatever has finished when the script is
# stopped (timeout) is still tabled by `python3 gpu_levels_screen.py OUT_FOLDER`.
set -u
cd "$(dirname "$0")"
out=${1:?usage: bash gpu_levels_screen.sh OUT_FOLDER [JOBS] [STEPS] [SEEDS]}
jobs=${2:-8}
steps=${3:-2842}
seeds=${4:-"0 1 2 3"}
mkdir -p "$out"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 DEVICE=${DEVICE:-cuda}
python3 -c "from image_data import build_data; build_data('sample', 128)" || exit 1   # prepared once, not raced
# name | train.py flags of the setting (both levels)
settings="clip0|--clip-grad-norm 0
clip1|--clip-grad-norm 1
clip0.5|--clip-grad-norm 0.5
clip1-warm300|--clip-grad-norm 1 --warmup-steps 300"
while IFS='|' read -r name flags; do
    for seed in $seeds; do
        for levels in 1 2; do
            echo "$name-seed$seed-$levels $levels $seed $flags"
        done
    done
done <<< "$settings" |
xargs -P "$jobs" -L 1 bash -c 'run=$0 levels=$1 seed=$2; shift 2
    python3 train.py --device "$DEVICE" --image-size 128 --levels "$levels" --seed "$seed" --steps '"$steps"' \
        --eval-every '"$steps"' --log-every '"$((steps >= 10 ? steps / 10 : 1))"' --no-progress --overwrite \
        --out '"$out"'/"$run" "$@" > '"$out"'/"$run".log 2>&1; echo "$run: exit $?"'
python3 gpu_levels_screen.py "$out"
