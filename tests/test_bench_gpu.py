"""bench/bench_gpu.py without a GPU: its dry run (CPU stand-ins, tiny sizes) goes through
every section and writes its JSON; the captured-step table and the verdict format rows."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def bench_gpu(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    import bench_gpu
    return bench_gpu


def test_dry_run_writes_every_section(bench_gpu, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    bench_gpu.main(["--dry-run", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["device"] == "cpu (dry run)" and "machine" in result
    assert {r["optimizer"] for r in result["optim"]} >= {"sgd", "adam"}
    assert [r["shape"] for r in result["bn"]] == ["64x16", "64x128"]
    assert result["train"][0]["batch"] == 64 and "verdict" in result
    row = result["train"][0]
    # every contender's rounds are kept, and ratios carry their lowest and highest round
    assert {len(times) for times in row["per_round_s"].values()} == {bench_gpu.TRAIN_ROUNDS}
    low, high = row["gpu_bn_overhead_%_range"]
    assert low <= row["gpu_bn_overhead_%"] <= high
    assert result["graph_table"].startswith("| batch | BN | torch eager | torch graph")
    assert "| batch | BN |" in capsys.readouterr().out


def test_rerunning_one_section_keeps_the_others(bench_gpu, tmp_path):
    out = tmp_path / "gpu.json"
    bench_gpu.main(["--dry-run", "--only", "bn,optim", "--out", str(out)])
    first = json.loads(out.read_text())
    bench_gpu.main(["--dry-run", "--only", "optim", "--out", str(out)])
    second = json.loads(out.read_text())
    assert second["bn"] == first["bn"] and second["measured"]["bn"] == first["measured"]["bn"]
    assert {"bn", "optim"} <= set(second["measured"]) and "train" not in second


def test_a_run_on_another_device_is_replaced_not_merged(bench_gpu, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    out.write_text(json.dumps({"device": "NVIDIA H200", "bn": [{"shape": "64x16"}],
                               "measured": {"bn": "2026-11-27T13:34:00"}}))
    earlier = out.read_text()
    assert bench_gpu.kept_sections(out, "NVIDIA H100 80GB HBM3", {"optim"}) == {}
    assert "replaced, not merged" in capsys.readouterr().out
    assert (tmp_path / "gpu.previous.json").read_text() == earlier  # kept beside, not lost
    assert bench_gpu.kept_sections(out, "NVIDIA H200", {"optim"}) == {
        "bn": [{"shape": "64x16"}], "measured": {"bn": "2026-11-27T13:34:00"}}
    assert bench_gpu.kept_sections(out, "NVIDIA H200", {"bn"}) == {}
    assert bench_gpu.kept_sections(tmp_path / "absent.json", "NVIDIA H200", {"bn"}) == {}
    broken = tmp_path / "broken.json"
    broken.write_text('{"device": "NVIDIA H200", "bn": [')  # a run cut off mid-write
    assert bench_gpu.kept_sections(broken, "NVIDIA H200", {"optim"}) == {}
    assert (tmp_path / "broken.previous.json").read_text() == '{"device": "NVIDIA H200", "bn": ['


def test_dry_run_leaves_the_committed_results_alone(bench_gpu, monkeypatch, tmp_path):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    committed = BENCH / "results" / "gpu.json"
    before = committed.read_bytes() if committed.exists() else None
    bench_gpu.main(["--dry-run", "--only", "optim"])
    assert (tmp_path / "nnopt_gpu_dry_run.json").exists()
    assert (committed.read_bytes() if committed.exists() else None) == before


def test_graph_table_and_verdict(bench_gpu):
    row = {"batch": 1024, "width": "textbook", "torch_gpu_plain_s": 1432e-6,
           "torch_graph_plain_s": 199e-6, "gpu_graph_plain_s": 394e-6,
           "gpu_graph_nows_plain_s": 410e-6, "gpu_graph_ws_plain_s": 380e-6,
           "graph_vs_torch_graph_plain": 394 / 199, "gpu_graph_bn_overhead_%": 48.2,
           "torch_graph_bn_overhead_%": 58.3}
    table = bench_gpu.graph_table([row, {"batch": 64, "width": 1024}]).splitlines()
    assert table[2] == "| 1024 | no | 1432 | 199 | 394 | 380 | 410 | - | - | - | - | - | 1.98x |"
    assert table[3] == "| 1024 | yes | - | - | - | - | - | - | - | - | - | - | - |" and len(table) == 4
    text = bench_gpu.verdict([row])
    assert "It is not for: batch 1024, width textbook (+48.2%; PyTorch's graph +58.3%)" in text


def test_spread_over_rounds_reaches_table_verdict_and_advice(bench_gpu):
    import common
    assert common.round_ratio([2.0, 3.0, 5.0], [1.0, 2.0, 2.0]) == (2.0, 1.5, 2.5)
    with pytest.raises(ValueError):  # rounds of two contenders always pair up
        common.round_ratio([1.0, 2.0], [1.0])
    rows = [{"batch": 64, "width": "textbook", "graph_vs_torch_graph_bn": 0.7,
             "graph_vs_torch_graph_bn_range": [0.65, 0.81],
             "gpu_graph_bn_overhead_%": 8.0, "gpu_graph_bn_overhead_%_range": [6.1, 9.9],
             # median faster, but one round slower: not a win
             "cublas_vs_graph_plain": 0.8, "cublas_vs_graph_plain_range": [0.7, 1.05],
             "cublas_vs_graph_bn": 0.8, "cublas_vs_graph_bn_range": [0.7, 0.9]},
            {"batch": 1024, "width": "textbook", "gpu_graph_bn_overhead_%": 9.0,
             "gpu_graph_bn_overhead_%_range": [7.0, 12.0]},
            {"batch": 8192, "width": "textbook", "gpu_graph_bn_overhead_%": 30.0,
             "gpu_graph_bn_overhead_%_range": [10.0, 35.0]},
            {"batch": 4096, "width": "textbook", "error": "CUDARuntimeError: out of memory"}]
    table = bench_gpu.graph_table(rows).splitlines()
    assert table[3].endswith("| 0.70x (0.65 to 0.81) |")
    assert table[-1] == "| 4096 | - | failed: CUDARuntimeError: out of memory |"
    text = bench_gpu.verdict(rows)
    assert "in every round for: batch 64, width textbook (+8.0% (+6.1 to +9.9))." in text
    assert "It is not for: batch 8192, width textbook (+30.0% (+10.0 to +35.0))." in text
    assert "Too close to call (rounds on both sides): batch 1024" in text
    assert "Not measured: batch 4096, width textbook (CUDARuntimeError: out of memory)" in text
    assert bench_gpu.advice(rows)[0].startswith("no variant took <= 0.95x")
    rows[0]["cublas_vs_graph_plain_range"] = [0.7, 0.99]
    assert bench_gpu.advice(rows)[0].startswith("cuBLAS products: FUSED_PRODUCTS = False")


def test_a_configuration_that_raises_leaves_a_row_saying_why(bench_gpu, monkeypatch):
    def broken(*args):
        raise MemoryError("8192 rows do not fit")
    monkeypatch.setattr(bench_gpu, "_train_config", broken)
    written = []
    rows = bench_gpu.bench_train(None, [(8192, None, False)], dry_run=True,
                                 on_row=lambda rows: written.append(list(rows)))
    assert rows == [{"batch": 8192, "width": "textbook",
                     "error": "MemoryError: 8192 rows do not fit"}]
    assert written == [rows]  # written out like any other row


def test_advice_names_the_setting_where_a_variant_won_with_and_without_bn(bench_gpu):
    rows = [{"batch": 64, "width": "textbook", "cublas_vs_graph_plain": 0.80,
             "cublas_vs_graph_bn": 0.90, "serial_vs_graph_plain": 0.90,
             "serial_vs_graph_bn": 1.02},
            {"batch": 1024, "width": "textbook", "cublas_vs_graph_plain": 0.99,
             "cublas_vs_graph_bn": 0.70},
            {"batch": 64, "width": 1024, "nows_vs_graph_plain": 0.5, "nows_vs_graph_bn": 0.5}]
    assert bench_gpu.advice(rows) == [
        "cuBLAS products: FUSED_PRODUCTS = False was faster at batch 64 (0.80x, 0.90x with BN)"]
    assert bench_gpu.advice(rows[1:])[0].startswith("no variant took <= 0.95x")


def test_module_stays_importable_without_cupy(bench_gpu, monkeypatch):
    import importlib
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    for name in ("bench_gpu", "bench_train", "common"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    fresh = importlib.import_module("bench_gpu")
    assert fresh is not bench_gpu and callable(fresh.main)


@pytest.fixture
def emulated(bench_gpu, monkeypatch):
    """bench_gpu on the emulated device (tests/emulated_gpu.py), its timing loops cut to one
    call per contender (the emulator's speed means nothing): the NumPy namespace, and
    {contender: its first result}."""
    import bench_train
    import common

    import nnopt.backend
    from tests import emulated_gpu
    if emulated_gpu.compiler() is None:
        pytest.skip("no C++ compiler to build the emulated kernels")
    emulated_gpu.install(monkeypatch)
    numpy_namespace = nnopt.backend.get_namespace("cpu")
    monkeypatch.setattr(nnopt.backend, "get_namespace", lambda device: numpy_namespace)
    small = bench_train.data
    # (more rows than the largest batch: the batches walk the set)
    monkeypatch.setattr(bench_train, "data", lambda n=bench_train.N_TRAIN: small(min(n, 16384)))
    firsts = {}

    def first(fn):
        out = fn()  # a training step's loss; BN's and the optimizers' steps give no number
        number = isinstance(out, (float, np.generic, np.ndarray)) and np.ndim(out) == 0
        return float(out) if number else 0.0
    monkeypatch.setattr(common, "timeit_rounds", lambda fns, **kw: {
        name: (firsts.setdefault(name, first(fn)), kw["sync"](), [1e-3, 2e-3])[-1]
        for name, fn in fns.items()})
    return numpy_namespace, firsts


def test_gpu_only_sections_run_on_the_emulated_device(bench_gpu, emulated):
    """What the dry run leaves out (the captured steps, fused and layer by layer, and their
    ratios) through the GPU code path on the emulated device (tests/emulated_gpu.py): the
    GPU session's benchmark must not stop at a Python error. Its timings mean nothing."""
    numpy_namespace, losses = emulated
    optim_rows = bench_gpu.bench_optim(numpy_namespace, None, "cuda", lambda: None, [1000])
    assert {r["optimizer"] for r in optim_rows} >= {"sgd", "adam", "adadelta"}
    bn_rows = bench_gpu.bench_bn(numpy_namespace, None, "cuda", lambda: None, [(600, 24)])
    assert bn_rows[0]["nnopt_s"] > 0
    rows = bench_gpu.bench_train(None, [(64, None, False)], dry_run=False)
    assert len(rows) == 1, "the configuration raised (printed above)"
    row = rows[0]
    assert not [k for k in row if "graph_error" in k] and row["gemm_route"].startswith("cublas ")
    for tag in ("plain", "bn"):
        assert row[f"gpu_graph_{tag}_s"] > 0 and row[f"graph_fused_vs_layers_{tag}"] > 0
        # beside nnopt's choices undone one by one: the workspace for every product, none,
        # cuBLAS products instead of fused ones, the weight gradients on the main stream
        for name in ("ws", "nows", "cublas", "slices32", "dw_cublas", "loss_apart", "serial"):
            assert row[f"{name}_vs_graph_{tag}"] > 0, name
            # whatever is undone, the same first step (same seed, same batch) as eager
            assert losses[f"gpu_graph_{name}_{tag}"] == pytest.approx(losses[f"gpu_{tag}"],
                                                                      rel=1e-5), name
        assert losses[f"gpu_graph_{tag}"] == pytest.approx(losses[f"gpu_{tag}"], rel=1e-5)
        # (not the layers' graph's loss: their bias adds and sums are array operations,
        # which the emulator runs once at capture instead of recording them)
    assert "gpu_graph_bn_overhead_%" in row and "graph_speedup_bn" in row
    assert "batch 64, width textbook" in bench_gpu.verdict(rows)
    advice = bench_gpu.advice(rows)  # reads every variant's ratios of a real row
    assert advice and all(isinstance(line, str) for line in advice)


def test_the_gpu_checks_largest_shapes_run_on_the_emulated_device(bench_gpu, emulated):
    """The largest shapes of the GPU session's bench_gpu.py --check (BN at 4096x4096, the
    captured step at batch 8192) launch within CUDA's limits and train: a grid too large,
    an index past 2**31 or a plan that only big shapes take stops here, not on the card."""
    numpy_namespace, losses = emulated
    bn_rows = bench_gpu.bench_bn(numpy_namespace, None, "cuda", lambda: None, [(4096, 4096)])
    assert "error" not in bn_rows[0] and bn_rows[0]["nnopt_s"] > 0
    rows = bench_gpu.bench_train(None, [(8192, None, False)], dry_run=False)
    assert len(rows) == 1 and not [k for k in rows[0] if "error" in k], rows
    for tag in ("plain", "bn"):
        assert rows[0][f"gpu_graph_{tag}_s"] > 0
        assert np.isfinite(losses[f"gpu_{tag}"])
        assert losses[f"gpu_graph_{tag}"] == pytest.approx(losses[f"gpu_{tag}"], rel=1e-5)


def test_the_sanitizer_driver_runs_every_kernel_on_the_emulated_device(monkeypatch):
    """bench/sanitize_gpu.py, which gpu_check.sh runs under compute-sanitizer, reaches every
    kernel the captured and eager steps use (on the emulated device), with finite losses."""
    monkeypatch.syspath_prepend(str(BENCH))
    import sanitize_gpu

    import nnopt.backend
    from tests import emulated_gpu
    if emulated_gpu.compiler() is None:
        pytest.skip("no C++ compiler to build the emulated kernels")
    gpu = emulated_gpu.install(monkeypatch)
    import cupy  # the stand-in, which records every launch

    from nnopt import kernels
    launches = cupy.launches
    launches.clear()
    losses = sanitize_gpu.run(nnopt.backend.get_namespace("cpu"), gpu, say=lambda line: None)
    assert len(losses) == 2 * (len(sanitize_gpu.OPTIMIZERS) + len(sanitize_gpu.CASES)) and all(
        np.isfinite(list(losses.values())))
    signatures = {name: signature for source in kernels.SOURCES
                  for name, signature in emulated_gpu.kernel_signatures(
                      kernels.source(source)).items()}
    assert sorted(set(signatures) - {launch[0] for launch in launches}) == []
    # --quick (racecheck, synccheck): still every float32 kernel with a barrier
    launches.clear()
    sanitize_gpu.run(nnopt.backend.get_namespace("cpu"), gpu, say=lambda line: None, quick=True)
    barriers = {name for name, (_, synchronizes) in signatures.items()
                if synchronizes and not name.endswith(("f64", "f64_i32", "f64_i64"))}
    assert barriers and sorted(barriers - {launch[0] for launch in launches}) == []


def test_profile_summary_reads_ncu_csv(monkeypatch, tmp_path, capsys):
    """bench/profile_gpu.py --summarize (gpu_check.sh step 6) on the CSV Nsight Compute
    writes: kernels in launch order, grouped by kind, the replay's rest beside them."""
    monkeypatch.syspath_prepend(str(BENCH))
    import profile_gpu
    (tmp_path / "b64_bn.meta.json").write_text(
        'warming up\n{"batch": 64, "bn": true, "replay_us": 50.0, "device": "NVIDIA H200"}\n')
    header = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
              '"Section Name","Metric Name","Metric Unit","Metric Value"')
    row = '"{}","1","python3","h","{}","1","13","Command line profiler metrics",' \
          '"gpu__time_duration.sum","{}","{}"'
    (tmp_path / "b64_bn.csv").write_text("\n".join([
        "==PROF== Connected to process 1", header,
        row.format(1, "linear_backward_f32", "nsecond", "7,500"),
        row.format(0, "linear_forward_f32", "usecond", "12.5"),
        row.format(2, "sgd_step_f32", "nsecond", "3000")]) + "\n")
    out = tmp_path / "profile.json"
    profile_gpu.main(["--summarize", str(tmp_path), "--out", str(out)])
    profile = json.loads(out.read_text())
    assert profile["device"] == "NVIDIA H200"  # the card the profile was taken on
    (summary,) = profile["rows"]
    assert [k["name"] for k in summary["kernels"]] == [
        "linear_forward_f32", "linear_backward_f32", "sgd_step_f32"]
    assert summary["kernels_us"] == pytest.approx(23.0) and summary["gaps_us"] == pytest.approx(27.0)
    assert summary["by_kind"] == {"fused product": {"n": 2, "us": 20.0},
                                  "optimizer": {"n": 1, "us": 3.0}}
    assert "replay 50.0 us, 3 kernels 23.0 us" in capsys.readouterr().out


