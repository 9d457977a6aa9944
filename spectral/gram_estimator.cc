#include "spectral/gram_estimator.h"

#include "spectral/exact_estimator.h"

namespace mat::spectral {

namespace {

// OK when every site's batch is n and every slice names a module of the partition (and, for
// scale-shift sites, a non-empty channel range); collects the sites' outputs (linear sites
// first), the tensors the estimators differentiate.
absl::Status ValidateSites(const ProbeBatch& probe, int64_t n, int num_modules,
                           std::vector<torch::Tensor>* outputs) {
  outputs->reserve(probe.sites.size() + probe.scale_shift_sites.size());
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
    outputs->push_back(site.output);
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
    outputs->push_back(site.output);
  }
  return absl::OkStatus();
}

// Each module's kernel from the sites' output gradients. grads[s] (one per site, linear sites
// first; undefined = zero): [reps·n, ...] with row r·n + i the gradient of scalar r of sample i,
// so the kernels are [reps·n, reps·n]. The sites' inputs are [n, ...] and shared by the reps.
std::vector<torch::Tensor> KernelsFromSiteGrads(const ProbeBatch& probe, int num_modules,
                                                const std::vector<torch::Tensor>& grads,
                                                int64_t n, int64_t reps, double* flops) {
  torch::NoGradGuard guard;
  const int64_t rows = reps * n;
  auto repeat = [reps](const torch::Tensor& x) {
    return reps == 1 ? x : x.repeat({reps, 1, 1});  // [n, T, c] -> [reps·n, T, c]
  };
  std::vector<torch::Tensor> kernels(num_modules);
  for (size_t si = 0; si < probe.sites.size(); ++si) {
    const LinearSite& site = probe.sites[si];
    const int64_t in = site.input.size(-1);
    const int64_t out = site.output.size(-1);
    torch::Tensor a = repeat(site.input.detach().reshape({n, -1, in}));  // [rows, T, in]
    torch::Tensor g = grads[si].defined() ? grads[si].reshape({rows, -1, out})
                                          : torch::zeros({rows, a.size(1), out}, a.options());
    const int64_t t = a.size(1);
    torch::Tensor per_sample_w = torch::bmm(g.transpose(1, 2), a);  // [rows, out, in]
    *flops += 2.0 * rows * t * in * out;
    torch::Tensor per_sample_b;  // [rows, out], computed on demand
    for (const SiteSlice& s : site.slices) {
      torch::Tensor p;
      if (s.axis == SliceAxis::kRows) {
        p = per_sample_w.slice(1, s.begin, s.end).reshape({rows, -1});
        if (s.has_bias) {
          if (!per_sample_b.defined()) per_sample_b = g.sum(1);
          p = torch::cat({p, per_sample_b.slice(1, s.begin, s.end)}, 1);
        }
      } else {
        p = per_sample_w.slice(2, s.begin, s.end).reshape({rows, -1});
      }
      torch::Tensor k = torch::mm(p, p.t());
      *flops += 2.0 * rows * rows * p.size(1);
      kernels[s.module] = kernels[s.module].defined() ? kernels[s.module] + k : k;
    }
  }
  // Per-channel affine sites: per row ∇_scale = Σ_t g ⊙ x (2·rows·T·C FLOPs), ∇_shift = Σ_t g
  // (rows·T·C), each [rows, C], sliced per module and appended to the module's kernel.
  const size_t linear_sites = probe.sites.size();
  for (size_t si = 0; si < probe.scale_shift_sites.size(); ++si) {
    const ScaleShiftSite& site = probe.scale_shift_sites[si];
    const int64_t c = site.input.size(-1);
    torch::Tensor x = repeat(site.input.detach().reshape({n, -1, c}));  // [rows, T, C]
    const torch::Tensor& grad = grads[linear_sites + si];
    torch::Tensor g = grad.defined() ? grad.reshape({rows, -1, c}) : torch::zeros_like(x);
    const int64_t t = x.size(1);
    torch::Tensor per_sample_scale, per_sample_shift;  // [rows, C], computed on demand
    for (const ChannelSlice& s : site.slices) {
      std::vector<torch::Tensor> parts;
      if (s.has_scale) {
        if (!per_sample_scale.defined()) {
          per_sample_scale = (g * x).sum(1);
          *flops += 2.0 * rows * t * c;
        }
        parts.push_back(per_sample_scale.slice(1, s.begin, s.end));
      }
      if (s.has_shift) {
        if (!per_sample_shift.defined()) {
          per_sample_shift = g.sum(1);
          *flops += 1.0 * rows * t * c;
        }
        parts.push_back(per_sample_shift.slice(1, s.begin, s.end));
      }
      if (parts.empty()) continue;
      torch::Tensor p = parts.size() == 1 ? parts[0] : torch::cat(parts, 1);  // [rows, numel]
      torch::Tensor k = torch::mm(p, p.t());
      *flops += 2.0 * rows * rows * p.size(1);
      kernels[s.module] = kernels[s.module].defined() ? kernels[s.module] + k : k;
    }
  }
  return kernels;
}

}  // namespace

