"""Train the textbook's MNIST network: ``python -m nnopt.train [--device cpu|gpu] ...``.

With no flags: 784-128-64-32-16-10, FC -> BN -> ReLU, MSRA init, SGD lr 0.1, batch 64,
stop when the validation loss <= 0.12 (checked every 44 iterations) or after 30
epochs, on the embedded ``mnist-sample`` data, on the CPU. Writes config.json,
metrics.jsonl, checkpoint.npz, summary.json and curves.png to ``--out``.

In code: ``fit(make_config(bn=False, epochs=5))``. A run is four pieces:
:func:`prepare` (data, model, optimizer, all checked with one forward pass before any
file is touched), :func:`resume_into` (a checkpoint's state), :func:`run_epoch` (steps
and validation checks) and :func:`finish` (test accuracy, summary, curves);
:class:`TrainState` is everything a checkpoint carries to continue exactly. The settings
live in :mod:`nnopt.config`, the loop's helpers (the step, the window's sums, evaluation)
in :mod:`nnopt.train_loop`; the command line (:mod:`nnopt.train_cli`) adds output-folder
safety and resuming in place.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import checkpoint, datasets, distributed, optim, runs
from .backend import asarray, get_namespace, is_numpy, synchronize
from .fast import threads
from .errors import NnoptError, InputError, InputTypeError
from .losses import SoftmaxCrossEntropy
from .model import mlp
from .optim import schedules
# (make_config and the rest stay importable from here: train.make_config(...) is the API)
from .config import (DEFAULTS, DEVICES, RESUME_KEYS, TEXTBOOK_SIZES, make_config,  # noqa: F401
                     resolve_saved, validate_config)
from .train_loop import ProgressBar, Stepper, StopRequest, Window, evaluate


class TrainingDiverged(NnoptError, FloatingPointError):
    """The training loss became NaN or infinite."""


# --- the pieces of a run ------------------------------------------------------------------------
def build_model(config: dict, xp=None):
    """The network ``config`` describes, on ``xp`` (default: the config's device)."""
    xp = get_namespace(config["device"]) if xp is None else xp
    return mlp(config["sizes"], config["activation"], config["bn"], config["init"],
               config["seed"], xp, config["dtype"],
               bn_options={"sync": True} if config.get("sync_bn") else None,
               fused=config.get("fused", True))


def build_optimizer(config: dict, model):
    return optim.create(config["optimizer"], model, **config["hyper"])


def resolved_hyper(config: dict, optimizer) -> dict:
    """Every hyper-parameter the optimizer runs with (its defaults included), for config.json."""
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    return json.loads(json.dumps({**group, **config["hyper"]}))  # (nonfinite: resolve_saved)


@dataclasses.dataclass
class TrainState:
    """Where a run stands: saved in every checkpoint, so a resumed run continues exactly.

    ``pos`` is the next batch of the current epoch; the ``window_*`` sums cover the
    training steps since the last validation check, the ``epoch_*`` sums the epoch so far."""
    epoch: int = 0
    pos: int = 0
    iteration: int = 0
    elapsed: float = 0.0
    reached: bool = False
    blas_threads: int = 0  # the fixed BLAS count the run last trained on (0: none, "auto")
    window_loss: float = 0.0
    window_correct: int = 0
    window_samples: int = 0
    epoch_loss: float = 0.0
    epoch_correct: int = 0
    epoch_samples: int = 0
    # a window a stop cut short: its sums so far, which a resumed run's window starts from
    # (added to the state's sums instead, they would round otherwise than the uninterrupted run)
    pending_loss: float = 0.0
    pending_correct: int = 0
    pending_samples: int = 0
    history: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def epochs_begun(self) -> int:
        """Epochs trained, the open one counted (a run stopped at its target mid-epoch, or
        interrupted): the summary's "epochs"."""
        return self.epoch + (1 if self.pos else 0)

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainState":
        """The state a checkpoint saved; ValueError naming the entry that is not what a
        run writes (a damaged or hand-edited checkpoint)."""
        saved = dict(saved)
        if "window" in saved:  # checkpoints of nnopt 0.1.0 kept the sums in a list
            saved["window_loss"], saved["window_correct"], saved["window_samples"] = saved.pop("window")
        state = cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})
        for field in dataclasses.fields(cls):
            value = getattr(state, field.name)
            if field.type == "int":
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            elif field.type == "float":  # a non-finite loss sum is saved as null
                ok = (value is None and field.name.endswith("loss")) or (
                    isinstance(value, (int, float)) and not isinstance(value, bool)
                    and (field.name != "elapsed" or value >= 0))
                if value is None:
                    setattr(state, field.name, math.nan)  # what the live run held
            elif field.type == "bool":
                ok = isinstance(value, bool)
            else:
                ok = isinstance(value, list) and all(isinstance(row, dict) for row in value)
            if not ok:
                raise ValueError(f"progress.{field.name} is {value!r}, not what a run saves")
        state.history = [restored_record(i, row) for i, row in enumerate(state.history)]
        return state


