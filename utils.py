"""Small helpers shared by the scripts: user-facing errors, devices, seeding, config files, safe writes."""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import errno
import functools
import io
import os
import platform
import random
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.std import tqdm  # not tqdm.auto: in a notebook without ipywidgets it warns "IProgress not found"


class UserError(Exception):
    """A mistake the user can fix (bad path, bad flag): printed as one line, exit code 2 (raised as is in a
    notebook: see :func:`exit_on_user_error`)."""

    def _render_traceback_(self) -> list[str]:
        """What IPython and Jupyter show for this error instead of a traceback: the one line."""
        return [f"error: {self}"]


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a script's ``main`` so a :class:`UserError` prints ``error: ...`` and exits with code 2.

    In an interactive session (a notebook, IPython, the Python prompt) the error is raised instead: exiting there
    would stop the kernel or make IPython say "To exit: use 'exit'"; the notebook shows the one line.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except HelpShown:
            return None
        except UserError as error:
            if interactive_session():
                raise
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def interactive_session() -> bool:
    """True in a notebook or IPython (an IPython shell is running) and at the plain Python prompt."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    return (get_ipython is not None and get_ipython() is not None) or hasattr(sys, "ps1")


class HelpShown(Exception):
    """``--help`` was printed in an interactive session: the script's ``main`` returns None rather than exiting."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` for an interactive session too: a refusal is a :class:`UserError`, not argparse's
    usage text and ``SystemExit(2)``, and ``--help`` prints the help and returns (``SystemExit: 0`` would show in a
    notebook as an exception); from a shell it behaves as argparse does."""

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        """End after ``--help`` (status 0): from a shell by exiting, in an interactive session by
        :class:`HelpShown`, which :func:`exit_on_user_error` turns into a plain return."""
        if status == 0 and interactive_session():
            if message:
                print(message, file=sys.stderr, end="")
            raise HelpShown
        return super().exit(status, message)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:
        """Parse ``args`` as argparse does; a mistyped option is refused with the nearest one (``--epochz``: did
        you mean --epochs?), which Python's argparse suggests only from 3.14 on."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            flags = [extra.split("=")[0] for extra in extras if extra.startswith("--")]
            known = [flag for flag in self._option_string_actions if flag.startswith("--")]
            self.error(f"unrecognized arguments: {' '.join(extras)}{did_you_mean(flags, known)}")
        return parsed

    def error(self, message: str) -> Any:
        """Refuse the arguments with ``message``."""
        if interactive_session():
            raise UserError(f"{self.prog}: {message}")
        return super().error(message)


def did_you_mean(unknown: Sequence[str], known: Iterable[str]) -> str:
    """' (did you mean --epochs?)' for the first of ``unknown`` close to one of ``known``; '' when none is."""
    known = list(known)
    for name in unknown:
        match = difflib.get_close_matches(name, known, n=1)
        if match:
            return f" (did you mean {match[0]}?)"
    return ""


def progress_bar(iterable: Iterable, description: str, enabled: bool = True) -> tqdm:
    """A tqdm bar over ``iterable`` on standard error, shown only when ``enabled`` and someone watches: a terminal,
    or a notebook. Redirected into a log file it stays silent (a bar there is one long line of carriage returns)."""
    watched = interactive_session() or _is_terminal(sys.stderr)
    return tqdm(iterable, desc=description, leave=False, disable=not (enabled and watched), dynamic_ncols=True,
                file=sys.stderr)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def argument_list(argv: str | Sequence[str] | None, script: str) -> list[str]:
    """The arguments ``main`` was given, as a list.

    A string is split as a shell would (``"--epochs 5"``, handy in a notebook); None means the command line's
    arguments when ``script`` runs from a shell, and none when it is called from Python (in a notebook,
    ``sys.argv`` holds the kernel's own arguments).
    """
    if argv is None:
        return sys.argv[1:] if launched_as_script(script) else []
    if isinstance(argv, str):
        return shlex.split(argv)
    return [str(arg) for arg in argv]


