#include "trainer/models/sliced_linear.h"

#include "trainer/models/autocast.h"

namespace mat::trainer {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Concatenates w[order[i]][c] for c-major, i in [0, |order|), outside autograd.
torch::Tensor GatherAll(const std::vector<std::vector<torch::Tensor>>& parts,
                        const std::vector<int>& order) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> pieces;
  const size_t comps = parts[order[0]].size();
  pieces.reserve(comps * order.size());
  for (size_t c = 0; c < comps; ++c)
    for (int s : order) pieces.push_back(parts[s][c]);
  return pieces.size() == 1 ? pieces[0].detach() : torch::cat(pieces, 0);
}

// y = x W^T (+ b) with one matmul each way; weight (and bias) gradients only for the attached
// slices, whose leaves are the function's tensor-list input (weights c-major, then biases).
class RowSplitFunction : public torch::autograd::Function<RowSplitFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x,
                               torch::TensorList attached, const torch::Tensor& w_all,
                               const c10::optional<torch::Tensor>& b_all, int64_t comps,
                               int64_t slices, int64_t rows, int64_t num_attached) {
    ctx->save_for_backward({x, w_all});
    ctx->saved_data["comps"] = comps;
    ctx->saved_data["slices"] = slices;
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["attached"] = num_attached;
    ctx->saved_data["bias"] = b_all.has_value();
    // The leaves' dtype: under bf16 autocast the weight gradients are computed in bf16 and cast
    // once per block here, not once per leaf by autograd (hundreds of small casts per step).
    ctx->saved_data["leaf_dtype"] =
        static_cast<int64_t>(attached.empty() ? x.scalar_type() : attached[0].scalar_type());
    return torch::nn::functional::linear(x, w_all, b_all.has_value() ? *b_all : torch::Tensor());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto saved = ctx->get_saved_variables();
    const torch::Tensor& x = saved[0];
    const torch::Tensor& w_all = saved[1];
    const int64_t comps = ctx->saved_data["comps"].toInt();
    const int64_t slices = ctx->saved_data["slices"].toInt();
    const int64_t rows = ctx->saved_data["rows"].toInt();
    const int64_t num_attached = ctx->saved_data["attached"].toInt();
    const bool has_bias = ctx->saved_data["bias"].toBool();
    const auto leaf = static_cast<at::ScalarType>(ctx->saved_data["leaf_dtype"].toInt());
    torch::Tensor g = grad_out[0].reshape({-1, grad_out[0].size(-1)});
    torch::Tensor x2 = x.reshape({-1, x.size(-1)});
    variable_list out;
    out.push_back(ctx->needs_input_grad(0) ? torch::mm(g, w_all).view(x.sizes()) : torch::Tensor());
    std::vector<torch::Tensor> wgrads, bgrads;
    for (int64_t c = 0; c < comps && num_attached > 0; ++c) {
      torch::Tensor block = g.narrow(1, c * slices * rows, num_attached * rows);  // [N, A*r]
      for (torch::Tensor& t : torch::mm(block.t(), x2).to(leaf).split(rows, 0)) wgrads.push_back(t);
      if (has_bias) {
        for (torch::Tensor& t : block.sum(0).to(leaf).split(rows, 0)) bgrads.push_back(t);
      }
    }
    out.insert(out.end(), wgrads.begin(), wgrads.end());
    out.insert(out.end(), bgrads.begin(), bgrads.end());
    for (int i = 0; i < 6; ++i) out.emplace_back();  // w_all, b_all and the four integers
    return out;
  }
};

