"""The optimizers without torch: written-out references, state, param groups, errors,
schedules. tests/test_optim_torch.py holds them to torch.optim."""
import numpy as np
import pytest

import nnopt
from nnopt import optim
from nnopt.params import FlatParameters, Parameter
from tests.helpers import dev, host, rel_err

SIZES = (37, 5, 1)


def gradient(theta, target, scale):
    """A random, non-quadratic problem: the gradient at theta (host, float64)."""
    return scale * (theta - target) + 0.3 * np.cos(3 * theta)


def problem(rng):
    return [(rng.normal(size=n), rng.normal(size=n), rng.uniform(0.1, 3, n)) for n in SIZES]


def run_nnopt(xp, rng_problem, make, steps=100, scheduler=None):
    params = [Parameter(start.copy(), f"p{i}") for i, (start, _, _) in enumerate(rng_problem)]
    storage = FlatParameters(params, xp, "float64")
    opt = make(params)
    sched = scheduler(opt) if scheduler else None
    for _ in range(steps):
        for p, (_, target, scale) in zip(params, rng_problem):
            p.grad[...] = dev(xp, gradient(host(p.data), target, scale))
        opt.step()
        if sched:
            sched.step()
    return np.concatenate([host(p.data) for p in params]), opt, storage


def rmsprop_textbook(prob, lr, alpha, eps, steps=100):
    theta = np.concatenate([s for s, _, _ in prob])
    target = np.concatenate([t for _, t, _ in prob])
    scale = np.concatenate([c for _, _, c in prob])
    r = np.zeros_like(theta)
    for _ in range(steps):
        g = gradient(theta, target, scale)
        r = alpha * r + (1 - alpha) * g ** 2
        theta = theta - lr * g / np.sqrt(r + eps)
    return theta


def test_rmsprop_textbook_eps_inside_root(xp, rng):
    prob = problem(rng)
    got, _, _ = run_nnopt(xp, prob, lambda ps: optim.RMSProp(ps, lr=0.01))
    assert rel_err(got, rmsprop_textbook(prob, 0.01, 0.9, 1e-6)) < 1e-10


