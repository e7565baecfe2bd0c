"""Train the textbook's MNIST network: ``python -m nnopt.train [--device cpu|gpu] ...``.

With no flags: 784-128-64-32-16-10, FC -> BN -> ReLU, MSRA init, SGD lr 0.1, batch 64,
stop when the validation loss <= 0.12 (checked every 44 iterations) or after 30
epochs, on the embedded ``mnist-sample`` data, on the CPU. Writes config.json,
metrics.jsonl, checkpoint.npz, summary.json and curves.png to ``--out``.

In code: ``fit(make_config(bn=False, epochs=5))``. A run is four pieces:
:func:`prepare` (data, model, optimizer), :func:`resume_into` (a checkpoint's state),
:func:`run_epoch` (steps and validation checks) and :func:`finish` (test accuracy,
summary, curves); :class:`TrainState` is everything a checkpoint carries to continue.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from . import checkpoint, datasets, distributed, optim
from .backend import BackendUnavailable, asarray, backend_name, get_namespace, synchronize
from .losses import SoftmaxCrossEntropy
from .model import mlp

TEXTBOOK_SIZES = [784, 128, 64, 32, 16, 10]
#: The textbook's run; ``make_config`` overrides any of these.
DEFAULTS = {"device": "cpu", "dataset": "mnist-sample", "data_dir": None, "val_size": None,
            "sizes": TEXTBOOK_SIZES, "activation": "relu", "bn": True, "init": "msra",
            "optimizer": "sgd", "hyper": {"lr": 0.1}, "epochs": 30, "batch_size": 64,
            "target_loss": 0.12, "check_every": 44, "seed": 0, "dtype": "float32",
            "out": "runs/train", "graph": True, "quiet": False,
            "distributed": False, "sync_bn": False, "world_size": 1}  # see nnopt.distributed
#: Config keys a resumed run must share with its checkpoint.
RESUME_KEYS = ("dataset", "sizes", "activation", "bn", "init", "optimizer", "hyper",
               "batch_size", "seed", "dtype", "check_every", "target_loss", "val_size",
               "distributed", "sync_bn", "world_size")


# --- configuration ------------------------------------------------------------------------
def make_config(**overrides) -> dict:
    """The default run with ``overrides`` (same keys as :data:`DEFAULTS`), checked."""
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown training setting {unknown[0]!r}; known: {', '.join(DEFAULTS)}")
    config = json.loads(json.dumps({**DEFAULTS, **overrides}))  # a deep, JSON-clean copy
    config["optimizer"] = str(config["optimizer"]).lower()
    if config["distributed"] and "world_size" not in overrides:
        config["world_size"] = distributed.size()  # the job of distributed.init()
    validate_config(config)
    return config


def validate_config(config: dict) -> None:
    for key in ("epochs", "batch_size", "check_every"):
        if config[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {config[key]}")
    sizes = config["sizes"]
    if sizes[0] != 784 or sizes[-1] != 10:
        raise ValueError(f"--sizes must start with 784 (28x28 pixels) and end with 10 classes, got {sizes}")
    if config["sync_bn"] and not config["distributed"]:  # data parallelism: nnopt.distributed
        raise ValueError("--sync-bn synchronizes BN statistics across ranks: it needs --distributed "
                         "(mpiexec -n N python -m nnopt.train --distributed --sync-bn ...)")
    if config["distributed"]:
        distributed.check_batch(config["batch_size"], config["world_size"])


def parse_value(text):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if "," in text:
        return tuple(parse_value(t) for t in text.split(","))
    try:
        return int(text) if text.lstrip("-").isdigit() else float(text)
    except ValueError:
        return text


def build_parser():
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="python -m nnopt.train",
        description="Train the textbook's MNIST network (chapter 15) with or without Batch "
                    "Normalization and report epochs, iterations, time and test accuracy.")
    p.add_argument("--device", default=d["device"], help="cpu (NumPy) or gpu (CuPy); default cpu")
    p.add_argument("--dataset", default=None, choices=datasets.DATASETS,
                   help="default mnist-sample: the 10,000 MNIST test digits shipped with nnopt")
    p.add_argument("--data-dir", help="folder holding the IDX files (else $NNOPT_DATA, the "
                                      "user cache, system folders, then a download)")
    p.add_argument("--val-size", type=int, default=None,
                   help="training samples held out for validation (default 3000; 400 for the sample)")
    p.add_argument("--optimizer", default=d["optimizer"], help=f"one of {', '.join(optim.OPTIMIZERS)}")
    p.add_argument("--lr", type=float, default=d["hyper"]["lr"], help="learning rate (default 0.1)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="another optimizer hyper-parameter, e.g. --opt momentum=0.8, "
                        "--opt betas=0.9,0.99, --opt eps_inside_root=false (repeatable)")
    p.add_argument("--init", default=d["init"], help="weight initializer (msra, xavier, normal, ...)")
    p.add_argument("--activation", default=d["activation"], choices=["relu", "sigmoid", "tanh"])
    p.add_argument("--sizes", default=",".join(map(str, d["sizes"])),
                   help="layer sizes, comma separated (default the textbook's 784,128,64,32,16,10)")
    p.add_argument("--no-bn", dest="bn", action="store_false",
                   help="train the baseline without Batch Normalization")
    p.add_argument("--epochs", type=int, default=d["epochs"], help="at most this many epochs (default 30)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--target-loss", type=float, default=d["target_loss"],
                   help="stop when the validation loss is at most this (default 0.12; 0 never stops)")
    p.add_argument("--check-every", type=int, default=d["check_every"],
                   help="iterations between validation checks (default 44)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--dtype", default=d["dtype"], choices=["float32", "float64"])
    p.add_argument("--out", default=d["out"], help="output folder (default runs/train)")
    p.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint file or run folder")
    p.add_argument("--evaluate", metavar="CKPT", help="only report the test accuracy of a checkpoint")
    p.add_argument("--quiet", action="store_true", help="no per-check log lines")
    p.add_argument("--no-graph", dest="graph", action="store_false",
                   help="on the GPU, do not capture the training step as a CUDA graph")
    p.add_argument("--distributed", action="store_true",  # data parallelism: nnopt.distributed
                   help="data-parallel over the ranks of mpiexec -n N (MPI; NCCL on the GPU); "
                        "--batch-size is the global batch, split evenly between ranks")
    p.add_argument("--sync-bn", action="store_true",
                   help="with --distributed: BN statistics over the global batch, not each rank's shard")
    return p


def config_from_args(args) -> dict:
    hyper = {"lr": args.lr}
    for item in args.opt:
        if "=" not in item:
            raise ValueError(f"--opt expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        hyper[key.strip()] = parse_value(value.strip())
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise ValueError(f"--sizes must be integers separated by commas, got {args.sizes!r}") from None
    return make_config(device=args.device, dataset=args.dataset or DEFAULTS["dataset"],
                       data_dir=args.data_dir, val_size=args.val_size, sizes=sizes,
                       activation=args.activation, bn=args.bn, init=args.init,
                       optimizer=args.optimizer, hyper=hyper, epochs=args.epochs,
                       batch_size=args.batch_size, target_loss=args.target_loss,
                       check_every=args.check_every, seed=args.seed, dtype=args.dtype,
                       out=args.out, graph=args.graph, quiet=args.quiet,
                       distributed=args.distributed, sync_bn=args.sync_bn)


# --- the pieces of a run ------------------------------------------------------------------------
def build_model(config: dict, xp=None):
    """The network ``config`` describes, on ``xp`` (default: the config's device)."""
    xp = get_namespace(config["device"]) if xp is None else xp
    return mlp(config["sizes"], config["activation"], config["bn"], config["init"],
               config["seed"], xp, config["dtype"],
               bn_options={"sync": True} if config.get("sync_bn") else None)


def build_optimizer(config: dict, model):
    return optim.create(config["optimizer"], model, **config["hyper"])


@dataclasses.dataclass
class TrainState:
    """Where a run stands: saved in every checkpoint, so a resumed run continues exactly.

    ``pos`` is the next batch of the current epoch; the ``window_*`` sums cover the
    training steps since the last validation check."""
    epoch: int = 0
    pos: int = 0
    iteration: int = 0
    elapsed: float = 0.0
    reached: bool = False
    window_loss: float = 0.0
    window_correct: int = 0
    window_samples: int = 0
    history: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainState":
        saved = dict(saved)
        if "window" in saved:  # checkpoints of nnopt 0.1.0 kept the sums in a list
            saved["window_loss"], saved["window_correct"], saved["window_samples"] = saved.pop("window")
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


@dataclasses.dataclass
class Run:
    """Everything one training run works with."""
    config: dict
    xp: object
    data: datasets.Dataset
    arrays: dict          # split name -> (x, y) on the device
    model: object
    optimizer: object
    loss_fn: object
    out: Path
    log: object
    state: TrainState
    started: float = 0.0  # perf_counter() at the run's (virtual) start, resumed time included
    comm: object = distributed.LOCAL  # the ranks of a distributed run

    def save_checkpoint(self):
        if self.comm.is_root:  # distributed: rank 0 alone writes
            checkpoint.save(self.out / "checkpoint.npz", self.model.state_dict(),
                            self.optimizer.state_dict(),
                            {"config": self.config, "progress": self.state.to_dict()})


def prepare(config: dict, log=print) -> Run:
    """Load the data and build the model and optimizer; touches no file."""
    xp = get_namespace(config["device"])
    data = datasets.load(config["dataset"], config["data_dir"], n_val=config["val_size"])
    dtype = getattr(xp, config["dtype"])
    model = build_model(config, xp)
    arrays = {split: (asarray(getattr(data, f"x_{split}"), xp, dtype),
                      xp.asarray(getattr(data, f"y_{split}")))
              for split in ("train", "val", "test")}
    comm = distributed.current() if config.get("distributed") else distributed.LOCAL
    distributed.sync_parameters(model, comm)  # rank 0's initial parameters on every rank
    return Run(config, xp, data, arrays, model, build_optimizer(config, model),
               SoftmaxCrossEntropy(), Path(config["out"]), log, TrainState(), comm=comm)


def resume_into(run: Run, path) -> None:
    """Load a checkpoint's parameters, optimizer state and progress into ``run``."""
    model_state, opt_state, meta = checkpoint.load(path)
    saved, config = meta["config"], run.config
    diff = [k for k in RESUME_KEYS  # keys older checkpoints lack had their default value
            if saved.get(k, DEFAULTS.get(k)) != json.loads(json.dumps(config.get(k)))]
    if diff:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {config.get(k)!r}"
                            for k in diff)
        raise checkpoint.CheckpointError(
            f"checkpoint {path} was made with another configuration ({details}); "
            "pass the same flags, or start without --resume")
    try:
        run.model.load_state_dict(model_state)
        run.optimizer.load_state_dict(opt_state)
    except ValueError as exc:
        raise checkpoint.CheckpointError(f"checkpoint {path} does not fit this model: {exc}") from None
    run.state = TrainState.from_dict(meta["progress"])
    run.log(f"resumed from {path} at epoch {run.state.epoch + 1}, iteration {run.state.iteration}")


