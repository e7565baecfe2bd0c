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
// The partial and apply kernels (and activation_backward_split) come in two widths: a
// thread per feature (_f32, _f64), or a thread per 16 bytes of a row (_f32x4: 4 features,
// _f64x2: 2) where n is a multiple of that and the arrays are 16-byte aligned
// (nnopt.fast.plan.bn_lanes): the same sums in the same order, a quarter (float32) of the
// load instructions. nnopt.fast.plan.bn_plan picks the path and the chunks. partial and
// apply share no memory and never synchronize (tests/host_grid.cpp runs them thread by
// thread); the finalize kernels synchronize once (tests/emulated_gpu.py runs them).
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
#include "vectors.cuh"

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
    __shared__ T center[TILE];                                                               \
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
                                     scale[threadIdx.x], center[threadIdx.x]);               \
        running_mean[j] = run_mean;                                                          \
        running_var[j] = run_var;                                                            \
    }                                                                                        \
    __syncthreads();                                                                         \
    if (active) {                                                                            \
        const T sc = scale[threadIdx.x], ce = center[threadIdx.x], be = beta[j];             \
        for (int i = threadIdx.y; i < m; i += ROWS) {                                        \
            long long k = (long long)i * n + j;                                              \
            z[k] = activate<T>(batchnorm_apply<T>(x[k], ce, sc, be), activation);            \
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

// The split path's row walks, one thread over W consecutive features of its chunk's rows:
// W = 1, or (entry points *_f32x4 / *_f64x2, where n is a multiple of W and every array
// 16-byte aligned) W = 4 float32 / 2 float64 loaded and stored as one 16-byte vector
// (vectors.cuh), a quarter / half of the load instructions for the same bytes. Each walk
// unrolls 8 rows, so up to 8 rows' loads are in flight per thread: with a quarter of the
// threads (float32), 16-byte walks still keep twice the bytes in flight that 4-byte walks
// unrolled 4 did.

// activation_grad_at for W features: y is read only where the activation needs it
template <typename T, int W>
__device__ __forceinline__ NnoptFeatures<T, W> activation_grad_features(
        const T* __restrict__ d, const T* __restrict__ y, long long k, int activation) {
    NnoptFeatures<T, W> g = load_features<T, W>(d, k);
    if (activation != NNOPT_IDENTITY) {
        const NnoptFeatures<T, W> out = load_features<T, W>(y, k);
        for (int w = 0; w < W; ++w) g.e[w] = activation_grad<T>(g.e[w], out.e[w], activation);
    }
    return g;
}

// A thread's first feature j, its chunk's rows [begin, end), and whether it has work.
template <int W>
__device__ __forceinline__ bool split_rows(int m, int n, int rows, int& j, int& begin,
                                           int& end) {
    j = (blockIdx.x * blockDim.x + threadIdx.x) * W;
    begin = blockIdx.y * rows;
    end = begin + rows < m ? begin + rows : m;
    return j < n;
}

template <typename T, int W>
__device__ __forceinline__ void partial_forward(const T* __restrict__ x,
                                                double* __restrict__ partial, int m, int n,
                                                int rows) {
    int j, begin, end;
    if (!split_rows<W>(m, n, rows, j, begin, end)) return;
    const NnoptFeatures<T, W> first = load_features<T, W>(x, j);
    double shift[W], s[W], s2[W];
    for (int w = 0; w < W; ++w) {
        shift[w] = (double)first.e[w];
        s[w] = s2[w] = 0.0;
    }
#pragma unroll 8
    for (int i = begin; i < end; ++i) {
        const NnoptFeatures<T, W> v = load_features<T, W>(x, (long long)i * n + j);
        for (int w = 0; w < W; ++w) {
            const double d = (double)v.e[w] - shift[w];
            s[w] += d;
            s2[w] += d * d;
        }
    }
    const long long at = 2LL * blockIdx.y * n + j;
    for (int w = 0; w < W; ++w) {
        partial[at + w] = s[w];
        partial[at + n + w] = s2[w];
    }
}

template <typename T, int W>
__device__ __forceinline__ void apply_forward(const T* __restrict__ x,
                                              const T* __restrict__ scale,
                                              const T* __restrict__ center,
                                              const T* __restrict__ beta, T* __restrict__ z,
                                              int m, int n, int rows, int activation) {
    int j, begin, end;
    if (!split_rows<W>(m, n, rows, j, begin, end)) return;
    const NnoptFeatures<T, W> a = load_features<T, W>(scale, j), c = load_features<T, W>(center, j);
    T b[W];  // beta: a view into the flat parameters, not 16-byte aligned: one at a time
    for (int w = 0; w < W; ++w) b[w] = beta[j + w];
#pragma unroll 8
    for (int i = begin; i < end; ++i) {
        const long long k = (long long)i * n + j;
        NnoptFeatures<T, W> v = load_features<T, W>(x, k);
        for (int w = 0; w < W; ++w)
            v.e[w] = activate<T>(batchnorm_apply<T>(v.e[w], c.e[w], a.e[w], b[w]), activation);
        store_features<T, W>(z, k, v);
    }
}

template <typename T, int W>
__device__ __forceinline__ void partial_backward(const T* __restrict__ d,
                                                 const T* __restrict__ x,
                                                 const T* __restrict__ mean,
                                                 double* __restrict__ partial, int m, int n,
                                                 int rows, const T* __restrict__ y,
                                                 int activation) {
    int j, begin, end;
    if (!split_rows<W>(m, n, rows, j, begin, end)) return;
    const NnoptFeatures<T, W> mu = load_features<T, W>(mean, j);
    double s[W], sc[W];
    for (int w = 0; w < W; ++w) s[w] = sc[w] = 0.0;
#pragma unroll 8
    for (int i = begin; i < end; ++i) {
        const long long k = (long long)i * n + j;
        const NnoptFeatures<T, W> g = activation_grad_features<T, W>(d, y, k, activation);
        const NnoptFeatures<T, W> v = load_features<T, W>(x, k);
        for (int w = 0; w < W; ++w) {
            s[w] += (double)g.e[w];
            sc[w] += (double)g.e[w] * ((double)v.e[w] - (double)mu.e[w]);
        }
    }
    const long long at = 2LL * blockIdx.y * n + j;
    for (int w = 0; w < W; ++w) {
        partial[at + w] = s[w];
        partial[at + n + w] = sc[w];
    }
}

template <typename T, int W>
__device__ __forceinline__ void apply_backward(const T* __restrict__ d, const T* __restrict__ x,
                                               const T* __restrict__ mean,
                                               const T* __restrict__ coef, T* __restrict__ dx,
                                               int m, int n, int rows, const T* __restrict__ y,
                                               int activation) {
    int j, begin, end;
    if (!split_rows<W>(m, n, rows, j, begin, end)) return;
    const NnoptFeatures<T, W> a = load_features<T, W>(coef, j),
                              b = load_features<T, W>(coef, n + j),
                              c = load_features<T, W>(coef, 2LL * n + j),
                              mu = load_features<T, W>(mean, j);
#pragma unroll 8
    for (int i = begin; i < end; ++i) {
        const long long k = (long long)i * n + j;
        NnoptFeatures<T, W> g = activation_grad_features<T, W>(d, y, k, activation);
        const NnoptFeatures<T, W> v = load_features<T, W>(x, k);
        for (int w = 0; w < W; ++w) g.e[w] = a.e[w] * g.e[w] - b.e[w] * (v.e[w] - mu.e[w]) - c.e[w];
        store_features<T, W>(dx, k, g);
    }
}

template <typename T, int W>
__device__ __forceinline__ void activation_backward_rows(const T* __restrict__ dy,
                                                         const T* __restrict__ y, int activation,
                                                         T* __restrict__ dh,
                                                         double* __restrict__ partial,
                                                         int has_bias, int m, int n, int rows) {
    int j, begin, end;
    if (!split_rows<W>(m, n, rows, j, begin, end)) return;
    double s[W];
    for (int w = 0; w < W; ++w) s[w] = 0.0;
#pragma unroll 8
    for (int i = begin; i < end; ++i) {
        const long long k = (long long)i * n + j;
        const NnoptFeatures<T, W> g = activation_grad_features<T, W>(dy, y, k, activation);
        store_features<T, W>(dh, k, g);
        for (int w = 0; w < W; ++w) s[w] += (double)g.e[w];
    }
    if (has_bias) {
        for (int w = 0; w < W; ++w) partial[(long long)blockIdx.y * n + j + w] = s[w];
    }
}

// The split path's row-walking entry points for one (T, W): suffix S (f32, f32x4, ...).
#define NNOPT_BN_ROWS(T, W, S)                                                                \
extern "C" __global__ void bn_partial_forward_##S(const T* __restrict__ x,                    \
        double* __restrict__ partial, int m, int n, int rows) {                               \
    partial_forward<T, W>(x, partial, m, n, rows);                                           \
}                                                                                            \
extern "C" __global__ void bn_apply_forward_##S(const T* __restrict__ x,                      \
        const T* __restrict__ scale, const T* __restrict__ center, const T* __restrict__ beta, \
        T* __restrict__ z, int m, int n, int rows, int activation) {                          \
    apply_forward<T, W>(x, scale, center, beta, z, m, n, rows, activation);                  \
}                                                                                            \
extern "C" __global__ void bn_partial_backward_##S(const T* __restrict__ d,                   \
        const T* __restrict__ x, const T* __restrict__ mean, double* __restrict__ partial,    \
        int m, int n, int rows, const T* __restrict__ y, int activation) {                   \
    partial_backward<T, W>(d, x, mean, partial, m, n, rows, y, activation);                  \
}                                                                                            \
extern "C" __global__ void bn_apply_backward_##S(const T* __restrict__ d,                     \
        const T* __restrict__ x, const T* __restrict__ mean, const T* __restrict__ coef,      \
        T* __restrict__ dx, int m, int n, int rows, const T* __restrict__ y, int activation) { \
    apply_backward<T, W>(d, x, mean, coef, dx, m, n, rows, y, activation);                   \
}                                                                                            \
extern "C" __global__ void activation_backward_split_##S(const T* __restrict__ dy,            \
        const T* __restrict__ y, int activation, T* __restrict__ dh,                          \
        double* __restrict__ partial, int has_bias, int m, int n, int rows) {                \
    activation_backward_rows<T, W>(dy, y, activation, dh, partial, has_bias, m, n, rows);    \
}

