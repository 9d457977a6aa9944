// CPU against CUDA on the same weights and inputs (label gpu; skipped without a CUDA device).
// Tolerances: float32 on both sides, TF32 off (LibTorch's default for matmuls); reductions run in
// a different order on the GPU, so 1e-4 relative for activations and gradients, 1e-3 for λ.
// bf16 autocast on CUDA against float32 on CPU: 1e-2 relative for the loss, 6e-2 for gradients
// (8 mantissa bits; the same bounds as autocast_test.cc on CPU).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "spectral/gram_estimator.h"
#include "trainer/models/autocast.h"
#include "trainer/models/bert.h"
#include "trainer/optim/optimizer.h"
#include "trainer/trainer.h"
#include "tests/trainer/toy_run.h"

namespace mat::trainer {
namespace {

double RelDiff(const torch::Tensor& a, const torch::Tensor& b) {
  torch::Tensor x = a.detach().cpu().to(torch::kFloat64), y = b.detach().cpu().to(torch::kFloat64);
  return (x - y).norm().item<double>() / std::max(y.norm().item<double>(), 1e-3);
}

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
    testing::ModelPair p = testing::MakeModelPair(3);
    c_ = p.config;
    cpu_ = p.a;
    cuda_ = p.b;
    cuda_->to(torch::kCUDA);
    ids_ = p.ids;
    positions_ = p.positions;
    labels_ = p.labels;
  }

  BertConfig c_;
  BertMlm cpu_{nullptr}, cuda_{nullptr};
  torch::Tensor ids_, positions_, labels_;
};

TEST_F(CudaTest, MaskedForwardAndBackwardAgreeWithCpu) {
  std::vector<uint8_t> mask(c_.layers * (c_.heads + c_.ffn_groups), 1);
  mask[1] = mask[6] = mask[9] = 0;
  cpu_->SetMask(mask);
  cuda_->SetMask(mask);
  torch::Tensor lc = torch::nn::functional::cross_entropy(cpu_->forward(ids_, positions_), labels_);
  torch::Tensor lg = torch::nn::functional::cross_entropy(
      cuda_->forward(ids_.cuda(), positions_.cuda()), labels_.cuda());
  EXPECT_LE(RelDiff(lg, lc), 1e-5);
  lc.backward();
  lg.backward();
  auto cpu_params = cpu_->named_parameters();
  int undefined = 0;
  for (const auto& kv : cuda_->named_parameters()) {
    SCOPED_TRACE(kv.key());
    const torch::Tensor& g = kv.value().grad();
    const torch::Tensor& ref = cpu_params[kv.key()].grad();
    ASSERT_EQ(g.defined(), ref.defined());
    if (!g.defined()) {
      ++undefined;
      continue;
    }
    EXPECT_TRUE(g.is_cuda());
    EXPECT_LE(RelDiff(g, ref), 1e-4);
  }
  // A layer with an active module has its whole gradient; the masked modules' rows are zero.
  EXPECT_EQ(undefined, 0);
  const spectral::ModulePartition part = cuda_->Partition();
  for (size_t m = 0; m < part.modules.size(); ++m) {
    if (mask[m]) continue;
    for (const auto& slice : part.modules[m].params) {
      ASSERT_TRUE(slice.grad().defined()) << part.modules[m].name;
      EXPECT_EQ(slice.grad().abs().max().item<double>(), 0.0) << part.modules[m].name;
    }
  }
}

