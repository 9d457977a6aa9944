#include "spectral/exact_estimator.h"

namespace mat::spectral {

absl::StatusOr<EstimateResult> ExactEstimator::Estimate(const ModulePartition& partition,
                                                        ProbeBatch probe) {
  if (!probe.losses.defined() || probe.losses.dim() != 1 || probe.losses.size(0) < 2) {
    return absl::InvalidArgumentError("probe losses must be a vector of n >= 2 samples");
  }
  const int64_t n = probe.losses.size(0);
  std::vector<torch::Tensor> params;
  std::vector<std::pair<size_t, size_t>> ranges;  // per module: [first, last) in params
  for (const auto& m : partition.modules) {
    size_t first = params.size();
    for (const auto& p : m.params) {
      if (!p.requires_grad()) {
        return absl::InvalidArgumentError("module " + m.name +
                                          " has a parameter that does not require grad");
      }
      params.push_back(p);
    }
    ranges.emplace_back(first, params.size());
  }
  // rows[m][i]: flattened ∇_{θ^m} ℓ_i
  std::vector<std::vector<torch::Tensor>> rows(partition.modules.size());
  double flops = 0;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<torch::Tensor> g =
        torch::autograd::grad({probe.losses[i]}, params, {}, /*retain_graph=*/i + 1 < n,
                              /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t m = 0; m < ranges.size(); ++m) {
      std::vector<torch::Tensor> flat;
      for (size_t k = ranges[m].first; k < ranges[m].second; ++k) {
        flat.push_back(g[k].defined() ? g[k].reshape({-1}) : torch::zeros_like(params[k]).reshape({-1}));
      }
      rows[m].push_back(torch::cat(flat));
    }
  }
  EstimateResult result;
  torch::NoGradGuard guard;
  for (size_t m = 0; m < ranges.size(); ++m) {
    torch::Tensor j = torch::stack(rows[m]);  // [n, p_m]
    flops += 2.0 * n * n * j.size(1);
    result.modules.push_back(KernelStats(torch::mm(j, j.t())));
  }
  result.flops = flops;
  return result;
}

}  // namespace mat::spectral
