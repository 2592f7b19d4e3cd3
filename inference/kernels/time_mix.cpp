// The elementwise work of RWKV-7's time mix around the state update, fused:
// one pass over each row where inference/rwkv7.py's `_prepare` and `_finish`
// run ~40 small PyTorch operations per layer (a decode step of one user is
// mostly their dispatch; `bench/forward.py --fused off` measures the pass
// without this file's passes).
//
// rwkv7_prepare, from the products' outputs (r, k, v side by side; the LoRAs'
// w, a, g and v outputs side by side), per row and head:
//
//     w = exp(decay * sigmoid(w' + w0))       a = sigmoid(a' + a0)
//     kk = normalize(k * k_k)                 k <- k * (1 + (a - 1) * k_a)
//     v <- lerp(v, v_first, sigmoid(v' + v0))            (not in layer 0)
//     q = [w * r, kk]   u = [-kk * a, k]                  (the state update's inputs)
//     coef = [sum (kk * a) r, sum k r, sum r k r_k]       (per head)
//
// rwkv7_finish, from the state update's output o = [S (w r), S kk] per head:
//
//     y = group_norm(o0 - o1 * coef0 + v * coef1) + coef2 * v, times g
//
// And rwkv7_shift_mix, each mix's start (both the time and the channel mix):
//
//     xx = layer_norm(x)      mixed_i = xx + (xx of the token before - xx) * mix_i
//
// the token before a sequence's first being the state's (which then becomes
// the sequence's last xx).
//
// Each row is computed on its own, the same way whatever the number of rows
// (a row's result never depends on its batch-mates). exp is a polynomial
// (Cephes' expf, ~1 ulp) on AVX2 vectors where the build has AVX2.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "avx2.h"
#include <cmath>
#include <algorithm>
#include <tuple>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

#ifdef __AVX2__
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2));
}

inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

using rpserver::sum8;
#endif

inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }

void check_rows(const at::Tensor& t, int64_t M, int64_t width, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kFloat && t.device().is_cpu() && t.size(0) == M &&
                  t.size(1) >= width && (t.stride(1) == 1 || t.size(1) == 1),
              name, " must be (M, >= ", width, ") float32 on the CPU, each row's elements adjacent");
}

void check_vector(const at::Tensor& t, int64_t size, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == size, name, " must be (", size,
              ") float32");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rwkv7_prepare(
    const at::Tensor& rkv, const at::Tensor& up, const at::Tensor& v_first, const at::Tensor& wa0,
    const at::Tensor& v0, const at::Tensor& k_k, const at::Tensor& k_a, const at::Tensor& r_k, double decay,
    int64_t H, bool first) {
  const int64_t M = rkv.size(0), C = rkv.size(1) / 3, N = C / std::max<int64_t>(H, 1);
  TORCH_CHECK(H > 0 && N * H == C && N % 8 == 0, "C / H must be a multiple of 8");
  check_rows(rkv, M, 3 * C, "rkv");
  check_rows(up, M, first ? 3 * C : 4 * C, "up");
  check_vector(wa0, 2 * C, "wa0");
  check_vector(k_k, C, "k_k");
  check_vector(k_a, C, "k_a");
  check_vector(r_k, C, "r_k");
  if (!first) {
    check_rows(v_first, M, C, "v_first");
    check_vector(v0, C, "v0");
  }
  const auto options = rkv.options();
  auto q = at::empty({M, H, 2, N}, options), u = at::empty({M, H, 2, N}, options);
  auto v = at::empty({M, C}, options), w = at::empty({M, C}, options), coef = at::empty({M, H, 3}, options);
  const int64_t ldr = rkv.stride(0), ldu = up.stride(0), ldf = first ? 0 : v_first.stride(0);
  const float *rp = rkv.data_ptr<float>(), *upp = up.data_ptr<float>();
  const float* fp = first ? nullptr : v_first.data_ptr<float>();
  const float *wa0p = wa0.data_ptr<float>(), *v0p = first ? nullptr : v0.data_ptr<float>();
  const float *kkp = k_k.data_ptr<float>(), *kap = k_a.data_ptr<float>(), *rkp = r_k.data_ptr<float>();
  float *qp = q.data_ptr<float>(), *uo = u.data_ptr<float>(), *vp = v.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* cp = coef.data_ptr<float>();
  const float fdecay = static_cast<float>(decay);
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / C), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float *r = rp + m * ldr, *k0 = r + C, *v_in = r + 2 * C;
      const float *wl = upp + m * ldu, *al = wl + C, *vl = wl + 3 * C;
      const float* vf = first ? nullptr : fp + m * ldf;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t c0 = h * N;
        float* qh = qp + (m * H + h) * 2 * N;  // [w r | kk]
        float* uh = uo + (m * H + h) * 2 * N;  // [-kk a | k]
        float* vh = vp + m * C + c0;
        float* wh = wp + m * C + c0;
        float* ch = cp + (m * H + h) * 3;
        // kk = normalize(k * k_k): its norm first (kept in q's second half meanwhile).
        float norm2 = 0.f, br = 0.f, kr = 0.f, rkr = 0.f;
