// x @ W^T in float32 for the small matrices of RWKV-7's LoRAs (768 -> 32..128
// -> 768), with each row of x summed in one fixed order.
//
// MKL's sgemm, which `x @ m` runs, picks its method by the number of rows,
// so a row's result can differ in the last bit with how many rows share the
// pass; in the `cpu int8` forward pass such a bit can round an activation to
// the other int8 step, and a reply would then depend on its batch-mates.
// Here every row is summed the same way whatever M is: with int8_linear.cpp
// (exact integer sums), the whole int8 pass gives each row the same result
// alone, in any batch and in any chunking. It also reads the weights as
// packed streams (four output channels, eight inputs at a time), which for
// one row is faster than MKL's small products: bench/kernels.py. One call can
// multiply several column ranges of x by several weights, outputs side by
// side (products.h): a layer's LoRA halves in one.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "products.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

#ifdef __AVX2__
// Sums of the four accumulators' eight lanes each, as four floats (one fixed order).
inline __m128 sum4x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// Output channels n..n+3 (packed: K / 8 runs of [8 of n, 8 of n+1, 8 of n+2, 8 of n+3]) for rows
// x0 and x1 (rows == 2) or x0 alone; each row's sums run in the same order either way.
template <int rows>
inline void block4(const float* x0, const float* x1, const float* w, int64_t K, float* y0, float* y1) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
  __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
  for (int64_t k = 0; k < K; k += 8, w += 32) {
    const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
    const __m256 w2 = _mm256_loadu_ps(w + 16), w3 = _mm256_loadu_ps(w + 24);
    const __m256 v0 = _mm256_loadu_ps(x0 + k);
    a00 = _mm256_fmadd_ps(v0, w0, a00);
    a01 = _mm256_fmadd_ps(v0, w1, a01);
    a02 = _mm256_fmadd_ps(v0, w2, a02);
    a03 = _mm256_fmadd_ps(v0, w3, a03);
    if (rows == 2) {
      const __m256 v1 = _mm256_loadu_ps(x1 + k);
      a10 = _mm256_fmadd_ps(v1, w0, a10);
      a11 = _mm256_fmadd_ps(v1, w1, a11);
      a12 = _mm256_fmadd_ps(v1, w2, a12);
      a13 = _mm256_fmadd_ps(v1, w3, a13);
    }
  }
  _mm_storeu_ps(y0, sum4x8(a00, a01, a02, a03));
  if (rows == 2) _mm_storeu_ps(y1, sum4x8(a10, a11, a12, a13));
}
#endif

// Output channels [begin, end) (multiples of 4) of one product for all M rows; x's rows ldx apart,
// y's ldy apart.
void channels(const float* x, int64_t ldx, int64_t M, const float* w, int64_t K, int64_t ldy, int64_t begin,
              int64_t end, float* y) {
  // Rows in tiles of ~256 KB (held in the L2 cache while each 4 channels' weights pass over them
  // from L1); the tiling changes no sum.
  const int64_t tile = std::max<int64_t>(2, (65536 / K) & ~int64_t(1));
  for (int64_t m0 = 0; m0 < M; m0 += tile) {
  const int64_t m1 = std::min(M, m0 + tile);
  for (int64_t n = begin; n < end; n += 4) {
    const float* wn = w + n * K;
#ifdef __AVX2__
    int64_t m = m0;
    for (; m + 2 <= m1; m += 2) block4<2>(x + m * ldx, x + (m + 1) * ldx, wn, K, y + m * ldy + n, y + (m + 1) * ldy + n);
    if (m < m1) block4<1>(x + m * ldx, nullptr, wn, K, y + m * ldy + n, nullptr);
#else
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t c = 0; c < 4; ++c) {
        float sum = 0.f;
        for (int64_t k = 0; k < K; ++k) sum += x[m * ldx + k] * wn[(k / 8) * 32 + c * 8 + k % 8];
        y[m * ldy + n + c] = sum;
      }
    }
#endif
  }
  }
}

// x (M, width) float32 -> (M, sum of N_g) float32: product g multiplies x's columns
// [columns[g], columns[g] + K_g) by weights[g] (see products.h), each the (N, K) matrix packed four
// output channels to a stream, K / 8 runs of eight inputs each (packed by inference/rwkv7.py
// _Fp32KernelLinear).
at::Tensor f32_linear(const at::Tensor& x, at::TensorList weights, at::IntArrayRef columns) {
  const auto products = rpserver::plan(x, weights, columns, at::kFloat, 8, "float32");
  auto y = at::empty({x.size(0), rpserver::width(products)}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t M = x.size(0), ldx = x.stride(0), ldy = y.size(1);
  // At least ~128 KB of weights per task.
  rpserver::for_each_block(products, 1024, [&](const rpserver::Product& p, int64_t begin, int64_t end) {
    channels(xp + p.column, ldx, M, p.weight->data_ptr<float>(), p.K, ldy, begin, end, yp + p.out);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rpserver, m) {
  m.def("f32_linear(Tensor x, Tensor[] weights, int[] columns) -> Tensor");
}

TORCH_LIBRARY_IMPL(rpserver, CPU, m) {
  m.impl("f32_linear", f32_linear);
}
