"""The benchmark scripts still run: tiny settings, no timing asserted, results.md left alone (--no-save).

Speed goals are measured by the scripts themselves (benchmarks/results.md), never asserted in tests.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest
import torch

from conftest import REPO_ROOT, call_main, load_script

RESULTS = REPO_ROOT / "benchmarks" / "results.md"
# ResNet-18 at 32 px on 8 tiny JPEGs, two batches an epoch: each stage runs, nothing takes long.
TINY_BENCH = ("--device", "cpu", "--arch", "resnet18", "--img-size", "32", "--images", "8", "--classes", "2",
              "--batch-size", "4", "--width", "64", "--height", "48", "--worker-images", "4", "--no-save")
THROUGHPUT_HEADER = "stage | cores | baseline img/s"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/NAME.py as a module (loaded once), for its helpers or to call its ``main`` in this process."""
    if name != "bench":
        load_script("benchmarks/bench.py")  # the others import it as a sibling
    return load_script(f"benchmarks/{name}.py")


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The markdown table rows of a benchmark's output, keyed by their first cell."""
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def throughput_rows(stdout: str) -> dict[tuple[str, str], list[str]]:
    """bench.py's throughput table, keyed by (stage, cores): baseline, ours, ceiling, speed-up, efficiency."""
    lines = stdout[stdout.index(THROUGHPUT_HEADER):].split("\n\n")[0].splitlines()[2:]
    rows = {}
    for line in lines:
        stage, cores, *cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[stage, cores] = cells
    return rows


def assert_consistent(cells: list[str], with_baseline: bool = True) -> None:
    """Positive rates, and speed-up and efficiency that agree with them."""
    baseline, ours, ceiling, speedup, efficiency = cells
    assert float(ours) > 0 and float(ceiling) > 0
    assert float(efficiency) == pytest.approx(float(ours) / float(ceiling), rel=0.05, abs=0.01)
    if with_baseline:
        assert float(speedup.rstrip("x")) == pytest.approx(float(ours) / float(baseline), rel=0.05, abs=0.01)
    else:
        assert baseline == speedup == "-"


def test_bench_cpu_path_times_each_stage_against_the_reference_and_the_ceiling() -> None:
    before = RESULTS.read_text(encoding="utf-8")
    result = call_main(load_benchmark("bench").main, *TINY_BENCH, "--epochs", "2")  # the command line: the GPU check
    assert result.returncode == 0, result.stderr
    rows = throughput_rows(result.stdout)
    cores = f"all {len(os.sched_getaffinity(0))}" if hasattr(os, "sched_getaffinity") else f"all {os.cpu_count()}"
    stages = ["train, first epoch", "train, steady state (epoch 2)", "val, first epoch", "val, steady state (epoch 2)",
              "predict"]
    assert list(rows) == [(stage, cores) for stage in stages]
    for cells in rows.values():
        assert_consistent(cells)
    others = table_rows(result.stdout)
    for stage in ("decode + augment", "host-to-device", "model step", "ours, whole"):
        assert stage in others
    assert others["host-to-device"][1:] == ["-", "-"]  # the device is the host
    assert float(others["CPU ms per training image"][0]) > 0 and float(others["CPU ms per training image"][1]) > 0
    assert "img/s 2 workers feed (Colab's 2 vCPUs)" in others
    assert "resnet18 at 32 px, batch 4, 8 images of 64x48" in result.stdout and "cpu path" in result.stdout
    assert "cache none" in result.stdout
    assert RESULTS.read_text(encoding="utf-8") == before


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="--cpus needs os.sched_setaffinity (Linux)")
# The baseline is the reference notebook's loop, 2 loader workers whatever the cores: on one core PyTorch warns so.
@pytest.mark.filterwarnings("ignore:This DataLoader will create 2 worker processes:UserWarning")
def test_bench_runs_the_gpu_path_on_the_cpu_device_restricted_to_one_core() -> None:
    result = call_main(load_benchmark("bench").main, *TINY_BENCH, "--path", "gpu", "--cpus", "1", "--trainable-all-row")
    assert result.returncode == 0, result.stderr
    rows = throughput_rows(result.stdout)
    cores = f"1 of {len(os.sched_getaffinity(0))}"
    for stage in ("train, first epoch", "train, steady state (epoch 2)", "val, first epoch", "predict"):
        assert_consistent(rows[stage, cores])
    assert_consistent(rows["train --trainable all, steady state", cores], with_baseline=False)
    others = table_rows(result.stdout)
    for stage in ("read", "decode", "augment", "host-to-device", "model step", "ours, whole"):
        assert stage in others
    assert "gpu path" in result.stdout and "cache ram" in result.stdout
    assert f"cores: {cores} (workers 1" in result.stdout and "os.sched_setaffinity" in result.stdout