#ifdef __AVX2__
        __m256 acc = _mm256_setzero_ps();
        for (int64_t j = 0; j < N; j += 8) {
          const __m256 t = _mm256_mul_ps(_mm256_loadu_ps(k0 + c0 + j), _mm256_loadu_ps(kkp + c0 + j));
          _mm256_storeu_ps(qh + N + j, t);
          acc = _mm256_fmadd_ps(t, t, acc);
        }
        norm2 = sum8(acc);
#else
        for (int64_t j = 0; j < N; ++j) {
          const float t = k0[c0 + j] * kkp[c0 + j];
          qh[N + j] = t;
          norm2 += t * t;
        }
#endif
        const float inv = 1.f / std::max(std::sqrt(norm2), 1e-12f);
#ifdef __AVX2__
        const __m256 inv8 = _mm256_set1_ps(inv), one = _mm256_set1_ps(1.f), decay8 = _mm256_set1_ps(fdecay);
        __m256 br8 = _mm256_setzero_ps(), kr8 = br8, rkr8 = br8;
        for (int64_t j = 0; j < N; j += 8) {
          const int64_t c = c0 + j;
          const __m256 r8 = _mm256_loadu_ps(r + c);
          const __m256 w8 = exp8(_mm256_mul_ps(
              sigmoid8(_mm256_add_ps(_mm256_loadu_ps(wl + c), _mm256_loadu_ps(wa0p + c))), decay8));
          const __m256 a8 = sigmoid8(_mm256_add_ps(_mm256_loadu_ps(al + c), _mm256_loadu_ps(wa0p + C + c)));
          const __m256 kk8 = _mm256_mul_ps(_mm256_loadu_ps(qh + N + j), inv8);
          const __m256 k8 = _mm256_mul_ps(
              _mm256_loadu_ps(k0 + c),
              _mm256_fmadd_ps(_mm256_sub_ps(a8, one), _mm256_loadu_ps(kap + c), one));
          __m256 v8 = _mm256_loadu_ps(v_in + c);
          if (!first) {
            const __m256 gate = sigmoid8(_mm256_add_ps(_mm256_loadu_ps(vl + c), _mm256_loadu_ps(v0p + c)));
            v8 = _mm256_fmadd_ps(gate, _mm256_sub_ps(_mm256_loadu_ps(vf + c), v8), v8);
          }
          const __m256 b8 = _mm256_mul_ps(kk8, a8);
          _mm256_storeu_ps(qh + j, _mm256_mul_ps(w8, r8));
          _mm256_storeu_ps(qh + N + j, kk8);
          _mm256_storeu_ps(uh + j, _mm256_sub_ps(_mm256_setzero_ps(), b8));
          _mm256_storeu_ps(uh + N + j, k8);
          _mm256_storeu_ps(vh + j, v8);
          _mm256_storeu_ps(wh + j, w8);
          br8 = _mm256_fmadd_ps(b8, r8, br8);
          const __m256 kr_j = _mm256_mul_ps(k8, r8);
          kr8 = _mm256_add_ps(kr8, kr_j);
          rkr8 = _mm256_fmadd_ps(kr_j, _mm256_loadu_ps(rkp + c), rkr8);
        }
        br = sum8(br8);
        kr = sum8(kr8);
        rkr = sum8(rkr8);
