// nnopt: one fused, in-place kernel per optimizer step over flat buffers (one read and one
// write of each buffer). Grid-stride loops; float32 (_f32) and float64 (_f64) entry points.
// Adam's bias corrections are computed on the device from the step count t: passed by
// value normally, read from device memory (adam_device_step_*) inside a captured CUDA
// graph, whose replays then advance it with increment_step.
#include "rules.cuh"

#define NNOPT_LOOP for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; \
                        i += (long long)gridDim.x * blockDim.x)

#define NNOPT_OPTIMIZERS(T, S)                                                               \
extern "C" __global__ void sgd_##S(T* p, const T* g, T lr, long long n) {                    \
    NNOPT_LOOP { sgd_rule(p[i], g[i], lr); }                                                 \
}                                                                                            \
extern "C" __global__ void momentum_##S(T* p, const T* g, T* v, T lr, T alpha, long long n) { \
    NNOPT_LOOP { momentum_rule(p[i], g[i], v[i], lr, alpha); }                               \
}                                                                                            \
extern "C" __global__ void momentum_torch_##S(T* p, const T* g, T* v, T lr, T alpha,         \
                                              long long n) {                                 \
    NNOPT_LOOP { momentum_torch_rule(p[i], g[i], v[i], lr, alpha); }                         \
}                                                                                            \
extern "C" __global__ void nag_##S(T* p, const T* g, T* v, T lr, T alpha, long long n) {      \
    NNOPT_LOOP { nag_rule(p[i], g[i], v[i], lr, alpha); }                                    \
}                                                                                            \
extern "C" __global__ void nag_torch_##S(T* p, const T* g, T* v, T lr, T alpha, long long n) { \
    NNOPT_LOOP { nag_torch_rule(p[i], g[i], v[i], lr, alpha); }                              \
}                                                                                            \
extern "C" __global__ void adagrad_##S(T* p, const T* g, T* r, T lr, T eps, long long n) {    \
    NNOPT_LOOP { adagrad_rule(p[i], g[i], r[i], lr, eps); }                                  \
}                                                                                            \
extern "C" __global__ void adadelta_##S(T* p, const T* g, T* s, T* r, T rho, T eps, T scale, \
                                        long long n) {                                       \
    NNOPT_LOOP { adadelta_rule(p[i], g[i], s[i], r[i], rho, eps, scale); }                   \
}                                                                                            \
extern "C" __global__ void rmsprop_##S(T* p, const T* g, T* r, T lr, T alpha, T eps,         \
                                       long long n) {                                        \
    NNOPT_LOOP { rmsprop_rule(p[i], g[i], r[i], lr, alpha, eps); }                           \
}                                                                                            \
extern "C" __global__ void rmsprop_torch_##S(T* p, const T* g, T* r, T lr, T alpha, T eps,   \
                                             long long n) {                                  \
    NNOPT_LOOP { rmsprop_torch_rule(p[i], g[i], r[i], lr, alpha, eps); }                     \
}                                                                                            \
extern "C" __global__ void adam_##S(T* p, const T* g, T* m, T* v, int t, T lr, T b1, T b2,  \
                                    T eps, long long n) {                                    \
    const double step = lr / (1.0 - pow((double)b1, (double)t));                             \
    const double inv_c2 = 1.0 / (1.0 - pow((double)b2, (double)t));                          \
    NNOPT_LOOP { adam_rule(p[i], g[i], m[i], v[i], (T)step, b1, b2, (T)inv_c2, eps); }       \
}                                                                                            \
extern "C" __global__ void adam_device_step_##S(T* p, const T* g, T* m, T* v, const int* t,  \
                                                T lr, T b1, T b2, T eps, long long n) {      \
    const double step = lr / (1.0 - pow((double)b1, (double)*t));                            \
    const double inv_c2 = 1.0 / (1.0 - pow((double)b2, (double)*t));                         \
    NNOPT_LOOP { adam_rule(p[i], g[i], m[i], v[i], (T)step, b1, b2, (T)inv_c2, eps); }       \
}

NNOPT_OPTIMIZERS(float, f32)
NNOPT_OPTIMIZERS(double, f64)

// The device-side step counter of the optimizers that need one (Adam): t += 1.
extern "C" __global__ void increment_step(int* t) { *t += 1; }
