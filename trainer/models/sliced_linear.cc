#include "trainer/models/sliced_linear.h"

#include <algorithm>

#include <ATen/ATen.h>

#include "trainer/models/autocast.h"

namespace mat::trainer {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Whether the blocks are every row of a [rows, ·] weight, in order.
bool CoversInOrder(const std::vector<int64_t>& begin, const std::vector<int64_t>& end,
                   int64_t rows) {
  int64_t next = 0;
  for (size_t i = 0; i < begin.size(); ++i) {
    if (begin[i] != next) return false;
    next = end[i];
  }
  return next == rows;
}

// The blocks' rows of t stacked in block order (t itself when they cover it in order).
torch::Tensor Gather(const torch::Tensor& t, const std::vector<int64_t>& begin,
                     const std::vector<int64_t>& end, bool covers) {
  if (covers) return t;
  std::vector<torch::Tensor> parts;
  for (size_t i = 0; i < begin.size(); ++i) parts.push_back(t.narrow(0, begin[i], end[i] - begin[i]));
  return parts.size() == 1 ? parts[0] : torch::cat(parts, 0);
}

// A run of adjacent attached blocks: weight rows [row, row + n), map units [unit, unit + n).
struct Run {
  int64_t row = 0, unit = 0, n = 0;
};

std::vector<Run> AttachedRuns(const std::vector<int64_t>& begin, const std::vector<int64_t>& end,
                              const std::vector<int64_t>& attached) {
  std::vector<Run> runs;
  int64_t unit = 0;
  bool open = false;
  for (size_t i = 0; i < begin.size(); ++i) {
    const int64_t n = end[i] - begin[i];
    if (!attached[i]) {
      open = false;
    } else if (open && runs.back().row + runs.back().n == begin[i]) {
      runs.back().n += n;
    } else {
      runs.push_back({begin[i], unit, n});
      open = true;
    }
    unit += n;
  }
  return runs;
}

// transposed = false: y = x W_S^T + b_S (W [R, in]); true: y = x W_S + b (W [R, out], b [out]
// whole or none).
class SplitFunction : public torch::autograd::Function<SplitFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w,
                               const c10::optional<torch::Tensor>& b, std::vector<int64_t> begin,
                               std::vector<int64_t> end, std::vector<int64_t> attached,
                               bool transposed) {
    const bool covers = CoversInOrder(begin, end, w.size(0));
    // Computed in x's dtype (the caller casts x under bf16 autocast): one cast of the weight.
    torch::Tensor ws = Gather(w, begin, end, covers).to(x.scalar_type());
    torch::Tensor bs;  // row-split: the blocks' rows of b; col-split: b whole (not split)
    if (b.has_value()) bs = (transposed ? *b : Gather(*b, begin, end, covers)).to(x.scalar_type());
    ctx->save_for_backward({x, ws});
    ctx->saved_data["begin"] = begin;
    ctx->saved_data["end"] = end;
    ctx->saved_data["attached"] = attached;
    ctx->saved_data["transposed"] = transposed;
    ctx->saved_data["bias"] = b.has_value();
    ctx->saved_data["rows"] = w.size(0);
    ctx->saved_data["leaf_dtype"] = static_cast<int64_t>(w.scalar_type());
    // One matmul over the flattened leading axes, the bias fused into it (addmm), as ATen's
    // linear does for a 3-d input. (The C++ frontend's F::linear runs matmul and then a separate
    // add_ of the bias for any input that is not 2-d: one more pass over the output.)
    torch::Tensor x2 = x.reshape({-1, x.size(-1)});
    torch::Tensor wt = transposed ? ws : ws.t();  // [in, out]
    torch::Tensor y2 = bs.defined() ? at::addmm(bs, x2, wt) : at::mm(x2, wt);
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = y2.size(1);
    return y2.view(shape);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto saved = ctx->get_saved_variables();
    const torch::Tensor& x = saved[0];
    const torch::Tensor ws = saved[1].detach();  // first order only in the weights
    const std::vector<int64_t> begin = ctx->saved_data["begin"].toIntVector();
    const std::vector<int64_t> end = ctx->saved_data["end"].toIntVector();
    const std::vector<int64_t> attached = ctx->saved_data["attached"].toIntVector();
    const bool transposed = ctx->saved_data["transposed"].toBool();
    const bool has_bias = ctx->saved_data["bias"].toBool();
    const int64_t rows = ctx->saved_data["rows"].toInt();
    const auto leaf = static_cast<at::ScalarType>(ctx->saved_data["leaf_dtype"].toInt());
    torch::Tensor g = grad_out[0].reshape({-1, grad_out[0].size(-1)});
    torch::Tensor x2 = x.reshape({-1, x.size(-1)});
    variable_list out(7);
    if (ctx->needs_input_grad(0)) {
      out[0] = (transposed ? torch::mm(g, ws.t()) : torch::mm(g, ws)).view(x.sizes());
    }
    // The shared bias as nn.Linear's: summed in g's dtype, then cast (a sum with a dtype
    // argument first copies all of g into that dtype on the CPU).
    if (has_bias && transposed && ctx->needs_input_grad(2)) out[2] = g.sum(0).to(leaf);
    const bool row_bias = has_bias && !transposed;  // the bias is split with the rows
    std::vector<Run> runs = AttachedRuns(begin, end, attached);
    // Nothing to do for the blocks when no block is attached, or when the caller does not want
    // the weight's (and row bias's) gradient: a λ probe differentiates the sites' outputs only
    // (autograd::grad with other inputs), which made this compute every weight gradient unused.
    const bool want = ctx->needs_input_grad(1) || (row_bias && ctx->needs_input_grad(2));
    if (runs.empty() || !want) return out;
    std::sort(runs.begin(), runs.end(), [](const Run& a, const Run& b) { return a.row < b.row; });
    // Weight rows of map units [u, u + n): row-split g[:, u:u+n]^T x, col-split x[:, u:u+n]^T g.
    auto block_grad = [&](int64_t u, int64_t n) {
      return transposed ? torch::mm(x2.narrow(1, u, n).t(), g) : torch::mm(g.narrow(1, u, n).t(), x2);
    };
    const int64_t cols = transposed ? g.size(1) : x2.size(1);
    const bool whole = runs.size() == 1 && runs[0].row == 0 && runs[0].n == rows &&
                       CoversInOrder(begin, end, rows);
    torch::Tensor gw, gb;
    if (whole) {  // every row attached, in order: one matmul, as nn.Linear's backward
      gw = block_grad(0, rows);
      if (row_bias) gb = g.sum(0);
    } else if (torch::GradMode::is_enabled()) {  // differentiated again: no out= writes
      gw = torch::zeros({rows, cols}, g.options());
      for (const Run& r : runs) gw.narrow(0, r.row, r.n).copy_(block_grad(r.unit, r.n));
      if (row_bias) {
        gb = torch::zeros({rows}, g.options());
        for (const Run& r : runs) gb.narrow(0, r.row, r.n).copy_(g.narrow(1, r.unit, r.n).sum(0));
      }
    } else {
      // The layer's gradient: the attached runs written in place, every other row zero.
      gw = torch::empty({rows, cols}, g.options());
      if (row_bias) gb = torch::empty({rows}, g.options());
      int64_t next = 0;
      for (const Run& r : runs) {
        if (r.row > next) {
          gw.narrow(0, next, r.row - next).zero_();
          if (row_bias) gb.narrow(0, next, r.row - next).zero_();
        }
        torch::Tensor dst = gw.narrow(0, r.row, r.n);
        if (transposed) {
          at::mm_out(dst, x2.narrow(1, r.unit, r.n).t(), g);
        } else {
          at::mm_out(dst, g.narrow(1, r.unit, r.n).t(), x2);
        }
        if (row_bias) {
          torch::Tensor bias_dst = gb.narrow(0, r.row, r.n);
          at::sum_out(bias_dst, g.narrow(1, r.unit, r.n), {0});
        }
        next = r.row + r.n;
      }
      if (next < rows) {
        gw.narrow(0, next, rows - next).zero_();
        if (row_bias) gb.narrow(0, next, rows - next).zero_();
      }
    }
    out[1] = gw.to(leaf);
    if (row_bias) out[2] = gb.to(leaf);
    return out;
  }
};