TEST_F(CudaTest, GramLambdasAgreeWithCpu) {
  auto probe = [&](BertMlm& m, const torch::Device& d) {
    spectral::SiteRecorder rec;
    m->SetMask(std::vector<uint8_t>(c_.layers * (c_.heads + c_.ffn_groups), 1));
    m->SetRecorder(&rec);
    torch::Tensor logits = m->forward(ids_.to(d), positions_.to(d));
    m->SetRecorder(nullptr);
    torch::Tensor ce = torch::nn::functional::cross_entropy(
        logits, labels_.to(d), torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
    torch::Tensor sample = torch::div(positions_.to(d), 16, "floor");
    torch::Tensor losses = torch::zeros({6}, ce.options()).index_add(0, sample, ce);
    auto r = spectral::GramEstimator().Estimate(m->Partition(), {losses, rec.Take(), {}});
    EXPECT_TRUE(r.ok()) << r.status();
    return *r;
  };
  auto a = probe(cpu_, torch::kCPU);
  auto b = probe(cuda_, torch::kCUDA);
  ASSERT_EQ(a.modules.size(), b.modules.size());
  for (size_t m = 0; m < a.modules.size(); ++m) {
    EXPECT_NEAR(b.modules[m].lambda_max, a.modules[m].lambda_max, 1e-3 * a.modules[m].lambda_max) << m;
    EXPECT_NEAR(b.modules[m].trace, a.modules[m].trace, 1e-3 * a.modules[m].trace) << m;
  }
}

TEST_F(CudaTest, OptimizerStepAgreesWithCpu) {
  std::vector<uint8_t> mask(c_.layers * (c_.heads + c_.ffn_groups), 1);
  mask[2] = 0;
  MaskedAdamW oc(BuildParamEntries(*cpu_, cpu_->Partition()), {});
  MaskedAdamW og(BuildParamEntries(*cuda_, cuda_->Partition()), {});
  std::vector<double> ones(mask.size(), 1.0);
  for (int step = 0; step < 3; ++step) {
    cpu_->SetMask(mask);
    cuda_->SetMask(mask);
    torch::nn::functional::cross_entropy(cpu_->forward(ids_, positions_), labels_).backward();
    torch::nn::functional::cross_entropy(cuda_->forward(ids_.cuda(), positions_.cuda()), labels_.cuda()).backward();
    ASSERT_TRUE(oc.Step(1e-3, mask, ones).ok());
    ASSERT_TRUE(og.Step(1e-3, mask, ones).ok());
  }
  for (size_t i = 0; i < oc.params().size(); ++i) {
    torch::Tensor a = og.params()[i].param.detach().cpu(), b = oc.params()[i].param.detach();
    if (oc.params()[i].name.find(".bqkv") != std::string::npos) {  // key biases: zero-gradient noise
      const auto qv = torch::tensor({0, 2}, torch::kLong);
      const int64_t dh = c_.d_model / c_.heads;
      a = a.reshape({-1, 3, dh}).index_select(1, qv);
      b = b.reshape({-1, 3, dh}).index_select(1, qv);
    }
    EXPECT_LE(RelDiff(a, b), 1e-4) << oc.params()[i].name;
  }
}

TEST_F(CudaTest, Bf16MaskedStepAgreesWithFp32Cpu) {
  std::vector<uint8_t> mask(c_.layers * (c_.heads + c_.ffn_groups), 1);
  mask[2] = mask[5] = mask[8] = 0;
  cpu_->SetMask(mask);
  cuda_->SetMask(mask);
  torch::Tensor lc = torch::nn::functional::cross_entropy(cpu_->forward(ids_, positions_), labels_);
  torch::Tensor lg;
  {
    AutocastGuard g(torch::Device(torch::kCUDA), Precision::kBFloat16);
    torch::Tensor logits = cuda_->forward(ids_.cuda(), positions_.cuda());
    EXPECT_EQ(logits.scalar_type(), at::kBFloat16);
    lg = torch::nn::functional::cross_entropy(logits, labels_.cuda());
  }
  EXPECT_LE(RelDiff(lg, lc), 1e-2);
  lc.backward();
  lg.backward();
  auto pc = cpu_->Partition(), pg = cuda_->Partition();
  for (size_t m = 0; m < pc.modules.size(); ++m) {
    for (size_t k = 0; k < pc.modules[m].params.size(); ++k) {
      const torch::Tensor gg = pg.modules[m].params[k].grad();
      if (!mask[m]) {
        EXPECT_TRUE(!gg.defined() || gg.abs().max().item<double>() == 0.0) << pg.modules[m].name;
        continue;
      }
      ASSERT_TRUE(gg.defined()) << pg.modules[m].name;
      EXPECT_EQ(gg.scalar_type(), at::kFloat);
      if (pc.modules[m].params[k].grad().norm().item<double>() > 1e-6) {
        EXPECT_LE(RelDiff(gg, pc.modules[m].params[k].grad()), 6e-2) << pg.modules[m].name;
      }
    }
  }
}

TEST(CudaTrainerTest, TrainsOnCudaWithFiniteLosses) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  config::TrainConfig c = testing::ToyConfig(testing::WriteToyCorpus("cuda_trainer"));
  c.train.steps = 30;
  c.train.eval_every = 10;
  c.train.device = "cuda";
  c.policy.warmup_steps = 10;
  c.policy.probe_every = 5;
  for (const char* precision : {"fp32", "bf16"}) {
    c.train.precision = precision;
    auto t = Trainer::Create(c, {"", false, false});
    ASSERT_TRUE(t.ok()) << t.status();
    auto s = (*t)->Run();
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_TRUE(std::isfinite((*s)["best_val_loss"].get<double>())) << precision;
    EXPECT_GT((*s)["flops_by_phase"]["spectral"].get<double>(), 0);
    EXPECT_EQ((*s)["precision"], precision);
    EXPECT_GT((*s)["flops_per_second"].get<double>(), 0);
  }
}

// Dropout on a GPU draws from the device's generator: a run stopped at its checkpoint and
// resumed ends with the parameters of the uninterrupted run.
TEST(CudaTrainerTest, AResumedRunWithDropoutEqualsTheUninterruptedOne) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  config::TrainConfig c = testing::ToyConfig(testing::WriteToyCorpus("cuda_resume"));
  c.train.steps = 20;
  c.train.eval_every = 10;
  c.train.checkpoint_every = 10;
  c.train.device = "cuda";
  c.train.deterministic = true;
  c.model.dropout = 0.2;
  c.policy.warmup_steps = 5;
  c.policy.probe_every = 5;
  const std::string root =
      (std::filesystem::temp_directory_path() / ("mat_cuda_resume_" + std::to_string(::getpid())))
          .string();
  auto straight = Trainer::Create(c, {root + "/straight", false, false});
  ASSERT_TRUE(straight.ok()) << straight.status();
  ASSERT_TRUE((*straight)->Run().ok());
  const std::string expected = (*straight)->ParamChecksum();
  {
    auto first = Trainer::Create(c, {root + "/cut", false, false});
    ASSERT_TRUE(first.ok()) << first.status();
    ASSERT_TRUE((*first)->Run(10).ok());
  }
  auto second = Trainer::Create(c, {root + "/cut", false, true});
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_TRUE((*second)->Run().ok());
  EXPECT_EQ((*second)->resumed_from_step(), 10);
  EXPECT_EQ((*second)->ParamChecksum(), expected);
  std::filesystem::remove_all(root);
}

}  // namespace
}  // namespace mat::trainer
