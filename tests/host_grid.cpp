// Host build of the grid-shaped kernels (kernels/optimizers.cu's vector loads and scalar
// tail, kernels/batchnorm.cu's split path) with CUDA's block and thread indices emulated:
// the tests run every (block, thread) of a small grid one after the other, which is exact
// for kernels whose threads never share memory or synchronize.
#include <cmath>
using std::pow;
using std::sqrt;
using std::exp;
using std::tanh;
struct float4 { float x, y, z, w; };
struct double2 { double x, y; };
struct Dim3 { unsigned x, y, z; };
static Dim3 blockIdx, threadIdx, gridDim, blockDim;
#define __device__
#define __forceinline__ inline
#define __global__
#define NNOPT_DEVICE inline
#include "rules.cuh"

// optimizers.cu with its device nnopt_each (NNOPT_HOST_BUILD left undefined)
#include "optimizers.cu"

// batchnorm.cu's split kernels (its shared-memory kernels need a real GPU)
#define NNOPT_HOST_BUILD
#include "batchnorm.cu"

extern "C" void set_thread(unsigned grid_x, unsigned grid_y, unsigned block_x, unsigned bx,
                           unsigned by, unsigned tx) {
    gridDim = {grid_x, grid_y, 1};
    blockDim = {block_x, 1, 1};
    blockIdx = {bx, by, 0};
    threadIdx = {tx, 0, 0};
}
