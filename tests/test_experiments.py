"""The chapter's experiments in --quick form: their qualitative claims, and the batched
curve-fitting engine against nnopt's reference layers and optimizers."""

import numpy as np
import pytest

import json
import math

from nnopt.experiments import (EXPERIMENTS, __main__ as cli, batchnorm, curvefit, regression,
                               run_sections)
from nnopt.experiments.initialization import (activations, per_sample_spread, zero_init_demo,
                                               zero_init_identical)
from nnopt.experiments.report import (Context, Section, all_of, figure_module, held_bounds,
                                      place, sooner, spread, verdict_of, wilson, write)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    ctx = Context(out=out, quick=True, seeds=2)
    sections = run_sections(ctx, list(EXPERIMENTS))  # as `all` runs them: init, contours aside
    report = write(ctx, sections, 0.0)
    claims = {c.claim: c for s in sections for c in s.claims}
    return out, report, claims


def held(claims, start):
    matches = [c for text, c in claims.items() if text.startswith(start)]
    assert matches, f"no claim starting with {start!r}"
    return matches[0].verdict


def test_report_and_figures_written(quick_run):
    out, report, claims = quick_run
    text = report.read_text()
    assert "Seeds 0-1 (2)" in text and "Versions: nnopt" in text and "| verdict |" in text
    assert "Rule: a claim's verdict is **yes** when" in text
    # Table 15-12's epochs are counted as the textbook counts them: the epochs completed
    assert "| nnopt epochs completed |" in text
    for name in ("init_textbook.png", "optimizers_loss.png", "contours_bowl_overlay.png",
                 "contours_line_overlay.png", "bn_distribution.png"):
        assert (out / name).stat().st_size > 10_000, name
        assert f"({name})" in text
    assert len(claims) >= 15
    saved = json.loads((out / "claims.json").read_text())
    assert [c["id"] for c in saved["claims"]] == [c.id for c in claims.values()]
    for c in saved["claims"]:
        assert c["verdict"] in ("yes", "no", "partly", "n/a")
        assert {"median", "min", "max", "n_seeds"} <= set(c["measured"]) and c["reason"]


def test_place_lays_out_margins_and_gaps_in_inches():
    plt = figure_module()
    fig, axes = plt.subplots(2, 3, figsize=(10, 5))
    place(fig, left=1.0, bottom=0.5, right=0.2, top=0.8, wspace=0.4, hspace=0.6)
    box = [[ax.get_position() for ax in row] for row in axes]
    plt.close(fig)
    assert box[0][0].x0 * 10 == pytest.approx(1.0) and box[0][2].x1 * 10 == pytest.approx(9.8)
    assert box[1][0].y0 * 5 == pytest.approx(0.5) and box[0][0].y1 * 5 == pytest.approx(4.2)
    assert (box[0][1].x0 - box[0][0].x1) * 10 == pytest.approx(0.4)
    assert (box[0][0].y0 - box[1][0].y1) * 5 == pytest.approx(0.6)


@pytest.mark.parametrize("held, want", [
    ([True] * 8, ("yes", 1.0)), ([True] * 6 + [False] * 2, ("yes", 0.75)),
    ([True] * 5 + [False] * 3, ("partly", 0.625)), ([True] * 2 + [False] * 6, ("no", 0.25)),
    ([False] * 8, ("no", 0.0)), ([None, None], ("n/a", None)), ([True, None, False, None], ("partly", 0.5)),
])
def test_verdict_from_held_fraction(held, want):
    assert verdict_of(held) == want


def test_not_reached_is_never_sooner():
    inf = math.inf
    assert sooner(100, 200) and sooner(100, inf)
    assert sooner(inf, inf) is False and not sooner(inf, 100) and not sooner(200, 100)
    # The old AdaGrad check (a < b <= c) held for 5,650 / never / never; ours does not.
    assert all_of(sooner(5650, inf), sooner(inf, inf)) is False


def test_a_tie_orders_neither_and_leaves_the_seed_out():
    assert sooner(440, 440) is None
    assert all_of(True, None) is None and all_of(None, False) is False and all_of(True, 1) is True
    held = [sooner(b, a) for a, b in [(484, 440), (440, 440), (396, 616)]]
    assert held == [True, None, False] and verdict_of(held) == ("partly", 0.5)


