"""The benchmark harness, end to end at toy size: the suite's smallest cases through ``python -m benchmarks.run``
(pytest-benchmark timing, memory probes in subprocesses, the float64 check, a target's pair timed in alternation,
RESULTS.md and a plot), and the check's flagging of wrong outputs. The full suite is not part of the test run
(see benchmarks/README.md)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE = "linear_logprobs-fwd+bwd-N512-D64-V4096-float32"  # the --quick headline shape
SWEEP_POINT = "linear_logprobs-fwd+bwd-N512-D64-V2048-float32"  # a second V, so that a V plot is drawn


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--cases", f"{CASE},{SWEEP_POINT}",
                           "--impls", "selpo-torch,naive,floor,liger-flce", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results-cpu.jsonl") as f:
        records = {(r["case_id"], r["impl"]): r for r in map(json.loads, f)}
    return out, records


def test_records_hold_checked_timed_and_measured_runs(quick_run):
    _, records = quick_run
    n, v = 512, 4096
    for impl in ("selpo-torch", "naive"):
        r = records[(CASE, impl)]
        assert r["status"] == "ok" and r["correct"] is True and r["error"] < r["tol"]
        assert r["median_s"] > 0 and r["rounds"] == 2
    naive = records[(CASE, "naive")]
    # The naive path materializes [N, V] float32 logits: a real peak measurement cannot be smaller.
    assert naive["peak_bytes"] >= naive["workspace_bytes"] >= n * v * 4
    assert records[(CASE, "floor")]["median_s"] > 0 and records[(CASE, "floor")]["correct"] is None
    liger = records[(CASE, "liger-flce")]
    assert liger["status"] == "n/a" and "CUDA" in liger["reason"] and liger["median_s"] is None
    # The target's pair, timed again in alternation in selpo's test; none in the other tests.
    paired = records[(CASE, "selpo-torch")]["paired"]
    assert list(paired) == ["naive"] and paired["naive"]["rounds"] == 2
    assert paired["naive"]["median_s"] > 0 and paired["naive"]["other_median_s"] > 0
    assert not records[(CASE, "naive")]["paired"] and not records[(SWEEP_POINT, "selpo-torch")]["paired"]


def test_report_and_plot_are_written(quick_run):
    out, _ = quick_run
    text = (out / "RESULTS.md").read_text()
    assert "--quick run" in text and "## Targets" in text
    assert "linear_logprobs: forward+backward — N=512, D=64, V=4096" in text
    assert "| naive eager: logits, log_softmax, gather (`naive`) | yes (" in text
    assert "(`liger-flce`) | n/a: Liger's fused linear cross-entropy is a Triton kernel" in text
    assert "![sweep-V-cpu.png](sweep-V-cpu.png)" in text
    target = next(line for line in text.splitlines() if "forward+backward, selpo-torch: time ≤ 1.0× naive" in line)
    assert "(alternating rounds; the two tests one after the other: " in target
    assert (out / "sweep-V-cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def benchmarks_pkg(monkeypatch):
    # The repository's root holds kernels/ (selpo.kernels' source): while it is on sys.path, a first import of the
    # installed package `kernels` (transformers imports it lazily) would find and cache that folder instead.
    if importlib.util.find_spec("kernels") is not None:
        importlib.import_module("kernels")
    monkeypatch.syspath_prepend(REPO)
    from benchmarks import cases, harness, inputs, reference, report

    return cases, harness, inputs, reference, report


def run_checked(benchmarks_pkg, family, mode, impl):
    cases, harness, inputs, reference, _ = benchmarks_pkg
    case = harness.Case(family=family, mode=mode, n=64, d=16, v=96, dtype="float32", device="cpu", rounds=1,
                        seg_len=16)
    x = inputs.Inputs(case)
    outputs = cases.impl_of(case, impl).build(case, x).run()
    fam = cases.FAMILIES[family]
    expect = fam.expected(case, x, reference.Float64(x))
    return fam, case, x, outputs, expect


def test_wrong_gradient_is_flagged(benchmarks_pkg):
    fam, case, x, outputs, expect = run_checked(benchmarks_pkg, "linear_logprobs", "fwd+bwd", "naive")
    tol = benchmarks_pkg[1].TOL["float32"]
    assert fam.error(outputs, expect, case, x) < tol
    outputs["grad_weight"][3, 5] += 1e-2 * float(expect["grad_weight"].abs().max())
    assert fam.error(outputs, expect, case, x) > tol
    outputs["logp"] = outputs["logp"][:-1]
    assert fam.error(outputs, expect, case, x) == float("inf")


def test_wrong_selection_is_flagged(benchmarks_pkg):
    fam, case, x, outputs, expect = run_checked(benchmarks_pkg, "token_scores_topk", "select", "naive-loop")
    tol = benchmarks_pkg[1].TOL["float32"]
    assert fam.error(outputs, expect, case, x) < tol
    mask = outputs["mask"].clone()
    picked, left = torch.nonzero(mask[:16]).squeeze(1), torch.nonzero(~mask[:16]).squeeze(1)
    mask[picked[0]], mask[left[0]] = False, True  # same count, one token swapped for a worse one
    assert fam.error({**outputs, "mask": mask}, expect, case, x) > tol
    mask[left[1]] = True  # one token too many
    assert fam.error({**outputs, "mask": mask}, expect, case, x) == float("inf")


def test_wrong_result_is_shown_as_wrong(benchmarks_pkg):
    report = benchmarks_pkg[4]
    assert report.fmt_correct({"status": "ok", "correct": False, "error": 0.25, "tol": 1e-4}).startswith("**NO**")
    assert report.fmt_correct({"status": "n/a", "reason": "why"}) == "n/a: why"


def test_dpo_and_lora_steps_against_trl_run_at_toy_size(tmp_path):
    """benchmarks/training_step.py's DPO and LoRA parts end to end on the tiny model: selpo's trainer and TRL's
    DPOTrainer each take their steps (on the same token ids, which the benchmark checks before timing; in the LoRA
    part both training the same PEFT adapter) in fresh processes, two each for the times, and the report holds both
    parts, timed and measured, with and without checkpointing (70 s on 2 cores)."""
    out = tmp_path / "RESULTS-step.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.training_step", "--part", "dpo,lora", "--tiny", "--out",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "## SePO step" not in text
    dpo_heading = "## DPO step: selpo's trainer against TRL's DPOTrainer"
    lora_heading = "## LoRA DPO step: selpo's trainer against TRL's DPOTrainer, the same adapter"
    assert text.index(dpo_heading) < text.index(lora_heading)
    sections = {"dpo": text[text.index(dpo_heading):text.index(lora_heading)], "lora": text[text.index(lora_heading):]}
    assert "Both train the same LoRA adapter, through PEFT (rank 16, alpha 32" in sections["lora"]
    trained = re.search(r"Parameters trained: selpo trainer, DPO ([\d,]+), TRL DPOTrainer ([\d,]+)\.",
                        sections["lora"])
    # the same adapter on both: rank 16 on the tiny Llama's 2 layers of 4 attention projections (32 -> 32) and 3 MLP
    # projections (32 <-> 64), nothing else
    assert trained and trained.group(1) == trained.group(2) == f"{2 * 16 * (4 * (32 + 32) + 3 * (32 + 64)):,}"
    for section in sections.values():
        assert "median of 2 steps from two fresh processes per variant, run in the order A B, B A" in section
        rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in section.splitlines()
                if line.startswith(("| selpo trainer", "| TRL DPOTrainer"))]
        assert [(r[0], r[1]) for r in rows] == [
            ("selpo trainer, DPO", "stored"), ("TRL DPOTrainer", "stored"),
            ("selpo trainer, DPO", "recomputed (checkpointing)"), ("TRL DPOTrainer", "recomputed (checkpointing)")]
        for r in rows:
            assert float(r[2].removesuffix(" s")) > 0 and float(r[4].removesuffix(" MiB")) > 0
            if r[0] == "TRL DPOTrainer":
                assert r[3] == r[5] == "1.00×"


def test_step_times_come_from_two_processes_per_variant_in_alternation(benchmarks_pkg, monkeypatch):
    """training_step.run_all on CPU: within each (part, activations) group the variants' timing processes run
    A B then B A, each variant's median is over both processes' steps, and its peaks come from one mapped run."""
    from benchmarks import training_step

    calls = []

    def fake(job, env):
        mapped = "MALLOC_MMAP_THRESHOLD_" in env
        calls.append((job["variant"], job["checkpointing"], mapped))
        if mapped:
            return {"median_s": -1.0, "times_s": [-1.0], "peak_bytes": 7, "peak_extra_bytes": 3}
        base = {"selpo": 1.0, "trl": 10.0}[job["variant"]]
        return {"times_s": [base + sum(1 for c in calls if c[0] == job["variant"] and not c[2])]}

    monkeypatch.setattr(training_step, "measure_in_subprocess", fake)
    size = training_step.Size(rounds=1)
    results = training_step.run_all(training_step.jobs(["dpo"], "cpu", size))
    timing = [(v, ckpt) for v, ckpt, mapped in calls if not mapped]
    assert timing == [("selpo", False), ("trl", False), ("trl", False), ("selpo", False),
                      ("selpo", True), ("trl", True), ("trl", True), ("selpo", True)]
    selpo = results[0]
    assert selpo["variant"] == "selpo" and selpo["times_s"] == [2.0, 3.0] and selpo["median_s"] == 2.5
    assert selpo["peak_bytes"] == 7 and selpo["peak_extra_bytes"] == 3
    assert sum(mapped for _, _, mapped in calls) == len(results) == 4


def test_a_failed_step_job_on_a_gpu_is_reported_and_the_others_kept(benchmarks_pkg, monkeypatch, tmp_path):
    """On CUDA (a lease's minutes) a job that fails leaves the others' results and is named in the report, whose
    ratios to a missing baseline read "-" (on an H200, 2026-12-04, one failed variant lost the part's finished ones)."""
    from benchmarks import training_step

    def fake(job, env):
        if job["variant"] == "trl-liger":
            raise RuntimeError("lora words lora trl-liger failed:\nImportError: liger-kernel is not available")
        if job["variant"] == "trl" and job["checkpointing"]:
            raise RuntimeError("lora words lora trl failed:\nRuntimeError: out of memory")
        return {"times_s": [1.0], "peak_bytes": 2**30, "peak_extra_bytes": 2**29, "trained_params": 5}

    monkeypatch.setattr(training_step, "measure_in_subprocess", fake)
    size = training_step.Size(rounds=1)
    results = training_step.run_all(training_step.jobs(["lora"], "cuda", size))
    assert [(r["variant"], r["checkpointing"], "failed" in r) for r in results] == [
        ("selpo", False, False), ("trl", False, False), ("trl-liger", False, True),
        ("selpo", True, False), ("trl", True, True), ("trl-liger", True, True)]
    out = tmp_path / "report.md"
    monkeypatch.setattr(training_step.torch.cuda, "get_device_name", lambda: "a GPU")
    training_step.write_report(results, "cuda", size, "cmd", str(out), {})
    text = out.read_text()
    assert "failed, left out: trl-liger (ImportError: liger-kernel is not available)" in text
    assert "failed, left out: trl, checkpointing (RuntimeError: out of memory)" in text
    rows = [line for line in text.splitlines() if line.startswith("| selpo")]
    assert len(rows) == 2 and "1.00×" in rows[0] and rows[1].count("| - |") == 3


def _number(cell):
    """The number a table cell starts with ("1,656", "0.03 s", "453 MiB")."""
    return float(cell.split()[0].replace(",", ""))


def _table_rows(text, heading):
    """The rows of the markdown table under ``heading``, as lists of cells."""
    section = text.split(heading + "\n", 1)[1].split("\n### ", 1)[0]
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| variant")]


def test_layouts_part_runs_at_toy_size(tmp_path):
    """benchmarks/training_step.py's layouts part end to end on the tiny model and the dialogue set: selpo's DPO and
    SePO steps in each layout (two processes per method, TRL's DPOTrainer in one between them, peaks from mapped
    ones), written into an existing report beside its other sections, which are kept. The body's tokens and
    attention products fall from padded to packed to shared; TRL computes the padded tokens (it runs padded: TRL
    1.16 turns ``padding_free=True`` down, and the report says so)."""
    out = tmp_path / "RESULTS-step.md"
    kept = "## DPO step: selpo's trainer against TRL's DPOTrainer\n\n- run: earlier\n\n| a table |"
    out.write_text(f"# old title\n\n{kept}\n")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.training_step", "--part", "layouts", "--tiny",
                           "--data", "dialogue", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert kept in text and text.index(kept) < text.index("## Token layouts: padded against packed against shared")
    assert "## SePO step" not in text and "old title" not in text and "### sentiment" not in text
    assert "median of 2 steps per layout from two fresh processes per group" in text
    assert "asked for `padding_free=True`, answered: \"" in text and "it ran padded." in text
    for heading, variants in (("### dialogue, DPO", ["padded", "packed", "shared", "trl"]),
                              ("### dialogue, SePO", ["padded", "packed", "shared"])):
        rows = {r[0]: r for r in _table_rows(text, heading)}
        assert list(rows) == [f"selpo, {v}" if v != "trl" else "TRL DPOTrainer" for v in variants]
        for r in rows.values():
            assert _number(r[2]) > 0 and _number(r[4]) > 0  # timed, measured
        tokens = [_number(rows[f"selpo, {v}"][8]) for v in ("shared", "packed", "padded")]
        entries = [_number(rows[f"selpo, {v}"][10]) for v in ("shared", "packed", "padded")]
        assert tokens == sorted(set(tokens)) and entries == sorted(set(entries))
        assert rows["selpo, padded"][3] == rows["selpo, padded"][9] == "1.00×"
        if "TRL DPOTrainer" in rows:
            assert rows["TRL DPOTrainer"][1] == "recomputed (checkpointing)"
            assert rows["TRL DPOTrainer"][8] == rows["selpo, padded"][8]
    targets = text.split("### Targets", 1)[1]
    assert targets.count("dialogue, dpo: shared step's") == 2 and targets.count("dialogue, sepo: shared step's") == 2


def test_sentiment_micro_batch_is_the_packaged_data_tokenized(benchmarks_pkg, tmp_path):
    """The layouts part's other data set: the first rows of the packaged training data, as selpo's data stage
    tokenizes them (chat template, response ending with the template's end of turn)."""
    from benchmarks import training_step
    from selpo.data import default_data_path, load_preference_dataset
    from selpo.models import load_tokenizer

    size = training_step.tiny_size(str(tmp_path))
    tokenizer = load_tokenizer(size.model)
    pairs = training_step.step_pairs("sentiment", tokenizer, size)
    rows = load_preference_dataset(default_data_path("train"))
    assert len(pairs) == size.pairs and [p.row for p in pairs] == list(range(size.pairs))
    for pair, row in zip(pairs, rows):
        assert row["prompt"] in tokenizer.decode(pair.prompt_ids)
        assert tokenizer.decode(pair.chosen_ids) == row["chosen"] + "<|im_end|>\n"


def test_attention_check_rehearses_on_cpu(tmp_path):
    """The GPU check of the shared layout's attention paths (``--part attention``), rehearsed on CPU with the tiny
    model: padded and shared through SDPA in bf16 autocast agree within the check's tolerance, each timed; the
    flash-attn path is reported as not run."""
    out = tmp_path / "attention.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.training_step", "--part", "attention", "--device", "cpu",
                           "--tiny", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "flash-attn's path did not run: it runs on CUDA only, as compiled flex does." in text
    rows = {r[0]: r for r in (line.split(" | ") for line in text.splitlines() if line.startswith("| padded-sdpa")
                                                                                  or line.startswith("| shared-"))}
    assert list(rows) == ["| padded-sdpa", "| shared-sdpa"]
    assert all(r[2] == "yes" and float(r[4].removesuffix(" ms")) > 0 for r in rows.values())
    profiles = text.split("## One more step of each path under torch's profiler")[1]  # each path's operators
    assert "### padded-sdpa: " in profiles and "### shared-sdpa: " in profiles and profiles.count("aten::mm") == 2


def test_the_attention_check_runs_on_the_wide_random_model(benchmarks_pkg, tmp_path, monkeypatch):
    """``--wide`` builds the random Llama of ``WIDE_BODY`` (here made small) with the default model's tokenizer (here
    the tiny one) and checks the paths on it; the report names it; other parts refuse the flag."""
    import selpo.models
    from benchmarks import training_step
    from selpo.testing import TINY_BODY, tiny_tokenizer

    monkeypatch.setattr(training_step, "WIDE_BODY", {**TINY_BODY, "hidden_size": 48, "num_hidden_layers": 3})
    monkeypatch.setattr(selpo.models, "load_tokenizer", lambda name: tiny_tokenizer())
    out = tmp_path / "wide.md"
    monkeypatch.setattr(sys, "argv", ["training_step", "--part", "attention", "--device", "cpu", "--tiny", "--wide",
                                      "--out", str(out)])
    training_step.main()
    text = out.read_text()
    assert "- model: a random Llama (hidden_size 48, " in text and "num_hidden_layers 3" in text
    assert text.count(" | yes | ") == 2
    monkeypatch.setattr(sys, "argv", ["training_step", "--part", "dpo", "--wide"])
    with pytest.raises(SystemExit):
        training_step.main()


def test_the_profiles_gpu_busy_time_counts_overlapping_kernels_once(benchmarks_pkg):
    from benchmarks.training_step import covered

    assert covered([]) == 0
    assert covered([(5, 9), (0, 2), (1, 3), (6, 7), (8, 12), (20, 21)]) == 3 + 7 + 1  # [0,3], [5,12], [20,21]


def test_attention_check_fails_on_a_wrong_path(benchmarks_pkg, tmp_path, monkeypatch):
    """The check reads the log-probs: a shared path that attends wrongly (here, every block without its prompt)
    is outside the tolerance."""
    from benchmarks import training_step
    from selpo.data import packing

    real = packing._segments

    def without_context(kind, blocks):
        return real(kind, [(q0, q1, c0, c0) for q0, q1, c0, _ in blocks])

    monkeypatch.setattr(packing, "_segments", without_context)
    results = training_step.attention_check("cpu", replace(training_step.tiny_size(str(tmp_path)), rounds=1))
    assert [(r["path"], r["ok"]) for r in results] == [("padded-sdpa", True), ("shared-sdpa", False)]


def _write_metrics(folder, losses):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n"
                                                  for i, v in enumerate(losses)))