#: What every metrics record holds (older runs' records may lack "lr" and "time_s").
RECORD_KEYS = ("epoch", "iteration", "train_loss", "train_accuracy", "val_loss", "val_accuracy")


def restored_record(index: int, row: dict) -> dict:
    """A saved metrics record as the live run held it: JSON's null back to NaN (a window of
    skipped steps has no loss), so a resumed run formats, plots and schedules on the same
    values. ValueError naming what a damaged record lacks."""
    row = dict(row)
    for key in RECORD_KEYS + ("lr", "time_s"):
        if key not in row:
            if key in RECORD_KEYS:
                raise ValueError(f"progress.history[{index}] has no {key!r}, not what a run saves")
            continue
        value = row[key]
        if value is None:
            row[key] = math.nan
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"progress.history[{index}].{key} is {value!r}, not what a run saves")
    return row


@dataclasses.dataclass
class Run:
    """Everything one training run works with."""
    config: dict
    xp: object
    data: datasets.Dataset
    arrays: dict          # split name -> (x, y) on the device
    model: object
    optimizer: object
    scheduler: object     # an LRScheduler or None
    loss_fn: object
    out: Path
    log: object
    state: TrainState
    started: float = 0.0  # perf_counter() at the run's (virtual) start, resumed time included
    comm: object = distributed.LOCAL  # the ranks of a distributed run

    def save_checkpoint(self):
        if not self.comm.is_root:  # distributed: rank 0 alone writes
            return
        scheduler = self.scheduler.state_dict() if self.scheduler is not None else None
        with runs.writing(self.out / "checkpoint.npz"):
            checkpoint.save(self.out / "checkpoint.npz", self.model.state_dict(),
                            self.optimizer.state_dict(),
                            runs.strict({"config": self.config, "progress": self.state.to_dict(),
                                         "scheduler": scheduler}))


def prepare(config: dict, log=print) -> Run:
    """Load the data, build the model and optimizer, and run one forward pass on a
    training batch (then undo its effect on BN's statistics): every mistake in ``config``
    shows here, before any file is touched."""
    xp = get_namespace(config["device"])
    data = datasets.load(config["dataset"], config["data_dir"], n_val=config["val_size"])
    n_train = data.x_train.shape[0]
    if batches_per_epoch(n_train, config["batch_size"]) < 1:
        raise InputError(f"--val-size {config['val_size']} leaves {n_train} training image(s): "
                         f"not one batch; hold out fewer images")
    if config["batch_size"] > n_train:
        raise InputError(f"--batch-size {config['batch_size']} is more than the {n_train} training "
                         f"images of {config['dataset']}; choose at most {n_train}")
    total = config["epochs"] * batches_per_epoch(n_train, config["batch_size"])
    if config["check_every"] > total:
        log(f"note: --check-every {config['check_every']} is more than the run's {total} "
            f"iterations ({config['epochs']} epoch(s)): no validation check will run, the "
            f"target loss cannot stop it and the curves stay empty (--check-every {total} or "
            "less checks)")
    for split in ("train", "val", "test"):
        labels = getattr(data, f"y_{split}")
        if labels.size and (labels.min() < 0 or labels.max() >= config["sizes"][-1]):
            raise InputError(f"{config['dataset']}: {split} labels outside 0..{config['sizes'][-1] - 1}")
    dtype = getattr(xp, config["dtype"])
    try:
        model = build_model(config, xp)
    except MemoryError:
        sizes = config["sizes"]
        count = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
        raise InputError(f"the network {sizes} ({count:,} parameters) does not fit in this "
                         "machine's memory; choose smaller --sizes") from None
    optimizer = build_optimizer(config, model)
    scheduler = schedules.from_spec(config["schedule"], optimizer) if config["schedule"] else None
    arrays = {split: (asarray(getattr(data, f"x_{split}"), xp, dtype),
                      xp.asarray(getattr(data, f"y_{split}")))
              for split in ("train", "val", "test")}
    comm = distributed.current() if config.get("distributed") else distributed.LOCAL
    distributed.sync_parameters(model, comm)  # rank 0's initial parameters on every rank
    run = Run(config, xp, data, arrays, model, optimizer, scheduler, SoftmaxCrossEntropy(),
              Path(config["out"]), log, TrainState(), comm=comm)
    probe(run)
    return run


