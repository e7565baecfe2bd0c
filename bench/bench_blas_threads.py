"""Where a second BLAS thread pays, on a quiet machine and beside a busy core: the
measurement behind ``nnopt.fast.threads`` (every free core on a quiet machine; with a core
taken, one thread below ``BUSY_PARALLEL_MIN_FLOPS``).

    python bench/bench_blas_threads.py [--busy] [--out FILE.json]

Times float32 products of the textbook network's shapes (forward x W, backward x^T dz and
dz W^T, batches 64 to 4096) on one BLAS thread and on all cores, interleaved in the same
process (which goes first alternates from round to round), and prints the ratio per
product size (2 m k n flops): the median over rounds of the ratio within a round, with its
lowest and highest round. ``--busy`` runs a ``while True: pass`` process beside it (the case
the policy must survive).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

SIZES = [784, 128, 64, 32, 16, 10]


def shapes(batches):
    for m in batches:
        for k, n in zip(SIZES[:-1], SIZES[1:]):
            yield (m, k, n), "x W"
            yield (k, m, n), "x^T dz"
            yield (m, n, k), "dz W^T"


def main(argv=None):
    from nnopt.fast.threads import BlasThreads, available_cores
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="64,256,1024,4096")
    ap.add_argument("--busy", action="store_true", help="a busy-looping process beside the bench")
    ap.add_argument("--out", type=Path, help="the JSON to write (default "
                    "bench/results/blas_threads.json, blas_threads_busy.json with --busy)")
    args = ap.parse_args(argv)
    blas = BlasThreads()
    cores = available_cores()
    rows = []
    with common.busy_process(args.busy):
        for (m, k, n), what in sorted(set(shapes(int(b) for b in args.batches.split(","))),
                                      key=lambda s: s[0][0] * s[0][1] * s[0][2]):
            a = np.random.default_rng(0).random((m, k), dtype=np.float32)
            b = np.random.default_rng(1).random((k, n), dtype=np.float32)
            out = np.empty((m, n), dtype=np.float32)

            def product(threads):
                def run():
                    blas.use(threads)
                    np.matmul(a, b, out=out)
                return run
            rounds = common.timeit_rounds({"one": product(1), "all": product(cores)}, repeat=7,
                                          min_time=0.02)
            medians = common.medians(rounds)
            row = {"m": m, "k": k, "n": n, "flops": 2 * m * k * n, "what": what,
                   "one_thread_us": medians["one"] * 1e6, "all_cores_us": medians["all"] * 1e6,
                   "rounds": len(rounds["one"]), "per_round_s": rounds}
            common.put_ratio(row, "all/one", rounds["all"], rounds["one"])
            rows.append(row)
    blas.use(cores)
    print(common.table(rows, ["m", "k", "n", "flops", "what", "one_thread_us", "all_cores_us", "all/one"]))
    default = common.RESULTS / ("blas_threads_busy.json" if args.busy else "blas_threads.json")
    path = common.save(args.out or default, {"rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
