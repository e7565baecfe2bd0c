"""The CPU bench scripts' harness on stand-in timings (their numbers mean nothing here): every
ratio carries its spread over rounds, the JSON names its thread counts, rounds rotate, and
--out writes where it is told, leaving the committed bench/results alone."""
import contextlib
import json
import statistics
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def bench(monkeypatch):
    """bench/ importable, no plotting window, and bench/results checked unchanged after."""
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    committed = {path: path.read_bytes() for path in (BENCH / "results").iterdir()}
    yield
    assert {path: path.read_bytes() for path in (BENCH / "results").iterdir()} == committed


class FakeWorker:
    """common.Worker without a process: builds nothing; each timing differs by contender
    and by round, so medians, ratios and their ranges are all distinct."""
    order = []  # the contenders' keys in the order they were timed

    def __init__(self, module):
        self.timed = 0

    def ask(self, op, key, *args):
        if op == "calibrate":
            return 1
        if op == "time":
            FakeWorker.order.append(key)
            self.timed += 1
            return (1 + len(key)) * 1e-3 * (1 + 0.1 * (self.timed % 3))
        return None

    def close(self):
        pass


@pytest.fixture
def fake_workers(bench, monkeypatch):
    import common
    monkeypatch.setattr(common, "Worker", FakeWorker)
    monkeypatch.setattr(common.time, "sleep", lambda seconds: None)
    FakeWorker.order = []
    return common


def check_ratio(row, name, top, bottom, scale=lambda v: v):
    """``row[name]`` is the median of the per-round ratios, within its range."""
    ratios = [scale(t / b) for t, b in zip(row["per_round_s"][top], row["per_round_s"][bottom],
                                           strict=True)]
    assert row[name] == pytest.approx(statistics.median(ratios))
    assert row[f"{name}_range"] == pytest.approx([min(ratios), max(ratios)])


def check_machine(result):
    threads = result["machine"]["threads"]
    assert threads["cpu_count"] >= 1 and "numba" in threads and "torch" in threads
    assert any(pool["api"] == "openblas" and pool["threads"] >= 1
               for pool in threads["threadpools"]), threads


def test_bench_bn_out_records_per_round_ratios_and_threads(fake_workers, tmp_path, capsys):
    import bench_bn
    out = tmp_path / "bn.json"
    bench_bn.main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    check_machine(result)
    row = result["rows"][0]
    assert row["rounds"] == bench_bn.ROUNDS == len(row["per_round_s"]["fused"])
    check_ratio(row, "fused_vs_reference", "fused", "reference")
    check_ratio(row, "fused_vs_torch", "fused", "torch")
    assert row["fused_s"] == statistics.median(row["per_round_s"]["fused"])
    assert out.with_suffix(".png").exists()
    low, high = row["fused_vs_torch_range"]
    assert f"({low:.3g} to {high:.3g})" in capsys.readouterr().out  # the table shows the spread


