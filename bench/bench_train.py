"""Training step and epoch of the textbook network (784-128-64-32-16-10, ReLU, SGD lr 0.1),
with and without BN: nnopt vs PyTorch on the CPU, and BN's overhead in each.

    python bench/bench_train.py [--quick] [--batches 64,256,1024,4096] [--busy] [--fixed]
                                [--no-layers] [--out FILE.json]

nnopt runs its default model (fused blocks, ``nnopt.mlp(..., fused=True)``) and, as
``nnopt_layers``, the textbook's layer-by-layer model (``fused=False``). ``--busy`` runs a
``while True: pass`` process beside the whole bench (one core taken: the policy of small
BLAS products on one thread must hold there too), and adds ``nnopt_fixed``: nnopt as
``python -m nnopt.train`` runs it by default, every product on one fixed BLAS count
(bit-for-bit runs) whatever the load.

An epoch is 57,000 samples (the textbook's MNIST training split) of synthetic data in
[0, 1): the time does not depend on the pixel values. nnopt and PyTorch each run in a
worker process of their own (see common.Worker), timed in interleaved rounds (8 of a
step, 4 of an epoch); each ratio and overhead is the median over rounds of the one within
a round, with its lowest and highest round (``_range``). A step's round lasts at least
``STEP_ROUND_S`` (512 steps of nnopt at batch 64).
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

SIZES = [784, 128, 64, 32, 16, 10]
N_TRAIN = 57000


@functools.lru_cache(maxsize=2)
def data(n=N_TRAIN):
    """The synthetic set, made once per process (every runner reads the same arrays)."""
    rng = np.random.default_rng(0)
    return rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n)


_ON_DEVICE = {}  # (device, id of the host array) -> its copy there, shared by the runners


def on_device(array, device, copy):
    """``copy(array)``, made once per device: bench_gpu builds ~50 runners, and a copy each
    of the 178 MB set took seconds of its time limit and GBs of the GPU's memory."""
    key = (str(device), id(array))
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = (array, copy(array))  # the host array kept: its id stays its own
    return _ON_DEVICE[key][1]


class Batches:
    """Successive batches of the data set on every call: training on one batch over and
    over drives the gradients towards zero and into denormal floats, which are slow."""
    calls = 0

    def next_start(self):
        start = (self.calls * self.batch) % (self.x.shape[0] - self.batch)
        self.calls += 1
        return start


class NnoptRunner(Batches):
    def __init__(self, bn, batch, device="cpu", sizes=SIZES, fused=True):
        import nnopt
        from nnopt import optim
        from nnopt.backend import asarray, get_namespace
        self.xp = xp = get_namespace(device)
        x, y = data()
        self.x = on_device(x, device, lambda a: asarray(a, xp))
        self.y = on_device(y, device, xp.asarray)
        self.model = nnopt.mlp(sizes, "relu", batchnorm=bn, seed=0, device=xp, fused=fused)
        self.opt = optim.SGD(self.model, lr=0.1)
        self.loss = nnopt.SoftmaxCrossEntropy()
        self.batch = batch

    def step(self):
        start = self.next_start()
        # sliced, as TorchRunner's (a gather: three more kernels per eager GPU step)
        xb, yb = self.x[start:start + self.batch], self.y[start:start + self.batch]
        self.model.zero_grad()
        loss = self.model.loss_and_backward(xb, yb, self.loss)
        self.opt.step()
        return loss

    def epoch(self):
        xp, n, b = self.xp, self.x.shape[0], self.batch
        order = xp.asarray(np.random.default_rng(1).permutation(n))
        total = 0.0
        for start in range(0, n - 1, b):
            idx = order[start:start + b]
            self.model.zero_grad()
            total += float(self.model.loss_and_backward(xp.take(self.x, idx, axis=0),
                                                        xp.take(self.y, idx, axis=0), self.loss))
            self.opt.step()
        return total

    def sync(self):
        from nnopt.backend import synchronize
        synchronize(self.xp)


