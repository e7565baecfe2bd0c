"""The curve-fitting runs of sections 15.2/15.3, all configurations at once.

Every run trains the same 1 -> 3 (sigmoid) -> 1 network (MSE/2, batch 10, 100 iterations
per epoch) for up to 10,000 epochs: in Python, layer by layer, that is minutes per run.
Here one numba loop trains the configurations of each seed (seeds and groups of
configurations spread over the cores) and records the test loss; the update rules are the shared ``nnopt.fast.cpu`` rules, and the
tests hold the whole loop to nnopt's reference layers and optimizers
(:func:`reference_run`).
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from ..fast.cpu import (adadelta_rule, adagrad_rule, adam_kernel_scalars, adam_rule,
                        momentum_rule, momentum_torch_rule, nag_rule, nag_torch_rule,
                        rmsprop_rule, rmsprop_torch_rule, sgd_rule)

#: the rule variants the engine runs; a configuration's code is its rule's index here
RULE_CODES = ("sgd", "momentum", "momentum_torch", "nag", "nag_torch", "adagrad", "adadelta",
              "rmsprop", "rmsprop_torch", "adam")
ADAM = RULE_CODES.index("adam")  # the one rule whose scalars depend on the step count
SCALAR_SLOTS = 8  # room for the longest kernel_scalars tuple (Adam's 7)
N_PARAMS = 10  # fc1.W (1x3), fc1.b (3), fc2.W (3x1), fc2.b (1): nnopt.mlp([1, 3, 1])'s flat order


@numba.njit(cache=True)
def _splitmix(state):
    state = (state + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    z = state
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    return state, z ^ (z >> np.uint64(31))


@numba.njit(cache=True)
def fill_epoch_order(order, seed, epoch):
    """The shuffle of one epoch, into ``order`` (n entries): Fisher-Yates driven by
    splitmix64(seed, epoch)."""
    n = order.shape[0]
    for i in range(n):
        order[i] = i
    state = np.uint64(seed) * np.uint64(1000003) + np.uint64(epoch)
    for i in range(n - 1, 0, -1):
        state, r = _splitmix(state)
        j = np.int64(r % np.uint64(i + 1))
        order[i], order[j] = order[j], order[i]


@numba.njit(cache=True)
def epoch_order(n, seed, epoch):
    """The shuffle of one epoch as a new array (see :func:`fill_epoch_order`)."""
    order = np.empty(n, dtype=np.int64)
    fill_epoch_order(order, seed, epoch)
    return order


@numba.njit(cache=True, error_model="numpy")
def _gradient(p, x, y, order, first, m, g):
    """MSE/2 gradient of the 1-3-1 sigmoid net over the samples order[first:first + m],
    into g. The three hidden units are unrolled into scalars: an array per sample was a
    heap allocation in the innermost loop, which cost more than the arithmetic. NumPy's
    error model (here, in test_loss and in _train_all): a division never checks for a zero
    divisor (1 + exp(.) and the batch size are never 0), which took a branch per division
    (about 5% of the engine's time). Parameters and sums live in scalars: written through
    g, every sum made the next sample reload p (g and p may alias, for all LLVM knows),
    about 10% of the time; the arithmetic and its order are unchanged."""
    w0, w1, w2, b0, b1, b2, v0, v1, v2, c = (p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7],
                                             p[8], p[9])
    g0 = g1 = g2 = g3 = g4 = g5 = g6 = g7 = g8 = g9 = 0.0
    for s in range(m):
        xi, yi = x[order[first + s]], y[order[first + s]]
        a0 = 1.0 / (1.0 + math.exp(-(xi * w0 + b0)))
        a1 = 1.0 / (1.0 + math.exp(-(xi * w1 + b1)))
        a2 = 1.0 / (1.0 + math.exp(-(xi * w2 + b2)))
        d2 = (c + a0 * v0 + a1 * v1 + a2 * v2 - yi) / m
        dz0 = d2 * v0 * a0 * (1.0 - a0)
        dz1 = d2 * v1 * a1 * (1.0 - a1)
        dz2 = d2 * v2 * a2 * (1.0 - a2)
        g0 += xi * dz0
        g1 += xi * dz1
        g2 += xi * dz2
        g3 += dz0
        g4 += dz1
        g5 += dz2
        g6 += a0 * d2
        g7 += a1 * d2
        g8 += a2 * d2
        g9 += d2
    g[0], g[1], g[2], g[3], g[4] = g0, g1, g2, g3, g4
    g[5], g[6], g[7], g[8], g[9] = g5, g6, g7, g8, g9


@numba.njit(cache=True, error_model="numpy")
def test_loss(p, x, y):
    total = 0.0
    for s in range(x.shape[0]):
        out = p[9]
        for h in range(3):
            out += p[6 + h] / (1.0 + math.exp(-(x[s] * p[h] + p[3 + h])))
        total += (out - y[s]) ** 2
    return total / (2 * x.shape[0])


@numba.njit(cache=True)
def _update(code, p, g, s1, s2, hp, t):
    """One step of rule ``RULE_CODES[code]``; ``hp`` holds the optimizer's kernel_scalars
    (Adam: its step_scalar_inputs, turned into the scalars of step t here). The rule is
    chosen once per step, outside the loop over parameters, and Adam's scalars (two
    powers) are computed once per step: inside the loop they were 20 ``pow`` calls per
    step, twice the cost of the whole gradient."""
    n = p.shape[0]
    if code == 0:
        for k in range(n):
            p[k] = sgd_rule(p[k], g[k], hp[0])
    elif code == 1:
        for k in range(n):
            p[k], s1[k] = momentum_rule(p[k], g[k], s1[k], hp[0], hp[1])
    elif code == 2:
        for k in range(n):
            p[k], s1[k] = momentum_torch_rule(p[k], g[k], s1[k], hp[0], hp[1])
    elif code == 3:
        for k in range(n):
            p[k], s1[k] = nag_rule(p[k], g[k], s1[k], hp[0], hp[1])
    elif code == 4:
        for k in range(n):
            p[k], s1[k] = nag_torch_rule(p[k], g[k], s1[k], hp[0], hp[1])
    elif code == 5:
        for k in range(n):
            p[k], s1[k] = adagrad_rule(p[k], g[k], s1[k], hp[0], hp[1])
    elif code == 6:
        for k in range(n):
            p[k], s1[k], s2[k] = adadelta_rule(p[k], g[k], s1[k], s2[k], hp[0], hp[1], hp[2],
                                               hp[3])
    elif code == 7:
        for k in range(n):
            p[k], s1[k] = rmsprop_rule(p[k], g[k], s1[k], hp[0], hp[1], hp[2], hp[3])
    elif code == 8:
        for k in range(n):
            p[k], s1[k] = rmsprop_torch_rule(p[k], g[k], s1[k], hp[0], hp[1], hp[2], hp[3])
    else:
        step, b1, one_minus_b1, b2, one_minus_b2, inv_correction2, eps = adam_kernel_scalars(
            hp[0], hp[1], hp[2], hp[3], t)
        for k in range(n):
            p[k], s1[k], s2[k] = adam_rule(p[k], g[k], s1[k], s2[k], step, b1, one_minus_b1,
                                           b2, one_minus_b2, inv_correction2, eps)


@numba.njit(cache=True, parallel=True, error_model="numpy")
def _train_all(xs, ys, x_test, y_test, start, codes, hyper, max_epochs, record_every,
               check_every, target, seeds, batch, n_groups):
    """Arrays indexed [seed, configuration, ...]. One task per (seed, group of
    configurations): the configurations of a group share their seed's data and shuffle, so
    each epoch's order is drawn once for the group (a 1,000-element Fisher-Yates costs a
    tenth of an epoch of training) and the data stay in L1. Group j holds configurations
    j, j + n_groups, ...: the runs that never reach the target are spread over the groups
    and the tasks cost about the same, which keeps both cores busy to the end."""
    n_seeds, n_configs, n = codes.shape[0], codes.shape[1], xs.shape[1]
    curves = np.full((n_seeds, n_configs, max_epochs // record_every), np.nan)
    reached = np.full((n_seeds, n_configs), -1)
    final = start.copy()
    for task in prange(n_seeds * n_groups):
        seed, group = task // n_groups, task % n_groups
        x, y = xs[seed], ys[seed]
        members = np.arange(group, n_configs, n_groups)
        p = final[seed]  # a view: trained in place
        g = np.zeros(N_PARAMS)
        s1, s2 = np.zeros((n_configs, N_PARAMS)), np.zeros((n_configs, N_PARAMS))
        running = members.shape[0]
        done = np.zeros(n_configs, dtype=np.bool_)
        order = np.empty(n, dtype=np.int64)
        for epoch in range(max_epochs):
            fill_epoch_order(order, seeds[seed], epoch)
            finished = epoch + 1
            for c in members:
                if done[c]:
                    continue
                t = epoch * (n // batch)
                for it in range(n // batch):
                    _gradient(p[c], x, y, order, it * batch, batch, g)
                    t += 1
                    _update(codes[seed, c], p[c], g, s1[c], s2[c], hyper[seed, c], t)
                if finished % record_every == 0 or finished % check_every == 0:
                    loss = test_loss(p[c], x_test, y_test)
                    if finished % record_every == 0:
                        curves[seed, c, finished // record_every - 1] = loss
                    if finished % check_every == 0 and loss <= target:
                        reached[seed, c] = finished
                        done[c] = True
                        running -= 1
            if running == 0:
                break
    return curves, reached, final


def train_all(configs, data, start, max_epochs=10000, record_every=10, check_every=50,
              target=1e-3, seed=0, batch=10):
    """Train every ``(optimizer, {hyper})`` in ``configs`` from the flat parameters
    ``start`` (10 values). Returns (test-loss curves, epochs to target or -1, final params)."""
    curves, reached, final = train_seeds(configs, [data], [start], [seed], max_epochs,
                                         record_every, check_every, target, batch)
    return curves[0], reached[0], final[0]


def train_seeds(configs, data, starts, seeds, max_epochs=10000, record_every=10,
                check_every=50, target=1e-3, batch=10):
    """Every configuration once per seed, all in one batch: seed ``k`` trains on ``data[k]``
    (x, y, x_test, y_test; the test set must be the same for all) from ``starts[k]`` with
    the shuffle of ``seeds[k]``. Returns arrays indexed [seed, configuration, ...]."""
    n_seeds, n_configs = len(seeds), len(configs)
    if not (len(data) == len(starts) == n_seeds):
        raise ValueError(f"{n_seeds} seeds need as many data sets and starts, got "
                         f"{len(data)} and {len(starts)}")
    xs, ys = (np.stack([np.asarray(d[i][:, 0], dtype=np.float64) for d in data]) for i in (0, 1))
    x_test, y_test = (np.ascontiguousarray(data[0][i][:, 0], dtype=np.float64) for i in (2, 3))
    codes, hyper = zip(*(_encode(name, options) for name, options in configs))
    codes = np.tile(np.array(codes, dtype=np.int64), (n_seeds, 1))
    hyper = np.tile(np.array(hyper, dtype=np.float64), (n_seeds, 1, 1))
    start = np.ascontiguousarray(np.broadcast_to(
        np.asarray(starts, dtype=np.float64)[:, None, :], (n_seeds, n_configs, N_PARAMS)))
    return _train_all(xs, ys, x_test, y_test, start, codes, hyper, int(max_epochs),
                      int(record_every), int(check_every), float(target),
                      np.asarray(seeds, dtype=np.int64), int(batch),
                      _groups(n_seeds, n_configs))


def _groups(n_seeds, n_configs):
    """Groups per seed: enough (seed, group) tasks for every thread to get several, so one
    slow seed does not leave a core idle at the end (3 seeds on 2 cores: 6 tasks)."""
    tasks_wanted = 2 * numba.get_num_threads()
    return max(1, min(n_configs, -(-tasks_wanted // n_seeds)))


def _encode(name, options):
    """``(rule code, scalar slots)`` of one configuration, from the optimizer class itself:
    its defaults and validation (through a throw-away instance) and its kernel scalars."""
    from .. import optim
    from ..backend import get_namespace
    from ..params import FlatParameters
    storage = FlatParameters.from_arrays(get_namespace("cpu"), "float64", w=np.zeros(N_PARAMS))
    opt = optim.create(name, storage, **options)
    group = opt.param_groups[0]
    rule_name = opt.rule_name(group)
    if rule_name not in RULE_CODES:
        raise ValueError(f"the curve-fitting engine has no rule {rule_name!r}; it runs "
                         f"{', '.join(RULE_CODES)}")
    code = RULE_CODES.index(rule_name)
    scalars = opt.step_scalar_inputs(group) if code == ADAM else opt.kernel_scalars(group, 1)
    return code, tuple(scalars) + (0.0,) * (SCALAR_SLOTS - len(scalars))


def initial_params(seed=0, init="xavier"):
    """The starting point every configuration shares: nnopt.mlp([1, 3, 1])'s draw."""
    from ..model import mlp
    return mlp([1, 3, 1], "sigmoid", init=init, seed=seed, dtype="float64").flat.data.copy()


def reference_run(name, options, data, epochs, seed=0, init="xavier", batch=10):
    """The same training with nnopt's reference layers and optimizers (for the tests)."""
    from .. import optim
    from ..losses import MSELoss
    from ..model import mlp
    model = mlp([1, 3, 1], "sigmoid", init=init, seed=seed, dtype="float64")
    opt = optim.create(name, model, use_fast_path=False, **options)
    loss = MSELoss()
    x, y = data[0], data[1]
    for epoch in range(epochs):
        order = epoch_order(x.shape[0], seed, epoch)
        for it in range(x.shape[0] // batch):
            idx = order[it * batch:(it + 1) * batch]
            model.zero_grad()
            model.loss_and_backward(x[idx], y[idx], loss)
            opt.step()
    return model.flat.data.copy()
