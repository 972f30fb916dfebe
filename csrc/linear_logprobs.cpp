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
//
// Gradient filter (fastalign/ops/linear_logprobs.py decides what to drop; this file only obeys):
//   forward, filter_block = B > 0: also returns lmass (N, ceil(V / B)) float32, the log of the
//     probability mass of each block of B vocabulary columns before normalisation,
//     log sum_{v in block} e^{z_v} (so block mass / row total = exp(lmass - lse)). The tile width
//     is a multiple of B (the caller rounds chunk_size), so a block never straddles two tiles.
//   backward, keep (N, ceil(V / B)) uint8: dz is exactly 0 on every (row, block) with keep = 0.
//     Each vocabulary tile is computed only for the rows that keep one of its blocks (their
//     hidden rows gathered, d_hidden scattered back; compact = 0 turns this off, 1 forces it
//     whenever a row can be left out, 2 does it when at most 85 % of the rows remain); tiles
//     nobody keeps cost nothing. Dropped blocks inside a computed tile are zeroed before the
//     GEMMs. Row compaction works at tile granularity (chunk_size columns) because CPU GEMMs
//     lose most of their speed on narrow blocks (a 256-column (R, 576) GEMM ran at a third of
//     the rate of a 2048-column one on the 2-core Xeon), so per-(row, 256-block) gathers did
//     not pay.
//   order (V,) int64, optional, forward and backward: tiles walk the vocabulary in this order
//     (tile column j is weight row order[j]; labels, lmass and keep are in these positions, the
//     op maps them); d_W / d_b rows are written back to their own rows. The op sorts by the
//     batch's mean logit so that the probable tokens share tiles, and more (row, tile) pairs can
//     be left out.
#include "common.h"

namespace fastalign {
namespace {

// Tile / GEMM dtype for an input dtype (see the file comment).
at::ScalarType tile_dtype(at::ScalarType t) { return t == at::kHalf ? at::kFloat : t; }

// Walks the vocabulary tiles, computing each one into a reused buffer.
struct TileWalker {
  at::Tensor hidden_c;           // hidden in the tile dtype
  const at::Tensor& weight;      // (V, H), input dtype
  std::optional<at::Tensor> bias_c;  // bias in the tile dtype (in vocabulary order when ordered)
  at::Tensor buf;                // N * chunk elements, tile dtype
  at::Tensor wbuf;               // chunk x H, when the weight needs a dtype change or a gather
  at::Tensor order;              // (V,) int64 or undefined: tile column j is vocabulary row order[j]
  int64_t n, chunk;

  TileWalker(const at::Tensor& hidden, const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t chunk_,
             const std::optional<at::Tensor>& order_ = std::nullopt)
      : weight(w), n(hidden.size(0)), chunk(std::max<int64_t>(1, std::min(chunk_, w.size(0)))) {
    const auto td = tile_dtype(hidden.scalar_type());
    hidden_c = hidden.to(td);
    if (order_) order = *order_;
    if (bias) bias_c = order.defined() ? bias->index_select(0, order).to(td) : bias->to(td);
    buf = at::empty({n * chunk}, hidden.options().dtype(td));
    if (td != w.scalar_type() || order.defined()) wbuf = at::empty({chunk * w.size(1)}, w.options().dtype(td));
  }

  // Vocabulary rows of tile positions [v0, v0 + vc).
  at::Tensor rows(int64_t v0, int64_t vc) const { return order.narrow(0, v0, vc); }

