#include "spectral/estimator.h"

#include <algorithm>
#include <cmath>

#include "spectral/exact_estimator.h"
#include "spectral/gram_estimator.h"
#include "spectral/lanczos_estimator.h"

namespace mat::spectral {

std::vector<ModuleSpectrum> KernelStatsBatch(const std::vector<torch::Tensor>& kernels) {
  std::vector<ModuleSpectrum> out(kernels.size());
  std::vector<torch::Tensor> defined;
  std::vector<size_t> where;
  for (size_t i = 0; i < kernels.size(); ++i) {
    if (!kernels[i].defined()) continue;
    defined.push_back(kernels[i].detach());
    where.push_back(i);
  }
  if (defined.empty()) return out;
  // One copy to the host and one batched eigendecomposition (on a GPU, per-module copies and
  // scalar reads were most of the probe's time).
  torch::Tensor k = torch::stack(defined).to(torch::kFloat64).cpu();  // [M, n, n]
  k = 0.5 * (k + k.transpose(1, 2));  // symmetrize away round-off
  torch::Tensor eig = at::linalg_eigvalsh(k, "L").contiguous();  // [M, n] ascending
  torch::Tensor trace = k.diagonal(0, 1, 2).sum(1).contiguous();  // [M]
  const int64_t n = eig.size(1);
  const double* e = eig.data_ptr<double>();
  const double* tr = trace.data_ptr<double>();
  for (size_t j = 0; j < where.size(); ++j) {
    const double* ej = e + j * n;
    ModuleSpectrum& s = out[where[j]];
    s.lambda_max = ej[n - 1];
    s.trace = tr[j];
    double total = 0;
    for (int64_t i = 0; i < n; ++i) total += std::max(ej[i], 0.0);
    if (total > 0) {
      double h = 0;
      for (int64_t i = 0; i < n; ++i) {
        const double p = std::max(ej[i], 0.0) / total;
        if (p > 0) h -= p * std::log(p);
      }
      s.effective_rank = std::exp(h);
    }
  }
  return out;
}

ModuleSpectrum KernelStats(const torch::Tensor& kernel) { return KernelStatsBatch({kernel})[0]; }

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
  const int k = options.every_logit ? 0 : options.projections;  // OutputProjections(): 0 = all
  if (options.positions < 1) {
    return absl::InvalidArgumentError("policy.probe_positions must be >= 1, got " +
                                      std::to_string(options.positions));
  }
  if (name == "gram") return std::unique_ptr<Estimator>(new GramEstimator());
  if (name == "output") {
    return std::unique_ptr<Estimator>(
        new OutputGramEstimator(k, options.positions));
  }
  if (name == "exact") return std::unique_ptr<Estimator>(new ExactEstimator());
  if (name == "lanczos") {
    EstimatorOptions o = options;
    o.projections = k;
    return std::unique_ptr<Estimator>(new LanczosEstimator(o));
  }
  if (name == "exact-output") {
    return std::unique_ptr<Estimator>(
        new ExactOutputEstimator(k, options.positions));
  }
  return absl::InvalidArgumentError("policy.estimator: unknown estimator '" + name +
                                    "' (expected gram, output, exact, lanczos or exact-output)");
}

}  // namespace mat::spectral
