"""The CPU memory probe: ``python -m benchmarks.probe CASE_JSON IMPL_KEY`` builds the case's inputs in this fresh
process, measures one run of the implementation (harness.measure_peak) and prints
``PROBE {"extra": ..., "warm": ...}``."""

import json
import sys

from .cases import impl_of
from .harness import Case, measure_peak
from .inputs import Inputs


def main(case_json: str, impl_key: str) -> None:
    case = Case.from_json(case_json)
    step = impl_of(case, impl_key).build(case, Inputs(case))
    print("PROBE " + json.dumps(measure_peak(step, case.device)), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