def batches_per_epoch(n: int, batch: int) -> int:
    # A last batch of one sample cannot be batch-normalized: fold it away.
    return n // batch if n % batch == 1 else math.ceil(n / batch)


def run_epoch(run: Run, epoch: int, step, window, stop, bar) -> bool:
    """Train from ``run.state.pos`` to the end of ``epoch`` (or the target, or a stop
    request), checking on the validation split every ``check_every`` iterations.
    Returns True when a stop request interrupted it."""
    config, state, xp = run.config, run.state, run.xp
    x_train, y_train = run.arrays["train"]
    n, batch = x_train.shape[0], config["batch_size"]
    per_epoch = batches_per_epoch(n, batch)
    if config.get("distributed"):  # every rank needs an equal, full shard: drop the last partial batch
        per_epoch = n // batch
    order = xp.asarray(np.random.default_rng([config["seed"], epoch]).permutation(n))
    for it in range(state.pos, per_epoch):
        if stop.requested:
            window.flush_into(state)
            return True
        idx = distributed.shard(order[it * batch:(it + 1) * batch], run.comm)  # this rank's part
        xb, yb = xp.take(x_train, idx, axis=0), xp.take(y_train, idx, axis=0)
        window.add(*step(xb, yb), yb)
        state.iteration += 1
        state.pos = it + 1
        if state.iteration % config["check_every"] == 0:
            window.flush_into(state)
            record = run.comm.bcast_object(check(run, epoch))  # rank 0's decides for all
            if run.comm.is_root:
                append_metric(run.out, record)
            if not config.get("quiet"):
                bar.end()
                run.log(format_record(record))
            if record["val_loss"] <= config["target_loss"]:
                state.reached = True
                break
        bar.show(epoch + 1, config["epochs"], it + 1, per_epoch)
    bar.end()
    window.flush_into(state)
    return False


