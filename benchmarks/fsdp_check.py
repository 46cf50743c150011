"""selpo's trainer under Accelerate's FSDP: the same weights as without it, and an exact resume after a kill.

Accelerate runs FSDP only on accelerators. On a CPU (`accelerate launch --use_fsdp` with accelerate 1.15 and torch
2.13) the processes become Accelerate's MULTI_CPU type and the model is wrapped in DDP without a word (FSDP2), or
the FSDP1 plugin stops with "There are currently no available devices found, must be one of 'XPU', 'CUDA', ...".
So the tests run DDP on CPU (tests/test_trainer.py), torch's FSDP1 on CPU over gloo without Accelerate's launcher
(tests/test_fsdp1.py), and this check runs the trainer under Accelerate's FSDP where a GPU is, as many processes as
GPUs (one on the machine the GPU script runs on: FSDP's wrapping, gathering and sharded checkpoints then run, with
nothing to shard across; FSDP1 then does not shard, the case selpo/fsdp1.py is for):

    python -m benchmarks.fsdp_check OUT [--fsdp-version 1|2] [--processes N] [--lora]

It trains a tiny random Llama with DPO (torch backend, float32, deterministic algorithms) three ways: without
FSDP in this process; then under ``accelerate launch --use_fsdp``, once whole and once killed after step 3 and
resumed from its step-2 checkpoint. The FSDP weights must match the plain ones within float32 rounding and the
resumed ones the whole run's exactly. With ``--lora`` each training trains a LoRA adapter (rank 4 on the default
targets) and the weights compared are the saved adapter's. Prints a verdict per check; exits with status 1 if one
fails.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

STEPS, KILL_AT = 5, 3


class Killed(Exception):
    """Raised after step KILL_AT: the simulated crash."""


def _setup() -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def train_tiny(accelerator, folder: Path, out: Path, lora: bool, on_step=None) -> None:
    """DPO on 16 random pairs, global batch 8 (micro-batches of 2), checkpoints every 2 steps, a LoRA adapter or
    every weight trained; model (or adapter) in out/model."""
    from selpo.batches import Example
    from selpo.config import LoopConfig
    from selpo.data import TokenizedPair
    from selpo.methods import DPO, with_reference_logps
    from selpo.models import load_causal_lm
    from selpo.trainer import train

    model, tokenizer = load_causal_lm(str(folder), device=accelerator.device)
    generator = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(4, len(tokenizer), (n,), generator=generator).tolist()  # noqa: E731
    examples = [Example(TokenizedPair(ids(12), ids(20), ids(16), row=i)) for i in range(16)]
    examples = with_reference_logps(accelerator, model, examples, pad_id=tokenizer.pad_token_id, batch_size=4,
                                    backend="torch")
    loop = LoopConfig(batch_size=8, micro_batch_size=2, lr=1e-3, max_steps=STEPS, save_every=2, warmup_ratio=0.2,
                      lora_rank=4 if lora else 0, lora_dropout=0.0)
    train(accelerator, model, tokenizer, DPO(beta=0.5, backend="torch"), examples, loop, out, seed=3,
          fingerprint="fsdp-check", on_step=on_step)


def _kill(step: int) -> None:
    if step == KILL_AT:
        raise Killed


def run_fsdp(folder: Path, out: Path, lora: bool) -> None:
    """In the processes of ``accelerate launch --use_fsdp``: the whole training, then the killed and resumed one."""
    from accelerate.utils import DistributedType

    from selpo.config import RunConfig
    from selpo.trainer import make_accelerator

    _setup()
    accelerator = make_accelerator(RunConfig(device="cuda", precision="no"))
    accelerator.print(f"distributed type {accelerator.distributed_type}, {accelerator.num_processes} process(es)")
    if accelerator.distributed_type != DistributedType.FSDP:
        raise SystemExit(f"not running under FSDP: {accelerator.distributed_type}")
    train_tiny(accelerator, folder, out / "fsdp-whole", lora)
    try:
        train_tiny(accelerator, folder, out / "fsdp-resumed", lora, on_step=_kill)
        raise SystemExit(f"the training was not killed at step {KILL_AT}")
    except Killed:
        pass
    train_tiny(accelerator, folder, out / "fsdp-resumed", lora)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(f).items()}


def _max_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        raise SystemExit(f"the saved models hold different tensors: {sorted(a.keys() ^ b.keys())}")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--fsdp-version", type=int, choices=(1, 2), default=1)
    parser.add_argument("--processes", type=int, default=max(1, torch.cuda.device_count()))
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of every weight")
    parser.add_argument("--worker", type=Path, help="(internal) the tiny model folder: run the FSDP trainings here")
    args = parser.parse_args()
    if args.worker:
        run_fsdp(args.worker, args.out, args.lora)
        return 0

    from selpo.config import RunConfig
    from selpo.testing import tiny_model_dir
    from selpo.trainer import make_accelerator

    _setup()
    args.out.mkdir(parents=True, exist_ok=True)
    folder = Path(tiny_model_dir(args.out))
    train_tiny(make_accelerator(RunConfig(device="cuda", precision="no")), folder, args.out / "plain", args.lora)
    with socket.socket() as s:  # a free port for the processes' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version",
               str(args.fsdp_version), "--num_processes", str(args.processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
               "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap",
               "LlamaDecoderLayer", "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
               "--fsdp_cpu_ram_efficient_loading", "false", "-m", "benchmarks.fsdp_check", str(args.out),
               "--worker", str(folder)] + (["--lora"] if args.lora else [])
    done = subprocess.run(command)
    if done.returncode != 0:
        print(f"FSDP{args.fsdp_version}: the launched training failed (exit code {done.returncode})")
        return 1
    plain, whole, resumed = (_weights(args.out / name / "model") for name in ("plain", "fsdp-whole", "fsdp-resumed"))
    moved = (max(float(v.abs().max()) for k, v in plain.items() if "lora_B" in k) if args.lora else
             _max_diff(plain, _weights(folder)))  # an adapter's B starts at 0
    if moved < 1e-3:
        print("the plain training did not move the weights: nothing is compared")
        return 1
    fsdp_vs_plain, resumed_vs_whole = _max_diff(whole, plain), _max_diff(resumed, whole)
    agree = all(torch.allclose(whole[k], plain[k], atol=2e-5, rtol=1e-4) for k in plain)
    print(f"FSDP{args.fsdp_version}{' LoRA' if args.lora else ''}, {args.processes} process(es), {STEPS} steps: "
          f"max |FSDP - plain| = "
          f"{fsdp_vs_plain:.2e} ({'ok' if agree else 'NO'}: atol 2e-5, rtol 1e-4); max |resumed after a kill at "
          f"step {KILL_AT} - whole| = {resumed_vs_whole:.2e} ({'ok' if resumed_vs_whole == 0 else 'NO'}: exact)")
    return 0 if agree and resumed_vs_whole == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
