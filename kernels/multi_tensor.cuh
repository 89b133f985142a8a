// multi_tensor.cuh — the table lookup of the multi-tensor kernels (optim.cu, weight_norm.cu):
// a launch covers many tensors; its blocks take chunks of the flat chunk index space, and
// the table (EDM2_MT_ROW u64 per tensor, edm2.h) says where each tensor's chunks begin.
#pragma once
#include "common.cuh"

// The table row of chunk c: the last row whose first chunk is <= c (rows with no
// elements own no chunks and are skipped by the search).
__device__ __forceinline__ const unsigned long long *mt_row(const unsigned long long *rows, int n_rows, long long c) {
  int lo = 0, hi = n_rows - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if ((long long)rows[(size_t)mid * EDM2_MT_ROW + EDM2_MT_FIRST_CHUNK] <= c)
      lo = mid;
    else
      hi = mid - 1;
  }
  return rows + (size_t)lo * EDM2_MT_ROW;
}

