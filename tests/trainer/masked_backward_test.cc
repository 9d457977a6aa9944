// A masked-off module gets no gradient computed and no optimizer update; everything else matches
// an unmasked reference step (relative difference <= 1e-6 in float32).
#include <gtest/gtest.h>

#include <map>
#include <set>

#include <torch/csrc/autograd/profiler_legacy.h>

#include "tests/trainer/toy_run.h"
#include "trainer/models/bert.h"
#include "trainer/models/flops.h"
#include "trainer/optim/optimizer.h"

namespace mat::trainer {
namespace {

constexpr double kRel = 1e-6;

// ‖a − b‖ / max(‖b‖, 1e-3). The floor matters for the key biases: softmax is invariant to
// q·b_k, so their exact gradient is 0 and what autograd returns is float round-off.
double RelDiff(const torch::Tensor& a, const torch::Tensor& b) {
  double denom = std::max(b.norm().item<double>(), 1e-3);
  return (a - b).norm().item<double>() / denom;
}

using testing::MakeNet;
using testing::Net;

class MaskedBackwardTest : public ::testing::Test {
 protected:
  void SetUp() override {
    c_.vocab_size = 40;
    c_.max_seq_len = 8;
    c_.layers = 2;
    c_.d_model = 16;
    c_.heads = 4;
    c_.d_ff = 32;
    c_.ffn_groups = 2;
    c_.dropout = 0;
    torch::manual_seed(11);
    ids_ = torch::randint(0, 40, {4, 8}, torch::kLong);
    positions_ = torch::tensor({1, 5, 9, 14, 20, 27, 31}, torch::kLong);
    labels_ = torch::randint(0, 40, {7}, torch::kLong);
  }

  double Backward(Net& n, const std::vector<uint8_t>& mask) {
    n.model->SetMask(mask);
    torch::Tensor loss =
        torch::nn::functional::cross_entropy(n.model->forward(ids_, positions_), labels_);
    loss.backward();
    return loss.item<double>();
  }

