#!/usr/bin/env bash
# Every GPU check in one command, for a GPU machine with its own torch (no pipenv): the CUDA tests, a short train.py +
# evaluate.py run on CUDA, torchrun with NCCL on one GPU, bench.py's GPU section, bench_search.py (the search, and
# the step at K = 512 and 2048, 128 px batch 128) and bench_data.py on CUDA.
#
#     bash benchmarks/gpu_checks.sh [OUT_FOLDER]          # default: $OUT if set (the device tool's folder), else gpu_out/
#
# Each step runs under its own timeout (430 s at most in all, about 7 minutes) and writes its log into the folder; the last
# lines of summary.txt say which steps passed. A failing step does not stop the others.
set -u
cd "$(dirname "$0")/.."   # the repository root
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
step cuda_tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
step train_cuda 40 python3 train.py --device cuda --steps 300 --eval-every 300 --no-progress --out "$out/run" \
    --overwrite
step evaluate_cuda 20 python3 evaluate.py --checkpoint "$out/run/checkpoint.pt" --device cuda
step train_levels2_cuda 30 python3 train.py --device cuda --levels 2 --image-size 128 --steps 100 --eval-every 100 \
    --no-progress --out "$out/run2" --overwrite
# (a CUDA checkpoint in a CPU-only process and torchrun with NCCL on one GPU are among the CUDA tests)
# without --compile: compiling the three sizes in two modes took the whole 130 s on an H200 (2026-12-04); each
# finished section is printed as one JSON line as it ends
step bench_gpu 80 python3 benchmarks/bench.py --device cuda --repeats 3 --steps-per-repeat 5 --e2e-steps 100 \
    --json "$out/bench.json"
# the search's lines come first; the step's line (two K, three runs) last
step bench_search_gpu 40 python3 benchmarks/bench_search.py --device cuda --repeats 3 --step-repeats 1 \
    --steps-at 128x128 --lengths 5,25 --json "$out/bench_search.json"
if [ -f benchmarks/bench_data.py ]; then
    step bench_data_gpu 50 python3 benchmarks/bench_data.py --device cuda --images 1000 --image-size 128 --repeats 1 \
        --steps 100 --copy-dir "$out/food101-copy" --json "$out/bench_data.json"
fi
echo "total: $SECONDS s" | tee -a "$summary"
# the device tool brings back at most 8 files: when writing into its $OUT, pack the logs and figures into one
if [ -n "${OUT:-}" ] && [ "$out" = "$OUT" ]; then
    tar czf "$out/gpu_checks.tgz" -C "$out" --exclude='*.pt' --exclude=food101-copy --exclude=gpu_checks.tgz . &&
        find "$out" -mindepth 1 -maxdepth 1 ! -name gpu_checks.tgz ! -name summary.txt -exec rm -rf {} +
fi
