// trainer/models/sliced_linear.h: ColSplitForward's shared bias (W_O's and W_2's) is added in the
// same matmul and trained whatever blocks are attached; the weight gradient has the attached
// blocks' rows only; under bf16 autocast the output stays bf16, as nn.Linear's does.
#include "trainer/models/sliced_linear.h"

#include <gtest/gtest.h>

#include "trainer/models/autocast.h"

namespace mat::trainer {
namespace {

namespace F = torch::nn::functional;

class ColSplitBiasTest : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(3);
    auto f64 = torch::TensorOptions().dtype(torch::kDouble);
    x_ = torch::randn({2, 5, 6}, f64);
    w_t_ = torch::randn({6, 4}, f64).requires_grad_(true);  // W^T: input units are rows
    b_ = torch::randn({4}, f64).requires_grad_(true);
    r_ = torch::randn({2, 5, 4}, f64);  // the loss is sum(y * r): dL/dy = r
  }

  torch::Tensor x_, w_t_, b_, r_;
  const std::vector<RowBlock> blocks_ = EqualBlocks(3, 2);
};

TEST_F(ColSplitBiasTest, TheBiasIsAddedAndTrainedWhateverIsAttached) {
  for (const std::vector<bool>& attached :
       {std::vector<bool>{true, true, true}, {true, false, true}, {false, false, false}}) {
    SCOPED_TRACE(::testing::Message() << attached[0] << attached[1] << attached[2]);
    w_t_.mutable_grad().reset();
    b_.mutable_grad().reset();
    torch::Tensor y = ColSplitForward(x_, w_t_, blocks_, attached, b_);
    ASSERT_EQ(y.sizes(), (std::vector<int64_t>{2, 5, 4}));
    const torch::Tensor want = F::linear(x_, w_t_.detach().t(), b_.detach());
    EXPECT_TRUE(torch::allclose(y.detach(), want, 1e-12, 1e-12));
    (y * r_).sum().backward();
    ASSERT_TRUE(b_.grad().defined()) << "the shared bias belongs to no block";
    EXPECT_TRUE(torch::allclose(b_.grad(), r_.sum(std::vector<int64_t>{0, 1}), 1e-12, 1e-12));
    const bool any = attached[0] || attached[1] || attached[2];
    ASSERT_EQ(w_t_.grad().defined(), any);
    if (!any) continue;
    // dL/dW^T = x^T r over the batch; rows of detached blocks stay zero.
    const torch::Tensor full = torch::matmul(x_.reshape({-1, 6}).t(), r_.reshape({-1, 4}));
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const int64_t n = blocks_[i].end - blocks_[i].begin;
      const torch::Tensor got = w_t_.grad().narrow(0, blocks_[i].begin, n);
      if (attached[i]) {
        EXPECT_TRUE(torch::allclose(got, full.narrow(0, blocks_[i].begin, n), 1e-12, 1e-12)) << i;
      } else {
        EXPECT_EQ(got.abs().max().item<double>(), 0.0) << i;
      }
    }
  }
}

TEST_F(ColSplitBiasTest, WithoutABiasTheMapHasNone) {
  torch::Tensor y = ColSplitForward(x_, w_t_, blocks_, {true, true, true});
  EXPECT_TRUE(torch::allclose(y.detach(), torch::matmul(x_, w_t_.detach()), 1e-12, 1e-12));
}

TEST_F(ColSplitBiasTest, UnderBf16AutocastTheOutputIsBf16AsNnLinears) {
  torch::Tensor x = x_.to(torch::kFloat), w_t = w_t_.detach().to(torch::kFloat).requires_grad_(true),
                b = b_.detach().to(torch::kFloat).requires_grad_(true);
  torch::Tensor y, want;
  {
    AutocastGuard bf16(torch::Device(torch::kCPU), Precision::kBFloat16);
    y = ColSplitForward(x, w_t, blocks_, {true, true, true}, b);
    want = F::linear(x, w_t.detach().t(), b.detach());
  }
  // A separate fp32 bias add after a bf16 matmul promoted the sum to float32.
  EXPECT_EQ(y.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(want.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::allclose(y.to(torch::kFloat), want.to(torch::kFloat), 2e-2, 2e-2));
  (y.to(torch::kFloat) * r_.to(torch::kFloat)).sum().backward();
  ASSERT_TRUE(b.grad().defined());
  EXPECT_EQ(b.grad().scalar_type(), torch::kFloat) << "the leaf's dtype";
  EXPECT_TRUE(torch::allclose(b.grad(), r_.sum(std::vector<int64_t>{0, 1}).to(torch::kFloat), 2e-2, 2e-2));
}

}  // namespace
}  // namespace mat::trainer
