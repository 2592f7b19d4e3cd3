// Several matrix products in one call, their outputs side by side: what
// int8_linear.cpp and f32_linear.cpp share.
//
// Product g multiplies columns [column_g, column_g + K_g) of x (M rows) by its
// weight (N_g, K_g) into columns [out_g, out_g + N_g) of y (M, sum of N_g).
// The output channels of all the products, four at a time (a block: one
// packed stream of weights), are spread over torch's threads in one parallel
// region, by the bytes of weights each block reads. One call for R, K and V
// (or for a layer's four LoRA halves) instead of three (or four) saves the
// parallel regions' start and end and lets the memory stream run on: one
// decode row through R, K and V, weights from memory, 147 -> 103 us.

#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <vector>

namespace rpserver {

struct Product {
  const at::Tensor* weight;
  int64_t K, N;      // the weight's shape: N output channels, K inputs
  int64_t column;    // where its inputs start in x's rows
  int64_t out;       // where its outputs start in y's rows
  int64_t first;     // its first block's first unit (see plan)
  int64_t units;     // units per block of 4 output channels
};

// Checks x (M, width) float32 on the CPU, with its rows' elements adjacent, against the weights
// (each (N, K), contiguous, of `dtype`, K a multiple of k_multiple and N of 4) and the columns;
// returns the products, their blocks numbered in units of 128 bytes of weights.
inline std::vector<Product> plan(const at::Tensor& x, at::TensorList weights, at::IntArrayRef columns,
                                 at::ScalarType dtype, int64_t k_multiple, const char* dtype_name) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.stride(1) == 1,
              "x must be (M, width) float32 on the CPU, each row's elements adjacent");
  TORCH_CHECK(!weights.empty() && weights.size() == columns.size(), "one column per weight");
  std::vector<Product> products;
  int64_t out = 0, unit = 0;
  for (size_t g = 0; g < weights.size(); ++g) {
    const at::Tensor& w = weights[g];
    TORCH_CHECK(w.dim() == 2 && w.scalar_type() == dtype && w.is_contiguous() && w.device().is_cpu(),
                "each weight must be a contiguous (N, K) ", dtype_name, " tensor on the CPU");
    const int64_t N = w.size(0), K = w.size(1);
    TORCH_CHECK(K % k_multiple == 0 && N % 4 == 0, "K must be a multiple of ", k_multiple, " and N of 4");
    TORCH_CHECK(columns[g] >= 0 && columns[g] + K <= x.size(1), "product ", g, " reads columns [", columns[g],
                ", ", columns[g] + K, ") of x, which has ", x.size(1));
    const int64_t units = 4 * K * static_cast<int64_t>(w.element_size()) / 128;
    products.push_back({&w, K, N, columns[g], out, unit, units});
    out += N;
    unit += (N / 4) * units;
  }
  return products;
}

// Runs block(product, first channel, end channel) for every product's output channels, spread
// over torch's threads in tasks of at least `grain` units (128 bytes of weights each), about
// eight a thread, which the threads take in turn as they finish the ones before: a thread
// slowed by anything else on its core (the event loop, another process, a neighbour on the
// host) takes fewer, where an even split made the pass wait for it. A block goes to the task
// its first unit falls in; which thread runs it changes no number.
template <typename Block>
void for_each_block(const std::vector<Product>& products, int64_t grain, const Block& block) {
  const Product& last = products.back();
  const int64_t total = last.first + (last.N / 4) * last.units;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t size = std::max(grain, (total + 8 * threads - 1) / (8 * threads));
  const int64_t tasks = (total + size - 1) / size;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, tasks), 1, [&](int64_t, int64_t) {
    for (int64_t task = next++; task < tasks; task = next++) {
      const int64_t begin = task * size, end = std::min(total, begin + size);
      for (const Product& p : products) {
        const auto starting = [&](int64_t unit) {  // blocks of p whose first unit is before `unit`
          const int64_t from = std::max<int64_t>(0, unit - p.first);
          return std::min(p.N / 4, (from + p.units - 1) / p.units);
        };
        const int64_t lo = starting(begin), hi = starting(end);
        if (lo < hi) block(p, lo * 4, hi * 4);
      }
    }
  });
}

inline int64_t width(const std::vector<Product>& products) { return products.back().out + products.back().N; }

}  // namespace rpserver
