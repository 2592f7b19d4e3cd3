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
// sampling_truncate: step 4's top_k, typical_p and XTC on each row's
// survivors, where numpy sorted every survivor (the whole vocabulary with
// min_p 0, as clients that use top_k or typical_p send): top_k selects in
// linear time, typical_p sorts only as far as its mass reaches. The same
// float64 quantities as Sampler.truncate (numpy) but for the order of its
// sums; tests/test_sampling.py checks that both keep the same tokens.
//
// dry_repeats: DRY's search (step 0) for the longest repeat each next token
// would extend, in one pass over the reply's context, where Python walked
// every earlier occurrence of the last token.
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
#include <unordered_map>
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

// Where each row's survivors start in ids/kept (as sampling_candidates gives them: found[b] a
// row, every row at least one), and one past the last; checks the layout.
std::vector<int64_t> row_starts(const at::Tensor& ids, const at::Tensor& kept, const at::Tensor& found) {
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && kept.scalar_type() == at::kFloat &&
              kept.is_contiguous() && kept.numel() == ids.numel(), "ids (S) int64 and kept (S) float32");
  TORCH_CHECK(found.scalar_type() == at::kLong && found.is_contiguous(), "found must be (B) int64");
  const int64_t B = found.numel();
  const int64_t* foundp = found.data_ptr<int64_t>();
  std::vector<int64_t> start(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(foundp[b] > 0, "every row needs at least one candidate");
    start[b + 1] = start[b] + foundp[b];
  }
  TORCH_CHECK(start[B] == ids.numel(), "found must add up to the number of candidates");
  return start;
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
  const int64_t B = found.numel();
  for (const at::Tensor* t : {&temperature, &top_p, &mu, &uniform}) {
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->is_contiguous() && t->numel() == B, "one float64 per row");
  }
  const std::vector<int64_t> start = row_starts(ids, kept, found);
  const int64_t* foundp = found.data_ptr<int64_t>();
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

// Step 4 for one row's n survivors (logits in id order): the positions that stay, ascending.
// top_k: the k largest logits (ties: the lower position first, as a stable sort of -logit);
// typical_p < 1: by |surprise - entropy| (ties: position order), until their probabilities
// reach typical_p; xtc_threshold <= 1: every position whose probability (renormalised after
// typical_p) is at least it goes, but the least likely of them (the first such), when two or
// more are (XTC's coin, drawn by the caller, came up). Sampler.truncate is the reference.
std::vector<int64_t> truncate_row(const float* logit, int64_t n, int64_t top_k, double typical_p,
                                  double xtc_threshold) {
  std::vector<int64_t> index(n);
  for (int64_t i = 0; i < n; ++i) index[i] = i;
  if (top_k > 0 && top_k < n) {
    const auto more_likely = [&](int64_t x, int64_t y) { return logit[x] > logit[y] || (logit[x] == logit[y] && x < y); };
    std::nth_element(index.begin(), index.begin() + top_k, index.end(), more_likely);
    index.resize(top_k);
    std::sort(index.begin(), index.end());
  }
  const bool typical = typical_p < 1.0 && index.size() > 1, xtc = xtc_threshold <= 1.0;
  if (!typical && !xtc) return index;
  const int64_t m = static_cast<int64_t>(index.size());
  double top = -INFINITY;
  for (int64_t i : index) top = std::max(top, static_cast<double>(logit[i]));
  std::vector<double> p(m);
  for (int64_t i = 0; i < m; ++i) p[i] = std::exp(static_cast<double>(logit[index[i]]) - top);
  double total = sum(p.data(), m);
  for (double& x : p) x /= total;
  if (typical) {
    std::vector<double> distance(m);
    double entropy = 0.0;
    for (int64_t i = 0; i < m; ++i) {
      distance[i] = -std::log(p[i]);
      if (p[i] > 0.0) entropy += p[i] * distance[i];
    }
    for (double& d : distance) d = std::fabs(d - entropy);
    const auto closer = [&](int64_t x, int64_t y) { return distance[x] < distance[y] || (distance[x] == distance[y] && x < y); };
    // Sorted only as far as needed: the closest `sorted` in order, then four times as many, ...
    std::vector<int64_t> order(m);
    for (int64_t i = 0; i < m; ++i) order[i] = i;
    int64_t sorted = 0, count = m;
    double reached = 0.0;
    for (int64_t want = std::min<int64_t>(m, 256); sorted < m; want = std::min<int64_t>(m, want * 4)) {
      std::nth_element(order.begin() + sorted, order.begin() + want - 1, order.end(), closer);
      std::sort(order.begin() + sorted, order.begin() + want, closer);
      for (; sorted < want; ++sorted) {
        reached += p[order[sorted]];
        if (reached >= typical_p) break;
      }
      if (sorted < want) {  // reached at order[sorted]
        count = sorted + 1;
        break;
      }
    }
    order.resize(count);
    std::sort(order.begin(), order.end());
    std::vector<int64_t> kept_index(count);
    std::vector<double> kept_p(count);
    for (int64_t i = 0; i < count; ++i) {
      kept_index[i] = index[order[i]];
      kept_p[i] = p[order[i]];
    }
    const double kept_total = sum(kept_p.data(), count);
    for (double& x : kept_p) x /= kept_total;
    index.swap(kept_index);
    p.swap(kept_p);
  }
  if (xtc) {
    int64_t above = 0, least = -1;
    for (int64_t i = 0; i < static_cast<int64_t>(p.size()); ++i) {
      if (p[i] >= xtc_threshold) {
        ++above;
        if (least < 0 || p[i] < p[least]) least = i;
      }
    }
    if (above >= 2) {
      std::vector<int64_t> left;
      for (int64_t i = 0; i < static_cast<int64_t>(p.size()); ++i) {
        if (p[i] < xtc_threshold || i == least) left.push_back(index[i]);
      }
      index.swap(left);
    }
  }
  return index;
}

