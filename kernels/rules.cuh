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
NNOPT_DEVICE void adadelta_rule(T& p, T g, T& s, T& r, T rho, T one_minus_rho, T eps, T scale) {
    s = rho * s + one_minus_rho * g * g;
    T d = sqrt((r + eps) / (s + eps)) * g;
    p -= scale * d;
    r = rho * r + one_minus_rho * d * d;
}

// RMSProp: r = alpha r + (1-alpha) g^2; p -= lr g / sqrt(r + eps)  (eps inside, textbook)
template <typename T>
NNOPT_DEVICE void rmsprop_rule(T& p, T g, T& r, T lr, T alpha, T one_minus_alpha, T eps) {
    r = alpha * r + one_minus_alpha * g * g;
    p -= lr * g / sqrt(r + eps);
}

// RMSProp, PyTorch: p -= lr g / (sqrt(r) + eps)
template <typename T>
NNOPT_DEVICE void rmsprop_torch_rule(T& p, T g, T& r, T lr, T alpha, T one_minus_alpha, T eps) {
    r = alpha * r + one_minus_alpha * g * g;
    p -= lr * g / (sqrt(r) + eps);
}

// Adam: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= lr (m / c1) / (eps + sqrt(v / c2)), c1 = 1 - b1^t, c2 = 1 - b2^t,
// with step = lr / c1 and inv_correction2 = 1 / c2 (Adam.kernel_scalars)
template <typename T>
NNOPT_DEVICE void adam_rule(T& p, T g, T& m, T& v, T step, T b1, T one_minus_b1, T b2,
                            T one_minus_b2, T inv_correction2, T eps) {
    m = b1 * m + one_minus_b1 * g;
    v = b2 * v + one_minus_b2 * g * g;
    p -= step * m / (eps + sqrt(v * inv_correction2));
}

// Adam's kernel scalars at step t, in adam_rule's order: the translation of
// nnopt.optim.adaptive.adam_kernel_scalars, for kernels whose t lives in device memory
// (captured CUDA graphs). Computed in double, like the Python float arithmetic.
struct AdamScalars {
    double step, b1, one_minus_b1, b2, one_minus_b2, inv_correction2, eps;
};

NNOPT_DEVICE AdamScalars adam_kernel_scalars(double lr, double b1, double b2, double eps, int t) {
    return AdamScalars{lr / (1.0 - pow(b1, (double)t)), b1, 1.0 - b1, b2, 1.0 - b2,
                       1.0 / (1.0 - pow(b2, (double)t)), eps};
}

// BN: translations of nnopt.batchnorm's factored form (its docstring has the derivation),
// the same steps under the same names, per feature, in double.
// batchnorm_statistics: mean, biased variance and 1/sqrt(var + eps) from the sums of
// x - shift and (x - shift)^2 (shift: the first row).
NNOPT_DEVICE void batchnorm_statistics(double sum_dev, double sum_sq_dev, double shift, int m,
                                       double eps, double& mean, double& var, double& inv_std) {
    double mu_shifted = sum_dev / m;
    var = sum_sq_dev / m - mu_shifted * mu_shifted;
    var = var > 0.0 ? var : 0.0;
    mean = shift + mu_shifted;
    inv_std = 1.0 / sqrt(var + eps);
}

// batchnorm_scale: gamma / sqrt(var + eps)
NNOPT_DEVICE double batchnorm_scale(double gamma, double inv_std) {
    return gamma * inv_std;
}

// batchnorm_apply: z = (x - mean) * scale + beta (centred first: a constant feature is beta)
template <typename T>
NNOPT_DEVICE T batchnorm_apply(T x, T mean, T scale, T beta) {
    return (x - mean) * scale + beta;
}

// BatchNorm._update_running: running = momentum running + (1 - momentum) batch value
template <typename T>
NNOPT_DEVICE void batchnorm_update_running(double mean, double var, int m, T momentum,
                                           int unbiased, T& running_mean, T& running_var) {
    double stored_var = unbiased ? var * m / (m - 1) : var;
    running_mean = momentum * running_mean + (T(1) - momentum) * (T)mean;
    running_var = momentum * running_var + (T(1) - momentum) * (T)stored_var;
}

// batchnorm_backward_coefficients: from sum_d = sum(d) and sum_dc = sum(d (x - mean)),
// dx = a d - b (x - mean) - c, and dgamma = sum(d n), dbeta = sum(d).
NNOPT_DEVICE void batchnorm_backward_coefficients(double sum_d, double sum_dc, int m,
                                                  double gamma, double inv_std, double& a,
                                                  double& b, double& c, double& dgamma,
                                                  double& dbeta) {
    dgamma = sum_dc * inv_std;
    dbeta = sum_d;
    a = gamma * inv_std;
    b = a * dgamma * inv_std / m;
    c = a * dbeta / m;
}