NNOPT_BN_ROWS(float, 1, f32)
NNOPT_BN_ROWS(float, 4, f32x4)
NNOPT_BN_ROWS(double, 1, f64)
NNOPT_BN_ROWS(double, 2, f64x2)

// The split path's finalize kernels, and a block without BN (bias_activation).
#define NNOPT_BN_SPLIT(T, S)                                                                  \
extern "C" __global__ void bn_finalize_forward_##S(const double* __restrict__ partial,        \
        int chunks, const T* x, const T* gamma, const T* beta, T eps, T momentum,             \
        int unbiased, T* running_mean, T* running_var, T* mean_out, T* inv_std_out,           \
        T* scale, T* center, int m, int n, const T* bias, int has_bias) {                    \
    __shared__ double shared[2][ROWS][TILE];                                                 \
    const int j = blockIdx.x * TILE + threadIdx.x;                                           \
    double s[2];                                                                             \
    add_chunk_sums<2>(partial, chunks, n, j, j < n, shared, s);                              \
    if (threadIdx.y != 0 || j >= n) return;                                                  \
    batchnorm_forward_feature<T>(s[0], s[1], (double)x[j], m, eps, momentum, unbiased,       \
                                 gamma[j], beta[j], has_bias ? bias[j] : T(0),               \
                                 running_mean[j], running_var[j], mean_out[j],               \
                                 inv_std_out[j], scale[j], center[j]);                       \
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

// --- Small batches: the product fused in (nnopt.block, m <= FUSED_MAX_ROWS) ---------------
// At the textbook's batch of 64 a block's product and its BN pass are two tiny kernels,
// each mostly launch and memory latency. linear_forward computes h = a @ w for a tile of
// TILE features and all m rows in one block (its ROWS x TILE threads, each holding
// FUSED_RPT rows of one feature in registers), then runs the block's epilogue on those
// registers: BN's statistics, z and the activation (has_bn), or the bias and activation.
// linear_backward computes the gradient reaching a block from the next one, dy = g @ w^T
// (g: the next block's dh, w: its weights), and runs BN's backward (or the activation's
// and the bias gradient) on it; given the block's input x (n_in > 0), also its weight
// gradient x^T dh: gridDim.y then cuts W's n_in rows into chunks of TILE, each CUDA block
// recomputing its tile's dh (cheap: k is short there) and only the first writing dh, dgamma,
// dbeta and the bias gradient. The products walk k in KT-wide tiles staged in shared
// memory. A long k is cut into gridDim.y slices of `slice` (nnopt.fast.plan.fused_slices):
// each block writes its slice's product to partial[slice][m][n]; the last block of a
// feature tile to finish (counted in counters[tile], which it sets back to 0 for the next
// launch) adds the slices in order, so the sum is the same every run, and runs the epilogue.
#define FUSED_MAX_ROWS 64
#define FUSED_RPT (FUSED_MAX_ROWS / ROWS)
// A kernel's static __shared__ memory may total 48 KB; more needs dynamic shared memory and
// an opt-in at launch. Checked at compile time on each fused kernel's own arrays (the
// emulator cannot show it); fused_product's `last` adds 4 bytes.
#define STATIC_SHARED_BYTES (48 * 1024)
#define KT 32  // == TILE: a k tile of b is KT x TILE, FUSED_BQ values per thread

// A KT-wide tile of k as each thread loads it into registers: a[i][k0 + tx] for its rows
// i = threadIdx.y + ROWS r (coalesced along k), and KT / ROWS values of b(k, j) (coalesced
// along j, or along k for TRANS_B). Zero outside a, b and the slice.
#define FUSED_BQ (KT / ROWS)
template <typename T, bool TRANS_B>
__device__ __forceinline__ void load_k_tile(const T* __restrict__ a, const T* __restrict__ b,
                                            int m, int n, int k, int j0, int k0, int k_end,
                                            T (&ar)[FUSED_RPT], T (&br)[FUSED_BQ]) {
    const int tx = threadIdx.x, ty = threadIdx.y;
    const bool in_k = k0 + tx < k_end;
    for (int r = 0; r < FUSED_RPT; ++r) {
        const int i = ty + ROWS * r;
        ar[r] = in_k && i < m ? a[(long long)i * k + k0 + tx] : T(0);
    }
    for (int q = 0; q < FUSED_BQ; ++q) {
        const int other = ty + ROWS * q;  // k within the tile, or (TRANS_B) the feature
        if (!TRANS_B) {
            br[q] = k0 + other < k_end && j0 + tx < n ? b[(long long)(k0 + other) * n + j0 + tx]
                                                      : T(0);
        } else {
            br[q] = in_k && j0 + other < n ? b[(long long)(j0 + other) * k + k0 + tx] : T(0);
        }
    }
}

// acc[r] = sum over k in [k_begin, k_end) of a[i][k] b(k, j), i = threadIdx.y + ROWS r,
// j = j0 + threadIdx.x; a is (m, k) row-major; b(k, j) = b[k * n + j] (a block's weights,
// (k, n)) or, TRANS_B, b[j * k + k'] (the next block's weights, (n, k), transposed). The
// loads of FUSED_TILES_IN_FLIGHT tiles (128 of k) are issued together into registers, so
// they wait out one memory latency, not one each; each tile is then staged in shared
// memory and multiplied.
#define FUSED_TILES_IN_FLIGHT 4
template <typename T, bool TRANS_B>
__device__ __forceinline__ void product_tile(const T* __restrict__ a, const T* __restrict__ b,
                                             int m, int n, int k, int j0, int k_begin,
                                             int k_end, T (&acc)[FUSED_RPT],
                                             T (&as)[FUSED_MAX_ROWS][KT],
                                             T (&bs)[KT][TILE + 1]) {
    const int tx = threadIdx.x, ty = threadIdx.y;
    T ar[FUSED_TILES_IN_FLIGHT][FUSED_RPT], br[FUSED_TILES_IN_FLIGHT][FUSED_BQ];
    for (int r = 0; r < FUSED_RPT; ++r) acc[r] = T(0);
    for (int g0 = k_begin; g0 < k_end; g0 += KT * FUSED_TILES_IN_FLIGHT) {
#pragma unroll
        for (int t = 0; t < FUSED_TILES_IN_FLIGHT; ++t) {
            if (g0 + t * KT < k_end) {
                load_k_tile<T, TRANS_B>(a, b, m, n, k, j0, g0 + t * KT, k_end, ar[t], br[t]);
            }
        }
#pragma unroll
        for (int t = 0; t < FUSED_TILES_IN_FLIGHT; ++t) {
            if (g0 + t * KT < k_end) {  // the same for every thread of the block
                for (int r = 0; r < FUSED_RPT; ++r) as[ty + ROWS * r][tx] = ar[t][r];
                for (int q = 0; q < FUSED_BQ; ++q) {
                    if (!TRANS_B) bs[ty + ROWS * q][tx] = br[t][q];
                    else bs[tx][ty + ROWS * q] = br[t][q];
                }
                __syncthreads();
                // W consecutive k of a row of as in one 16-byte shared load (the same
                // address for every thread of a warp: a broadcast), times W values of bs
                const int W = 16 / sizeof(T);
#pragma unroll 2
                for (int kk = 0; kk < KT; kk += W) {
                    T bv[W];
                    for (int w = 0; w < W; ++w) bv[w] = bs[kk + w][tx];
                    for (int r = 0; r < FUSED_RPT; ++r) {
                        const NnoptFeatures<T, 16 / sizeof(T)> av =
                            load_features<T, 16 / sizeof(T)>(as[ty + ROWS * r], kk);
                        for (int w = 0; w < W; ++w) acc[r] += av.e[w] * bv[w];
                    }
                }
                __syncthreads();
            }
        }
    }
}

// The product of this block's slice of k (slice `index` of `slices`) into acc; with several
// slices, false for every block but the last of its feature tile, which gets the whole sum
// (slices added in order).
template <typename T, bool TRANS_B>
__device__ __forceinline__ bool fused_product(const T* __restrict__ a, const T* __restrict__ b,
                                              T* partial, int* counters, int slices, int index,
                                              int slice, int m, int n, int k,
                                              T (&acc)[FUSED_RPT],
                                              T (&as)[FUSED_MAX_ROWS][KT],
                                              T (&bs)[KT][TILE + 1]) {
    __shared__ int last;
    const int j = blockIdx.x * TILE + threadIdx.x;
    const int k_begin = index * slice, k_end = k_begin + slice < k ? k_begin + slice : k;
    product_tile<T, TRANS_B>(a, b, m, n, k, blockIdx.x * TILE, k_begin, k_end, acc, as, bs);
    if (slices == 1) return true;
    for (int r = 0; r < FUSED_RPT; ++r) {
        const int i = threadIdx.y + ROWS * r;
        if (i < m && j < n) partial[((long long)index * m + i) * n + j] = acc[r];
    }
    __threadfence();  // the slice's sums visible to every block before it is counted
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        last = atomicAdd(&counters[blockIdx.x], 1) == slices - 1;
        // the acquire half: a relaxed atomic and a barrier alone do not order the other
        // slices' stores before this block's loads in the PTX memory model
        if (last) __threadfence();
    }
    __syncthreads();
    if (!last) return false;
    for (int r = 0; r < FUSED_RPT; ++r) {
        const int i = threadIdx.y + ROWS * r;
        acc[r] = T(0);
        if (i < m && j < n) {
            for (int s = 0; s < slices; ++s) {
                acc[r] += __ldcg(&partial[((long long)s * m + i) * n + j]);
            }
        }
    }
    if (threadIdx.x == 0 && threadIdx.y == 0) counters[blockIdx.x] = 0;
    return true;
}