def test_train_check_takes_bf16_rounding_and_flags_more(benchmarks_pkg, tmp_path):
    """benchmarks/train_check.py, the GPU script's check of the triton run's first losses against the torch run's."""
    from benchmarks import train_check

    _write_metrics(tmp_path / "a" / "oracle", [0.6931, 0.70, 0.65, 0.1])
    _write_metrics(tmp_path / "b" / "oracle", [0.6931, 0.71, 0.66, 0.9])  # the 4th step is not compared
    _write_metrics(tmp_path / "a" / "train", [2.0, 1.0, 1.0])
    _write_metrics(tmp_path / "b" / "train", [2.1, 1.0, 1.0])  # 0.1 > 2^-5 * 2.1
    rows, ok = train_check.compare(tmp_path / "a", tmp_path / "b", ["oracle"], 3)
    assert ok and [r[-1] for r in rows] == ["ok"] * 3
    rows, ok = train_check.compare(tmp_path / "a", tmp_path / "b", ["oracle", "train"], 3)
    assert not ok and [r[-1] for r in rows] == ["ok"] * 3 + ["**NO**", "ok", "ok"]
    assert train_check.main([str(tmp_path / "a"), str(tmp_path / "b"), "--stages", "oracle", "--steps", "5"]) == 1


def _write_run(runs, name, pairs):
    """A finished run of `selpo compare` as compare_report reads it: eval's summary, samples, the config, and the
    stages' DONE records (data 1 s, the method's own stages 10 s each, train 20 s with a 300 MiB peak)."""
    run = runs / name
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "DONE.json").write_text("{}")
    for stage, seconds in (("data", 1), ("oracle", 10), ("score", 10), ("guidance", 10), ("train", 20)):
        (run / stage).mkdir()
        (run / stage / "DONE.json").write_text(json.dumps({"seconds": seconds, "summary": {"peak_memory_mib": 300}}))
    policy, initial = [p for p, _ in pairs], [i for _, i in pairs]
    results = {"initial": {"reward": sum(initial) / len(initial)},
               "policy": {"reward": sum(policy) / len(policy), "kl": 0.5, "implicit_accuracy": 0.6,
                          "likelihood_accuracy": 0.7, "token_share": 1.0}}
    (run / "eval" / "results.json").write_text(json.dumps(results))
    (run / "eval" / "samples.jsonl").write_text("".join(
        json.dumps({"policy_reward": p, "initial_reward": i}) + "\n" for p, i in pairs))
    (run / "config.toml").write_text('model = "default"\nprecision = "bf16"\nbackend = "triton"\n[data]\n'
                                     'max_train_pairs = 320\n[train]\nepochs = 1\nbatch_size = 8\nlr = 1e-05\n'
                                     '[eval]\nprompts = 80\n')