class TorchRunner(Batches):
    def __init__(self, torch, bn, batch, device="cpu", sizes=SIZES):
        self.torch = torch
        x, y = data()
        self.device = device
        self.x = on_device(x, f"torch {device}", lambda a: torch.from_numpy(a).to(device))
        self.y = on_device(y, f"torch {device}", lambda a: torch.from_numpy(a).to(device))
        torch.manual_seed(0)  # the same initial weights every run
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(torch.nn.Linear(a, b))
            if i < len(sizes) - 2:
                if bn:
                    layers.append(torch.nn.BatchNorm1d(b))
                layers.append(torch.nn.ReLU())
        self.model = torch.nn.Sequential(*layers).to(device)
        # foreach: torch's multi-tensor SGD, at least as fast as its CPU default (the
        # per-tensor loop) for this network here; on CUDA foreach is the default already
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, foreach=True)
        self.loss = torch.nn.CrossEntropyLoss()
        self.batch = batch

    def step(self):
        start = self.next_start()
        return self.step_on(self.x[start:start + self.batch], self.y[start:start + self.batch])

    def epoch(self):
        n, b = self.x.shape[0], self.batch
        order = self.torch.from_numpy(np.random.default_rng(1).permutation(n)).to(self.device)
        total = 0.0
        for start in range(0, n - 1, b):
            idx = order[start:start + b]
            total += float(self.step_on(self.x[idx], self.y[idx]).detach())
        return total

    def step_on(self, xb, yb):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(self.model(xb), yb)
        loss.backward()
        self.opt.step()
        return loss

    def sync(self):
        if self.device != "cpu":
            self.torch.cuda.synchronize()


# Factories the worker processes call (each imports only its own library).
def make_nnopt(bn, batch, what):
    return getattr(NnoptRunner(bn, batch), what)


def make_nnopt_layers(bn, batch, what):
    return getattr(NnoptRunner(bn, batch, fused=False), what)


def make_nnopt_fixed(bn, batch, what):
    """nnopt as ``python -m nnopt.train`` runs it: every product on one fixed BLAS count
    (the cores the process may use), whatever the load (nnopt.fast.threads.fixed)."""
    from nnopt.fast import threads
    call = getattr(NnoptRunner(bn, batch), what)

    def fixed():
        with threads.fixed():
            return call()
    return fixed


def make_torch(bn, batch, what):
    import torch
    return getattr(TorchRunner(torch, bn, batch), what)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="batch 64 and 1024 only")
    ap.add_argument("--batches", default="64,256,1024,4096")
    ap.add_argument("--busy", action="store_true", help="a busy-looping process beside the bench")
    ap.add_argument("--fixed", action="store_true", help="add nnopt_fixed, nnopt on the "
                    "training CLI's fixed BLAS count (always with --busy)")
    ap.add_argument("--no-layers", action="store_true",
                    help="leave out nnopt's layer-by-layer model (fused=False)")
    ap.add_argument("--out", type=Path, help="the JSON to write, its PNG beside it (default "
                    "bench/results/train.json, train_busy.json with --busy)")
    args = ap.parse_args(argv)
    batches = [64, 1024] if args.quick else [int(b) for b in args.batches.split(",")]
    with common.busy_process(args.busy):
        rows = measure(batches, layers=not args.no_layers, fixed=args.busy or args.fixed)
    report(rows, args.out or common.RESULTS / ("train_busy.json" if args.busy else "train.json"))


#: interleaved rounds of each measurement: a verdict that one round could flip is none.
#: Even, so that each of a worker's two contenders (plain, BN) is first in its turn in half
#: the rounds (common.turns): with 7, nnopt's plain step ran first in 4, and in nine runs of
#: 7 rounds of 0.3 s those rounds' median BN overhead was 0.4 to 10 points below the others'.
ROUNDS = {"step": 8, "epoch": 4}
#: seconds of steps per round, at least: rounds of 0.05 s (64 steps of nnopt at batch 64)
#: swung BN's overhead from -9% to +18% within one run, a hiccup of the machine's being a
#: fifth of a round
STEP_ROUND_S = 0.3


def percent_more(ratio):
    """A time ratio as the percentage the top takes more than the bottom (an overhead)."""
    return 100 * (ratio - 1)


