#include "spectral/estimator.h"

#include <cmath>

#include "spectral/exact_estimator.h"
#include "spectral/gram_estimator.h"
#include "spectral/lanczos_estimator.h"

namespace mat::spectral {

ModuleSpectrum KernelStats(const torch::Tensor& kernel) {
  torch::Tensor k = kernel.detach().to(torch::kFloat64).cpu();
  k = 0.5 * (k + k.t());  // symmetrize away round-off
  torch::Tensor eig = at::linalg_eigvalsh(k, "L");  // ascending
  ModuleSpectrum s;
  s.lambda_max = eig[-1].item<double>();
  s.trace = k.diagonal().sum().item<double>();
  torch::Tensor pos = eig.clamp_min(0);
  double total = pos.sum().item<double>();
  if (total > 0) {
    torch::Tensor p = pos / total;
    torch::Tensor nz = p.masked_select(p > 0);
    double h = -(nz * nz.log()).sum().item<double>();
    s.effective_rank = std::exp(h);
  }
  return s;
}

absl::StatusOr<std::unique_ptr<Estimator>> MakeEstimator(const std::string& name,
                                                         const EstimatorOptions& options) {
  if (options.lanczos_iterations < 1) {
    return absl::InvalidArgumentError("policy.lanczos_iterations must be >= 1, got " +
                                      std::to_string(options.lanczos_iterations));
  }
  if (options.projections < 1) {
    return absl::InvalidArgumentError("policy.probe_projections must be >= 1, got " +
                                      std::to_string(options.projections));
  }
  if (name == "gram") return std::unique_ptr<Estimator>(new GramEstimator());
  if (name == "exact") return std::unique_ptr<Estimator>(new ExactEstimator());
  if (name == "lanczos") return std::unique_ptr<Estimator>(new LanczosEstimator(options));
  if (name == "exact-output") {
    return std::unique_ptr<Estimator>(new ExactOutputEstimator(options.projections));
  }
  return absl::InvalidArgumentError("policy.estimator: unknown estimator '" + name +
                                    "' (expected gram, exact, lanczos or exact-output)");
}

}  // namespace mat::spectral
