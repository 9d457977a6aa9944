// MaskedSgd against LibTorch's torch::optim::SGD: with nothing masked the trajectories are
// bit-identical (the same ops in the same order), in float32 and float64, with and without
// Nesterov momentum, with coupled weight decay on matrices only. A masked-off module's tensors
// and momentum buffers stay bit-identical while the others move; lr_scale scales a module's
// step as a k-times larger learning rate would; the state survives Save/Load.
#include "trainer/optim/sgd.h"

#include <gtest/gtest.h>

#include <torch/optim/sgd.h>

#include "tests/trainer/optim/split_fixture.h"

namespace mat::trainer {
namespace {

const std::vector<std::vector<int64_t>> kShapes = {{7, 5}, {5}, {3, 4, 3, 3}, {4}, {6}};
const std::vector<int> kModule = {0, 0, 1, 1, -1};

struct Params {
  std::vector<torch::Tensor> ours, ref;
  std::vector<ParamEntry> entries;
};

Params MakeParams(torch::Dtype dtype) {
  torch::manual_seed(11);
  Params p;
  for (size_t i = 0; i < kShapes.size(); ++i) {
    torch::Tensor init = torch::randn(kShapes[i], torch::TensorOptions().dtype(dtype));
    p.ours.push_back(init.clone().requires_grad_(true));
    p.ref.push_back(init.clone().requires_grad_(true));
    p.entries.push_back({"p" + std::to_string(i), p.ours.back(), kModule[i], init.dim() >= 2});
  }
  return p;
}

struct Case {
  torch::Dtype dtype;
  bool nesterov;
  double dampening;
};

class MaskedSgdTest : public ::testing::TestWithParam<Case> {};

TEST_P(MaskedSgdTest, MatchesLibTorchSgdBitForBitWithNothingMasked) {
  const Case c = GetParam();
  Params p = MakeParams(c.dtype);
  SgdOptions o;
  o.momentum = 0.9;
  o.weight_decay = 0.01;
  o.nesterov = c.nesterov;
  o.dampening = c.dampening;
  MaskedSgd opt(p.entries, o);
  // LibTorch's SGD with decay on the matrices only: one optimizer for each kind.
  auto make = [&](std::vector<size_t> idx, double wd) {
    std::vector<torch::Tensor> ps;
    for (size_t i : idx) ps.push_back(p.ref[i]);
    return std::make_unique<torch::optim::SGD>(
        ps, torch::optim::SGDOptions(0.05).momentum(o.momentum).dampening(o.dampening)
                .weight_decay(wd).nesterov(o.nesterov));
  };
  auto decay = make({0, 2}, o.weight_decay), no_decay = make({1, 3, 4}, 0);
  for (int step = 0; step < 8; ++step) {
    for (size_t i = 0; i < kShapes.size(); ++i) {
      torch::Tensor g = torch::randn(kShapes[i], torch::TensorOptions().dtype(c.dtype));
      p.ours[i].mutable_grad() = g.clone();
      p.ref[i].mutable_grad() = g.clone();
    }
    ASSERT_TRUE(opt.Step(0.05, {1, 1}, {}).ok());
    decay->step();
    no_decay->step();
    for (size_t i = 0; i < kShapes.size(); ++i) {
      EXPECT_FALSE(p.ours[i].grad().defined()) << "Step resets gradients";
      EXPECT_TRUE(p.ours[i].detach().equal(p.ref[i].detach()))
          << "step " << step << " tensor " << i;
    }
  }
  EXPECT_EQ(opt.step_count(0), 8);
}

INSTANTIATE_TEST_SUITE_P(Variants, MaskedSgdTest,
                         ::testing::Values(Case{torch::kFloat, false, 0},
                                           Case{torch::kFloat, true, 0},
                                           Case{torch::kDouble, false, 0},
                                           Case{torch::kDouble, true, 0},
                                           Case{torch::kFloat, false, 0.3}));

TEST(MaskedSgdMaskTest, MaskedModuleAndItsMomentumStayBitIdentical) {
  Params p = MakeParams(torch::kFloat);
  MaskedSgd opt(p.entries, SgdOptions{});
  auto grads = [&](const std::vector<uint8_t>& mask) {
    for (size_t i = 0; i < kShapes.size(); ++i) {
      if (kModule[i] >= 0 && !mask[kModule[i]]) continue;
      p.ours[i].mutable_grad() = torch::randn(kShapes[i]);
    }
  };
  grads({1, 1});
  ASSERT_TRUE(opt.Step(0.1, {1, 1}, {}).ok());
  std::vector<torch::Tensor> before, buf_before;
  for (size_t i = 0; i < kShapes.size(); ++i) {
    before.push_back(p.ours[i].detach().clone());
    buf_before.push_back(opt.momentum_buffer(i).clone());
  }
  for (int step = 0; step < 3; ++step) {
    grads({1, 0});
    ASSERT_TRUE(opt.Step(0.1, {1, 0}, {}).ok());
  }
  for (size_t i = 0; i < kShapes.size(); ++i) {
    const bool masked = kModule[i] == 1;
    EXPECT_EQ(p.ours[i].detach().equal(before[i]), masked) << "tensor " << i;
    EXPECT_EQ(opt.momentum_buffer(i).equal(buf_before[i]), masked) << "buffer " << i;
    EXPECT_EQ(opt.step_count(i), masked ? 1 : 4) << "tensor " << i;
  }
  // A gradient on a masked tensor is a masking bug: refused, and nothing moves.
  grads({1, 1});
  const torch::Tensor p0 = p.ours[0].detach().clone(), b0 = opt.momentum_buffer(0).clone();
  EXPECT_EQ(opt.Step(0.1, {1, 0}, {}).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(p.ours[0].detach().equal(p0)) << "a refused step changes nothing";
  EXPECT_TRUE(opt.momentum_buffer(0).equal(b0));
  EXPECT_EQ(opt.step_count(0), 4);
  EXPECT_EQ(opt.Step(0.1, {1}, {}).code(), absl::StatusCode::kInvalidArgument);
}

TEST(MaskedSgdMaskTest, LrScaleActsAsAModuleLearningRate) {
  Params p = MakeParams(torch::kDouble);
  SgdOptions o;
  MaskedSgd opt(p.entries, o);
  // Reference: module 1's tensors with a 3x learning rate.
  std::vector<torch::Tensor> slow = {p.ref[0], p.ref[1], p.ref[4]}, fast = {p.ref[2], p.ref[3]};
  torch::optim::SGD ref_slow(slow, torch::optim::SGDOptions(0.02).momentum(o.momentum));
  torch::optim::SGD ref_fast(fast, torch::optim::SGDOptions(0.06).momentum(o.momentum));
  for (int step = 0; step < 4; ++step) {
    for (size_t i = 0; i < kShapes.size(); ++i) {
      torch::Tensor g = torch::randn(kShapes[i], torch::kDouble);
      p.ours[i].mutable_grad() = g.clone();
      p.ref[i].mutable_grad() = g.clone();
      if (kShapes[i].size() >= 2) p.ref[i].mutable_grad().add_(p.ref[i].detach(), o.weight_decay);
    }
    ASSERT_TRUE(opt.Step(0.02, {1, 1}, {1.0, 3.0}).ok());
    ref_slow.step();
    ref_fast.step();
    for (size_t i = 0; i < kShapes.size(); ++i) {
      EXPECT_TRUE(torch::allclose(p.ours[i].detach(), p.ref[i].detach(), 1e-12, 1e-12))
          << "step " << step << " tensor " << i;
    }
  }
}

TEST(MaskedSgdMaskTest, SaveLoadRestoresMomentumAndCounts) {
  Params p = MakeParams(torch::kFloat);
  MaskedSgd opt(p.entries, SgdOptions{});
  for (size_t i = 0; i < kShapes.size(); ++i) {
    if (kModule[i] != 1) p.ours[i].mutable_grad() = torch::randn(kShapes[i]);
  }
  ASSERT_TRUE(opt.Step(0.1, {1, 0}, {}).ok());
  std::map<std::string, torch::Tensor> state;
  opt.Save(&state);

  Params q = MakeParams(torch::kFloat);
  MaskedSgd restored(q.entries, SgdOptions{});
  ASSERT_TRUE(restored.Load(state).ok());
  for (size_t i = 0; i < kShapes.size(); ++i) {
    EXPECT_EQ(restored.step_count(i), opt.step_count(i));
    EXPECT_EQ(restored.momentum_buffer(i).defined(), opt.momentum_buffer(i).defined()) << i;
    if (opt.momentum_buffer(i).defined()) {
      EXPECT_TRUE(restored.momentum_buffer(i).equal(opt.momentum_buffer(i))) << i;
    }
  }
  const std::map<std::string, torch::Tensor> bad;
  EXPECT_EQ(restored.Load(bad).code(), absl::StatusCode::kDataLoss);
}

// Modules as views: a tensor split into module row segments moves exactly as the same rows held
// as separate leaves (momentum started per segment at its first update, coupled decay, lr
// scales), and a masked segment's rows and momentum rows stay bit for bit (its gradient rows are
// NaN, which any read would spread).
TEST(MaskedSgdSplitTest, SplitTensorMatchesLeavesAndNeverTouchesMaskedRows) {
  for (bool nesterov : {false, true}) {
    SCOPED_TRACE(nesterov ? "nesterov" : "momentum");
    testing::SplitCase c;
    SgdOptions o;
    o.weight_decay = 0.01;
    o.nesterov = nesterov;
    MaskedSgd split(c.split_entries, o), leaves(c.leaf_entries, o);
    // Module 1 starts masked, so its first update comes after the others'.
    std::vector<std::vector<uint8_t>> masks = testing::SplitCaseMasks();
    masks[0] = {1, 0, 1};
    for (size_t step = 0; step < masks.size(); ++step) {
      SCOPED_TRACE("step " + std::to_string(step));
      const std::vector<double> scale = {1.0, 3.0, 0.5};
      std::vector<torch::Tensor> before;
      for (size_t s = 0; s < c.segments.size(); ++s) before.push_back(c.Rows(c.split, s).clone());
      torch::Tensor buf_before =
          split.momentum_buffer(0).defined() ? split.momentum_buffer(0).clone() : torch::Tensor();
      c.SetGradients(masks[step]);
      ASSERT_TRUE(split.Step(0.1, masks[step], scale).ok());
      ASSERT_TRUE(leaves.Step(0.1, masks[step], scale).ok());
      for (size_t s = 0; s < c.segments.size(); ++s) {
        SCOPED_TRACE("segment " + std::to_string(s));
        const int m = c.segments[s].module;
        if (m >= 0 && !masks[step][m]) {
          EXPECT_TRUE(torch::equal(c.Rows(c.split, s), before[s]));
          if (buf_before.defined()) {
            EXPECT_TRUE(torch::equal(c.Rows(split.momentum_buffer(0), s), c.Rows(buf_before, s)));
          }
        }
        EXPECT_TRUE(torch::allclose(c.Rows(c.split, s), c.leaves[s].detach(), 1e-6, 1e-7));
        if (leaves.momentum_buffer(s).defined()) {
          EXPECT_TRUE(torch::allclose(c.Rows(split.momentum_buffer(0), s),
                                      leaves.momentum_buffer(s), 1e-6, 1e-7));
        }
        EXPECT_EQ(split.step_count(0, s), leaves.step_count(s));
      }
    }
  }
}

}  // namespace
}  // namespace mat::trainer
