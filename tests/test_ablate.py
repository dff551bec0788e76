"""scripts/ablate.py: recipes run as train.py subprocesses, one table (Markdown, CSV, chart) of what they gave.

One shared call trains a tiny recipe for one epoch and runs one that fails (its flag reaching train.py shows that a
recipe's flags do); a second call reuses the complete run. Mistakes in the command itself are checked in-process,
before anything trains.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from conftest import (
    TINY_TRAIN_FLAGS,
    CliResult,
    ColourData,
    assert_user_error,
    block_of,
    call_main,
    load_script,
    read_csv_rows,
    run_script,
)

SCRIPT = "scripts/ablate.py"
BATCHNORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class Ablation:
    """The shared call: its arguments, result, output folder, and what it wrote (read right after it ran)."""

    args: tuple[str, ...]
    result: CliResult
    output_dir: Path
    rows: dict[str, dict[str, str]]  # ablation.csv by recipe name
    markdown: str


def ablation_args(data: ColourData, output_dir: Path, *recipes: str) -> tuple[str, ...]:
    """An ablate.py command line: the tiny training flags for every run, one epoch."""
    return (*recipes, "--data-dir", str(data.root), "--epochs", "1", "--extra", shlex.join(TINY_TRAIN_FLAGS),
            "--output-dir", str(output_dir))


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config file of the recipes: train 1 epoch (ablate's --epochs says the same; its flags win)."""
    path = tmp_path_factory.mktemp("ablate-config") / "tiny.yaml"
    path.write_text("epochs: 3\npatience: 0\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ablation(small_data: ColourData, tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Ablation:
    """A tiny recipe (the config as it is) and one with an unknown --arch."""
    output_dir = tmp_path_factory.mktemp("ablation") / "out"
    args = ablation_args(small_data, output_dir, str(tiny_config), "name=broken --arch resnet7")
    result = run_script(SCRIPT, *args)
    rows = {row["recipe"]: row for row in read_csv_rows(output_dir / "ablation.csv")}
    return Ablation(args, result, output_dir, rows, (output_dir / "ablation.md").read_text(encoding="utf-8"))


def markdown_rows(markdown: str) -> dict[str, list[str]]:
    """The table rows of ablation.md, keyed by recipe name (without its backticks)."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def counted_parameters(state: dict[str, torch.Tensor], blocks: set[str] | None = None) -> int:
    """Elements of the state dict's parameters (BatchNorm buffers left out), in ``blocks`` or in all."""
    return sum(tensor.numel() for key, tensor in state.items()
               if not key.endswith(BATCHNORM_BUFFERS) and (blocks is None or block_of(key) in blocks))


# --------------------------------------------------------------------------- the shared call


def test_writes_one_row_per_recipe_in_the_markdown_the_csv_and_the_chart(ablation: Ablation) -> None:
    assert list(ablation.rows) == ["tiny", "broken"]
    assert list(markdown_rows(ablation.markdown)) == ["tiny", "broken"]
    assert "- machine: CPU " in ablation.markdown and f"torch {torch.__version__}" in ablation.markdown
    assert "- dataset: " in ablation.markdown and "- date: " in ablation.markdown
    for row in ablation.rows.values():  # each exact command is listed
        assert f"`{row['command']}`" in ablation.markdown
    with Image.open(ablation.output_dir / "ablation.png") as chart:
        assert chart.format == "PNG" and chart.height > 200
    assert "| `tiny` |" in ablation.result.stdout  # the table is printed too


def test_the_table_holds_what_the_run_wrote(ablation: Ablation) -> None:
    row = ablation.rows["tiny"]
    run_dir = Path(row["run_dir"])
    assert row["status"] == "trained"
    history = read_csv_rows(run_dir / "history.csv")
    assert float(row["val_acc"]) == float(history[int(row["best_epoch"]) - 1]["val_acc"])  # best.pt's epoch
    assert row["epochs_run"] == row["best_epoch"] == "1"  # ablate's --epochs 1 overrides the config's 3
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text(encoding="utf-8"))
    assert float(row["balanced_accuracy"]) == metrics["balanced_accuracy"]
    assert float(row["macro_f1"]) == metrics["macro_f1"]
    assert float(row["wall_seconds"]) > 0
    assert markdown_rows(ablation.markdown)["tiny"][0] == f"{float(row['val_acc']):.1%}"


def test_parameters_are_counted_from_the_checkpoint(ablation: Ablation) -> None:
    state = torch.load(Path(ablation.rows["tiny"]["run_dir"]) / "best.pt", weights_only=True)["model"]
    row = ablation.rows["tiny"]
    assert int(row["total_params"]) == counted_parameters(state)
    assert int(row["trainable_params"]) == counted_parameters(state, {"layer4", "fc"})  # train.py's default


def test_a_failed_recipe_gets_a_row_and_a_nonzero_exit_while_the_others_are_written(ablation: Ablation) -> None:
    assert ablation.result.returncode == 1, ablation.result.stderr
    broken = ablation.rows["broken"]
    assert broken["status"] == "failed" and broken["val_acc"] == ""
    assert broken["error"].startswith("error: --arch resnet7")
    assert markdown_rows(ablation.markdown)["broken"][0] == "**failed**"
    assert "`broken` failed: error: --arch resnet7" in ablation.markdown
    assert (ablation.output_dir / "logs" / "broken.log").is_file()