def measure(batches, layers=True, fixed=False):
    """One row of interleaved timings per batch size."""
    workers = {"nnopt": common.Worker("bench_train")}
    if fixed:  # the training CLI's fixed BLAS count beside the load policy
        workers["nnopt_fixed"] = common.Worker("bench_train")
    if layers:  # its own process: the same worker would share nnopt's buffers and caches
        workers["nnopt_layers"] = common.Worker("bench_train")
    if common.have_torch():
        workers["torch"] = common.Worker("bench_train")
    rows = []
    try:
        for batch in batches:
            row, rounds = {"batch": batch, "rounds": {}}, {}
            for what, min_time in (("step", STEP_ROUND_S), ("epoch", 0.0)):
                if what == "epoch" and batch != 64:
                    continue
                contenders = {}
                for lib, worker in workers.items():
                    for bn in (False, True):
                        key = f"{lib}_{'bn' if bn else 'plain'}"
                        worker.ask("make", key, f"make_{lib}", bn, batch, what)
                        contenders[key] = (worker, key)
                measured = common.compare(contenders, repeat=ROUNDS[what], min_time=min_time)
                rounds.update({f"{k}_{what}": v for k, v in measured.items()})
                row["rounds"][what] = ROUNDS[what]
                for worker in workers.values():
                    for key in contenders:
                        worker.ask("drop", key)
            common.put_rounds(row, rounds)

            def ratio(name, top, bottom, scale=lambda v: v):
                if top in rounds and bottom in rounds:
                    common.put_ratio(row, name, rounds[top], rounds[bottom], scale)
            for lib in workers:
                ratio(f"{lib}_bn_overhead_%", f"{lib}_bn_step", f"{lib}_plain_step", percent_more)
            ratio("fixed_vs_policy_bn", "nnopt_fixed_bn_step", "nnopt_bn_step")
            ratio("fused_vs_layers_bn", "nnopt_bn_step", "nnopt_layers_bn_step")
            for tag in ("bn", "plain"):
                ratio(f"step_ratio_{tag}", f"nnopt_{tag}_step", f"torch_{tag}_step")
                ratio(f"epoch_ratio_{tag}", f"nnopt_{tag}_epoch", f"torch_{tag}_epoch")
            ratio("nnopt_bn_epoch_overhead_%", "nnopt_bn_epoch", "nnopt_plain_epoch", percent_more)
            rows.append(row)
            print(f"batch {batch}: nnopt {row['nnopt_plain_step_s'] * 1e6:.0f} / "
                  f"{row['nnopt_bn_step_s'] * 1e6:.0f} us (BN "
                  f"{common.with_range(row, 'nnopt_bn_overhead_%', '{:+.1f}%')})"
                  + (f"; torch {row['torch_plain_step_s'] * 1e6:.0f} / {row['torch_bn_step_s'] * 1e6:.0f}"
                     f" us (BN {common.with_range(row, 'torch_bn_overhead_%', '{:+.1f}%')})"
                     if "torch" in workers else ""), flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    return rows


def report(rows, out):
    print(common.table(rows, ["batch", "nnopt_plain_step_s", "nnopt_bn_step_s", "torch_plain_step_s",
                              "torch_bn_step_s", "nnopt_bn_overhead_%", "torch_bn_overhead_%",
                              "step_ratio_bn", "step_ratio_plain", "nnopt_layers_bn_step_s",
                              "nnopt_layers_bn_overhead_%", "fused_vs_layers_bn",
                              "nnopt_fixed_bn_step_s", "fixed_vs_policy_bn"]))
    epoch_rows = [r for r in rows if r["batch"] == 64]
    if epoch_rows:
        print(common.table(epoch_rows, ["batch", "nnopt_plain_epoch_s", "nnopt_bn_epoch_s",
                                        "torch_plain_epoch_s", "torch_bn_epoch_s",
                                        "nnopt_bn_epoch_overhead_%", "epoch_ratio_plain",
                                        "epoch_ratio_bn"]))
    path = common.save(out, {"rows": rows})
    plt = common.figure()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for prefix, name in (("nnopt", "nnopt"), ("torch", "PyTorch")):
        key = f"{prefix}_bn_overhead_%"
        if key in rows[0]:
            ax.plot([r["batch"] for r in rows], [r[key] for r in rows], "o-", label=name)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(xscale="log", xlabel="batch size", ylabel="BN time overhead per step (%)",
           title="Cost of Batch Normalization, textbook network, CPU")
    common.finish(fig, ax, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