def test_compare_report_gives_each_gain_its_paired_standard_error(benchmarks_pkg, tmp_path):
    from benchmarks import compare_report

    runs = tmp_path / "compare" / "runs"
    _write_run(runs, "dpo-dpo.beta=0.1", [(0.5, 0.1), (0.6, 0.1), (0.7, 0.1), (0.4, 0.1)])  # gain 0.45
    _write_run(runs, "simpo-simpo.beta=2", [(0.2, 0.1), (0.0, 0.1), (0.2, 0.1), (0.0, 0.1)])  # gain 0.0
    _write_run(runs, "sepo-sepo.gamma=2", [(0.1, 0.1), (0.3, 0.1)])
    (runs / "sepo-sepo.gamma=1" / "eval").mkdir(parents=True)  # eval not finished: left out
    rows, unfinished = compare_report.run_rows(tmp_path / "compare")
    assert unfinished == 1
    assert [r["run"] for r in rows] == ["dpo-dpo.beta=0.1", "sepo-sepo.gamma=2", "simpo-simpo.beta=2"]
    dpo, _, simpo = rows
    assert dpo["gain"] == pytest.approx(0.45) and dpo["se"] == pytest.approx(0.12909944 / 2)  # sd(diffs) / sqrt(4)
    assert dpo["z"] > 3 and simpo["gain"] == pytest.approx(0.0) and simpo["z"] == pytest.approx(0.0)
    text = compare_report.report(tmp_path / "compare", tmp_path / "C.md", tmp_path / "f.png", "selpo compare")
    assert "Separated from the initial model: dpo-dpo.beta=0.1." in text and "1 not finished" in text
    # the costs from each run's own records: no results.json (a comparison stopped at its limit, as on a GPU lease)
    assert not (tmp_path / "compare" / "results.json").exists()
    table = {line.split(" | ")[0].strip("| "): line.split(" | ")[-3:] for line in text.splitlines()
             if line.startswith(("| dpo", "| sepo", "| simpo"))}
    assert table == {"dpo": ["20", "0", "300 |"], "sepo": ["20", "20", "300 |"], "simpo": ["20", "0", "300 |"]}
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_report_names_a_comparison_that_made_no_run(benchmarks_pkg, tmp_path):
    """A comparison stopped before its first run has no runs folder (seen on a GPU lease): a clear stop."""
    from benchmarks import compare_report

    (tmp_path / "compare").mkdir()
    assert compare_report.run_rows(tmp_path / "compare") == ([], 0)
    with pytest.raises(SystemExit, match="no run under .* has finished its eval"):
        compare_report.report(tmp_path / "compare", tmp_path / "C.md", tmp_path / "f.png", "selpo compare")