#else
        for (int64_t j = 0; j < N; ++j) {
          const int64_t c = c0 + j;
          const float w_ = std::exp(sigmoid(wl[c] + wa0p[c]) * fdecay);
          const float a_ = sigmoid(al[c] + wa0p[C + c]);
          const float kk_ = qh[N + j] * inv;
          const float k_ = k0[c] * ((a_ - 1.f) * kap[c] + 1.f);
          float v_ = v_in[c];
          if (!first) v_ += sigmoid(vl[c] + v0p[c]) * (vf[c] - v_);
          const float b_ = kk_ * a_;
          qh[j] = w_ * r[c];
          qh[N + j] = kk_;
          uh[j] = -b_;
          uh[N + j] = k_;
          vh[j] = v_;
          wh[j] = w_;
          br += b_ * r[c];
          kr += k_ * r[c];
          rkr += k_ * r[c] * rkp[c];
        }
#endif
        ch[0] = br;
        ch[1] = kr;
        ch[2] = rkr;
      }
    }
  });
  return {q, u, v, w, coef};
}

// o (M, H, 2, N): the state update's output; coef (M, H, 3) and v (M, C) from rwkv7_prepare;
// g (M, >= C) the g LoRA's output; lnx_w, lnx_b (C) the group norm's. -> (M, C), ready for O.
at::Tensor rwkv7_finish(const at::Tensor& o, const at::Tensor& coef, const at::Tensor& v, const at::Tensor& g,
                        const at::Tensor& lnx_w, const at::Tensor& lnx_b, double eps) {
  TORCH_CHECK(o.dim() == 4 && o.size(2) == 2 && o.is_contiguous() && o.scalar_type() == at::kFloat,
              "o must be a contiguous (M, H, 2, N) float32 tensor");
  const int64_t M = o.size(0), H = o.size(1), N = o.size(3), C = H * N;
  TORCH_CHECK(N % 8 == 0, "N must be a multiple of 8");
  TORCH_CHECK(coef.is_contiguous() && coef.numel() == M * H * 3 && coef.scalar_type() == at::kFloat,
              "coef must be (M, H, 3) float32");
  TORCH_CHECK(v.is_contiguous() && v.numel() == M * C && v.scalar_type() == at::kFloat, "v must be (M, C) float32");
  check_rows(g, M, C, "g");
  check_vector(lnx_w, C, "lnx_w");
  check_vector(lnx_b, C, "lnx_b");
  auto y = at::empty({M, C}, o.options());
  const float *op = o.data_ptr<float>(), *cp = coef.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *gp = g.data_ptr<float>(), *lw = lnx_w.data_ptr<float>(), *lb = lnx_b.data_ptr<float>();
  const int64_t ldg = g.stride(0);
  float* yp = y.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / C), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t c0 = h * N;
        const float* oh = op + (m * H + h) * 2 * N;
        const float* ch = cp + (m * H + h) * 3;
        const float* vh = vp + m * C + c0;
        const float* gh = gp + m * ldg + c0;
        float* yh = yp + m * C + c0;
        // y = o0 - o1 * coef0 + v * coef1, its mean and variance over the head (kept in y meanwhile)
        float sum = 0.f;
