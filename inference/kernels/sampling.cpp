// The sampler's full-vocabulary work for a batch of replies, one pass over
// each row (inference/sampling.py, candidates_batch, steps 2 and 4): the
// penalties on the tokens a reply used, the row's top logit, and the tokens
// min_p keeps (logit >= top + ln(min_p)), gathered. In numpy and PyTorch
// that is eight passes over the batch's logits and a gather; here, rows
// spread over torch's threads. The arithmetic is the numpy path's, in the
// same float32 operations, so both keep the same tokens with the same
// logits (tests/test_sampling.py compares them).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <tuple>
#include <vector>
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

// The largest of a row's n logits (NaNs aside).
float row_max(const float* row, int64_t n) {
  float top = -INFINITY;
  int64_t v = 0;
#ifdef __AVX2__
  __m256 top8 = _mm256_set1_ps(-INFINITY);
  for (; v + 8 <= n; v += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(row + v));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top8);
  for (float lane : lanes) top = std::max(top, lane);
#endif
  for (; v < n; ++v) top = std::max(top, row[v]);
  return top;
}

// logits (B, V) float32, changed in place by the penalties. Row b used the tokens
// used[rows[b]:rows[b + 1]] (distinct ids), counts[i] times each. presence[b]: a used token's
// logit is divided by it if positive, multiplied if not (1: no presence penalty);
// frequency[b] x count is then subtracted. log_min_p[b] = ln(min_p) (-inf: keep every finite
// logit). Returns the kept tokens' ids and logits, row after row, ids ascending, and how
// many each row kept.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sampling_candidates(
    at::Tensor logits, const at::Tensor& used, const at::Tensor& counts, const at::Tensor& rows,
    const at::Tensor& presence, const at::Tensor& frequency, const at::Tensor& log_min_p) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous() &&
              logits.device().is_cpu(), "logits must be a contiguous (B, V) float32 tensor on the CPU");
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(used.scalar_type() == at::kLong && used.is_contiguous() && counts.scalar_type() == at::kFloat &&
              counts.is_contiguous() && counts.numel() == used.numel(), "used (U) int64 and counts (U) float32");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.numel() == B + 1,
              "rows must be (B + 1) int64 offsets into used");
  for (const at::Tensor* t : {&presence, &frequency, &log_min_p}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == B, "one float32 per row");
  }
  const int64_t* usedp = used.data_ptr<int64_t>();
  const int64_t* rowp = rows.data_ptr<int64_t>();
  TORCH_CHECK(rowp[0] == 0 && rowp[B] == used.numel(), "rows must run from 0 to the number of used tokens");
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(rowp[b] <= rowp[b + 1], "rows must not decrease");
  }
  for (int64_t i = 0; i < used.numel(); ++i) {
    TORCH_CHECK(usedp[i] >= 0 && usedp[i] < V, "a used token is outside the vocabulary");
  }
  float* lp = logits.data_ptr<float>();
  const float* countp = counts.data_ptr<float>();
  const float* presencep = presence.data_ptr<float>();
  const float* frequencyp = frequency.data_ptr<float>();
  const float* log_min_pp = log_min_p.data_ptr<float>();
  std::vector<std::vector<int64_t>> ids(B);
  std::vector<std::vector<float>> kept(B);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float* row = lp + b * V;
      const float factor = presencep[b], frequency_b = frequencyp[b];
      for (int64_t i = rowp[b]; i < rowp[b + 1]; ++i) {
        float& logit = row[usedp[i]];
        logit = logit > 0.f ? logit / factor : logit * factor;
      }
      if (frequency_b != 0.f) {
        for (int64_t i = rowp[b]; i < rowp[b + 1]; ++i) row[usedp[i]] -= frequency_b * countp[i];
      }
      const float threshold = std::max(row_max(row, V) + log_min_pp[b], -FLT_MAX);
      int64_t v = 0;
#ifdef __AVX2__
      const __m256 threshold8 = _mm256_set1_ps(threshold);
      for (; v + 8 <= V; v += 8) {
        unsigned mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + v), threshold8, _CMP_GE_OQ));
        for (; mask; mask &= mask - 1) {
          const int64_t at = v + __builtin_ctz(mask);
          ids[b].push_back(at);
          kept[b].push_back(row[at]);
        }
      }
#endif
      for (; v < V; ++v) {
        if (row[v] >= threshold) {
          ids[b].push_back(v);
          kept[b].push_back(row[v]);
        }
      }
    }
  });
  auto found = at::empty({B}, at::kLong);
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) {
    found.data_ptr<int64_t>()[b] = static_cast<int64_t>(ids[b].size());
    total += ids[b].size();
  }
  auto id_out = at::empty({total}, at::kLong);
  auto logit_out = at::empty({total}, at::kFloat);
  int64_t at = 0;
  for (int64_t b = 0; b < B; ++b) {
    std::copy(ids[b].begin(), ids[b].end(), id_out.data_ptr<int64_t>() + at);
    std::copy(kept[b].begin(), kept[b].end(), logit_out.data_ptr<float>() + at);
    at += ids[b].size();
  }
  return {id_out, logit_out, found};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rpserver, m) {
  m.def("sampling_candidates(Tensor(a!) logits, Tensor used, Tensor counts, Tensor rows, Tensor presence, "
        "Tensor frequency, Tensor log_min_p) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rpserver, CPU, m) {
  m.impl("sampling_candidates", sampling_candidates);
}
