// gae: generalised advantage estimation over (B, T) rewards / values with a validity mask.
//
//   delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
//   A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}        (m_T = 0: nothing beyond the row)
//   R_t     = A_t + V_t;  A_t = R_t = 0 where m_t = 0
//
// One reverse scan per row (the recurrence is sequential in t), rows split across threads with
// at::parallel_for (OpenMP). fp32 or fp64 inputs (the caller casts), accumulation in the input
// dtype, like the torch backend. Values at masked positions are never read into the result, so
// garbage (even NaN / inf) in the padding cannot leak.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <tuple>

namespace fastalign {
namespace {

template <class T>
void gae_rows(const T* r, const T* v, const T* m, T* adv, T* ret, int64_t b0, int64_t b1, int64_t len, T gamma,
              T gl) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t o = b * len;
    T next_v = 0, next_a = 0;  // V_{t+1} m_{t+1} and A_{t+1} m_{t+1}
    for (int64_t t = len - 1; t >= 0; --t) {
      if (m[o + t] != T(0)) {
        const T a = r[o + t] + gamma * next_v - v[o + t] + gl * next_a;
        adv[o + t] = a;
        ret[o + t] = a + v[o + t];
        next_v = v[o + t];
        next_a = a;
      } else {
        adv[o + t] = T(0);
        ret[o + t] = T(0);
        next_v = T(0);
        next_a = T(0);
      }
    }
  }
}

void check(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastalign gae: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), "fastalign gae: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fastalign gae: ", name, " must be ", like.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), "fastalign gae: ", name, " must have shape ", like.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gae_fwd(const at::Tensor& rewards, const at::Tensor& values,
                                           const at::Tensor& mask, double gamma, double lam) {
  TORCH_CHECK(values.dim() == 2, "fastalign gae: values must be 2-D (B, T)");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
              "fastalign gae: values must be float32 or float64");
  check(values, values, "values");
  check(rewards, values, "rewards");
  check(mask, values, "mask");
  at::Tensor adv = at::empty_like(values);
  at::Tensor ret = at::empty_like(values);
  const int64_t n = values.size(0), len = values.size(1);
  if (n == 0 || len == 0) return {adv, ret};
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "fastalign_gae", [&] {
    const scalar_t* r = rewards.data_ptr<scalar_t>();
    const scalar_t* v = values.data_ptr<scalar_t>();
    const scalar_t* m = mask.data_ptr<scalar_t>();
    scalar_t* a = adv.data_ptr<scalar_t>();
    scalar_t* rt = ret.data_ptr<scalar_t>();
    const auto g = static_cast<scalar_t>(gamma);
    const auto gl = static_cast<scalar_t>(gamma * lam);
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(len, 1));  // ~32k elements a task
    at::parallel_for(0, n, grain,
                     [&](int64_t b0, int64_t b1) { gae_rows<scalar_t>(r, v, m, a, rt, b0, b1, len, g, gl); });
  });
  return {adv, ret};
}

}  // namespace fastalign
