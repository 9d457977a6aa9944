// A masked-off module gets no gradient computed (its rows of the layer's gradient stay zero) and
// no optimizer update; everything else matches an unmasked reference step (relative difference
// <= 1e-6 in float32).
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
    c_ = testing::MaskingTestConfig();
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

// Rows [begin, end) of t (t itself when it is undefined).
torch::Tensor RowsOf(const torch::Tensor& t, int64_t begin, int64_t end) {
  return t.defined() ? t.narrow(0, begin, end - begin) : t;
}

// The rows of a segment without the key-bias rows of a QKV bias ([head][q, k, v][d_h] layout):
// softmax is invariant to q·b_k, so their exact gradient is 0 and what autograd returns is float
// round-off that Adam's normalisation turns into ±lr steps; they are compared through their
// gradients in the test above.
torch::Tensor WithoutKeyBias(const ParamEntry& e, const torch::Tensor& rows, int64_t dh) {
  if (e.name.find(".bqkv") == std::string::npos) return rows;
  return rows.reshape({-1, 3, dh}).index_select(1, torch::tensor({0, 2}, torch::kLong));
}

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

  const auto [checked_off, checked_on] =
      testing::ExpectModuleGradients(masked.partition, ref.partition, mask, kRel);
  EXPECT_EQ(checked_off, 3 * 3 + 3);  // 3 heads x 3 slices, 1 FFN slice x 3 slices
  EXPECT_GT(checked_on, 0);
  // Everything outside the modules (embeddings, layer norms, W_O's bias, the head) as well.
  auto ref_params = ref.model->named_parameters();
  for (const ParamEntry& e : masked.opt->params()) {
    if (e.module >= 0 || !e.rows.empty()) continue;
    SCOPED_TRACE(e.name);
    ASSERT_TRUE(e.param.grad().defined());
    EXPECT_LE(RelDiff(e.param.grad(), ref_params[e.name].grad()), kRel);
  }
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
  const int64_t dh = c_.d_model / c_.heads;
  int off_seen = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const std::vector<ParamSegment> segments = entries[i].Segments();
    for (size_t s = 0; s < segments.size(); ++s) {
      const ParamSegment& seg = segments[s];
      SCOPED_TRACE(entries[i].name + " rows " + std::to_string(seg.begin));
      const bool is_off = seg.module >= 0 && !mask[seg.module];
      if (is_off) {
        ++off_seen;
        // Exactly one step (the unmasked first one) was applied: value, moments and count.
        EXPECT_EQ(masked.opt->step_count(i, s), 1);
        continue;
      }
      EXPECT_EQ(masked.opt->step_count(i, s), 2);
      auto rows = [&](const torch::Tensor& t) {
        return WithoutKeyBias(entries[i], RowsOf(t.detach(), seg.begin, seg.end), dh);
      };
      EXPECT_LE(RelDiff(rows(entries[i].param), rows(ref.opt->params()[i].param)), kRel);
      EXPECT_LE(RelDiff(rows(masked.opt->exp_avg(i)), rows(ref.opt->exp_avg(i))), kRel);
      EXPECT_LE(RelDiff(rows(masked.opt->exp_avg_sq(i)), rows(ref.opt->exp_avg_sq(i))), kRel);
    }
    EXPECT_FALSE(entries[i].param.grad().defined()) << "Step resets every gradient";
  }
  EXPECT_EQ(off_seen, 3 + 3);  // head 1: rows of wqkv, bqkv, wo_t; FFN slice 0: wff1, bff1, wff2_t
}

// The masked-off rows after step 2 equal the rows after step 1 of an identical net, bit for bit.
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
  int seen = 0;
  for (size_t i = 0; i < masked.opt->params().size(); ++i) {
    const std::vector<ParamSegment> segments = masked.opt->params()[i].Segments();
    for (size_t s = 0; s < segments.size(); ++s) {
      const ParamSegment& seg = segments[s];
      if (seg.module != 5) continue;
      SCOPED_TRACE(masked.opt->params()[i].name);
      ++seen;
      auto rows = [&](const torch::Tensor& t) { return RowsOf(t.detach(), seg.begin, seg.end); };
      EXPECT_TRUE(torch::equal(rows(masked.opt->params()[i].param), rows(once.opt->params()[i].param)));
      EXPECT_TRUE(torch::equal(rows(masked.opt->exp_avg(i)), rows(once.opt->exp_avg(i))));
      EXPECT_TRUE(torch::equal(rows(masked.opt->exp_avg_sq(i)), rows(once.opt->exp_avg_sq(i))));
      EXPECT_EQ(masked.opt->step_count(i, s), once.opt->step_count(i, s));
    }
  }
  EXPECT_EQ(seen, 3);
}

