// Host build of kernels/optimizers.cu and kernels/rules.cuh (CUDA qualifiers defined away)
// for the tests: the same kernels and per-element formulas as on the GPU, in plain loops,
// called through ctypes with the same arguments.
#include <cmath>
using std::pow;
using std::sqrt;
using std::exp;
using std::tanh;
#define NNOPT_DEVICE inline
#include "rules.cuh"

// The optimizer kernels themselves, nnopt_each's vector and tail loops one plain loop.
#define __global__
#define NNOPT_HOST_BUILD
template <int K, typename T, typename F>
inline void nnopt_each(long long n, F f, T* a0, const T* a1, T* a2 = nullptr, T* a3 = nullptr) {
    for (long long i = 0; i < n; ++i) {
        T g = a1[i], unused2 = 0, unused3 = 0;
        f(a0[i], g, K > 2 ? a2[i] : unused2, K > 3 ? a3[i] : unused3);
    }
}
#include "optimizers.cu"

// rules.cuh's adam_kernel_scalars, for the test that holds it to Adam.kernel_scalars.
extern "C" void adam_kernel_scalars_host(double lr, double b1, double b2, double eps, int t,
                                         double* out) {
    const AdamScalars s = adam_kernel_scalars(lr, b1, b2, eps, t);
    const double values[] = {s.step, s.b1, s.one_minus_b1, s.b2, s.one_minus_b2,
                             s.inv_correction2, s.eps};
    for (int k = 0; k < 7; ++k) out[k] = values[k];
}

#define HOST_BATCHNORM(T, S)                                                                      \
extern "C" void bn_forward_##S(const T* x, const T* gamma, const T* beta, T eps, T momentum, \
        int unbiased, T* running_mean, T* running_var, T* z, T* mean, T* inv_std, int m,     \
        int n) {                                                                             \
    for (int j = 0; j < n; ++j) {                                                            \
        double s = 0, s2 = 0, shift = x[j];                                                  \
        for (int i = 0; i < m; ++i) {                                                        \
            double d = (double)x[(long long)i * n + j] - shift;                              \
            s += d;                                                                          \
            s2 += d * d;                                                                     \
        }                                                                                    \
        T scale, center;                                                                     \
        batchnorm_forward_feature<T>(s, s2, shift, m, eps, momentum, unbiased, gamma[j],     \
                                     beta[j], T(0), running_mean[j], running_var[j], mean[j], \
                                     inv_std[j], scale, center);                             \
        for (int i = 0; i < m; ++i)                                                          \
            z[(long long)i * n + j] = batchnorm_apply<T>(x[(long long)i * n + j], center, scale,  \
                                                         beta[j]);                           \
    }                                                                                        \
}                                                                                            \
extern "C" void bn_backward_##S(const T* d, const T* x, const T* gamma, const T* mean,      \
        const T* inv_std, T* dx, T* dgamma, T* dbeta, int m, int n) {                        \
    for (int j = 0; j < n; ++j) {                                                            \
        double s = 0, sc = 0;                                                                \
        for (int i = 0; i < m; ++i) {                                                        \
            long long k = (long long)i * n + j;                                              \
            s += d[k];                                                                       \
            sc += (double)d[k] * ((double)x[k] - (double)mean[j]);                           \
        }                                                                                    \
        T a, b, c;                                                                           \
        batchnorm_backward_feature<T>(s, sc, m, gamma[j], inv_std[j], a, b, c, dgamma[j],     \
                                      dbeta[j]);                                             \
        for (int i = 0; i < m; ++i) {                                                        \
            long long k = (long long)i * n + j;                                              \
            dx[k] = a * d[k] - b * (x[k] - mean[j]) - c;                                                 \
        }                                                                                    \
    }                                                                                        \
}

HOST_BATCHNORM(float, f32)
HOST_BATCHNORM(double, f64)

// rules.cuh's activations, for the test that holds them to nnopt.fast.cpu's.
#define HOST_ACTIVATION(T, S)                                                                     \
extern "C" void activate_##S(const T* v, T* out, int code, int n) {                          \
    for (int i = 0; i < n; ++i) out[i] = activate<T>(v[i], code);                            \
}                                                                                            \
extern "C" void activation_grad_##S(const T* d, const T* y, T* out, int code, int n) {       \
    for (int i = 0; i < n; ++i) out[i] = activation_grad<T>(d[i], y[i], code);               \
}
HOST_ACTIVATION(float, f32)
HOST_ACTIVATION(double, f64)
