// nnopt: a tiled matrix product for captured CUDA graphs (CuPy refuses cuBLAS calls while
// a stream is capturing). C = op(A) op(B), row-major, op = transpose when the flag is set;
// shapes: op(A) is (M, K), op(B) is (K, N). Sized for the textbook's small layers.
//
// gemm_small: products whose C has few elements but a long K (the textbook's layers at
// batch 64), where cuBLAS runs a split-K GEMM and then a reduction kernel: here one kernel.
// A block per SG_ROWS x SG_COLS tile of C, block (32, SG_WARPS): each warp sums its share
// of K for the whole tile (lane = column, the tile's rows in registers; op(A)'s element is
// the same for every lane), then the warps' sums are added in warp order through shared
// memory (a fixed order: the same result every run).
#define BLOCK 16
#define SG_ROWS 16
#define SG_COLS 32
#define SG_WARPS 8

#define NNOPT_GEMM(T, S)                                                                      \
extern "C" __global__ void gemm_##S(const T* A, const T* B, T* C, int M, int N, int K,        \
                                    int trans_a, int trans_b) {                              \
    __shared__ T As[BLOCK][BLOCK];                                                           \
    __shared__ T Bs[BLOCK][BLOCK];                                                           \
    const int row = blockIdx.y * BLOCK + threadIdx.y;                                        \
    const int col = blockIdx.x * BLOCK + threadIdx.x;                                        \
    T acc = 0;                                                                               \
    for (int k0 = 0; k0 < K; k0 += BLOCK) {                                                  \
        int ka = k0 + threadIdx.x, kb = k0 + threadIdx.y;                                    \
        As[threadIdx.y][threadIdx.x] = (row < M && ka < K)                                   \
            ? (trans_a ? A[(long long)ka * M + row] : A[(long long)row * K + ka]) : T(0);    \
        Bs[threadIdx.y][threadIdx.x] = (kb < K && col < N)                                   \
            ? (trans_b ? B[(long long)col * K + kb] : B[(long long)kb * N + col]) : T(0);    \
        __syncthreads();                                                                     \
        for (int k = 0; k < BLOCK; ++k) acc += As[threadIdx.y][k] * Bs[k][threadIdx.x];      \
        __syncthreads();                                                                     \
    }                                                                                        \
    if (row < M && col < N) C[(long long)row * N + col] = acc;                               \
}

#define NNOPT_GEMM_SMALL(T, S)                                                                \
extern "C" __global__ void gemm_small_##S(const T* __restrict__ A, const T* __restrict__ B,   \
                                          T* __restrict__ C, int M, int N, int K,            \
                                          int trans_a, int trans_b) {                        \
    __shared__ T part[SG_WARPS][SG_ROWS][SG_COLS];                                           \
    const int lane = threadIdx.x, warp = threadIdx.y;                                        \
    const int row0 = blockIdx.y * SG_ROWS, col = blockIdx.x * SG_COLS + lane;                \
    const int per = (K + SG_WARPS - 1) / SG_WARPS;                                           \
    const int k0 = warp * per, k1 = k0 + per < K ? k0 + per : K;                             \
    T acc[SG_ROWS];                                                                          \
    _Pragma("unroll")                                                                        \
    for (int r = 0; r < SG_ROWS; ++r) acc[r] = T(0);                                         \
    if (col < N) {                                                                           \
        for (int k = k0; k < k1; ++k) {                                                      \
            const T b = trans_b ? B[(long long)col * K + k] : B[(long long)k * N + col];     \
            _Pragma("unroll")                                                                \
            for (int r = 0; r < SG_ROWS; ++r) {                                              \
                const int i = row0 + r;                                                      \
                if (i < M) {                                                                 \
                    acc[r] += (trans_a ? A[(long long)k * M + i] : A[(long long)i * K + k]) * b; \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    _Pragma("unroll")                                                                        \
    for (int r = 0; r < SG_ROWS; ++r) part[warp][r][lane] = acc[r];                          \
    __syncthreads();                                                                         \
    for (int o = warp * 32 + lane; o < SG_ROWS * SG_COLS; o += 32 * SG_WARPS) {              \
        const int r = o / SG_COLS, c = o % SG_COLS;                                          \
        const int i = row0 + r, j = blockIdx.x * SG_COLS + c;                                \
        if (i < M && j < N) {                                                                \
            T sum = part[0][r][c];                                                           \
            for (int w = 1; w < SG_WARPS; ++w) sum += part[w][r][c];                         \
            C[(long long)i * N + j] = sum;                                                   \
        }                                                                                    \
    }                                                                                        \
}

NNOPT_GEMM(float, f32)
NNOPT_GEMM(double, f64)
NNOPT_GEMM_SMALL(float, f32)
NNOPT_GEMM_SMALL(double, f64)