def textbook_momentum_under_step_schedule(prob):
    """Textbook momentum with lr 0.05 halved every 10 steps, written out (host, float64)."""
    theta = np.concatenate([s for s, _, _ in prob])
    target = np.concatenate([t for _, t, _ in prob])
    scale = np.concatenate([c for _, _, c in prob])
    v, lr = np.zeros_like(theta), 0.05
    for step in range(100):
        v = 0.9 * v - lr * gradient(theta, target, scale)
        theta = theta + v
        lr = 0.05 * 0.5 ** ((step + 1) // 10)
    return theta


def step_schedule(opt):
    return optim.StepLR(opt, step_size=10, gamma=0.5)


def test_momentum_forms_differ_under_a_schedule_as_documented(xp, rng):
    prob = problem(rng)
    textbook, _, _ = run_nnopt(xp, prob, lambda ps: optim.Momentum(ps, lr=0.05),
                               scheduler=step_schedule)
    assert rel_err(textbook, textbook_momentum_under_step_schedule(prob)) < 1e-10
    torch_form, _, _ = run_nnopt(xp, prob, lambda ps: optim.Momentum(ps, lr=0.05, buffer="torch"),
                                 scheduler=step_schedule)
    assert rel_err(torch_form, textbook) > 1e-6


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_state_dict_round_trip_is_exact(xp, rng, name):
    prob = problem(rng)
    make = lambda ps: optim.create(name, ps, lr=0.01)  # noqa: E731
    straight, _, _ = run_nnopt(xp, prob, make, steps=20)
    half, opt, _ = run_nnopt(xp, prob, make, steps=10)
    saved = opt.state_dict()
    resumed_prob = []
    offset = 0
    for start, target, scale in prob:
        resumed_prob.append((half[offset:offset + start.size], target, scale))
        offset += start.size
    params = [Parameter(s.copy(), f"p{i}") for i, (s, _, _) in enumerate(resumed_prob)]
    FlatParameters(params, xp, "float64")
    fresh = optim.create(name, params, lr=0.5)
    fresh.load_state_dict(saved)
    for _ in range(10):
        for p, (_, target, scale) in zip(params, prob):
            p.grad[...] = dev(xp, gradient(host(p.data), target, scale))
        fresh.step()
    np.testing.assert_array_equal(np.concatenate([host(p.data) for p in params]), straight)
    assert fresh.param_groups[0]["lr"] == 0.01


def test_param_groups_have_their_own_hyper_parameters(xp, rng):
    model = nnopt.mlp([3, 4, 2], seed=0, device=xp, dtype="float64")
    first, rest = model.parameters()[:2], model.parameters()[2:]
    opt = optim.SGD([{"params": first, "lr": 0.0}, {"params": rest}], lr=0.1)
    before = host(model.flat.data)
    model.flat.grad[...] = 1.0
    opt.step()
    after = host(model.flat.data)
    n_first = sum(p.size for p in first)
    np.testing.assert_array_equal(after[:n_first], before[:n_first])
    np.testing.assert_allclose(after[n_first:], before[n_first:] - 0.1, rtol=1e-12)


def test_non_contiguous_group_updates_each_parameter(xp, rng):
    prob = problem(rng)
    params = [Parameter(s.copy(), f"p{i}") for i, (s, _, _) in enumerate(prob)]
    FlatParameters(params, xp, "float64")
    opt = optim.Adam([params[2], params[0]], lr=0.1)  # out of storage order: per-parameter path
    for p in params:
        p.grad[...] = 1.0
    opt.step()
    np.testing.assert_allclose(host(params[0].data), prob[0][0] - 0.1, rtol=1e-6)
    np.testing.assert_array_equal(host(params[1].data), prob[1][0])


def test_nonfinite_gradients_raise_or_skip(xp):
    storage = FlatParameters.from_arrays(xp, w=[1.0, 2.0])
    storage.grad[...] = dev(xp, np.array([np.nan, 1.0]))
    with pytest.raises(FloatingPointError, match=r"non-finite gradient \(NaN or inf\) in w;"):
        optim.SGD(storage, nonfinite="raise").step()
    skipper = optim.Adam(storage, nonfinite="skip")
    assert skipper.step() is False and skipper.skipped_steps == 1
    np.testing.assert_array_equal(host(storage.data), [1.0, 2.0])
    assert not optim.SGD(storage).grads_finite()
    # the count goes on in a resumed run (its summary reports it), the step count with it
    skipper.step()
    resumed = optim.Adam(storage, nonfinite="skip")
    resumed.load_state_dict(skipper.state_dict())
    assert resumed.skipped_steps == 2 and resumed.state[0]["step"] == 0


@pytest.mark.parametrize("bad, match", [
    (dict(lr=-0.1), "lr must be in"), (dict(lr=float("nan")), "lr must be finite"),
    (dict(lr="fast"), "lr must be a number"), (dict(betas=(0.9, 1.0)), "beta2 must be in"),
    (dict(betas=(-0.1, 0.9)), "beta1 must be in"), (dict(eps=0), "eps must be in"),
    (dict(momentum=0.9), "no hyper-parameter 'momentum'"),
])
def test_bad_hyper_parameters(bad, match):
    storage = FlatParameters.from_arrays(nnopt.get_namespace("cpu"), w=[1.0])
    with pytest.raises((ValueError, TypeError), match=match):
        optim.Adam(storage, **bad)


def test_unknown_names_and_foreign_state_dicts():
    storage = FlatParameters.from_arrays(nnopt.get_namespace("cpu"), w=[1.0, 2.0])
    with pytest.raises(ValueError, match="did you mean 'adam'"):
        optim.create("adamm", storage)
    with pytest.raises(ValueError, match="belongs to optimizer 'AdaGrad', not Adam"):
        optim.Adam(storage).load_state_dict(optim.AdaGrad(storage).state_dict())
    other = FlatParameters.from_arrays(nnopt.get_namespace("cpu"), w=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="another model's optimizer"):
        optim.Adam(storage).load_state_dict(optim.Adam(other).state_dict())
    with pytest.raises(ValueError, match="buffer form"):
        optim.Momentum(storage, buffer="keras")
    with pytest.raises(TypeError, match="not a parameter bound to flat storage"):
        optim.SGD([Parameter(np.ones(2))])


def test_schedulers_set_every_param_group(xp):
    storage = FlatParameters.from_arrays(xp, "float64", a=[1.0], b=[1.0], c=[1.0])
    a, b, c = storage.params
    opt = optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.02},
                     {"params": [c], "lr": 0.0}])
    step = optim.StepLR(opt, step_size=2, gamma=0.5)
    for epoch in range(1, 6):
        step.step()
        factor = 0.5 ** (epoch // 2)
        assert step.get_last_lr() == pytest.approx([0.1 * factor, 0.02 * factor, 0.0], rel=1e-15)
    storage.grad[...] = 1.0
    before = host(storage.data)
    opt.step()  # each group moves by its own scheduled lr
    np.testing.assert_allclose(before - host(storage.data), [0.025, 0.005, 0.0], rtol=1e-12)
    two_groups = optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.02}])
    cosine = optim.CosineAnnealingLR(two_groups, T_max=4, eta_min=0.01)
    for _ in range(4):
        cosine.step()
    assert cosine.get_last_lr() == pytest.approx([0.01, 0.01], rel=1e-12)  # eta_min is absolute
    with pytest.raises(ValueError, match="2 schedules for 3 parameter groups"):
        optim.LRScheduler(opt, [optim.step_decay(1), optim.step_decay(1)])


def test_a_group_added_where_no_base_rate_fits_is_a_clear_error():
    storage = FlatParameters.from_arrays(nnopt.get_namespace("cpu"), a=[1.0], b=[1.0], c=[1.0])
    a, b, c = storage.params
    per_group = optim.SGD([a], lr=0.1)
    scheduler = optim.LRScheduler(per_group, [optim.step_decay(1)])
    per_group.add_param_group({"params": [b], "lr": 0.1})
    with pytest.raises(ValueError, match="one schedule per group.*after add_param_group"):
        scheduler.step()
    # gamma 0 after the first epoch: every base rate maps to 0, none to 0.5
    dead = optim.SGD([a], lr=0.1)
    scheduler = optim.StepLR(dead, step_size=1, gamma=0.0)
    scheduler.step()
    dead.add_param_group({"params": [c], "lr": 0.5})
    with pytest.raises(ValueError, match="added at epoch 1 with lr 0.5 cannot be scheduled"):
        scheduler.step()
    # a state with more groups than the optimizer has
    two = optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.2}])
    state = optim.StepLR(two, 2).state_dict()
    one = optim.StepLR(optim.SGD([c], lr=0.1), 2)
    one.load_state_dict(state)
    with pytest.raises(ValueError, match="base rates for 2 parameter groups, but its optimizer has 1"):
        one.step()
