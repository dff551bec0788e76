"""Check the summary of ``SMOKE=1 bash benchmarks/gpu_check.sh``: every section filled, every probe OK.

The GPU check never stops at a failed step (a GPU session gets one call), so its exit code says nothing; CI runs the
smoke run as a step of its own and this script judges its summary::

    SMOKE=1 OUT=/tmp/smoke bash benchmarks/gpu_check.sh && python benchmarks/check_smoke.py /tmp/smoke/summary.md
"""

from __future__ import annotations

import sys
from pathlib import Path

SECTIONS = ("## Probes", "## DDP smoke test", "## pytest -k cuda", "## Accuracy", "## Throughput")
OK_PROBES = 8  # the probes and DDP steps that end in "-> OK" on a CPU


def problems(summary: str) -> list[str]:
    """What is missing or failed in a smoke run's summary.md (empty when it is complete)."""
    found = [f"no {section!r} section" for section in SECTIONS if section not in summary]
    probes = [line for line in summary.splitlines() if line.startswith(("probe ", "ddp "))]
    found += [f"failed: {line}" for line in probes if "FAIL" in line]
    passed = len([line for line in probes if line.endswith("-> OK")])
    if passed != OK_PROBES:
        found.append(f"{passed} probes OK, expected {OK_PROBES}")
    if "| mean |" not in summary:
        found.append("no accuracy table of the two data paths")
    if "| train, steady state (epochs 2-3) |" not in summary:
        found.append("no steady-state training row in the throughput table")
    return found


def main(argv: list[str]) -> int:
    """Print what is wrong with the summary named in ``argv`` and return 1, or say it is complete and return 0."""
    path = Path(argv[0] if argv else "gpu-check/summary.md")
    found = problems(path.read_text(encoding="utf-8")) if path.is_file() else [f"{path}: not found"]
    for problem in found:
        print(f"smoke check: {problem}")
    print(f"smoke check: {path} {'is complete' if not found else 'is incomplete'}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
