// The sampler's work for a batch of replies (inference/sampling.py).
//
// sampling_candidates: the full-vocabulary part, one pass over each row
// (steps 2 and 4): the penalties on the tokens a reply used, the row's top
// logit, and the tokens min_p keeps (logit >= top + ln(min_p)), gathered. In
// numpy and PyTorch that is eight passes over the batch's logits and a
// gather; here, rows spread over torch's threads. The arithmetic is the numpy
// path's, in the same float32 operations, so both keep the same tokens with
// the same logits.
//
// sampling_draw: the rest, on each row's survivors (steps 5 and 6):
// temperature, top_p, Mirostat's cut and the draw, where numpy took a dozen
// calls per reply. The same float64 quantities as the numpy path
// (candidates_batch, Sampler.draw) up to rounding, without its division and
// logarithm per candidate (see draw_row): tests/test_sampling.py checks that
// both draw the same tokens from the same random numbers.

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

// The sum of n doubles, four running sums (a row can keep the whole vocabulary: min_p 0).
double sum(const double* x, int64_t n) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += x[i];
    s1 += x[i + 1];
    s2 += x[i + 2];
    s3 += x[i + 3];
  }
  for (; i < n; ++i) s0 += x[i];
  return (s0 + s1) + (s2 + s3);
}

// Steps 5 and 6 for one row's n survivors, given their weights e_i = exp((logit_i - top) /
// temperature) (see sampling_draw): returns (the index of the drawn one, its surprise in bits).
// The numpy path divides the weights by their sum first: here p_i >= 2^-mu is e_i >= 2^-mu x sum,
// top_p's probabilities reach it where the weights reach top_p x sum, and a draw is scale-free.
// `best` is the first of the most likely (the weight 1). `order` is scratch space.
std::pair<int64_t, double> draw_row(const double* e, int64_t n, int64_t best, double top_p, double mu,
                                    double uniform, std::vector<int64_t>& order) {
  double total = sum(e, n);
  // top_p: the most likely (ties in id order) whose probabilities first reach it.
  int64_t m = n;
  const int64_t* at = nullptr;  // the candidates left, in this order (nullptr: all, in id order)
  if (top_p < 1.0) {
    order.resize(n);
    for (int64_t i = 0; i < n; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return e[x] > e[y]; });
    const double reach = top_p * total;
    double reached = 0.0;
    for (m = 0; m < n;) {
      reached += e[order[m++]];
      if (reached >= reach) break;
    }
    total = reached;
    at = order.data();
    best = order[0];
  }
  // Mirostat: tokens whose surprise exceeds mu go; the most likely stays.
  const double floor = std::pow(2.0, -mu) * total;
  const auto allowed = [&](int64_t j) { return j == best || e[j] >= floor; };
  double kept = 0.0;
  for (int64_t i = 0; i < m; ++i) {
    const int64_t j = at ? at[i] : i;
    if (allowed(j)) kept += e[j];
  }
  const double target = uniform * kept;
  double cumulative = 0.0;
  int64_t choice = best;  // a target the rounding put past the last sum draws the last allowed
  for (int64_t i = 0; i < m; ++i) {
    const int64_t j = at ? at[i] : i;
    if (!allowed(j)) continue;
    choice = j;
    cumulative += e[j];
    if (cumulative > target) break;
  }
  return {choice, -std::log2(e[choice] / kept)};
}

// Steps 5 and 6 for each row b: its survivors are ids/kept[start_b : start_b + found[b]] (as
// sampling_candidates gives them); rows spread over torch's threads. temperature, top_p, mu and
// uniform (a draw from [0, 1)) are float64, one per row. Returns the drawn tokens (int64) and
// their surprise in bits (float64), with which the caller moves mu.
std::tuple<at::Tensor, at::Tensor> sampling_draw(
    const at::Tensor& ids, const at::Tensor& kept, const at::Tensor& found, const at::Tensor& temperature,
    const at::Tensor& top_p, const at::Tensor& mu, const at::Tensor& uniform) {
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && kept.scalar_type() == at::kFloat &&
              kept.is_contiguous() && kept.numel() == ids.numel(), "ids (S) int64 and kept (S) float32");
  TORCH_CHECK(found.scalar_type() == at::kLong && found.is_contiguous(), "found must be (B) int64");
  const int64_t B = found.numel();
  for (const at::Tensor* t : {&temperature, &top_p, &mu, &uniform}) {
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->is_contiguous() && t->numel() == B, "one float64 per row");
  }
  const int64_t* foundp = found.data_ptr<int64_t>();
  std::vector<int64_t> start(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(foundp[b] > 0, "every row needs at least one candidate");
    start[b + 1] = start[b] + foundp[b];
  }
  TORCH_CHECK(start[B] == ids.numel(), "found must add up to the number of candidates");
  auto tokens = at::empty({B}, at::kLong);
  auto surprise = at::empty({B}, at::kDouble);
  const float* keptp = kept.data_ptr<float>();
  // Every survivor's weight exp((logit - its row's top) / temperature), the exponentials in one
  // vectorised ATen call over all rows (a row can keep the whole vocabulary: min_p 0).
  auto weights = at::empty({start[B]}, at::kDouble);
  double* e = weights.data_ptr<double>();
  std::vector<int64_t> best(B);  // each row's first top logit
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* logit = keptp + start[b];
      for (int64_t i = 1; i < foundp[b]; ++i) {
        if (logit[i] > logit[best[b]]) best[b] = i;
      }
      const double top = logit[best[b]], inverse = 1.0 / temperature.data_ptr<double>()[b];
      for (int64_t i = 0; i < foundp[b]; ++i) e[start[b] + i] = (static_cast<double>(logit[i]) - top) * inverse;
    }
  });
  weights.exp_();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order;
    for (int64_t b = begin; b < end; ++b) {
      const auto [chosen, bits] = draw_row(e + start[b], foundp[b], best[b], top_p.data_ptr<double>()[b],
                                           mu.data_ptr<double>()[b], uniform.data_ptr<double>()[b], order);
      tokens.data_ptr<int64_t>()[b] = ids.data_ptr<int64_t>()[start[b] + chosen];
      surprise.data_ptr<double>()[b] = bits;
    }
  });
  return {tokens, surprise};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rpserver, m) {
  m.def("sampling_candidates(Tensor(a!) logits, Tensor used, Tensor counts, Tensor rows, Tensor presence, "
        "Tensor frequency, Tensor log_min_p) -> (Tensor, Tensor, Tensor)");
  m.def("sampling_draw(Tensor ids, Tensor kept, Tensor found, Tensor temperature, Tensor top_p, Tensor mu, "
        "Tensor uniform) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rpserver, CPU, m) {
  m.impl("sampling_candidates", sampling_candidates);
  m.impl("sampling_draw", sampling_draw);
}
