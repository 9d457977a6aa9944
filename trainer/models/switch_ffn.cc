#include "trainer/models/switch_ffn.h"

#include <cmath>

#include "trainer/models/dropout.h"
#include "trainer/models/sliced_linear.h"

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
  std::vector<torch::Tensor> w1s, w2s;  // drawn per expert, as the earlier per-expert leaves
  for (int64_t e = 0; e < c.experts; ++e) {
    w1s.push_back(Normal({c.d_ff, c.d_model}));
    w2s.push_back(Normal({c.d_model, c.d_ff}));
  }
  w1 = register_parameter("w1", torch::stack(w1s));
  b1 = register_parameter("b1", torch::zeros({c.experts, c.d_ff}));
  w2 = register_parameter("w2", torch::stack(w2s));
  b2 = register_parameter("b2", torch::zeros({c.experts, c.d_model}));
  routed_.assign(c.experts, 0);
}

std::vector<spectral::ParamSlice> SwitchFfnImpl::ExpertParams(int64_t e) const {
  return {spectral::ParamSlice::Stacked(w1, e), spectral::ParamSlice::Stacked(b1, e),
          spectral::ParamSlice::Stacked(w2, e), spectral::ParamSlice::Stacked(b2, e)};
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
  // Tokens grouped by expert (each expert's in token order), and who trains.
  std::vector<int64_t> grouped, counts(E);
  std::vector<bool> attached(E);
  for (int64_t e = 0; e < E; ++e) {
    routed_[e] = int64_t(tokens[e].size());
    counts[e] = routed_[e];
    attached[e] = active.empty() || active[e];
    grouped.insert(grouped.end(), tokens[e].begin(), tokens[e].end());
  }
  torch::Tensor idx = torch::tensor(grouped, torch::kLong).to(x.device());
  torch::Tensor xg = flat.index_select(0, idx);  // [N', d]
  torch::Tensor h = GroupedForward(xg, w1, b1, counts, attached);  // [N', d_ff]
  if (recorder_ != nullptr) h = Record(xg, h, idx, counts, B, T);
  torch::Tensor a = Dropout(F::gelu(h), c_.dropout, is_training());
  torch::Tensor y = GroupedForward(a, w2, b2, counts, attached);  // [N', d]
  if (recorder_ != nullptr) y = Record(a, y, idx, counts, B, T);
  y = y * gate.index_select(0, idx).unsqueeze(1).to(y.scalar_type());
  return torch::zeros({N, d}, y.options()).index_add(0, idx, y).view({B, T, d});
}

torch::Tensor SwitchFfnImpl::Record(const torch::Tensor& in, const torch::Tensor& out,
                                    const torch::Tensor& idx, const std::vector<int64_t>& counts,
                                    int64_t B, int64_t T) {
  // Dense layout for the probe: zeros for the rows of other tokens (see the header). The
  // recorded output must be the tensor the rest of the forward reads from, so the grouped rows
  // are read back from the dense ones.
  const int64_t N = B * T;
  std::vector<torch::Tensor> back;
  int64_t offset = 0;
  for (size_t e = 0; e < counts.size(); ++e) {
    if (counts[e] == 0) continue;
    const torch::Tensor ie = idx.narrow(0, offset, counts[e]);
    const torch::Tensor dense = Scatter(out.narrow(0, offset, counts[e]), ie, N).view({B, T, out.size(1)});
    recorder_->Record({Scatter(in.narrow(0, offset, counts[e]).detach(), ie, N).view({B, T, in.size(1)}),
                       dense, {{modules_[e], spectral::SliceAxis::kRows, 0, out.size(1), true}}});
    back.push_back(dense.view({N, out.size(1)}).index_select(0, ie));
    offset += counts[e];
  }
  return back.empty() ? out : torch::cat(back, 0);
}

}  // namespace mat::trainer
