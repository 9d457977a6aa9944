// Reference estimator: builds each module's per-sample Jacobian J_m [n, p_m] explicitly, one
// backward pass per sample, then K = J_m J_m^T. O(n) backward passes: for tiny models and tests.
#pragma once

#include "spectral/estimator.h"

namespace mat::spectral {

class ExactEstimator final : public Estimator {
 public:
  std::string name() const override { return "exact"; }
  absl::StatusOr<EstimateResult> Estimate(const ModulePartition& partition,
                                          ProbeBatch probe) override;
};

}  // namespace mat::spectral
