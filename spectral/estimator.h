// Estimators of each module's principal mNTK eigenvalue λ_max (DESIGN §4).
//
// Two kernels of a module m on a probe batch of n samples:
//   loss kernel    K_ij = <∇_{θ^m} ℓ_i, ∇_{θ^m} ℓ_j>,  K: [n, n] float64 (per-sample losses);
//   output kernel  Θ_m = J_m J_m^T: [d, d] float64, J_m = ∂ outputs / ∂ θ_m: [d, p_m], where
//                  outputs is ProbeBatch::outputs [n, q] flattened, d = n * q (the masked LM:
//                  q = P·k, k projections of the logits at each of P masked positions).
// Every estimator reports its kernel's largest eigenvalue, its trace and its effective rank
//   erank(K) = exp(H(p)),  p_k = max(μ_k, 0) / Σ max(μ, 0)   (Roy & Vetterli), μ = eig(K).
//
//   gram          loss kernel; per-sample gradients of every module from one backward pass over
//                 the probe batch, from the recorded input activations a and output gradients g
//                 of each linear site: ∇_W ℓ_i = Σ_t g_{i,t} a_{i,t}^T, sliced per module.
//   exact         loss kernel; the explicit per-sample Jacobian J_m [n, p_m] by n backward
//                 passes; tiny models/tests.
//   output        output kernel (the paper's mNTK); per-sample gradients of every module from
//                 q backward passes over one probe forward (gram_estimator.h).
//   lanczos       output kernel; matrix-free Lanczos per module (lanczos_estimator.h).
//   exact-output  output kernel; explicit J_m [d, p_m] by d backward passes (exact_estimator.h).
#pragma once

#include <cstdint>
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
  // Backward passes the estimator ran through the probe's graph (its owner counts each as one
  // activation-gradient pass of the probe batch).
  int64_t backward_passes = 1;
};

// Eigen-statistics of a symmetric PSD kernel K [n, n] (any float dtype; computed in float64).
ModuleSpectrum KernelStats(const torch::Tensor& kernel);
// The same for many kernels of one size n (each [n, n]; undefined entries give a zero
// spectrum), with one host copy and one batched eigendecomposition.
std::vector<ModuleSpectrum> KernelStatsBatch(const std::vector<torch::Tensor>& kernels);

struct EstimatorOptions {
  int lanczos_iterations = 8;  // lanczos: Krylov steps K (>= 1; capped at d)
  int projections = 1;         // output kernels: k, random projections of the outputs (>= 1)
  int positions = 1;           // output kernels: P, masked positions per sample (>= 1)
  uint64_t seed = 0x6c616e637a6f73ULL;  // lanczos: start vectors (module m uses seed + m)
  // Output kernels: every logit at each position, unprojected (k = V: the exact mNTK there;
  // `projections` is ignored). For small vocabularies, tests and benchmarks.
  bool every_logit = false;
};

class Estimator {
 public:
  virtual ~Estimator() = default;
  virtual std::string name() const = 0;
  // Whether Estimate needs ProbeBatch::outputs, and with how many projections k per position
  // (0: every logit, unprojected).
  // The probe forward builds outputs only when NeedsOutputs().
  virtual bool NeedsOutputs() const { return false; }
  virtual int OutputProjections() const { return 0; }
  // P, the masked positions per sample whose projected logits are outputs (output kernels).
  virtual int OutputPositions() const { return 1; }
  // Consumes the probe's autograd graph. The partition's tensors must be the leaves used by
  // the probe forward. INVALID_ARGUMENT when the probe is malformed (size mismatch, n < 2,
  // outputs missing or not [n, k] for an output-kernel estimator).
  virtual absl::StatusOr<EstimateResult> Estimate(const ModulePartition& partition,
                                                  ProbeBatch probe) = 0;
};

// name: "gram" | "output" | "exact" | "lanczos" | "exact-output". INVALID_ARGUMENT names an unknown
// estimator or an option out of range.
absl::StatusOr<std::unique_ptr<Estimator>> MakeEstimator(const std::string& name,
                                                         const EstimatorOptions& options = {});

}  // namespace mat::spectral
