"""``selpo compare``: the methods side by side, on one task, one data set and one step budget.

Each method runs over a small grid of its strength parameter (``Method.strength`` and ``Method.grid``), every
run a normal run folder under ``DIR/runs/<method>-<key>=<value>/`` with the same data and the same training
settings; a stage before ``train`` that every run running it runs alike (the same fingerprint: ``data``, SePO's and
Selective-DPO's ``oracle``, SePO's ``score``) runs once in ``DIR/shared/`` and is linked into each of them. Finished
stages are reused, so a second call (or one with a method added) only runs what is missing. The report,
``DIR/compare.html`` with ``frontier.png`` and ``compare.md``, holds:

- the reward-versus-KL frontier: ground-truth reward of samples against KL from the initial model, one
  curve per method through its grid points;
- one table per method: reward, KL, held-out preference accuracy, share of response tokens the loss read,
  wall time of its training (and of the stages it needs first) and peak memory of its training;
- the token heatmap of the same training pairs under each method's scores or weights.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from . import config as config_module
from . import methods as method_registry
from .atomic import write_text_atomic
from .config import RunConfig, tomllib
from .context import Context, read_jsonl
from .models import load_tokenizer
from .pages import STYLE, heatmap_html, table
from .stages import pipeline, run_all
from .stages.pipeline import fingerprint

# The comparison's default size on top of the run defaults: a smaller task than `selpo run`'s, so that
# ten runs finish in well under an hour on 2 CPU cores (measured: see docs/methods.md).
DEFAULTS = ("data.max_train_pairs=128", "eval.prompts=24", "eval.token_pairs=16", "guidance.every=8")


def parse_grid(items: list[str]) -> dict[str, tuple[str, tuple[float, ...]]]:
    """Method -> (key, values) it is compared over: each method's own strength and grid, replaced by
    ``METHOD=KEY:V1,V2,...`` items."""
    grid = {name: (method_registry.get(name).strength, method_registry.get(name).grid)
            for name in method_registry.names()}
    for item in items:
        method, _, rest = item.partition("=")
        key, _, values = rest.partition(":")
        if method not in grid or not key or not values:
            raise ValueError(f"--grid takes METHOD=KEY:V1,V2 with METHOD one of {tuple(grid)}, got {item!r}")
        try:
            grid[method] = (key, tuple(float(v) for v in values.split(",")))
        except ValueError:
            raise ValueError(f"--grid {item!r}: the values must be numbers") from None
    return grid


def run_configs(base: RunConfig, out: Path, methods: list[str], grid) -> list[tuple[str, float, RunConfig]]:
    """(method, strength, configuration) of every run, checked before any of them starts."""
    runs = []
    for method in methods:
        key, values = grid[method]
        for value in values:
            run_dir = out / "runs" / f"{method}-{key}={value:g}"
            overrides = [f"method={method}", f"{key}={value!r}", f"run_dir={run_dir}"]
            runs.append((method, value, config_module.apply_overrides(base, overrides)))
    return runs


def preparing(method: str) -> tuple[str, ...]:
    """The stages ``method`` runs before ``train``: data and its own."""
    names = pipeline(method)
    return names[:names.index("train")]


def shared_stages(runs: list[tuple[str, float, RunConfig]]) -> set[str]:
    """The stages before ``train`` that every run running them runs alike (one fingerprint): each runs once."""
    prints: dict[str, set[str]] = {}
    for method, _, config in runs:
        for stage in preparing(method):
            prints.setdefault(stage, set()).add(fingerprint(config, stage))
    return {stage for stage, found in prints.items() if len(found) == 1}


def link_shared(config: RunConfig, out: Path, shared: set[str]) -> None:
    """Points the run's folders of the ``shared`` stages at ``out/shared/<stage>`` (created if missing)."""
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stage in sorted(shared):
        if stage in pipeline(config.method):
            target = out / "shared" / stage
            target.mkdir(parents=True, exist_ok=True)
            link = run_dir / stage
            if not link.is_symlink():
                if link.exists():
                    raise ValueError(f"{link} exists and is not the comparison's shared stage; remove it")
                link.symlink_to(os.path.relpath(target, run_dir))


