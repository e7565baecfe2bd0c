// nnopt: one fused, in-place kernel per optimizer step over flat buffers (one read and one
// write of each buffer). Grid-stride loops; float32 (_f32) and float64 (_f64) entry points.
// Kernel <rule>_S runs <rule>_rule of rules.cuh and takes what it takes, in its order: the
// element arrays (p, g, the optimizer's state), then Optimizer.kernel_scalars(group, t)
// computed on the host (Adam's bias corrections included). Inside a captured CUDA graph
// Adam's step count lives in device memory (Optimizer.step advances it with
// device_steps[i] += 1): adam_device_step_S computes the scalars there, with
// adam_kernel_scalars, from Adam.step_scalar_inputs (lr, b1, b2, eps).
#include "rules.cuh"

#ifndef NNOPT_LOOP  // tests/host_rules.cpp compiles this file for the host with a plain loop
#define NNOPT_LOOP for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; \
                        i += (long long)gridDim.x * blockDim.x)
#endif

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
extern "C" __global__ void adadelta_##S(T* p, const T* g, T* s, T* r, T rho, T one_minus_rho, \
                                        T eps, T scale, long long n) {                       \
    NNOPT_LOOP { adadelta_rule(p[i], g[i], s[i], r[i], rho, one_minus_rho, eps, scale); }     \
}                                                                                            \
extern "C" __global__ void rmsprop_##S(T* p, const T* g, T* r, T lr, T alpha,                \
                                       T one_minus_alpha, T eps, long long n) {              \
    NNOPT_LOOP { rmsprop_rule(p[i], g[i], r[i], lr, alpha, one_minus_alpha, eps); }          \
}                                                                                            \
extern "C" __global__ void rmsprop_torch_##S(T* p, const T* g, T* r, T lr, T alpha,          \
                                             T one_minus_alpha, T eps, long long n) {        \
    NNOPT_LOOP { rmsprop_torch_rule(p[i], g[i], r[i], lr, alpha, one_minus_alpha, eps); }    \
}                                                                                            \
extern "C" __global__ void adam_##S(T* p, const T* g, T* m, T* v, T step, T b1,              \
                                    T one_minus_b1, T b2, T one_minus_b2, T inv_correction2, \
                                    T eps, long long n) {                                    \
    NNOPT_LOOP { adam_rule(p[i], g[i], m[i], v[i], step, b1, one_minus_b1, b2, one_minus_b2, \
                           inv_correction2, eps); }                                          \
}                                                                                            \
extern "C" __global__ void adam_device_step_##S(T* p, const T* g, T* m, T* v, const int* t,  \
                                                T lr, T b1, T b2, T eps, long long n) {      \
    const AdamScalars s = adam_kernel_scalars(lr, b1, b2, eps, *t);                          \
    NNOPT_LOOP { adam_rule(p[i], g[i], m[i], v[i], (T)s.step, (T)s.b1, (T)s.one_minus_b1,    \
                           (T)s.b2, (T)s.one_minus_b2, (T)s.inv_correction2, (T)s.eps); }    \
}

NNOPT_OPTIMIZERS(float, f32)
NNOPT_OPTIMIZERS(double, f64)
