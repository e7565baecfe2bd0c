import sys

import numpy as np
import pytest

import nnopt
from nnopt.backend import BackendUnavailable, backend_name, get_namespace, to_numpy


def test_cpu_is_numpy_and_round_trips():
    xp = get_namespace("cpu")
    assert backend_name(xp) == "numpy"
    a = np.arange(4.0)
    np.testing.assert_array_equal(to_numpy(xp.asarray(a)), a)


def test_unknown_device():
    with pytest.raises(ValueError, match="unknown device or backend 'tpu'"):
        get_namespace("tpu")


def test_gpu_without_cupy_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes "import cupy" fail
    with pytest.raises(BackendUnavailable, match="needs CuPy.*pip install"):
        get_namespace("gpu")


def test_namespace_round_trip(xp):
    a = np.arange(6.0).reshape(2, 3)
    from tests.helpers import dev, host
    np.testing.assert_array_equal(host(dev(xp, a)), a)
    model = nnopt.mlp([3, 2], device=xp, dtype="float64")
    assert model.flat.data.shape == (8,)