def probe(run: Run) -> None:
    """One training-mode forward pass and loss on the first batch, BN statistics restored."""
    x, y = run.arrays["train"]
    batch = min(run.config["batch_size"], x.shape[0])
    saved = run.model.state_dict()
    try:
        run.loss_fn.forward(run.model.forward(x[:batch], train=True), y[:batch])
    finally:
        run.model.load_state_dict(saved)


def resume_into(run: Run, path) -> None:
    """Load a checkpoint's parameters, optimizer and schedule state and progress into ``run``."""
    model_state, opt_state, meta = checkpoint.load(path)
    saved, config = resolve_saved(meta["config"]), run.config
    diff = [k for k in RESUME_KEYS if saved.get(k) != json.loads(json.dumps(config.get(k)))]
    if diff:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {config.get(k)!r}"
                            for k in diff)
        raise checkpoint.CheckpointError(
            f"checkpoint {path} was made with another configuration ({details}); "
            "resume with the same settings, or start a new run without --resume")
    try:
        run.model.load_state_dict(model_state)
        run.optimizer.load_state_dict(opt_state)
        if run.scheduler is not None and meta.get("scheduler"):
            run.scheduler.load_state_dict(meta["scheduler"])
    except (ValueError, TypeError, KeyError) as exc:
        raise checkpoint.CheckpointError(f"checkpoint {path} does not fit this model: {exc}") from None
    try:
        run.state = TrainState.from_dict(meta["progress"])
        steps = batches_per_epoch(run.arrays["train"][0].shape[0], run.config["batch_size"])
        if run.state.pos > steps:
            raise ValueError(f"progress.pos is {run.state.pos}, past the epoch's {steps} batches")
    except ValueError as exc:
        raise checkpoint.CheckpointError(f"checkpoint {path} is damaged ({exc}); use an intact "
                                         "one or start afresh") from None
    run.log(f"resumed from {path} at epoch {run.state.epoch + 1}, iteration {run.state.iteration}")
    note_order_change(run, saved)
    recheck_target(run)


def note_order_change(run: Run, saved: dict) -> None:
    """A resume on another device, or with the blocks fused where they were not (or the
    reverse), computes the same model in another order: say that its numbers leave the
    uninterrupted run's in the last bits (as note_blas_change does for BLAS threads)."""
    config = run.config
    how = {True: "fused blocks", False: "layer by layer (--layers)"}
    changes = []
    if saved.get("device", config["device"]) != config["device"]:
        changes.append(f"trained on {saved['device']} and continues on {config['device']}")
    if saved.get("fused", True) != config.get("fused", True):
        changes.append(f"trained with {how[saved.get('fused', True)]} and continues with "
                       f"{how[config.get('fused', True)]}")
    if changes:
        run.log(f"note: this run {'; it '.join(changes)}: the same model, computed in another "
                "order, so its numbers will differ from an uninterrupted run's in the last bits")


def recheck_target(run: Run) -> None:
    """A run that stopped at its target continues when resumed with a lower one (--target-loss
    may change on resume): "reached" is the last check's loss against the target now."""
    state, target = run.state, run.config["target_loss"]
    last = state.history[-1]["val_loss"] if state.history else None
    if state.reached and not (last is not None and last <= target):
        state.reached = False
        loss = "unknown" if last is None else f"{last:.4f}"
        run.log(f"the saved run stopped at its target; its last validation loss ({loss}) is "
                f"above --target-loss {target:g}: training on")