def test_spread_keeps_not_reached_in_the_order():
    m = spread([300, math.inf, 100, math.inf, math.inf], "epochs")
    assert m == {"quantity": "epochs", "median": None, "min": 100.0, "max": None, "n_seeds": 5,
                 "not_reached": 3}
    assert spread([3, 1, 2])["median"] == 2


def test_claim_verdict_computed_from_seeds():
    section = Section("t")
    assert section.claim("a", "c", "tb", spread([1]), [True, False, False, False], "r").verdict == "no"
    assert section.claim("b", "c", "tb", spread([1]), [True, True, True, False], "r").verdict == "yes"


@pytest.mark.parametrize("held, n, verdict, is_settled", [
    (8, 8, "yes", True), (7, 8, "yes", False), (6, 8, "yes", False), (3, 3, "yes", False),
    (0, 8, "no", True), (1, 8, "no", False), (3, 8, "partly", False), (48, 96, "partly", True),
    (24, 24, "yes", True)])
def test_verdict_settled_only_when_the_bounds_stay_in_its_band(held, n, verdict, is_settled):
    section = Section("t")
    claim = section.claim("c", "c", "tb", spread([1]), [True] * held + [False] * (n - held), "r")
    assert claim.verdict == verdict and claim.settled is is_settled
    low, high = claim.bounds
    assert 0 <= low < held / n < high <= 1 or held in (0, n)
    assert ("(unsettled" in claim.verdict_text) is not is_settled
    assert claim.to_json()["settled"] is is_settled


@pytest.mark.parametrize("held, n", [(7, 8), (3, 8), (16, 24), (1, 8), (3, 3), (18, 21)])
def test_seeds_to_settle_is_the_first_count_that_settles_at_this_rate(held, n):
    """The report's guide for --seeds: at the same held rate, that many seeds give bounds
    inside the verdict's band, one fewer does not."""
    claim = Section("t").claim("c", "c", "tb", spread([1]), [True] * held + [False] * (n - held),
                               "r")
    needed = claim.seeds_to_settle
    assert claim.settled is False and needed > n
    band = {"yes": lambda lo, hi: lo >= 0.75, "no": lambda lo, hi: hi <= 0.25,
            "partly": lambda lo, hi: 0.25 < lo and hi < 0.75}[claim.verdict]
    assert band(*wilson(held / n, needed)) and not band(*wilson(held / n, needed - 1))
    assert f"about {needed:,} tested seeds would settle it" in claim.verdict_text
    assert claim.to_json()["seeds_to_settle"] == needed


def test_a_timing_claim_counts_rounds_not_seeds(tmp_path, capsys, monkeypatch):
    """--seeds does not change a timing's rounds: its hint must not send the reader there."""
    section = Section("t")
    made = section.claim("t", "T costs", "tb", spread([1]), [True] * 4 + [False], "r",
                         counted="rounds")
    assert "tested rounds would settle it" in made.verdict_text
    assert "not --seeds" in made.verdict_text and "tested seeds" not in made.verdict_text
    monkeypatch.setattr(cli, "run_sections", lambda ctx, names: [section])
    assert cli.main(["contours", "--quick", "--out", str(tmp_path)]) == 0
    assert "T costs: about" in capsys.readouterr().out


@pytest.mark.parametrize("held, n", [(6, 8), (3, 4), (2, 8)])  # 75% and 25%: the bands' edges
def test_a_rate_on_a_bands_edge_never_settles(held, n):
    claim = Section("t").claim("c", "c", "tb", spread([1]), [True] * held + [False] * (n - held),
                               "r")
    assert claim.settled is False and claim.seeds_to_settle is None
    assert "on the band's edge" in claim.verdict_text


def test_held_bounds_match_wilsons_interval():
    # Wilson's 80% two-sided interval for 7 of 8 (z = 1.2816), worked by hand
    low, high = held_bounds([True] * 7 + [False])
    assert low == pytest.approx(0.6604, abs=2e-4) and high == pytest.approx(0.9618, abs=2e-4)
    assert held_bounds([None, None]) is None


