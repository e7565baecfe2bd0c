"""Initializer statistics within sampling error, and torch.nn.init's formulas."""
import math

import numpy as np
import pytest

from nnopt import init

N_IN, N_OUT = 300, 200  # 60,000 draws: the std of a sample std is ~0.3% of it


def sample_std_ok(w, std):
    n = w.size
    assert abs(w.mean()) < 5 * std / math.sqrt(n)
    assert abs(w.std() / std - 1) < 5 / math.sqrt(2 * n)


@pytest.mark.parametrize("name, expected_std", [
    ("normal", 1.0),
    ("xavier_normal", math.sqrt(2 / (N_IN + N_OUT))),
    ("msra", math.sqrt(2 / N_IN)),
    ("kaiming_normal", math.sqrt(2 / N_IN)),
])
def test_normal_family_std(rng, name, expected_std):
    sample_std_ok(init.get_initializer(name)((N_IN, N_OUT), rng), expected_std)


@pytest.mark.parametrize("name, bound", [
    ("xavier", math.sqrt(6 / (N_IN + N_OUT))),
    ("kaiming_uniform", math.sqrt(2) * math.sqrt(3 / N_IN)),
])
def test_uniform_family_bounds_and_std(rng, name, bound):
    w = init.get_initializer(name)((N_IN, N_OUT), rng)
    assert w.min() >= -bound and w.max() <= bound
    assert w.max() > 0.99 * bound and w.min() < -0.99 * bound
    sample_std_ok(w, bound / math.sqrt(3))


def test_modes_gain_and_options(rng):
    fan_out = init.kaiming_normal((N_IN, N_OUT), rng, mode="fan_out")
    sample_std_ok(fan_out, math.sqrt(2 / N_OUT))
    tanh = init.xavier_uniform((N_IN, N_OUT), rng, gain=init.calculate_gain("tanh"))
    sample_std_ok(tanh, 5 / 3 * math.sqrt(6 / (N_IN + N_OUT)) / math.sqrt(3))
    small = init.get_initializer("normal", std=0.01)((N_IN, N_OUT), rng)
    sample_std_ok(small, 0.01)
    assert not np.any(init.zeros((3, 4)))
    assert init.calculate_gain("leaky_relu", 0.2) == pytest.approx(math.sqrt(2 / 1.04))


def test_layout_is_n_in_by_n_out_like_transposed_torch(rng):
    torch = pytest.importorskip("torch")
    t = torch.empty(N_OUT, N_IN)  # torch's (out, in)
    assert torch.nn.init._calculate_fan_in_and_fan_out(t) == init.fans((N_IN, N_OUT))


def test_bad_names_and_shapes(rng):
    with pytest.raises(ValueError, match="did you mean 'xavier'"):
        init.get_initializer("xavir")
    with pytest.raises(ValueError, match="unknown mode"):
        init.kaiming_normal((3, 3), rng, mode="fan_avg")
    with pytest.raises(ValueError, match="every size must be >= 1"):
        init.xavier_uniform((0, 3), rng)
    with pytest.raises(ValueError, match="std must be"):
        init.normal((2, 2), rng, std=-1)


def test_kaiming_leaky_relu_takes_torchs_default_slope(rng):
    """torch.nn.init.kaiming_*_(nonlinearity="leaky_relu") has a = 0 (gain sqrt(2));
    calculate_gain("leaky_relu") alone assumes 0.01, in torch as here."""
    for name in ("kaiming_normal", "kaiming_uniform"):
        ours = getattr(init, name)((4000, 300), np.random.default_rng(0), nonlinearity="leaky_relu")
        relu = getattr(init, name)((4000, 300), np.random.default_rng(0), nonlinearity="relu")
        np.testing.assert_array_equal(ours, relu)
        sloped = getattr(init, name)((4000, 300), np.random.default_rng(0),
                                     nonlinearity="leaky_relu", a=0.2)
        assert np.std(sloped) / np.std(relu) == pytest.approx(math.sqrt(1 / 1.04), rel=1e-9)
    assert init.calculate_gain("leaky_relu") == pytest.approx(math.sqrt(2 / (1 + 0.01 ** 2)))
    torch = pytest.importorskip("torch")
    assert init.calculate_gain("leaky_relu") == pytest.approx(
        torch.nn.init.calculate_gain("leaky_relu"))
    theirs = torch.empty(300, 4000)
    torch.manual_seed(0)
    torch.nn.init.kaiming_uniform_(theirs, nonlinearity="leaky_relu")
    bound = math.sqrt(2) * math.sqrt(3 / 4000)  # (torch draws in float32: a few ulps above)
    assert 0.99 * bound < float(theirs.abs().max()) <= bound * (1 + 1e-6)