def test_bench_refuses_more_cores_than_it_may_use(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("bench")
    with pytest.raises(SystemExit):
        bench.parse_args(["--cpus", "all,100000"])
    assert "--cpus all,100000: '100000' is not 'all' or a core count" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity (Linux)")
def test_restricted_to_pins_the_process_and_torch_threads_then_restores_them() -> None:
    bench = load_benchmark("bench")
    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    with bench.restricted_to(1) as label:
        assert len(os.sched_getaffinity(0)) == 1 and torch.get_num_threads() == 1
        assert label == f"1 of {len(cores)}"
    assert os.sched_getaffinity(0) == cores and torch.get_num_threads() == threads


def test_restricted_to_says_where_it_cannot_restrict(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_benchmark("bench")
    monkeypatch.delattr(os, "sched_setaffinity", raising=False)
    with bench.restricted_to(1) as label:
        assert label.startswith("all ")
    assert "--cpus 1: this platform has no os.sched_setaffinity" in capsys.readouterr().out


def test_cpu_precision_measures_each_variant_against_fp32_and_the_reference() -> None:
    before = RESULTS.read_text(encoding="utf-8")
    result = call_main(load_benchmark("cpu_precision").main, "--arch", "resnet18", "--img-size", "32", "--batch-size",
                       "2", "--repeats", "1", "--classes", "3", "--variants", "fp32,bf16", "--no-save")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert list(rows)[1:] == ["reference", "fp32", "bf16"]
    assert rows["reference"][0] == "-" and rows["reference"][4] == "1.00x"
    assert rows["fp32"][3] == "1.00x"
    assert all(float(cell) > 0 for cell in rows["bf16"][:3])
    assert "native bf16:" in result.stdout
    assert RESULTS.read_text(encoding="utf-8") == before


def test_cpu_precision_refuses_an_unknown_variant() -> None:
    result = call_main(load_benchmark("cpu_precision").main, "--variants", "fp32,int4", "--no-save")
    assert result.returncode != 0
    assert "--variants fp32,int4: unknown int4" in result.stderr


def test_the_smoke_check_names_what_a_gpu_check_summary_lacks(tmp_path) -> None:
    """CI runs ``SMOKE=1 bash benchmarks/gpu_check.sh`` as its own step (it took 85 s of the suite) and
    ``benchmarks/check_smoke.py`` judges its summary, since the check never stops at a failed step."""
    check = load_benchmark("check_smoke")
    complete = "\n".join(["## Probes", *[f"probe {index} -> OK" for index in range(7)], "## DDP smoke test",
                           "ddp steps -> OK", "## pytest -k cuda", "## Accuracy of the two data paths", "| mean |",
                           "## Throughput", "| train, steady state (epochs 2-3) |"])
    assert check.problems(complete) == []
    broken = complete.replace("probe 3 -> OK", "probe 3 -> FAILED with ValueError").replace("## Throughput", "")
    assert check.problems(broken) == ["no '## Throughput' section", "failed: probe 3 -> FAILED with ValueError",
                                      "7 probes OK, expected 8"]
    (tmp_path / "summary.md").write_text(broken)
    assert check.main([str(tmp_path / "summary.md")]) == 1
    assert check.main([str(tmp_path / "absent.md")]) == 1
