// pisces_fast._C: torch bindings of the CPU kernels (Sinkhorn, OT-attention forward and backward). Argument checks here guard the raw-pointer
// kernels; the user-facing validation (clear ValueErrors) happens in pisces_fast/ops/api.py.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "ot_attention.h"
#include "sinkhorn.h"

namespace {

void check_float_tensor(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

const bool* mask_ptr(const std::optional<at::Tensor>& mask, const char* name, at::IntArrayRef shape) {
  if (!mask.has_value()) return nullptr;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(m.scalar_type() == at::kBool, name, " must be a bool tensor");
  TORCH_CHECK(m.sizes() == shape, name, " must have shape ", shape, ", got ", m.sizes());
  TORCH_CHECK(m.is_contiguous(), name, " must be contiguous");
  return m.data_ptr<bool>();
}

pisces::SinkhornOptions sinkhorn_options(double eps, double tau, int64_t max_iter, double tol, int64_t path,
                                         int64_t kernel_dtype) {
  TORCH_CHECK(eps > 0, "eps must be > 0");
  TORCH_CHECK(tau > 0 && tau <= 1, "tau must be in (0, 1]");
  TORCH_CHECK(max_iter >= 1, "max_iter must be >= 1");
  TORCH_CHECK(tol >= 0, "tol must be >= 0");
  TORCH_CHECK(path >= 0 && path <= 2, "path must be 0 (auto), 1 (scaling) or 2 (log)");
  TORCH_CHECK(kernel_dtype >= 0 && kernel_dtype <= 3,
              "kernel_dtype must be 0 (auto), 1 (input precision), 2 (bfloat16) or 3 (float16)");
  pisces::SinkhornOptions opt;
  opt.eps = eps;
  opt.tau = tau;
  opt.max_iter = max_iter;
  opt.tol = tol;
  opt.path = static_cast<pisces::SinkhornPath>(path);
  opt.storage = static_cast<pisces::KernelStorage>(kernel_dtype);
  return opt;
}

// Ctrl-C: the calling thread polls Python's signal handlers every 50 ms of a solve (it released the
// GIL, so it takes it back just for the check). A raised KeyboardInterrupt stays set on this thread
// and is re-raised once the kernel has stopped (see run_interruptible).
bool poll_python_signals(void*) {
  pybind11::gil_scoped_acquire gil;
  return PyErr_CheckSignals() != 0;
}

// Runs `kernel(interrupter)` without the GIL; re-raises the Python exception a signal handler set.
template <typename F>
void run_interruptible(F&& kernel) {
  bool interrupted = false;
  {
    pybind11::gil_scoped_release no_gil;
    pisces::Interrupter interrupter(&poll_python_signals, nullptr);
    try {
      kernel(&interrupter);
    } catch (const pisces::Interrupted&) {
      interrupted = true;
    }
  }
  if (interrupted) throw pybind11::error_already_set();
}

// cost (P, N, M) -> (plan (P, N, M), n_iter (P,) int32, used_scaling (P,) bool). kernel_dtype: see
// sinkhorn_options; storage_out (P,) int8, if given, receives each problem's pisces::KernelStorage.
std::vector<at::Tensor> sinkhorn(const at::Tensor& cost, const std::optional<at::Tensor>& row_mask,
                                 const std::optional<at::Tensor>& col_mask, double eps, double tau, int64_t max_iter,
                                 double tol, int64_t path, int64_t kernel_dtype,
                                 const std::optional<at::Tensor>& storage_out) {
  check_float_tensor(cost, "cost", 3);
  const int64_t P = cost.size(0), N = cost.size(1), M = cost.size(2);
  TORCH_CHECK(N > 0 && M > 0, "cost must have N, M >= 1");
  const bool* rm = mask_ptr(row_mask, "row_mask", {P, N});
  const bool* cm = mask_ptr(col_mask, "col_mask", {P, M});
  auto opt = sinkhorn_options(eps, tau, max_iter, tol, path, kernel_dtype);
  int8_t* storage = nullptr;
  if (storage_out.has_value()) {
    const at::Tensor& s = *storage_out;
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kChar && s.is_contiguous() &&
                    s.sizes() == at::IntArrayRef({P}),
                "storage_out must be a contiguous (P,) int8 CPU tensor");
    storage = s.data_ptr<int8_t>();
  }
  at::Tensor plan = at::empty_like(cost);
  at::Tensor n_iter = at::zeros({P}, cost.options().dtype(at::kInt));
  at::Tensor scaling = at::zeros({P}, cost.options().dtype(at::kBool));
  const int threads = at::get_num_threads();
  run_interruptible([&](pisces::Interrupter* interrupter) {
    opt.interrupt = interrupter;
    AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "pisces_sinkhorn", [&] {
      pisces::sinkhorn_batched<scalar_t>(cost.data_ptr<scalar_t>(), rm, cm, P, N, M, opt, plan.data_ptr<scalar_t>(),
                                         n_iter.data_ptr<int32_t>(), scaling.data_ptr<bool>(), threads, storage);
    });
  });
  return {plan, n_iter, scaling};
}

