"""A run's folder while it is written: one writer at a time, files written whole, a resume
that continues the run the folder describes."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nnopt import checkpoint, runs, train, train_cli

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--sizes", "784,24,16,10", "--check-every", "40", "--batch-size", "128", "--quiet"]
needs_locks = pytest.mark.skipif(runs.fcntl is None, reason="runs are not locked on Windows")


def cli(*args):
    return train_cli.main(SMALL + list(args))


@pytest.fixture
def holder():
    """Another process holding a folder (as a run being written holds it) until the test
    ends."""
    procs = []

    def hold(folder):
        code = textwrap.dedent(f"""
            import sys
            from nnopt import runs
            assert runs.claim({str(folder)!r})
            print("held", flush=True)
            sys.stdin.read()
        """)
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=30)


@needs_locks
def test_a_folder_in_use_is_refused_even_with_overwrite(tmp_path, capsys, holder):
    run = tmp_path / "run"
    assert cli("--epochs", "1", "--out", str(run)) == 0
    before = (run / "checkpoint.npz").read_bytes()
    holder(run)
    for args in (["--out", str(run), "--overwrite"], ["--resume", str(run)]):
        assert cli("--epochs", "2", *args) == 2
        assert "is in use: another nnopt process" in capsys.readouterr().err
    assert (run / "checkpoint.npz").read_bytes() == before


@needs_locks
def test_the_default_folder_moves_on_past_one_in_use(tmp_path, monkeypatch, capsys, holder):
    """Two default runs started together: the second must not take runs/train while the
    first, not yet written anything, holds it."""
    monkeypatch.chdir(tmp_path)
    holder(tmp_path / "runs" / "train")
    assert cli("--epochs", "1") == 0
    assert (tmp_path / "runs" / "train-2" / "summary.json").exists()
    assert not (tmp_path / "runs" / "train" / "config.json").exists()


@needs_locks
def test_a_claim_is_let_go_and_leaves_nothing(tmp_path):
    folder = tmp_path / "new"
    assert runs.claim(folder) and runs.claim(folder)  # again: this process holds it already
    assert (folder / runs.LOCK_FILE).exists()
    runs.release(folder)
    assert not folder.exists()  # created by the claim, nothing written: removed again
    assert cli("--epochs", "1", "--out", str(folder)) == 0
    assert not (folder / runs.LOCK_FILE).exists() and (folder / "summary.json").exists()


def test_a_resume_with_a_lower_target_trains_on(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli("--epochs", "10", "--target-loss", "0.45", "--out", str(run)) == 0
    first = json.loads((run / "summary.json").read_text())
    assert first["reached_target"] and first["epochs"] < 10
    capsys.readouterr()
    assert train_cli.main(["--resume", str(run), "--target-loss", "0", "--epochs",
                           str(first["epochs"] + 2)]) == 0
    out = capsys.readouterr().out
    assert "training on" in out and "did not reach validation loss 0.0" in out
    after = json.loads((run / "summary.json").read_text())
    assert not after["reached_target"] and after["iterations"] > first["iterations"]


def test_a_run_stopped_at_its_target_mid_epoch_resumes_as_one_run(tmp_path):
    """Stopped at its target inside an epoch, then resumed with a lower target: the same
    network, and the same checks, as one run with the lower target (the rest of the epoch
    is trained, not skipped, and no scheduler step comes early)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    # 60 batches an epoch; checks at 40, 80, 120; the rate halves after each epoch
    common = ["--epochs", "2", "--schedule", "step", "--schedule-opt", "step_size=1",
              "--schedule-opt", "gamma=0.5"]
    assert cli(*common, "--target-loss", "0", "--out", str(straight)) == 0
    rows = [json.loads(r) for r in (straight / "metrics.jsonl").read_text().splitlines()]
    at_80 = next(r for r in rows if r["iteration"] == 80)
    assert all(r["val_loss"] > at_80["val_loss"] for r in rows if r["iteration"] < 80)
    assert cli(*common, "--target-loss", repr(at_80["val_loss"]), "--out", str(split)) == 0
    first = json.loads((split / "summary.json").read_text())
    assert first["reached_target"] and first["iterations"] == 80 and first["epochs"] == 2
    _, _, meta = checkpoint.load(split / "checkpoint.npz")
    assert (meta["progress"]["epoch"], meta["progress"]["pos"]) == (1, 20)
    # the open epoch counts as trained
    assert train_cli.main(["--resume", str(split), "--target-loss", "0", "--epochs", "1"]) == 2
    assert train_cli.main(["--resume", str(split), "--target-loss", "0"]) == 0
    a, _, meta_a = checkpoint.load(straight / "checkpoint.npz")
    b, _, meta_b = checkpoint.load(split / "checkpoint.npz")
    for key in a:
        assert (a[key] == b[key]).all(), key
    assert meta_a["scheduler"] == meta_b["scheduler"]

    def checks(folder):
        return [{k: v for k, v in json.loads(r).items() if k != "time_s"}
                for r in (folder / "metrics.jsonl").read_text().splitlines()]
    assert checks(split) == checks(straight)
    assert json.loads((split / "summary.json").read_text())["iterations"] == 120


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path, capsys):
    run, other = tmp_path / "run", tmp_path / "other"
    assert cli("--epochs", "1", "--out", str(run)) == 0
    assert cli("--epochs", "1", "--optimizer", "adam", "--out", str(other)) == 0
    config = (run / "config.json").read_text()
    (run / "checkpoint.npz").write_bytes((other / "checkpoint.npz").read_bytes())
    assert train_cli.main(["--resume", str(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "config.json and the checkpoint disagree on optimizer" in err
    assert (run / "config.json").read_text() == config


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    assert cli("--epochs", "1", "--out", str(tmp_path)) == 0
    assert train_cli.main(["--resume", str(tmp_path), "--overwrite"]) == 2
    assert "leave out one of them" in capsys.readouterr().err


def test_an_interrupted_summary_says_how_to_finish_it(tmp_path, capsys, monkeypatch):
    def interrupted(run, curves=True):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "finish", interrupted)
    assert cli("--epochs", "1", "--out", str(tmp_path)) == 130
    assert f"--resume {tmp_path} writes summary.json" in capsys.readouterr().out
    monkeypatch.undo()
    assert train_cli.main(["--resume", str(tmp_path)]) == 0
    assert (tmp_path / "summary.json").exists()


def test_json_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    runs.write_json(path, {"a": 1})

    def full_disk(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(runs.OutputError, match="No space left"):
        runs.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_run_files_follow_the_umask(tmp_path):
    mask = os.umask(0o027)
    try:
        assert cli("--epochs", "1", "--out", str(tmp_path)) == 0
    finally:
        os.umask(mask)
    for name in ("checkpoint.npz", "config.json", "summary.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
    assert checkpoint.load(tmp_path)[2]["progress"]["epoch"] == 1
