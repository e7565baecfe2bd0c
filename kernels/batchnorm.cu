// nnopt: Batch Normalization over a row-major (m, n) batch, one launch each way.
// Each block owns TILE consecutive features: its threads stride over the rows (coalesced
// along features), accumulate the per-feature sums in registers (double), reduce them in
// shared memory, then the same block writes its features' outputs. Forward: statistics
// about the first row, running statistics, z. Backward: sum(d), sum(d*(x - mean)), dx, and
// dgamma/dbeta accumulated. The per-feature steps are rules.cuh's batchnorm_* functions,
// translations of nnopt.batchnorm's factored form.
//
// Large batches (bn_*_split_*): one block per 32 features walking every row leaves most of
// the GPU idle (4096 x 4096: 128 blocks). There the rows are cut into `chunks` chunks of
// `rows` rows, and the work takes three launches each way, each thread owning one
// (feature, chunk) pair and walking its rows (coalesced along features):
//   partial:  the chunk's sums, in double, into partial[chunk][2][n];
//   finalize: a block per TILE features adds the chunks' sums in a fixed order
//             (add_chunk_sums: the same result every run) and applies the per-feature rule
//             of rules.cuh (one thread per feature walking 256 chunks took 40 us);
//   apply:    z (forward) or dx (backward) from the per-feature coefficients.
// nnopt.fast.plan.bn_plan picks the path and the chunks. partial and apply share no memory
// and never synchronize (tests/host_grid.cpp runs them thread by thread); the finalize
// kernels synchronize once (tests/emulated_gpu.py runs them).
//
// A block (nnopt.block: Linear -> BN -> activation) passes x = the product without its
// Linear bias, the bias (has_bias; it only shifts the running mean) and an activation code
// (rules.cuh): forward writes activate(z); backward gets the gradient of that output and
// y = activate(z) itself, and takes activation_grad first. Plain BN: no bias, NNOPT_IDENTITY.
// bias_activation / activation_backward: the same block without BN (bias_activation may
// write in place: y == h, so h is not __restrict__; activation_backward's blocks are the
// one-launch BN kernel's: TILE features, ROWS rows of threads; one thread per feature
// walking 64 rows took 8-10 us on an H200). From BN_SPLIT_MIN_ROWS rows on, the
// backward splits the rows as BN does (activation_backward_split: dh and each chunk's
// bias-gradient sums; bias_grad_finalize: the chunks added in order): one thread per
// feature walking 8192 rows would leave the GPU idle in the network's last layer.
#include "rules.cuh"

#define TILE 32
#define ROWS 8

// The per-feature sums of a block's ROWS rows of threads: each thread's K partial sums
// s[] go to shared memory, then row 0 adds rows 1 .. ROWS-1 to its own in row order (a
// fixed order: the same result every run). Every thread of the block must call it (it
// synchronizes); only row 0's sums are complete.
template <int K>
__device__ __forceinline__ void add_row_sums(double (&shared)[K][ROWS][TILE], double (&s)[K]) {
    for (int k = 0; k < K; ++k) shared[k][threadIdx.y][threadIdx.x] = s[k];
    __syncthreads();
    if (threadIdx.y != 0) return;
    for (int r = 1; r < ROWS; ++r) {
        for (int k = 0; k < K; ++k) s[k] += shared[k][r][threadIdx.x];
    }
}

// The split path's finalize: K per-feature sums over the chunks of partial[chunk][K][n],
// each row of threads taking every ROWS-th chunk, then add_row_sums.
template <int K>
__device__ __forceinline__ void add_chunk_sums(const double* __restrict__ partial, int chunks,
                                               int n, int j, bool active,
                                               double (&shared)[K][ROWS][TILE], double (&s)[K]) {
    for (int k = 0; k < K; ++k) s[k] = 0.0;
    if (active) {
#pragma unroll 4
        for (int c = threadIdx.y; c < chunks; c += ROWS) {
            for (int k = 0; k < K; ++k) s[k] += partial[((long long)K * c + k) * n + j];
        }
    }
    add_row_sums<K>(shared, s);
}

