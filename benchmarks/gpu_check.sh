#!/usr/bin/env bash
# The GPU check in one call: the op tests on CUDA (Triton compiled, not interpreted), then the GPU benchmark
# suite. Run from the repository root on a machine with a CUDA GPU and selpo[test,bench] installed:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR] [TEST_SECONDS] [BENCH_SECONDS]
#
# Each stage runs under its own time limit, so a short lease still brings back the tests' log and the benchmark
# records written so far (results-cuda.jsonl, one record per case and implementation, in plan order: the
# headline cases first). pytest-xdist runs the tests in 8 processes.
set -uo pipefail
out=${1:-benchmarks/gpu}
test_s=${2:-900}
bench_s=${3:-3600}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"

# The op tests: every kernel against its float64 reference, on the GPU.
tests=${SELPO_GPU_TESTS:-"tests/test_linear_logprobs.py tests/test_logits_logprobs.py tests/test_losses.py
    tests/test_selective_loss.py tests/test_segment_sum.py tests/test_token_scores.py tests/test_topk_mask.py
    tests/test_ranking_loss.py tests/test_methods.py"}
SELPO_TEST_DEVICE=cuda timeout "$test_s" python3 -m pytest -p no:cacheprovider -q -n 8 $tests > "$out/tests-cuda.log" 2>&1
echo "tests exit code $?"
tail -n 25 "$out/tests-cuda.log"

# The benchmarks; SELPO_GPU_BENCH_ARGS can narrow them (--cases=..., --impls=...) to fit a lease.
timeout "$bench_s" python3 -m benchmarks.run --device cuda --out "$out" ${SELPO_GPU_BENCH_ARGS:-} > "$out/bench.log" 2>&1
code=$?
echo "benchmarks exit code $code"
if [ "$code" = 124 ]; then  # stopped at its limit: the report of the records written so far
    python3 -m benchmarks.run --device cuda --out "$out" --from-records >> "$out/bench.log" 2>&1
fi
tail -n 15 "$out/bench.log"
