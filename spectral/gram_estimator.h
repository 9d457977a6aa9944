// The default estimator: per-sample gradients from captured activations, one backward pass.
//
// For each recorded site y = a W^T + b with a: [n, T, in], y: [n, T, out], the backward of
// Σ_i ℓ_i gives g = ∂/∂y: [n, T, out], and per sample
//   ∇_W ℓ_i = g_i^T a_i: [out, in],   ∇_b ℓ_i = Σ_t g_{i,t}: [out].
// Each module's kernel is the sum over its slices of P P^T with P: [n, slice numel].
// Cost: Σ_sites 2·n·T·in·out (per-sample grads) + Σ_modules 2·n²·p_m (kernels).
#pragma once

#include "spectral/estimator.h"

namespace mat::spectral {

class GramEstimator final : public Estimator {
 public:
  std::string name() const override { return "gram"; }
  absl::StatusOr<EstimateResult> Estimate(const ModulePartition& partition,
                                          ProbeBatch probe) override;
};

}  // namespace mat::spectral
