"""utils.py: one-line user errors, arguments from a shell or a notebook, devices and worker counts, seeding and the
random state, config files, the checks before a write, atomic writes, and printing. How the scripts use them end to
end (a read-only output folder, a full disk, --help in a notebook) is in test_new_user_round3.py and
test_new_user_runs.py."""

from __future__ import annotations

import errno
import os
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import utils
from utils import (
    ArgumentParser,
    HelpShown,
    UserError,
    argument_list,
    atomic_torch_save,
    atomic_write_text,
    capture_rng_state,
    command_hint,
    counted,
    csv_text,
    describe_device,
    did_you_mean,
    exit_on_user_error,
    file_in_the_way,
    first_line,
    format_count,
    interactive_session,
    launched_as_script,
    load_yaml_config,
    pick_device,
    printable,
    progress_bar,
    refuse_files_in_the_way,
    refuse_unwritable_folder,
    resolve_workers,
    restore_rng_state,
    seed_everything,
    some_names,
    tensor_bytes,
    usable_cpu_count,
)


@pytest.fixture
def shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """As when a script runs from a shell: no IPython shell, no Python prompt."""
    monkeypatch.setitem(sys.modules, "IPython", None)
    monkeypatch.delattr(sys, "ps1", raising=False)


@pytest.fixture
def notebook(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in Jupyter: IPython is loaded and a shell runs."""
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: object()))


def run_as(monkeypatch: pytest.MonkeyPatch, main_file: str | None, *argv: str) -> None:
    """Make the running program look like ``python MAIN_FILE ARGV...`` (None: a notebook, whose ``__main__`` has no
    file)."""
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__file__=main_file))
    monkeypatch.setattr(sys, "argv", [main_file or "ipykernel_launcher.py", *argv])


# --------------------------------------------------------------------------- one-line user errors


def refuse(path: str) -> None:
    raise UserError(f"--data-dir {path}: folder not found")


def test_a_user_error_from_a_shell_is_one_line_and_exit_code_2(shell: None, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        exit_on_user_error(refuse)("photos")

    assert exited.value.code == 2
    assert exited.value.__suppress_context__  # Python prints no "During handling ..." chain
    assert capsys.readouterr().err == "error: --data-dir photos: folder not found\n"


def test_a_user_error_in_a_notebook_is_raised_and_shown_as_its_one_line(notebook: None) -> None:
    with pytest.raises(UserError) as raised:
        exit_on_user_error(refuse)("photos")  # exiting would stop the kernel

    assert raised.value._render_traceback_() == ["error: --data-dir photos: folder not found"]


def test_the_wrapped_main_returns_its_value_and_lets_other_errors_through(shell: None) -> None:
    def main(argv: list[str]) -> int:
        """Count the arguments."""
        if not argv:
            raise ValueError("a bug, not a user's mistake")
        return len(argv)

    wrapped = exit_on_user_error(main)
    assert wrapped(["a", "b"]) == 2 and wrapped.__name__ == "main" and wrapped.__doc__ == "Count the arguments."
    with pytest.raises(ValueError, match="a bug"):
        wrapped([])


def test_help_shown_in_a_notebook_makes_main_return_none(notebook: None) -> None:
    def main() -> None:
        raise HelpShown  # as ArgumentParser does after printing --help in a notebook

    assert exit_on_user_error(main)() is None  # not SystemExit: 0, which a notebook shows as an exception


def test_an_interactive_session_is_an_ipython_shell_or_the_python_prompt(shell: None,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert not interactive_session()
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))
    assert not interactive_session()  # IPython imported by a script, but no shell running
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)
    assert interactive_session()


def test_first_line_of_an_error_or_its_type() -> None:
    assert first_line(OSError("\n  No space left on device\n  (more detail)")) == "No space left on device"
    assert first_line(KeyError()) == "KeyError"


# --------------------------------------------------------------------------- arguments


def epochs_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="train.py")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.1)
    return parser


def test_a_mistyped_flag_from_a_shell_names_the_nearest(shell: None, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        epochs_parser().parse_args(["--epochz", "3"])

    assert exited.value.code == 2
    assert "train.py: error: unrecognized arguments: --epochz 3 (did you mean --epochs?)" in capsys.readouterr().err


def test_a_parser_in_a_notebook_refuses_with_a_user_error_and_returns_after_help(
        notebook: None, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(UserError, match=r"^train.py: argument --epochs: invalid int value: 'many'$"):
        epochs_parser().parse_args(["--epochs", "many"])
    with pytest.raises(HelpShown):
        epochs_parser().parse_args(["--help"])
    assert "--epochs EPOCHS" in capsys.readouterr().out
    assert epochs_parser().parse_args(["--epochs", "3"]).epochs == 3


def test_did_you_mean_suggests_the_closest_known_name_for_the_first_close_unknown() -> None:
    known = ["--epochs", "--lr", "--batch-size"]

    assert did_you_mean(["--xyz", "--batch-sise"], known) == " (did you mean --batch-size?)"
    assert did_you_mean(["--xyz"], known) == ""


def test_a_string_of_arguments_is_split_as_a_shell_would() -> None:
    assert argument_list("--data-dir 'my photos' --epochs 5", "train.py") == ["--data-dir", "my photos", "--epochs",
                                                                              "5"]
    assert argument_list(["--epochs", 5, Path("runs/a")], "train.py") == ["--epochs", "5", "runs/a"]


def test_no_arguments_means_the_command_line_only_when_the_script_itself_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    run_as(monkeypatch, "/home/me/project/train.py", "--epochs", "5")
    assert launched_as_script("train.py") and argument_list(None, "train.py") == ["--epochs", "5"]
    assert not launched_as_script("predict.py") and argument_list(None, "predict.py") == []
    run_as(monkeypatch, None, "-f", "/root/.local/share/jupyter/runtime/kernel-1.json")  # a notebook's kernel
    assert not launched_as_script("train.py") and argument_list(None, "train.py") == []


def test_the_command_hint_repeats_how_the_script_was_started(monkeypatch: pytest.MonkeyPatch) -> None:
    run_as(monkeypatch, "tools/train.py")
    assert command_hint("train.py", ["--resume", Path("my runs/last.pt")]) == \
        "python tools/train.py --resume 'my runs/last.pt'"
    run_as(monkeypatch, None)
    assert command_hint("train.py", ["--resume", Path("my runs/last.pt")]) == \
        "train.main(['--resume', 'my runs/last.pt'])"


# --------------------------------------------------------------------------- devices and workers


def make_hardware(monkeypatch: pytest.MonkeyPatch, cuda: bool, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("cuda, mps, picked", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_the_cpu(monkeypatch: pytest.MonkeyPatch, cuda: bool, mps: bool,
                                               picked: str) -> None:
    make_hardware(monkeypatch, cuda, mps)

    assert pick_device("auto") == pick_device() == torch.device(picked)
    assert pick_device("cpu") == torch.device("cpu")


def test_a_device_that_is_not_there_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    make_hardware(monkeypatch, cuda=False, mps=False)

    with pytest.raises(UserError, match="^--device cuda: no CUDA GPU is visible to PyTorch; use --device auto or cpu"):
        pick_device("cuda")
    with pytest.raises(UserError, match="^--device mps: Apple MPS is not available here; use --device auto or cpu"):
        pick_device("mps")
    with pytest.raises(UserError, match="^--device tpu: expected auto, cuda, mps or cpu"):
        pick_device("tpu")


def test_a_device_is_described_with_what_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")

    assert describe_device(torch.device("cpu")) == "cpu (1 thread)"
    assert describe_device(torch.device("cuda")) == "cuda (NVIDIA H100 80GB HBM3)"
    assert describe_device(torch.device("mps")) == "mps"


def test_the_cpu_model_is_the_first_processor_s(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2\n\n"
                       "processor\t: 1\nmodel name\t: Another CPU\nflags\t\t: fpu\n\n")
    monkeypatch.setattr(utils, "Path", lambda path: cpuinfo if path == "/proc/cpuinfo" else Path(path))

    fields = utils.cpu_info.__wrapped__()  # unlike cpu_info(), not cached
    assert fields["model name"] == "AMD EPYC 7B13" and fields["flags"] == "fpu avx2"


def test_usable_cores_are_those_the_process_is_pinned_to(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert usable_cpu_count() == 32
    assert resolve_workers("auto") == 8  # no more than 8
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows
    assert usable_cpu_count() == 64
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # undeterminable
    assert usable_cpu_count() == 1


def test_workers_are_a_count_of_zero_or_more() -> None:
    assert resolve_workers("4") == 4 and resolve_workers(0) == 0
    with pytest.raises(UserError, match="^--workers four: expected a number or auto$"):
        resolve_workers("four")
    with pytest.raises(UserError, match="^--workers -1: must be 0 or more$"):
        resolve_workers("-1")


# --------------------------------------------------------------------------- seeding and the random state


def draws() -> tuple[float, float, list[float]]:
    """One number from each random stream a run uses: Python's, NumPy's and PyTorch's."""
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_seed_everything_repeats_every_random_stream() -> None:
    seed_everything(3)
    first = draws()
    seed_everything(3)
    assert draws() == first
    seed_everything(4)
    assert draws() != first


def test_a_captured_random_state_survives_a_safe_checkpoint_load_and_continues_the_streams(tmp_path: Path) -> None:
    seed_everything(0)
    random.gauss(0, 1)  # leaves a cached second normal in Python's state
    atomic_torch_save({"rng": capture_rng_state()}, tmp_path / "last.pt")
    expected = draws()

    draws()
    restore_rng_state(torch.load(tmp_path / "last.pt", weights_only=True)["rng"])  # as resume.py loads it
    assert draws() == expected


# --------------------------------------------------------------------------- config files


@pytest.mark.parametrize("content, message", [
    ("arch: [resnet18\n", r"not valid YAML \(expected ',' or ']', but got '<stream end>', line 2 column 1\)"),
    ("- arch\n- epochs\n", "expected 'option: value' lines at the top level"),
    ("weights:\n", "weights: None is not one value; write it as on the command line"),
    ("trainable: [layer4, fc]\n", r"trainable: \['layer4', 'fc'\] is not one value"),
])
def test_a_config_file_that_is_not_option_value_lines_is_refused(tmp_path: Path, content: str, message: str) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(content)

    with pytest.raises(UserError, match=f"^--config {config}: {message}"):
        load_yaml_config(config)


def test_a_config_file_gives_option_names_as_argparse_spells_them(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("img-size: 64\nlr: 0.01\ntrainable: layer4,fc\n")
    assert load_yaml_config(config) == {"img_size": 64, "lr": 0.01, "trainable": "layer4,fc"}
    config.write_text("# nothing yet\n")
    assert load_yaml_config(config) == {}
    with pytest.raises(UserError, match="^--config .*absent.yaml: file not found$"):
        load_yaml_config(tmp_path / "absent.yaml")


# --------------------------------------------------------------------------- before a write


def test_a_file_where_a_folder_must_go_is_found_before_the_work(tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.write_text("not a folder")

    assert file_in_the_way(notes / "run" / "best.pt") == notes
    assert file_in_the_way(notes, is_folder=True) == notes
    assert file_in_the_way(notes) is None  # a file may be replaced
    assert file_in_the_way(tmp_path / "new" / "run", is_folder=True) is None
    with pytest.raises(UserError, match=f"^--output-dir {notes / 'run'}: {notes} is a file, not a folder; move"):
        refuse_files_in_the_way("--output-dir", notes / "run", is_folder=True)


def test_an_unwritable_folder_is_refused_naming_why_and_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    refuse_unwritable_folder("--output-dir", tmp_path / "new" / "run", "pick another")  # created later: fine

    def read_only(folder: Path) -> None:  # as on a read-only mount (chmod does not stop root)
        raise OSError(errno.EROFS, "Read-only file system", str(folder))

    monkeypatch.setattr(utils, "write_probe", read_only)
    with pytest.raises(UserError, match=f"^--output-dir {tmp_path}: cannot write there \\(read-only file system\\); "
                                        "pick another$"):
        refuse_unwritable_folder("--output-dir", tmp_path, "pick another")
    with pytest.raises(UserError, match=f"cannot write there \\(read-only file system in {tmp_path}\\)"):
        refuse_unwritable_folder("--output-dir", tmp_path / "new" / "run", "pick another")


# --------------------------------------------------------------------------- atomic writes


def test_a_crash_during_a_checkpoint_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    atomic_torch_save({"epoch": 1}, path)

    def interrupted_save(obj: object, file: str) -> None:
        Path(file).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"epoch": 2}, path)

    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [file.name for file in tmp_path.iterdir()] == ["last.pt"]  # no half-written temporary left


def test_an_unrelated_runtime_error_in_a_save_is_not_taken_for_a_full_disk(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_save(obj: object, file: str) -> None:
        raise RuntimeError("Cannot pickle a CUDA stream")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="Cannot pickle"):
        atomic_torch_save({"epoch": 2}, tmp_path / "last.pt")


def test_an_atomic_write_creates_its_folder_and_gives_the_usual_permissions(tmp_path: Path) -> None:
    path = tmp_path / "reports" / "summary.csv"
    atomic_write_text(path, csv_text(["file", "label"], [["a, b.jpg", "cat"], ["c.jpg", "dog"]]))

    assert path.read_bytes() == b'file,label\n"a, b.jpg",cat\nc.jpg,dog\n'  # \n on every platform
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not the 0600 of a temporary file


def test_tensor_bytes_counts_the_tensors_in_nested_containers() -> None:
    checkpoint = {"model": {"fc.weight": torch.zeros(10)}, "moments": [torch.zeros(3, dtype=torch.int64), (1, "a")],
                  "epoch": 4}

    assert tensor_bytes(checkpoint) == 10 * 4 + 3 * 8


# --------------------------------------------------------------------------- printing


def test_progress_bars_show_only_when_enabled_and_someone_watches(shell: None, monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal:
        def isatty(self) -> bool:
            return True

        def write(self, text: str) -> None:
            pass

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stderr", Terminal())
    with progress_bar(range(3), "train") as bar:
        assert not bar.disable
    assert progress_bar(range(3), "train", enabled=False).disable  # --no-progress
    with open(os.devnull, "w") as log:
        monkeypatch.setattr(sys, "stderr", log)  # 2> train.log
        assert progress_bar(range(3), "train").disable
    assert progress_bar(range(3), "train").disable  # a closed stream is not a terminal either


def test_counts_and_names_print_short() -> None:
    assert [format_count(n) for n in (23_508_032, 1_500, 999, 2_000_000_000)] == ["23.5M", "1.5k", "999", "2.0B"]
    assert [format_count(n) for n in (999_999, 999_999_999, 999_949)] == ["1.0M", "1.0B", "999.9k"]  # rounds up a unit
    assert [counted(n, "loader worker") for n in (0, 1, 2, "?")] == ["0 loader workers", "1 loader worker",
                                                                       "2 loader workers", "? loader workers"]
    assert some_names(["a", "b", "c"]) == "a, b, c"
    assert some_names(list("abcdefgh")) == "a, b, c, d, e and 3 more"


def test_a_file_name_that_is_not_utf8_prints_its_odd_byte_escaped() -> None:
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes from an old archive, as a POSIX path decodes them

    assert printable(name) == "caf\\xe9.jpg"
    assert printable("café.jpg") == "café.jpg"
