// Kernel-only timing of the batched Sinkhorn (no Python, no torch): for tuning the kernels.
// The numbers we report come from benchmarks/sinkhorn_bench.py.
//   bench_sinkhorn [P=32] [N=40] [M=2049] [iters=100] [threads=2] [path=1 (scaling) | 2 (log)] [double=0]
//                  [storage=1 (input precision) | 2 (bfloat16) | 3 (float16) | 0 (auto)]
#include <algorithm>
#include <chrono>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "ot_attention.h"
#include "sinkhorn.h"

template <typename T>
static void run(int64_t P, int64_t N, int64_t M, int64_t iters, int threads, int path, int storage) {
  std::mt19937_64 rng(0);
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  std::vector<T> cost(static_cast<size_t>(P * N * M)), plan(cost.size());
  for (auto& c : cost) c = static_cast<T>(u01(rng));
  std::vector<int32_t> n_iter(P);
  std::vector<char> scaling(P);
  pisces::SinkhornOptions opt;
  opt.eps = 0.05;
  opt.tau = 0.9;
  opt.max_iter = iters;
  opt.tol = 0.0;
  opt.path = static_cast<pisces::SinkhornPath>(path);
  opt.storage = static_cast<pisces::KernelStorage>(storage);
  std::vector<double> times, cpu;
  const int reps = P * iters <= 400 ? 300 : 12;
  for (int rep = 0; rep < reps; ++rep) {
    const std::clock_t c0 = std::clock();
    auto t0 = std::chrono::steady_clock::now();
    pisces::sinkhorn_batched<T>(cost.data(), nullptr, nullptr, P, N, M, opt, plan.data(), n_iter.data(),
                                reinterpret_cast<bool*>(scaling.data()), threads);
    auto t1 = std::chrono::steady_clock::now();
    if (rep >= 2) times.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    if (rep >= 2) cpu.push_back(1e3 * double(std::clock() - c0) / CLOCKS_PER_SEC);
  }
  std::sort(times.begin(), times.end());
  std::sort(cpu.begin(), cpu.end());
  std::printf("  process CPU time: min %.2f ms (all threads)\n", cpu.front());
  const double med = times[times.size() / 2];
  std::printf("%s storage=%d P=%lld N=%lld M=%lld iters=%lld threads=%d path=%d: median %.2f ms, min %.2f ms, "
              "%.2f us per problem-iteration per thread (median)\n",
              sizeof(T) == 4 ? "float32" : "float64", storage, (long long)P, (long long)N, (long long)M, (long long)iters,
              threads, path, med, times.front(), med * 1e3 * threads / (P * iters));

  // ot_attention forward at the same shape, D = Dv = 64.
  const int64_t D = 64;
  std::vector<T> q(P * N * D), k(P * M * D), v(P * M * D), out(P * N * D), t(M), s(2 * M);
  std::normal_distribution<double> g(0.0, 1.0);
  for (auto& x : q) x = static_cast<T>(g(rng));
  for (auto& x : k) x = static_cast<T>(g(rng));
  for (auto& x : v) x = static_cast<T>(g(rng));
  for (int64_t j = 0; j < M; ++j) {
    t[j] = static_cast<T>(j / 256);
    s[2 * j] = static_cast<T>((j / 16) % 16);
    s[2 * j + 1] = static_cast<T>(j % 16);
  }
  pisces::OTAttentionOptions aopt;
  aopt.sinkhorn = opt;
  times.clear();
  for (int rep = 0; rep < 8; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    pisces::ot_attention_batched<T>(q.data(), k.data(), v.data(), t.data(), s.data(), nullptr, nullptr, 1, P, N, M,
                                    D, D, aopt, out.data(), plan.data(), n_iter.data(),
                                    reinterpret_cast<bool*>(scaling.data()), threads);
    auto t1 = std::chrono::steady_clock::now();
    if (rep >= 2) times.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(times.begin(), times.end());
  std::printf("  ot_attention forward (D=64): median %.2f ms, min %.2f ms\n", times[times.size() / 2],
              times.front());
}

int main(int argc, char** argv) {
  const int64_t P = argc > 1 ? std::atoll(argv[1]) : 32;
  const int64_t N = argc > 2 ? std::atoll(argv[2]) : 40;
  const int64_t M = argc > 3 ? std::atoll(argv[3]) : 2049;
  const int64_t iters = argc > 4 ? std::atoll(argv[4]) : 100;
  const int threads = argc > 5 ? std::atoi(argv[5]) : 2;
  const int path = argc > 6 ? std::atoi(argv[6]) : 1;
  const bool dbl = argc > 7 && std::atoi(argv[7]) != 0;
  const int storage = argc > 8 ? std::atoi(argv[8]) : 1;
  if (dbl)
    run<double>(P, N, M, iters, threads, path, storage);
  else
    run<float>(P, N, M, iters, threads, path, storage);
  return 0;
}