def _seconds(record: dict) -> float:
    return float(record.get("seconds", 0.0))


def costs(method: str, records: dict) -> dict:
    """A run's training time, the time of the stages its method runs before training, and the training's peak,
    from its stage records (a run's DONE records, ``selpo.context.read_done``)."""
    before = preparing(method)[1:]  # the method's own stages
    return {"train_seconds": _seconds(records["train"]), "prep_seconds": sum(_seconds(records[s]) for s in before),
            "peak_memory_mib": records["train"]["summary"].get("peak_memory_mib")}


def summarize(method: str, value: float, config: RunConfig, records: dict) -> dict:
    """One row of the comparison from a finished run's stage records."""
    results = records["eval"]["summary"]
    policy = results["policy"]
    return {"method": method, "strength": value, "run_dir": config.run_dir,
            "reward": policy["reward"], "kl": policy["kl"], "initial_reward": results["initial"]["reward"],
            "reward_spec": results.get("reward", {}).get("spec", "vader"),
            "implicit_accuracy": policy["implicit_accuracy"], "likelihood_accuracy": policy["likelihood_accuracy"],
            "token_share": policy.get("token_share"), **costs(method, records)}


def plot_frontier(rows: list[dict], path: Path, *, title: str = "reward vs KL (labels: strength)",
                  ylabel: str | None = None) -> None:
    """Reward against KL(policy || initial), a line per method through its strengths (each point labelled), the
    initial model at KL 0; error bars where every row of a method carries ``se`` (its gain's standard error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), constrained_layout=True)
    ax.scatter([0.0], [rows[0]["initial_reward"]], color="black", marker="*", s=90, label="initial model", zorder=3)
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kl"])
        errors = [r["se"] for r in points] if all("se" in r for r in points) else None
        label = method_registry.get(method).title if method in method_registry.names() else method
        bars = ax.errorbar([r["kl"] for r in points], [r["reward"] for r in points], yerr=errors, marker="o",
                           capsize=3 if errors else 0, label=label)
        for r in points:
            ax.annotate(f"{r['strength']:g}", (r["kl"], r["reward"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=bars.lines[0].get_color())
    if ylabel is None:
        spec = rows[0].get("reward_spec", "vader")
        ylabel = "reward: mean VADER compound of samples" if spec == "vader" else f"reward: mean of {spec}"
    ax.set_xlabel("KL(policy || initial), nats per sample")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


COLUMNS = ("strength", "reward", "KL", "held-out acc. (implicit)", "held-out acc. (mean log-prob)",
           "token share", "train s", "prep s", "peak MiB")


def table_cells(r: dict, key: str) -> list[str]:
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    return [f"{key}={r['strength']:g}", f"{r['reward']:+.3f}", f"{r['kl']:.3f}", f"{r['implicit_accuracy']:.3f}",
            f"{r['likelihood_accuracy']:.3f}", num(r["token_share"], ".2f"), f"{r['train_seconds']:.0f}",
            f"{r['prep_seconds']:.0f}", num(r["peak_memory_mib"], ".0f")]


def markdown(rows: list[dict], grid) -> str:
    lines = ["| method | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in rows:
        title = method_registry.get(r["method"]).title
        lines.append(f"| {title} | " + " | ".join(table_cells(r, grid[r["method"]][0])) + " |")
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict], grid, out: Path, pairs: int, meta: str) -> None:
    plot_frontier(rows, out / "frontier.png")
    write_text_atomic(out / "compare.md", markdown(rows, grid))
    write_text_atomic(out / "results.json", json.dumps(rows, indent=1))
    tokenizer = None
    sections = []
    heatmaps = []
    for name in dict.fromkeys(r["method"] for r in rows):
        method, key = method_registry.get(name), grid[name][0]
        sections.append(f"<h3>{method.title}</h3>"
                        + table([table_cells(r, key) for r in rows if r["method"] == name], COLUMNS))
        first = next(r for r in rows if r["method"] == name)
        config = config_module.load(Path(first["run_dir"]) / "config.toml")
        tokenizer = tokenizer or load_tokenizer(config.model)
        shown = read_jsonl(Path(first["run_dir"]) / "eval" / "tokens.jsonl")[:pairs]
        heatmaps.append(f"<h3>{method.title} ({key}={first['strength']:g})</h3>"
                        f"<p>{method.legend}</p>{heatmap_html(tokenizer, shown)}")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>selpo compare</title>
<style>{STYLE}</style></head><body>
<h1>Methods compared</h1><p>{html.escape(meta)}</p>
<h2>Reward against KL</h2><img src="frontier.png" alt="reward vs KL frontier" style="max-width:100%">
<h2>Results per method</h2>
<p>Reward: mean VADER compound score of the policy's samples on held-out prompts; KL from the initial model
per sample; held-out preference accuracy by the implicit reward sum(log p<sub>policy</sub> - log p<sub>initial</sub>)
and by mean log-prob; token share: mean share of response tokens the training loss read; train s: wall time
of the training stage; prep s: of the stages the method runs before it (oracle, score, or reward model);
peak MiB: peak memory of the training stage (resident memory of the process on CPU, allocated tensors on GPU).</p>
{''.join(sections)}
<h2>The same training pairs under each method</h2>{''.join(heatmaps)}
</body></html>
"""
    write_text_atomic(out / "compare.html", page)


