"""The command line of :mod:`nnopt.train` (``python -m nnopt.train``, ``nnopt-train``).

What it adds to :func:`nnopt.train.fit`: flags, ``--config FILE`` (a run's own
config.json; flags given on the command line override it), ``--resume DIR`` (the saved
configuration, continued in DIR: only the flags in :data:`RESUMABLE` may change),
output-folder safety (the default folder moves on to ``runs/train-2`` instead of
overwriting a run; an explicit ``--out`` that holds a run needs ``--overwrite``),
``--dry-run``, ``--evaluate``, and one-line errors with distinct exit codes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__, checkpoint, datasets, distributed, optim, runs
from .backend import asarray, get_namespace
from .errors import InputError, NnoptError, check_bool
from .losses import SoftmaxCrossEntropy
from .optim import schedules
from .train import (DEFAULTS, RESUME_KEYS, TrainingDiverged, TrainState, build_model, evaluate,
                    fit, make_config, prepare, resolve_saved)

#: Flags a resumed run may change: how long it runs and how it talks, where the data and
#: the arrays live; everything else is the saved run's.
RESUMABLE = ("epochs", "target_loss", "quiet", "device", "graph", "data_dir", "fused",
             "blas_threads")
EXIT_ERROR, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


def parse_value(text):
    """An ``--opt`` value: true/false/yes/no/on/off as booleans, numbers, comma lists, else
    text."""
    low = text.strip().lower()
    if low in ("true", "false", "yes", "no", "on", "off"):
        return check_bool("--opt value", low)
    if "," in text:
        return [parse_value(t) for t in text.split(",")]
    try:
        return int(text) if text.strip().lstrip("-").isdigit() else float(text)
    except ValueError:
        return text


def blas_threads(text):
    """``--blas-threads``: a count >= 1 or auto."""
    if text.strip().lower() == "auto":
        return "auto"
    if text.strip().isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected a thread count >= 1 or auto, got {text!r}")


def prog_name() -> str:
    return "nnopt-train" if Path(sys.argv[0]).name == "nnopt-train" else "python -m nnopt.train"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default, where it has one worth showing: not a flag's (it is off
    until given: "--no-bn (default: True)" read as if BN were off), nor a None or empty one
    (the help says what happens without the option)."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None or action.default == []:
            return action.help
        return super()._get_help_string(action)


def build_parser(defaults=True) -> argparse.ArgumentParser:
    """The parser; ``defaults=False`` leaves out every flag not given (to tell which were)."""
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog=prog_name(), formatter_class=HelpFormatter,
        argument_default=None if defaults else argparse.SUPPRESS,
        description="Train the textbook's MNIST network (chapter 15) with or without Batch "
                    "Normalization and report epochs, iterations, time and test accuracy.")
    add = p.add_argument
    default = (lambda value: value) if defaults else (lambda value: argparse.SUPPRESS)

    def switch(flag, help, dest=None, on=True):
        """A flag without a value: sets ``dest`` to ``on`` (off by default)."""
        add(flag, dest=dest, action="store_true" if on else "store_false",
            default=default(not on), help=help)
    add("--version", action="version", version=f"nnopt {__version__}")
    add("--device", default=default(d["device"]), help="cpu (NumPy) or gpu (CuPy)")
    add("--dataset", default=default(d["dataset"]), choices=datasets.DATASETS,
        help="mnist-sample: the 10,000 MNIST test digits shipped with nnopt")
    add("--data-dir", default=default(None), help="folder holding the IDX files (else "
        "$NNOPT_DATA, the user cache, system folders, then a download)")
    add("--val-size", type=int, default=default(None),
        help="training images held out for validation (None: 400 for mnist-sample, else 3000)")
    add("--optimizer", default=default(d["optimizer"]), help=f"one of {', '.join(optim.OPTIMIZERS)}")
    add("--lr", type=float, default=default(d["hyper"]["lr"]), help="learning rate")
    add("--opt", action="append", default=default([]), metavar="KEY=VALUE",
        help="another optimizer hyper-parameter, e.g. --opt momentum=0.8, --opt betas=0.9,0.99, "
             "--opt eps_inside_root=false, --opt weight_decay=1e-4 (repeatable)")
    add("--schedule", default=default("none"), choices=["none", *schedules.SCHEDULES],
        help="learning-rate schedule, stepped once per epoch")
    add("--schedule-opt", action="append", default=default([]), metavar="KEY=VALUE",
        help="a schedule parameter, e.g. --schedule-opt milestones=3,6 (repeatable): "
             + "; ".join(f"{name}: {', '.join(params)}"
                         for name, (_, params) in schedules.SCHEDULES.items()))
    add("--init", default=default(d["init"]), help="weight initializer (msra, xavier, normal, ...)")
    add("--activation", default=default(d["activation"]), choices=["relu", "sigmoid", "tanh"])
    add("--sizes", default=default(",".join(map(str, d["sizes"]))), help="layer sizes, comma separated")
    switch("--no-bn", "train the baseline without Batch Normalization", dest="bn", on=False)
    add("--epochs", type=int, default=default(d["epochs"]), help="at most this many epochs")
    add("--batch-size", type=int, default=default(d["batch_size"]))
    add("--target-loss", type=float, default=default(d["target_loss"]),
        help="stop when the validation loss is at most this (0: never stop early)")
    add("--check-every", type=int, default=default(d["check_every"]),
        help="iterations between validation checks")
    add("--seed", type=int, default=default(d["seed"]), help="seed of the weights and the shuffle")
    add("--dtype", default=default(d["dtype"]), choices=["float32", "float64"])
    add("--out", default=default(None), help="output folder (default runs/train, or the next "
        "free runs/train-N when that holds a run)")
    switch("--overwrite", "replace the run in an existing --out folder")
    add("--config", metavar="FILE", default=default(None),
        help="start from a run's config.json; flags given here override it")
    add("--resume", metavar="DIR", default=default(None),
        help="continue the run in DIR (or of a checkpoint file) with its saved settings")
    add("--evaluate", metavar="CKPT", default=default(None),
        help="only report the test accuracy of a checkpoint, with its saved settings "
             "(--device and --data-dir may be given)")
    switch("--dry-run", "check the configuration (data, model, one forward pass), print it, "
           "write nothing")
    switch("--quiet", "no progress bar: one line per epoch")
    switch("--no-graph", "on the GPU, do not capture the training step as a CUDA graph",
           dest="graph", on=False)
    switch("--layers", "run the textbook's layer-by-layer model instead of fused FC -> BN -> "
           "ReLU blocks (the same model and parameters; slower on the CPU)", dest="fused", on=False)
    add("--blas-threads", type=blas_threads, default=default(None), metavar="N|auto",
        help="BLAS threads of every product, fixed for the run so that it (and a resumed run "
             "on the same count) repeats bit for bit (None: the cores this process may use); "
             "auto: the cores other processes leave free, product by product (faster beside "
             "a busy process, not bit for bit)")
    switch("--distributed", "data-parallel over the ranks of mpiexec -n N (MPI; NCCL on the "
           "GPU); --batch-size is the global batch, split evenly between ranks")
    switch("--sync-bn", "with --distributed: BN statistics over the global batch, not each "
           "rank's shard")
    return p


def pairs(items, flag) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"{flag} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out


def overrides_from(args, given) -> dict:
    """The config entries the flags in ``given`` set."""
    out = {}
    simple = ("device", "dataset", "data_dir", "val_size", "optimizer", "init", "activation",
              "bn", "epochs", "batch_size", "target_loss", "check_every", "seed", "dtype",
              "out", "quiet", "graph", "distributed", "sync_bn", "fused", "blas_threads")
    for key in simple:
        if key in given:
            out[key] = getattr(args, key)
    if "sizes" in given:
        try:
            out["sizes"] = [int(s) for s in args.sizes.split(",")]
        except ValueError:
            raise InputError(f"--sizes must be integers separated by commas, got {args.sizes!r}") from None
    if given & {"lr", "opt"}:
        opt = pairs(args.opt, "--opt")
        if "lr" in given and "lr" in opt and opt["lr"] != args.lr:
            raise InputError(f"--lr {args.lr:g} and --opt lr={opt['lr']} name two learning "
                             "rates; give one of them")
        out["hyper"] = {**({"lr": args.lr} if "lr" in given else {}), **opt}
    if given & {"schedule", "schedule_opt"}:
        name, options = args.schedule, pairs(args.schedule_opt, "--schedule-opt")
        if name == "none" and options:
            raise InputError("--schedule-opt sets a schedule's parameters: name the schedule "
                             f"with --schedule ({', '.join(schedules.SCHEDULES)})")
        out["schedule"] = None if name == "none" else {"name": name, **options}
    return out


def given_flags(argv) -> set:
    return set(vars(build_parser(defaults=False).parse_args(argv)))


def given_options(dests, argv) -> list:
    """The options, as the user spelled them, that set the settings ``dests``."""
    spelled = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    return [option for action in build_parser()._actions if action.dest in dests
            for option in action.option_strings if option in spelled]


def resolve(args, given):
    """``(config, resume_path, overwrite)`` for a fresh, configured or resumed run."""
    if args.resume:
        return resolve_resume(args, given)
    base = read_config(args.config) if args.config else {}
    # how the saved run was launched is not a setting: this job's flag and ranks say it
    base = {k: v for k, v in base.items() if k not in ("distributed", "world_size")}
    overrides = overrides_from(args, given)
    if "optimizer" in overrides and overrides["optimizer"].lower() != str(base.get("optimizer")).lower():
        base.pop("hyper", None)  # the saved optimizer's (its defaults included): not the new one's
    if "hyper" in overrides:  # --lr's default (0.1) holds for every optimizer, as the textbook's
        lr = {"lr": args.lr} if "lr" in given or not base else {}
        overrides["hyper"] = {**base.get("hyper", {}), **lr, **overrides["hyper"]}
    config = make_config(**{**base, **overrides})
    config["out"] = str(runs.fresh_folder(config["out"], args.overwrite,
                                          numbered="out" not in given))
    return config, None, args.overwrite


def read_config(path) -> dict:
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"--config {path}: cannot read a run configuration ({exc})") from None
    if not isinstance(saved, dict):
        raise InputError(f"--config {path} is not a run's config.json")
    unknown = sorted(set(saved) - set(DEFAULTS))
    if unknown:
        raise InputError(f"--config {path}: unknown setting {unknown[0]!r}; it is not a "
                         "config.json written by nnopt.train")
    saved.pop("out", None)
    return saved


def resolve_resume(args, given):
    path = Path(args.resume)
    folder = path if path.is_dir() else path.parent
    _, _, meta = checkpoint.load(path)
    own = folder / "checkpoint.npz"
    if not path.is_dir() and own.exists() and own.resolve() != path.resolve():
        raise InputError(f"--resume {path}: a run continues in its checkpoint's folder, and "
                         f"{own} there (another point of a run, or another run) would be "
                         f"replaced; copy {path.name} into a new folder as checkpoint.npz and "
                         "resume that folder")
    saved = resolve_saved(meta["config"])
    if "out" in given and Path(args.out).resolve() != folder.resolve():
        raise InputError(f"--resume continues the run in {folder}; leave out --out "
                         f"({args.out}), or copy the run folder first")
    if "config" in given:
        raise InputError("--resume takes the saved run's configuration; leave out --config")
    if "overwrite" in given:
        raise InputError(f"--resume continues the run in {folder} and --overwrite would replace "
                         "it; leave out one of them")
    check_config_file(folder, saved)
    check_resumed_ranks(saved, folder, args.distributed)
    requested = overrides_from(args, given)
    if "hyper" in requested:  # --lr or --opt name some of the saved run's hyper-parameters
        requested["hyper"] = {**saved["hyper"], **requested["hyper"]}
    fixed = {k: v for k, v in make_config(**{**saved, **requested}).items()
             if k in requested and k not in RESUMABLE}
    changed = sorted(k for k, v in fixed.items() if v != saved.get(k))
    if changed:
        key = changed[0]
        raise InputError(
            f"--resume continues the saved run, whose {key} is {saved.get(key)!r} (asked: "
            f"{fixed[key]!r}); only --epochs, --target-loss, --quiet, --device, --no-graph, "
            "--layers, --blas-threads and --data-dir may change. Start a new run (with --config "
            f"{folder / 'config.json'}) to change the rest")
    config = make_config(**{**saved, **{k: v for k, v in requested.items() if k in RESUMABLE}})
    try:
        trained = TrainState.from_dict(meta["progress"]).epochs_begun
    except (KeyError, TypeError, ValueError):  # damaged: resume_into names the entry
        trained = None
    if trained is not None and config["epochs"] < trained:
        raise InputError(f"--epochs {config['epochs']} is fewer than the {trained} epochs the run "
                         f"in {folder} has trained; give --epochs {trained} or more")
    config["out"] = str(folder)
    return config, path, False


EVALUATE_FLAGS = ("evaluate", "device", "data_dir", "dataset", "quiet")


def check_config_file(folder, saved) -> None:
    """The run's config.json must describe its checkpoint's run: a checkpoint copied from
    another run, or a hand-edited config.json, would otherwise be resumed (and the file
    rewritten) without a word."""
    try:
        written = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # none, or unreadable: the checkpoint alone describes the run
    if not isinstance(written, dict):
        return
    written = resolve_saved({k: v for k, v in written.items() if k in DEFAULTS})
    differ = [k for k in RESUME_KEYS if written.get(k) != saved.get(k)]
    if differ:
        key = differ[0]
        raise InputError(f"{folder / 'config.json'} and the checkpoint disagree on {key} "
                         "(config.json: "
                         f"{written.get(key)!r}, checkpoint: {saved.get(key)!r}): the checkpoint "
                         "is another run's, or config.json was edited. --resume continues the "
                         f"checkpoint's run; to train with the file's settings, start a new run "
                         f"with --config {folder / 'config.json'}")


def check_resumed_ranks(saved, folder, distributed_flag) -> None:
    """A data-parallel run continues only as the same number of ranks: its batches are
    split among them, so another count is another run."""
    if not saved.get("distributed"):
        return
    ranks, now = saved["world_size"], distributed.size() if distributed_flag else 1
    if not distributed_flag or now != ranks:
        raise InputError(f"the run in {folder} was trained data-parallel over {ranks} ranks; "
                         f"resume it the same way: mpiexec -n {ranks} {prog_name()} "
                         f"--distributed --resume {folder} (this job: {now} rank(s)"
                         f"{'' if distributed_flag else ' without --distributed'})")


def run_evaluate(args, given, argv) -> int:
    unused = given - set(EVALUATE_FLAGS)
    ignored = given_options(unused, argv) or sorted(unused)  # (an abbreviated option: its name)
    if ignored:
        raise InputError(f"--evaluate reports a checkpoint as it was trained; {', '.join(ignored)} "
                         "would change nothing there. Leave them out (--device and --data-dir "
                         "may be given)")
    model_state, _, meta = checkpoint.load(args.evaluate)
    config = resolve_saved(meta["config"])
    if "dataset" in given and args.dataset != config["dataset"]:
        raise InputError(f"checkpoint {args.evaluate} was trained on {config['dataset']}; "
                         f"evaluating it on {args.dataset} would measure nothing. Evaluate on "
                         f"{config['dataset']} (leave out --dataset)")
    xp = get_namespace(args.device)
    data = datasets.load(config["dataset"], args.data_dir or config.get("data_dir"),
                         n_val=config["val_size"])
    model = build_model(config, xp)
    try:
        model.load_state_dict(model_state)
    except ValueError as exc:
        raise checkpoint.CheckpointError(f"checkpoint {args.evaluate}: {exc}") from None
    dtype = getattr(xp, config["dtype"])
    loss, acc = evaluate(model, asarray(data.x_test, xp, dtype), xp.asarray(data.y_test),
                         SoftmaxCrossEntropy())
    print(f"test accuracy {100 * acc:.2f}% (loss {loss:.4f}) on {data.x_test.shape[0]} "
          f"images of {config['dataset']}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    given = given_flags(argv)
    log = lambda line: print(line, flush=True)  # noqa: E731
    refusal = launch_refusal(args, distributed.launched_ranks())
    if refusal:  # every rank of the job reaches it: one says why
        if distributed.launched_rank() == 0:
            print(f"{prog_name()}: error: {refusal}", file=sys.stderr)
        return EXIT_ERROR
    try:
        if args.evaluate:
            return run_evaluate(args, given, argv)
        comm = distributed.init(args.device, log) if args.distributed else distributed.LOCAL
        with distributed.fail_together(comm):  # one failing rank must not hang the others
            return run_training(args, given, log, comm)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except TrainingDiverged as exc:
        print(f"{prog_name()}: stopped: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except NnoptError as exc:
        print(f"{prog_name()}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def launch_refusal(args, launched):
    """Why a job of ``launched`` processes must not run this command line, or None."""
    if launched > 1 and args.evaluate:  # every rank would evaluate the test split and print it
        return (f"--evaluate runs in one process; mpiexec started {launched}. Run it without "
                f"mpiexec: {prog_name()} --evaluate {args.evaluate}")
    if launched > 1 and not args.distributed:
        return (f"mpiexec started {launched} processes but --distributed is not given: each "
                "would train the whole run alone and write the same files. Add --distributed "
                "(data-parallel), or run one process")
    return None


def run_training(args, given, log, comm=distributed.LOCAL) -> int:
    config, resume, overwrite = resolve(args, given)
    if args.dry_run:
        run = prepare(config, log)
        if comm.is_root:  # (distributed: every rank checked its part; one report)
            hyper = {k: v for k, v in run.optimizer.param_groups[0].items() if k != "params"}
            print(runs.dumps({**config, "hyper": hyper}, indent=2))
            print(f"dry run: configuration, data and one forward pass are fine on "
                  f"{comm.size} rank(s); nothing written (a real run would write to "
                  f"{config['out']})")
        return 0
    fit(config, resume=resume, log=log, overwrite=overwrite, numbered="out" not in given)
    return 0


if __name__ == "__main__":
    sys.exit(main())