@pytest.mark.parametrize(("family", "mode", "impl"), [
    ("linear_logprobs", "fwd", "trl-chunked"), ("linear_logprobs", "fwd+bwd", "trl-chunked"),
    ("selective_loss", "fwd+bwd", "trl-chunked"), ("selective_loss", "fwd+bwd", "trl-chunked-sel")])
def test_trl_fused_head_peer_matches_float64(benchmarks_pkg, family, mode, impl):
    """TRL's fused head as the suite calls it: log-probs (or the SePO loss) and both gradients within the float32
    tolerance of the float64 reference, so that a wrong argument to ChunkedLogProbFunction fails here."""
    fam, case, x, outputs, expect = run_checked(benchmarks_pkg, family, mode, impl)
    assert set(expect) <= set(outputs)
    assert fam.error(outputs, expect, case, x) < benchmarks_pkg[1].TOL["float32"]


def test_trl_fused_head_peer_leaves_ignored_rows_out(benchmarks_pkg):
    """With targets of -100 (the selected-only SePO variant), only the other rows go through TRL's head: their
    log-probs are the reference's, the ignored rows' are 0 and get no gradient."""
    from benchmarks import peers

    cases, harness, inputs, reference, _ = benchmarks_pkg
    case = harness.Case(family="linear_logprobs", mode="fwd+bwd", n=64, d=16, v=96, dtype="float32", device="cpu",
                        rounds=1, seg_len=16)
    x = inputs.Inputs(case)
    hidden = x.hidden.clone().requires_grad_()
    logp = peers.trl_chunked_logprobs()(hidden, x.weight, torch.where(x.mask, x.targets, -100))
    logp.sum().backward()
    ref = reference.Float64(x).logp()
    assert torch.allclose(logp[x.mask].double(), ref[x.mask], atol=1e-5) and not logp[~x.mask].any()
    assert not hidden.grad[~x.mask].any() and hidden.grad[x.mask].abs().sum() > 0


