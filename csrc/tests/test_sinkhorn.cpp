// Native test of the CPU kernels (run by ctest): the vectorized exp/log against libm, and the
// Sinkhorn and OT-attention kernels against naive double-precision transcriptions of
// pisces_fast/ops/reference.py, on small random problems with padding on both sides.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "ot_attention.h"
#include "simd.h"
#include "sinkhorn.h"

namespace {

int g_failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAIL: %s\n", what.c_str());
    ++g_failures;
  }
}

const double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------------------------
// exp / log accuracy in ulp of the result, against libm in double (long double for the doubles).

template <typename T>
void test_exp_log(std::mt19937_64& rng) {
  using V = pisces::simd::Vec<T>;
  constexpr int W = pisces::simd::Traits<T>::W;
  const double lo = sizeof(T) == 4 ? -87.0 : -708.0, hi = sizeof(T) == 4 ? 88.0 : 709.0;
  std::uniform_real_distribution<double> ux(lo, hi), ul(-700.0, 700.0), small(-1.0, 1.0);
  double worst_exp = 0, worst_log = 0;
  for (int rep = 0; rep < 20000; ++rep) {
    V x, y;
    for (int l = 0; l < W; ++l) {
      x[l] = static_cast<T>(rep % 2 ? ux(rng) : small(rng));
      // log inputs: positive numbers spanning many binades, including ones close to 1.
      const double e = sizeof(T) == 4 ? ul(rng) / 8.0 : ul(rng);
      y[l] = static_cast<T>(rep % 3 == 0 ? 1.0 + small(rng) * 1e-3 : std::exp(e));
    }
    const V ex = pisces::simd::vexp(x), lg = pisces::simd::vlog(y);
    for (int l = 0; l < W; ++l) {
      const long double ref_e = std::exp(static_cast<long double>(x[l]));
      const long double ulp_e = std::nextafter(static_cast<T>(ref_e), std::numeric_limits<T>::infinity()) -
                                static_cast<T>(ref_e);
      worst_exp = std::max<double>(worst_exp, std::fabs(static_cast<long double>(ex[l]) - ref_e) / ulp_e);
      const long double ref_l = std::log(static_cast<long double>(y[l]));
      if (ref_l != 0) {
        const T r = static_cast<T>(ref_l);
        const long double ulp_l = std::fabs(std::nextafter(r, std::numeric_limits<T>::infinity()) - r);
        worst_log = std::max<double>(worst_log, std::fabs(static_cast<long double>(lg[l]) - ref_l) / ulp_l);
      }
    }
  }
  std::printf("%s: vexp worst %.2f ulp, vlog worst %.2f ulp\n", sizeof(T) == 4 ? "float32" : "float64", worst_exp,
              worst_log);
  check(worst_exp <= 4.0, "vexp within 4 ulp");
  check(worst_log <= 4.0, "vlog within 4 ulp");
  // Special values.
  V s = pisces::simd::splat<T>(0);
  s[0] = -std::numeric_limits<T>::infinity();
  s[1] = static_cast<T>(-1e6);
  s[2] = static_cast<T>(1e6);
  s[3] = 0;
  const V es = pisces::simd::vexp(s);
  check(es[0] == 0 && es[1] == 0 && std::isinf(es[2]) && es[3] == 1, "vexp special values");
  V t = pisces::simd::splat<T>(1);
  t[0] = 0;
  t[1] = -1;
  t[2] = std::numeric_limits<T>::denorm_min() * 8;
  const V lt = pisces::simd::vlog(t);
  check(std::isinf(lt[0]) && lt[0] < 0 && std::isnan(lt[1]) && lt[3] == 0, "vlog special values");
  check(std::fabs(lt[2] - std::log(static_cast<double>(t[2]))) < 1e-3, "vlog of a subnormal");
}

template <typename T>
void test_transpose() {
  constexpr int W = pisces::simd::Traits<T>::W;
  pisces::simd::Vec<T> r[W];
  for (int i = 0; i < W; ++i)
    for (int j = 0; j < W; ++j) r[i][j] = static_cast<T>(100 * i + j);
  pisces::simd::transpose(r);
  bool ok = true;
  for (int i = 0; i < W; ++i)
    for (int j = 0; j < W; ++j) ok = ok && r[i][j] == static_cast<T>(100 * j + i);
  check(ok, "in-register transpose");
}

