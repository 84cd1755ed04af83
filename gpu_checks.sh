#!/usr/bin/env bash
# Every GPU check in one command, for a GPU machine with its own torch (no pipenv): the CUDA tests, a short train.py +
# evaluate.py run on CUDA, torchrun with NCCL on one GPU, bench.py's GPU section and bench_data.py on CUDA.
#
#     bash gpu_checks.sh [OUT_FOLDER]          # default: $OUT if set (the device tool's folder), else gpu_out/
#
# Each step runs under its own timeout (410 s at most in all, under 7 minutes) and writes its log into the folder; the last
# lines of summary.txt say which steps passed. A failing step does not stop the others.
set -u
cd "$(dirname "$0")"
out="${1:-${OUT:-gpu_out}}"
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
export CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONUNBUFFERED=1

step() {   # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s (limit $limit s)" | tee -a "$summary"
}

step machine 20 bash -c 'nvidia-smi; python3 -c "import torch, torchvision, sys; print(sys.version); \
print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name(), \
torch.cuda.is_bf16_supported(including_emulation=False))"'
step cuda_tests 110 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_compile.py \
    tests/test_resume.py
step train_cuda 40 python3 train.py --device cuda --steps 300 --eval-every 300 --no-progress --out "$out/run" \
    --overwrite
step evaluate_cuda 20 python3 evaluate.py --checkpoint "$out/run/checkpoint.pt" --device cuda
step train_levels2_cuda 30 python3 train.py --device cuda --levels 2 --image-size 128 --steps 100 --eval-every 100 \
    --no-progress --out "$out/run2" --overwrite
# (a CUDA checkpoint in a CPU-only process and torchrun with NCCL on one GPU are among the CUDA tests)
step bench_gpu 130 python3 bench.py --device cuda --compile --repeats 3 --steps-per-repeat 5 --e2e-steps 100 \
    --json "$out/bench.json"
if [ -f bench_data.py ]; then
    step bench_data_gpu 60 python3 bench_data.py --device cuda --images 2000 --image-size 128 \
        --copy-dir "$out/food101-copy" --json "$out/bench_data.json"
fi
echo "total: $SECONDS s" | tee -a "$summary"
