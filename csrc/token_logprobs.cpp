// token_logprobs: per-token log-probs (and entropy) from an (N, V) logits tensor.
//
//   forward:  one online pass per row (block max, then one exp pass from L1):
//             lse = m + log s,  logp = z[label] - lse,  H = log s - t / s    (see common.h)
//   backward: one read of the logits, one write of the gradient:
//             dx_v = inv_T (g (1[v = label] - p_v) - h p_v (log p_v + H)),  p_v = e^{z_v - lse}
//   lse is returned / taken as float64 (N,) for every input dtype; logp and entropy are float32
//   (float64 for float64 logits).
//
// Rows are split into segments when there are fewer rows than ~4x threads (large vocabularies,
// small batches); forward segment statistics are merged afterwards.
#include "common.h"

namespace fastalign {
namespace {

template <class T, bool ENT>
void forward_impl(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, double inv_temperature,
                  at::Tensor& logp, at::Tensor& lse, at::Tensor* entropy) {
  using A = typename Traits<T>::acc;
  using V = typename Traits<T>::vec;
  const int64_t n = logits.size(0), vocab = logits.size(1);
  const T* x = logits.data_ptr<T>();
  const int64_t* lab = labels.data_ptr<int64_t>();
  A* logp_p = logp.data_ptr<A>();
  double* lse_p = lse.data_ptr<double>();
  A* ent_p = entropy ? entropy->data_ptr<A>() : nullptr;
  const A scale = static_cast<A>(inv_temperature);

  auto finish = [&](int64_t i, const RowStats& st) {
    const int64_t l = lab[i];
    const bool valid = l != ignore_index;
    const double z_label = valid ? label_logit(x[i * vocab + l], scale) : 0.0;
    finalize_row<A>(st, valid, z_label, logp_p + i, lse_p + i, ent_p ? ent_p + i : nullptr);
  };

  const int64_t segs = segments_per_row(n, vocab);
  if (segs == 1) {
    at::parallel_for(0, n, grain_for(vocab), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        RowStats st;
        row_update<V, ENT>(x + i * vocab, vocab, scale, st);
        finish(i, st);
      }
    });
    return;
  }
  // Segment length a multiple of 64 so that every segment but the last starts aligned.
  const int64_t seg_len = ((vocab + segs - 1) / segs + 63) / 64 * 64;
  std::vector<RowStats> part(static_cast<size_t>(n * segs));
  at::parallel_for(0, n * segs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t i = k / segs, c0 = (k % segs) * seg_len;
      if (c0 >= vocab) continue;
      row_update<V, ENT>(x + i * vocab + c0, std::min(seg_len, vocab - c0), scale, part[k]);
    }
  });
  for (int64_t i = 0; i < n; ++i) {
    RowStats st;
    for (int64_t c = 0; c < segs; ++c) st.merge(part[i * segs + c]);
    finish(i, st);
  }
}

template <class T, bool ENT>
void backward_impl(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                   const at::Tensor* entropy, const at::Tensor& grad_logp, const at::Tensor* grad_entropy,
                   int64_t ignore_index, double inv_temperature, at::Tensor& grad) {
  using A = typename Traits<T>::acc;
  using V = typename Traits<T>::vec;
  const int64_t n = logits.size(0), vocab = logits.size(1);
  const T* x = logits.data_ptr<T>();
  T* out = grad.data_ptr<T>();
  const int64_t* lab = labels.data_ptr<int64_t>();
  const double* lse_p = lse.data_ptr<double>();
  const A* gl = grad_logp.data_ptr<A>();
  const A* ent_p = ENT ? entropy->data_ptr<A>() : nullptr;
  const A* ge = ENT ? grad_entropy->data_ptr<A>() : nullptr;
  const A scale = static_cast<A>(inv_temperature);

  const int64_t segs = segments_per_row(n, vocab);
  const int64_t seg_len = segs == 1 ? vocab : ((vocab + segs - 1) / segs + 63) / 64 * 64;
  at::parallel_for(0, n * segs, grain_for(seg_len), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t i = k / segs, c0 = (k % segs) * seg_len;
      if (c0 >= vocab) continue;
      const int64_t len = std::min(seg_len, vocab - c0);
      T* o = out + i * vocab + c0;
      const int64_t l = lab[i];
      if (l == ignore_index) {
        std::memset(static_cast<void*>(o), 0, sizeof(T) * static_cast<size_t>(len));  // +0.0 in every dtype
        continue;
      }
      const A g = gl[i];
      const A h = ENT ? ge[i] : A(0);
      const A a = -scale * (ENT ? g + h * ent_p[i] : g);
      const A b = -scale * h;
      row_grad<V, ENT>(x + i * vocab + c0, o, len, scale, lse_p[i], a, b, l - c0, scale * g);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> token_logprobs_fwd(
    const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index, double inv_temperature,
    bool with_entropy) {
  check_cpu_contig(logits, "logits");
  check_float_dtype(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "fastalign: logits must be (N, V)");
  const int64_t n = logits.size(0);
  TORCH_CHECK(logits.size(1) >= 1, "fastalign: vocabulary size must be >= 1");
  check_labels(labels, n);
  TORCH_CHECK(inv_temperature > 0.0, "fastalign: inv_temperature must be > 0");

  const auto acc = acc_dtype(logits.scalar_type());
  auto opts = logits.options().dtype(acc);
  at::Tensor logp = at::empty({n}, opts), lse = at::empty({n}, logits.options().dtype(at::kDouble));
  std::optional<at::Tensor> entropy;
  if (with_entropy) entropy = at::empty({n}, opts);
  if (n == 0) return {logp, lse, entropy};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_fwd", [&] {
    if (with_entropy) {
      forward_impl<scalar_t, true>(logits, labels, ignore_index, inv_temperature, logp, lse, &*entropy);
    } else {
      forward_impl<scalar_t, false>(logits, labels, ignore_index, inv_temperature, logp, lse, nullptr);
    }
  });
  return {logp, lse, entropy};
}

at::Tensor token_logprobs_bwd(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                              const std::optional<at::Tensor>& entropy, const at::Tensor& grad_logp,
                              const std::optional<at::Tensor>& grad_entropy, int64_t ignore_index,
                              double inv_temperature) {
  check_cpu_contig(logits, "logits");
  check_float_dtype(logits, "logits");
  TORCH_CHECK(logits.dim() == 2, "fastalign: logits must be (N, V)");
  const int64_t n = logits.size(0);
  check_labels(labels, n);
  TORCH_CHECK(entropy.has_value() == grad_entropy.has_value(),
              "fastalign: entropy and grad_entropy must be given together");
  const auto acc = acc_dtype(logits.scalar_type());
  const at::Tensor lse_c = lse_vector(lse, n);
  const at::Tensor gl = row_vector(grad_logp, n, acc, "grad_logp");
  at::Tensor ent_c, ge;
  const bool ent = entropy.has_value();
  if (ent) {
    ent_c = row_vector(*entropy, n, acc, "entropy");
    ge = row_vector(*grad_entropy, n, acc, "grad_entropy");
  }
  at::Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (grad.numel() == 0) return grad;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_logprobs_bwd", [&] {
    if (ent) {
      backward_impl<scalar_t, true>(logits, labels, lse_c, &ent_c, gl, &ge, ignore_index, inv_temperature, grad);
    } else {
      backward_impl<scalar_t, false>(logits, labels, lse_c, nullptr, gl, nullptr, ignore_index, inv_temperature,
                                     grad);
    }
  });
  return grad;
}

}  // namespace fastalign