def test_bench_optim_out(fake_workers, tmp_path):
    import bench_optim
    out = tmp_path / "optim.json"
    bench_optim.main(["--sizes", "1e3", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["optimizer"] for r in rows] == list(bench_optim.OPTIMIZERS)
    for row in rows:
        check_ratio(row, "fused_vs_copy_bw", "copy", "fused",
                    scale=lambda v, row=row: v * bench_optim.BYTES[row["optimizer"]] / 8)
        check_ratio(row, "fused_vs_best_torch", "fused", row["best_torch"])
        check_ratio(row, "fused_vs_torch_fused", "fused", "torch_fused")


@pytest.mark.parametrize("args", [["--quick"], ["--quick", "--busy"]])
def test_bench_train_out_measures_epochs_over_rounds(fake_workers, monkeypatch, tmp_path, args):
    import bench_train
    monkeypatch.setattr(fake_workers, "busy_process", lambda enabled: contextlib.nullcontext())
    out = tmp_path / "train.json"
    bench_train.main([*args, "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [64, 1024]
    first = rows[0]
    assert first["rounds"] == {"step": 8, "epoch": 4} and rows[1]["rounds"] == {"step": 8}
    assert len(first["per_round_s"]["nnopt_bn_epoch"]) >= 3  # an epoch ratio is no single round
    check_ratio(first, "epoch_ratio_bn", "nnopt_bn_epoch", "torch_bn_epoch")
    check_ratio(first, "nnopt_bn_overhead_%", "nnopt_bn_step", "nnopt_plain_step",
                scale=lambda v: 100 * (v - 1))
    check_ratio(first, "fused_vs_layers_bn", "nnopt_bn_step", "nnopt_layers_bn_step")
    assert ("fixed_vs_policy_bn_range" in first) == ("--busy" in args)


def test_bench_workers_run_the_checkouts_nnopt(tmp_path):
    """A bench and its worker processes import the nnopt of the checkout bench/ lies in,
    not another installed copy (whose code the recorded commit would misname), from any
    working directory."""
    import subprocess
    import sys
    (tmp_path / "where.py").write_text(
        "def where(path):\n    import nnopt\n    open(path, 'w').write(nnopt.__file__)\n"
        "    return lambda: None\n")
    script = (f"import sys; sys.path[:0] = [{str(BENCH)!r}, {str(tmp_path)!r}]\n"
              "import common, nnopt\n"
              "worker = common.Worker('where')\n"
              f"worker.ask('make', 'k', 'where', {str(tmp_path / 'worker.txt')!r})\n"
              "worker.close()\n"
              "print(nnopt.__file__)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    package = BENCH.parent / "nnopt"
    assert Path(done.stdout.strip()).parent == package
    assert Path((tmp_path / "worker.txt").read_text()).parent == package


def test_compare_rotates_the_order_between_rounds(fake_workers):
    one, other = FakeWorker("a"), FakeWorker("b")
    rounds = fake_workers.compare({"a": (one, "a"), "b": (one, "b"), "c": (other, "c")}, repeat=3)
    # each worker's contenders together; the turns and the order within them rotate
    assert FakeWorker.order == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert {name: len(times) for name, times in rounds.items()} == {"a": 3, "b": 3, "c": 3}


@pytest.mark.parametrize("repeat", [6, 7])
def test_compare_puts_each_contender_first_in_its_turn_as_often_as_its_partner(
        fake_workers, monkeypatch, repeat):
    """What runs first after the pause before a worker's turn runs slow: a plain rotation
    of [nnopt plain, nnopt bn, torch plain, torch bn] put nnopt's plain step there in 7
    rounds of 7 and its BN step in 2, which read nnopt's BN overhead ~10 points low. Each
    timed round also follows an untimed warm-up of a quarter of its calls."""
    import common
    turns = []
    monkeypatch.setattr(common.time, "sleep", lambda seconds: turns.append([]))
    asked = []

    class Recording(FakeWorker):
        def ask(self, op, key, *args):
            if op == "calibrate":
                return 8
            if op == "time":
                turns[-1].append(key)
                asked.append(args)
            return super().ask(op, key, *args)
    nnopt_worker, torch_worker = Recording("nnopt"), Recording("torch")
    common.compare({"nnopt_plain": (nnopt_worker, "nnopt_plain"),
                    "nnopt_bn": (nnopt_worker, "nnopt_bn"),
                    "torch_plain": (torch_worker, "torch_plain"),
                    "torch_bn": (torch_worker, "torch_bn")}, repeat=repeat)
    firsts = [turn[0] for turn in turns]
    assert len(turns) == 2 * repeat and all(len(turn) == 2 for turn in turns)
    for lib in ("nnopt", "torch"):
        assert abs(firsts.count(f"{lib}_plain") - firsts.count(f"{lib}_bn")) <= repeat % 2
    assert set(asked) == {(8, 2)}  # 8 timed calls after 2 untimed ones


def test_timeit_rounds_rotates_the_order_between_rounds(bench):
    import common
    order = []
    common.timeit_rounds({"one": lambda: order.append("one"), "all": lambda: order.append("all")},
                         repeat=4, min_time=0)
    assert order[4:] == ["one", "all", "all", "one"] * 2  # (after two calibration calls each)


def test_bench_blas_threads_out(bench, monkeypatch, tmp_path):
    import bench_blas_threads
    import common
    monkeypatch.setattr(common, "_calibrate", lambda fn, min_time, sync=None: 1)  # one call a round
    out = tmp_path / "blas.json"
    bench_blas_threads.main(["--batches", "64", "--out", str(out)])
    result = json.loads(out.read_text())
    check_machine(result)
    for row in result["rows"]:
        assert row["rounds"] == 7
        check_ratio(row, "all/one", "all", "one")


def test_experiment_sync_bn_out(bench, monkeypatch, tmp_path):
    import experiment_sync_bn

    def run(n, per_rank, sync, args, out):  # no mpiexec: a run's shape, made up
        history = [{"iteration": i, "val_loss": 1 / (i + 1), "val_accuracy": 0.5} for i in range(3)]
        return {"ranks": n, "per_rank": per_rank, "sync_bn": sync, "history": history,
                "summary": {"test_accuracy": 0.9, "test_loss": 0.3}}
    monkeypatch.setattr(experiment_sync_bn, "run", run)
    out = tmp_path / "sync.json"
    assert experiment_sync_bn.main(["--ranks", "2", "--out", str(out)]) == 0
    assert [r["sync_bn"] for r in json.loads(out.read_text())] == [False, True]
    assert out.with_suffix(".png").exists()