// y_e = x_e W[e]^T + b[e] over the row groups of x.
class GroupedFunction : public torch::autograd::Function<GroupedFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w,
                               const c10::optional<torch::Tensor>& b, std::vector<int64_t> counts,
                               std::vector<int64_t> attached) {
    torch::Tensor wc = w.to(x.scalar_type());
    torch::Tensor bc;
    if (b.has_value()) bc = b->to(x.scalar_type());
    torch::Tensor y = torch::empty({x.size(0), w.size(1)}, x.options());
    int64_t offset = 0;
    for (size_t e = 0; e < counts.size(); ++e) {
      if (counts[e] == 0) continue;
      torch::Tensor dst = y.narrow(0, offset, counts[e]);
      if (bc.defined()) {
        at::addmm_out(dst, bc[e], x.narrow(0, offset, counts[e]), wc[e].t());
      } else {
        at::mm_out(dst, x.narrow(0, offset, counts[e]), wc[e].t());
      }
      offset += counts[e];
    }
    ctx->save_for_backward({x, wc});
    ctx->saved_data["counts"] = counts;
    ctx->saved_data["attached"] = attached;
    ctx->saved_data["bias"] = b.has_value();
    ctx->saved_data["leaf_dtype"] = static_cast<int64_t>(w.scalar_type());
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto saved = ctx->get_saved_variables();
    const torch::Tensor& x = saved[0];
    const torch::Tensor wc = saved[1].detach();
    const std::vector<int64_t> counts = ctx->saved_data["counts"].toIntVector();
    const std::vector<int64_t> attached = ctx->saved_data["attached"].toIntVector();
    const bool has_bias = ctx->saved_data["bias"].toBool();
    const auto leaf = static_cast<at::ScalarType>(ctx->saved_data["leaf_dtype"].toInt());
    const torch::Tensor& g = grad_out[0];
    const bool differentiable = torch::GradMode::is_enabled();  // differentiated again
    variable_list out(5);
    std::vector<torch::Tensor> gx;
    bool any = false;  // an attached expert whose weight gradient the caller wants
    for (int64_t a : attached) any = any || a != 0;
    any = any && (ctx->needs_input_grad(1) || (has_bias && ctx->needs_input_grad(2)));
    torch::Tensor gw, gb;
    if (any) {  // rows of the experts written below are not zeroed first
      gw = torch::empty(wc.sizes(), g.options());
      if (has_bias) gb = torch::empty({wc.size(0), wc.size(1)}, g.options());
      for (size_t e = 0; e < counts.size(); ++e) {
        if (attached[e] && counts[e] > 0 && !differentiable) continue;
        gw[e].zero_();
        if (has_bias) gb[e].zero_();
      }
    }
    int64_t offset = 0;
    for (size_t e = 0; e < counts.size(); ++e) {
      if (counts[e] == 0) continue;
      const torch::Tensor ge = g.narrow(0, offset, counts[e]);
      const torch::Tensor xe = x.narrow(0, offset, counts[e]);
      if (ctx->needs_input_grad(0)) gx.push_back(torch::mm(ge, wc[e]));
      if (any && attached[e]) {
        if (differentiable) {
          gw[e].copy_(torch::mm(ge.t(), xe));
          if (has_bias) gb[e].copy_(ge.sum(0));
        } else {
          torch::Tensor dst = gw[e];
          at::mm_out(dst, ge.t(), xe);
          if (has_bias) {
            torch::Tensor bias_dst = gb[e];
            at::sum_out(bias_dst, ge, {0});
          }
        }
      }
      offset += counts[e];
    }
    if (ctx->needs_input_grad(0)) {
      out[0] = gx.empty() ? torch::zeros_like(x) : gx.size() == 1 ? gx[0] : torch::cat(gx, 0);
    }
    if (any) {
      out[1] = gw.to(leaf);
      if (has_bias) out[2] = gb.to(leaf);
    }
    return out;
  }
};

