// Small AVX2 helpers the kernels share.

#pragma once

#ifdef __AVX2__
#include <immintrin.h>

namespace rpserver {

// The sum of a vector's eight floats.
inline float sum8(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace rpserver
#endif