def test_a_fixed_set_of_configurations_has_no_bounds():
    claim = Section("t").claim("g", "c", "tb", spread([1]), [True, False, True], "r", sampled=False)
    assert claim.verdict == "partly" and claim.bounds is None and claim.settled is None
    assert claim.verdict_text == "partly"


def test_gpu_claim_reads_results_when_present(tmp_path):
    text, held, measured = batchnorm.gpu_evidence(tmp_path / "gpu.json")
    assert "not measured on a GPU yet" in text and held == [] and verdict_of(held)[0] == "n/a"
    (tmp_path / "gpu.json").write_text(json.dumps({
        "machine": {"date": "2026-12-01T10:00:00"}, "device": "NVIDIA H100 80GB HBM3",
        "train": [{"batch": 64, "gpu_bn_overhead_%": 3.0}, {"batch": 1024, "gpu_bn_overhead_%": 4.0},
                  {"batch": 8192, "gpu_bn_overhead_%": 25.0},
                  # the captured step's overhead, where measured, is the one that counts
                  {"batch": 4096, "gpu_bn_overhead_%": 30.0, "gpu_graph_bn_overhead_%": 5.0}]}))
    text, held, measured = batchnorm.gpu_evidence(tmp_path / "gpu.json")
    assert "NVIDIA H100 80GB HBM3" in text and "2026-12-01" in text
    assert "4 batch/width configurations)" in text and "seeds" not in text
    assert held == [True, True, False, True] and verdict_of(held) == ("yes", 3 / 4)
    assert measured["median"] == 4.5 and measured["n_seeds"] == 4
    assert "too close to call" not in text and "as the one median the file records" in text


def test_gpu_claim_judges_each_configuration_on_its_rounds(tmp_path):
    """As bench_gpu's verdict: a configuration holds when every round was below 10%, fails
    when every round was at or above it, and is not counted when its rounds straddle 10%
    (its median alone would flip with the next run)."""
    (tmp_path / "gpu.json").write_text(json.dumps({"device": "card", "train": [
        {"batch": 64, "gpu_graph_bn_overhead_%": 9.0, "gpu_graph_bn_overhead_%_range": [7.0, 12.0]},
        {"batch": 1024, "gpu_graph_bn_overhead_%": 11.0, "gpu_graph_bn_overhead_%_range": [10.0, 13.0]},
        {"batch": 8192, "gpu_graph_bn_overhead_%": 4.0, "gpu_graph_bn_overhead_%_range": [3.0, 9.9]},
        {"batch": 4096, "gpu_bn_overhead_%": 12.0, "gpu_bn_overhead_%_range": [8.0, 15.0]}]}))
    text, held, measured = batchnorm.gpu_evidence(tmp_path / "gpu.json")
    assert held == [None, False, True, None] and verdict_of(held) == ("partly", 1 / 2)
    assert "too close to call in 2" in text and measured["n_seeds"] == 4
    assert "batch 1024, width ?: +11.0%" in text and "in every round" in text


def test_diverged_run_scores_chance_not_dropped():
    plain_diverged = {"bn": False, "diverged": "loss became nan", "test_accuracy": None}
    plain = {"bn": False, "diverged": None, "test_accuracy": 0.5}
    with_bn = {"bn": True, "diverged": None, "test_accuracy": 0.8}
    acc, diverged = batchnorm.benefit_outcomes([(plain_diverged, with_bn), (plain, with_bn)])
    assert acc == [(batchnorm.CHANCE, 0.8), (0.5, 0.8)] and diverged == [1, 0]


def test_per_sample_spread_sees_a_collapse():
    rng = np.random.default_rng(0)
    collapsed = np.tile(rng.random(128), (1000, 1))  # every input -> the same output vector
    assert np.std(collapsed) > 0.2 and per_sample_spread(collapsed) < 1e-12
    assert per_sample_spread(rng.random((1000, 128))) > 0.25


