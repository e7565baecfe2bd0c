"""nnopt.fast.vecmath.exp: accurate to the last bit or so, and SIMD code in a loop."""
import re

import numba
import numpy as np
import pytest
from llvmlite import binding

from nnopt.fast.vecmath import exp


@numba.njit(error_model="numpy")
def exp_all(x, out):
    for i in range(x.shape[0]):
        out[i] = exp(x[i])


def ulps(got, want):
    return np.abs(got - want) / np.spacing(np.abs(want))


@pytest.mark.parametrize("low, high", [(-1.0, 1.0), (-40.0, 40.0), (-708.0, 709.0)])
def test_exp_within_one_ulp_of_the_c_library(rng, low, high):
    x = rng.uniform(low, high, 200_000)
    got = np.empty_like(x)
    exp_all(x, got)
    error = ulps(got, np.exp(x))
    assert error.max() <= 1.0, f"exp({x[error.argmax()]!r}): {error.max():.2f} ulp"


def test_exp_special_values():
    x = np.array([0.0, -0.0, 1.0, np.nan, np.inf, -np.inf, -745.0, 709.0, 709.5, 1000.0])
    got = np.empty_like(x)
    exp_all(x, got)
    assert got[0] == 1.0 and got[1] == 1.0
    assert ulps(got[2:3], np.exp(x[2:3]))[0] <= 1.0
    assert np.isnan(got[3])
    assert got[4] == np.inf and got[8] == np.inf and got[9] == np.inf
    # Below -708 the result stops at exp(-708), a normal number, as documented.
    assert got[5] == got[6] == pytest.approx(np.exp(-708.0), rel=1e-15)
    assert np.isfinite(got[7]) and ulps(got[7:8], np.exp(x[7:8]))[0] <= 1.0


@pytest.mark.skipif("avx2" not in binding.get_host_cpu_features().flatten(),
                    reason="the 4-wide float64 code needs AVX2")
def test_a_loop_of_exp_becomes_simd_code():
    # A fresh function (not from numba's cache, which keeps no assembly).
    @numba.njit(error_model="numpy", fastmath={"contract"})
    def loop(x, out):
        for i in range(x.shape[0]):
            out[i] = exp(x[i])
    x = np.zeros(8)
    loop(x, x.copy())
    asm = loop.inspect_asm(loop.signatures[0])
    assert re.search(r"vfmadd\w*pd\s+%ymm", asm), "exp's polynomial is no longer vectorized"
