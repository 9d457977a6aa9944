// The Switch-Transformer FFN (Fedus, Zoph & Shazeer 2021): E expert FFNs behind a top-1 router,
// with a capacity per expert and the load-balancing auxiliary loss. Each expert is one MAT
// module (group "experts"); the router is always trained.
//
// Routing of N tokens x [N, d] (softmax in float32, also under bf16 autocast; float64 for a
// float64 model):
//   p = softmax(x W_r^T + b_r)            [N, E]
//   e(t) = argmax_i p[t, i],  gate(t) = p[t, e(t)]
//   capacity C = ceil(capacity_factor · N / E); the tokens routed to an expert keep their order
//   in x and the first C of them are processed, the rest overflow.
//   y[t] = gate(t) · FFN_{e(t)}(x[t]) for a processed token, 0 for an overflow token (so in the
//   encoder layer an overflow token skips the FFN through the residual).
//   FFN_e(x) = W2_e dropout(GELU(W1_e x + b1_e)) + b2_e.
// Load-balancing loss (unweighted; the model multiplies by aux_loss_weight):
//   aux = E · Σ_i f_i · P_i,  f_i = (tokens with e(t) = i) / N (before the capacity cut, not
//   differentiable),  P_i = mean_t p[t, i] (differentiable: it trains the router).
//
// Storage: modules as views. The layer's experts are stacked in four leaves, w1 [E, d_ff, d],
// b1 [E, d_ff], w2 [E, d, d_ff], b2 [E, d]; expert e's module is row e of each
// (spectral::ParamSlice). The tokens are grouped by expert and every map runs as one grouped
// function (trainer/models/sliced_linear.h GroupedForward): one matmul per expert each way.
// Masking: the backward forms no weight gradient for a masked-off expert (its rows of the
// layer's gradients stay zero); its tokens' activation gradients still flow to the router and
// the layers below. An active expert always gets its rows of the gradient (zeros when no token
// reached it), so data-parallel ranks agree on what they reduce.
//
// Probes: with a recorder installed, every expert that received tokens records two LinearSites
// in the dense [B, T, ·] layout the gram estimator expects: the rows of tokens not processed by
// the expert hold zeros in the input and receive a zero output gradient, so they add nothing to
// the expert's per-sample gradients Σ_t g_{i,t} a_{i,t}^T. An expert without tokens records
// nothing (its kernel is zero).
//
// Not thread-safe. The statistics of the last forward (aux loss, routed counts) stay until the
// next forward.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/torch.h>

#include "spectral/module_partition.h"
#include "spectral/probe.h"

namespace mat::trainer {

struct SwitchFfnConfig {
  int64_t d_model = 256;
  int64_t d_ff = 1024;
  int64_t experts = 8;           // E >= 1
  double capacity_factor = 1.25;  // > 0
  double dropout = 0.1;          // on the experts' hidden activations
};

// The capacity of one expert for `tokens` tokens: ceil(capacity_factor · tokens / experts).
int64_t SwitchCapacity(int64_t tokens, int64_t experts, double capacity_factor);

// Top-1 assignment of N tokens. probs: [N, E] float. Returns kept: [N] int64, the expert that
// processes each token or -1 for an overflow token (first come, first served in token order).
// expert_of (optional): [N] int64, the argmax expert before the capacity cut.
torch::Tensor SwitchAssign(const torch::Tensor& probs, int64_t capacity,
                           torch::Tensor* expert_of = nullptr);

// E · Σ_i f_i · P_i for router probabilities probs [N, E] and argmax experts expert_of [N];
// scalar, differentiable through probs.
torch::Tensor SwitchLoadBalancingLoss(const torch::Tensor& probs, const torch::Tensor& expert_of);

class SwitchFfnImpl : public torch::nn::Module {
 public:
  explicit SwitchFfnImpl(const SwitchFfnConfig& c);

  // x: [B, T, d] -> [B, T, d], no bias outside the experts. active: [E] flags (empty: all).
  torch::Tensor forward(const torch::Tensor& x, const std::vector<bool>& active);
  // modules: the partition index of each expert, for recorded sites; r = nullptr stops.
  void set_recorder(spectral::SiteRecorder* r, std::vector<int> modules);

  // The last forward's unweighted load-balancing loss (scalar, the router's softmax dtype, in
  // the graph).
  const torch::Tensor& aux_loss() const { return aux_loss_; }
  // The last forward's tokens processed per expert ([E], each <= the capacity).
  const std::vector<int64_t>& routed_tokens() const { return routed_; }
  // The last forward's overflow tokens (skipped the FFN).
  int64_t dropped_tokens() const { return dropped_; }
  const SwitchFfnConfig& config() const { return c_; }

  torch::nn::Linear router{nullptr};  // d -> E, always trained
  // "w1" [E, d_ff, d], "b1" [E, d_ff], "w2" [E, d, d_ff], "b2" [E, d]; expert e is row e. The
  // initial values are drawn per expert in the order of the earlier per-expert leaves.
  torch::Tensor w1, b1, w2, b2;
  // Expert e's module: its rows of w1, b1, w2, b2.
  std::vector<spectral::ParamSlice> ExpertParams(int64_t e) const;

 private:
  // Records every expert's site of the grouped map in -> out ([N', ·], rows grouped by expert,
  // idx [N'] their token indices) and returns out read back from the recorded dense outputs.
  torch::Tensor Record(const torch::Tensor& in, const torch::Tensor& out, const torch::Tensor& idx,
                       const std::vector<int64_t>& counts, int64_t B, int64_t T);

  SwitchFfnConfig c_;
  spectral::SiteRecorder* recorder_ = nullptr;
  std::vector<int> modules_;
  torch::Tensor aux_loss_;
  std::vector<int64_t> routed_;
  int64_t dropped_ = 0;
};
TORCH_MODULE(SwitchFfn);

}  // namespace mat::trainer