def test_zero_init_keeps_units_identical(quick_run):
    assert held(quick_run[2], "Zero init") == "yes"
    w1, b1, w2 = zero_init_demo(seed=3, epochs=2)
    assert np.all(w1 == w1[:, :1]) and np.all(b1 == b1[0]) and np.all(w2 == w2[0])
    assert np.any(w1 != 0)  # it did train
    # the claim's test itself: any of the three parts breaking the symmetry fails it
    assert zero_init_identical(w1, b1, w2)
    for k, part in enumerate((w1, b1, w2)):
        broken = [w1.copy(), b1.copy(), w2.copy()]
        broken[k].flat[-1] += 1e-9
        assert not zero_init_identical(*broken), k


def test_initialization_claims(quick_run):
    claims = quick_run[2]
    assert held(claims, "Normal N(0,1) init saturates sigmoid") == "yes"
    assert held(claims, "Xavier + ReLU") == "yes"
    assert held(claims, "MSRA + ReLU") == "yes"
    xavier = [np.std(a) for a in activations("Xavier", "relu", seed=5)]
    msra = [np.std(a) for a in activations("MSRA", "relu", seed=5)]
    assert xavier[-1] < 0.3 * xavier[0] and 0.5 < msra[-1] / msra[0] < 2


def test_optimizer_claims(quick_run):
    claims = quick_run[2]
    assert held(claims, "Momentum needs fewer epochs than SGD") == "yes"
    assert held(claims, "AdaDelta ignores the learning rate") == "yes"


def test_contour_claims(quick_run):
    claims = quick_run[2]
    assert held(claims, "SGD (lr 0.95) zig-zags") == "yes"
    assert held(claims, "AdaDelta converges with lr 0") == "yes"


def test_bn_claims_carry_their_measurements(quick_run):
    claims = {c.id: c for c in quick_run[2].values()}
    fewer = claims["bn_fewer_iterations"]
    assert fewer.measured["n_seeds"] == 2 and len(fewer.held_per_seed) == 2
    assert claims["bn_cpu_time_cost"].measured["n_seeds"] == 5  # interleaved rounds
    assert "fast paths" in claims["bn_cpu_time_cost"].reason
    assert "5 rounds" in claims["bn_cpu_time_cost"].reason  # counted as rounds, not seeds


def test_only_sampled_claims_carry_bounds(quick_run):
    claims = {c.id: c for c in quick_run[2].values()}
    for fixed in ("bowl_sgd_zigzag", "bowl_momentum_overshoot", "bowl_adaptive_direct",
                  "zero_init_symmetry", "bn_gpu_negligible"):
        assert claims[fixed].bounds is None and claims[fixed].settled is None
    assert claims["bn_gpu_negligible"].counted == "configurations"  # not seeds
    # two seeds held cannot settle a rate: the report says so
    assert claims["momentum_sooner_than_sgd"].settled is False
    assert "(unsettled: about" in claims["momentum_sooner_than_sgd"].verdict_text


def test_claims_cut_short_by_quick_are_marked(quick_run):
    out, report, claims = quick_run
    claims = {c.id: c for c in claims.values()}
    assert claims["sgd_0.1_not_reached"].capped == "tested to 4,000 epochs, not 10,000"
    assert claims["line_adadelta_lr0"].capped == "tested to 600 iterations, not 2,000"
    assert claims["zero_init_symmetry"].capped == "trained 5 epochs, not 20"
    assert claims["bn_fewer_iterations"].capped.startswith("at most 4 epochs to the quick target")
    # what --quick runs whole carries no mark
    for whole in ("bowl_sgd_zigzag", "xavier_sigmoid_even", "adadelta_ignores_lr",
                  "bn_cpu_time_cost", "bn_gpu_negligible"):
        assert claims[whole].capped is None, whole
    assert "(quick: tested to 4,000 epochs, not 10,000) |" in report.read_text()
    saved = {c["id"]: c for c in json.loads((out / "claims.json").read_text())["claims"]}
    assert saved["sgd_0.1_not_reached"]["capped"] == "tested to 4,000 epochs, not 10,000"
    assert saved["bowl_sgd_zigzag"]["capped"] is None


