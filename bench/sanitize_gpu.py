"""Every CUDA kernel of nnopt, launched a few times on small, awkward shapes, for NVIDIA's
compute-sanitizer (bench/gpu_check.sh runs this script under it):

* ``memcheck``: a read or write out of bounds, or misaligned (a 16-byte load at an address
  that is not a multiple of 16);
* ``racecheck``: two threads of a block touching the same shared memory with no barrier
  between them (a missing or misplaced ``__syncthreads``), including hazards that only a
  warp's real lockstep shows, which the emulated device (tests/emulated_gpu.py) cannot;
* ``synccheck``: a barrier that not every thread of the block reaches.

The results' values are tests/test_gpu.py's job; this script only makes every kernel run
(BN in one launch and split, the fused products with and without k slices, the loss, the
activations, every optimizer, the tiled GEMM, and one captured graph), and fails on a
non-finite loss. Memory goes straight to cudaMalloc, not through CuPy's pool: memcheck
sees only accesses outside an allocation, and a pool packs allocations together.

    compute-sanitizer --tool racecheck --error-exitcode 9 python3 bench/sanitize_gpu.py

``--quick`` (racecheck and synccheck, whose slowdown is many times memcheck's): float32
only, and one optimizer: every kernel with shared memory or a barrier still runs (BN in one
launch and split, the fused products, the loss, the captured graph).
"""
from __future__ import annotations

import argparse
import gc
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import nnopt  # noqa: E402
from nnopt import optim  # noqa: E402
from nnopt.backend import get_namespace  # noqa: E402

#: every optimizer kernel: each rule, and the variants with kernels of their own
OPTIMIZERS = [("sgd", {}), ("momentum", {}), ("momentum", {"buffer": "torch"}), ("nag", {}),
              ("nag", {"buffer": "torch"}), ("adagrad", {}), ("adadelta", {}),
              ("rmsprop", {}), ("rmsprop", {"eps_inside_root": False}), ("adam", {}),
              ("adamw", {})]
#: (batch, sizes, batchnorm, activation, fused, label dtype): 37 rows (one launch, rows not a
#: multiple of the tile), 64 (the fused products), 4096 (the split path: 16-byte loads
#: where the width allows, one element at a time where it does not), the layers' path
CASES = [(37, [50, 33, 24, 10], True, "relu", True, "int64"),
         (64, [50, 33, 24, 10], True, "tanh", True, "int32"),
         (64, [300, 40, 10], False, "sigmoid", True, "int64"),
         (4096, [20, 24, 10], True, "relu", True, "int32"),
         (4096, [20, 27, 10], True, "relu", True, "int64"),
         (4096, [20, 24, 27, 10], False, "relu", True, "int64"),
         (37, [50, 33, 10], True, "relu", False, "int64"),
         (4096, [20, 27, 10], True, "relu", False, "int64")]


def train_steps(xp, dtype, case, optimizer=("sgd", {}), steps=2, seed=0):
    """``steps`` eager training steps of ``case`` (a row of CASES); the last loss."""
    batch, sizes, batchnorm, activation, fused, label_dtype = case
    rng = np.random.default_rng(seed)
    model = nnopt.mlp(sizes, activation=activation, batchnorm=batchnorm, seed=seed, device=xp,
                      dtype=dtype, fused=fused)
    opt = optim.create(optimizer[0], model, lr=0.01, **optimizer[1])
    loss_fn = nnopt.SoftmaxCrossEntropy()
    for _ in range(steps):
        x = xp.asarray(rng.normal(size=(batch, sizes[0])).astype(dtype))
        y = xp.asarray(rng.integers(0, sizes[-1], batch).astype(label_dtype))
        model.zero_grad()
        loss = float(model.loss_and_backward(x, y, loss_fn))
        opt.step()
    return loss


def captured_steps(xp, dtype, batch=64, sizes=(50, 33, 24, 10), steps=2, seed=0):
    """``steps`` Adam steps of a captured CUDA graph (batch 64: fused products; the step
    count on the device); the last loss."""
    from nnopt.graph import CapturedStep
    rng = np.random.default_rng(seed)
    model = nnopt.mlp(list(sizes), batchnorm=True, seed=seed, device=xp, dtype=dtype)
    # No cyclic garbage collected mid-capture: with CuPy's pool off (main), an array it
    # freed would be a cudaFree inside the capture, which may invalidate it.
    gc.collect()
    gc.disable()
    try:
        step = CapturedStep(model, optim.create("adam", model, lr=0.01),
                            nnopt.SoftmaxCrossEntropy(), (batch, sizes[0]), (batch,))
        try:
            for _ in range(steps):
                x = xp.asarray(rng.normal(size=(batch, sizes[0])).astype(dtype))
                loss = step.step(x, xp.asarray(rng.integers(0, sizes[-1], batch)))
            step.synchronize()
            return float(loss)
        finally:
            step.release()
    finally:
        gc.enable()


def tiled_gemms(gpu, xp, dtype, seed=0):
    """The tiled GEMM (kernels/gemm.cu, the fallback where cuBLAS cannot load), each
    transpose, 37x50 by 50x33."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(37, 50)).astype(dtype), rng.normal(size=(50, 33)).astype(dtype)
    for trans_a, trans_b in ((False, False), (True, False), (False, True)):
        left, right = (a.T.copy() if trans_a else a), (b.T.copy() if trans_b else b)
        gpu.gemm(xp.asarray(left), xp.asarray(right), trans_a, trans_b)


def run(xp, gpu, say=print, quick=False):
    """Every kernel, each dtype (``quick``: float32, one optimizer); the losses, all
    finite, or ValueError."""
    losses = {}
    for dtype in ("float32",) if quick else ("float32", "float64"):
        for case in CASES:
            for optimizer in OPTIMIZERS if case is CASES[0] and not quick else OPTIMIZERS[:1]:
                key = f"{dtype} {case} {optimizer[0]} {optimizer[1] or ''}".rstrip()
                losses[key] = train_steps(xp, dtype, case, optimizer)
                say(f"{key}: loss {losses[key]:.4f}")
        tiled_gemms(gpu, xp, dtype)
        say(f"{dtype} tiled GEMM: done")
        key = f"{dtype} captured, batch 64, BN, adam"
        losses[key] = captured_steps(xp, dtype)
        say(f"{key}: loss {losses[key]:.4f}")
    bad = {key: value for key, value in losses.items() if not math.isfinite(value)}
    if bad:
        raise ValueError(f"non-finite losses: {bad}")
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="float32 and one optimizer (for racecheck and synccheck)")
    args = parser.parse_args(argv)
    try:
        import cupy
    except ImportError as exc:
        raise SystemExit(f"sanitize_gpu.py needs CuPy and a GPU ({exc}); "
                         "pip install -e \".[gpu]\" on a machine with one") from None
    cupy.cuda.set_allocator(None)  # cudaMalloc per array: memcheck sees each one's bounds
    from nnopt.fast import gpu_kernels
    gpu = gpu_kernels()
    if gpu is None:
        raise SystemExit("nnopt's CUDA kernels did not load: nothing to sanitize")
    run(get_namespace("gpu"), gpu, quick=args.quick)
    cupy.cuda.Device().synchronize()
    print("every kernel ran")


if __name__ == "__main__":
    main()
