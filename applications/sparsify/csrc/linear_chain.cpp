// The sliced linear chain of applications/sparsify/linear_chain.py, compiled.
//
// Why: for an MLP that has thinned out, an L0-ARM step does little arithmetic, and the
// sliced pass is some forty small tensor operations (gathers, scatters into zero
// gradients, masks, the cross-entropy) whose cost on a CPU is the Python interpreter,
// the binding layer and the allocations around each call, not the arithmetic. Here the
// gathers, scatters and the cross-entropy are plain loops, the bookkeeping (plan) works
// on the flat gate sample directly, and the matrix products stay ATen's (BLAS).
//
// It computes what the Python reference (_ChainLosses in linear_chain.py) computes, in
// the same order except that the cross-entropy accumulates in double precision: results
// agree to float rounding, and the tests check both against the masked computation.
// Indices (None: all units) arrive as int64 tensors and are range-checked.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

namespace {

// Sorted distinct int64 unit indices, each below `bound`: they come from the chain's own
// bookkeeping, but a wrong one here would write out of bounds, so they are checked.
const int64_t* index_ptr(const OptTensor& idx, int64_t bound, const char* what) {
  if (!idx.has_value()) return nullptr;
  TORCH_CHECK(idx->scalar_type() == at::kLong && idx->dim() == 1 && idx->is_contiguous(),
              what, ": expected a contiguous 1-d int64 index");
  const int64_t* p = idx->data_ptr<int64_t>();
  for (int64_t i = 0, n = idx->size(0); i < n; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < bound, what, ": index ", p[i], " out of range ", bound);
  }
  return p;
}

// The block [rows][:, cols] of a (height, width) matrix (None: all, in order), checked.
// (An empty index may have a null data pointer: `some_*` says whether it was given.)
struct Block {
  const int64_t* rp;
  const int64_t* cp;
  bool some_rows, some_cols;
  int64_t nr, nc, width;

  Block(const OptTensor& rows, const OptTensor& cols, int64_t height, int64_t width_)
      : rp(index_ptr(rows, height, "rows")),
        cp(index_ptr(cols, width_, "cols")),
        some_rows(rows.has_value()),
        some_cols(cols.has_value()),
        nr(some_rows ? rows->size(0) : height),
        nc(some_cols ? cols->size(0) : width_),
        width(width_) {}

  // Element (r, c) of the block in the matrix: copy(matrix_row(r) + column(c), ...).
  int64_t row_offset(int64_t r) const { return (some_rows ? rp[r] : r) * width; }
  int64_t column(int64_t c) const { return some_cols ? cp[c] : c; }
  bool empty() const { return nr == 0 || nc == 0; }
};

// t[rows][:, cols] of a 2-d tensor (None: all, in order) in one pass over the output: one
// allocation instead of index_select's two operations and their intermediate.
Tensor gather2d(const Tensor& t_, const OptTensor& rows, const OptTensor& cols) {
  if (!rows.has_value() && !cols.has_value()) return t_;
  const Tensor t = t_.contiguous();
  const Block b(rows, cols, t.size(0), t.size(1));
  Tensor out = at::empty({b.nr, b.nc}, t.options());
  if (b.empty()) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "gather2d", [&] {
    const scalar_t* src = t.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    for (int64_t r = 0; r < b.nr; ++r) {
      const scalar_t* row = src + b.row_offset(r);
      for (int64_t c = 0; c < b.nc; ++c) dst[r * b.nc + c] = row[b.column(c)];
    }
  });
  return out;
}

// t[idx] of a 1-d tensor (None: t itself).
Tensor gather1d(const Tensor& t_, const OptTensor& idx) {
  if (!idx.has_value()) return t_;
  return gather2d(t_.view({-1, 1}), idx, OptTensor()).view(-1);
}

// A zero tensor of `like`'s shape holding the 2-d `blk` at [rows][:, cols] (None: all).
// A weight outside the block gets an exactly zero gradient, as in the masked computation.
Tensor scatter2d(const Tensor& blk_, const Tensor& like, const OptTensor& rows,
                 const OptTensor& cols) {
  if (!rows.has_value() && !cols.has_value()) return blk_;
  const Tensor blk = blk_.contiguous();
  const Block b(rows, cols, like.size(0), like.size(1));
  TORCH_CHECK(blk.size(0) == b.nr && blk.size(1) == b.nc,
              "scatter2d: block shape does not match its indices");
  Tensor out = at::zeros(like.sizes(), blk.options());
  if (b.empty()) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, blk.scalar_type(), "scatter2d", [&] {
    const scalar_t* src = blk.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    for (int64_t r = 0; r < b.nr; ++r) {
      scalar_t* row = dst + b.row_offset(r);
      for (int64_t c = 0; c < b.nc; ++c) row[b.column(c)] = src[r * b.nc + c];
    }
  });
  return out;
}

