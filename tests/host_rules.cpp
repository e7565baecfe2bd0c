// Host build of kernels/rules.cuh (CUDA qualifiers defined away) for the tests: the same
// per-element formulas as the GPU kernels, applied in plain loops, called through ctypes.
#include <cmath>
using std::pow;
using std::sqrt;
#define NNOPT_DEVICE inline
#include "rules.cuh"

#define HOST_RULES(T, S)                                                                      \
extern "C" void sgd_##S(T* p, const T* g, T lr, long long n) {                               \
    for (long long i = 0; i < n; ++i) sgd_rule(p[i], g[i], lr);                              \
}                                                                                            \
extern "C" void velocity_##S(int kind, T* p, const T* g, T* v, T lr, T alpha, long long n) {  \
    for (long long i = 0; i < n; ++i) {                                                      \
        if (kind == 0) momentum_rule(p[i], g[i], v[i], lr, alpha);                           \
        else if (kind == 1) momentum_torch_rule(p[i], g[i], v[i], lr, alpha);                \
        else if (kind == 2) nag_rule(p[i], g[i], v[i], lr, alpha);                           \
        else nag_torch_rule(p[i], g[i], v[i], lr, alpha);                                    \
    }                                                                                        \
}                                                                                            \
extern "C" void adagrad_##S(T* p, const T* g, T* r, T lr, T eps, long long n) {              \
    for (long long i = 0; i < n; ++i) adagrad_rule(p[i], g[i], r[i], lr, eps);               \
}                                                                                            \
extern "C" void adadelta_##S(T* p, const T* g, T* s, T* r, T rho, T eps, T scale,            \
                             long long n) {                                                  \
    for (long long i = 0; i < n; ++i) adadelta_rule(p[i], g[i], s[i], r[i], rho, eps, scale); \
}                                                                                            \
extern "C" void rmsprop_##S(int torch_form, T* p, const T* g, T* r, T lr, T alpha, T eps,    \
                            long long n) {                                                   \
    for (long long i = 0; i < n; ++i) {                                                      \
        if (torch_form) rmsprop_torch_rule(p[i], g[i], r[i], lr, alpha, eps);                \
        else rmsprop_rule(p[i], g[i], r[i], lr, alpha, eps);                                 \
    }                                                                                        \
}                                                                                            \
extern "C" void adam_##S(T* p, const T* g, T* m, T* v, int t, T lr, T b1, T b2, T eps,       \
                         long long n) {                                                      \
    double step = lr / (1.0 - pow((double)b1, (double)t));                                   \
    double inv_c2 = 1.0 / (1.0 - pow((double)b2, (double)t));                                \
    for (long long i = 0; i < n; ++i)                                                        \
        adam_rule(p[i], g[i], m[i], v[i], (T)step, b1, b2, (T)inv_c2, eps);                  \
}                                                                                            \
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
        T scale, offset;                                                                     \
        bn_finalize<T>(s, s2, shift, m, eps, momentum, unbiased, gamma[j], beta[j],          \
                       running_mean[j], running_var[j], mean[j], inv_std[j], scale, offset); \
        for (int i = 0; i < m; ++i)                                                          \
            z[(long long)i * n + j] = x[(long long)i * n + j] * scale + offset;              \
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
        double sum_dn = sc * inv_std[j];                                                     \
        dgamma[j] += (T)sum_dn;                                                              \
        dbeta[j] += (T)s;                                                                    \
        T a, b, c;                                                                           \
        bn_backward_coefficients<T>(s, sum_dn, m, gamma[j], inv_std[j], a, b, c);   \
        for (int i = 0; i < m; ++i) {                                                        \
            long long k = (long long)i * n + j;                                              \
            dx[k] = a * d[k] - b * (x[k] - mean[j]) - c;                                                 \
        }                                                                                    \
    }                                                                                        \
}

HOST_RULES(float, f32)
HOST_RULES(double, f64)