// q (B,H,N,D), k (B,H,M,D), v (B,H,M,Dv) -> (out (B,H,N,Dv), plan (B,H,N,M), n_iter, used_scaling (B*H,))
std::vector<at::Tensor> ot_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& frame_idx, const at::Tensor& coords,
                                             const std::optional<at::Tensor>& key_padding_mask,
                                             const std::optional<at::Tensor>& query_padding_mask, double gamma,
                                             double eta, double eps, double tau, int64_t max_iter, double tol,
                                             double fuse_eps, double scale, int64_t path, int64_t kernel_dtype,
                                             const std::optional<at::Tensor>& row_stats_out) {
  check_float_tensor(q, "q", 4);
  check_float_tensor(k, "k", 4);
  check_float_tensor(v, "v", 4);
  check_float_tensor(frame_idx, "frame_idx", 1);
  check_float_tensor(coords, "coords", 2);
  const auto dtype = q.scalar_type();
  for (const at::Tensor* t : {&k, &v, &frame_idx, &coords})
    TORCH_CHECK(t->scalar_type() == dtype, "q, k, v, frame_idx, coords must share a dtype");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  const int64_t M = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D, "k must be (B, H, M, D) matching q");
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == M, "v must be (B, H, M, Dv) matching k");
  TORCH_CHECK(frame_idx.size(0) == M, "frame_idx must be (M,)");
  TORCH_CHECK(coords.size(0) == M && coords.size(1) == 2, "coords must be (M, 2)");
  TORCH_CHECK(B > 0 && H > 0 && N > 0 && M > 0 && D > 0 && Dv > 0, "empty dimensions");
  const bool* km = mask_ptr(key_padding_mask, "key_padding_mask", {B, M});
  const bool* qm = mask_ptr(query_padding_mask, "query_padding_mask", {B, N});
  pisces::OTAttentionOptions opt;
  opt.gamma = gamma;
  opt.eta = eta;
  opt.fuse_eps = fuse_eps;
  opt.scale = scale;
  opt.sinkhorn = sinkhorn_options(eps, tau, max_iter, tol, path, kernel_dtype);
  if (row_stats_out.has_value()) {
    const at::Tensor& r = *row_stats_out;
    TORCH_CHECK(r.device().is_cpu() && r.scalar_type() == dtype && r.is_contiguous() &&
                    r.sizes() == at::IntArrayRef({B, H, N, 2}),
                "row_stats_out must be a contiguous (B, H, N, 2) CPU tensor in q's dtype");
  }
  at::Tensor out = at::empty({B, H, N, Dv}, q.options());
  at::Tensor plan = at::empty({B, H, N, M}, q.options());
  at::Tensor n_iter = at::zeros({B * H}, q.options().dtype(at::kInt));
  at::Tensor scaling = at::zeros({B * H}, q.options().dtype(at::kBool));
  const int threads = at::get_num_threads();
  run_interruptible([&](pisces::Interrupter* interrupter) {
    opt.sinkhorn.interrupt = interrupter;
    AT_DISPATCH_FLOATING_TYPES(dtype, "pisces_ot_attention", [&] {
      pisces::ot_attention_batched<scalar_t>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), frame_idx.data_ptr<scalar_t>(),
          coords.data_ptr<scalar_t>(), km, qm, B, H, N, M, D, Dv, opt, out.data_ptr<scalar_t>(),
          plan.data_ptr<scalar_t>(), n_iter.data_ptr<int32_t>(), scaling.data_ptr<bool>(), threads,
          row_stats_out.has_value() ? row_stats_out->data_ptr<scalar_t>() : nullptr);
    });
  });
  return {out, plan, n_iter, scaling};
}