  // Weight rows of positions [v0, v0 + vc) in the tile dtype.
  at::Tensor weight_tile(int64_t v0, int64_t vc) {
    if (!wbuf.defined()) return weight.narrow(0, v0, vc);
    at::Tensor wc = wbuf.narrow(0, 0, vc * weight.size(1)).view({vc, weight.size(1)});
    if (order.defined()) {
      if (weight.scalar_type() == wc.scalar_type()) {
        at::index_select_out(wc, weight, 0, rows(v0, vc));
      } else {
        wc.copy_(weight.index_select(0, rows(v0, vc)));
      }
    } else {
      wc.copy_(weight.narrow(0, v0, vc));
    }
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

// order: a permutation of the V vocabulary rows (int64, CPU, contiguous), or none.
void check_order(const std::optional<at::Tensor>& order, int64_t vocab) {
  if (!order) return;
  check_cpu_contig(*order, "order");
  TORCH_CHECK(order->scalar_type() == at::kLong && order->dim() == 1 && order->size(0) == vocab,
              "fastalign: order must be an int64 permutation of the ", vocab, " vocabulary rows");
}

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

// Online update of st over x[0, n) block by block of fb columns (like row_update), also writing
// each block's log-mass log sum e^{z} = m + log(sum e^{z - m}) to lmass[0, ceil(n / fb)).
template <class V, bool ENT, class T>
inline void row_update_masses(const T* x, int64_t n, typename V::acc scale, RowStats& st, int64_t fb,
                              float* lmass) {
  using A = typename V::acc;
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  for (int64_t b0 = 0, j = 0; b0 < n; b0 += fb, ++j) {
    const int64_t len = std::min(fb, n - b0);
    if (st.s != st.s) {  // a NaN logit earlier in the row
      lmass[j] = static_cast<float>(kNaN);
      continue;
    }
    const A bm = block_max<V>(x + b0, len) * scale;
    if (bm != bm) {
      st.m = st.s = st.t = kNaN;
      lmass[j] = static_cast<float>(kNaN);
      continue;
    }
    if (static_cast<double>(bm) > st.m) st.rebase(bm);
    if (st.m == kNegInf) {  // only -inf so far: this block holds no mass
      lmass[j] = static_cast<float>(kNegInf);
      continue;
    }
    double s = 0.0, t = 0.0;
    block_exp_sums<V, ENT>(x + b0, len, scale, static_cast<A>(st.m), s, t);
    st.s += s;
    st.t += t;
    lmass[j] = static_cast<float>(st.m + std::log(s));  // -inf when the block underflows
  }
}

template <class C, bool ENT>
void stats_tile(const at::Tensor& tile, int64_t v0, const int64_t* lab, int64_t ignore_index, double inv_temperature,
                RowStats* stats, double* zlab, float* lmass, int64_t fb, int64_t nb) {
  using A = typename Traits<C>::acc;
  using V = typename Traits<C>::vec;
  const int64_t n = tile.size(0), vc = tile.size(1);
  const C* z = tile.data_ptr<C>();
  const A scale = static_cast<A>(inv_temperature);
  at::parallel_for(0, n, grain_for(vc), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const C* row = z + i * vc;
      if (lmass) {
        row_update_masses<V, ENT>(row, vc, scale, stats[i], fb, lmass + i * nb + v0 / fb);
      } else {
        row_update<V, ENT>(row, vc, scale, stats[i]);
      }
      const int64_t l = lab[i] - v0;
      if (lab[i] != ignore_index && l >= 0 && l < vc) zlab[i] = label_logit(row[l], scale);
    }
  });
}

// Zeroes the segments of dz row `row` (tile columns [0, vc) = vocabulary [v0, v0 + vc)) whose
// block is not kept.
template <class C>
inline void drop_blocks(C* row, int64_t v0, int64_t vc, const uint8_t* keep_row, int64_t fb) {
  for (int64_t c = 0; c < vc;) {
    const int64_t j = (v0 + c) / fb;
    const int64_t end = std::min(vc, (j + 1) * fb - v0);
    if (!keep_row[j]) std::memset(static_cast<void*>(row + c), 0, sizeof(C) * static_cast<size_t>(end - c));
    c = end;
  }
}

// dz of a tile in place. rows (optional): the tile's row r is row rows[r] of the per-row arrays
// (a compacted tile's gathered rows); keep (optional, (N, nb) uint8 over the per-row arrays'
// rows): dropped blocks are zeroed.
template <class C, bool ENT>
void grad_tile(at::Tensor& tile, int64_t v0, const int64_t* lab, int64_t ignore_index, double inv_temperature,
               const void* lse_v, const void* a_v, const void* b_v, const void* g_v, const int64_t* rows = nullptr,
               const uint8_t* keep = nullptr, int64_t fb = 0, int64_t nb = 0) {
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
    for (int64_t r = begin; r < end; ++r) {
      C* row = z + r * vc;
      const int64_t i = rows ? rows[r] : r;
      if (lab[i] == ignore_index) {
        std::memset(static_cast<void*>(row), 0, sizeof(C) * static_cast<size_t>(vc));
        continue;
      }
      row_grad<V, ENT>(row, row, vc, scale, lse[i], a[i], b[i], lab[i] - v0, g[i]);
      if (keep) drop_blocks(row, v0, vc, keep + i * nb, fb);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> linear_logprobs_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index, double inv_temperature, bool with_entropy,
    int64_t chunk_size, int64_t filter_block, const std::optional<at::Tensor>& order) {
  check_linear_inputs(hidden, weight, bias, labels, chunk_size);
  check_order(order, weight.size(0));
  TORCH_CHECK(inv_temperature > 0.0, "fastalign: inv_temperature must be > 0");
  TORCH_CHECK(filter_block >= 0, "fastalign: filter_block must be >= 0");
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  const auto acc = acc_dtype(hidden.scalar_type());
  auto opts = hidden.options().dtype(acc);
  at::Tensor logp = at::empty({n}, opts), lse = at::empty({n}, hidden.options().dtype(at::kDouble));
  std::optional<at::Tensor> entropy, lmass;
  if (with_entropy) entropy = at::empty({n}, opts);
  const int64_t fb = filter_block, nb = fb > 0 ? (vocab + fb - 1) / fb : 0;
  if (fb > 0) lmass = at::empty({n, nb}, hidden.options().dtype(at::kFloat));
  if (n == 0) return {logp, lse, entropy, lmass};

  std::vector<RowStats> stats(static_cast<size_t>(n));
  std::vector<double> zlab(static_cast<size_t>(n), 0.0);
  const int64_t* lab = labels.data_ptr<int64_t>();
  TileWalker walk(hidden, weight, bias, chunk_size, order);
  TORCH_CHECK(fb == 0 || walk.chunk % fb == 0 || walk.chunk == vocab,
              "fastalign: chunk_size must be a multiple of filter_block");
  float* lm = fb > 0 ? lmass->data_ptr<float>() : nullptr;

  for (int64_t v0 = 0; v0 < vocab; v0 += walk.chunk) {
    const int64_t vc = std::min(walk.chunk, vocab - v0);
    const at::Tensor tile = walk.logits_tile(v0, vc, walk.weight_tile(v0, vc));
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, tile.scalar_type(), "linear_logprobs_fwd", [&] {
      if (with_entropy) {
        stats_tile<scalar_t, true>(tile, v0, lab, ignore_index, inv_temperature, stats.data(), zlab.data(), lm, fb,
                                   nb);
      } else {
        stats_tile<scalar_t, false>(tile, v0, lab, ignore_index, inv_temperature, stats.data(), zlab.data(), lm,
                                    fb, nb);
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
  return {logp, lse, entropy, lmass};
}

namespace {

// Copies rows rows[0, r) of src (n, h) into dst (r, h) (both contiguous, same dtype).
inline void gather_rows(const at::Tensor& src, const int64_t* rows, int64_t r, at::Tensor& dst) {
  const int64_t h = src.size(1);
  const size_t bytes = static_cast<size_t>(h) * src.element_size();
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  at::parallel_for(0, r, 64, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) std::memcpy(d + k * bytes, s + rows[k] * bytes, bytes);
  });
}

// acc[rows[k]] += part[k] for k < r (rows are distinct: no two threads touch one row).
template <class A, class P>
void scatter_add_rows(at::Tensor& acc, const int64_t* rows, int64_t r, const at::Tensor& part) {
  const int64_t h = acc.size(1);
  A* a = acc.data_ptr<A>();
  const P* p = part.data_ptr<P>();
  at::parallel_for(0, r, 64, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      A* dst = a + rows[k] * h;
      const P* src = p + k * h;
      for (int64_t c = 0; c < h; ++c) dst[c] += static_cast<A>(src[c]);
    }
  });
}

// The backward tile walk. grad(dz, v0, rows) turns the logits tile into dz in place (dropped
// blocks zeroed when a keep mask is given; rows: the tile's rows are rows[0, R) of the per-row
// arrays, or all of them). With keep and compact > 0, each tile computes only the rows that keep
// one of its blocks (gathered), when that is every row but a few (compact = 2: at most 85 % of
// the rows; compact = 1: whenever one row can be left out). Tiles nobody keeps cost nothing.
template <class Grad>
void tile_backward(const at::Tensor& hid, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                   int64_t chunk_size, Grad& grad, bool need_hidden, bool need_weight, bool need_bias,
                   const uint8_t* keep, int64_t fb, int64_t nb, int64_t compact, const std::optional<at::Tensor>& order,
                   at::Tensor& dh_acc, std::optional<at::Tensor>& d_weight, std::optional<at::Tensor>& d_bias,
                   int64_t& tiles_compacted) {
  const int64_t n = hid.size(0), hdim = hid.size(1), vocab = weight.size(0);
  const auto in_dt = hid.scalar_type();
  const auto acc = acc_dtype(in_dt);
  TileWalker walk(hid, weight, bias, chunk_size, order);
  const auto td = walk.buf.scalar_type();
  const bool ordered = order.has_value();
  // Products that cannot be written straight into their destination (another dtype, or rows of
  // d_W / d_b scattered to their vocabulary positions).
  at::Tensor dh_part, dw_part, h_rows;
  if (need_hidden && (td != acc || (keep && compact > 0))) dh_part = at::empty({n * hdim}, hid.options().dtype(td));
  if (need_weight && (td != in_dt || ordered)) dw_part = at::empty({walk.chunk * hdim}, hid.options().dtype(td));
  if (keep && compact > 0) h_rows = at::empty({n * hdim}, hid.options().dtype(td));
  if (need_hidden) dh_acc.zero_();
  std::vector<int64_t> rows(static_cast<size_t>(keep ? n : 0));

  for (int64_t v0 = 0; v0 < vocab; v0 += walk.chunk) {
    const int64_t vc = std::min(walk.chunk, vocab - v0);
    int64_t r = n;
    if (keep && compact > 0) {  // rows that keep at least one block of this tile
      const int64_t j0 = v0 / fb, j1 = (v0 + vc - 1) / fb;
      r = 0;
      for (int64_t i = 0; i < n; ++i) {
        const uint8_t* kr = keep + i * nb;
        bool any = false;
        for (int64_t j = j0; j <= j1 && !any; ++j) any = kr[j] != 0;
        if (any) rows[r++] = i;
      }
      const bool worth = compact == 1 ? r < n : r * 100 <= n * 85;
      if (r == 0) {  // nobody keeps this tile: its d_W / d_b rows are exactly 0
        if (ordered) {
          if (need_weight) d_weight->index_fill_(0, walk.rows(v0, vc), 0);
          if (need_bias) d_bias->index_fill_(0, walk.rows(v0, vc), 0);
        } else {
          if (need_weight) d_weight->narrow(0, v0, vc).zero_();
          if (need_bias) d_bias->narrow(0, v0, vc).zero_();
        }
        ++tiles_compacted;
        continue;
      }
      if (!worth) r = n;
    }
    const bool sub = r < n;
    tiles_compacted += sub;
    const at::Tensor w_tile = walk.weight_tile(v0, vc);
    at::Tensor h_t = walk.hidden_c;
    if (sub) {
      h_t = h_rows.narrow(0, 0, r * hdim).view({r, hdim});
      gather_rows(walk.hidden_c, rows.data(), r, h_t);
    }
    at::Tensor dz = walk.buf.narrow(0, 0, r * vc).view({r, vc});
    if (walk.bias_c) {
      at::addmm_out(dz, walk.bias_c->narrow(0, v0, vc), h_t, w_tile.t());
    } else {
      at::mm_out(dz, h_t, w_tile.t());
    }
    grad(dz, v0, sub ? rows.data() : nullptr);
    if (need_weight) {
      if (dw_part.defined()) {
        at::Tensor part = dw_part.narrow(0, 0, vc * hdim).view({vc, hdim});
        at::mm_out(part, dz.t(), h_t);
        if (ordered) {
          d_weight->index_copy_(0, walk.rows(v0, vc), part.scalar_type() == in_dt ? part : part.to(in_dt));
        } else {
          d_weight->narrow(0, v0, vc).copy_(part);
        }
      } else {
        at::Tensor dst = d_weight->narrow(0, v0, vc);
        at::mm_out(dst, dz.t(), h_t);
      }
    }
    if (need_hidden) {
      if (sub) {
        at::Tensor part = dh_part.narrow(0, 0, r * hdim).view({r, hdim});
        at::mm_out(part, dz, w_tile);
        AT_DISPATCH_FLOATING_TYPES(acc, "scatter_add_rows", [&] {
          if (td == acc) {
            scatter_add_rows<scalar_t, scalar_t>(dh_acc, rows.data(), r, part);
          } else {
            scatter_add_rows<scalar_t, c10::BFloat16>(dh_acc, rows.data(), r, part);
          }
        });
      } else if (dh_part.defined() && td != acc) {
        at::Tensor part = dh_part.narrow(0, 0, n * hdim).view({n, hdim});
        at::mm_out(part, dz, w_tile);
        dh_acc.add_(part);
      } else {
        dh_acc.addmm_(dz, w_tile);
      }
    }
    if (need_bias) {
      if (ordered) {
        d_bias->index_copy_(0, walk.rows(v0, vc), dz.sum(0).to(in_dt));
      } else if (td == in_dt) {
        at::Tensor dst = d_bias->narrow(0, v0, vc);
        at::sum_out(dst, dz, {0});
      } else {
        d_bias->narrow(0, v0, vc).copy_(dz.sum(0));
      }
    }
  }
}

}  // namespace

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>> linear_logprobs_bwd(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
    const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy, int64_t ignore_index,
    double inv_temperature, int64_t chunk_size, bool need_hidden, bool need_weight, bool need_bias,
    const std::optional<at::Tensor>& keep, int64_t filter_block, int64_t compact,
    const std::optional<at::Tensor>& order) {
  check_linear_inputs(hidden, weight, bias, labels, chunk_size);
  check_order(order, weight.size(0));
  TORCH_CHECK(entropy.has_value() == grad_entropy.has_value(),
              "fastalign: entropy and grad_entropy must be given together");
  TORCH_CHECK(!need_bias || bias.has_value(), "fastalign: need_bias without a bias");
  const int64_t n = hidden.size(0), hdim = hidden.size(1), vocab = weight.size(0);
  const int64_t fb = filter_block, nb = fb > 0 ? (vocab + fb - 1) / fb : 0;
  if (keep) {
    check_cpu_contig(*keep, "keep");
    TORCH_CHECK(fb > 0, "fastalign: keep needs filter_block > 0");
    TORCH_CHECK(keep->scalar_type() == at::kByte && keep->dim() == 2 && keep->size(0) == n && keep->size(1) == nb,
                "fastalign: keep must be uint8 (N, ceil(V / filter_block))");
  }
  TORCH_CHECK(compact >= 0 && compact <= 2, "fastalign: compact must be 0, 1 or 2");
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
  at::Tensor hid = hidden, labs = labels, rows, keep_c;
  if (keep) keep_c = *keep;
  if (n_valid < n) {
    rows = valid.nonzero().squeeze(1);
    hid = hidden.index_select(0, rows);
    labs = labels.index_select(0, rows);
    lse_c = lse_c.index_select(0, rows);
    a = a.index_select(0, rows);
    b = b.index_select(0, rows);
    g_lab = g_lab.index_select(0, rows);
    if (keep) keep_c = keep_c.index_select(0, rows);
  }
  a = a.contiguous();
  b = b.contiguous();
  g_lab = g_lab.contiguous();
  lse_c = lse_c.contiguous();
  if (keep) keep_c = keep_c.contiguous();
  const int64_t* lab = labs.data_ptr<int64_t>();
  const uint8_t* kp = keep ? keep_c.data_ptr<uint8_t>() : nullptr;
  at::Tensor dh_acc;  // fp32 (fp64) accumulator of dz @ W[tile] over tiles, valid rows only
  if (need_hidden) dh_acc = at::empty({n_valid, hdim}, hidden.options().dtype(acc));

  auto dispatch_grad = [&](at::Tensor& dz, int64_t v0, const int64_t* sel) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dz.scalar_type(), "linear_logprobs_bwd", [&] {
      if (ent) {
        grad_tile<scalar_t, true>(dz, v0, lab, ignore_index, inv_temperature, lse_c.data_ptr(), a.data_ptr(),
                                  b.data_ptr(), g_lab.data_ptr(), sel, kp, fb, nb);
      } else {
        grad_tile<scalar_t, false>(dz, v0, lab, ignore_index, inv_temperature, lse_c.data_ptr(), a.data_ptr(),
                                   b.data_ptr(), g_lab.data_ptr(), sel, kp, fb, nb);
      }
    });
  };

  int64_t tiles_compacted = 0;
  tile_backward(hid, weight, bias, chunk_size, dispatch_grad, need_hidden, need_weight, need_bias, kp, fb, nb, compact,
                order, dh_acc, d_weight, d_bias, tiles_compacted);
  if (need_hidden) {
    at::Tensor dh = dh_acc.scalar_type() == in_dt ? dh_acc : dh_acc.to(in_dt);
    d_hidden = rows.defined() ? at::zeros_like(hidden, at::MemoryFormat::Contiguous).index_copy_(0, rows, dh) : dh;
  }
  return {d_hidden, d_weight, d_bias};
}

}  // namespace fastalign
