// Host build of the grid-shaped kernels (kernels/optimizers.cu's vector loads and scalar
// tail, kernels/batchnorm.cu's split path and its bias/activation kernels) with CUDA's
// block and thread indices emulated (tests/host_cuda.h): the tests run every (block,
// thread) of a small grid one after the other, which is exact for kernels whose threads
// never share memory or synchronize. tests/emulated_gpu.py runs the others.
#include "host_cuda.h"
#define NNOPT_DEVICE inline
#include "rules.cuh"
#include "optimizers.cu"
#include "batchnorm.cu"
