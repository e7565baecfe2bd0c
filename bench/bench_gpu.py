"""The GPU side of the harness: optimizer-step bandwidth, BN forward+backward, and the
training step on CPU vs GPU with and without BN and CUDA-graph capture, to test the
textbook's claim that BN's time overhead becomes negligible on a GPU.

    python bench/bench_gpu.py [--quick | --check] [--out FILE.json] [--only optim,bn,train]
    python bench/bench_gpu.py --dry-run      # CPU stand-ins, tiny sizes: checks the script

--check is bench/gpu_check.sh's subset (about two minutes on an H200): BN at every shape,
the captured step of the textbook network at batch 64, 1024 and 8192 with and without BN
against torch eager and torch's own CUDA graph (and with each of nnopt's choices undone:
GRAPH_VARIANTS), then optimizer steps at 1e7 and 1e8.

--only reruns some sections: the others stay in --out as they were (with their dates in
"measured") when that file is from the same device.

Ratios only, measured in one process against references measured in the same run, in
interleaved rounds: each ratio is the median of its per-round ratios, with its lowest and
highest round beside it (``<name>_range``; the training rows also keep every round,
``per_round_s``). A configuration that raises leaves a row with its ``error``.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from common import put_ratio, with_range  # noqa: E402
from bench_train import SIZES, NnoptRunner, TorchRunner  # noqa: E402

import nnopt  # noqa: E402
from nnopt import optim  # noqa: E402
from nnopt.fast import plan  # noqa: E402
from nnopt.backend import get_namespace, synchronize  # noqa: E402


class GraphRunner(NnoptRunner):
    """NnoptRunner whose step is one replay of a captured CUDA graph."""

    def __init__(self, bn, batch, sizes=SIZES, fused=True):
        super().__init__(bn, batch, "gpu", sizes, fused=fused)
        from nnopt.graph import CapturedStep
        self.captured = CapturedStep(self.model, self.opt, self.loss, (batch, sizes[0]), (batch,))

    def step(self):
        start = self.next_start()
        return self.captured.step(self.x[start:start + self.batch], self.y[start:start + self.batch])

    def sync(self):
        self.captured.synchronize()


class TorchGraphRunner(TorchRunner):
    """TorchRunner whose step is one replay of a torch.cuda.graph around forward,
    cross-entropy, backward and SGD.step (PyTorch's whole-network capture recipe: a few
    warm-up steps on a side stream, grads set to None before capture so the graph owns
    them, then static inputs copied in before each replay)."""

    def __init__(self, torch, bn, batch, device="cuda", sizes=SIZES):
        super().__init__(torch, bn, batch, device, sizes)
        self.static_x = self.x[:batch].clone()
        self.static_y = self.y[:batch].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.step_on(self.static_x, self.static_y)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self.static_loss = self.loss(self.model(self.static_x), self.static_y)
            self.static_loss.backward()
            self.opt.step()

    def step(self):
        start = self.next_start()
        self.static_x.copy_(self.x[start:start + self.batch])
        self.static_y.copy_(self.y[start:start + self.batch])
        self.graph.replay()
        return self.static_loss


def step_bytes(cls, itemsize):
    """Bytes an optimizer step moves per element: one read of each input (p, g, state) and
    one write of each output (p, state)."""
    return itemsize * (3 + 2 * len(cls.state_names))


def bench_optim(xp, torch, tdev, sync, sizes):
    rows = []
    for n in sizes:
        src, dst = xp.ones(n, dtype=xp.float32), xp.empty(n, dtype=xp.float32)

        def copy():
            dst[...] = src
        times = {"copy": copy}
        for name in optim.OPTIMIZERS:
            store = nnopt.FlatParameters([nnopt.Parameter(np.zeros(1), "w")], xp, "float32") \
                if n == 1 else nnopt.FlatParameters([nnopt.Parameter(np.zeros(n), "w")], xp, "float32")
            store.grad[...] = 1e-3
            times[f"nnopt_{name}"] = optim.create(name, store, lr=1e-3).step
        if torch is not None:
            for name, make in (("adam", lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)),
                               ("sgd", lambda ps: torch.optim.SGD(ps, lr=1e-3, fused=True))):
                p = torch.zeros(n, device=tdev, requires_grad=True)
                p.grad = torch.full((n,), 1e-3, device=tdev)
                try:
                    opt = make([p])
                    opt.step()
                    times[f"torch_fused_{name}"] = opt.step
                except (RuntimeError, TypeError):
                    pass
        rounds = common.timeit_rounds(times, repeat=5, sync=sync)
        measured = common.medians(rounds)
        copy_bw = 8 * n / measured["copy"]
        for name, cls in optim.OPTIMIZERS.items():
            row = {"n": n, "optimizer": name, "seconds": measured[f"nnopt_{name}"],
                   "GBps": step_bytes(cls, 4) * n / measured[f"nnopt_{name}"] / 1e9,
                   "copy_GBps": copy_bw / 1e9}
            # copy time over step time, scaled by the bytes each moves, round by round (the
            # median of those ratios: not quite GBps / copy_GBps, which are of medians)
            put_ratio(row, "fraction_of_copy_bw", rounds["copy"], rounds[f"nnopt_{name}"],
                      scale=lambda v, cls=cls: v * step_bytes(cls, 4) / 8)
            if f"torch_fused_{name}" in rounds:
                put_ratio(row, "vs_torch_fused", rounds[f"nnopt_{name}"],
                          rounds[f"torch_fused_{name}"])
            rows.append(row)
    return rows


def bench_bn(xp, torch, tdev, sync, shapes):
    rows = []
    for shape in shapes:
        rng = np.random.default_rng(0)
        x = xp.asarray(rng.standard_normal(shape, dtype=np.float32))
        d = xp.asarray(rng.standard_normal(shape, dtype=np.float32))
        layer = nnopt.BatchNorm(shape[1])
        nnopt.Sequential([layer], device=xp)

        def fused():
            layer.forward(x)
            layer.backward(d)

        def fused_4byte():  # the split path's row walks one element per load
            with plan_setting("BN_VECTORS", False):
                fused()
        times = {"nnopt": fused}
        if shape[0] >= plan.BN_SPLIT_MIN_ROWS:  # the split path
            times["nnopt_4byte"] = fused_4byte
        if torch is not None:
            tx = torch.randn(shape, device=tdev, requires_grad=True)
            td = torch.randn(shape, device=tdev)
            tbn = torch.nn.BatchNorm1d(shape[1]).to(tdev)

            def torch_fb():  # nnopt writes its gradients: torch's are not accumulated either
                tx.grad = None
                tbn.zero_grad(set_to_none=True)
                tbn(tx).backward(td)
            times["torch"] = torch_fb
        rounds = common.timeit_rounds(times, repeat=5, sync=sync)
        row = {"shape": f"{shape[0]}x{shape[1]}",
               **{f"{name}_s": t for name, t in common.medians(rounds).items()}}
        if "nnopt_4byte" in rounds:
            put_ratio(row, "vs_4byte", rounds["nnopt"], rounds["nnopt_4byte"])
        if "torch" in rounds:
            put_ratio(row, "vs_torch", rounds["nnopt"], rounds["torch"])
        rows.append(row)
    return rows


def bench_train(torch, configs, dry_run, on_row=lambda rows: None):
    """Per-step time of every (batch, width) config: CPU and GPU, BN on/off, graph on/off.
    ``on_row(rows)`` after each config (the caller writes what it has: a run cut short by
    its time limit keeps the configs it finished)."""
    rows = []
    gpu = "cpu" if dry_run else "gpu"
    tdev = "cpu" if dry_run else "cuda"
    for batch, width, with_cpu in configs:
        try:
            rows.append(_train_config(torch, batch, width, with_cpu, gpu, tdev, dry_run))
            on_row(rows)
        except Exception as exc:  # record it and go on with the other configurations
            error = f"{type(exc).__name__}: {exc}"
            print(f"batch {batch} width {width}: {error}", flush=True)
            rows.append({"batch": batch, "width": "textbook" if width is None else width,
                         "error": error})
            on_row(rows)
    return rows


#: interleaved rounds per training configuration: enough for a median and its spread
TRAIN_ROUNDS = 5

#: Every configuration's runners, kept for the whole process: a freed runner's CUDA stream
#: address could be given to the next configuration's, which would then inherit the cuBLAS
#: workspace (or none) nnopt's handle keeps per stream address, and its side stream.
_KEPT_RUNNERS = []


def _train_config(torch, batch, width, with_cpu, gpu, tdev, dry_run):
    sizes = SIZES if width is None else [784, width, width, width, width, 10]
    row = {"batch": batch, "width": "textbook" if width is None else width}
    runners = {}
    _KEPT_RUNNERS.append(runners)
    for bn in (False, True):
        tag = "bn" if bn else "plain"
        if with_cpu:
            runners[f"cpu_{tag}"] = NnoptRunner(bn, batch, "cpu", sizes)
        runners[f"gpu_{tag}"] = NnoptRunner(bn, batch, gpu, sizes)
        if not dry_run and width is None:  # nnopt's capturable GEMM is sized for small layers
            try:
                runners[f"gpu_graph_{tag}"] = GraphRunner(bn, batch, sizes)
                if batch == 64:  # the fused blocks against the textbook's layers (issue 14)
                    runners[f"gpu_graph_layers_{tag}"] = GraphRunner(bn, batch, sizes, fused=False)
                for name, (_, applies, _, _) in GRAPH_VARIANTS.items():  # nnopt's other choices
                    if applies(batch):
                        runners[f"gpu_graph_{name}_{tag}"] = variant_runner(name, bn, batch, sizes)
            except Exception as exc:  # report, do not hide
                row[f"graph_error_{tag}"] = f"{type(exc).__name__}: {exc}"
        if torch is not None:
            runners[f"torch_gpu_{tag}"] = TorchRunner(torch, bn, batch, tdev, sizes)
            if not dry_run:
                try:
                    runners[f"torch_graph_{tag}"] = TorchGraphRunner(torch, bn, batch, tdev, sizes)
                except Exception as exc:  # report, do not hide
                    row[f"torch_graph_error_{tag}"] = f"{type(exc).__name__}: {exc}"
    if "gpu_graph_plain" in runners:
        row["gemm_route"] = runners["gpu_graph_plain"].captured.gemm_route

    def sync_all():
        for runner in runners.values():
            runner.sync()
    # interleaved rounds: a slow spell of the machine hits every contender alike, and a
    # ratio is taken round by round (its spread is kept beside its median)
    rounds = common.timeit_rounds({k: r.step for k, r in runners.items()}, repeat=TRAIN_ROUNDS,
                                  min_time=0.05, sync=sync_all)
    row.update({f"{key}_s": t for key, t in common.medians(rounds).items()})
    row["per_round_s"] = rounds

    def ratio(name, top, bottom, scale=lambda v: v):
        if top in rounds and bottom in rounds:
            put_ratio(row, name, rounds[top], rounds[bottom], scale)
    for tag in ("plain", "bn"):
        ratio(f"graph_vs_torch_graph_{tag}", f"gpu_graph_{tag}", f"torch_graph_{tag}")
        for name in GRAPH_VARIANTS:
            ratio(f"{name}_vs_graph_{tag}", f"gpu_graph_{name}_{tag}", f"gpu_graph_{tag}")
        ratio(f"graph_fused_vs_layers_{tag}", f"gpu_graph_{tag}", f"gpu_graph_layers_{tag}")
    for prefix in ("cpu", "gpu", "gpu_graph", "gpu_graph_layers", "torch_gpu", "torch_graph",
                   *(f"gpu_graph_{name}" for name in GRAPH_VARIANTS)):
        ratio(f"{prefix}_bn_overhead_%", f"{prefix}_bn", f"{prefix}_plain",
              scale=lambda v: 100 * (v - 1))
    ratio("graph_speedup_bn", "gpu_bn", "gpu_graph_bn")
    ratio("gpu_speedup_bn", "cpu_bn", "gpu_graph_bn" if "gpu_graph_bn" in rounds else "gpu_bn")
    print(f"batch {batch:5d} width {row['width']}: " + ", ".join(
        f"{k[:-2]} {v * 1e6:.0f} us" for k, v in row.items()
        if k.endswith("_s") and isinstance(v, float)), flush=True)
    return row


# The captured step as nnopt would run it with one of its choices undone, measured beside
# its own: name -> (what changes, at which batches, the setting: a plan attribute or an
# environment variable, and its value while the variant is captured).
GRAPH_VARIANTS = {
    # cuBLAS's workspace for every product (it may split any into a GEMM and a reduction
    # kernel), or none for any, instead of plan.split_k_pays's choice per product
    "ws": ("workspace for all", lambda batch: True, "$NNOPT_CUBLAS_WORKSPACE", "default"),
    "nows": ("no workspace", lambda batch: True, "$NNOPT_CUBLAS_WORKSPACE", "0"),
    # the blocks' products as cuBLAS GEMMs beside their passes, not fused into them
    "cublas": ("cuBLAS products", lambda batch: plan.fuses_product(batch), "FUSED_PRODUCTS",
               False),
    # the fused products' k cut into slices of 32 (more blocks, each tile's sums added by
    # its last block) instead of FUSED_MIN_SLICE's: the layers after the first split too
    "slices32": ("k slices of 32", lambda batch: plan.fuses_product(batch), "FUSED_MIN_SLICE",
                 32),
    # the weight gradients as cuBLAS GEMMs beside the fused backward kernels, not inside them
    "dw_cublas": ("cuBLAS weight grads", lambda batch: plan.fuses_product(batch),
                  "FUSED_WEIGHT_GRADS", False),
    # the last block's product in a launch of its own, not inside the loss's
    "loss_apart": ("loss apart", lambda batch: plan.fuses_product(batch), "FUSED_LOSS", False),
    # the weight gradients on the main stream, not beside it
    "serial": ("serial dW", lambda batch: True, "OVERLAP_WEIGHT_GRADS", False),
}


def variant_runner(name, bn, batch, sizes):
    """A GraphRunner captured with GRAPH_VARIANTS[name]'s setting (restored after)."""
    import os

    from nnopt import cublas
    _, _, setting, value = GRAPH_VARIANTS[name]
    if setting.startswith("$"):
        key = setting[1:]
        saved = os.environ.get(key)
        os.environ[key] = str(cublas.WORKSPACE_BYTES) if value == "default" else value
        try:
            return GraphRunner(bn, batch, sizes)
        finally:
            if saved is None:
                del os.environ[key]
            else:
                os.environ[key] = saved
    with plan_setting(setting, value):
        return GraphRunner(bn, batch, sizes)


