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
  for (const auto& site : probe.scale_shift_sites) {
    if (!site.input.defined() || !site.output.defined() || site.input.dim() < 2 ||
        site.input.dim() > 3 || site.input.sizes() != site.output.sizes()) {
      return absl::InvalidArgumentError(
          "probe scale-shift site: input and output must have one shape, [n, T, C] or [n, C]");
    }
    if (site.input.size(0) != n) {
      return absl::InvalidArgumentError("probe site batch size differs from the losses' n");
    }
    const int64_t channels = site.input.size(-1);
    for (const auto& s : site.slices) {
      if (s.module < 0 || s.module >= num_modules) {
        return absl::InvalidArgumentError("probe site names module " + std::to_string(s.module) +
                                          " outside the partition");
      }
      if (s.begin < 0 || s.end <= s.begin || s.end > channels) {
        return absl::InvalidArgumentError(
            "probe scale-shift slice [" + std::to_string(s.begin) + ", " + std::to_string(s.end) +
            ") is not a non-empty range of the site's " + std::to_string(channels) + " channels");
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
  // Per-channel affine sites: per sample ∇_scale = Σ_t g ⊙ x (2·n·T·C FLOPs), ∇_shift = Σ_t g
  // (n·T·C), each [n, C], sliced per module and appended to the module's kernel.
  const size_t linear_sites = probe.sites.size();
  for (size_t si = 0; si < probe.scale_shift_sites.size(); ++si) {
    const ScaleShiftSite& site = probe.scale_shift_sites[si];
    const int64_t c = site.input.size(-1);
    torch::Tensor x = site.input.detach().reshape({n, -1, c});  // [n, T, C]
    const torch::Tensor& grad = grads[linear_sites + si];
    torch::Tensor g = grad.defined() ? grad.reshape({n, -1, c}) : torch::zeros_like(x);
    const int64_t t = x.size(1);
    torch::Tensor per_sample_scale, per_sample_shift;  // [n, C], computed on demand
    for (const ChannelSlice& s : site.slices) {
      std::vector<torch::Tensor> parts;
      if (s.has_scale) {
        if (!per_sample_scale.defined()) {
          per_sample_scale = (g * x).sum(1);
          flops += 2.0 * n * t * c;
        }
        parts.push_back(per_sample_scale.slice(1, s.begin, s.end));
      }
      if (s.has_shift) {
        if (!per_sample_shift.defined()) {
          per_sample_shift = g.sum(1);
          flops += 1.0 * n * t * c;
        }
        parts.push_back(per_sample_shift.slice(1, s.begin, s.end));
      }
      if (parts.empty()) continue;
      torch::Tensor p = parts.size() == 1 ? parts[0] : torch::cat(parts, 1);  // [n, slice numel]
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