// ---------------------------------------------------------------------------------------------
// Naive double-precision Algorithm 3 (reference.sinkhorn_unbalanced, line by line).

struct Naive {
  std::vector<double> plan, lu, lv;
  int n_iter = 0;
};

double lse(const std::vector<double>& x) {
  double m = -kInf;
  for (double v : x) m = std::max(m, v);
  if (m == -kInf) return -kInf;
  double s = 0;
  for (double v : x) s += std::exp(v - m);
  return m + std::log(s);
}

Naive naive_sinkhorn(const std::vector<double>& C, const std::vector<char>& rm, const std::vector<char>& cm, int N,
                     int M, double eps, double tau, int max_iter, double tol) {
  int nr = 0, nc = 0;
  for (int i = 0; i < N; ++i) nr += rm[i];
  for (int j = 0; j < M; ++j) nc += cm[j];
  auto lk = [&](int i, int j) { return (rm[i] && cm[j]) ? -C[i * M + j] / eps : -kInf; };
  Naive r;
  r.lu.assign(N, 0.0);
  r.lv.assign(M, 0.0);
  for (int it = 0; it < max_iter; ++it) {
    std::vector<double> un(N, 0.0), vn(M, 0.0), x;
    for (int i = 0; i < N; ++i) {
      if (!rm[i]) continue;
      x.assign(M, 0.0);
      for (int j = 0; j < M; ++j) x[j] = lk(i, j) + r.lv[j];
      un[i] = tau * (-std::log(static_cast<double>(nr)) - lse(x));
    }
    for (int j = 0; j < M; ++j) {
      if (!cm[j]) continue;
      x.assign(N, 0.0);
      for (int i = 0; i < N; ++i) x[i] = lk(i, j) + un[i];
      vn[j] = tau * (-std::log(static_cast<double>(nc)) - lse(x));
    }
    if (tol > 0) {
      double d = 0;
      for (int i = 0; i < N; ++i) d = std::max(d, std::fabs(un[i] - r.lu[i]));
      for (int j = 0; j < M; ++j) d = std::max(d, std::fabs(vn[j] - r.lv[j]));
      if (d < tol) break;
    }
    r.lu = un;
    r.lv = vn;
    ++r.n_iter;
  }
  r.plan.assign(static_cast<size_t>(N) * M, 0.0);
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < M; ++j) r.plan[i * M + j] = (rm[i] && cm[j]) ? std::exp(r.lu[i] + lk(i, j) + r.lv[j]) : 0.0;
  return r;
}

double max_rel_err(const std::vector<double>& ref, const std::vector<double>& got) {
  double scale = 0, err = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    scale = std::max(scale, std::fabs(ref[i]));
    err = std::max(err, std::fabs(ref[i] - got[i]));
  }
  return err / scale;
}

