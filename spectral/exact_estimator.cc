#include "spectral/exact_estimator.h"

namespace mat::spectral {

absl::Status ValidateOutputs(const ProbeBatch& probe) {
  if (!probe.outputs.defined()) {
    return absl::InvalidArgumentError("probe outputs are missing (the estimator needs outputs)");
  }
  if (probe.outputs.dim() != 2 || probe.outputs.size(0) < 2 || probe.outputs.size(1) < 1) {
    return absl::InvalidArgumentError("probe outputs must be [n, k] with n >= 2, k >= 1");
  }
  if (probe.losses.defined() &&
      (probe.losses.dim() != 1 || probe.losses.size(0) != probe.outputs.size(0))) {
    return absl::InvalidArgumentError("probe outputs' n (" + std::to_string(probe.outputs.size(0)) +
                                      ") differs from the losses' n");
  }
  if (!probe.outputs.requires_grad()) {
    return absl::InvalidArgumentError("probe outputs are not part of an autograd graph");
  }
  return absl::OkStatus();
}

absl::Status CollectParams(const ModulePartition& partition, std::vector<torch::Tensor>* params,
                           std::vector<std::pair<size_t, size_t>>* ranges) {
  for (const auto& m : partition.modules) {
    size_t first = params->size();
    for (const auto& p : m.params) {
      if (!p.requires_grad()) {
        return absl::InvalidArgumentError("module " + m.name +
                                          " has a parameter that does not require grad");
      }
      params->push_back(p);
    }
    ranges->emplace_back(first, params->size());
  }
  return absl::OkStatus();
}

namespace {

// Row r of every module's Jacobian from one VJP: flattened, zeros where unused.
void AppendRows(const std::vector<torch::Tensor>& g, const std::vector<torch::Tensor>& params,
                const std::vector<std::pair<size_t, size_t>>& ranges,
                std::vector<std::vector<torch::Tensor>>* rows) {
  for (size_t m = 0; m < ranges.size(); ++m) {
    std::vector<torch::Tensor> flat;
    for (size_t k = ranges[m].first; k < ranges[m].second; ++k) {
      flat.push_back(g[k].defined() ? g[k].reshape({-1})
                                    : torch::zeros_like(params[k]).reshape({-1}));
    }
    (*rows)[m].push_back(flat.empty() ? torch::zeros({0}, torch::kFloat64) : torch::cat(flat));
  }
}

EstimateResult KernelsOf(const std::vector<std::vector<torch::Tensor>>& rows) {
  EstimateResult result;
  torch::NoGradGuard guard;
  std::vector<torch::Tensor> kernels;
  for (const auto& r : rows) {
    torch::Tensor j = torch::stack(r).to(torch::kFloat64);  // [rows, p_m]
    result.flops += 2.0 * j.size(0) * j.size(0) * j.size(1);
    kernels.push_back(torch::mm(j, j.t()));
  }
  result.modules = KernelStatsBatch(kernels);
  return result;
}

}  // namespace

absl::StatusOr<EstimateResult> ExactEstimator::Estimate(const ModulePartition& partition,
                                                        ProbeBatch probe) {
  if (!probe.losses.defined() || probe.losses.dim() != 1 || probe.losses.size(0) < 2) {
    return absl::InvalidArgumentError("probe losses must be a vector of n >= 2 samples");
  }
  const int64_t n = probe.losses.size(0);
  std::vector<torch::Tensor> params;
  std::vector<std::pair<size_t, size_t>> ranges;  // per module: [first, last) in params
  if (absl::Status s = CollectParams(partition, &params, &ranges); !s.ok()) return s;
  // rows[m][i]: flattened ∇_{θ^m} ℓ_i
  std::vector<std::vector<torch::Tensor>> rows(partition.modules.size());
  for (int64_t i = 0; i < n; ++i) {
    std::vector<torch::Tensor> g =
        torch::autograd::grad({probe.losses[i]}, params, {}, /*retain_graph=*/i + 1 < n,
                              /*create_graph=*/false, /*allow_unused=*/true);
    AppendRows(g, params, ranges, &rows);
  }
  EstimateResult result = KernelsOf(rows);
  result.backward_passes = n;
  return result;
}

absl::StatusOr<EstimateResult> ExactOutputEstimator::Estimate(const ModulePartition& partition,
                                                              ProbeBatch probe) {
  if (absl::Status s = ValidateOutputs(probe); !s.ok()) return s;
  std::vector<torch::Tensor> params;
  std::vector<std::pair<size_t, size_t>> ranges;
  if (absl::Status s = CollectParams(partition, &params, &ranges); !s.ok()) return s;
  const torch::Tensor& out = probe.outputs;
  const int64_t d = out.numel();
  std::vector<std::vector<torch::Tensor>> rows(partition.modules.size());
  for (int64_t r = 0; r < d; ++r) {
    torch::Tensor e = torch::zeros_like(out);
    e.view({-1})[r] = 1;
    std::vector<torch::Tensor> g =
        torch::autograd::grad({out}, params, {e}, /*retain_graph=*/r + 1 < d,
                              /*create_graph=*/false, /*allow_unused=*/true);
    AppendRows(g, params, ranges, &rows);
  }
  EstimateResult result = KernelsOf(rows);
  result.backward_passes = d;
  return result;
}

}  // namespace mat::spectral
