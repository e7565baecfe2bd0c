"""python -m nnopt.experiments {init,optimizers,contours,bn,all} [--out DIR] [--quick] ..."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .. import datasets
from ..backend import BackendUnavailable, get_namespace
from . import EXPERIMENTS
from .report import Context, verdict, write


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nnopt.experiments",
                                description="Run the chapter's experiments; write PNG figures "
                                            "and a Markdown report beside the textbook's numbers.")
    p.add_argument("name", choices=[*EXPERIMENTS, "all"])
    p.add_argument("--out", default=None, help="output folder (default experiments/NAME)")
    p.add_argument("--device", default="cpu", help="cpu or gpu")
    p.add_argument("--quick", action="store_true", help="short settings (seconds, for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="mnist-sample", choices=datasets.DATASETS,
                   help="data for the BN comparison (default: the embedded sample)")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    try:
        get_namespace(args.device)
    except (BackendUnavailable, ValueError) as exc:
        print(f"nnopt.experiments: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or f"experiments/{args.name}")
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out=out, quick=args.quick, device=args.device, seed=args.seed,
                  dataset=args.dataset, data_dir=args.data_dir)
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    started, sections = time.perf_counter(), []
    try:
        for name in names:
            t0 = time.perf_counter()
            sections.append(EXPERIMENTS[name](ctx))
            print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
    except datasets.DataError as exc:
        print(f"nnopt.experiments: error: {exc}", file=sys.stderr)
        return 2
    path = write(ctx, sections, time.perf_counter() - started)
    for section in sections:
        for c in section.claims:
            print(f"  [{verdict(c.held):>6}] {c.claim}: {c.ours}")
    print(f"report: {path} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