#define NNOPT_BN(T, S)                                                                        \
extern "C" __global__ void bn_forward_##S(const T* x, const T* gamma, const T* beta, T eps,   \
        T momentum, int unbiased, T* running_mean, T* running_var, T* z, T* mean_out,        \
        T* inv_std_out, int m, int n, const T* bias, int has_bias, int activation) {         \
    __shared__ double sums[2][ROWS][TILE];                                                   \
    __shared__ T scale[TILE];                                                                \
    __shared__ T offset[TILE];                                                               \
    const int j = blockIdx.x * TILE + threadIdx.x;                                           \
    const bool active = j < n;                                                               \
    double s[2] = {0.0, 0.0}, shift = active ? (double)x[j] : 0.0;                           \
    /* row 0's per-feature inputs, loaded while the rows are summed: not after the barrier */ \
    const bool lead = threadIdx.y == 0 && active;                                            \
    const T g = lead ? gamma[j] : T(0), bt = lead ? beta[j] : T(0);                          \
    const T bs = lead && has_bias ? bias[j] : T(0);                                          \
    T run_mean = lead ? running_mean[j] : T(0), run_var = lead ? running_var[j] : T(0);      \
    if (active) {                                                                            \
        for (int i = threadIdx.y; i < m; i += ROWS) {                                        \
            double d = (double)x[(long long)i * n + j] - shift;                              \
            s[0] += d;                                                                       \
            s[1] += d * d;                                                                   \
        }                                                                                    \
    }                                                                                        \
    add_row_sums<2>(sums, s);                                                                \
    if (lead) {                                                                              \
        batchnorm_forward_feature<T>(s[0], s[1], shift, m, eps, momentum, unbiased, g, bt, bs,  \
                                     run_mean, run_var, mean_out[j], inv_std_out[j],         \
                                     scale[threadIdx.x], offset[threadIdx.x]);               \
        running_mean[j] = run_mean;                                                          \
        running_var[j] = run_var;                                                            \
    }                                                                                        \
    __syncthreads();                                                                         \
    if (active) {                                                                            \
        for (int i = threadIdx.y; i < m; i += ROWS) {                                        \
            long long k = (long long)i * n + j;                                              \
            z[k] = activate<T>(x[k] * scale[threadIdx.x] + offset[threadIdx.x], activation); \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
extern "C" __global__ void bn_backward_##S(const T* d, const T* x, const T* gamma,           \
        const T* mean, const T* inv_std, T* dx, T* dgamma, T* dbeta, int m, int n,            \
        const T* y, int activation) {                                                        \
    __shared__ double sums[2][ROWS][TILE];                                                   \
    __shared__ T a[TILE];                                                                    \
    __shared__ T b[TILE];                                                                    \
    __shared__ T c[TILE];                                                                    \
    const int j = blockIdx.x * TILE + threadIdx.x;                                           \
    const bool active = j < n;                                                               \
    double s[2] = {0.0, 0.0};                                                                \
    const bool lead = threadIdx.y == 0 && active;  /* as in bn_forward: loaded early */      \
    const T g = lead ? gamma[j] : T(0), is = lead ? inv_std[j] : T(0);                       \
    T dg = lead ? dgamma[j] : T(0), db = lead ? dbeta[j] : T(0);                             \
    if (active) {                                                                            \
        for (int i = threadIdx.y; i < m; i += ROWS) {                                        \
            long long k = (long long)i * n + j;                                              \
            const double dk = (double)activation_grad_at<T>(d, y, k, activation);             \
            s[0] += dk;                                                                      \
            s[1] += dk * ((double)x[k] - (double)mean[j]);                                   \
        }                                                                                    \
    }                                                                                        \
    add_row_sums<2>(sums, s);                                                                \
    if (lead) {                                                                              \
        batchnorm_backward_feature<T>(s[0], s[1], m, g, is, a[threadIdx.x], b[threadIdx.x],  \
                                      c[threadIdx.x], dg, db);                               \
        dgamma[j] = dg;                                                                      \
        dbeta[j] = db;                                                                       \
    }                                                                                        \
    __syncthreads();                                                                         \
    if (active) {                                                                            \
        for (int i = threadIdx.y; i < m; i += ROWS) {                                        \
            long long k = (long long)i * n + j;                                              \
            dx[k] = a[threadIdx.x] * activation_grad_at<T>(d, y, k, activation)               \
                    - b[threadIdx.x] * (x[k] - mean[j]) - c[threadIdx.x];                    \
        }                                                                                    \
    }                                                                                        \
}

NNOPT_BN(float, f32)
NNOPT_BN(double, f64)

#define NNOPT_BN_SPLIT(T, S)                                                                  \
extern "C" __global__ void bn_partial_forward_##S(const T* __restrict__ x,                    \
        double* __restrict__ partial, int m, int n, int rows) {                               \
    const int j = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;                  \
    if (j >= n) return;                                                                      \
    const double shift = (double)x[j];                                                       \
    const int end = (chunk + 1) * rows < m ? (chunk + 1) * rows : m;                          \
    double s = 0.0, s2 = 0.0;                                                                \
    _Pragma("unroll 4")                                                                      \
    for (int i = chunk * rows; i < end; ++i) {                                               \
        const double d = (double)x[(long long)i * n + j] - shift;                            \
        s += d;                                                                              \
        s2 += d * d;                                                                         \
    }                                                                                        \
    partial[(2LL * chunk) * n + j] = s;                                                      \
    partial[(2LL * chunk + 1) * n + j] = s2;                                                 \
}                                                                                            \
extern "C" __global__ void bn_finalize_forward_##S(const double* __restrict__ partial,        \
        int chunks, const T* x, const T* gamma, const T* beta, T eps, T momentum,             \
        int unbiased, T* running_mean, T* running_var, T* mean_out, T* inv_std_out,           \
        T* scale, T* offset, int m, int n, const T* bias, int has_bias) {                    \
    __shared__ double shared[2][ROWS][TILE];                                                 \
    const int j = blockIdx.x * TILE + threadIdx.x;                                           \
    double s[2];                                                                             \
    add_chunk_sums<2>(partial, chunks, n, j, j < n, shared, s);                              \
    if (threadIdx.y != 0 || j >= n) return;                                                  \
    batchnorm_forward_feature<T>(s[0], s[1], (double)x[j], m, eps, momentum, unbiased,       \
                                 gamma[j], beta[j], has_bias ? bias[j] : T(0),               \
                                 running_mean[j], running_var[j], mean_out[j],               \
                                 inv_std_out[j], scale[j], offset[j]);                       \
}                                                                                            \
extern "C" __global__ void bn_apply_forward_##S(const T* __restrict__ x,                      \
        const T* __restrict__ scale, const T* __restrict__ offset, T* __restrict__ z, int m, \
        int n, int rows, int activation) {                                                   \
    const int j = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;                  \
    if (j >= n) return;                                                                      \
    const T a = scale[j], b = offset[j];                                                     \
    const int end = (chunk + 1) * rows < m ? (chunk + 1) * rows : m;                          \
    _Pragma("unroll 4")                                                                      \
    for (int i = chunk * rows; i < end; ++i) {                                               \
        const long long k = (long long)i * n + j;                                            \
        z[k] = activate<T>(x[k] * a + b, activation);                                        \
    }                                                                                        \
}                                                                                            \
extern "C" __global__ void bn_partial_backward_##S(const T* __restrict__ d,                   \
        const T* __restrict__ x, const T* __restrict__ mean, double* __restrict__ partial,    \
        int m, int n, int rows, const T* __restrict__ y, int activation) {                   \
    const int j = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;                  \
    if (j >= n) return;                                                                      \
    const double mu = (double)mean[j];                                                       \
    const int end = (chunk + 1) * rows < m ? (chunk + 1) * rows : m;                          \
    double s = 0.0, sc = 0.0;                                                                \
    _Pragma("unroll 4")                                                                      \
    for (int i = chunk * rows; i < end; ++i) {                                               \
        const long long k = (long long)i * n + j;                                            \
        const double dk = (double)activation_grad_at<T>(d, y, k, activation);                 \
        s += dk;                                                                             \
        sc += dk * ((double)x[k] - mu);                                                      \
    }                                                                                        \
    partial[(2LL * chunk) * n + j] = s;                                                      \
    partial[(2LL * chunk + 1) * n + j] = sc;                                                 \
}                                                                                            \
extern "C" __global__ void bn_finalize_backward_##S(const double* __restrict__ partial,       \
        int chunks, const T* gamma, const T* inv_std, T* coef, T* dgamma, T* dbeta, int m,    \
        int n) {                                                                             \
    __shared__ double shared[2][ROWS][TILE];                                                 \
    const int j = blockIdx.x * TILE + threadIdx.x;                                           \
    double s[2];                                                                             \
    add_chunk_sums<2>(partial, chunks, n, j, j < n, shared, s);                              \
    if (threadIdx.y != 0 || j >= n) return;                                                  \
    batchnorm_backward_feature<T>(s[0], s[1], m, gamma[j], inv_std[j], coef[j], coef[n + j],  \
                                  coef[2 * n + j], dgamma[j], dbeta[j]);                     \
}                                                                                            \
extern "C" __global__ void bn_apply_backward_##S(const T* __restrict__ d,                     \
        const T* __restrict__ x, const T* __restrict__ mean, const T* __restrict__ coef,      \
        T* __restrict__ dx, int m, int n, int rows, const T* __restrict__ y, int activation) { \
    const int j = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;                  \
    if (j >= n) return;                                                                      \
    const T a = coef[j], b = coef[n + j], c = coef[2 * n + j], mu = mean[j];                  \
    const int end = (chunk + 1) * rows < m ? (chunk + 1) * rows : m;                          \
    _Pragma("unroll 4")                                                                      \
    for (int i = chunk * rows; i < end; ++i) {                                               \
        const long long k = (long long)i * n + j;                                            \
        dx[k] = a * activation_grad_at<T>(d, y, k, activation) - b * (x[k] - mu) - c;        \
    }                                                                                        \
}                                                                                            \
extern "C" __global__ void bias_activation_##S(const T* h, const T* __restrict__ bias,     \
        int has_bias, int activation, T* y, long long total, int n) {                        \
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < total;           \
         k += (long long)gridDim.x * blockDim.x) {                                           \
        y[k] = activate<T>(has_bias ? h[k] + bias[k % n] : h[k], activation);                \
    }                                                                                        \
}                                                                                            \
extern "C" __global__ void activation_backward_##S(const T* __restrict__ dy,                  \
        const T* __restrict__ y, int activation, T* __restrict__ dh, T* dbias, int has_bias,  \
        int m, int n) {                                                                      \
    __shared__ double sums[1][ROWS][TILE];                                                   \
    const int j = blockIdx.x * TILE + threadIdx.x;                                           \
    const bool active = j < n;                                                               \
    double s[1] = {0.0};                                                                     \
    if (active) {                                                                            \
        for (int i = threadIdx.y; i < m; i += ROWS) {                                        \
            const long long k = (long long)i * n + j;                                        \
            const T g = activation_grad_at<T>(dy, y, k, activation);                          \
            dh[k] = g;                                                                       \
            s[0] += (double)g;                                                               \
        }                                                                                    \
    }                                                                                        \
    add_row_sums<1>(sums, s);                                                                \
    if (threadIdx.y == 0 && active && has_bias) dbias[j] += (T)s[0];                         \
}                                                                                            \
extern "C" __global__ void activation_backward_split_##S(const T* __restrict__ dy,            \
        const T* __restrict__ y, int activation, T* __restrict__ dh,                          \
        double* __restrict__ partial, int has_bias, int m, int n, int rows) {                \
    const int j = blockIdx.x * blockDim.x + threadIdx.x, chunk = blockIdx.y;                  \
    if (j >= n) return;                                                                      \
    const int end = (chunk + 1) * rows < m ? (chunk + 1) * rows : m;                          \
    double s = 0.0;                                                                          \
    _Pragma("unroll 4")                                                                      \
    for (int i = chunk * rows; i < end; ++i) {                                               \
        const long long k = (long long)i * n + j;                                            \
        const T g = activation_grad_at<T>(dy, y, k, activation);                              \
        dh[k] = g;                                                                           \
        s += (double)g;                                                                      \
    }                                                                                        \
    if (has_bias) partial[(long long)chunk * n + j] = s;                                     \
}                                                                                            \
extern "C" __global__ void bias_grad_finalize_##S(const double* __restrict__ partial,         \
        int chunks, T* dbias, int n) {                                                       \
    __shared__ double shared[1][ROWS][TILE];                                                 \
    const int j = blockIdx.x * TILE + threadIdx.x;                                           \
    double s[1];                                                                             \
    add_chunk_sums<1>(partial, chunks, n, j, j < n, shared, s);                              \
    if (threadIdx.y == 0 && j < n) dbias[j] += (T)s[0];                                      \
}

NNOPT_BN_SPLIT(float, f32)
NNOPT_BN_SPLIT(double, f64)