def launched_as_script(script: str) -> bool:
    """True when the running program is ``python SCRIPT`` (not a notebook or another program importing it)."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is not None and Path(main_file).name == script


def command_hint(script: str, args: Sequence[str]) -> str:
    """How to run ``script`` with ``args`` the way it was started: a shell command, or a ``main([...])`` call."""
    if launched_as_script(script):  # as the user started it: python train.py, or python path/to/train.py
        return " ".join(["python", shlex.quote(sys.argv[0]), *(shlex.quote(str(arg)) for arg in args)])
    return f"{Path(script).stem}.main({[str(arg) for arg in args]!r})"


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")  # --device


def pick_device(name: str = "auto") -> torch.device:
    """Return the device for ``--device``: ``auto`` tries CUDA, then Apple MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device auto or cpu")
    if name == "mps" and not _mps_available():
        raise UserError("--device mps: Apple MPS is not available here; use --device auto or cpu")
    if name not in DEVICE_CHOICES:
        raise UserError(f"--device {name}: expected auto, cuda, mps or cpu")
    return torch.device(name)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (``model name``, ``flags``, ...); empty off Linux."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return {}
    fields: dict[str, str] = {}
    for line in cpuinfo.read_text(errors="ignore").splitlines():
        if not line.strip():
            break  # the end of the first processor's block
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what the platform module says."""
    return cpu_info().get("model name") or platform.processor() or platform.machine()


def describe_device(device: torch.device) -> str:
    """A human-readable name for ``device``, e.g. ``cuda (NVIDIA H100 80GB HBM3)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'s' if threads != 1 else ''})"
    return device.type


