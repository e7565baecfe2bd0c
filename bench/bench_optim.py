"""Optimizer step over flat float32 buffers: nnopt fused vs nnopt reference vs PyTorch.

    python bench/bench_optim.py [--sizes 1e4,1e5,1e6,1e7,1e8] [--quick] [--out FILE.json]

Bandwidth = bytes an ideal step must move (read+write of every buffer it touches) per
second, against a measured copy (read+write) bandwidth on the same buffers. Each ratio is
the median over interleaved rounds of the ratio within a round, with its lowest and highest
round (``_range``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

OPTIMIZERS = ("sgd", "momentum", "nag", "adagrad", "adadelta", "rmsprop", "adam")
ROUNDS = 3  # interleaved rounds per optimizer and size

# Buffers read and written per parameter in one step (p, g read; p, state r/w), float32.
BYTES = {"sgd": 12, "momentum": 20, "nag": 20, "adagrad": 20, "adadelta": 28,
         "rmsprop": 20, "adam": 28}
TORCH = {
    "sgd": lambda t, ps, **k: t.optim.SGD(ps, lr=0.01, **k),
    "momentum": lambda t, ps, **k: t.optim.SGD(ps, lr=0.01, momentum=0.9, **k),
    "nag": lambda t, ps, **k: t.optim.SGD(ps, lr=0.01, momentum=0.9, nesterov=True, **k),
    "adagrad": lambda t, ps, **k: t.optim.Adagrad(ps, lr=0.01, **k),
    "adadelta": lambda t, ps, **k: t.optim.Adadelta(ps, **k),
    "rmsprop": lambda t, ps, **k: t.optim.RMSprop(ps, lr=0.01, **k),
    "adam": lambda t, ps, **k: t.optim.Adam(ps, lr=0.001, **k),
}


# Factories the worker processes call (each imports only its own library).
def make_copy(n, threaded):
    """A read+write copy of n float32: NumPy's, or a two-core numba loop."""
    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
    if not threaded:
        return lambda: np.copyto(dst, src)
    import numba

    @numba.njit(parallel=True)
    def parallel_copy(dst, src):
        for i in numba.prange(src.shape[0]):
            dst[i] = src[i]
    return lambda: parallel_copy(dst, src)


def make_nnopt(name, n, fast):
    import nnopt
    from nnopt import optim
    storage = nnopt.FlatParameters([nnopt.Parameter(np.zeros(n), "w")],
                                   nnopt.get_namespace("cpu"), "float32")
    storage.grad[...] = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    return optim.create(name, storage, lr=0.01, use_fast_path=fast).step


def make_torch(name, n, variant):
    import torch
    p = torch.zeros(n, dtype=torch.float32, requires_grad=True)
    p.grad = torch.randn(n, dtype=torch.float32)
    kwargs = {"foreach": True} if variant == "foreach" else {"fused": True}
    opt = TORCH[name](torch, [p], **kwargs)
    opt.step()  # raises where torch has no such variant
    return opt.step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1e4,1e5,1e6,1e7,1e8")
    ap.add_argument("--quick", action="store_true", help="sizes 1e4..1e6 only")
    ap.add_argument("--out", type=Path, default=common.RESULTS / "optim.json",
                    help="the JSON to write, its PNG beside it (default %(default)s)")
    args = ap.parse_args(argv)
    sizes = [int(float(s)) for s in ("1e4,1e5,1e6" if args.quick else args.sizes).split(",")]
    nn = common.Worker("bench_optim")
    tw = common.Worker("bench_optim") if common.have_torch() else None
    rows = []
    try:
        for n in sizes:
            nn.ask("make", "copy_numpy", "make_copy", n, False)
            nn.ask("make", "copy_threads", "make_copy", n, True)
            copies = common.medians(common.compare(
                {"numpy": (nn, "copy_numpy"), "threads": (nn, "copy_threads")}, repeat=ROUNDS))
            copy = min(copies, key=copies.get)  # the faster copy: the bandwidth to compare with
            copy_bw = 8 * n / copies[copy]
            for name in OPTIMIZERS:
                # the copy runs in every optimizer's rounds: its bandwidth ratio is then
                # taken round by round, like the others
                contenders = {"fused": (nn, "fused"), "copy": (nn, f"copy_{copy}")}
                nn.ask("make", "fused", "make_nnopt", name, n, True)
                if n <= 10_000_000:  # the reference's temporaries make 1e8 slow and memory-hungry
                    nn.ask("make", "reference", "make_nnopt", name, n, False)
                    contenders["reference"] = (nn, "reference")
                for variant in ("foreach", "fused") if tw else ():
                    try:
                        tw.ask("make", f"torch_{variant}", "make_torch", name, n, variant)
                        contenders[f"torch_{variant}"] = (tw, f"torch_{variant}")
                    except RuntimeError:
                        pass  # this torch has no such variant of this optimizer
                rounds = common.compare(contenders, repeat=ROUNDS)
                row = {"optimizer": name, "n": n, "rounds": ROUNDS, "copy_GBps": copy_bw / 1e9,
                       "copy_variant": copy}
                common.put_rounds(row, rounds)
                row["fused_GBps"] = BYTES[name] * n / row["fused_s"] / 1e9
                # copy time over step time, scaled by the bytes each moves
                common.put_ratio(row, "fused_vs_copy_bw", rounds["copy"], rounds["fused"],
                                 scale=lambda v, name=name: v * BYTES[name] / 8)
                torch_variants = [k for k in ("torch_fused", "torch_foreach") if k in rounds]
                if torch_variants:  # the variant faster over all rounds
                    row["best_torch"] = min(torch_variants, key=lambda k: row[f"{k}_s"])
                    common.put_ratio(row, "fused_vs_best_torch", rounds["fused"],
                                     rounds[row["best_torch"]])
                if "torch_fused" in rounds:
                    common.put_ratio(row, "fused_vs_torch_fused", rounds["fused"],
                                     rounds["torch_fused"])
                for worker in (nn, tw):
                    for key in ("fused", "reference", "torch_foreach", "torch_fused"):
                        if worker:
                            worker.ask("drop", key)
                rows.append(row)
                print(f"n={n:>9} {name:9s} fused {row['fused_s'] * 1e3:8.3f} ms"
                      + (f"  best torch {common.with_range(row, 'fused_vs_best_torch')}"
                         if torch_variants else ""), flush=True)
            nn.ask("drop", "copy_numpy")
            nn.ask("drop", "copy_threads")
    finally:
        for worker in (nn, tw):
            if worker:
                worker.close()
    columns = ["optimizer", "n", "fused_s", "reference_s", "torch_foreach_s", "torch_fused_s",
               "fused_vs_best_torch", "fused_GBps", "fused_vs_copy_bw"]
    print(common.table(rows, columns))
    path = common.save(args.out, {"rows": rows})
    plot(rows, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def plot(rows, path):
    plt = common.figure()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in OPTIMIZERS:
        mine = [r for r in rows if r["optimizer"] == name]
        ax.plot([r["n"] for r in mine], [r["fused_vs_copy_bw"] for r in mine], "o-", label=name)
    ax.set(xscale="log", xlabel="parameters (float32)", ylabel="effective bandwidth / copy bandwidth",
           title="nnopt fused optimizer step: fraction of copy bandwidth (CPU)")
    ax.axhline(1.0, color="gray", ls="--")
    common.finish(fig, ax, path)


if __name__ == "__main__":
    main()
