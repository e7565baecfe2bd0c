"""The chapter's small regression sets, generated from their formulas (host NumPy)."""
from __future__ import annotations

import numpy as np


def curve_fn(x):
    """y = 0.4x^2 + 0.3x sin(15x) + 0.01 cos(50x) - 0.3"""
    return 0.4 * x ** 2 + 0.3 * x * np.sin(15 * x) + 0.01 * np.cos(50 * x) - 0.3


def curve(seed=0, n_train=1000, n_test=200):
    """Train: x ~ U[0, 1), y = curve(x) + (U[0, 1) - 0.5) / 10. Test: x = linspace(0, 1), no noise.
    Returns column vectors (n, 1) in float64."""
    rng = np.random.default_rng(seed)
    x = rng.random(n_train)
    y = curve_fn(x) + (rng.random(n_train) - 0.5) / 10
    x_test = np.linspace(0, 1, n_test)
    return x[:, None], y[:, None], x_test[:, None], curve_fn(x_test)[:, None]


def line(seed=0, n=200, noise=0.1):
    """y = 2x + 3 + N(0, noise^2), x ~ U[0, 1): the (w, b) contour experiment's data."""
    rng = np.random.default_rng(seed)
    x = rng.random(n)
    return x[:, None], (2 * x + 3 + rng.normal(0, noise, n))[:, None]


def minibatch_steps(model, optimizer, loss, x, y, batch, seed):
    """Train ``model`` on host arrays x, y: reshuffle each epoch (host RNG of ``seed``), take
    one optimizer step per minibatch, and yield after every step, endlessly."""
    xp = model.xp
    xd, yd = xp.asarray(x), xp.asarray(y)
    rng = np.random.default_rng(seed)
    while True:
        order = xp.asarray(rng.permutation(x.shape[0]))
        for start in range(0, x.shape[0], batch):
            idx = order[start:start + batch]
            model.zero_grad()
            model.loss_and_backward(xp.take(xd, idx, axis=0), xp.take(yd, idx, axis=0), loss)
            optimizer.step()
            yield
