"""``exp`` that LLVM can vectorize, for numba loops.

numba compiles ``math.exp`` to a call into the C library, one element at a time: a loop
that calls it never becomes SIMD code (numba's vectorized exp needs Intel's SVML, absent
here). :func:`exp` is plain arithmetic instead, which the loop vectorizer turns into
4-wide AVX2 code. Method (Cody-Waite, as in fdlibm)::

    exp(x) = 2^k * exp(r),   k = round(x / ln 2),   r = x - k ln 2,   |r| <= ln(2) / 2

with ``k ln 2`` subtracted in two parts (ln 2 = LN2_HI + LN2_LO, LN2_HI exact in 32 bits) so
that ``r`` keeps full precision, exp(r) as its Taylor polynomial to degree 13 (remainder
below 2e-16 relative for |r| <= 0.35) and 2^k built directly as the float's exponent bits.
Round to nearest uses the 1.5 * 2^52 trick (adding it leaves k in the low bits), so no
float-to-int conversion is needed, which AVX2 lacks for 64-bit integers. Accuracy: within
1 ulp of the C library's exp from -708 to 709 (tests/test_vecmath.py); NaN stays NaN;
below -708 (-inf included) it returns exp(-708) = 3.3e-308, not a smaller number or 0, and
from 709.1 on inf (exp(709.78) is the largest finite double).
"""
from __future__ import annotations

import numba
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

LOG2E = 1.4426950408889634
LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10
ROUND = 6755399441055744.0  # 1.5 * 2^52: x + ROUND rounds x to an integer kept in the low bits
LOWEST, HIGHEST = -708.0, 710.0  # beyond these 2^k leaves the normal range


@intrinsic
def _bits_of(typingctx, x):
    """The 64 bits of a float64 as an int64 (no conversion)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))
    return types.int64(types.float64), codegen


@intrinsic
def _float_of(typingctx, bits):
    """The float64 whose 64 bits are ``bits``."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


# fastmath "contract" only: each multiply-add of the polynomial becomes one FMA (half the
# instructions, a shorter dependency chain); nothing is reordered or approximated.
@numba.njit(cache=True, inline="always", error_model="numpy", fastmath={"contract"})
def exp(x):
    # Comparisons, not min/max: a NaN fails both and passes through.
    x = LOWEST if x < LOWEST else x
    x = HIGHEST if x > HIGHEST else x
    shifted = x * LOG2E + ROUND
    k = _bits_of(shifted) - _bits_of(ROUND)
    kf = shifted - ROUND
    r = (x - kf * LN2_HI) - kf * LN2_LO
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    return p * _float_of((k + 1023) << 52)