// Step 4 for each row b: its survivors are ids/kept[start_b : start_b + found[b]] (as
// sampling_candidates gives them); top_k (int64, 0: off), typical_p (float64, 1: off) and
// xtc_threshold (float64, above 1: no XTC this step) one per row. Returns the survivors that
// stay, in the same layout.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sampling_truncate(
    const at::Tensor& ids, const at::Tensor& kept, const at::Tensor& found, const at::Tensor& top_k,
    const at::Tensor& typical_p, const at::Tensor& xtc_threshold) {
  const int64_t B = found.numel();
  TORCH_CHECK(top_k.scalar_type() == at::kLong && top_k.is_contiguous() && top_k.numel() == B, "one int64 top_k per row");
  for (const at::Tensor* t : {&typical_p, &xtc_threshold}) {
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->is_contiguous() && t->numel() == B, "one float64 per row");
  }
  const std::vector<int64_t> start = row_starts(ids, kept, found);
  const int64_t* foundp = found.data_ptr<int64_t>();
  const float* keptp = kept.data_ptr<float>();
  std::vector<std::vector<int64_t>> stay(B);
  // Rows spread over torch's threads only when some keep the whole vocabulary (min_p 0): on a few
  // survivors a row the work is microseconds, less than waking the threads (on a busy machine, much less).
  const int64_t grain = start[B] >= 65536 ? 1 : B;
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      stay[b] = truncate_row(keptp + start[b], foundp[b], top_k.data_ptr<int64_t>()[b],
                             typical_p.data_ptr<double>()[b], xtc_threshold.data_ptr<double>()[b]);
    }
  });
  int64_t total = 0;
  for (const auto& row : stay) total += row.size();
  auto id_out = at::empty({total}, at::kLong);
  auto logit_out = at::empty({total}, at::kFloat);
  auto found_out = at::empty({B}, at::kLong);
  int64_t at = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i : stay[b]) {
      id_out.data_ptr<int64_t>()[at] = ids.data_ptr<int64_t>()[start[b] + i];
      logit_out.data_ptr<float>()[at] = keptp[start[b] + i];
      ++at;
    }
    found_out.data_ptr<int64_t>()[b] = static_cast<int64_t>(stay[b].size());
  }
  return {id_out, logit_out, found_out};
}