// Gradients of out w.r.t. q, k, v with the plan fixed -> (dq, dk, dv).
std::vector<at::Tensor> ot_attention_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& plan, const at::Tensor& grad_out,
                                              const std::optional<at::Tensor>& key_padding_mask,
                                              const std::optional<at::Tensor>& query_padding_mask, double scale,
                                              double fuse_eps, const std::optional<at::Tensor>& row_stats) {
  check_float_tensor(q, "q", 4);
  check_float_tensor(k, "k", 4);
  check_float_tensor(v, "v", 4);
  check_float_tensor(plan, "plan", 4);
  check_float_tensor(grad_out, "grad_out", 4);
  const auto dtype = q.scalar_type();
  for (const at::Tensor* t : {&k, &v, &plan, &grad_out})
    TORCH_CHECK(t->scalar_type() == dtype, "q, k, v, plan, grad_out must share a dtype");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  const int64_t M = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D, "k must be (B, H, M, D) matching q");
  TORCH_CHECK(v.size(0) == B && v.size(1) == H && v.size(2) == M, "v must be (B, H, M, Dv) matching k");
  TORCH_CHECK(plan.sizes() == at::IntArrayRef({B, H, N, M}), "plan must be (B, H, N, M)");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({B, H, N, Dv}), "grad_out must be (B, H, N, Dv)");
  TORCH_CHECK(B > 0 && H > 0 && N > 0 && M > 0 && D > 0 && Dv > 0, "empty dimensions");
  const bool* km = mask_ptr(key_padding_mask, "key_padding_mask", {B, M});
  const bool* qm = mask_ptr(query_padding_mask, "query_padding_mask", {B, N});
  if (row_stats.has_value()) {
    const at::Tensor& r = *row_stats;
    TORCH_CHECK(r.device().is_cpu() && r.scalar_type() == dtype && r.is_contiguous() &&
                    r.sizes() == at::IntArrayRef({B, H, N, 2}),
                "row_stats must be the forward's contiguous (B, H, N, 2) row statistics in q's dtype");
  }
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const int threads = at::get_num_threads();
  {
    pybind11::gil_scoped_release no_gil;
    AT_DISPATCH_FLOATING_TYPES(dtype, "pisces_ot_attention_backward", [&] {
      pisces::ot_attention_backward_batched<scalar_t>(
          q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), plan.data_ptr<scalar_t>(),
          grad_out.data_ptr<scalar_t>(), km, qm, B, H, N, M, D, Dv, scale, fuse_eps, dq.data_ptr<scalar_t>(),
          dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), threads,
          row_stats.has_value() ? row_stats->data_ptr<scalar_t>() : nullptr);
    });
  }
  return {dq, dk, dv};
}

bool scaling_domain_is_safe(double cost_range, double eps, int64_t N, int64_t M, bool float64) {
  return float64 ? pisces::scaling_domain_is_safe<double>(cost_range, eps, N, M)
                 : pisces::scaling_domain_is_safe<float>(cost_range, eps, N, M);
}

