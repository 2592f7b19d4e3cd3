// The RWKV-7 state update for one token, fused: one pass over each head's state.
//
// For each of n heads, S (N x N, rows index value dims, columns key dims) is
// read once, row by row; each row gives its two dot products (with w*r and
// with kk) and is updated while it is still in the L1 cache:
//
//     o0_i = sum_j S_ij (w r)_j      o1_i = sum_j S_ij kk_j      (the state before the token)
//     S_ij <- S_ij w_j + o1_i (-b)_j + v_i k_j
//
// which is what inference/rwkv7.py's _step does with a bmm, a scale and a
// rank-2 baddbmm (three passes over S). Same inputs, same result up to float
// rounding (the sums run in another order). wkv7_steps does T tokens of the
// same heads in one call (a prompt), each head's 16 KB state staying in the
// L1 cache for all of them. The rows are AVX2 vectors (8 floats) where the
// building machine has AVX2, and the heads are spread over torch's threads.
//
// bench/kernels.py measures both against the PyTorch operations (2 AVX2
// cores, 0.1B shape): a decode step of 32 sequences 705 -> 260 us, a
// 256-token prompt 80.7 -> 8.7 us per token. (The first version of this
// file left the vectorising to the compiler, which did not, and was not
// built with OpenMP, so it ran on one thread: 733 / 36.8 us.)

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "avx2.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

#ifdef __AVX2__
using rpserver::sum8;
#endif

// One token for one head: S (N x N) updated in place, o0/o1 (N each) written.
// Rows are independent of each other, so the processor overlaps one row's
// sums with the next row's loads.
inline void head_step(float* Sh, const float* wr, const float* kk, const float* nb, const float* k,
                      const float* vh, const float* wh, float* o0, float* o1, int64_t N) {
#ifdef __AVX2__
  if (N % 8 == 0) {
    for (int64_t i = 0; i < N; ++i) {
      float* row = Sh + i * N;
      __m256 a8 = _mm256_setzero_ps(), c8 = _mm256_setzero_ps();
      for (int64_t j = 0; j < N; j += 8) {
        const __m256 s8 = _mm256_loadu_ps(row + j);
        a8 = _mm256_fmadd_ps(s8, _mm256_loadu_ps(wr + j), a8);
        c8 = _mm256_fmadd_ps(s8, _mm256_loadu_ps(kk + j), c8);
      }
      const float a = sum8(a8), c = sum8(c8);
      o0[i] = a;
      o1[i] = c;
      const __m256 cc = _mm256_set1_ps(c), vi = _mm256_set1_ps(vh[i]);
      for (int64_t j = 0; j < N; j += 8) {
        const __m256 update = _mm256_fmadd_ps(cc, _mm256_loadu_ps(nb + j), _mm256_mul_ps(vi, _mm256_loadu_ps(k + j)));
        _mm256_storeu_ps(row + j, _mm256_fmadd_ps(_mm256_loadu_ps(row + j), _mm256_loadu_ps(wh + j), update));
      }
    }
    return;
  }
#endif
  for (int64_t i = 0; i < N; ++i) {
    float* row = Sh + i * N;
    float a = 0.f, c = 0.f;
    for (int64_t j = 0; j < N; ++j) {
      a += row[j] * wr[j];
      c += row[j] * kk[j];
    }
    o0[i] = a;
    o1[i] = c;
    const float vi = vh[i];
    for (int64_t j = 0; j < N; ++j) {
      row[j] = row[j] * wh[j] + c * nb[j] + vi * k[j];
    }
  }
}

void check_state(const at::Tensor& S) {
  TORCH_CHECK(S.dim() == 3 && S.size(1) == S.size(2), "S must be (n, N, N)");
  TORCH_CHECK(S.scalar_type() == at::kFloat && S.is_contiguous() && S.device().is_cpu(),
              "S must be a contiguous float32 CPU tensor (it is updated in place)");
}

// T tokens in a row for the same n heads: q, u (T, n, 2, N), v, w (T, n, 1, N)
// -> o (T, n, 2, N). Each head's state stays in the L1 cache for all T
// tokens, where T calls of one token each would bring it back for each.
at::Tensor run_steps(at::Tensor S, const at::Tensor& q, const at::Tensor& u, const at::Tensor& v,
                     const at::Tensor& w, int64_t T) {
  check_state(S);
  const int64_t n = S.size(0), N = S.size(2);
  auto qc = q.to(at::kFloat).contiguous(), uc = u.to(at::kFloat).contiguous();
  auto vc = v.to(at::kFloat).contiguous(), wc = w.to(at::kFloat).contiguous();
  TORCH_CHECK(qc.numel() == T * n * 2 * N && uc.numel() == T * n * 2 * N, "q and u must be (T, n, 2, N)");
  TORCH_CHECK(vc.numel() == T * n * N && wc.numel() == T * n * N, "v and w must be (T, n, 1, N)");
  auto o = at::empty({T, n, 2, N}, S.options());
  float* s = S.data_ptr<float>();
  const float* qp = qc.data_ptr<float>();
  const float* up = uc.data_ptr<float>();
  const float* vp = vc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = o.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      for (int64_t t = 0; t < T; ++t) {
        const int64_t p = t * n + h;
        head_step(s + h * N * N, qp + p * 2 * N, qp + p * 2 * N + N, up + p * 2 * N, up + p * 2 * N + N,
                  vp + p * N, wp + p * N, op + p * 2 * N, op + p * 2 * N + N, N);
      }
    }
  });
  return o;
}

// One token: q, u (n, 2, N), v, w (n, 1, N) -> o (n, 2, N).
at::Tensor wkv7_step(at::Tensor S, const at::Tensor& q, const at::Tensor& u, const at::Tensor& v,
                     const at::Tensor& w) {
  return run_steps(S, q, u, v, w, 1)[0];
}

at::Tensor wkv7_steps(at::Tensor S, const at::Tensor& q, const at::Tensor& u, const at::Tensor& v,
                      const at::Tensor& w) {
  TORCH_CHECK(q.dim() == 4 && q.size(1) == S.size(0) && q.size(2) == 2 && q.size(3) == S.size(2),
              "q must be (T, n, 2, N)");
  return run_steps(S, q, u, v, w, q.size(0));
}

}  // namespace

TORCH_LIBRARY(rpserver, m) {
  m.def("wkv7_step(Tensor(a!) S, Tensor q, Tensor u, Tensor v, Tensor w) -> Tensor");
  m.def("wkv7_steps(Tensor(a!) S, Tensor q, Tensor u, Tensor v, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(rpserver, CPU, m) {
  m.impl("wkv7_step", wkv7_step);
  m.impl("wkv7_steps", wkv7_steps);
}
