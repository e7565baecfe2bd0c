"""Each optimizer and schedule against torch.optim (the oracle) for 100 steps on random
problems; skipped where torch is not installed (tests/test_optim.py needs no torch)."""
import numpy as np
import pytest

import nnopt
from nnopt import optim
from nnopt.backend import to_numpy
from nnopt.params import FlatParameters
from tests.helpers import rel_err
from tests.test_optim import (gradient, problem, run_nnopt, step_schedule,
                              textbook_momentum_under_step_schedule)

torch = pytest.importorskip("torch", reason="torch is the oracle for these optimizer tests")


def run_torch(rng_problem, make, steps=100, scheduler=None):
    params = [torch.tensor(start.copy(), dtype=torch.float64, requires_grad=True)
              for start, _, _ in rng_problem]
    opt = make(params)
    sched = scheduler(opt) if scheduler else None
    for _ in range(steps):
        for p, (_, target, scale) in zip(params, rng_problem):
            p.grad = torch.from_numpy(gradient(p.detach().numpy(), target, scale))
        opt.step()
        if sched:
            sched.step()
    return np.concatenate([p.detach().numpy() for p in params])


TORCH_MATCHES = {
    "sgd": (lambda ps: optim.SGD(ps, lr=0.05), lambda ps: torch.optim.SGD(ps, lr=0.05)),
    "momentum-textbook": (lambda ps: optim.Momentum(ps, lr=0.02, momentum=0.9),
                          lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.9)),
    "momentum-torch": (lambda ps: optim.Momentum(ps, lr=0.02, momentum=0.8, buffer="torch"),
                       lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.8)),
    "nag-textbook": (lambda ps: optim.NAG(ps, lr=0.02, momentum=0.9),
                     lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.9, nesterov=True)),
    "nag-torch": (lambda ps: optim.NAG(ps, lr=0.03, momentum=0.7, buffer="torch"),
                  lambda ps: torch.optim.SGD(ps, lr=0.03, momentum=0.7, nesterov=True)),
    "adagrad": (lambda ps: optim.AdaGrad(ps, lr=0.3),
                lambda ps: torch.optim.Adagrad(ps, lr=0.3, eps=1e-6)),
    "adadelta-textbook": (lambda ps: optim.AdaDelta(ps, lr=0.01),  # lr ignored
                          lambda ps: torch.optim.Adadelta(ps, lr=1.0, rho=0.9, eps=1e-5)),
    "adadelta-torch": (lambda ps: optim.AdaDelta(ps, lr=0.5, rho=0.95, eps=1e-6,
                                                 lr_scales_step=True),
                       lambda ps: torch.optim.Adadelta(ps, lr=0.5, rho=0.95, eps=1e-6)),
    "rmsprop-torch": (lambda ps: optim.RMSProp(ps, lr=0.01, alpha=0.99, eps=1e-8,
                                               eps_inside_root=False),
                      lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.99, eps=1e-8)),
    "adam": (lambda ps: optim.Adam(ps, lr=0.05, betas=(0.8, 0.99), eps=1e-7),
             lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.99), eps=1e-7)),
}


@pytest.mark.parametrize("name", sorted(TORCH_MATCHES))
def test_matches_torch_optim(xp, rng, name):
    ours, theirs = TORCH_MATCHES[name]
    prob = problem(rng)
    got, _, _ = run_nnopt(xp, prob, ours)
    want = run_torch(prob, theirs)
    assert rel_err(got, want) < 1e-10
    assert rel_err(got, np.concatenate([s for s, _, _ in prob])) > 1e-3  # it moved


def test_momentum_torch_form_matches_torch_under_a_schedule(xp, rng):
    prob = problem(rng)
    torch_form, _, _ = run_nnopt(xp, prob, lambda ps: optim.Momentum(ps, lr=0.05, buffer="torch"),
                                 scheduler=step_schedule)
    want = run_torch(prob, lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
                     scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 10, 0.5))
    assert rel_err(torch_form, want) < 1e-10
    assert rel_err(torch_form, textbook_momentum_under_step_schedule(prob)) > 1e-6