def test_adadelta_check_can_fail():
    from nnopt.experiments.optimizers import adadelta_lr_difference
    assert adadelta_lr_difference(0, epochs=1) == 0.0
    assert adadelta_lr_difference(0, epochs=1, lr_scales_step=True) > 0


def test_regression_sets_follow_the_chapters_formulas():
    """The curve y = 0.4x^2 + 0.3x sin(15x) + 0.01 cos(50x) - 0.3 at points where each term
    is known exactly; its sets as the chapter draws them; the line y = 2x + 3 + noise."""
    third = math.pi / 30  # sin(15x) = 1, cos(50x) = cos(5 pi / 3) = 1/2
    known = {0.0: 0.01 - 0.3,
             third: 0.4 * third ** 2 + 0.3 * third + 0.005 - 0.3,
             2 * third: 0.4 * (2 * third) ** 2 - 0.005 - 0.3}  # sin(pi) = 0, cos(10 pi / 3) = -1/2
    for x, y in known.items():
        assert abs(regression.curve_fn(np.array([x]))[0] - y) < 1e-12, x
    x, y, x_test, y_test = regression.curve(seed=3)
    assert x.shape == y.shape == (1000, 1) and x_test.shape == y_test.shape == (200, 1)
    assert 0 <= x.min() and x.max() < 1
    noise = y - regression.curve_fn(x)
    assert np.abs(noise).max() <= 0.05 and noise.min() < -0.045 and noise.max() > 0.045
    np.testing.assert_array_equal(x_test[:, 0], np.linspace(0, 1, 200))
    np.testing.assert_array_equal(y_test, regression.curve_fn(x_test))
    x, y = regression.line(seed=3, n=2000, noise=0.1)
    slope, intercept = np.polyfit(x[:, 0], y[:, 0], 1)
    assert abs(slope - 2) < 0.05 and abs(intercept - 3) < 0.03
    assert abs(np.std(y[:, 0] - (2 * x[:, 0] + 3)) - 0.1) < 0.01


def test_train_seeds_matches_single_runs():
    seeds = [0, 1]
    data = [regression.curve(s, n_train=100) for s in seeds]
    starts = [curvefit.initial_params(s) for s in seeds]
    configs = [("sgd", {"lr": 0.3}), ("adam", {"lr": 0.01})]
    curves, reached, final = curvefit.train_seeds(configs, data, starts, seeds, max_epochs=20,
                                                  record_every=5, check_every=5, target=-1.0)
    assert final.shape == (2, 2, 10)
    for k, s in enumerate(seeds):
        _, _, alone = curvefit.train_all(configs, data[k], starts[k], max_epochs=20,
                                         record_every=5, check_every=5, target=-1.0, seed=s)
        assert np.array_equal(final[k], alone)
    assert not np.array_equal(final[0], final[1])


def test_packing_finished_runs_away_changes_no_run():
    # 5 seeds: two blocks per configuration, one half empty; with target 0.02 runs stop at
    # different checks, and the survivors are packed into new blocks and lanes each time.
    seeds = [0, 1, 2, 3, 4]
    data = [regression.curve(s, n_train=100) for s in seeds]
    starts = [curvefit.initial_params(s) for s in seeds]
    configs = [("adam", {"lr": 0.05}), ("sgd", {"lr": 0.5}), ("rmsprop", {"lr": 0.01})]
    curves, reached, final = curvefit.train_seeds(configs, data, starts, seeds, max_epochs=60,
                                                  record_every=5, check_every=5, target=0.02)
    assert len(set(reached.ravel().tolist())) > 2  # stops at several different checks
    for k, s in enumerate(seeds):
        for c, config in enumerate(configs):
            alone = curvefit.train_all([config], data[k], starts[k], max_epochs=60,
                                       record_every=5, check_every=5, target=0.02, seed=s)
            assert alone[1][0] == reached[k, c]
            assert np.array_equal(alone[2][0], final[k, c])
            assert np.array_equal(alone[0][0], curves[k, c], equal_nan=True)


@pytest.mark.skipif("avx2" not in __import__("llvmlite.binding").binding.get_host_cpu_features().flatten(),
                    reason="the 4-wide float64 code needs AVX2")