def test_running_again_reuses_the_complete_runs(ablation: Ablation, small_data: ColourData, tiny_config: Path) -> None:
    run_dir = Path(ablation.rows["tiny"]["run_dir"])
    written = {name: (run_dir / name).stat().st_mtime_ns for name in ("best.pt", "last.pt", "history.csv")}
    args = ablation_args(small_data, ablation.output_dir, str(tiny_config))  # the complete one
    again = call_main(load_script(SCRIPT).main, *args)  # in-process (the shared call ran the command line)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    rows = {row["recipe"]: row for row in read_csv_rows(ablation.output_dir / "ablation.csv")}
    assert list(rows) == ["tiny"]
    for name, row in rows.items():
        first = ablation.rows[name]
        assert row["status"] == "reused"
        assert {**row, "status": ""} == {**first, "status": ""}  # every number as the first call wrote it
    assert {name: (run_dir / name).stat().st_mtime_ns for name in written} == written  # nothing trained again
    assert "Reused complete runs of an earlier call" in (ablation.output_dir / "ablation.md").read_text()


# --------------------------------------------------------------------------- recipes and names


def test_a_recipe_is_named_by_its_config_and_flags_or_by_name() -> None:
    ablate = load_script(SCRIPT)
    config = "configs/sample.yaml"
    assert ablate.parse_recipe(f"{config} --img-size 48").name == "sample --img-size 48"
    assert ablate.parse_recipe("--trainable all --lr 1e-4").name == "--trainable all --lr 1e-4"
    named = ablate.parse_recipe(f"'name=small crops' {config} --img-size 48")
    assert (named.name, named.config, named.flags) == ("small crops", config, ("--img-size", "48"))


def test_run_folders_are_slugs_of_the_names_and_never_collide() -> None:
    ablate = load_script(SCRIPT)
    recipes = ablate.parse_recipes(["configs/sample.yaml --trainable layer4,fc", "--lr 1e-3", "--lr=1e-3",
                                    "name=logs --lr 1e-2"])
    assert [recipe.slug for recipe in recipes] == ["sample-trainable-layer4-fc", "lr-1e-3",
                                                   f"lr-1e-3-{ablate.name_hash('--lr=1e-3')}",
                                                   f"logs-{ablate.name_hash('logs')}"]


# --------------------------------------------------------------------------- mistakes in the command


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = call_main(load_script(SCRIPT).main, "configs/nope.yaml --img-size 48", "--output-dir", tmp_path / "out")
    assert_user_error(result, "recipe 'configs/nope.yaml --img-size 48'", "configs/nope.yaml: file not found")
    assert not (tmp_path / "out").exists()  # nothing was started


def test_no_recipes_is_one_line(tmp_path: Path) -> None:
    assert_user_error(call_main(load_script(SCRIPT).main, "--output-dir", tmp_path), "no recipes")


def test_an_output_dir_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    assert_user_error(call_main(load_script(SCRIPT).main, "configs/sample.yaml", "--output-dir", blocker),
                      f"--output-dir {blocker}: is a file")
    assert_user_error(call_main(load_script(SCRIPT).main, "configs/sample.yaml", "--output-dir", blocker / "out"),
                      f"--output-dir {blocker / 'out'}: cannot write there")


def test_flags_the_script_sets_itself_and_twice_given_recipes_are_refused(tmp_path: Path) -> None:
    main = load_script(SCRIPT).main
    assert_user_error(call_main(main, "configs/sample.yaml --output-dir x", "--output-dir", tmp_path),
                      "--output-dir is not allowed here")
    assert_user_error(call_main(main, "configs/sample.yaml", "--extra", "--overwrite --lr 1", "--output-dir", tmp_path),
                      "--overwrite is not allowed here", "--fresh")
    assert_user_error(call_main(main, "configs/sample.yaml", "configs/sample.yaml", "--output-dir", tmp_path),
                      "recipe 'sample' is given twice", "name=LABEL")


def test_a_row_reports_the_epoch_and_weights_best_pt_holds() -> None:
    best_of_history = load_script(SCRIPT).best_of_history
    rows = [{"epoch": "1", "val_acc": "0.5", "ema_val_acc": "0.2"},
            {"epoch": "2", "val_acc": "0.4", "ema_val_acc": "0.6"}]
    averaged_won, raw_won = SimpleNamespace(epoch=2, weights="ema"), SimpleNamespace(epoch=2, weights="raw")
    assert best_of_history(rows, averaged_won) == (0.6, 2, 2)  # --ema: the averaged weights won
    assert best_of_history(rows, raw_won) == (0.4, 2, 2)  # e.g. --monitor val_loss chose 2
    assert best_of_history(rows, None) == (0.5, 1, 2)  # no checkpoint to read: the best val accuracy
    assert best_of_history([{"epoch": "1", "val_acc": ""}], SimpleNamespace(epoch=1, weights="raw")) == (None, 1, 1)