// A layer's split tensor all of whose modules are masked off must have no gradient.
TEST_F(MaskedBackwardTest, OptimizerRefusesAGradientOnAMaskedOffModule) {
  Net n = MakeNet(c_);
  std::vector<uint8_t> all(n.partition.size(), 1), mask = all;
  for (int h = 0; h < 4; ++h) mask[h] = 0;  // every head of layer 0
  Backward(n, all);  // computes layer 0's QKV gradient
  absl::Status s = n.opt->Step(1e-2, mask, std::vector<double>(all.size(), 1.0));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(std::string(s.message()).find("masked off"), std::string::npos);
  EXPECT_NE(std::string(s.message()).find("layer0.wqkv"), std::string::npos) << s.message();
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
  int seen = 0;
  for (size_t i = 0; i < a.opt->params().size(); ++i) {
    const auto& e = a.opt->params()[i];
    if (e.param.dim() < 2) continue;
    for (const ParamSegment& seg : e.Segments()) {
      if (seg.module != 3) continue;
      ++seen;
      torch::Tensor da = RowsOf(e.param.detach() - before[e.name], seg.begin, seg.end);
      torch::Tensor db =
          RowsOf(b.opt->params()[i].param.detach() - before[e.name], seg.begin, seg.end);
      EXPECT_LE(RelDiff(db, 4.0 * da), 1e-4) << e.name;
    }
  }
  EXPECT_EQ(seen, 2);  // wqkv and wo_t rows of head 3
}

// ---- policy.backward detach: a masked module is a constant in the backward ----

// Head h's contribution to layer l's attention output, computed by hand from its rows of the
// layer's tensors: softmax((x W_q^T + b_q)(x W_k^T + b_k)^T / sqrt(d_h)) (x W_v^T + b_v) W_O^T.
// x: [B, T, d].
torch::Tensor OneHead(BertLayerImpl& layer, const torch::Tensor& x, int h) {
  const RowBlock rows = layer.QkvRows(h), o = layer.ORows(h);
  const int64_t dh = o.end - o.begin;
  auto lin = [&](int k) {
    return torch::nn::functional::linear(x, layer.qkv_w.narrow(0, rows.begin + k * dh, dh),
                                         layer.qkv_b.narrow(0, rows.begin + k * dh, dh));
  };
  torch::Tensor p =
      torch::softmax(torch::matmul(lin(0), lin(1).transpose(1, 2)) / std::sqrt(double(dh)), -1);
  return torch::nn::functional::linear(torch::matmul(p, lin(2)),
                                       layer.o_w_t.narrow(0, o.begin, dh).t());
}

// FFN slice g's contribution: gelu(x W_1^T + b_1) W_2^T.
torch::Tensor OneSlice(BertLayerImpl& layer, const torch::Tensor& x, int g) {
  const RowBlock r = layer.FfnRows(g);
  const int64_t n = r.end - r.begin;
  torch::Tensor h = torch::nn::functional::linear(x, layer.ff1_w.narrow(0, r.begin, n),
                                                  layer.ff1_b.narrow(0, r.begin, n));
  return torch::nn::functional::linear(torch::nn::functional::gelu(h),
                                       layer.ff2_w_t.narrow(0, r.begin, n).t());
}

// Rows `r` of t's gradient (undefined when t has none).
torch::Tensor GradRows(const torch::Tensor& t, RowBlock r) {
  return RowsOf(t.grad(), r.begin, r.end);
}

// True when t has no gradient or a zero one in rows `r`: not computed.
bool NoGradIn(const torch::Tensor& t, RowBlock r) {
  const torch::Tensor g = GradRows(t, r);
  return !g.defined() || g.abs().max().item<double>() == 0.0;
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
// heads' rows get no gradient; the forward is unchanged; and the input gradient differs from
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
    SCOPED_TRACE("head " + std::to_string(h));
    const RowBlock qkv = detach_->QkvRows(h), o = detach_->ORows(h);
    if (active[h]) {
      ASSERT_TRUE(detach_->qkv_w.grad().defined());
      EXPECT_TRUE(torch::allclose(GradRows(detach_->qkv_w, qkv), GradRows(plain_->qkv_w, qkv),
                                  1e-10, 1e-12));
      EXPECT_TRUE(torch::allclose(GradRows(detach_->qkv_b, qkv), GradRows(plain_->qkv_b, qkv),
                                  1e-10, 1e-12));
      EXPECT_TRUE(torch::allclose(GradRows(detach_->o_w_t, o), GradRows(plain_->o_w_t, o),
                                  1e-10, 1e-12));
    } else {
      EXPECT_TRUE(NoGradIn(detach_->qkv_w, qkv));
      EXPECT_TRUE(NoGradIn(detach_->qkv_b, qkv));
      EXPECT_TRUE(NoGradIn(detach_->o_w_t, o));
    }
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
  const RowBlock off = detach_->FfnRows(0), on = detach_->FfnRows(1);
  EXPECT_TRUE(NoGradIn(detach_->ff1_w, off));
  EXPECT_TRUE(NoGradIn(detach_->ff2_w_t, off));
  ASSERT_TRUE(detach_->ff2_w_t.grad().defined());
  EXPECT_TRUE(torch::allclose(GradRows(detach_->ff2_w_t, on), GradRows(plain_->ff2_w_t, on),
                              1e-10, 1e-12));
  EXPECT_TRUE(torch::allclose(GradRows(detach_->ff1_w, on), GradRows(plain_->ff1_w, on),
                              1e-10, 1e-12));
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
