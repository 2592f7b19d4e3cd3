// x @ W^T for int8 weights, with each row of x quantised on the fly: the
// matrix products of the `cpu int8` forward pass, from one row (a decode
// step of one user) to a prompt chunk.
//
// The numbers are the ones inference/rwkv7.py's fbgemm path computes: W is
// int8 with one scale per output channel; each row x_m of x is divided by its
// own max |x_m|, quantised to 7 bits (q = round(63.5 x / max) in [-64, 64],
// stored as u = q + 64 in [0, 128]) and multiplied in integers:
//
//     y_mn = (sum_k u_mk W_nk - 64 sum_k W_nk) * (max_m / 63.5) * scale_n
//
// The integer sums are exact (AVX2's u8 x s8 pair products peak at
// 2 * 128 * 127 = 32,512, inside int16; then summed in int32; VNNI sums four
// products straight into int32), so a row's result is the same whatever
// other rows share the call, and on any of these machines.
//
// Why not fbgemm for all of it: it packs and requantises per call, so one
// row through a 768 x 768 matrix (weights coming from memory) takes ~143 us
// where this takes ~38, and a decode step of one user has 73 such products.
// Here the weights are stored packed once, four output channels to a stream,
// and read once per call, with two rows of x against each load of them; the
// output channels are spread over torch's threads. bench/kernels.py
// measures both. One call can multiply several column ranges of x by several
// weights, outputs side by side (products.h): R, K and V in one.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include "products.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr float kSteps = 63.5f;  // a row's max |x| maps to 63.5: q in [-64, 64] after rounding
constexpr int kZero = 64;
constexpr int64_t kPrefetch = 1024;  // bytes of weights ahead of the ones being multiplied

// One row of K floats (a multiple of 32) -> K uint8 in [0, 128], and its dequantising factor max / 63.5.
void quantise_row(const float* xm, int64_t K, uint8_t* um, float* row_scale) {
  float top = 0.f;
  int64_t k = 0;
#ifdef __AVX2__
  const __m256 no_sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 top8 = _mm256_setzero_ps();
  for (; k < K; k += 8) top8 = _mm256_max_ps(top8, _mm256_and_ps(_mm256_loadu_ps(xm + k), no_sign));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top8);
  for (float lane : lanes) top = std::max(top, lane);
#else
  for (; k < K; ++k) top = std::max(top, std::fabs(xm[k]));
#endif
  const float inv = top > 0.f ? kSteps / top : 0.f;
  *row_scale = top / kSteps;
  k = 0;
#ifdef __AVX2__
  const __m256 inv8 = _mm256_set1_ps(inv);
  const __m256i zero8 = _mm256_set1_epi32(kZero), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (; k < K; k += 32) {
    __m256i q[4];
    for (int i = 0; i < 4; ++i) {
      const __m256 scaled = _mm256_mul_ps(_mm256_loadu_ps(xm + k + 8 * i), inv8);
      q[i] = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT |
                                                                             _MM_FROUND_NO_EXC)), zero8);
    }
    const __m256i bytes = _mm256_packus_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(um + k), _mm256_permutevar8x32_epi32(bytes, order));
  }
#endif
  for (; k < K; ++k) um[k] = static_cast<uint8_t>(std::nearbyint(xm[k] * inv) + kZero);
}

#ifdef __AVX2__
// Sums of the four accumulators' eight lanes each, as four int32.
inline __m128i sum4x8(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
  const __m256i t = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
  return _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
}

// acc + the sums of u's and w's products four bytes at a time (u8 x s8), as eight int32: one
// VNNI instruction where the machine that builds has it, else three (pairs to int16, which never
// saturate with u <= 128, then to int32). The same exact sums either way.
inline __m256i dot32(__m256i acc, __m256i u, __m256i w, __m256i ones) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  (void)ones;
  return _mm256_dpbusd_epi32(acc, u, w);
#elif defined(__AVXVNNI__)
  (void)ones;
  return _mm256_dpbusd_avx_epi32(acc, u, w);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, w), ones));
#endif
}

