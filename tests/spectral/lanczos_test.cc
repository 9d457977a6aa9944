// The output-kernel estimators: lanczos against exact-output (and exact-output against a closed
// form) in float64, on an MLP and on a BERT layer whose linear maps are the custom autograd
// functions of trainer/models/sliced_linear.cc (the double backward runs through them).
#include <gtest/gtest.h>

#include "tests/spectral/toy_mlp.h"

#include "spectral/estimator.h"
#include "spectral/exact_estimator.h"
#include "spectral/lanczos_estimator.h"
#include "trainer/models/bert.h"

namespace mat::spectral {
namespace {

using testing::Leaf;

double Rel(double x, double y) { return std::abs(x - y) / std::max(std::abs(y), 1e-300); }

using Mlp = testing::ToyMlp;

std::unique_ptr<Estimator> Make(const std::string& name, int iterations) {
  EstimatorOptions o;
  o.lanczos_iterations = iterations;
  auto e = MakeEstimator(name, o);
  EXPECT_TRUE(e.ok()) << e.status();
  return std::move(*e);
}

TEST(LanczosTest, FullKrylovSpaceMatchesExactOutputOnMlp) {
  torch::manual_seed(0);
  Mlp mlp;
  torch::Tensor x = torch::randn({6, 5}, torch::kFloat64);
  auto exact = Make("exact-output", 1)->Estimate(mlp.partition, mlp.OutputProbe(x));
  auto lz = Make("lanczos", 100)->Estimate(mlp.partition, mlp.OutputProbe(x));  // K capped at d = 18
  ASSERT_TRUE(exact.ok()) << exact.status();
  ASSERT_TRUE(lz.ok()) << lz.status();
  ASSERT_EQ(lz->modules.size(), 3u);
  for (size_t m = 0; m < 3; ++m) {
    SCOPED_TRACE("module " + std::to_string(m));
    const auto& e = exact->modules[m];
    const auto& l = lz->modules[m];
    ASSERT_GT(e.lambda_max, 0);
    EXPECT_LE(Rel(l.lambda_max, e.lambda_max), 1e-6);
    EXPECT_LE(Rel(l.trace, e.trace), 1e-6);
    EXPECT_LE(Rel(l.effective_rank, e.effective_rank), 1e-6);
  }
  EXPECT_GT(lz->flops, 0);
  EXPECT_GT(exact->flops, 0);
}

// y = W x_i: J_W for output (i, a) is e_a x_i^T, so Θ = (X X^T) ⊗ I_out.
TEST(LanczosTest, ExactOutputMatchesClosedFormOfLinearModel) {
  torch::manual_seed(1);
  torch::Tensor w = Leaf({3, 7});
  ModulePartition p;
  p.modules.push_back({"heads", 0, 0, "w", {w}});
  torch::Tensor x = torch::randn({4, 7}, torch::kFloat64);
  ProbeBatch b;
  b.outputs = torch::nn::functional::linear(x, w);
  auto got = Make("exact-output", 1)->Estimate(p, b);
  ASSERT_TRUE(got.ok()) << got.status();
  ModuleSpectrum ref = KernelStats(torch::kron(torch::mm(x, x.t()), torch::eye(3, torch::kFloat64)));
  EXPECT_LE(Rel(got->modules[0].lambda_max, ref.lambda_max), 1e-10);
  EXPECT_LE(Rel(got->modules[0].trace, ref.trace), 1e-10);
}

class BertLayerProbe {
 public:
  BertLayerProbe() {
    torch::manual_seed(2);
    trainer::BertConfig c;
    c.d_model = 8;
    c.heads = 2;
    c.d_ff = 16;
    c.ffn_groups = 2;
    c.dropout = 0;
    layer_ = trainer::BertLayer(c, 0);
    layer_->to(torch::kFloat64);
    for (int h = 0; h < 2; ++h) {
      ModuleSpec m{"heads", 0, h, "head" + std::to_string(h), layer_->HeadParams(h)};
      partition.modules.push_back(m);
    }
    for (int g = 0; g < 2; ++g) {
      partition.modules.push_back({"ffn", 0, g, "ffn" + std::to_string(g),
                                   layer_->FfnParams(g)});
    }
    x_ = torch::randn({4, 3, 8}, torch::kFloat64);
    proj_ = torch::randn({8, 2}, torch::kFloat64);
  }

  // outputs: [4, 2] (d = 8), the layer's output summed over positions, projected.
  ProbeBatch Probe() {
    torch::Tensor y = layer_->forward(x_, {true, true}, {true, true});
    ProbeBatch b;
    b.losses = 0.5 * y.pow(2).sum({1, 2});
    b.outputs = torch::mm(y.sum(1), proj_);
    return b;
  }

