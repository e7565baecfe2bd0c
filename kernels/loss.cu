// nnopt: softmax cross-entropy against integer labels, forward and backward in one pass
// (nnopt.losses.SoftmaxCrossEntropy.forward_backward; its numba twin is
// nnopt.fast.cpu._softmax_cross_entropy, its reference the layer's forward and backward).
// Blocks of NNOPT_CE_THREADS threads, one row per thread (grid-stride beyond):
//   prob = softmax(row), grad = (prob - onehot(label)) / m, and the row's loss
//   -(z[label] - max - log(sum exp(z - max))) (rules.cuh, softmax_cross_entropy_row),
//   summed in double;
// each block adds its threads' sums in shared memory in a fixed order. One block writes
// the mean loss itself; several write their sums to `partial`, and
// softmax_cross_entropy_finalize adds those in the same fixed order: the same loss every
// run. A GPU step cannot raise without a synchronization, so a label outside
// [0, classes) makes the loss NaN (loud, where a one-hot row of zeros would give a finite,
// meaningless loss) and is counted in *bad.
#include "rules.cuh"

#define NNOPT_CE_THREADS 256

// Sums sums[] and counts[] of a NNOPT_CE_THREADS-thread block into element 0, in a fixed order.
__device__ __forceinline__ void nnopt_block_sum(double* sums, int* counts) {
    __syncthreads();
    for (int half = NNOPT_CE_THREADS / 2; half > 0; half /= 2) {
        if ((int)threadIdx.x < half) {
            sums[threadIdx.x] += sums[threadIdx.x + half];
            counts[threadIdx.x] += counts[threadIdx.x + half];
        }
        __syncthreads();
    }
}

template <typename T>
__device__ __forceinline__ void nnopt_write_loss(double sum, int n_bad, int m, T* loss, int* bad) {
    loss[0] = n_bad ? (T)nan("") : (T)(sum / m);
    bad[0] = n_bad;
}

#define NNOPT_CE(T, L, S)                                                                     \
extern "C" __global__ void softmax_cross_entropy_##S(const T* logits, const L* labels,        \
        T* prob, T* grad, T* loss, int* bad, double* partial, int* partial_bad, int m,       \
        int c) {                                                                             \
    __shared__ double sums[NNOPT_CE_THREADS];                                                \
    __shared__ int counts[NNOPT_CE_THREADS];                                                 \
    double total = 0.0;                                                                      \
    int n_bad = 0;                                                                           \
    for (int i = blockIdx.x * NNOPT_CE_THREADS + threadIdx.x; i < m;                         \
         i += gridDim.x * NNOPT_CE_THREADS) {                                                \
        const long long row = (long long)i * c;                                              \
        total += softmax_cross_entropy_row<T, L>(logits + row, labels[i], c, m, prob + row,  \
                                                 grad + row, n_bad);                         \
    }                                                                                        \
    sums[threadIdx.x] = total;                                                               \
    counts[threadIdx.x] = n_bad;                                                             \
    nnopt_block_sum(sums, counts);                                                           \
    if (threadIdx.x == 0) {                                                                  \
        if (gridDim.x == 1) {                                                                \
            nnopt_write_loss<T>(sums[0], counts[0], m, loss, bad);                           \
        } else {                                                                             \
            partial[blockIdx.x] = sums[0];                                                   \
            partial_bad[blockIdx.x] = counts[0];                                             \
        }                                                                                    \
    }                                                                                        \
}

#define NNOPT_CE_FINALIZE(T, S)                                                               \
extern "C" __global__ void softmax_cross_entropy_finalize_##S(const double* partial,          \
        const int* partial_bad, int blocks, T* loss, int* bad, int m) {                      \
    __shared__ double sums[NNOPT_CE_THREADS];                                                \
    __shared__ int counts[NNOPT_CE_THREADS];                                                 \
    double total = 0.0;                                                                      \
    int n_bad = 0;                                                                           \
    for (int b = threadIdx.x; b < blocks; b += NNOPT_CE_THREADS) {                           \
        total += partial[b];                                                                 \
        n_bad += partial_bad[b];                                                             \
    }                                                                                        \
    sums[threadIdx.x] = total;                                                               \
    counts[threadIdx.x] = n_bad;                                                             \
    nnopt_block_sum(sums, counts);                                                           \
    if (threadIdx.x == 0) nnopt_write_loss<T>(sums[0], counts[0], m, loss, bad);             \
}

NNOPT_CE(float, int, f32_i32)
NNOPT_CE(float, long long, f32_i64)
NNOPT_CE(double, int, f64_i32)
NNOPT_CE(double, long long, f64_i64)
NNOPT_CE_FINALIZE(float, f32)
NNOPT_CE_FINALIZE(double, f64)