// One feature's forward statistics, from its shifted sums: mean and inv_std stored, the
// running statistics updated, and z's (scale, center): z = (x - center) scale + beta, in T
// (every forward kernel's step).
// ``bias``: a Linear bias left out of x (nnopt.block): it cancels from z, mean and inv_std,
// and only shifts the running mean, which is that of x + bias (0: no bias).
template <typename T>
NNOPT_DEVICE void batchnorm_forward_feature(double sum_dev, double sum_sq_dev, double shift,
                                            int m, T eps, T momentum, int unbiased, T gamma,
                                            T beta, T bias, T& running_mean, T& running_var,
                                            T& mean_out, T& inv_std_out, T& scale, T& center) {
    double mean, var, inv_std;
    batchnorm_statistics(sum_dev, sum_sq_dev, shift, m, eps, mean, var, inv_std);
    mean_out = (T)mean;
    inv_std_out = (T)inv_std;
    batchnorm_update_running<T>(mean + (double)bias, var, m, momentum, unbiased, running_mean,
                                running_var);
    scale = (T)batchnorm_scale(gamma, inv_std);
    center = (T)mean;
}

// One feature's backward coefficients in T, dgamma and dbeta accumulated.
template <typename T>
NNOPT_DEVICE void batchnorm_backward_feature(double sum_d, double sum_dc, int m, T gamma,
                                             T inv_std, T& a, T& b, T& c, T& dgamma, T& dbeta) {
    double a_d, b_d, c_d, dgamma_d, dbeta_d;
    batchnorm_backward_coefficients(sum_d, sum_dc, m, gamma, inv_std, a_d, b_d, c_d, dgamma_d,
                                    dbeta_d);
    a = (T)a_d;
    b = (T)b_d;
    c = (T)c_d;
    dgamma += (T)dgamma_d;
    dbeta += (T)dbeta_d;
}

// --- activations, by code (nnopt.fast.cpu.ACTIVATION_CODES) --------------------------------
// A block's kernels apply the activation as they write their output and its derivative as
// they read the incoming gradient, from the output y alone (as nnopt.fast.cpu does).
#define NNOPT_IDENTITY 0
#define NNOPT_RELU 1
#define NNOPT_SIGMOID 2
#define NNOPT_TANH 3

template <typename T>
NNOPT_DEVICE T activate(T v, int code) {
    if (code == NNOPT_RELU) return v <= T(0) ? T(0) : v;  // NaN passes on
    if (code == NNOPT_SIGMOID) return T(1) / (T(1) + exp(-v));
    if (code == NNOPT_TANH) return tanh(v);
    return v;
}

template <typename T>
NNOPT_DEVICE T activation_grad(T d, T y, int code) {
    if (code == NNOPT_RELU) return y > T(0) ? d : T(0) * d;
    if (code == NNOPT_SIGMOID) return d * y * (T(1) - y);
    if (code == NNOPT_TANH) return d * (T(1) - y * y);
    return d;
}

// activation_grad of element k, reading y[k] only where the activation needs it (plain BN:
// one buffer fewer to stream through memory)
template <typename T>
NNOPT_DEVICE T activation_grad_at(const T* d, const T* y, long long k, int code) {
    return code == NNOPT_IDENTITY ? d[k] : activation_grad<T>(d[k], y[k], code);
}

// --- softmax cross-entropy, one row of c logits z (kernels/loss.cu, and the fused last
// block of batchnorm.cu): prob = softmax(z), grad = (prob - onehot(label)) / m; returns
// the row's loss -(z[label] - max - log(sum exp(z - max))), in double, or 0 with ++bad
// for a label outside [0, c) (its grad then has no one-hot term).
template <typename T, typename L>
NNOPT_DEVICE double softmax_cross_entropy_row(const T* z, L label_in, int c, int m, T* prob,
                                              T* grad, int& bad) {
    T top = z[0];
    for (int k = 1; k < c; ++k) top = z[k] > top ? z[k] : top;
    double sum_exp = 0.0;
    for (int k = 0; k < c; ++k) {
        const T e = exp(z[k] - top);
        prob[k] = e;
        sum_exp += (double)e;
    }
    long long label = (long long)label_in;
    double loss = 0.0;
    if (label < 0 || label >= c) {
        ++bad;
        label = -1;
    } else {
        loss = -((double)(z[label] - top) - log(sum_exp));
    }
    const double inv_sum = 1.0 / sum_exp;
    for (int k = 0; k < c; ++k) {
        const T p = (T)((double)prob[k] * inv_sum);
        prob[k] = p;
        grad[k] = (p - (k == label ? T(1) : T(0))) / (T)m;
    }
    return loss;
}

#endif