// A zero tensor of `like`'s (1-d) shape holding `v` at idx (None: v itself).
Tensor scatter1d(const Tensor& v, const Tensor& like, const OptTensor& idx) {
  if (!idx.has_value()) return v;
  return scatter2d(v.view({-1, 1}), like.view({-1, 1}), idx, OptTensor()).view(-1);
}

}  // namespace

// SlicedLinearChain.plan, from the flat gate sample z (S, total) directly: per layer the
// stored input units `cols` (None: all), the per-sample masks (S, 1, stored) in `like`'s
// dtype (None: all ones), and for a split first layer its shared_off / extra positions
// and the last sample's gated-off positions. starts[i]: the layer's first column in z
// (-1: ungated). The thresholds come from Python (DENSE_FRACTION,
// SHARED_FIRST_LAYER_MACS), so that both implementations always decide alike.
std::tuple<std::vector<OptTensor>, std::vector<OptTensor>, OptTensor, std::vector<Tensor>,
           OptTensor>
plan(const Tensor& z_, const std::vector<int64_t>& starts,
     const std::vector<int64_t>& in_features, const std::vector<int64_t>& out_features,
     const Tensor& like, double dense_fraction, int64_t shared_macs) {
  const Tensor z = z_.contiguous();
  TORCH_CHECK(z.dim() == 2, "plan: expected gate samples of shape (S, units)");
  const int64_t samples = z.size(0), total = z.size(1);
  const int64_t layers = static_cast<int64_t>(starts.size());
  std::vector<uint8_t> on;  // on[s * n + j]: unit j of the current layer on in sample s
  std::vector<OptTensor> cols(layers), masks(layers);
  std::vector<int64_t> first_positions;
  std::vector<uint8_t> first_keep;  // (S, first_positions.size())
  auto long_tensor = [](const std::vector<int64_t>& v) {
    Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::kLong);
    std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
    return t;
  };
  for (int64_t i = 0; i < layers; ++i) {
    if (starts[i] < 0) continue;  // ungated: all inputs, no mask
    const int64_t n = in_features[i];
    TORCH_CHECK(starts[i] + n <= total, "plan: gate samples too narrow for layer ", i);
    on.assign(samples * n, 0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "plan", [&] {
      const scalar_t* zp = z.data_ptr<scalar_t>();
      for (int64_t s = 0; s < samples; ++s) {
        for (int64_t j = 0; j < n; ++j) on[s * n + j] = zp[s * total + starts[i] + j] != 0;
      }
    });
    std::vector<int64_t> stored, units, positions;
    std::vector<int64_t> where(n, -1);  // position of a unit among the stored ones
    for (int64_t j = 0; j < n; ++j) {
      bool any = false;
      for (int64_t s = 0; s < samples; ++s) any = any || on[s * n + j];
      if (any) {
        where[j] = static_cast<int64_t>(stored.size());
        stored.push_back(j);
      }
    }
    const bool all = double(stored.size()) >= dense_fraction * double(n);
    for (int64_t j = 0; j < n; ++j) {
      bool every = true, any = false;
      for (int64_t s = 0; s < samples; ++s) {
        every = every && on[s * n + j];
        any = any || on[s * n + j];
      }
      if (every) continue;
      if (all) {  // all units stored: those off in every sample are zeroed too
        units.push_back(j);
        positions.push_back(j);
      } else if (any) {  // kept by some samples, not all
        units.push_back(j);
        positions.push_back(where[j]);
      }
    }
    if (!all) cols[i] = long_tensor(stored);
    if (units.empty()) continue;
    const int64_t width = all ? n : static_cast<int64_t>(stored.size());
    const int64_t k = static_cast<int64_t>(units.size());
    Tensor mask = at::ones({samples, 1, width}, like.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mask.scalar_type(), "plan", [&] {
      scalar_t* mp = mask.data_ptr<scalar_t>();
      for (int64_t s = 0; s < samples; ++s) {
        for (int64_t q = 0; q < k; ++q) {
          if (!on[s * n + units[q]]) mp[s * width + positions[q]] = scalar_t(0);
        }
      }
    });
    masks[i] = mask;
    if (i == 0) {
      first_positions = positions;
      first_keep.resize(samples * k);
      for (int64_t s = 0; s < samples; ++s) {
        for (int64_t q = 0; q < k; ++q) first_keep[s * k + q] = on[s * n + units[q]];
      }
    }
  }
  OptTensor shared_off, first_off;
  std::vector<Tensor> extra;
  if (!first_positions.empty()) {
    const int64_t k = static_cast<int64_t>(first_positions.size());
    const int64_t width = cols[0].has_value() ? cols[0]->size(0) : in_features[0];
    const int64_t rows = (layers == 1 || !cols[1].has_value()) ? out_features[0]
                                                                : cols[1]->size(0);
    if (width * rows > shared_macs) {
      shared_off = long_tensor(first_positions);
      for (int64_t s = 0; s < samples; ++s) {
        std::vector<int64_t> mine, off;
        for (int64_t q = 0; q < k; ++q) {
          (first_keep[s * k + q] ? mine : off).push_back(first_positions[q]);
        }
        extra.push_back(long_tensor(mine));
        if (s == samples - 1) first_off = long_tensor(off);
      }
    }
  }
  return {cols, masks, shared_off, extra, first_off};
}

