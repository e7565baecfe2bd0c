// nnopt: per-element update rules and BN formulas, shared by every CUDA kernel.
// They mirror the reference formulas of nnopt.optim and nnopt.batchnorm (and the numba
// rules of nnopt.fast.cpu). Compiled for the GPU by NVRTC/nvcc, and for the host by the
// tests with NNOPT_DEVICE defined away (-DNNOPT_DEVICE=inline), to check the math on CPUs.
#ifndef NNOPT_RULES_CUH
#define NNOPT_RULES_CUH

#ifndef NNOPT_DEVICE
#define NNOPT_DEVICE __device__ __forceinline__
#endif

// SGD: p -= lr g
template <typename T>
NNOPT_DEVICE void sgd_rule(T& p, T g, T lr) { p -= lr * g; }

// Momentum, textbook: v = alpha v - lr g; p += v
template <typename T>
NNOPT_DEVICE void momentum_rule(T& p, T g, T& v, T lr, T alpha) {
    v = alpha * v - lr * g;
    p += v;
}

// Momentum, PyTorch: b = alpha b + g; p -= lr b
template <typename T>
NNOPT_DEVICE void momentum_torch_rule(T& p, T g, T& v, T lr, T alpha) {
    v = alpha * v + g;
    p -= lr * v;
}

// NAG at the stored look-ahead point: v = alpha v - lr g; p += alpha v - lr g
template <typename T>
NNOPT_DEVICE void nag_rule(T& p, T g, T& v, T lr, T alpha) {
    v = alpha * v - lr * g;
    p += alpha * v - lr * g;
}

// NAG, PyTorch: b = alpha b + g; p -= lr (g + alpha b)
template <typename T>
NNOPT_DEVICE void nag_torch_rule(T& p, T g, T& v, T lr, T alpha) {
    v = alpha * v + g;
    p -= lr * (g + alpha * v);
}

// AdaGrad: r += g^2; p -= lr g / (eps + sqrt(r))
template <typename T>
NNOPT_DEVICE void adagrad_rule(T& p, T g, T& r, T lr, T eps) {
    r += g * g;
    p -= lr * g / (eps + sqrt(r));
}

// AdaDelta: s = rho s + (1-rho) g^2; d = sqrt((r+eps)/(s+eps)) g; p -= scale d;
// r = rho r + (1-rho) d^2   (scale = 1 in the textbook, lr in PyTorch's variant)
template <typename T>
NNOPT_DEVICE void adadelta_rule(T& p, T g, T& s, T& r, T rho, T eps, T scale) {
    s = rho * s + (T(1) - rho) * g * g;
    T d = sqrt((r + eps) / (s + eps)) * g;
    p -= scale * d;
    r = rho * r + (T(1) - rho) * d * d;
}

// RMSProp: r = alpha r + (1-alpha) g^2; p -= lr g / sqrt(r + eps)  (eps inside, textbook)
template <typename T>
NNOPT_DEVICE void rmsprop_rule(T& p, T g, T& r, T lr, T alpha, T eps) {
    r = alpha * r + (T(1) - alpha) * g * g;
    p -= lr * g / sqrt(r + eps);
}

// RMSProp, PyTorch: p -= lr g / (sqrt(r) + eps)
template <typename T>
NNOPT_DEVICE void rmsprop_torch_rule(T& p, T g, T& r, T lr, T alpha, T eps) {
    r = alpha * r + (T(1) - alpha) * g * g;
    p -= lr * g / (sqrt(r) + eps);
}

// Adam: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= lr (m / c1) / (eps + sqrt(v / c2)), c1 = 1 - b1^t, c2 = 1 - b2^t
template <typename T>
NNOPT_DEVICE void adam_rule(T& p, T g, T& m, T& v, T step, T b1, T b2, T inv_c2, T eps) {
    m = b1 * m + (T(1) - b1) * g;
    v = b2 * v + (T(1) - b2) * g * g;
    p -= step * m / (eps + sqrt(v * inv_c2));   // step = lr / c1
}

// BN: from per-feature sums about a shift (the first row), the mean and 1/sqrt(var+eps),
// the running statistics, and z = x * scale + offset.
template <typename T>
NNOPT_DEVICE void bn_finalize(double sum, double sum_sq, double shift, int m, T eps,
                              T momentum, int unbiased, T gamma, T beta, T& running_mean,
                              T& running_var, T& mean_out, T& inv_std_out, T& scale, T& offset) {
    double mu_shifted = sum / m;
    double var = sum_sq / m - mu_shifted * mu_shifted;
    var = var > 0.0 ? var : 0.0;
    double mean = shift + mu_shifted;
    double inv_std = 1.0 / sqrt(var + (double)eps);
    double stored_var = unbiased ? var * m / (m - 1) : var;
    mean_out = (T)mean;
    inv_std_out = (T)inv_std;
    running_mean = momentum * running_mean + (T(1) - momentum) * (T)mean;
    running_var = momentum * running_var + (T(1) - momentum) * (T)stored_var;
    scale = (T)(gamma * inv_std);
    offset = (T)(beta - mean * gamma * inv_std);
}

// BN backward: with sum_d = sum(d), sum_dn = sum(d * n), n = (x - mean) inv_std,
// dx = gamma inv_std (d - sum_d/m - n sum_dn/m) = a d - b (x - mean) - c.
template <typename T>
NNOPT_DEVICE void bn_backward_coefficients(double sum_d, double sum_dn, int m, T gamma,
                                           T inv_std, T& a, T& b, T& c) {
    double ad = (double)gamma * inv_std;
    a = (T)ad;
    b = (T)(ad * sum_dn * inv_std / m);
    c = (T)(ad * sum_d / m);
}

#endif
