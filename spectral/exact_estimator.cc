#include "spectral/exact_estimator.h"

#include <map>

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

absl::StatusOr<ModuleLeaves> CollectParams(const ModulePartition& partition) {
  ModuleLeaves out;
  std::map<const void*, size_t> index;
  for (const auto& m : partition.modules) {
    std::vector<ModuleLeaves::Part> parts;
    for (const ParamSlice& p : m.params) {
      if (!p.param.requires_grad()) {
        return absl::InvalidArgumentError("module " + m.name +
                                          " has a parameter that does not require grad");
      }
      auto [it, fresh] = index.emplace(p.param.unsafeGetTensorImpl(), out.leaves.size());
      if (fresh) out.leaves.push_back(p.param);
      parts.push_back({it->second, p.begin, p.end, p.whole()});
    }
    out.parts.push_back(std::move(parts));
  }
  return out;
}

std::vector<torch::Tensor> ModuleLeaves::Rows(size_t module,
                                              const std::vector<torch::Tensor>& grads) const {
  std::vector<torch::Tensor> rows;
  for (const Part& p : parts[module]) {
    const torch::Tensor& g = grads[p.leaf];
    rows.push_back(!g.defined() || p.whole ? g : g.narrow(0, p.begin, p.end - p.begin));
  }
  return rows;
}

torch::Tensor ModuleLeaves::Flatten(size_t module, const std::vector<torch::Tensor>& grads) const {
  std::vector<torch::Tensor> flat;
  const std::vector<torch::Tensor> rows = Rows(module, grads);
  for (size_t k = 0; k < rows.size(); ++k) {
    const Part& p = parts[module][k];
    if (rows[k].defined()) {
      flat.push_back(rows[k].reshape({-1}));
    } else {
      const torch::Tensor& leaf = leaves[p.leaf];
      const torch::Tensor v = p.whole ? leaf : leaf.narrow(0, p.begin, p.end - p.begin);
      flat.push_back(torch::zeros({v.numel()}, leaf.options().requires_grad(false)));
    }
  }
  return flat.empty() ? torch::zeros({0}, torch::kFloat64) : torch::cat(flat);
}

namespace {

// Row r of every module's Jacobian from one VJP over the leaves.
void AppendRows(const std::vector<torch::Tensor>& g, const ModuleLeaves& leaves,
                std::vector<std::vector<torch::Tensor>>* rows) {
  for (size_t m = 0; m < leaves.parts.size(); ++m) (*rows)[m].push_back(leaves.Flatten(m, g));
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
  absl::StatusOr<ModuleLeaves> leaves = CollectParams(partition);
  if (!leaves.ok()) return leaves.status();
  // rows[m][i]: flattened ∇_{θ^m} ℓ_i
  std::vector<std::vector<torch::Tensor>> rows(partition.modules.size());
  for (int64_t i = 0; i < n; ++i) {
    std::vector<torch::Tensor> g =
        torch::autograd::grad({probe.losses[i]}, leaves->leaves, {}, /*retain_graph=*/i + 1 < n,
                              /*create_graph=*/false, /*allow_unused=*/true);
    AppendRows(g, *leaves, &rows);
  }
  EstimateResult result = KernelsOf(rows);
  result.backward_passes = n;
  return result;
}

absl::StatusOr<EstimateResult> ExactOutputEstimator::Estimate(const ModulePartition& partition,
                                                              ProbeBatch probe) {
  if (absl::Status s = ValidateOutputs(probe); !s.ok()) return s;
  absl::StatusOr<ModuleLeaves> leaves = CollectParams(partition);
  if (!leaves.ok()) return leaves.status();
  const torch::Tensor& out = probe.outputs;
  const int64_t d = out.numel();
  std::vector<std::vector<torch::Tensor>> rows(partition.modules.size());
  for (int64_t r = 0; r < d; ++r) {
    torch::Tensor e = torch::zeros_like(out);
    e.view({-1})[r] = 1;
    std::vector<torch::Tensor> g =
        torch::autograd::grad({out}, leaves->leaves, {e}, /*retain_graph=*/r + 1 < d,
                              /*create_graph=*/false, /*allow_unused=*/true);
    AppendRows(g, *leaves, &rows);
  }
  EstimateResult result = KernelsOf(rows);
  result.backward_passes = d;
  return result;
}

}  // namespace mat::spectral
