// nnopt: a tiled matrix product for captured CUDA graphs (CuPy refuses cuBLAS calls while
// a stream is capturing). C = op(A) op(B), row-major, op = transpose when the flag is set;
// shapes: op(A) is (M, K), op(B) is (K, N). Sized for the textbook's small layers.
#define BLOCK 16

// Each CUDA block computes one BLOCK x BLOCK tile of C per pass, walking down the rows
// in steps of gridDim.y tiles: CUDA caps gridDim.y at 65535, and a long M (an evaluation of
// a whole data set in one product) has more row tiles than that.
#define NNOPT_GEMM(T, S)                                                                      \
extern "C" __global__ void gemm_##S(const T* A, const T* B, T* C, int M, int N, int K,        \
                                    int trans_a, int trans_b) {                              \
    __shared__ T As[BLOCK][BLOCK];                                                           \
    __shared__ T Bs[BLOCK][BLOCK];                                                           \
    const int col = blockIdx.x * BLOCK + threadIdx.x;                                        \
    for (long long tile = blockIdx.y; tile * BLOCK < M; tile += gridDim.y) {                 \
        const long long row = tile * BLOCK + threadIdx.y;                                    \
        T acc = 0;                                                                           \
        for (int k0 = 0; k0 < K; k0 += BLOCK) {                                              \
            int ka = k0 + threadIdx.x, kb = k0 + threadIdx.y;                                \
            As[threadIdx.y][threadIdx.x] = (row < M && ka < K)                               \
                ? (trans_a ? A[(long long)ka * M + row] : A[row * K + ka]) : T(0);           \
            Bs[threadIdx.y][threadIdx.x] = (kb < K && col < N)                               \
                ? (trans_b ? B[(long long)col * K + kb] : B[(long long)kb * N + col]) : T(0);\
            __syncthreads();                                                                 \
            for (int k = 0; k < BLOCK; ++k) acc += As[threadIdx.y][k] * Bs[k][threadIdx.x];  \
            __syncthreads();                                                                 \
        }                                                                                    \
        if (row < M && col < N) C[row * N + col] = acc;                                      \
    }                                                                                        \
}

NNOPT_GEMM(float, f32)
NNOPT_GEMM(double, f64)