template <typename T>
void test_sinkhorn_case(std::mt19937_64& rng, int N, int M, double eps, double mass, double tol, int max_iter,
                        bool pad, pisces::SinkhornPath path, double rel_tol) {
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  std::vector<double> C(static_cast<size_t>(N) * M);
  for (auto& c : C) c = u01(rng);
  std::vector<char> rm(N, 1), cm(M, 1);
  if (pad) {
    for (int i = 1; i < N; ++i) rm[i] = u01(rng) > 0.3;
    for (int j = 0; j + 1 < M; ++j) cm[j] = u01(rng) > 0.3;
  }
  const double tau = mass >= 0.999 ? 1.0 : (eps * mass / (1 - mass)) / (eps * mass / (1 - mass) + eps);
  const Naive ref = naive_sinkhorn(C, rm, cm, N, M, eps, tau, max_iter, tol);

  std::vector<T> cost(C.begin(), C.end()), plan(C.size(), T(-1));
  // The kernel reads the cost in its own precision: compare against the naive run on that cost.
  std::vector<double> Cr(cost.begin(), cost.end());
  const Naive ref_r = naive_sinkhorn(Cr, rm, cm, N, M, eps, tau, max_iter, tol);
  std::unique_ptr<bool[]> rmp(new bool[N]), cmp(new bool[M]);
  for (int i = 0; i < N; ++i) rmp[i] = rm[i];
  for (int j = 0; j < M; ++j) cmp[j] = cm[j];
  pisces::SinkhornOptions opt;
  opt.eps = eps;
  opt.tau = tau;
  opt.max_iter = max_iter;
  opt.tol = tol;
  opt.path = path;
  pisces::SinkhornWorkspace<T> ws;
  const auto res = pisces::sinkhorn_solve<T>(cost.data(), M, rmp.get(), cmp.get(), N, M, opt, plan.data(), M, ws);
  std::vector<double> got(plan.begin(), plan.end());
  const double err = max_rel_err(ref_r.plan, got);
  bool pad_zero = true;
  for (int i = 0; i < N; ++i)
    for (int j = 0; j < M; ++j)
      if (!(rm[i] && cm[j]) && got[i * M + j] != 0.0) pad_zero = false;
  char name[256];
  std::snprintf(name, sizeof(name), "%s N=%d M=%d eps=%g mass=%g tol=%g pad=%d path=%d(%s)",
                sizeof(T) == 4 ? "float32" : "float64", N, M, eps, mass, tol, pad, static_cast<int>(path),
                res.scaling ? "scaling" : "log");
  std::printf("sinkhorn %s: rel err %.2e, n_iter %d (naive %d)\n", name, err, res.n_iter, ref_r.n_iter);
  check(err <= rel_tol, std::string("plan matches the naive double loop: ") + name);
  check(pad_zero, std::string("padding carries exactly zero mass: ") + name);
  if (sizeof(T) == 8 || tol == 0) check(res.n_iter == ref_r.n_iter, std::string("iteration count: ") + name);
  (void)ref;
}

// Balanced OT at convergence: the plan's marginals are the uniform marginals over the real tokens.
void test_balanced_marginals(std::mt19937_64& rng) {
  const int N = 9, M = 37;
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  std::vector<double> cost(N * M), plan(N * M);
  for (auto& c : cost) c = u01(rng);
  std::unique_ptr<bool[]> rm(new bool[N]), cm(new bool[M]);
  int nr = 0, nc = 0;
  for (int i = 0; i < N; ++i) nr += (rm[i] = (i % 4 != 3));
  for (int j = 0; j < M; ++j) nc += (cm[j] = (j % 5 != 2));
  pisces::SinkhornOptions opt;
  opt.eps = 0.1;
  opt.tau = 1.0;
  opt.max_iter = 5000;
  opt.tol = 1e-13;
  for (auto path : {pisces::SinkhornPath::kScaling, pisces::SinkhornPath::kLog}) {
    opt.path = path;
    pisces::SinkhornWorkspace<double> ws;
    pisces::sinkhorn_solve<double>(cost.data(), M, rm.get(), cm.get(), N, M, opt, plan.data(), M, ws);
    double worst = 0;
    for (int i = 0; i < N; ++i) {
      double s = 0;
      for (int j = 0; j < M; ++j) s += plan[i * M + j];
      worst = std::max(worst, std::fabs(s - (rm[i] ? 1.0 / nr : 0.0)));
    }
    for (int j = 0; j < M; ++j) {
      double s = 0;
      for (int i = 0; i < N; ++i) s += plan[i * M + j];
      worst = std::max(worst, std::fabs(s - (cm[j] ? 1.0 / nc : 0.0)));
    }
    std::printf("balanced marginals (%s): worst deviation %.2e\n",
                path == pisces::SinkhornPath::kScaling ? "scaling" : "log", worst);
    check(worst < 1e-11, "balanced plan has the uniform marginals");
  }
}

