"""The curve-fitting runs of sections 15.2/15.3, all configurations at once.

Every run trains the same 1 -> 3 (sigmoid) -> 1 network (MSE/2, batch 10, 100 iterations
per epoch) for up to 10,000 epochs: in Python, layer by layer, that is minutes per run.
Here one numba loop trains them all: each configuration on LANES seeds at once in SIMD
lanes (one AVX2 instruction does a step of the arithmetic for all of them; exp is
``nnopt.fast.vecmath.exp``, which vectorizes), blocks spread over the cores, and records
the test loss. The update rules are the shared ``nnopt.fast.cpu`` rules, and the tests
hold the whole loop to nnopt's reference layers and optimizers (:func:`reference_run`).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ..fast.cpu import (Kernel, adadelta_rule, adagrad_rule, adam_kernel_scalars, adam_rule,
                        momentum_rule, momentum_torch_rule, nag_rule, nag_torch_rule,
                        rmsprop_rule, rmsprop_torch_rule, sgd_rule)
from ..fast.vecmath import exp

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


#: Runs trained side by side in one block: one AVX2 register of float64 holds one value of
#: each. A block's runs are one configuration on LANES seeds (each its own data and
#: shuffle), so the update's scalars are the block's, and each arithmetic operation of the
#: gradient is one SIMD instruction for all of them.
LANES = 4
#: A block's state: rows of LANES values, row r of lane l at [r * LANES + l]: the parameters,
#: their gradient and the optimizer's two state slots (N_PARAMS rows each), then the current
#: two samples' x and y and the test loss.
PLANE = N_PARAMS * LANES
PARAMS, GRAD, STATE1, STATE2 = 0, PLANE, 2 * PLANE, 3 * PLANE
SAMPLE_X, SAMPLE_Y, SAMPLE_X2, SAMPLE_Y2 = (4 * PLANE + k * LANES for k in range(4))
LOSS = 4 * PLANE + 4 * LANES
BLOCK = 4 * PLANE + 5 * LANES


@numba.njit(cache=True, inline="always", error_model="numpy", fastmath={"contract"})
def _forward(block, l, x):
    """The 1-3-1 sigmoid net on input x, lane ``l``: hidden activations and output."""
    a0 = 1.0 / (1.0 + exp(-(x * block[l] + block[3 * LANES + l])))
    a1 = 1.0 / (1.0 + exp(-(x * block[LANES + l] + block[4 * LANES + l])))
    a2 = 1.0 / (1.0 + exp(-(x * block[2 * LANES + l] + block[5 * LANES + l])))
    out = (block[9 * LANES + l] + a0 * block[6 * LANES + l] + a1 * block[7 * LANES + l]
           + a2 * block[8 * LANES + l])
    return a0, a1, a2, out


@numba.njit(cache=True, inline="always", error_model="numpy", fastmath={"contract"})
def _sample_terms(block, l, xi, yi, m):
    """One sample's part of the MSE/2 gradient of the 1-3-1 sigmoid net, lane ``l``:
    hidden activations a, output error d2 (over the batch of m) and the hidden units'
    errors dz. NumPy's error model: no zero-divisor check (1 + exp(.) and m are never 0),
    which would keep the loop over lanes scalar. fastmath "contract" only fuses
    multiply-adds (exp's polynomial is most of the work)."""
    a0, a1, a2, out = _forward(block, l, xi)
    v0, v1, v2 = block[6 * LANES + l], block[7 * LANES + l], block[8 * LANES + l]
    d2 = (out - yi) / m
    return a0, a1, a2, d2, d2 * v0 * a0 * (1.0 - a0), d2 * v1 * a1 * (1.0 - a1), d2 * v2 * a2 * (1.0 - a2)


@numba.njit(cache=True, inline="always", error_model="numpy", fastmath={"contract"})
def _add_terms(block, l, xi, terms):
    """Add one sample's ``terms`` (:func:`_sample_terms`) to lane l's gradient rows."""
    a0, a1, a2, d2, dz0, dz1, dz2 = terms
    block[GRAD + l] += xi * dz0
    block[GRAD + LANES + l] += xi * dz1
    block[GRAD + 2 * LANES + l] += xi * dz2
    block[GRAD + 3 * LANES + l] += dz0
    block[GRAD + 4 * LANES + l] += dz1
    block[GRAD + 5 * LANES + l] += dz2
    block[GRAD + 6 * LANES + l] += a0 * d2
    block[GRAD + 7 * LANES + l] += a1 * d2
    block[GRAD + 8 * LANES + l] += a2 * d2
    block[GRAD + 9 * LANES + l] += d2


@numba.njit(cache=True, error_model="numpy", fastmath={"contract"})
def _gradient_block(block, x, y, first, m):
    """MSE/2 gradient of the 1-3-1 sigmoid net for each lane of ``block`` over its samples
    first .. first + m - 1 (``x[i * LANES + l]``: sample i of lane l), into the block's
    gradient rows. The loops over lanes read and write ``block`` alone, at constant offsets,
    so LLVM proves the rows apart and turns them into SIMD code; the samples are first
    copied into the block because a load from ``x`` among the stores to ``block`` (which
    might be the same memory, for all LLVM knows) kept the loop scalar. Two samples at a
    time: their terms are independent chains of dependent operations (exp, divisions) that
    the core overlaps; they are added in sample order, so the sums are those of one sample
    at a time."""
    for i in range(GRAD, GRAD + PLANE):
        block[i] = 0.0
    s, last = first, first + m
    while s < last:
        pair = s + 1 < last
        s2 = s + 1 if pair else s
        for l in range(LANES):
            block[SAMPLE_X + l], block[SAMPLE_Y + l] = x[s * LANES + l], y[s * LANES + l]
            block[SAMPLE_X2 + l], block[SAMPLE_Y2 + l] = x[s2 * LANES + l], y[s2 * LANES + l]
        if pair:
            for l in range(LANES):
                xi, xj = block[SAMPLE_X + l], block[SAMPLE_X2 + l]
                first_terms = _sample_terms(block, l, xi, block[SAMPLE_Y + l], m)
                second_terms = _sample_terms(block, l, xj, block[SAMPLE_Y2 + l], m)
                _add_terms(block, l, xi, first_terms)
                _add_terms(block, l, xj, second_terms)
        else:
            for l in range(LANES):
                xi = block[SAMPLE_X + l]
                _add_terms(block, l, xi, _sample_terms(block, l, xi, block[SAMPLE_Y + l], m))
        s += 2


@numba.njit(cache=True, error_model="numpy", fastmath={"contract"})
def _test_loss_block(block, x, y):
    """Test loss (MSE/2 over x, y, shared by the lanes) of each lane of ``block``, into its
    LOSS row."""
    for l in range(LANES):
        block[LOSS + l] = 0.0
    for s in range(x.shape[0]):
        xs, ys = x[s], y[s]  # loaded once, before the stores: see _gradient_block
        for l in range(LANES):
            block[LOSS + l] += (_forward(block, l, xs)[3] - ys) ** 2
    for l in range(LANES):
        block[LOSS + l] /= 2 * x.shape[0]


@numba.njit(cache=True, error_model="numpy")
def _update(code, b, hp, t):
    """One step of rule ``RULE_CODES[code]`` on block ``b``: parameter i at b[i] (PARAMS is
    0), its gradient at b[GRAD + i], its state at b[STATE1 + i] and b[STATE2 + i]; constant
    offsets, so the loops vectorize without run-time overlap checks. ``hp`` holds the
    optimizer's kernel_scalars (Adam: its step_scalar_inputs, turned into the scalars of
    step t here). The rule is chosen once per step, outside the loop over parameters, and
    Adam's scalars (two powers) are computed once per step: inside the loop they were 20
    ``pow`` calls per step, twice the cost of the whole gradient."""
    g, s1, s2 = GRAD, STATE1, STATE2
    if code == 0:
        for i in range(PLANE):
            b[i] = sgd_rule(b[i], b[g + i], hp[0])
    elif code == 1:
        for i in range(PLANE):
            b[i], b[s1 + i] = momentum_rule(b[i], b[g + i], b[s1 + i], hp[0], hp[1])
    elif code == 2:
        for i in range(PLANE):
            b[i], b[s1 + i] = momentum_torch_rule(b[i], b[g + i], b[s1 + i], hp[0], hp[1])
    elif code == 3:
        for i in range(PLANE):
            b[i], b[s1 + i] = nag_rule(b[i], b[g + i], b[s1 + i], hp[0], hp[1])
    elif code == 4:
        for i in range(PLANE):
            b[i], b[s1 + i] = nag_torch_rule(b[i], b[g + i], b[s1 + i], hp[0], hp[1])
    elif code == 5:
        for i in range(PLANE):
            b[i], b[s1 + i] = adagrad_rule(b[i], b[g + i], b[s1 + i], hp[0], hp[1])
    elif code == 6:
        for i in range(PLANE):
            b[i], b[s1 + i], b[s2 + i] = adadelta_rule(b[i], b[g + i], b[s1 + i], b[s2 + i],
                                                       hp[0], hp[1], hp[2], hp[3])
    elif code == 7:
        for i in range(PLANE):
            b[i], b[s1 + i] = rmsprop_rule(b[i], b[g + i], b[s1 + i], hp[0], hp[1], hp[2], hp[3])
    elif code == 8:
        for i in range(PLANE):
            b[i], b[s1 + i] = rmsprop_torch_rule(b[i], b[g + i], b[s1 + i], hp[0], hp[1], hp[2],
                                                 hp[3])
    else:
        step, b1, one_minus_b1, b2, one_minus_b2, inv_correction2, eps = adam_kernel_scalars(
            hp[0], hp[1], hp[2], hp[3], t)
        for i in range(PLANE):
            b[i], b[s1 + i], b[s2 + i] = adam_rule(b[i], b[g + i], b[s1 + i], b[s2 + i], step, b1,
                                                   one_minus_b1, b2, one_minus_b2,
                                                   inv_correction2, eps)


@Kernel
def _train_blocks(blocks, lane_seed, block_config, xs, ys, x_test, y_test, codes, hyper,
                  max_epochs, record_every, check_every, target, seeds, batch):
    """Train every lane of every block; returns (curves, reached, final) indexed [seed,
    configuration, ...]. Runs stop only at a check (every ``check_every`` epochs), so the
    blocks run ``check_every`` epochs at a time on all cores, and between two such stretches
    the runs still going are packed into as few blocks as they fill."""
    n_seeds, n = xs.shape
    n_configs, iterations = codes.shape[0], n // batch
    curves = np.full((n_seeds, n_configs, max_epochs // record_every), np.nan)
    reached = np.full((n_seeds, n_configs), -1)
    final = np.zeros((n_seeds, n_configs, N_PARAMS))
    x_ordered = np.empty((n_seeds, check_every, n))
    y_ordered = np.empty((n_seeds, check_every, n))
    epoch = 0
    while epoch < max_epochs and blocks.shape[0] > 0:
        stretch = min(check_every - epoch % check_every, max_epochs - epoch)
        # Each seed's shuffled data for the stretch, drawn once for all its blocks.
        for task in prange(n_seeds * stretch):
            s, e = task // stretch, task % stretch
            order = epoch_order(n, seeds[s], epoch + e)
            for i in range(n):
                x_ordered[s, e, i], y_ordered[s, e, i] = xs[s, order[i]], ys[s, order[i]]
        keep = lane_seed >= 0
        for b in prange(blocks.shape[0]):
            block, c = blocks[b], block_config[b]
            x, y = np.empty(n * LANES), np.empty(n * LANES)
            for e in range(stretch):
                for l in range(LANES):
                    s = max(lane_seed[b, l], 0)  # an empty lane computes on seed 0's data
                    for i in range(n):
                        x[i * LANES + l], y[i * LANES + l] = x_ordered[s, e, i], y_ordered[s, e, i]
                t = (epoch + e) * iterations
                for it in range(iterations):
                    _gradient_block(block, x, y, it * batch, batch)
                    t += 1
                    _update(codes[c], block, hyper[c], t)
                finished = epoch + e + 1
                if finished % record_every == 0 or finished % check_every == 0:
                    _test_loss_block(block, x_test, y_test)
                    for l in range(LANES):
                        s = lane_seed[b, l]
                        if s < 0:
                            continue
                        if finished % record_every == 0:
                            curves[s, c, finished // record_every - 1] = block[LOSS + l]
                        if finished % check_every == 0 and block[LOSS + l] <= target:
                            reached[s, c] = finished
                            keep[b, l] = False
        epoch += stretch
        for b in range(blocks.shape[0]):
            for l in range(LANES):
                s = lane_seed[b, l]
                if s >= 0 and (not keep[b, l] or epoch >= max_epochs):
                    for k in range(N_PARAMS):
                        final[s, block_config[b], k] = blocks[b, PARAMS + k * LANES + l]
        blocks, lane_seed, block_config = _pack(blocks, lane_seed, block_config, keep, n_configs)
    return curves, reached, final


@numba.njit(cache=True)
def _pack(blocks, lane_seed, block_config, keep, n_configs):
    """The lanes with ``keep`` moved into new blocks, configuration by configuration, LANES
    to a block (the last block of a configuration may have empty lanes: seed -1)."""
    counts = np.zeros(n_configs, dtype=np.int64)
    for b in range(blocks.shape[0]):
        for l in range(LANES):
            if keep[b, l]:
                counts[block_config[b]] += 1
    first = np.zeros(n_configs + 1, dtype=np.int64)  # each configuration's first block
    for c in range(n_configs):
        first[c + 1] = first[c] + (counts[c] + LANES - 1) // LANES
    new_blocks = np.zeros((first[n_configs], BLOCK))
    new_seed = np.full((first[n_configs], LANES), -1)
    new_config = np.empty(first[n_configs], dtype=np.int64)
    for c in range(n_configs):
        new_config[first[c]:first[c + 1]] = c
    placed = np.zeros(n_configs, dtype=np.int64)
    for b in range(blocks.shape[0]):
        for l in range(LANES):
            if keep[b, l]:
                c = block_config[b]
                to = first[c] * LANES + placed[c]
                placed[c] += 1
                for r in range(BLOCK // LANES):
                    new_blocks[to // LANES, r * LANES + to % LANES] = blocks[b, r * LANES + l]
                new_seed[to // LANES, to % LANES] = lane_seed[b, l]
    return new_blocks, new_seed, new_config


def train_all(configs, data, start, max_epochs=10000, record_every=10, check_every=50,
              target=1e-3, seed=0, batch=10):
    """Train every ``(optimizer, {hyper})`` in ``configs`` from the flat parameters
    ``start`` (10 values). Returns (test-loss curves, epochs to target or -1, final params)."""
    curves, reached, final = train_seeds(configs, [data], [start], [seed], max_epochs,
                                         record_every, check_every, target, batch)
    return curves[0], reached[0], final[0]


def train_seeds(configs, data, starts, seeds, max_epochs=10000, record_every=10,
                check_every=50, target=1e-3, batch=10, parallel=None):
    """Every configuration once per seed, all in one batch: seed ``k`` trains on ``data[k]``
    (x, y, x_test, y_test; the test set must be the same for all) from ``starts[k]`` with
    the shuffle of ``seeds[k]``. Returns arrays indexed [seed, configuration, ...].
    ``parallel``: on numba's threads or on this one (default: threads if numba has several)."""
    n_seeds, n_configs = len(seeds), len(configs)
    if not (len(data) == len(starts) == n_seeds):
        raise ValueError(f"{n_seeds} seeds need as many data sets and starts, got "
                         f"{len(data)} and {len(starts)}")
    xs, ys = (np.stack([np.asarray(d[i][:, 0], dtype=np.float64) for d in data]) for i in (0, 1))
    x_test, y_test = (np.ascontiguousarray(data[0][i][:, 0], dtype=np.float64) for i in (2, 3))
    codes, hyper = zip(*(_encode(name, options) for name, options in configs))
    starts = np.asarray(starts, dtype=np.float64)
    # Every run as a lane: configuration c on seeds 0..n_seeds-1, LANES seeds to a block.
    blocks = np.zeros((n_configs * n_seeds, BLOCK))
    lane_seed = np.full((n_configs * n_seeds, LANES), -1)
    block_config = np.repeat(np.arange(n_configs), n_seeds)
    for c in range(n_configs):
        for s in range(n_seeds):
            blocks[c * n_seeds + s, PARAMS:PARAMS + PLANE:LANES] = starts[s]
            lane_seed[c * n_seeds + s, 0] = s
    keep = lane_seed >= 0
    blocks, lane_seed, block_config = _pack(blocks, lane_seed, block_config, keep, n_configs)
    # One thread (a worker of ``all``): the plain-loop twin, which a process can load
    # before it forks (numba starts its thread pool when it loads a parallel function).
    threaded = numba.get_num_threads() > 1 if parallel is None else parallel
    return _train_blocks.compiled(threaded)(
        blocks, lane_seed, block_config, xs, ys, x_test, y_test, np.array(codes, dtype=np.int64),
        np.array(hyper, dtype=np.float64), int(max_epochs), int(record_every), int(check_every),
        float(target), np.asarray(seeds, dtype=np.int64), int(batch))


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
