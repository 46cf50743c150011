"""Stage ``report``: ``report.html`` in the run folder, what a person looks at after a run.

It holds the configuration, the data report, the results table, the tokens each stage's model bodies computed
(in ``data.packing``'s layout, beside the padded layout's count for the same batches), the training curves
(``report/curves.png``) and a token heatmap of a few training pairs: each response token coloured by the
method's score or weight (green positive, red negative; ``eval/tokens.jsonl``) and the tokens its loss reads
outlined.
"""

from __future__ import annotations

import html
import json

from .. import config as config_module
from .. import methods
from ..context import Context, read_jsonl
from ..models import load_tokenizer
from ..pages import STYLE, heatmap_html, table
from ..trainer import read_metrics
from .pipeline import pipeline, stages

CURVES = ("loss", "accuracy", "margin")


def plot_curves(ctx: Context, path) -> None:
    """Loss, reward accuracy and margin per step of each model the method trains, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2), constrained_layout=True)
    method = methods.get(ctx.config.method)
    for stage in (stages()[name] for name in pipeline(ctx.config.method) if stages()[name].trains):
        records = read_metrics(ctx.stage_dir(stage.name))
        label = stage.trains + (f" ({method.title})" if stage.name == "train" else "")
        for ax, key in zip(axes, CURVES):
            ax.plot([r["step"] for r in records], [r.get(key, float("nan")) for r in records], marker=".",
                    label=label)
    for ax, key in zip(axes, CURVES):
        ax.set_xlabel("optimizer step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def resultstable(results: dict) -> list[tuple[str, str, str]]:
    """(metric, initial model, trained policy) rows of the eval results, formatted."""
    init, policy = results["initial"], results["policy"]
    spec = results.get("reward", {}).get("spec", "vader")
    if policy["reward"] is None:
        rows = [("reward: none given (eval.reward = none), samples not scored", "-", "-")]
    else:
        label = "reward (mean VADER compound of samples)" if spec == "vader" else f"reward (mean of {spec})"
        rows = [(label, f"{init['reward']:+.3f}", f"{policy['reward']:+.3f}")]
    if "win_rate" in results:
        win = results["win_rate"]
        rows.append(("win rate over the initial model's samples (+- s.e.)", "", f"{win['rate']:.3f} +- "
                     f"{win['stderr']:.3f}"))
    rows += [
        ("KL from the initial model (nats per sample)", f"{init['kl']:.3f}", f"{policy['kl']:.3f}"),
        ("held-out accuracy, implicit reward", "-", f"{policy['implicit_accuracy']:.3f}"),
        ("held-out accuracy, mean log-prob", f"{init['likelihood_accuracy']:.3f}",
         f"{policy['likelihood_accuracy']:.3f}"),
    ]
    if "implicit_margin" in policy:
        rows += [("held-out margin, implicit reward (nats)", "-", f"{policy['implicit_margin']:+.3f}"),
                 ("held-out margin, mean log-prob (nats per token)", f"{init['logp_margin']:+.3f}",
                  f"{policy['logp_margin']:+.3f}")]
    if policy.get("token_share") is not None:
        rows.append(("share of response tokens the loss read", "", f"{policy['token_share']:.3f}"))
    if "oracle" in results:
        rows.append(("oracle held-out accuracy, implicit reward", "", f"{results['oracle']['implicit_accuracy']:.3f}"))
    if "selection" in results:
        sel = results["selection"]
        rows += [("selected chosen tokens at VADER words (random)", "",
                  f"{sel['chosen_precision']:.3f} ({sel['chosen_random_precision']:.3f})"),
                 ("selected rejected tokens at VADER words (random)", "",
                  f"{sel['rejected_precision']:.3f} ({sel['rejected_random_precision']:.3f})")]
    return rows


def summary_text(results: dict) -> str:
    """The results table as plain text, printed at the end of ``selpo run``."""
    rows = [("metric", "initial", "policy")] + resultstable(results)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def body_rows(ctx: Context) -> list[tuple]:
    """Per stage that ran a model body: (stage, its layouts, tokens computed, tokens padded, their ratio)."""
    rows = []
    for stage in pipeline(ctx.config.method):
        summary = (ctx.done_record(stage) or {}).get("summary", {})
        if summary.get("padded_tokens"):
            computed, padded = summary["body_tokens"], summary["padded_tokens"]
            rows.append((stage, ", ".join(summary["body_layouts"]), f"{computed:,}", f"{padded:,}",
                         f"{computed / padded:.2f}x"))
    return rows


def run(ctx: Context) -> dict:
    results = json.loads((ctx.stage_dir("eval") / "results.json").read_text())
    data_report = json.loads((ctx.stage_dir("data") / "report.json").read_text())
    shown = read_jsonl(ctx.stage_dir("eval") / "tokens.jsonl")[:ctx.config.report.pairs]
    method = methods.get(ctx.config.method)
    out = ctx.run_dir / "report.html"
    if ctx.accelerator.is_main_process:
        plot_curves(ctx, ctx.stage_dir("report") / "curves.png")
        data_rows = [(split, r["source"], r["rows"], r["kept"], r["truncated"], json.dumps(r["dropped"]))
                     for split, r in data_report.items()]
        name = html.escape(str(ctx.run_dir))
        page = f"""<!doctype html><html><head><meta charset="utf-8"><title>selpo run: {name}</title>
<style>{STYLE}</style></head><body>
<h1>{method.title} run <code>{name}</code></h1>
<h2>Results</h2>{table(resultstable(results), ("metric", "initial model", "trained policy"))}
<p>Reward: {html.escape(results.get("reward", {}).get("description", "VADER"))}.</p>
<p>{results['samples']} samples per model on {results['prompts']} held-out prompts;
{results['test_pairs']} held-out pairs.</p>
<h2>Model body work</h2><p>Tokens the model bodies computed in each stage (data.packing =
{html.escape(ctx.config.data.packing)}; a model that cannot take it runs padded, as the stage's log says), beside
the tokens of the same batches in the padded layout (2 rows per pair, each padded to the longest).</p>
{table(body_rows(ctx), ("stage", "layout", "tokens computed", "padded layout", "ratio"))}
<h2>Training curves</h2><img src="report/curves.png" alt="training curves" style="max-width:100%">
<h2>Tokens as {method.title} sees them</h2>
<p>Background: {method.legend} (green positive, red negative; hover for the value).</p>
{heatmap_html(load_tokenizer(ctx.config.model), shown)}
<h2>Data</h2>{table(data_rows, ("split", "source", "rows", "kept", "truncated", "dropped"))}
<h2>Configuration</h2><pre>{html.escape(config_module.to_toml(ctx.config))}</pre>
</body></html>
"""
        ctx.folder.write_own_file(out.name, page)
    return {"report": str(out)}