#ifdef __AVX2__
        const __m256 br = _mm256_set1_ps(ch[0]), kr = _mm256_set1_ps(ch[1]);
        __m256 sum8v = _mm256_setzero_ps();
        for (int64_t j = 0; j < N; j += 8) {
          const __m256 t = _mm256_fmadd_ps(_mm256_loadu_ps(vh + j), kr,
                                           _mm256_fnmadd_ps(_mm256_loadu_ps(oh + N + j), br, _mm256_loadu_ps(oh + j)));
          _mm256_storeu_ps(yh + j, t);
          sum8v = _mm256_add_ps(sum8v, t);
        }
        sum = sum8(sum8v);
        const float mean = sum / N;
        const __m256 mean8 = _mm256_set1_ps(mean);
        __m256 var8 = _mm256_setzero_ps();
        for (int64_t j = 0; j < N; j += 8) {
          const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(yh + j), mean8);
          var8 = _mm256_fmadd_ps(d, d, var8);
        }
        const float rstd = 1.f / std::sqrt(sum8(var8) / N + feps);
        const __m256 rstd8 = _mm256_set1_ps(rstd), bonus = _mm256_set1_ps(ch[2]);
        for (int64_t j = 0; j < N; j += 8) {
          const int64_t c = c0 + j;
          const __m256 normed = _mm256_fmadd_ps(
              _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(yh + j), mean8), rstd8), _mm256_loadu_ps(lw + c),
              _mm256_loadu_ps(lb + c));
          _mm256_storeu_ps(yh + j, _mm256_mul_ps(_mm256_fmadd_ps(bonus, _mm256_loadu_ps(vh + j), normed),
                                                 _mm256_loadu_ps(gh + j)));
        }
#else
        for (int64_t j = 0; j < N; ++j) {
          yh[j] = oh[j] - oh[N + j] * ch[0] + vh[j] * ch[1];
          sum += yh[j];
        }
        const float mean = sum / N;
        float var = 0.f;
        for (int64_t j = 0; j < N; ++j) var += (yh[j] - mean) * (yh[j] - mean);
        const float rstd = 1.f / std::sqrt(var / N + feps);
        for (int64_t j = 0; j < N; ++j) {
          const int64_t c = c0 + j;
          yh[j] = ((yh[j] - mean) * rstd * lw[c] + lb[c] + ch[2] * vh[j]) * gh[j];
        }
#endif
      }
    }
  });
  return y;
}

// x (M, C): the tokens of B sequences, one after another (as inference/rwkv7.py's Layout lays
// them out; `single`: one token each, position b being sequence b, else sequence b's tokens
// are positions first[b]..last[b]); prev (B, C) the state: each sequence's xx before its first
// token, updated in place to its last. mixes (n, C). Returns xx (M, C) and mixed (M, n C).
std::tuple<at::Tensor, at::Tensor> rwkv7_shift_mix(const at::Tensor& x_in, const at::Tensor& ln_w,
                                                   const at::Tensor& ln_b, double eps, at::Tensor prev,
                                                   const at::Tensor& mixes, const at::Tensor& first,
                                                   const at::Tensor& last, bool single) {
  const auto x = x_in.contiguous();
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be (M, C) float32 on the CPU");
  const int64_t M = x.size(0), C = x.size(1), B = single ? M : first.numel();
  TORCH_CHECK(C % 8 == 0, "C must be a multiple of 8");
  check_vector(ln_w, C, "ln_w");
  check_vector(ln_b, C, "ln_b");
  TORCH_CHECK(mixes.scalar_type() == at::kFloat && mixes.is_contiguous() && mixes.numel() % C == 0,
              "mixes must be (n, C) float32");
  TORCH_CHECK(prev.dim() == 2 && prev.scalar_type() == at::kFloat && prev.size(0) == B && prev.size(1) == C &&
                  prev.stride(1) == 1,
              "prev must be (B, C) float32, each row's elements adjacent");
  TORCH_CHECK(single || (first.scalar_type() == at::kLong && last.scalar_type() == at::kLong &&
                         first.is_contiguous() && last.is_contiguous() && last.numel() == B),
              "first and last must be (B) int64");
  const int64_t n = mixes.numel() / C, ldp = prev.stride(0);
  auto xx = at::empty({M, C}, x.options()), mixed = at::empty({M, n * C}, x.options());
  const float *xp = x.data_ptr<float>(), *lw = ln_w.data_ptr<float>(), *lb = ln_b.data_ptr<float>();
  const float* mp = mixes.data_ptr<float>();
  float *xxp = xx.data_ptr<float>(), *outp = mixed.data_ptr<float>(), *pp = prev.data_ptr<float>();
  // The sequence each position starts, or -1 (the token before it is the position before).
  std::vector<int64_t> starts(single ? 0 : M, -1);
  const int64_t *fp = single ? nullptr : first.data_ptr<int64_t>(), *lp = single ? nullptr : last.data_ptr<int64_t>();
  for (int64_t b = 0; b < (single ? 0 : B); ++b) {
    TORCH_CHECK(fp[b] >= 0 && fp[b] <= lp[b] && lp[b] < M, "sequence ", b, "'s positions are outside x");
    starts[fp[b]] = b;
  }
  const float feps = static_cast<float>(eps);
  const int64_t grain = std::max<int64_t>(1, 4096 / C);
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* xm = xp + m * C;
      float* ym = xxp + m * C;
      float sum = 0.f, var = 0.f;
#ifdef __AVX2__
      __m256 s8 = _mm256_setzero_ps();
      for (int64_t c = 0; c < C; c += 8) s8 = _mm256_add_ps(s8, _mm256_loadu_ps(xm + c));
      sum = sum8(s8);
      const __m256 mean8 = _mm256_set1_ps(sum / C);
      __m256 v8 = _mm256_setzero_ps();
      for (int64_t c = 0; c < C; c += 8) {
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(xm + c), mean8);
        v8 = _mm256_fmadd_ps(d, d, v8);
      }
      var = sum8(v8);
      const __m256 rstd8 = _mm256_set1_ps(1.f / std::sqrt(var / C + feps));
      for (int64_t c = 0; c < C; c += 8) {
        _mm256_storeu_ps(ym + c, _mm256_fmadd_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xm + c), mean8), rstd8),
                                                 _mm256_loadu_ps(lw + c), _mm256_loadu_ps(lb + c)));
      }
