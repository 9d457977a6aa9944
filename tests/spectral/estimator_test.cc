// gram against exact (and both against a closed form) on small float64 models; gram's
// per-channel affine (scale-shift) sites against explicit per-sample gradients.
#include "spectral/estimator.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/spectral/toy_mlp.h"

#include "spectral/exact_estimator.h"
#include "spectral/gram_estimator.h"
#include "trainer/models/bert.h"

namespace mat::spectral {
namespace {

constexpr double kTol = 1e-4;

void ExpectClose(const EstimateResult& a, const EstimateResult& b) {
  ASSERT_EQ(a.modules.size(), b.modules.size());
  for (size_t m = 0; m < a.modules.size(); ++m) {
    SCOPED_TRACE("module " + std::to_string(m));
    const auto& x = a.modules[m];
    const auto& y = b.modules[m];
    ASSERT_GT(y.lambda_max, 0);
    EXPECT_LE(std::abs(x.lambda_max - y.lambda_max) / y.lambda_max, kTol);
    EXPECT_LE(std::abs(x.trace - y.trace) / y.trace, kTol);
    EXPECT_LE(std::abs(x.effective_rank - y.effective_rank) / y.effective_rank, kTol);
  }
}

using testing::Leaf;

using Mlp = testing::ToyMlp;

TEST(EstimatorTest, GramMatchesExactOnMlp) {
  torch::manual_seed(0);
  Mlp mlp;
  torch::Tensor x = torch::randn({6, 5}, torch::kFloat64);
  torch::Tensor t = torch::randn({6, 3}, torch::kFloat64);
  auto gram = GramEstimator().Estimate(mlp.partition, mlp.LossProbe(x, t, true));
  auto exact = ExactEstimator().Estimate(mlp.partition, mlp.LossProbe(x, t, false));
  ASSERT_TRUE(gram.ok()) << gram.status();
  ASSERT_TRUE(exact.ok()) << exact.status();
  ExpectClose(*gram, *exact);
  EXPECT_GT(gram->flops, 0);
}

// y = W x with ℓ_i = ½|W x_i - t_i|²: ∇_W ℓ_i = r_i x_i^T, so K_ij = (r_i·r_j)(x_i·x_j).
TEST(EstimatorTest, BothMatchClosedFormOfLinearModel) {
  torch::manual_seed(1);
  torch::Tensor w = Leaf({4, 7});
  ModulePartition p;
  p.modules.push_back({"heads", 0, 0, "w", {w}});
  torch::Tensor x = torch::randn({5, 7}, torch::kFloat64);
  torch::Tensor t = torch::randn({5, 4}, torch::kFloat64);
  auto probe = [&] {
    torch::Tensor y = torch::nn::functional::linear(x, w);
    ProbeBatch b{0.5 * (y - t).pow(2).sum(1), {}, {}};
    b.sites.push_back({x, y, {{0, SliceAxis::kRows, 0, 4, false}}});
    return b;
  };
  torch::Tensor r = (torch::mm(x, w.detach().t()) - t);
  ModuleSpectrum ref = KernelStats(torch::mm(r, r.t()) * torch::mm(x, x.t()));
  for (auto* est : std::vector<Estimator*>{new GramEstimator(), new ExactEstimator()}) {
    std::unique_ptr<Estimator> owned(est);
    auto got = owned->Estimate(p, probe());
    ASSERT_TRUE(got.ok()) << got.status();
    SCOPED_TRACE(owned->name());
    EXPECT_NEAR(got->modules[0].lambda_max, ref.lambda_max, kTol * ref.lambda_max);
    EXPECT_NEAR(got->modules[0].trace, ref.trace, kTol * ref.trace);
    EXPECT_NEAR(got->modules[0].effective_rank, ref.effective_rank, kTol * ref.effective_rank);
  }
}

TEST(EstimatorTest, KernelStatsOfKnownSpectrum) {
  // Eigenvalues 3, 1, 0: λ_max 3, trace 4, erank exp(H(3/4, 1/4)).
  torch::Tensor q = std::get<0>(at::linalg_qr(torch::randn({3, 3}, torch::kFloat64)));
  torch::Tensor k = torch::mm(torch::mm(q, torch::diag(torch::tensor({3.0, 1.0, 0.0}, torch::kFloat64))), q.t());
  ModuleSpectrum s = KernelStats(k);
  EXPECT_NEAR(s.lambda_max, 3.0, 1e-12);
  EXPECT_NEAR(s.trace, 4.0, 1e-12);
  double h = -(0.75 * std::log(0.75) + 0.25 * std::log(0.25));
  EXPECT_NEAR(s.effective_rank, std::exp(h), 1e-9);
}

TEST(EstimatorTest, RejectsMalformedProbe) {
  ModulePartition p;
  ProbeBatch one{torch::ones({1}, torch::kFloat64).requires_grad_(true), {}, {}};
  EXPECT_EQ(GramEstimator().Estimate(p, one).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeEstimator("lanczos?").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(MakeEstimator("gram").ok());
  EXPECT_TRUE(MakeEstimator("exact").ok());
  EXPECT_TRUE(MakeEstimator("lanczos").ok());
  EXPECT_TRUE(MakeEstimator("exact-output").ok());
}

// Each of `wrt`'s gradients of each loss ℓ_i, stacked: [n, ...] per tensor of `wrt`.
std::vector<torch::Tensor> PerSampleGrads(const torch::Tensor& losses,
                                          const std::vector<torch::Tensor>& wrt) {
  std::vector<std::vector<torch::Tensor>> rows(wrt.size());
  for (int64_t i = 0; i < losses.size(0); ++i) {
    auto g = torch::autograd::grad({losses[i]}, wrt, {}, /*retain_graph=*/true);
    for (size_t k = 0; k < wrt.size(); ++k) rows[k].push_back(g[k]);
  }
  std::vector<torch::Tensor> out;
  for (auto& r : rows) out.push_back(torch::stack(r));
  return out;
}

// `got` is the spectrum of P Pᵀ for per-sample gradients P [n, p] (1e-10; effective rank 1e-9).
void ExpectSpectrumOf(const ModuleSpectrum& got, const torch::Tensor& p) {
  const ModuleSpectrum want = KernelStats(torch::mm(p, p.t()));
  ASSERT_GT(want.lambda_max, 0);
  EXPECT_NEAR(got.lambda_max, want.lambda_max, 1e-10 * want.lambda_max);
  EXPECT_NEAR(got.trace, want.trace, 1e-10 * want.trace);
  EXPECT_NEAR(got.effective_rank, want.effective_rank, 1e-9 * want.effective_rank);
}

// A per-channel affine map y = x ⊙ scale + shift (x: [n, T, C], or [n, C] without T) whose
// channels form three modules: [0, 2) scale and shift, [2, 5) scale only, [2, 5) shift only.
// The reference kernels come from explicit per-sample gradients (one backward per sample).
class ScaleShiftSiteTest : public ::testing::TestWithParam<bool> {};

TEST_P(ScaleShiftSiteTest, GramMatchesExplicitPerSampleGradients) {
  torch::manual_seed(3);
  const bool with_t = GetParam();
  const int64_t n = 4, T = 3, C = 5;
  // One leaf per module part, as a model holds them; the map uses their concatenations.
  torch::Tensor s0 = Leaf({2}), s1 = Leaf({3}), b0 = Leaf({2}), b1 = Leaf({3});
  torch::Tensor x = with_t ? torch::randn({n, T, C}, torch::kFloat64)
                           : torch::randn({n, C}, torch::kFloat64);
  torch::Tensor r = torch::randn_like(x);
  ModulePartition p;  // the leaves are for the exact estimator; gram reads the slices
  p.modules.push_back({"bn", 0, 0, "both", {s0, b0}});
  p.modules.push_back({"bn", 0, 1, "scale", {s1}});
  p.modules.push_back({"bn", 0, 2, "shift", {b1}});
  torch::Tensor scale, shift;
  auto probe = [&] {
    scale = torch::cat({s0, s1});
    shift = torch::cat({b0, b1});
    torch::Tensor y = x * scale + shift;
    std::vector<int64_t> dims = with_t ? std::vector<int64_t>{1, 2} : std::vector<int64_t>{1};
    ProbeBatch b{(torch::sin(y) * r).sum(dims) + 0.5 * y.pow(2).sum(dims), {}, {}};
    b.scale_shift_sites.push_back({x, y,
                                   {{0, 0, 2, true, true},
                                    {1, 2, 5, true, false},
                                    {2, 2, 5, false, true}}});
    return b;
  };
  // Reference: ∇ℓ_i with respect to the whole scale and shift, then sliced per module.
  const torch::Tensor ref_losses = probe().losses;  // sets scale and shift
  const std::vector<torch::Tensor> sb = PerSampleGrads(ref_losses, {scale, shift});
  const torch::Tensor &s = sb[0], &b = sb[1];  // [n, C]
  std::vector<torch::Tensor> per_module = {
      torch::cat({s.slice(1, 0, 2), b.slice(1, 0, 2)}, 1), s.slice(1, 2, 5), b.slice(1, 2, 5)};
  auto got = GramEstimator().Estimate(p, probe());
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->modules.size(), 3u);
  for (int m = 0; m < 3; ++m) {
    SCOPED_TRACE("module " + std::to_string(m));
    ExpectSpectrumOf(got->modules[m], per_module[m]);
  }
  // Per-sample grads 3·n·T·C, kernels 2·n²·(4 + 3 + 3).
  const double tokens = with_t ? double(n * T) : double(n);
  EXPECT_DOUBLE_EQ(got->flops, 3.0 * tokens * C + 2.0 * n * n * 10);
  // The exact estimator differentiates the leaves and ignores the sites: the same spectra.
  auto exact = ExactEstimator().Estimate(p, probe());
  ASSERT_TRUE(exact.ok()) << exact.status();
  ExpectClose(*got, *exact);
}

INSTANTIATE_TEST_SUITE_P(WithAndWithoutTokens, ScaleShiftSiteTest, ::testing::Bool());

// The gram estimator computes the modules of a site that share a slice layout together (one
// batched matmul per group). One linear site y = a W^T + b (W: [10, 4]) whose slices make every
// grouping case: modules 0 and 3 own two row ranges each with their bias, not back to back in
// module order (a gather) and not consecutive modules (an indexed add); modules 1 and 2 one row
// each, back to back (views); module 4 two input columns. Reference: explicit per-sample
// gradients of W and b, sliced per module.
TEST(EstimatorTest, GramGroupsMatchExplicitPerSampleGradients) {
  torch::manual_seed(5);
  const int64_t n = 5, T = 3, in = 4, out = 10;
  torch::Tensor w = Leaf({out, in}), bias = Leaf({out});
  torch::Tensor a = torch::randn({n, T, in}, torch::kFloat64);
  torch::Tensor r = torch::randn({n, T, out}, torch::kFloat64);
  ModulePartition p;
  for (int m = 0; m < 5; ++m) p.modules.push_back({"heads", 0, m, "m" + std::to_string(m), {w}});
  const std::vector<SiteSlice> slices = {
      {0, SliceAxis::kRows, 0, 2, true},  {3, SliceAxis::kRows, 2, 4, true},
      {1, SliceAxis::kRows, 4, 5, false}, {2, SliceAxis::kRows, 5, 6, false},
      {3, SliceAxis::kRows, 6, 8, true},  {0, SliceAxis::kRows, 8, 10, true},
      {4, SliceAxis::kCols, 0, 2, false}};
  auto probe = [&] {
    torch::Tensor y = torch::nn::functional::linear(a, w, bias);
    ProbeBatch b{(torch::sin(y) * r).sum({1, 2}) + 0.5 * y.pow(2).sum({1, 2}), {}, {}};
    b.sites.push_back({a, y, slices});
    return b;
  };
  const std::vector<torch::Tensor> wb = PerSampleGrads(probe().losses, {w, bias});
  const torch::Tensor &W = wb[0], &B = wb[1];  // [n, out, in], [n, out]
  std::vector<std::vector<torch::Tensor>> parts(5);
  for (const SiteSlice& s : slices) {
    if (s.axis == SliceAxis::kCols) {
      parts[s.module].push_back(W.slice(2, s.begin, s.end).reshape({n, -1}));
      continue;
    }
    parts[s.module].push_back(W.slice(1, s.begin, s.end).reshape({n, -1}));
    if (s.has_bias) parts[s.module].push_back(B.slice(1, s.begin, s.end));
  }
  auto got = GramEstimator().Estimate(p, probe());
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->modules.size(), 5u);
  double widths = 0;
  for (int m = 0; m < 5; ++m) {
    SCOPED_TRACE("module " + std::to_string(m));
    torch::Tensor q = torch::cat(parts[m], 1);
    widths += double(q.size(1));
    ExpectSpectrumOf(got->modules[m], q);
  }
  // Per-sample grads 2·n·T·in·out, kernels 2·n²·(Σ module widths).
  EXPECT_DOUBLE_EQ(got->flops, 2.0 * n * T * in * out + 2.0 * n * n * widths);
}

TEST(EstimatorTest, GramRejectsMalformedScaleShiftSites) {
  torch::Tensor scale = Leaf({3});
  ModulePartition p;
  p.modules.push_back({"bn", 0, 0, "bn", {scale}});
  torch::Tensor x = torch::randn({4, 3}, torch::kFloat64);
  auto probe = [&](torch::Tensor input, ChannelSlice slice) {
    torch::Tensor y = x * scale;
    ProbeBatch b{y.sum(1), {}, {}};
    b.scale_shift_sites.push_back({input, y, {slice}});
    return b;
  };
  EXPECT_TRUE(GramEstimator().Estimate(p, probe(x, {0, 0, 3, true, false})).ok());
  for (auto [input, slice] : std::vector<std::pair<torch::Tensor, ChannelSlice>>{
           {x.slice(0, 0, 3), {0, 0, 3, true, false}},   // n differs from the losses'
           {x.unsqueeze(1), {0, 0, 3, true, false}},     // shape differs from the output's
           {x, {1, 0, 3, true, false}},                  // module outside the partition
           {x, {0, 2, 4, true, false}},                  // channels out of range
           {x, {0, 2, 2, true, false}}}) {               // empty
    EXPECT_EQ(GramEstimator().Estimate(p, probe(input, slice)).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
}

// One float64 BERT encoder layer of width 8 (2 heads, 2 FFN slices, no dropout) and its 4
// modules: heads (Q, K, V rows with biases, W_O columns), then FFN slices.
struct AttentionBlock {
  trainer::BertLayer layer{nullptr};
  ModulePartition partition;
};

AttentionBlock MakeAttentionBlock(bool pre_ln) {
  trainer::BertConfig c;
  c.d_model = 8;
  c.heads = 2;
  c.d_ff = 16;
  c.ffn_groups = 2;
  c.dropout = 0;
  c.pre_ln = pre_ln;
  AttentionBlock b;
  b.layer = trainer::BertLayer(c, 0);
  auto& layer = b.layer;
  auto& p = b.partition;
  layer->to(torch::kFloat64);
  for (int h = 0; h < 2; ++h) {
    ModuleSpec m{"heads", 0, h, "head" + std::to_string(h), layer->HeadParams(h)};
    p.modules.push_back(m);
  }
  for (int g = 0; g < 2; ++g) {
    p.modules.push_back({"ffn", 0, g, "ffn" + std::to_string(g),
                         layer->FfnParams(g)});
  }
  return b;
}

// ---- output: the paper's mNTK by per-sample gradients of the outputs, against brute force ----

// Relative agreement of two estimates of the same kernel, at `tol`.
void ExpectSameKernel(const EstimateResult& a, const EstimateResult& b, double tol) {
  ASSERT_EQ(a.modules.size(), b.modules.size());
  for (size_t m = 0; m < a.modules.size(); ++m) {
    SCOPED_TRACE("module " + std::to_string(m));
    const auto& x = a.modules[m];
    const auto& y = b.modules[m];
    ASSERT_GT(y.lambda_max, 0);
    EXPECT_LE(std::abs(x.lambda_max - y.lambda_max) / y.lambda_max, tol);
    EXPECT_LE(std::abs(x.trace - y.trace) / y.trace, tol);
    EXPECT_LE(std::abs(x.effective_rank - y.effective_rank) / y.effective_rank, tol);
  }
}

TEST(OutputEstimatorTest, MatchesBruteForceJacobianOnMlp) {
  torch::manual_seed(3);
  Mlp mlp;
  torch::Tensor x = torch::randn({6, 5}, torch::kFloat64);
  OutputGramEstimator output(/*projections=*/3, /*positions=*/1);
  auto fast = output.Estimate(mlp.partition, mlp.OutputSiteProbe(x, true));
  auto brute = ExactOutputEstimator().Estimate(mlp.partition, mlp.OutputSiteProbe(x, false));
  ASSERT_TRUE(fast.ok()) << fast.status();
  ASSERT_TRUE(brute.ok()) << brute.status();
  ExpectSameKernel(*fast, *brute, 1e-6);
  EXPECT_EQ(fast->backward_passes, 3) << "one VJP per output column, not per row";
  EXPECT_EQ(brute->backward_passes, 18) << "d = n·q rows";
  EXPECT_GT(fast->flops, 0);
}

// y_i = W x_i, outputs [n, k] = y: ∂y_{i,a}/∂W = e_a x_i^T, so Θ_{(i,a),(j,b)} = δ_ab (x_i·x_j):
// k copies of X X^T, λ_max(Θ) = λ_max(X X^T) and trace(Θ) = k·trace(X X^T).
TEST(OutputEstimatorTest, MatchesClosedFormOfLinearModel) {
  torch::manual_seed(4);
  torch::Tensor w = Leaf({4, 7});
  ModulePartition p;
  p.modules.push_back({"heads", 0, 0, "w", {w}});
  torch::Tensor x = torch::randn({5, 7}, torch::kFloat64);
  torch::Tensor y = torch::nn::functional::linear(x, w);
  ProbeBatch b;
  b.outputs = y;
  b.sites.push_back({x, y, {{0, SliceAxis::kRows, 0, 4, false}}});
  auto r = OutputGramEstimator(4, 1).Estimate(p, b);
  ASSERT_TRUE(r.ok()) << r.status();
  const torch::Tensor xx = torch::mm(x, x.t());
  const double lambda = torch::linalg_eigvalsh(xx, "L").max().item<double>();
  EXPECT_NEAR(r->modules[0].lambda_max, lambda, 1e-9 * lambda);
  EXPECT_NEAR(r->modules[0].trace, 4 * xx.trace().item<double>(), 1e-9 * lambda);
}

// One BERT encoder layer in float64, outputs: q = 3 random projections of each sample's whole
// output [T, d] (every sample's outputs depend on that sample only).
TEST(OutputEstimatorTest, MatchesBruteForceOnAnAttentionBlock) {
  torch::manual_seed(5);
  AttentionBlock b = MakeAttentionBlock(false);
  auto& layer = b.layer;
  const ModulePartition& p = b.partition;
  const int64_t n = 4, T = 3, q = 3;
  torch::Tensor x = torch::randn({n, T, 8}, torch::kFloat64);
  torch::Tensor proj = torch::randn({T * 8, q}, torch::kFloat64);
  auto probe = [&](bool record) {
    SiteRecorder rec;
    layer->set_recorder(record ? &rec : nullptr, {0, 1}, {2, 3});
    torch::Tensor y = layer->forward(x, {true, true}, {true, true});
    layer->set_recorder(nullptr, {}, {});
    ProbeBatch b;
    b.outputs = torch::mm(y.reshape({n, T * 8}), proj);  // [n, q]
    b.sites = rec.Take();
    return b;
  };
  auto fast = OutputGramEstimator(q, 1).Estimate(p, probe(true));
  auto brute = ExactOutputEstimator(q, 1).Estimate(p, probe(false));
  ASSERT_TRUE(fast.ok()) << fast.status();
  ASSERT_TRUE(brute.ok()) << brute.status();
  ExpectSameKernel(*fast, *brute, 1e-6);
}

TEST(OutputEstimatorTest, RejectsAProbeWithoutOutputs) {
  torch::manual_seed(6);
  Mlp mlp;
  torch::Tensor x = torch::randn({4, 5}, torch::kFloat64);
  auto r = OutputGramEstimator(3, 1).Estimate(mlp.partition, mlp.LossProbe(x, x.slice(1, 0, 3), true));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(r.status().message()), ::testing::HasSubstr("outputs"));
  EXPECT_EQ(MakeEstimator("output", {8, 4, 0}).status().code(),
            absl::StatusCode::kInvalidArgument)
      << "zero positions";
  auto made = MakeEstimator("output", {8, 4, 2});
  ASSERT_TRUE(made.ok());
  EXPECT_EQ((*made)->OutputProjections(), 4);
  EXPECT_EQ((*made)->OutputPositions(), 2);
  EXPECT_TRUE((*made)->NeedsOutputs());
}

// One BERT encoder layer (heads and FFN slices as modules) in float64.
class AttentionBlockTest : public ::testing::TestWithParam<bool> {};

TEST_P(AttentionBlockTest, GramMatchesExact) {
  torch::manual_seed(2);
  AttentionBlock b = MakeAttentionBlock(GetParam());
  auto& layer = b.layer;
  const ModulePartition& p = b.partition;
  // Random biases so every term of the per-sample gradient is exercised.
  {
    torch::NoGradGuard g;
    for (auto& t : layer->parameters()) t.add_(0.1 * torch::randn_like(t));
  }
  const int64_t n = 4, T = 3;
  torch::Tensor x = torch::randn({n, T, 8}, torch::kFloat64);
  torch::Tensor r = torch::randn({n, T, 8}, torch::kFloat64);
  auto probe = [&](bool record) {
    SiteRecorder rec;
    layer->set_recorder(record ? &rec : nullptr, {0, 1}, {2, 3});
    torch::Tensor y = layer->forward(x, {true, true}, {true, true});
    layer->set_recorder(nullptr, {}, {});
    ProbeBatch b{(y * r).sum({1, 2}) + 0.5 * y.pow(2).sum({1, 2}), rec.Take(), {}};
    return b;
  };
  auto gram = GramEstimator().Estimate(p, probe(true));
  auto exact = ExactEstimator().Estimate(p, probe(false));
  ASSERT_TRUE(gram.ok()) << gram.status();
  ASSERT_TRUE(exact.ok()) << exact.status();
  ExpectClose(*gram, *exact);
}

INSTANTIATE_TEST_SUITE_P(PreAndPostLn, AttentionBlockTest, ::testing::Bool());

}  // namespace
}  // namespace mat::spectral
