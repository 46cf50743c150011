"""The suite as pytest-benchmark tests, one per (case, implementation); ``python -m benchmarks.run`` runs it.

Each test first checks the implementation's outputs (and gradients) against float64 on the same inputs (this
run is also its first warmup), then measures its peak memory, then times it with ``benchmark.pedantic``, and
appends a record: a wrong result is recorded as such, never timed as if right; an implementation that cannot
run here is recorded as n/a with the reason. An error or a wrong result of selpo's own fails the test.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict

import pytest
import torch

from .cases import FAMILIES
from .harness import TOL, Record, Unavailable, measure_peak, probe_memory, sync
from .inputs import Inputs
from .reference import Float64

# The inputs and float64 results of the current shape, shared by its cases and implementations.
_SHAPE = {}


def shared(case):
    key = (case.n, case.d, case.v, case.dtype, case.device, case.seg_len, case.ratio)
    if _SHAPE.get("key") != key:
        _SHAPE.clear()
        gc.collect()
        if case.device == "cuda":
            torch.cuda.empty_cache()
        inputs = Inputs(case)
        _SHAPE.update(key=key, inputs=inputs, ref=Float64(inputs))
    return _SHAPE["inputs"], _SHAPE["ref"]


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def check(step, case, family, x, ref, record) -> None:
    outputs = step.run()
    sync(case.device)
    err = family.error(outputs, family.expected(case, x, ref), case, x)
    record.error, record.tol = err, TOL[case.dtype]
    record.correct = bool(err <= record.tol)
    del outputs
    step.clear()


def memory_need(case, impl, x) -> float:
    """Bytes ``impl`` needs at ``case``: the inputs and its [N, V] float32 buffers."""
    return FAMILIES[case.family].input_bytes(case, x) + impl.dense * case.n * case.v * 4 * (0.5 if case.mode == "fwd"
                                                                                             else 1)


def measure(case, impl, x, ref, record, request, bench) -> None:
    family = FAMILIES[case.family]
    if impl.key in case.skip:
        raise Unavailable("left out of this plan to keep it short; the same code runs in another case")
    need = memory_need(case, impl, x)
    if need > bench.budget:
        raise Unavailable(f"needs about {gib(need)} for its [N, V] logits, over the {gib(bench.budget)} budget")
    torch._dynamo.reset()  # every compiled implementation starts with a fresh cache (and recompile limit)
    step = impl.build(case, x)
    if impl.role == "floor":
        step.run()  # warmup: a floor has no output to check, nor memory beyond its buffers
    else:
        check(step, case, family, x, ref, record)
        memory = measure_peak(step, "cuda") if case.device == "cuda" else probe_memory(case, impl.key)
        record.peak_bytes = family.input_bytes(case, x) + memory["extra"]
        record.workspace_bytes = memory["extra"] - family.kept_bytes(case, x)
        record.memory_note = "" if memory["warm"] else "cold: the process's first run, one-time costs included"

    def setup():
        step.prepare()
        sync(case.device)

    def target():
        step.timed()
        sync(case.device)

    benchmark = request.getfixturevalue("benchmark")
    benchmark.pedantic(target, setup=setup, rounds=case.rounds, warmup_rounds=case.warmup)
    stats = benchmark.stats.stats
    record.median_s, record.iqr_s, record.min_s, record.rounds = stats.median, stats.iqr, stats.min, stats.rounds
    benchmark.extra_info.update(correct=record.correct, error=record.error, peak_bytes=record.peak_bytes,
                                workspace_bytes=record.workspace_bytes)
    step.clear()
    if impl.key == case.paired_impl and record.correct:
        others = {i.key: i for i in family.impls(case)}
        for key in case.paired:
            record.paired[key] = alternate(case, step, others[key], x, bench)


def timed_once(step, device) -> float:
    step.prepare()
    sync(device)
    start = time.perf_counter()
    step.timed()
    sync(device)
    seconds = time.perf_counter() - start
    step.clear()
    return seconds


def alternate(case, step, other, x, bench) -> dict:
    """Medians of ``step`` (selpo's) and of implementation ``other``, timed in alternation, ``case.paired_rounds``
    rounds each (A B, then B A, ...), after an untimed run of ``other``: a ratio of the two that a drift of
    the machine's speed during the run does not bias, as it can the ratio of two tests timed one after the
    other."""
    if other.key in case.skip or memory_need(case, other, x) > bench.budget:
        return {"reason": "not run here (left out of the plan, or over the memory budget)"}
    try:
        other_step = other.build(case, x)
    except Unavailable as e:
        return {"reason": str(e)}
    other_step.run()
    other_step.clear()
    times = {"ours": [], "other": []}
    for r in range(case.paired_rounds):
        order = ("ours", "other") if r % 2 == 0 else ("other", "ours")
        for name in order:
            times[name].append(timed_once(step if name == "ours" else other_step, case.device))
    return {"median_s": statistics.median(times["ours"]), "other_median_s": statistics.median(times["other"]),
            "rounds": case.paired_rounds}


def test_bench(case, impl, request, bench):
    record = Record(case=asdict(case), case_id=case.id, impl=impl.key, label=impl.label, role=impl.role)
    started = time.perf_counter()
    failure = None
    try:
        x, ref = shared(case)
        measure(case, impl, x, ref, record, request, bench)
    except Unavailable as e:
        record.status, record.reason = "n/a", str(e)
    except torch.OutOfMemoryError as e:
        record.status, record.reason = "n/a", f"out of memory: {str(e).splitlines()[0]}"
    except Exception as e:  # recorded for the report; selpo's own errors also fail the test
        record.status, record.reason = "error", f"{type(e).__name__}: {e}"
        failure = e
    finally:
        record.wall_s = time.perf_counter() - started
        record.append_to(bench.records)
        if case.device == "cuda":
            torch.cuda.empty_cache()
    if impl.role == "selpo" and failure is not None:
        raise failure
    if impl.role == "selpo" and record.correct is False:
        pytest.fail(f"{impl.key} differs from float64 by {record.error:.3g} (tolerance {record.tol:g})")