def compare(base: RunConfig, accelerator, out: str | Path, methods: list[str] | None = None,
            grid_items: list[str] = ()) -> tuple[list[dict], Path]:
    """Runs (or reuses) every run of the comparison and writes its report; returns (rows, report path)."""
    out = Path(out)
    methods = list(methods or method_registry.names())
    unknown = [m for m in methods if m not in method_registry.names()]
    if unknown:
        raise ValueError(f"--methods: unknown method(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(method_registry.names())}")
    if base.eval.reward == "none":
        raise ValueError("eval.reward: selpo compare plots each method's reward against its KL, so it needs a reward "
                         "(vader, a reward model folder or module:function), not none")
    grid = parse_grid(list(grid_items))
    runs = run_configs(base, out, methods, grid)
    shared = shared_stages(runs)
    rows = []
    for method, value, config in runs:
        if accelerator.is_main_process:
            link_shared(config, out, shared)
        accelerator.wait_for_everyone()
        accelerator.print(f"==== {method_registry.get(method).title}, {grid[method][0]}={value:g}: {config.run_dir}")
        records = run_all(Context(config, accelerator, shared_root=out / "shared"))
        rows.append(summarize(method, value, config, records))
    meta = (f"{len(runs)} runs on the same {base.data.train!r} training pairs "
            f"(max_train_pairs={base.data.max_train_pairs}), {base.train.epochs} epoch(s) of batch "
            f"{base.train.batch_size}, model {base.model!r}, seed {base.seed}.")
    path = out / "compare.html"
    if accelerator.is_main_process:
        write_report(rows, grid, out, base.report.pairs, meta)
    return rows, path


def load_config(path: str | None, overrides: list[str]) -> RunConfig:
    """The run defaults, then the comparison's size (``DEFAULTS``) for every key the TOML file at ``path``
    and the ``--set`` overrides leave unset, then those."""
    explicit = {item.partition("=")[0].strip() for item in overrides}
    if path is not None and Path(path).is_file():
        data = tomllib.loads(Path(path).read_text())
        explicit |= {f"{name}.{key}" if isinstance(table, dict) else name
                     for name, table in data.items() for key in (table if isinstance(table, dict) else [name])}
    defaults = [d for d in DEFAULTS if d.partition("=")[0] not in explicit]
    return config_module.load(path, defaults + list(overrides))
