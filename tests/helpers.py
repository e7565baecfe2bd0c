"""Shared test helpers: host/device moves and finite differences in float64."""
import numpy as np

from nnopt.backend import asarray, to_numpy


def dev(xp, host, dtype=None):
    return asarray(np.asarray(host), xp, dtype=dtype)


def host(x):
    return np.array(to_numpy(x), dtype=np.float64)


def rel_err(a, b, floor=1e-2):
    """Largest difference relative to the largest reference entry (at least ``floor``,
    so that a gradient that is itself ~0, as in BN with a batch of 2, is judged by the
    finite differences' own resolution)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), floor))


def numeric_grad(f, x_host, h=1e-6):
    """Central differences of scalar f at host array x_host (float64)."""
    grad = np.zeros_like(x_host)
    flat, out = x_host.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        plus = f(x_host)
        flat[i] = old - h
        minus = f(x_host)
        flat[i] = old
        out[i] = (plus - minus) / (2 * h)
    return grad


def numeric_param_grad(f, storage, h=1e-6):
    """Central differences of scalar f() with respect to every entry of a flat storage."""
    grad = np.zeros(storage.size)
    for i in range(storage.size):
        old = float(storage.data[i])
        storage.data[i] = old + h
        plus = f()
        storage.data[i] = old - h
        minus = f()
        storage.data[i] = old
        grad[i] = (plus - minus) / (2 * h)
    return grad
