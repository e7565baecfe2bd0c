// nnopt: one fused, in-place kernel per optimizer step over flat buffers (one read and one
// write of each buffer). float32 (_f32) and float64 (_f64) entry points.
// Kernel <rule>_S runs <rule>_rule of rules.cuh and takes what it takes, in its order: the
// element arrays (p, g, the optimizer's state), then Optimizer.kernel_scalars(group, t)
// computed on the host (Adam's bias corrections included), then the weight decay's two
// scalars (decay, shrink: NNOPT_ELEMENT below) and n. Inside a captured CUDA graph
// Adam's step count lives in device memory (Optimizer.step advances it with
// device_steps[i] += 1): adam_device_step_S computes the scalars there, with
// adam_kernel_scalars, from Adam.step_scalar_inputs (lr, b1, b2, eps), taken as doubles,
// so that 1 - b2 and the bias corrections are the host's Python-float values.
//
// Memory bandwidth: nnopt_each<K> walks the K arrays (p, g, then up to two state arrays)
// with 16-byte loads and stores (float4 / double2) in a grid-stride loop when every array
// is 16-byte aligned, then the scalar tail; a misaligned array (a view into a larger
// buffer) takes the scalar loop. g is read only; the others are written back.
#include "rules.cuh"

#ifndef NNOPT_HOST_BUILD  // tests/host_rules.cpp defines nnopt_each as a plain loop
#include "vectors.cuh"

template <int K, typename T, typename F>
__device__ __forceinline__ void nnopt_each(long long n, F f, T* __restrict__ a0,
                                           const T* __restrict__ a1, T* __restrict__ a2 = nullptr,
                                           T* __restrict__ a3 = nullptr) {
    const int W = 16 / sizeof(T);
    typedef typename NnoptVector<T, W>::type V;
    const long long first = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    unsigned long long bits = (unsigned long long)a0 | (unsigned long long)a1;
    if (K > 2) bits |= (unsigned long long)a2;
    if (K > 3) bits |= (unsigned long long)a3;
    const long long vectors = (bits % sizeof(V)) == 0 ? n / W : 0;
    for (long long v = first; v < vectors; v += stride) {
        NnoptFeatures<T, W> l0 = load_features<T, W>(a0, v * W), l1 = load_features<T, W>(a1, v * W),
                            l2, l3;
        if (K > 2) l2 = load_features<T, W>(a2, v * W);
        if (K > 3) l3 = load_features<T, W>(a3, v * W);
#pragma unroll
        for (int w = 0; w < W; ++w) f(l0.e[w], l1.e[w], l2.e[w], l3.e[w]);
        store_features<T, W>(a0, v * W, l0);
        if (K > 2) store_features<T, W>(a2, v * W, l2);
        if (K > 3) store_features<T, W>(a3, v * W, l3);
    }
    for (long long i = vectors * W + first; i < n; i += stride) {
        T g = a1[i], unused2 = 0, unused3 = 0;
        f(a0[i], g, K > 2 ? a2[i] : unused2, K > 3 ? a3[i] : unused3);
    }
}
#endif

// The per-element step of each kernel: a lambda over (p, g, state1, state2) references,
// weight decay first (Optimizer._apply_weight_decay's two forms, in the same pass): the rule
// sees g + decay p (L2), and p shrinks to shrink p before it (decoupled, AdamW: shrink =
// 1 - lr lambda). decay 0 and shrink 1 leave p and g as they are. g_ is the kernel's own
// copy of the gradient (never stored back).
#define NNOPT_ELEMENT(T, body) [=] (T& p_, T& g_, T& s1_, T& s2_) {                           \
    (void)s1_; (void)s2_;                                                                    \
    if (decay != T(0)) g_ += decay * p_;                                                     \
    if (shrink != T(1)) p_ *= shrink;                                                        \
    body;                                                                                    \
}