def test_a_profile_without_kernels_fails_and_says_so(monkeypatch, tmp_path, capsys):
    """ncu that wrote no kernel (failed, or profiled nothing): the summary still writes its
    JSON, the configuration marked, and exits 4, not 0 with an empty table."""
    monkeypatch.syspath_prepend(str(BENCH))
    import profile_gpu
    (tmp_path / "b64_bn.meta.json").write_text("==ERROR== the profiled process failed\n")
    (tmp_path / "b64_bn.csv").write_text("==ERROR== no kernels were profiled\n")
    out = tmp_path / "profile.json"
    with pytest.raises(SystemExit) as exit_:
        profile_gpu.main(["--summarize", str(tmp_path), "--out", str(out)])
    assert exit_.value.code == 4
    (row,) = json.loads(out.read_text())["rows"]
    assert row["batch"] == 64 and row["bn"] and row["nodes"] == 0 and "no kernel" in row["error"]
    assert "PROFILE FAILED" in capsys.readouterr().out


def fake_gpu_machine(tmp_path, fail="", ncu="exit 0"):
    """PATH entries standing in for the GPU machine's python3, nvidia-smi and ncu: each
    call is logged; python3 fails (rc 3) where its arguments contain ``fail``; ncu runs
    ``ncu`` (None: no ncu)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for name, body in (
            ("python3", f'[ "$*" = "-" ] || [[ "$*" == *" - "* ]] && cat >/dev/null\n'
                        f'[ -n "{fail}" ] && [[ "$*" == *"{fail}"* ]] && exit 3\nexit 0'),
            ("nvidia-smi", "echo 'name, memory.total'; echo 'Fake GPU, 1 MiB'"),
            ("ncu", ncu), ("compute-sanitizer", "exit 0")):
        if body is None:
            continue
        script = bin_dir / name
        script.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "{log}"\n{body}\n')
        script.chmod(0o755)
    return bin_dir, log


@pytest.mark.parametrize("fail, budget", [("", "285"), ("--only train", "285"), ("", "0")])
def test_gpu_check_script_runs_every_step_and_records_each(tmp_path, fail, budget):
    """bench/gpu_check.sh, the one script a rare GPU session runs, on stand-ins: every step
    is reached whatever an earlier one did, each is recorded in check.json (valid JSON),
    and a step the budget has no room for is skipped (rc -1), not run without a limit."""
    import os
    import shutil
    import subprocess
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    bin_dir, log = fake_gpu_machine(tmp_path, fail)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out),
           "BUDGET": budget}
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], cwd=BENCH.parent, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = json.loads((out / "check.json").read_text())
    sanitizers = ["sanitizer_memcheck", "sanitizer_racecheck", "sanitizer_synccheck"]
    assert list(steps)[1:] == ["gpu", "install", "test_gpu", "bench_bn", "bench_train", "bench_optim",
                               "train", *sanitizers, "profile", "test_rest"]
    calls = log.read_text()
    assert "--backend cupy" in calls and "tests/test_gpu.py" in calls
    for section in ("bn", "train", "optim"):
        assert f"bench/bench_gpu.py --check --only {section} --out {out}/gpu.json" in calls
        assert steps[f"bench_{section}"]["rc"] == (3 if fail == f"--only {section}" else 0)
    assert steps["test_gpu"]["rc"] == 0 and "-m nnopt.train --device gpu --epochs 1" in calls
    if budget == "0":  # no time left: the optional steps are skipped, the rest still run
        assert all(steps[name]["rc"] == -1 for name in [*sanitizers, "profile", "test_rest"])
    else:
        for tool in ("memcheck", "racecheck", "synccheck"):
            assert (f"compute-sanitizer --tool {tool} --error-exitcode 9 --log-file "
                    f"{out}/sanitizer_{tool}.log python3 bench/sanitize_gpu.py") in calls
        assert all(steps[name]["rc"] == 0 for name in sanitizers)
        assert "--graph-profiling node" in calls and steps["profile"]["rc"] == 0
        # the replay timed in a process of its own, not under ncu
        assert "\npython3 bench/profile_gpu.py --run 64 bn" in calls
        assert steps["test_rest"]["rc"] == 0
    assert (out / "gpu_check.log").read_text().count("== ") >= 7


def run_gpu_check(tmp_path, bin_dir):
    import os
    import shutil
    import subprocess
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out)}
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], cwd=BENCH.parent, env=env,
                          capture_output=True, text=True, timeout=120)
    return done, out


def test_gpu_check_without_a_gpu_stops_at_once_and_says_why(tmp_path):
    """On a machine without CuPy or a device: one clear line, check.json saying so, rc 1,
    and nothing installed (pip never runs)."""
    bin_dir, log = fake_gpu_machine(tmp_path, fail="import cupy")
    done, out = run_gpu_check(tmp_path, bin_dir)
    assert done.returncode == 1
    assert "no CUDA GPU/CuPy here: gpu_check needs the device machine" in done.stdout
    steps = json.loads((out / "check.json").read_text())
    assert list(steps) == ["total_s", "gpu"] and steps["gpu"]["rc"] == 1
    assert "no CUDA GPU/CuPy here" in steps["gpu"]["reason"]
    assert "pip" not in log.read_text()


@pytest.mark.parametrize("ncu, rc", [(None, -1), ("exit 1", 3)])
def test_gpu_check_records_a_missing_or_failed_ncu(tmp_path, ncu, rc):
    """No ncu: the profile step is skipped (rc -1, as documented); ncu failing: rc 3 from
    bench/profile_gpu.sh, not 0 over an empty table."""
    import glob
    import shutil
    if ncu is None and (shutil.which("ncu") or glob.glob("/usr/local/cuda*/bin/ncu")
                        or glob.glob("/opt/nvidia/nsight-compute/*/ncu")):
        pytest.skip("a real ncu is installed here")
    bin_dir, _ = fake_gpu_machine(tmp_path, ncu=ncu)
    done, out = run_gpu_check(tmp_path, bin_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((out / "check.json").read_text())["profile"]["rc"] == rc
    assert ("PROFILE SKIPPED" if ncu is None else "PROFILE INCOMPLETE") in done.stdout
