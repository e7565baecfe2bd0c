// The CUDA features nnopt's kernels use, emulated on the host, so the tests can compile
// kernels/*.cu with g++ and run them on the CPU:
//   - blockIdx/threadIdx/gridDim/blockDim: set by nnopt_set_thread (and the fiber scheduler);
//   - __shared__: one static copy, which is right because the tests run one block at a
//     time (tests/emulated_gpu.py);
//   - __syncthreads: a barrier over the block's threads; kernels that use it run the
//     threads of a block as fibers switched at each barrier (nnopt_run_block), the others
//     run their threads one after the other;
//   - float4/double2 (16-byte vector loads), CUDA's qualifiers defined away;
//   - __threadfence, atomicAdd on int and __ldcg, trivially (one block at a time).
#ifndef NNOPT_HOST_CUDA_H
#define NNOPT_HOST_CUDA_H
#include <ucontext.h>

#include <cmath>
#include <functional>
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

// One block runs at a time, its threads one after another between barriers: memory is
// always coherent and an atomic is a plain read-modify-write.
static inline void __threadfence() {}
static inline int atomicAdd(int* address, int value) {
    const int old = *address;
    *address += value;
    return old;
}
template <typename T> static inline T __ldcg(const T* address) { return *address; }
#define __global__
#define __shared__ static

// False outside nnopt_run_block: a kernel whose threads run one after the other must not
// synchronize (the launcher reports it: nnopt_take_misuse, bit NNOPT_UNSYNCHRONIZED).
static bool nnopt_in_fibers = false;
static int nnopt_misuse = 0;
enum { NNOPT_UNSYNCHRONIZED = 1, NNOPT_MISALIGNED = 2 };

// kernels/vectors.cuh's 16-byte loads and stores: on a GPU an address that is not a multiple
// of the access's size faults; here it only sets NNOPT_MISALIGNED (the host would not care).
#define NNOPT_VECTOR_ACCESS(address, bytes) \
    (reinterpret_cast<unsigned long long>(address) % (bytes) ? (void)(nnopt_misuse |= NNOPT_MISALIGNED) \
                                                             : (void)0)

extern "C" int nnopt_take_misuse() {
    const int misuse = nnopt_misuse;
    nnopt_misuse = 0;
    return misuse;
}

// A block whose kernel synchronizes runs its threads as fibers on the calling thread
// (ucontext): each runs up to its next __syncthreads (or its end), then the next one;
// round after round until all are done. So no thread passes a barrier before every
// thread of the block has reached it, as on a GPU, at the cost of a context switch.
struct NnoptFiber {
    ucontext_t context;
    unsigned tx, ty;
    bool done;
};
static const size_t NNOPT_FIBER_STACK = 64 * 1024;
static ucontext_t nnopt_scheduler;
static std::vector<NnoptFiber> nnopt_fibers;
static std::vector<std::vector<char>> nnopt_stacks;
static size_t nnopt_running = 0;
static const std::function<void(unsigned, unsigned)>* nnopt_fiber_body = nullptr;

static void nnopt_fiber_main() {
    const NnoptFiber& fiber = nnopt_fibers[nnopt_running];
    (*nnopt_fiber_body)(fiber.tx, fiber.ty);
    nnopt_fibers[nnopt_running].done = true;
    swapcontext(&nnopt_fibers[nnopt_running].context, &nnopt_scheduler);
}

static inline void __syncthreads() {
    if (!nnopt_in_fibers) {
        nnopt_misuse |= NNOPT_UNSYNCHRONIZED;
        return;
    }
    swapcontext(&nnopt_fibers[nnopt_running].context, &nnopt_scheduler);
}

// Runs thread(tx, ty) for every thread of a block, as fibers (see above).
template <typename F> void nnopt_run_block(unsigned block_x, unsigned block_y, F thread) {
    const size_t n = (size_t)block_x * block_y;
    const std::function<void(unsigned, unsigned)> body = thread;
    nnopt_fiber_body = &body;
    nnopt_fibers.assign(n, NnoptFiber());
    if (nnopt_stacks.size() < n) nnopt_stacks.resize(n);
    for (size_t i = 0; i < n; ++i) {
        NnoptFiber& fiber = nnopt_fibers[i];
        nnopt_stacks[i].resize(NNOPT_FIBER_STACK);
        getcontext(&fiber.context);
        fiber.context.uc_stack.ss_sp = nnopt_stacks[i].data();
        fiber.context.uc_stack.ss_size = NNOPT_FIBER_STACK;
        fiber.context.uc_link = nullptr;
        makecontext(&fiber.context, nnopt_fiber_main, 0);
        fiber.tx = (unsigned)(i % block_x);
        fiber.ty = (unsigned)(i / block_x);
        fiber.done = false;
    }
    nnopt_in_fibers = true;
    for (bool running = true; running;) {
        running = false;
        for (size_t i = 0; i < n; ++i) {
            if (nnopt_fibers[i].done) continue;
            nnopt_running = i;
            threadIdx = {nnopt_fibers[i].tx, nnopt_fibers[i].ty, 0};  // blockIdx & co: shared
            swapcontext(&nnopt_scheduler, &nnopt_fibers[i].context);
            running = running || !nnopt_fibers[i].done;
        }
    }
    nnopt_in_fibers = false;
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