// The auto switch: [0, 1] costs at eps = 0.05 take the scaling iteration in both precisions; at
// eps = 1e-3 float and double both fall back to the log domain; double keeps scaling longer.
void test_switch() {
  check(pisces::scaling_domain_is_safe<float>(1.0, 0.05, 40, 2049), "float, eps=0.05: scaling");
  check(!pisces::scaling_domain_is_safe<float>(1.0, 0.012, 40, 2049), "float, eps=0.012: log domain");
  check(!pisces::scaling_domain_is_safe<float>(1.0, 1e-3, 40, 2049), "float, eps=1e-3: log domain");
  check(pisces::scaling_domain_is_safe<double>(1.0, 0.002, 40, 2049), "double, eps=0.002: scaling");
  check(!pisces::scaling_domain_is_safe<double>(1.0, 1e-3, 40, 2049), "double, eps=1e-3: log domain");
  check(!pisces::scaling_domain_is_safe<float>(std::numeric_limits<double>::infinity(), 1.0, 4, 4),
        "infinite range: log domain");
}

// ---------------------------------------------------------------------------------------------
// Naive double OT-attention forward (reference.ot_attention).

void range_normalize(std::vector<double>& x, const std::vector<char>& valid) {
  double lo = kInf, hi = -kInf;
  for (size_t e = 0; e < x.size(); ++e)
    if (valid[e]) {
      lo = std::min(lo, x[e]);
      hi = std::max(hi, x[e]);
    }
  const double span = hi - lo;
  const bool degenerate = span <= pisces::kDegenerateRange * std::max({std::fabs(hi), std::fabs(lo), 1.0});
  for (size_t e = 0; e < x.size(); ++e) x[e] = (!valid[e] || degenerate) ? 0.0 : (x[e] - lo) / span;
}

