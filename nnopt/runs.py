"""A run's output folder: never overwritten by accident, written as strict JSON, and
every failure to write reported as one line that names the path.

A folder *holds a run* when it has any of :data:`RUN_FILES`. A fresh run refuses such a
folder unless asked to ``overwrite`` it; the default folder instead moves on to the next
free numbered sibling (``runs/train`` -> ``runs/train-2``), so running the default command
twice keeps both runs.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

from .errors import NnoptError

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.npz", "summary.json", "curves.png")


class OutputError(NnoptError, OSError):
    """The output folder cannot be used or written."""


@contextlib.contextmanager
def writing(path):
    """Turn an OSError while writing ``path`` (unwritable, full disk, not a folder...)
    into an OutputError naming it."""
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OutputError(f"cannot write {path}: {reason}; choose another --out "
                          "or free the space") from None


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` has any file a run writes (an nnopt run's or not)."""
    return any((folder / name).exists() for name in RUN_FILES)


def is_nnopt_run(folder: Path) -> bool:
    """Whether ``folder`` holds an nnopt run: its config.json (the first file a run writes)
    is a run configuration. Files of the same names from anything else are not nnopt's to
    replace."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"dataset", "sizes", "optimizer"} <= set(config)


def check_folder(folder: Path) -> None:
    """A folder we may create or write into; a clear error for a file, /dev/null, ..."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--out {folder} exists and is not a folder; give a folder path")
    parent = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OutputError(f"--out {folder}: {parent} is not a folder")


def fresh_folder(folder, overwrite=False, numbered=False) -> Path:
    """The folder a new run writes to: ``folder`` itself if it holds no run (or
    ``overwrite``), the next free ``folder-N`` if ``numbered``, else an error."""
    folder = Path(folder)
    check_folder(folder)
    if not holds_run(folder):
        return folder
    if numbered:
        n = 2
        while holds_run(folder.with_name(f"{folder.name}-{n}")):
            n += 1
        return folder.with_name(f"{folder.name}-{n}")
    if not is_nnopt_run(folder):
        names = ", ".join(name for name in RUN_FILES if (folder / name).exists())
        raise OutputError(f"{folder} holds {names}, named like a run's files but not an nnopt "
                          "run's (no nnopt config.json); nnopt replaces none of them, even with "
                          "--overwrite: pick another --out")
    if overwrite:
        return folder
    resume = (f"continue it with --resume {folder}, " if (folder / "checkpoint.npz").exists()
              else "it never finished an epoch (no checkpoint); ")
    raise OutputError(f"{folder} already holds a run; {resume}pick another --out, or pass "
                      "--overwrite to replace it")


def prepare_folder(folder: Path, overwrite=False) -> None:
    """Create ``folder``; when overwriting, remove the old run's files (only those), and
    remove temporary checkpoint files a killed run left behind."""
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in RUN_FILES:
                (folder / name).unlink(missing_ok=True)
        for orphan in folder.glob(".checkpoint.npz.*.tmp"):
            orphan.unlink(missing_ok=True)


def strict(value):
    """``value`` with every non-finite float replaced by None: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(value, **options) -> str:
    return json.dumps(strict(value), allow_nan=False, **options)


def write_json(path: Path, value) -> None:
    with writing(path):
        path.write_text(dumps(value, indent=2) + "\n")


def write_lines(path: Path, records, mode="w") -> None:
    with writing(path), open(path, mode) as f:
        f.write("".join(dumps(r) + "\n" for r in records))