// A function's inputs: x cast to the autocast dtype in a bf16 step (the function computes in
// x's dtype), the weight and bias detached when no block is attached (constants: no autograd
// node unless x needs one).
struct Inputs {
  torch::Tensor x, w;
  c10::optional<torch::Tensor> b;
};

// A shared bias (one for every block: `shared_bias`) stays attached whatever is attached.
Inputs PrepareInputs(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                     const std::vector<int64_t>& attached, bool shared_bias = false) {
  bool any = false;
  for (int64_t a : attached) any = any || a != 0;
  Inputs in{x, any ? w : w.detach(), c10::nullopt};
  if (auto dtype = AutocastDtype(x.device().type())) in.x = x.to(*dtype);
  if (b.defined()) in.b = any || shared_bias ? b : b.detach();
  return in;
}

torch::Tensor Apply(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                    const std::vector<RowBlock>& blocks, const std::vector<bool>& attached,
                    bool transposed) {
  TORCH_CHECK(!blocks.empty() && blocks.size() == attached.size(), "sliced linear: ",
              blocks.size(), " blocks and ", attached.size(), " attached flags");
  std::vector<int64_t> begin, end, on;
  for (size_t i = 0; i < blocks.size(); ++i) {
    TORCH_CHECK(0 <= blocks[i].begin && blocks[i].begin < blocks[i].end &&
                    blocks[i].end <= w.size(0),
                "sliced linear: block [", blocks[i].begin, ", ", blocks[i].end,
                ") is not inside the weight's ", w.size(0), " rows");
    begin.push_back(blocks[i].begin);
    end.push_back(blocks[i].end);
    on.push_back(attached[i] ? 1 : 0);
  }
  const Inputs in = PrepareInputs(x, w, b, on, /*shared_bias=*/transposed);
  return SplitFunction::apply(in.x, in.w, in.b, begin, end, on, transposed);
}

}  // namespace

