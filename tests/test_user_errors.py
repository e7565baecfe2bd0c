"""What a new user runs into: bad input gets one clear line, finished runs are never lost,
a diverging run is never reported as a result (the command line and the library)."""
import json
import math
import os
import warnings

import numpy as np
import pytest

import nnopt
from nnopt import checkpoint, init, optim, train, train_cli
from nnopt.optim import schedules
from nnopt.errors import NnoptError

SMALL = ["--sizes", "784,24,16,10", "--check-every", "40", "--batch-size", "128", "--quiet"]


def cli(*args):
    return train_cli.main(SMALL + list(args))


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file.txt"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize("args, message", [
    (["--epochs", "0"], "--epochs must be an integer >= 1"),
    (["--optimizer", "adamax"], "unknown optimizer 'adamax'"),
    (["--opt", "betas"], "--opt expects KEY=VALUE"),
    (["--opt", "gamma=2"], "has no hyper-parameter 'gamma'"),
    (["--opt", "eps_inside_root=maybe", "--optimizer", "rmsprop"], "must be true or false"),
    (["--lr", "-1"], "lr must be in"),
    (["--sizes", "100,10"], "must start with 784"),
    (["--init", "kaiming_he"], "unknown initializer"),
    (["--batch-size", "1"], "Batch Normalization needs at least 2 samples"),
    (["--val-size", "7999"], "leaves 1 training image"),
    (["--val-size", "8000"], "(n_val, --val-size) must be an integer between 1 and 7999"),
    (["--target-loss", "nan"], "--target-loss must be finite"),
    (["--seed", "-1"], "--seed must be an integer >= 0"),
    (["--device", "strict"], "--device must be cpu or gpu"),
    (["--opt", "params=1"], "--opt params: not a hyper-parameter"),
    (["--lr", "0.2", "--opt", "lr=0.5"], "--lr 0.2 and --opt lr=0.5 name two learning rates"),
    (["--data-dir", ""], "--data-dir is empty"),
    (["--sizes", "784,ten,10"], "--sizes must be integers"),
    (["--schedule", "step", "--schedule-opt", "gama=0.5"], "has no parameter 'gama'"),
    (["--schedule-opt", "x"], "--schedule-opt expects KEY=VALUE"),
    (["--batch-size", "100000"], "--batch-size 100000 is more than the 7600 training images"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, args, message):
    assert cli(*args, "--out", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start


@pytest.mark.parametrize("where", ["file", "devnull", "below_file"])
def test_out_that_is_not_a_folder(a_file, capsys, where):
    out = {"file": a_file, "devnull": "/dev/null", "below_file": a_file / "run"}[where]
    assert cli("--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "not a folder" in err and "Traceback" not in err


def test_data_dir_that_is_a_file(a_file, capsys):
    assert cli("--dataset", "fashion-mnist", "--data-dir", str(a_file)) == 2
    assert "is a file" in capsys.readouterr().err


def test_a_failed_run_leaves_a_finished_one_alone(tmp_path, capsys):
    assert cli("--epochs", "1", "--out", str(tmp_path)) == 0
    before = {name: (tmp_path / name).read_bytes() for name in ("metrics.jsonl", "config.json")}
    assert cli("--batch-size", "1", "--out", str(tmp_path)) == 2
    assert cli("--epochs", "2", "--out", str(tmp_path)) == 2  # holds a run: refused
    assert "--overwrite" in capsys.readouterr().err
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_files_that_are_not_an_nnopt_run_are_never_replaced(tmp_path, capsys):
    """A folder with the user's own config.json and curves.png: refused, with --overwrite
    too, and both files left as they were."""
    (tmp_path / "config.json").write_text('{"my": 1}')
    (tmp_path / "curves.png").write_bytes(b"mine")
    for extra in ([], ["--overwrite"]):
        assert cli("--epochs", "1", "--out", str(tmp_path), *extra) == 2
        err = capsys.readouterr().err
        assert "config.json, curves.png, named like a run's files but not an nnopt run's" in err
        assert "--resume" not in err
    assert (tmp_path / "config.json").read_text() == '{"my": 1}'
    assert (tmp_path / "curves.png").read_bytes() == b"mine"


def test_a_run_that_diverges_before_its_first_checkpoint_says_so(tmp_path, capsys):
    assert cli("--epochs", "1", "--lr", "1e30", "--no-bn", "--out", str(tmp_path)) == 3
    err = capsys.readouterr().err
    assert "the run diverged" in err and "no checkpoint was written" in err
    assert not (tmp_path / "checkpoint.npz").exists()
    assert cli("--epochs", "1", "--out", str(tmp_path)) == 2  # a run, never finished an epoch
    assert "it never finished an epoch (no checkpoint)" in capsys.readouterr().err


def test_overwrite_replaces_and_default_folder_is_numbered(tmp_path, monkeypatch):
    assert cli("--epochs", "1", "--out", str(tmp_path / "r")) == 0
    assert cli("--epochs", "2", "--out", str(tmp_path / "r"), "--overwrite") == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["epochs"] == 2
    monkeypatch.chdir(tmp_path)
    assert cli("--epochs", "1") == 0 and cli("--epochs", "1") == 0
    assert (tmp_path / "runs/train/summary.json").exists()
    assert (tmp_path / "runs/train-2/summary.json").exists()


def test_resume_continues_in_its_folder_with_its_settings(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli("--epochs", "1", "--optimizer", "adam", "--lr", "0.003", "--out", str(run)) == 0
    orphan = run / ".checkpoint.npz.abc123.tmp"
    orphan.write_bytes(b"left by a SIGKILL")
    # Flags at the saved (or default) value are fine; only a few may change.
    assert train_cli.main(["--resume", str(run), "--epochs", "2", "--val-size", "400",
                           "--batch-size", "128", "--quiet", "--lr", "0.003",
                           "--opt", "eps=1e-8"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and not orphan.exists()
    _, opt_state, _ = checkpoint.load(run)
    assert opt_state["optimizer"] == "Adam" and opt_state["param_groups"][0]["lr"] == 0.003
    capsys.readouterr()
    assert train_cli.main(["--resume", str(run), "--epochs", "3", "--lr", "0.1"]) == 2
    assert "whose hyper is" in capsys.readouterr().err
    assert train_cli.main(["--resume", str(run), "--out", str(tmp_path / "elsewhere")]) == 2
    assert "continues the run in" in capsys.readouterr().err


def test_diverging_run_stops_with_strict_json(tmp_path, capsys):
    assert cli("--no-bn", "--lr", "1e6", "--epochs", "2", "--out", str(tmp_path)) == 3
    err = capsys.readouterr().err
    assert "diverged" in err and "Traceback" not in err
    assert not (tmp_path / "summary.json").exists()
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


def test_nonfinite_raise_is_a_stop_not_a_traceback(tmp_path, capsys):
    assert cli("--no-bn", "--lr", "1e6", "--opt", "nonfinite=raise", "--out", str(tmp_path)) == 3
    err = capsys.readouterr().err
    assert "non-finite gradient" in err and "Traceback" not in err


def test_skipped_steps_are_reported(tmp_path, capsys, monkeypatch):
    """Three steps' gradients turn NaN (a spike): skipped, counted, and the run goes on to a
    result. (A run whose outputs overflow, --lr 1e6, diverges even so: tests/test_train.py.)"""
    step, calls = optim.Optimizer.step, []

    def spiking_step(self):
        calls.append(1)
        if len(calls) in (3, 10, 11):
            self.param_groups[0]["params"][0].grad[0, 0] = np.nan
        return step(self)
    monkeypatch.setattr(optim.Optimizer, "step", spiking_step)
    assert cli("--epochs", "1", "--opt", "nonfinite=skip", "--out", str(tmp_path)) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skipped_steps"] == 3 and summary["test_accuracy"] > 0.5
    assert "3 step(s) were skipped" in capsys.readouterr().out


def test_config_records_every_hyper_parameter_and_metrics_the_lr(tmp_path):
    assert cli("--epochs", "1", "--optimizer", "adam", "--lr", "0.002", "--schedule", "step",
               "--schedule-opt", "step_size=1", "--schedule-opt", "gamma=0.5",
               "--out", str(tmp_path)) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hyper"]["betas"] == [0.9, 0.999] and config["hyper"]["eps"] == 1e-8
    assert config["val_size"] == 400 and config["schedule"]["name"] == "step"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr"] == 0.002
    _, opt_state, _ = checkpoint.load(tmp_path)
    assert opt_state["param_groups"][0]["lr"] == 0.001  # halved after the epoch


def test_a_config_file_with_another_optimizer(tmp_path, capsys):
    """--config of an Adam run with --optimizer sgd: the saved hyper-parameters were Adam's
    (betas, eps), so SGD starts from its own (it refused them before: no flag could drop
    them); the same optimizer keeps them."""
    assert cli("--epochs", "1", "--optimizer", "adam", "--lr", "0.002", "--out",
               str(tmp_path / "adam")) == 0
    saved = str(tmp_path / "adam" / "config.json")
    assert train_cli.main(["--config", saved, "--optimizer", "sgd", "--out", str(tmp_path / "sgd"),
                           "--epochs", "1", "--quiet"]) == 0
    config = json.loads((tmp_path / "sgd" / "config.json").read_text())
    assert config["optimizer"] == "sgd" and config["hyper"] == {"weight_decay": 0.0, "lr": 0.1,
                                                             "nonfinite": "ignore"}
    assert train_cli.main(["--config", saved, "--optimizer", "Adam", "--out",
                           str(tmp_path / "again"), "--epochs", "1", "--quiet"]) == 0
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["hyper"]["lr"] == 0.002 and config["hyper"]["betas"] == [0.9, 0.999]


def test_resume_may_name_the_saved_nonfinite_policy(tmp_path):
    """config.json records the non-finite policy with the other hyper-parameters, so a
    resume that names the saved (here: default) one is no change, and another one is."""
    assert cli("--epochs", "1", "--out", str(tmp_path)) == 0
    assert json.loads((tmp_path / "config.json").read_text())["hyper"]["nonfinite"] == "ignore"
    assert cli("--epochs", "2", "--resume", str(tmp_path), "--opt", "nonfinite=ignore") == 0
    assert cli("--epochs", "3", "--resume", str(tmp_path), "--opt", "nonfinite=skip") == 2
    # a run saved before the policy was recorded: its checkpoint and config.json lack it
    model_state, opt_state, meta = checkpoint.load(tmp_path)
    meta["config"]["hyper"].pop("nonfinite")
    checkpoint.save(tmp_path / "checkpoint.npz", model_state, opt_state, meta)
    assert cli("--epochs", "3", "--resume", str(tmp_path)) == 0
    meta["config"]["epochs"] = 3
    checkpoint.save(tmp_path / "checkpoint.npz", model_state, opt_state, meta)
    assert cli("--epochs", "3", "--resume", str(tmp_path)) == 0  # config.json has it now


def test_resume_with_fewer_epochs_than_trained_is_refused(tmp_path, capsys):
    assert cli("--epochs", "2", "--out", str(tmp_path)) == 0
    capsys.readouterr()
    assert cli("--epochs", "1", "--resume", str(tmp_path)) == 2
    assert "--epochs 1 is fewer than the 2 epochs the run" in capsys.readouterr().err
    assert json.loads((tmp_path / "config.json").read_text())["epochs"] == 2


def test_config_file_dry_run_and_version(tmp_path, capsys):
    assert cli("--epochs", "1", "--no-bn", "--out", str(tmp_path / "a")) == 0
    capsys.readouterr()
    assert train_cli.main(["--config", str(tmp_path / "a/config.json"), "--seed", "5",
                           "--dry-run"]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out[:out.rindex("}") + 1])
    assert shown["bn"] is False and shown["seed"] == 5 and shown["sizes"] == [784, 24, 16, 10]
    assert "nothing written" in out and not (tmp_path / "b").exists()
    with pytest.raises(SystemExit):
        train_cli.main(["--version"])
    assert nnopt.__version__ in capsys.readouterr().out


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.1)" in text and "(default: 30)" in text
    # a flag is off until given: no "--no-bn ... (default: True)"; no "(default: None)"
    assert "default: True" not in text and "default: False" not in text, text
    assert "default: None" not in text and "default: []" not in text, text
    for name, (_, params) in schedules.SCHEDULES.items():  # each schedule's parameters
        assert f"{name}: {', '.join(params)}" in text, name


def test_evaluate_refuses_another_data_set(tmp_path, capsys):
    assert cli("--epochs", "1", "--out", str(tmp_path)) == 0
    capsys.readouterr()
    assert train_cli.main(["--evaluate", str(tmp_path), "--dataset", "fashion-mnist"]) == 2
    assert "was trained on mnist-sample" in capsys.readouterr().err


def test_evaluate_refuses_settings_it_would_ignore(tmp_path, capsys):
    assert cli("--epochs", "1", "--out", str(tmp_path)) == 0
    capsys.readouterr()
    assert train_cli.main(["--evaluate", str(tmp_path), "--no-bn", "--lr=0.5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--no-bn" in err and "--lr" in err and "--quiet" not in err and "Leave them out" in err
    assert train_cli.main(["--evaluate", str(tmp_path), "--device", "cpu", "--quiet"]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_checkpoint_without_optimizer_header(tmp_path, capsys):
    assert cli("--epochs", "1", "--out", str(tmp_path)) == 0
    with np.load(tmp_path / "checkpoint.npz") as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(arrays["header"].tobytes())
    del header["optimizer"]
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(tmp_path / "checkpoint.npz", **arrays)
    with pytest.raises(checkpoint.CheckpointError, match="incomplete.*optimizer"):
        checkpoint.load(tmp_path)


def test_data_dir_with_the_embedded_sample_is_refused(tmp_path, capsys):
    """A folder given without --dataset would be ignored: the run would train on the sample
    while its user thinks it trains on the files there."""
    assert cli("--epochs", "1", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")) == 2
    assert "name the data set of the files there (--dataset mnist" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    with pytest.raises(nnopt.errors.InputError, match="mnist-sample is embedded"):
        nnopt.datasets.load("mnist-sample", data_dir=tmp_path)


# --- the library -------------------------------------------------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda: nnopt.mlp([784, 10], dtype=np.int32), "dtype must be 'float32' or 'float64'"),
    (lambda: nnopt.mlp([784, 10], dtype=np.float16), "dtype must be 'float32' or 'float64'"),
    (lambda: nnopt.mlp([784, 10], device=None), "device must be a name"),
    (lambda: nnopt.mlp([784, 10], seed=-1), "seed must be an integer >= 0"),
    (lambda: nnopt.mlp([784, "ten"]), "mlp sizes must be integers"),
    (lambda: nnopt.mlp([784, 10.9]), "mlp sizes must be integers"),
    (lambda: nnopt.Linear(4.7, 3), "Linear n_in must be an integer"),
    (lambda: init.xavier_uniform((3, 4), np.random.default_rng(0), gain=math.nan), "gain must be finite"),
    (lambda: nnopt.mlp([3, 2]).load_state_dict(None), "expects the dict"),
    (lambda: optim.Adam(nnopt.mlp([3, 2]), lr=True), "lr must be a number"),
    (lambda: nnopt.SoftmaxCrossEntropy()(np.zeros((2, 10)), np.array([1, 12])), "class label 12"),
    (lambda: nnopt.SoftmaxCrossEntropy()(np.zeros((2, 10)), np.array([-1, 2])), "class label -1"),
    (lambda: optim.StepLR(optim.SGD(nnopt.mlp([3, 2])), 0), "step_size must be an integer >= 1"),
    (lambda: (lambda s: (s.step(), s.step()))(optim.StepLR(optim.SGD(nnopt.mlp([3, 2])), 1, 1e200)),
     "learning rate from base rate 0.1 overflows at epoch 2"),
    (lambda: optim.ExponentialLR(optim.SGD(nnopt.mlp([3, 2]), lr=1e300), 1e10).step(),
     "overflows at epoch 1"),
    (lambda: nnopt.BatchNorm(-3), "BatchNorm n_features must be an integer >= 1"),
    (lambda: nnopt.BatchNorm(3.5), "BatchNorm n_features must be an integer"),
])
def test_library_bad_input(call, message):
    with pytest.raises(NnoptError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_model_load_state_dict_is_all_or_nothing():
    model = nnopt.mlp([3, 4, 2], batchnorm=True, seed=0)
    before = model.state_dict()
    # other values everywhere (a load that wrote the entries before fc2.W would show),
    # and fc2.W unusable
    bad = {key: np.asarray(value) + 0.5 for key, value in before.items()}
    assert all(not np.array_equal(bad[key], before[key]) for key in before)
    bad["fc2.W"] = np.array([["a", "b"]] * 4)
    with pytest.raises(NnoptError, match="fc2.W"):
        model.load_state_dict(bad)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_train_and_eval_modes_like_pytorch():
    model = nnopt.mlp([3, 4, 2], batchnorm=True, seed=0)
    x = np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32)
    bn = model.layers[1]
    assert model.training
    model(x)
    moved = bn.buffers["running_mean"].copy()
    assert np.any(moved != 0)
    assert model.eval() is model and not model.training
    out = model(x)
    np.testing.assert_array_equal(bn.buffers["running_mean"], moved)  # eval leaves them alone
    np.testing.assert_allclose(out, model.forward(x, train=False))
    model.train()
    model(x)
    assert np.any(bn.buffers["running_mean"] != moved)


def test_named_parameters_and_callable_losses():
    model = nnopt.mlp([3, 4, 2], seed=0)
    names = [name for name, _ in model.named_parameters()]
    assert names == ["fc1.W", "fc1.b", "fc2.W", "fc2.b"]
    y = np.array([[0.5, 1.0]])
    assert float(nnopt.MSELoss()(np.array([[1.0, 1.0]]), y)) == pytest.approx(0.125)


def test_optimizer_bad_input():
    model = nnopt.mlp([3, 2], seed=0)
    p = model.parameters()[0]
    with pytest.raises(NnoptError, match="appears twice"):
        optim.SGD([p, p])
    assert optim.RMSProp(model, eps_inside_root="no").param_groups[0]["eps_inside_root"] is False
    assert optim.AdaDelta(model, lr_scales_step="false").param_groups[0]["lr_scales_step"] is False
    assert optim.AdaDelta(model, lr_scales_step=1).param_groups[0]["lr_scales_step"] is True
    with pytest.raises(NnoptError, match="must be true or false"):
        optim.RMSProp(model, eps_inside_root="maybe")
    with pytest.raises(NnoptError, match="not supported"):
        optim.SGD(model, 0.1, momentum=0.9, dampening=0.1)
    with pytest.raises(NnoptError, match="has no hyper-parameter 'gamma'"):
        optim.SGD(model, gamma=2)
    # torch's spelling runs torch's buffer form; the textbook's is Momentum's or NAG's own
    with pytest.raises(NnoptError, match=r"use NAG\(params, lr, momentum=\.\.\., buffer='textbook'\)"):
        optim.SGD(model, 0.1, momentum=0.9, nesterov=True, buffer="textbook")
    assert type(optim.SGD(model, 0.1, momentum=0.9, buffer="torch")) is optim.Momentum


@pytest.mark.parametrize("corrupt, message", [
    (lambda sd: sd["state"][0].pop("exp_avg_sq"), "state 'exp_avg_sq' is missing"),
    (lambda sd: sd["state"][0].update(exp_avg=np.array(["x"] * 8)), "'exp_avg' is not numeric"),
    (lambda sd: sd["state"][0].update(step=-1), "step must be an integer >= 0"),
    (lambda sd: sd["param_groups"][0].update(lr="fast"), "lr must be a number"),
    # values no run makes
    (lambda sd: sd["state"][0].update(exp_avg_sq=-np.ones(8)), "is a sum of squares and holds negative"),
    (lambda sd: sd["state"][0].update(exp_avg=np.full(8, np.nan)), "holds NaN or infinite values"),
    (lambda sd: sd["param_groups"][0].update(foo=1), "Adam has no hyper-parameter 'foo'"),
    (lambda sd: sd.update(param_groups=[5]), "its settings and state must be dicts"),
])
def test_optimizer_load_state_dict_is_all_or_nothing(corrupt, message):
    model = nnopt.mlp([3, 2], seed=0)
    opt = optim.Adam(model, lr=0.01)
    model.flat.grad[...] = 1.0
    opt.step()
    before = opt.state_dict()
    other = optim.Adam(nnopt.mlp([3, 2], seed=1), lr=0.5)
    bad = other.state_dict()
    corrupt(bad)
    with pytest.raises(NnoptError, match=message):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"][0]["step"] == before["state"][0]["step"] == 1
    np.testing.assert_array_equal(after["state"][0]["exp_avg"], before["state"][0]["exp_avg"])
    with pytest.raises(NnoptError, match="expects the dict"):
        opt.load_state_dict(None)


def test_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint, "save", full)
    assert cli("--epochs", "1", "--out", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "No space left" in err and "Traceback" not in err
    assert "free some space there" in err


@pytest.mark.parametrize("code, remedy", [("EACCES", "choose an --out you may write to"),
                                          ("EROFS", "choose an --out you may write to"),
                                          ("ENOENT", "choose another --out")])
def test_a_failed_write_names_the_remedy_of_its_cause(tmp_path, monkeypatch, capsys, code, remedy):
    import errno

    def refused(*args, **kwargs):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))
    monkeypatch.setattr(checkpoint, "save", refused)
    assert cli("--epochs", "1", "--out", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert f"{os.strerror(getattr(errno, code))}; {remedy}" in err and "space" not in err, err


def test_console_script_names_itself(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["/usr/bin/nnopt-train", "--help"])
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: nnopt-train")


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dy, message", [
    (np.ones((5, 3), np.float32), r"of shape \(5, 2\), got \(5, 3\)"),
    (np.ones((2, 2), np.float32), r"of shape \(5, 2\), got \(2, 2\)"),
    (np.ones(5, np.float32), r"of shape \(5, 2\), got \(5,\)"),
    (np.ones((5, 2)), "in the output's dtype float32, got float64"),
    ([[1.0, 2.0]] * 5, "as an array of shape"),
])
def test_backward_checks_the_gradient_it_gets(fused, dy, message):
    """The fused kernels index the gradient by the saved output's shape: a wrong one would
    read and write out of bounds (it once corrupted the heap), so it is refused."""
    model = nnopt.mlp([4, 3, 2], batchnorm=True, seed=0, fused=fused)
    model.forward(np.ones((5, 4), np.float32))
    with pytest.raises(NnoptError, match=message):
        model.backward(dy)
    assert np.all(model.flat.grad == 0)
    with pytest.raises(NnoptError, match="backward before forward"):
        nnopt.mlp([4, 3, 2], fused=fused).backward(np.ones((5, 2), np.float32))


@pytest.mark.parametrize("call, message", [
    (lambda: nnopt.mlp([4, 3, 2], batchnorm="maybe"), "mlp batchnorm must be true or false"),
    (lambda: optim.SGD(nnopt.mlp([4, 2]), momentum=0.9, nesterov="sure"),
     "SGD nesterov must be true or false"),
    (lambda: nnopt.BatchNorm(3, sync="perhaps"), "BatchNorm sync must be true or false"),
    (lambda: optim.Adam(nnopt.mlp([4, 2]), use_fast_path="fast"),
     "Adam use_fast_path must be true or false"),
    (lambda: train.make_config(bn="nah"), "setting 'bn' must be true or false"),
])
def test_a_switch_is_true_or_false_never_a_truthy_word(call, message):
    with pytest.raises(NnoptError, match=message):
        call()


def test_switch_words_mean_what_they_say():
    """"false", "no" and "off" were once read as True (any non-empty string is truthy)."""
    assert not any(isinstance(layer, nnopt.BatchNorm)
                   for layer in nnopt.mlp([4, 3, 2], batchnorm="false").layers)
    assert type(optim.SGD(nnopt.mlp([4, 2]), momentum=0.9, nesterov="off")) is optim.Momentum
    assert nnopt.BatchNorm(3, sync="no").sync is False
    assert optim.Adam(nnopt.mlp([4, 2]), use_fast_path="no").use_fast_path is False
    config = train.make_config(bn="false", distributed="no", fused="off", quiet="yes")
    assert (config["bn"], config["distributed"], config["fused"], config["quiet"]) == (
        False, False, False, True)


@pytest.mark.parametrize("args, message", [
    (["--schedule", "step"], "schedule 'step' needs step_size: give it with --schedule-opt "
                             "step_size=VALUE"),
    (["--schedule", "cosine"], "schedule 'cosine' needs t_max"),
    (["--config", "SCHEDULE_AS_TEXT"], 'a schedule is a dict of its name and parameters'),
    (["--evaluate", "NOT_A_CHECKPOINT"], "not an nnopt checkpoint (not an .npz archive)"),
])
def test_cli_messages_name_the_fix(tmp_path, capsys, args, message):
    (tmp_path / "c.json").write_text('{"schedule": "step"}')
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    args = [{"SCHEDULE_AS_TEXT": str(tmp_path / "c.json"),
             "NOT_A_CHECKPOINT": str(tmp_path / "notes.txt")}.get(a, a) for a in args]
    dry_run = [] if "--evaluate" in args else ["--dry-run"]  # (--evaluate takes no other flag)
    assert train_cli.main([*args, *dry_run]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "pickle" not in err


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("x, y, message", [
    (np.ones((0, 4), np.float32), np.zeros(0, np.int64), "got an empty batch"),
    (np.ones((5, 4), np.float32).tolist(), np.arange(5) % 2, "expects a 2-D batch"),
    (np.ones((5, 4), np.float32), [0, 1, 0, 1, 0], "targets must be an array"),
    (np.ones((5, 4), np.float32), np.int64(1), "targets must be an array"),
])
def test_a_training_step_refuses_what_is_not_a_batch(fused, batchnorm, x, y, message):
    model = nnopt.mlp([4, 3, 2], batchnorm=batchnorm, fused=fused)
    with pytest.raises(NnoptError, match=message):
        model.loss_and_backward(x, y, nnopt.SoftmaxCrossEntropy())


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("loss, target", [
    (nnopt.SoftmaxCrossEntropy(), np.eye(3)[np.arange(5) % 3]),              # float64 one-hot
    (nnopt.SoftmaxCrossEntropy(), np.eye(3, dtype=np.int64)[np.arange(5) % 3]),
    (nnopt.SoftmaxCrossEntropy(), np.full((5, 3), 1 / 3)),                    # smoothed rows
    (nnopt.MSELoss(), np.zeros((5, 3))),                                      # float64 targets
])
def test_float32_networks_take_targets_of_any_real_dtype(fused, loss, target):
    """The loss works in the network's dtype: a float64 gradient would be refused by the
    float32 layers' backward."""
    model = nnopt.mlp([4, 3], seed=0, fused=fused)
    x = np.random.default_rng(0).random((5, 4), dtype=np.float32)
    value = model.loss_and_backward(x, target, loss)
    weights = {key: np.asarray(value, np.float64) for key, value in model.state_dict().items()}
    reference = type(loss)()(x.astype(np.float64) @ weights["fc1.W"] + weights["fc1.b"], target)
    assert np.asarray(value).dtype == np.float32
    assert float(value) == pytest.approx(float(reference), rel=1e-5)
    assert all(np.isfinite(p.grad).all() and p.grad.dtype == np.float32 for p in model.parameters())


@pytest.mark.parametrize("target, message", [
    (np.eye(3)[np.arange(5) % 3] * 2, "target row 0 sums to 2, not 1"),
    (np.where(np.arange(15).reshape(5, 3) == 7, np.nan, np.eye(3)[np.arange(5) % 3]),
     "target row 2 has a negative or non-finite entry"),
    (np.eye(3)[np.arange(5) % 3] - np.eye(3)[(np.arange(5) + 1) % 3] + np.eye(3)[np.arange(5) % 3],
     "target row 0 has a negative or non-finite entry"),
    (np.eye(3, dtype=np.complex128)[np.arange(5) % 3], "targets must be real numbers"),
])
def test_one_hot_rows_must_be_probabilities(target, message):
    with pytest.raises(NnoptError, match=message):
        nnopt.SoftmaxCrossEntropy()(np.zeros((5, 3), np.float32), target)


@pytest.mark.parametrize("params", [None, 5])
def test_an_optimizer_needs_parameters(params):
    with pytest.raises(NnoptError, match="an optimizer takes a model, its parameters"):
        optim.SGD(params)


def block(batchnorm=True, activation="relu"):
    from nnopt.block import Block
    from nnopt.layers import ACTIVATIONS
    return Block(nnopt.Linear(3, 2), nnopt.BatchNorm(2) if batchnorm else None,
                 ACTIVATIONS[activation]() if activation else None)


@pytest.mark.parametrize("make, out_features", [
    (nnopt.ReLU, 3), (nnopt.Sigmoid, 3), (nnopt.Tanh, 3), (lambda: nnopt.BatchNorm(3), 3),
    (lambda: nnopt.BatchNorm(3, use_fast_path=False), 3), (lambda: nnopt.Linear(3, 2), 2),
    (block, 2), (lambda: block(False, "sigmoid"), 2)])
@pytest.mark.parametrize("wrong", ["more rows", "one row", "one column", "1-D", "dtype"])
def test_a_layers_own_backward_checks_the_gradient_it_gets(make, out_features, wrong):
    """Called directly, outside a model, each layer's backward refuses a gradient not shaped
    as its last output: the fused kernels index it by that shape (more rows read and wrote
    past the buffers' end and crashed; fewer gave uninitialised values), and broadcasting
    it would be another gradient."""
    layer = make()
    if hasattr(layer, "params") and layer.params:
        nnopt.Sequential([layer])  # its gradient storage
    layer.forward(np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32))
    dy = {"more rows": np.ones((4000, out_features), np.float32),
          "one row": np.ones((1, out_features), np.float32),
          "one column": np.ones((6, 1), np.float32),
          "1-D": np.ones(out_features, np.float32),
          "dtype": np.ones((6, out_features))}[wrong]
    message = "in the output's dtype float32" if wrong == "dtype" else \
        rf"backward expects the gradient of the last forward's output, of shape \(6, {out_features}\)"
    with pytest.raises(NnoptError, match=message):
        layer.backward(dy)


@pytest.mark.parametrize("layer, shape", [(nnopt.BatchNorm(3), (4, 3)),
                                          (nnopt.BatchNorm(3, use_fast_path=False), (4, 3)),
                                          (nnopt.Linear(3, 2), (4, 2)),
                                          (block(), (4, 2)), (block(False, "tanh"), (4, 2))])
def test_a_layer_outside_a_model_says_where_its_gradients_go(layer, shape):
    layer.forward(np.random.default_rng(0).normal(size=(4, 3)))
    with pytest.raises(NnoptError, match="has no gradient storage: .*nnopt.Sequential"):
        layer.backward(np.ones(shape))


@pytest.mark.parametrize("key, value, message", [
    ("fc1.W", np.full((4, 3), np.nan), "holds NaN or values beyond float32's range"),
    ("fc1.W", np.full((4, 3), 1e300), "holds NaN or values beyond float32's range"),
    ("fc1.W", np.ones((4, 3)) * 1j, "is not real numbers"),
    ("bn1.running_var", -np.ones(3), "holds a negative variance"),
    ("fc1.W", np.float64(1.0), r"has shape \(\), this model's is \(4, 3\)"),
])
def test_load_state_dict_refuses_values_no_model_has(key, value, message):
    model = nnopt.mlp([4, 3, 2], batchnorm=True, seed=0)
    before = model.state_dict()
    with pytest.raises(NnoptError, match=message):
        model.load_state_dict({**before, key: value})
    for name, array in model.state_dict().items():
        np.testing.assert_array_equal(array, before[name])


@pytest.mark.parametrize("options, message", [
    ({"init": "uniform", "init_options": {"low": 1, "high": 0}}, "uniform needs low <= high"),
    ({"init": "uniform", "init_options": {"low": float("nan")}}, "uniform low must be finite"),
    ({"init": "constant", "init_options": {"value": float("nan")}}, "constant value must be finite"),
    ({"init_options": {"foo": 1}}, "initializer 'msra' has no option 'foo'; it takes: mode"),
    ({"init_options": [1]}, "init_options must be a dict"),
    ({"batchnorm": True, "bn_options": {"foo": 1}}, "bn_options must be a dict of BatchNorm's"),
    ({"activation": []}, "unknown activation"),
])
def test_mlp_options_are_checked(options, message):
    with pytest.raises(NnoptError, match=message):
        nnopt.mlp([4, 3, 2], **options)


def test_a_network_too_large_for_memory_is_one_line(tmp_path, capsys, monkeypatch):
    def too_large(config, xp=None):
        raise MemoryError("Unable to allocate 584. GiB")
    monkeypatch.setattr(train, "build_model", too_large)
    assert cli("--sizes", "784,100000000,10", "--out", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "(79,500,000,010 parameters) does not fit in this machine's memory" in err
    assert len(err.strip().splitlines()) == 1


def test_an_empty_out_is_refused(capsys):
    assert cli("--out", "") == 2
    assert "--out is empty; give the output folder" in capsys.readouterr().err


def test_a_check_interval_longer_than_the_run_is_noted(tmp_path, capsys):
    with warnings.catch_warnings():  # the empty curves, with a target of 0, warn nothing
        warnings.simplefilter("error")
        assert cli("--epochs", "2", "--check-every", "100000", "--target-loss", "0",
                   "--out", str(tmp_path)) == 0
    assert ("note: --check-every 100000 is more than the run's 120 iterations (2 epoch(s)): "
            "no validation check will run") in capsys.readouterr().out
    assert (tmp_path / "curves.png").stat().st_size > 0
