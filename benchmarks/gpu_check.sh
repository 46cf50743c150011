#!/usr/bin/env bash
# The GPU op check in one call of at most 6 minutes on one H100 or H200, the first Triton compiles included. It sets
# up everything itself: run it from the repository root of the working tree's copy on the lease's machine, carrying
# .gpu1 (benchmarks/gpu_pack.sh: the peers' wheels) so that the peers run (benchmarks/GPU-NOTES.md, "How a lease is
# run here"):
#
#     bash benchmarks/gpu_check.sh "$OUT" [TOTAL_SECONDS=360] [TRAIN_SECONDS]
#     GPU_CHECK_REHEARSAL=1 bash benchmarks/gpu_check.sh OUT_DIR     # every step on CPU at toy shapes (CI runs it)
#
# Steps, in order, each under `timeout` with the budget below, capped by what is left of TOTAL_SECONDS less 20 s kept
# for the reports; each prints its results as it gets them (Python unbuffered) to the console and to
# OUT_DIR/gpu-check.log. A failed step does not stop the next ones; the last line gives every step's exit code; the
# exit code is 1 when one failed or hit its limit, 2 when the set-up failed (no GPU visible, say: nothing else runs).
#   0. set-up, 40 s (nvidia-smi 5, the wheel check 10, pip 10, the import check 15): the GPU and versions; the link
#      selpo/kernels -> ../kernels where the source tree lacks it (what the editable install maps; removed at the
#      end; made under selpo/ only, so kernels/ never becomes the top-level module `kernels`, which the import check
#      verifies); the wheels carried in benchmarks/wheels (pytest, hypothesis, pytest-benchmark, xdist and their
#      pure-Python needs) and in .gpu1 (selpo, CCE, Liger, TRL and what `import trl` needs), each installed offline
#      (pip --no-index --no-deps --target $GPU_CHECK_WORK/site, first on PYTHONPATH) only where its modules are not
#      importable; then the dL/dhidden path the backward takes on this device (selpo.kernels.streaming.launch.
#      widening_addmm: addmm with out_dtype=float32, or the fallback: a bf16 product, then an fp32 copy, per slice).
#   1. the SePO loss case (selective_loss forward+backward, 30% selected, bf16, N=16384, D=4096, V=128256), 125 s;
#   2. linear_logprobs forward+backward at that shape, 100 s;
#   3. linear_logprobs forward, 50 s.
#      Steps 1-3 are `python -m benchmarks.run --device cuda --log OUT_DIR/bench.log [--append]`: each
#      implementation checked against float64, then timed, one line printed per implementation as its test ends,
#      selpo's timed again in alternation with the peers its targets name (benchmarks/cases.py, CUDA_PAIRED);
#      records in results-cuda.jsonl, report RESULTS-cuda.md. Only selpo's Triton ops (selpo-triton,
#      selpo-fused-triton), naive, Liger (liger-flce), CCE (cce, cce-sel), TRL's fused head (trl-chunked,
#      trl-chunked-sel) and the floor: not the torch.compile'd peers (Liger's SimPO loss included) nor selpo's torch
#      backend, tens of thousands of small launches at these sizes. SELPO_GPU_IMPLS replaces that list.
#   4. `python -m benchmarks.ledger --measure --device cuda`: the GPU's bandwidth and host costs, then at N=16384,
#      2048 and 512 in turn each GEMM shape of the plan timed and each op beside the ledger's prediction at the
#      costs measured, each line as it comes (ledger.md), 30 s: stopped there, the first N's lines are complete.
#   5. the op tests on the GPU (SELPO_TEST_DEVICE=cuda, 12 xdist processes; outputs poisoned, Triton compiled) for
#      the rest, at least 40 s; SIGINT at the limit, so that pytest still reports what ran (tests-cuda.log).
# GPU_CHECK_STEPS (default loss,logprobs,forward,ledger,tests) chooses steps 1-5; the set-up always runs.
# The budgets follow the first lease (H200, 2026-12-04, GPU-NOTES.md): set-up 12 s, step 1 110 s (its first
# compiles included), step 2 stopped at its then 60 s after selpo's and naive's tests, step 3 at its then 35 s after
# three of its six, the ledger 17 s, the op tests 36 s; so steps 2 and 3 now get 100 s and 50 s (predictions). Everything written goes under OUT_DIR (6 files; a lease
# brings back at most 8); the installed wheels go to $GPU_CHECK_WORK (default /tmp/selpo-gpu-check).
#
# The rehearsal (GPU_CHECK_REHEARSAL=1) runs the same commands, modules and flags on the CPU with every limit doubled
# (GPU_CHECK_TIME_SCALE), Triton in its interpreter, at the suite's --quick shape (N=512, D=64, V=4096, float32),
# with 2 test processes and a -k selection of the op tests (the ledger's --measure on the CPU times the torch route
# by the wall clock). tests/test_benchmarks_quick.py runs it on a copy of the working tree, so that a mistake here
# fails CI rather than a lease.
# With TRAIN_SECONDS, gpu_train_check.sh follows in OUT_DIR/train for that long (outside the 6 minutes; where one
# command may run only 10 minutes, run it as the lease's next call instead: GPU-NOTES.md).
set -uo pipefail
start=$SECONDS
out=${1:-$(dirname "$0")/gpu}
total=${2:-360}
rehearsal=${GPU_CHECK_REHEARSAL:-0}
work=${GPU_CHECK_WORK:-/tmp/selpo-gpu-check}
mkdir -p "$out" "$work" || exit 2
out=$(cd "$out" && pwd) work=$(cd "$work" && pwd)
cd "$(dirname "$0")/.." || exit 2
scale=${GPU_CHECK_TIME_SCALE:-$([ "$rehearsal" = 1 ] && echo 2 || echo 1)}  # the rehearsal's CPU starts Python slowly
total=$(( total * scale ))
reserve=20  # seconds kept for a report from the records and the op tests' summary after their SIGINT
left() { echo $(( total - (SECONDS - start) )); }
within() {  # within BUDGET: the limit of a part, its budget capped by what is left (at least 1: `timeout 0` waits)
    local b l; b=$(( $1 * scale )) l=$(( $(left) - reserve )); echo $(( b < l ? b : (l > 1 ? l : 1) ))
}
exec > >(tee -a "$out/gpu-check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ "$rehearsal" = 1 ]; then
    device=cpu plan=(--quick) shape=N512-D64-V4096 workers=2
    export TRITON_INTERPRET=1  # the op tests' Triton kernels in the interpreter (benchmarks.run drops it for timing)
    ledger=(--n 512 --d 64 --v 4096)
    tests_k=(-k "bad_input or sepo_properties or triton_writes_every_output")
else
    device=cuda plan=() shape=N16384-D4096-V128256 workers=12
    ledger=()  # its default: N=16384, 2048 and 512 in turn, D=4096, V=128256
    tests_k=()
fi
impls=${SELPO_GPU_IMPLS:-selpo-triton,selpo-fused-triton,naive,liger-flce,cce,cce-sel,trl-chunked,trl-chunked-sel,floor}
steps=${GPU_CHECK_STEPS-loss,logprobs,forward,ledger,tests}  # after the set-up, which always runs (empty: it alone)
chosen() { [[ ",$steps," == *",$1,"* ]]; }
status=()  # "step:exit code" of each step
note() {  # note NAME CODE: a step's exit code, kept for the last line
    status+=("$1:$2")
    echo "== $1: exit code $2, $(( SECONDS - step_start )) s (total $(( SECONDS - start )) s)"
}
begin() {  # begin NAME LIMIT: false (and noted as skipped) when less than 5 s are left for it
    step_start=$SECONDS
    echo; echo "== $1 (limit $2 s; $(( SECONDS - start )) s so far)"
    if [ "$2" -lt 5 ]; then note "$1" skipped; return 1; fi
}
echo "gpu_check: device $device$([ "$rehearsal" = 1 ] && echo ', REHEARSAL on CPU'), $total s, output in $out"

# 0. Set-up.
begin setup "$(within 40)"
if command -v nvidia-smi > /dev/null; then
    timeout "$(within 5)" nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
else
    echo "nvidia-smi: not on this machine"
fi
linked=
if [ ! -e selpo/kernels ]; then  # the source tree imports selpo.kernels as the editable install maps it
    ln -s ../kernels selpo/kernels && linked=selpo/kernels && echo "linked selpo/kernels -> ../kernels"
    trap '[ -n "$linked" ] && rm -f "$linked"' EXIT
fi
site="$work/site"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"  # a wheel installed by an earlier call counts as importable
mapfile -t missing < <(timeout "$(within 10)" python3 - benchmarks/wheels .gpu1 <<'EOF'
# Each carried wheel whose top-level modules are not all importable here (a wheel's own listing says which).
import glob, importlib.util, os, sys, zipfile
for folder in sys.argv[1:]:
    for wheel in sorted(glob.glob(os.path.join(folder, "*.whl"))):
        tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
        tops = {t[:-3] if t.endswith(".py") else t for t in tops if not t.endswith((".dist-info", ".data"))}
        tops = {t for t in tops if t.isidentifier()}
        if not all(importlib.util.find_spec(t) for t in tops):
            print(wheel)
EOF
)
[ -d .gpu1 ] || echo "no .gpu1 folder (benchmarks/gpu_pack.sh): peers that are not installed here are n/a"
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${#missing[@]} carried wheels into $site: ${missing[*]##*/}"
    timeout "$(within 10)" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "${missing[@]}"
    code=$?
    [ "$code" = 0 ] || status+=("wheels:$code")
else
    echo "every carried wheel is importable already: nothing to install"
fi
timeout "$(within 15)" python3 - "$device" <<'EOF'
import importlib.util, os, sys

import torch
import triton

import selpo.kernels.streaming.launch as launch

device = torch.device(sys.argv[1])
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"Python {sys.version.split()[0]}")
if device.type == "cuda":
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU is visible to torch")
    print(f"GPU: {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).multi_processor_count} SMs")
print("selpo.kernels from", os.path.dirname(launch.__file__).removesuffix("/streaming"))
top = importlib.util.find_spec("kernels")
if top is not None and os.path.realpath(os.path.dirname(top.origin)) == os.path.realpath("kernels"):
    sys.exit("the source tree's kernels/ is importable as the top-level module `kernels`")
for module in ("pytest", "hypothesis", "pytest_benchmark", "xdist", "cut_cross_entropy", "liger_kernel", "trl"):
    spec = importlib.util.find_spec(module)
    print(f"  {module}: {os.path.dirname(spec.origin) if spec else 'NOT importable'}")
path = ("addmm with out_dtype=float32 (widening_addmm)" if launch.widening_addmm(device) else
        "FALLBACK: a bf16 product, then an fp32 copy of it added, per vocabulary slice")
print(f"dL/dhidden path on {device}: {path}")
EOF
code=$?
note setup "$code"
if [ "$code" != 0 ]; then echo "gpu_check: the set-up failed: nothing else can run"; exit 2; fi

# 1-3. The benchmark suite, the SePO loss case first: one call per group, adding to the same records.
bench() {  # bench STEP NAME BUDGET CASES [--append]
    chosen "$1" || return 0
    shift
    begin "$1" "$(within "$2")" || return
    timeout -k 5 "$(within "$2")" python3 -m benchmarks.run --device "$device" "${plan[@]}" --out "$out" \
        --cases="$3" --impls="$impls" --log "$out/bench.log" "${@:4}"
    local code=$?
    if [ "$code" = 124 ] || [ "$code" = 137 ]; then  # stopped at its limit: the report of the records so far
        timeout 20 python3 -m benchmarks.run --device "$device" "${plan[@]}" --out "$out" --from-records
    elif [ "$code" != 0 ]; then
        tail -n 20 "$out/bench.log"  # pytest's account of the failure
    fi
    note "$1" "$code"
}
bench loss "SePO loss" 125 "selective_loss-fwd+bwd-$shape"
bench logprobs "log-probs forward+backward" 100 "linear_logprobs-fwd+bwd-$shape" --append
bench forward "log-probs forward" 50 "linear_logprobs-fwd-$shape" --append

# 4. The ledger: ceilings, then each op timed beside its prediction, each line as it comes.
if chosen ledger && begin ledger "$(within 30)"; then
    timeout -k 5 "$(within 30)" python3 -m benchmarks.ledger --measure --device "$device" "${ledger[@]}" 2>&1 |
        tee "$out/ledger.md"
    note ledger "${PIPESTATUS[0]}"
fi

# 5. The op tests on the device, for what is left (SIGINT at the limit: pytest reports what ran).
limit=$(within 600)
if chosen tests && begin "op tests" "$limit"; then
    tests=(tests/test_selective_loss.py tests/test_linear_logprobs.py tests/test_syncs.py tests/test_losses.py
           tests/test_token_scores.py tests/test_logits_logprobs.py tests/test_segment_sum.py tests/test_topk_mask.py
           tests/test_ranking_loss.py)
    xdist=()
    if python3 -c "import xdist" 2> /dev/null; then xdist=(-n "$workers"); else echo "no xdist: one process"; fi
    SELPO_TEST_DEVICE=$device timeout -s INT -k 15 "$limit" python3 -m pytest -p no:cacheprovider -q -rfE \
        "${xdist[@]}" "${tests_k[@]}" "${tests[@]}" > "$out/tests-$device.log" 2>&1
    code=$?
    tail -n 12 "$out/tests-$device.log"
    note "op tests" "$code"
fi

echo
echo "gpu_check took $(( SECONDS - start )) s; exit codes: ${status[*]}"
failed=0
for s in "${status[@]}"; do [ "${s##*:}" = 0 ] || failed=1; done
if [ "${3:-0}" -gt 0 ]; then
    bash benchmarks/gpu_train_check.sh "$out/train" "$3"
fi
exit $failed
