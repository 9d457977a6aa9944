// MaskedAdamW against LibTorch's own torch::optim::AdamW: the multi-tensor path gives the same
// trajectory in float32 and float64, also when modules are masked off for some steps (per-tensor
// step counts, groups of different bias corrections). Tolerances: 2e-6 relative in float32 (the
// two write the bias correction differently: sqrt(v/bc2) against sqrt(v)/sqrt(bc2)), 1e-12 in
// float64.
#include "trainer/optim/optimizer.h"

#include <gtest/gtest.h>

#include <torch/optim/adamw.h>

#include "tests/trainer/optim/split_fixture.h"

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

// Modules as views: a tensor split into module row segments is updated exactly as the same rows
// held as separate leaves (decay, bias corrections and lr scales per segment, both the
// multi-tensor and the per-tensor form), and a masked segment is never touched: its rows hold
// NaN gradients that any read would spread, and its values and moments stay bit for bit.
class SplitAdamWTest : public ::testing::TestWithParam<bool> {};

TEST_P(SplitAdamWTest, SplitTensorMatchesLeavesAndNeverTouchesMaskedRows) {
  testing::SplitCase c;
  AdamWOptions o;
  o.weight_decay = 0.1;
  o.fused = GetParam();
  MaskedAdamW split(c.split_entries, o), leaves(c.leaf_entries, o);
  const std::vector<std::vector<uint8_t>> masks = testing::SplitCaseMasks();
  for (size_t step = 0; step < masks.size(); ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    const std::vector<double> scale = {1.0, 0.5 + double(step % 3), 2.0};
    std::vector<torch::Tensor> before;
    for (size_t s = 0; s < c.segments.size(); ++s) {
      before.push_back(c.Rows(c.split, s).clone());
      before.push_back(c.Rows(split.exp_avg(0), s).clone());
      before.push_back(c.Rows(split.exp_avg_sq(0), s).clone());
    }
    c.SetGradients(masks[step]);
    ASSERT_TRUE(split.Step(0.05, masks[step], scale).ok());
    ASSERT_TRUE(leaves.Step(0.05, masks[step], scale).ok());
    EXPECT_FALSE(c.split.grad().defined()) << "Step resets the gradient";
    for (size_t s = 0; s < c.segments.size(); ++s) {
      SCOPED_TRACE("segment " + std::to_string(s));
      const int m = c.segments[s].module;
      if (m >= 0 && !masks[step][m]) {
        EXPECT_TRUE(torch::equal(c.Rows(c.split, s), before[3 * s]));
        EXPECT_TRUE(torch::equal(c.Rows(split.exp_avg(0), s), before[3 * s + 1]));
        EXPECT_TRUE(torch::equal(c.Rows(split.exp_avg_sq(0), s), before[3 * s + 2]));
      }
      EXPECT_LE(RelDiff(c.Rows(c.split, s), c.leaves[s].detach()), 1e-6);
      EXPECT_LE(RelDiff(c.Rows(split.exp_avg(0), s), leaves.exp_avg(s)), 1e-6);
      EXPECT_LE(RelDiff(c.Rows(split.exp_avg_sq(0), s), leaves.exp_avg_sq(s)), 1e-6);
      EXPECT_EQ(split.step_count(0, s), leaves.step_count(s));
    }
  }
  EXPECT_EQ(split.step_count(0, 0), 6);  // module 0 off twice
  EXPECT_EQ(split.step_count(0, 2), 8);  // the always-trained rows
}

INSTANTIATE_TEST_SUITE_P(MultiTensorAndPerTensor, SplitAdamWTest, ::testing::Bool());

TEST(SplitAdamWErrorsTest, AFullyMaskedSplitTensorMustHaveNoGradient) {
  testing::SplitCase c;
  c.split_entries[0].rows = {{0, 2, 0}, {2, 8, 1}};  // no always-trained rows
  MaskedAdamW opt(c.split_entries, {});
  c.split.mutable_grad() = torch::ones({8, 8});
  const torch::Tensor before = c.split.detach().clone();
  absl::Status s = opt.Step(0.05, {0, 0, 1}, {});
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(std::string(s.message()).find("parameter w is masked off"), std::string::npos) << s;
  EXPECT_TRUE(torch::equal(c.split.detach(), before)) << "an error changes nothing";
  EXPECT_EQ(opt.step_count(0, 0), 0);
  // One active segment: its rows are updated, the masked ones are not read.
  c.split.mutable_grad().narrow(0, 0, 2).fill_(NAN);
  ASSERT_TRUE(opt.Step(0.05, {0, 1, 1}, {}).ok());
  EXPECT_TRUE(torch::equal(c.split.detach().narrow(0, 0, 2), before.narrow(0, 0, 2)));
  EXPECT_FALSE(torch::equal(c.split.detach().narrow(0, 2, 6), before.narrow(0, 2, 6)));
}

TEST(SplitAdamWErrorsTest, SaveAndLoadKeepStepCountsPerSegment) {
  testing::SplitCase c;
  MaskedAdamW a(c.split_entries, {});
  for (const auto& mask : testing::SplitCaseMasks()) {
    c.SetGradients(mask);
    ASSERT_TRUE(a.Step(0.05, mask, {}).ok());
  }
  std::map<std::string, torch::Tensor> saved;
  a.Save(&saved);
  ASSERT_EQ(saved.at("opt.step.w").sizes(), torch::IntArrayRef({4}));
  MaskedAdamW b(c.split_entries, {});
  ASSERT_TRUE(b.Load(saved).ok());
  for (size_t s = 0; s < 4; ++s) EXPECT_EQ(b.step_count(0, s), a.step_count(0, s)) << s;
  EXPECT_TRUE(torch::equal(b.exp_avg(0), a.exp_avg(0)));
  saved["opt.step.w"] = torch::tensor(int64_t{3}, torch::kLong);  // an unsplit tensor's count
  absl::Status s = b.Load(saved);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(std::string(s.message()).find("4 segments"), std::string::npos) << s;
}

INSTANTIATE_TEST_SUITE_P(FloatAndDouble, MaskedAdamWTest,
                         ::testing::Values(Case{torch::kFloat, 2e-6}, Case{torch::kDouble, 1e-12}));

}  // namespace
}  // namespace mat::trainer
