#include "spectral/gram_estimator.h"

#include <map>
#include <tuple>
#include <utility>
#include <vector>

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

// Columns [b, e) of `source` along `dim` for each range, concatenated in order: a view when the
// ranges lie back to back (the heads of a layer, in order), else one index_select.
torch::Tensor Gather(const torch::Tensor& source, int64_t dim,
                     const std::vector<std::pair<int64_t, int64_t>>& ranges) {
  bool back_to_back = true;
  for (size_t k = 1; k < ranges.size(); ++k) back_to_back &= ranges[k].first == ranges[k - 1].second;
  if (back_to_back) {
    return source.narrow(dim, ranges.front().first, ranges.back().second - ranges.front().first);
  }
  std::vector<int64_t> index;
  for (const auto& [b, e] : ranges) {
    for (int64_t i = b; i < e; ++i) index.push_back(i);
  }
  return source.index_select(dim, torch::tensor(index, torch::kLong).to(source.device()));
}

// The modules of one site, grouped so that each group's kernels are one batched matmul: modules
// whose slices there have the same kinds and widths in the same order (a layer's heads) form a
// group. Slice `Key` gives a slice's kind and width.
template <typename Slice, typename Key>
std::vector<std::vector<std::vector<const Slice*>>> GroupModules(const std::vector<Slice>& slices,
                                                                  Key key) {
  std::map<int, std::vector<const Slice*>> by_module;  // module -> its slices, in site order
  for (const Slice& s : slices) by_module[s.module].push_back(&s);
  std::map<std::vector<std::tuple<int, int64_t, bool, bool>>, size_t> group_of;
  std::vector<std::vector<std::vector<const Slice*>>> groups;  // group -> modules -> slices
  for (auto& [module, parts] : by_module) {
    std::vector<std::tuple<int, int64_t, bool, bool>> signature;
    for (const Slice* s : parts) signature.push_back(key(*s));
    auto [it, fresh] = group_of.emplace(signature, groups.size());
    if (fresh) groups.emplace_back();
    groups[it->second].push_back(parts);
  }
  return groups;
}

// Calls add(parts, modules) for each group of `slices` (GroupModules), where modules holds the
// group's G module indices and parts[j] = part(slice j of the group's first module, the G
// modules' ranges of their slice j, G): tensors [rows, G, width] (none, several).
template <typename Slice, typename Key, typename Part, typename Add>
void ForEachGroup(const std::vector<Slice>& slices, Key key, Part part, Add add) {
  for (const auto& group : GroupModules(slices, key)) {
    std::vector<int> modules;
    for (const auto& module_slices : group) modules.push_back(module_slices.front()->module);
    std::vector<torch::Tensor> parts;
    for (size_t j = 0; j < group.front().size(); ++j) {
      std::vector<std::pair<int64_t, int64_t>> ranges;
      for (const auto& module_slices : group) {
        ranges.emplace_back(module_slices[j]->begin, module_slices[j]->end);
      }
      for (torch::Tensor& t : part(*group.front()[j], ranges, int64_t(group.size()))) {
        parts.push_back(std::move(t));
      }
    }
    if (!parts.empty()) add(parts, modules);
  }
}

// Accumulates a group's kernels k [G, rows, rows] into kernels[m] for its modules `modules`
// (one per k row): one in-place add where they are consecutive module indices, else index_add_.
void AddKernels(const torch::Tensor& k, const std::vector<int>& modules, torch::Tensor* all,
                std::vector<bool>* seen) {
  bool consecutive = true;
  for (size_t g = 1; g < modules.size(); ++g) consecutive &= modules[g] == modules[g - 1] + 1;
  if (consecutive) {
    all->narrow(0, modules.front(), int64_t(modules.size())).add_(k);
  } else {
    std::vector<int64_t> index(modules.begin(), modules.end());
    all->index_add_(0, torch::tensor(index, torch::kLong).to(all->device()), k.to(all->dtype()));
  }
  for (int m : modules) (*seen)[m] = true;
}

