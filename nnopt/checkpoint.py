"""Checkpoints: one .npz holding the model, the optimizer state and JSON metadata.

Written atomically (temporary file in the same folder, fsync, rename), so an
interrupted run always leaves the previous checkpoint whole. Read without pickle.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .errors import NnoptError


class CheckpointError(NnoptError, RuntimeError):
    """A checkpoint is missing, damaged, or belongs to another run."""


def atomic_write(path, write) -> None:
    """Call ``write(file_object)`` on a temporary file, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide it from the run's readers
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(path, model_state: dict, optimizer_state: dict, meta: dict) -> None:
    arrays = {f"model/{k}": v for k, v in model_state.items()}
    opt_meta = dict(optimizer_state)
    opt_meta["state"] = []
    for i, group_state in enumerate(optimizer_state["state"]):
        scalars = {}
        for key, value in group_state.items():
            if isinstance(value, np.ndarray):
                arrays[f"optimizer/{i}/{key}"] = value
            else:
                scalars[key] = value
        opt_meta["state"].append(scalars)
    header = json.dumps({"format": "nnopt-checkpoint-1", "meta": meta, "optimizer": opt_meta})
    arrays["header"] = np.frombuffer(header.encode(), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load(path) -> tuple[dict, dict, dict]:
    """Return ``(model_state, optimizer_state, meta)``; a clear error when the file is
    missing, corrupt or not an nnopt checkpoint."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.npz"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        header = json.loads(arrays.pop("header").tobytes().decode())
    except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError, UnicodeDecodeError) as exc:
        # (NumPy reads any file that is not an .npz as a pickle, which nnopt never loads)
        detail = ("not an .npz archive" if isinstance(exc, zipfile.BadZipFile) or "pickle" in str(exc)
                  else f"{type(exc).__name__}: {exc}")
        raise CheckpointError(f"checkpoint {path} is corrupt or not an nnopt checkpoint "
                              f"({detail}); use an intact one or start afresh") from None
    if not isinstance(header, dict) or header.get("format") != "nnopt-checkpoint-1":
        fmt = header.get("format") if isinstance(header, dict) else None
        raise CheckpointError(f"{path} is not an nnopt checkpoint (format {fmt!r})")
    missing = [key for key in ("meta", "optimizer") if not isinstance(header.get(key), dict)]
    opt = header.get("optimizer") or {}
    missing += [f"optimizer.{key}" for key in ("state", "param_groups")
                if not isinstance(opt.get(key), list)]
    meta = header.get("meta") or {}
    missing += [f"meta.{key}" for key in ("config", "progress") if not isinstance(meta.get(key), dict)]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (no {', '.join(missing)} in its "
                              "header): it was damaged or not written by nnopt.train; use an "
                              "intact one or start afresh")
    model_state = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    optimizer_state = header["optimizer"]
    for i, scalars in enumerate(optimizer_state["state"]):
        prefix = f"optimizer/{i}/"
        scalars.update({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
    for group in optimizer_state["param_groups"]:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return model_state, optimizer_state, header["meta"]
