/* Just enough of CUDA for Sources/LycorisCUDA/Kernels/lycoris_kernels.cu to compile as C and run on the CPU:
 * blockIdx, threadIdx and blockDim as per-thread globals, and a launch that runs every thread
 * of every block one after the other (so kernels must not rely on __syncthreads or shared
 * memory — the backend's elementwise kernels do not). Launches from different threads run
 * independently (the indices are thread-local: the test runner and a server call from
 * several threads at once); one launch per thread at a time. */
#ifndef LYCORIS_CUDA_EMULATION_H
#define LYCORIS_CUDA_EMULATION_H

#include <math.h>

typedef struct { unsigned int x, y, z; } lycoris_dim3;
static _Thread_local lycoris_dim3 blockIdx, threadIdx, blockDim;

#define LYCORIS_KERNEL static
#define LYCORIS_DEVICE static

/* kernel<<<grid, block>>>(arguments…) */
#define LYCORIS_LAUNCH(kernel, grid, block, ...)                                   \
    do {                                                                           \
        blockDim.x = (block); blockDim.y = blockDim.z = 1;                         \
        blockIdx.y = blockIdx.z = threadIdx.y = threadIdx.z = 0;                    \
        for (blockIdx.x = 0; blockIdx.x < (grid); blockIdx.x++)                    \
            for (threadIdx.x = 0; threadIdx.x < (block); threadIdx.x++)            \
                kernel(__VA_ARGS__);                                               \
    } while (0)

#endif
