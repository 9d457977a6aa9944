// The default estimator: per-sample gradients from captured activations, one backward pass.
//
// For each recorded site y = a W^T + b with a: [n, T, in], y: [n, T, out], the backward of
// Σ_i ℓ_i gives g = ∂/∂y: [n, T, out], and per sample
//   ∇_W ℓ_i = g_i^T a_i: [out, in],   ∇_b ℓ_i = Σ_t g_{i,t}: [out].
// For each per-channel affine site y = x ⊙ scale + shift (ScaleShiftSite; x, y: [n, T, C]),
//   ∇_scale ℓ_i = Σ_t g_{i,t} ⊙ x_{i,t}: [C],   ∇_shift ℓ_i = Σ_t g_{i,t}: [C].
// Each module's kernel is the sum over its slices (of both kinds) of P P^T with
// P: [n, slice numel].
// Cost: Σ_linear sites 2·n·T·in·out + Σ_scale-shift sites 3·n·T·C (per-sample grads)
//       + Σ_modules 2·n²·p_m (kernels).
// INVALID_ARGUMENT (beside estimator.h's cases) for a site whose n differs from the losses', a
// slice naming a module outside the partition, or a scale-shift site whose input and output
// shapes differ or whose channel slice is empty or out of range.
#pragma once

#include "spectral/estimator.h"

namespace mat::spectral {

class GramEstimator final : public Estimator {
 public:
  std::string name() const override { return "gram"; }
  absl::StatusOr<EstimateResult> Estimate(const ModulePartition& partition,
                                          ProbeBatch probe) override;
};

// "output": the paper's mNTK Θ_m = J_m J_m^T on the probe's outputs [n, q] (for the masked LM,
// q = P·k: k random projections of the vocabulary at each of P masked positions per sample;
// d = n·q), by the same per-sample-gradient construction: one VJP per output column c (q
// backward passes over the one probe forward) gives g^(c) at every site, and row (c, i) of a
// module's Jacobian is g^(c)_i^T a_i sliced per module, for all modules at once. The kernel is
// exact (no sketch beyond the outputs' own projection): it equals exact-output's on the same
// outputs, which needs d backward passes instead of q.
// Cost: q backward passes (EstimateResult::backward_passes) + Σ_linear sites 2·d·T·in·out
//       + Σ_scale-shift sites 3·d·T·C + Σ_modules 2·d²·p_m; memory q × the sites' outputs.
// INVALID_ARGUMENT (beside the gram estimator's) as exact_estimator.h's ValidateOutputs.
class OutputGramEstimator final : public Estimator {
 public:
  OutputGramEstimator(int projections, int positions)
      : projections_(projections), positions_(positions) {}
  std::string name() const override { return "output"; }
  bool NeedsOutputs() const override { return true; }
  int OutputProjections() const override { return projections_; }
  int OutputPositions() const override { return positions_; }
  absl::StatusOr<EstimateResult> Estimate(const ModulePartition& partition,
                                          ProbeBatch probe) override;

 private:
  int projections_;
  int positions_;
};

}  // namespace mat::spectral