@contextlib.contextmanager
def plan_setting(name, value):
    """nnopt.fast.plan.<name> set to ``value`` for the block, then restored."""
    saved = getattr(plan, name)
    setattr(plan, name, value)
    try:
        yield
    finally:
        setattr(plan, name, saved)


def graph_table(rows):
    """The captured-step table of the issue: per-step microseconds (median of the rounds),
    textbook network, SGD; nnopt's graph also with each of its choices undone
    (GRAPH_VARIANTS); the ratio to torch's graph with its lowest and highest round."""
    lines = ["| batch | BN | torch eager | torch graph | nnopt graph | "
             + " | ".join(f"nnopt, {label}" for label, *_ in GRAPH_VARIANTS.values())
             + " | nnopt / torch graph |",
             "|---:|:---:|---:|---:|---:|" + "---:|" * len(GRAPH_VARIANTS) + "---:|"]
    us = lambda r, k: f"{r[k] * 1e6:.0f}" if k in r else "-"  # noqa: E731
    for r in rows:
        if r.get("width") != "textbook":
            continue
        if "error" in r:  # (an exception's text may hold a newline or a "|")
            error = " ".join(str(r["error"]).split()).replace("|", "/")
            lines.append(f"| {r['batch']} | - | failed: {error} |")
            continue
        for tag, label in (("plain", "no"), ("bn", "yes")):
            others = " | ".join(us(r, f"gpu_graph_{name}_{tag}_s") for name in GRAPH_VARIANTS)
            lines.append(f"| {r['batch']} | {label} | {us(r, f'torch_gpu_{tag}_s')} | "
                         f"{us(r, f'torch_graph_{tag}_s')} | {us(r, f'gpu_graph_{tag}_s')} | "
                         f"{others} | {with_range(r, f'graph_vs_torch_graph_{tag}')} |")
    return "\n".join(lines)