  BertConfig c_;
  torch::Tensor ids_, positions_, labels_;
};

TEST_F(MaskedBackwardTest, MaskedOffModulesGetNoGradientAndOthersMatchReference) {
  Net ref = MakeNet(c_), masked = MakeNet(c_);
  ASSERT_EQ(ref.partition.size(), 2 * 4 + 2 * 2);
  std::vector<uint8_t> all(ref.partition.size(), 1), mask = all;
  mask[0] = mask[2] = 0;  // layer 0, heads 0 and 2
  mask[7] = 0;            // layer 1, head 3
  mask[8 + 3] = 0;        // layer 1, FFN slice 1
  double l_ref = Backward(ref, all);
  double l_masked = Backward(masked, mask);
  EXPECT_NEAR(l_masked, l_ref, kRel * std::abs(l_ref));  // masks do not change the forward

  auto ref_params = ref.model->named_parameters();
  auto masked_params = masked.model->named_parameters();
  std::set<const void*> off;
  for (int m = 0; m < masked.partition.size(); ++m)
    if (!mask[m])
      for (const auto& p : masked.partition.modules[m].params) off.insert(p.unsafeGetTensorImpl());
  int checked_off = 0, checked_on = 0;
  for (const auto& kv : masked_params) {
    SCOPED_TRACE(kv.key());
    const torch::Tensor& g = kv.value().grad();
    if (off.count(kv.value().unsafeGetTensorImpl())) {
      EXPECT_FALSE(g.defined()) << "a masked-off parameter's gradient was computed";
      ++checked_off;
    } else {
      ASSERT_TRUE(g.defined());
      EXPECT_LE(RelDiff(g, ref_params[kv.key()].grad()), kRel);
      ++checked_on;
    }
  }
  EXPECT_EQ(checked_off, 3 * 7 + 3);  // 3 heads x 7 tensors, 1 FFN slice x 3 tensors
  EXPECT_GT(checked_on, 0);
}

TEST_F(MaskedBackwardTest, OptimizerLeavesMaskedOffStateUntouched) {
  Net ref = MakeNet(c_), masked = MakeNet(c_);
  std::vector<uint8_t> all(ref.partition.size(), 1), mask = all;
  mask[1] = 0;
  mask[10] = 0;  // layer 1, FFN slice 0
  std::vector<double> ones(all.size(), 1.0);
  // Two steps so moments and step counts are non-trivial.
  for (int step = 0; step < 2; ++step) {
    Backward(ref, all);
    ASSERT_TRUE(ref.opt->Step(1e-2, all, ones).ok());
  }
  for (int step = 0; step < 2; ++step) {
    Backward(masked, step == 0 ? all : mask);
    ASSERT_TRUE(masked.opt->Step(1e-2, step == 0 ? all : mask, ones).ok());
  }
  const auto& entries = masked.opt->params();
  int off_seen = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    SCOPED_TRACE(entries[i].name);
    const bool is_off = entries[i].module >= 0 && !mask[entries[i].module];
    if (is_off) {
      ++off_seen;
      // Exactly one step (the unmasked first one) was applied: value, moments and count.
      EXPECT_EQ(masked.opt->step_count(i), 1);
      EXPECT_FALSE(entries[i].param.grad().defined());
    } else {
      EXPECT_EQ(masked.opt->step_count(i), 2);
      // Key biases: their exact gradient is 0 (see RelDiff), and Adam's normalisation turns
      // their round-off gradient into ±lr steps, so their values are not comparable. They are
      // compared through their gradients in the test above.
      if (entries[i].name.find(".bk") != std::string::npos) continue;
      EXPECT_LE(RelDiff(entries[i].param.detach(), ref.opt->params()[i].param.detach()), kRel);
      EXPECT_LE(RelDiff(masked.opt->exp_avg(i), ref.opt->exp_avg(i)), kRel);
      EXPECT_LE(RelDiff(masked.opt->exp_avg_sq(i), ref.opt->exp_avg_sq(i)), kRel);
    }
  }
  EXPECT_EQ(off_seen, 7 + 3);
}

// The masked-off state after step 2 equals the state after step 1 of an identical net.
TEST_F(MaskedBackwardTest, MaskedOffParametersAndMomentsDoNotDrift) {
  Net once = MakeNet(c_), masked = MakeNet(c_);
  std::vector<uint8_t> all(once.partition.size(), 1), mask = all;
  mask[5] = 0;
  std::vector<double> ones(all.size(), 1.0);
  Backward(once, all);
  ASSERT_TRUE(once.opt->Step(1e-2, all, ones).ok());
  Backward(masked, all);
  ASSERT_TRUE(masked.opt->Step(1e-2, all, ones).ok());
  Backward(masked, mask);
  ASSERT_TRUE(masked.opt->Step(1e-2, mask, ones).ok());
  for (size_t i = 0; i < masked.opt->params().size(); ++i) {
    if (masked.opt->params()[i].module != 5) continue;
    SCOPED_TRACE(masked.opt->params()[i].name);
    EXPECT_TRUE(torch::equal(masked.opt->params()[i].param, once.opt->params()[i].param));
    EXPECT_TRUE(torch::equal(masked.opt->exp_avg(i), once.opt->exp_avg(i)));
    EXPECT_TRUE(torch::equal(masked.opt->exp_avg_sq(i), once.opt->exp_avg_sq(i)));
    EXPECT_EQ(masked.opt->step_count(i), once.opt->step_count(i));
  }
}

TEST_F(MaskedBackwardTest, OptimizerRefusesAGradientOnAMaskedOffModule) {
  Net n = MakeNet(c_);
  std::vector<uint8_t> all(n.partition.size(), 1), mask = all;
  mask[0] = 0;
  Backward(n, all);  // computes module 0's gradient
  absl::Status s = n.opt->Step(1e-2, mask, std::vector<double>(all.size(), 1.0));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(std::string(s.message()).find("masked off"), std::string::npos);
}

TEST_F(MaskedBackwardTest, LrScaleMultipliesTheStep) {
  Net a = MakeNet(c_), b = MakeNet(c_);
  std::vector<uint8_t> all(a.partition.size(), 1);
  std::vector<double> ones(all.size(), 1.0), scaled = ones;
  scaled[3] = 4.0;
  Backward(a, all);
  Backward(b, all);
  std::map<std::string, torch::Tensor> before;
  for (const auto& e : a.opt->params()) before[e.name] = e.param.detach().clone();
  ASSERT_TRUE(a.opt->Step(1e-3, all, ones).ok());
  ASSERT_TRUE(b.opt->Step(1e-3, all, scaled).ok());
  for (size_t i = 0; i < a.opt->params().size(); ++i) {
    const auto& e = a.opt->params()[i];
    if (e.module != 3 || e.param.dim() < 2) continue;
    torch::Tensor da = e.param.detach() - before[e.name];
    torch::Tensor db = b.opt->params()[i].param.detach() - before[e.name];
    EXPECT_LE(RelDiff(db, 4.0 * da), 1e-4) << e.name;
  }
}

// ---- policy.backward detach: a masked module is a constant in the backward ----

// Head h's contribution to layer l's attention output, computed by hand from its leaves:
// softmax((x W_q^T + b_q)(x W_k^T + b_k)^T / sqrt(d_h)) (x W_v^T + b_v) W_O^T. x: [B, T, d].
torch::Tensor OneHead(BertLayerImpl& layer, const torch::Tensor& x, int h) {
  const double dh = double(layer.qkv_w[h][0].size(0));
  auto lin = [&](int k) {
    return torch::nn::functional::linear(x, layer.qkv_w[h][k], layer.qkv_b[h][k]);
  };
  torch::Tensor p = torch::softmax(torch::matmul(lin(0), lin(1).transpose(1, 2)) / std::sqrt(dh), -1);
  return torch::nn::functional::linear(torch::matmul(p, lin(2)), layer.o_w[h]);
}

// FFN slice g's contribution: gelu(x W_1^T + b_1) W_2^T.
torch::Tensor OneSlice(BertLayerImpl& layer, const torch::Tensor& x, int g) {
  torch::Tensor h = torch::nn::functional::linear(x, layer.ff1_w[g][0], layer.ff1_b[g][0]);
  return torch::nn::functional::linear(torch::nn::functional::gelu(h), layer.ff2_w[g]);
}

class DetachBackwardTest : public ::testing::Test {
 protected:
  // Two copies of one float64 layer (4 heads, 2 FFN slices, no dropout): `detach` masks with
  // detach_masked, `plain` is the reference.
  void SetUp() override {
    c_.d_model = 8;
    c_.heads = 4;
    c_.d_ff = 16;
    c_.ffn_groups = 2;
    c_.dropout = 0;
    torch::manual_seed(21);
    BertConfig d = c_;
    d.detach_masked = true;
    detach_ = BertLayer(d, 0);
    plain_ = BertLayer(c_, 0);
    detach_->to(torch::kFloat64);
    plain_->to(torch::kFloat64);
    torch::NoGradGuard g;
    auto src = plain_->named_parameters();
    for (auto& kv : detach_->named_parameters()) {
      kv.value().copy_(src[kv.key()] + 0.1 * torch::randn_like(src[kv.key()]));
      src[kv.key()].copy_(kv.value());  // both random, biases included, and equal
    }
    x_ = torch::randn({3, 5, 8}, torch::kFloat64);
    r_ = torch::randn({3, 5, 8}, torch::kFloat64);
  }

