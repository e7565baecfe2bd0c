"""A training run's settings: the textbook's run (:data:`DEFAULTS`), :func:`make_config`
(overrides checked and resolved, JSON-clean) and the keys a resumed run must share with
its checkpoint (:data:`RESUME_KEYS`)."""
from __future__ import annotations

import json
import os

import numpy as np

from . import datasets, distributed, optim
from .errors import (InputError, InputTypeError, check_bool, check_finite_number, check_int,
                     unknown_name)
from .optim import schedules

TEXTBOOK_SIZES = [784, 128, 64, 32, 16, 10]
DEVICES = ("cpu", "gpu", "cuda")
#: The textbook's run; ``make_config`` overrides any of these.
DEFAULTS = {"device": "cpu", "dataset": "mnist-sample", "data_dir": None, "val_size": None,
            "sizes": TEXTBOOK_SIZES, "activation": "relu", "bn": True, "init": "msra",
            "optimizer": "sgd", "hyper": {"lr": 0.1}, "schedule": None, "epochs": 30,
            "batch_size": 64, "target_loss": 0.12, "check_every": 44, "seed": 0,
            "dtype": "float32", "out": "runs/train", "graph": True, "quiet": False,
            "distributed": False, "sync_bn": False, "world_size": 1,  # see nnopt.distributed
            "fused": True,  # FC -> BN -> ReLU as fused blocks (nnopt.block); False: layer by layer
            "blas_threads": None}  # see fit: None or a count, fixed for the run; "auto": the load's
#: Config keys a resumed run must share with its checkpoint.
RESUME_KEYS = ("dataset", "sizes", "activation", "bn", "init", "optimizer", "hyper",
               "schedule", "batch_size", "seed", "dtype", "check_every", "val_size",
               "distributed", "sync_bn", "world_size")


def make_config(**overrides) -> dict:
    """The default run with ``overrides`` (same keys as :data:`DEFAULTS`), checked and
    resolved (``val_size`` None becomes the data set's default)."""
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise unknown_name("training setting", unknown[0], DEFAULTS)
    try:  # a deep, JSON-clean copy (NumPy scalars and arrays, paths: their JSON values)
        config = json.loads(json.dumps({**DEFAULTS, **overrides}, default=_json_value))
    except TypeError as exc:
        raise InputTypeError(f"a training setting is not a number, text, list or dict ({exc})") from None
    config["optimizer"] = str(config["optimizer"]).lower()
    if config["distributed"] and "world_size" not in overrides:
        config["world_size"] = distributed.size()  # the job of distributed.init()
    validate_config(config)
    return resolve_saved(config)


def _json_value(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{value!r} of type {type(value).__name__}")


def validate_config(config: dict) -> None:
    for key in ("bn", "distributed", "sync_bn", "fused", "quiet", "graph"):
        config[key] = check_bool(f"setting {key!r}", config[key])
    if config["dtype"] not in ("float32", "float64"):
        raise InputError(f"--dtype must be float32 or float64, got {config['dtype']!r}")
    for key in ("data_dir", "out"):
        if config[key] is not None and not isinstance(config[key], str):
            raise InputTypeError(f"setting {key!r} must be a folder path, got {config[key]!r}")
    if config["out"] is not None and not config["out"].strip():
        raise InputError("--out is empty; give the output folder (e.g. --out runs/mine)")
    if config["data_dir"] is not None and not config["data_dir"].strip():
        raise InputError("--data-dir is empty; give the folder of the IDX files, or leave "
                         "--data-dir out to search the usual places")
    datasets.check_sample_folder(config["dataset"], config["data_dir"])
    for key in ("epochs", "batch_size", "check_every"):
        check_int(f"--{key.replace('_', '-')}", config[key], low=1)
    check_int("--seed", config["seed"], low=0)
    check_finite_number("--target-loss", config["target_loss"], low=0)
    if config["val_size"] is not None:
        check_int("--val-size", config["val_size"], low=1)
    if str(config["device"]).lower() not in DEVICES:
        raise InputError(f"--device must be cpu or gpu, got {config['device']!r}")
    if config["dataset"] not in datasets.DATASETS:
        raise unknown_name("data set", config["dataset"], datasets.DATASETS)
    if config["optimizer"] not in optim.OPTIMIZERS:
        raise unknown_name("optimizer", config["optimizer"], optim.OPTIMIZERS)
    if not isinstance(config["hyper"], dict):
        raise InputError(f"hyper must be a dict of optimizer hyper-parameters, got {config['hyper']!r}")
    reserved = sorted(set(config["hyper"]) & {"params"})
    if reserved:
        raise InputError(f"--opt {reserved[0]}: not a hyper-parameter (the optimizer gets the "
                         "model's parameters itself)")
    sizes = config["sizes"]
    if not isinstance(sizes, list) or len(sizes) < 2 or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise InputError(f"--sizes must be integers >= 1 separated by commas, got {sizes!r}")
    if sizes[0] != 784 or sizes[-1] != 10:
        raise InputError(f"--sizes must start with 784 (28x28 pixels) and end with 10 classes, got {sizes}")
    if config["schedule"] is not None:
        schedules.check_spec(config["schedule"])
    blas = config["blas_threads"]
    if blas is not None and blas != "auto" and (
            isinstance(blas, bool) or not isinstance(blas, int) or blas < 1):
        raise InputError(f"--blas-threads must be a thread count >= 1 or auto, got {blas!r}")
    if config["sync_bn"] and not config["distributed"]:  # data parallelism: nnopt.distributed
        raise InputError("--sync-bn synchronizes BN statistics across ranks: it needs --distributed "
                         "(mpiexec -n N python -m nnopt.train --distributed --sync-bn ...)")
    if config["distributed"]:
        distributed.check_batch(config["batch_size"], config["world_size"])
    if config["bn"] and config["batch_size"] < 2:
        raise InputError(f"--batch-size {config['batch_size']}: Batch Normalization needs at "
                         "least 2 samples per batch (one sample has no variance); use a "
                         "larger batch or --no-bn")


def resolve_saved(config: dict) -> dict:
    """``config`` with what it leaves open filled in: keys it lacks (a config saved by an
    older run) from DEFAULTS, ``val_size`` None as the data set's default. make_config and
    resuming both end here."""
    config = {**DEFAULTS, **config}  # keys added since the config was saved
    if isinstance(config["hyper"], dict) and "nonfinite" not in config["hyper"]:
        # the optimizers' default policy (configs saved before it was recorded lack it)
        config["hyper"] = {**config["hyper"], "nonfinite": "ignore"}
    if config["val_size"] is None:
        config["val_size"] = datasets.default_val_size(config["dataset"])
    return config