torch::Tensor GroupedForward(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                             const std::vector<int64_t>& counts, const std::vector<bool>& attached) {
  TORCH_CHECK(int64_t(counts.size()) == w.size(0) && counts.size() == attached.size(),
              "grouped linear: ", counts.size(), " counts and ", attached.size(),
              " attached flags for ", w.size(0), " experts");
  int64_t total = 0;
  for (int64_t n : counts) total += n;
  TORCH_CHECK(total == x.size(0), "grouped linear: counts sum to ", total, ", x has ", x.size(0),
              " rows");
  std::vector<int64_t> on;
  for (bool a : attached) on.push_back(a ? 1 : 0);
  const Inputs in = PrepareInputs(x, w, b, on);
  return GroupedFunction::apply(in.x, in.w, in.b, counts, on);
}

std::vector<RowBlock> EqualBlocks(int64_t count, int64_t size) {
  std::vector<RowBlock> blocks;
  for (int64_t i = 0; i < count; ++i) blocks.push_back({i * size, (i + 1) * size});
  return blocks;
}

torch::Tensor RowSplitForward(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                              const std::vector<RowBlock>& blocks,
                              const std::vector<bool>& attached) {
  return Apply(x, w, b, blocks, attached, /*transposed=*/false);
}

torch::Tensor ColSplitForward(const torch::Tensor& x, const torch::Tensor& w_t,
                              const std::vector<RowBlock>& blocks,
                              const std::vector<bool>& attached, const torch::Tensor& b) {
  return Apply(x, w_t, b, blocks, attached, /*transposed=*/true);
}

}  // namespace mat::trainer
