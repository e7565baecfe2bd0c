"""A run's output folder: never overwritten by accident, written as strict JSON, and
every failure to write reported as one line that names the path.

A folder *holds a run* when it has any of :data:`RUN_FILES`. A fresh run refuses such a
folder unless asked to ``overwrite`` it; the default folder instead moves on to the next
free numbered sibling (``runs/train`` -> ``runs/train-2``), so running the default command
twice keeps both runs.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there
    fcntl = None

from .checkpoint import atomic_write
from .errors import NnoptError

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.npz", "summary.json", "curves.png")
#: The file a process holds a lock on while it writes the run in its folder.
LOCK_FILE = ".nnopt.lock"
_held = {}  # resolved folder -> (open lock file, whether claim created the folder)


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
        raise OutputError(f"cannot write {path}: {reason}; {remedy(exc)}") from None


def remedy(exc: OSError) -> str:
    """What to do about a failed write, by its cause."""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "free some space there, or choose another --out"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "choose an --out you may write to"
    return "choose another --out"


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


def numbered_siblings(folder: Path):
    """``folder``, ``folder-2``, ``folder-3``, ...: where the default folder moves on to."""
    yield folder
    n = 2
    while True:
        yield folder.with_name(f"{folder.name}-{n}")
        n += 1


def fresh_folder(folder, overwrite=False, numbered=False) -> Path:
    """The folder a new run writes to: ``folder`` itself if it holds no run (or
    ``overwrite``), the next free ``folder-N`` if ``numbered``, else an error."""
    folder = Path(folder)
    check_folder(folder)
    if not holds_run(folder):
        return folder
    if numbered:
        return next(c for c in numbered_siblings(folder) if not holds_run(c))
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


def claim(folder) -> bool:
    """Hold ``folder`` for this process while it writes a run there: an exclusive lock on
    its LOCK_FILE, which the system releases when the process ends, however it ends (no
    stale locks). False when another process holds it. Claiming a folder this process
    holds already is a no-op; :func:`release` lets it go."""
    folder = Path(folder)
    key = folder.resolve()
    if key in _held or fcntl is None:
        return True
    check_folder(folder)
    created = not folder.exists()
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        while True:
            lock = open(folder / LOCK_FILE, "a")
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                if created:
                    _remove_if_empty(folder)
                return False
            try:  # the holder before us may have removed the file we locked: lock the new one
                if os.stat(folder / LOCK_FILE).st_ino == os.fstat(lock.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            lock.close()
    _held[key] = (lock, created)
    return True


def release(folder) -> None:
    """Let go of a folder :func:`claim` took (a folder it created and nothing was written to
    is removed again)."""
    folder = Path(folder)
    lock, created = _held.pop(folder.resolve(), (None, False))
    if lock is None:
        return
    with contextlib.suppress(OSError):
        (folder / LOCK_FILE).unlink()
    lock.close()
    if created:
        _remove_if_empty(folder)


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def in_use_error(folder) -> OutputError:
    return OutputError(f"{folder} is in use: another nnopt process is writing a run there. "
                       "Wait for it to end, or choose another --out")


def claim_fresh(folder, overwrite=False, numbered=False) -> Path:
    """:func:`fresh_folder`, claimed: each candidate is held before it is checked, so two
    runs started together never write the same folder (the second moves on to the next
    numbered one, or is refused)."""
    for candidate in numbered_siblings(Path(folder)):
        if claim(candidate):
            if not (numbered and holds_run(candidate)):
                try:
                    return fresh_folder(candidate, overwrite)
                except OutputError:
                    release(candidate)
                    raise
            release(candidate)
        elif not numbered:
            raise in_use_error(candidate)


def prepare_folder(folder: Path, overwrite=False) -> None:
    """Create ``folder``; when overwriting, remove the old run's files (only those), and
    remove the temporary files a killed run left behind."""
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in RUN_FILES:
                (folder / name).unlink(missing_ok=True)
        for name in RUN_FILES:
            for orphan in folder.glob(f".{name}.*.tmp"):
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
    """Written whole or not at all (a full disk mid-write must not leave half a
    config.json, which would no longer mark the folder as an nnopt run's)."""
    text = (dumps(value, indent=2) + "\n").encode()
    with writing(path):
        atomic_write(path, lambda f: f.write(text))


def write_lines(path: Path, records, mode="w") -> None:
    with writing(path), open(path, mode) as f:
        f.write("".join(dumps(r) + "\n" for r in records))