void test_ot_attention(std::mt19937_64& rng, int N, int M, int D, int Dv, bool pad, double q_scale) {
  std::normal_distribution<double> g(0.0, 1.0);
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  std::vector<double> q(N * D), k(M * D), v(M * Dv), t(M), s(2 * M);
  for (auto& x : q) x = g(rng) * q_scale;
  for (auto& x : k) x = g(rng);
  for (auto& x : v) x = g(rng);
  for (int j = 0; j < M; ++j) {
    t[j] = j % 3;
    s[2 * j] = (j / 3) % 4;
    s[2 * j + 1] = j % 5;
  }
  std::vector<char> rm(N, 1), cm(M, 1);
  if (pad) {
    for (int i = 0; i + 1 < N; ++i) rm[i] = u01(rng) > 0.3;
    for (int j = 1; j < M; ++j) cm[j] = u01(rng) > 0.3;
  }
  const double gamma = 0.2, eta = 0.3, eps = 0.05, mass = 0.9, fe = 1e-8, scale = 1.0 / std::sqrt(D);
  const double tau_exp = (eps * mass / (1 - mass)) / (eps * mass / (1 - mass) + eps);
  const int max_iter = 50;

  // Reference forward.
  std::vector<double> A(N * M, 0.0), sem(N * M), tem(N * M), spa(N * M);
  std::vector<char> valid(N * M);
  for (int i = 0; i < N; ++i) {
    double m = -kInf;
    std::vector<double> sc(M);
    for (int j = 0; j < M; ++j) {
      double dot = 0;
      for (int d = 0; d < D; ++d) dot += q[i * D + d] * k[j * D + d];
      sc[j] = cm[j] ? dot * scale : -kInf;
      m = std::max(m, sc[j]);
    }
    double z = 0;
    for (int j = 0; j < M; ++j) z += std::exp(sc[j] - m);
    double ti = 0, px = 0, py = 0;
    for (int j = 0; j < M; ++j) {
      A[i * M + j] = std::exp(sc[j] - m) / z;
      ti += A[i * M + j] * t[j];
      px += A[i * M + j] * s[2 * j];
      py += A[i * M + j] * s[2 * j + 1];
    }
    double nq = 0;
    for (int d = 0; d < D; ++d) nq += q[i * D + d] * q[i * D + d];
    nq = std::max(std::sqrt(nq), 1e-12);
    for (int j = 0; j < M; ++j) {
      double nk = 0, dot = 0;
      for (int d = 0; d < D; ++d) {
        nk += k[j * D + d] * k[j * D + d];
        dot += (q[i * D + d] / nq) * k[j * D + d];
      }
      nk = std::max(std::sqrt(nk), 1e-12);
      sem[i * M + j] = 1.0 - dot / nk;
      tem[i * M + j] = std::fabs(ti - t[j]);
      spa[i * M + j] = std::hypot(px - s[2 * j], py - s[2 * j + 1]);
      valid[i * M + j] = rm[i] && cm[j];
    }
  }
  range_normalize(sem, valid);
  range_normalize(tem, valid);
  range_normalize(spa, valid);
  std::vector<double> C(N * M);
  for (int e = 0; e < N * M; ++e) C[e] = sem[e] + gamma * tem[e] + eta * spa[e];
  range_normalize(C, valid);
  const Naive sk = naive_sinkhorn(C, rm, cm, N, M, eps, tau_exp, max_iter, 0.0);
  std::vector<double> out(N * Dv, 0.0);
  for (int i = 0; i < N; ++i) {
    if (!rm[i]) continue;
    std::vector<double> f(M);
    double z = 0;
    for (int j = 0; j < M; ++j) {
      f[j] = cm[j] ? (A[i * M + j] + fe) * (sk.plan[i * M + j] + fe) : 0.0;
      z += f[j];
    }
    for (int j = 0; j < M; ++j)
      for (int c = 0; c < Dv; ++c) out[i * Dv + c] += f[j] / z * v[j * Dv + c];
  }

  std::unique_ptr<bool[]> rmp(new bool[N]), cmp(new bool[M]);
  for (int i = 0; i < N; ++i) rmp[i] = rm[i];
  for (int j = 0; j < M; ++j) cmp[j] = cm[j];
  pisces::OTAttentionOptions opt;
  opt.gamma = gamma;
  opt.eta = eta;
  opt.fuse_eps = fe;
  opt.scale = scale;
  opt.sinkhorn.eps = eps;
  opt.sinkhorn.tau = tau_exp;
  opt.sinkhorn.max_iter = max_iter;
  opt.sinkhorn.tol = 0.0;
  pisces::OTAttentionWorkspace<double> ws;
  std::vector<double> got_out(N * Dv, -1.0), got_plan(N * M, -1.0);
  pisces::ot_attention_solve<double>(q.data(), k.data(), v.data(), t.data(), s.data(), rmp.get(), cmp.get(), N, M, D,
                                     Dv, opt, got_out.data(), got_plan.data(), ws);
  const double e_plan = max_rel_err(sk.plan, got_plan), e_out = max_rel_err(out, got_out);
  std::printf("ot_attention N=%d M=%d D=%d Dv=%d pad=%d |q|x%g: plan rel err %.2e, out rel err %.2e\n", N, M, D, Dv,
              pad, q_scale, e_plan, e_out);
  check(e_plan < 1e-10 && e_out < 1e-10, "ot_attention forward matches the naive double forward");

  // Backward: the kernel's dq, dk, dv of L = <g, out> against central differences of the naive
  // forward with the plan held fixed (the plan is a detached prior).
  std::vector<double> go(N * Dv), dq(N * D), dk(M * D), dv(M * Dv);
  for (auto& x : go) x = std::normal_distribution<double>(0.0, 1.0)(rng);
  pisces::ot_attention_backward_solve<double>(q.data(), k.data(), v.data(), got_plan.data(), go.data(), rmp.get(),
                                              cmp.get(), N, M, D, Dv, scale, fe, dq.data(), dk.data(), dv.data(), ws);
  auto loss = [&](const std::vector<double>& qq, const std::vector<double>& kk, const std::vector<double>& vv) {
    double total = 0;
    for (int i = 0; i < N; ++i) {
      if (!rm[i]) continue;
      std::vector<double> sc(M), f(M);
      double m = -kInf, z = 0, zf = 0;
      for (int j = 0; j < M; ++j) {
        double dot = 0;
        for (int d = 0; d < D; ++d) dot += qq[i * D + d] * kk[j * D + d];
        sc[j] = cm[j] ? dot * scale : -kInf;
        m = std::max(m, sc[j]);
      }
      for (int j = 0; j < M; ++j) z += std::exp(sc[j] - m);
      for (int j = 0; j < M; ++j) {
        f[j] = cm[j] ? (std::exp(sc[j] - m) / z + fe) * (sk.plan[i * M + j] + fe) : 0.0;
        zf += f[j];
      }
      for (int j = 0; j < M; ++j)
        for (int c = 0; c < Dv; ++c) total += go[i * Dv + c] * f[j] / zf * vv[j * Dv + c];
    }
    return total;
  };
  double worst = 0, gscale = 0;
  auto probe = [&](std::vector<double>& x, const std::vector<double>& grad, int which) {
    for (int rep = 0; rep < 6; ++rep) {
      const size_t e = std::uniform_int_distribution<size_t>(0, x.size() - 1)(rng);
      const double h = 1e-5, keep = x[e];
      x[e] = keep + h;
      const double lp = which == 0 ? loss(x, k, v) : which == 1 ? loss(q, x, v) : loss(q, k, x);
      x[e] = keep - h;
      const double lm = which == 0 ? loss(x, k, v) : which == 1 ? loss(q, x, v) : loss(q, k, x);
      x[e] = keep;
      worst = std::max(worst, std::fabs((lp - lm) / (2 * h) - grad[e]));
    }
    for (double d : grad) gscale = std::max(gscale, std::fabs(d));
  };
  std::vector<double> qc = q, kc = k, vc = v;
  probe(qc, dq, 0);
  probe(kc, dk, 1);
  probe(vc, dv, 2);
  std::printf("  backward: worst |finite difference - kernel| %.2e (largest gradient %.2e)\n", worst, gscale);
  check(worst <= 1e-6 * std::max(gscale, 1e-3), "ot_attention backward matches finite differences");
  for (int i = 0; i < N; ++i)
    if (!rm[i])
      for (int c = 0; c < Dv; ++c) check(got_out[i * Dv + c] == 0.0, "padded query rows output 0");
}

}  // namespace