def usable_cpu_count() -> int:
    """The CPU cores this process may run on: fewer than the machine's when it is pinned to some (taskset, a job
    scheduler's allocation, a container's cpuset), as PyTorch's DataLoader counts them."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def resolve_workers(value: Any) -> int:
    """``--workers auto`` -> one per usable CPU core up to 8; otherwise the given count."""
    if str(value) == "auto":
        return min(8, usable_cpu_count())
    try:
        workers = int(value)
    except ValueError:
        raise UserError(f"--workers {value}: expected a number or auto") from None
    if workers < 0:
        raise UserError(f"--workers {value}: must be 0 or more")
    return workers


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) so a CPU run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """The Python, NumPy and PyTorch (CPU and CUDA) random states, as tensors and plain values."""
    version, mt_state, gauss = random.getstate()
    bit_generator, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt_state), gauss],
        "numpy": [bit_generator, keys.tolist(), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`: the random streams continue where they were captured."""
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    bit_generator, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((bit_generator, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a flat dict of option names (dashes become underscores)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: file not found")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise UserError(f"--config {path}: not valid YAML ({yaml_problem(error)})") from None
    if not isinstance(content, dict):
        raise UserError(f"--config {path}: expected 'option: value' lines at the top level")
    for key, value in content.items():
        if value is None or isinstance(value, (list, dict)):
            raise UserError(f"--config {path}: {key}: {value!r} is not one value; write it as on the command line "
                            "(e.g. trainable: layer4,fc)")
    return {str(key).replace("-", "_"): value for key, value in content.items()}


def yaml_problem(error: Exception) -> str:
    """What a YAML parser said is wrong, and where: 'found unexpected end of stream, line 3 column 1'."""
    problem = getattr(error, "problem", None) or first_line(error)
    mark = getattr(error, "problem_mark", None)
    return f"{problem}, line {mark.line + 1} column {mark.column + 1}" if mark is not None else problem


def available_ram_bytes() -> int:
    """Host memory available to this process (MemAvailable on Linux; total physical memory elsewhere)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def some_names(names: Sequence[str], limit: int = 5) -> str:
    """'a, b, c' or, past ``limit`` names, 'a, b, c, d, e and 3 more'."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def file_in_the_way(path: Path, is_folder: bool = False) -> Path | None:
    """The file that stands where one of ``path``'s folders must go (``path`` itself too, if ``is_folder``), or None:
    writing there would fail only at the end, after all the work."""
    return next((folder for folder in ([path] if is_folder else []) + list(path.parents)
                 if folder.exists() and not folder.is_dir()), None)


def refuse_files_in_the_way(flag: str, path: Path, is_folder: bool = False) -> None:
    """Refuse ``path`` when a file stands where one of its folders must go (``path`` itself too, if ``is_folder``):
    writing there would fail only at the end, after all the work."""
    blocker = file_in_the_way(path, is_folder)
    if blocker is not None:
        raise UserError(f"{flag} {path}: {blocker} is a file, not a folder; move that file or pick another path")


# A write refused for want of permission, not of room: a read-only mount (Kaggle's input, a shared course folder).
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def write_probe(folder: Path) -> None:
    """Create and remove a temporary file in ``folder``; raises the ``OSError`` of a folder that cannot be written."""
    handle, name = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
    os.close(handle)
    os.remove(name)


def unwritable_reason(folder: Path) -> str | None:
    """Why files cannot be written in ``folder`` (or, when it does not exist yet, in the nearest folder above it
    that does, where it would be created): 'read-only file system', 'permission denied'; None when they can."""
    existing = next((folder for folder in [folder, *folder.parents] if folder.is_dir()), None)
    if existing is None:
        return None
    try:
        write_probe(existing)
    except OSError as error:
        reason = (error.strerror or type(error).__name__).lower()
        return reason if existing == folder else f"{reason} in {existing}"
    return None


def refuse_unwritable_folder(flag: str, folder: Path, fix: str) -> None:
    """Refuse ``folder`` (created later if missing) before any work when nothing can be written there."""
    reason = unwritable_reason(folder)
    if reason is not None:
        raise UserError(f"{flag} {folder}: cannot write there ({reason}); {fix}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, so a crash leaves the old file."""
    path = Path(path)
    with _write_failures(Path(path), len(data)), _temporary_sibling(path) as tmp_path:
        Path(tmp_path).write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """CSV text with ``header`` and ``rows``, ``\\n`` line endings on every platform."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically; see :func:`atomic_write_bytes`."""
    with _write_failures(Path(path), tensor_bytes(obj)), _temporary_sibling(Path(path)) as tmp_path:
        torch.save(obj, tmp_path)


def tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in ``obj`` (nested dicts, lists and tuples): about what ``torch.save`` writes."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


# How torch.save reports a write that failed (a full disk, say): a RuntimeError, not an OSError.
TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter")


@contextlib.contextmanager
def _write_failures(path: Path, size: int) -> Iterator[None]:
    """Turn a write of about ``size`` bytes that fails for want of permission or room into a one-line
    :class:`UserError` naming the file: read-only storage told apart from a full disk, and for a full disk the room
    the write needs (the half-written file is already gone)."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not any(marker in str(error) for marker in TORCH_WRITE_FAILURES):
            raise
        if isinstance(error, OSError) and error.errno in READ_ONLY_ERRNOS:
            raise UserError(f"cannot write {path} ({error.strerror.lower()}; not a matter of room); use an output "
                            "folder you can write to") from None
        raise UserError(f"cannot write {path} ({first_line(error)}); {_room_needed(path, size)}: make room, or use "
                        "another output folder") from None


def _room_needed(path: Path, size: int) -> str:
    """'12 MiB free there, and the write needs about 90 MiB' for a file of ``size`` bytes written beside ``path``."""
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:,.0f} MiB free there"
    except OSError:
        return "its disk cannot be read"
    return f"{free}, and the new file needs about {_size_text(size)} (it is written whole before it replaces the old)"


def _size_text(size: int) -> str:
    """``size`` bytes as '3 KiB', '98 MiB' or '1.2 GiB'."""
    if size >= 2**30:
        return f"{size / 2**30:.1f} GiB"
    if size >= 2**20:
        return f"{size / 2**20:,.0f} MiB"
    return f"{max(size / 2**10, 1):,.0f} KiB"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: setting the umask to read it is process-wide, and other threads (TensorBoard's writer) create files.
_UMASK = _read_umask()


class _temporary_sibling:
    """Context manager yielding a temp path beside ``path``; renamed onto ``path`` on success, removed on error."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, self.tmp_path = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(handle)
        os.chmod(self.tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        return self.tmp_path

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is None:
            os.replace(self.tmp_path, self.path)
        elif os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)


def counted(count: int | str, noun: str) -> str:
    """``'1 loader worker'``, ``'0 loader workers'``: ``count`` and the noun, plural unless the count is 1."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def format_count(number: int) -> str:
    """``23508032`` -> ``'23.5M'``; used when printing parameter counts. A count that rounds up to the next unit is
    written in it (``999999`` -> ``'1.0M'``, not ``'1000.0k'``)."""
    units = (("B", 1e9), ("M", 1e6), ("k", 1e3))
    for index, (unit, size) in enumerate(units):
        if number >= size:
            text = f"{number / size:.1f}"
            if text == "1000.0" and index > 0:  # 999,999 is 1.0M, not 1000.0k
                unit, size = units[index - 1]
                text = f"{number / size:.1f}"
            return text + unit
    return str(number)


def printable(name: str) -> str:
    """``name`` safe to print on any console: bytes that are not UTF-8 shown as ``\\xe9``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
