"""Where the captured training step's time goes: every kernel of one replay of the textbook
network's CUDA graph, timed by Nsight Compute; each configuration in two processes of its
own (the replay timed alone, then the one ncu profiles).

    bash bench/profile_gpu.sh                 # on a GPU machine: per config, then the table
    python bench/profile_gpu.py --run 64 bn   # warm up, time replays, one profiled replay
    python bench/profile_gpu.py --summarize DIR --out FILE.json   # exit 4: a config unprofiled

ncu times each kernel node alone (``--graph-profiling node``, clocks left as they are), so
the sum is the kernels' own time, taken one at a time with caches flushed before each: more
than they take inside the replay, where they find warm caches and the side stream's run
beside the main one. The replay's wall time is measured in a process of its own, without
ncu (under ncu every CUDA call is intercepted: 2,432 us per replay against 114 us). That
wall time minus the kernels' sum ("rest", ``gaps_us``) is a lower bound on what the graph's
launches and dependencies cost (it can even come out negative). Kernel names are grouped
(cuBLAS, BN, activation, loss, optimizer, memset) so the table says which kind of node
dominates. The JSON names the card the configurations ran on (``device``, as each
``--run`` found it).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def run(batch, bn, steps=30):
    import cupy
    from bench_gpu import GraphRunner
    runner = GraphRunner(bn, batch)
    for _ in range(steps):
        runner.step()
    runner.sync()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(steps):
        runner.step()
    stop.record()
    stop.synchronize()
    wall_us = cupy.cuda.get_elapsed_time(start, stop) * 1e3 / steps
    cupy.cuda.runtime.profilerStart()
    runner.step()
    runner.sync()
    cupy.cuda.runtime.profilerStop()
    device = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    print(json.dumps({"batch": batch, "bn": bn, "replay_us": wall_us, "device": device,
                      "cupy": cupy.__version__}))


KINDS = (("split-K reduce", ("splitKreduce",)), ("fused product", ("linear_forward", "linear_backward")),
         ("gemm", ("gemm", "sm90_", "sm80_", "cutlass", "xmma", "ampere", "splitk", "Kernel")),
         ("bn", ("bn_",)), ("activation", ("activation", "bias_")),
         ("loss", ("softmax", "cross_entropy")),
         ("optimizer", ("sgd_", "adam", "momentum", "nag_", "rmsprop", "adagrad", "adadelta")),
         ("copy/fill", ("fill", "copy", "memset", "nnopt_", "cupy_")))


def kind_of(name):
    for kind, marks in KINDS:
        if any(mark in name for mark in marks):
            return kind
    return "other"


def read_ncu_csv(path):
    """[(kernel name, microseconds)] in launch order from ``ncu --csv --log-file``."""
    lines = Path(path).read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    kernels = {}
    for row in csv.DictReader(lines[start:]):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "nsecond")
        scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}.get(unit, 1e-3)
        kernels[int(row["ID"])] = (row["Kernel Name"], value * scale)
    return [kernels[i] for i in sorted(kernels)]


def read_meta(path):
    """The --run line of ``path`` (its last line): batch, bn, replay_us, device; from the
    file's name (b64_bn.meta.json) with replay_us None where both runs failed."""
    lines = path.read_text().strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        batch, kind = path.name.removesuffix(".meta.json").lstrip("b").split("_", 1)
        return {"batch": int(batch), "bn": kind == "bn", "replay_us": None}


def summarize(folder):
    """One row per configuration in ``folder``; a row with no kernel says so (``error``)."""
    rows = []
    for meta_path in sorted(Path(folder).glob("*.meta.json")):
        meta = read_meta(meta_path)
        csv_path = meta_path.with_name(meta_path.name.replace(".meta.json", ".csv"))
        kernels = read_ncu_csv(csv_path) if csv_path.exists() else []
        by_kind = {}
        for name, us in kernels:
            by_kind.setdefault(kind_of(name), []).append(us)
        total = sum(us for _, us in kernels)
        row = {**meta, "nodes": len(kernels), "kernels_us": total,
               "gaps_us": None if meta["replay_us"] is None else meta["replay_us"] - total,
               "by_kind": {k: {"n": len(v), "us": sum(v)} for k, v in by_kind.items()},
               "kernels": [{"name": n[:90], "us": round(us, 2)} for n, us in kernels]}
        if not kernels:
            row["error"] = f"no kernel profiled (ncu's output: {csv_path.name})"
        rows.append(row)
    return rows


def devices(rows):
    """The card(s) the rows were measured on, as their --run processes named them."""
    return ", ".join(sorted({row["device"] for row in rows if row.get("device")})) or "unknown"


def print_rows(rows):
    for row in rows:
        config = f"batch {row['batch']} {'BN' if row['bn'] else 'plain'}"
        if "error" in row:
            print(f"\n== {config}: PROFILE FAILED: {row['error']}")
            continue
        if row["replay_us"] is None:
            print(f"\n== {config}: replay time not measured, {row['nodes']} kernels "
                  f"{row['kernels_us']:.1f} us")
        else:
            print(f"\n== {config}: replay {row['replay_us']:.1f} us, {row['nodes']} kernels "
                  f"{row['kernels_us']:.1f} us, rest (at least) {row['gaps_us']:.1f} us")
        for kind, v in sorted(row["by_kind"].items(), key=lambda kv: -kv[1]["us"]):
            print(f"   {kind:<11} {v['n']:>3} kernels {v['us']:8.1f} us")
        for k in row["kernels"]:
            print(f"      {k['us']:8.2f}  {k['name']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", nargs=2, metavar=("BATCH", "bn|plain"))
    ap.add_argument("--summarize", metavar="DIR")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.run:
        run(int(args.run[0]), args.run[1] == "bn")
    elif args.summarize:
        rows = summarize(args.summarize)
        print(f"device: {devices(rows)}")
        print_rows(rows)
        if args.out:
            Path(args.out).write_text(json.dumps({"device": devices(rows), "rows": rows}, indent=1))
        if not rows or any("error" in row for row in rows):
            # a profile without kernels is no profile: say so in the exit status
            print("PROFILE FAILED: " + ("no configuration in " + args.summarize if not rows
                                        else "a configuration has no kernel profiled"))
            sys.exit(4)
    else:
        ap.error("give --run BATCH bn|plain or --summarize DIR")


if __name__ == "__main__":
    main()