// Output channels n..n+3 for rows m and m+1 (rows == 2) or row m alone (rows == 1): int32 sums.
// Not inlined: inlined into the loops around it (since those take several products), GCC kept
// one of the eight accumulators on the stack, and a 256-row product on one thread ran at ~71
// G multiply-adds/s instead of ~81-87 (the call costs less than the spill).
template <int rows>
__attribute__((noinline)) void block4(const uint8_t* u0, const uint8_t* u1, const int8_t* w, int64_t K, __m128i* out0,
                   __m128i* out1) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i a00 = _mm256_setzero_si256(), a01 = a00, a02 = a00, a03 = a00;
  __m256i a10 = a00, a11 = a00, a12 = a00, a13 = a00;
  for (int64_t k = 0; k < K; k += 32, w += 128) {
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch + 64), _MM_HINT_T0);
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u0 + k));
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
    const __m256i w2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64));
    const __m256i w3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 96));
    a00 = dot32(a00, x0, w0, ones);
    a01 = dot32(a01, x0, w1, ones);
    a02 = dot32(a02, x0, w2, ones);
    a03 = dot32(a03, x0, w3, ones);
    if (rows == 2) {
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u1 + k));
      a10 = dot32(a10, x1, w0, ones);
      a11 = dot32(a11, x1, w1, ones);
      a12 = dot32(a12, x1, w2, ones);
      a13 = dot32(a13, x1, w3, ones);
    }
  }
  *out0 = sum4x8(a00, a01, a02, a03);
  if (rows == 2) *out1 = sum4x8(a10, a11, a12, a13);
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
// acc += u . w four bytes at a time (vpdpbusd), written out: with the intrinsic, GCC 12 keeps the
// accumulator in the first 16 registers and moves the others in and out around each one.
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i w) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(w));
  return acc;
}

// Output channels n..n+3 for rows u0..u3: int32 sums. With VNNI, loads rather than multiplies
// limit block4 (two rows take 6 loads for 8 dot products, four rows 8 for 16), and AVX-512's 32
// vector registers hold the sixteen accumulators.
__attribute__((noinline)) void block4x4(const uint8_t* u0, const uint8_t* u1, const uint8_t* u2, const uint8_t* u3,
                                        const int8_t* w, int64_t K, __m128i* out) {
  __m256i a00 = _mm256_setzero_si256(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
  __m256i a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
  for (int64_t k = 0; k < K; k += 32, w += 128) {
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetch + 64), _MM_HINT_T0);
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
    const __m256i w2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64));
    const __m256i w3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 96));
    const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u0 + k));
    a00 = dpbusd(a00, x0, w0);
    a01 = dpbusd(a01, x0, w1);
    a02 = dpbusd(a02, x0, w2);
    a03 = dpbusd(a03, x0, w3);
    const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u1 + k));
    a10 = dpbusd(a10, x1, w0);
    a11 = dpbusd(a11, x1, w1);
    a12 = dpbusd(a12, x1, w2);
    a13 = dpbusd(a13, x1, w3);
    const __m256i x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u2 + k));
    a20 = dpbusd(a20, x2, w0);
    a21 = dpbusd(a21, x2, w1);
    a22 = dpbusd(a22, x2, w2);
    a23 = dpbusd(a23, x2, w3);
    const __m256i x3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u3 + k));
    a30 = dpbusd(a30, x3, w0);
    a31 = dpbusd(a31, x3, w1);
    a32 = dpbusd(a32, x3, w2);
    a33 = dpbusd(a33, x3, w3);
  }
  out[0] = sum4x8(a00, a01, a02, a03);
  out[1] = sum4x8(a10, a11, a12, a13);
  out[2] = sum4x8(a20, a21, a22, a23);
  out[3] = sum4x8(a30, a31, a32, a33);
}
#endif

// y_m[n..n+3] from the four int32 sums.
inline void finish4(__m128i sums, const int32_t* offset, const float* scale, float row_scale, float* y) {
  const __m128i exact = _mm_sub_epi32(sums, _mm_loadu_si128(reinterpret_cast<const __m128i*>(offset)));
  const __m128 factor = _mm_mul_ps(_mm_loadu_ps(scale), _mm_set1_ps(row_scale));
  _mm_storeu_ps(y, _mm_mul_ps(_mm_cvtepi32_ps(exact), factor));
}
#endif

// Row m's sum against output channel n (of the packed layout, see int8_linear), one product at a time.
int32_t dot(const uint8_t* u, const int8_t* w, int64_t K, int64_t n) {
  const int8_t* block = w + (n / 4) * 4 * K + (n % 4) * 32;
  int32_t sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += static_cast<int32_t>(u[k]) * static_cast<int32_t>(block[(k / 32) * 128 + k % 32]);
  return sum;
}