  ModulePartition partition;

 private:
  trainer::BertLayer layer_{nullptr};
  torch::Tensor x_, proj_;
};

TEST(LanczosTest, DoubleBackwardThroughSlicedLinearMatchesExactOutput) {
  BertLayerProbe bert;
  auto exact = Make("exact-output", 1)->Estimate(bert.partition, bert.Probe());
  auto lz = Make("lanczos", 8)->Estimate(bert.partition, bert.Probe());  // K = d = 8
  ASSERT_TRUE(exact.ok()) << exact.status();
  ASSERT_TRUE(lz.ok()) << lz.status();
  for (size_t m = 0; m < exact->modules.size(); ++m) {
    SCOPED_TRACE(bert.partition.modules[m].name);
    ASSERT_GT(exact->modules[m].lambda_max, 0);
    EXPECT_LE(Rel(lz->modules[m].lambda_max, exact->modules[m].lambda_max), 1e-6);
    EXPECT_LE(Rel(lz->modules[m].trace, exact->modules[m].trace), 1e-6);
  }
}

// K < d: Ritz values are lower bounds, and a few steps already find λ_max closely (the
// kernels' spectra are dominated by their top eigenvalue).
TEST(LanczosTest, FewStepsGiveALowerBoundCloseToLambdaMax) {
  torch::manual_seed(3);
  Mlp mlp;
  torch::Tensor x = torch::randn({8, 5}, torch::kFloat64);  // d = 24
  auto exact = Make("exact-output", 1)->Estimate(mlp.partition, mlp.OutputProbe(x));
  ASSERT_TRUE(exact.ok());
  for (int k : {3, 6, 12}) {
    auto lz = Make("lanczos", k)->Estimate(mlp.partition, mlp.OutputProbe(x));
    ASSERT_TRUE(lz.ok()) << lz.status();
    for (size_t m = 0; m < 3; ++m) {
      SCOPED_TRACE("K " + std::to_string(k) + " module " + std::to_string(m));
      const double e = exact->modules[m].lambda_max, l = lz->modules[m].lambda_max;
      EXPECT_LE(l, e * (1 + 1e-9));
      EXPECT_GE(l, e * (k >= 6 ? 0.99 : 0.9));
      EXPECT_GT(lz->modules[m].trace, 0);
    }
    // The probe's cost counts every pass: the create_graph one and two per matvec (K per
    // module unless the Krylov space ran out first).
    if (k == 3) {
      EXPECT_EQ(lz->backward_passes, 1 + 2 * 3 * k);
    } else {
      EXPECT_GE(lz->backward_passes, 1 + 2 * 3);
      EXPECT_LE(lz->backward_passes, 1 + 2 * 3 * k);
    }
  }
}

TEST(LanczosTest, RejectsMalformedProbe) {
  torch::manual_seed(4);
  Mlp mlp;
  torch::Tensor x = torch::randn({6, 5}, torch::kFloat64);
  for (const std::string name : {"lanczos", "exact-output"}) {
    SCOPED_TRACE(name);
    auto est = Make(name, 4);
    EXPECT_TRUE(est->NeedsOutputs());
    EXPECT_EQ(est->OutputProjections(), 1);
    ProbeBatch none = mlp.OutputProbe(x);
    none.outputs = torch::Tensor();
    EXPECT_EQ(est->Estimate(mlp.partition, none).status().code(), absl::StatusCode::kInvalidArgument);
    ProbeBatch wrong_n = mlp.OutputProbe(x);
    wrong_n.outputs = wrong_n.outputs.slice(0, 0, 5);
    EXPECT_EQ(est->Estimate(mlp.partition, wrong_n).status().code(), absl::StatusCode::kInvalidArgument);
    ProbeBatch flat = mlp.OutputProbe(x);
    flat.outputs = flat.outputs.reshape({-1});
    EXPECT_EQ(est->Estimate(mlp.partition, flat).status().code(), absl::StatusCode::kInvalidArgument);
  }
  EXPECT_FALSE(Make("gram", 1)->NeedsOutputs());
  EXPECT_FALSE(Make("exact", 1)->NeedsOutputs());
  EstimatorOptions bad;
  bad.lanczos_iterations = 0;
  EXPECT_EQ(MakeEstimator("lanczos", bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = {};
  bad.projections = 0;
  EXPECT_EQ(MakeEstimator("exact-output", bad).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeEstimator("power").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mat::spectral