int64_t resolve_kernel_storage(int64_t kernel_dtype, bool scaling, double cost_range, double eps, double tau,
                               bool float64) {
  TORCH_CHECK(kernel_dtype >= 0 && kernel_dtype <= 3, "kernel_dtype must be 0..3");
  const auto req = static_cast<pisces::KernelStorage>(kernel_dtype);
  return static_cast<int64_t>(float64 ? pisces::resolve_kernel_storage<double>(req, scaling, cost_range, eps, tau)
                                      : pisces::resolve_kernel_storage<float>(req, scaling, cost_range, eps, tau));
}

double kernel16_plan_error_bound(double tau, int64_t kernel_dtype) {
  TORCH_CHECK(kernel_dtype >= 0 && kernel_dtype <= 3, "kernel_dtype must be 0..3");
  return pisces::kernel16_plan_error_bound(tau, static_cast<pisces::KernelStorage>(kernel_dtype));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pisces_fast CPU kernels: batched unbalanced Sinkhorn and the fused OT-attention forward";
  m.def("sinkhorn", &sinkhorn, "Batched unbalanced Sinkhorn (Algorithm 3) on (P, N, M) costs",
        pybind11::arg("cost"), pybind11::arg("row_mask"), pybind11::arg("col_mask"), pybind11::arg("eps"),
        pybind11::arg("tau"), pybind11::arg("max_iter"), pybind11::arg("tol"), pybind11::arg("path") = 0,
        pybind11::arg("kernel_dtype") = 1, pybind11::arg("storage_out") = pybind11::none());
  m.def("ot_attention_forward", &ot_attention_forward, "Fused OT-attention forward",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("frame_idx"),
        pybind11::arg("coords"), pybind11::arg("key_padding_mask"), pybind11::arg("query_padding_mask"),
        pybind11::arg("gamma"), pybind11::arg("eta"), pybind11::arg("eps"), pybind11::arg("tau"),
        pybind11::arg("max_iter"), pybind11::arg("tol"), pybind11::arg("fuse_eps"), pybind11::arg("scale"),
        pybind11::arg("path") = 0, pybind11::arg("kernel_dtype") = 1, pybind11::arg("row_stats_out") = pybind11::none());
  m.def("ot_attention_backward", &ot_attention_backward, "OT-attention backward (plan held fixed)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("plan"), pybind11::arg("grad_out"),
        pybind11::arg("key_padding_mask"), pybind11::arg("query_padding_mask"), pybind11::arg("scale"),
        pybind11::arg("fuse_eps"), pybind11::arg("row_stats") = pybind11::none());
  m.def("scaling_domain_is_safe", &scaling_domain_is_safe,
        "Whether a problem with this valid cost range runs the scaling-domain iteration (path=auto)",
        pybind11::arg("cost_range"), pybind11::arg("eps"), pybind11::arg("n"), pybind11::arg("m"),
        pybind11::arg("float64"));
  m.def("resolve_kernel_storage", &resolve_kernel_storage,
        "The kernel storage (1 input precision, 2 bfloat16, 3 float16) a problem gets; raises ValueError when a "
        "requested 16-bit storage cannot be honoured",
        pybind11::arg("kernel_dtype"), pybind11::arg("scaling"), pybind11::arg("cost_range"), pybind11::arg("eps"),
        pybind11::arg("tau"), pybind11::arg("float64"));
  m.def("kernel16_plan_error_bound", &kernel16_plan_error_bound,
        "A-priori bound on every plan entry's relative error from storing the kernel in 16 bits",
        pybind11::arg("tau"), pybind11::arg("kernel_dtype"));
  m.attr("KERNEL16_FLOAT16_MAX_RANGE") = pisces::kFloat16MaxRange;
  m.attr("KERNEL16_AUTO_PLAN_RTOL") = pisces::kAuto16PlanRtol;
}
