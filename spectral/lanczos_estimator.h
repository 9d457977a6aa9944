// Matrix-free Lanczos on each module's output kernel (DESIGN §4).
//
// For module m, Θ_m = J_m J_m^T: [d, d], J_m = ∂ outputs / ∂ θ_m: [d, p_m], outputs = the
// probe's [n, k] random projection of the logits flattened (d = n·k). Θ_m is never formed:
//   Θ_m w = J_m (J_m^T w),
//   J_m^T w  one backward pass: autograd::grad(outputs, θ_m, w), retaining the graph;
//   J_m u    the double-backward trick (LibTorch has no forward-mode jvp): once per probe,
//            g = J^T w0 for every parameter with w0 = zeros_like(outputs) requiring grad and
//            create_graph; g is linear in w0, so J_m u = autograd::grad(g_m, w0, u).
// Lanczos runs K = min(lanczos_iterations, d) steps from a random unit start vector (seeded:
// options.seed + m) with full reorthogonalization, in float64 on the CPU; it stops early at
// breakdown (β ≤ 1e-10 · ‖T‖: the Krylov space is invariant).
//   λ_max           the largest Ritz value (eigenvalue of the tridiagonal T); a lower bound on
//                   the true λ_max, exact to round-off once the Krylov space is exhausted.
//   trace           exhausted (K = d or breakdown): trace(T) = Σ α, exact (barring repeated
//                   nonzero eigenvalues, which a single Krylov sequence sees once); otherwise
//                   d · α_1 = d · q_1^T Θ q_1, a one-sample Hutchinson estimate (q_1 uniform
//                   on the unit sphere, so E = trace(Θ)).
//   effective_rank  of the Ritz values: exact once exhausted, else a coarse approximation.
// Cost per module: K matvecs, each one backward pass from outputs down to θ_m plus one pass
// through the backward graph above θ_m; plus one create_graph backward per probe for all
// modules: EstimateResult::backward_passes = 1 + 2 · Σ_m K_m, each charged by its owner as one
// activation-gradient pass of the probe batch (the create_graph pass and the double-backward
// ones cost more than a plain pass, a matvec's first pass stops at θ_m and costs less, and the
// products at θ_m below are also part of the passes: the total is an estimate, not a bound). `flops` is a rough count of what the passes must at least do at module m itself:
// per matvec 4 · 2 · p_m · N (N = tokens of the site holding θ_m, or n without sites: two
// passes, each forming a weight-sized product and an activation-sized one), not the layers
// above. d small (n·k ~ 16) makes the d-pass exact-output cheaper than K·M pass pairs; Lanczos
// pays off when d is large.
#pragma once

#include "spectral/estimator.h"

namespace mat::spectral {

class LanczosEstimator final : public Estimator {
 public:
  explicit LanczosEstimator(const EstimatorOptions& options) : options_(options) {}
  std::string name() const override { return "lanczos"; }
  bool NeedsOutputs() const override { return true; }
  int OutputProjections() const override { return options_.projections; }
  int OutputPositions() const override { return options_.positions; }
  // INVALID_ARGUMENT as ExactOutputEstimator; INTERNAL when the double backward is not
  // differentiable through the model's ops.
  absl::StatusOr<EstimateResult> Estimate(const ModulePartition& partition,
                                          ProbeBatch probe) override;

 private:
  EstimatorOptions options_;
};

}  // namespace mat::spectral
