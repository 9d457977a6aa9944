// Mask-aware AdamW (decoupled weight decay, Loshchilov & Hutter) with per-tensor step counts.
//
// Every parameter tensor belongs to one module or to none (always trained). On Step, a tensor
// whose module is masked off is skipped entirely: its value, its moments and its step count do
// not change (no momentum drift, no weight decay, no bias-correction advance). Such tensors must
// have no gradient (the model does not compute it); Step returns FAILED_PRECONDITION otherwise,
// so a masking bug cannot hide. After Step every gradient is reset to undefined.
// Speed: tensors are updated in groups of equal scalars with multi-tensor _foreach_ ops (on a
// GPU a few kernel launches per group instead of ~9 per tensor; with LibTorch 2 on CUDA, its
// fused AdamW kernel, one pass per chunk of tensors). Elementwise, so results do not depend on
// the thread count.
// Not thread-safe.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/status/status.h"
#include "spectral/module_partition.h"

namespace mat::trainer {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
  // false: the plain per-tensor sequence of ATen ops (9 per tensor), kept as the reference the
  // multi-tensor form is checked and benchmarked against.
  bool fused = true;
};

struct ParamEntry {
  std::string name;
  torch::Tensor param;
  int module = -1;     // -1: always trained
  bool decay = true;   // apply weight decay
};

// One entry per named parameter of `model`, with its module index from `partition` (-1 when the
// tensor belongs to no module) and weight decay on matrices (dim >= 2) only.
std::vector<ParamEntry> BuildParamEntries(torch::nn::Module& model,
                                          const spectral::ModulePartition& partition);

class MaskedAdamW {
 public:
  MaskedAdamW(std::vector<ParamEntry> params, AdamWOptions opt);

  // active/lr_scale: one per module (may be empty when no parameter has a module).
  absl::Status Step(double lr, const std::vector<uint8_t>& active,
                    const std::vector<double>& lr_scale);

  const std::vector<ParamEntry>& params() const { return params_; }
  const torch::Tensor& exp_avg(size_t i) const { return m_[i]; }
  const torch::Tensor& exp_avg_sq(size_t i) const { return v_[i]; }
  int64_t step_count(size_t i) const { return steps_[i]; }

  // Checkpoint tensors "opt.m.<name>", "opt.v.<name>" (CPU copies) and "opt.step.<name>" (0-dim
  // int64). Load: DATA_LOSS naming the parameter when one is missing, INVALID_ARGUMENT when a
  // shape differs.
  void Save(std::map<std::string, torch::Tensor>* tensors) const;
  absl::Status Load(const std::map<std::string, torch::Tensor>& tensors);

 private:
  std::vector<ParamEntry> params_;
  AdamWOptions opt_;
  std::vector<torch::Tensor> m_, v_;
  std::vector<int64_t> steps_;
};

}  // namespace mat::trainer