absl::StatusOr<EstimateResult> GramEstimator::Estimate(const ModulePartition& partition,
                                                       ProbeBatch probe) {
  if (!probe.losses.defined() || probe.losses.dim() != 1 || probe.losses.size(0) < 2) {
    return absl::InvalidArgumentError("probe losses must be a vector of n >= 2 samples");
  }
  const int64_t n = probe.losses.size(0);
  const int num_modules = partition.size();
  std::vector<torch::Tensor> outputs;
  if (absl::Status s = ValidateSites(probe, n, num_modules, &outputs); !s.ok()) return s;
  EstimateResult result;
  result.modules.resize(num_modules);
  if (outputs.empty()) return result;

  std::vector<torch::Tensor> grads = torch::autograd::grad(
      {probe.losses.sum()}, outputs, /*grad_outputs=*/{}, /*retain_graph=*/false,
      /*create_graph=*/false, /*allow_unused=*/true);
  double flops = 0;
  result.modules =
      KernelStatsBatch(KernelsFromSiteGrads(probe, num_modules, grads, n, /*reps=*/1, &flops));
  result.flops = flops;
  return result;
}

absl::StatusOr<EstimateResult> OutputGramEstimator::Estimate(const ModulePartition& partition,
                                                             ProbeBatch probe) {
  if (absl::Status s = ValidateOutputs(probe); !s.ok()) return s;
  const int64_t n = probe.outputs.size(0);
  const int64_t q = probe.outputs.size(1);
  const int num_modules = partition.size();
  std::vector<torch::Tensor> outputs;
  if (absl::Status s = ValidateSites(probe, n, num_modules, &outputs); !s.ok()) return s;
  EstimateResult result;
  result.modules.resize(num_modules);
  result.backward_passes = q;
  if (outputs.empty()) return result;

  // One VJP per output column c: the gradient of Σ_i outputs[i, c] at each site, whose row i
  // belongs to sample i only. per_site[s][c]: [n, ...].
  std::vector<std::vector<torch::Tensor>> per_site(outputs.size());
  for (int64_t c = 0; c < q; ++c) {
    std::vector<torch::Tensor> g = torch::autograd::grad(
        {probe.outputs.select(1, c).sum()}, outputs, /*grad_outputs=*/{},
        /*retain_graph=*/c + 1 < q, /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t s = 0; s < outputs.size(); ++s) {
      per_site[s].push_back(g[s].defined() ? g[s] : torch::zeros_like(outputs[s]));
    }
  }
  std::vector<torch::Tensor> grads;  // [q·n, ...]: row c·n + i
  for (auto& g : per_site) grads.push_back(torch::cat(g, 0));
  per_site.clear();
  double flops = 0;
  result.modules = KernelStatsBatch(KernelsFromSiteGrads(probe, num_modules, grads, n, q, &flops));
  result.flops = flops;
  return result;
}

}  // namespace mat::spectral
