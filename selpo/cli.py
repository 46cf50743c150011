"""The ``selpo`` command: one subcommand per pipeline stage, ``run`` for all of them, ``config`` to inspect.

Every subcommand works on one run folder (``--run-dir``, else the ``run_dir`` of ``--config FILE``, else
``runs/default``) and one configuration: the defaults, replaced by the ``config.toml`` selpo saved in the run
folder when it has one (so later commands see the run's settings), or by ``--config FILE``; then ``--set
section.key=value`` overrides. The run folder is never taken from a run folder's own ``config.toml``, and a
``module:function`` reward read from there is imported only when ``--set`` names the same one. Multi-GPU or
multi-machine: ``accelerate launch -m selpo.cli run ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import api, progress
from . import config as config_module
from .stages import StageError, pipeline, stages
from .stages.pipeline import keys as stage_keys

SET_HELP = "override one key, e.g. --set train.lr=1e-6 --set seed=1 (repeatable; see `selpo config --keys`)"


def config_help() -> str:
    """What --config takes: a TOML file with the run-wide keys at the top and a table per section."""
    tables = ", ".join(f"[{name}]" for name in config_module.section_names())
    return f"TOML file with run-wide keys at the top and {tables} tables (see `selpo config --keys`)"


def _keys_epilog(stage: str) -> str:
    """The keys stage ``stage`` depends on under any method that runs it (``selpo.stages.pipeline.keys``)."""
    from . import methods

    keys = dict.fromkeys(k for m in methods.names() if stage in pipeline(m) for k in stage_keys(m, stage))
    sections = config_module.section_names()
    run_wide = [k for k in keys if k not in sections and "." not in k]
    parts = [config_module.describe(None, run_wide)] if run_wide else []
    for key in keys:
        section, _, name = key.partition(".")
        if section in sections:
            parts.append(config_module.describe(section, [name] if name else None))
    return "configuration keys this stage depends on (set with --set KEY=VALUE):\n" + "\n".join(parts)


def _stages_epilog() -> str:
    """The stages each registered method runs, in order (``method = NAME`` picks one)."""
    from . import methods

    lines = [f"  {name}: {' -> '.join(pipeline(name))}" for name in methods.names()]
    return "stages each method runs (--set method=NAME):\n" + "\n".join(lines)


def _add_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help=config_help())
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], help=SET_HELP)


def _add_common(parser: argparse.ArgumentParser, *, work: bool = True) -> None:
    """--config, --set and --run-dir; ``work``: also --quiet, for commands that run stages."""
    _add_settings(parser)
    parser.add_argument("--run-dir", metavar="DIR",
                        help="the run folder (default: run_dir of the config, runs/default)")
    if work:
        parser.add_argument("--quiet", action="store_true",
                            help="no progress bars (they are drawn only when stderr is a terminal)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selpo", description="Token-level preference optimization, end to end. SePO (the default method): an "
        "oracle trained with DPO scores every response token, the key tokens are selected, and a policy is "
        "trained on them alone; also Selective-DPO, token-level guidance, and the DPO and SimPO baselines "
        "(`--set method=...`), and `selpo compare` to run them side by side. Every stage uses the fused ops of "
        "selpo.kernels; none builds full logits.",
        epilog="`selpo run` with no argument runs the embedded default (SmolLM2-135M-Instruct, controlled-sentiment "
        "reviews) into runs/default. `selpo <command> --help` tells what each command does and which keys it reads.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    for stage in stages().values():
        reads = ("every stage its method runs before it" if stage.needs is None else
                 ", ".join(stage.needs) or "nothing but the data files")
        sub = commands.add_parser(stage.name, help=stage.help,
                                  description=f"{stage.help}. Reads the outputs of: {reads} (those its method runs); "
                                  f"writes run_dir/{stage.name}/. Runs again even if already done.",
                                  epilog=_keys_epilog(stage.name), formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common(sub)
        sub.add_argument("--fresh", action="store_true", help=f"delete run_dir/{stage.name}/ first (checkpoints "
                         "included) instead of resuming an interrupted training")
        if stage.name == "data":
            sub.add_argument("--generate", metavar="DIR", help="instead, regenerate the default sentiment dataset "
                             "(train.jsonl, test.jsonl) into DIR by sampling the run's model and scoring with VADER "
                             "(the packaged one came from `selpo data --generate selpo/default_data`)")
            sub.add_argument("--pairs", type=int, default=400, help="with --generate: pairs in all (default 400)")
            sub.add_argument("--test-pairs", type=int, default=80, help="with --generate: held-out pairs (default 80)")
    run = commands.add_parser("run", help="run every stage not yet done, in order, and print the results",
                              description="Runs the stages of the configured method in order (its own list, "
                              "Method.stages in selpo.methods: see docs/methods.md), skipping stages "
                              "already done in the run folder with the same configuration (a stage whose keys "
                              "changed, or that follows a redone one, runs again). A killed training stage resumes "
                              "from its last checkpoint. Ends with a results table and the report's path.",
                              epilog=_stages_epilog() + "\n\n" + config_help(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(run)
    comp = commands.add_parser("compare", help="run the methods side by side and write a comparison report",
                               description="Runs each method (default: every registered one) over a small grid of "
                               "its strength parameter on the same data and step budget, reusing finished runs, and "
                               "writes DIR/compare.html (reward-vs-KL frontier, a table per method, token "
                               "heatmaps), DIR/compare.md and DIR/frontier.png. Its default size is smaller than "
                               "`selpo run`'s (see selpo.compare.DEFAULTS; --config or --set override it).",
                               epilog=config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_settings(comp)
    comp.add_argument("--quiet", action="store_true", help="no progress bars")
    comp.add_argument("--dir", default="runs/compare", help="folder of the runs and the report (default runs/compare)")
    comp.add_argument("--methods", default="", help="comma-separated methods (default: every registered one)")
    comp.add_argument("--grid", metavar="METHOD=KEY:V1,V2", action="append", default=[],
                      help="the strength values of a method, e.g. dpo=dpo.beta:0.05,0.1,0.5 (repeatable)")
    show = commands.add_parser("config", help="print the configuration in use (TOML, documented) or all keys",
                               description="Prints the resolved configuration as a TOML file with every key "
                               "documented, ready to edit and pass back with --config.")
    _add_common(show, work=False)
    show.add_argument("--keys", action="store_true", help="list every key with its default and documentation")
    return parser


def resolve_config(args: argparse.Namespace) -> config_module.RunConfig:
    """--config < --set, --run-dir last (``selpo.api.resolve_config``: the run folder's saved config.toml when there
    is no --config)."""
    run_dir = [] if args.run_dir is None else [f"run_dir={args.run_dir}"]
    return api.resolve_config(args.config, list(args.set) + run_dir)


def _generate(config, args) -> None:
    from .sentiment import generate_default_dataset

    meta = generate_default_dataset(args.generate, args.pairs, config.seed, test_pairs=args.test_pairs,
                                    model=config.model)
    print(f"wrote {args.generate}/train.jsonl and test.jsonl: {meta['train_pairs']} + {meta['test_pairs']} pairs")


def _compare(args: argparse.Namespace) -> int:
    from .compare import compare, load_config
    from .trainer import make_accelerator

    config = load_config(args.config, args.set)
    accelerator = make_accelerator(config)
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()] or None
    rows, path = compare(config, accelerator, args.dir, chosen, args.grid)
    if accelerator.is_main_process:
        print(f"\nreport: {path}\n" + (Path(args.dir) / "compare.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress.QUIET = getattr(args, "quiet", False)
    try:
        return _main(args)
    except BrokenPipeError:
        # The reader of stdout left (`selpo config --keys | head`): nothing more to say, and nowhere to say it.
        # Python's own flush at exit would fail again, so stdout now points at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError, StageError) as e:  # OSError: a file that cannot be read or written, named
        print(f"selpo: error: {e}", file=sys.stderr)
        return 1


def _main(args: argparse.Namespace) -> int:
    if args.command == "compare":
        return _compare(args)
    if args.command == "config" and args.keys:  # the keys and their defaults: no configuration to resolve
        print("run-wide keys:\n" + config_module.describe())
        for name in config_module.section_names():
            print(f"[{name}]\n" + config_module.describe(name))
        return 0
    config = resolve_config(args)
    if args.command == "config":
        print(config_module.to_toml(config), end="")
        return 0
    if args.command == "data" and args.generate:
        _generate(config, args)
        return 0
    stage = None if args.command == "run" else args.command
    api.execute(config, stage, fresh=getattr(args, "fresh", False), progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
