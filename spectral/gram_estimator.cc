#include "spectral/gram_estimator.h"

namespace mat::spectral {

absl::StatusOr<EstimateResult> GramEstimator::Estimate(const ModulePartition& partition,
                                                       ProbeBatch probe) {
  if (!probe.losses.defined() || probe.losses.dim() != 1 || probe.losses.size(0) < 2) {
    return absl::InvalidArgumentError("probe losses must be a vector of n >= 2 samples");
  }
  const int64_t n = probe.losses.size(0);
  const int num_modules = partition.size();
  std::vector<torch::Tensor> outputs;
  outputs.reserve(probe.sites.size());
  for (const auto& site : probe.sites) {
    if (site.input.size(0) != n || site.output.size(0) != n) {
      return absl::InvalidArgumentError("probe site batch size differs from the losses' n");
    }
    for (const auto& s : site.slices) {
      if (s.module < 0 || s.module >= num_modules) {
        return absl::InvalidArgumentError("probe site names module " + std::to_string(s.module) +
                                          " outside the partition");
      }
    }
    outputs.push_back(site.output);
  }
  EstimateResult result;
  result.modules.resize(num_modules);
  if (outputs.empty()) return result;

  std::vector<torch::Tensor> grads = torch::autograd::grad(
      {probe.losses.sum()}, outputs, /*grad_outputs=*/{}, /*retain_graph=*/false,
      /*create_graph=*/false, /*allow_unused=*/true);

  torch::NoGradGuard guard;
  std::vector<torch::Tensor> kernels(num_modules);
  double flops = 0;
  for (size_t si = 0; si < probe.sites.size(); ++si) {
    const LinearSite& site = probe.sites[si];
    const int64_t in = site.input.size(-1);
    const int64_t out = site.output.size(-1);
    torch::Tensor a = site.input.detach().reshape({n, -1, in});  // [n, T, in]
    torch::Tensor g = grads[si].defined() ? grads[si].reshape({n, -1, out})
                                          : torch::zeros({n, a.size(1), out}, a.options());
    const int64_t t = a.size(1);
    torch::Tensor per_sample_w = torch::bmm(g.transpose(1, 2), a);  // [n, out, in]
    flops += 2.0 * n * t * in * out;
    torch::Tensor per_sample_b;  // [n, out], computed on demand
    for (const SiteSlice& s : site.slices) {
      torch::Tensor p;
      if (s.axis == SliceAxis::kRows) {
        p = per_sample_w.slice(1, s.begin, s.end).reshape({n, -1});
        if (s.has_bias) {
          if (!per_sample_b.defined()) per_sample_b = g.sum(1);
          p = torch::cat({p, per_sample_b.slice(1, s.begin, s.end)}, 1);
        }
      } else {
        p = per_sample_w.slice(2, s.begin, s.end).reshape({n, -1});
      }
      torch::Tensor k = torch::mm(p, p.t());
      flops += 2.0 * n * n * p.size(1);
      kernels[s.module] = kernels[s.module].defined() ? kernels[s.module] + k : k;
    }
  }
  result.modules = KernelStatsBatch(kernels);
  result.flops = flops;
  return result;
}

}  // namespace mat::spectral