@pytest.mark.parametrize("ours, theirs", [
    (lambda o: optim.StepLR(o, 3, 0.5), lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5)),
    (lambda o: optim.ExponentialLR(o, 0.9),
     lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9)),
    (lambda o: optim.CosineAnnealingLR(o, 10, 0.01),
     lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 10, 0.01)),
])
def test_schedules_match_torch(ours, theirs):
    storage = FlatParameters.from_arrays(nnopt.get_namespace("cpu"), w=[1.0])
    mine = ours(optim.SGD(storage, lr=0.1))
    t_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    reference = theirs(t_opt)
    for _ in range(15):
        t_opt.step()
        reference.step()
        mine.step()
        assert mine.get_last_lr()[0] == pytest.approx(reference.get_last_lr()[0], rel=1e-9, abs=1e-15)


WD = 0.05
DECAY_MATCHES = {  # weight_decay (coupled L2) on every optimizer, AdamW decoupled
    "sgd": (lambda ps: optim.SGD(ps, lr=0.05, weight_decay=WD),
            lambda ps: torch.optim.SGD(ps, lr=0.05, weight_decay=WD)),
    "sgd-torch-spelled-momentum": (lambda ps: optim.SGD(ps, 0.02, momentum=0.9, weight_decay=WD),
                                   lambda ps: torch.optim.SGD(ps, 0.02, momentum=0.9, weight_decay=WD)),
    "sgd-torch-spelled-nesterov": (
        lambda ps: optim.SGD(ps, 0.02, momentum=0.8, nesterov=True, weight_decay=WD),
        lambda ps: torch.optim.SGD(ps, 0.02, momentum=0.8, nesterov=True, weight_decay=WD)),
    "momentum": (lambda ps: optim.Momentum(ps, lr=0.02, weight_decay=WD),
                 lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.9, weight_decay=WD)),
    "nag": (lambda ps: optim.NAG(ps, lr=0.02, buffer="torch", weight_decay=WD),
            lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.9, nesterov=True, weight_decay=WD)),
    "adagrad": (lambda ps: optim.AdaGrad(ps, lr=0.3, weight_decay=WD),
                lambda ps: torch.optim.Adagrad(ps, lr=0.3, eps=1e-6, weight_decay=WD)),
    "adadelta": (lambda ps: optim.AdaDelta(ps, lr=0.5, eps=1e-6, lr_scales_step=True, weight_decay=WD),
                 lambda ps: torch.optim.Adadelta(ps, lr=0.5, rho=0.9, eps=1e-6, weight_decay=WD)),
    "rmsprop": (lambda ps: optim.RMSProp(ps, lr=0.01, alpha=0.99, eps=1e-8, eps_inside_root=False,
                                         weight_decay=WD),
                lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.99, eps=1e-8, weight_decay=WD)),
    "adam": (lambda ps: optim.Adam(ps, lr=0.05, weight_decay=WD),
             lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=WD)),
    "adamw": (lambda ps: optim.AdamW(ps, lr=0.05, weight_decay=0.1),
              lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1)),
    "adamw-defaults": (lambda ps: optim.AdamW(ps), lambda ps: torch.optim.AdamW(ps)),
}


@pytest.mark.parametrize("name", sorted(DECAY_MATCHES))
def test_weight_decay_matches_torch(xp, rng, name):
    ours, theirs = DECAY_MATCHES[name]
    prob = problem(rng)
    got, _, _ = run_nnopt(xp, prob, ours)
    assert rel_err(got, run_torch(prob, theirs)) < 1e-10


