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
    return any((folder / name).exists() for name in RUN_FILES)


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
    if not holds_run(folder) or overwrite:
        return folder
    if numbered:
        n = 2
        while holds_run(folder.with_name(f"{folder.name}-{n}")):
            n += 1
        return folder.with_name(f"{folder.name}-{n}")
    raise OutputError(f"{folder} already holds a run; continue it with --resume {folder}, "
                      "pick another --out, or pass --overwrite to replace it")


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
