"""python -m nnopt.experiments {init,optimizers,contours,bn,all} [--out DIR] [--quick] ..."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .. import datasets, runs
from ..config import DEVICES
from ..errors import InputError
from ..backend import BackendUnavailable, get_namespace
from . import EXPERIMENTS, run_sections
from .report import Context, write

SEEDS, QUICK_SEEDS = 8, 3
STAGING = ".incoming"  # the report being written, inside --out


def main(argv=None) -> int:
    named = Path(sys.argv[0]).name == "nnopt-experiments"  # the console script
    p = argparse.ArgumentParser(prog="nnopt-experiments" if named else "python -m nnopt.experiments",
                                description="Run the chapter's experiments; write PNG figures "
                                            "and a Markdown report beside the textbook's numbers.")
    p.add_argument("name", choices=[*EXPERIMENTS, "all"],
                   help="init: activation histograms per layer and initializer, the zero-init "
                        "demo; optimizers: the curve-fitting runs of 15.2/15.3; contours: "
                        "optimizer paths on loss contours; bn: BN's effect on a layer's inputs "
                        "and Table 15-12 (BN vs no BN); all: every one, one report")
    p.add_argument("--out", default=None, help="output folder (default experiments/NAME)")
    p.add_argument("--device", default="cpu", help="cpu or gpu")
    p.add_argument("--quick", action="store_true",
                   help=f"short settings and {QUICK_SEEDS} seeds unless --seeds says otherwise")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"how many seeds every stochastic claim runs over (default {SEEDS})")
    p.add_argument("--dataset", default="mnist-sample", choices=datasets.DATASETS,
                   help="data for the BN comparison (default: the embedded sample)")
    p.add_argument("--data-dir", default=None, help="folder holding the data set's IDX files "
                   "(else $NNOPT_DATA, the user cache, system folders, then a download)")
    args = p.parse_args(argv)
    problem = check_arguments(args)
    if problem:
        print(f"nnopt.experiments: error: {problem}", file=sys.stderr)
        return 2
    try:
        get_namespace(args.device)
    except (BackendUnavailable, ValueError) as exc:
        print(f"nnopt.experiments: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or f"experiments/{args.name}")
    # The new report is written beside the earlier one and replaces it only when whole, so
    # an interrupted or failed run leaves the earlier report as it was.
    staging = out / STAGING
    try:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # what an interrupted run left
        staging.mkdir()
    except OSError as exc:
        print(f"nnopt.experiments: error: cannot write to --out {out}: {exc.strerror}", file=sys.stderr)
        return 2
    seeds = args.seeds or (QUICK_SEEDS if args.quick else SEEDS)
    ctx = Context(out=staging, quick=args.quick, device=args.device, seed=args.seed,
                  seeds=seeds, dataset=args.dataset, data_dir=args.data_dir)
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    if "bn" not in names and (args.dataset != "mnist-sample" or args.data_dir):
        print(f"note: --dataset and --data-dir are used by the bn section only; {args.name} "
              "ignores them")
    started = time.perf_counter()
    try:
        sections = run_sections(ctx, names)
        write(ctx, sections, time.perf_counter() - started)
    except datasets.DataError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"nnopt.experiments: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"nnopt.experiments: interrupted; {out} holds what it held before",
              file=sys.stderr)
        return 130
    removed = clear_earlier_report(out)
    publish(staging, out)
    if removed:
        print(f"note: {out} held an earlier report; its {removed} files were replaced")
    path = out / "report.md"
    for section in sections:
        for c in section.claims:
            mark = ("?" if c.settled is False else " ") + ("q" if c.capped else " ")
            print(f"  [{c.verdict:>6}{mark}] {c.claim} (held in {c.held_text}): {c.reason}")
    unsettled = [c for section in sections for c in section.claims if c.settled is False]
    if unsettled:
        print("  ?: unsettled (other seeds may give another verdict; more seeds: --seeds)")
        for c in unsettled:
            print(f"     {c.claim}: {c.settle_hint}")
    capped = [c for section in sections for c in section.claims if c.capped]
    if capped:
        print("  q: tested with --quick's shorter budget, not the chapter's: "
              + "; ".join(sorted({c.capped for c in capped})))
    print(f"report: {path} ({time.perf_counter() - started:.1f} s)")
    return 0


#: What the sections write into --out (beside report.md and claims.json).
OUTPUTS = ("init_*.png", "optimizers_*.png", "contours_*.png", "contours_*.gif", "bn_*.png")


def clear_earlier_report(out: Path) -> int:
    """Remove what an earlier run of the experiments wrote into ``out`` (recognised by its
    claims.json), so that no figure or BN run of another section or seed stays beside the
    new report. Returns how many entries went; a folder without an nnopt claims.json is
    left alone."""
    try:
        earlier = json.loads((out / "claims.json").read_text())
    except (OSError, ValueError):
        return 0
    if not (isinstance(earlier, dict) and {"rule", "claims"} <= set(earlier)):
        return 0
    entries = [p for pattern in OUTPUTS for p in out.glob(pattern)]
    entries += [p for p in (out / "bn_runs", out / "report.md", out / "claims.json") if p.exists()]
    for path in entries:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return len(entries)


def publish(staging: Path, out: Path):
    """Move the finished report from ``staging`` into ``out``; the BN runs' config.json
    then names the folder they now lie in (the one to ``--resume``)."""
    for entry in staging.iterdir():
        if (out / entry.name).is_dir():  # bn_runs of a run stopped before its claims.json
            shutil.rmtree(out / entry.name)
        entry.replace(out / entry.name)
    staging.rmdir()
    for config_file in (out / "bn_runs").glob("*/config.json"):
        config = json.loads(config_file.read_text())
        config["out"] = str(config_file.parent)
        runs.write_json(config_file, config)


def check_arguments(args) -> str | None:
    """The one-line problem with the arguments, or None."""
    if args.seeds is not None and args.seeds < 1:
        return f"--seeds must be at least 1, got {args.seeds}"
    if args.seed < 0:
        return f"--seed must be 0 or more, got {args.seed}"
    seeds = args.seeds or (QUICK_SEEDS if args.quick else SEEDS)
    if args.seed + seeds > 2**63:  # the engine's seeds are 64-bit integers
        return f"--seed must be below 2**63 less the seed count, got {args.seed}"
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        return f"--out {args.out} is a file; give a folder"
    if args.out is not None and not args.out.strip():
        return "--out is empty; give the output folder (e.g. --out experiments/mine)"
    try:
        datasets.check_sample_folder(args.dataset, args.data_dir)
    except InputError as exc:
        return str(exc)
    if str(args.device).lower() not in DEVICES:  # (the backends' test names: not for training)
        return f"--device must be cpu or gpu, got {args.device!r}"
    return None


def cli():
    """The command: :func:`main`, then out without tearing the interpreter down (unloading
    numba's compiled code takes about 0.8 s here, a tenth of ``all --quick``)."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
