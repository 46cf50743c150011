"""Options of the benchmark suite (benchmarks.run sets them) and its parametrization: one test per
(case, implementation) of the chosen plan, in the plan's order, so that the cases of one shape share inputs."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from . import cases


def pytest_addoption(parser):
    group = parser.getgroup("selpo benchmarks")
    group.addoption("--bench-plan", default="full", choices=("full", "quick"), help="sizes: full or quick")
    group.addoption("--bench-device", default="cpu", choices=("cpu", "cuda"))
    group.addoption("--bench-records", default=None, help="JSON-lines file each test appends its record to")
    group.addoption("--bench-cases", default="", help="comma-separated substrings of the case ids to run")
    group.addoption("--bench-impls", default="", help="comma-separated implementation keys to run")
    group.addoption("--bench-budget-gib", type=float, default=None,
                    help="memory an implementation may need (default: 60%% of RAM, 85%% of GPU memory)")


def pytest_generate_tests(metafunc):
    if {"case", "impl"} <= set(metafunc.fixturenames):
        option = metafunc.config.getoption
        plan = cases.plan(option("--bench-plan"), option("--bench-device"))
        items = cases.selected(plan, option("--bench-cases"), option("--bench-impls"))
        metafunc.parametrize(("case", "impl"), items, ids=[f"{case.id}:{impl.key}" for case, impl in items])


def default_budget(device: str) -> float:
    if device == "cuda":
        return 0.85 * torch.cuda.get_device_properties(0).total_memory
    return 0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.fixture(scope="session")
def bench(request):
    option = request.config.getoption
    if option("--bench-records") is None:
        raise pytest.UsageError("--bench-records is required (run the suite with python -m benchmarks.run)")
    budget = option("--bench-budget-gib")
    device = option("--bench-device")
    if device == "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise pytest.UsageError("TRITON_INTERPRET is set: every Triton kernel would run in the interpreter, "
                                "so the GPU timings would mean nothing")
    return SimpleNamespace(records=option("--bench-records"), device=device,
                           budget=budget * 2**30 if budget else default_budget(device))