def batches_per_epoch(n: int, batch: int) -> int:
    # A last batch of one sample cannot be batch-normalized: fold it away.
    return n // batch if n % batch == 1 else math.ceil(n / batch)


def epoch_length(run: Run) -> int:
    """Batches per epoch. Distributed, every rank needs an equal, full shard: the last
    partial batch is dropped."""
    n, batch = run.arrays["train"][0].shape[0], run.config["batch_size"]
    return n // batch if run.config.get("distributed") else batches_per_epoch(n, batch)


def run_epoch(run: Run, epoch: int, step, window, stop, bar) -> bool:
    """Train from ``run.state.pos`` to the end of ``epoch`` (or the target, or a stop
    request), checking on the validation split every ``check_every`` iterations.
    Returns True when a stop request interrupted it."""
    config, state, xp = run.config, run.state, run.xp
    x_train, y_train = run.arrays["train"]
    n, batch = x_train.shape[0], config["batch_size"]
    per_epoch = epoch_length(run)
    order = xp.asarray(np.random.default_rng([config["seed"], epoch]).permutation(n))
    bar.start(epoch + 1, config["epochs"], state.pos, per_epoch)
    for it in range(state.pos, per_epoch):
        if stop.requested:
            window.stash_into(state)
            return True
        idx = distributed.shard(order[it * batch:(it + 1) * batch], run.comm)  # this rank's part
        xb, yb = xp.take(x_train, idx, axis=0), xp.take(y_train, idx, axis=0)
        loss, prob = step(xb, yb)
        state.iteration += 1
        state.pos = it + 1
        if window.check_each_step and not math.isfinite(float(loss)):
            if run.optimizer.nonfinite != "skip":
                raise diverged(run, state.iteration, float(loss))
        else:
            window.add(loss, prob, yb)
        bar.update()
        if state.iteration % config["check_every"] == 0:
            window.flush_into(state)
            record = run.comm.bcast_object(check(run, epoch))  # rank 0's decides for all
            record_check(run, record)
            if run.comm.is_root:
                runs.write_lines(run.out / "metrics.jsonl", [record], mode="a")
            bar.postfix(record)
            if record["val_loss"] <= config["target_loss"]:
                state.reached = True
                break
    window.flush_into(state)
    return False


def diverged(run: Run, iteration, value, what="training loss") -> TrainingDiverged:
    kept = ("the last checkpoint (end of the last finished epoch) is kept"
            if (Path(run.out) / "checkpoint.npz").exists() else
            "no epoch finished, so no checkpoint was written")
    return TrainingDiverged(
        f"the {what} became {value} at iteration {iteration}: the run diverged. Lower "
        f"the learning rate (now {run.optimizer.param_groups[0]['lr']:g}), or use Batch "
        f"Normalization; {kept}")


def finish(run: Run, curves=True) -> dict:
    """Test accuracy, summary.json and (``curves``) curves.png of a completed run."""
    config, state = run.config, run.state
    x_test, y_test = run.arrays["test"]
    test_loss, test_acc = evaluate(run.model, x_test, y_test, run.loss_fn)
    if not math.isfinite(test_loss):  # never a result: the network's outputs overflow
        raise diverged(run, state.iteration, test_loss, "test loss")
    summary = {"dataset": config["dataset"], "bn": config["bn"], "device": config["device"],
               "epochs": state.epochs_begun, "iterations": state.iteration,
               "time_s": round(state.elapsed, 3), "reached_target": state.reached,
               "test_loss": test_loss, "test_accuracy": test_acc,
               "skipped_steps": run.optimizer.skipped_steps, "data": run.data.description}
    if run.comm.is_root:  # distributed: rank 0 alone writes
        runs.write_json(run.out / "summary.json", summary)
    if run.comm.is_root and curves:
        with runs.writing(run.out / "curves.png"):
            plot_curves(run.out / "curves.png", state.history, config)
    if run.optimizer.skipped_steps:
        run.log(f"{run.optimizer.skipped_steps} step(s) were skipped for non-finite gradients "
                "(nonfinite='skip')")
    run.log(f"{'reached' if state.reached else 'did not reach'} validation loss "
            f"{config['target_loss']} after {summary['epochs']} epochs, {summary['iterations']} "
            f"iterations, {summary['time_s']:.1f} s; test accuracy {100 * test_acc:.2f}% "
            f"(loss {test_loss:.4f}) on {config['dataset']}")
    return summary


