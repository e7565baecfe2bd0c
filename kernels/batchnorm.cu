// nnopt: Batch Normalization over a row-major (m, n) batch, one launch each way.
// Each block owns TILE consecutive features: its threads stride over the rows (coalesced
// along features), accumulate the per-feature sums in registers (double), reduce them in
// shared memory, then the same block writes its features' outputs. Forward: statistics
// about the first row, running statistics, z. Backward: sum(d), sum(d*(x - mean)), dx, and
// dgamma/dbeta accumulated. The per-feature steps are rules.cuh's batchnorm_* functions,
// translations of nnopt.batchnorm's factored form.
#include "rules.cuh"

#define TILE 32
#define ROWS 8

#define NNOPT_BN(T, S)                                                                        \
extern "C" __global__ void bn_forward_##S(const T* x, const T* gamma, const T* beta, T eps,   \
        T momentum, int unbiased, T* running_mean, T* running_var, T* z, T* mean_out,        \
        T* inv_std_out, int m, int n) {                                                      \
    __shared__ double sum[ROWS][TILE];                                                       \
    __shared__ double sum_sq[ROWS][TILE];                                                    \
    __shared__ T scale[TILE];                                                                \
    __shared__ T offset[TILE];                                                               \
    const int j = blockIdx.x * TILE + threadIdx.x;                                           \
    const bool active = j < n;                                                               \
    double s = 0.0, s2 = 0.0, shift = active ? (double)x[j] : 0.0;                           \
    if (active) {                                                                            \
        for (int i = threadIdx.y; i < m; i += ROWS) {                                        \
            double d = (double)x[(long long)i * n + j] - shift;                              \
            s += d;                                                                          \
            s2 += d * d;                                                                     \
        }                                                                                    \
    }                                                                                        \
    sum[threadIdx.y][threadIdx.x] = s;                                                       \
    sum_sq[threadIdx.y][threadIdx.x] = s2;                                                   \
    __syncthreads();                                                                         \
    if (threadIdx.y == 0 && active) {                                                        \
        for (int r = 1; r < ROWS; ++r) {                                                     \
            s += sum[r][threadIdx.x];                                                        \
            s2 += sum_sq[r][threadIdx.x];                                                    \
        }                                                                                    \
        batchnorm_forward_feature<T>(s, s2, shift, m, eps, momentum, unbiased, gamma[j],      \
                                     beta[j], running_mean[j], running_var[j], mean_out[j],  \
                                     inv_std_out[j], scale[threadIdx.x], offset[threadIdx.x]); \
    }                                                                                        \
    __syncthreads();                                                                         \
    if (active) {                                                                            \
        for (int i = threadIdx.y; i < m; i += ROWS) {                                        \
            long long k = (long long)i * n + j;                                              \
            z[k] = x[k] * scale[threadIdx.x] + offset[threadIdx.x];                          \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
extern "C" __global__ void bn_backward_##S(const T* d, const T* x, const T* gamma,           \
        const T* mean, const T* inv_std, T* dx, T* dgamma, T* dbeta, int m, int n) {          \
    __shared__ double sum_d[ROWS][TILE];                                                     \
    __shared__ double sum_dc[ROWS][TILE];                                                    \
    __shared__ T a[TILE];                                                                    \
    __shared__ T b[TILE];                                                                    \
    __shared__ T c[TILE];                                                                    \
    const int j = blockIdx.x * TILE + threadIdx.x;                                           \
    const bool active = j < n;                                                               \
    double s = 0.0, sc = 0.0;                                                                \
    if (active) {                                                                            \
        for (int i = threadIdx.y; i < m; i += ROWS) {                                        \
            long long k = (long long)i * n + j;                                              \
            s += (double)d[k];                                                               \
            sc += (double)d[k] * ((double)x[k] - (double)mean[j]);                           \
        }                                                                                    \
    }                                                                                        \
    sum_d[threadIdx.y][threadIdx.x] = s;                                                     \
    sum_dc[threadIdx.y][threadIdx.x] = sc;                                                   \
    __syncthreads();                                                                         \
    if (threadIdx.y == 0 && active) {                                                        \
        for (int r = 1; r < ROWS; ++r) {                                                     \
            s += sum_d[r][threadIdx.x];                                                      \
            sc += sum_dc[r][threadIdx.x];                                                    \
        }                                                                                    \
        batchnorm_backward_feature<T>(s, sc, m, gamma[j], inv_std[j], a[threadIdx.x],         \
                                      b[threadIdx.x], c[threadIdx.x], dgamma[j], dbeta[j]);  \
    }                                                                                        \
    __syncthreads();                                                                         \
    if (active) {                                                                            \
        for (int i = threadIdx.y; i < m; i += ROWS) {                                        \
            long long k = (long long)i * n + j;                                              \
            dx[k] = a[threadIdx.x] * d[k] - b[threadIdx.x] * (x[k] - mean[j]) - c[threadIdx.x];          \
        }                                                                                    \
    }                                                                                        \
}

NNOPT_BN(float, f32)
NNOPT_BN(double, f64)