// DRY's search on a reply's context (int64 token ids, the last one the token just read) with
// `breakers` (int64 ids, ascending): for each token that follows an earlier occurrence of the
// last token, the longest repeat it would extend (the matching run ending there, never across a
// breaker; a breaker as the last or the following token: none). Returns the tokens whose longest
// repeat is at least `allowed`, in the order of their first such occurrence, and those lengths.
// Sampler.dry_penalties_reference is the reference.
std::tuple<at::Tensor, at::Tensor> dry_repeats(const at::Tensor& context, const at::Tensor& breakers,
                                               int64_t allowed) {
  TORCH_CHECK(context.scalar_type() == at::kLong && context.is_contiguous() && context.dim() == 1,
              "context must be (N) int64");
  TORCH_CHECK(breakers.scalar_type() == at::kLong && breakers.is_contiguous(), "breakers must be int64");
  const int64_t* c = context.data_ptr<int64_t>();
  const int64_t* br = breakers.data_ptr<int64_t>();
  const int64_t n = context.numel(), nb = breakers.numel();
  const auto is_breaker = [&](int64_t token) { return std::binary_search(br, br + nb, token); };
  std::vector<int64_t> tokens, lengths;
  std::unordered_map<int64_t, size_t> slot;  // token -> its place in tokens
  if (n >= 2 && !is_breaker(c[n - 1])) {
    const int64_t end = n - 1, last = c[end];
    for (int64_t at = 0; at < end; ++at) {
      if (c[at] != last || is_breaker(c[at + 1])) continue;
      int64_t length = 1;
      while (length <= at && c[at - length] == c[end - length] && !is_breaker(c[at - length])) ++length;
      const int64_t following = c[at + 1];
      const auto [place, added] = slot.try_emplace(following, tokens.size());
      if (added) {
        tokens.push_back(following);
        lengths.push_back(length);
      } else if (length > lengths[place->second]) {
        lengths[place->second] = length;
      }
    }
  }
  std::vector<int64_t> kept_tokens, kept_lengths;
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (lengths[i] >= allowed) {
      kept_tokens.push_back(tokens[i]);
      kept_lengths.push_back(lengths[i]);
    }
  }
  auto token_out = at::empty({static_cast<int64_t>(kept_tokens.size())}, at::kLong);
  auto length_out = at::empty({static_cast<int64_t>(kept_lengths.size())}, at::kLong);
  std::copy(kept_tokens.begin(), kept_tokens.end(), token_out.data_ptr<int64_t>());
  std::copy(kept_lengths.begin(), kept_lengths.end(), length_out.data_ptr<int64_t>());
  return {token_out, length_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rpserver, m) {
  m.def("sampling_candidates(Tensor(a!) logits, Tensor used, Tensor counts, Tensor rows, Tensor presence, "
        "Tensor frequency, Tensor log_min_p) -> (Tensor, Tensor, Tensor)");
  m.def("sampling_draw(Tensor ids, Tensor kept, Tensor found, Tensor temperature, Tensor top_p, Tensor mu, "
        "Tensor uniform) -> (Tensor, Tensor)");
  m.def("sampling_truncate(Tensor ids, Tensor kept, Tensor found, Tensor top_k, Tensor typical_p, "
        "Tensor xtc_threshold) -> (Tensor, Tensor, Tensor)");
  m.def("dry_repeats(Tensor context, Tensor breakers, int allowed) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rpserver, CPU, m) {
  m.impl("sampling_candidates", sampling_candidates);
  m.impl("sampling_draw", sampling_draw);
  m.impl("sampling_truncate", sampling_truncate);
  m.impl("dry_repeats", dry_repeats);
}