// Output channels [begin, end) (multiples of 4) of one product for all M rows; u (M, K), y's rows
// ldy apart.
void channels(const uint8_t* u, const float* row_scale, int64_t M, const int8_t* w, const float* scale,
              const int32_t* offset, int64_t K, int64_t ldy, int64_t begin, int64_t end, float* y) {
  // Rows in tiles of ~256 KB (held in the L2 cache while each 4 channels' weights pass over them
  // from L1); the tiling changes no sum.
  const int64_t tile = std::max<int64_t>(2, (262144 / K) & ~int64_t(1));
  for (int64_t m0 = 0; m0 < M; m0 += tile) {
  const int64_t m1 = std::min(M, m0 + tile);
  for (int64_t n = begin; n < end; n += 4) {
#ifdef __AVX2__
    const int8_t* wn = w + n * K;
    int64_t m = m0;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    for (; m + 4 <= m1; m += 4) {
      __m128i sums[4];
      block4x4(u + m * K, u + (m + 1) * K, u + (m + 2) * K, u + (m + 3) * K, wn, K, sums);
      for (int r = 0; r < 4; ++r) finish4(sums[r], offset + n, scale + n, row_scale[m + r], y + (m + r) * ldy + n);
    }
#endif
    for (; m + 2 <= m1; m += 2) {
      __m128i s0, s1;
      block4<2>(u + m * K, u + (m + 1) * K, wn, K, &s0, &s1);
      finish4(s0, offset + n, scale + n, row_scale[m], y + m * ldy + n);
      finish4(s1, offset + n, scale + n, row_scale[m + 1], y + (m + 1) * ldy + n);
    }
    if (m < m1) {
      __m128i s0, unused;
      block4<1>(u + m * K, nullptr, wn, K, &s0, &unused);
      finish4(s0, offset + n, scale + n, row_scale[m], y + m * ldy + n);
    }
#else
    for (int64_t c = n; c < n + 4; ++c) {
      for (int64_t m = m0; m < m1; ++m) {
        y[m * ldy + c] = static_cast<float>(dot(u + m * K, w, K, c) - offset[c]) * row_scale[m] * scale[c];
      }
    }
#endif
  }
  }
}

// x (M, width) float32 -> (M, sum of N_g) float32: product g multiplies x's columns
// [columns[g], columns[g] + K_g) by weights[g] (see products.h). Each weight: the (N, K) int8
// matrix packed so that each group of 4 output channels reads as one stream: for channels
// 4b..4b+3, K / 32 runs of [32 of channel 4b, 32 of 4b+1, 32 of 4b+2, 32 of 4b+3] (packed by
// inference/rwkv7.py _Int8KernelLinear). scales[g] (N) float32 per output channel; offsets[g] (N)
// int32 = 64 * sum_k weight_nk. Each row of each product's inputs is quantised on its own.
at::Tensor int8_linear(const at::Tensor& x, at::TensorList weights, at::TensorList scales, at::TensorList offsets,
                       at::IntArrayRef columns) {
  const auto products = rpserver::plan(x, weights, columns, at::kChar, 32, "int8");
  TORCH_CHECK(scales.size() == weights.size() && offsets.size() == weights.size(), "one scale and offset per weight");
  for (size_t g = 0; g < products.size(); ++g) {
    TORCH_CHECK(scales[g].scalar_type() == at::kFloat && scales[g].is_contiguous() && scales[g].numel() == products[g].N,
                "each scale must be (N) float32");
    TORCH_CHECK(offsets[g].scalar_type() == at::kInt && offsets[g].is_contiguous() && offsets[g].numel() == products[g].N,
                "each offset must be (N) int32");
  }
  const int64_t M = x.size(0), ldx = x.stride(0), G = products.size();
  std::vector<int64_t> at_u(G + 1, 0);  // where each product's quantised rows start in u
  for (int64_t g = 0; g < G; ++g) at_u[g + 1] = at_u[g] + M * products[g].K;
  auto u = at::empty({at_u[G]}, x.options().dtype(at::kByte));
  auto row_scale = at::empty({G, M}, x.options());
  auto y = at::empty({M, rpserver::width(products)}, x.options());
  const float* xp = x.data_ptr<float>();
  uint8_t* up = u.data_ptr<uint8_t>();
  float* rs = row_scale.data_ptr<float>();
  at::parallel_for(0, G * M, std::max<int64_t>(1, 8192 / products[0].K), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = i / M, m = i % M, K = products[g].K;
      quantise_row(xp + m * ldx + products[g].column, K, up + at_u[g] + m * K, rs + i);
    }
  });
  const int64_t ldy = y.size(1);
  float* yp = y.data_ptr<float>();
  // At least ~64 KB of weights per task.
  rpserver::for_each_block(products, 512, [&](const rpserver::Product& p, int64_t begin, int64_t end) {
    const int64_t g = &p - products.data();
    channels(up + at_u[g], rs + g * M, M, p.weight->data_ptr<int8_t>(), scales[g].data_ptr<float>(),
             offsets[g].data_ptr<int32_t>(), p.K, ldy, begin, end, yp + p.out);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rpserver, m) {
  m.def("int8_linear(Tensor x, Tensor[] weights, Tensor[] scales, Tensor[] offsets, int[] columns) -> Tensor");
}

TORCH_LIBRARY_IMPL(rpserver, CPU, m) {
  m.impl("int8_linear", int8_linear);
}
