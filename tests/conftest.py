"""Backend selection: ``pytest --backend numpy|strict|torch|cupy`` or NNOPT_TEST_BACKEND.

Tests that take the ``xp`` fixture run on the chosen backend; tests that do not
(data loading, CLI, reports) are backend-independent and run only in the numpy pass,
so the suite is not repeated for nothing.
"""
import os
import zlib

import numpy as np
import pytest

from nnopt.backend import BackendUnavailable, get_namespace


def pytest_addoption(parser):
    parser.addoption("--backend", default=os.environ.get("NNOPT_TEST_BACKEND", "numpy"),
                     choices=["numpy", "strict", "torch", "cupy", "emulated"],
                     help="array namespace the math tests run on (emulated: NumPy, with "
                          "nnopt.fast.gpu on the emulated CUDA device of tests/emulated_gpu.py "
                          "as the fused kernels; for tests/test_gpu.py without a GPU)")


def pytest_collection_modifyitems(config, items):
    backend = config.getoption("--backend")
    if backend == "numpy":
        return
    skip = pytest.mark.skip(reason=f"backend-independent test: runs in the numpy pass, not {backend}")
    for item in items:
        if "xp" not in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


def pytest_report_header(config):
    return f"nnopt backend: {config.getoption('--backend')}"


@pytest.fixture(scope="session")
def backend(request):
    return request.config.getoption("--backend")


@pytest.fixture(scope="session")
def xp(backend):
    try:
        return get_namespace("numpy" if backend == "emulated" else backend)
    except BackendUnavailable as exc:
        pytest.skip(f"backend {backend!r} unavailable here: {exc}")


@pytest.fixture
def rng(request):
    # A fresh draw per test, reproducible from the test's name.
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
