// Mask-aware SGD with momentum (and optional Nesterov momentum, dampening and coupled L2 weight
// decay), the update of torch::optim::SGD:
//
//   d = g + weight_decay · p                      (only for tensors with decay = true)
//   buf = d                      on a tensor's first update,
//   buf = momentum · buf + (1 − dampening) · d    afterwards          (when momentum != 0)
//   d = d + momentum · buf  (nesterov)  or  d = buf
//   p = p − lr · lr_scale[module] · d
//
// Every parameter tensor belongs to one module or to none (always trained), or is split into row
// segments that do, as for MaskedAdamW. On Step, a tensor or segment whose module is masked off
// is skipped entirely: its values, its momentum buffer rows and its update count do not change
// (no momentum drift, no weight decay). A masked-off whole tensor must have no gradient (the
// model does not compute it); Step returns FAILED_PRECONDITION otherwise, so a masking bug
// cannot hide. A tensor without a gradient is skipped likewise. "First update" is per segment.
// After Step every gradient is reset to undefined. The ops are LibTorch's SGD's, in its order,
// so an unmasked step gives bit-identical results.
// Not thread-safe.
#pragma once

#include <vector>

#include <torch/torch.h>

#include "absl/status/status.h"
#include "trainer/optim/optimizer.h"

namespace mat::trainer {

struct SgdOptions {
  double momentum = 0.9;
  double dampening = 0;
  double weight_decay = 5e-4;  // coupled (L2 added to the gradient), on ParamEntry::decay tensors
  bool nesterov = false;       // REQUIRES: momentum > 0 and dampening == 0 when set
};

class MaskedSgd {
 public:
  // params: typically BuildParamEntries(model, partition) (decay on tensors with dim >= 2).
  MaskedSgd(std::vector<ParamEntry> params, SgdOptions opt);

  // active/lr_scale: one per module (either may be empty when no parameter has a module;
  // lr_scale empty = 1 everywhere). INVALID_ARGUMENT when a parameter's module has no mask bit.
  absl::Status Step(double lr, const std::vector<uint8_t>& active,
                    const std::vector<double>& lr_scale);

  const std::vector<ParamEntry>& params() const { return params_; }
  // Undefined until the tensor's first update.
  const torch::Tensor& momentum_buffer(size_t i) const { return buf_[i]; }
  // Updates of entry i's segment s (ParamEntry::Segments() order; 0 for an unsplit tensor).
  int64_t step_count(size_t i, size_t s = 0) const { return steps_[i][s]; }
  const SgdOptions& options() const { return opt_; }

  // Checkpoint tensors "sgd.buf.<name>" and "sgd.step.<name>" (int64, one per segment; 0-dim
  // for an unsplit tensor); Load errors as
  // MaskedAdamW::Load's.
  void Save(std::map<std::string, torch::Tensor>* tensors) const;
  absl::Status Load(const std::map<std::string, torch::Tensor>& tensors);

 private:
  std::vector<ParamEntry> params_;
  SgdOptions opt_;
  std::vector<std::vector<ParamSegment>> segments_;  // [entry]
  std::vector<torch::Tensor> buf_;  // same shape as the parameter; undefined before its first update
  std::vector<std::vector<int64_t>> steps_;          // [entry][segment]
};

}  // namespace mat::trainer