#define NNOPT_OPTIMIZERS(T, S)                                                                   \
extern "C" __global__ void sgd_##S(T* p, const T* g, T lr, T decay, T shrink, long long n) {     \
    nnopt_each<2, T>(n, NNOPT_ELEMENT(T, sgd_rule(p_, g_, lr)), p, g);                           \
}                                                                                                \
extern "C" __global__ void momentum_##S(T* p, const T* g, T* v, T lr, T alpha, T decay,          \
                                        T shrink, long long n) {                                 \
    nnopt_each<3, T>(n, NNOPT_ELEMENT(T, momentum_rule(p_, g_, s1_, lr, alpha)), p, g, v);       \
}                                                                                                \
extern "C" __global__ void momentum_torch_##S(T* p, const T* g, T* v, T lr, T alpha, T decay,    \
                                              T shrink, long long n) {                           \
    nnopt_each<3, T>(n, NNOPT_ELEMENT(T, momentum_torch_rule(p_, g_, s1_, lr, alpha)), p, g, v); \
}                                                                                                \
extern "C" __global__ void nag_##S(T* p, const T* g, T* v, T lr, T alpha, T decay, T shrink,     \
                                   long long n) {                                                \
    nnopt_each<3, T>(n, NNOPT_ELEMENT(T, nag_rule(p_, g_, s1_, lr, alpha)), p, g, v);            \
}                                                                                                \
extern "C" __global__ void nag_torch_##S(T* p, const T* g, T* v, T lr, T alpha, T decay,         \
                                         T shrink, long long n) {                                \
    nnopt_each<3, T>(n, NNOPT_ELEMENT(T, nag_torch_rule(p_, g_, s1_, lr, alpha)), p, g, v);      \
}                                                                                                \
extern "C" __global__ void adagrad_##S(T* p, const T* g, T* r, T lr, T eps, T decay, T shrink,   \
                                       long long n) {                                            \
    nnopt_each<3, T>(n, NNOPT_ELEMENT(T, adagrad_rule(p_, g_, s1_, lr, eps)), p, g, r);          \
}                                                                                                \
extern "C" __global__ void adadelta_##S(T* p, const T* g, T* s, T* r, T rho, T one_minus_rho,    \
                                        T eps, T scale, T decay, T shrink, long long n) {        \
    nnopt_each<4, T>(n, NNOPT_ELEMENT(T, adadelta_rule(p_, g_, s1_, s2_, rho, one_minus_rho, eps,\
                                                       scale)), p, g, s, r);                     \
}                                                                                                \
extern "C" __global__ void rmsprop_##S(T* p, const T* g, T* r, T lr, T alpha,                    \
                                       T one_minus_alpha, T eps, T decay, T shrink, long long n) {\
    nnopt_each<3, T>(n, NNOPT_ELEMENT(T, rmsprop_rule(p_, g_, s1_, lr, alpha, one_minus_alpha,   \
                                                      eps)), p, g, r);                           \
}                                                                                                \
extern "C" __global__ void rmsprop_torch_##S(T* p, const T* g, T* r, T lr, T alpha,              \
                                             T one_minus_alpha, T eps, T decay, T shrink,        \
                                             long long n) {                                      \
    nnopt_each<3, T>(n, NNOPT_ELEMENT(T, rmsprop_torch_rule(p_, g_, s1_, lr, alpha,              \
                                                            one_minus_alpha, eps)), p, g, r);    \
}                                                                                                \
extern "C" __global__ void adam_##S(T* p, const T* g, T* m, T* v, T step, T b1,                  \
                                    T one_minus_b1, T b2, T one_minus_b2, T inv_correction2,     \
                                    T eps, T decay, T shrink, long long n) {                     \
    nnopt_each<4, T>(n, NNOPT_ELEMENT(T, adam_rule(p_, g_, s1_, s2_, step, b1, one_minus_b1, b2, \
                                                   one_minus_b2, inv_correction2, eps)),         \
                     p, g, m, v);                                                                \
}                                                                                                \
extern "C" __global__ void adam_device_step_##S(T* p, const T* g, T* m, T* v, const int* t,      \
                                                double lr, double b1, double b2, double eps,     \
                                                T decay, T shrink, long long n) {                \
    const AdamScalars s = adam_kernel_scalars(lr, b1, b2, eps, *t);                              \
    const T step = (T)s.step, c1 = (T)s.b1, d1 = (T)s.one_minus_b1, c2 = (T)s.b2,                \
            d2 = (T)s.one_minus_b2, inv2 = (T)s.inv_correction2, e = (T)s.eps;                   \
    nnopt_each<4, T>(n, NNOPT_ELEMENT(T, adam_rule(p_, g_, s1_, s2_, step, c1, d1, c2, d2, inv2, \
                                                   e)), p, g, m, v);                             \
}

NNOPT_OPTIMIZERS(float, f32)
NNOPT_OPTIMIZERS(double, f64)
