// Estimators of each module's principal mNTK eigenvalue λ_max (DESIGN §4).
//
// All estimators here compute the *loss kernel* of a module on a probe batch of n samples:
//   K_ij = <∇_{θ^m} ℓ_i, ∇_{θ^m} ℓ_j>,  K: [n, n] float64,
// and report its largest eigenvalue, its trace and its effective rank
//   erank(K) = exp(H(p)),  p_k = max(μ_k, 0) / Σ max(μ, 0)   (Roy & Vetterli), μ = eig(K).
//
//   gram   per-sample gradients of every module from one backward pass over the probe batch,
//          from the recorded input activations a and output gradients g of each linear site:
//          ∇_W ℓ_i = Σ_t g_{i,t} a_{i,t}^T, sliced per module.
//   exact  the explicit per-sample Jacobian J_m [n, p_m] by n backward passes; tiny models/tests.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "spectral/module_partition.h"
#include "spectral/probe.h"

namespace mat::spectral {

struct ModuleSpectrum {
  double lambda_max = 0;
  double trace = 0;
  double effective_rank = 0;
};

struct EstimateResult {
  std::vector<ModuleSpectrum> modules;  // one per partition module, same order
  double flops = 0;                     // analytic cost of the estimator itself (not the forward)
};

// Eigen-statistics of a symmetric PSD kernel K [n, n] (any float dtype; computed in float64).
ModuleSpectrum KernelStats(const torch::Tensor& kernel);

class Estimator {
 public:
  virtual ~Estimator() = default;
  virtual std::string name() const = 0;
  // Consumes the probe's autograd graph. The partition's tensors must be the leaves used by
  // the probe forward. INVALID_ARGUMENT when the probe is malformed (size mismatch, n < 2).
  virtual absl::StatusOr<EstimateResult> Estimate(const ModulePartition& partition,
                                                  ProbeBatch probe) = 0;
};

// name: "gram" | "exact". INVALID_ARGUMENT names an unknown estimator.
absl::StatusOr<std::unique_ptr<Estimator>> MakeEstimator(const std::string& name);

}  // namespace mat::spectral