def test_weight_decay_changes_the_path_and_leaves_the_gradient(xp, rng):
    prob = problem(rng)
    plain, _, _ = run_nnopt(xp, prob, lambda ps: optim.Adam(ps, lr=0.05))
    decayed, _, _ = run_nnopt(xp, prob, lambda ps: optim.Adam(ps, lr=0.05, weight_decay=0.1))
    assert rel_err(plain, decayed) > 1e-4
    storage = FlatParameters.from_arrays(xp, "float64", w=[1.0, -2.0])
    storage.grad[...] = 0.5
    optim.SGD(storage, lr=0.1, weight_decay=0.1).step()
    np.testing.assert_allclose(to_numpy(storage.grad), [0.5, 0.5])  # the user's gradient stays


def lr_trace(make_ours, make_theirs, groups=(0.05, 0.01), epochs=15, metrics=None):
    storage = FlatParameters.from_arrays(nnopt.get_namespace("cpu"), a=[1.0], b=[1.0])
    mine = make_ours(optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(storage.params, groups)]))
    t_opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in groups])
    theirs = make_theirs(t_opt)
    for epoch in range(epochs):
        t_opt.step()
        metric = None if metrics is None else metrics[epoch]
        theirs.step(*([] if metric is None else [metric]))
        mine.step(metric)
        assert mine.get_last_lr() == pytest.approx(theirs.get_last_lr(), rel=1e-9, abs=1e-15)


def test_schedules_with_several_groups_match_torch():
    lr_trace(lambda o: optim.CosineAnnealingLR(o, 10, 1e-3),
             lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 10, 1e-3))
    lr_trace(lambda o: optim.MultiStepLR(o, [3, 7, 8], 0.3),
             lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [3, 7, 8], 0.3))
    losses = [1.0, 0.9, 0.9, 0.95, 0.91, 0.9, 0.85, 0.86, 0.86, 0.87, 0.9, 0.7, 0.7, 0.71, 0.72]
    lr_trace(lambda o: optim.ReduceLROnPlateau(o, factor=0.5, patience=2, min_lr=0.004),
             lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=2,
                                                                  min_lr=0.004),
             metrics=losses)


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("threshold_mode", ["rel", "abs"])
@pytest.mark.parametrize("cooldown", [0, 2])
def test_plateau_modes_and_cooldown_match_torch(rng, mode, threshold_mode, cooldown):
    # a noisy walk with flat stretches: improvements above and below the thresholds
    steps = rng.choice([0.0, 0.0, 0.005, 0.05, -0.05, -0.2], size=40)
    metrics = list(np.cumsum(steps) + 2.0)
    options = dict(factor=0.5, patience=1, threshold=0.01, mode=mode,
                   threshold_mode=threshold_mode, cooldown=cooldown)
    lr_trace(lambda o: optim.ReduceLROnPlateau(o, **options),
             lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, **options),
             epochs=len(metrics), metrics=metrics)


def test_plateau_cooldown_survives_a_resume():
    """Saved mid-cooldown and loaded, the scheduler cuts when the uninterrupted one does."""
    import json

    def run(resume_at):
        storage = FlatParameters.from_arrays(nnopt.get_namespace("cpu"), a=[1.0])
        opt = optim.SGD(storage.params, lr=1.0)
        make = lambda: optim.ReduceLROnPlateau(opt, factor=0.5, patience=0, cooldown=3)
        plateau, lrs = make(), []
        for epoch in range(10):
            if epoch == resume_at:
                state = json.loads(json.dumps(plateau.state_dict(), allow_nan=False))
                plateau = make()
                plateau.load_state_dict(state)
            plateau.step(1.0)
            lrs.append(opt.param_groups[0]["lr"])
        return lrs

    straight = run(None)
    assert straight == [1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.125]
    assert all(run(at) == straight for at in range(1, 10))


def test_plateau_rejects_unknown_modes():
    storage = FlatParameters.from_arrays(nnopt.get_namespace("cpu"), a=[1.0])
    opt = optim.SGD(storage.params, lr=1.0)
    with pytest.raises(nnopt.errors.InputError, match="unknown ReduceLROnPlateau mode 'mn'.*'min'"):
        optim.ReduceLROnPlateau(opt, mode="mn")
    with pytest.raises(nnopt.errors.InputError, match="threshold_mode 'relative'.*choose one of: abs, rel"):
        optim.ReduceLROnPlateau(opt, threshold_mode="relative")
    with pytest.raises(nnopt.errors.InputError, match="cooldown"):
        optim.ReduceLROnPlateau(opt, cooldown=-1)


