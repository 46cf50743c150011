"""How a configuration section is declared: a dataclass whose fields carry their documentation (``option``), whose
checks name the key they reject (``require``), and the loop settings every training section shares (``LoopConfig``).

The run's own sections live in ``selpo.config``; a method declares its section, and its stages theirs, with these
same pieces (``selpo.methods``), so a method's options read, print and fail like every other key.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field


def option(default, help: str):
    """A dataclass field with its documentation attached, so ``--help`` and saved configs can show it."""
    return field(default=default, metadata={"help": help})


def require(section: str, name: str, ok: bool, message: str) -> None:
    """Raises ValueError naming the key ``section.name`` (``name`` for a run-wide key) unless ``ok``."""
    if not ok:
        key = f"{section}.{name}" if section else name
        raise ValueError(f"{key} {message}")


@dataclass
class LoopConfig:
    """The optimisation settings shared by every training stage (see ``selpo.trainer``)."""

    SECTION: typing.ClassVar[str] = "loop"
    epochs: int = option(1, "Passes over the training pairs (ignored when max_steps is set).")
    max_steps: int | None = option(None, "Stop after this many optimizer steps (none: run `epochs` epochs).")
    batch_size: int = option(8, "Pairs per optimizer step over all processes (the global batch); the same "
                             "value gives the same training on any number of processes.")
    micro_batch_size: int = option(4, "Pairs per forward pass on one process; gradient accumulation steps = "
                                   "batch_size / (micro_batch_size * processes), which must be a whole number.")
    lr: float = option(5e-6, "Peak learning rate of AdamW.")
    weight_decay: float = option(0.0, "AdamW weight decay, applied to matrices only (not to norms and biases).")
    warmup_ratio: float = option(0.1, "Share of the steps spent warming the learning rate up linearly from 0; "
                                 "a cosine decay to 0 follows.")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this value (0: no clipping).")
    save_every: int = option(50, "Write a checkpoint every N optimizer steps (0: only at the end); a killed "
                             "run resumes from the last one.")
    log_every: int = option(1, "Append metrics to metrics.jsonl every N optimizer steps.")
    gradient_checkpointing: bool = option(False, "Recompute each transformer layer's activations in the backward "
                                          "instead of storing them: much less memory for about a third more "
                                          "compute.")
    keep_attention: bool = option(False, "Under gradient_checkpointing, keep each layer's attention output (of "
                                  "torch's fused scaled_dot_product_attention kernels or flash-attn's: one "
                                  "[tokens, hidden] tensor per layer) so that the recomputation skips the "
                                  "attention kernel (selective activation checkpointing, selpo.recompute). Off "
                                  "by default: its policy runs in Python for every operator of the forward and "
                                  "of its recomputation, which doubled a host-bound checkpointed step (SmolLM2 "
                                  "LoRA on an H200, 2026-12-04: 0.78 s against TRL's 0.31 s); worth it only where "
                                  "attention is a large part of a layer's time (long sequences on a large model).")
    lean_body: bool = option(True, "Run the model's SwiGLU MLPs and RMSNorms as autograd functions that store "
                             "only their inputs (selpo.lean_body): about 40% less stored activation memory in "
                             "a Llama-style model, the same values and gradients up to rounding. Under "
                             "gradient_checkpointing the RMSNorms only.")
    lora_rank: int = option(0, "Rank of the LoRA adapter trained instead of the model's weights (through PEFT, "
                            "selpo.lora): the base weights stay frozen, and the reference, the score stage's "
                            "reference and eval's initial model are the same weights with the adapter disabled. "
                            "The output head (and tied input embeddings) stays frozen; a token reward model's "
                            "scalar head is trained in full. The trained model is saved as an adapter folder "
                            "(PEFT's format, PeftModel.from_pretrained or selpo read it onto its base). 0: every "
                            "weight is trained.")
    lora_alpha: float = option(16.0, "LoRA's scale numerator: the adapter's update is multiplied by "
                               "lora_alpha / lora_rank.")
    lora_dropout: float = option(0.0, "Dropout on the LoRA adapter's input, in [0, 1).")
    lora_targets: str = option("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                               "Comma-separated names of the modules that get a LoRA adapter (PEFT's "
                               "target_modules: a module whose name ends with one). The default: a Llama-style "
                               "model's attention and MLP projections. The output head may not be named: it stays "
                               "frozen. Under lean_body adapted MLPs and projections run selpo.lean_lora (not with "
                               "lora_dropout > 0).")
    lora_merge: bool = option(False, "Also save the trained model merged (base + adapter) as a full transformers "
                              "folder, <stage>/merged, beside the adapter folder <stage>/model; needs lora_rank > 0.")

    def __post_init__(self):
        s = self.SECTION
        for name in ("epochs", "batch_size", "micro_batch_size", "log_every"):
            require(s, name, getattr(self, name) >= 1, f"must be >= 1, got {getattr(self, name)}")
        require(s, "max_steps", self.max_steps is None or self.max_steps >= 1,
                f"must be >= 1 or none, got {self.max_steps}")
        require(s, "batch_size", self.batch_size % self.micro_batch_size == 0,
                f"({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})")
        require(s, "lr", math.isfinite(self.lr) and self.lr > 0, f"must be > 0, got {self.lr}")
        require(s, "weight_decay", self.weight_decay >= 0, f"must be >= 0, got {self.weight_decay}")
        require(s, "warmup_ratio", 0 <= self.warmup_ratio < 1, f"must lie in [0, 1), got {self.warmup_ratio}")
        require(s, "max_grad_norm", self.max_grad_norm >= 0, f"must be >= 0, got {self.max_grad_norm}")
        require(s, "save_every", self.save_every >= 0, f"must be >= 0, got {self.save_every}")
        require(s, "lora_rank", self.lora_rank >= 0, f"must be >= 0 (0: no adapter), got {self.lora_rank}")
        require(s, "lora_alpha", math.isfinite(self.lora_alpha) and self.lora_alpha > 0,
                f"must be > 0, got {self.lora_alpha}")
        require(s, "lora_dropout", 0 <= self.lora_dropout < 1, f"must lie in [0, 1), got {self.lora_dropout}")
        require(s, "lora_targets", all(t.strip().replace("_", "a").replace(".", "a").isalnum()
                                       for t in self.lora_targets.split(",")),
                f"must be comma-separated module names, e.g. 'q_proj,v_proj', got {self.lora_targets!r}")
        require(s, "lora_merge", not self.lora_merge or self.lora_rank > 0,
                "needs lora_rank > 0: without an adapter the saved model is already a full folder")
