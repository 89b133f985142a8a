// conv_shape.cuh — the geometry both conv kernels share (conv.cu: SIMT, conv_tc.cu:
// tensor cores): an NHWC conv's shape and the implicit-im2col neighbour lookup.
#pragma once
#include "common.cuh"

struct ConvShape {
  int n, h, w, cin, cout, taps;  // taps = 9 for 3x3 'same', 1 for 1x1 and linear
};

// The input pixel read by output pixel p through tap `tap` (sign +1) or the output pixel
// that reads input pixel p through it (sign −1); -1 when outside the image.
__device__ __forceinline__ long long conv_neighbor(const ConvShape &s, long long p, int tap, int sign) {
  if (s.taps == 1) return p;
  long long hw = (long long)s.h * s.w;
  int b = (int)(p / hw), rem = (int)(p % hw);
  int y = rem / s.w + sign * (tap / 3 - 1), x = rem % s.w + sign * (tap % 3 - 1);
  if (y < 0 || y >= s.h || x < 0 || x >= s.w) return -1;
  return (long long)b * hw + (long long)y * s.w + x;
}