def test_plateau_stops_at_cuts_below_eps_and_counts_nan_as_no_improvement_as_torch():
    # from lr 1e-7, halving: torch stops once a cut would be 1e-8 or less (its eps)
    flat = [1.0] * 80
    lr_trace(lambda o: optim.ReduceLROnPlateau(o, factor=0.5, patience=0),
             lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
             groups=(1e-7, 4e-8), epochs=80, metrics=flat)
    lr_trace(lambda o: optim.ReduceLROnPlateau(o, factor=0.5, patience=0, eps=0.0),
             lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0,
                                                                  eps=0.0),
             groups=(1e-7, 4e-8), epochs=80, metrics=flat)
    nans = [1.0, float("nan"), float("nan"), float("inf"), 0.5, float("nan"), float("nan")]
    lr_trace(lambda o: optim.ReduceLROnPlateau(o, factor=0.5, patience=1),
             lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=1),
             epochs=len(nans), metrics=nans)


@pytest.mark.parametrize("ours, theirs", [
    (lambda o: optim.StepLR(o, 3, 0.5), lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5)),
    (lambda o: optim.MultiStepLR(o, [2, 5, 9], 0.3),
     lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [2, 5, 9], 0.3)),
    (lambda o: optim.ExponentialLR(o, 0.8), lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.8))])
@pytest.mark.parametrize("join_epoch", [0, 1, 4])
def test_a_group_added_mid_run_is_scheduled_as_torch_does(rng, ours, theirs, join_epoch):
    """add_param_group after the scheduler was built: the new group goes on from the rate it
    was added with (before, nnopt left it unscheduled while torch scaled it)."""
    storage = FlatParameters.from_arrays(nnopt.get_namespace("cpu"), a=[1.0], b=[1.0])
    mine = optim.SGD([storage.params[0]], lr=0.1)
    t_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    mine_sched, their_sched = ours(mine), theirs(t_opt)
    added_lr = float(rng.uniform(0.01, 1.0))
    for epoch in range(12):
        if epoch == join_epoch:
            mine.add_param_group({"params": [storage.params[1]], "lr": added_lr})
            t_opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "lr": added_lr})
        t_opt.step()
        their_sched.step()
        mine_sched.step()
        assert mine_sched.get_last_lr() == pytest.approx(their_sched.get_last_lr(), rel=1e-12)
    # ... and a state saved now resumes into a scheduler built on both groups
    again = ours(mine)
    again.load_state_dict(mine_sched.state_dict())
    for _ in range(3):
        t_opt.step()
        their_sched.step()
        again.step()
        assert again.get_last_lr() == pytest.approx(their_sched.get_last_lr(), rel=1e-12)


def test_plateau_state_keeps_a_best_of_minus_infinity():
    """A -inf metric is the best there can be: saved and loaded (strict JSON), it stays -inf,
    so the resumed run cuts as the uninterrupted one and torch's do."""
    import json

    def run(resume):
        storage = FlatParameters.from_arrays(nnopt.get_namespace("cpu"), a=[1.0])
        opt = optim.SGD(storage.params, lr=0.1)
        plateau = optim.ReduceLROnPlateau(opt, patience=0)
        plateau.step(float("-inf"))
        if resume:
            state = json.loads(json.dumps(plateau.state_dict(), allow_nan=False))
            plateau = optim.ReduceLROnPlateau(opt, patience=0)
            plateau.load_state_dict(state)
        plateau.step(5.0)
        return opt.param_groups[0]["lr"]

    t_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(t_opt, patience=0)
    theirs.step(float("-inf"))
    theirs.step(5.0)
    assert run(False) == run(True) == pytest.approx(theirs.get_last_lr()[0], rel=1e-15)