// SlicedLinearChain._forward (with _first_layer_split): the outputs and, per layer, the
// stored input and weight block (an undefined block for a split first layer).
//
// cols[i]: stored input units of layer i (None: all); masks[i]: (S, 1, stored) per-sample
// 0/1 mask or None; shared_off / extra: the split first layer's positions (extra empty: no
// split).
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, bool> chain_forward(
    const Tensor& x, const std::vector<Tensor>& weights, const std::vector<OptTensor>& biases,
    const std::vector<OptTensor>& cols, const std::vector<OptTensor>& masks,
    const OptTensor& shared_off,
    const std::vector<Tensor>& extra, bool transpose_out) {
  const int64_t layers = static_cast<int64_t>(weights.size());
  const int64_t last = layers - 1;
  const int64_t batch = x.size(0);
  std::vector<Tensor> inputs, blocks;
  inputs.reserve(layers);
  blocks.reserve(layers);
  Tensor h = x;
  bool stacked = false;
  for (int64_t i = 0; i < layers; ++i) {
    const Tensor& w = weights[i];
    const OptTensor rows = i < last ? cols[i + 1] : OptTensor();
    const OptTensor bb = biases[i].has_value() ? OptTensor(gather1d(*biases[i], rows))
                                               : OptTensor();
    Tensor a;
    if (i == 0) h = gather2d(x, OptTensor(), cols[0]);
    if (i == 0 && !extra.empty()) {
      // the positions every sample keeps, multiplied once; each sample adds its own
      Tensor common = h.clone();
      common.index_fill_(1, *shared_off, 0);
      Tensor wb = gather2d(w, rows, cols[0]);
      Tensor out = at::linear(common, wb, bb);
      std::vector<Tensor> per;
      per.reserve(extra.size());
      for (const Tensor& e : extra) {
        if (e.size(0) == 0) {
          per.push_back(out);
        } else {
          per.push_back(out.addmm(h.index_select(1, e), wb.index_select(1, e).t()));
        }
      }
      a = at::cat(per);
      stacked = true;
      inputs.push_back(h);
      blocks.push_back(Tensor());
      if (i == last && transpose_out) a = a.t().contiguous();
    } else {
      if (masks[i].has_value()) {  // the samples part ways here if not before
        const int64_t n = h.size(1);
        h = (h.reshape({-1, batch, n}) * *masks[i]).view({-1, n});
        stacked = true;
      }
      Tensor wb = gather2d(w, rows, cols[i]);
      inputs.push_back(h);
      blocks.push_back(wb);
      if (i == last && transpose_out) {
        a = bb.has_value() ? at::addmm(bb->unsqueeze(1), wb, h.t()) : wb.mm(h.t());
      } else {
        a = at::linear(h, wb, bb);
      }
    }
    h = i == last ? a : a.relu_();
  }
  return {h, inputs, blocks, stacked};
}