def test_engine_gradient_is_simd_code():
    import re

    import numba
    # A fresh compile of the engine's gradient (numba's disk cache keeps no assembly).
    gradient = numba.njit(error_model="numpy", fastmath={"contract"})(
        curvefit._gradient_block.py_func)
    x = np.zeros(10 * curvefit.LANES)
    gradient(np.zeros(curvefit.BLOCK), x, x, 0, 10)
    asm = gradient.inspect_asm(gradient.signatures[0])
    assert re.search(r"vfmadd\w*pd\s+%ymm", asm) and not re.search(r"vfmadd\w*sd", asm)


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


def test_engine_records_the_reference_models_test_loss():
    """The curves (and the stop at the target) are MSE/2 on the test set of the model the
    reference layers train, epoch by epoch."""
    from nnopt.losses import MSELoss
    from nnopt.model import mlp
    data = regression.curve(seed=2, n_train=200)
    curves, _, _ = curvefit.train_all([("momentum", {"lr": 0.1})], data,
                                      curvefit.initial_params(seed=2), max_epochs=3,
                                      record_every=1, check_every=1, target=-1.0, seed=2)
    for epoch in (1, 2, 3):
        model = mlp([1, 3, 1], "sigmoid", seed=2, dtype="float64")
        model.flat.data[...] = curvefit.reference_run("momentum", {"lr": 0.1}, data, epochs=epoch,
                                                      seed=2)
        model.eval()
        want = float(MSELoss().forward(model(data[2]), data[3]))
        assert abs(curves[0][epoch - 1] - want) <= 1e-12 * want, epoch


def test_epoch_shuffle_draws_every_order_equally_often():
    """Fisher-Yates: each of the 24 orders of 4 items about 1/24 of the epochs (a
    near-miss such as Sattolo's, which draws only the 6 cycles, fails); reproducible
    from (seed, epoch), another per epoch."""
    import collections
    epochs = 24_000
    counts = collections.Counter(tuple(curvefit.epoch_order(4, 7, e)) for e in range(epochs))
    assert len(counts) == 24
    assert all(abs(c - epochs / 24) < 6 * math.sqrt(epochs / 24) for c in counts.values())
    assert np.array_equal(curvefit.epoch_order(50, 7, 3), curvefit.epoch_order(50, 7, 3))
    assert not np.array_equal(curvefit.epoch_order(50, 7, 3), curvefit.epoch_order(50, 7, 4))
    assert not np.array_equal(curvefit.epoch_order(50, 7, 3), curvefit.epoch_order(50, 8, 3))


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


