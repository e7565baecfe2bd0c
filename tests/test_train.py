"""Short training runs on the embedded sample: CLI, outputs, resume, evaluation."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nnopt import checkpoint, datasets, train

SMALL = ["--sizes", "784,24,16,10", "--check-every", "40", "--batch-size", "128", "--quiet"]


def run_cli(args):
    return train.main(SMALL + list(args))


def metrics(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("time_s")
    return rows


def test_outputs_and_summary(tmp_path):
    assert run_cli(["--epochs", "2", "--out", str(tmp_path)]) == 0
    for name in ("config.json", "metrics.jsonl", "checkpoint.npz", "summary.json", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["iterations"] == 2 * 60  # 7600 / 128 -> 60
    assert summary["test_accuracy"] > 0.8
    rows = metrics(tmp_path)
    assert [r["iteration"] for r in rows] == [40, 80, 120]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["sizes"] == [784, 24, 16, 10] and config["bn"] is True


def test_a_run_does_not_depend_on_the_machines_load(tmp_path, monkeypatch):
    """OpenBLAS's products differ in their last bits between one thread and two, and by
    default nnopt gives a product the cores other processes leave free; so a training run
    takes one fixed count, and the same run on a quiet machine and on a busy one (where
    the load policy would give every product one thread) ends bit for bit the same."""
    from nnopt.fast import threads
    runs = {}
    for free in (1, 2):
        monkeypatch.setattr(threads, "free_cores", lambda free=free: (lambda: free))
        runs[free] = tmp_path / f"free{free}"
        assert run_cli(["--epochs", "1", "--out", str(runs[free])]) == 0
    a, _, _ = checkpoint.load(runs[1] / "checkpoint.npz")
    b, _, _ = checkpoint.load(runs[2] / "checkpoint.npz")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("flag, expected", [([], "cores"), (["--blas-threads", "3"], {3}),
                                             (["--blas-threads", "auto"], {7})])
def test_blas_threads_flag(tmp_path, monkeypatch, flag, expected):
    """Every product of a run on one count (by default the cores this process may use, or
    --blas-threads N's), or with --blas-threads auto on the load policy's count per
    product (here a stand-in policy that always says 7)."""
    from nnopt.fast import threads
    used = []

    class Recorder:
        current = None

        def most(self):
            return 64

        def use(self, count):
            used.append(count)
            self.current = count
    monkeypatch.setattr(threads, "blas_threads", lambda recorder=Recorder(): recorder)
    monkeypatch.setattr(threads, "blas_threads_for", lambda *shape, free: 7)
    assert run_cli(["--epochs", "1", "--out", str(tmp_path), *flag]) == 0
    assert set(used) == ({threads.available_cores()} if expected == "cores" else expected)
    assert json.loads((tmp_path / "config.json").read_text())["blas_threads"] == (
        None if not flag else flag[1] if flag[1] == "auto" else int(flag[1]))


@pytest.mark.parametrize("flag, free, limit, noted", [
    ([], 1, 2, True), ([], 2, 2, False), (["--blas-threads", "2"], 1, 2, False),
    (["--blas-threads", "auto"], 1, 2, False),
    ([], 1, 1, False)])  # a limit of one thread set before the run: nothing waits
def test_a_busy_machine_is_noted_with_the_remedy(tmp_path, monkeypatch, capsys, flag, free,
                                                 limit, noted):
    from nnopt.fast import threads
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads.BlasThreads, "most", lambda self: limit)
    monkeypatch.setattr(threads, "free_cores", lambda: (lambda: free))
    assert run_cli(["--epochs", "1", "--out", str(tmp_path), *flag]) == 0
    out = capsys.readouterr().out
    assert ("note: other processes keep 1 of this run's 2 cores busy" in out) == noted
    assert ("--blas-threads auto is faster" in out) == noted


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_blas_threads_flag_rejects_what_is_not_a_count(value, capsys):
    with pytest.raises(SystemExit):
        run_cli(["--blas-threads", value])
    assert "--blas-threads: expected a thread count >= 1 or auto" in capsys.readouterr().err


def test_flags_reach_the_run(tmp_path):
    assert run_cli(["--epochs", "1", "--no-bn", "--optimizer", "adam", "--lr", "0.002",
                    "--opt", "betas=0.8,0.99", "--init", "xavier", "--activation", "tanh",
                    "--seed", "3", "--out", str(tmp_path)]) == 0
    _, opt_state, meta = checkpoint.load(tmp_path / "checkpoint.npz")
    assert opt_state["optimizer"] == "Adam"
    assert opt_state["param_groups"][0]["lr"] == 0.002
    assert opt_state["param_groups"][0]["betas"] == (0.8, 0.99)
    assert meta["config"]["bn"] is False and meta["config"]["activation"] == "tanh"


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(["--epochs", "3", "--out", str(straight)]) == 0
    assert run_cli(["--epochs", "1", "--out", str(split)]) == 0
    assert run_cli(["--epochs", "3", "--resume", str(split)]) == 0
    a, _, _ = checkpoint.load(straight / "checkpoint.npz")
    b, _, _ = checkpoint.load(split / "checkpoint.npz")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert metrics(straight) == metrics(split)


def test_interrupt_saves_a_consistent_checkpoint(tmp_path, monkeypatch):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    args = ["--epochs", "2", "--quiet"]
    assert run_cli(args + ["--out", str(straight)]) == 0
    config = train.make_config(sizes=[784, 24, 16, 10], check_every=40, batch_size=128,
                               epochs=2, quiet=True, out=str(cut))
    check = train.check

    def check_then_interrupt(run, epoch):  # Ctrl-C during the run, at the first check
        record = check(run, epoch)
        os.kill(os.getpid(), signal.SIGINT)
        return record
    monkeypatch.setattr(train, "check", check_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train.fit(config, log=lambda line: None)
    monkeypatch.setattr(train, "check", check)
    _, _, meta = checkpoint.load(cut)
    assert meta["progress"]["iteration"] == 40  # stopped between steps, mid-epoch
    assert run_cli(args + ["--resume", str(cut)]) == 0
    a, _, _ = checkpoint.load(straight)
    b, _, _ = checkpoint.load(cut)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_stop_mid_window_resumes_bit_for_bit(tmp_path, monkeypatch, dtype):
    """A stop between two checks (iteration 50; checks every 40): the resumed run sums its
    training loss on from the cut window's sums, so its metrics, not only its parameters,
    are the uninterrupted run's, bit for bit (float64 rounded them otherwise before)."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    args = ["--epochs", "2", "--dtype", dtype]
    assert run_cli(args + ["--out", str(straight)]) == 0

    class StopAt50(train.Stepper):
        calls = 0

        def __call__(self, xb, yb):
            StopAt50.calls += 1
            if StopAt50.calls == 50:
                os.kill(os.getpid(), signal.SIGINT)
            return super().__call__(xb, yb)
    monkeypatch.setattr(train, "Stepper", StopAt50)
    assert run_cli(args + ["--out", str(cut)]) == 130  # the shell's code for a Ctrl-C
    monkeypatch.undo()
    _, _, meta = checkpoint.load(cut)
    assert meta["progress"]["iteration"] == 50 and meta["progress"]["pending_samples"] == 10 * 128
    assert run_cli(args + ["--resume", str(cut)]) == 0
    assert metrics(straight) == metrics(cut)
    a, _, _ = checkpoint.load(straight)
    b, _, _ = checkpoint.load(cut)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_every_epoch_visits_each_training_image_once_in_a_new_order(tmp_path, monkeypatch):
    """The shuffle is drawn anew each epoch (from the seed and the epoch), and an epoch is
    one pass over the training split: every image once, the last batch partial."""
    batches = []

    class Recording(train.Stepper):
        def __call__(self, xb, yb):
            batches.append(np.array(xb))
            return super().__call__(xb, yb)
    monkeypatch.setattr(train, "Stepper", Recording)
    assert run_cli(["--epochs", "2", "--out", str(tmp_path)]) == 0
    x_train = np.asarray(datasets.load_sample().x_train, np.float32)
    per_epoch = -(-x_train.shape[0] // 128)
    assert len(batches) == 2 * per_epoch
    epochs = [np.concatenate(batches[:per_epoch]), np.concatenate(batches[per_epoch:])]

    def rows(x):
        return sorted(row.tobytes() for row in x)
    assert rows(epochs[0]) == rows(x_train) == rows(epochs[1])
    assert not np.array_equal(epochs[0], epochs[1])  # another order
    assert not np.array_equal(epochs[0], x_train)    # shuffled at all


def test_a_saved_null_metric_resumes_as_the_live_nan(tmp_path):
    """A window whose every step was skipped (nonfinite="skip") has no training loss: NaN in
    the live run, null in the checkpoint's JSON. Read back, it is NaN again (a None made
    every later resume fail formatting the epoch or drawing the curves)."""
    run = tmp_path / "run"
    assert run_cli(["--epochs", "1", "--out", str(run)]) == 0
    model_state, opt_state, meta = checkpoint.load(run)
    meta["progress"]["history"][-1].update(train_loss=None, train_accuracy=None)
    checkpoint.save(run / "checkpoint.npz", model_state, opt_state, meta)
    state = train.TrainState.from_dict(meta["progress"])
    assert np.isnan(state.history[-1]["train_loss"]) and np.isnan(state.history[-1]["train_accuracy"])
    assert run_cli(["--epochs", "2", "--resume", str(run)]) == 0
    assert (run / "curves.png").stat().st_size > 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2


def test_a_non_finite_validation_or_test_loss_is_never_a_result(tmp_path, monkeypatch, capsys):
    """Skipped steps keep the parameters finite, but outputs can still overflow: a NaN
    validation loss ends the run as diverged (exit 3), as a NaN training loss does, and so
    does a NaN test loss at the end, before summary.json is written."""
    assert run_cli(["--epochs", "1", "--no-bn", "--lr", "1e6", "--opt", "nonfinite=skip",
                    "--out", str(tmp_path / "big")]) == 3
    assert "the validation loss became nan" in capsys.readouterr().err
    evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda model, x, y, loss_fn: (
        (float("nan"), 0.1) if x.shape[0] == 2000 else evaluate(model, x, y, loss_fn)))
    assert run_cli(["--epochs", "1", "--out", str(tmp_path / "test")]) == 3
    assert "the test loss became nan" in capsys.readouterr().err
    assert not (tmp_path / "test" / "summary.json").exists()
    assert (tmp_path / "test" / "checkpoint.npz").exists()


def test_evaluate_reports_accuracy(tmp_path, capsys):
    assert run_cli(["--epochs", "1", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    capsys.readouterr()
    assert train.main(["--evaluate", str(tmp_path / "checkpoint.npz")]) == 0
    out = capsys.readouterr().out
    assert f"{100 * summary['test_accuracy']:.2f}%" in out and "2000 images" in out


def test_resume_on_another_blas_count(tmp_path, capsys):
    """--blas-threads may change on resume (it is in RESUMABLE): the resumed epochs take
    the new count, config.json says which, and the run says it no longer repeats bit for
    bit (it does not on the same count)."""
    assert run_cli(["--epochs", "1", "--out", str(tmp_path), "--blas-threads", "1"]) == 0
    assert run_cli(["--epochs", "2", "--resume", str(tmp_path), "--blas-threads", "1"]) == 0
    assert "BLAS threads and continues" not in capsys.readouterr().out
    assert run_cli(["--epochs", "3", "--resume", str(tmp_path), "--blas-threads", "auto"]) == 0
    assert "trained on 1 BLAS threads and continues on --blas-threads auto" in capsys.readouterr().out
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["blas_threads"] == "auto" and config["epochs"] == 3
    assert json.loads((tmp_path / "summary.json").read_text())["epochs"] == 3


def test_resume_with_or_without_layers_says_the_bits_change(tmp_path, capsys):
    """--layers may change on resume: the same model in another order, so the run says
    it no longer repeats the uninterrupted one bit for bit (and says nothing otherwise)."""
    assert run_cli(["--epochs", "1", "--out", str(tmp_path)]) == 0
    assert run_cli(["--epochs", "2", "--resume", str(tmp_path)]) == 0
    assert "computed in another order" not in capsys.readouterr().out
    assert run_cli(["--epochs", "3", "--resume", str(tmp_path), "--layers"]) == 0
    assert ("this run trained with fused blocks and continues with layer by layer (--layers): "
            "the same model, computed in another order" in capsys.readouterr().out)
    assert run_cli(["--epochs", "4", "--resume", str(tmp_path), "--layers"]) == 0
    assert "computed in another order" not in capsys.readouterr().out  # --layers since the last save


def test_resuming_a_snapshot_never_replaces_the_runs_own_checkpoint(tmp_path, capsys):
    """--resume FILE continues in FILE's folder: where that folder's checkpoint.npz is
    another file (a later point of the run, or another run), it is refused, not replaced."""
    snap = tmp_path / "snap"
    assert run_cli(["--epochs", "1", "--out", str(snap)]) == 0
    (snap / "ep1.npz").write_bytes((snap / "checkpoint.npz").read_bytes())
    assert run_cli(["--epochs", "2", "--resume", str(snap)]) == 0
    later, summary = (snap / "checkpoint.npz").read_bytes(), (snap / "summary.json").read_text()
    capsys.readouterr()
    assert run_cli(["--epochs", "3", "--resume", str(snap / "ep1.npz")]) == 2
    err = capsys.readouterr().err
    assert "would be replaced" in err and "copy ep1.npz into a new folder" in err
    assert (snap / "checkpoint.npz").read_bytes() == later
    assert (snap / "summary.json").read_text() == summary
    # its own checkpoint, named as a file, is the folder's run
    assert run_cli(["--epochs", "3", "--resume", str(snap / "checkpoint.npz")]) == 0
    branch = tmp_path / "branch"
    branch.mkdir()
    (branch / "checkpoint.npz").write_bytes((snap / "ep1.npz").read_bytes())
    assert run_cli(["--epochs", "2", "--resume", str(branch)]) == 0


def test_bad_checkpoints_and_mismatches(tmp_path, capsys):
    assert run_cli(["--epochs", "1", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert run_cli(["--epochs", "2", "--no-bn", "--resume", str(tmp_path)]) == 2
    assert "whose bn is True (asked: False)" in capsys.readouterr().err
    broken = tmp_path / "broken.npz"
    broken.write_bytes((tmp_path / "checkpoint.npz").read_bytes()[:500])
    assert train.main(["--evaluate", str(broken)]) == 2
    assert "corrupt or not an nnopt checkpoint" in capsys.readouterr().err
    assert train.main(["--evaluate", str(tmp_path / "nothing.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_gpu_without_gpu_is_one_line(tmp_path):
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here; this test is for machines without it")
    except ImportError:
        pass
    proc = subprocess.run([sys.executable, "-m", "nnopt.train", "--device", "gpu", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "CuPy" in proc.stderr


def test_make_config_checks_keys():
    config = train.make_config(bn=False, hyper={"lr": 0.05, "betas": (0.8, 0.9)})
    assert config["bn"] is False and config["hyper"]["betas"] == [0.8, 0.9]
    assert train.DEFAULTS["hyper"] == {"lr": 0.1}  # overrides never leak into the defaults
    with pytest.raises(ValueError, match="unknown training setting 'epoch'.*did you mean 'epochs'"):
        train.make_config(epoch=3)
    with pytest.raises(ValueError, match="--batch-size must be an integer >= 1"):
        train.make_config(batch_size=0)
    with pytest.raises(ValueError, match="--dtype must be float32 or float64, got 5"):
        train.make_config(dtype=5)
    with pytest.raises(TypeError, match="setting 'data_dir' must be a folder path"):
        train.make_config(data_dir=5)
    with pytest.raises(TypeError, match="not a number, text, list or dict"):
        train.make_config(hyper={"lr": object()})
    # NumPy's scalars and arrays, and paths, as their JSON values
    config = train.make_config(seed=np.int64(3), sizes=np.array([784, 10]), out=Path("/tmp/r"))
    assert (config["seed"], config["sizes"], config["out"]) == (3, [784, 10], "/tmp/r")
    for partial in ("abc", {"epochs": 1}):
        with pytest.raises(TypeError, match="fit takes a whole run configuration"):
            train.fit(partial)
    for bad in (0, "3", True, 1.5):  # a config file's JSON, not the CLI's parsed flag
        with pytest.raises(ValueError, match="--blas-threads must be a thread count >= 1 or auto"):
            train.make_config(blas_threads=bad)


def test_build_model_follows_the_config():
    model = train.build_model(train.make_config(sizes=[784, 20, 10], bn=False, seed=3))
    assert [type(layer).__name__ for layer in model.layers] == ["Linear", "ReLU", "Linear"]
    again = train.build_model(train.make_config(sizes=[784, 20, 10], bn=False, seed=3))
    np.testing.assert_array_equal(model.flat.data, again.flat.data)


def test_train_state_reads_old_checkpoints():
    old = {"epoch": 1, "pos": 5, "iteration": 65, "elapsed": 1.5, "reached": False,
           "window": [2.5, 40, 64],  # 0.1.0's records had no "lr"
           "history": [{"epoch": 1, "iteration": 44, "train_loss": 0.9, "train_accuracy": 0.7,
                        "val_loss": 0.8, "val_accuracy": 0.75, "time_s": 1.2}]}
    state = train.TrainState.from_dict(old)
    assert (state.window_loss, state.window_correct, state.window_samples) == (2.5, 40, 64)
    assert train.TrainState.from_dict(state.to_dict()) == state


@pytest.mark.parametrize("entry, value, message", [
    ("epoch", "x", "progress.epoch is 'x'"), ("epoch", -5, "progress.epoch is -5"),
    ("history", "x", "progress.history is 'x'"), ("elapsed", "x", "progress.elapsed is 'x'"),
    ("pos", 1_000_000, "progress.pos is 1000000, past the epoch's"),
    ("history", [{"epoch": 1, "iteration": 40}], "progress.history[0] has no 'train_loss'"),
    ("history", [{"epoch": 1, "iteration": 40, "train_loss": 1.0, "train_accuracy": 0.5,
                  "val_loss": "low", "val_accuracy": 0.5}], "progress.history[0].val_loss is 'low'"),
])
def test_a_damaged_progress_entry_is_named(tmp_path, capsys, entry, value, message):
    run = tmp_path / "run"
    assert run_cli(["--epochs", "1", "--out", str(run)]) == 0
    model_state, opt_state, meta = checkpoint.load(run)
    meta["progress"][entry] = value
    checkpoint.save(run / "checkpoint.npz", model_state, opt_state, meta)
    capsys.readouterr()
    assert run_cli(["--epochs", "2", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and message in err and err.count("\n") == 1


def test_the_training_windows_host_sums_are_its_array_sums(rng):
    """On NumPy the window sums in Python numbers (no array call per step); the same
    float64 and integer sums as the array path the GPU takes, bit for bit."""
    from nnopt.backend import get_namespace
    from nnopt.train_loop import Window
    host, arrays = Window(get_namespace("cpu")), Window(get_namespace("cpu"))
    arrays.on_host = False
    arrays.reset()
    for _ in range(50):
        rows = int(rng.integers(2, 70))
        loss = np.float32(rng.exponential())
        prob = rng.random((rows, 10)).astype(np.float32)
        labels = rng.integers(0, 10, rows)
        for window in (host, arrays):
            window.add(loss, prob, labels)
    assert isinstance(host.loss, float) and not isinstance(arrays.loss, float)
    assert host._global_sums() == arrays._global_sums()
