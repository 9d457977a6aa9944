// A float64 two-layer MLP whose hidden units form 3 modules of 2 units each (rows of W1 + bias,
// columns of W2), for the estimator tests: x [n, 5] -> y [n, 3].
#pragma once

#include <string>
#include <vector>

#include <torch/torch.h>

#include "spectral/module_partition.h"
#include "spectral/probe.h"

namespace mat::spectral::testing {

inline torch::Tensor Leaf(std::vector<int64_t> shape) {
  return torch::randn(shape, torch::kFloat64).requires_grad_(true);
}

struct ToyMlp {
  std::vector<torch::Tensor> w1, b1, w2;
  torch::Tensor b2;
  ModulePartition partition;

  ToyMlp() {
    for (int g = 0; g < 3; ++g) {
      w1.push_back(Leaf({2, 5}));
      b1.push_back(Leaf({2}));
      w2.push_back(Leaf({3, 2}));
      partition.modules.push_back({"ffn", 0, g, "g" + std::to_string(g), {w1[g], b1[g], w2[g]}});
    }
    b2 = Leaf({3});
  }

  // The forward x [n, 5] -> y [n, 3]; with `record`, the two linear sites the per-sample-gradient
  // estimators need (gram, output) into `rec`.
  torch::Tensor Forward(const torch::Tensor& x, SiteRecorder* rec) {
    torch::Tensor pre = torch::nn::functional::linear(x, torch::cat(w1, 0), torch::cat(b1, 0));
    torch::Tensor h = torch::tanh(pre);
    torch::Tensor lin = torch::nn::functional::linear(h, torch::cat(w2, 1));
    if (rec != nullptr) {
      LinearSite s1{x, pre, {}}, s2{h, lin, {}};
      for (int g = 0; g < 3; ++g) {
        s1.slices.push_back({g, SliceAxis::kRows, 2 * g, 2 * g + 2, true});
        s2.slices.push_back({g, SliceAxis::kCols, 2 * g, 2 * g + 2, false});
      }
      rec->Record(s1);
      rec->Record(s2);
    }
    return lin + b2;
  }

  // Per-sample squared loss against `target` [n, 3]; with `record`, the sites.
  ProbeBatch LossProbe(const torch::Tensor& x, const torch::Tensor& target, bool record) {
    SiteRecorder rec;
    torch::Tensor y = Forward(x, record ? &rec : nullptr);
    return {0.5 * (y - target).pow(2).sum(1), rec.Take(), {}};
  }

  // Outputs y [n, 3] (q = 3, d = 3n) and losses ½|y|², with the sites when `record` (the output
  // estimator needs them; exact-output ignores them).
  ProbeBatch OutputSiteProbe(const torch::Tensor& x, bool record) {
    SiteRecorder rec;
    ProbeBatch b;
    b.outputs = Forward(x, record ? &rec : nullptr);
    b.losses = 0.5 * b.outputs.pow(2).sum(1);
    b.sites = rec.Take();
    return b;
  }

  // Outputs y [n, 3] (k = 3, d = 3n) and losses ½|y|², no sites.
  ProbeBatch OutputProbe(const torch::Tensor& x) {
    torch::Tensor h = torch::tanh(torch::nn::functional::linear(x, torch::cat(w1, 0), torch::cat(b1, 0)));
    torch::Tensor y = torch::nn::functional::linear(h, torch::cat(w2, 1)) + b2;
    ProbeBatch b;
    b.losses = 0.5 * y.pow(2).sum(1);
    b.outputs = y;
    return b;
  }
};

}  // namespace mat::spectral::testing
