"""The chapter's experiments in --quick form: their qualitative claims, and the batched
curve-fitting engine against nnopt's reference layers and optimizers."""

import numpy as np
import pytest

from nnopt.experiments import EXPERIMENTS, __main__ as cli, curvefit, regression
from nnopt.experiments.initialization import activations, zero_init_demo
from nnopt.experiments.report import Context, write


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    ctx = Context(out=out, quick=True)
    sections = [run(ctx) for run in EXPERIMENTS.values()]
    report = write(ctx, sections, 0.0)
    claims = {c.claim: c for s in sections for c in s.claims}
    return out, report, claims


def held(claims, start):
    matches = [c for text, c in claims.items() if text.startswith(start)]
    assert matches, f"no claim starting with {start!r}"
    return matches[0].held


def test_report_and_figures_written(quick_run):
    out, report, claims = quick_run
    text = report.read_text()
    assert "Seed 0" in text and "Versions: nnopt" in text and "| held |" in text
    for name in ("init_textbook.png", "optimizers_loss.png", "contours_bowl_overlay.png",
                 "contours_line_overlay.png", "bn_distribution.png"):
        assert (out / name).stat().st_size > 10_000, name
        assert f"({name})" in text
    assert len(claims) >= 15


def test_zero_init_keeps_units_identical(quick_run):
    assert held(quick_run[2], "Zero init") is True
    w1, b1, w2 = zero_init_demo(seed=3, epochs=2)
    assert np.all(w1 == w1[:, :1]) and np.all(b1 == b1[0]) and np.all(w2 == w2[0])
    assert np.any(w1 != 0)  # it did train


def test_initialization_claims(quick_run):
    claims = quick_run[2]
    assert held(claims, "Normal N(0,1) init saturates sigmoid") is True
    assert held(claims, "Xavier + ReLU") is True
    assert held(claims, "MSRA + ReLU") is True
    xavier = [np.std(a) for a in activations("Xavier", "relu", seed=5)]
    msra = [np.std(a) for a in activations("MSRA", "relu", seed=5)]
    assert xavier[-1] < 0.3 * xavier[0] and 0.5 < msra[-1] / msra[0] < 2


def test_optimizer_claims(quick_run):
    claims = quick_run[2]
    assert held(claims, "Momentum needs fewer epochs than SGD") is True
    assert held(claims, "AdaDelta ignores the learning rate") is True


def test_contour_claims(quick_run):
    claims = quick_run[2]
    assert held(claims, "SGD (lr 0.95) zig-zags") is True
    assert held(claims, "AdaDelta converges with lr 0") is True


def test_bn_needs_fewer_iterations(quick_run):
    assert held(quick_run[2], "BN reaches the validation target in fewer iterations") is True


@pytest.mark.parametrize("name, options", [
    ("sgd", {"lr": 0.3}), ("momentum", {"lr": 0.1}), ("nag", {"lr": 0.1}),
    ("adagrad", {"lr": 0.5}), ("adadelta", {"lr": 0.1}), ("rmsprop", {"lr": 0.01}),
    ("adam", {"lr": 0.01, "betas": (0.8, 0.99)}),
])
def test_batched_engine_matches_reference(name, options):
    data = regression.curve(seed=2, n_train=200)
    start = curvefit.initial_params(seed=2)
    _, _, final = curvefit.train_all([(name, options)], data, start, max_epochs=3,
                                     record_every=1, check_every=1, target=-1.0, seed=2)
    want = curvefit.reference_run(name, options, data, epochs=3, seed=2)
    assert np.max(np.abs(final[0] - want)) <= 1e-12 * max(1.0, np.max(np.abs(want)))


def test_engine_stops_at_target_and_records_losses():
    data = regression.curve(seed=0, n_train=200)
    start = curvefit.initial_params(seed=0)
    curves, reached, _ = curvefit.train_all([("adam", {"lr": 0.01}), ("sgd", {"lr": 0.01})],
                                            data, start, max_epochs=200, record_every=10,
                                            check_every=50, target=0.02, seed=0)
    assert reached[0] in (50, 100, 150, 200)
    assert np.isnan(curves[0, reached[0] // 10:]).all()  # nothing recorded after the stop
    losses = curves[1][~np.isnan(curves[1])]
    assert losses[-1] < losses[0]


def test_cli_writes_report(tmp_path, capsys):
    assert cli.main(["contours", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text().count("![") >= 2
    assert "report:" in capsys.readouterr().out
    assert cli.main(["init", "--device", "tpu", "--out", str(tmp_path)]) == 2
    assert "unknown device" in capsys.readouterr().err