// The plain cross-entropy of the transposed outputs `out` (classes, S*B or B), in one
// pass: per-sample mean losses (S,), and d(last sample's mean loss)/d(its outputs) *
// B = softmax - onehot, transposed (classes, B), which the backward pass scales by the
// sum of the gradients reaching the losses over B. ok = false when a label is out of
// range (the caller then lets F.cross_entropy handle it, e.g. ignore_index).
std::tuple<Tensor, Tensor, bool> ce_forward(const Tensor& out_, const Tensor& y_,
                                            int64_t samples, bool stacked) {
  const Tensor out = out_.contiguous();
  const Tensor y = y_.contiguous();
  TORCH_CHECK(y.scalar_type() == at::kLong && y.dim() == 1, "labels: expected 1-d int64");
  const int64_t classes = out.size(0), n = out.size(1), batch = y.size(0);
  const int64_t groups = stacked ? samples : 1;
  TORCH_CHECK(n == groups * batch, "ce_forward: outputs do not match the labels");
  const int64_t* yp = y.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    if (yp[b] < 0 || yp[b] >= classes) return {Tensor(), Tensor(), false};
  }
  Tensor values = at::empty({samples}, out.options());
  Tensor g = at::empty({classes, batch}, out.options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "ce_forward", [&] {
    const scalar_t* o = out.data_ptr<scalar_t>();
    scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* vp = values.data_ptr<scalar_t>();
    for (int64_t k = 0; k < groups; ++k) {
      double total = 0.0;
      const bool last = k == groups - 1;
      for (int64_t b = 0; b < batch; ++b) {
        const int64_t col = k * batch + b;
        double top = o[col];
        for (int64_t c = 1; c < classes; ++c) top = std::max(top, double(o[c * n + col]));
        double sum = 0.0;
        for (int64_t c = 0; c < classes; ++c) sum += std::exp(double(o[c * n + col]) - top);
        const double lse = top + std::log(sum);
        total += lse - double(o[yp[b] * n + col]);
        if (last) {
          for (int64_t c = 0; c < classes; ++c) {
            gp[c * batch + b] = scalar_t(std::exp(double(o[c * n + col]) - lse) -
                                         (c == yp[b] ? 1.0 : 0.0));
          }
        }
      }
      vp[k] = scalar_t(total / double(batch));
    }
    for (int64_t k = groups; k < samples; ++k) vp[k] = vp[0];  // one shared pass
  });
  return {values, g, true};
}

// _ChainLosses.backward's loop: the weight and bias gradients (full size, zero outside
// the blocks) of the LAST sample, from `g`, the gradient with respect to its outputs
// ((classes, B) when `transposed`, else (B, classes)), first multiplied by
// dot(grad_values, scale) when grad_values is given (ce_forward's unscaled gradient).
// first_off: the split first layer's positions gated off in the last sample (None: no
// split).
std::vector<Tensor> chain_backward(Tensor g, const OptTensor& grad_values,
                                   const OptTensor& scale, bool transposed,
                                   const std::vector<Tensor>& weights,
                                   const std::vector<OptTensor>& biases,
                                   const std::vector<OptTensor>& cols,
                                   const std::vector<Tensor>& inputs,
                                   const std::vector<OptTensor>& blocks,
                                   const OptTensor& first_off, int64_t batch) {
  if (grad_values.has_value()) g = g.mul(at::dot(*grad_values, *scale));
  const int64_t layers = static_cast<int64_t>(weights.size());
  const int64_t last = layers - 1;
  std::vector<Tensor> grads(2 * layers);
  for (int64_t i = last; i >= 0; --i) {
    const OptTensor rows = i < last ? cols[i + 1] : OptTensor();
    Tensor h = inputs[i];
    if (i == 0 && first_off.has_value()) {  // split: the last sample's input
      h = h.clone().index_fill_(1, *first_off, 0);
    } else if (h.size(0) != batch) {
      h = h.narrow(0, h.size(0) - batch, batch);
    }
    Tensor gt = transposed ? g : g.t();
    grads[2 * i] = scatter2d(gt.mm(h), weights[i], rows, cols[i]);
    if (biases[i].has_value()) grads[2 * i + 1] = scatter1d(gt.sum(1), *biases[i], rows);
    if (i) {
      // relu's derivative read off its output with the gates applied
      const Tensor& wb = *blocks[i];
      g = at::threshold_backward(transposed ? g.t().mm(wb) : g.mm(wb), h, 0);
      transposed = false;
    }
  }
  return grads;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "binopt: the sliced linear chain's arithmetic (see linear_chain.py)";
  m.def("plan", &plan);
  m.def("chain_forward", &chain_forward);
  m.def("ce_forward", &ce_forward);
  m.def("chain_backward", &chain_backward);
}
