"""COMPARE-<device>.md from a ``selpo compare`` folder: every finished run's reward and KL, its reward gain over the
initial model with that gain's standard error, and the reward-vs-KL frontier with those errors drawn.

``selpo compare`` reports each run's mean reward, not how sure it is. eval samples the initial model and the
policy on the same prompts (the k-th sample of each on the same prompt, in eval/samples.jsonl), so the gain is the
mean of the paired differences policy - initial, and its standard error is their standard deviation over the
square root of their number. A gain of more than three standard errors separates the policy from the initial
model. Runs whose eval has not finished (a comparison stopped at its time limit) are left out and counted.

    python -m benchmarks.compare_report DIR --out benchmarks/COMPARE-cuda.md --plot benchmarks/compare-frontier-cuda.png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from selpo.compare import costs, plot_frontier, preparing
from selpo.config import tomllib
from selpo.context import read_done, read_jsonl

SEPARATED = 3.0  # standard errors


def run_rows(folder: Path) -> tuple[list[dict], int]:
    """One row per run of ``folder/runs`` whose eval finished, and the number of runs that have not."""
    rows, unfinished = [], 0
    runs = folder / "runs"  # absent where the comparison stopped before its first run (seen on a GPU lease)
    for run in sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else ():
        if not (run / "eval" / "DONE.json").is_file():
            unfinished += 1
            continue
        method, _, setting = run.name.partition("-")  # "<method>-<key>=<value>", as selpo compare names them
        key, _, value = setting.partition("=")
        results = json.loads((run / "eval" / "results.json").read_text())
        diffs = [s["policy_reward"] - s["initial_reward"] for s in read_jsonl(run / "eval" / "samples.jsonl")]
        se = statistics.stdev(diffs) / math.sqrt(len(diffs))
        gain = statistics.fmean(diffs)
        z = gain / se if se > 0 else math.copysign(math.inf, gain) if gain else 0.0
        policy = results["policy"]
        records = {stage: read_done(run / stage) for stage in (*preparing(method), "train")}
        rows.append({**costs(method, records), "run": run.name, "method": method, "key": key, "strength": float(value),
                     "reward": policy["reward"], "kl": policy["kl"], "initial_reward": results["initial"]["reward"],
                     "gain": gain, "se": se, "z": z, "samples": len(diffs),
                     "implicit_accuracy": policy["implicit_accuracy"],
                     "likelihood_accuracy": policy["likelihood_accuracy"], "token_share": policy.get("token_share")})
    return rows, unfinished


def settings(folder: Path, rows: list[dict]) -> str:
    """The comparison's shared budget, read from one run's config.toml."""
    config = tomllib.loads((folder / "runs" / rows[0]["run"] / "config.toml").read_text())
    data, train, evaluation = config["data"], config["train"], config["eval"]
    return (f"model {config['model']!r}, precision {config['precision']}, backend {config['backend']}; "
            f"max_train_pairs={data.get('max_train_pairs', 'none')}, {train['epochs']} epoch(s) of batch "
            f"{train['batch_size']} (max_steps={train.get('max_steps', 'none')}), lr {train['lr']}; eval: "
            f"{evaluation['prompts']} held-out prompts, {rows[0]['samples']} samples per model")


def report(folder: Path, out: Path, plot_path: Path, command: str) -> str:
    rows, unfinished = run_rows(folder)
    if not rows:
        raise SystemExit(f"no run under {folder}/runs has finished its eval")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    plot_frontier(rows, plot_path, title=f"reward vs KL ({device})",
                  ylabel="reward of samples (bars: standard error of the gain)")
    lines = [f"# `selpo compare` at a budget that can separate the methods ({device})", "",
             f"- command: `{command}`", f"- settings: {settings(folder, rows)}",
             f"- torch {torch.__version__}; date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- runs: {len(rows)} finished" + (f", {unfinished} not finished (left out)" if unfinished else ""),
             "- gain: mean reward of the policy's samples minus the initial model's on the same prompts; SE: its "
             "standard error over the paired samples; separated: gain above "
             f"{SEPARATED:g} SE", "", f"![reward vs KL]({plot_path.name})", "",
             f"Initial model: reward {rows[0]['initial_reward']:+.3f}.", "",
             "| method | strength | reward | gain | SE | gain / SE | KL | held-out acc. (implicit) | "
             "held-out acc. (mean log-prob) | token share | train s | prep s | peak MiB |",
             "|---" * 13 + "|"]
    for r in rows:
        def num(value, fmt):
            return "-" if value is None else format(value, fmt)

        mark = " **separated**" if r["z"] > SEPARATED else ""
        lines.append(f"| {r['method']} | {r['key']}={r['strength']:g} | {r['reward']:+.3f} | {r['gain']:+.3f} "
                     f"| {r['se']:.3f} | {r['z']:+.1f}{mark} | {r['kl']:.3f} | {r['implicit_accuracy']:.3f} "
                     f"| {r['likelihood_accuracy']:.3f} | {num(r['token_share'], '.2f')} "
                     f"| {r['train_seconds']:.0f} | {r['prep_seconds']:.0f} | {num(r['peak_memory_mib'], '.0f')} |")
    separated = [r["run"] for r in rows if r["z"] > SEPARATED]
    lines += ["", f"Separated from the initial model: {', '.join(separated) if separated else 'none'}."]
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the --dir of selpo compare")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path, required=True, help="the frontier plot (PNG), linked from --out")
    parser.add_argument("--command", default="selpo compare", help="the command that made the runs, for the record")
    args = parser.parse_args(argv)
    print(report(args.folder, args.out, args.plot, args.command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
