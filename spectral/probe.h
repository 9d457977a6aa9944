// What a model hands to a λ_max estimator after a probe forward pass.
//
// The probe forward runs the model on n samples with every module's weights attached to the
// autograd graph and records, for every linear map that contains module slices, its input
// activations and its output (a LinearSite). Estimators then need one backward pass.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/torch.h>

namespace mat::spectral {

// Which part of a linear map's weight W [out, in] belongs to a module.
enum class SliceAxis {
  kRows,  // output units [begin, end): W[begin:end, :] (and bias[begin:end] when has_bias)
  kCols,  // input units [begin, end): W[:, begin:end] (a bias, if any, is not the module's)
};

struct SiteSlice {
  int module = 0;  // index into ModulePartition::modules
  SliceAxis axis = SliceAxis::kRows;
  int64_t begin = 0;
  int64_t end = 0;
  bool has_bias = false;  // kRows only: the bias entries [begin, end) are the module's too
};

// y = a W^T (+ b), recorded during the probe forward.
struct LinearSite {
  torch::Tensor input;   // a: [n, T, in] or [n, in]; same dtype/device as the model
  torch::Tensor output;  // y: [n, T, out] or [n, out]; part of the autograd graph of `losses`
  std::vector<SiteSlice> slices;
};

// One probe: per-sample losses of n samples and the sites recorded while computing them.
struct ProbeBatch {
  torch::Tensor losses;  // [n], requires grad; ℓ_i depends on sample i only
  std::vector<LinearSite> sites;
  // [n, k], part of the graph; only when the estimator NeedsOutputs(), else undefined. k random
  // projections of the model's outputs per sample: for the masked LM, the logits at sample i's
  // masked positions times a fixed Gaussian R [V, k] / sqrt(V), summed over those positions.
  // outputs[i] depends on sample i only. The output kernel's entries are indexed by the
  // flattened (i, j), d = n * k.
  torch::Tensor outputs;
};

// Collects sites during a probe forward. Models call Record when a recorder is installed.
// Not thread-safe; one recorder per forward.
class SiteRecorder {
 public:
  void Record(LinearSite site) { sites_.push_back(std::move(site)); }
  std::vector<LinearSite> Take() { return std::move(sites_); }

 private:
  std::vector<LinearSite> sites_;
};

}  // namespace mat::spectral
