"""The benchmark scripts still run: tiny settings, no timing asserted, results.md left alone (--no-save).

Speed goals are measured by the scripts themselves (benchmarks/results.md), never asserted in tests.
"""

from __future__ import annotations

import pytest

from conftest import REPO_ROOT, run_script

RESULTS = REPO_ROOT / "benchmarks" / "results.md"


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The markdown table rows of a benchmark's output, keyed by their first cell."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_bench_prints_baseline_ours_and_ceiling_for_each_stage() -> None:
    before = RESULTS.read_text(encoding="utf-8")
    result = run_script("benchmarks/bench.py", "--device", "cpu", "--arch", "resnet18", "--img-size", "32",
                        "--images", "8", "--classes", "2", "--batch-size", "4", "--width", "64", "--height", "48",
                        "--host-images", "4", "--no-save")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    for stage in ("train", "val", "predict"):
        baseline, ours, ceiling, speedup, efficiency = rows[stage]
        assert float(baseline) > 0 and float(ours) > 0 and float(ceiling) > 0
        assert float(speedup.rstrip("x")) == pytest.approx(float(ours) / float(baseline), rel=0.05, abs=0.01)
        assert float(efficiency) == pytest.approx(float(ours) / float(ceiling), rel=0.05, abs=0.01)
    assert "host CPU ms per training image (load + augment)" in rows
    assert RESULTS.read_text(encoding="utf-8") == before


def test_cpu_precision_measures_each_variant_against_fp32_and_the_reference() -> None:
    before = RESULTS.read_text(encoding="utf-8")
    result = run_script("benchmarks/cpu_precision.py", "--arch", "resnet18", "--img-size", "32", "--batch-size", "2",
                        "--repeats", "1", "--classes", "3", "--variants", "fp32,bf16", "--no-save")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert list(rows)[1:] == ["reference", "fp32", "bf16"]
    assert rows["reference"][0] == "-" and rows["reference"][4] == "1.00x"
    assert rows["fp32"][3] == "1.00x"
    assert all(float(cell) > 0 for cell in rows["bf16"][:3])
    assert "native bf16:" in result.stdout
    assert RESULTS.read_text(encoding="utf-8") == before


def test_cpu_precision_refuses_an_unknown_variant() -> None:
    result = run_script("benchmarks/cpu_precision.py", "--variants", "fp32,int4", "--no-save")
    assert result.returncode != 0
    assert "--variants fp32,int4: unknown int4" in result.stderr