int main() {
  std::mt19937_64 rng(1234);
  test_exp_log<float>(rng);
  test_exp_log<double>(rng);
  test_switch();
  test_transpose<float>();
  test_transpose<double>();
  using pisces::SinkhornPath;
  for (auto path : {SinkhornPath::kAuto, SinkhornPath::kScaling, SinkhornPath::kLog}) {
    test_sinkhorn_case<double>(rng, 7, 45, 0.05, 0.9, 0.0, 60, true, path, 1e-12);
    test_sinkhorn_case<double>(rng, 1, 1, 0.05, 0.9, 0.0, 10, false, path, 1e-12);
    test_sinkhorn_case<double>(rng, 5, 17, 0.05, 0.9, 1e-6, 500, true, path, 1e-12);
    test_sinkhorn_case<double>(rng, 6, 33, 1.0, 1.0, 0.0, 40, true, path, 1e-12);
    test_sinkhorn_case<double>(rng, 3, 70, 0.05, 0.01, 0.0, 30, false, path, 1e-12);
    test_sinkhorn_case<float>(rng, 7, 45, 0.05, 0.9, 0.0, 60, true, path, 2e-5);
    test_sinkhorn_case<float>(rng, 5, 17, 0.05, 0.9, 1e-4, 500, true, path, 2e-5);
  }
  test_sinkhorn_case<double>(rng, 4, 21, 1e-3, 0.9, 0.0, 40, true, SinkhornPath::kAuto, 1e-10);
  test_sinkhorn_case<float>(rng, 4, 21, 1e-3, 0.9, 0.0, 40, true, SinkhornPath::kAuto, 1e-3);
  test_balanced_marginals(rng);
  test_ot_attention(rng, 6, 29, 8, 5, true, 1.0);
  test_ot_attention(rng, 1, 1, 3, 1, false, 1.0);
  test_ot_attention(rng, 9, 70, 16, 33, true, 30.0);
  test_ot_attention(rng, 5, 40, 21, 16, true, 1.0);
  if (g_failures) {
    std::printf("%d check(s) failed\n", g_failures);
    return 1;
  }
  std::printf("all native checks passed\n");
  return 0;
}