def fit(config: dict, resume=None, log=print, overwrite=False, progress_bar=None,
        curves=True, numbered=False) -> dict:
    """Train as ``config`` says; returns the summary (also written to summary.json).
    ``curves=False`` skips the curves.png figure (runs made by the dozen, as in the
    experiments: drawing it costs more than a short run).

    Nothing is written before the configuration has been checked (:func:`prepare`). A
    fresh run refuses a folder that holds another run unless ``overwrite``, or with
    ``numbered`` moves on to the next free ``out-N``; ``resume`` (a checkpoint or run
    folder) continues that run. The folder is held (nnopt.runs.claim) while the run writes
    there: a second process that would write the same folder is refused.

    BLAS runs every product of the run on one fixed thread count, ``config["blas_threads"]``
    or by default the cores this process may use (shared among the ranks of a distributed
    job on this machine; nnopt.fast.threads.fixed), not on the count the machine's load
    suggests: a product's last bits depend on it, and a resumed run repeats the
    uninterrupted one bit for bit. ``"auto"`` trades that for speed beside other busy
    processes: each product on the cores they leave free (nnopt.fast.threads.product)."""
    if not isinstance(config, dict) or set(DEFAULTS) - set(config):
        raise InputTypeError("fit takes a whole run configuration: the dict train.make_config(...) "
                             "returns (e.g. fit(make_config(epochs=3)))")
    count = blas_thread_count(config)
    busy_note = busy_cores_note(config, count)
    if busy_note and not (config.get("distributed") and distributed.rank() != 0):
        log(busy_note)
    with threads.fixed(count) if count is not None else contextlib.nullcontext():
        return _fit(config, resume, log, overwrite, progress_bar, curves, numbered, count)


def busy_cores_note(config, count):
    """A line for a run whose default fixed BLAS count meets cores other processes keep
    busy; None when there is none. Measured on 2 cores beside a busy loop, 10 epochs of the
    textbook run, 3 rounds: 3.0-4.2x the quiet time on the fixed 2 threads, 1.0-1.3x with
    ``--blas-threads auto``, 1.0-1.5x with ``--blas-threads 1`` (whose quiet step is ~1.2x
    the 2 threads' one: 968 against 794 us, median of 7 rounds)."""
    if config.get("blas_threads") is not None or not threads.ENABLED:
        return None
    count = min(count, threads.blas_threads().most())  # a limit set before the run holds
    free = threads.free_cores()()
    if count < 2 or free >= count:
        return None
    return (f"note: other processes keep {count - free} of this run's {count} cores busy; its "
            f"products run on a fixed {count} BLAS threads (so that it repeats bit for bit) "
            "and wait for them. --blas-threads auto is faster beside them (not bit for bit); "
            f"--blas-threads {free} is faster and still repeats")