  BertConfig c_;
  BertLayer detach_{nullptr}, plain_{nullptr};
  torch::Tensor x_, r_;
};

// Masked heads 1 and 3: the input gradient and every active head's gradients equal autograd's
// on the reference with those heads' outputs detached (y - y_h + y_h.detach()); the masked
// heads' leaves get no gradient; the forward is unchanged; and the input gradient differs from
// the weights mode's (the masked heads' paths are really cut).
TEST_F(DetachBackwardTest, AttentionEqualsAutogradWithTheMaskedHeadsDetached) {
  const std::vector<bool> active = {true, false, true, false};
  torch::Tensor xd = x_.clone().requires_grad_(true);
  torch::Tensor yd = detach_->Attention(xd, active);
  (yd * r_).sum().backward();

  torch::Tensor xr = x_.clone().requires_grad_(true);
  torch::Tensor y = plain_->Attention(xr, {true, true, true, true});
  for (int h : {1, 3}) {
    torch::Tensor yh = OneHead(*plain_, xr, h);
    y = y - yh + yh.detach();
  }
  (y * r_).sum().backward();
  EXPECT_TRUE(torch::allclose(yd, y, 1e-12, 1e-12)) << "the forward is the same";
  EXPECT_TRUE(torch::allclose(xd.grad(), xr.grad(), 1e-10, 1e-12));
  for (int h = 0; h < 4; ++h) {
    for (int k = 0; k < 3; ++k) {
      SCOPED_TRACE("head " + std::to_string(h) + " component " + std::to_string(k));
      if (active[h]) {
        ASSERT_TRUE(detach_->qkv_w[h][k].grad().defined());
        EXPECT_TRUE(torch::allclose(detach_->qkv_w[h][k].grad(), plain_->qkv_w[h][k].grad(),
                                    1e-10, 1e-12));
      } else {
        EXPECT_FALSE(detach_->qkv_w[h][k].grad().defined());
        EXPECT_FALSE(detach_->qkv_b[h][k].grad().defined());
      }
    }
    EXPECT_EQ(detach_->o_w[h].grad().defined(), bool(active[h]));
  }
  // The weights mode passes gradient through the masked heads: a different input gradient.
  torch::Tensor xw = x_.clone().requires_grad_(true);
  (plain_->Attention(xw, active) * r_).sum().backward();
  EXPECT_GT((xw.grad() - xd.grad()).abs().max().item<double>(), 1e-6);
}

TEST_F(DetachBackwardTest, FeedForwardEqualsAutogradWithTheMaskedSliceDetached) {
  torch::Tensor xd = x_.clone().requires_grad_(true);
  torch::Tensor yd = detach_->FeedForward(xd, {false, true}, {});
  (yd * r_).sum().backward();
  torch::Tensor xr = x_.clone().requires_grad_(true);
  torch::Tensor y = plain_->FeedForward(xr, {true, true}, {});
  torch::Tensor y0 = OneSlice(*plain_, xr, 0);
  y = y - y0 + y0.detach();
  (y * r_).sum().backward();
  EXPECT_TRUE(torch::allclose(yd, y, 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(xd.grad(), xr.grad(), 1e-10, 1e-12));
  EXPECT_FALSE(detach_->ff1_w[0][0].grad().defined());
  EXPECT_FALSE(detach_->ff2_w[0].grad().defined());
  ASSERT_TRUE(detach_->ff2_w[1].grad().defined());
  EXPECT_TRUE(torch::allclose(detach_->ff2_w[1].grad(), plain_->ff2_w[1].grad(), 1e-10, 1e-12));
}

TEST_F(DetachBackwardTest, EveryModuleMaskedLeavesOnlyTheResidualPath) {
  torch::Tensor xd = x_.clone().requires_grad_(true);
  torch::Tensor y = detach_->Attention(xd, {false, false, false, false});
  (y * r_).sum().backward();  // o_b is still trained
  EXPECT_FALSE(xd.grad().defined()) << "no path from the output back to x";
  ASSERT_TRUE(detach_->o_b.grad().defined());
}

// The profiler's count of the matmul FLOPs executed by a step's backward (aten::mm, addmm, bmm)
// equals the analytic activation_grad + weight_grad of trainer/models/flops.h, with and without
// detach, and detach does less work.
double ProfiledBackwardMatmulFlops(BertMlm& model, const torch::Tensor& ids,
                                   const torch::Tensor& positions, const torch::Tensor& labels) {
  torch::Tensor loss =
      torch::nn::functional::cross_entropy(model->forward(ids, positions), labels);
  double flops = 0;
  {
    using namespace torch::autograd::profiler;
    TLSLegacyProfilerGuard guard(
        torch::profiler::impl::ProfilerConfig(torch::profiler::impl::ProfilerState::CPU,
                                              /*report_input_shapes=*/true,
                                              /*profile_memory=*/false, /*with_stack=*/false,
                                              /*with_flops=*/true),
        [&flops](const thread_event_lists& lists) {
          for (const auto& list : lists) {
            for (const auto& e : list) {
              const std::string name = e.name();
              if (name == "aten::mm" || name == "aten::addmm" || name == "aten::bmm") {
                flops += double(const_cast<LegacyEvent&>(e).flops());
              }
            }
          }
        });
    loss.backward();
  }
  return flops;
}

TEST_F(MaskedBackwardTest, BackwardFlopsMatchTheProfilerInBothModes) {
  std::vector<uint8_t> mask(2 * 4 + 2 * 2, 1);
  mask[0] = mask[2] = 0;  // layer 0, heads 0 and 2
  mask[7] = 0;            // layer 1, head 3
  mask[8 + 3] = 0;        // layer 1, FFN slice 1
  std::map<bool, double> measured;
  for (bool detach : {false, true}) {
    SCOPED_TRACE(detach ? "detach" : "weights");
    BertConfig c = c_;
    c.detach_masked = detach;
    Net n = MakeNet(c);
    n.model->SetMask(mask);
    measured[detach] = ProfiledBackwardMatmulFlops(n.model, ids_, positions_, labels_);
    const FlopCounts f = BertStepFlops(c, 4, 8, 7, mask);
    ASSERT_GT(measured[detach], 0) << "the profiler counted the matmuls";
    EXPECT_NEAR(measured[detach], f.activation_grad + f.weight_grad, 1e-9 * measured[detach]);
  }
  EXPECT_LT(measured[true], measured[false]);
}

}  // namespace
}  // namespace mat::trainer
