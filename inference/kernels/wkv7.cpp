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
// rounding (the sums run in another order).

#include <torch/extension.h>
#include <ATen/Parallel.h>

namespace {

at::Tensor wkv7_step(at::Tensor S, const at::Tensor& q, const at::Tensor& u, const at::Tensor& v,
                     const at::Tensor& w) {
  TORCH_CHECK(S.dim() == 3 && S.size(1) == S.size(2), "S must be (n, N, N)");
  TORCH_CHECK(S.scalar_type() == at::kFloat && S.is_contiguous() && S.device().is_cpu(),
              "S must be a contiguous float32 CPU tensor (it is updated in place)");
  const int64_t n = S.size(0), N = S.size(2);
  auto qc = q.to(at::kFloat).contiguous(), uc = u.to(at::kFloat).contiguous();
  auto vc = v.to(at::kFloat).contiguous(), wc = w.to(at::kFloat).contiguous();
  TORCH_CHECK(qc.numel() == n * 2 * N && uc.numel() == n * 2 * N, "q and u must be (n, 2, N)");
  TORCH_CHECK(vc.numel() == n * N && wc.numel() == n * N, "v and w must be (n, 1, N)");
  auto o = at::empty({n, 2, N}, S.options());
  float* s = S.data_ptr<float>();
  const float* qp = qc.data_ptr<float>();
  const float* up = uc.data_ptr<float>();
  const float* vp = vc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* op = o.data_ptr<float>();
  at::parallel_for(0, n, 4, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      float* Sh = s + h * N * N;
      const float* wr = qp + h * 2 * N;
      const float* kk = wr + N;
      const float* nb = up + h * 2 * N;  // -b
      const float* k = nb + N;
      const float* vh = vp + h * N;
      const float* wh = wp + h * N;
      float* o0 = op + h * 2 * N;
      float* o1 = o0 + N;
      for (int64_t i = 0; i < N; ++i) {
        float* row = Sh + i * N;
        float a = 0.f, c = 0.f;
#pragma omp simd reduction(+ : a, c)
        for (int64_t j = 0; j < N; ++j) {
          a += row[j] * wr[j];
          c += row[j] * kk[j];
        }
        o0[i] = a;
        o1[i] = c;
        const float vi = vh[i];
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) {
          row[j] = row[j] * wh[j] + c * nb[j] + vi * k[j];
        }
      }
    }
  });
  return o;
}

}  // namespace

TORCH_LIBRARY(rpserver, m) {
  m.def("wkv7_step(Tensor(a!) S, Tensor q, Tensor u, Tensor v, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(rpserver, CPU, m) {
  m.impl("wkv7_step", wkv7_step);
}