def finish(run: Run) -> dict:
    """Test accuracy, summary.json and curves.png of a completed run."""
    config, state = run.config, run.state
    x_test, y_test = run.arrays["test"]
    test_loss, test_acc = evaluate(run.model, x_test, y_test, run.loss_fn)
    summary = {"dataset": config["dataset"], "bn": config["bn"], "device": config["device"],
               "epochs": state.epoch, "iterations": state.iteration,
               "time_s": round(state.elapsed, 3), "reached_target": state.reached,
               "test_loss": test_loss, "test_accuracy": test_acc, "data": run.data.description}
    if run.comm.is_root:  # distributed: rank 0 alone writes
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_curves(run.out / "curves.png", state.history, config)
    run.log(f"{'reached' if state.reached else 'did not reach'} validation loss "
            f"{config['target_loss']} after {summary['epochs']} epochs, {summary['iterations']} "
            f"iterations, {summary['time_s']:.1f} s; test accuracy {100 * test_acc:.2f}% "
            f"(loss {test_loss:.4f}) on {config['dataset']}")
    return summary


def fit(config: dict, resume=None, log=print) -> dict:
    """Train as ``config`` says; returns the summary (also written to summary.json)."""
    if config.get("distributed") and distributed.rank() != 0:
        log = lambda *_: None  # distributed: rank 0 alone logs and writes
    run = prepare(config, log)
    if resume:
        resume_into(run, resume)
    if run.comm.is_root:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_metrics(run.out, run.state.history)
    log(f"data: {run.data.description}")
    log(f"model: {run.model}; optimizer: {run.optimizer}; device: {config['device']}")
    state = run.state
    bar = ProgressBar(sys.stderr.isatty() and not os.environ.get("CI") and run.comm.is_root)
    step = Stepper(run.model, run.optimizer, run.loss_fn, config["batch_size"],
                   config.get("graph", True) and run.comm.size == 1, log, run.comm)
    window = Window(run.xp, run.comm)
    run.started = time.perf_counter() - state.elapsed
    interrupted = False
    with StopRequest() as local_stop, step.stream():
        stop = distributed.AgreedStop(local_stop, run.comm)  # all ranks stop at the same step
        for epoch in range(state.epoch, config["epochs"]):
            if state.reached:
                break
            interrupted = run_epoch(run, epoch, step, window, stop, bar)
            if interrupted:
                break
            state.epoch, state.pos = epoch + 1, 0
            state.elapsed = time.perf_counter() - run.started
            run.save_checkpoint()
    synchronize(run.xp)
    step.release()
    state.elapsed = time.perf_counter() - run.started
    run.save_checkpoint()
    if interrupted:
        log(f"interrupted at epoch {state.epoch + 1}, iteration {state.iteration}; "
            f"checkpoint saved: resume with --resume {run.out / 'checkpoint.npz'}")
        raise KeyboardInterrupt
    return finish(run)


