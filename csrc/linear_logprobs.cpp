// linear_logprobs: token log-probs (and entropy) of z = (hidden @ weight.T + bias) * inv_T
// without holding the (N, V) logits: the vocabulary is walked in tiles of chunk_size columns.
//
//   forward:  tile = hidden @ W[tile].T (+ b[tile])   (at::mm / at::addmm: MKL / oneDNN)
//             per row, online m, s, t and z[label] over the tile (fused loop, see common.h)
//   backward: recompute the tile, overwrite it in place with
//             dz_v = inv_T (g (1[v = label] - p_v) - h p_v (log p_v + H)),
//             then d_hidden += dz @ W[tile] (fp32),  d_W[tile] = dz.T @ hidden,  d_b[tile] = sum_rows dz
//
// Tile dtype: float32 / float64 inputs compute in their own dtype. bfloat16 tiles come from a
// bf16 GEMM (fp32 accumulation inside, bf16 result, like eager's bf16 logits) and are read
// widened; dz is rounded to bf16 for the two backward GEMMs (like eager's bf16 grad_logits),
// and each tile's bf16 dz @ W[tile] is summed into an fp32 d_hidden. float16 runs in fp32
// throughout (hidden widened once, weight one tile at a time): CPU fp16 GEMMs are ~10-50x
// slower than fp32 ones. Statistics and dz are always computed in fp32 (fp64 for fp64).
// One tile buffer is allocated per call and reused by every tile (no page faults per tile).
// lse is returned / taken as float64 (N,) for every input dtype (see row_grad in common.h).
// Rows whose label is ignore_index are dropped before the backward GEMMs (zero gradient).
#include "common.h"

namespace fastalign {
namespace {

// Tile / GEMM dtype for an input dtype (see the file comment).
at::ScalarType tile_dtype(at::ScalarType t) { return t == at::kHalf ? at::kFloat : t; }

// Walks the vocabulary tiles, computing each one into a reused buffer.
struct TileWalker {
  at::Tensor hidden_c;           // hidden in the tile dtype
  const at::Tensor& weight;      // (V, H), input dtype
  std::optional<at::Tensor> bias_c;  // bias in the tile dtype
  at::Tensor buf;                // N * chunk elements, tile dtype
  at::Tensor wbuf;               // chunk x H, only when the weight needs a dtype change
  int64_t n, chunk;

  TileWalker(const at::Tensor& hidden, const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t chunk_)
      : weight(w), n(hidden.size(0)), chunk(std::max<int64_t>(1, std::min(chunk_, w.size(0)))) {
    const auto td = tile_dtype(hidden.scalar_type());
    hidden_c = hidden.to(td);
    if (bias) bias_c = bias->to(td);
    buf = at::empty({n * chunk}, hidden.options().dtype(td));
    if (td != w.scalar_type()) wbuf = at::empty({chunk * w.size(1)}, w.options().dtype(td));
  }

  // Weight rows [v0, v0 + vc) in the tile dtype.
  at::Tensor weight_tile(int64_t v0, int64_t vc) {
    at::Tensor w = weight.narrow(0, v0, vc);
    if (!wbuf.defined()) return w;
    at::Tensor wc = wbuf.narrow(0, 0, vc * weight.size(1)).view({vc, weight.size(1)});
    wc.copy_(w);
    return wc;
  }

  // (N, vc) logits tile (before the temperature) in the reused buffer.
  at::Tensor logits_tile(int64_t v0, int64_t vc, const at::Tensor& w_tile) {
    at::Tensor tile = buf.narrow(0, 0, n * vc).view({n, vc});
    if (bias_c) {
      at::addmm_out(tile, bias_c->narrow(0, v0, vc), hidden_c, w_tile.t());
    } else {
      at::mm_out(tile, hidden_c, w_tile.t());
    }
    return tile;
  }
};

void check_linear_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& labels, int64_t chunk_size) {
  check_cpu_contig(hidden, "hidden");
  check_cpu_contig(weight, "weight");
  check_float_dtype(hidden, "hidden");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "fastalign: hidden must be (N, H) and weight (V, H)");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "fastalign: hidden and weight must share a dtype");
  TORCH_CHECK(weight.size(0) >= 1, "fastalign: vocabulary size must be >= 1");
  if (bias) {
    check_cpu_contig(*bias, "bias");
    TORCH_CHECK(bias->scalar_type() == hidden.scalar_type(), "fastalign: bias must share the weight's dtype");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "fastalign: bias must be (V,)");
  }
  check_labels(labels, hidden.size(0));
  TORCH_CHECK(chunk_size >= 1, "fastalign: chunk_size must be >= 1");
}