def copy_of_the_working_tree(dest) -> None:
    """What a GPU lease's call sends: the tracked files and the untracked ones git does not ignore."""
    import shutil

    try:
        names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                               capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # no git: the tree less what .gitignore names
        shutil.copytree(REPO, dest, symlinks=True, ignore=shutil.ignore_patterns(
            ".git", ".venv*", "build", "runs", "__pycache__", "*.egg-info", ".*cache", ".hypothesis", ".benchmarks",
            ".gpu1", ".gpu2"))
        return
    for name in filter(None, names):
        if os.path.lexists(os.path.join(REPO, name)):  # a tracked file deleted in the working tree is left out
            os.makedirs(os.path.dirname(os.path.join(dest, name)), exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), os.path.join(dest, name), follow_symlinks=False)


@pytest.mark.slow  # about 2 minutes of CPU (3 on the 2-core machine beside other work): .ci/run's `pytest -m slow`
def test_gpu_check_rehearsal_runs_every_step(tmp_path):
    """benchmarks/gpu_check.sh with GPU_CHECK_REHEARSAL=1 on a copy of the working tree, as a lease runs it: the
    selpo/kernels link, the carried wheels installed offline where not importable, the dL/dhidden path, the three
    suite calls (the SePO loss case first, records appended, one line per implementation), the ledger's --measure
    and the op tests under xdist, each exiting 0, everything written under the output folder, the link removed."""
    tree, out = tmp_path / "tree", tmp_path / "out"
    copy_of_the_working_tree(tree)
    assert not (tree / "selpo" / "kernels").exists()
    env = dict(os.environ, GPU_CHECK_REHEARSAL="1", GPU_CHECK_WORK=str(tmp_path / "work"),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("SELPO_GPU_IMPLS", None)
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out)], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert sorted(p.name for p in out.iterdir()) == ["RESULTS.md", "bench.log", "gpu-check.log", "ledger.md",
                                                     "results-cpu.jsonl", "tests-cpu.log"]
    assert "dL/dhidden path on cpu: " in log and "linked selpo/kernels -> ../kernels" in log
    assert "exit codes: setup:0 SePO loss:0 log-probs forward+backward:0 log-probs forward:0 ledger:0 op tests:0" in log
    assert "exit codes: setup:0 SePO loss:0" in (out / "gpu-check.log").read_text()
    assert not (tree / "selpo" / "kernels").exists()
    records = [json.loads(line) for line in (out / "results-cpu.jsonl").read_text().splitlines()]
    order = list(dict.fromkeys(r["case_id"] for r in records))
    assert order == [f"{family}-N512-D64-V4096-float32" for family in
                     ("selective_loss-fwd+bwd", "linear_logprobs-fwd+bwd", "linear_logprobs-fwd")]
    impls = {(r["case_id"].split("-")[0], r["impl"]) for r in records}
    assert {("selective_loss", k) for k in ("selpo-fused-triton", "naive", "cce", "cce-sel", "trl-chunked",
                                             "trl-chunked-sel", "floor")} <= impls
    assert {("linear_logprobs", k) for k in ("selpo-triton", "naive", "liger-flce", "cce", "trl-chunked",
                                              "floor")} <= impls
    assert not {k for _, k in impls} & {"selpo-torch", "selpo-fused-torch", "naive-compile", "cce-compile",
                                          "liger-simpo"}
    for r in records:  # each printed as its test ended
        assert f"{r['case_id']} {r['impl']}: " in log
    assert all(r["status"] == "ok" for r in records if r["impl"] in ("naive", "trl-chunked", "floor"))
    assert "passed" in (out / "tests-cpu.log").read_text() and "| SePO loss" in (out / "ledger.md").read_text()


