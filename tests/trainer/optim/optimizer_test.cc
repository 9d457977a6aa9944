// MaskedAdamW against LibTorch's own torch::optim::AdamW: the multi-tensor path gives the same
// trajectory in float32 and float64, also when modules are masked off for some steps (per-tensor
// step counts, groups of different bias corrections). Tolerances: 2e-6 relative in float32 (the
// two write the bias correction differently: sqrt(v/bc2) against sqrt(v)/sqrt(bc2)), 1e-12 in
// float64.
#include "trainer/optim/optimizer.h"

#include <gtest/gtest.h>

#include <torch/optim/adamw.h>

namespace mat::trainer {
namespace {

double RelDiff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).norm().item<double>() / std::max(b.norm().item<double>(), 1e-12);
}

// Two modules of two tensors each plus a shared vector; gradients drawn per step from a seed.
struct Case {
  torch::Dtype dtype;
  double tol;
};

class MaskedAdamWTest : public ::testing::TestWithParam<Case> {};

TEST_P(MaskedAdamWTest, MatchesLibTorchAdamWPerModuleWithMasking) {
  const auto dtype = GetParam().dtype;
  torch::manual_seed(11);
  std::vector<std::vector<int64_t>> shapes = {{7, 5}, {5}, {3, 4}, {4}, {6}};
  std::vector<int> module = {0, 0, 1, 1, -1};
  std::vector<torch::Tensor> ours, ref;
  std::vector<ParamEntry> entries;
  for (size_t i = 0; i < shapes.size(); ++i) {
    torch::Tensor init = torch::randn(shapes[i], torch::TensorOptions().dtype(dtype));
    ours.push_back(init.clone().requires_grad_(true));
    ref.push_back(init.clone().requires_grad_(true));
    entries.push_back({"p" + std::to_string(i), ours.back(), module[i], init.dim() >= 2});
  }
  AdamWOptions o;
  o.weight_decay = 0.1;
  MaskedAdamW opt(entries, o);
  // LibTorch's AdamW, one optimizer per (module, decay) so a masked-off module's state and step
  // count stay put, as ours.
  auto make = [&](std::vector<size_t> idx, double wd) {
    std::vector<torch::Tensor> ps;
    for (size_t i : idx) ps.push_back(ref[i]);
    return std::make_unique<torch::optim::AdamW>(
        ps, torch::optim::AdamWOptions(0.05).betas({o.beta1, o.beta2}).eps(o.eps).weight_decay(wd));
  };
  auto m0w = make({0}, 0.1), m0b = make({1}, 0), m1w = make({2}, 0.1), m1b = make({3}, 0),
       shared = make({4}, 0);
  const std::vector<std::vector<uint8_t>> masks = {{1, 1}, {1, 0}, {1, 0}, {0, 1}, {1, 1}, {1, 1}};
  for (size_t step = 0; step < masks.size(); ++step) {
    for (size_t i = 0; i < shapes.size(); ++i) {
      if (module[i] >= 0 && !masks[step][module[i]]) continue;
      torch::Tensor g = torch::randn(shapes[i], torch::TensorOptions().dtype(dtype));
      ours[i].mutable_grad() = g.clone();
      ref[i].mutable_grad() = g.clone();
    }
    ASSERT_TRUE(opt.Step(0.05, masks[step], {}).ok());
    if (masks[step][0]) { m0w->step(); m0b->step(); }
    if (masks[step][1]) { m1w->step(); m1b->step(); }
    shared->step();
    for (auto* t : {&ref}) for (auto& p : *t) p.mutable_grad().reset();
    for (size_t i = 0; i < shapes.size(); ++i) {
      EXPECT_FALSE(ours[i].grad().defined()) << "Step resets gradients";
      EXPECT_LE(RelDiff(ours[i].detach(), ref[i].detach()), GetParam().tol)
          << "step " << step << " tensor " << i;
    }
  }
  EXPECT_EQ(opt.step_count(0), 5);  // module 0 off once
  EXPECT_EQ(opt.step_count(2), 4);  // module 1 off twice
  EXPECT_EQ(opt.step_count(4), 6);
}

// The multi-tensor form and the per-tensor reference agree to float32 rounding over 20 steps.
TEST(MaskedAdamWFusedTest, MultiTensorMatchesThePerTensorReference) {
  torch::manual_seed(3);
  torch::Tensor a0 = torch::randn({64, 33}), b0 = torch::randn({33});
  std::vector<torch::Tensor> pf = {a0.clone(), b0.clone()}, pr = {a0.clone(), b0.clone()};
  AdamWOptions fused, plain;
  plain.fused = false;
  MaskedAdamW of({{"a", pf[0], 0, true}, {"b", pf[1], -1, false}}, fused);
  MaskedAdamW orf({{"a", pr[0], 0, true}, {"b", pr[1], -1, false}}, plain);
  for (int step = 0; step < 20; ++step) {
    for (int i = 0; i < 2; ++i) {
      torch::Tensor g = torch::randn(pf[i].sizes());
      pf[i].mutable_grad() = g.clone();
      pr[i].mutable_grad() = g.clone();
    }
    ASSERT_TRUE(of.Step(1e-2, {1}, {}).ok());
    ASSERT_TRUE(orf.Step(1e-2, {1}, {}).ok());
  }
  for (int i = 0; i < 2; ++i) {
    EXPECT_LE(RelDiff(pf[i], pr[i]), 1e-6) << i;
    EXPECT_LE(RelDiff(of.exp_avg_sq(i), orf.exp_avg_sq(i)), 1e-6) << i;
  }
}

INSTANTIATE_TEST_SUITE_P(FloatAndDouble, MaskedAdamWTest,
                         ::testing::Values(Case{torch::kFloat, 2e-6}, Case{torch::kDouble, 1e-12}));

}  // namespace
}  // namespace mat::trainer