// Each module's kernel from the sites' output gradients. grads[s] (one per site, linear sites
// first; undefined = zero): [reps·n, ...] with row r·n + i the gradient of scalar r of sample i,
// so the kernels are [reps·n, reps·n]. The sites' inputs are [n, ...] and shared by the reps.
// A module's kernel is the sum over its slices of P P^T, which is Q Q^T for Q its slices' P
// side by side; the modules of a site that share a slice layout are computed together, one
// bmm over [G, rows, width] (on a GPU a probe was launch-bound: one mm and add per slice).
std::vector<torch::Tensor> KernelsFromSiteGrads(const ProbeBatch& probe, int num_modules,
                                                const std::vector<torch::Tensor>& grads,
                                                int64_t n, int64_t reps, double* flops) {
  torch::NoGradGuard guard;
  const int64_t rows = reps * n;
  auto repeat = [reps](const torch::Tensor& x) {
    return reps == 1 ? x : x.repeat({reps, 1, 1});  // [n, T, c] -> [reps·n, T, c]
  };
  torch::Tensor all;  // [num_modules, rows, rows], made at the first group
  std::vector<bool> seen(num_modules, false);
  // One group's kernels from its per-part gathers, each [rows, G, width_j].
  auto add_group = [&](const std::vector<torch::Tensor>& parts, const std::vector<int>& modules) {
    torch::Tensor q = (parts.size() == 1 ? parts[0] : torch::cat(parts, 2)).transpose(0, 1);
    if (q.size(2) == 0) return;
    torch::Tensor k = torch::bmm(q, q.transpose(1, 2));  // [G, rows, rows]
    *flops += 2.0 * rows * rows * q.size(2) * q.size(0);
    if (!all.defined()) {
      // Reduced-precision kernels accumulate in float32 (KernelStatsBatch works in float64).
      const bool reduced = k.scalar_type() == torch::kBFloat16 || k.scalar_type() == torch::kHalf;
      all = torch::zeros({num_modules, rows, rows}, k.options().dtype(reduced ? torch::kFloat : k.scalar_type()));
    }
    AddKernels(k, modules, &all, &seen);
  };
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
    ForEachGroup(
        site.slices,
        [](const SiteSlice& s) { return std::make_tuple(int(s.axis), s.end - s.begin, s.has_bias, false); },
        [&](const SiteSlice& s, const std::vector<std::pair<int64_t, int64_t>>& ranges, int64_t G) {
          const int64_t w = s.end - s.begin;
          std::vector<torch::Tensor> out_parts;
          if (s.axis == SliceAxis::kCols) {
            out_parts.push_back(Gather(per_sample_w, 2, ranges)
                                    .reshape({rows, out, G, w})
                                    .permute({0, 2, 1, 3})
                                    .reshape({rows, G, out * w}));
            return out_parts;
          }
          out_parts.push_back(Gather(per_sample_w, 1, ranges).reshape({rows, G, w * in}));
          if (s.has_bias) {
            if (!per_sample_b.defined()) per_sample_b = g.sum(1);
            out_parts.push_back(Gather(per_sample_b, 1, ranges).reshape({rows, G, w}));
          }
          return out_parts;
        },
        add_group);
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
    ForEachGroup(
        site.slices,
        [](const ChannelSlice& s) { return std::make_tuple(0, s.end - s.begin, s.has_scale, s.has_shift); },
        [&](const ChannelSlice& s, const std::vector<std::pair<int64_t, int64_t>>& ranges, int64_t G) {
          const int64_t w = s.end - s.begin;
          std::vector<torch::Tensor> out_parts;
          if (s.has_scale) {
            if (!per_sample_scale.defined()) {
              per_sample_scale = (g * x).sum(1);
              *flops += 2.0 * rows * t * c;
            }
            out_parts.push_back(Gather(per_sample_scale, 1, ranges).reshape({rows, G, w}));
          }
          if (s.has_shift) {
            if (!per_sample_shift.defined()) {
              per_sample_shift = g.sum(1);
              *flops += 1.0 * rows * t * c;
            }
            out_parts.push_back(Gather(per_sample_shift, 1, ranges).reshape({rows, G, w}));
          }
          return out_parts;
        },
        add_group);
  }
  std::vector<torch::Tensor> kernels(num_modules);
  for (int m = 0; m < num_modules; ++m) {
    if (seen[m]) kernels[m] = all[m];
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