def test_gpu_check_runs_only_the_chosen_steps(tmp_path):
    """GPU_CHECK_STEPS empty: the set-up alone (a lease whose first call only installs the peers for the next)."""
    tree, out = tmp_path / "tree", tmp_path / "out"
    copy_of_the_working_tree(tree)
    env = dict(os.environ, GPU_CHECK_REHEARSAL="1", GPU_CHECK_WORK=str(tmp_path / "work"), GPU_CHECK_STEPS="",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out)], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert log.rstrip().endswith("exit codes: setup:0") and "== SePO loss" not in log
    assert sorted(p.name for p in out.iterdir()) == ["gpu-check.log"]


def test_trl_fused_head_is_selectable_and_paired(benchmarks_pkg):
    """`--impls trl-chunked,trl-chunked-sel` picks TRL's fused head in each headline case it runs in, and selpo's
    implementation that answers a target against it times it in alternation, on CPU and on CUDA."""
    cases = benchmarks_pkg[0]
    items = cases.selected(cases.plan("full", "cpu"), "N4096-D576-V49152", "trl-chunked,trl-chunked-sel")
    assert sorted((c.family, c.mode, i.key) for c, i in items) == [
        ("linear_logprobs", "fwd", "trl-chunked"), ("linear_logprobs", "fwd+bwd", "trl-chunked"),
        ("selective_loss", "fwd+bwd", "trl-chunked"), ("selective_loss", "fwd+bwd", "trl-chunked-sel")]
    for device in ("cpu", "cuda"):
        paired = {(c.family, c.mode) for c in cases.plan("full", device).cases() if "trl-chunked" in c.paired}
        assert paired == {("linear_logprobs", "fwd"), ("linear_logprobs", "fwd+bwd"), ("selective_loss", "fwd+bwd")}


def test_the_recompute_check_times_the_four_ways(tmp_path):
    """``benchmarks/recompute_check.py`` on the tiny body with LoRA: a table of the stored, checkpointed,
    attention-keeping and own-forward checkpointed steps, each timed, the stored one the baseline."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.recompute_check", "--body", "tiny", "--lora", "--rows",
                           "2", "--length", "8", "--rounds", "1"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith(("| stored", "| checkpointed"))]
    assert [r[0] for r in rows] == ["| stored", "| checkpointed", "| checkpointed, attention kept",
                                    "| checkpointed, own forwards"]
    assert rows[0][2].startswith("1.00×") and all(float(r[1].removesuffix(" ms")) > 0 for r in rows)
    assert proc.stdout.startswith("tiny body + LoRA, 2 x 8 tokens, CPU")
