// nnopt: W consecutive elements loaded or stored as one 16-byte vector (W = 4 float32 as a
// float4, 2 float64 as a double2), or one element (W = 1): the optimizer kernels' vector
// loop (optimizers.cu) and BN's row walks and the fused products' shared loads
// (batchnorm.cu).
#ifndef NNOPT_VECTORS_CUH
#define NNOPT_VECTORS_CUH

// A 16-byte access to an address that is not a multiple of 16 faults on a GPU ("misaligned
// address") and poisons the context; the host emulation (tests/host_cuda.h) defines this
// hook to report it. On the device it is nothing.
#ifndef NNOPT_VECTOR_ACCESS
#define NNOPT_VECTOR_ACCESS(address, bytes)
#endif

template <typename T, int W> struct NnoptVector;
template <typename T> struct NnoptVector<T, 1> { typedef T type; };
template <> struct NnoptVector<float, 4> { typedef float4 type; };
template <> struct NnoptVector<double, 2> { typedef double2 type; };

template <typename T, int W> union NnoptFeatures {
    typename NnoptVector<T, W>::type v;
    T e[W];
};

template <typename T, int W>
__device__ __forceinline__ NnoptFeatures<T, W> load_features(const T* __restrict__ a,
                                                             long long k) {
    NnoptFeatures<T, W> f;
    NNOPT_VECTOR_ACCESS(a + k, sizeof(f.v));
    f.v = *reinterpret_cast<const typename NnoptVector<T, W>::type*>(a + k);
    return f;
}

template <typename T, int W>
__device__ __forceinline__ void store_features(T* __restrict__ a, long long k,
                                               const NnoptFeatures<T, W>& f) {
    NNOPT_VECTOR_ACCESS(a + k, sizeof(f.v));
    *reinterpret_cast<typename NnoptVector<T, W>::type*>(a + k) = f.v;
}

#endif
