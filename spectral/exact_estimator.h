// Reference estimators: explicit Jacobians by one backward pass per row, then K = J J^T.
// O(rows) backward passes: for tiny models, tests and the spectral-compare benchmark.
#pragma once

#include "spectral/estimator.h"

namespace mat::spectral {

// Loss kernel: each module's per-sample Jacobian J_m [n, p_m] (rows ∇_{θ^m} ℓ_i), n backward
// passes. flops counts the kernel products 2·n²·p_m only, not the backward passes.
class ExactEstimator final : public Estimator {
 public:
  std::string name() const override { return "exact"; }
  absl::StatusOr<EstimateResult> Estimate(const ModulePartition& partition,
                                          ProbeBatch probe) override;
};

// Output kernel Θ_m = J_m J_m^T [d, d], J_m = ∂ outputs / ∂ θ_m [d, p_m] with outputs
// [n, k] flattened row-major (d = n·k): d backward passes through `outputs`, each giving row r
// for every module at once. flops counts the kernel products 2·d²·p_m only.
// INVALID_ARGUMENT when outputs is missing, not 2-D, n < 2, or n differs from the losses' n.
class ExactOutputEstimator final : public Estimator {
 public:
  explicit ExactOutputEstimator(int projections = 1, int positions = 1)
      : projections_(projections), positions_(positions) {}
  std::string name() const override { return "exact-output"; }
  bool NeedsOutputs() const override { return true; }
  int OutputProjections() const override { return projections_; }
  int OutputPositions() const override { return positions_; }
  absl::StatusOr<EstimateResult> Estimate(const ModulePartition& partition,
                                          ProbeBatch probe) override;

 private:
  int projections_;
  int positions_;
};

// Shared by the output-kernel estimators: OK when probe.outputs is [n, k] with n >= 2 and, when
// losses are present, n == losses.size(0).
absl::Status ValidateOutputs(const ProbeBatch& probe);

// Every module's parameters, concatenated, and each module's range [first, last) in them.
// INVALID_ARGUMENT when a parameter does not require grad.
absl::Status CollectParams(const ModulePartition& partition, std::vector<torch::Tensor>* params,
                           std::vector<std::pair<size_t, size_t>>* ranges);

}  // namespace mat::spectral
