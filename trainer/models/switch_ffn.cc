#include "trainer/models/switch_ffn.h"

#include <cmath>

#include "trainer/models/dropout.h"

namespace mat::trainer {
namespace F = torch::nn::functional;

namespace {
torch::Tensor Normal(std::vector<int64_t> shape) { return torch::randn(shape) * 0.02; }

// rows [N, k] at `index` [n] of a zero [N, k] tensor; differentiable in `rows`.
torch::Tensor Scatter(const torch::Tensor& rows, const torch::Tensor& index, int64_t n) {
  return torch::zeros({n, rows.size(1)}, rows.options()).index_copy(0, index, rows);
}
}  // namespace

int64_t SwitchCapacity(int64_t tokens, int64_t experts, double capacity_factor) {
  return static_cast<int64_t>(std::ceil(capacity_factor * double(tokens) / double(experts)));
}

torch::Tensor SwitchAssign(const torch::Tensor& probs, int64_t capacity,
                           torch::Tensor* expert_of) {
  torch::NoGradGuard no_grad;
  const int64_t E = probs.size(1);
  torch::Tensor top = std::get<1>(probs.max(-1));                    // [N]
  torch::Tensor onehot = F::one_hot(top, E);                          // [N, E] int64
  // The 0-based place of each token in its expert's queue, in token order.
  torch::Tensor place = (onehot.cumsum(0) * onehot).sum(1) - 1;       // [N]
  if (expert_of != nullptr) *expert_of = top;
  return torch::where(place < capacity, top, torch::full_like(top, -1));
}

torch::Tensor SwitchLoadBalancingLoss(const torch::Tensor& probs, const torch::Tensor& expert_of) {
  const int64_t N = probs.size(0), E = probs.size(1);
  torch::Tensor f = F::one_hot(expert_of, E).to(probs.scalar_type()).sum(0) / double(N);  // [E]
  torch::Tensor P = probs.mean(0);                                                        // [E]
  return double(E) * (f * P).sum();
}

SwitchFfnImpl::SwitchFfnImpl(const SwitchFfnConfig& c) : c_(c) {
  router = register_module("router", torch::nn::Linear(c.d_model, c.experts));
  {
    torch::NoGradGuard g;
    router->weight.normal_(0, 0.02);
    router->bias.zero_();
  }
  for (int64_t e = 0; e < c.experts; ++e) {
    const std::string s = std::to_string(e);
    w1.push_back(register_parameter("expert" + s + "_w1", Normal({c.d_ff, c.d_model})));
    b1.push_back(register_parameter("expert" + s + "_b1", torch::zeros({c.d_ff})));
    w2.push_back(register_parameter("expert" + s + "_w2", Normal({c.d_model, c.d_ff})));
    b2.push_back(register_parameter("expert" + s + "_b2", torch::zeros({c.d_model})));
  }
  routed_.assign(c.experts, 0);
}

void SwitchFfnImpl::set_recorder(spectral::SiteRecorder* r, std::vector<int> modules) {
  recorder_ = r;
  modules_ = std::move(modules);
}

torch::Tensor SwitchFfnImpl::forward(const torch::Tensor& x, const std::vector<bool>& active) {
  const int64_t B = x.size(0), T = x.size(1), d = c_.d_model, E = c_.experts;
  const int64_t N = B * T;
  torch::Tensor flat = x.reshape({N, d});
  // Router probabilities in float32 at least (float64 for a float64 model, e.g. in tests).
  const auto pdt = flat.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  torch::Tensor probs = torch::softmax(router(flat).to(pdt), -1);  // [N, E]
  torch::Tensor expert_of;
  torch::Tensor kept = SwitchAssign(probs, SwitchCapacity(N, E, c_.capacity_factor), &expert_of);
  aux_loss_ = SwitchLoadBalancingLoss(probs, expert_of);
  torch::Tensor gate = probs.gather(1, expert_of.unsqueeze(1)).squeeze(1);  // [N]

  // Token lists per expert, with one host copy of the assignment.
  torch::Tensor kept_cpu = kept.to(torch::kCPU).contiguous();
  const int64_t* k = kept_cpu.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> tokens(E);
  dropped_ = 0;
  for (int64_t t = 0; t < N; ++t) {
    if (k[t] < 0) {
      ++dropped_;
    } else {
      tokens[k[t]].push_back(t);
    }
  }
  const bool record = recorder_ != nullptr;
  std::vector<torch::Tensor> ys, index;
  for (int64_t e = 0; e < E; ++e) {
    routed_[e] = int64_t(tokens[e].size());
    const bool on = active.empty() || active[e];
    if (tokens[e].empty() && !on) continue;
    torch::Tensor idx = torch::tensor(tokens[e], torch::kLong).to(x.device());
    torch::Tensor xe = flat.index_select(0, idx);  // [n_e, d]
    // A masked-off expert's leaves enter detached: no weight gradient is formed.
    auto leaf = [&](const torch::Tensor& p) { return on ? p : p.detach(); };
    torch::Tensor h = F::linear(xe, leaf(w1[e]), leaf(b1[e]));  // [n_e, d_ff]
    const bool site = record && !tokens[e].empty();
    if (site) {
      // Dense layout for the probe: zeros for the rows of other tokens (see the header). The
      // recorded output must be the tensor the rest of the forward reads from.
      torch::Tensor dense = Scatter(h, idx, N).view({B, T, c_.d_ff});
      recorder_->Record({Scatter(xe.detach(), idx, N).view({B, T, d}), dense,
                         {{modules_[e], spectral::SliceAxis::kRows, 0, c_.d_ff, true}}});
      h = dense.view({N, c_.d_ff}).index_select(0, idx);
    }
    torch::Tensor a = Dropout(F::gelu(h), c_.dropout, is_training());
    torch::Tensor y = F::linear(a, leaf(w2[e]), leaf(b2[e]));  // [n_e, d]
    if (site) {
      torch::Tensor dense = Scatter(y, idx, N).view({B, T, d});
      recorder_->Record({Scatter(a.detach(), idx, N).view({B, T, c_.d_ff}), dense,
                         {{modules_[e], spectral::SliceAxis::kRows, 0, d, true}}});
      y = dense.view({N, d}).index_select(0, idx);
    }
    ys.push_back(y * gate.index_select(0, idx).unsqueeze(1).to(y.scalar_type()));
    index.push_back(idx);
  }
  if (ys.empty()) return torch::zeros_like(x);
  torch::Tensor y_all = torch::cat(ys, 0);
  torch::Tensor out =
      torch::zeros({N, d}, y_all.options()).index_add(0, torch::cat(index, 0), y_all);
  return out.view({B, T, d});
}

}  // namespace mat::trainer
