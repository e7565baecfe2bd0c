"""Batch Normalization forward + backward (training mode), float32, on the CPU:
nnopt fused (numba) vs nnopt reference (array API on NumPy) vs PyTorch (autograd).

    python bench/bench_bn.py [--quick] [--out FILE.json]

Each ratio is the median over interleaved rounds of the ratio within a round, with its
lowest and highest round (``_range``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402


SHAPES = [(64, 16), (64, 128), (256, 256), (1024, 1024), (4096, 256), (4096, 4096)]
#: interleaved rounds per shape; even: fused and reference each first in its turn in half
#: of them (common.turns)
ROUNDS = 6


def make_nnopt(shape, fast):
    from nnopt import BatchNorm, Sequential
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    d = rng.standard_normal(shape, dtype=np.float32)
    layer = BatchNorm(shape[1], use_fast_path=fast)
    Sequential([layer])

    def step():
        layer.forward(x)
        layer.backward(d)
    return step


def make_torch(shape):
    import torch
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, requires_grad=True)
    d = torch.randn(shape, generator=gen)
    bn = torch.nn.BatchNorm1d(shape[1])

    def step():
        x.grad = None
        bn.zero_grad(set_to_none=True)
        bn(x).backward(d)
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=common.RESULTS / "bn.json",
                    help="the JSON to write, its PNG beside it (default %(default)s)")
    args = ap.parse_args(argv)
    shapes = SHAPES[:3] if args.quick else SHAPES
    workers = {"nnopt": common.Worker("bench_bn")}
    if common.have_torch():
        workers["torch"] = common.Worker("bench_bn")
    rows = []
    try:
        for shape in shapes:
            workers["nnopt"].ask("make", "fused", "make_nnopt", shape, True)
            workers["nnopt"].ask("make", "reference", "make_nnopt", shape, False)
            contenders = {"fused": (workers["nnopt"], "fused"),
                          "reference": (workers["nnopt"], "reference")}
            if "torch" in workers:
                workers["torch"].ask("make", "torch", "make_torch", shape)
                contenders["torch"] = (workers["torch"], "torch")
            rounds = common.compare(contenders, repeat=ROUNDS)
            row = {"shape": f"{shape[0]}x{shape[1]}", "rounds": ROUNDS}
            common.put_rounds(row, rounds)
            common.put_ratio(row, "fused_vs_reference", rounds["fused"], rounds["reference"])
            if "torch" in rounds:
                common.put_ratio(row, "fused_vs_torch", rounds["fused"], rounds["torch"])
            rows.append(row)
            print(f"{row['shape']:>10}: fused {row['fused_s'] * 1e6:9.1f} us"
                  + (f"  {common.with_range(row, 'fused_vs_torch')} of torch" if "torch" in rounds
                     else ""), flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    print(common.table(rows, ["shape", "fused_s", "reference_s", "torch_s", "fused_vs_torch",
                              "fused_vs_reference"]))
    path = common.save(args.out, {"rows": rows})
    plt = common.figure()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [r["shape"] for r in rows]
    for key, name in (("fused_s", "nnopt fused"), ("reference_s", "nnopt reference"),
                      ("torch_s", "PyTorch")):
        if key in rows[0]:
            ax.plot(labels, [r[key] * 1e6 for r in rows], "o-", label=name)
    ax.set(yscale="log", xlabel="batch x features", ylabel="forward + backward (us)",
           title="BatchNorm forward+backward, float32, CPU")
    common.finish(fig, ax, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