#else
      for (int64_t c = 0; c < C; ++c) sum += xm[c];
      const float mean = sum / C;
      for (int64_t c = 0; c < C; ++c) var += (xm[c] - mean) * (xm[c] - mean);
      const float rstd = 1.f / std::sqrt(var / C + feps);
      for (int64_t c = 0; c < C; ++c) ym[c] = (xm[c] - mean) * rstd * lw[c] + lb[c];
#endif
    }
  });
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* ym = xxp + m * C;
      const int64_t b = single ? m : starts[m];
      const float* before = b >= 0 ? pp + b * ldp : xxp + (m - 1) * C;
      float* om = outp + m * n * C;
      for (int64_t i = 0; i < n; ++i) {
        const float* mix = mp + i * C;
        int64_t c = 0;
#ifdef __AVX2__
        for (; c < C; c += 8) {
          const __m256 y8 = _mm256_loadu_ps(ym + c);
          _mm256_storeu_ps(om + i * C + c, _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(before + c), y8),
                                                           _mm256_loadu_ps(mix + c), y8));
        }
#endif
        for (; c < C; ++c) om[i * C + c] = ym[c] + (before[c] - ym[c]) * mix[c];
      }
    }
  });
  for (int64_t b = 0; b < B; ++b) std::copy_n(xxp + (single ? b : lp[b]) * C, C, pp + b * ldp);
  return {xx, mixed};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rpserver, m) {
  m.def("rwkv7_prepare(Tensor rkv, Tensor up, Tensor v_first, Tensor wa0, Tensor v0, Tensor k_k, Tensor k_a, "
        "Tensor r_k, float decay, int H, bool first) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("rwkv7_finish(Tensor o, Tensor coef, Tensor v, Tensor g, Tensor lnx_w, Tensor lnx_b, float eps) -> Tensor");
  m.def("rwkv7_shift_mix(Tensor x, Tensor ln_w, Tensor ln_b, float eps, Tensor(a!) prev, Tensor mixes, Tensor first, "
        "Tensor last, bool single) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rpserver, CPU, m) {
  m.impl("rwkv7_prepare", rwkv7_prepare);
  m.impl("rwkv7_finish", rwkv7_finish);
  m.impl("rwkv7_shift_mix", rwkv7_shift_mix);
}
