"""Launch shapes of nnopt's CUDA kernels, as plain arithmetic (no CuPy: the CPU tests
check them). ``sms`` is the device's multiprocessor count."""
from __future__ import annotations

THREADS = 256          # threads per block of the elementwise and split-BN kernels
TILE, ROWS = 32, 8     # batchnorm.cu's feature-tile blocks: 32 features x 8 rows of threads
THREADS_PER_SM = 2048  # resident threads per multiprocessor (sm_80 ... sm_100)
WAVES = 4              # grid-stride kernels: blocks for this many full waves at most
BN_MIN_ROWS = 16       # rows per chunk of the split BN kernels, at least
BN_MAX_CHUNKS = 256    # partial sums per feature that the finalize kernel adds, at most
BN_SPLIT_MIN_ROWS = 512  # below, the one-launch kernel's threads walk <= 64 rows each
SPLIT_K_MIN_INNER = 512  # products with a shorter inner dimension never split it (split_k_pays)
SPLIT_K_TILE = 32        # the output tile of cuBLAS's small-matrix kernels (32x32, H200 profile)
BN_VECTORS = True      # the split path's 16-byte loads (bench_gpu measures them against 4-byte ones)
FUSED_MAX_ROWS = 64     # batches up to this: a block's product fused into its passes (batchnorm.cu)
FUSED_PRODUCTS = True   # ... switched off: cuBLAS products beside the passes (bench_gpu measures both)
FUSED_K_TILE = 32       # k staged in shared memory this many at a time (batchnorm.cu's KT)
FUSED_MIN_SLICE = 128   # a fused product's k is cut into slices of at least this many
FUSED_MAX_SLICES = 8    # ... and at most this many (the last block adds them in order)
OVERLAP_WEIGHT_GRADS = True  # a model's weight gradients on a side stream (gpu.beside_main)
FUSED_WEIGHT_GRADS = True    # ... or, with fused products, inside linear_backward itself
FUSED_LOSS = True            # the last block's product inside the softmax cross-entropy's launch
CE_THREADS = 256       # softmax cross-entropy: threads per block (NNOPT_CE_THREADS), a row each
CE_MAX_BLOCKS = 4096   # ... and blocks at most (rows beyond: grid-stride)


def elementwise_blocks(n, width, sms, threads=THREADS):
    """Blocks of a grid-stride kernel over n elements taken ``width`` at a time (4 float32
    or 2 float64 per 16-byte load): one vector per thread, capped at WAVES full waves."""
    vectors = -(-max(n, 1) // width)
    return max(1, min(-(-vectors // threads), sms * THREADS_PER_SM // threads * WAVES))


def bn_plan(m, n, sms):
    """(chunks, rows) for BN over an (m, n) batch. chunks == 1: the one-launch kernel (a
    block per 32 features walks all rows); otherwise the split kernels, with the rows cut
    into ``chunks`` chunks of ``rows`` rows (the last one shorter), enough (feature,
    chunk) threads to fill every multiprocessor, at least BN_MIN_ROWS rows each and at
    most BN_MAX_CHUNKS chunks. The one-launch kernel's threads each walk m / 8 rows, one
    dependent load after another: from BN_SPLIT_MIN_ROWS rows on, three short launches
    win (measured before: 24 us per BN kernel at batch 1024)."""
    if m < BN_SPLIT_MIN_ROWS:
        return 1, m
    wanted = -(-sms * THREADS_PER_SM // n)
    rows = max(BN_MIN_ROWS, -(-m // wanted), -(-m // BN_MAX_CHUNKS))
    chunks = -(-m // rows)
    return (1, m) if chunks < 2 else (chunks, rows)


def bn_lanes(n, itemsize, aligned=True):
    """Features per thread of the split path's row walks: 16 // itemsize (4 float32, 2
    float64: one 16-byte load or store per row) where n is a multiple of that and every
    array starts 16-byte aligned, else 1. The chunks stay those of :func:`bn_plan`: a
    quarter (float32) of the threads, each with four times the bytes in flight, and the
    same partial sums for the finalize kernels to add."""
    lanes = 16 // itemsize
    return lanes if BN_VECTORS and aligned and n % lanes == 0 else 1


def bn_split_grid(n, chunks, lanes=1):
    """(grid, block) of the split kernels: threads along features (``lanes`` each),
    grid.y over chunks."""
    threads = -(-n // lanes)
    block = min(THREADS, 32 * -(-threads // 32))
    return (-(-threads // block), chunks), (block,)


def feature_tile_grid(n):
    """(grid, block) of the kernels whose blocks own 32 features with 8 rows of threads
    (batchnorm.cu's TILE and ROWS): the one-launch BN kernels, activation_backward and the
    split path's finalize kernels."""
    return (-(-n // TILE),), (TILE, ROWS)


def split_k_pays(m, n, k, sms):
    """Whether a captured product (m, n) = (m, k) @ (k, n) may take cuBLAS's split-K
    algorithms: a GEMM writing partial products of slices of k into the workspace, then a
    reduction kernel (two graph nodes). Only where the output has fewer 32x32 tiles than
    the GPU has multiprocessors (so one CTA per tile leaves most of them idle) and k is
    long enough for the split to pay for its second kernel. Measured on an H200 (textbook
    network, batch 64, Nsight Compute per kernel): the first layer's 64x784 @ 784x128 took
    32 us without a workspace and 7 + 3 us split; every other product of that step (k <= 128)
    took 4-5 us alone against 7-8 us split. ``$NNOPT_CUBLAS_WORKSPACE`` overrides the rule
    (0: no product splits; any other size: cuBLAS chooses for every product)."""
    tiles = -(-m // SPLIT_K_TILE) * -(-n // SPLIT_K_TILE)
    return k >= SPLIT_K_MIN_INNER and tiles < sms


def fuses_product(m):
    """Whether a block's product over m rows runs fused into its passes: every row of a
    feature tile in one CUDA block (batchnorm.cu, linear_forward / linear_backward)."""
    return FUSED_PRODUCTS and 1 <= m <= FUSED_MAX_ROWS


def fused_slices(n, k, sms):
    """(slices, slice) of a fused product's k: one slice where k is short, else enough
    slices of at least FUSED_MIN_SLICE (a multiple of FUSED_K_TILE) for the feature tiles
    times the slices to spread over the multiprocessors, at most FUSED_MAX_SLICES (the
    last block of a tile adds them). Textbook network at batch 64 on 132 SMs: the first
    layer's k = 784 in 7 slices of 128 (28 blocks), every other product in one."""
    tiles = -(-n // TILE)
    wanted = max(1, min(FUSED_MAX_SLICES, sms // tiles))
    slice_ = -(-max(FUSED_MIN_SLICE, -(-k // wanted)) // FUSED_K_TILE) * FUSED_K_TILE
    return -(-max(k, 1) // slice_), slice_


def fuses_loss(m, n):
    """Whether a network's last block over m rows and n classes (a product and a bias) runs
    inside softmax cross-entropy's launch: every row in one CUDA block, every class of a
    row in one tile of 32 (batchnorm.cu, linear_cross_entropy)."""
    return FUSED_LOSS and fuses_product(m) and 1 <= n <= TILE