# --- the training loop's helpers -------------------------------------------------------------
class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so the run stops at a
    consistent point and saves a checkpoint; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def evaluate(model, x, y, loss_fn, batch=4096):
    """Mean loss and accuracy (inference mode) over a whole split."""
    xp = model.xp
    total_loss, correct, n = 0.0, 0, x.shape[0]
    for start in range(0, n, batch):
        xb, yb = x[start:start + batch], y[start:start + batch]
        logits = model.forward(xb, train=False)
        total_loss += float(loss_fn.forward(logits, yb)) * xb.shape[0]
        correct += int(xp.sum(xp.astype(xp.argmax(logits, axis=1) == yb, xp.int64)))
    return total_loss / n, correct / n


class ProgressBar:
    def __init__(self, enabled):
        self.enabled = enabled

    def show(self, epoch, epochs, done, total):
        if self.enabled:
            filled = int(30 * done / total)
            sys.stderr.write(f"\repoch {epoch}/{epochs} [{'#' * filled}{'.' * (30 - filled)}] "
                             f"{done}/{total}")
            sys.stderr.flush()

    def end(self):
        if self.enabled:
            sys.stderr.write("\r" + " " * 60 + "\r")


class Window:
    """Training loss and correct predictions since the last check, summed where the arrays
    live (no host synchronisation per step); flushed into the state at checks."""

    def __init__(self, xp, comm=distributed.LOCAL):
        self.xp, self.comm = xp, comm
        self.reset()

    def reset(self):
        self.loss = self.xp.zeros((), dtype=self.xp.float64)
        self.correct = self.xp.zeros((), dtype=self.xp.int64)
        self.samples = 0

    def add(self, loss, prob, labels):
        xp = self.xp
        self.loss += xp.astype(loss, xp.float64) * labels.shape[0]
        self.correct += xp.sum(xp.astype(xp.argmax(prob, axis=1) == labels, xp.int64))
        self.samples += labels.shape[0]

    def flush_into(self, state: TrainState):
        sums = np.array([float(self.loss), int(self.correct), self.samples], dtype=np.float64)
        self.comm.allreduce_sum(sums)  # distributed: the global batch's sums, on every rank
        state.window_loss += float(sums[0])
        state.window_correct += int(sums[1])
        state.window_samples += int(sums[2])
        self.reset()