def blas_thread_count(config):
    """The fixed BLAS thread count of a run (None: the load policy's count per product)."""
    if config.get("blas_threads") == "auto":
        return None
    if config.get("blas_threads") is not None:
        return config["blas_threads"]
    sharing = distributed.ranks_on_this_machine() if config.get("distributed") else 1
    return max(1, threads.available_cores() // sharing)


def _fit(config, resume, log, overwrite, progress_bar, curves, numbered, blas_count):
    if config.get("distributed") and distributed.rank() != 0:
        log = lambda *_: None  # noqa: E731  distributed: rank 0 alone logs and writes
    run = prepare(config, log)
    if run.comm.is_root:  # distributed: rank 0 alone writes
        if resume:
            if not runs.claim(run.out):
                raise runs.in_use_error(run.out)
        else:
            run.out = runs.claim_fresh(run.out, overwrite, numbered)
            config["out"] = str(run.out)
    try:
        return _train(run, config, resume, log, overwrite, progress_bar, curves, blas_count)
    finally:
        if run.comm.is_root:
            runs.release(run.out)


def _train(run, config, resume, log, overwrite, progress_bar, curves, blas_count):
    if resume:
        resume_into(run, resume)
    note_blas_change(run, blas_count or 0)
    config["hyper"] = resolved_hyper(config, run.optimizer)
    if run.comm.is_root:
        runs.prepare_folder(run.out, overwrite=overwrite and not resume)
        runs.write_json(run.out / "config.json", config)
        runs.write_lines(run.out / "metrics.jsonl", run.state.history)
    log(f"data: {run.data.description}")
    log(f"model: {run.model}; optimizer: {run.optimizer}; device: {config['device']}; "
        f"output: {run.out}")
    announce_compilation(run, log)
    state = run.state
    bar = progress_bar or ProgressBar(enabled=sys.stderr.isatty() and not os.environ.get("CI")
                                      and not config.get("quiet") and run.comm.is_root)
    step = Stepper(run.model, run.optimizer, run.loss_fn, config["batch_size"],
                   config.get("graph", True) and run.comm.size == 1, log, run.comm)
    window = Window(run.xp, skip_nonfinite=run.optimizer.nonfinite == "skip", comm=run.comm)
    window.resume_from(state)
    run.started = time.perf_counter() - state.elapsed
    interrupted = False
    # A diverging run is reported by nnopt (TrainingDiverged, or the count of skipped
    # steps), not by NumPy's overflow warnings from inside a step.
    with StopRequest() as local_stop, step.stream(), np.errstate(over="ignore", invalid="ignore"):
        stop = distributed.AgreedStop(local_stop, run.comm)  # all ranks stop at the same step
        for epoch in range(state.epoch, config["epochs"]):
            if state.reached:
                break
            try:
                interrupted = run_epoch(run, epoch, step, window, stop, bar)
            except FloatingPointError as exc:  # nonfinite="raise" in the optimizer
                if isinstance(exc, TrainingDiverged):
                    raise
                raise TrainingDiverged(f"{exc} (iteration {state.iteration + 1})") from None
            finally:
                bar.close()
            if not all(map(math.isfinite, (state.epoch_loss, state.window_loss,
                                           state.pending_loss))):
                raise diverged(run, f"{state.iteration} or earlier", float("nan"))
            if interrupted:
                break
            log(format_epoch(run, epoch))
            if state.reached and state.pos < epoch_length(run):
                # Stopped at its target mid-epoch: the epoch stays open (no scheduler step),
                # so a resume with a lower target trains on from the next batch, as one
                # uninterrupted run with that target would.
                break
            state.epoch, state.pos = epoch + 1, 0
            state.epoch_loss, state.epoch_correct, state.epoch_samples = 0.0, 0, 0
            if run.scheduler is not None:
                run.scheduler.step(state.history[-1]["val_loss"] if state.history else None)
            state.elapsed = time.perf_counter() - run.started
            run.save_checkpoint()
    synchronize(run.xp)
    step.release()
    state.elapsed = time.perf_counter() - run.started
    run.save_checkpoint()
    if interrupted:
        log(f"interrupted at epoch {state.epoch + 1}, iteration {state.iteration}; "
            f"checkpoint saved: continue with --resume {run.out}")
        raise KeyboardInterrupt
    # A stop request now waits the second it takes to write the summary (a second Ctrl-C
    # does not: the checkpoint is complete, and a resume writes what is missing)
    with StopRequest():
        try:
            return finish(run, curves)
        except KeyboardInterrupt:
            log(f"interrupted before the summary was written; the checkpoint is complete: "
                f"--resume {run.out} writes summary.json and curves.png")
            raise


def note_blas_change(run: Run, now: int) -> None:
    """Record the run's fixed BLAS count ``now`` (0: none, "auto"); a resume on another
    count says that it will not repeat the uninterrupted run bit for bit (a product's last
    bits depend on the count)."""
    before = run.state.blas_threads
    if before and now != before:
        same = "--blas-threads auto" if now == 0 else f"{now} BLAS threads"
        run.log(f"note: this run trained on {before} BLAS threads and continues on {same}: its "
                f"numbers will differ from an uninterrupted run's in the last bits "
                f"(--blas-threads {before} repeats them)")
    run.state.blas_threads = now


def announce_compilation(run: Run, log) -> None:
    """numba compiles the fused CPU kernels on first use (seconds), then caches them on
    disk until nnopt's text changes (nnopt.fast.numba_cache): say so instead of sitting
    silent. The loss kernel, which every run on NumPy compiles, stands for them."""
    if not is_numpy(run.model.flat.data):
        return
    from .fast import cpu_kernels, numba_cache
    kernels = cpu_kernels()
    if kernels is None:
        return
    cached = numba_cache.is_cached(kernels._softmax_cross_entropy)
    if cached is None:
        cached = any((Path(kernels.__file__).parent / "__pycache__").glob("cpu.*.nbi"))
    if not cached:
        log("compiling nnopt's fused CPU kernels (numba: on a first run, and once after "
            "nnopt changes; cached on disk)")


def check(run: Run, epoch: int) -> dict:
    """Validate, and turn the training window into one metrics record."""
    state = run.state
    x_val, y_val = run.arrays["val"]
    val_loss, val_acc = evaluate(run.model, x_val, y_val, run.loss_fn)
    samples = state.window_samples
    record = {"epoch": epoch + 1, "iteration": state.iteration,
              "train_loss": state.window_loss / samples if samples else math.nan,
              "train_accuracy": state.window_correct / samples if samples else math.nan,
              "val_loss": val_loss, "val_accuracy": val_acc,
              "lr": run.optimizer.param_groups[0]["lr"],
              "time_s": round(time.perf_counter() - run.started, 3)}
    state.window_loss, state.window_correct, state.window_samples = 0.0, 0, 0
    return record


def record_check(run: Run, record: dict) -> None:
    """Keep a check's record (distributed: rank 0's, on every rank, so that every rank's
    schedule steps on the same loss); a non-finite loss ends the run as diverged."""
    run.state.history.append(record)
    if not math.isfinite(record["train_loss"]) and run.optimizer.nonfinite != "skip":
        raise diverged(run, f"{run.state.iteration} or earlier", record["train_loss"])
    if not math.isfinite(record["val_loss"]):  # skipped steps or not: the outputs overflow
        raise diverged(run, run.state.iteration, record["val_loss"], "validation loss")


def format_epoch(run: Run, epoch: int) -> str:
    """The line an epoch leaves: its training loss/accuracy, the last check's validation."""
    state = run.state
    samples = state.epoch_samples or math.nan  # every step skipped: no loss, not 0
    line = (f"epoch {epoch + 1:3d}/{run.config['epochs']}  iter {state.iteration:6d}  "
            f"train loss {state.epoch_loss / samples:.4f} "
            f"acc {100 * state.epoch_correct / samples:.2f}%")
    last = state.history[-1] if state.history and state.history[-1]["epoch"] == epoch + 1 else None
    if last is not None:
        line += f"  val loss {last['val_loss']:.4f} acc {100 * last['val_accuracy']:.2f}%"
    return line + (f"  lr {run.optimizer.param_groups[0]['lr']:.3g}  "
                   f"{time.perf_counter() - run.started:.1f} s")


def plot_curves(path, history, config):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    it = [r["iteration"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    title = f"{config['dataset']}, {'with' if config['bn'] else 'without'} BN, {config['optimizer']}"
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        ax_loss.plot(it, [r[key] for r in history], label=label)
    ax_loss.axhline(config["target_loss"], color="gray", ls="--", label="target")
    ax_loss.set(xlabel="iteration", ylabel="cross-entropy loss", title=f"Loss: {title}")
    losses = [r[k] for r in history for k in ("train_loss", "val_loss")] + [config["target_loss"]]
    if any(v > 0 for v in losses):  # (no check ran and a target of 0: nothing a log axis can show)
        ax_loss.set_yscale("log")
    for key, label in (("train_accuracy", "train"), ("val_accuracy", "validation")):
        ax_acc.plot(it, [100 * r[key] for r in history], label=label)
    ax_acc.set(xlabel="iteration", ylabel="accuracy (%)", title=f"Accuracy: {title}")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:  # whole or not at all, as every file of a run: a kill mid-write leaves the old one
        checkpoint.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def main(argv=None) -> int:
    from .train_cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