#define NNOPT_FUSED(T, S)                                                                     \
extern "C" __global__ void linear_forward_##S(const T* __restrict__ a,                        \
        const T* __restrict__ w, T* partial, int* counters, int slice, int m, int n, int k,   \
        int has_bn, const T* gamma, const T* beta, T eps, T momentum, int unbiased,           \
        T* running_mean, T* running_var, T* mean_out, T* inv_std_out, const T* bias,          \
        int has_bias, int activation, T* h, T* y) {                                          \
    alignas(16) __shared__ T as[FUSED_MAX_ROWS][KT];  /* rows read 16 bytes at a time */    \
    __shared__ T bs[KT][TILE + 1];                                                           \
    __shared__ double sums[2][ROWS][TILE];                                                   \
    __shared__ T scale[TILE], center[TILE];                                                  \
    static_assert(sizeof(as) + sizeof(bs) + sizeof(sums) + sizeof(scale) + sizeof(center) <= STATIC_SHARED_BYTES,\
                  "static shared memory above 48 KB needs an opt-in launch");                \
    T acc[FUSED_RPT];                                                                        \
    if (!fused_product<T, false>(a, w, partial, counters, gridDim.y, blockIdx.y, slice, m, n, \
                                 k, acc, as, bs)) {                                          \
        return;                                                                              \
    }                                                                                        \
    const int j = blockIdx.x * TILE + threadIdx.x;                                           \
    const bool active = j < n, lead = threadIdx.y == 0 && active;                            \
    if (!has_bn) {  /* y = act(h + bias) */                                                  \
        const T b = active && has_bias ? bias[j] : T(0);                                     \
        for (int r = 0; r < FUSED_RPT; ++r) {                                                \
            const int i = threadIdx.y + ROWS * r;                                            \
            if (i < m && active) y[(long long)i * n + j] = activate<T>(acc[r] + b, activation);  \
        }                                                                                    \
        return;                                                                              \
    }                                                                                        \
    if (threadIdx.y == 0) scale[threadIdx.x] = acc[0];  /* row 0: the sums' shift */         \
    __syncthreads();                                                                         \
    const double shift = (double)scale[threadIdx.x];                                         \
    double s[2] = {0.0, 0.0};                                                                \
    for (int r = 0; r < FUSED_RPT; ++r) {                                                    \
        if (threadIdx.y + ROWS * r < m) {                                                    \
            const double d = (double)acc[r] - shift;                                         \
            s[0] += d;                                                                       \
            s[1] += d * d;                                                                   \
        }                                                                                    \
    }                                                                                        \
    add_row_sums<2>(sums, s);  /* its barrier: every shift read before scale is rewritten */ \
    if (lead) {                                                                              \
        T run_mean = running_mean[j], run_var = running_var[j];                              \
        batchnorm_forward_feature<T>(s[0], s[1], shift, m, eps, momentum, unbiased, gamma[j], \
                                     beta[j], has_bias ? bias[j] : T(0), run_mean, run_var,  \
                                     mean_out[j], inv_std_out[j], scale[threadIdx.x],        \
                                     center[threadIdx.x]);                                   \
        running_mean[j] = run_mean;                                                          \
        running_var[j] = run_var;                                                            \
    }                                                                                        \
    __syncthreads();                                                                         \
    const T sc = scale[threadIdx.x], ce = center[threadIdx.x], be = active ? beta[j] : T(0); \
    for (int r = 0; r < FUSED_RPT; ++r) {                                                    \
        const int i = threadIdx.y + ROWS * r;                                                \
        if (i < m && active) {                                                               \
            const long long at = (long long)i * n + j;                                       \
            h[at] = acc[r];                                                                  \
            y[at] = activate<T>(batchnorm_apply<T>(acc[r], ce, sc, be), activation);         \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
extern "C" __global__ void linear_backward_##S(const T* __restrict__ g,                       \
        const T* __restrict__ w_next, T* partial, int* counters, int slice, int m, int n,     \
        int k, int has_bn, const T* h, const T* y, const T* gamma, const T* mean,             \
        const T* inv_std, T* dgamma, T* dbeta, T* dbias, int has_bias, int activation,       \
        T* dh, const T* x, T* dw, int n_in, int accumulate_dw) {                            \
    alignas(16) __shared__ T as[FUSED_MAX_ROWS][KT];  /* rows read 16 bytes at a time */    \
    __shared__ T bs[KT][TILE + 1];                                                           \
    __shared__ double sums[2][ROWS][TILE];                                                   \
    __shared__ T coef[3][TILE];                                                              \
    __shared__ T ds[FUSED_MAX_ROWS][TILE];                                                   \
    static_assert(sizeof(as) + sizeof(bs) + sizeof(sums) + sizeof(coef) + sizeof(ds) <= STATIC_SHARED_BYTES,\
                  "static shared memory above 48 KB needs an opt-in launch");                \
    T acc[FUSED_RPT];                                                                        \
    /* n_in > 0: the weight gradient too, blockIdx.y its rows' TILE-row chunk: k unsliced */ \
    const bool weights = n_in > 0;                                                           \
    const bool first = !weights || blockIdx.y == 0;  /* writes dh and the vector grads */    \
    if (!fused_product<T, true>(g, w_next, partial, counters, weights ? 1 : gridDim.y,        \
                                weights ? 0 : blockIdx.y, slice, m, n, k, acc, as, bs)) {    \
        return;                                                                              \
    }                                                                                        \
    const int j = blockIdx.x * TILE + threadIdx.x;                                           \
    const bool active = j < n, lead = threadIdx.y == 0 && active;                            \
    const T mu = has_bn && active ? mean[j] : T(0);                                          \
    T centered[FUSED_RPT];                                                                   \
    double s[2] = {0.0, 0.0};                                                                \
    for (int r = 0; r < FUSED_RPT; ++r) {  /* acc: dy, then the activation's input grad */  \
        const int i = threadIdx.y + ROWS * r;                                                \
        centered[r] = T(0);                                                                  \
        if (i < m && active) {                                                               \
            const long long at = (long long)i * n + j;                                       \
            acc[r] = activation_grad<T>(acc[r], activation == NNOPT_IDENTITY ? T(0) : y[at],  \
                                        activation);                                         \
            s[0] += (double)acc[r];                                                          \
            if (has_bn) {                                                                    \
                centered[r] = h[at] - mu;                                                    \
                s[1] += (double)acc[r] * ((double)h[at] - (double)mu);                       \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    add_row_sums<2>(sums, s);                                                                \
    if (!has_bn) {  /* dh = the activation's input grad; its column sums: the bias grad */  \
        if (lead && has_bias && first) dbias[j] += (T)s[0];                                  \
    } else {                                                                                 \
        if (lead) {                                                                          \
            T dg = dgamma[j], db = dbeta[j];                                                 \
            batchnorm_backward_feature<T>(s[0], s[1], m, gamma[j], inv_std[j],               \
                                          coef[0][threadIdx.x], coef[1][threadIdx.x],        \
                                          coef[2][threadIdx.x], dg, db);                     \
            if (first) {                                                                     \
                dgamma[j] = dg;                                                              \
                dbeta[j] = db;                                                               \
            }                                                                                \
        }                                                                                    \
        __syncthreads();                                                                     \
        for (int r = 0; r < FUSED_RPT; ++r) {                                                \
            acc[r] = coef[0][threadIdx.x] * acc[r] - coef[1][threadIdx.x] * centered[r]      \
                     - coef[2][threadIdx.x];                                                 \
        }                                                                                    \
    }                                                                                        \
    for (int r = 0; r < FUSED_RPT; ++r) {                                                    \
        const int i = threadIdx.y + ROWS * r;                                                \
        if (i < m && active && first) dh[(long long)i * n + j] = acc[r];                     \
    }                                                                                        \
    if (!weights) return;                                                                    \
    /* dw[p][j] (+)= sum over rows of x[i][p] dh[i][j], p in this block's chunk of rows of */ \
    /* w: dh staged in ds, the chunk's columns of x in as (free since the product) */       \
    const int p0 = blockIdx.y * TILE;                                                        \
    for (int r = 0; r < FUSED_RPT; ++r) {                                                    \
        const int i = threadIdx.y + ROWS * r;                                                \
        ds[i][threadIdx.x] = i < m && active ? acc[r] : T(0);                                \
        as[i][threadIdx.x] = i < m && p0 + threadIdx.x < n_in                                 \
                             ? x[(long long)i * n_in + p0 + threadIdx.x] : T(0);             \
    }                                                                                        \
    __syncthreads();                                                                         \
    for (int q = 0; q < TILE / ROWS; ++q) {                                                  \
        const int p = threadIdx.y + ROWS * q;                                                \
        T sum = T(0);                                                                        \
        for (int i = 0; i < m; ++i) sum += as[i][p] * ds[i][threadIdx.x];                    \
        if (p0 + p < n_in && active) {                                                       \
            const long long at = (long long)(p0 + p) * n + j;                                \
            dw[at] = accumulate_dw ? dw[at] + sum : sum;                                     \
        }                                                                                    \
    }                                                                                        \
}

NNOPT_FUSED(float, f32)
NNOPT_FUSED(double, f64)

// The network's last block (a product and a bias: no BN, no activation) and softmax
// cross-entropy in one launch, one CUDA block, n <= TILE classes: the logits z = a @ w +
// bias (written: the block's output), then one row per thread through
// softmax_cross_entropy_row (rules.cuh, as kernels/loss.cu): prob, grad = (prob -
// onehot) / m, and the mean loss (NaN, with *bad counted, for a label outside the
// classes), its rows' terms added in a fixed order.
#define NNOPT_FUSED_CE(T, L, S)                                                               \
extern "C" __global__ void linear_cross_entropy_##S(const T* __restrict__ a,                  \
        const T* __restrict__ w, const T* __restrict__ bias, const L* __restrict__ labels,    \
        T* logits, T* prob, T* grad, T* loss, int* bad, int m, int n, int k) {               \
    alignas(16) __shared__ T as[FUSED_MAX_ROWS][KT];  /* rows read 16 bytes at a time */    \
    __shared__ T bs[KT][TILE + 1];                                                           \
    __shared__ T zs[FUSED_MAX_ROWS][TILE + 1];                                               \
    __shared__ double sums[2][ROWS][TILE];                                                   \
    __shared__ double columns[2][TILE];                                                      \
    static_assert(sizeof(as) + sizeof(bs) + sizeof(zs) + sizeof(sums) + sizeof(columns) <= STATIC_SHARED_BYTES,\
                  "static shared memory above 48 KB needs an opt-in launch");                \
    T acc[FUSED_RPT];                                                                        \
    product_tile<T, false>(a, w, m, n, k, 0, 0, k, acc, as, bs);                             \
    const int tx = threadIdx.x, ty = threadIdx.y;                                            \
    const T b = tx < n ? bias[tx] : T(0);                                                    \
    for (int r = 0; r < FUSED_RPT; ++r) {                                                    \
        const int i = ty + ROWS * r;                                                         \
        zs[i][tx] = acc[r] + b;                                                              \
        if (i < m && tx < n) logits[(long long)i * n + tx] = zs[i][tx];                      \
    }                                                                                        \
    __syncthreads();                                                                         \
    const int row = ty * TILE + tx;  /* one row per thread: m <= FUSED_MAX_ROWS */           \
    double s[2] = {0.0, 0.0};                                                                \
    if (row < m) {                                                                           \
        int n_bad = 0;                                                                       \
        s[0] = softmax_cross_entropy_row<T, L>(zs[row], labels[row], n, m,                   \
                                               prob + (long long)row * n,                    \
                                               grad + (long long)row * n, n_bad);            \
        s[1] = (double)n_bad;                                                                \
    }                                                                                        \
    add_row_sums<2>(sums, s);                                                                \
    if (ty == 0) {                                                                           \
        columns[0][tx] = s[0];                                                               \
        columns[1][tx] = s[1];                                                               \
    }                                                                                        \
    __syncthreads();                                                                         \
    if (tx == 0 && ty == 0) {                                                                \
        double total = 0.0, n_bad = 0.0;                                                     \
        for (int c = 0; c < TILE; ++c) {                                                     \
            total += columns[0][c];                                                          \
            n_bad += columns[1][c];                                                          \
        }                                                                                    \
        loss[0] = n_bad > 0.0 ? (T)nan("") : (T)(total / m);                                 \
        bad[0] = (int)n_bad;                                                                 \
    }                                                                                        \
}

NNOPT_FUSED_CE(float, int, f32_i32)
NNOPT_FUSED_CE(float, long long, f32_i64)
NNOPT_FUSED_CE(double, int, f64_i32)
NNOPT_FUSED_CE(double, long long, f64_i64)