def test_cli_help_says_what_each_experiment_is(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in [*EXPERIMENTS, "all"]:
        assert f"{name}: " in text, name


def test_cli_writes_report(tmp_path, capsys):
    assert cli.main(["contours", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text().count("![") >= 2
    printed = capsys.readouterr().out
    assert "report:" in printed and "q] Line fit" in printed and "yes  ] SGD (lr 0.95)" in printed
    assert "q: tested with --quick's shorter budget, not the chapter's: tested to 600" in printed
    assert (tmp_path / "claims.json").is_file()
    # a rerun into the same folder leaves nothing of the earlier one beside its report
    (tmp_path / "bn_runs" / "old").mkdir(parents=True)
    (tmp_path / "init_grid.png").write_bytes(b"an earlier figure")
    (tmp_path / "mine.txt").write_text("the user's")
    assert cli.main(["contours", "--quick", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "bn_runs").exists() and not (tmp_path / "init_grid.png").exists()
    assert (tmp_path / "mine.txt").exists() and (tmp_path / "report.md").exists()
    for device in ("tpu", "strict", "torch"):  # (strict, torch: the tests' backends only)
        assert cli.main(["init", "--device", device, "--out", str(tmp_path)]) == 2
        assert "--device must be cpu or gpu" in capsys.readouterr().err
    claims = json.loads((tmp_path / "claims.json").read_text())["claims"]
    for claim in claims:  # enough to check each verdict from the file alone
        flags = [h for h in claim["held_per_seed"] if h is not None]
        assert (claim["held"], claim["tested"]) == (sum(flags), len(flags))


def test_cli_lists_each_unsettled_claim_with_the_seeds_to_settle_it(tmp_path, capsys,
                                                                     monkeypatch):
    section = Section("t")
    section.claim("a", "A holds", "tb", spread([1]), [True] * 7 + [False], "r")
    section.claim("b", "B holds", "tb", spread([1]), [True] * 6 + [False] * 2, "r")
    section.claim("c", "C holds", "tb", spread([1]), [True] * 8, "r")
    monkeypatch.setattr(cli, "run_sections", lambda ctx, names: [section])
    assert cli.main(["contours", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[   yes? ] A holds" in out and "[   yes  ] C holds" in out
    assert "A holds: about 20 tested seeds would settle it at this rate" in out
    assert "B holds: its rate is on the band's edge" in out and "C holds:" not in out


def test_an_interrupted_rerun_leaves_the_earlier_report_whole(tmp_path, capsys, monkeypatch):
    def sections_writing(fail=None):
        def run(ctx, names):
            (ctx.out / "contours_bowl.png").write_bytes(b"figure of a run that " + (
                b"failed" if fail else b"finished"))
            (ctx.out / "bn_runs" / "table_bn_seed0").mkdir(parents=True)
            (ctx.out / "bn_runs" / "table_bn_seed0" / "config.json").write_text(
                json.dumps({"out": str(ctx.out / "bn_runs" / "table_bn_seed0")}))
            if fail:
                raise fail
            section = Section("t")
            section.claim("a", "A holds", "tb", spread([1]), [True] * 3, "r")
            return [section]
        return run

    monkeypatch.setattr(cli, "run_sections", sections_writing())
    assert cli.main(["contours", "--quick", "--out", str(tmp_path)]) == 0
    earlier = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert {"report.md", "claims.json", "contours_bowl.png"} <= set(earlier)
    run_config = json.loads((tmp_path / "bn_runs" / "table_bn_seed0" / "config.json").read_text())
    assert run_config["out"] == str(tmp_path / "bn_runs" / "table_bn_seed0")  # where it lies
    for fail, code in ((KeyboardInterrupt(), 130), (cli.datasets.DataError("no data"), 2)):
        monkeypatch.setattr(cli, "run_sections", sections_writing(fail))
        assert cli.main(["contours", "--quick", "--out", str(tmp_path)]) == code
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == earlier
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*earlier, "bn_runs"])
    assert "interrupted; " in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "--seeds must be at least 1, got 0"),
    (["--seed", "-1"], "--seed must be 0 or more, got -1"),
    (["--seed", str(2**64)], "--seed must be below 2**63"),
    (["--out", "FILE"], "is a file; give a folder"),
    (["--out", " "], "--out is empty"),
    (["--data-dir", "FILE"], "mnist-sample is embedded in nnopt and reads no folder"),
])
def test_cli_rejects_bad_input_in_one_line(tmp_path, capsys, args, message):
    (tmp_path / "FILE").write_text("x")
    args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]
    assert cli.main(["contours", "--quick", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_engine_parts_put_back_in_order():
    from pathlib import Path

    from nnopt.experiments import optimizers
    ctx = Context(out=Path("."), quick=True, seeds=1)
    whole = optimizers.train(ctx.seed_list, 100)[1:]
    parts = [optimizers.train(ctx.seed_list, 100, optimizers.RUNS[p::3])[1:] for p in range(3)]
    for merged, want in zip(optimizers._merge(parts), whole):
        assert np.array_equal(merged, want, equal_nan=True)


def test_workers_fork_only_before_numba_starts_its_threads(monkeypatch):
    import sys

    from numba.np.ufunc import parallel

    from nnopt.experiments import _start_method
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(parallel, "_is_initialized", False)
    assert _start_method().get_start_method() == "fork"
    monkeypatch.setattr(parallel, "_is_initialized", True)
    assert _start_method().get_start_method() == "spawn"
    monkeypatch.setattr(parallel, "_is_initialized", False)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert _start_method().get_start_method() == "spawn"
