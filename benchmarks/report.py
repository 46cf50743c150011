"""RESULTS.md and the sweep plots, written from the suite's records: one table per case, the issue's targets
with their measured ratios, and time and workspace against N and V (one line per implementation)."""

from __future__ import annotations

import os

from .cases import FAMILIES, Plan

RESULTS = {"cpu": "RESULTS.md", "cuda": "RESULTS-cuda.md"}


def fmt_time(s):
    if s is None:
        return "—"
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.1f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} µs"


def fmt_bytes(b):
    if b is None:
        return "—"
    return f"{b / 2**30:.2f} GiB" if abs(b) >= 2**30 else f"{b / 2**20:.0f} MiB"


def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def fmt_ratio(r):
    return "—" if r is None else f"{r:.2f}×" if r >= 0.01 else f"{r:.4f}×"


def fmt_correct(r):
    if r["status"] != "ok":
        return f"{r['status']}: {r['reason']}"
    if r["correct"] is None:
        return "—"
    return f"yes ({r['error']:.1e})" if r["correct"] else f"**NO** (max err {r['error']:.2g} > {r['tol']:g})"


def by_case(records):
    """[(case dict, [records])] in run order."""
    groups = {}
    for r in records:
        groups.setdefault(r["case_id"], (r["case"], []))[1].append(r)
    return list(groups.values())


def role_record(rows, role):
    return next((r for r in rows if r["role"] == role and r["status"] == "ok"), None)


def case_title(case):
    family = FAMILIES[case["family"]]
    return (f"{family.NAME}: {family.MODES[case['mode']]} — N={case['n']}, D={case['d']}, V={case['v']}, "
            f"{case['dtype']}, {case['rounds']} round(s)")


