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

// The leaves the modules live in, each once (autograd differentiates whole leaves), and every
// module's slices as rows of them.
struct ModuleLeaves {
  struct Part {
    size_t leaf = 0;  // index into leaves
    int64_t begin = 0, end = 0;
    bool whole = true;
  };
  std::vector<torch::Tensor> leaves;
  std::vector<std::vector<Part>> parts;  // [module]

  // The module's rows of `grads` (one per leaf, as autograd::grad returns them), flattened and
  // concatenated: [p_m]; zeros where a leaf has no gradient.
  torch::Tensor Flatten(size_t module, const std::vector<torch::Tensor>& grads) const;
  // The module's rows of `grads`, one tensor per part (undefined where the leaf has none).
  std::vector<torch::Tensor> Rows(size_t module, const std::vector<torch::Tensor>& grads) const;
};

// INVALID_ARGUMENT naming the module when one of its leaves does not require grad.
absl::StatusOr<ModuleLeaves> CollectParams(const ModulePartition& partition);

}  // namespace mat::spectral
