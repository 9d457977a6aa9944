// Mask-aware AdamW (decoupled weight decay, Loshchilov & Hutter) with per-segment step counts.
//
// Every parameter tensor belongs to one module or to none (always trained), or its leading axis
// is split into row segments that do (modules as views: a layer's QKV weight holds its heads as
// row blocks). On Step, a segment whose module is masked off is skipped entirely: its values,
// its moments and its step count do not change (no momentum drift, no weight decay, no
// bias-correction advance). A whole tensor whose module is masked off must have no gradient (the
// model does not compute it); Step returns FAILED_PRECONDITION otherwise, so a masking bug
// cannot hide; the same for a split tensor all of whose segments are masked. A split tensor with
// some active segment has a gradient of its full shape whose masked rows the model left zero;
// Step never reads them. After Step every gradient is reset to undefined. The active segments of
// a split tensor are updated as row views (narrow) of the tensor, adjacent ones with the same
// step count as one view, so a layer with every module active is one tensor to the update.
// Speed: tensors are updated in groups of equal scalars with multi-tensor _foreach_ ops (on a
// GPU a few kernel launches per group instead of ~9 per tensor; with LibTorch 2 on CUDA, its
// fused AdamW kernel, one pass per chunk of tensors). Elementwise, so results do not depend on
// the thread count.
// Not thread-safe.
#pragma once

#include <functional>
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

// Rows [begin, end) of a parameter's leading axis and their module (-1: always trained).
struct ParamSegment {
  int64_t begin = 0;
  int64_t end = 0;
  int module = -1;
};

struct ParamEntry {
  std::string name;
  torch::Tensor param;
  int module = -1;     // the whole tensor's module; -1: always trained (or split, see `rows`)
  bool decay = true;   // apply weight decay
  // Non-empty: the tensor's leading axis is split among modules; ascending segments that cover
  // [0, size(0)) exactly (`module` is then -1).
  std::vector<ParamSegment> rows{};

  // `rows`, or the whole tensor as one segment of `module`.
  std::vector<ParamSegment> Segments() const;
};

// One entry per named parameter of `model`, with its module index from `partition` (-1 when the
// tensor belongs to no module), or its row segments when modules own row ranges of it, and
// weight decay on matrices (dim >= 2; for a stacked leaf, spectral::ParamSlice::Stacked, the
// dim of one module's tensor) only. Throws c10::Error when two modules' rows overlap.
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
  // Updates of entry i's segment s (Segments() order; 0 for an unsplit tensor).
  int64_t step_count(size_t i, size_t s = 0) const { return steps_[i][s]; }

  // Checkpoint tensors "opt.m.<name>", "opt.v.<name>" (CPU copies) and "opt.step.<name>" (int64:
  // 0-dim for an unsplit tensor, one per segment for a split one). Load: DATA_LOSS naming the
  // parameter when one is missing, INVALID_ARGUMENT when a shape or the segment count differs.
  void Save(std::map<std::string, torch::Tensor>* tensors) const;
  absl::Status Load(const std::map<std::string, torch::Tensor>& tensors);

 private:
  std::vector<ParamEntry> params_;
  AdamWOptions opt_;
  std::vector<std::vector<ParamSegment>> segments_;  // [entry]
  std::vector<torch::Tensor> m_, v_;
  std::vector<std::vector<int64_t>> steps_;          // [entry][segment]
};

// Shared by the masked optimizers: OK when every module a segment names has a mask bit (and an
// lr scale, when lr_scale is non-empty) and no masked-off whole tensor has a gradient.
absl::Status ValidateMask(const std::vector<ParamEntry>& params,
                          const std::vector<std::vector<ParamSegment>>& segments,
                          const std::vector<uint8_t>& active, const std::vector<double>& lr_scale);

// One update of a run of adjacent segments of entry `entry` that share their scalars: rows
// [begin, end).
struct SegmentRun {
  size_t entry = 0;
  int64_t begin = 0, end = 0;
  std::vector<size_t> segments;  // indices into the entry's segments
  double lr_scale = 1.0;
};
// The active segments of every entry with a gradient, merged into runs of adjacent segments
// with equal `key(entry, segment)` and lr scale. REQUIRES: ValidateMask(...).ok().
std::vector<SegmentRun> ActiveRuns(const std::vector<ParamEntry>& params,
                                   const std::vector<std::vector<ParamSegment>>& segments,
                                   const std::vector<uint8_t>& active,
                                   const std::vector<double>& lr_scale,
                                   const std::function<int64_t(size_t, size_t)>& key);
// Rows [run.begin, run.end) of t (t itself when they are all of it).
torch::Tensor RunRows(const torch::Tensor& t, const SegmentRun& run);

}  // namespace mat::trainer
