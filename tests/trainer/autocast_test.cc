// bf16 autocast of the training step on CPU (the same code runs on CUDA; cuda_test.cc checks it
// there). Tolerances: bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ≈ 0.002 per value);
// through a 2-layer model the loss moves by well under 1 %, gradients by a few per cent.
#include "trainer/models/autocast.h"

#include <gtest/gtest.h>

#include <cmath>

#include "trainer/models/bert.h"
#include "trainer/trainer.h"
#include "tests/trainer/toy_run.h"

namespace mat::trainer {
namespace {

double RelDiff(const torch::Tensor& a, const torch::Tensor& b) {
  torch::Tensor x = a.detach().cpu().to(torch::kFloat64), y = b.detach().cpu().to(torch::kFloat64);
  return (x - y).norm().item<double>() / std::max(y.norm().item<double>(), 1e-6);
}

TEST(PrecisionTest, ParsesKnownNamesAndNamesTheBadOne) {
  EXPECT_EQ(*ParsePrecision("fp32"), Precision::kFloat32);
  EXPECT_EQ(*ParsePrecision("bf16"), Precision::kBFloat16);
  auto bad = ParsePrecision("fp16");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("'fp16'"), std::string::npos) << bad.status();
}

TEST(AutocastGuardTest, EnablesBf16InsideAndRestoresOutside) {
  EXPECT_FALSE(AutocastDtype(torch::kCPU).has_value());
  {
    AutocastGuard fp32(torch::Device(torch::kCPU), Precision::kFloat32);
    EXPECT_FALSE(AutocastDtype(torch::kCPU).has_value());
  }
  {
    AutocastGuard g(torch::Device(torch::kCPU), Precision::kBFloat16);
    ASSERT_TRUE(AutocastDtype(torch::kCPU).has_value());
    EXPECT_EQ(*AutocastDtype(torch::kCPU), at::kBFloat16);
    torch::Tensor y = torch::mm(torch::randn({4, 4}), torch::randn({4, 4}));
    EXPECT_EQ(y.scalar_type(), at::kBFloat16);
  }
  EXPECT_FALSE(AutocastDtype(torch::kCPU).has_value());
  EXPECT_EQ(torch::mm(torch::randn({4, 4}), torch::randn({4, 4})).scalar_type(), at::kFloat);
}

class Bf16ModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    testing::ModelPair p = testing::MakeModelPair(5);
    c_ = p.config;
    a_ = p.a;
    b_ = p.b;
    ids_ = p.ids;
    positions_ = p.positions;
    labels_ = p.labels;
  }
  BertConfig c_;
  BertMlm a_{nullptr}, b_{nullptr};
  torch::Tensor ids_, positions_, labels_;
};

TEST_F(Bf16ModelTest, MaskedStepAgreesWithFp32AndKeepsFp32Gradients) {
  std::vector<uint8_t> mask(c_.layers * (c_.heads + c_.ffn_groups), 1);
  mask[1] = mask[6] = mask[9] = 0;  // a head of each layer and an FFN group off
  a_->SetMask(mask);
  b_->SetMask(mask);
  torch::Tensor l32 = torch::nn::functional::cross_entropy(a_->forward(ids_, positions_), labels_);
  torch::Tensor l16;
  {
    AutocastGuard g(torch::Device(torch::kCPU), Precision::kBFloat16);
    torch::Tensor logits = b_->forward(ids_, positions_);
    EXPECT_EQ(logits.scalar_type(), at::kBFloat16);
    l16 = torch::nn::functional::cross_entropy(logits, labels_);
  }
  EXPECT_EQ(l16.scalar_type(), at::kFloat);  // autocast runs the loss in float32
  EXPECT_LE(RelDiff(l16, l32), 1e-2);
  l32.backward();
  l16.backward();
  auto pa = a_->Partition(), pb = b_->Partition();
  for (size_t m = 0; m < pa.modules.size(); ++m) {
    for (size_t k = 0; k < pa.modules[m].params.size(); ++k) {
      const torch::Tensor ga = pa.modules[m].params[k].grad();
      const torch::Tensor gb = pb.modules[m].params[k].grad();
      if (!mask[m]) {
        // Not computed: its rows of the layer's gradient are zero.
        EXPECT_TRUE(!gb.defined() || gb.abs().max().item<double>() == 0.0)
            << pb.modules[m].name << " is masked off but got a gradient";
        continue;
      }
      ASSERT_TRUE(gb.defined()) << pb.modules[m].name;
      EXPECT_EQ(gb.scalar_type(), at::kFloat) << pb.modules[m].name;
      if (ga.norm().item<double>() > 1e-6) {
        EXPECT_LE(RelDiff(gb, ga), 6e-2) << pb.modules[m].name << " param " << k;
      }
    }
  }
}

TEST(Bf16TrainerTest, FirstStepsTrackFp32) {
  config::TrainConfig c = testing::ToyConfig(testing::WriteToyCorpus("bf16_trainer"));
  c.model.dropout = 0;
  c.train.steps = 6;
  c.train.eval_every = 6;
  c.train.threads = 1;
  c.policy.kind = "full";
  auto run = [&](const std::string& precision) {
    config::TrainConfig k = c;
    k.train.precision = precision;
    auto t = Trainer::Create(k, {"", false, false});
    EXPECT_TRUE(t.ok()) << t.status();
    auto s = (*t)->Run();
    EXPECT_TRUE(s.ok()) << s.status();
    return *s;
  };
  nlohmann::json s32 = run("fp32"), s16 = run("bf16");
  const double v32 = s32["best_val_loss"].get<double>(), v16 = s16["best_val_loss"].get<double>();
  ASSERT_TRUE(std::isfinite(v16));
  EXPECT_NEAR(v16, v32, 0.02 * v32);
  EXPECT_NE(v16, v32) << "bf16 gave bit-identical losses: the step did not run under autocast";
  EXPECT_EQ(s16["precision"], "bf16");
}

}  // namespace
}  // namespace mat::trainer
