"""Run under 2 processes by tests/test_trainer.py (`accelerate launch --cpu --num_processes 2`): a short DPO
training (reference log-probs computed sharded) and a sharded scoring pass, written for comparison with
the same work done in one process."""

import sys

import torch
from trainer_case import run_case  # this script's folder is on sys.path

from selpo.config import RunConfig
from selpo.trainer import make_accelerator

if __name__ == "__main__":
    model_dir, other_dir, data_file, out_dir = sys.argv[1:5]
    accelerator = make_accelerator(RunConfig(device="cpu"))
    assert accelerator.num_processes == 2, accelerator.num_processes
    result = run_case(accelerator, model_dir, other_dir, data_file, out_dir)
    if accelerator.is_main_process:
        torch.save(result, f"{out_dir}/result.pt")
