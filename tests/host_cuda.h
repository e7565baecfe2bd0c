// The CUDA features nnopt's kernels use, emulated on the host, so the tests can compile
// kernels/*.cu with g++ and run them on the CPU:
//   - blockIdx/threadIdx/gridDim/blockDim: thread-local, set by nnopt_set_thread;
//   - __shared__: one static copy, which is right because the tests run one block at a
//     time (tests/emulated_gpu.py);
//   - __syncthreads: a barrier over the block's threads; kernels that use it run each
//     thread of a block on a host thread of its own (nnopt_run_block), the others run
//     their threads one after the other;
//   - float4/double2 (16-byte vector loads), CUDA's qualifiers defined away.
#ifndef NNOPT_HOST_CUDA_H
#define NNOPT_HOST_CUDA_H
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>
using std::exp;
using std::log;
using std::nan;
using std::pow;
using std::sqrt;
using std::tanh;

struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct Dim3 { unsigned x, y, z; };
static thread_local Dim3 blockIdx, threadIdx, gridDim, blockDim;

#define __device__
#define __forceinline__ inline
#define __global__
#define __shared__ static

static std::mutex nnopt_barrier_mutex;
static std::condition_variable nnopt_barrier_changed;
static int nnopt_block_threads = 1, nnopt_arrived = 0;
static unsigned long long nnopt_generation = 0;

// True on the threads of nnopt_run_block; a kernel whose threads run one after the other
// must not synchronize (the launcher reports it: nnopt_take_misuse).
static thread_local bool nnopt_threaded = false;
static int nnopt_misuse = 0;

extern "C" int nnopt_take_misuse() {
    const int misuse = nnopt_misuse;
    nnopt_misuse = 0;
    return misuse;
}

static inline void __syncthreads() {
    if (!nnopt_threaded) {
        nnopt_misuse = 1;
        return;
    }
    std::unique_lock<std::mutex> lock(nnopt_barrier_mutex);
    const unsigned long long generation = nnopt_generation;
    if (++nnopt_arrived == nnopt_block_threads) {
        nnopt_arrived = 0;
        ++nnopt_generation;
        nnopt_barrier_changed.notify_all();
    } else {
        nnopt_barrier_changed.wait(lock, [&] { return nnopt_generation != generation; });
    }
}

extern "C" void nnopt_begin_block(int threads) {
    std::lock_guard<std::mutex> lock(nnopt_barrier_mutex);
    nnopt_block_threads = threads;
    nnopt_arrived = 0;
}

// Runs thread(tx, ty) for every thread of a block, each on its own host thread.
template <typename F> void nnopt_run_block(unsigned block_x, unsigned block_y, F thread) {
    nnopt_begin_block((int)(block_x * block_y));
    std::vector<std::thread> threads;
    for (unsigned ty = 0; ty < block_y; ++ty)
        for (unsigned tx = 0; tx < block_x; ++tx)
            threads.emplace_back([&thread](unsigned x, unsigned y) {
                nnopt_threaded = true;
                thread(x, y);
            }, tx, ty);
    for (auto& t : threads) t.join();
}

extern "C" void nnopt_set_thread(unsigned grid_x, unsigned grid_y, unsigned block_x,
                                 unsigned block_y, unsigned bx, unsigned by, unsigned tx,
                                 unsigned ty) {
    gridDim = {grid_x, grid_y, 1};
    blockDim = {block_x, block_y, 1};
    blockIdx = {bx, by, 0};
    threadIdx = {tx, ty, 0};
}
#endif
