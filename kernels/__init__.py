"""CUDA sources of nnopt's fused kernels, installed as the package ``nnopt.kernels``.

``rules.cuh`` holds every per-element formula (the same ones as ``nnopt.fast.cpu``); the
``.cu`` files hold the ``__global__`` kernels (``vectors.cuh``: their 16-byte loads).
:func:`source` returns a file with its ``.cuh`` headers inlined, ready for NVRTC (CuPy's
RawModule).
"""
from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = ("optimizers.cu", "batchnorm.cu", "gemm.cu", "loss.cu")


def source(name: str) -> str:
    text = (HERE / name).read_text()
    return re.sub(r'#include "(\w+\.cuh)"', lambda m: (HERE / m.group(1)).read_text(), text)
