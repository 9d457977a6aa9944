#include "spectral/lanczos_estimator.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>

#include "spectral/exact_estimator.h"

namespace mat::spectral {
namespace {

// Tokens of the first site holding a slice of module m (N in the flop count), else n.
int64_t TokensOf(const ProbeBatch& probe, int m, int64_t n) {
  for (const LinearSite& site : probe.sites) {
    for (const SiteSlice& s : site.slices) {
      if (s.module == m) return site.input.numel() / std::max<int64_t>(1, site.input.size(-1));
    }
  }
  return n;
}

ModuleSpectrum FromRitz(const std::vector<double>& alpha, const std::vector<double>& beta,
                        bool exhausted, int64_t d) {
  ModuleSpectrum s;
  const int64_t m = static_cast<int64_t>(alpha.size());
  torch::Tensor t = torch::zeros({m, m}, torch::kFloat64);
  for (int64_t i = 0; i < m; ++i) {
    t[i][i] = alpha[i];
    if (i + 1 < m) {
      t[i][i + 1] = beta[i];
      t[i + 1][i] = beta[i];
    }
  }
  torch::Tensor ritz = at::linalg_eigvalsh(t, "L");
  s.lambda_max = ritz[-1].item<double>();
  double sum_alpha = 0;
  for (double a : alpha) sum_alpha += a;
  s.trace = exhausted ? sum_alpha : double(d) * alpha[0];
  torch::Tensor pos = ritz.clamp_min(0);
  const double total = pos.sum().item<double>();
  if (total > 0) {
    torch::Tensor p = pos / total;
    torch::Tensor nz = p.masked_select(p > 0);
    s.effective_rank = std::exp(-(nz * nz.log()).sum().item<double>());
  }
  return s;
}

}  // namespace

absl::StatusOr<EstimateResult> LanczosEstimator::Estimate(const ModulePartition& partition,
                                                          ProbeBatch probe) {
  if (absl::Status s = ValidateOutputs(probe); !s.ok()) return s;
  if (options_.lanczos_iterations < 1) {
    return absl::InvalidArgumentError("lanczos_iterations must be >= 1");
  }
  absl::StatusOr<ModuleLeaves> leaves = CollectParams(partition);
  if (!leaves.ok()) return leaves.status();
  const torch::Tensor outputs = probe.outputs;
  const int64_t n = outputs.size(0);
  const int64_t d = outputs.numel();
  const int64_t steps = std::min<int64_t>(options_.lanczos_iterations, d);

  EstimateResult result;
  result.modules.resize(partition.modules.size());
  result.backward_passes = 0;
  if (leaves->leaves.empty()) return result;
  result.backward_passes = 1;  // the create_graph pass; each module's matvecs add theirs

  // g = J^T w0 for every leaf, a graph linear in w0.
  torch::Tensor w0 = torch::zeros_like(outputs).detach().requires_grad_(true);
  std::vector<torch::Tensor> g =
      torch::autograd::grad({outputs}, leaves->leaves, {w0}, /*retain_graph=*/true,
                            /*create_graph=*/true, /*allow_unused=*/true);

  for (size_t m = 0; m < leaves->parts.size(); ++m) {
    // The module's leaves (autograd differentiates whole leaves) and its rows of g, as graphs
    // in w0 (the defined ones; mg_part[i] is the part mg[i] comes from).
    std::vector<torch::Tensor> mp;
    std::vector<size_t> mp_of_part;
    for (const ModuleLeaves::Part& part : leaves->parts[m]) {
      mp_of_part.push_back(mp.size());
      mp.push_back(leaves->leaves[part.leaf]);
    }
    const std::vector<torch::Tensor> g_rows = leaves->Rows(m, g);
    std::vector<torch::Tensor> mg;
    std::vector<size_t> mg_part;
    for (size_t k = 0; k < g_rows.size(); ++k) {
      if (!g_rows[k].defined()) continue;
      if (!g_rows[k].requires_grad()) {
        return absl::InternalError("lanczos: the double backward does not reach module " +
                                   partition.modules[m].name +
                                   " (an op's backward is not differentiable)");
      }
      mg.push_back(g_rows[k]);
      mg_part.push_back(k);
    }
    if (mg.empty()) continue;  // θ_m does not affect the outputs: Θ_m = 0

    // Θ_m w for w: [d] float64 CPU.
    auto matvec = [&](const torch::Tensor& w) {
      torch::Tensor wv = w.to(outputs.options()).view(outputs.sizes());
      std::vector<torch::Tensor> u =
          torch::autograd::grad({outputs}, mp, {wv}, /*retain_graph=*/true,
                                /*create_graph=*/false, /*allow_unused=*/true);
      std::vector<torch::Tensor> ug;
      for (size_t i = 0; i < mg.size(); ++i) {
        const ModuleLeaves::Part& part = leaves->parts[m][mg_part[i]];
        const torch::Tensor& ui = u[mp_of_part[mg_part[i]]];
        ug.push_back(!ui.defined() ? torch::zeros_like(mg[i])
                     : part.whole  ? ui
                                   : ui.narrow(0, part.begin, part.end - part.begin));
      }
      std::vector<torch::Tensor> jv =
          torch::autograd::grad(mg, {w0}, ug, /*retain_graph=*/true, /*create_graph=*/false,
                                /*allow_unused=*/true);
      torch::NoGradGuard guard;
      return jv[0].defined() ? jv[0].detach().to(torch::kCPU, torch::kFloat64).reshape({-1})
                             : torch::zeros({d}, torch::kFloat64);
    };

    torch::NoGradGuard guard;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(options_.seed + m);
    torch::Tensor q = torch::randn({d}, gen, torch::TensorOptions().dtype(torch::kFloat64));
    q = q / q.norm();
    std::vector<torch::Tensor> basis = {q};
    std::vector<double> alpha, beta;
    double scale = 0;  // running ‖T‖ estimate for the breakdown test
    bool exhausted = false;
    for (int64_t j = 0; j < steps; ++j) {
      torch::Tensor z;
      {
        torch::AutoGradMode enable(true);
        z = matvec(basis[j]);
      }
      const double a = torch::dot(basis[j], z).item<double>();
      alpha.push_back(a);
      scale = std::max(scale, std::abs(a));
      if (j + 1 == d) {
        exhausted = true;
        break;
      }
      if (j + 1 == steps) break;
      // Full reorthogonalization, twice (Gram-Schmidt is unstable once).
      torch::Tensor qm = torch::stack(basis, 1);  // [d, j+1]
      for (int pass = 0; pass < 2; ++pass) z = z - torch::mv(qm, torch::mv(qm.t(), z));
      const double b = z.norm().item<double>();
      scale = std::max(scale, b);
      if (b <= 1e-10 * scale || scale == 0) {
        exhausted = true;
        break;
      }
      beta.push_back(b);
      basis.push_back(z / b);
    }
    result.modules[m] = FromRitz(alpha, beta, exhausted, d);
    result.backward_passes += 2 * static_cast<int64_t>(alpha.size());  // each matvec's two
    const double p_m = double(partition.modules[m].NumParams());
    result.flops += double(alpha.size()) * 4.0 * 2.0 * p_m * double(TokensOf(probe, int(m), n));
  }
  return result;
}

}  // namespace mat::spectral