// y = x W^T with W = [W_order[0] | W_order[1] | ...] column blocks of width c; weight gradients
// only for the first num_attached blocks.
class ColSplitFunction : public torch::autograd::Function<ColSplitFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x,
                               torch::TensorList attached, const torch::Tensor& w_all,
                               int64_t cols, int64_t num_attached) {
    ctx->save_for_backward({x, w_all});
    ctx->saved_data["cols"] = cols;
    ctx->saved_data["attached"] = num_attached;
    ctx->saved_data["leaf_dtype"] =
        static_cast<int64_t>(attached.empty() ? x.scalar_type() : attached[0].scalar_type());
    return torch::nn::functional::linear(x, w_all);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto saved = ctx->get_saved_variables();
    const torch::Tensor& x = saved[0];
    const torch::Tensor& w_all = saved[1];
    const int64_t cols = ctx->saved_data["cols"].toInt();
    const int64_t num_attached = ctx->saved_data["attached"].toInt();
    const auto leaf = static_cast<at::ScalarType>(ctx->saved_data["leaf_dtype"].toInt());
    torch::Tensor g = grad_out[0].reshape({-1, grad_out[0].size(-1)});
    torch::Tensor x2 = x.reshape({-1, x.size(-1)});
    variable_list out;
    out.push_back(ctx->needs_input_grad(0) ? torch::mm(g, w_all).view(x.sizes()) : torch::Tensor());
    if (num_attached > 0) {
      torch::Tensor gw =
          torch::mm(g.t(), x2.narrow(1, 0, num_attached * cols)).to(leaf);  // [out, A*c]
      for (torch::Tensor& t : gw.split(cols, 1)) out.push_back(t.contiguous());
    }
    for (int i = 0; i < 3; ++i) out.emplace_back();  // w_all and the two integers
    return out;
  }
};

}  // namespace

std::vector<int> ActiveFirstOrder(const std::vector<bool>& active, size_t* num_active) {
  std::vector<int> order;
  order.reserve(active.size());
  for (size_t s = 0; s < active.size(); ++s)
    if (active[s]) order.push_back(static_cast<int>(s));
  *num_active = order.size();
  for (size_t s = 0; s < active.size(); ++s)
    if (!active[s]) order.push_back(static_cast<int>(s));
  return order;
}

torch::Tensor RowSplitForward(const torch::Tensor& x,
                              const std::vector<std::vector<torch::Tensor>>& w,
                              const std::vector<std::vector<torch::Tensor>>& b,
                              const std::vector<int>& order, size_t num_attached) {
  const bool has_bias = !b.empty();
  const int64_t comps = static_cast<int64_t>(w[order[0]].size());
  std::vector<torch::Tensor> attached;
  for (int64_t c = 0; c < comps; ++c)
    for (size_t i = 0; i < num_attached; ++i) attached.push_back(w[order[i]][c]);
  if (has_bias) {
    for (int64_t c = 0; c < comps; ++c)
      for (size_t i = 0; i < num_attached; ++i) attached.push_back(b[order[i]][c]);
  }
  c10::optional<torch::Tensor> b_all;
  if (has_bias) b_all = GatherAll(b, order);
  torch::Tensor w_all = GatherAll(w, order);
  torch::Tensor xc = x;
  if (auto dtype = AutocastDtype(x.device().type())) {  // bf16 step: the function computes in it
    xc = x.to(*dtype);
    w_all = w_all.to(*dtype);
    if (b_all) b_all = b_all->to(*dtype);
  }
  return RowSplitFunction::apply(xc, torch::TensorList(attached), w_all, b_all, comps,
                                 static_cast<int64_t>(order.size()), w[order[0]][0].size(0),
                                 static_cast<int64_t>(num_attached));
}

torch::Tensor ColSplitForward(const torch::Tensor& x, const std::vector<torch::Tensor>& w,
                              const std::vector<int>& order, size_t num_attached) {
  std::vector<torch::Tensor> attached;
  for (size_t i = 0; i < num_attached; ++i) attached.push_back(w[order[i]]);
  torch::Tensor w_all;
  {
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> pieces;
    for (int s : order) pieces.push_back(w[s]);
    w_all = pieces.size() == 1 ? pieces[0].detach() : torch::cat(pieces, 1);
  }
  torch::Tensor xc = x;
  if (auto dtype = AutocastDtype(x.device().type())) {
    xc = x.to(*dtype);
    w_all = w_all.to(*dtype);
  }
  return ColSplitFunction::apply(xc, torch::TensorList(attached), w_all, w[order[0]].size(1),
                                 static_cast<int64_t>(num_attached));
}

}  // namespace mat::trainer