def case_table(case, rows):
    base, floor = role_record(rows, "baseline"), role_record(rows, "floor")
    base_name = base["impl"] if base else "naive"
    lines = [f"| implementation | correct | median time | × {base_name} | × floor | tokens/s | peak | workspace "
             f"| workspace × {base_name} |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["median_s"]
        lines.append("| " + " | ".join([
            f"{r['label']} (`{r['impl']}`)", fmt_correct(r), fmt_time(t),
            fmt_ratio(ratio(t, base and base["median_s"])), fmt_ratio(ratio(t, floor and floor["median_s"])),
            "—" if t is None else f"{case['n'] / t:,.0f}", fmt_bytes(r["peak_bytes"]), fmt_bytes(r["workspace_bytes"]),
            fmt_ratio(ratio(r["workspace_bytes"], base and base["workspace_bytes"]))]) + " |")
    notes = [f"\nMemory: {n}." for n in sorted({r["memory_note"] for r in rows if r["memory_note"]})]
    wall = sum(r["wall_s"] or 0 for r in rows)
    return "\n".join(lines + notes + [f"\nThis case took {wall / 60:.1f} min (checks, memory probes and timing)."])


def find(records, family, mode, impl, **shape):
    for r in records:
        c = r["case"]
        if (c["family"], c["mode"], r["impl"]) == (family, mode, impl) and r["status"] == "ok" \
                and all(c[k] == v for k, v in shape.items()):
            return r
    return None


def targets(records, plan: Plan):
    """[(target, measured, verdict)]: the issue's targets at the plan's headline shape, and the V sweep's flatness."""
    ours, shape, out = f"selpo-{plan.selpo}", plan.headline, []

    def get(family, mode, impl, key="median_s", **where):
        r = find(records, family, mode, impl, **{**shape, **where})
        return None if r is None else r[key]

    def add(text, value, detail="", limit=None):
        if value is None:
            verdict = "n/a (not measured)"
        elif limit is None:
            verdict = "information"
        else:
            verdict = "met" if value <= limit else "**not met**"
        out.append((text, "—" if value is None else f"{value:.3g}×{detail}", verdict))

    def vs(family, mode, impl, other):
        """(impl's time / other's, detail): from the rounds timed in alternation in impl's test where it has
        them (Case.paired), else from the two tests, timed one after the other."""
        apart = ratio(get(family, mode, impl), get(family, mode, other))
        pair = ((find(records, family, mode, impl, **shape) or {}).get("paired") or {}).get(other, {})
        if "median_s" not in pair:
            return apart, ""
        alternating = ratio(pair["median_s"], pair["other_median_s"])
        apart = "—" if apart is None else f"{apart:.3g}×"
        return alternating, f" (alternating rounds; the two tests one after the other: {apart})"

    def vs_best(family, mode, impl, others):
        """impl against the fastest of ``others`` that ran: the largest of its ratios."""
        found = [r for r in (vs(family, mode, impl, o) for o in others) if r[0] is not None]
        return max(found, key=lambda r: r[0], default=(None, ""))

    lp, loss, scores = "linear_logprobs", "selective_loss", "token_scores_topk"
    fused = f"selpo-fused-{plan.selpo}"
    gpu = plan.device == "cuda"
    if gpu:
        add(f"linear_logprobs forward, {ours}: time ≤ 1.12× the matmul floor", *vs(lp, "fwd", ours, "floor"),
            limit=1.12)
        for peer in ("liger-flce", "cce"):
            add(f"linear_logprobs forward, {ours}: time ≤ 0.9× `{peer}`", *vs(lp, "fwd", ours, peer), limit=0.9)
        add(f"linear_logprobs forward+backward, {ours}: time ≤ 1.08× the 4-GEMM floor",
            *vs(lp, "fwd+bwd", ours, "floor"), limit=1.08)
    add(f"linear_logprobs forward+backward, {ours}: time ≤ 1.0× naive eager", *vs(lp, "fwd+bwd", ours, "naive"),
        limit=1.0)
    add(f"linear_logprobs forward, {ours}: time relative to TRL's fused head (`trl-chunked`)",
        *vs(lp, "fwd", ours, "trl-chunked"))
    add(f"linear_logprobs forward+backward, {ours}: time ≤ {0.95 if gpu else 0.6}× TRL's fused head (`trl-chunked`)",
        *vs(lp, "fwd+bwd", ours, "trl-chunked"), limit=0.95 if gpu else 0.6)
    if gpu:
        add(f"linear_logprobs forward+backward, {ours}: time ≤ 0.85× `liger-flce`",
            *vs(lp, "fwd+bwd", ours, "liger-flce"), limit=0.85)
    add(f"linear_logprobs forward+backward, {ours}: workspace ≤ {0.04 if gpu else 0.05}× naive eager's",
        ratio(get(lp, "fwd+bwd", ours, "workspace_bytes"), get(lp, "fwd+bwd", "naive", "workspace_bytes")),
        limit=0.04 if gpu else 0.05)
    add(f"selective loss (30% selected), `{fused}`: time ≤ {0.30 if gpu else 0.35}× naive full logits",
        *vs(loss, "fwd+bwd", fused, "naive"), limit=0.30 if gpu else 0.35)
    add(f"selective loss, `{fused}`: time ≤ {1.2 if gpu else 1.15}× the 3-GEMM floor over the selected rows",
        *vs(loss, "fwd+bwd", fused, "floor"), limit=1.2 if gpu else 1.15)
    add(f"selective loss, `{fused}`: time ≤ {0.30 if gpu else 1.0}× CCE given only the selected tokens (its best here)",
        *vs_best(loss, "fwd+bwd", fused, ("cce-compile-sel", "cce-sel")), limit=0.30 if gpu else 1.0)
    add(f"selective loss, `{fused}`: time ≤ {0.35 if gpu else 0.15}× TRL's fused head on every token, then SePO",
        *vs(loss, "fwd+bwd", fused, "trl-chunked"), limit=0.35 if gpu else 0.15)
    add(f"linear_logprobs backward, {ours}: gradient on 30% of rows ≤ 0.4× every row",
        ratio(get(lp, "bwd-30%", ours), get(lp, "bwd", ours)), limit=0.4)
    if gpu:
        add(f"token_scores + topk_mask, {ours}: time ≤ 1.15× the 2-GEMM floor",
            *vs(scores, "select", ours, "floor"), limit=1.15)
    else:
        add(f"token_scores + topk_mask, {ours}: time relative to the 2-GEMM floor",
            ratio(get(scores, "select", ours), get(scores, "select", "floor")))
    if "V" in plan.sweeps:
        fixed = plan.sweeps["V"]
        lo, hi = min(plan.sweep_values["V"]), max(plan.sweep_values["V"])
        ws = [find(records, lp, "fwd+bwd", ours, **fixed, v=v) for v in (lo, hi)]
        add(f"memory flat in V, {ours}: workspace at V={hi} ≤ 1.2× at V={lo} (N={fixed['n']}, D={fixed['d']})",
            None if None in ws else ratio(ws[1]["workspace_bytes"], ws[0]["workspace_bytes"]), limit=1.2)
    return out


def plot_sweeps(records, plan: Plan, out_dir: str) -> list[str]:
    """One PNG per sweep axis: median time and workspace of forward+backward log-probs, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for axis, fixed in plan.sweeps.items():
        key = axis.lower()
        points = {}
        for r in records:
            c = r["case"]
            if c["family"] == "linear_logprobs" and c["mode"] == "fwd+bwd" and r["status"] == "ok" \
                    and all(c[k] == v for k, v in fixed.items()):
                points.setdefault((r["impl"], r["label"]), []).append((c[key], r["median_s"], r["workspace_bytes"]))
        points = {k: p for k, p in points.items() if len(p) > 1}  # lines: a lone headline point is in its table
        if not points:
            continue
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
        for (impl, label), pts in points.items():
            pts.sort()
            xs = [p[0] for p in pts]
            ax_t.plot(xs, [p[1] for p in pts], marker="o", label=impl)
            mem = [(p[0], p[2] / 2**20) for p in pts if p[2] is not None]
            if mem:
                ax_m.plot([m[0] for m in mem], [max(m[1], 1e-3) for m in mem], marker="o", label=impl)
        where = ", ".join(f"{k.upper()}={v}" for k, v in fixed.items())
        for ax, what in ((ax_t, "median time (s)"), (ax_m, "workspace (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel(what)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.set_title(f"linear_logprobs fwd+bwd, {where}, {plan.dtype}, {plan.device}")
        ax_m.set_title("workspace: peak minus inputs, outputs, gradients")
        ax_t.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"sweep-{axis}-{plan.device}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


METHOD = """\
How to read: each implementation is first checked against selpo's naive reference run in float64 on the same
inputs (outputs and gradients; "correct" shows max |out - ref| / max |ref|, and a wrong result is flagged **NO**,
not hidden), then its peak memory is measured, then it is timed with pytest-benchmark (`benchmark.pedantic`; the
median of the rounds; the correctness run is its first warmup). Ratios are to the naive eager baseline of the same
case, measured in the same run, and to the floor: the N x D x V matmuls alone (the products the op cannot avoid,
into preallocated buffers). Peak memory is real on each device: on CPU, each (case, implementation) runs again in a
fresh process that reads its peak resident set (VmHWM, reset after a warmup run); on CUDA,
`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`. peak = inputs + the most the step adds over them;
workspace = peak - inputs - the outputs and gradients every implementation returns. For a backward alone, memory
covers the forward before it too. An implementation that cannot run here is listed as n/a with the reason.
The targets' time ratios come from rounds timed in alternation: in the test of the selpo implementation that
answers them, each implementation a target compares it with is timed again, a round of each in turn, so that a
drift of the machine's speed during the run does not bias the ratio; the ratio of the two tests, timed one after
the other, is shown beside it."""


def write(records, meta: dict, plan: Plan, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    plots = plot_sweeps(records, plan, out_dir)
    lines = [f"# selpo benchmarks ({plan.device})", ""]
    if plan.name == "quick":
        lines += ["**--quick run: toy sizes that check the suite works; the numbers mean nothing.**", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", METHOD, "", "## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in targets(records, plan)]
    lines += ["", f"At the headline shape N={plan.headline['n']}, D={plan.headline['d']}, V={plan.headline['v']}, "
              f"{plan.dtype}."]
    if plots:
        lines += ["", "## Sweeps", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
    lines += ["", "## Cases"]
    for case, rows in by_case(records):
        lines += ["", f"### {case_title(case)}", "", case_table(case, rows)]
    path = os.path.join(out_dir, RESULTS[plan.device])
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return [path] + plots
