// The most int8 multiply-adds per second this CPU's AVX2 gives: the
// instruction sequence inference/kernels/int8_linear.cpp multiplies with
// (u8 x s8 pair products, summed to int32), on registers only, so nothing
// waits for memory. bench/kernels.py compiles and runs it, and compares
// the kernel's speed on a prompt-sized product with it.
//
//     g++ -O3 -mavx2 -pthread bench/int8_peak.cpp -o int8_peak && ./int8_peak THREADS
//
// Prints one line: G multiply-adds per second over all THREADS threads.

#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

static long run(long iterations) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i x = _mm256_set1_epi8(3), w0 = _mm256_set1_epi8(-2), w1 = _mm256_set1_epi8(5);
  __m256i a[12];
  for (auto& acc : a) acc = _mm256_setzero_si256();
  for (long it = 0; it < iterations; ++it) {
    // Twelve independent sums: enough to cover the multiplies' latency.
    for (int i = 0; i < 12; ++i) {
      a[i] = _mm256_add_epi32(a[i], _mm256_madd_epi16(_mm256_maddubs_epi16(x, (i & 1) ? w0 : w1), ones));
    }
    __asm__ volatile("" : "+x"(x));  // keep the loop from being folded away
  }
  __m256i total = a[0];
  for (int i = 1; i < 12; ++i) total = _mm256_add_epi32(total, a[i]);
  return _mm256_extract_epi32(total, 0);
}

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  const long iterations = 100000000;
  std::vector<std::thread> pool;
  std::vector<long> sums(threads);
  const auto start = std::chrono::steady_clock::now();
  for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { sums[t] = run(iterations); });
  for (auto& thread : pool) thread.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("%.1f\n", threads * iterations * 12.0 * 32.0 / seconds / 1e9);
  return sums[0] == 42 ? 1 : 0;  // uses the sums
}
