// common.cuh — what every kernel file includes: the C ABI, and the launch macro, which
// is a real <<<>>> launch under nvcc and a simulated one under g++ (sim/cuda_sim.h,
// force-included by build.rs with EDM2_SIM defined).
#pragma once
#ifndef EDM2_SIM
#include <cuda_runtime.h>
#define EDM2_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif
#include "edm2.h"

// Grid size for a grid-stride loop over n elements.
static inline unsigned edm2_blocks(size_t n, unsigned threads) {
  size_t b = (n + threads - 1) / threads;
  return (unsigned)(b > 65535u * 8u ? 65535u * 8u : (b == 0 ? 1 : b));
}
