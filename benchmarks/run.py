"""Runs the whole benchmark suite and writes its report:

    python -m benchmarks.run                 # CPU, full size: benchmarks/RESULTS.md, sweep-*-cpu.png
    python -m benchmarks.run --device cuda   # GPU (bfloat16):  benchmarks/RESULTS-cuda.md, sweep-*-cuda.png
    python -m benchmarks.run --quick         # toy sizes, to check the suite: benchmarks/quick/
    python -m benchmarks.run --device cuda --cases=A --out O --log O/bench.log   # then, adding to its records:
    python -m benchmarks.run --device cuda --cases=B --out O --log O/bench.log --append

from the repository root, after ``pip install -e '.[bench]'``. The suite itself is pytest-benchmark tests
(benchmarks/bench_suite.py) run in a subprocess; each appends a record to results-<device>.jsonl, which this
turns into the report. The exit code is pytest's: non-zero when one of selpo's implementations failed or was wrong.
With ``--log``, pytest's own output goes to that file and one line per (case, implementation) is printed (and
flushed) as its test ends, so that a run stopped at a time limit has shown every result it had; ``--append`` keeps
the records already in the output folder (cases run in the order of the calls: benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from importlib import metadata

import torch

from . import report
from .cases import plan as get_plan
from .harness import REPO, read_records

PACKAGES = ("torch", "triton", "selpo", "cut-cross-entropy", "liger-kernel", "trl", "pytest-benchmark", "numpy")


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_device(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy sizes (CI): checks the suite, measures nothing")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", help="folder of the report (default: benchmarks/, or benchmarks/quick/ with --quick)")
    parser.add_argument("--cases", default="",
                        help="run only the cases whose id contains one of these (comma-separated)")
    parser.add_argument("--impls", default="", help="run only these implementation keys (comma-separated)")
    parser.add_argument("--from-records", action="store_true",
                        help="run nothing: write the report from the records already in the output folder "
                             "(those of a run that was stopped, say)")
    parser.add_argument("--append", action="store_true",
                        help="keep the records already in the output folder and add this run's; the report covers "
                             "them all (to run cases in an order of your own, one call per group)")
    parser.add_argument("--log", help="write pytest's output (its tables, failures) to this file, appending, and print "
                                      "instead one line per (case, implementation) as soon as its test ends")
    parser.add_argument("--budget-gib", type=float, help="memory one implementation may need (default: 60%% of RAM, "
                                                         "85%% of GPU memory); those needing more are n/a")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    plan = get_plan("quick" if args.quick else "full", args.device)
    out = os.path.abspath(args.out or os.path.join(REPO, "benchmarks", "quick" if args.quick else ""))
    os.makedirs(out, exist_ok=True)
    records = os.path.join(out, f"results-{args.device}.jsonl")
    if args.from_records:
        return write_report(records, args, plan, out, runtime="not known (report written from the records)")
    if os.path.exists(records) and not args.append:
        os.remove(records)
    # Every option is one "--name=value" word: pytest reads its command line before the suite's options are
    # known, and a separate value would count as a path. An empty one ("") is the repository root, whose
    # tests/conftest.py would then be loaded and switch Triton to its interpreter.
    command = [sys.executable, "-m", "pytest", os.path.join("benchmarks", "bench_suite.py"), "-p", "no:cacheprovider",
               "-q", f"--bench-plan={plan.name}", f"--bench-device={args.device}", f"--bench-records={records}",
               f"--bench-cases={args.cases}", f"--bench-impls={args.impls}", "--benchmark-sort=fullname",
               "--benchmark-columns=min,median,iqr,rounds"]
    if args.budget_gib:
        command.append(f"--bench-budget-gib={args.budget_gib}")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # timings of Triton's interpreter would mean nothing
    started = time.perf_counter()
    if args.log:
        with open(args.log, "a") as log, RecordPrinter(records):
            code = subprocess.call(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    else:
        code = subprocess.call(command, cwd=REPO, env=env)
    elapsed = time.perf_counter() - started
    return write_report(records, args, plan, out, runtime=f"{elapsed / 60:.1f} min") or code


def describe_record(r: dict) -> str:
    """One line of a record: its time, check and peak, and its ratios to the peers timed in alternation with it."""
    head = f"{r['case_id']} {r['impl']}:"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r['reason'][:300]}"
    parts = [f"median {r['median_s'] * 1e3:.3f} ms ({r['rounds']} rounds)"]
    if r["correct"] is not None:
        parts.append(f"{'correct' if r['correct'] else 'WRONG'} (error {r['error']:.2g}, tolerance {r['tol']:g})")
    if r["peak_bytes"] is not None:
        parts.append(f"peak {r['peak_bytes'] / 2**30:.3f} GiB")
    for other, p in (r.get("paired") or {}).items():
        if p.get("other_median_s"):
            parts.append(f"{p['median_s'] / p['other_median_s']:.3f}x {other} (alternating, {p['rounds']} rounds)")
        else:
            parts.append(f"{other} not paired: {p.get('reason', '?')}")
    return f"{head} " + ", ".join(parts)


class RecordPrinter:
    """While a suite runs: prints each record appended to ``path`` as one line, flushed (``describe_record``)."""

    def __init__(self, path: str, interval_s: float = 0.5):
        self.path, self.interval_s = path, interval_s
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()

    def watch(self) -> None:
        while not self.done.wait(self.interval_s):
            self.drain()
        self.drain()

    def drain(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next look
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            if line.strip():
                try:
                    print(describe_record(json.loads(line)), flush=True)
                except (ValueError, KeyError, TypeError) as e:
                    print(f"unreadable record ({type(e).__name__}: {e}): {line[:200]}", flush=True)


def write_report(records: str, args, plan, out: str, runtime: str) -> int:
    """Writes the report of ``records``; 1 (and writes nothing) when there is no record."""
    if not os.path.exists(records):
        print(f"no record was written ({records} is missing)", file=sys.stderr)
        return 1
    meta = {
        "device": describe_device(args.device),
        "versions": ", ".join(f"{p} {version(p)}" for p in PACKAGES) + f", Python {platform.python_version()}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.run " + " ".join(args.argv),
        "suite runtime": runtime,
    }
    for path in report.write(read_records(records), meta, plan, out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
