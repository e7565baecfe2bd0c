"""Optimizer step over flat float32 buffers: nnopt fused vs nnopt reference vs PyTorch.

    python bench/bench_optim.py [--sizes 1e4,1e5,1e6,1e7,1e8] [--quick]

Bandwidth = bytes an ideal step must move (read+write of every buffer it touches) per
second, against a measured copy (read+write) bandwidth on the same buffers.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

import nnopt  # noqa: E402
from nnopt import optim  # noqa: E402

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


def copy_bandwidth(n):
    """Read+write bytes per second of the faster of NumPy's copy and a two-core numba copy."""
    import numba

    @numba.njit(parallel=True)
    def parallel_copy(dst, src):
        for i in numba.prange(src.shape[0]):
            dst[i] = src[i]
    src, dst = np.ones(n, np.float32), np.empty(n, np.float32)
    best = min(common.timeit(lambda: np.copyto(dst, src), repeat=3),
               common.timeit(lambda: parallel_copy(dst, src), repeat=3))
    return 8 * n / best


def nnopt_step(name, n, fast):
    params = [nnopt.Parameter(np.zeros(n), "w")]
    storage = nnopt.FlatParameters(params, nnopt.get_namespace("cpu"), "float32")
    storage.grad[...] = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    opt = optim.create(name, storage, lr=0.01, use_fast_path=fast)
    return opt.step


def torch_step(torch, name, n, variant):
    p = torch.zeros(n, dtype=torch.float32, requires_grad=True)
    p.grad = torch.randn(n, dtype=torch.float32)
    kwargs = {"foreach": True} if variant == "foreach" else {"fused": True}
    try:
        opt = TORCH[name](torch, [p], **kwargs)
        opt.step()
    except (RuntimeError, TypeError, ValueError):
        return None
    return opt.step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1e4,1e5,1e6,1e7,1e8")
    ap.add_argument("--quick", action="store_true", help="sizes 1e4..1e6 only, fewer repeats")
    args = ap.parse_args(argv)
    sizes = [int(float(s)) for s in ("1e4,1e5,1e6" if args.quick else args.sizes).split(",")]
    torch = common.torch_or_none()
    rows = []
    for n in sizes:
        copy_bw = copy_bandwidth(n)
        for name in optim.OPTIMIZERS:
            row = {"optimizer": name, "n": n, "copy_GBps": copy_bw / 1e9}
            row["fused_s"] = common.timeit(nnopt_step(name, n, True), repeat=3)
            if n <= 10_000_000:  # the reference's temporaries make 1e8 slow and memory-hungry
                row["reference_s"] = common.timeit(nnopt_step(name, n, False), repeat=3)
            row["fused_GBps"] = BYTES[name] * n / row["fused_s"] / 1e9
            row["fused_vs_copy_bw"] = row["fused_GBps"] / (copy_bw / 1e9)
            if torch is not None:
                for variant in ("foreach", "fused"):
                    step = torch_step(torch, name, n, variant)
                    if step is not None:
                        row[f"torch_{variant}_s"] = common.timeit(step, repeat=3)
                best = min(row.get("torch_fused_s", np.inf), row.get("torch_foreach_s", np.inf))
                row["fused_vs_best_torch"] = row["fused_s"] / best
            rows.append(row)
            print(f"n={n:>9} {name:9s} fused {row['fused_s'] * 1e3:8.3f} ms"
                  + (f"  torch best x{row['fused_vs_best_torch']:.2f}" if torch else ""), flush=True)
    columns = ["optimizer", "n", "fused_s", "reference_s", "torch_foreach_s", "torch_fused_s",
               "fused_vs_best_torch", "fused_GBps", "fused_vs_copy_bw"]
    print(common.table(rows, columns))
    path = common.save("optim", {"rows": rows})
    plot(rows, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def plot(rows, path):
    plt = common.figure()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in optim.OPTIMIZERS:
        mine = [r for r in rows if r["optimizer"] == name]
        ax.plot([r["n"] for r in mine], [r["fused_vs_copy_bw"] for r in mine], "o-", label=name)
    ax.set(xscale="log", xlabel="parameters (float32)", ylabel="effective bandwidth / copy bandwidth",
           title="nnopt fused optimizer step: fraction of copy bandwidth (CPU)")
    ax.axhline(1.0, color="gray", ls="--")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