def advice(rows, margin=0.95):
    """Where one of nnopt's choices lost to its undoing (GRAPH_VARIANTS) in this run: the
    setting to change and the batches it would pay at, one line each. A variant counts as
    faster at a batch when its median round took at most ``margin`` of nnopt's step time
    and every round less than nnopt's (where the rounds are known), with and without BN
    alike (one winning alone is within a run's noise)."""
    def won(r, key):
        if r.get(key) is None or r[key] > margin:
            return False
        return r.get(f"{key}_range", [0, 0])[1] < 1
    lines = []
    for name, (label, _, setting, value) in GRAPH_VARIANTS.items():
        wins = []
        for r in rows:
            if r.get("width") != "textbook":
                continue
            keys = [f"{name}_vs_graph_{tag}" for tag in ("plain", "bn")]
            if all(won(r, key) for key in keys):
                wins.append(f"batch {r['batch']} ({r[keys[0]]:.2f}x, {r[keys[1]]:.2f}x with BN)")
        if wins:
            lines.append(f"{label}: {setting} = {value!r} was faster at " + ", ".join(wins))
    return lines or [f"no variant took <= {margin:.2f}x of nnopt's step with and without BN "
                     "in every round: keep every choice"]


def verdict(rows, threshold=10.0):
    """Where BN's overhead per step is below ``threshold`` percent in every round, where it
    is above in every round, and where the rounds straddle it (too close to call)."""
    holds, fails, close, failed = [], [], [], []
    for r in rows:
        where = f"batch {r['batch']}, width {r['width']}"
        key = "gpu_graph_bn_overhead_%" if "gpu_graph_bn_overhead_%" in r else "gpu_bn_overhead_%"
        if key not in r:
            failed.append(f"{where} ({r.get('error', 'not measured')})")
            continue
        label = f"{where} ({with_range(r, key, '{:+.1f}%')}"
        if "torch_graph_bn_overhead_%" in r:
            label += f"; PyTorch's graph {with_range(r, 'torch_graph_bn_overhead_%', '{:+.1f}%')}"
        label += ")"
        low, high = r.get(f"{key}_range", [r[key], r[key]])
        (holds if high < threshold else fails if low >= threshold else close).append(label)
    text = (f"BN's time overhead on the GPU is below {threshold:.0f}% (negligible) in every "
            f"round for: {'; '.join(holds) or 'no configuration'}. It is not for: "
            f"{'; '.join(fails) or 'none'}.")
    if close:
        text += f" Too close to call (rounds on both sides): {'; '.join(close)}."
    if failed:
        text += f" Not measured: {'; '.join(failed)}."
    cpu = [r for r in rows if "cpu_bn_overhead_%" in r]
    if cpu:
        text += " On the CPU, in the same run: " + "; ".join(
            f"batch {r['batch']}, width {r['width']} {with_range(r, 'cpu_bn_overhead_%', '{:+.1f}%')}"
            for r in cpu) + "."
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--check", action="store_true", help="bench/gpu_check.sh's subset")
    ap.add_argument("--dry-run", action="store_true", help="CPU stand-ins for the GPU")
    ap.add_argument("--out", help="the JSON to write (default bench/results/gpu.json; "
                    "with --dry-run, a file in the system's temporary folder)")
    ap.add_argument("--only", default="optim,bn,train",
                    help="comma-separated sections to run (a second device call can rerun one)")
    args = ap.parse_args(argv)
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    unknown = only - {"optim", "bn", "train"}
    if unknown:
        ap.error(f"--only: unknown sections {sorted(unknown)}; choose from optim, bn, train")
    xp = get_namespace("cpu" if args.dry_run else "gpu")
    torch = common.torch_or_none()
    if torch is not None and not args.dry_run and not torch.cuda.is_available():
        print("note: this torch has no CUDA; PyTorch GPU columns are left out")
        torch = None
    tdev = "cpu" if args.dry_run else "cuda"

    def sync():
        synchronize(xp)
        if torch is not None and tdev == "cuda":
            torch.cuda.synchronize()
    all_shapes = [(64, 16), (64, 128), (256, 256), (1024, 1024), (4096, 4096)]
    if args.dry_run:  # the script's own check: every section, tiny sizes
        sizes, shapes, configs = [10**4], [(64, 16), (64, 128)], [(64, None, True)]
    elif args.check:
        sizes, shapes = [10**7, 10**8], all_shapes
        configs = [(64, None, False), (1024, None, False), (8192, None, False)]
    elif args.quick:
        sizes, shapes = [10**5, 10**6], [(64, 128), (1024, 1024)]
        configs = [(64, None, True), (1024, None, True)]
    else:
        sizes, shapes = [10**6, 10**7, 10**8], all_shapes
        configs = [
        (64, None, True), (1024, None, True), (8192, None, True), (64, 1024, True),
        (1024, 1024, True), (8192, 1024, False), (64, 4096, False), (1024, 4096, False),
        (8192, 4096, False)]
    # a dry run never writes over the GPU's results
    out = Path(args.out or (Path(tempfile.gettempdir()) / "nnopt_gpu_dry_run.json" if args.dry_run
                            else common.RESULTS / "gpu.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    device = device_name(xp)
    results = kept_sections(out, device, only)

    def write():  # after every section, so a run cut short still leaves its numbers
        import json
        for name in only & set(SECTIONS):
            if any(key in results for key in SECTIONS[name]):
                results.setdefault("measured", {})[name] = common.machine()["date"]
        # whole or not at all: a section's process may be killed by its time limit
        partial = out.with_name(out.name + ".partial")
        partial.write_text(json.dumps({"machine": common.machine(), "device": device,
                                       **results}, indent=2, default=str) + "\n")
        partial.replace(out)
    # BN, then the training step, then the optimizers (their goals are met): a run cut
    # short by its time limit loses the least wanted numbers (each section is written as
    # it ends)
    if "bn" in only:
        results["bn"] = bench_bn(xp, torch, tdev, sync, shapes)
        write()
        print(common.table(results["bn"], ["shape", "nnopt_s", "torch_s", "vs_torch",
                                           "nnopt_4byte_s", "vs_4byte"]))
    if "train" in only:
        train_section(results, write, torch, configs, args.dry_run, out)
    if "optim" in only:
        results["optim"] = bench_optim(xp, torch, tdev, sync, sizes)
        write()
        print(common.table(results["optim"], ["optimizer", "n", "seconds", "GBps", "copy_GBps",
                                              "fraction_of_copy_bw", "vs_torch_fused"]))


#: the keys of the JSON each section writes
SECTIONS = {"bn": ("bn",), "train": ("train", "advice", "graph_table", "verdict"),
            "optim": ("optim",)}


def kept_sections(out, device, only):
    """The sections of an earlier run in ``out`` that this run does not measure, so that
    rerunning one section (``--only``) keeps the others; kept only when that run was on the
    same device (another card's numbers beside this one's would read as one run)."""
    import json
    try:
        text = out.read_text()
    except OSError:  # no earlier run
        return {}
    try:
        earlier = json.loads(text)
        device_before = earlier.get("device")
    except (ValueError, AttributeError):
        earlier, device_before = None, "an unreadable file"
    if device_before != device:
        # the earlier file is kept beside, never lost
        aside = out.with_name(f"{out.stem}.previous{out.suffix}")
        aside.write_text(text)
        print(f"note: {out} holds a run on {device_before!r}, not {device!r}: it is replaced, "
              f"not merged (the earlier file is now {aside})")
        return {}
    kept = {key: earlier[key] for name, keys in SECTIONS.items() if name not in only
            for key in keys if key in earlier}
    dates = {name: date for name, date in earlier.get("measured", {}).items()
             if name not in only and any(key in kept for key in SECTIONS.get(name, ()))}
    if kept:
        print(f"keeping from {out}: {', '.join(sorted(dates) or sorted(kept))} (measured earlier)")
    return {**kept, **({"measured": dates} if dates else {})}


def train_section(results, write, torch, configs, dry_run, out):
    """The training-step section: rows written after each config, then the tables, the
    BN verdict and the plot."""
    def partial(rows):
        results["train"] = rows
        write()
    results["train"] = bench_train(torch, configs, dry_run, on_row=partial)
    print(common.table(results["train"], ["batch", "width", "cpu_bn_overhead_%", "gpu_bn_overhead_%",
                                          "gpu_graph_bn_overhead_%", "torch_gpu_bn_overhead_%",
                                          "torch_graph_bn_overhead_%", "graph_speedup_bn",
                                          "gpu_speedup_bn"]))
    print("each variant's step time over nnopt's (above 1: nnopt's choice is faster)")
    print(common.table(results["train"], ["batch", *(f"{name}_vs_graph_{tag}"
                                                     for name in GRAPH_VARIANTS
                                                     for tag in ("plain", "bn"))]))
    results["advice"] = advice(results["train"])
    print("\n".join(results["advice"]))
    results["graph_table"] = graph_table(results["train"])
    print(results["graph_table"])
    results["verdict"] = verdict(results["train"])
    print(results["verdict"])
    write()
    plot(results["train"], out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def device_name(xp):
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:
        return "cpu (dry run)"


def plot(rows, path):
    plt = common.figure()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    labels = [f"b{r['batch']}\n{r['width']}" for r in rows]
    x = np.arange(len(rows))
    for i, (key, name) in enumerate((("cpu_bn_overhead_%", "CPU (nnopt)"),
                                     ("gpu_bn_overhead_%", "GPU eager (nnopt)"),
                                     ("gpu_graph_bn_overhead_%", "GPU graph (nnopt)"),
                                     ("torch_gpu_bn_overhead_%", "GPU (PyTorch)"))):
        values = [r.get(key, np.nan) for r in rows]
        ax.bar(x + (i - 1.5) * 0.2, values, 0.2, label=name)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set(ylabel="BN time overhead per step (%)", xlabel="batch / hidden width",
           title="Does BN's cost vanish on a GPU? Overhead per configuration")
    common.finish(fig, ax, path)


if __name__ == "__main__":
    main()
