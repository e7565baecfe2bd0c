// The CUDA features nnopt's kernels use, emulated on the host, so the tests can compile
// kernels/*.cu with g++ and run them on the CPU:
//   - blockIdx/threadIdx/gridDim/blockDim: set by nnopt_set_thread (and the fiber scheduler);
//   - __shared__: one static copy, which is right because the tests run one block at a
//     time (tests/emulated_gpu.py), filled with 0xFF bytes (NaN, or -1) as each block
//     starts (nnopt_fresh_shared, which tests/emulated_gpu.py puts after each declaration),
//     so a read of what no thread of this block wrote shows, as it would on a GPU, instead
//     of quietly finding the previous block's values;
//   - __syncthreads: a barrier over the block's threads; kernels that use it run the
//     threads of a block as fibers switched at each barrier (nnopt_run_block), the others
//     run their threads one after the other;
//   - float4/double2 (16-byte vector loads), CUDA's qualifiers defined away;
//   - __threadfence, atomicAdd on int and __ldcg, trivially (one block at a time);
//   - the order threads and blocks run in (nnopt_set_order): as numbered, reversed, or
//     shuffled. A GPU promises no order, so a kernel's results must not depend on it: a
//     barrier missing between one thread's write to shared memory and another's read gives
//     other numbers in another order.
#ifndef NNOPT_HOST_CUDA_H
#define NNOPT_HOST_CUDA_H
#include <ucontext.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <unordered_map>
#include <utility>
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

// The order of a block's threads between two barriers (and of a kernel's threads that do not
// synchronize), and of a grid's blocks: NNOPT_FORWARD as numbered, NNOPT_REVERSE, or
// NNOPT_SHUFFLE, a fresh permutation each time, drawn from the seed (splitmix64).
enum { NNOPT_FORWARD = 0, NNOPT_REVERSE = 1, NNOPT_SHUFFLE = 2 };
static int nnopt_order = NNOPT_FORWARD;
static unsigned long long nnopt_order_state = 0;

extern "C" void nnopt_set_order(int order, unsigned long long seed) {
    nnopt_order = order;
    nnopt_order_state = seed;
}

static unsigned long long nnopt_next_random() {
    unsigned long long z = (nnopt_order_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// 0 .. n-1 in the order nnopt_set_order chose.
static std::vector<size_t> nnopt_schedule(size_t n) {
    std::vector<size_t> order(n);
    for (size_t i = 0; i < n; ++i) order[i] = nnopt_order == NNOPT_REVERSE ? n - 1 - i : i;
    if (nnopt_order == NNOPT_SHUFFLE) {
        for (size_t i = n; i > 1; --i) std::swap(order[i - 1], order[nnopt_next_random() % i]);
    }
    return order;
}

// Each block's __shared__ arrays start as 0xFF bytes: the first of its threads to reach a
// declaration fills it (a block's threads all pass its declarations before they can write).
static unsigned long long nnopt_block_serial = 0;  // the block running: 1, 2, ...
static std::unordered_map<void*, unsigned long long> nnopt_filled;  // array -> its block

static void nnopt_next_block() { ++nnopt_block_serial; }

static inline void nnopt_fresh_shared(void* address, size_t bytes) {
    unsigned long long& filled_for = nnopt_filled[address];  // 0 the first time
    if (filled_for == nnopt_block_serial) return;
    std::memset(address, 0xFF, bytes);
    filled_for = nnopt_block_serial;
}

// A block whose kernel synchronizes runs its threads as fibers on the calling thread
// (ucontext): each runs up to its next __syncthreads (or its end), then the next one (in
// nnopt_schedule's order); round after round until all are done. So no thread passes a
// barrier before every thread of the block has reached it, as on a GPU, at the cost of a
// context switch.
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
        for (const size_t i : nnopt_schedule(n)) {
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