class Stepper:
    """One optimization step on a batch: replayed from a captured CUDA graph on the GPU
    (full batches, when capture works), else run eagerly. Returns (loss, softmax output)."""

    def __init__(self, model, optimizer, loss_fn, batch, use_graph, log, comm=distributed.LOCAL):
        self.model, self.optimizer, self.loss_fn, self.comm = model, optimizer, loss_fn, comm
        self.captured = None
        if use_graph and backend_name(model.xp) == "cupy":
            from .graph import CapturedStep
            try:
                self.captured = CapturedStep(model, optimizer, loss_fn,
                                             (batch, model.layers[0].n_in), (batch,))
                log(f"CUDA graph: one captured training step of batch {batch}, replayed")
            except Exception as exc:  # capture is an optimisation: run eagerly instead
                log(f"CUDA graph capture unavailable ({type(exc).__name__}: {exc}); running eagerly")

    def __call__(self, xb, yb):
        if self.captured is not None and xb.shape[0] == self.captured.x.shape[0]:
            return self.captured.step(xb, yb), self.captured.prob
        self.model.zero_grad()
        loss = self.model.loss_and_backward(xb, yb, self.loss_fn)
        self.comm.allreduce_mean(self.model.flat.grad)  # distributed: one collective per step
        self.optimizer.step()
        return loss, self.loss_fn.prob

    def stream(self):
        """Where the whole loop's device work goes: the captured graph's stream."""
        return self.captured.stream if self.captured is not None else contextlib.nullcontext()

    def release(self):
        if self.captured is not None:
            self.captured.release()


def check(run: Run, epoch: int) -> dict:
    """Validate, and turn the training window into one metrics record."""
    state = run.state
    x_val, y_val = run.arrays["val"]
    val_loss, val_acc = evaluate(run.model, x_val, y_val, run.loss_fn)
    record = {"epoch": epoch + 1, "iteration": state.iteration,
              "train_loss": state.window_loss / state.window_samples,
              "train_accuracy": state.window_correct / state.window_samples,
              "val_loss": val_loss, "val_accuracy": val_acc,
              "time_s": round(time.perf_counter() - run.started, 3)}
    state.window_loss, state.window_correct, state.window_samples = 0.0, 0, 0
    state.history.append(record)
    return record


def format_record(r):
    return (f"epoch {r['epoch']:3d} iter {r['iteration']:6d}  train loss {r['train_loss']:.4f} "
            f"acc {100 * r['train_accuracy']:.2f}%  val loss {r['val_loss']:.4f} "
            f"acc {100 * r['val_accuracy']:.2f}%  {r['time_s']:.1f} s")


def write_metrics(out, history):
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))


def append_metric(out, record):
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


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
    ax_loss.set_yscale("log")
    for key, label in (("train_accuracy", "train"), ("val_accuracy", "validation")):
        ax_acc.plot(it, [100 * r[key] for r in history], label=label)
    ax_acc.set(xlabel="iteration", ylabel="accuracy (%)", title=f"Accuracy: {title}")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the command line ------------------------------------------------------------------------
def run_evaluate(args) -> int:
    model_state, _, meta = checkpoint.load(args.evaluate)
    config = meta["config"]
    dataset = args.dataset or config["dataset"]
    xp = get_namespace(args.device)
    data = datasets.load(dataset, args.data_dir or config.get("data_dir"))
    model = build_model(config, xp)
    try:
        model.load_state_dict(model_state)
    except ValueError as exc:
        raise checkpoint.CheckpointError(f"checkpoint {args.evaluate}: {exc}") from None
    dtype = getattr(xp, config["dtype"])
    loss, acc = evaluate(model, asarray(data.x_test, xp, dtype), xp.asarray(data.y_test),
                         SoftmaxCrossEntropy())
    print(f"test accuracy {100 * acc:.2f}% (loss {loss:.4f}) on {data.x_test.shape[0]} "
          f"images of {dataset}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.evaluate:
            return run_evaluate(args)
        comm = distributed.init(args.device, print) if args.distributed else distributed.LOCAL
        with distributed.fail_together(comm):  # one failing rank must not hang the others
            fit(config_from_args(args), resume=args.resume, log=lambda s: print(s, flush=True))
        return 0
    except KeyboardInterrupt:
        return 130
    except (BackendUnavailable, datasets.DataError, checkpoint.CheckpointError,
            ValueError, TypeError) as exc:
        print(f"nnopt.train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
