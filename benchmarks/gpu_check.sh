#!/usr/bin/env bash
# The GPU check in one call, sized for about 8 minutes on one H100 or H200. Run from the repository root on a
# machine with a CUDA GPU and selpo[test,bench] importable (benchmarks/GPU-NOTES.md: how a lease is run here):
#
#     bash benchmarks/gpu_check.sh [OUT_DIR] [TOTAL_SECONDS] [TRAIN_SECONDS]
#
# In order, each under its own time limit so that a short lease still brings back what ran:
#   1. the GPU's ceilings (cuBLAS bf16 matmul at the headline shape, a 2 GiB copy), and each op at the headline
#      shape timed beside the cost ledger's prediction at those ceilings (ledger-measured.md), next to the
#      prediction at the nominal rates (ledger-predicted.md);
#   2. the op tests on CUDA: every path against its float64 reference, outputs poisoned before the kernels
#      write them, Triton compiled (tests-cuda.log);
#   3. the benchmark suite's headline cases (selpo against naive, naive under torch.compile, Liger, CCE), then
#      the sweeps as time allows; records in results-cuda.jsonl, report RESULTS-cuda.md.
# SELPO_GPU_BENCH_ARGS replaces the suite's default selection (e.g. "--cases=... --impls=...").
# With TRAIN_SECONDS, the training path follows in OUT_DIR/train for that long (gpu_train_check.sh: the trainer in bf16
# with the triton backend against torch, FSDP, `selpo compare`, the step against TRL). Where one command may run only
# 10 minutes (the lease's machine), leave it out and run gpu_train_check.sh as the next call (GPU-NOTES.md).
set -uo pipefail
out=${1:-benchmarks/gpu}
total=${2:-470}
start=$SECONDS
left() { echo $(( total - (SECONDS - start) )); }
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"

# 1. Ceilings and predictions beside measurements (about a minute).
python3 -m benchmarks.ledger | tee "$out/ledger-predicted.md"
timeout 150 python3 -m benchmarks.ledger --measure 2>&1 | tee "$out/ledger-measured.md"

# 2. The op tests on the GPU (about a minute and a half with 8 processes).
tests="tests/test_linear_logprobs.py tests/test_token_scores.py tests/test_selective_loss.py tests/test_syncs.py
    tests/test_logits_logprobs.py tests/test_losses.py tests/test_segment_sum.py tests/test_topk_mask.py
    tests/test_ranking_loss.py"
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
SELPO_TEST_DEVICE=cuda timeout 150 python3 -m pytest -p no:cacheprovider -q $workers $tests > "$out/tests-cuda.log" 2>&1
echo "tests exit code $?"
tail -n 15 "$out/tests-cuda.log"

# 3. The benchmarks, headline cases first, for what is left of the time.
budget=$(left)
if [ "$budget" -gt 30 ]; then
    timeout "$budget" python3 -m benchmarks.run --device cuda --out "$out" \
        ${SELPO_GPU_BENCH_ARGS:---cases=N16384-D4096-V128256} > "$out/bench.log" 2>&1
    code=$?
    echo "benchmarks exit code $code"
    if [ "$code" = 124 ]; then  # stopped at its limit: the report of the records written so far
        python3 -m benchmarks.run --device cuda --out "$out" --from-records >> "$out/bench.log" 2>&1
    fi
    tail -n 25 "$out/bench.log"
fi
echo "gpu_check took $(( SECONDS - start )) s"
if [ "${3:-0}" -gt 0 ]; then
    bash "$(dirname "$0")/gpu_train_check.sh" "$out/train" "$3"
fi
