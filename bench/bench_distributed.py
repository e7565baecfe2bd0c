"""Data-parallel step time and the allreduce's share of it, vs the number of ranks, on this
machine (``mpiexec -n N`` on one host), plus the ring-allreduce cost model for N machines.

    python bench/bench_distributed.py --ranks 1,2,4 --per-rank 64 --steps 100

Each rank trains the textbook network (784-128-64-32-16-10 with BN, 111,994 parameters)
on synthetic batches of ``--per-rank`` samples; rank 0 reports the median step time and
the median time of the gradient allreduce inside it. On one machine ranks share its
cores and memory, so this measures the overhead of the machinery, not a cluster.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARAMS = 111_994  # the textbook network with BN (model.n_params)


def worker(per_rank: int, steps: int, sync_bn: bool) -> None:
    import numpy as np
    from nnopt import distributed, optim
    from nnopt.losses import SoftmaxCrossEntropy
    from nnopt.model import mlp
    comm = distributed.init("cpu")
    model = mlp([784, 128, 64, 32, 16, 10], "relu", True, bn_options={"sync": True} if sync_bn else None)
    opt, loss = optim.create("sgd", model, lr=0.1), SoftmaxCrossEntropy()
    draws = np.random.default_rng(comm.rank)
    x = draws.random((per_rank, 784), dtype=np.float32)
    y = draws.integers(0, 10, per_rank)
    step_times, reduce_times = [], []
    for i in range(steps + 5):  # 5 warm-up steps (first-call compilation)
        comm.comm.Barrier()  # start together: a step's time includes waiting for the slowest
        t0 = time.perf_counter()
        model.zero_grad()
        model.loss_and_backward(x, y, loss)
        t1 = time.perf_counter()
        comm.allreduce_mean(model.flat.grad)
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if i >= 5:
            step_times.append(t3 - t0)
            reduce_times.append(t2 - t1)
    if comm.is_root:
        print(json.dumps({"ranks": comm.size, "per_rank": per_rank, "sync_bn": sync_bn,
                          "params": model.n_params, "step_ms": 1e3 * statistics.median(step_times),
                          "allreduce_ms": 1e3 * statistics.median(reduce_times)}))


def ring_bytes(n: int, params: int = PARAMS, itemsize: int = 4) -> float:
    """Bytes each rank sends (and receives) per step in a ring allreduce."""
    return itemsize * params * 2 * (n - 1) / n


def cost_model_lines(step_ms_1: float, per_rank: int) -> list[str]:
    """When does communication dominate? Compare the ring's transfer time with the
    measured compute time of one step at ``per_rank`` samples (compute scales ~linearly
    with the batch for this network; latency of 2(N-1) messages is ignored)."""
    lines = ["| machines N | bytes/step per rank | 1 Gbit/s | 10 Gbit/s | 100 Gbit/s |",
             "|---|---|---|---|---|"]
    for n in (2, 4, 8, 16, 64):
        b = ring_bytes(n)
        cells = [f"{1e3 * b / (bw / 8 * 1e9):.3f} ms" for bw in (1, 10, 100)]
        lines.append(f"| {n} | {b / 1e6:.3f} MB | " + " | ".join(cells) + " |")
    per_sample_ms = step_ms_1 / per_rank
    lines.append("")
    lines.append(f"Measured compute here: {step_ms_1:.3f} ms per step of {per_rank} samples "
                 f"(~{per_sample_ms:.4f} ms/sample). Communication dominates when the per-rank "
                 "batch is below ring_time / per-sample time:")
    for bw in (1, 10, 100):
        t = 1e3 * ring_bytes(16) / (bw / 8 * 1e9)
        lines.append(f"- {bw} Gbit/s, N=16: ring {t:.3f} ms -> per-rank batch < "
                     f"{t / per_sample_ms:.0f} samples")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1,2,4", help="comma-separated rank counts")
    p.add_argument("--per-rank", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--sync-bn", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.per_rank, args.steps, args.sync_bn)
        return 0
    # One thread per rank: N ranks x (BLAS + numba threads) on N cores would oversubscribe
    # them, and an MPI rank waiting in a collective busy-polls its core.
    threads = {k: os.environ.get(k, "1") for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                   "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
    env = {**os.environ, **threads, "PYTHONPATH": str(ROOT)}
    rows = []
    for n in [int(r) for r in args.ranks.split(",")]:
        cmd = ["mpiexec", "-n", str(n), sys.executable, __file__, "--worker",
               "--per-rank", str(args.per_rank), "--steps", str(args.steps)]
        cmd += ["--sync-bn"] if args.sync_bn else []
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| ranks | per-rank batch | step (ms) | allreduce (ms) | allreduce share |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ranks']} | {r['per_rank']} | {r['step_ms']:.3f} | {r['allreduce_ms']:.3f} | "
              f"{100 * r['allreduce_ms'] / r['step_ms']:.0f}% |")
    print()
    print("\n".join(cost_model_lines(rows[0]["step_ms"], args.per_rank)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