template <class C, bool ENT>
void stats_tile(const at::Tensor& tile, int64_t v0, const int64_t* lab, int64_t ignore_index, double inv_temperature,
                RowStats* stats, double* zlab) {
  using A = typename Traits<C>::acc;
  using V = typename Traits<C>::vec;
  const int64_t n = tile.size(0), vc = tile.size(1);
  const C* z = tile.data_ptr<C>();
  const A scale = static_cast<A>(inv_temperature);
  at::parallel_for(0, n, grain_for(vc), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const C* row = z + i * vc;
      row_update<V, ENT>(row, vc, scale, stats[i]);
      const int64_t l = lab[i] - v0;
      if (lab[i] != ignore_index && l >= 0 && l < vc) zlab[i] = label_logit(row[l], scale);
    }
  });
}

template <class C, bool ENT>
void grad_tile(at::Tensor& tile, int64_t v0, const int64_t* lab, int64_t ignore_index, double inv_temperature,
               const void* lse_v, const void* a_v, const void* b_v, const void* g_v) {
  using A = typename Traits<C>::acc;
  using V = typename Traits<C>::vec;
  const int64_t n = tile.size(0), vc = tile.size(1);
  C* z = tile.data_ptr<C>();
  const double* lse = static_cast<const double*>(lse_v);  // float64 for every dtype
  const A* a = static_cast<const A*>(a_v);
  const A* b = static_cast<const A*>(b_v);
  const A* g = static_cast<const A*>(g_v);  // inv_T * dL/dlogp, added at the label
  const A scale = static_cast<A>(inv_temperature);
  at::parallel_for(0, n, grain_for(vc), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      C* row = z + i * vc;
      if (lab[i] == ignore_index) {
        std::memset(static_cast<void*>(row), 0, sizeof(C) * static_cast<size_t>(vc));
        continue;
      }
      row_grad<V, ENT>(row, row, vc, scale, lse[i], a[i], b[i], lab[i] - v0, g[i]);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> linear_logprobs_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index, double inv_temperature, bool with_entropy,
    int64_t chunk_size) {
  check_linear_inputs(hidden, weight, bias, labels, chunk_size);
  TORCH_CHECK(inv_temperature > 0.0, "fastalign: inv_temperature must be > 0");
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  const auto acc = acc_dtype(hidden.scalar_type());
  auto opts = hidden.options().dtype(acc);
  at::Tensor logp = at::empty({n}, opts), lse = at::empty({n}, hidden.options().dtype(at::kDouble));
  std::optional<at::Tensor> entropy;
  if (with_entropy) entropy = at::empty({n}, opts);
  if (n == 0) return {logp, lse, entropy};

  std::vector<RowStats> stats(static_cast<size_t>(n));
  std::vector<double> zlab(static_cast<size_t>(n), 0.0);
  const int64_t* lab = labels.data_ptr<int64_t>();
  TileWalker walk(hidden, weight, bias, chunk_size);

  for (int64_t v0 = 0; v0 < vocab; v0 += walk.chunk) {
    const int64_t vc = std::min(walk.chunk, vocab - v0);
    const at::Tensor tile = walk.logits_tile(v0, vc, walk.weight_tile(v0, vc));
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, tile.scalar_type(), "linear_logprobs_fwd", [&] {
      if (with_entropy) {
        stats_tile<scalar_t, true>(tile, v0, lab, ignore_index, inv_temperature, stats.data(), zlab.data());
      } else {
        stats_tile<scalar_t, false>(tile, v0, lab, ignore_index, inv_temperature, stats.data(), zlab.data());
      }
    });
  }

  AT_DISPATCH_FLOATING_TYPES(acc, "linear_logprobs_fwd_finish", [&] {
    scalar_t* logp_p = logp.data_ptr<scalar_t>();
    double* lse_p = lse.data_ptr<double>();
    scalar_t* ent_p = entropy ? entropy->data_ptr<scalar_t>() : nullptr;
    for (int64_t i = 0; i < n; ++i) {
      finalize_row<scalar_t>(stats[i], lab[i] != ignore_index, zlab[i], logp_p + i, lse_p + i,
                             ent_p ? ent_p + i : nullptr);
    }
  });
  return {logp, lse, entropy};
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>> linear_logprobs_bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
    const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy, int64_t ignore_index,
    double inv_temperature, int64_t chunk_size, bool need_hidden, bool need_weight, bool need_bias) {
  check_linear_inputs(hidden, weight, bias, labels, chunk_size);
  TORCH_CHECK(entropy.has_value() == grad_entropy.has_value(),
              "fastalign: entropy and grad_entropy must be given together");
  TORCH_CHECK(!need_bias || bias.has_value(), "fastalign: need_bias without a bias");
  const int64_t n = hidden.size(0), hdim = hidden.size(1), vocab = weight.size(0);
  const auto in_dt = hidden.scalar_type();
  const auto acc = acc_dtype(in_dt);
  const bool ent = entropy.has_value();

  std::optional<at::Tensor> d_hidden, d_weight, d_bias;
  if (need_weight) d_weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  if (need_bias) d_bias = at::empty_like(*bias, at::MemoryFormat::Contiguous);

  // Ignored rows have zero gradient: drop them before the GEMMs (prompt tokens are often half
  // of the batch), and scatter d_hidden back at the end.
  const at::Tensor valid = labels != ignore_index;
  const int64_t n_valid = n == 0 ? 0 : valid.sum().item<int64_t>();
  if (n_valid == 0 || !(need_hidden || need_weight || need_bias)) {
    if (need_hidden) d_hidden = at::zeros_like(hidden, at::MemoryFormat::Contiguous);
    if (need_weight) d_weight->zero_();
    if (need_bias) d_bias->zero_();
    return {d_hidden, d_weight, d_bias};
  }

  // Per-row coefficients (see common.h): a = -inv_T (g + h H), b = -inv_T h, g_lab = inv_T g.
  const double s = inv_temperature;
  at::Tensor lse_c = lse_vector(lse, n);
  at::Tensor g = row_vector(grad_logp, n, acc, "grad_logp");
  at::Tensor a, b;
  if (ent) {
    const at::Tensor h = row_vector(*grad_entropy, n, acc, "grad_entropy");
    a = (g + h * row_vector(*entropy, n, acc, "entropy")).mul_(-s);
    b = h.mul(-s);
  } else {
    a = g.mul(-s);
    b = at::zeros({n}, g.options());
  }
  at::Tensor g_lab = g.mul(s);
  at::Tensor hid = hidden, labs = labels, rows;
  if (n_valid < n) {
    rows = valid.nonzero().squeeze(1);
    hid = hidden.index_select(0, rows);
    labs = labels.index_select(0, rows);
    lse_c = lse_c.index_select(0, rows);
    a = a.index_select(0, rows);
    b = b.index_select(0, rows);
    g_lab = g_lab.index_select(0, rows);
  }
  a = a.contiguous();
  b = b.contiguous();
  g_lab = g_lab.contiguous();
  lse_c = lse_c.contiguous();
  const int64_t* lab = labs.data_ptr<int64_t>();
  at::Tensor dh_acc;  // fp32 (fp64) accumulator of dz @ W[tile] over tiles, valid rows only
  if (need_hidden) dh_acc = at::empty({n_valid, hdim}, hidden.options().dtype(acc));

  TileWalker walk(hid, weight, bias, chunk_size);
  const auto td = walk.buf.scalar_type();
  // Products in the tile dtype that cannot be written straight into their destination.
  at::Tensor dh_part, dw_part;
  if (need_hidden && td != acc) dh_part = at::empty({n_valid, hdim}, hidden.options().dtype(td));
  if (need_weight && td != in_dt) dw_part = at::empty({walk.chunk * hdim}, hidden.options().dtype(td));

  bool first = true;
  for (int64_t v0 = 0; v0 < vocab; v0 += walk.chunk) {
    const int64_t vc = std::min(walk.chunk, vocab - v0);
    const at::Tensor w_tile = walk.weight_tile(v0, vc);
    at::Tensor dz = walk.logits_tile(v0, vc, w_tile);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, td, "linear_logprobs_bwd", [&] {
      if (ent) {
        grad_tile<scalar_t, true>(dz, v0, lab, ignore_index, inv_temperature, lse_c.data_ptr(), a.data_ptr(),
                                  b.data_ptr(), g_lab.data_ptr());
      } else {
        grad_tile<scalar_t, false>(dz, v0, lab, ignore_index, inv_temperature, lse_c.data_ptr(), a.data_ptr(),
                                   b.data_ptr(), g_lab.data_ptr());
      }
    });
    if (need_weight) {
      at::Tensor dst = d_weight->narrow(0, v0, vc);
      if (dw_part.defined()) {
        at::Tensor part = dw_part.narrow(0, 0, vc * hdim).view({vc, hdim});
        at::mm_out(part, dz.t(), walk.hidden_c);
        dst.copy_(part);
      } else {
        at::mm_out(dst, dz.t(), walk.hidden_c);
      }
    }
    if (need_hidden) {
      if (dh_part.defined()) {
        at::mm_out(dh_part, dz, w_tile);
        if (first) {
          dh_acc.copy_(dh_part);
        } else {
          dh_acc.add_(dh_part);
        }
      } else if (first) {
        at::mm_out(dh_acc, dz, w_tile);
      } else {
        dh_acc.addmm_(dz, w_tile);
      }
    }
    if (need_bias) {
      at::Tensor dst = d_bias->narrow(0, v0, vc);
      if (td == in_dt) {
        at::sum_out(dst, dz, {0});
      } else {
        dst.copy_(dz.sum(0));
      }
    }
    first = false;
  }
  if (need_hidden) {
    at::Tensor dh = dh_acc.scalar_type() == in_dt ? dh_acc : dh_acc.to(in_dt);
    d_hidden = rows.defined() ? at::zeros_like(hidden, at::MemoryFormat::Contiguous).index_copy_(0, rows, dh) : dh;
  }
  return {d_hidden, d_weight, d_bias};
}

}  // namespace fastalign
