"""BN with and without synchronization at small per-rank batches: N ranks x 8 samples,
simulated with ``mpiexec -n N`` on one machine; loss and accuracy curves side by side.

    python bench/experiment_sync_bn.py --ranks 2,4,8,16 --per-rank 8 --epochs 1 [--out FILE.json]

Without synchronization each rank normalizes over its own 8 samples (noisy batch
statistics, and a running variance estimated from 8-sample batches); with it, over the
N x 8 samples of the global batch, i.e. the model one process would train with that
batch. Writes results/sync_bn.json (or --out), the PNG beside it, and prints a Markdown
table.
16 ranks on a 2-core machine is slow: pick ``--ranks`` to fit.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def run(n, per_rank, sync, args, out):
    cmd = ["mpiexec", "-n", str(n), sys.executable, "-m", "nnopt.train", "--distributed",
           "--batch-size", str(n * per_rank), "--epochs", str(args.epochs), "--lr", str(args.lr),
           "--check-every", str(args.check_every), "--target-loss", "0", "--quiet",
           "--out", str(out)] + (["--sync-bn"] if sync else [])
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")}
    env = {**os.environ, **threads, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=args.timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    history = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    return {"ranks": n, "per_rank": per_rank, "sync_bn": sync, "history": history,
            "summary": json.loads((out / "summary.json").read_text())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="2,4,8,16")
    p.add_argument("--per-rank", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--check-every", type=int, default=50)
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--out", type=Path, default=RESULTS / "sync_bn.json",
                   help="the JSON to write, its PNG beside it (default %(default)s)")
    args = p.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(r) for r in args.ranks.split(",")]:
            for sync in (False, True):
                out = Path(tmp) / f"n{n}-{'sync' if sync else 'local'}"
                runs.append(run(n, args.per_rank, sync, args, out))
                s = runs[-1]["summary"]
                print(f"{n} ranks x {args.per_rank}, sync BN {sync}: test accuracy "
                      f"{100 * s['test_accuracy']:.2f}%, loss {s['test_loss']:.4f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(runs, indent=1) + "\n")
    print("\n| ranks x per-rank | BN | final val loss | final val acc | test acc |")
    print("|---|---|---|---|---|")
    for r in runs:
        last, s = r["history"][-1], r["summary"]
        print(f"| {r['ranks']} x {r['per_rank']} | {'sync' if r['sync_bn'] else 'per rank'} | "
              f"{last['val_loss']:.4f} | {100 * last['val_accuracy']:.2f}% | "
              f"{100 * s['test_accuracy']:.2f}% |")
    plot(runs, args.out.with_suffix(".png"))
    return 0


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc, ax_test) = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ranks = sorted({r["ranks"] for r in runs})
    for r in runs:
        color = colors[ranks.index(r["ranks"]) % len(colors)]
        style = "-o" if r["sync_bn"] else "--s"  # markers: large N has few checks per epoch
        label = f"{r['ranks']} x {r['per_rank']}, {'sync BN' if r['sync_bn'] else 'per-rank BN'}"
        it = [h["iteration"] * r["ranks"] * r["per_rank"] for h in r["history"]]
        ax_loss.plot(it, [h["val_loss"] for h in r["history"]], style, color=color, label=label)
        ax_acc.plot(it, [100 * h["val_accuracy"] for h in r["history"]], style, color=color,
                    label=label)
    ax_loss.set(xlabel="training samples seen", ylabel="validation loss", yscale="log",
                title="Validation loss (solid: sync BN, dashed: per-rank BN)")
    ax_acc.set(xlabel="training samples seen", ylabel="validation accuracy (%)",
               title="Validation accuracy")
    for sync, style in ((True, "-o"), (False, "--s")):
        final = {r["ranks"]: 100 * r["summary"]["test_accuracy"] for r in runs if r["sync_bn"] == sync}
        ax_test.plot(sorted(final), [final[n] for n in sorted(final)], style, color="k",
                     label="sync BN" if sync else "per-rank BN")
    ax_test.set(xlabel="ranks (8 samples each)", ylabel="test accuracy (%)", xscale="log",
                title="Test accuracy after the run")
    ax_test.set_xticks(ranks, [str(n) for n in ranks])
    ax_test.minorticks_off()
    for ax in (ax_loss, ax_acc, ax_test):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
