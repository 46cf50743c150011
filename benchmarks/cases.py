"""The plans: which cases run, at which sizes, for each device, at full size or in the --quick mode.

CPU (float32) is sized for a 2-core, 24 GiB machine: the headline shape is the issue's (N=4096 tokens as 16
pairs of 128-token responses, D=576 and V=49152 as in SmolLM-135M), and the sweeps time fewer rounds with
fewer implementations. CUDA (bfloat16) uses Llama-3-8B's head (D=4096, V=128256) at N=16384 and sweeps N, V
and D around it. --quick runs every case and implementation at toy sizes, to check the suite, not to measure.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from . import family_logprobs, family_loss, family_scores
from .harness import Case

FAMILIES = {f.NAME: f for f in (family_logprobs, family_loss, family_scores)}

# The implementations a sweep point runs: selpo, the naive baseline, the floor and, on GPU, the fused peers
# (on CPU their torch.compile costs more than the point itself; the headline cases have them).
SWEEP_IMPLS = ("selpo-torch", "selpo-triton", "naive", "cce", "liger-flce", "trl-chunked", "floor")
CPU_SWEEP_IMPLS = ("selpo-torch", "naive", "floor")
# --quick on CPU compiles each torch.compile'd peer once or twice (in the run and in its memory probe), the
# slowest part of it: those that repeat a code path already run are left out.
QUICK_SKIP = {("linear_logprobs", "fwd"): ("naive-compile", "cce-compile"),
              ("selective_loss", "fwd+bwd"): ("naive-compile", "cce-compile", "cce-compile-sel")}


# Per headline case (family, mode): the selpo implementation whose numbers answer its targets, and the
# implementations those targets compare it with, on CPU and on CUDA.
CPU_PAIRED = {("linear_logprobs", "fwd"): ("selpo-torch", ("trl-chunked",)),
              ("linear_logprobs", "fwd+bwd"): ("selpo-torch", ("naive", "trl-chunked")),
              ("selective_loss", "fwd+bwd"): ("selpo-fused-torch", ("naive", "floor", "cce-compile-sel",
                                                                    "trl-chunked"))}
CUDA_PAIRED = {("linear_logprobs", "fwd"): ("selpo-triton", ("floor", "liger-flce", "cce", "trl-chunked")),
               ("linear_logprobs", "fwd+bwd"): ("selpo-triton", ("naive", "floor", "liger-flce", "trl-chunked")),
               ("selective_loss", "fwd+bwd"): ("selpo-fused-triton", ("naive", "floor", "cce-sel", "trl-chunked")),
               ("token_scores_topk", "select"): ("selpo-triton", ("floor",))}


@dataclass(frozen=True)
class Plan:
    """``headline`` is the shape the issue's targets are stated at; ``sweeps`` maps an axis ("N", "V", "D")
    to the fixed sizes of the forward+backward log-prob cases plotted along it, run with ``sweep_impls``;
    ``skip`` maps (family, mode) of a headline case to implementations left out (and reported so);
    ``paired`` maps (family, mode) of a headline case to (selpo's implementation, the implementations its
    targets compare it with), each timed again alternating with it for ``paired_rounds`` rounds;
    ``selpo`` is the backend whose numbers answer the targets on this device."""

    name: str
    device: str
    dtype: str
    headline: dict
    sweeps: dict
    sweep_values: dict
    selpo: str
    sweep_impls: tuple
    skip: dict
    rounds: int
    sweep_rounds: int
    warmup: int
    seg_len: int
    paired: dict
    paired_rounds: int

    def cases(self) -> list[Case]:
        base = Case(family="", mode="", dtype=self.dtype, device=self.device, rounds=self.rounds,
                    warmup=self.warmup, seg_len=self.seg_len, **self.headline)
        headline = [(family_logprobs.NAME, mode) for mode in family_logprobs.MODES]
        headline += [(family_loss.NAME, "fwd+bwd"), (family_scores.NAME, "select")]
        cases = [replace(base, family=f, mode=m, skip=self.skip.get((f, m), ()), paired_rounds=self.paired_rounds,
                         **dict(zip(("paired_impl", "paired"), self.paired.get((f, m), ("", ())))))
                 for f, m in headline]
        sweep = replace(base, family=family_logprobs.NAME, mode="fwd+bwd", rounds=self.sweep_rounds,
                        impls=self.sweep_impls)
        seen = {(c.family, c.mode, c.n, c.d, c.v) for c in cases}
        for axis, fixed in self.sweeps.items():
            for value in self.sweep_values[axis]:
                case = replace(sweep, **fixed, **{axis.lower(): value})
                key = (case.family, case.mode, case.n, case.d, case.v)
                if key not in seen:
                    seen.add(key)
                    cases.append(case)
        return cases


PLANS = {
    ("full", "cpu"): Plan(
        name="full", device="cpu", dtype="float32", headline=dict(n=4096, d=576, v=49152),
        sweeps={"N": dict(d=576, v=49152), "V": dict(n=512, d=576), "D": dict(n=1024, v=49152)},
        sweep_values={"N": (1024, 2048, 4096, 8192), "V": (32768, 49152, 131072, 151936, 262144),
                      "D": (576, 2048, 4096)},
        selpo="torch", sweep_impls=CPU_SWEEP_IMPLS, skip={}, rounds=3, sweep_rounds=1, warmup=0, seg_len=128,
        paired=CPU_PAIRED, paired_rounds=8),
    ("quick", "cpu"): Plan(
        name="quick", device="cpu", dtype="float32", headline=dict(n=512, d=64, v=4096),
        sweeps={"N": dict(d=64, v=4096), "V": dict(n=512, d=64)},
        sweep_values={"N": (256, 512), "V": (2048, 4096)},
        selpo="torch", sweep_impls=CPU_SWEEP_IMPLS, skip=QUICK_SKIP, rounds=2, sweep_rounds=1,
        warmup=0, seg_len=64, paired={("linear_logprobs", "fwd+bwd"): ("selpo-torch", ("naive",))},
        paired_rounds=2),
    ("full", "cuda"): Plan(
        name="full", device="cuda", dtype="bfloat16", headline=dict(n=16384, d=4096, v=128256),
        sweeps={"N": dict(d=4096, v=128256), "V": dict(n=16384, d=4096), "D": dict(n=16384, v=128256)},
        sweep_values={"N": (1024, 2048, 4096, 8192, 16384, 32768), "V": (32768, 49152, 128256, 151936, 262144),
                      "D": (576, 2048, 4096)},
        selpo="triton", sweep_impls=SWEEP_IMPLS, skip={}, rounds=10, sweep_rounds=5, warmup=2, seg_len=128,
        paired=CUDA_PAIRED, paired_rounds=10),
    ("quick", "cuda"): Plan(
        name="quick", device="cuda", dtype="bfloat16", headline=dict(n=2048, d=1024, v=32768),
        sweeps={"N": dict(d=1024, v=32768), "V": dict(n=2048, d=1024)},
        sweep_values={"N": (1024, 2048, 4096), "V": (16384, 32768, 65536)},
        selpo="triton", sweep_impls=SWEEP_IMPLS, skip={}, rounds=3, sweep_rounds=2, warmup=1, seg_len=128,
        paired=CUDA_PAIRED, paired_rounds=3),
}


def plan(name: str, device: str) -> Plan:
    return PLANS[(name, device)]


def selected(plan: Plan, cases_filter: str = "", impls_filter: str = ""):
    """[(case, impl)] in run order: the plan's cases whose id contains one of the comma-separated
    ``cases_filter`` substrings, each with its implementations (those named in ``impls_filter``, if given)."""
    case_subs = [s for s in cases_filter.split(",") if s]
    impl_keys = [s for s in impls_filter.split(",") if s]
    items = []
    for case in plan.cases():
        if case_subs and not any(s in case.id for s in case_subs):
            continue
        for impl in FAMILIES[case.family].impls(case):
            if (not case.impls or impl.key in case.impls) and (not impl_keys or impl.key in impl_keys):
                items.append((case, impl))
    return items


def impl_of(case: Case, key: str):
    return next(i for i in FAMILIES[case.family].impls(case) if i.key == key)
